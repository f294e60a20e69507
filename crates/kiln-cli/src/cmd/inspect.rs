//! `kiln inspect FILE`: a GGUF file's header, metadata and tensor table, or one
//! tensor's values.

use clap::Args;
use kiln_core::{Error, Result};
use kiln_gguf::{GgufFile, TensorView, Value};
use serde_json::json;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Print a GGUF file's header, metadata and tensors (like gguf-dump), or the values
/// of one tensor.
#[derive(Args, Debug)]
#[command(after_help = "\
Shapes are printed row-major, outermost dimension first: GGUF stores dims
fastest-varying first (ggml's ne[0] is the row length), and kiln reverses them,
as numpy does. A weight with GGUF dims [4096, 32000] has shape [32000, 4096].
--json prints both `shape` and `gguf_dims`.

--tensor NAME dequantizes the tensor to f32. Without --out it prints the first
and last values and their min, max and mean (with --json: every value).
With --out FILE.npy it writes a numpy .npy file of little-endian float32 values
in row-major (C) order with the row-major shape, so numpy.load gives the tensor
as an array of that shape.")]
pub struct InspectArgs {
    /// The GGUF file.
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print (or with --out, save) this tensor's values, dequantized to f32.
    #[arg(long, value_name = "NAME")]
    pub tensor: Option<String>,
    /// With --tensor: write the values to this .npy file instead of printing them.
    #[arg(long, value_name = "FILE.npy", requires = "tensor")]
    pub out: Option<PathBuf>,
}

/// Array items and tensor values shown before an abbreviation.
const SHOWN_ITEMS: usize = 6;
/// Characters of a string value shown before an abbreviation.
const SHOWN_CHARS: usize = 80;

/// Runs `kiln inspect`.
pub fn run(args: InspectArgs) -> Result<()> {
    if args.file.is_dir() {
        return Err(Error::invalid(
            "kiln inspect",
            format!(
                "{} is a directory, not a GGUF file; a Hugging Face checkpoint directory converts to one with `kiln convert DIR OUT.gguf`",
                args.file.display()
            ),
        ));
    }
    let gguf = GgufFile::open(&args.file)?;
    let mut out = Stdout::new();
    match (&args.tensor, &args.out) {
        (Some(name), Some(path)) => {
            let view = gguf.tensor(name)?;
            write_npy(path, view.info.shape(), &view.to_f32()?)?;
            out.line(format_args!(
                "wrote {} ({}, shape {:?}) as f32 to {}",
                name,
                view.info.dtype(),
                view.info.shape(),
                path.display()
            ))?;
        }
        (Some(name), None) if args.json => {
            let view = gguf.tensor(name)?;
            let mut doc = tensor_json(&view);
            doc["values"] = json!(view.to_f32()?);
            out.line(doc)?;
        }
        (Some(name), None) => print_tensor_values(&mut out, &gguf.tensor(name)?)?,
        (None, _) if args.json => out.line(file_json(&args.file, &gguf))?,
        (None, _) => print_summary(&mut out, &args.file, &gguf)?,
    }
    out.flush()
}

/// Buffered stdout whose write errors (a closed pipe) are kiln errors, not panics.
struct Stdout(BufWriter<std::io::Stdout>);

impl Stdout {
    fn new() -> Stdout {
        Stdout(BufWriter::new(std::io::stdout()))
    }

    fn line(&mut self, text: impl std::fmt::Display) -> Result<()> {
        writeln!(self.0, "{text}").map_err(|e| Error::io("<stdout>", e))
    }

    fn flush(&mut self) -> Result<()> {
        self.0.flush().map_err(|e| Error::io("<stdout>", e))
    }
}

fn print_summary(out: &mut Stdout, path: &Path, gguf: &GgufFile) -> Result<()> {
    out.line(format_args!(
        "{}: GGUF v{}, {} bytes",
        path.display(),
        gguf.version(),
        gguf.bytes().len()
    ))?;
    out.line(format_args!(
        "tensors: {}  metadata keys: {}  alignment: {}  data offset: {}",
        gguf.tensor_infos().len(),
        gguf.metadata().len(),
        gguf.alignment(),
        gguf.data_offset()
    ))?;
    out.line("\nmetadata:")?;
    let key_width = gguf
        .metadata()
        .iter()
        .map(|(k, _)| k.len())
        .max()
        .unwrap_or(0);
    for (key, value) in gguf.metadata().iter() {
        out.line(format_args!(
            "  {key:<key_width$}  {:<16}  {}",
            type_label(value),
            abbreviate(value)
        ))?;
    }
    print_tensor_table(out, gguf)
}

fn print_tensor_table(out: &mut Stdout, gguf: &GgufFile) -> Result<()> {
    out.line("\ntensors (shape row-major, outermost first; offset from the data section):")?;
    let rows: Vec<[String; 6]> = gguf
        .tensor_infos()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            [
                i.to_string(),
                t.name().to_owned(),
                t.dtype().to_string(),
                format!("{:?}", t.shape()),
                t.offset().to_string(),
                t.n_bytes().to_string(),
            ]
        })
        .collect();
    let header = ["#", "name", "dtype", "shape", "offset", "bytes"].map(str::to_owned);
    let mut widths = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let [idx, name, dtype, shape, offset, bytes] = row;
        let [wi, wn, wd, ws, wo, wb] = widths;
        out.line(format_args!(
            "  {idx:>wi$}  {name:<wn$}  {dtype:<wd$}  {shape:<ws$}  {offset:>wo$}  {bytes:>wb$}"
        ))?;
    }
    Ok(())
}

/// `u32`, `string`, `[string; 32000]`, `[array; 3]`.
fn type_label(value: &Value) -> String {
    match value {
        Value::Array(a) => format!("[{}; {}]", a.item_type(), a.len()),
        other => other.value_type().to_string(),
    }
}

/// A value for a human: long strings cut, long arrays shown by their first items.
fn abbreviate(value: &Value) -> String {
    match value {
        Value::String(s) if s.chars().count() > SHOWN_CHARS => {
            let head: String = s.chars().take(SHOWN_CHARS).collect();
            format!("{head:?}... ({} chars)", s.chars().count())
        }
        Value::Array(a) => {
            let shown: Vec<String> = a.items().iter().take(SHOWN_ITEMS).map(abbreviate).collect();
            let more = a.len().saturating_sub(SHOWN_ITEMS);
            let tail = if more > 0 {
                format!(", ... {more} more")
            } else {
                String::new()
            };
            format!("[{}{tail}]", shown.join(", "))
        }
        other => scalar_text(other),
    }
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::U8(v) => v.to_string(),
        Value::I8(v) => v.to_string(),
        Value::U16(v) => v.to_string(),
        Value::I16(v) => v.to_string(),
        Value::U32(v) => v.to_string(),
        Value::I32(v) => v.to_string(),
        Value::U64(v) => v.to_string(),
        Value::I64(v) => v.to_string(),
        // Debug prints floats exactly (shortest round-trip) and in exponent form
        // when they are very large or small.
        Value::F32(v) => format!("{v:?}"),
        Value::F64(v) => format!("{v:?}"),
        Value::Bool(v) => v.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => abbreviate(value),
    }
}

fn value_json(value: &Value) -> serde_json::Value {
    match value {
        Value::U8(v) => json!(v),
        Value::I8(v) => json!(v),
        Value::U16(v) => json!(v),
        Value::I16(v) => json!(v),
        Value::U32(v) => json!(v),
        Value::I32(v) => json!(v),
        Value::U64(v) => json!(v),
        Value::I64(v) => json!(v),
        Value::F32(v) => json!(v),
        Value::F64(v) => json!(v),
        Value::Bool(v) => json!(v),
        Value::String(s) => json!(s),
        Value::Array(a) => a.items().iter().map(value_json).collect(),
    }
}

fn tensor_json(view: &TensorView<'_>) -> serde_json::Value {
    let t = view.info;
    json!({
        "name": t.name(),
        "dtype": t.dtype().name(),
        "shape": t.shape(),
        "gguf_dims": t.gguf_dims(),
        "offset": t.offset(),
        "bytes": t.n_bytes(),
        "elements": t.n_elements(),
    })
}

/// The whole file as JSON: header fields, metadata entries in file order (with
/// their GGUF type), tensors.
fn file_json(path: &Path, gguf: &GgufFile) -> serde_json::Value {
    let metadata: Vec<serde_json::Value> = gguf
        .metadata()
        .iter()
        .map(|(key, value)| json!({"key": key, "type": type_label(value), "value": value_json(value)}))
        .collect();
    let tensors: Vec<serde_json::Value> = gguf.tensors().map(|v| tensor_json(&v)).collect();
    json!({
        "file": path.display().to_string(),
        "file_bytes": gguf.bytes().len(),
        "version": gguf.version(),
        "alignment": gguf.alignment(),
        "data_offset": gguf.data_offset(),
        "tensor_count": tensors.len(),
        "kv_count": metadata.len(),
        "metadata": metadata,
        "tensors": tensors,
    })
}

fn print_tensor_values(out: &mut Stdout, view: &TensorView<'_>) -> Result<()> {
    let values = view.to_f32()?;
    out.line(format_args!(
        "{}: {}, shape {:?} (row-major), {} values",
        view.info.name(),
        view.info.dtype(),
        view.info.shape(),
        values.len()
    ))?;
    let text = |vs: &[f32]| {
        vs.iter()
            .map(|v| format!("{v:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if values.len() <= 2 * SHOWN_ITEMS {
        return out.line(format_args!("values: [{}]", text(&values)));
    }
    out.line(format_args!(
        "values: [{}, ..., {}]",
        text(&values[..SHOWN_ITEMS]),
        text(&values[values.len() - SHOWN_ITEMS..])
    ))?;
    let min = values.iter().copied().fold(f32::INFINITY, f32::min);
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len() as f64;
    out.line(format_args!("min {min:?}  max {max:?}  mean {mean:?}"))
}

/// Writes `values` as a numpy `.npy` file (format 1.0) of little-endian f32 in C
/// order with `shape`.
fn write_npy(path: &Path, shape: &[usize], values: &[f32]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_text = match dims.as_slice() {
        [one] => format!("({one},)"),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic (6 bytes), version (2), header length (2), header and its final
    // newline: padded with spaces to a multiple of 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let header_len = u16::try_from(header.len())
        .map_err(|_| Error::invalid("npy", format!("header of {} bytes", header.len())))?;
    let io_err = |e| Error::io(path, e);
    let mut file = BufWriter::new(File::create(path).map_err(io_err)?);
    file.write_all(b"\x93NUMPY\x01\x00").map_err(io_err)?;
    file.write_all(&header_len.to_le_bytes()).map_err(io_err)?;
    file.write_all(header.as_bytes()).map_err(io_err)?;
    for v in values {
        file.write_all(&v.to_le_bytes()).map_err(io_err)?;
    }
    file.flush().map_err(io_err)
}
