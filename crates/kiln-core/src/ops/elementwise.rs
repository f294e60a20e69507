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
    /// `sigmoid(a) * b`, with `sigmoid(a) = 1 / (1 + exp(-a))`: a gate on `b` (the
    /// sigmoid-gated attention output of Qwen3-Next, `attn * sigmoid(gate)`, with the
    /// gate as `a`).
    SigmoidMul,
}

impl ElementwiseKind {
    /// Every kind, in declaration order.
    pub const ALL: [ElementwiseKind; 5] = [
        ElementwiseKind::Add,
        ElementwiseKind::Mul,
        ElementwiseKind::SiluMul,
        ElementwiseKind::GeluMul,
        ElementwiseKind::SigmoidMul,
    ];

    /// Short name, also the kernel specialisation's label.
    pub fn name(self) -> &'static str {
        match self {
            ElementwiseKind::Add => "add",
            ElementwiseKind::Mul => "mul",
            ElementwiseKind::SiluMul => "silu_mul",
            ElementwiseKind::GeluMul => "gelu_mul",
            ElementwiseKind::SigmoidMul => "sigmoid_mul",
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

/// A gated linear unit over rows that hold the gate and its partner side by side (the
/// output of a fused gate-and-up projection): for `x` F32 `[rows, 2 * n]` and `out`
/// F32 `[rows, n]`, `out[r, i] = f(x[r, i], x[r, n + i])` with `f` given by `kind`
/// as [`Elementwise`] defines it (SwiGLU is [`ElementwiseKind::SiluMul`]), computed in
/// f32. `out_q8`, when given, is a Q8_1 buffer of `rows * n` elements (`n` a multiple
/// of 32) and receives `out` rounded to it ([`super::Q8_COPY`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Glu {
    pub kind: ElementwiseKind,
    pub x: BufferId,
    pub out: BufferId,
    pub out_q8: Option<BufferId>,
    pub rows: usize,
    pub n: usize,
}

impl OpSpec for Glu {
    fn name(&self) -> &'static str {
        "glu"
    }
    fn inputs(&self) -> Vec<BufferId> {
        vec![self.x]
    }
    fn outputs(&self) -> Vec<BufferId> {
        ids(&[self.out], &[self.out_q8])
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[("rows", self.rows), ("n", self.n)])?;
        let len = c.count(&[self.rows, self.n])?;
        c.buffer("x", self.x, &[DType::F32], c.count(&[len, 2])?)?;
        c.buffer("out", self.out, &[DType::F32], len)?;
        c.q8_copy("out_q8", self.out_q8, len, self.n)
    }
}
