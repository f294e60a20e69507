use super::{ids, Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// The function an [`Elementwise`] op applies to each pair `(a[i], b[i])`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElementwiseKind {
    /// `a + b`
    Add,
    /// `a * b`
    Mul,
    /// `silu(a) * b`, with `silu(a) = a / (1 + exp(-a))` (SwiGLU's gate).
    SiluMul,
    /// `gelu(a) * b`, with the tanh approximation
    /// `gelu(a) = 0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))` (GeGLU's gate),
    /// evaluated as the equal `a / (1 + exp(-2 sqrt(2/pi) (a + 0.044715 a^3)))` so that
    /// f32 keeps its precision for negative `a`.
    GeluMul,
}

impl ElementwiseKind {
    /// Short name, also the kernel specialisation's label.
    pub fn name(self) -> &'static str {
        match self {
            ElementwiseKind::Add => "add",
            ElementwiseKind::Mul => "mul",
            ElementwiseKind::SiluMul => "silu_mul",
            ElementwiseKind::GeluMul => "gelu_mul",
        }
    }
}

/// A binary element-wise function over two F32 vectors of `len` elements:
/// `out[i] = f(a[i], b[i])` with `f` given by `kind`, computed in f32. `out_q8`, when
/// given, is a Q8_1 buffer of `len` elements (`len` a multiple of 32) and receives
/// `out` rounded to it ([`super::Q8_COPY`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Elementwise {
    pub kind: ElementwiseKind,
    pub a: BufferId,
    pub b: BufferId,
    pub out: BufferId,
    pub out_q8: Option<BufferId>,
    pub len: usize,
}

impl OpSpec for Elementwise {
    fn name(&self) -> &'static str {
        self.kind.name()
    }
    fn inputs(&self) -> Vec<BufferId> {
        vec![self.a, self.b]
    }
    fn outputs(&self) -> Vec<BufferId> {
        ids(&[self.out], &[self.out_q8])
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[("len", self.len)])?;
        for (role, id) in [("a", self.a), ("b", self.b), ("out", self.out)] {
            c.buffer(role, id, &[DType::F32], self.len)?;
        }
        c.q8_copy("out_q8", self.out_q8, self.len, self.len)
    }
}
