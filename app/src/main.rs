//! `studio`: the AI image studio. With no arguments it opens the window; `studio generate …` runs
//! the same engine headless.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mimalloc::MiMalloc;
use studio::APP_ID;
use studio::app::StudioApp;
use studio::cli::{Cli, Command, generate};

/// Tensors are large and short-lived: mimalloc reuses their memory where glibc's allocator unmaps
/// it and faults it in again on every allocation.
#[global_allocator]
static ALLOCATOR: MiMalloc = MiMalloc;

/// `mi_option_purge_delay` in `mimalloc.h` (the same index in the v2 and v3 sources the crate builds;
/// the default delay is 10 ms in v2 and 1000 ms in v3).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for reuse instead of returning it to the system after a delay: the next step
/// allocates the same tensors again, and faulting them back in cost ~10% of a step and half of a
/// model load (measured on SD1.5 at 512²). Peak memory is unchanged. `MIMALLOC_PURGE_DELAY` in the
/// environment still wins.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    #[allow(unsafe_code)]
    // SAFETY: mimalloc's option calls are thread-safe and take plain integers; the index is checked
    // to hold the purge delay's default before it is changed.
    unsafe {
        if matches!(libmimalloc_sys::mi_option_get(PURGE_DELAY), 10 | 1000) {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        }
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Generate(args)) => generate(args),
        Some(Command::Bench(args)) => studio::bench::bench(args),
        None => run_studio(cli.model),
    }
}

fn run_studio(model: Option<PathBuf>) -> ExitCode {
    let data_dir = eframe::storage_dir(APP_ID).unwrap_or_else(|| PathBuf::from(".ai-studio"));
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("AI Studio")
            .with_app_id(APP_ID)
            .with_inner_size([1280.0, 800.0])
            .with_min_inner_size([900.0, 600.0])
            .with_icon(studio::icon())
            .with_drag_and_drop(true),
        ..Default::default()
    };
    let result = eframe::run_native(
        APP_ID,
        options,
        Box::new(move |cc| {
            Ok(Box::new(StudioApp::from_creation_context(
                cc, data_dir, model,
            )))
        }),
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: the studio window could not open: {error}");
            eprintln!("(no display? `studio generate --help` runs without a window)");
            ExitCode::FAILURE
        }
    }
}
