//! [`Argmax`]: its definition, its validation, and [`argmax_row`], the definition's
//! result for one row on the host.

use super::{Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// Index of the largest value of each row.
///
/// `out[r] = argmax_c x[r, c]` for `x` F32 `[rows, cols]`, `out` I32 `[rows]`. Ties go
/// to the lowest index; NaN values are never selected (a row of only NaN gives 0).
#[derive(Clone, Debug, PartialEq)]
pub struct Argmax {
    pub x: BufferId,
    pub out: BufferId,
    pub rows: usize,
    pub cols: usize,
}

impl OpSpec for Argmax {
    fn name(&self) -> &'static str {
        "argmax"
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
        c.ensure(i32::try_from(self.cols).is_ok(), || {
            format!("cols {} does not fit an I32 index", self.cols)
        })?;
        c.buffer(
            "x",
            self.x,
            &[DType::F32],
            c.count(&[self.rows, self.cols])?,
        )?;
        c.buffer("out", self.out, &[DType::I32], self.rows)?;
        Ok(())
    }
}

/// Index of the largest non-NaN value of `row`; the lowest such index on ties, 0
/// when every value is NaN.
pub fn argmax_row(row: &[f32]) -> usize {
    let mut best = 0;
    let mut best_value = f32::NAN;
    for (i, &v) in row.iter().enumerate() {
        if !v.is_nan() && (best_value.is_nan() || v > best_value) {
            best = i;
            best_value = v;
        }
    }
    best
}
