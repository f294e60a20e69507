//! `kiln quantize IN OUT --type TYPE`: re-quantizes a GGUF file's weight matrices.

use clap::Args;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use kiln_core::{quant, DType, Error, Result};
use kiln_gguf::{keys, llama_file_type, GgufFile, GgufWriter, TensorInfo, TensorView};
use rayon::prelude::*;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Re-quantize the weight matrices of a GGUF file.
#[derive(Args, Debug)]
#[command(after_help = "\
A tensor is converted when its name ends in \".weight\", it has two dimensions
and its row length is a whole number of the type's blocks (256 elements for
k-quants, 32 for the other block formats). Every other tensor (norms, biases,
1-D tensors) is copied unchanged, as llama.cpp does. Metadata is copied, with
general.file_type set to llama.cpp's file type for TYPE and
general.quantization_version to 2.")]
pub struct QuantizeArgs {
    /// The GGUF file to read.
    pub input: PathBuf,
    /// The GGUF file to write.
    pub output: PathBuf,
    /// The type of the weight matrices in the output: f32, f16, bf16, q4_0, q4_1,
    /// q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k or iq4_nl.
    #[arg(long = "type", value_name = "TYPE")]
    pub dtype: DType,
}

/// Source elements converted per batch of rows: bounds the memory a tensor's
/// conversion takes however large the tensor.
const BATCH_ELEMENTS: usize = 1 << 22;

/// Runs `kiln quantize`; a partly written output is removed on failure.
pub fn run(args: QuantizeArgs) -> Result<()> {
    let file_type = llama_file_type(args.dtype).ok_or_else(|| {
        Error::invalid(
            "quantize",
            format!(
                "{} is not a type llama.cpp stores weight matrices in; use one of {}",
                args.dtype,
                output_types().join(", ")
            ),
        )
    })?;
    if same_file(&args.input, &args.output) {
        return Err(Error::invalid(
            "quantize",
            format!(
                "output {} is the input file; write to another path",
                args.output.display()
            ),
        ));
    }
    let input = GgufFile::open(&args.input)?;
    let result = convert(&input, &args, file_type);
    if result.is_err() {
        // Best effort: the error being returned matters more than a failed cleanup.
        let _ = std::fs::remove_file(&args.output);
    }
    let summary = result?;
    summary.print(&args, input.bytes().len())
}

/// Every dtype `kiln quantize --type` accepts.
fn output_types() -> Vec<&'static str> {
    DType::ALL
        .into_iter()
        .filter(|&d| llama_file_type(d).is_some())
        .map(DType::name)
        .collect()
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Whether `t` is a weight matrix that becomes `target`.
fn converts(t: &TensorInfo, target: DType) -> bool {
    t.name().ends_with(".weight")
        && t.shape().len() == 2
        && t.row_len() % target.block_size() == 0
        && t.dtype() != target
}

/// What a conversion did, for the summary.
struct Summary {
    converted: usize,
    kept: usize,
    bytes_in: usize,
    bytes_out: usize,
}

impl Summary {
    fn print(&self, args: &QuantizeArgs, file_in: usize) -> Result<()> {
        let file_out = std::fs::metadata(&args.output)
            .map_err(|e| Error::io(&args.output, e))?
            .len();
        let mut out = std::io::stdout().lock();
        let ratio = |a: u64, b: u64| 100.0 * a as f64 / b.max(1) as f64;
        writeln!(
            out,
            "converted {} tensors to {}, kept {} as they were\n\
             tensor data: {} -> {} ({:.1}%)\n\
             file: {} -> {} ({:.1}%)",
            self.converted,
            args.dtype,
            self.kept,
            HumanBytes(self.bytes_in as u64),
            HumanBytes(self.bytes_out as u64),
            ratio(self.bytes_out as u64, self.bytes_in as u64),
            HumanBytes(file_in as u64),
            HumanBytes(file_out),
            ratio(file_out, file_in as u64),
        )
        .map_err(|e| Error::io("<stdout>", e))
    }
}

fn convert(input: &GgufFile, args: &QuantizeArgs, file_type: u32) -> Result<Summary> {
    let mut metadata = input.metadata().clone();
    metadata.set(keys::FILE_TYPE, file_type);
    metadata.set(keys::QUANTIZATION_VERSION, kiln_gguf::QUANTIZATION_VERSION);
    let descs = input
        .tensor_infos()
        .iter()
        .map(|t| {
            let mut d = t.desc();
            if converts(t, args.dtype) {
                d.dtype = args.dtype;
            }
            d
        })
        .collect::<Vec<_>>();
    let mut writer = GgufWriter::create(&args.output, &metadata, &descs)?;
    let bytes_in: usize = input.tensor_infos().iter().map(TensorInfo::n_bytes).sum();
    let progress = progress_bar(bytes_in as u64);
    let mut converted = 0;
    for view in input.tensors() {
        progress.set_message(view.info.name().to_owned());
        if converts(view.info, args.dtype) {
            convert_tensor(&view, args.dtype, &mut writer, &progress)?;
            converted += 1;
        } else {
            writer.write_tensor_data(view.data)?;
            progress.inc(view.data.len() as u64);
        }
    }
    progress.finish_and_clear();
    let bytes_out = writer.tensor_infos().iter().map(TensorInfo::n_bytes).sum();
    finish(writer, &args.output)?;
    Ok(Summary {
        converted,
        kept: descs.len() - converted,
        bytes_in,
        bytes_out,
    })
}

fn finish(writer: GgufWriter<BufWriter<File>>, path: &Path) -> Result<()> {
    let file = writer
        .finish()?
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(path, e))
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

/// Converts `view` row by row to `target` (rows in parallel, batches in order) and
/// streams the result to `writer`.
fn convert_tensor<W: Write>(
    view: &TensorView<'_>,
    target: DType,
    writer: &mut GgufWriter<W>,
    progress: &ProgressBar,
) -> Result<()> {
    let info = view.info;
    let row_len = info.row_len();
    let (row_in, row_out) = (info.row_bytes(), target.bytes_for(row_len)?);
    if row_in == 0 {
        return Ok(());
    }
    let rows_per_batch = (BATCH_ELEMENTS / row_len.max(1)).max(1);
    let mut out = Vec::new();
    for src in view.data.chunks(rows_per_batch * row_in) {
        out.resize(src.len() / row_in * row_out, 0u8);
        out.par_chunks_mut(row_out)
            .zip(src.par_chunks(row_in))
            .try_for_each_init(
                || vec![0f32; row_len],
                |row, (dst, src)| {
                    quant::dequantize(info.dtype(), src, row)?;
                    quant::quantize(target, row, dst)
                },
            )
            .map_err(|e| match e {
                Error::Unsupported(m) => {
                    Error::Unsupported(format!("tensor {:?}: {m}", info.name()))
                }
                other => other,
            })?;
        writer.write_tensor_data(&out)?;
        progress.inc(src.len() as u64);
    }
    Ok(())
}
