//! The canvas: the init image (or the live preview while generating), the inpainting mask painted
//! over it with a soft brush (size `[`/`]`, hardness, opacity, eraser `X`, invert, clear), undo and
//! redo of strokes (Ctrl+Z / Ctrl+Shift+Z, bounded), zoom with the wheel and pan with space-drag or
//! the middle button, and outpainting edges dragged out from the image. Strokes only touch the
//! pixels under the brush, and only those are re-uploaded, so painting stays smooth on large images.

use egui::{
    Color32, ColorImage, Key, Modifiers, Pos2, Rect, Response, Sense, Stroke, StrokeKind,
    TextureHandle, TextureOptions, Vec2,
};
use image::{GrayImage, Luma, RgbImage};
use studio_engine::Outpaint;

use crate::state::Brush;

/// Strokes kept for undo.
pub const HISTORY: usize = 40;
const MASK_TINT: [u8; 3] = [255, 64, 96];

/// A rectangle of the mask as it was before and after a stroke.
#[derive(Clone)]
struct Patch {
    x: u32,
    y: u32,
    before: GrayImage,
    after: GrayImage,
}

struct StrokeInProgress {
    before: GrayImage,
    dirty: Option<[u32; 4]>,
    last: Pos2,
}

#[derive(Default)]
pub struct Canvas {
    image: Option<RgbImage>,
    mask: Option<GrayImage>,
    image_texture: Option<TextureHandle>,
    overlay: Option<TextureHandle>,
    /// Mask pixels changed since the overlay was last uploaded: [x0, y0, x1, y1).
    overlay_dirty: Option<[u32; 4]>,
    undo: Vec<Patch>,
    redo: Vec<Patch>,
    stroke: Option<StrokeInProgress>,
    pub eraser: bool,
    zoom: Option<f32>,
    pan: Vec2,
}

/// What the canvas shows in place of the image (the live preview or the last result).
pub struct Overlay<'a> {
    pub texture: &'a TextureHandle,
    pub caption: String,
}

impl Canvas {
    pub fn image(&self) -> Option<&RgbImage> {
        self.image.as_ref()
    }

    pub fn mask(&self) -> Option<&GrayImage> {
        self.mask.as_ref()
    }

    /// The mask when anything is painted on it (otherwise the request is plain img2img).
    pub fn painted_mask(&self) -> Option<&GrayImage> {
        self.mask.as_ref().filter(|m| m.pixels().any(|p| p[0] > 0))
    }

    /// Puts `image` on the canvas with an empty mask and a fresh history.
    pub fn set_image(&mut self, image: RgbImage) {
        self.mask = Some(GrayImage::new(image.width(), image.height()));
        self.image = Some(image);
        self.image_texture = None;
        self.overlay = None;
        self.undo.clear();
        self.redo.clear();
        self.zoom = None;
        self.pan = Vec2::ZERO;
    }

    pub fn clear(&mut self) {
        *self = Self {
            eraser: self.eraser,
            ..Self::default()
        };
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }

    pub fn undo(&mut self) {
        if let Some(patch) = self.undo.pop() {
            self.apply(&patch.before, patch.x, patch.y);
            self.redo.push(patch);
        }
    }

    pub fn redo(&mut self) {
        if let Some(patch) = self.redo.pop() {
            self.apply(&patch.after, patch.x, patch.y);
            self.undo.push(patch);
        }
    }

    /// Replaces the whole mask in one undoable step.
    fn replace_mask(&mut self, change: impl Fn(&mut GrayImage)) {
        let Some(mask) = &mut self.mask else { return };
        let before = mask.clone();
        change(mask);
        let after = mask.clone();
        let (w, h) = after.dimensions();
        self.push_history(Patch {
            x: 0,
            y: 0,
            before,
            after,
        });
        self.mark_dirty([0, 0, w, h]);
    }

    pub fn invert_mask(&mut self) {
        self.replace_mask(|mask| mask.pixels_mut().for_each(|p| p[0] = 255 - p[0]));
    }

    pub fn clear_mask(&mut self) {
        self.replace_mask(|mask| mask.pixels_mut().for_each(|p| p[0] = 0));
    }

    fn push_history(&mut self, patch: Patch) {
        self.undo.push(patch);
        if self.undo.len() > HISTORY {
            self.undo.remove(0);
        }
        self.redo.clear();
    }

    fn apply(&mut self, patch: &GrayImage, x: u32, y: u32) {
        if let Some(mask) = &mut self.mask {
            image::imageops::replace(mask, patch, i64::from(x), i64::from(y));
            self.mark_dirty([x, y, x + patch.width(), y + patch.height()]);
        }
    }

    fn mark_dirty(&mut self, rect: [u32; 4]) {
        self.overlay_dirty = Some(union(self.overlay_dirty, rect));
    }

    /// Starts a stroke at `at` (image pixels).
    pub fn begin_stroke(&mut self, at: Pos2, brush: &Brush) {
        let Some(mask) = &self.mask else { return };
        self.stroke = Some(StrokeInProgress {
            before: mask.clone(),
            dirty: None,
            last: at,
        });
        self.stamp(at, brush);
    }

    /// Continues the stroke to `to`, stamping the brush along the way.
    pub fn continue_stroke(&mut self, to: Pos2, brush: &Brush) {
        let Some(from) = self.stroke.as_ref().map(|s| s.last) else {
            return;
        };
        let spacing = (brush.size / 6.0).max(1.0);
        let steps = ((to - from).length() / spacing).ceil().max(1.0) as usize;
        for i in 1..=steps {
            self.stamp(from + (to - from) * (i as f32 / steps as f32), brush);
        }
        if let Some(stroke) = &mut self.stroke {
            stroke.last = to;
        }
    }

    /// Ends the stroke, keeping the touched rectangle for undo.
    pub fn end_stroke(&mut self) {
        let Some(stroke) = self.stroke.take() else {
            return;
        };
        let (Some([x0, y0, x1, y1]), Some(mask)) = (stroke.dirty, &self.mask) else {
            return;
        };
        let before = image::imageops::crop_imm(&stroke.before, x0, y0, x1 - x0, y1 - y0).to_image();
        let after = image::imageops::crop_imm(mask, x0, y0, x1 - x0, y1 - y0).to_image();
        self.push_history(Patch {
            x: x0,
            y: y0,
            before,
            after,
        });
    }

    /// One dab of the brush: full strength inside `hardness` of the radius, fading to 0 at the edge.
    fn stamp(&mut self, at: Pos2, brush: &Brush) {
        let Some(mask) = &mut self.mask else { return };
        let radius = (brush.size / 2.0).max(0.5);
        let (w, h) = mask.dimensions();
        let x0 = (at.x - radius).floor().max(0.0) as u32;
        let y0 = (at.y - radius).floor().max(0.0) as u32;
        let x1 = ((at.x + radius).ceil().max(0.0) as u32).min(w);
        let y1 = ((at.y + radius).ceil().max(0.0) as u32).min(h);
        if x0 >= x1 || y0 >= y1 {
            return;
        }
        let hardness = brush.hardness.clamp(0.0, 0.999);
        for y in y0..y1 {
            for x in x0..x1 {
                let d = ((x as f32 + 0.5 - at.x).powi(2) + (y as f32 + 0.5 - at.y).powi(2)).sqrt()
                    / radius;
                if d >= 1.0 {
                    continue;
                }
                let falloff = if d <= hardness {
                    1.0
                } else {
                    1.0 - (d - hardness) / (1.0 - hardness)
                };
                let amount = (falloff * brush.opacity.clamp(0.0, 1.0) * 255.0).round() as u8;
                let pixel = mask.get_pixel_mut(x, y);
                pixel[0] = if self.eraser {
                    pixel[0].min(255 - amount)
                } else {
                    pixel[0].max(amount)
                };
            }
        }
        if let Some(stroke) = &mut self.stroke {
            stroke.dirty = Some(union(stroke.dirty, [x0, y0, x1, y1]));
        }
        self.overlay_dirty = Some(union(self.overlay_dirty, [x0, y0, x1, y1]));
    }

    /// Uploads what changed to the GPU: the image once, the mask overlay by dirty rectangle.
    fn sync_textures(&mut self, ctx: &egui::Context) {
        let (Some(image), Some(mask)) = (&self.image, &self.mask) else {
            return;
        };
        if self.image_texture.is_none() {
            let size = [image.width() as usize, image.height() as usize];
            let color = ColorImage::from_rgb(size, image.as_raw());
            self.image_texture =
                Some(ctx.load_texture("canvas image", color, TextureOptions::LINEAR));
        }
        if self.overlay.is_none() {
            let (w, h) = mask.dimensions();
            self.overlay = Some(ctx.load_texture(
                "canvas mask",
                tint(mask, [0, 0, w, h]),
                TextureOptions::NEAREST,
            ));
            self.overlay_dirty = None;
        }
        if let (Some(rect), Some(overlay)) = (self.overlay_dirty.take(), &mut self.overlay) {
            overlay.set_partial(
                [rect[0] as usize, rect[1] as usize],
                tint(mask, rect),
                TextureOptions::NEAREST,
            );
        }
    }

    /// Draws the canvas and handles painting, zoom, pan and outpaint edges.
    pub fn show(
        &mut self,
        ui: &mut egui::Ui,
        brush: &mut Brush,
        outpaint: &mut Outpaint,
        overlay: Option<Overlay<'_>>,
    ) -> Response {
        self.shortcuts(ui, brush);
        self.sync_textures(ui.ctx());
        let (response, painter) = ui.allocate_painter(ui.available_size(), Sense::click_and_drag());
        response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Canvas, true, "canvas"));
        if response.drag_started() || response.clicked() {
            // Painting takes the keyboard from the prompt, so [ ] X and undo reach the canvas.
            response.request_focus();
        }
        let view = response.rect;
        painter.rect_filled(view, 0.0, Color32::from_gray(18));

        let size = match (&self.image, &overlay) {
            (Some(image), _) => Vec2::new(image.width() as f32, image.height() as f32),
            (None, Some(o)) => o.texture.size_vec2(),
            (None, None) => {
                painter.text(
                    view.center(),
                    egui::Align2::CENTER_CENTER,
                    "Open or drop an image to paint a mask on — or just press Generate",
                    egui::FontId::proportional(16.0),
                    Color32::from_gray(140),
                );
                return response;
            }
        };
        let margin = Vec2::new(
            (outpaint.left + outpaint.right) as f32,
            (outpaint.top + outpaint.bottom) as f32,
        );
        let fit = ((view.size() - Vec2::splat(48.0)) / (size + margin))
            .min_elem()
            .max(0.01);
        let zoom = *self.zoom.get_or_insert(fit);
        let zoom = self.zoom_and_pan(ui, &response, zoom);
        let origin = view.center() + self.pan - size * zoom / 2.0;
        let image_rect = Rect::from_min_size(origin, size * zoom);
        let to_image = |p: Pos2| ((p - origin) / zoom).to_pos2();
        let uv = Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0));

        match (&overlay, &self.image_texture) {
            (Some(o), _) => {
                painter.image(o.texture.id(), image_rect, uv, Color32::WHITE);
                let caption = Rect::from_min_size(
                    image_rect.left_bottom() + Vec2::new(0.0, 4.0),
                    Vec2::new(240.0, 18.0),
                );
                ui.put(
                    caption,
                    egui::Label::new(egui::RichText::new(&o.caption).weak()),
                );
            }
            (None, Some(texture)) => {
                painter.image(texture.id(), image_rect, uv, Color32::WHITE);
                if let Some(mask) = &self.overlay {
                    painter.image(mask.id(), image_rect, uv, Color32::WHITE);
                }
            }
            (None, None) => {}
        }
        if self.image.is_some() {
            self.outpaint_edges(ui, &painter, image_rect, zoom, outpaint);
            self.paint(ui, &response, brush, to_image, zoom);
        }
        response
    }

    fn shortcuts(&mut self, ui: &egui::Ui, brush: &mut Brush) {
        // Keys typed into the prompt are text, not canvas commands.
        if ui.ctx().text_edit_focused() {
            return;
        }
        ui.input_mut(|i| {
            if i.consume_key(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z) {
                self.redo();
            }
            if i.consume_key(Modifiers::COMMAND, Key::Z) {
                self.undo();
            }
            if i.consume_key(Modifiers::NONE, Key::OpenBracket) {
                brush.size = (brush.size / 1.25).max(2.0);
            }
            if i.consume_key(Modifiers::NONE, Key::CloseBracket) {
                brush.size = (brush.size * 1.25).min(1024.0);
            }
            if i.consume_key(Modifiers::NONE, Key::X) {
                self.eraser = !self.eraser;
            }
        });
    }

    fn zoom_and_pan(&mut self, ui: &egui::Ui, response: &Response, zoom: f32) -> f32 {
        let mut zoom = zoom;
        if let Some(pointer) = response.hover_pos() {
            let scroll = ui.input(|i| i.smooth_scroll_delta.y);
            if scroll != 0.0 {
                let factor = (scroll / 200.0).exp();
                let new_zoom = (zoom * factor).clamp(0.02, 32.0);
                // Keep the pixel under the pointer where it is.
                let center = response.rect.center() + self.pan;
                self.pan += (pointer - center) * (1.0 - new_zoom / zoom);
                zoom = new_zoom;
                self.zoom = Some(zoom);
            }
        }
        let panning = ui.input(|i| i.key_down(Key::Space) || i.pointer.middle_down());
        if panning
            && (response.dragged_by(egui::PointerButton::Primary)
                || response.dragged_by(egui::PointerButton::Middle))
        {
            self.pan += response.drag_delta();
        }
        zoom
    }

    fn paint(
        &mut self,
        ui: &egui::Ui,
        response: &Response,
        brush: &Brush,
        to_image: impl Fn(Pos2) -> Pos2,
        zoom: f32,
    ) {
        if ui.input(|i| i.key_down(Key::Space)) {
            return;
        }
        let pointer = response.interact_pointer_pos().or(response.hover_pos());
        if response.drag_started_by(egui::PointerButton::Primary) || response.clicked() {
            if let Some(p) = response.interact_pointer_pos() {
                self.begin_stroke(to_image(p), brush);
            }
        } else if response.dragged_by(egui::PointerButton::Primary)
            && let Some(p) = pointer
        {
            self.continue_stroke(to_image(p), brush);
        }
        if response.drag_stopped() || response.clicked() {
            self.end_stroke();
        }
        if let Some(p) = response.hover_pos() {
            let color = if self.eraser {
                Color32::from_gray(220)
            } else {
                Color32::from_rgb(MASK_TINT[0], MASK_TINT[1], MASK_TINT[2])
            };
            ui.painter()
                .circle_stroke(p, brush.size * zoom / 2.0, Stroke::new(1.5, color));
        }
    }

    /// The outpainting area around the image, with edges to drag it out (in steps of 8 pixels).
    fn outpaint_edges(
        &self,
        ui: &egui::Ui,
        painter: &egui::Painter,
        image_rect: Rect,
        zoom: f32,
        outpaint: &mut Outpaint,
    ) {
        let grown = Rect::from_min_max(
            image_rect.min - Vec2::new(outpaint.left as f32, outpaint.top as f32) * zoom,
            image_rect.max + Vec2::new(outpaint.right as f32, outpaint.bottom as f32) * zoom,
        );
        if grown != image_rect {
            // The added strips, tinted as the mask is: the model repaints them.
            let fill =
                Color32::from_rgba_unmultiplied(MASK_TINT[0], MASK_TINT[1], MASK_TINT[2], 40);
            let strips = [
                Rect::from_min_max(grown.min, Pos2::new(image_rect.left(), grown.bottom())),
                Rect::from_min_max(Pos2::new(image_rect.right(), grown.top()), grown.max),
                Rect::from_min_max(
                    Pos2::new(image_rect.left(), grown.top()),
                    Pos2::new(image_rect.right(), image_rect.top()),
                ),
                Rect::from_min_max(
                    Pos2::new(image_rect.left(), image_rect.bottom()),
                    Pos2::new(image_rect.right(), grown.bottom()),
                ),
            ];
            for strip in strips
                .into_iter()
                .filter(|r| r.width() > 0.0 && r.height() > 0.0)
            {
                painter.rect_filled(strip, 0.0, fill);
            }
            painter.rect_stroke(
                grown,
                0.0,
                Stroke::new(1.0, Color32::from_gray(200)),
                StrokeKind::Outside,
            );
        }
        let handle = 8.0;
        let edges = [
            (
                Rect::from_center_size(
                    Pos2::new(grown.left(), grown.center().y),
                    Vec2::new(handle, 40.0),
                ),
                0,
            ),
            (
                Rect::from_center_size(
                    Pos2::new(grown.center().x, grown.top()),
                    Vec2::new(40.0, handle),
                ),
                1,
            ),
            (
                Rect::from_center_size(
                    Pos2::new(grown.right(), grown.center().y),
                    Vec2::new(handle, 40.0),
                ),
                2,
            ),
            (
                Rect::from_center_size(
                    Pos2::new(grown.center().x, grown.bottom()),
                    Vec2::new(40.0, handle),
                ),
                3,
            ),
        ];
        for (rect, side) in edges {
            let id = ui.scope_id().with(("outpaint edge", side));
            let response = ui.interact(rect, id, Sense::drag());
            painter.rect_filled(
                rect,
                2.0,
                if response.hovered() {
                    Color32::WHITE
                } else {
                    Color32::from_gray(150)
                },
            );
            if response.dragged() {
                let delta = response.drag_delta() / zoom;
                let value = match side {
                    0 => &mut outpaint.left,
                    1 => &mut outpaint.top,
                    2 => &mut outpaint.right,
                    _ => &mut outpaint.bottom,
                };
                let change = match side {
                    0 => -delta.x,
                    1 => -delta.y,
                    2 => delta.x,
                    _ => delta.y,
                };
                let grown = (*value as f32 + change).clamp(0.0, 1024.0);
                *value = (grown / 8.0).round() as u32 * 8;
            }
        }
    }
}

fn union(a: Option<[u32; 4]>, b: [u32; 4]) -> [u32; 4] {
    match a {
        Some(a) => [
            a[0].min(b[0]),
            a[1].min(b[1]),
            a[2].max(b[2]),
            a[3].max(b[3]),
        ],
        None => b,
    }
}

/// The mask inside `rect` as a translucent tint.
fn tint(mask: &GrayImage, [x0, y0, x1, y1]: [u32; 4]) -> ColorImage {
    let (w, h) = ((x1 - x0) as usize, (y1 - y0) as usize);
    let mut pixels = Vec::with_capacity(w * h);
    for y in y0..y1 {
        for x in x0..x1 {
            let Luma([m]) = *mask.get_pixel(x, y);
            pixels.push(Color32::from_rgba_unmultiplied(
                MASK_TINT[0],
                MASK_TINT[1],
                MASK_TINT[2],
                m / 2,
            ));
        }
    }
    ColorImage::new([w, h], pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canvas() -> Canvas {
        let mut canvas = Canvas::default();
        canvas.set_image(RgbImage::new(64, 64));
        canvas
    }

    fn painted(canvas: &Canvas) -> usize {
        canvas.mask().unwrap().pixels().filter(|p| p[0] > 0).count()
    }

    #[test]
    fn strokes_paint_and_undo_redo_restore_exactly() {
        let mut canvas = canvas();
        let brush = Brush {
            size: 8.0,
            hardness: 1.0,
            opacity: 1.0,
        };
        canvas.begin_stroke(Pos2::new(10.0, 10.0), &brush);
        canvas.continue_stroke(Pos2::new(40.0, 10.0), &brush);
        canvas.end_stroke();
        let first = canvas.mask().unwrap().clone();
        assert!(painted(&canvas) > 30 * 6, "a band along the stroke");
        assert_eq!(canvas.mask().unwrap().get_pixel(25, 10)[0], 255);
        assert_eq!(canvas.mask().unwrap().get_pixel(25, 30)[0], 0);
        canvas.eraser = true;
        canvas.begin_stroke(Pos2::new(25.0, 10.0), &brush);
        canvas.end_stroke();
        assert_eq!(canvas.mask().unwrap().get_pixel(25, 10)[0], 0);
        canvas.undo();
        assert_eq!(canvas.mask().unwrap(), &first);
        canvas.undo();
        assert_eq!(painted(&canvas), 0);
        assert!(!canvas.can_undo());
        canvas.redo();
        assert_eq!(canvas.mask().unwrap(), &first);
    }

    #[test]
    fn soft_brushes_fade_and_history_is_bounded() {
        let mut canvas = canvas();
        let soft = Brush {
            size: 20.0,
            hardness: 0.0,
            opacity: 1.0,
        };
        canvas.begin_stroke(Pos2::new(32.0, 32.0), &soft);
        canvas.end_stroke();
        let mask = canvas.mask().unwrap();
        assert!(
            mask.get_pixel(32, 32)[0] > 200
                && mask.get_pixel(39, 32)[0] < 100
                && mask.get_pixel(39, 32)[0] > 0
        );
        for i in 0..HISTORY + 10 {
            canvas.begin_stroke(Pos2::new(i as f32, 1.0), &soft);
            canvas.end_stroke();
        }
        assert_eq!(canvas.undo.len(), HISTORY);
        canvas.invert_mask();
        assert_eq!(canvas.mask().unwrap().get_pixel(63, 63)[0], 255);
        canvas.undo();
        assert_eq!(canvas.mask().unwrap().get_pixel(63, 63)[0], 0);
    }
}
