//! The `kiln` command-line engine.

mod cmd;
mod logging;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// kiln runs quantized large language models on NVIDIA GPUs, and on the CPU where
/// there is none.
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Say more: debug messages, and each command's details (generate: the model,
    /// seed and memory plan). RUST_LOG, when set, chooses the messages instead.
    #[arg(short = 'v', long, global = true)]
    verbose: bool,
}

/// Each subcommand lives in its own module under `cmd/`.
#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (default model: the project's own small model).
    Generate(cmd::generate::GenerateArgs),
    /// Serve a model over HTTP with OpenAI's API (completions, chat, streaming).
    Serve(cmd::serve::ServeArgs),
    /// Measure prompt-processing and generation speed, like llama-bench.
    Bench(cmd::bench::BenchArgs),
    /// Measure each CUDA kernel family's speed at real model shapes against the copy bandwidth.
    BenchKernels(cmd::bench_kernels::BenchKernelsArgs),
    /// Compute a model's perplexity over a text, like llama-perplexity.
    Perplexity(cmd::perplexity::PerplexityArgs),
    /// Write a real-shaped model with random weights, for benchmarks.
    Synth(cmd::synth::SynthArgs),
    /// Print the kiln version.
    Version,
    /// Print a GGUF file's header, metadata and tensors, or one tensor's values.
    Inspect(cmd::inspect::InspectArgs),
    /// Re-quantize the weight matrices of a GGUF file.
    Quantize(cmd::quantize::QuantizeArgs),
    /// Convert a Hugging Face checkpoint (llama, qwen2, qwen3, qwen2moe, qwen3moe,
    /// qwen3next, Qwen3.5) to GGUF.
    Convert(cmd::convert::ConvertArgs),
    /// Show the device, driver, NVRTC and kernel cache, and check a kernel on the device.
    Doctor(cmd::doctor::DoctorArgs),
    /// Compile CUDA kernels into the disk cache, in parallel, or measure start-up.
    Precompile(cmd::precompile::PrecompileArgs),
    /// Check every op at every dtype on a device against the CPU reference (on the
    /// CPU: against float64), like llama.cpp's test-backend-ops.
    CheckOps(cmd::check_ops::CheckOpsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.verbose);
    let result: kiln_core::Result<()> = match cli.command {
        Command::Generate(mut args) => {
            args.verbose = cli.verbose;
            cmd::generate::run(args)
        }
        Command::Serve(args) => cmd::serve::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::BenchKernels(args) => cmd::bench_kernels::run(args),
        Command::Perplexity(args) => cmd::perplexity::run(args),
        Command::Synth(args) => cmd::synth::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Quantize(args) => cmd::quantize::run(args),
        Command::Convert(args) => cmd::convert::run(args),
        Command::Doctor(args) => cmd::doctor::run(args),
        Command::Precompile(args) => cmd::precompile::run(args),
        Command::CheckOps(args) => cmd::check_ops::run(args),
        Command::Version => {
            println!("kiln {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`kiln inspect F | head`): nothing
        // failed that the user needs to hear about.
        Err(kiln_core::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
