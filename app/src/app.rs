//! `StudioApp`: persisted settings beside the runtime handles (engine, dialogs, gallery, canvas).
//! `App::logic` drains what arrived (engine events, dialog answers, finished disk work, dropped
//! files); `App::ui` draws the panes and applies the actions they return, in one place.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, OnceLock};

use egui::{Color32, ColorImage, Key, Modifiers, RichText, TextureHandle, TextureOptions};
use image::RgbImage;
use studio_engine::tokenizer::{ClipTokenizer, PadToken};
use studio_engine::{Event, GenerationRequest, JobId, Progress};

use crate::dialogs::{Dialogs, Purpose};
use crate::engine_client::EngineClient;
use crate::gallery::history::{Done, Gallery, ItemId};
use crate::gallery::metadata::{FoundMetadata, ImageMetadata, model_hash, read_metadata};
use crate::panes::canvas::{Canvas, Overlay};
use crate::panes::gallery::ThumbnailCache;
use crate::panes::settings::ModelStatus;
use crate::panes::{self, Action};
use crate::state::Settings;

/// The key under which eframe stores the settings.
pub const SETTINGS_KEY: &str = "studio-settings";

/// A message for the artist, shown until dismissed.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub text: String,
    pub error: bool,
}

struct Job {
    id: JobId,
    request: GenerationRequest,
    progress: Option<Progress>,
    preview: Option<TextureHandle>,
    preview_step: usize,
    cancelling: bool,
}

/// An image dropped on the window, waiting for the artist to say what to do with it.
struct Dropped {
    name: String,
    image: RgbImage,
    metadata: Option<FoundMetadata>,
}

struct Viewer {
    id: ItemId,
    texture: Option<TextureHandle>,
    loading: Option<Receiver<Option<RgbImage>>>,
}

/// Everything that lives only while the studio runs.
pub struct Runtime {
    engine: Box<dyn EngineClient>,
    dialogs: Box<dyn Dialogs>,
    gallery: Option<Gallery>,
    thumbnails: ThumbnailCache,
    pub canvas: Canvas,
    model: ModelStatus,
    model_hash: Option<Receiver<Option<String>>>,
    hash: Option<String>,
    jobs: Vec<Job>,
    last_result: Option<(TextureHandle, u64)>,
    notices: Vec<Notice>,
    tokenizer: Arc<OnceLock<ClipTokenizer>>,
    dropped: Option<Dropped>,
    viewer: Option<Viewer>,
    /// The window title last set (it shows progress while generating).
    title: String,
}

pub struct StudioApp {
    pub settings: Settings,
    pub runtime: Runtime,
}

impl StudioApp {
    /// A studio with `settings`, keeping its history in `data_dir/gallery`.
    pub fn new(
        settings: Settings,
        engine: Box<dyn EngineClient>,
        dialogs: Box<dyn Dialogs>,
        data_dir: PathBuf,
    ) -> Self {
        let mut notices = Vec::new();
        let gallery = match Gallery::open(&data_dir.join("gallery")) {
            Ok(gallery) => Some(gallery),
            Err(error) => {
                notices.push(Notice {
                    text: format!(
                        "The gallery is unavailable: {error:#}. Images will not be kept."
                    ),
                    error: true,
                });
                None
            }
        };
        let tokenizer = Arc::new(OnceLock::new());
        let slot = Arc::clone(&tokenizer);
        std::thread::spawn(move || {
            if let Ok(tokenizer) = ClipTokenizer::builtin(&PadToken::EndOfText) {
                let _ = slot.set(tokenizer);
            }
        });
        let mut app = Self {
            settings,
            runtime: Runtime {
                engine,
                dialogs,
                gallery,
                thumbnails: ThumbnailCache::default(),
                canvas: Canvas::default(),
                model: ModelStatus::None,
                model_hash: None,
                hash: None,
                jobs: Vec::new(),
                last_result: None,
                notices,
                tokenizer,
                dropped: None,
                viewer: None,
                title: "AI Studio".into(),
            },
        };
        if let Some(model) = app.settings.model.clone() {
            app.load_model(model);
        }
        app
    }

    /// The studio as `eframe` starts it: settings from its storage, the real engine and dialogs.
    /// `model`, when given (`studio MODEL`), replaces the remembered model.
    pub fn from_creation_context(
        cc: &eframe::CreationContext<'_>,
        data_dir: PathBuf,
        model: Option<PathBuf>,
    ) -> Self {
        setup_style(&cc.egui_ctx);
        let mut settings: Settings = cc
            .storage
            .and_then(|storage| eframe::get_value::<Settings>(storage, SETTINGS_KEY))
            .unwrap_or_default();
        if let Some(model) = model {
            settings.use_model(std::path::absolute(&model).unwrap_or(model));
        }
        let engine = crate::engine_client::ThreadedEngine::spawn(cc.egui_ctx.clone());
        Self::new(
            settings,
            Box::new(engine),
            Box::<crate::dialogs::NativeDialogs>::default(),
            data_dir,
        )
    }

    pub fn notices(&self) -> &[Notice] {
        &self.runtime.notices
    }

    pub fn gallery(&self) -> Option<&Gallery> {
        self.runtime.gallery.as_ref()
    }

    pub fn is_generating(&self) -> bool {
        !self.runtime.jobs.is_empty()
    }

    pub fn is_model_loaded(&self) -> bool {
        matches!(self.runtime.model, ModelStatus::Loaded { .. })
    }

    /// What Generate does.
    pub fn start_generation(&mut self) {
        self.generate();
    }

    fn notify(&mut self, text: impl Into<String>, error: bool) {
        self.runtime.notices.push(Notice {
            text: text.into(),
            error,
        });
    }

    fn load_model(&mut self, path: PathBuf) {
        let name = display_name(&path);
        self.runtime.model = ModelStatus::Loading(name);
        self.runtime.engine.load_model(
            path.clone(),
            self.settings.backend,
            self.settings.taesd.clone(),
        );
        let (send, receive) = channel();
        std::thread::spawn(move || {
            let _ = send.send(model_hash(&path));
        });
        self.runtime.model_hash = Some(receive);
        self.runtime.hash = None;
    }

    /// The request the studio would send now, with the canvas's image and mask.
    pub fn current_request(&self) -> GenerationRequest {
        let canvas = &self.runtime.canvas;
        let mut request = self.settings.request();
        if let Some(image) = canvas.image() {
            request.init_image = Some(image.clone());
            request.mask = canvas.painted_mask().cloned();
            if request.outpaint.is_empty() {
                request.width = image.width();
                request.height = image.height();
            }
        } else {
            request.outpaint = Default::default();
        }
        request
    }

    fn generate(&mut self) {
        if !matches!(
            self.runtime.model,
            ModelStatus::Loaded { .. } | ModelStatus::Loading(_)
        ) {
            self.notify("Open a model first: a .safetensors checkpoint or a diffusers folder (Model ▸ Open).", true);
            return;
        }
        if !self.settings.seed_locked {
            self.settings.seed = random_seed();
        }
        let request = self.current_request();
        if let Err(error) = request.validate() {
            self.notify(error.to_string(), true);
            return;
        }
        let id = self.runtime.engine.generate(request.clone());
        self.runtime.jobs.push(Job {
            id,
            request,
            progress: None,
            preview: None,
            preview_step: 0,
            cancelling: false,
        });
    }

    fn cancel(&mut self) {
        for job in &mut self.runtime.jobs {
            job.cancelling = true;
            self.runtime.engine.cancel(job.id);
        }
    }

    fn handle_event(&mut self, ctx: &egui::Context, event: Event) {
        match event {
            Event::ModelLoading { .. } => {}
            Event::ModelLoaded {
                path,
                family,
                device,
                seconds,
            } => {
                self.runtime.model = ModelStatus::Loaded {
                    name: display_name(&path),
                    family: family.name().into(),
                    device: format!("{device}, loaded in {seconds:.1} s"),
                };
            }
            Event::ModelFailed { error, .. } => {
                self.runtime.model = ModelStatus::Failed("The model could not be loaded".into());
                self.notify(format!("{error}. Open another model file or folder."), true);
            }
            Event::JobStarted { .. } => {}
            Event::Progress(progress) => {
                if let Some(job) = self.job_mut(progress.job) {
                    job.progress = Some(progress);
                }
            }
            Event::PreviewReady { .. } => {
                if let Some(preview) = self.runtime.engine.take_preview() {
                    let texture = texture(ctx, "preview", &preview.image);
                    if let Some(job) = self.job_mut(preview.job) {
                        job.preview = Some(texture);
                        job.preview_step = preview.step;
                    }
                }
            }
            Event::ImageFinished { job, image } => {
                let model = match &self.runtime.model {
                    ModelStatus::Loaded { name, .. } => name.clone(),
                    _ => String::new(),
                };
                let request = self
                    .runtime
                    .jobs
                    .iter()
                    .find(|j| j.id == job)
                    .map(|j| j.request.clone())
                    .unwrap_or_default();
                self.runtime.last_result = Some((texture(ctx, "result", &image.image), image.seed));
                let metadata =
                    ImageMetadata::new(&request, image.seed, &model, self.runtime.hash.clone());
                if let Some(gallery) = &self.runtime.gallery {
                    gallery.add(image.image, metadata);
                }
            }
            Event::JobFinished { job, .. } => self.runtime.jobs.retain(|j| j.id != job),
            Event::JobCancelled { job, .. } => self.runtime.jobs.retain(|j| j.id != job),
            Event::JobFailed { job, error } => {
                self.runtime.jobs.retain(|j| j.id != job);
                self.notify(format!("Generation failed: {error}"), true);
            }
        }
    }

    fn job_mut(&mut self, id: JobId) -> Option<&mut Job> {
        self.runtime.jobs.iter_mut().find(|j| j.id == id)
    }

    fn handle_dialog(&mut self, purpose: Purpose, path: Option<PathBuf>) {
        let Some(path) = path else { return };
        match purpose {
            Purpose::ModelFile | Purpose::ModelFolder => {
                self.settings.use_model(path.clone());
                self.load_model(path);
            }
            Purpose::Taesd => self.settings.taesd = Some(path),
            Purpose::InitImage => self.open_image(&path),
            Purpose::Export(id) => {
                if let Some(gallery) = &self.runtime.gallery {
                    gallery.export(id, path);
                }
            }
        }
    }

    fn open_image(&mut self, path: &std::path::Path) {
        match image::open(path) {
            Ok(image) => self.set_init_image(image.to_rgb8()),
            Err(error) => self.notify(
                format!(
                    "Cannot open {}: {error}. Use a PNG, JPEG or WebP image.",
                    path.display()
                ),
                true,
            ),
        }
    }

    fn set_init_image(&mut self, image: RgbImage) {
        // The VAE works on 8×8 blocks: crop to a multiple of 8.
        let (w, h) = (image.width() / 8 * 8, image.height() / 8 * 8);
        if w < 64 || h < 64 {
            self.notify(
                "The image is too small: it needs to be at least 64×64 pixels.",
                true,
            );
            return;
        }
        let image = image::imageops::crop_imm(&image, 0, 0, w, h).to_image();
        self.runtime.canvas.set_image(image);
        self.settings.outpaint = Default::default();
    }

    /// A file dropped on the window: an image to paint on, and parameters to restore if it has any.
    fn dropped_file(&mut self, path: PathBuf, bytes: Result<Vec<u8>, String>) {
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(error) => {
                return self.notify(format!("Cannot read {}: {error}", path.display()), true);
            }
        };
        let name = display_name(&path);
        let image = match image::load_from_memory(&bytes) {
            Ok(image) => image.to_rgb8(),
            Err(error) => {
                return self.notify(
                    format!("{name} is not an image the studio can read: {error}"),
                    true,
                );
            }
        };
        let metadata = read_metadata(&bytes).ok().flatten();
        self.runtime.dropped = Some(Dropped {
            name,
            image,
            metadata,
        });
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::Generate => self.generate(),
            Action::Cancel => self.cancel(),
            Action::OpenModelFile => self.runtime.dialogs.open(Purpose::ModelFile, None),
            Action::OpenModelFolder => self.runtime.dialogs.open(Purpose::ModelFolder, None),
            Action::OpenTaesd => self.runtime.dialogs.open(Purpose::Taesd, None),
            Action::LoadModel(path) => {
                self.settings.use_model(path.clone());
                self.load_model(path);
            }
            Action::OpenInitImage => self.runtime.dialogs.open(Purpose::InitImage, None),
            Action::ClearCanvas => {
                self.runtime.canvas.clear();
                self.settings.outpaint = Default::default();
            }
            Action::RandomSeed => self.settings.seed = random_seed(),
            Action::ReuseSeed(id) => {
                if let Some(item) = self.item(id) {
                    self.settings.seed = item.metadata.seed;
                    self.settings.seed_locked = true;
                }
            }
            Action::ReuseParameters(id) => {
                if let Some(item) = self.item(id) {
                    let mut request = item.metadata.request.clone();
                    request.seed = item.metadata.seed;
                    self.settings.apply(&request);
                    self.settings.seed_locked = true;
                }
            }
            Action::SendToCanvas(id) => {
                let path = self
                    .runtime
                    .gallery
                    .as_ref()
                    .and_then(|g| g.get(id).map(|item| g.path(item)));
                if let Some(path) = path {
                    self.open_image(&path);
                    self.runtime.viewer = None;
                }
            }
            Action::View(id) => {
                self.runtime.viewer = id.and_then(|id| {
                    let path = self
                        .runtime
                        .gallery
                        .as_ref()?
                        .get(id)
                        .map(|item| self.runtime.gallery.as_ref().unwrap().path(item))?;
                    let (send, receive) = channel();
                    std::thread::spawn(move || {
                        let _ = send.send(image::open(path).ok().map(|i| i.to_rgb8()));
                    });
                    Some(Viewer {
                        id,
                        texture: None,
                        loading: Some(receive),
                    })
                });
            }
            Action::Delete(id) => {
                if let Some(gallery) = &mut self.runtime.gallery {
                    gallery.delete(id);
                }
                if self.runtime.viewer.as_ref().is_some_and(|v| v.id == id) {
                    self.runtime.viewer = None;
                }
            }
            Action::UndoDelete => {
                if let Some(gallery) = &mut self.runtime.gallery {
                    gallery.undo_delete();
                }
            }
            Action::Export(id) => {
                let name = self
                    .item(id)
                    .map(|item| format!("{}.png", item.metadata.seed));
                self.runtime.dialogs.open(Purpose::Export(id), name);
            }
            Action::DismissNotice(index) => {
                if index < self.runtime.notices.len() {
                    self.runtime.notices.remove(index);
                }
            }
            Action::UseDroppedAsInit => {
                if let Some(dropped) = self.runtime.dropped.take() {
                    self.set_init_image(dropped.image);
                }
            }
            Action::RestoreDropped => {
                if let Some(found) = self.runtime.dropped.take().and_then(|d| d.metadata) {
                    self.settings.apply(&found.request);
                    self.settings.seed = found.seed;
                    self.settings.seed_locked = true;
                }
            }
        }
    }

    fn item(&self, id: ItemId) -> Option<&crate::gallery::history::Item> {
        self.runtime.gallery.as_ref()?.get(id)
    }

    fn shortcuts(&mut self, ctx: &egui::Context) -> Vec<Action> {
        let mut actions = Vec::new();
        ctx.input_mut(|i| {
            if i.consume_key(Modifiers::NONE, Key::Escape) {
                actions.push(Action::Cancel);
            }
            if i.consume_key(Modifiers::COMMAND, Key::Enter) {
                actions.push(Action::Generate);
            }
        });
        actions
    }

    fn status_bar(&self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        ui.horizontal(|ui| {
            let generate = ui.add_enabled(
                matches!(self.runtime.model, ModelStatus::Loaded { .. }),
                egui::Button::new(RichText::new("Generate").strong())
                    .min_size(egui::vec2(110.0, 28.0)),
            );
            if generate
                .on_hover_text("Ctrl+Enter")
                .on_disabled_hover_text("Open a model first")
                .clicked()
            {
                actions.push(Action::Generate);
            }
            let Some(job) = self.runtime.jobs.first() else {
                ui.weak(match &self.runtime.model {
                    ModelStatus::Loaded { .. } => "Ready.",
                    ModelStatus::Loading(_) => "Loading the model…",
                    _ => "Open a model to start.",
                });
                return;
            };
            if ui
                .add_enabled(!job.cancelling, egui::Button::new("Cancel"))
                .on_hover_text("Esc")
                .clicked()
            {
                actions.push(Action::Cancel);
            }
            let queued = self.runtime.jobs.len() - 1;
            match &job.progress {
                Some(p) => {
                    let label = format!(
                        "{}step {}/{}{} · {:.1} s · ETA {:.1} s{}",
                        if job.cancelling { "cancelling… " } else { "" },
                        p.step,
                        p.steps,
                        if p.images > 1 {
                            format!(" of image {}/{}", p.image + 1, p.images)
                        } else {
                            String::new()
                        },
                        p.elapsed.as_secs_f32(),
                        p.eta.as_secs_f32(),
                        if queued > 0 {
                            format!(" · {queued} queued")
                        } else {
                            String::new()
                        },
                    );
                    ui.add(
                        egui::ProgressBar::new(p.fraction())
                            .text(label)
                            .desired_width(ui.available_width()),
                    );
                }
                // Static text: an animated spinner would repaint every frame and, on software
                // rendering, take CPU from the engine.
                None => {
                    ui.label(if job.cancelling {
                        "Cancelling…"
                    } else {
                        "Starting…"
                    });
                }
            }
        });
    }

    fn canvas_toolbar(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        ui.horizontal_wrapped(|ui| {
            if ui.button("Open image…").clicked() {
                actions.push(Action::OpenInitImage);
            }
            if self.runtime.canvas.image().is_none() {
                return;
            }
            if ui
                .button("Clear")
                .on_hover_text("Remove the image and its mask")
                .clicked()
            {
                actions.push(Action::ClearCanvas);
            }
            ui.separator();
            let brush = &mut self.settings.brush;
            ui.label("Brush");
            ui.add(egui::Slider::new(&mut brush.size, 2.0..=512.0).logarithmic(true))
                .on_hover_text("Size ([ and ])");
            ui.add(egui::Slider::new(&mut brush.hardness, 0.0..=1.0).text("hard"));
            ui.add(egui::Slider::new(&mut brush.opacity, 0.05..=1.0).text("opacity"));
            let canvas = &mut self.runtime.canvas;
            ui.toggle_value(&mut canvas.eraser, "Eraser")
                .on_hover_text("X");
            if ui.button("Invert").clicked() {
                canvas.invert_mask();
            }
            if ui.button("Clear mask").clicked() {
                canvas.clear_mask();
            }
            if ui
                .add_enabled(canvas.can_undo(), egui::Button::new("Undo"))
                .on_hover_text("Ctrl+Z")
                .clicked()
            {
                canvas.undo();
            }
            if ui
                .add_enabled(canvas.can_redo(), egui::Button::new("Redo"))
                .on_hover_text("Ctrl+Shift+Z")
                .clicked()
            {
                canvas.redo();
            }
            ui.add(
                egui::DragValue::new(&mut self.settings.mask_blur)
                    .range(0..=64)
                    .prefix("feather ")
                    .suffix(" px"),
            );
            ui.separator();
            let o = &mut self.settings.outpaint;
            ui.label("Extend");
            for (value, name) in [
                (&mut o.left, "left"),
                (&mut o.top, "top"),
                (&mut o.right, "right"),
                (&mut o.bottom, "bottom"),
            ] {
                ui.add(
                    egui::DragValue::new(value)
                        .range(0..=1024)
                        .speed(8.0)
                        .prefix(format!("{name} ")),
                );
                *value = *value / 8 * 8;
            }
        });
    }

    fn notices_ui(&self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        for (index, notice) in self.runtime.notices.iter().enumerate() {
            let color = if notice.error {
                ui.visuals().error_fg_color
            } else {
                ui.visuals().text_color()
            };
            egui::Frame::group(ui.style()).show(ui, |ui| {
                ui.horizontal(|ui| {
                    ui.colored_label(color, &notice.text);
                    if ui.small_button("Dismiss").clicked() {
                        actions.push(Action::DismissNotice(index));
                    }
                });
            });
        }
        if let Some(dropped) = &self.runtime.dropped {
            egui::Frame::group(ui.style()).show(ui, |ui| {
                ui.horizontal_wrapped(|ui| {
                    match &dropped.metadata {
                        Some(found) => ui.label(format!(
                            "{} carries {} parameters.",
                            dropped.name, found.source
                        )),
                        None => ui.label(format!("{} has no generation parameters.", dropped.name)),
                    };
                    if dropped.metadata.is_some() && ui.button("Restore parameters").clicked() {
                        actions.push(Action::RestoreDropped);
                    }
                    if ui.button("Use as init image").clicked() {
                        actions.push(Action::UseDroppedAsInit);
                    }
                });
            });
        }
    }

    fn viewer_ui(&mut self, ctx: &egui::Context, actions: &mut Vec<Action>) {
        let Some(viewer) = &mut self.runtime.viewer else {
            return;
        };
        if let Some(receive) = &viewer.loading
            && let Ok(image) = receive.try_recv()
        {
            viewer.loading = None;
            viewer.texture = image.map(|image| texture(ctx, "viewer", &image));
        }
        let id = viewer.id;
        let Some(item) = self.runtime.gallery.as_ref().and_then(|g| g.get(id)) else {
            return;
        };
        let mut open = true;
        egui::Window::new(format!("seed {}", item.metadata.seed))
            .open(&mut open)
            .collapsible(false)
            .default_size([640.0, 700.0])
            .show(ctx, |ui| {
                ui.horizontal_wrapped(|ui| panes::gallery::item_menu(ui, id, actions));
                ui.label(&item.metadata.request.prompt);
                match &viewer.texture {
                    Some(texture) => {
                        ui.add(egui::Image::new(texture).shrink_to_fit());
                    }
                    None => {
                        ui.weak("Loading…");
                    }
                }
            });
        if !open {
            actions.push(Action::View(None));
        }
    }
}

impl StudioApp {
    /// Takes in what arrived since the last frame: engine events, dialog answers, finished disk work.
    pub fn update(&mut self, ctx: &egui::Context) {
        for event in self.runtime.engine.poll() {
            self.handle_event(ctx, event);
        }
        for (purpose, path) in self.runtime.dialogs.poll() {
            self.handle_dialog(purpose, path);
        }
        if let Some(receive) = &self.runtime.model_hash
            && let Ok(hash) = receive.try_recv()
        {
            self.runtime.hash = hash;
            self.runtime.model_hash = None;
        }
        let done = self
            .runtime
            .gallery
            .as_mut()
            .map(Gallery::poll)
            .unwrap_or_default();
        for done in done {
            match done {
                Done::Failed(error) => self.notify(error, true),
                Done::Exported(path) => self.notify(format!("Exported {}", path.display()), false),
                Done::Saved(_) | Done::Restored(_) => {}
            }
        }
        self.runtime.thumbnails.poll(ctx);
        if self.is_generating()
            || self
                .runtime
                .viewer
                .as_ref()
                .is_some_and(|v| v.loading.is_some())
        {
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
        }
        let title = match self.runtime.jobs.first().and_then(|j| j.progress.as_ref()) {
            Some(p) => format!("AI Studio — step {}/{}", p.step, p.steps),
            None => "AI Studio".to_owned(),
        };
        if self.runtime.title != title {
            ctx.send_viewport_cmd(egui::ViewportCommand::Title(title.clone()));
            self.runtime.title = title;
        }
    }

    /// Draws the studio and applies what its panes asked for.
    pub fn draw(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        // Dropped files belong to this frame's input, which `logic` does not see yet.
        let dropped: Vec<_> = ctx.input(|i| i.raw.dropped_files.clone());
        for file in dropped {
            self.dropped_file(file.path().to_path_buf(), file.bytes());
        }
        let mut actions = self.shortcuts(&ctx);
        egui::Panel::left("controls")
            .resizable(true)
            .default_size(330.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    let tokenizer = self.runtime.tokenizer.get();
                    actions.extend(panes::prompt::show(ui, &mut self.settings, tokenizer));
                    ui.separator();
                    let has_image = self.runtime.canvas.image().is_some();
                    actions.extend(panes::settings::show(
                        ui,
                        &mut self.settings,
                        &self.runtime.model,
                        has_image,
                    ));
                });
            });
        if let Some(gallery) = &self.runtime.gallery {
            let gallery_actions = egui::Panel::right("gallery")
                .resizable(true)
                .default_size(300.0)
                .show(ui, |ui| {
                    panes::gallery::show(ui, gallery, &mut self.runtime.thumbnails)
                })
                .inner;
            actions.extend(gallery_actions);
        }
        egui::CentralPanel::default().show(ui, |ui| {
            self.status_bar(ui, &mut actions);
            self.notices_ui(ui, &mut actions);
            if matches!(
                self.runtime.model,
                ModelStatus::None | ModelStatus::Failed(_)
            ) {
                welcome(ui, &mut actions);
            }
            self.canvas_toolbar(ui, &mut actions);
            let overlay = match (self.runtime.jobs.first(), &self.runtime.last_result) {
                (
                    Some(Job {
                        preview: Some(texture),
                        preview_step,
                        ..
                    }),
                    _,
                ) => Some(Overlay {
                    texture,
                    caption: format!("preview · step {preview_step}"),
                }),
                (None, Some((texture, seed))) if self.runtime.canvas.image().is_none() => {
                    Some(Overlay {
                        texture,
                        caption: format!("seed {seed}"),
                    })
                }
                _ => None,
            };
            self.runtime.canvas.show(
                ui,
                &mut self.settings.brush,
                &mut self.settings.outpaint,
                overlay,
            );
        });
        self.viewer_ui(&ctx, &mut actions);
        for action in actions {
            self.apply(action);
        }
    }
}

impl eframe::App for StudioApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.update(ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.draw(ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, SETTINGS_KEY, &self.settings);
    }
}

/// What a first start shows: where to begin.
fn welcome(ui: &mut egui::Ui, actions: &mut Vec<Action>) {
    egui::Frame::group(ui.style()).inner_margin(16.0).show(ui, |ui| {
        ui.vertical_centered(|ui| {
            ui.heading("Open a Stable Diffusion model to start");
            ui.label(
                "A single-file checkpoint (.safetensors, SD 1.x or 2.x) or a diffusers folder \
                 (the one holding model_index.json). Models stay where they are; nothing is downloaded.",
            );
            ui.horizontal(|ui| {
                if ui.button("Open model file…").clicked() {
                    actions.push(Action::OpenModelFile);
                }
                if ui.button("Open model folder…").clicked() {
                    actions.push(Action::OpenModelFolder);
                }
            });
        });
    });
}

fn texture(ctx: &egui::Context, name: &str, image: &RgbImage) -> TextureHandle {
    let size = [image.width() as usize, image.height() as usize];
    ctx.load_texture(
        name,
        ColorImage::from_rgb(size, image.as_raw()),
        TextureOptions::LINEAR,
    )
}

/// A model's or image's name as the studio shows it: the file name without its extension.
pub fn display_name(path: &std::path::Path) -> String {
    path.file_stem().or_else(|| path.file_name()).map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish() & 0xffff_ffff
}

/// The studio's dark look.
pub fn setup_style(ctx: &egui::Context) {
    let mut visuals = egui::Visuals::dark();
    visuals.selection.bg_fill = Color32::from_rgb(0x3d, 0x6f, 0xd1);
    visuals.hyperlink_color = Color32::from_rgb(0x7f, 0xb0, 0xff);
    visuals.panel_fill = Color32::from_gray(28);
    visuals.window_fill = Color32::from_gray(32);
    ctx.set_visuals(visuals);
}
