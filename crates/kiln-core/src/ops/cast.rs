use super::{Checker, OpSpec, FLOAT_DTYPES};
use crate::{BufferId, Graph, Result};

/// Copies `len` elements, converting between F32, F16 and BF16 as the two buffers'
/// dtypes say (a copy when they are equal).
///
/// Conversions to F16 and BF16 round to nearest, ties to even, as `half` does;
/// values beyond F16's range become infinities.
#[derive(Clone, Debug, PartialEq)]
pub struct Cast {
    pub x: BufferId,
    pub out: BufferId,
    pub len: usize,
}

impl OpSpec for Cast {
    fn name(&self) -> &'static str {
        "cast"
    }
    fn inputs(&self) -> Vec<BufferId> {
        vec![self.x]
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.out]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[("len", self.len)])?;
        c.buffer("x", self.x, &FLOAT_DTYPES, self.len)?;
        c.buffer("out", self.out, &FLOAT_DTYPES, self.len)?;
        Ok(())
    }
}
