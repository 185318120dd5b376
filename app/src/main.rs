//! `studio`: the AI image studio. With no arguments it opens the window; `studio generate …` runs
//! the same engine headless.

use std::process::ExitCode;

use clap::Parser;
use studio::cli::{Cli, Command, generate};

fn main() -> ExitCode {
    match Cli::parse().command {
        Some(Command::Generate(args)) => generate(args),
        None => {
            eprintln!(
                "the studio window is not part of this build yet; run `studio generate --help`"
            );
            ExitCode::FAILURE
        }
    }
}
