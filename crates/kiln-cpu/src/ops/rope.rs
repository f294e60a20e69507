//! Reference for [`kiln_core::ops::Rope`] and [`kiln_core::ops::HeadNormRope`].

use super::norm::rms_norm_row;
use crate::{Inputs, Outputs};
use kiln_core::ops::{HeadNormRope, Rope, RopeParams, RopeStyle};
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
        outs.buf(op.out).view_mut(n),
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
        outs.buf(op.out).view_mut(n),
        op.n_heads,
        op.eps,
        &op.params,
    );
    Ok(())
}
