//! Reference for [`kiln_core::ops::MatMul`].
//!
//! Every product is [`dot`] of an activation row and a dequantized weight row, and
//! gives that value bit for bit. The loops are arranged for speed around that
//! definition: a task decodes [`ROWS`] weight rows a step of k at a time (whole
//! blocks, into a small tile that stays in cache) and advances their dot products
//! side by side, so that one row's additions never wait on another's, for every
//! activation row of a pass of at most [`X_ROWS`] rows.

use crate::{Inputs, Outputs};
use kiln_core::ops::{MatMul, Q8_COPY};
use kiln_core::{quant, DType, Error, Result};
use rayon::prelude::*;

/// Partial sums of a dot product: element `l` goes to lane `l % LANES`.
const LANES: usize = 8;
/// Weight rows whose dot products a task advances together.
const ROWS: usize = 4;
/// Elements of k decoded at a time, rounded up to whole blocks of the weight's format.
const K_STEP: usize = 512;
/// Activation rows per pass over the weights (their slices of a step stay in cache).
const X_ROWS: usize = 64;

/// The running lane sums of one dot product.
type Lanes = [f32; LANES];

/// `out[i, j] = dot(x[i, :], dequantize(w)[j, :]) + bias[j]` ([`dot`]'s order and
/// rounding, then the bias added, if there is one).
///
/// `x` is `[m, k]`, `w` holds `n` rows of `k` elements of `dtype`, `out` is `[m, n]`.
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
    if k == 0 {
        return Err(Error::invalid("matmul", "k must be at least 1"));
    }
    let row_bytes = dtype.bytes_for(k)?;
    let group_bytes = ROWS * row_bytes;
    let rows_per_pass = X_ROWS.min(m).max(1);
    // Column-major results of one pass: `rows` values per weight row.
    let mut columns = vec![0f32; n * rows_per_pass];
    for (pass, x_pass) in x[..m * k].chunks(rows_per_pass * k).enumerate() {
        let rows = x_pass.len() / k;
        columns
            .par_chunks_mut(ROWS * rows)
            .zip(w[..n * row_bytes].par_chunks(group_bytes))
            .try_for_each_init(
                || Tile::new(dtype, k),
                |tile, (group_out, weights)| {
                    let group = Group {
                        x: x_pass,
                        rows,
                        weights,
                        row_bytes,
                    };
                    tile.products(&group, group_out)
                },
            )?;
        for (j, column) in columns[..n * rows].chunks_exact(rows).enumerate() {
            for (i, &v) in column.iter().enumerate() {
                out[(pass * rows_per_pass + i) * n + j] = bias.map_or(v, |b| v + b[j]);
            }
        }
    }
    Ok(())
}

/// The operands of one task: `rows` activation rows `x` (`[rows, k]`) and at most
/// [`ROWS`] weight rows of `row_bytes` each.
#[derive(Clone, Copy)]
struct Group<'a> {
    x: &'a [f32],
    rows: usize,
    weights: &'a [u8],
    row_bytes: usize,
}

/// The scratch of one task: [`ROWS`] weight rows decoded one step of k at a time, and
/// the lane sums of each activation row with each of them.
struct Tile {
    dtype: DType,
    k: usize,
    /// Elements of k per step: [`K_STEP`] rounded up to whole blocks.
    step: usize,
    /// `ROWS` rows of `step` decoded weights.
    weights: Vec<f32>,
    /// One entry per activation row of a pass.
    lanes: Vec<[Lanes; ROWS]>,
}

impl Tile {
    fn new(dtype: DType, k: usize) -> Self {
        let step = K_STEP.next_multiple_of(dtype.block_size());
        Self {
            dtype,
            k,
            step,
            weights: vec![0.0; ROWS * step],
            lanes: Vec::new(),
        }
    }

    /// `out[r * rows + i] = dot(x[i, :], dequantize(weights row r))` for the
    /// [`Group`]'s activation and weight rows.
    ///
    /// On x86-64 CPUs with AVX2 the same code runs compiled for AVX2: a lane set is
    /// one register, the operations and so the values are the same.
    fn products(&mut self, group: &Group, out: &mut [f32]) -> Result<()> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { self.products_avx2(group, out) };
        }
        self.products_each(group, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn products_avx2(&mut self, group: &Group, out: &mut [f32]) -> Result<()> {
        self.products_each(group, out)
    }

    #[inline(always)]
    fn products_each(&mut self, group: &Group, out: &mut [f32]) -> Result<()> {
        let Group {
            x,
            rows,
            weights: w_group,
            row_bytes,
        } = *group;
        let (k, step) = (self.k, self.step);
        let n_rows = w_group.len() / row_bytes;
        // Whole chunks of LANES elements; the rest (float formats only) is the tail.
        let body = k - k % LANES;
        self.lanes.clear();
        self.lanes.resize(rows, [[0.0; LANES]; ROWS]);
        // Rows of the tile past the group's last keep earlier values: their sums are
        // computed and dropped.
        let mut at = 0;
        while at < body {
            let len = step.min(body - at);
            self.decode(w_group, row_bytes, at, len)?;
            let (w0, rest) = self.weights.split_at(step);
            let (w1, rest) = rest.split_at(step);
            let (w2, w3) = rest.split_at(step);
            let w = [&w0[..len], &w1[..len], &w2[..len], &w3[..len]];
            for (acc, x_row) in self.lanes.iter_mut().zip(x.chunks_exact(k)) {
                accumulate(acc, &x_row[at..at + len], w);
            }
            at += len;
        }
        let tail = k - body;
        if tail > 0 {
            self.decode(w_group, row_bytes, body, tail)?;
        }
        for (r, column) in out.chunks_exact_mut(rows).take(n_rows).enumerate() {
            let w_tail = &self.weights[r * step..r * step + tail];
            for ((o, acc), x_row) in column.iter_mut().zip(&self.lanes).zip(x.chunks_exact(k)) {
                *o = finish(&acc[r], &x_row[body..], w_tail);
            }
        }
        Ok(())
    }

    /// Decodes elements `at..at + len` of each weight row of `w_group` into the first
    /// `len` values of its row of the tile.
    fn decode(&mut self, w_group: &[u8], row_bytes: usize, at: usize, len: usize) -> Result<()> {
        let start = self.dtype.bytes_for(at)?;
        let bytes = self.dtype.bytes_for(len)?;
        for (w_row, decoded) in w_group
            .chunks_exact(row_bytes)
            .zip(self.weights.chunks_exact_mut(self.step))
        {
            quant::dequantize(
                self.dtype,
                &w_row[start..start + bytes],
                &mut decoded[..len],
            )?;
        }
        Ok(())
    }
}

/// `out[r] = dot(x, rows[r])` for the consecutive rows of `x.len()` elements in
/// `rows` (one per element of `out`): [`dot`]'s values, with four rows' sums
/// advanced side by side (compiled for AVX2 where the CPU has it, as
/// [`Tile::products`]).
pub fn dot_rows(x: &[f32], rows: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { dot_rows_avx2(x, rows, out) };
    }
    dot_rows_each(x, rows, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_rows_avx2(x: &[f32], rows: &[f32], out: &mut [f32]) {
    dot_rows_each(x, rows, out);
}

#[inline(always)]
fn dot_rows_each(x: &[f32], rows: &[f32], out: &mut [f32]) {
    let k = x.len();
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let body = k - k % LANES;
    let (x_body, x_tail) = x.split_at(body);
    let mut groups = rows.chunks_exact(ROWS * k);
    let mut outs = out.chunks_exact_mut(ROWS);
    for (o, group) in (&mut outs).zip(&mut groups) {
        let mut acc = [[0.0; LANES]; ROWS];
        let row = |r: usize| &group[r * k..(r + 1) * k];
        accumulate(&mut acc, x_body, [0, 1, 2, 3].map(|r| &row(r)[..body]));
        for (r, (o, acc)) in o.iter_mut().zip(&acc).enumerate() {
            *o = finish(acc, x_tail, &row(r)[body..]);
        }
    }
    for (o, row) in outs
        .into_remainder()
        .iter_mut()
        .zip(groups.remainder().chunks_exact(k))
    {
        *o = dot(x, row);
    }
}

/// Adds `x[l] * w[r][l]` to lane `l % LANES` of `acc[r]`, for every `l` of the whole
/// `LANES`-element chunks of `x` (each `w[r]` as long as `x`), in order of `l`.
#[inline(always)]
fn accumulate(acc: &mut [Lanes; ROWS], x: &[f32], w: [&[f32]; ROWS]) {
    let [mut a0, mut a1, mut a2, mut a3] = *acc;
    let chunks = x
        .chunks_exact(LANES)
        .zip(w[0].chunks_exact(LANES))
        .zip(w[1].chunks_exact(LANES))
        .zip(w[2].chunks_exact(LANES))
        .zip(w[3].chunks_exact(LANES));
    for ((((xc, c0), c1), c2), c3) in chunks {
        for l in 0..LANES {
            a0[l] += xc[l] * c0[l];
            a1[l] += xc[l] * c1[l];
            a2[l] += xc[l] * c2[l];
            a3[l] += xc[l] * c3[l];
        }
    }
    *acc = [a0, a1, a2, a3];
}

/// The dot product from its lane sums and the elements after the last whole chunk:
/// lanes added pairwise (`l` with `l + 4`, then those pairs as `(0 + 2) + (1 + 3)`),
/// then the tail's products summed in order.
fn finish(acc: &Lanes, x_tail: &[f32], w_tail: &[f32]) -> f32 {
    let pairs = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    let body = (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]);
    body + x_tail.iter().zip(w_tail).map(|(x, y)| x * y).sum::<f32>()
}

/// `sum_l a[l] * b[l]` in f32: eight interleaved partial sums (element `l` goes to
/// sum `l % 8`), added pairwise at the end, then the tail in order. The fixed order
/// lets the compiler vectorize it and keeps results reproducible.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let body = n - n % LANES;
    let mut acc: Lanes = [0.0; LANES];
    for (x, y) in a[..body]
        .chunks_exact(LANES)
        .zip(b[..body].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    finish(&acc, &a[body..n], &b[body..n])
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
