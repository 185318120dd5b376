//! The gallery pane: finished images, newest first, as thumbnails decoded in the background and laid
//! out in virtual rows so a long history scrolls smoothly. Click to view large; the context menu
//! reuses parameters or the seed, sends an image to the canvas, exports or deletes it.

use std::collections::{HashMap, HashSet};

use egui::{ColorImage, RichText, TextureHandle, TextureOptions, Vec2};

use super::Action;
use crate::gallery::history::{Gallery, Item, ItemId, THUMBNAIL, Thumbnails};

/// Thumbnail textures for the items that have been on screen, decoded by a background thread.
#[derive(Default)]
pub struct ThumbnailCache {
    worker: Thumbnails,
    textures: HashMap<ItemId, TextureHandle>,
    requested: HashSet<ItemId>,
}

/// Textures kept before the least recently shown are dropped.
const KEEP: usize = 400;

impl ThumbnailCache {
    /// Uploads the thumbnails decoded since the last frame.
    pub fn poll(&mut self, ctx: &egui::Context) {
        for (id, image) in self.worker.poll() {
            if let Some(image) = image {
                let size = [image.width() as usize, image.height() as usize];
                let color = ColorImage::from_rgba_unmultiplied(size, image.as_raw());
                self.textures.insert(
                    id,
                    ctx.load_texture(format!("thumbnail {id}"), color, TextureOptions::LINEAR),
                );
            }
        }
        if self.textures.len() > KEEP {
            self.requested.retain(|id| self.textures.contains_key(id));
            let stale: Vec<ItemId> = self
                .textures
                .keys()
                .copied()
                .take(self.textures.len() - KEEP)
                .collect();
            for id in stale {
                self.textures.remove(&id);
                self.requested.remove(&id);
            }
        }
    }

    fn get(&mut self, gallery: &Gallery, item: &Item) -> Option<&TextureHandle> {
        if !self.textures.contains_key(&item.id) && self.requested.insert(item.id) {
            self.worker.request(item.id, gallery.path(item));
        }
        self.textures.get(&item.id)
    }
}

pub fn show(ui: &mut egui::Ui, gallery: &Gallery, cache: &mut ThumbnailCache) -> Vec<Action> {
    let mut actions = Vec::new();
    ui.horizontal(|ui| {
        ui.label(RichText::new(format!("Gallery ({})", gallery.items().len())).strong());
        if gallery.can_undo_delete() && ui.small_button("Undo delete").clicked() {
            actions.push(Action::UndoDelete);
        }
    });
    if gallery.items().is_empty() {
        ui.weak("Finished images appear here.");
        return actions;
    }
    let size = THUMBNAIL as f32;
    let columns = ((ui.available_width() / (size + 8.0)).floor() as usize).max(1);
    let rows = gallery.items().len().div_ceil(columns);
    egui::ScrollArea::vertical().auto_shrink(false).show_rows(
        ui,
        size + 8.0,
        rows,
        |ui, visible| {
            for row in visible {
                ui.horizontal(|ui| {
                    for item in gallery.items().iter().skip(row * columns).take(columns) {
                        thumbnail(ui, gallery, cache, item, size, &mut actions);
                    }
                });
            }
        },
    );
    actions
}

fn thumbnail(
    ui: &mut egui::Ui,
    gallery: &Gallery,
    cache: &mut ThumbnailCache,
    item: &Item,
    size: f32,
    actions: &mut Vec<Action>,
) {
    let prompt = &item.metadata.request.prompt;
    let label = format!("image {}: {}", item.metadata.seed, prompt);
    // One allocation whether or not the thumbnail has arrived, so the widget keeps its id and size
    // when the texture lands between a press and its release.
    let (rect, response) = ui.allocate_exact_size(Vec2::splat(size), egui::Sense::click());
    if ui.is_rect_visible(rect) {
        let visuals = ui.style().interact(&response);
        ui.painter()
            .rect_filled(rect, visuals.corner_radius, visuals.weak_bg_fill);
        match cache.get(gallery, item) {
            Some(texture) => {
                let inner = rect.shrink(2.0);
                let scale = (inner.size() / texture.size_vec2()).min_elem();
                let fitted =
                    egui::Rect::from_center_size(inner.center(), texture.size_vec2() * scale);
                egui::Image::new(texture).paint_at(ui, fitted);
            }
            None => {
                ui.painter().text(
                    rect.center(),
                    egui::Align2::CENTER_CENTER,
                    "…",
                    egui::TextStyle::Button.resolve(ui.style()),
                    visuals.text_color(),
                );
            }
        }
        ui.painter().rect_stroke(
            rect,
            visuals.corner_radius,
            visuals.bg_stroke,
            egui::StrokeKind::Inside,
        );
    }
    response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, true, &label));
    let response = response.on_hover_text(format!(
        "{prompt}\nseed {} · {}×{}",
        item.metadata.seed, item.width, item.height
    ));
    if response.clicked() {
        actions.push(Action::View(Some(item.id)));
    }
    response.context_menu(|ui| {
        if item_menu(ui, item.id, actions) {
            ui.close();
        }
    });
}

/// The actions on one gallery image, for its context menu and the large view; true when one was
/// chosen.
pub fn item_menu(ui: &mut egui::Ui, id: ItemId, actions: &mut Vec<Action>) -> bool {
    let mut chosen = false;
    for (label, action) in [
        ("Reuse parameters", Action::ReuseParameters(id)),
        ("Reuse seed", Action::ReuseSeed(id)),
        ("Send to canvas", Action::SendToCanvas(id)),
        ("Export…", Action::Export(id)),
        ("Delete", Action::Delete(id)),
    ] {
        if ui.button(label).clicked() {
            actions.push(action);
            chosen = true;
        }
    }
    chosen
}
