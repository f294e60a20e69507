//! Reference for [`kiln_core::ops::MatMul`].

use crate::{Inputs, Outputs};
use kiln_core::ops::{MatMul, Q8_COPY};
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

/// `sum_l a[l] * b[l]` in f32: eight interleaved partial sums (element `l` goes to
/// sum `l % 8`), added pairwise at the end, then the tail in order. The fixed order
/// lets the compiler vectorize it and keeps results reproducible.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a_body, a_tail) = a[..n].split_at(n - n % 8);
    let (b_body, b_tail) = b[..n].split_at(n - n % 8);
    let mut acc = [0f32; 8];
    for (x, y) in a_body.chunks_exact(8).zip(b_body.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let pairs = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    let body = (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]);
    body + a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum::<f32>()
}

pub(crate) fn execute(op: &MatMul, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let dtype = ins.dtype(op.w);
    let w = &ins.bytes(op.w)[..dtype.bytes_for(op.n * op.k)?];
    let bias = op.bias.map(|b| ins.view::<f32>(b, op.n));
    let len = op.m * op.k;
    // With a Q8_1 copy, the product is of the rounded activations.
    let rounded = match op.x_q8 {
        Some(q8) => {
            let mut a = vec![0.0f32; len];
            quant::dequantize(Q8_COPY, &ins.bytes(q8)[..Q8_COPY.bytes_for(len)?], &mut a)?;
            Some(a)
        }
        None => None,
    };
    matmul(
        rounded.as_deref().unwrap_or_else(|| ins.view(op.x, len)),
        w,
        dtype,
        bias,
        outs.view_mut(op.out, op.m * op.n),
        op.m,
        op.n,
        op.k,
    )
}
