use super::{ids, Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// Root-mean-square normalization of each row.
///
/// For each row `r` of `x` (`[rows, dim]`, F32):
/// `out[r, i] = x[r, i] / sqrt(mean_j(x[r, j]^2) + eps) * w[i]`,
/// where `w` is `weight` (F32 `[dim]`) or 1 when `weight` is `None`. The mean and the
/// product accumulate in f32. `out` is F32 `[rows, dim]`. `out_q8`, when given, is
/// Q8_1 `[rows, dim]` (`dim` a multiple of 32) and receives `out` rounded to it
/// ([`super::Q8_COPY`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNorm {
    pub x: BufferId,
    pub weight: Option<BufferId>,
    pub out: BufferId,
    pub out_q8: Option<BufferId>,
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
}

/// Residual add fused with [`RmsNorm`]: writes both the sum and its normalization.
///
/// `sum = x + residual` (element-wise, F32 `[rows, dim]`), then
/// `out = RmsNorm(sum, weight, eps)` exactly as [`RmsNorm`] defines it, computed from
/// the f32 `sum` that is stored, and `out_q8` as [`RmsNorm`]'s.
#[derive(Clone, Debug, PartialEq)]
pub struct AddRmsNorm {
    pub x: BufferId,
    pub residual: BufferId,
    pub weight: Option<BufferId>,
    pub sum: BufferId,
    pub out: BufferId,
    pub out_q8: Option<BufferId>,
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
}

fn check_norm(
    c: &Checker,
    rows: usize,
    dim: usize,
    eps: f32,
    weight: Option<BufferId>,
    out_q8: Option<BufferId>,
) -> Result<usize> {
    c.nonzero(&[("rows", rows), ("dim", dim)])?;
    c.ensure(eps.is_finite() && eps >= 0.0, || {
        format!("eps must be finite and >= 0, got {eps}")
    })?;
    c.optional("weight", weight, &[DType::F32], dim)?;
    let n = c.count(&[rows, dim])?;
    c.q8_copy("out_q8", out_q8, n, dim)?;
    Ok(n)
}

impl OpSpec for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn inputs(&self) -> Vec<BufferId> {
        ids(&[self.x], &[self.weight])
    }
    fn outputs(&self) -> Vec<BufferId> {
        ids(&[self.out], &[self.out_q8])
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        let n = check_norm(&c, self.rows, self.dim, self.eps, self.weight, self.out_q8)?;
        c.buffer("x", self.x, &[DType::F32], n)?;
        c.buffer("out", self.out, &[DType::F32], n)?;
        Ok(())
    }
}

impl OpSpec for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add_rms_norm"
    }
    fn inputs(&self) -> Vec<BufferId> {
        ids(&[self.x, self.residual], &[self.weight])
    }
    fn outputs(&self) -> Vec<BufferId> {
        ids(&[self.sum, self.out], &[self.out_q8])
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        let n = check_norm(&c, self.rows, self.dim, self.eps, self.weight, self.out_q8)?;
        for (role, id) in [
            ("x", self.x),
            ("residual", self.residual),
            ("sum", self.sum),
            ("out", self.out),
        ] {
            c.buffer(role, id, &[DType::F32], n)?;
        }
        Ok(())
    }
}
