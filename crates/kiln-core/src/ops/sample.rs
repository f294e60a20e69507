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
/// `kiln_cpu::ops::sample`'s.
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
