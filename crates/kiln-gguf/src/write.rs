//! Writing GGUF v3, streaming tensor data so that a model never has to be in memory
//! at once.

use crate::tensor::{TensorDesc, TensorInfo};
use crate::value::{encode_value, Value};
use crate::{alignment, Metadata, GGUF_MAGIC, MAX_ARRAY_NESTING};
use kiln_core::{Error, Result};
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The GGUF version the writer produces.
pub const WRITE_VERSION: u32 = 3;

/// Writes a GGUF v3 file: the header (metadata and tensor infos) when it is created,
/// then each tensor's data in the order the tensors were given, in chunks of any
/// size, through [`GgufWriter::write_tensor_data`].
///
/// Tensor data is placed at offsets aligned to `general.alignment` (if the metadata
/// sets it, else 32), each tensor padded with zeros to the next aligned offset. A
/// file without tensors ends after its header (it has no data section to align).
#[derive(Debug)]
pub struct GgufWriter<W: Write> {
    out: W,
    label: PathBuf,
    tensors: Vec<TensorInfo>,
    padded_lens: Vec<usize>,
    /// The tensor whose data is being written (`tensors.len()` once all are).
    current: usize,
    /// Bytes of the current tensor written so far.
    written: usize,
}

impl GgufWriter<BufWriter<File>> {
    /// Creates (or truncates) the file at `path` and writes the header.
    pub fn create(
        path: impl AsRef<Path>,
        metadata: &Metadata,
        tensors: &[TensorDesc],
    ) -> Result<Self> {
        let path = path.as_ref();
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        GgufWriter::new(BufWriter::new(file), path, metadata, tensors)
    }
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header of a file holding `metadata` and `tensors` to `out`;
    /// `label` names the destination in errors.
    ///
    /// Fails if two tensors share a name, a dtype has no GGUF id, a shape has more
    /// than four dimensions or a row length is not a whole number of blocks, or if
    /// `general.alignment` is set to anything but a power of two.
    pub fn new(
        out: W,
        label: impl Into<PathBuf>,
        metadata: &Metadata,
        tensors: &[TensorDesc],
    ) -> Result<Self> {
        let label = label.into();
        let align = alignment(metadata).map_err(|m| Error::invalid("gguf writer", m))?;
        check_nesting(metadata)?;
        let (tensors, padded_lens) = plan_layout(tensors, align)?;
        let mut out = out;
        let header_len = {
            let mut sink = HeaderSink {
                out: &mut out,
                label: &label,
                buf: Vec::new(),
                written: 0,
            };
            write_header(&mut sink, metadata, &tensors)?;
            sink.finish()?
        };
        let mut writer = GgufWriter {
            out,
            label,
            tensors,
            padded_lens,
            current: 0,
            written: 0,
        };
        if !writer.tensors.is_empty() {
            let data_start = header_len.next_multiple_of(align);
            writer.write_zeros(data_start - header_len)?;
        }
        writer.skip_empty_tensors()?;
        Ok(writer)
    }

    /// The tensors with the offsets the writer assigned them, in write order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Appends `chunk` to the data of the current tensor; when a tensor's data is
    /// complete, the next call writes the next tensor's. A chunk may not run past the
    /// end of the current tensor.
    /// An empty chunk is always accepted and writes nothing.
    pub fn write_tensor_data(&mut self, chunk: &[u8]) -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let Some(info) = self.tensors.get(self.current) else {
            return Err(Error::invalid(
                "gguf writer",
                format!(
                    "{}: {} bytes of tensor data after all {} tensors were written",
                    self.label.display(),
                    chunk.len(),
                    self.tensors.len()
                ),
            ));
        };
        let left = info.n_bytes() - self.written;
        if chunk.len() > left {
            return Err(Error::invalid(
                "gguf writer",
                format!(
                    "{}: tensor {:?} has {left} of its {} bytes left to write, got a chunk of {}",
                    self.label.display(),
                    info.name(),
                    info.n_bytes(),
                    chunk.len()
                ),
            ));
        }
        self.write(chunk)?;
        self.written += chunk.len();
        if self.written == self.tensors[self.current].n_bytes() {
            self.finish_current()?;
            self.skip_empty_tensors()?;
        }
        Ok(())
    }

    /// Checks that every tensor's data was written, flushes, and returns the output.
    pub fn finish(mut self) -> Result<W> {
        if let Some(info) = self.tensors.get(self.current) {
            return Err(Error::invalid(
                "gguf writer",
                format!(
                    "{}: finished with {} of tensor {:?}'s {} bytes written ({} tensors \
                     of {} not written)",
                    self.label.display(),
                    self.written,
                    info.name(),
                    info.n_bytes(),
                    self.tensors.len() - self.current,
                    self.tensors.len()
                ),
            ));
        }
        self.out
            .flush()
            .map_err(|e| Error::io(self.label.clone(), e))?;
        Ok(self.out)
    }

    /// Pads the current (complete) tensor to its aligned length and moves on.
    fn finish_current(&mut self) -> Result<()> {
        let pad = self.padded_lens[self.current] - self.tensors[self.current].n_bytes();
        self.write_zeros(pad as u64)?;
        self.current += 1;
        self.written = 0;
        Ok(())
    }

    /// Moves past tensors with no data, which need no call to write them.
    fn skip_empty_tensors(&mut self) -> Result<()> {
        while self
            .tensors
            .get(self.current)
            .is_some_and(|t| t.n_bytes() == 0)
        {
            self.finish_current()?;
        }
        Ok(())
    }

    /// Writes `n` zero bytes without allocating `n` bytes.
    fn write_zeros(&mut self, mut n: u64) -> Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        while n > 0 {
            let chunk = n.min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..chunk])?;
            n -= chunk as u64;
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(self.label.clone(), e))
    }
}

/// Rejects metadata values nested deeper than readers accept.
fn check_nesting(metadata: &Metadata) -> Result<()> {
    match metadata
        .iter()
        .find(|(_, v)| v.array_nesting() > MAX_ARRAY_NESTING)
    {
        Some((key, v)) => Err(Error::invalid(
            "gguf writer",
            format!(
                "metadata key {key:?}: arrays nested {} deep, at most {MAX_ARRAY_NESTING} allowed",
                v.array_nesting()
            ),
        )),
        None => Ok(()),
    }
}

/// Validates the tensors and assigns each an aligned offset; returns the infos and
/// each tensor's length padded to the alignment.
fn plan_layout(descs: &[TensorDesc], align: u64) -> Result<(Vec<TensorInfo>, Vec<usize>)> {
    let mut names = HashSet::new();
    let mut offset = 0u64;
    let mut infos = Vec::with_capacity(descs.len());
    let mut padded_lens = Vec::with_capacity(descs.len());
    for desc in descs {
        let fail =
            |msg: String| Error::invalid("gguf writer", format!("tensor {:?}: {msg}", desc.name));
        if !names.insert(desc.name.as_str()) {
            return Err(fail("name used twice".into()));
        }
        if desc.dtype.gguf_type_id().is_none() {
            return Err(fail(format!("GGUF has no type id for {}", desc.dtype)));
        }
        let dims = desc.shape.iter().rev().map(|&d| d as u64).collect();
        let info = TensorInfo::new(desc.name.clone(), desc.dtype, dims, offset).map_err(fail)?;
        let padded = (info.n_bytes() as u64)
            .checked_next_multiple_of(align)
            .and_then(|p| usize::try_from(p).ok())
            .ok_or_else(|| fail(format!("{} bytes overflow when padded", info.n_bytes())))?;
        offset = offset
            .checked_add(padded as u64)
            .ok_or_else(|| fail("data offset overflows".into()))?;
        padded_lens.push(padded);
        infos.push(info);
    }
    Ok((infos, padded_lens))
}

/// Where the header goes: small pieces gathered into writes of about
/// [`HeaderSink::CHUNK`] bytes, larger ones (a big array's items) written as they
/// are, so that memory stays bounded whatever the header's size.
struct HeaderSink<'a, W: Write> {
    out: &'a mut W,
    label: &'a Path,
    buf: Vec<u8>,
    written: u64,
}

impl<W: Write> HeaderSink<'_, W> {
    const CHUNK: usize = 64 << 10;

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.written += bytes.len() as u64;
        if self.buf.len() + bytes.len() > Self::CHUNK {
            self.flush()?;
        }
        if bytes.len() >= Self::CHUNK {
            self.write(bytes)
        } else {
            self.buf.extend_from_slice(bytes);
            Ok(())
        }
    }

    fn put_string(&mut self, s: &str) -> Result<()> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s.as_bytes())
    }

    fn flush(&mut self) -> Result<()> {
        let buf = std::mem::take(&mut self.buf);
        self.write(&buf)?;
        self.buf = buf;
        self.buf.clear();
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(self.label, e))
    }

    /// Writes what is gathered; returns the header's length.
    fn finish(mut self) -> Result<u64> {
        self.flush()?;
        Ok(self.written)
    }
}

/// Writes the header: magic, version, counts, metadata, tensor infos.
fn write_header<W: Write>(
    sink: &mut HeaderSink<'_, W>,
    metadata: &Metadata,
    tensors: &[TensorInfo],
) -> Result<()> {
    sink.put(&GGUF_MAGIC)?;
    sink.put(&WRITE_VERSION.to_le_bytes())?;
    sink.put(&(tensors.len() as u64).to_le_bytes())?;
    sink.put(&(metadata.len() as u64).to_le_bytes())?;
    let mut scalar = Vec::new();
    for (key, value) in metadata.iter() {
        sink.put_string(key)?;
        sink.put(&value.value_type().id().to_le_bytes())?;
        match value {
            // An array's items are already encoded: copied as they are.
            Value::Array(a) => {
                sink.put(&a.item_type().id().to_le_bytes())?;
                sink.put(&(a.len() as u64).to_le_bytes())?;
                sink.put(a.encoded())?;
            }
            other => {
                scalar.clear();
                encode_value(&mut scalar, other);
                sink.put(&scalar)?;
            }
        }
    }
    for t in tensors {
        sink.put_string(t.name())?;
        sink.put(&(t.gguf_dims().len() as u32).to_le_bytes())?;
        for d in t.gguf_dims() {
            sink.put(&d.to_le_bytes())?;
        }
        // plan_layout rejected dtypes without an id.
        let type_id = t.dtype().gguf_type_id().unwrap_or(u32::MAX);
        sink.put(&type_id.to_le_bytes())?;
        sink.put(&t.offset().to_le_bytes())?;
    }
    Ok(())
}
