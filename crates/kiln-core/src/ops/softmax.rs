use super::{Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// Row-wise softmax with a scale and an optional causal mask.
///
/// For row `r` of `x` (F32 `[rows, cols]`): `s[c] = scale * x[r, c]`, except that with
/// `causal_offset = Some(o)` every column `c > o + r` is masked (`s[c] = -inf`).
/// `out[r, c] = exp(s[c] - max(s)) / sum_c' exp(s[c'] - max(s))`; masked columns are 0.
/// With a mask, `o + r` is at least 0 for every row, so no row is fully masked.
#[derive(Clone, Debug, PartialEq)]
pub struct Softmax {
    pub x: BufferId,
    pub out: BufferId,
    pub rows: usize,
    pub cols: usize,
    pub scale: f32,
    pub causal_offset: Option<usize>,
}

impl OpSpec for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }
    fn inputs(&self) -> Vec<BufferId> {
        vec![self.x]
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.out]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[("rows", self.rows), ("cols", self.cols)])?;
        c.ensure(self.scale.is_finite(), || {
            format!("scale must be finite, got {}", self.scale)
        })?;
        let n = c.count(&[self.rows, self.cols])?;
        c.buffer("x", self.x, &[DType::F32], n)?;
        c.buffer("out", self.out, &[DType::F32], n)?;
        Ok(())
    }
}
