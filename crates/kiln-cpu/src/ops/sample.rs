//! Reference for [`kiln_core::ops::Sample`].

use std::cmp::Ordering;

use crate::ops::argmax::argmax_row;
use crate::{Inputs, Outputs};
use kiln_core::ops::{Sample, SampleParams, SAMPLE_LANES};
use kiln_core::Result;

/// `log2(e)` rounded to f32.
pub const LOG2_E: f32 = f32::from_bits(0x3fb8_aa3b);
/// The high part of `ln 2`: its low 9 mantissa bits are zero, so `n * LN2_HI` is exact
/// for the `|n| <= 151` that [`exp_nonpositive`] meets.
pub const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
/// `ln 2 - LN2_HI` rounded to f32.
pub const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
/// The Taylor coefficients `1/6, 1/24, 1/120, 1/720` rounded to f32.
pub const EXP_COEFFS: [f32; 4] = [
    f32::from_bits(0x3e2a_aaab),
    f32::from_bits(0x3d2a_aaab),
    f32::from_bits(0x3c08_8889),
    f32::from_bits(0x3ab6_0b61),
];

/// `e^x` for `x <= 0` by the fixed formula of [`Sample`] (positive `x` counts as 0):
/// NaN for NaN, 0 below -104, else `2^n` times a degree-6 polynomial in the reduced
/// argument, each step one f32 operation, so that any IEEE machine gets these bits.
pub fn exp_nonpositive(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < -104.0 {
        return 0.0;
    }
    let x = if x > 0.0 { 0.0 } else { x };
    let n = (x * LOG2_E + 0.5).floor();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let [c3, c4, c5, c6] = EXP_COEFFS;
    let poly = 1.0 + r * (1.0 + r * (0.5 + r * (c3 + r * (c4 + r * (c5 + r * c6)))));
    // -151 <= n <= 0 here (x in [-104, 0]).
    let n = n as i32;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    if n >= -126 {
        poly * pow2(n)
    } else {
        poly * pow2(n + 64) * pow2(-64)
    }
}

/// `S(x over a set)` of [`Sample`]: `members` are `(index, x)` in increasing index,
/// summed in [`SAMPLE_LANES`] lanes by index and the lanes added as a halving tree.
pub fn lane_sum(members: impl Iterator<Item = (usize, f32)>) -> f32 {
    let mut lanes = vec![0.0f32; SAMPLE_LANES];
    for (i, x) in members {
        lanes[i % SAMPLE_LANES] += x;
    }
    let mut s = SAMPLE_LANES / 2;
    while s > 0 {
        for j in 0..s {
            lanes[j] += lanes[j + s];
        }
        s /= 2;
    }
    lanes[0]
}

/// The smallest `t` in `lo..=hi` where `pred` (false then true as `t` grows) holds.
fn first_true(lo: usize, hi: usize, pred: impl Fn(usize) -> bool) -> Option<usize> {
    if lo > hi || !pred(hi) {
        return None;
    }
    let (mut lo, mut hi) = (lo, hi);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo)
}

/// The candidates of [`Sample`] step 2: the non-NaN indices of `logits`, ranked by
/// logit descending in total order then by index, the first `top_k` of them (all
/// when 0).
fn ranked_candidates(logits: &[f32], top_k: usize) -> Vec<usize> {
    let by_rank =
        |a: &usize, b: &usize| -> Ordering { logits[*b].total_cmp(&logits[*a]).then(a.cmp(b)) };
    let mut ranked: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
    if top_k > 0 && top_k < ranked.len() {
        ranked.select_nth_unstable_by(top_k - 1, by_rank);
        ranked.truncate(top_k);
    }
    ranked.sort_unstable_by(by_rank);
    ranked
}

/// The index [`Sample`] chooses from one row of `logits` with uniform number `u`.
pub fn sample_row(logits: &[f32], u: f32, params: &SampleParams) -> usize {
    if params.temperature <= 0.0 {
        return argmax_row(logits);
    }
    let ranked = ranked_candidates(logits, params.top_k);
    let Some(&top) = ranked.first() else {
        return 0;
    };
    let m = logits[top];
    // The candidates in increasing index with their ranks: `S` over the first `t`
    // ranks visits these in this order.
    let mut by_index: Vec<(usize, usize)> =
        ranked.iter().enumerate().map(|(r, &i)| (i, r)).collect();
    by_index.sort_unstable();
    let mass = |t: usize, value: &dyn Fn(f32) -> f32| {
        lane_sum(
            by_index
                .iter()
                .filter(|&&(_, r)| r < t)
                .map(|&(i, _)| (i, value(logits[i]))),
        )
    };
    let e = |l: f32| exp_nonpositive(l - m);
    let z = mass(ranked.len(), &e);
    let p = |l: f32| e(l) / z;
    let keep_p = if params.top_p < 1.0 {
        first_true(1, ranked.len(), |t| mass(t, &p) >= params.top_p).unwrap_or(ranked.len())
    } else {
        ranked.len()
    };
    let keep_m = if params.min_p > 0.0 {
        let floor = params.min_p * p(m);
        ranked
            .iter()
            .filter(|&&i| p(logits[i]) >= floor)
            .count()
            .max(1)
    } else {
        ranked.len()
    };
    let keep = keep_p.min(keep_m);
    let t = params.temperature;
    let e_t = |l: f32| exp_nonpositive((l - m) / t);
    let z_t = mass(keep, &e_t);
    let p_t = |l: f32| e_t(l) / z_t;
    let drawn = first_true(0, keep - 1, |r| u < mass(r + 1, &p_t)).unwrap_or(keep - 1);
    ranked[drawn]
}

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
