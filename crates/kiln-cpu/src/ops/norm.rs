//! Reference for [`kiln_core::ops::RmsNorm`] and [`kiln_core::ops::AddRmsNorm`]; their
//! optional Q8_1 copy of `out` is [`super::write_q8_copy`].

use crate::{Inputs, Outputs};
use kiln_core::ops::{AddRmsNorm, RmsNorm};
use kiln_core::Result;
use rayon::prelude::*;

/// Normalizes one row: `out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i]` (`w` = 1 when
/// absent), in f32.
pub fn rms_norm_row(x: &[f32], weight: Option<&[f32]>, out: &mut [f32], eps: f32) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    match weight {
        Some(w) => {
            for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
                *o = v * inv * w;
            }
        }
        None => {
            for (o, v) in out.iter_mut().zip(x) {
                *o = v * inv;
            }
        }
    }
}

/// [`rms_norm_row`] over every `dim`-element row of `x`.
pub fn rms_norm(x: &[f32], weight: Option<&[f32]>, out: &mut [f32], dim: usize, eps: f32) {
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, x)| rms_norm_row(x, weight, o, eps));
}

/// `sum = x + residual`, then `out = rms_norm(sum)`, row by row.
pub fn add_rms_norm(
    x: &[f32],
    residual: &[f32],
    weight: Option<&[f32]>,
    sum: &mut [f32],
    out: &mut [f32],
    dim: usize,
    eps: f32,
) {
    sum.par_chunks_mut(dim)
        .zip(out.par_chunks_mut(dim))
        .zip(x.par_chunks(dim).zip(residual.par_chunks(dim)))
        .for_each(|((s, o), (x, r))| {
            for ((s, x), r) in s.iter_mut().zip(x).zip(r) {
                *s = x + r;
            }
            rms_norm_row(s, weight, o, eps);
        });
}

pub(crate) fn execute_rms_norm(op: &RmsNorm, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let n = op.rows * op.dim;
    let weight = op.weight.map(|w| ins.view::<f32>(w, op.dim));
    let out = outs.view_mut::<f32>(op.out, n);
    rms_norm(ins.view(op.x, n), weight, out, op.dim, op.eps);
    super::write_q8_copy(outs, op.out, op.out_q8, n)
}

pub(crate) fn execute_add_rms_norm(
    op: &AddRmsNorm,
    ins: &Inputs,
    outs: &mut Outputs,
) -> Result<()> {
    let n = op.rows * op.dim;
    let weight = op.weight.map(|w| ins.view::<f32>(w, op.dim));
    let (sum, out) = outs.pair(n);
    add_rms_norm(
        ins.view(op.x, n),
        ins.view(op.residual, n),
        weight,
        sum,
        out,
        op.dim,
        op.eps,
    );
    super::write_q8_copy(outs, op.out, op.out_q8, n)
}
