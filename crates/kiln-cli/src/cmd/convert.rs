//! `kiln convert HF_DIR OUT.gguf [--type TYPE]`: converts a Hugging Face checkpoint
//! (llama, qwen2, qwen3, qwen2moe, qwen3moe, qwen3next, Qwen3.5) to GGUF.

use clap::Args;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use kiln_core::{DType, Error, Result};
use kiln_gguf::convert::{ConvertSummary, HfCheckpoint};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

/// Convert a Hugging Face checkpoint (llama, qwen2, qwen3, qwen2moe, qwen3moe,
/// qwen3next, Qwen3.5) to GGUF.
#[derive(Args, Debug)]
#[command(after_help = "\
HF_DIR holds config.json, model.safetensors (or model.safetensors.index.json and
its shards) and a byte-level BPE tokenizer.json (with tokenizer_config.json).
The file gets llama.cpp's metadata, tensor names and tokenizer section; the
llama architecture's q/k weights are permuted to GGML's RoPE layout as
llama.cpp's converter does. Norms, biases and other 1-D tensors stay f32; a
block type whose block does not divide a row falls back as llama-quantize does
(q4_k -> q5_0, q6_k -> q8_0, ..., else f16).

OUT.gguf must be a new path or a regular file that is none of the files the
conversion reads (by any path, hard and symbolic links included). The file is
written beside it and renamed to OUT.gguf when complete; on failure OUT.gguf is
left as it was.")]
pub struct ConvertArgs {
    /// The checkpoint directory.
    pub hf_dir: PathBuf,
    /// The GGUF file to write.
    pub output: PathBuf,
    /// The type of the weight matrices: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1,
    /// q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl, q1_0, q2_0, tq1_0, tq2_0 or
    /// mxfp4. Default: bf16 for a bf16
    /// checkpoint, else f16.
    #[arg(long = "type", value_name = "TYPE")]
    pub dtype: Option<DType>,
}

/// Runs `kiln convert`.
pub fn run(args: ConvertArgs) -> Result<()> {
    let checkpoint = HfCheckpoint::open(&args.hf_dir)?;
    let dtype = args.dtype.unwrap_or_else(|| checkpoint.default_dtype());
    // Check the type before any work is done.
    checkpoint.metadata(dtype)?;
    let bar = progress_bar(checkpoint.source_bytes());
    let summary = checkpoint.write_gguf(&args.output, dtype, &mut |name, bytes| {
        bar.set_message(name.to_owned());
        bar.inc(bytes);
    });
    bar.finish_and_clear();
    print_summary(&checkpoint, &args, &summary?)
}

fn progress_bar(total_bytes: u64) -> ProgressBar {
    let bar = ProgressBar::new(total_bytes);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {msg}")
    {
        bar.set_style(style);
    }
    bar
}

fn print_summary(
    checkpoint: &HfCheckpoint,
    args: &ConvertArgs,
    summary: &ConvertSummary,
) -> Result<()> {
    let mut counts: BTreeMap<DType, usize> = BTreeMap::new();
    for (_, dtype) in &summary.tensors {
        *counts.entry(*dtype).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(d, n)| format!("{n} {d}")).collect();
    let config = checkpoint.config();
    writeln!(
        std::io::stdout().lock(),
        "wrote {} ({}): {} {} layers, {} tensors ({}), {} tokens",
        args.output.display(),
        HumanBytes(summary.file_bytes),
        config.arch.name(),
        config.n_layers,
        summary.tensors.len(),
        counts.join(", "),
        checkpoint.vocab().tokens.len(),
    )
    .map_err(|e| Error::io("<stdout>", e))
}
