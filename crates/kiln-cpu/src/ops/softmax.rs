//! Reference for [`kiln_core::ops::Softmax`].

use crate::{Inputs, Outputs};
use kiln_core::ops::Softmax;
use kiln_core::Result;
use rayon::prelude::*;

/// Softmax of `scale * x` over one row, writing 0 for masked columns (those at or
/// past `visible`).
pub fn softmax_row(x: &[f32], out: &mut [f32], scale: f32, visible: usize) {
    let visible = visible.min(x.len());
    let max = x[..visible]
        .iter()
        .map(|v| v * scale)
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for (o, v) in out[..visible].iter_mut().zip(x) {
        *o = (v * scale - max).exp();
        sum += *o;
    }
    for o in &mut out[..visible] {
        *o /= sum;
    }
    out[visible..].fill(0.0);
}

/// Row-wise softmax of `[rows, cols]` data; with `causal_offset = Some(o)`, row `r`
/// sees columns `0..=o + r`.
pub fn softmax(x: &[f32], out: &mut [f32], cols: usize, scale: f32, causal_offset: Option<usize>) {
    out.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .enumerate()
        .for_each(|(r, (o, x))| {
            let visible = causal_offset.map_or(cols, |off| off + r + 1);
            softmax_row(x, o, scale, visible);
        });
}

pub(crate) fn execute(op: &Softmax, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let n = op.rows * op.cols;
    softmax(
        ins.view(op.x, n),
        outs.view_mut(op.out, n),
        op.cols,
        op.scale,
        op.causal_offset,
    );
    Ok(())
}
