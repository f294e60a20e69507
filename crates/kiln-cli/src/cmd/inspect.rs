//! `kiln inspect FILE`: a GGUF file's header, metadata and tensor table, or one
//! tensor's values.

use clap::Args;
use kiln_core::{Error, Result};
use kiln_gguf::output::{InputFile, OutputFile};
use kiln_gguf::{GgufFile, TensorView, Value};
use serde::{Serialize, Serializer};
use serde_json::json;
use std::borrow::Borrow;
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
as an array of that shape. FILE.npy must be a new path or a regular file other
than FILE; it is replaced only once it is completely written.")]
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
    let input = InputFile::at(&args.file)?;
    let gguf = GgufFile::open(&args.file)?;
    let mut out = Stdout::new();
    match (&args.tensor, &args.out) {
        (Some(name), Some(path)) => {
            let view = gguf.tensor(name)?;
            let values = view.to_f32()?;
            // The GGUF file is mapped: the output may not be it, by any path.
            let npy = OutputFile::create("kiln inspect --out", path, &[input])?;
            write_npy(npy, view.info.shape(), &values)?;
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
        (None, _) if args.json => print_file_json(&mut out, &args.file, &gguf)?,
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
            let shown: Vec<String> = a.iter().take(SHOWN_ITEMS).map(|v| abbreviate(&v)).collect();
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

/// A metadata value as JSON; an array's items are decoded and written one at a
/// time, so that printing a large array costs no memory. Floats print as
/// `serde_json::Value` prints them (f32 widened to f64, non-finite as null).
struct JsonValue<V: Borrow<Value>>(V);

impl<V: Borrow<Value>> Serialize for JsonValue<V> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0.borrow() {
            Value::U8(v) => s.serialize_u8(*v),
            Value::I8(v) => s.serialize_i8(*v),
            Value::U16(v) => s.serialize_u16(*v),
            Value::I16(v) => s.serialize_i16(*v),
            Value::U32(v) => s.serialize_u32(*v),
            Value::I32(v) => s.serialize_i32(*v),
            Value::U64(v) => s.serialize_u64(*v),
            Value::I64(v) => s.serialize_i64(*v),
            Value::F32(v) => float_json(f64::from(*v), s),
            Value::F64(v) => float_json(*v, s),
            Value::Bool(v) => s.serialize_bool(*v),
            Value::String(v) => s.serialize_str(v),
            Value::Array(a) => s.collect_seq(a.iter().map(JsonValue)),
        }
    }
}

fn float_json<S: Serializer>(v: f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(v)
    } else {
        s.serialize_unit()
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
/// their GGUF type), tensors. Fields in alphabetical order, as a
/// `serde_json::Value` object prints them.
#[derive(Serialize)]
struct FileJson<'a> {
    alignment: u64,
    data_offset: u64,
    file: String,
    file_bytes: usize,
    kv_count: usize,
    metadata: Vec<EntryJson<'a>>,
    tensor_count: usize,
    tensors: Vec<serde_json::Value>,
    version: u32,
}

/// One metadata entry as JSON.
#[derive(Serialize)]
struct EntryJson<'a> {
    key: &'a str,
    #[serde(rename = "type")]
    value_type: String,
    value: JsonValue<&'a Value>,
}

/// Writes the whole file as one line of JSON (see [`FileJson`]).
fn print_file_json(out: &mut Stdout, path: &Path, gguf: &GgufFile) -> Result<()> {
    let metadata: Vec<EntryJson<'_>> = gguf
        .metadata()
        .iter()
        .map(|(key, value)| EntryJson {
            key,
            value_type: type_label(value),
            value: JsonValue(value),
        })
        .collect();
    let tensors: Vec<serde_json::Value> = gguf.tensors().map(|v| tensor_json(&v)).collect();
    let doc = FileJson {
        alignment: gguf.alignment(),
        data_offset: gguf.data_offset(),
        file: path.display().to_string(),
        file_bytes: gguf.bytes().len(),
        kv_count: metadata.len(),
        metadata,
        tensor_count: tensors.len(),
        tensors,
        version: gguf.version(),
    };
    serde_json::to_writer(&mut out.0, &doc).map_err(|e| Error::io("<stdout>", e.into()))?;
    out.line("")
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
/// order with `shape` to `out`, and persists it.
fn write_npy(mut out: OutputFile, shape: &[usize], values: &[f32]) -> Result<()> {
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
    let path = out.path().to_owned();
    let io_err = |e| Error::io(&path, e);
    let mut file = BufWriter::new(out.file());
    file.write_all(b"\x93NUMPY\x01\x00").map_err(io_err)?;
    file.write_all(&header_len.to_le_bytes()).map_err(io_err)?;
    file.write_all(header.as_bytes()).map_err(io_err)?;
    for v in values {
        file.write_all(&v.to_le_bytes()).map_err(io_err)?;
    }
    file.flush().map_err(io_err)?;
    drop(file);
    out.persist().map(|_| ())
}
