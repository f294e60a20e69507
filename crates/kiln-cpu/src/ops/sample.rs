//! Reference for [`kiln_core::ops::Sample`].

use std::cmp::Ordering;

use crate::ops::argmax::argmax_row;
use crate::{Inputs, Outputs};
use kiln_core::ops::{Sample, SampleParams};
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

/// `W(e)` of [`Sample`]: `e * 2^32` rounded to the nearest integer, ties to even (exact
/// for every `e` in `[0, 1]`: the product is a power-of-two scaling).
pub fn weight(e: f32) -> u64 {
    // At most 2^32 for e <= 1, so the conversion is exact.
    (e * 4_294_967_296.0).round_ties_even() as u64
}

/// `f * n`, exactly, rounded up (`ceil`) or down, for a finite `f` in `[0, 1]`.
fn scaled(f: f32, n: u64, up: bool) -> u64 {
    // f = mantissa * 2^-shift with shift >= 23 (f <= 1).
    let bits = f.to_bits();
    let exponent = (bits >> 23) & 0xff;
    let (mantissa, shift) = if exponent == 0 {
        (u128::from(bits & 0x7f_ffff), 149)
    } else {
        (u128::from((bits & 0x7f_ffff) | 0x80_0000), 150 - exponent)
    };
    let product = mantissa * u128::from(n);
    if shift >= 128 {
        // product < 2^88 <= 2^shift: the real value lies in [0, 1).
        return u64::from(up && product > 0);
    }
    let whole = product >> shift;
    let rest = product & ((1u128 << shift) - 1);
    // At most n (f <= 1), so it fits u64.
    (whole + u128::from(up && rest > 0)) as u64
}

/// The weight threshold of min-p: the smallest integer `>= min_p * 2^32`.
pub fn min_p_floor(min_p: f32) -> u64 {
    // min_p * 2^32 is exact in f32 (a power-of-two scaling) and at most 2^32.
    (min_p * 4_294_967_296.0).ceil() as u64
}

/// The smallest integer `>= top_p * z` (step 4's target).
pub fn top_p_target(top_p: f32, z: u64) -> u64 {
    scaled(top_p, z, true)
}

/// `D` of step 6: `floor(u * z)`, 0 for `u` below 0 or NaN, at most `z - 1`.
pub fn draw_target(u: f32, z: u64) -> u64 {
    if u.is_nan() || u <= 0.0 {
        0
    } else if u >= 1.0 {
        z.saturating_sub(1)
    } else {
        scaled(u, z, false).min(z.saturating_sub(1))
    }
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

/// The number of leading ranks whose `weights` first sum to at least `target` (or
/// all of them).
fn prefix_reaching(weights: &[u64], target: u64) -> usize {
    let mut sum = 0u64;
    for (r, &w) in weights.iter().enumerate() {
        sum += w;
        if sum >= target {
            return r + 1;
        }
    }
    weights.len()
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
    let x = |i: usize| if logits[i] == m { 0.0 } else { logits[i] - m };
    let w: Vec<u64> = ranked
        .iter()
        .map(|&i| weight(exp_nonpositive(x(i))))
        .collect();
    // At most 2^32 per candidate and fewer than 2^31 candidates: no overflow.
    let z: u64 = w.iter().sum();
    let keep_p = if params.top_p < 1.0 {
        prefix_reaching(&w, top_p_target(params.top_p, z))
    } else {
        ranked.len()
    };
    let keep_m = if params.min_p > 0.0 {
        let floor = min_p_floor(params.min_p);
        w.iter().filter(|&&v| v >= floor).count().max(1)
    } else {
        ranked.len()
    };
    let kept = &ranked[..keep_p.min(keep_m)];
    let t = params.temperature;
    let w_t: Vec<u64> = kept
        .iter()
        .map(|&i| weight(exp_nonpositive(x(i) / t)))
        .collect();
    let z_t: u64 = w_t.iter().sum();
    // The first rank whose running sum exceeds D, i.e. reaches D + 1 (<= z_t).
    let drawn = prefix_reaching(&w_t, draw_target(u, z_t) + 1);
    kept[drawn - 1]
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
