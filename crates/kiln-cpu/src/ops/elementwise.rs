//! Reference for [`kiln_core::ops::Elementwise`].

use crate::{Inputs, Outputs};
use kiln_core::ops::{Elementwise, ElementwiseKind, Glu};
use kiln_core::Result;
use rayon::prelude::*;

/// `silu(a) = a / (1 + exp(-a))`.
pub fn silu(a: f32) -> f32 {
    a / (1.0 + (-a).exp())
}

/// The tanh approximation of GELU: `0.5 a (1 + tanh(u))` with
/// `u = sqrt(2/pi) (a + 0.044715 a^3)`, evaluated as the equal `a / (1 + exp(-2u))`,
/// which keeps f32 precision where `1 + tanh(u)` would cancel (negative `a`).
pub fn gelu(a: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (a + 0.044_715 * a * a * a);
    a / (1.0 + (-2.0 * u).exp())
}

/// The function `kind` applies to one pair.
pub fn apply(kind: ElementwiseKind, a: f32, b: f32) -> f32 {
    match kind {
        ElementwiseKind::Add => a + b,
        ElementwiseKind::Mul => a * b,
        ElementwiseKind::SiluMul => silu(a) * b,
        ElementwiseKind::GeluMul => gelu(a) * b,
        ElementwiseKind::SigmoidMul => b / (1.0 + (-a).exp()),
    }
}

/// `out[i] = apply(kind, a[i], b[i])`.
pub fn elementwise(kind: ElementwiseKind, a: &[f32], b: &[f32], out: &mut [f32]) {
    out.par_iter_mut()
        .zip(a.par_iter().zip(b.par_iter()))
        .with_min_len(4096)
        .for_each(|(o, (&a, &b))| *o = apply(kind, a, b));
}

pub(crate) fn execute(op: &Elementwise, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    elementwise(
        op.kind,
        ins.view(op.a, op.len),
        ins.view(op.b, op.len),
        outs.view_mut(op.out, op.len),
    );
    super::write_q8_copy(outs, op.out, op.out_q8, op.len)
}

/// [`kiln_core::ops::Glu`]: `out[r, i] = apply(kind, x[r, i], x[r, n + i])` for `x` of
/// rows of `2n` and `out` of rows of `n`.
pub fn glu(kind: ElementwiseKind, x: &[f32], out: &mut [f32], n: usize) {
    out.par_chunks_mut(n)
        .zip(x.par_chunks(2 * n))
        .for_each(|(o, x)| {
            let (gate, partner) = x.split_at(n);
            for ((o, &a), &b) in o.iter_mut().zip(gate).zip(partner) {
                *o = apply(kind, a, b);
            }
        });
}

pub(crate) fn execute_glu(op: &Glu, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let len = op.rows * op.n;
    glu(
        op.kind,
        ins.view(op.x, 2 * len),
        outs.view_mut(op.out, len),
        op.n,
    );
    super::write_q8_copy(outs, op.out, op.out_q8, len)
}
