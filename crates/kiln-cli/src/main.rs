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
    /// Print a GGUF file's header, metadata and tensors, or one tensor's values.
    Inspect(cmd::inspect::InspectArgs),
    /// Re-quantize the weight matrices of a GGUF file.
    Quantize(cmd::quantize::QuantizeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: kiln_core::Result<()> = match cli.command {
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Quantize(args) => cmd::quantize::run(args),
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
