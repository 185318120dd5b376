//! The settings pane: model (open a file or folder, recent models, backend, TAESD), sampler,
//! schedule, steps, guidance, size with presets and an aspect lock, strength and preview mode; and
//! the seed with its dice, lock and batch count.

use egui::{ComboBox, DragValue, RichText, Slider};
use studio_engine::device::Backend;
use studio_engine::{PreviewMode, Sampler, Schedule};

use super::Action;
use crate::state::Settings;

/// The model as the studio knows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum ModelStatus {
    #[default]
    None,
    Loading(String),
    Loaded {
        name: String,
        family: String,
        device: String,
    },
    Failed(String),
}

const PRESETS: &[(u32, u32)] = &[
    (512, 512),
    (768, 768),
    (512, 768),
    (768, 512),
    (640, 448),
    (448, 640),
    (1024, 576),
];

pub fn show(
    ui: &mut egui::Ui,
    settings: &mut Settings,
    model: &ModelStatus,
    has_init_image: bool,
) -> Vec<Action> {
    let mut actions = Vec::new();
    model_section(ui, settings, model, &mut actions);
    ui.separator();
    seed_section(ui, settings, &mut actions);
    ui.separator();
    ui.label(RichText::new("Sampling").strong());
    egui::Grid::new("sampling").num_columns(2).show(ui, |ui| {
        let label = ui.label("Sampler");
        ComboBox::from_id_salt("sampler")
            .selected_text(settings.sampler.a1111_name())
            .show_ui(ui, |ui| {
                for sampler in Sampler::ALL {
                    ui.selectable_value(&mut settings.sampler, sampler, sampler.a1111_name());
                }
            })
            .response
            .labelled_by(label.id);
        ui.end_row();
        let label = ui.label("Schedule");
        ComboBox::from_id_salt("schedule")
            .selected_text(settings.schedule.id())
            .show_ui(ui, |ui| {
                for schedule in Schedule::ALL {
                    ui.selectable_value(&mut settings.schedule, schedule, schedule.id());
                }
            })
            .response
            .labelled_by(label.id);
        ui.end_row();
        let label = ui.label("Steps");
        ui.add(Slider::new(&mut settings.steps, 1..=150))
            .labelled_by(label.id);
        ui.end_row();
        let label = ui
            .label("CFG scale")
            .on_hover_text("How strongly the prompt steers the image; 1 turns guidance off.");
        ui.add(Slider::new(&mut settings.cfg_scale, 1.0..=20.0).step_by(0.5))
            .labelled_by(label.id);
        ui.end_row();
        if has_init_image {
            let label = ui.label("Strength").on_hover_text(
                "How much of the init image is repainted (0 keeps it, 1 replaces it).",
            );
            ui.add(Slider::new(&mut settings.strength, 0.05..=1.0).step_by(0.05))
                .labelled_by(label.id);
            ui.end_row();
        }
        ui.label("Preview");
        ui.horizontal(|ui| {
            ui.selectable_value(&mut settings.preview, PreviewMode::Projection, "Fast");
            ui.selectable_value(&mut settings.preview, PreviewMode::Taesd, "TAESD")
                .on_hover_text(
                    "Full-resolution previews with a TAESD model (open one under Model).",
                );
            ui.selectable_value(&mut settings.preview, PreviewMode::Off, "Off");
        });
        ui.end_row();
    });
    ui.separator();
    size_section(ui, settings);
    actions
}

fn model_section(
    ui: &mut egui::Ui,
    settings: &mut Settings,
    model: &ModelStatus,
    actions: &mut Vec<Action>,
) {
    ui.label(RichText::new("Model").strong());
    match model {
        ModelStatus::None => ui.weak("No model yet: open a checkpoint file or a diffusers folder."),
        ModelStatus::Loading(name) => ui.label(format!("Loading {name}…")),
        ModelStatus::Loaded {
            name,
            family,
            device,
        } => ui
            .label(RichText::new(name).strong())
            .on_hover_text(format!("{family} on {device}")),
        ModelStatus::Failed(error) => ui.colored_label(ui.visuals().error_fg_color, error),
    };
    ui.horizontal(|ui| {
        if ui
            .button("Open file…")
            .on_hover_text("A single-file .safetensors checkpoint")
            .clicked()
        {
            actions.push(Action::OpenModelFile);
        }
        if ui
            .button("Open folder…")
            .on_hover_text("A diffusers model folder")
            .clicked()
        {
            actions.push(Action::OpenModelFolder);
        }
    });
    if !settings.recent_models.is_empty() {
        let recent = ComboBox::from_id_salt("recent models")
            .selected_text("Recent models")
            .width(ui.available_width())
            .show_ui(ui, |ui| {
                for path in &settings.recent_models {
                    let name = path.file_name().map_or_else(
                        || path.display().to_string(),
                        |n| n.to_string_lossy().into_owned(),
                    );
                    if ui
                        .selectable_label(settings.model.as_ref() == Some(path), name)
                        .on_hover_text(path.display().to_string())
                        .clicked()
                    {
                        actions.push(Action::LoadModel(path.clone()));
                    }
                }
            });
        recent
            .response
            .widget_info(|| egui::WidgetInfo::labeled(egui::Role::ComboBox, true, "Recent models"));
    }
    ui.horizontal(|ui| {
        ui.label("Backend");
        for (backend, label) in [
            (Backend::Auto, "Auto"),
            (Backend::Cpu, "CPU"),
            (Backend::Wgpu, "GPU"),
        ] {
            ui.selectable_value(&mut settings.backend, backend, label);
        }
    })
    .response
    .on_hover_text("Where the model runs; applies the next time a model is loaded.");
    ui.horizontal(|ui| {
        let taesd = settings
            .taesd
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        ui.label(format!("TAESD: {}", taesd.as_deref().unwrap_or("none")));
        if ui.small_button("Open…").clicked() {
            actions.push(Action::OpenTaesd);
        }
        if settings.taesd.is_some() && ui.small_button("✕").on_hover_text("No TAESD").clicked() {
            settings.taesd = None;
        }
    });
}

fn seed_section(ui: &mut egui::Ui, settings: &mut Settings, actions: &mut Vec<Action>) {
    ui.horizontal(|ui| {
        let label = ui.label("Seed");
        ui.add(DragValue::new(&mut settings.seed).speed(1.0))
            .labelled_by(label.id);
        if ui
            .button("Random")
            .on_hover_text("New random seed")
            .clicked()
        {
            actions.push(Action::RandomSeed);
        }
        ui.toggle_value(&mut settings.seed_locked, "Lock")
            .on_hover_text("Locked: keep this seed. Unlocked: a new seed for every generation.");
    });
    ui.horizontal(|ui| {
        let label = ui.label("Batch");
        ui.add(DragValue::new(&mut settings.batch).range(1..=16))
            .labelled_by(label.id)
            .on_hover_text("Images per generation, with seeds seed, seed + 1, …");
    });
}

fn size_section(ui: &mut egui::Ui, settings: &mut Settings) {
    ui.label(RichText::new("Size").strong());
    ui.horizontal(|ui| {
        let (old_w, old_h) = (settings.width, settings.height);
        ui.add(
            DragValue::new(&mut settings.width)
                .range(64..=2048)
                .speed(8.0)
                .suffix(" w"),
        );
        ui.label("×");
        ui.add(
            DragValue::new(&mut settings.height)
                .range(64..=2048)
                .speed(8.0)
                .suffix(" h"),
        );
        ui.toggle_value(&mut settings.aspect_locked, "Lock ratio")
            .on_hover_text("Keep the aspect ratio");
        settings.width = settings.width / 8 * 8;
        settings.height = settings.height / 8 * 8;
        if settings.aspect_locked {
            if settings.width != old_w {
                settings.height = snap(settings.width as f32 * old_h as f32 / old_w as f32);
            } else if settings.height != old_h {
                settings.width = snap(settings.height as f32 * old_w as f32 / old_h as f32);
            }
        }
    });
    ui.horizontal_wrapped(|ui| {
        for &(w, h) in PRESETS {
            if ui
                .selectable_label(
                    settings.width == w && settings.height == h,
                    format!("{w}×{h}"),
                )
                .clicked()
            {
                settings.width = w;
                settings.height = h;
            }
        }
    });
}

fn snap(value: f32) -> u32 {
    ((value / 8.0).round() as u32 * 8).clamp(64, 2048)
}
