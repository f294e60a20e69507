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
/// Backends may also round for speed where the tolerance allows it: the CUDA mat-mat
/// multiplies bf16-rounded x and decoded weights.
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
