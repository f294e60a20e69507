//! [`Sample`]: its definition, its validation, and [`sample_row`], the definition's
//! result for one row on the host, in the fixed-point arithmetic every backend matches.

use std::cmp::Ordering;

use super::argmax::argmax_row;
use super::{Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// The settings of [`Sample`] (the sampler's, less the repetition penalty).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    /// Softmax temperature; `<= 0` selects the argmax.
    pub temperature: f32,
    /// Keep the `top_k` highest-ranked candidates; 0 keeps all.
    pub top_k: usize,
    /// Nucleus mass in `(0, 1]`; 1 keeps all.
    pub top_p: f32,
    /// Relative probability floor in `[0, 1]`; 0 keeps all.
    pub min_p: f32,
}

/// Chooses one token id per row of logits: temperature, top-k, top-p, min-p, and a
/// draw with a given uniform number.
///
/// - `logits`: F32 `[rows, vocab]`; any repetition penalty is applied to them before
///   this op (`kiln_models::sampler::apply_repeat_penalty`).
/// - `uniform`: F32 `[rows]`, one number in `[0, 1)` per row, drawn by the host from
///   its seeded generator.
/// - `out`: I32 `[rows]`, the chosen index of each row.
///
/// For one row `l` with uniform `u`:
/// 1. With `temperature <= 0` the result is the argmax of `l` ([`super::Argmax`]:
///    lowest index on ties, `-0` equal to `+0`, NaN never chosen, 0 for a row of only
///    NaN).
/// 2. The candidates are the indices whose logit is not NaN (none: the result is 0),
///    ranked by logit descending in IEEE total order (`-0` below `+0`), ties by lower
///    index. `C` is the first `top_k` of them (all when `top_k` is 0 or larger).
/// 3. Weights: `m` is the logit of rank 0. A candidate `i` has `x_i = l_i - m` (one
///    f32 subtraction), taken as 0 where `l_i == m` (so that an infinite maximum gives
///    0, not NaN), and the weight `w_i = W(E(x_i))`, where `W(e)` is `e * 2^32`
///    rounded to the nearest integer, ties to even: an integer in `[0, 2^32]`,
///    `2^32` at rank 0. `Z` is the sum of `w_i` over `C`, an exact integer.
/// 4. Top-p (when `top_p < 1`): `keep_p` is the smallest `t >= 1` for which the
///    weights of the first `t` ranks sum to at least `top_p * Z` (compared exactly,
///    as real numbers); else `keep_p = |C|`.
/// 5. Min-p (when `min_p > 0`): `keep_m` is the number of `i` in `C` with
///    `w_i >= min_p * 2^32` (compared exactly; `2^32` is the weight of rank 0, so this
///    is `p_i >= min_p * p_r0`), at least 1; else `keep_m = |C|`. `K` is the first
///    `min(keep_p, keep_m)` ranks.
/// 6. The draw: `w'_i = W(E(x_i / temperature))` (one f32 division), `Z'` the sum
///    of `w'_i` over `K` and `D = floor(u * Z')` (exactly; a `u` below 0 or NaN
///    counts as 0, and `D` is at most `Z' - 1`). The result is the index of the first
///    rank of `K` at which the running sum of `w'` exceeds `D`.
///
/// So probabilities are weights over their sum, in fixed point: a weight is a multiple
/// of `2^-32` of the top candidate's, and a candidate whose `E` is below `2^-33`
/// (about 22.9 below the maximum, times the temperature for the draw) has weight 0 and
/// is never drawn. Every sum is of integers and so does not depend on its order: any
/// split of a row over threads and blocks gives these results exactly.
///
/// `E(x)` is `e^x` for `x <= 0` by a fixed formula, each step one f32 operation
/// rounded to nearest (no fused multiply-add): NaN for NaN, 0 below -104, else with
/// `n = floor(x * log2(e) + 0.5)` and `r = (x - n * LN2_HI) - n * LN2_LO`, the Horner
/// polynomial `1 + r(1 + r(1/2 + r(1/6 + r(1/24 + r(1/120 + r/720)))))` times `2^n`
/// (as `2^(n + 64)` then `2^-64` when `n < -126`); the constants are
/// [`LOG2_E`], [`LN2_HI`], [`LN2_LO`] and [`EXP_COEFFS`] ([`exp_nonpositive`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub logits: BufferId,
    pub uniform: BufferId,
    pub out: BufferId,
    pub rows: usize,
    pub vocab: usize,
    pub params: SampleParams,
}

impl SampleParams {
    fn check(&self, c: &Checker) -> Result<()> {
        c.ensure(self.temperature.is_finite(), || {
            format!("temperature must be finite, got {}", self.temperature)
        })?;
        c.ensure(self.top_p > 0.0 && self.top_p <= 1.0, || {
            format!("top_p must be in (0, 1], got {}", self.top_p)
        })?;
        c.ensure((0.0..=1.0).contains(&self.min_p), || {
            format!("min_p must be in [0, 1], got {}", self.min_p)
        })
    }
}

impl OpSpec for Sample {
    fn name(&self) -> &'static str {
        "sample"
    }
    fn inputs(&self) -> Vec<BufferId> {
        vec![self.logits, self.uniform]
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.out]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[("rows", self.rows), ("vocab", self.vocab)])?;
        c.ensure(i32::try_from(self.vocab).is_ok(), || {
            format!("vocab {} does not fit an I32 index", self.vocab)
        })?;
        self.params.check(&c)?;
        c.buffer(
            "logits",
            self.logits,
            &[DType::F32],
            c.count(&[self.rows, self.vocab])?,
        )?;
        c.buffer("uniform", self.uniform, &[DType::F32], self.rows)?;
        c.buffer("out", self.out, &[DType::I32], self.rows)?;
        Ok(())
    }
}

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

/// The index [`Sample`] chooses from one row of `logits` with uniform number `u`: the
/// host's rendering of the definition, which every backend's op matches exactly.
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
