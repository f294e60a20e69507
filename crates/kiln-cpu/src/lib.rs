//! kiln-cpu: the reference backend.
//!
//! Every op of the IR ([`kiln_core::ops`]) is implemented here plainly, in f32 with
//! f32 accumulation, parallel with rayon where natural. These implementations *are*
//! the definition that every other backend is tested against: each family's module
//! exposes its reference as plain functions over slices, and [`CpuBackend`] runs
//! whole graphs with them.

mod buffer;
pub mod ops;

pub use buffer::CpuBuffer;

use kiln_core::backend::check_transfer;
use kiln_core::{
    Backend, Bindings, BufferId, DType, Error, Graph, LaunchProfile, Op, Result, SharedBytes,
};

/// The CPU backend. Stateless: work runs on rayon's global thread pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

/// A graph compiled for the CPU: its validated ops, each with the addresses and sizes
/// of the memory bound to its operands when it was compiled.
pub struct CpuExecutable {
    graph: Graph,
    ops: Vec<CompiledOp>,
}

/// One op of a [`CpuExecutable`] and the memory of its inputs and outputs, in the
/// order of [`Op::inputs`] and [`Op::outputs`].
struct CompiledOp {
    index: usize,
    inputs: Vec<(BufferId, *const u8, usize)>,
    outputs: Vec<(BufferId, *mut u8, usize)>,
}

// SAFETY: the pointers address heap memory of buffers that the executable's owner
// keeps alive ([`Backend::run`]'s contract); nothing ties them to a thread.
unsafe impl Send for CpuExecutable {}

impl Backend for CpuBackend {
    type Buffer = CpuBuffer;
    type Executable = CpuExecutable;

    fn name(&self) -> String {
        "cpu".to_string()
    }

    fn alloc(&self, bytes: usize) -> Result<CpuBuffer> {
        let mut probe: Vec<u64> = Vec::new();
        probe
            .try_reserve_exact(bytes.div_ceil(8))
            .map_err(|_| Error::OutOfMemory {
                what: "cpu buffer".to_string(),
                requested: bytes as u64,
                available: None,
            })?;
        drop(probe);
        Ok(CpuBuffer::zeroed(bytes))
    }

    /// Errors when `dst` is borrowed ([`CpuBuffer::from_shared`]), read-only.
    fn upload(&self, dst: &mut CpuBuffer, src: &[u8]) -> Result<()> {
        check_transfer("cpu", "upload", src.len(), dst.bytes().len())?;
        dst.bytes_mut()?[..src.len()].copy_from_slice(src);
        Ok(())
    }

    /// Borrows `src` ([`CpuBuffer::from_shared`]): the kernels read weights in the GGUF
    /// layout, in place. Copies it when it is not aligned to [`CpuBuffer::ALIGN`]
    /// (tensors of a GGUF file whose alignment is 8 or more, in a memory map or in a
    /// heap buffer, always are).
    fn share_weight(&self, src: &SharedBytes, dtype: DType, shape: &[usize]) -> Result<CpuBuffer> {
        match CpuBuffer::from_shared(src.clone()) {
            Some(buf) => Ok(buf),
            None => {
                let mut buf = self.alloc(src.as_ref().len())?;
                self.upload_weight(&mut buf, src.as_ref(), dtype, shape)?;
                Ok(buf)
            }
        }
    }

    /// No: stacking saves the CPU only a few products per layer, and unstacked
    /// weights stay in the file's map instead of being copied.
    fn stacks_weights(&self) -> bool {
        false
    }

    fn download(&self, src: &CpuBuffer, dst: &mut [u8]) -> Result<()> {
        check_transfer("cpu", "download", dst.len(), src.bytes().len())?;
        dst.copy_from_slice(&src.bytes()[..dst.len()]);
        Ok(())
    }

    fn compile(
        &self,
        graph: &Graph,
        bindings: &mut Bindings<'_, CpuBuffer>,
    ) -> Result<CpuExecutable> {
        graph.validate()?;
        bindings.check_complete(graph)?;
        let mut ops = Vec::with_capacity(graph.ops().len());
        for (index, op) in graph.ops().iter().enumerate() {
            let (in_ids, out_ids) = (op.inputs(), op.outputs());
            let (inputs, outputs) = bindings.with_operands(&in_ids, &out_ids, |ins, outs| {
                let inputs = in_ids
                    .iter()
                    .zip(ins)
                    .map(|(&id, b)| (id, b.bytes().as_ptr(), b.bytes().len()))
                    .collect();
                let outputs = out_ids
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|(&id, b)| {
                        let bytes = b.bytes_mut().map_err(|_| {
                            let name = &graph.buffers()[id.index()].name;
                            Error::invalid(
                                op.name(),
                                format!("output {name:?} is bound to a borrowed, read-only weight"),
                            )
                        })?;
                        Ok((id, bytes.as_mut_ptr(), bytes.len()))
                    })
                    .collect::<Result<_>>()?;
                Ok::<_, Error>((inputs, outputs))
            })??;
            ops.push(CompiledOp {
                index,
                inputs,
                outputs,
            });
        }
        Ok(CpuExecutable {
            graph: graph.clone(),
            ops,
        })
    }

    /// Runs every op in order on this thread (each parallel with rayon inside).
    unsafe fn run(&self, exe: &mut CpuExecutable) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { exe.run_each(|_, run| run()) }
    }

    /// Runs every op in order, timing each with the wall clock.
    unsafe fn profile(&self, exe: &mut CpuExecutable) -> Result<Vec<LaunchProfile>> {
        let mut times = Vec::with_capacity(exe.ops.len());
        // SAFETY: the caller's contract.
        unsafe {
            exe.run_each(|(op_index, op), run| {
                let start = std::time::Instant::now();
                run()?;
                times.push(LaunchProfile {
                    op_index,
                    op: op.name(),
                    key: op.name().to_string(),
                    seconds: start.elapsed().as_secs_f64(),
                });
                Ok(())
            })
        }?;
        Ok(times)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn copy(&self, src: &CpuBuffer, dst: &mut CpuBuffer) -> Result<()> {
        self.upload(dst, src.bytes())
    }
}

impl CpuExecutable {
    /// Calls `each((index, op), run)` for every op in order, where `run` executes the
    /// op on its bound memory.
    ///
    /// # Safety
    /// As [`Backend::run`].
    unsafe fn run_each(
        &self,
        mut each: impl FnMut((usize, &Op), &mut dyn FnMut() -> Result<()>) -> Result<()>,
    ) -> Result<()> {
        for compiled in &self.ops {
            let op: &Op = &self.graph.ops()[compiled.index];
            let in_ids: Vec<BufferId> = compiled.inputs.iter().map(|i| i.0).collect();
            let out_ids: Vec<BufferId> = compiled.outputs.iter().map(|o| o.0).collect();
            // SAFETY: the run's contract keeps every bound buffer allocated and unused
            // elsewhere; compile checked (with_operands) that an op's outputs share no
            // memory with each other or with its inputs.
            let in_bufs: Vec<&[u8]> = compiled
                .inputs
                .iter()
                .map(|&(_, p, len)| unsafe { std::slice::from_raw_parts(p, len) })
                .collect();
            let mut out_bufs: Vec<&mut [u8]> = compiled
                .outputs
                .iter()
                .map(|&(_, p, len)| unsafe { std::slice::from_raw_parts_mut(p, len) })
                .collect();
            let ins = Inputs {
                graph: &self.graph,
                ids: &in_ids,
                bufs: &in_bufs,
            };
            let mut outs = Outputs {
                ids: &out_ids,
                bufs: &mut out_bufs,
            };
            each((compiled.index, op), &mut || {
                ops::execute(op, &ins, &mut outs)
            })?;
        }
        Ok(())
    }
}

/// The memory an op reads, looked up by buffer id: each buffer's bytes, 8-byte aligned.
pub(crate) struct Inputs<'r, 'b> {
    graph: &'r Graph,
    ids: &'r [BufferId],
    bufs: &'r [&'b [u8]],
}

impl Inputs<'_, '_> {
    /// The bytes bound to `id`, which is one of the op's inputs by construction.
    pub(crate) fn bytes(&self, id: BufferId) -> &[u8] {
        // Ops look up only their own operands, which `run` passed in `ids`.
        let i = self
            .ids
            .iter()
            .position(|&i| i == id)
            .expect("op reads one of its declared inputs");
        self.bufs[i]
    }

    /// The first `n` elements of input `id` as `T`.
    pub(crate) fn view<T: bytemuck::Pod>(&self, id: BufferId, n: usize) -> &[T] {
        bytemuck::cast_slice(&self.bytes(id)[..n * std::mem::size_of::<T>()])
    }

    /// The declared dtype of any buffer of the graph, input or output.
    pub(crate) fn dtype(&self, id: BufferId) -> kiln_core::DType {
        self.graph.buffers()[id.index()].dtype
    }
}

/// The memory an op writes, looked up by buffer id: each buffer's bytes, 8-byte
/// aligned.
pub(crate) struct Outputs<'r, 'b> {
    ids: &'r [BufferId],
    bufs: &'r mut [&'b mut [u8]],
}

impl Outputs<'_, '_> {
    /// The bytes bound to output `id`.
    pub(crate) fn bytes_mut(&mut self, id: BufferId) -> &mut [u8] {
        // Ops look up only their own operands, which `run` passed in `ids`.
        let i = self
            .ids
            .iter()
            .position(|&i| i == id)
            .expect("op writes one of its declared outputs");
        self.bufs[i]
    }

    /// The first `n` elements of output `id` as `T`.
    pub(crate) fn view<T: bytemuck::Pod>(&mut self, id: BufferId, n: usize) -> &[T] {
        bytemuck::cast_slice(&self.bytes_mut(id)[..n * std::mem::size_of::<T>()])
    }

    /// The first `n` elements of output `id` as `T`, writable.
    pub(crate) fn view_mut<T: bytemuck::Pod>(&mut self, id: BufferId, n: usize) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.bytes_mut(id)[..n * std::mem::size_of::<T>()])
    }

    /// The first `n` elements of the first two outputs, in declared order, writable
    /// (ops with at least two outputs).
    pub(crate) fn pair<T: bytemuck::Pod>(&mut self, n: usize) -> (&mut [T], &mut [T]) {
        let bytes = n * std::mem::size_of::<T>();
        match &mut self.bufs[..] {
            [a, b, ..] => (
                bytemuck::cast_slice_mut(&mut a[..bytes]),
                bytemuck::cast_slice_mut(&mut b[..bytes]),
            ),
            // Only ops declaring at least two outputs call this.
            _ => unreachable!("pair() is called by ops with two or more outputs"),
        }
    }

    /// The first `na` elements of the first output and the first `nb` of the second,
    /// in declared order, writable (ops with at least two outputs).
    pub(crate) fn pair_sized<T: bytemuck::Pod>(
        &mut self,
        na: usize,
        nb: usize,
    ) -> (&mut [T], &mut [T]) {
        let size = std::mem::size_of::<T>();
        match &mut self.bufs[..] {
            [a, b, ..] => (
                bytemuck::cast_slice_mut(&mut a[..na * size]),
                bytemuck::cast_slice_mut(&mut b[..nb * size]),
            ),
            // Only ops declaring at least two outputs call this.
            _ => unreachable!("pair_sized() is called by ops with two or more outputs"),
        }
    }

    /// All bytes of the first three outputs, in declared order (ops with at least
    /// three outputs).
    pub(crate) fn three(&mut self) -> (&mut [u8], &mut [u8], &mut [u8]) {
        match &mut self.bufs[..] {
            [a, b, c, ..] => (a, b, c),
            // Only ops declaring at least three outputs call this.
            _ => unreachable!("three() is called by ops with three or more outputs"),
        }
    }
}
