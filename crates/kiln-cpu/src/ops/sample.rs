//! Reference for [`kiln_core::ops::Sample`].

use crate::{Inputs, Outputs};
use kiln_core::ops::sample::sample_row;
use kiln_core::ops::{Sample, SampleParams};
use kiln_core::Result;

/// [`sample_row`] of every `vocab`-element row of `logits` with its `uniform` number.
pub fn sample(
    logits: &[f32],
    uniform: &[f32],
    out: &mut [i32],
    vocab: usize,
    params: &SampleParams,
) {
    for ((o, row), &u) in out.iter_mut().zip(logits.chunks_exact(vocab)).zip(uniform) {
        // Validation keeps `vocab` within i32.
        *o = sample_row(row, u, params) as i32;
    }
}

pub(crate) fn execute(op: &Sample, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    sample(
        ins.view(op.logits, op.rows * op.vocab),
        ins.view(op.uniform, op.rows),
        outs.view_mut(op.out, op.rows),
        op.vocab,
        &op.params,
    );
    Ok(())
}
