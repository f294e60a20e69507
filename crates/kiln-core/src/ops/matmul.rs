use super::{ids, Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// Matrix product with a transposed weight: `out = x · wᵀ (+ bias)`.
///
/// - `x`: F32 `[m, k]` (one row per token; `m` small is the decode mat-vec case,
///   large is prefill).
/// - `w`: `[n, k]`, row-major, any dtype of [`super::WEIGHT_DTYPES`]; each row is a
///   whole number of blocks (`k` a multiple of the block size).
/// - `x_q8`: optional Q8_1 `[m, k]` (`k` a multiple of 32), x rounded to 8 bits as
///   [`super::Q8_COPY`] defines, written by the op that wrote x.
/// - `bias`: optional F32 `[n]`.
/// - `out`: F32 `[m, n]`, `out[i, j] = sum_l a[i, l] * dequantize(w)[j, l] + bias[j]`,
///   accumulated in f32, where `a` is x, or with `x_q8` the copy's values (each block's
///   `d * q`): given a copy, the product is of the rounded activations, as llama.cpp's
///   products of quantized weights are.
///
/// The CPU reference computes exactly this in f32 and is the definition. Other
/// backends may round where stated here, and their tests allow for it:
///
/// - CUDA, up to 8 rows (mat-vec): no rounding beyond the definition; only the order
///   of the f32 sums differs (normalised MSE at most 1e-9 against the reference).
/// - CUDA, more than 8 rows (mat-mat, on cuBLASLt or on kiln's kernel): x is rounded
///   to bf16 (round to nearest even) and each weight element is decoded in f32 from
///   its block, as the reference decodes it, then rounded to bf16; the products of
///   the bf16 values are summed in f32 (cuBLASLt's `CUBLAS_COMPUTE_32F`, or
///   `mma.sync` with f32 accumulators), the bias added in f32 and the result stored
///   in f32. Each operand carries a relative error of at most 2^-9, so on random
///   inputs the normalised MSE is about 5e-6 for every weight dtype (the tests allow
///   5e-5).
#[derive(Clone, Debug, PartialEq)]
pub struct MatMul {
    pub x: BufferId,
    pub x_q8: Option<BufferId>,
    pub w: BufferId,
    pub bias: Option<BufferId>,
    pub out: BufferId,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl OpSpec for MatMul {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn inputs(&self) -> Vec<BufferId> {
        ids(&[self.x, self.w], &[self.x_q8, self.bias])
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.out]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[("m", self.m), ("n", self.n), ("k", self.k)])?;
        c.weight("w", self.w, self.n, self.k)?;
        let x_elements = c.count(&[self.m, self.k])?;
        c.buffer("x", self.x, &[DType::F32], x_elements)?;
        c.q8_copy("x_q8", self.x_q8, x_elements, self.k)?;
        c.optional("bias", self.bias, &[DType::F32], self.n)?;
        c.buffer("out", self.out, &[DType::F32], c.count(&[self.m, self.n])?)?;
        Ok(())
    }
}
