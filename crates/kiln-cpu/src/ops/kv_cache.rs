//! Reference for [`kiln_core::ops::KvAppend`].

use crate::{Inputs, Outputs};
use kiln_core::ops::KvAppend;
use kiln_core::{quant, DType, Error, Result};

/// Shape of a KV cache: `[n_kv_heads, capacity, head_dim]`.
#[derive(Clone, Copy, Debug)]
pub struct CacheShape {
    pub n_kv_heads: usize,
    pub capacity: usize,
    pub head_dim: usize,
}

/// Errors unless every position lies in `0..capacity`.
pub fn check_positions(op: &str, positions: &[i32], capacity: usize) -> Result<()> {
    match positions.iter().find(|&&p| p < 0 || p as usize >= capacity) {
        Some(bad) => Err(Error::invalid(
            op,
            format!("position {bad} is outside the cache's 0..{capacity}"),
        )),
        None => Ok(()),
    }
}

/// `cache[h, positions[t], :] = src[t, h, :]`, stored as `dtype` (F32 or F16, rounded
/// to nearest). `src` is `[positions.len(), n_kv_heads, head_dim]`.
pub fn kv_append(
    src: &[f32],
    positions: &[i32],
    cache: &mut [u8],
    dtype: DType,
    shape: CacheShape,
) -> Result<()> {
    check_positions("kv_append", positions, shape.capacity)?;
    let hd = shape.head_dim;
    let row_bytes = dtype.bytes_for(hd)?;
    for (token, &pos) in src.chunks_exact(shape.n_kv_heads * hd).zip(positions) {
        for (h, row) in token.chunks_exact(hd).enumerate() {
            let start = (h * shape.capacity + pos as usize) * row_bytes;
            quant::quantize(dtype, row, &mut cache[start..start + row_bytes])?;
        }
    }
    Ok(())
}

pub(crate) fn execute(op: &KvAppend, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let shape = CacheShape {
        n_kv_heads: op.n_kv_heads,
        capacity: op.capacity,
        head_dim: op.head_dim,
    };
    let dtype = ins.dtype(op.cache);
    let bytes = dtype.bytes_for(op.n_kv_heads * op.capacity * op.head_dim)?;
    kv_append(
        ins.view(op.src, op.n_tokens * op.n_kv_heads * op.head_dim),
        ins.view(op.positions, op.n_tokens),
        &mut outs.bytes_mut(op.cache)[..bytes],
        dtype,
        shape,
    )
}
