//! `kiln quantize IN OUT --type TYPE`: re-quantizes a GGUF file's weight matrices.

use clap::Args;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use kiln_core::{DType, Error, Result};
use kiln_gguf::quantize::{Requantization, RequantizeSummary};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

/// Re-quantize the weight matrices of a GGUF file.
#[derive(Args, Debug)]
#[command(after_help = "\
Tensors get the types `kiln convert --type TYPE` gives them, as llama-quantize
does: a weight matrix (two or more dimensions, a name ending in \"weight\", not a
norm or router) becomes TYPE, or where its rows are not a whole number of TYPE's
blocks (256 elements for k-quants and ternary types, 128 for q1_0, 64 for q2_0,
32 for the other block formats) the type llama-quantize falls back to
(q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0, q2_k/q3_k -> iq4_nl,
tq1_0/tq2_0/q2_0 -> q4_0, else f16). Every other tensor (norms, biases, 1-D tensors)
is copied unchanged. Metadata is copied, with general.file_type set to
llama.cpp's file type for TYPE and general.quantization_version to 2.

OUT must be a new path or a regular file other than IN (by any path, hard and
symbolic links included). The file is written beside OUT and renamed to OUT when
complete; on failure OUT is left as it was.")]
pub struct QuantizeArgs {
    /// The GGUF file to read.
    pub input: PathBuf,
    /// The GGUF file to write.
    pub output: PathBuf,
    /// The type of the weight matrices in the output: f32, f16, bf16, q4_0, q4_1,
    /// q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl, q1_0, q2_0, tq1_0,
    /// tq2_0 or mxfp4.
    #[arg(long = "type", value_name = "TYPE")]
    pub dtype: DType,
}

/// Runs `kiln quantize`.
pub fn run(args: QuantizeArgs) -> Result<()> {
    let job = Requantization::open(&args.input, args.dtype)?;
    let progress = progress_bar(job.source_bytes());
    let summary = job.write_gguf(&args.output, &mut |name, bytes| {
        progress.set_message(name.to_owned());
        progress.inc(bytes);
    });
    progress.finish_and_clear();
    print_summary(&summary?, args.dtype, job.input().bytes().len() as u64)
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

/// "converted 4 tensors to q8_0, kept 3 as they were", or with fallbacks
/// "converted 5 tensors: 1 to q4_k, and where rows are not whole q4_k blocks 3 to
/// q5_0, 1 to f16; kept 2 as they were", then the sizes.
fn print_summary(summary: &RequantizeSummary, requested: DType, file_in: u64) -> Result<()> {
    let mut fallbacks: BTreeMap<DType, usize> = BTreeMap::new();
    let (mut converted, mut to_requested, mut kept) = (0, 0, 0);
    for (_, from, to) in &summary.tensors {
        if from == to {
            kept += 1;
        } else {
            converted += 1;
            if *to == requested {
                to_requested += 1;
            } else {
                *fallbacks.entry(*to).or_default() += 1;
            }
        }
    }
    let conversions = if fallbacks.is_empty() {
        format!("converted {converted} tensors to {requested}, kept {kept} as they were")
    } else {
        let mut fallbacks: Vec<(DType, usize)> = fallbacks.into_iter().collect();
        fallbacks.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        let list: Vec<String> = fallbacks
            .iter()
            .map(|(d, n)| format!("{n} to {d}"))
            .collect();
        format!(
            "converted {converted} tensors: {to_requested} to {requested}, and where rows \
             are not whole {requested} blocks {}; kept {kept} as they were",
            list.join(", ")
        )
    };
    let ratio = |a: u64, b: u64| 100.0 * a as f64 / b.max(1) as f64;
    writeln!(
        std::io::stdout().lock(),
        "{conversions}\n\
         tensor data: {} -> {} ({:.1}%)\n\
         file: {} -> {} ({:.1}%)",
        HumanBytes(summary.bytes_in),
        HumanBytes(summary.bytes_out),
        ratio(summary.bytes_out, summary.bytes_in),
        HumanBytes(file_in),
        HumanBytes(summary.file_bytes),
        ratio(summary.file_bytes, file_in),
    )
    .map_err(|e| Error::io("<stdout>", e))
}
