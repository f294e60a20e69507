//! `kiln synth`: write a real-shaped model with random weights.

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::{DType, Result};
use kiln_gguf::synth::{self, SynthOptions};
use std::path::PathBuf;

/// Write a GGUF model with random weights and exactly the shapes, metadata and
/// tokenizer layout of a real model, for benchmarks.
#[derive(Args, Debug)]
pub struct SynthArgs {
    /// The model to imitate (its shapes from the published configuration).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(synth::PRESETS.map(|p| p.name)))]
    pub preset: String,
    /// Type of the weight matrices (norms and biases stay f32): q4_0, q4_k, q6_k, q8_0, f16, bf16, ...
    #[arg(long = "type", default_value = "q4_0")]
    pub dtype: DType,
    /// Output file: a new path or a regular file, replaced only once the new one is
    /// complete.
    #[arg(short = 'o', long)]
    pub out: PathBuf,
    /// Seed of the random weights and vocabulary.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs `kiln synth`.
pub fn run(args: SynthArgs) -> Result<()> {
    let preset = synth::preset(&args.preset)?;
    let config = preset.config()?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {percent}% {elapsed}/{duration}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{} {}", preset.name, args.dtype));
    let options = SynthOptions {
        dtype: args.dtype,
        seed: args.seed,
    };
    let summary = synth::write(preset, &config, options, &args.out, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {}: {} ({} tensors, {:.2} GiB)",
        args.out.display(),
        preset.name,
        summary.tensors.len(),
        summary.file_bytes as f64 / (1u64 << 30) as f64
    );
    Ok(())
}
