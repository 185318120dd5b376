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
/// it and faults it in again on every allocation (measured: 7-15% of a UNet step on the CPU).
#[global_allocator]
static ALLOCATOR: MiMalloc = MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_t`.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for reuse for a minute before handing it back to the system, instead of
/// mimalloc's ten milliseconds. mimalloc counts the delay from a memory segment's first free, not
/// its last: a segment whose delay has run out hands back all its free pages at its next free.
/// A 512² UNet step on the CPU frees and reallocates the same buffers several times a second, and
/// each hand-back costs page faults to fault them in again (measured with a 5-step run: 1 s gave
/// steps 10-18% longer than 10 s; 10 s gave 40 000 page faults and steps 4% longer than never
/// handing back, which a minute matches on runs shorter than that).
fn keep_freed_memory() {
    #[allow(unsafe_code)]
    // SAFETY: sets one of mimalloc's integer options (milliseconds) before any other thread exists.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 60_000)
    };
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
