//! Graphs: buffers with declared dtypes and shapes, and the ops over them in order.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::ops::Op;
use crate::{DType, Error, Result};

/// Calls of [`Graph::validate`] in this process.
static VALIDATIONS: AtomicU64 = AtomicU64::new(0);

/// How many times [`Graph::validate`] has run in this process (backends validate when
/// they compile a graph, never when they run an executable).
pub fn validations() -> u64 {
    VALIDATIONS.load(Ordering::Relaxed)
}

/// Index of a buffer within one [`Graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferId(pub u32);

impl BufferId {
    /// The id as an index into the graph's buffer list.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Whether the planner may share a buffer's memory with others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BufferKind {
    /// Outlives one execution: weights, KV caches, graph inputs and outputs. Bound by
    /// the caller; never aliased.
    Persistent,
    /// Lives only inside one execution, from the op that first writes it to the op that
    /// last reads it. The planner may give it memory shared with other transients.
    Transient,
}

/// A buffer's declaration: name, element type, shape (row-major, last dimension
/// fastest) and kind.
#[derive(Clone, Debug, PartialEq)]
pub struct BufferDesc {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub kind: BufferKind,
}

impl BufferDesc {
    /// Number of elements (product of the shape; 1 for a scalar shape `[]`).
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size in bytes. For block formats the last dimension must be a whole number of
    /// blocks; [`Graph::add_buffer`] checks this.
    pub fn bytes(&self) -> usize {
        // Checked at insertion (Graph::add_buffer), so this cannot fail for a desc in a graph.
        self.dtype.bytes_for(self.elements()).unwrap_or(0)
    }
}

/// A sequence of ops over declared buffers: what a backend executes.
///
/// Ops run in order. A transient buffer must be written by an op before any op reads
/// it; an op's outputs are distinct from each other and from its inputs (see
/// [`Graph::validate`]).
#[derive(Clone, Debug, Default)]
pub struct Graph {
    buffers: Vec<BufferDesc>,
    ops: Vec<Op>,
    /// Per buffer: whether some op already pushed writes it.
    written: Vec<bool>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a buffer and returns its id.
    ///
    /// Errors when the shape's element count overflows, or a block format's last
    /// dimension is not a whole number of blocks.
    pub fn add_buffer(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: &[usize],
        kind: BufferKind,
    ) -> Result<BufferId> {
        let name = name.into();
        let elements = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                Error::invalid(
                    "graph",
                    format!("buffer {name:?}: shape {shape:?} overflows"),
                )
            })?;
        let last = shape.last().copied().unwrap_or(1);
        if dtype.is_quantized() && last % dtype.block_size() != 0 {
            return Err(Error::invalid(
                "graph",
                format!(
                    "buffer {name:?}: last dimension {last} of a {dtype} buffer is not a multiple of its block size {}",
                    dtype.block_size()
                ),
            ));
        }
        dtype
            .bytes_for(elements)
            .map_err(|e| Error::invalid("graph", format!("buffer {name:?}: {e}")))?;
        let id = u32::try_from(self.buffers.len())
            .map_err(|_| Error::invalid("graph", "more than u32::MAX buffers"))?;
        self.written.push(false);
        self.buffers.push(BufferDesc {
            name,
            dtype,
            shape: shape.to_vec(),
            kind,
        });
        Ok(BufferId(id))
    }

    /// Shorthand for a persistent buffer.
    pub fn persistent(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: &[usize],
    ) -> Result<BufferId> {
        self.add_buffer(name, dtype, shape, BufferKind::Persistent)
    }

    /// Shorthand for a transient buffer.
    pub fn transient(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: &[usize],
    ) -> Result<BufferId> {
        self.add_buffer(name, dtype, shape, BufferKind::Transient)
    }

    /// Appends an op after checking it against the declared buffers
    /// ([`Op::validate`]) and the graph's ordering rules.
    pub fn push(&mut self, op: impl Into<Op>) -> Result<()> {
        let op = op.into();
        op.validate(self)?;
        self.check_order(&op, self.ops.len())?;
        for id in op.outputs() {
            self.written[id.index()] = true;
        }
        self.ops.push(op);
        Ok(())
    }

    /// The declaration of `id`, or an error naming the id when it is not in the graph.
    pub fn desc(&self, id: BufferId) -> Result<&BufferDesc> {
        self.buffers.get(id.index()).ok_or_else(|| {
            Error::invalid(
                "graph",
                format!(
                    "buffer id {} is not in this graph ({} buffers)",
                    id.0,
                    self.buffers.len()
                ),
            )
        })
    }

    /// All buffer declarations, indexed by [`BufferId::index`].
    pub fn buffers(&self) -> &[BufferDesc] {
        &self.buffers
    }

    /// The ops in execution order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Re-checks every op and the ordering rules: useful for graphs assembled by hand.
    pub fn validate(&self) -> Result<()> {
        VALIDATIONS.fetch_add(1, Ordering::Relaxed);
        let mut written = vec![false; self.buffers.len()];
        for (i, op) in self.ops.iter().enumerate() {
            op.validate(self)?;
            self.check_distinct(op, i)?;
            for id in op.inputs() {
                if self.buffers[id.index()].kind == BufferKind::Transient && !written[id.index()] {
                    return Err(self.read_before_write(op, i, id));
                }
            }
            for id in op.outputs() {
                written[id.index()] = true;
            }
        }
        Ok(())
    }

    fn check_order(&self, op: &Op, index: usize) -> Result<()> {
        self.check_distinct(op, index)?;
        for id in op.inputs() {
            if self.buffers[id.index()].kind == BufferKind::Transient && !self.written[id.index()] {
                return Err(self.read_before_write(op, index, id));
            }
        }
        Ok(())
    }

    fn check_distinct(&self, op: &Op, index: usize) -> Result<()> {
        let outputs = op.outputs();
        for (k, out) in outputs.iter().enumerate() {
            if outputs[..k].contains(out) || op.inputs().contains(out) {
                return Err(Error::invalid(
                    op.name(),
                    format!(
                        "op #{index}: output buffer {:?} is also another operand; outputs must be distinct buffers",
                        self.buffers[out.index()].name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn read_before_write(&self, op: &Op, index: usize, id: BufferId) -> Error {
        Error::invalid(
            op.name(),
            format!(
                "op #{index} reads transient buffer {:?} before any op writes it",
                self.buffers[id.index()].name
            ),
        )
    }
}
