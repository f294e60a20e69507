//! Parsing GGUF v2/v3 from a byte slice, and access to a memory-mapped file.
//!
//! The parser trusts no header field: every count and length is checked against the
//! bytes that remain before anything is allocated or read, so a malformed file gives
//! an [`Error::Format`] naming the key or tensor, never a panic or a huge allocation.

use crate::tensor::{TensorInfo, TensorView};
use crate::value::{Array, Value, ValueType};
use crate::{alignment, Metadata, GGUF_MAGIC, MAX_ARRAY_NESTING};
use kiln_core::{DType, Error, Result, SharedBytes};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

/// The fewest bytes a metadata entry takes: key length (8), value type (4), a
/// one-byte value.
const MIN_KV_LEN: usize = 8 + 4 + 1;
/// The fewest bytes a tensor info takes: name length (8), dim count (4), type (4),
/// offset (8).
const MIN_TENSOR_INFO_LEN: usize = 8 + 4 + 4 + 8;

/// A parsed GGUF file over its bytes `B` (a memory map, a `Vec<u8>`, a `&[u8]`).
///
/// Metadata and tensor infos are parsed and validated when it is built; tensor data
/// stays in `B` and is handed out as borrowed slices.
#[derive(Debug)]
pub struct Gguf<B> {
    bytes: B,
    source: String,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// A GGUF file read through a read-only memory map, shared by the file and its
/// metadata arrays.
pub type GgufFile = Gguf<SharedBytes>;

impl Gguf<SharedBytes> {
    /// Maps the file at `path` and parses it. Metadata arrays stay in the map (see
    /// [`Array`]): parsing copies no array, and reading one decodes only the items
    /// read.
    ///
    /// The file must not be modified while the returned value (or an array taken
    /// from its metadata) lives (memory-mapped data that changes underneath is
    /// undefined behaviour); model files are written once and then only read.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            // Mapping a directory fails with a baffling "No such device".
            let e = std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "it is a directory, not a GGUF file",
            );
            return Err(Error::io(path, e));
        }
        // SAFETY: the map is read-only and the contract above forbids changing the
        // file while it is mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Gguf::from_shared(SharedBytes::new(map), path.display().to_string())
    }

    /// Parses GGUF `bytes` whose metadata arrays stay views of them (as
    /// [`Gguf::open`] does for a map); `source` names them in error messages.
    pub fn from_shared(bytes: SharedBytes, source: impl Into<String>) -> Result<GgufFile> {
        let source = source.into();
        let header = Parser::new(bytes.as_ref(), &source, Some(&bytes)).parse()?;
        Ok(Gguf::assemble(bytes, source, header))
    }

    /// Each tensor's info and data, in file order, the data sharing the file's bytes
    /// (for a file from [`Gguf::open`], its memory map) instead of copying them.
    pub fn shared_tensors(&self) -> impl ExactSizeIterator<Item = (&TensorInfo, SharedBytes)> {
        self.tensors.iter().map(|info| {
            // Parsing checked that data_offset + offset + n_bytes lies within the
            // bytes, so these conversions are in range and the slice exists.
            let start = (self.data_offset + info.offset()) as usize;
            let data = self
                .bytes
                .slice(start..start + info.n_bytes())
                .expect("parsing checked that every tensor's data lies within the file");
            (info, data)
        })
    }
}

impl<B: AsRef<[u8]>> Gguf<B> {
    /// Parses GGUF `bytes`; `source` names them in error messages (a path, or a
    /// label for data in memory). Each metadata array keeps a copy of its items'
    /// bytes as the file encodes them (about their size in the file); use
    /// [`Gguf::from_shared`] to keep them in `bytes` instead.
    pub fn from_bytes(bytes: B, source: impl Into<String>) -> Result<Gguf<B>> {
        let source = source.into();
        let header = Parser::new(bytes.as_ref(), &source, None).parse()?;
        Ok(Gguf::assemble(bytes, source, header))
    }

    fn assemble(bytes: B, source: String, header: Header) -> Gguf<B> {
        Gguf {
            bytes,
            source,
            version: header.version,
            alignment: header.alignment,
            data_offset: header.data_offset,
            metadata: header.metadata,
            tensor_index: header
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name().to_owned(), i))
                .collect(),
            tensors: header.tensors,
        }
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of tensor data: `general.alignment`, else 32.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The file offset at which the data section (tensor offset 0) starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The metadata, in file order.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The tensor infos, in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_ref()
    }

    /// Each tensor with its data, in file order.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = TensorView<'_>> {
        self.tensors.iter().map(|info| self.view(info))
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let i = self.tensor_index.get(name).ok_or_else(|| {
            Error::format(
                format!("{}: tensor {name:?}", self.source),
                format!("no such tensor among the file's {}", self.tensors.len()),
            )
        })?;
        Ok(self.view(&self.tensors[*i]))
    }

    fn view<'a>(&'a self, info: &'a TensorInfo) -> TensorView<'a> {
        // Parsing checked that data_offset + offset + n_bytes lies within the bytes,
        // so these conversions and the slice are in range.
        let start = (self.data_offset + info.offset()) as usize;
        TensorView {
            info,
            data: &self.bytes.as_ref()[start..start + info.n_bytes()],
        }
    }
}

/// What the header parse yields.
struct Header {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
}

/// A message describing a parse failure, before the context is added.
type Step<T> = std::result::Result<T, String>;

/// A cursor over the file's bytes.
struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
    source: &'a str,
    /// The same bytes, shared, for metadata arrays to keep views of; without
    /// them, each array copies its bytes.
    shared: Option<&'a SharedBytes>,
}

impl<'a> Parser<'a> {
    fn new(bytes: &'a [u8], source: &'a str, shared: Option<&'a SharedBytes>) -> Parser<'a> {
        Parser {
            bytes,
            pos: 0,
            source,
            shared,
        }
    }

    fn error(&self, what: impl std::fmt::Display, msg: String) -> Error {
        Error::format(format!("{}: {what}", self.source), msg)
    }

    fn parse(mut self) -> Result<Header> {
        let magic = self
            .array::<4>("magic")
            .map_err(|m| self.error("header", m))?;
        if magic != GGUF_MAGIC {
            return Err(self.error(
                "header",
                format!("magic {magic:02x?} is not \"GGUF\"; not a GGUF file"),
            ));
        }
        let version = self.u32("version").map_err(|m| self.error("header", m))?;
        self.check_version(version)?;
        let (tensor_count, kv_count) = self.counts().map_err(|m| self.error("header", m))?;
        let metadata = self.metadata(kv_count)?;
        let alignment = alignment(&metadata).map_err(|m| self.error("metadata", m))?;
        let tensors = self.tensor_infos(tensor_count)?;
        let data_offset = (self.pos as u64)
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| self.error("header", "data offset overflows".into()))?;
        self.check_tensor_data(&tensors, data_offset, alignment)?;
        Ok(Header {
            version,
            alignment,
            data_offset,
            metadata,
            tensors,
        })
    }

    fn check_version(&self, version: u32) -> Result<()> {
        match version {
            2 | 3 => Ok(()),
            1 => Err(Error::Unsupported(format!(
                "{}: GGUF version 1 (kiln reads versions 2 and 3)",
                self.source
            ))),
            v if matches!(v.swap_bytes(), 1..=3) => Err(Error::Unsupported(format!(
                "{}: big-endian GGUF (version field {v:#010x})",
                self.source
            ))),
            v => Err(self.error(
                "header",
                format!("unknown GGUF version {v} (kiln reads versions 2 and 3)"),
            )),
        }
    }

    /// Reads the tensor and metadata counts, each bounded by the bytes remaining.
    fn counts(&mut self) -> Step<(usize, usize)> {
        let tensor_count = self.u64("tensor count")?;
        let kv_count = self.u64("metadata count")?;
        Ok((
            self.check_count(tensor_count, MIN_TENSOR_INFO_LEN, "tensor count")?,
            self.check_count(kv_count, MIN_KV_LEN, "metadata count")?,
        ))
    }

    /// Checks that the remaining bytes could hold `n` items of at least
    /// `min_item_len` bytes each.
    fn check_count(&self, n: u64, min_item_len: usize, what: &str) -> Step<usize> {
        let max = self.remaining() / min_item_len;
        match usize::try_from(n) {
            Ok(n) if n <= max => Ok(n),
            _ => Err(format!(
                "{what} {n} needs at least {min_item_len} bytes each, but only {} bytes \
                 remain (room for at most {max})",
                self.remaining()
            )),
        }
    }

    fn metadata(&mut self, kv_count: usize) -> Result<Metadata> {
        let mut metadata = Metadata::new();
        for i in 0..kv_count {
            let key = self
                .string("key")
                .map_err(|m| self.error(format_args!("metadata entry {i}"), m))?;
            let context = format!("metadata key {key:?}");
            let value = self
                .value_type("value type")
                .and_then(|t| self.value(t, 0))
                .map_err(|m| self.error(&context, m))?;
            if !metadata.insert_new(key, value) {
                return Err(self.error(context, "key appears more than once".into()));
            }
        }
        Ok(metadata)
    }

    fn tensor_infos(&mut self, tensor_count: usize) -> Result<Vec<TensorInfo>> {
        let mut tensors = Vec::with_capacity(tensor_count);
        let mut names = HashMap::with_capacity(tensor_count);
        for i in 0..tensor_count {
            let name = self
                .string("name")
                .map_err(|m| self.error(format_args!("tensor info {i}"), m))?;
            let context = format!("tensor {name:?}");
            let info = self
                .tensor_info(name.clone())
                .map_err(|m| self.error(&context, m))?;
            if let Some(first) = names.insert(name, i) {
                return Err(self.error(
                    context,
                    format!("name is used by tensor infos {first} and {i}"),
                ));
            }
            tensors.push(info);
        }
        Ok(tensors)
    }

    fn tensor_info(&mut self, name: String) -> Step<TensorInfo> {
        let n_dims = self.u32("dimension count")?;
        if n_dims as usize > crate::MAX_DIMS {
            return Err(format!(
                "{n_dims} dimensions, at most {} allowed",
                crate::MAX_DIMS
            ));
        }
        let dims = (0..n_dims)
            .map(|_| self.u64("dimension"))
            .collect::<Step<Vec<u64>>>()?;
        let type_id = self.u32("type")?;
        let dtype = DType::from_gguf_type_id(type_id)
            .ok_or_else(|| format!("unknown ggml type id {type_id}"))?;
        let offset = self.u64("offset")?;
        TensorInfo::new(name, dtype, dims, offset)
    }

    /// Checks each tensor's data lies in the file, aligned, and overlaps no other.
    fn check_tensor_data(
        &self,
        tensors: &[TensorInfo],
        data_offset: u64,
        alignment: u64,
    ) -> Result<()> {
        let file_len = self.bytes.len() as u64;
        for t in tensors {
            let context = format_args!("tensor {:?}", t.name());
            if t.offset() % alignment != 0 {
                return Err(self.error(
                    context,
                    format!(
                        "data offset {} is not a multiple of the alignment {}",
                        t.offset(),
                        alignment
                    ),
                ));
            }
            let end = data_offset
                .checked_add(t.offset())
                .and_then(|s| s.checked_add(t.n_bytes() as u64));
            if end.is_none_or(|end| end > file_len) {
                return Err(self.error(
                    context,
                    format!(
                        "data at offset {} + {} bytes ({}, {} bytes) extends past the end \
                         of the file ({file_len} bytes)",
                        t.offset(),
                        t.n_bytes(),
                        t.dtype(),
                        t.n_bytes()
                    ),
                ));
            }
        }
        self.check_overlaps(tensors)
    }

    fn check_overlaps(&self, tensors: &[TensorInfo]) -> Result<()> {
        let mut by_offset: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes() > 0).collect();
        by_offset.sort_by_key(|t| t.offset());
        for pair in by_offset.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            // Offsets and sizes were bounded by the file length above.
            let a_end = a.offset() + a.n_bytes() as u64;
            if a_end > b.offset() {
                return Err(self.error(
                    format_args!("tensor {:?}", b.name()),
                    format!(
                        "data [{}, {}) overlaps tensor {:?} at [{}, {a_end})",
                        b.offset(),
                        b.offset() + b.n_bytes() as u64,
                        a.name(),
                        a.offset()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Step<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "{what} needs {n} bytes at offset {}, but only {} remain",
                self.pos,
                self.remaining()
            ));
        }
        let bytes = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Step<[u8; N]> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Step<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Step<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Step<String> {
        self.str(what).map(str::to_owned)
    }

    /// A string, borrowed from the file's bytes.
    fn str(&mut self, what: &str) -> Step<&'a str> {
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&n| n <= self.remaining())
            .ok_or_else(|| {
                format!(
                    "{what} length {len} at offset {} exceeds the {} bytes remaining",
                    self.pos - 8,
                    self.remaining()
                )
            })?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|e| format!("{what} is not valid UTF-8 ({e})"))
    }

    fn value_type(&mut self, what: &str) -> Step<ValueType> {
        let id = self.u32(what)?;
        ValueType::from_id(id).ok_or_else(|| format!("unknown {what} id {id}"))
    }

    /// Reads one value of type `t`; `depth` counts the arrays it is nested in.
    fn value(&mut self, t: ValueType, depth: usize) -> Step<Value> {
        Ok(match t {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array("u8")?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array("i8")?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array("u16")?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array("i16")?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array("u32")?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array("i32")?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array("f32")?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array("u64")?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array("i64")?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array("f64")?)),
            ValueType::Bool => match self.array::<1>("bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("bool byte is {b}, not 0 or 1")),
            },
            ValueType::String => Value::String(self.string("string")?),
            ValueType::Array => Value::Array(self.array_value(depth)?),
        })
    }

    /// An array value (after its type id): its items are checked and left in the
    /// file's bytes (see [`Array`]).
    fn array_value(&mut self, depth: usize) -> Step<Array> {
        let (item_type, len, start) = self.array_items(depth)?;
        let range = start..self.pos;
        let encoded = match self.shared {
            Some(shared) => shared
                .slice(range)
                .ok_or_else(|| "array bytes outside the file".to_string())?,
            None => SharedBytes::new(self.bytes[range].to_vec()),
        };
        Ok(Array::from_checked(item_type, len, encoded))
    }

    /// Reads an array's item type and count and checks its items, leaving the
    /// cursor after them; returns the type, the count and where the items start.
    /// Items of fixed size other than bools are skipped at once, without reading
    /// them: a large array costs nothing to parse.
    fn array_items(&mut self, depth: usize) -> Step<(ValueType, usize, usize)> {
        if depth >= MAX_ARRAY_NESTING {
            return Err(format!("arrays nested more than {MAX_ARRAY_NESTING} deep"));
        }
        let item_type = self.value_type("array item type")?;
        let len = self.u64("array length")?;
        let len = self.check_count(len, item_type.min_encoded_len(), "array length")?;
        let start = self.pos;
        match item_type.fixed_len() {
            Some(size) if item_type != ValueType::Bool => {
                // check_count bounded len * min_encoded_len by the bytes remaining.
                self.take(len * size, "array items")?;
            }
            _ => {
                for i in 0..len {
                    self.check_value(item_type, depth + 1)
                        .map_err(|m| format!("array item {i}: {m}"))?;
                }
            }
        }
        Ok((item_type, len, start))
    }

    /// Checks one value of type `t` as [`Parser::value`] reads it, moving past it
    /// without building it.
    fn check_value(&mut self, t: ValueType, depth: usize) -> Step<()> {
        match t {
            ValueType::Bool => match self.array::<1>("bool")?[0] {
                0 | 1 => Ok(()),
                b => Err(format!("bool byte is {b}, not 0 or 1")),
            },
            ValueType::String => self.str("string").map(drop),
            ValueType::Array => self.array_items(depth).map(drop),
            other => {
                let size = other.min_encoded_len();
                self.take(size, other.name()).map(drop)
            }
        }
    }
}
