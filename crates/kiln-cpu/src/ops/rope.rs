//! Reference for [`kiln_core::ops::Rope`] and [`kiln_core::ops::HeadNormRope`].

use super::norm::rms_norm_row;
use crate::{Inputs, Outputs};
use kiln_core::ops::{HeadNormRope, QkvRopeAppend, Rope, RopeParams, RopeStyle};
use kiln_core::Result;
use rayon::prelude::*;

/// The angle of rotary pair `i` at position `pos`:
/// `pos * freq_scale * base^(-2i / rotary_dim) / ff[i]`, in f32.
pub fn rope_angle(params: &RopeParams, freq_factors: Option<&[f32]>, pos: i32, i: usize) -> f32 {
    let exponent = -2.0 * i as f32 / params.rotary_dim as f32;
    let factor = freq_factors.map_or(1.0, |ff| ff[i]);
    pos as f32 * params.freq_scale * params.base.powf(exponent) / factor
}

/// Rotates one head in place: each pair of the first `rotary_dim` elements (adjacent
/// for [`RopeStyle::Normal`], split halves for [`RopeStyle::NeoX`]) turns by its
/// [`rope_angle`]; the rest is untouched.
pub fn rope_head_in_place(
    head: &mut [f32],
    params: &RopeParams,
    freq_factors: Option<&[f32]>,
    pos: i32,
) {
    let half = params.rotary_dim / 2;
    for i in 0..half {
        let (ia, ib) = match params.style {
            RopeStyle::Normal => (2 * i, 2 * i + 1),
            RopeStyle::NeoX => (i, i + half),
        };
        let (sin, cos) = rope_angle(params, freq_factors, pos, i).sin_cos();
        let (a, b) = (head[ia], head[ib]);
        head[ia] = a * cos - b * sin;
        head[ib] = a * sin + b * cos;
    }
}

/// [`kiln_core::ops::Rope`]: `x`, `out` are `[n_tokens, n_heads, head_dim]`.
pub fn rope(
    x: &[f32],
    positions: &[i32],
    freq_factors: Option<&[f32]>,
    out: &mut [f32],
    n_heads: usize,
    params: &RopeParams,
) {
    out.copy_from_slice(x);
    for_each_head(out, positions, n_heads, params.head_dim, |head, pos| {
        rope_head_in_place(head, params, freq_factors, pos)
    });
}

/// [`kiln_core::ops::HeadNormRope`]: per-head RMSNorm (optional weight), then RoPE.
#[allow(clippy::too_many_arguments)]
pub fn head_norm_rope(
    x: &[f32],
    weight: Option<&[f32]>,
    positions: &[i32],
    freq_factors: Option<&[f32]>,
    out: &mut [f32],
    n_heads: usize,
    eps: f32,
    params: &RopeParams,
) {
    let hd = params.head_dim;
    out.par_chunks_mut(hd)
        .zip(x.par_chunks(hd))
        .for_each(|(o, x)| rms_norm_row(x, weight, o, eps));
    for_each_head(out, positions, n_heads, hd, |head, pos| {
        rope_head_in_place(head, params, freq_factors, pos)
    });
}

/// Calls `f(head, position)` on every head of `[n_tokens, n_heads, head_dim]` data.
fn for_each_head(
    data: &mut [f32],
    positions: &[i32],
    n_heads: usize,
    head_dim: usize,
    f: impl Fn(&mut [f32], i32) + Sync,
) {
    data.par_chunks_mut(n_heads * head_dim)
        .zip(positions.par_iter())
        .for_each(|(token, &pos)| token.chunks_mut(head_dim).for_each(|h| f(h, pos)));
}

pub(crate) fn execute_rope(op: &Rope, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let n = op.n_tokens * op.n_heads * op.params.head_dim;
    let ff = op
        .freq_factors
        .map(|f| ins.view::<f32>(f, op.params.rotary_dim / 2));
    rope(
        ins.view(op.x, n),
        ins.view(op.positions, op.n_tokens),
        ff,
        outs.view_mut(op.out, n),
        op.n_heads,
        &op.params,
    );
    Ok(())
}

pub(crate) fn execute_head_norm_rope(
    op: &HeadNormRope,
    ins: &Inputs,
    outs: &mut Outputs,
) -> Result<()> {
    let n = op.n_tokens * op.n_heads * op.params.head_dim;
    let ff = op
        .freq_factors
        .map(|f| ins.view::<f32>(f, op.params.rotary_dim / 2));
    let weight = op.weight.map(|w| ins.view::<f32>(w, op.params.head_dim));
    head_norm_rope(
        ins.view(op.x, n),
        weight,
        ins.view(op.positions, op.n_tokens),
        ff,
        outs.view_mut(op.out, n),
        op.n_heads,
        op.eps,
        &op.params,
    );
    Ok(())
}

/// [`kiln_core::ops::QkvRopeAppend`]: rotates the query heads of `qkv` into `q_out`
/// (per-head normalized first with `norm`'s query weight and eps, when given), the key
/// heads likewise (key weight), and appends the rotated keys and the values to the
/// caches at the tokens' slots (slot 0 without `slots`) and positions, as
/// [`super::kv_cache::kv_append`] does.
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_append(
    qkv: &[f32],
    positions: &[i32],
    slots: Option<&[i32]>,
    freq_factors: Option<&[f32]>,
    norm: Option<(&[f32], &[f32], f32)>,
    q_out: &mut [f32],
    k_cache: &mut [u8],
    v_cache: &mut [u8],
    cache_dtype: kiln_core::DType,
    shape: super::kv_cache::CacheShape,
    n_heads: usize,
    params: &RopeParams,
) -> Result<()> {
    let hd = params.head_dim;
    let n_kv = shape.n_kv_heads;
    let per_token = (n_heads + 2 * n_kv) * hd;
    let n_tokens = positions.len();
    super::kv_cache::check_positions("qkv_rope_append", positions, shape.capacity)?;
    super::kv_cache::token_slots("qkv_rope_append", slots, n_tokens, shape.n_slots)?;
    let split = |from: usize, heads: usize| -> Vec<f32> {
        qkv.chunks_exact(per_token)
            .flat_map(|t| t[from * hd..(from + heads) * hd].iter().copied())
            .collect()
    };
    let (q, k, v) = (
        split(0, n_heads),
        split(n_heads, n_kv),
        split(n_heads + n_kv, n_kv),
    );
    let mut k_rot = vec![0.0; n_tokens * n_kv * hd];
    match norm {
        Some((q_weight, k_weight, eps)) => {
            head_norm_rope(
                &q,
                Some(q_weight),
                positions,
                freq_factors,
                q_out,
                n_heads,
                eps,
                params,
            );
            head_norm_rope(
                &k,
                Some(k_weight),
                positions,
                freq_factors,
                &mut k_rot,
                n_kv,
                eps,
                params,
            );
        }
        None => {
            rope(&q, positions, freq_factors, q_out, n_heads, params);
            rope(&k, positions, freq_factors, &mut k_rot, n_kv, params);
        }
    }
    super::kv_cache::kv_append(&k_rot, positions, slots, k_cache, cache_dtype, shape)?;
    super::kv_cache::kv_append(&v, positions, slots, v_cache, cache_dtype, shape)
}

pub(crate) fn execute_qkv_rope_append(
    op: &QkvRopeAppend,
    ins: &Inputs,
    outs: &mut Outputs,
) -> Result<()> {
    let hd = op.params.head_dim;
    let shape = super::kv_cache::CacheShape {
        n_slots: op.n_slots,
        n_kv_heads: op.n_kv_heads,
        capacity: op.capacity,
        head_dim: hd,
    };
    let dtype = ins.dtype(op.k_cache);
    let cache_bytes = dtype.bytes_for(shape.elements())?;
    let qkv = ins.view::<f32>(op.qkv, op.n_tokens * (op.n_heads + 2 * op.n_kv_heads) * hd);
    let positions = ins.view::<i32>(op.positions, op.n_tokens);
    let ff = op
        .freq_factors
        .map(|f| ins.view::<f32>(f, op.params.rotary_dim / 2));
    let norm = op.norm.map(|n| {
        (
            ins.view::<f32>(n.q_weight, hd),
            ins.view::<f32>(n.k_weight, hd),
            n.eps,
        )
    });
    let (q_out, k_cache, v_cache) = outs.three();
    qkv_rope_append(
        qkv,
        positions,
        op.slots.map(|s| ins.view(s, op.n_tokens)),
        ff,
        norm,
        bytemuck::cast_slice_mut(&mut q_out[..op.n_tokens * op.n_heads * hd * 4]),
        &mut k_cache[..cache_bytes],
        &mut v_cache[..cache_bytes],
        dtype,
        shape,
        op.n_heads,
        &op.params,
    )
}
