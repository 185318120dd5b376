//! The studio: an egui/eframe desktop app over the diffusion engine, and the `studio generate`
//! command line over the same engine.

pub mod app;
pub mod bench;
pub mod cli;
pub mod dialogs;
pub mod engine_client;
pub mod gallery;
pub mod panes;
pub mod state;

/// The name the window, the settings and the data folder go by.
pub const APP_ID: &str = "ai-studio";

/// The application icon (assets/icon.png).
pub fn icon() -> egui::IconData {
    let image = image::load_from_memory(include_bytes!("../../assets/icon.png"))
        .expect("the bundled icon is a valid PNG")
        .to_rgba8();
    egui::IconData {
        width: image.width(),
        height: image.height(),
        rgba: image.into_raw(),
    }
}
