//! Reference for [`kiln_core::ops::Attention`].

use std::collections::BTreeMap;

use super::kv_cache::{check_positions, token_slots, CacheShape};
use super::matmul::dot;
use super::softmax::softmax_row;
use crate::{Inputs, Outputs};
use kiln_core::ops::Attention;
use kiln_core::{quant, DType, Result};
use rayon::prelude::*;

/// Attention parameters besides the buffers: see [`kiln_core::ops::Attention`].
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    pub n_heads: usize,
    pub cache: CacheShape,
    pub scale: f32,
    pub window: Option<usize>,
    pub softcap: Option<f32>,
}

/// The cache rows query position `pos` sees: `j <= pos` and, with a window `w`,
/// `pos - j < w`.
pub fn visible_rows(pos: usize, window: Option<usize>) -> std::ops::Range<usize> {
    let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
    first..pos + 1
}

/// Causal grouped-query attention of `q` (`[n_tokens, n_heads, head_dim]`) over the
/// caches (`[n_slots, n_kv_heads, capacity, head_dim]` of `dtype`), each query over its
/// slot's rows (slot 0 for every query without `slots`), writing `out` (same shape as
/// `q`), exactly as [`kiln_core::ops::Attention`] defines.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k_cache: &[u8],
    v_cache: &[u8],
    dtype: DType,
    positions: &[i32],
    slots: Option<&[i32]>,
    out: &mut [f32],
    p: &AttentionParams,
) -> Result<()> {
    let c = p.cache;
    check_positions("attention", positions, c.capacity)?;
    let slots = token_slots("attention", slots, positions.len(), c.n_slots)?;
    let hd = c.head_dim;
    let group = p.n_heads / c.n_kv_heads;
    // Rows 0..len of every KV head of each slot the queries read (len: the most any of
    // the slot's queries sees), converted to f32 once and shared by its query heads.
    let mut rows: BTreeMap<usize, SlotRows> = BTreeMap::new();
    for (&slot, &pos) in slots.iter().zip(positions) {
        let len = rows.get(&slot).map_or(0, |r| r.len).max(pos as usize + 1);
        rows.insert(
            slot,
            SlotRows {
                len,
                k: Vec::new(),
                v: Vec::new(),
            },
        );
    }
    for (&slot, r) in rows.iter_mut() {
        let bytes = dtype.bytes_for(c.slot_elements())?;
        let at = slot * bytes;
        r.k = cache_rows_f32(&k_cache[at..at + bytes], dtype, c, r.len)?;
        r.v = cache_rows_f32(&v_cache[at..at + bytes], dtype, c, r.len)?;
    }
    let longest = rows.values().map(|r| r.len).max().unwrap_or(0);
    out.par_chunks_mut(hd).enumerate().for_each_init(
        || vec![0f32; longest],
        |scores, (i, o)| {
            let (t, h) = (i / p.n_heads, i % p.n_heads);
            let g = h / group;
            let SlotRows { len, k, v } = &rows[&slots[t]];
            let rows = visible_rows(positions[t] as usize, p.window);
            let qv = &q[i * hd..(i + 1) * hd];
            let kg = &k[g * len * hd..(g + 1) * len * hd];
            let vg = &v[g * len * hd..(g + 1) * len * hd];
            let s = &mut scores[..rows.len()];
            for (s, j) in s.iter_mut().zip(rows.clone()) {
                let raw = p.scale * dot(qv, &kg[j * hd..(j + 1) * hd]);
                *s = p.softcap.map_or(raw, |cap| cap * (raw / cap).tanh());
            }
            let logits = s.to_vec();
            softmax_row(&logits, s, 1.0, logits.len());
            o.fill(0.0);
            for (&a, j) in s.iter().zip(rows) {
                for (o, v) in o.iter_mut().zip(&vg[j * hd..(j + 1) * hd]) {
                    *o += a * v;
                }
            }
        },
    );
    Ok(())
}

/// The first `len` rows of each KV head of one slot, as f32 `[n_kv_heads, len,
/// head_dim]`.
struct SlotRows {
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Rows `0..len` of each KV head of one slot of a cache (`[n_kv_heads, capacity,
/// head_dim]`) as f32: `[n_kv_heads, len, head_dim]`.
fn cache_rows_f32(cache: &[u8], dtype: DType, c: CacheShape, len: usize) -> Result<Vec<f32>> {
    let head_bytes = dtype.bytes_for(c.capacity * c.head_dim)?;
    let used_bytes = dtype.bytes_for(len * c.head_dim)?;
    let mut rows = vec![0f32; c.n_kv_heads * len * c.head_dim];
    for (g, dst) in rows.chunks_exact_mut(len * c.head_dim).enumerate() {
        let start = g * head_bytes;
        quant::dequantize(dtype, &cache[start..start + used_bytes], dst)?;
    }
    Ok(rows)
}

pub(crate) fn execute(op: &Attention, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let cache = CacheShape {
        n_slots: op.n_slots,
        n_kv_heads: op.n_kv_heads,
        capacity: op.capacity,
        head_dim: op.head_dim,
    };
    let dtype = ins.dtype(op.k_cache);
    let cache_bytes = dtype.bytes_for(cache.elements())?;
    let n = op.n_tokens * op.n_heads * op.head_dim;
    attention(
        ins.view(op.q, n),
        &ins.bytes(op.k_cache)[..cache_bytes],
        &ins.bytes(op.v_cache)[..cache_bytes],
        dtype,
        ins.view(op.positions, op.n_tokens),
        op.slots.map(|s| ins.view(s, op.n_tokens)),
        outs.view_mut(op.out, n),
        &AttentionParams {
            n_heads: op.n_heads,
            cache,
            scale: op.scale,
            window: op.window,
            softcap: op.softcap,
        },
    )?;
    super::write_q8_copy(outs, op.out, op.out_q8, n)
}
