//! Reference for [`kiln_core::ops::KvAppend`].

use crate::{Inputs, Outputs};
use kiln_core::ops::KvAppend;
use kiln_core::{quant, DType, Error, Result};

/// Shape of a KV cache: `[n_slots, n_kv_heads, capacity, head_dim]`.
#[derive(Clone, Copy, Debug)]
pub struct CacheShape {
    pub n_slots: usize,
    pub n_kv_heads: usize,
    pub capacity: usize,
    pub head_dim: usize,
}

impl CacheShape {
    /// Elements of the whole cache.
    pub fn elements(&self) -> usize {
        self.n_slots * self.n_kv_heads * self.capacity * self.head_dim
    }

    /// Elements of one slot.
    pub fn slot_elements(&self) -> usize {
        self.n_kv_heads * self.capacity * self.head_dim
    }
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

/// Each of `n_tokens` tokens' slot: `slots[t]`, or 0 for every token without `slots`.
/// Errors, naming the token, unless every slot lies in `0..n_slots`.
pub fn token_slots(
    op: &str,
    slots: Option<&[i32]>,
    n_tokens: usize,
    n_slots: usize,
) -> Result<Vec<usize>> {
    let Some(slots) = slots else {
        return Ok(vec![0; n_tokens]);
    };
    slots
        .iter()
        .enumerate()
        .map(|(t, &s)| match usize::try_from(s) {
            Ok(s) if s < n_slots => Ok(s),
            _ => Err(Error::invalid(
                op,
                format!("token {t} has slot {s}, outside the cache's 0..{n_slots}"),
            )),
        })
        .collect()
}

/// `cache[slots[t], h, positions[t], :] = src[t, h, :]`, stored as `dtype` (F32 or
/// F16, rounded to nearest). `src` is `[positions.len(), n_kv_heads, head_dim]`;
/// without `slots` every token is in slot 0.
pub fn kv_append(
    src: &[f32],
    positions: &[i32],
    slots: Option<&[i32]>,
    cache: &mut [u8],
    dtype: DType,
    shape: CacheShape,
) -> Result<()> {
    check_positions("kv_append", positions, shape.capacity)?;
    let slots = token_slots("kv_append", slots, positions.len(), shape.n_slots)?;
    let hd = shape.head_dim;
    let row_bytes = dtype.bytes_for(hd)?;
    let chunks = src.chunks_exact(shape.n_kv_heads * hd);
    for ((token, &pos), &slot) in chunks.zip(positions).zip(&slots) {
        for (h, row) in token.chunks_exact(hd).enumerate() {
            let start = ((slot * shape.n_kv_heads + h) * shape.capacity + pos as usize) * row_bytes;
            quant::quantize(dtype, row, &mut cache[start..start + row_bytes])?;
        }
    }
    Ok(())
}

pub(crate) fn execute(op: &KvAppend, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let shape = CacheShape {
        n_slots: op.n_slots,
        n_kv_heads: op.n_kv_heads,
        capacity: op.capacity,
        head_dim: op.head_dim,
    };
    let dtype = ins.dtype(op.cache);
    let bytes = dtype.bytes_for(shape.elements())?;
    kv_append(
        ins.view(op.src, op.n_tokens * op.n_kv_heads * op.head_dim),
        ins.view(op.positions, op.n_tokens),
        op.slots.map(|s| ins.view(s, op.n_tokens)),
        &mut outs.bytes_mut(op.cache)[..bytes],
        dtype,
        shape,
    )
}
