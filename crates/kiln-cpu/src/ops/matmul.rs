//! Reference for [`kiln_core::ops::MatMul`].

use crate::{Inputs, Outputs};
use kiln_core::ops::MatMul;
use kiln_core::{quant, DType, Result};
use rayon::prelude::*;

/// `out[i, j] = sum_l x[i, l] * dequantize(w)[j, l] + bias[j]`, accumulated in f32.
///
/// `x` is `[m, k]`, `w` holds `n` rows of `k` elements of `dtype`, `out` is `[m, n]`.
/// Each weight row is dequantized once and dotted with every row of `x`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    x: &[f32],
    w: &[u8],
    dtype: DType,
    bias: Option<&[f32]>,
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    let row_bytes = dtype.bytes_for(k)?;
    // Column-major result: one chunk of `m` values per weight row, filled in parallel.
    let mut columns = vec![0f32; n * m];
    columns
        .par_chunks_mut(m)
        .zip(w.par_chunks(row_bytes))
        .enumerate()
        .try_for_each_init(
            || vec![0f32; k],
            |row, (j, (column, w_row))| {
                quant::dequantize(dtype, w_row, row)?;
                let b = bias.map_or(0.0, |b| b[j]);
                for (c, x_row) in column.iter_mut().zip(x.chunks_exact(k)) {
                    *c = dot(x_row, row) + b;
                }
                Ok(())
            },
        )?;
    for (j, column) in columns.chunks_exact(m).enumerate() {
        for (i, &v) in column.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    Ok(())
}

/// `sum_l a[l] * b[l]` in f32, summed in order.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

pub(crate) fn execute(op: &MatMul, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let dtype = ins.dtype(op.w);
    let w = &ins.buf(op.w).bytes()[..dtype.bytes_for(op.n * op.k)?];
    let bias = op.bias.map(|b| ins.view::<f32>(b, op.n));
    matmul(
        ins.view(op.x, op.m * op.k),
        w,
        dtype,
        bias,
        outs.buf(op.out).view_mut(op.m * op.n),
        op.m,
        op.n,
        op.k,
    )
}
