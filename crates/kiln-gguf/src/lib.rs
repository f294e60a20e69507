//! kiln-gguf: reading and writing GGUF, the file format of llama.cpp models.
//!
//! A GGUF file is a little-endian header (magic `GGUF`, version, tensor count,
//! metadata count), then typed key-value metadata, then one info per tensor (name,
//! dims fastest-varying first, ggml type id, offset into the data section), then the
//! data section, which starts at the next multiple of `general.alignment` (default
//! 32) and holds each tensor's bytes at an aligned offset.
//!
//! - [`Gguf`] / [`GgufFile`]: parses versions 2 and 3 from a memory map or any byte
//!   buffer; tensors are zero-copy [`TensorView`]s. Malformed input is an
//!   [`kiln_core::Error::Format`] naming the key or tensor, never a panic.
//! - [`GgufWriter`]: writes version 3, header first, then tensor data streamed in
//!   chunks.
//! - [`Metadata`], [`Value`]: the key-value store with typed getters. An
//!   [`Array`] keeps its items encoded, in the file's memory map when the file was
//!   opened with [`Gguf::open`], and decodes them when they are read: a large
//!   array costs memory only for the items used.
//! - [`keys`]: llama.cpp's metadata key conventions; [`Arch`]: the architectures
//!   kiln converts and runs, by their GGUF and Hugging Face names.
//! - [`convert`]: Hugging Face checkpoints (llama, qwen2, qwen3, their MoE forms,
//!   qwen3next, Qwen3.5) to GGUF, as llama.cpp's converter writes them.
//! - [`quantize`]: the tensor-type policy (which tensors become which type, with
//!   llama-quantize's fallbacks) and the one dequantize-quantize write path that
//!   `convert` and re-quantization of GGUF files share.
//! - [`output`]: writing a command's output file safely: never over an input, never
//!   over anything but a regular file, through a temporary file renamed into place.
//!
//! Element formats (`f16`, `q4_0`, ...) are defined in [`kiln_core::quant`].

mod arch;
pub mod byte_level;
pub mod convert;
pub mod keys;
mod metadata;
pub mod output;
pub mod quantize;
mod read;
pub mod synth;
mod tensor;
mod value;
mod write;

pub use arch::Arch;
pub use kiln_core::SharedBytes;
pub use metadata::Metadata;
pub use read::{Gguf, GgufFile};
pub use tensor::{TensorDesc, TensorInfo, TensorView};
pub use value::{Array, Items, MetadataType, Value, ValueType};
pub use write::{GgufWriter, WRITE_VERSION};

use kiln_core::DType;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// The deepest nesting of arrays in a metadata value that kiln reads or writes (an
/// array of arrays is nesting 2). Real files nest at most 2 deep; the limit bounds
/// the parser's recursion.
pub const MAX_ARRAY_NESTING: usize = 8;

/// The quantization version llama.cpp writes to [`keys::QUANTIZATION_VERSION`].
pub const QUANTIZATION_VERSION: u32 = 2;

/// llama.cpp's `llama_ftype` for a file whose weight matrices are `dtype` (the
/// "mostly" types, 1-D tensors staying f32; for k-quants, the `_S` variant, which
/// uses the type throughout; for MXFP4, `MOSTLY_MXFP4_MOE`). `None` where llama.cpp
/// has no file type for `dtype`.
pub const fn llama_file_type(dtype: DType) -> Option<u32> {
    Some(match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q8_0 => 7,
        DType::Q5_0 => 8,
        DType::Q5_1 => 9,
        DType::Q2K => 10,
        DType::Q3K => 11,
        DType::Q4K => 14,
        DType::Q5K => 16,
        DType::Q6K => 18,
        DType::IQ4NL => 25,
        DType::BF16 => 32,
        DType::TQ1_0 => 36,
        DType::TQ2_0 => 37,
        DType::MXFP4 => 38,
        DType::Q1_0 => 40,
        DType::Q2_0 => 41,
        DType::I32 | DType::U32 | DType::U8 | DType::Q8_1 | DType::Q8K => return None,
    })
}

/// The data alignment `metadata` sets (`general.alignment`, a power of two), else
/// [`DEFAULT_ALIGNMENT`]. Errors are messages for the caller to place in context.
pub(crate) fn alignment(metadata: &Metadata) -> Result<u64, String> {
    if !metadata.contains_key(keys::ALIGNMENT) {
        return Ok(DEFAULT_ALIGNMENT);
    }
    let align = metadata
        .get_u32(keys::ALIGNMENT)
        .map_err(|e| e.to_string())?;
    if align.is_power_of_two() {
        Ok(align.into())
    } else {
        Err(format!(
            "{} is {align}, which is not a power of two",
            keys::ALIGNMENT
        ))
    }
}
