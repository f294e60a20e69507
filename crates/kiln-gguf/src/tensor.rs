//! Tensor descriptions: what the writer is asked to store and what the reader found.

use crate::MAX_DIMS;
use kiln_core::{quant, DType, Error, Result};

/// A tensor to be written: name, element type and row-major shape (outermost
/// dimension first, as numpy and kiln's ops write shapes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorDesc {
    /// A description of tensor `name`.
    pub fn new(name: impl Into<String>, dtype: DType, shape: &[usize]) -> TensorDesc {
        TensorDesc {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }
}

/// A validated tensor entry of a GGUF file.
///
/// GGUF stores a tensor's dimensions fastest-varying first (ggml's `ne[0]` is the
/// row length); [`TensorInfo::gguf_dims`] gives them in that order and
/// [`TensorInfo::shape`] gives the same dimensions reversed, row-major. A weight
/// matrix with `gguf_dims` `[4096, 32000]` has `shape` `[32000, 4096]`: 32000 rows of
/// 4096 elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    name: String,
    dtype: DType,
    gguf_dims: Vec<u64>,
    shape: Vec<usize>,
    n_elements: usize,
    n_bytes: usize,
    row_bytes: usize,
    offset: u64,
}

impl TensorInfo {
    /// Checks a tensor's dims (GGUF order) and computes its element and byte counts.
    /// Errors are messages; the caller adds the context (file, tensor).
    pub(crate) fn new(
        name: String,
        dtype: DType,
        gguf_dims: Vec<u64>,
        offset: u64,
    ) -> std::result::Result<TensorInfo, String> {
        if gguf_dims.len() > MAX_DIMS {
            return Err(format!(
                "{} dimensions, at most {MAX_DIMS} allowed",
                gguf_dims.len()
            ));
        }
        let shape = gguf_dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<Vec<usize>, _>>()
            .map_err(|_| format!("dims {gguf_dims:?} do not fit in usize"))?;
        let n_elements = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("element count of dims {gguf_dims:?} overflows"))?;
        let row_len = shape.last().copied().unwrap_or(1);
        let block = dtype.block_size();
        if row_len % block != 0 {
            return Err(format!(
                "row length {row_len} is not a multiple of {dtype}'s {block}-element block"
            ));
        }
        let bytes_of = |n: usize| {
            dtype
                .bytes_for(n)
                .map_err(|e| format!("dims {gguf_dims:?} of {dtype}: {e}"))
        };
        let n_bytes = bytes_of(n_elements)?;
        let row_bytes = bytes_of(row_len)?;
        Ok(TensorInfo {
            name,
            dtype,
            gguf_dims,
            shape,
            n_elements,
            n_bytes,
            row_bytes,
            offset,
        })
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dimensions as GGUF stores them: fastest-varying (row length) first.
    pub fn gguf_dims(&self) -> &[u64] {
        &self.gguf_dims
    }

    /// The dimensions row-major, outermost first: [`TensorInfo::gguf_dims`] reversed.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements (1 for a tensor with no dimensions).
    pub fn n_elements(&self) -> usize {
        self.n_elements
    }

    /// The number of bytes the data takes.
    pub fn n_bytes(&self) -> usize {
        self.n_bytes
    }

    /// Elements per row: the fastest-varying dimension (1 for a tensor with no
    /// dimensions). Always a whole number of the dtype's blocks.
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Bytes per row: `row_len()` elements of the dtype.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// The data's offset from the start of the file's data section (a multiple of
    /// the file's alignment).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The row-major description of this tensor, for writing it to another file.
    pub fn desc(&self) -> TensorDesc {
        TensorDesc::new(self.name.clone(), self.dtype, &self.shape)
    }
}

/// A tensor of a GGUF file and its bytes, borrowed from the file (zero-copy).
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub info: &'a TensorInfo,
    /// Exactly `info.n_bytes()` bytes, in the dtype's layout.
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// The values converted to f32 in row-major order (dequantized for block
    /// formats), through [`kiln_core::quant::dequantize`].
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.info.n_elements];
        quant::dequantize(self.info.dtype, self.data, &mut out).map_err(|e| {
            let context = format!("tensor {:?}", self.info.name);
            match e {
                Error::Unsupported(msg) => Error::Unsupported(format!("{context}: {msg}")),
                other => Error::format(context, other.to_string()),
            }
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_is_gguf_dims_reversed() {
        let t = TensorInfo::new("w".into(), DType::Q4_0, vec![64, 3, 2], 0).unwrap();
        assert_eq!(t.shape(), [2, 3, 64]);
        assert_eq!(t.n_elements(), 384);
        assert_eq!(t.n_bytes(), 12 * 18);
        assert_eq!((t.row_len(), t.row_bytes()), (64, 2 * 18));
    }

    #[test]
    fn scalar_tensor_has_one_element() {
        let t = TensorInfo::new("s".into(), DType::F32, vec![], 0).unwrap();
        assert_eq!((t.n_elements(), t.n_bytes()), (1, 4));
    }

    #[test]
    fn rejects_partial_blocks_overflow_and_too_many_dims() {
        let e = TensorInfo::new("w".into(), DType::Q4K, vec![128, 2], 0).unwrap_err();
        assert!(e.contains("row length 128"), "{e}");
        let e = TensorInfo::new("w".into(), DType::F32, vec![1 << 40, 1 << 40], 0).unwrap_err();
        assert!(e.contains("overflows"), "{e}");
        let e = TensorInfo::new("w".into(), DType::F32, vec![1 << 62, 0], 0).unwrap_err();
        assert!(e.contains("overflow"), "a row's bytes overflow: {e}");
        let e = TensorInfo::new("w".into(), DType::F32, vec![1; 5], 0).unwrap_err();
        assert!(e.contains("5 dimensions"), "{e}");
    }
}
