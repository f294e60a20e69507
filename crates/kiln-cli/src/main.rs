//! The `kiln` command-line engine.

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// kiln runs quantized large language models on NVIDIA GPUs, and on the CPU where
/// there is none.
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Each subcommand lives in its own module under `cmd/`.
#[derive(Subcommand)]
enum Command {
    /// Print the kiln version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: kiln_core::Result<()> = match cli.command {
        Command::Version => {
            println!("kiln {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
