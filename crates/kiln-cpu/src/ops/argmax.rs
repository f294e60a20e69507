//! Reference for [`kiln_core::ops::Argmax`].

use crate::{Inputs, Outputs};
use kiln_core::ops::argmax::argmax_row;
use kiln_core::ops::Argmax;
use kiln_core::Result;

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
