//! Reference for [`kiln_core::ops::Attention`].

use super::kv_cache::{check_positions, token_slots, CacheShape};
use super::matmul::dot_rows;
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

/// Cache rows converted to f32 at a time, per KV head.
const ROW_CHUNK: usize = 256;

/// Causal grouped-query attention of `q` (`[n_tokens, n_heads, head_dim]`) over the
/// caches (`[n_slots, n_kv_heads, capacity, head_dim]` of `dtype`), each query over its
/// slot's rows (slot 0 for every query without `slots`), writing `out` (same shape as
/// `q`), exactly as [`kiln_core::ops::Attention`] defines.
///
/// One task per token and KV head: the query heads of the group share each cache row,
/// converted to f32 a chunk of [`ROW_CHUNK`] rows at a time (so no copy of the whole
/// context is made). Each head's scores are `scale * dot(q, k_j)` (then soft-capped),
/// its softmax is [`softmax_row`]'s, and its output is `sum_j a_j * v_j` added in order
/// of `j`.
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
    let slot_bytes = dtype.bytes_for(c.slot_elements())?;
    let head_bytes = dtype.bytes_for(c.capacity * hd)?;
    out.par_chunks_mut(group * hd)
        .enumerate()
        .try_for_each_init(
            || GroupScratch {
                scores: Vec::new(),
                logits: Vec::new(),
                rows: Vec::new(),
            },
            |scratch, (task, out)| {
                let (t, g) = (task / c.n_kv_heads, task % c.n_kv_heads);
                let at = slots[t] * slot_bytes + g * head_bytes;
                let heads = GroupHeads {
                    q: &q[task * group * hd..][..group * hd],
                    k: &k_cache[at..at + head_bytes],
                    v: &v_cache[at..at + head_bytes],
                    dtype,
                    head_dim: hd,
                };
                heads.attend(
                    visible_rows(positions[t] as usize, p.window),
                    p,
                    scratch,
                    out,
                )
            },
        )
}

/// The query heads of one token that read one KV head, and that head's cache rows.
struct GroupHeads<'a> {
    /// `[group, head_dim]`.
    q: &'a [f32],
    /// The KV head's rows of one slot, `[capacity, head_dim]` of `dtype`.
    k: &'a [u8],
    v: &'a [u8],
    dtype: DType,
    head_dim: usize,
}

/// The buffers of a worker, reused from one task to the next.
struct GroupScratch {
    /// `[group, rows]` scores, then weights.
    scores: Vec<f32>,
    /// One head's scores, the softmax's input.
    logits: Vec<f32>,
    /// Up to `ROW_CHUNK` cache rows as f32.
    rows: Vec<f32>,
}

impl GroupHeads<'_> {
    /// Writes each head's attention over cache rows `rows` into its `head_dim` values
    /// of `out` (`[group, head_dim]`).
    fn attend(
        &self,
        rows: std::ops::Range<usize>,
        p: &AttentionParams,
        s: &mut GroupScratch,
        out: &mut [f32],
    ) -> Result<()> {
        let (hd, n) = (self.head_dim, rows.len());
        s.scores.resize(self.q.len() / hd * n, 0.0);
        let scores = &mut s.scores;
        self.for_each_chunk(self.k, rows.clone(), &mut s.rows, |first, k_rows| {
            for (qh, scores) in self.q.chunks_exact(hd).zip(scores.chunks_exact_mut(n)) {
                dot_rows(qh, k_rows, &mut scores[first..first + k_rows.len() / hd]);
            }
        })?;
        for scores in s.scores.chunks_exact_mut(n) {
            for v in scores.iter_mut() {
                let raw = p.scale * *v;
                *v = p.softcap.map_or(raw, |cap| cap * (raw / cap).tanh());
            }
            s.logits.clear();
            s.logits.extend_from_slice(scores);
            softmax_row(&s.logits, scores, 1.0, n);
        }
        out.fill(0.0);
        let weights = &s.scores;
        self.for_each_chunk(self.v, rows, &mut s.rows, |first, v_rows| {
            for (o, weights) in out.chunks_exact_mut(hd).zip(weights.chunks_exact(n)) {
                let weights = &weights[first..first + v_rows.len() / hd];
                for (&a, v) in weights.iter().zip(v_rows.chunks_exact(hd)) {
                    for (o, v) in o.iter_mut().zip(v) {
                        *o += a * v;
                    }
                }
            }
        })
    }

    /// Calls `f(first, rows)` for rows `rows` of `cache`, converted to f32
    /// [`ROW_CHUNK`] at a time into `buffer` (grown as needed), in order; `first` is the index of the
    /// chunk's first row within `rows`.
    fn for_each_chunk(
        &self,
        cache: &[u8],
        rows: std::ops::Range<usize>,
        buffer: &mut Vec<f32>,
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        let hd = self.head_dim;
        let row_bytes = self.dtype.bytes_for(hd)?;
        let most = ROW_CHUNK.min(rows.len()) * hd;
        if buffer.len() < most {
            buffer.resize(most, 0.0);
        }
        for j in rows.clone().step_by(ROW_CHUNK) {
            let count = ROW_CHUNK.min(rows.end - j);
            let bytes = &cache[j * row_bytes..(j + count) * row_bytes];
            let converted = &mut buffer[..count * hd];
            quant::dequantize(self.dtype, bytes, converted)?;
            f(j - rows.start, converted);
        }
        Ok(())
    }
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
