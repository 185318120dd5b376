//! The studio: an egui/eframe desktop app over the diffusion engine, and the `studio generate`
//! command line over the same engine.

pub mod cli;
pub mod gallery;
