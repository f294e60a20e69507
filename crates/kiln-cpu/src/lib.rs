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
use kiln_core::{Backend, Bindings, BufferId, Error, Graph, Result};

/// The CPU backend. Stateless: work runs on rayon's global thread pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Buffer = CpuBuffer;

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

    fn upload(&self, dst: &mut CpuBuffer, src: &[u8]) -> Result<()> {
        check_transfer("cpu", "upload", src.len(), dst.bytes().len())?;
        dst.bytes_mut()[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn download(&self, src: &CpuBuffer, dst: &mut [u8]) -> Result<()> {
        check_transfer("cpu", "download", dst.len(), src.bytes().len())?;
        dst.copy_from_slice(&src.bytes()[..dst.len()]);
        Ok(())
    }

    fn execute(&self, graph: &Graph, bindings: &mut Bindings<'_, CpuBuffer>) -> Result<()> {
        graph.validate()?;
        bindings.check_complete(graph)?;
        for op in graph.ops() {
            let in_ids = op.inputs();
            let out_ids = op.outputs();
            bindings.with_operands(&in_ids, &out_ids, |ins, outs| {
                let ins = Inputs {
                    graph,
                    ids: &in_ids,
                    bufs: ins,
                };
                let mut outs = Outputs {
                    ids: &out_ids,
                    bufs: outs,
                };
                ops::execute(op, &ins, &mut outs)
            })??;
        }
        Ok(())
    }
}

/// The memory an op reads, looked up by buffer id.
pub(crate) struct Inputs<'r, 'b> {
    graph: &'r Graph,
    ids: &'r [BufferId],
    bufs: &'r [&'b CpuBuffer],
}

impl Inputs<'_, '_> {
    /// The buffer bound to `id`, which is one of the op's inputs by construction.
    pub(crate) fn buf(&self, id: BufferId) -> &CpuBuffer {
        let i = self.position(id);
        self.bufs[i]
    }

    /// The first `n` elements of input `id` as `T`.
    pub(crate) fn view<T: bytemuck::Pod>(&self, id: BufferId, n: usize) -> &[T] {
        self.buf(id).view(n)
    }

    /// The declared dtype of any buffer of the graph, input or output.
    pub(crate) fn dtype(&self, id: BufferId) -> kiln_core::DType {
        self.graph.buffers()[id.index()].dtype
    }

    fn position(&self, id: BufferId) -> usize {
        // Ops look up only their own operands, which `execute` passed in `ids`.
        self.ids
            .iter()
            .position(|&i| i == id)
            .expect("op reads one of its declared inputs")
    }
}

/// The memory an op writes, looked up by buffer id.
pub(crate) struct Outputs<'r, 'b> {
    ids: &'r [BufferId],
    bufs: &'r mut [&'b mut CpuBuffer],
}

impl Outputs<'_, '_> {
    /// The buffer bound to output `id`.
    pub(crate) fn buf(&mut self, id: BufferId) -> &mut CpuBuffer {
        // Ops look up only their own operands, which `execute` passed in `ids`.
        let i = self
            .ids
            .iter()
            .position(|&i| i == id)
            .expect("op writes one of its declared outputs");
        self.bufs[i]
    }

    /// The first two buffers of an op with two or more outputs, in its declared
    /// output order.
    pub(crate) fn pair(&mut self) -> (&mut CpuBuffer, &mut CpuBuffer) {
        match &mut self.bufs[..] {
            [a, b, ..] => (a, b),
            // Only ops declaring at least two outputs call this.
            _ => unreachable!("pair() is called by ops with two or more outputs"),
        }
    }
}
