//! The Backend trait, and the bindings of a graph's buffers to physical memory.

use crate::planner::MemoryPlan;
use crate::{BufferId, BufferKind, DType, Error, Graph, Op, Result, SharedBytes};

/// A backend's buffer: device memory of a fixed size.
pub trait DeviceBuffer {
    /// Size in bytes.
    fn bytes(&self) -> usize;

    /// Whether the buffer's memory is borrowed from its owner (a weight that a
    /// [`Backend::share_weight`] kept in a file's memory map) rather than allocated
    /// for it. Borrowed memory is read-only. By default, never.
    fn borrowed(&self) -> bool {
        false
    }
}

/// A compute backend: allocates memory, moves bytes in and out, and compiles graphs
/// into executables that it runs.
///
/// Compile once, run many: [`Backend::compile`] validates a graph and its bindings and
/// lowers it, once, to the backend's executable over the bound memory (for CUDA, a
/// list of launch records with device addresses, replayed as a CUDA graph). Running
/// an executable does no validation, no lookup and no allocation; values that change
/// from run to run (token ids, positions, sampling draws) live in bound buffers that
/// the ops read.
pub trait Backend {
    /// The backend's buffer type.
    type Buffer: DeviceBuffer;

    /// A graph lowered by [`Backend::compile`] over the memory bound at that time.
    type Executable;

    /// Short name for messages (`cpu`, `cuda:0`).
    fn name(&self) -> String;

    /// The settings that change how fast this backend runs graphs but not what they
    /// compute (for benchmark reports), or an empty string where it has none.
    fn settings(&self) -> String {
        String::new()
    }

    /// Allocates `bytes` bytes. Errors with [`Error::OutOfMemory`] when it cannot.
    fn alloc(&self, bytes: usize) -> Result<Self::Buffer>;

    /// Copies `src` to the start of `dst`; errors when `src` is longer than `dst`.
    fn upload(&self, dst: &mut Self::Buffer, src: &[u8]) -> Result<()>;

    /// Uploads a weight tensor of `dtype` and `shape` (GGUF bytes, rows along the last
    /// dimension) in the layout this backend's kernels read; [`Backend::download`]
    /// gives the GGUF bytes back. Ops that read weights of block formats need their
    /// weights uploaded this way. By default the layout is the GGUF one.
    fn upload_weight(
        &self,
        dst: &mut Self::Buffer,
        src: &[u8],
        dtype: DType,
        shape: &[usize],
    ) -> Result<()> {
        let _ = (dtype, shape);
        self.upload(dst, src)
    }

    /// A weight buffer holding tensor `src` as [`Backend::upload_weight`] would upload
    /// it into a buffer of `src.len()` bytes. By default it does just that (a copy);
    /// a backend whose kernels read `src`'s memory directly may instead keep a share
    /// of it (no copy; [`DeviceBuffer::borrowed`]), which keeps `src`'s owner (a
    /// file's memory map) alive as long as the buffer. Writing such a buffer
    /// ([`Backend::upload`], or binding it as an op's output) is an error.
    fn share_weight(
        &self,
        src: &SharedBytes,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Self::Buffer> {
        let mut buf = self.alloc(src.as_ref().len())?;
        self.upload_weight(&mut buf, src.as_ref(), dtype, shape)?;
        Ok(buf)
    }

    /// Whether a model on this backend stacks the weights that read one input (the
    /// query, key and value projections; the gate and up projections) into one
    /// tensor at load, so that one product reads them all. Stacking copies those
    /// weights; a backend that shares weight memory ([`Backend::share_weight`]) and
    /// gains little from fewer products says no, and runs the unstacked graph. By
    /// default, yes.
    fn stacks_weights(&self) -> bool {
        true
    }

    /// Copies the first `dst.len()` bytes of `src` into `dst`; errors when `dst` is
    /// longer than `src`.
    fn download(&self, src: &Self::Buffer, dst: &mut [u8]) -> Result<()>;

    /// Whether this backend implements `op` (its kind and operand dtypes). Backends
    /// that implement only part of the IR override this, so that a caller can choose
    /// another backend before running a graph instead of failing half-way.
    fn supports(&self, op: &Op) -> bool {
        let _ = op;
        true
    }

    /// Makes ready, ahead of time, whatever running `graph`'s ops needs that does not
    /// depend on memory (CUDA: compiling or loading every kernel, in parallel), so
    /// that the first [`Backend::compile`] of a graph like it does not wait for it.
    /// Errors with [`Error::Unsupported`] when an op has no implementation.
    fn prepare(&self, graph: &Graph) -> Result<()> {
        let _ = graph;
        Ok(())
    }

    /// Validates `graph` and `bindings` (every buffer an op uses bound, outputs distinct
    /// from inputs), makes every kernel it needs ready, and lowers its ops, in order,
    /// to an executable over the memory bound now. Errors as [`Backend::execute`] would,
    /// before anything runs.
    fn compile(
        &self,
        graph: &Graph,
        bindings: &mut Bindings<'_, Self::Buffer>,
    ) -> Result<Self::Executable>;

    /// Enqueues one run of `exe` and returns; [`Backend::synchronize`] (or a download)
    /// waits for it. Backends that run on the host return when it is done.
    ///
    /// # Safety
    /// Every buffer bound when `exe` was compiled must still be allocated (neither
    /// dropped nor replaced), and nothing else may write any of them, or read those
    /// `exe` writes, until the run is complete.
    unsafe fn run(&self, exe: &mut Self::Executable) -> Result<()>;

    /// Waits until all work enqueued on the backend is complete.
    fn synchronize(&self) -> Result<()>;

    /// Runs `exe` once with each of its launches timed alone (each op, on backends
    /// that do not launch kernels), and waits for it. A profile, not a fast path: it
    /// may run slower than [`Backend::run`].
    ///
    /// # Safety
    /// As [`Backend::run`].
    unsafe fn profile(&self, exe: &mut Self::Executable) -> Result<Vec<LaunchProfile>>;

    /// Copies all of `src` to the start of `dst`, device to device, with the backend's
    /// own copy engine (the bandwidth ceiling benchmarks compare with). Enqueued like
    /// [`Backend::run`]; errors when `src` is longer than `dst`.
    fn copy(&self, src: &Self::Buffer, dst: &mut Self::Buffer) -> Result<()>;

    /// Compiles `graph` over `bindings`, runs it once and waits for it: the results are
    /// visible to [`Backend::download`] when it returns.
    fn execute(&self, graph: &Graph, bindings: &mut Bindings<'_, Self::Buffer>) -> Result<()> {
        let mut exe = self.compile(graph, bindings)?;
        // SAFETY: `bindings` borrows every bound buffer exclusively for this call, and
        // the run is complete before it returns.
        let ran = unsafe { self.run(&mut exe) };
        let waited = self.synchronize();
        ran.and(waited)
    }
}

/// The time of one launch of a profiled executable ([`Backend::profile`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchProfile {
    /// The index, in its graph, of the op the launch belongs to.
    pub op_index: usize,
    /// That op's name ([`Op::name`]).
    pub op: &'static str,
    /// What ran: the kernel's specialisation key, or the op's name.
    pub key: String,
    /// Seconds it took.
    pub seconds: f64,
}

/// Checks an upload or download of `len` bytes against a buffer of `bytes` bytes.
pub fn check_transfer(backend: &str, what: &str, len: usize, bytes: usize) -> Result<()> {
    if len > bytes {
        return Err(Error::invalid(
            format!("{backend} {what}"),
            format!("{len} bytes do not fit a buffer of {bytes} bytes"),
        ));
    }
    Ok(())
}

/// Scratch memory for transient buffers: one backend buffer per planned slot, kept
/// between executions and grown when a plan needs more.
pub struct Scratch<B> {
    slots: Vec<B>,
}

impl<B: DeviceBuffer> Default for Scratch<B> {
    fn default() -> Self {
        Self { slots: Vec::new() }
    }
}

impl<B: DeviceBuffer> Scratch<B> {
    /// Empty scratch; [`Scratch::ensure`] allocates.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes sure there is a slot of at least `plan.slot_bytes[s]` bytes for every
    /// slot `s`, allocating only the slots that are missing or too small.
    pub fn ensure<BE: Backend<Buffer = B>>(
        &mut self,
        backend: &BE,
        plan: &MemoryPlan,
    ) -> Result<()> {
        for (s, &need) in plan.slot_bytes.iter().enumerate() {
            if s == self.slots.len() {
                self.slots.push(backend.alloc(need)?);
            } else if self.slots[s].bytes() < need {
                self.slots[s] = backend.alloc(need)?;
            }
        }
        Ok(())
    }

    /// Total bytes held.
    pub fn bytes(&self) -> usize {
        self.slots.iter().map(|b| b.bytes()).sum()
    }
}

/// The physical buffer behind each of a graph's buffers for one execution: scratch
/// slots for transient buffers (as the plan says), caller-bound buffers for
/// persistent ones.
pub struct Bindings<'a, B> {
    phys: Vec<Option<&'a mut B>>,
    phys_of: Vec<Option<usize>>,
    names: Vec<String>,
}

impl<'a, B: DeviceBuffer> Bindings<'a, B> {
    /// Binds `graph`'s transient buffers to `scratch` following `plan`. `scratch` must
    /// have been sized for `plan` ([`Scratch::ensure`]).
    pub fn new(graph: &Graph, plan: &MemoryPlan, scratch: &'a mut Scratch<B>) -> Result<Self> {
        if scratch.slots.len() < plan.slot_bytes.len()
            || scratch
                .slots
                .iter()
                .zip(&plan.slot_bytes)
                .any(|(b, &need)| b.bytes() < need)
        {
            return Err(Error::invalid(
                "bindings",
                "scratch is smaller than the plan; call Scratch::ensure first",
            ));
        }
        if plan.slot_of.len() != graph.buffers().len() {
            return Err(Error::invalid(
                "bindings",
                "the plan was made for another graph",
            ));
        }
        Ok(Self {
            phys: scratch.slots.iter_mut().map(Some).collect(),
            phys_of: plan.slot_of.clone(),
            names: graph.buffers().iter().map(|b| b.name.clone()).collect(),
        })
    }

    /// Binds persistent buffer `id` of `graph` to `buf`, which must hold at least the
    /// buffer's declared bytes.
    pub fn bind(&mut self, graph: &Graph, id: BufferId, buf: &'a mut B) -> Result<()> {
        let desc = graph.desc(id)?;
        if desc.kind != BufferKind::Persistent {
            return Err(Error::invalid(
                "bind",
                format!(
                    "buffer {:?} is transient; only persistent buffers are bound",
                    desc.name
                ),
            ));
        }
        if buf.bytes() < desc.bytes() {
            return Err(Error::invalid(
                "bind",
                format!(
                    "buffer {:?} needs {} bytes ({} {:?}), the bound buffer has {}",
                    desc.name,
                    desc.bytes(),
                    desc.dtype,
                    desc.shape,
                    buf.bytes()
                ),
            ));
        }
        if self.phys_of[id.index()].is_some() {
            return Err(Error::invalid(
                "bind",
                format!("buffer {:?} is bound twice", desc.name),
            ));
        }
        self.phys_of[id.index()] = Some(self.phys.len());
        self.phys.push(Some(buf));
        Ok(())
    }

    /// Errors naming the first buffer used by `graph`'s ops that has no memory.
    pub fn check_complete(&self, graph: &Graph) -> Result<()> {
        for op in graph.ops() {
            for id in op.inputs().into_iter().chain(op.outputs()) {
                if self.phys_of.get(id.index()).copied().flatten().is_none() {
                    return Err(Error::invalid(
                        op.name(),
                        format!("buffer {:?} is not bound to memory", self.names[id.index()]),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Runs `f` with shared references to the `inputs`' memory and exclusive ones to
    /// the `outputs`' memory. Outputs must be distinct from each other and from the
    /// inputs, as [`Graph::validate`] ensures for every op.
    pub fn with_operands<R>(
        &mut self,
        inputs: &[BufferId],
        outputs: &[BufferId],
        f: impl FnOnce(&[&B], &mut [&mut B]) -> R,
    ) -> Result<R> {
        let mut taken: Vec<(usize, &'a mut B)> = Vec::with_capacity(outputs.len());
        let result = self.take_outputs(outputs, &mut taken).and_then(|()| {
            let ins = inputs
                .iter()
                .map(|&id| {
                    let p = self.slot(id)?;
                    self.phys[p].as_deref().ok_or_else(|| {
                        Error::invalid(
                            "bindings",
                            format!(
                                "buffer {:?} is both read and written by one op",
                                self.names[id.index()]
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<&B>>>()?;
            let mut outs: Vec<&mut B> = taken.iter_mut().map(|(_, b)| &mut **b).collect();
            Ok(f(&ins, &mut outs))
        });
        for (p, b) in taken {
            self.phys[p] = Some(b);
        }
        result
    }

    /// Whether `a` and `b` are bound to the same memory (false when either is unbound).
    pub fn shares_memory(&self, a: BufferId, b: BufferId) -> bool {
        match (self.slot(a), self.slot(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
    }

    /// Shared access to `id`'s memory (for reading results inside a backend).
    pub fn get(&self, id: BufferId) -> Result<&B> {
        let p = self.slot(id)?;
        self.phys[p]
            .as_deref()
            .ok_or_else(|| Error::invalid("bindings", "buffer is in use"))
    }

    fn slot(&self, id: BufferId) -> Result<usize> {
        self.phys_of
            .get(id.index())
            .copied()
            .flatten()
            .ok_or_else(|| {
                let name = self.names.get(id.index()).map_or("?", |s| s.as_str());
                Error::invalid(
                    "bindings",
                    format!("buffer {name:?} (id {}) is not bound to memory", id.0),
                )
            })
    }

    fn take_outputs(
        &mut self,
        outputs: &[BufferId],
        taken: &mut Vec<(usize, &'a mut B)>,
    ) -> Result<()> {
        for &id in outputs {
            let p = self.slot(id)?;
            let b = self.phys[p].take().ok_or_else(|| {
                Error::invalid(
                    "bindings",
                    format!(
                        "buffer {:?} shares memory with another operand of the op",
                        self.names[id.index()]
                    ),
                )
            })?;
            taken.push((p, b));
        }
        Ok(())
    }
}
