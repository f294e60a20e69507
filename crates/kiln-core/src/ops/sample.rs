use super::{Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// Lanes of the fixed-order sum `S` of [`Sample`]'s definition (the CUDA kernel's
/// threads per block).
pub const SAMPLE_LANES: usize = 1024;

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
///    lowest index on ties, NaN never chosen, 0 for a row of only NaN).
/// 2. The candidates are the indices whose logit is not NaN (none: the result is 0),
///    ranked by logit descending in IEEE total order (`-0` below `+0`), ties by lower
///    index. `C` is the first `top_k` of them (all when `top_k` is 0 or larger).
/// 3. `m` is the logit of rank 0; `e_i = E(l_i - m)`, `z = S(e over C)` and
///    `p_i = e_i / z` for `i` in `C`.
/// 4. Top-p (when `top_p < 1`): `keep_p` is the smallest `t >= 1` with
///    `S(p over the first t ranks) >= top_p`, or `|C|` when none reaches it; else
///    `keep_p = |C|`.
/// 5. Min-p (when `min_p > 0`): `keep_m` is the number of `i` in `C` with
///    `p_i >= min_p * p_r0` (`p_r0` the rank-0 probability), at least 1; else
///    `keep_m = |C|`. `K` is the first `min(keep_p, keep_m)` ranks.
/// 6. The draw: `e'_i = E((l_i - m) / temperature)`, `z' = S(e' over K)`,
///    `p'_i = e'_i / z'`; the result is the index of the smallest rank `t` with
///    `u < S(p' over the first t + 1 ranks)`, or of `K`'s last rank when none.
///
/// Every operation is one f32 operation rounded to nearest (no fused multiply-add).
/// `S(x over a set)` sums in [`SAMPLE_LANES`] lanes: lane `j` adds, from 0, the `x_i`
/// of the set's indices `i` with `i % SAMPLE_LANES == j` in increasing `i`; then for
/// `s = SAMPLE_LANES / 2, ..., 2, 1` lane `j < s` adds lane `j + s`; the sum is lane 0.
/// Adding to a set never lowers `S`, so steps 4 and 6 are well defined by threshold.
/// `E(x)` is `e^x` for `x <= 0` by a fixed formula: NaN for NaN, 0 below -104, else
/// with `n = floor(x * log2(e) + 0.5)` and `r = (x - n * LN2_HI) - n * LN2_LO`, the
/// Horner polynomial `1 + r(1 + r(1/2 + r(1/6 + r(1/24 + r(1/120 + r/720)))))` times
/// `2^n` (as `2^(n + 64)` then `2^-64` when `n < -126`); the constants are
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
