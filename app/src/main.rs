//! `studio`: the AI image studio. With no arguments it opens the window; `studio generate …` runs
//! the same engine headless.

use clap::Parser;

/// A native AI image studio: Stable Diffusion on your GPU or CPU.
#[derive(Debug, Parser)]
#[command(name = "studio", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
