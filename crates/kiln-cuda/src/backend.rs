//! The CUDA backend: device buffers, transfers, and graph execution on one stream.

use std::sync::Arc;

use cudarc::driver::result::DriverError;
use cudarc::driver::{sys, CudaSlice, CudaStream};
use kiln_core::backend::check_transfer;
use kiln_core::{Backend, Bindings, DeviceBuffer, Error, Graph, Op, Result};

use crate::context::{driver_error, CudaDevice};
use crate::nvrtc::{CudaKernel, NvrtcCompiler};
use crate::registry::{CacheConfig, KernelRegistry, KernelSpec};
use crate::{manifest, ops};

/// A device allocation of a fixed number of bytes.
#[derive(Debug)]
pub struct CudaBuffer {
    slice: CudaSlice<u8>,
    bytes: usize,
}

impl CudaBuffer {
    /// The allocation, for kernel arguments.
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.slice
    }

    /// The allocation, for kernel arguments the kernel writes.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.slice
    }
}

impl DeviceBuffer for CudaBuffer {
    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Executes graphs on one CUDA device, with kernels from an NVRTC registry.
pub struct CudaBackend {
    device: Arc<CudaDevice>,
    registry: KernelRegistry<NvrtcCompiler>,
}

impl CudaBackend {
    /// A backend on device `ordinal` with the disk cache the environment configures
    /// ([`CacheConfig::from_env`]).
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_cache(ordinal, CacheConfig::from_env()?)
    }

    /// A backend on device `ordinal` caching kernels as `cache` says.
    pub fn with_cache(ordinal: usize, cache: CacheConfig) -> Result<Self> {
        let device = CudaDevice::open(ordinal)?;
        Self::on_device(device, cache)
    }

    /// A backend on an open device (several backends may share one device).
    pub fn on_device(device: Arc<CudaDevice>, cache: CacheConfig) -> Result<Self> {
        let compiler =
            NvrtcCompiler::new(Arc::clone(device.context()), device.compute_capability())?;
        Ok(Self {
            device,
            registry: KernelRegistry::new(compiler, cache),
        })
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.device.stream()
    }

    /// The kernel registry.
    pub fn registry(&self) -> &KernelRegistry<NvrtcCompiler> {
        &self.registry
    }

    /// The loaded kernel for `spec`, compiled or read from the disk cache on first use.
    pub fn kernel(&self, spec: &KernelSpec) -> Result<Arc<CudaKernel>> {
        self.registry.get(spec)
    }

    /// Makes every kernel `graph` needs ready, compiling in parallel. Errors with
    /// [`Error::Unsupported`] when an op has no CUDA implementation yet.
    pub fn prepare(&self, graph: &Graph) -> Result<()> {
        let specs = manifest::specs_for_graph(graph)?;
        self.registry.precompile(&specs, |_| {})
    }

    fn alloc_error(&self, bytes: usize, e: DriverError) -> Error {
        if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            Error::OutOfMemory {
                what: format!("{} buffer", self.name()),
                requested: bytes as u64,
                available: self.device.memory_info().ok().map(|(free, _)| free as u64),
            }
        } else {
            driver_error(&format!("allocating {bytes} bytes on {}", self.name()), e)
        }
    }

    fn run_op(
        &self,
        graph: &Graph,
        op: &Op,
        bindings: &mut Bindings<'_, CudaBuffer>,
    ) -> Result<()> {
        let dtype = |id: kiln_core::BufferId| graph.desc(id).map(|d| d.dtype);
        match op {
            Op::Cast(c) => {
                let (from, to) = (dtype(c.x)?, dtype(c.out)?);
                bindings.with_operands(&[c.x], &[c.out], |ins, outs| {
                    ops::cast::cast(self, ins[0], from, outs[0], to, c.len)
                })?
            }
            Op::Elementwise(e) => bindings.with_operands(&[e.a, e.b], &[e.out], |ins, outs| {
                ops::elementwise::elementwise(self, e.kind, ins[0], ins[1], outs[0], e.len)
            })?,
            Op::RmsNorm(n) => {
                let inputs: Vec<_> = std::iter::once(n.x).chain(n.weight).collect();
                bindings.with_operands(&inputs, &[n.out], |ins, outs| {
                    ops::norm::rms_norm(
                        self,
                        ins[0],
                        ins.get(1).copied(),
                        outs[0],
                        n.rows,
                        n.dim,
                        n.eps,
                    )
                })?
            }
            Op::AddRmsNorm(n) => {
                let inputs: Vec<_> = [n.x, n.residual].into_iter().chain(n.weight).collect();
                bindings.with_operands(&inputs, &[n.sum, n.out], |ins, outs| {
                    let [sum, out] = outs else {
                        unreachable!("with_operands passes the two outputs it was given")
                    };
                    ops::norm::add_rms_norm(
                        self,
                        ins[0],
                        ins[1],
                        ins.get(2).copied(),
                        sum,
                        out,
                        n.rows,
                        n.dim,
                        n.eps,
                    )
                })?
            }
            other => Err(Error::Unsupported(format!(
                "cuda backend: op {} is not implemented yet",
                other.name()
            ))),
        }
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;

    fn name(&self) -> String {
        format!("cuda:{}", self.device.ordinal())
    }

    fn supports(&self, op: &Op) -> bool {
        manifest::has_kernel(op)
    }

    /// Allocates `bytes` bytes of device memory, zeroed.
    fn alloc(&self, bytes: usize) -> Result<CudaBuffer> {
        // cuMemAlloc rejects zero bytes; an empty buffer still owns one byte.
        let slice = self
            .stream()
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| self.alloc_error(bytes, e))?;
        Ok(CudaBuffer { slice, bytes })
    }

    fn upload(&self, dst: &mut CudaBuffer, src: &[u8]) -> Result<()> {
        check_transfer(&self.name(), "upload", src.len(), dst.bytes)?;
        if src.is_empty() {
            return Ok(());
        }
        let mut view = dst.slice.slice_mut(0..src.len());
        self.stream().memcpy_htod(src, &mut view).map_err(|e| {
            driver_error(
                &format!("uploading {} bytes to {}", src.len(), self.name()),
                e,
            )
        })
    }

    fn download(&self, src: &CudaBuffer, dst: &mut [u8]) -> Result<()> {
        check_transfer(&self.name(), "download", dst.len(), src.bytes)?;
        if dst.is_empty() {
            return Ok(());
        }
        let view = src.slice.slice(0..dst.len());
        self.stream().memcpy_dtoh(&view, dst).map_err(|e| {
            driver_error(
                &format!("downloading {} bytes from {}", dst.len(), self.name()),
                e,
            )
        })?;
        self.device.synchronize()
    }

    /// Checks the graph and its bindings, makes every kernel it needs ready (in
    /// parallel), then launches its ops in order on the device's stream and waits for
    /// them.
    fn execute(&self, graph: &Graph, bindings: &mut Bindings<'_, CudaBuffer>) -> Result<()> {
        graph.validate()?;
        bindings.check_complete(graph)?;
        self.prepare(graph)?;
        for op in graph.ops() {
            self.run_op(graph, op, bindings)?;
        }
        self.device.synchronize()
    }
}
