//! Reference for [`kiln_core::ops::MoeRouter`], [`kiln_core::ops::MoeMatMul`] and
//! [`kiln_core::ops::MoeCombine`].

use super::matmul::matmul;
use crate::{Inputs, Outputs};
use kiln_core::ops::{Gating, MoeCombine, MoeMatMul, MoeRouter};
use kiln_core::{DType, Error, Result};
use rayon::prelude::*;

/// One token's routing: the `k` experts of largest probability among `logits` (one
/// per expert) into `ids`, in descending order with ties to the lower index and NaN
/// last, and their probabilities (normalized to sum 1 when `normalize`) into
/// `weights`.
pub fn route_token(
    logits: &[f32],
    gating: Gating,
    normalize: bool,
    ids: &mut [i32],
    weights: &mut [f32],
) {
    let probs: Vec<f32> = match gating {
        Gating::Softmax => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            exps.iter().map(|e| e / sum).collect()
        }
        Gating::Sigmoid => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
    };
    let mut order: Vec<usize> = (0..probs.len()).collect();
    // Descending by probability, NaN after every number; the sort is stable, so
    // equal probabilities keep the lower index first.
    order.sort_by(|&a, &b| match (probs[a].is_nan(), probs[b].is_nan()) {
        (false, false) => probs[b].total_cmp(&probs[a]),
        (nan_a, nan_b) => nan_a.cmp(&nan_b),
    });
    let k = ids.len();
    for (j, &e) in order[..k].iter().enumerate() {
        // The op's validation bounds n_expert to I32.
        ids[j] = e as i32;
        weights[j] = probs[e];
    }
    if normalize {
        let sum: f32 = weights.iter().sum();
        for w in weights.iter_mut() {
            *w /= sum;
        }
    }
}

/// Routes each of the rows of `logits` (`[m, n_expert]`) with [`route_token`];
/// `ids` and `weights` are `[m, k]`.
pub fn moe_router(
    logits: &[f32],
    n_expert: usize,
    k: usize,
    gating: Gating,
    normalize: bool,
    ids: &mut [i32],
    weights: &mut [f32],
) {
    ids.par_chunks_mut(k)
        .zip(weights.par_chunks_mut(k))
        .zip(logits.par_chunks(n_expert))
        .for_each(|((ids, weights), logits)| route_token(logits, gating, normalize, ids, weights));
}

/// The shape of an expert-routed product ([`MoeMatMul`]).
#[derive(Clone, Copy, Debug)]
pub struct MoeShape {
    pub m: usize,
    pub k: usize,
    pub n_expert: usize,
    pub rows: usize,
    pub cols: usize,
    /// Whether `x` holds one row per slot (`[m, k, cols]`) or per token (`[m, cols]`).
    pub per_slot: bool,
}

/// `out[t, j, r] = dot(x[t, (j if per_slot), :], dequantize(w)[ids[t, j], r, :])`
/// ([`super::matmul::dot`]'s order and rounding) for `w` the stacked `[n_expert, rows,
/// cols]` weights of `dtype`: the pairs of each chosen expert are one [`matmul`] over
/// its rows, which are decoded once for all of them; no other expert is read. An id outside `0..n_expert` is an
/// [`Error::InvalidArgument`] naming the token, slot and id.
pub fn moe_matmul(
    x: &[f32],
    ids: &[i32],
    w: &[u8],
    dtype: DType,
    out: &mut [f32],
    s: MoeShape,
) -> Result<()> {
    let row_bytes = dtype.bytes_for(s.cols)?;
    let expert_bytes = row_bytes * s.rows;
    for (i, &id) in ids.iter().enumerate() {
        if usize::try_from(id).map_or(true, |e| e >= s.n_expert) {
            return Err(Error::invalid(
                "moe_matmul",
                format!(
                    "token {} slot {} chose expert {id}, outside 0..{}",
                    i / s.k,
                    i % s.k,
                    s.n_expert
                ),
            ));
        }
    }
    // Each expert's (token, slot) pairs in order, multiplied as one product, so that
    // the expert's rows are decoded once for all of them.
    let mut pairs_of: Vec<Vec<usize>> = vec![Vec::new(); s.n_expert];
    for (pair, &id) in ids.iter().enumerate() {
        pairs_of[id as usize].push(pair);
    }
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for (expert, pairs) in pairs_of.iter().enumerate() {
        if pairs.is_empty() {
            continue;
        }
        xs.clear();
        for &pair in pairs {
            let x_row = if s.per_slot { pair } else { pair / s.k };
            xs.extend_from_slice(&x[x_row * s.cols..][..s.cols]);
        }
        ys.resize(pairs.len() * s.rows, 0.0);
        let w_expert = &w[expert * expert_bytes..][..expert_bytes];
        matmul(
            &xs,
            w_expert,
            dtype,
            None,
            &mut ys,
            pairs.len(),
            s.rows,
            s.cols,
        )?;
        for (&pair, y) in pairs.iter().zip(ys.chunks_exact(s.rows)) {
            out[pair * s.rows..][..s.rows].copy_from_slice(y);
        }
    }
    Ok(())
}

/// The combine of [`MoeCombine`] for `out` `[m, n]`: residual, then each slot's
/// weighted output in order, then the shared expert scaled by the sigmoid of its gate
/// (by 1 without a gate).
#[allow(clippy::too_many_arguments)]
pub fn moe_combine(
    y: &[f32],
    weights: &[f32],
    residual: Option<&[f32]>,
    shared: Option<&[f32]>,
    shared_gate: Option<&[f32]>,
    out: &mut [f32],
    k: usize,
    n: usize,
) {
    out.par_chunks_mut(n).enumerate().for_each(|(t, out)| {
        match residual {
            Some(r) => out.copy_from_slice(&r[t * n..][..n]),
            None => out.fill(0.0),
        }
        for j in 0..k {
            let w = weights[t * k + j];
            for (o, v) in out.iter_mut().zip(&y[(t * k + j) * n..][..n]) {
                *o += w * v;
            }
        }
        if let Some(shared) = shared {
            let g = shared_gate.map_or(1.0, |g| 1.0 / (1.0 + (-g[t]).exp()));
            for (o, v) in out.iter_mut().zip(&shared[t * n..][..n]) {
                *o += g * v;
            }
        }
    });
}

pub(crate) fn execute_router(op: &MoeRouter, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let chosen = op.m * op.k;
    let mut ids = vec![0i32; chosen];
    let mut weights = vec![0f32; chosen];
    moe_router(
        ins.view(op.logits, op.m * op.n_expert),
        op.n_expert,
        op.k,
        op.gating,
        op.normalize,
        &mut ids,
        &mut weights,
    );
    outs.view_mut::<i32>(op.ids, chosen).copy_from_slice(&ids);
    outs.view_mut::<f32>(op.weights, chosen)
        .copy_from_slice(&weights);
    Ok(())
}

pub(crate) fn execute_matmul(op: &MoeMatMul, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let dtype = ins.dtype(op.w);
    let w = &ins.bytes(op.w)[..dtype.bytes_for(op.n_expert * op.rows * op.cols)?];
    let slots = if op.per_slot { op.k } else { 1 };
    moe_matmul(
        ins.view(op.x, op.m * slots * op.cols),
        ins.view(op.ids, op.m * op.k),
        w,
        dtype,
        outs.view_mut(op.out, op.m * op.k * op.rows),
        MoeShape {
            m: op.m,
            k: op.k,
            n_expert: op.n_expert,
            rows: op.rows,
            cols: op.cols,
            per_slot: op.per_slot,
        },
    )
}

pub(crate) fn execute_combine(op: &MoeCombine, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let rows = op.m * op.n;
    moe_combine(
        ins.view(op.y, rows * op.k),
        ins.view(op.weights, op.m * op.k),
        op.residual.map(|r| ins.view(r, rows)),
        op.shared.map(|s| ins.view(s, rows)),
        op.shared_gate.map(|g| ins.view(g, op.m)),
        outs.view_mut(op.out, rows),
        op.k,
        op.n,
    );
    Ok(())
}
