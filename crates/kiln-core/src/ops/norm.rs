use super::{ids, Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// Root-mean-square normalization of each row.
///
/// For each row `r` of `x` (`[rows, dim]`, F32):
/// `out[r, i] = x[r, i] / sqrt(mean_j(x[r, j]^2) + eps) * w[i]`,
/// where `w` is `weight` (F32 `[dim]`) or 1 when `weight` is `None`. The mean and the
/// product accumulate in f32. `out` is F32 `[rows, dim]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNorm {
    pub x: BufferId,
    pub weight: Option<BufferId>,
    pub out: BufferId,
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
}

/// Residual add fused with [`RmsNorm`]: writes both the sum and its normalization.
///
/// `sum = x + residual` (element-wise, F32 `[rows, dim]`), then
/// `out = RmsNorm(sum, weight, eps)` exactly as [`RmsNorm`] defines it, computed from
/// the f32 `sum` that is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct AddRmsNorm {
    pub x: BufferId,
    pub residual: BufferId,
    pub weight: Option<BufferId>,
    pub sum: BufferId,
    pub out: BufferId,
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
) -> Result<usize> {
    c.nonzero(&[("rows", rows), ("dim", dim)])?;
    c.ensure(eps.is_finite() && eps >= 0.0, || {
        format!("eps must be finite and >= 0, got {eps}")
    })?;
    c.optional("weight", weight, &[DType::F32], dim)?;
    c.count(&[rows, dim])
}

impl OpSpec for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn inputs(&self) -> Vec<BufferId> {
        ids(&[self.x], &[self.weight])
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.out]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        let n = check_norm(&c, self.rows, self.dim, self.eps, self.weight)?;
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
        vec![self.sum, self.out]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        let n = check_norm(&c, self.rows, self.dim, self.eps, self.weight)?;
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
