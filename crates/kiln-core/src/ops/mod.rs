//! The Op IR: every operation a backend executes, one module per op family.
//!
//! Each op is a struct of buffer ids (into a [`Graph`]) and parameters by value. Its
//! doc comment is the op's definition: what it computes, on which shapes, dtypes and
//! layouts. The CPU backend's reference implementation of the same name follows it
//! exactly, and every other backend is tested against that reference. The choosing
//! ops also define their result for one row as a host function
//! ([`argmax::argmax_row`], [`sample::sample_row`]), which the CPU reference and the
//! host sampler both call.
//!
//! All buffers are dense and row-major (last dimension fastest). Activations are F32.

pub mod argmax;
mod attention;
mod cast;
mod delta_net;
mod elementwise;
mod embedding;
mod kv_cache;
mod matmul;
mod moe;
mod norm;
mod rope;
pub mod sample;
mod softmax;

pub use argmax::Argmax;
pub use attention::Attention;
pub use cast::Cast;
pub use delta_net::{
    CausalConv1d, DeltaNetHeads, GatedDeltaNet, GatedRmsNorm, HeadLayout, L2Norm, DELTA_NET_CHUNK,
};
pub use elementwise::{Elementwise, ElementwiseKind, Glu};
pub use embedding::Embedding;
pub use kv_cache::{KvAppend, CACHE_DTYPES};
pub use matmul::MatMul;
pub use moe::{Gating, MoeCombine, MoeMatMul, MoeRouter};
pub use norm::{AddRmsNorm, RmsNorm};
pub use rope::{HeadNormRope, QkNorm, QkvRopeAppend, Rope, RopeParams, RopeStyle};
pub use sample::{Sample, SampleParams};
pub use softmax::Softmax;

use crate::{BufferDesc, BufferId, DType, Error, Graph, Result};

/// What every op struct provides: its name, operands, and argument validation.
pub trait OpSpec {
    /// Short name used in errors and kernel labels, e.g. `rms_norm`.
    fn name(&self) -> &'static str;
    /// Buffers the op reads.
    fn inputs(&self) -> Vec<BufferId>;
    /// Buffers the op writes.
    fn outputs(&self) -> Vec<BufferId>;
    /// Checks every parameter against the declared buffers: dtypes, element counts,
    /// dimension constraints. Errors are [`Error::InvalidArgument`] naming the op and
    /// the offending values.
    fn validate(&self, graph: &Graph) -> Result<()>;
}

macro_rules! op_enum {
    ($($variant:ident),* $(,)?) => {
        /// One operation of the IR. See each variant's struct for its definition.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Op {
            $($variant($variant),)*
        }

        impl Op {
            /// The name of every variant, in declaration order (`Embedding`, `RmsNorm`,
            /// ...): what a check that must cover every op compares itself with.
            pub const VARIANTS: &'static [&'static str] = &[$(stringify!($variant)),*];

            fn spec(&self) -> &dyn OpSpec {
                match self {
                    $(Op::$variant(op) => op,)*
                }
            }

            /// The name of this op's variant, one of [`Op::VARIANTS`].
            pub fn variant(&self) -> &'static str {
                match self {
                    $(Op::$variant(_) => stringify!($variant),)*
                }
            }
        }

        $(impl From<$variant> for Op {
            fn from(op: $variant) -> Op {
                Op::$variant(op)
            }
        })*
    };
}

op_enum!(
    Embedding,
    RmsNorm,
    AddRmsNorm,
    Rope,
    HeadNormRope,
    QkvRopeAppend,
    MatMul,
    Elementwise,
    Glu,
    Softmax,
    KvAppend,
    Attention,
    Argmax,
    Cast,
    Sample,
    MoeRouter,
    MoeMatMul,
    MoeCombine,
    CausalConv1d,
    GatedDeltaNet,
    GatedRmsNorm,
    L2Norm,
);

impl Op {
    /// The op's short name.
    pub fn name(&self) -> &'static str {
        self.spec().name()
    }
    /// Buffers the op reads.
    pub fn inputs(&self) -> Vec<BufferId> {
        self.spec().inputs()
    }
    /// Buffers the op writes.
    pub fn outputs(&self) -> Vec<BufferId> {
        self.spec().outputs()
    }
    /// Validates the op against `graph`'s buffer declarations.
    pub fn validate(&self, graph: &Graph) -> Result<()> {
        self.spec().validate(graph)
    }
}

/// Float dtypes an op may take as a weight or cast operand.
pub const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Weight dtypes [`MatMul`], [`MoeMatMul`] and [`Embedding`] accept.
pub const WEIGHT_DTYPES: [DType; 19] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
    DType::Q2K,
    DType::Q3K,
    DType::Q4K,
    DType::Q5K,
    DType::Q6K,
    DType::IQ4NL,
    DType::Q1_0,
    DType::Q2_0,
    DType::TQ1_0,
    DType::TQ2_0,
    DType::MXFP4,
];

/// The dtype of an activation's 8-bit copy: an op that writes F32 activations may also
/// write them rounded to Q8_1 (`out_q8`), and [`MatMul`] may read that copy (`x_q8`).
///
/// The rounding is [`crate::quant::quantize`]'s Q8_1 encoding of the f32 values, per
/// block of 32 consecutive elements of a row: `d = max |v| / 127`, `q = round(v / d)`
/// (half away from zero), `d` stored as f16. The copy saves a backend that multiplies
/// with 8-bit activations from rounding x once per product.
pub const Q8_COPY: DType = DType::Q8_1;

/// Validation helpers shared by the op families.
pub(crate) struct Checker<'g> {
    graph: &'g Graph,
    op: &'static str,
}

impl<'g> Checker<'g> {
    pub(crate) fn new(graph: &'g Graph, op: &'static str) -> Self {
        Self { graph, op }
    }

    /// An [`Error::InvalidArgument`] for this op.
    pub(crate) fn error(&self, msg: impl Into<String>) -> Error {
        Error::invalid(self.op, msg)
    }

    /// Errors with `msg()` unless `cond` holds.
    pub(crate) fn ensure(&self, cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
        if cond {
            Ok(())
        } else {
            Err(self.error(msg()))
        }
    }

    /// Errors unless every named dimension is non-zero.
    pub(crate) fn nonzero(&self, dims: &[(&str, usize)]) -> Result<()> {
        for (name, v) in dims {
            self.ensure(*v > 0, || format!("{name} must be > 0, got {v}"))?;
        }
        Ok(())
    }

    /// The product of `dims`, or an error when it overflows.
    pub(crate) fn count(&self, dims: &[usize]) -> Result<usize> {
        dims.iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| self.error(format!("dimensions {dims:?} overflow")))
    }

    /// Checks that operand `role` is buffer `id` with one of `dtypes` and exactly
    /// `elements` elements.
    pub(crate) fn buffer(
        &self,
        role: &str,
        id: BufferId,
        dtypes: &[DType],
        elements: usize,
    ) -> Result<&'g BufferDesc> {
        let desc = self
            .graph
            .desc(id)
            .map_err(|_| self.error(format!("{role}: buffer id {} is not in the graph", id.0)))?;
        if !dtypes.contains(&desc.dtype) {
            let names: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
            return Err(self.error(format!(
                "{role} {:?} has dtype {}, expected one of [{}]",
                desc.name,
                desc.dtype,
                names.join(", ")
            )));
        }
        if desc.elements() != elements {
            return Err(self.error(format!(
                "{role} {:?} has {} elements (shape {:?}), expected {elements}",
                desc.name,
                desc.elements(),
                desc.shape
            )));
        }
        Ok(desc)
    }

    /// As [`Checker::buffer`] for an optional operand.
    pub(crate) fn optional(
        &self,
        role: &str,
        id: Option<BufferId>,
        dtypes: &[DType],
        elements: usize,
    ) -> Result<()> {
        id.map_or(Ok(()), |id| {
            self.buffer(role, id, dtypes, elements).map(|_| ())
        })
    }

    /// Checks the optional Q8_1 operand `role` ([`Q8_COPY`]): `elements` elements in
    /// rows of `row` elements, each a whole number of Q8_1 blocks.
    pub(crate) fn q8_copy(
        &self,
        role: &str,
        id: Option<BufferId>,
        elements: usize,
        row: usize,
    ) -> Result<()> {
        let Some(id) = id else { return Ok(()) };
        let block = Q8_COPY.block_size();
        self.ensure(row % block == 0, || {
            format!("{role} holds rows of {row} elements rounded to q8_1, which needs a multiple of {block}")
        })?;
        self.buffer(role, id, &[Q8_COPY], elements).map(|_| ())
    }

    /// Checks a row-major weight of `rows` x `cols` whose rows are whole blocks.
    pub(crate) fn weight(
        &self,
        role: &str,
        id: BufferId,
        rows: usize,
        cols: usize,
    ) -> Result<DType> {
        let elements = self.count(&[rows, cols])?;
        let desc = self.buffer(role, id, &WEIGHT_DTYPES, elements)?;
        let bs = desc.dtype.block_size();
        self.ensure(cols % bs == 0, || {
            format!(
                "{role} {:?} is {}: its row length {cols} must be a multiple of the block size {bs}",
                desc.name, desc.dtype
            )
        })?;
        self.ensure(desc.shape.last() == Some(&cols) || bs == 1, || {
            format!(
                "{role} {:?} is {} with shape {:?}: its last dimension must be the row length {cols}",
                desc.name, desc.dtype, desc.shape
            )
        })?;
        Ok(desc.dtype)
    }
}

/// Helper: a `Vec` of the present ids among required and optional operands.
pub(crate) fn ids(required: &[BufferId], optional: &[Option<BufferId>]) -> Vec<BufferId> {
    required
        .iter()
        .copied()
        .chain(optional.iter().flatten().copied())
        .collect()
}
