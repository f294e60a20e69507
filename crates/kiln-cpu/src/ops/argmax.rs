//! Reference for [`kiln_core::ops::Argmax`].

use crate::{Inputs, Outputs};
use kiln_core::ops::Argmax;
use kiln_core::Result;

/// Index of the largest non-NaN value of `row`; the lowest such index on ties, 0
/// when every value is NaN.
pub fn argmax_row(row: &[f32]) -> usize {
    let mut best = 0;
    let mut best_value = f32::NAN;
    for (i, &v) in row.iter().enumerate() {
        if !v.is_nan() && (best_value.is_nan() || v > best_value) {
            best = i;
            best_value = v;
        }
    }
    best
}

/// [`argmax_row`] of every `cols`-element row of `x`.
pub fn argmax(x: &[f32], out: &mut [i32], cols: usize) {
    for (o, row) in out.iter_mut().zip(x.chunks_exact(cols)) {
        // Validation keeps `cols` within i32.
        *o = argmax_row(row) as i32;
    }
}

pub(crate) fn execute(op: &Argmax, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    argmax(
        ins.view(op.x, op.rows * op.cols),
        outs.view_mut(op.out, op.rows),
        op.cols,
    );
    Ok(())
}
