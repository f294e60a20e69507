//! The CUDA backend: device buffers, transfers, and graph execution on one stream.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::driver::result::DriverError;
use cudarc::driver::{result, sys, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use kiln_core::backend::check_transfer;
use kiln_core::{Backend, Bindings, DType, DeviceBuffer, Error, Graph, LaunchProfile, Op, Result};

use crate::context::{driver_error, CudaDevice};
use crate::executable::{Capture, CudaExecutable, OpLaunches};
use crate::fusion::{self, Fusion, Fusions};
use crate::launch::Recorder;
use crate::nvrtc::{CudaKernel, NvrtcCompiler};
use crate::registry::{CacheConfig, KernelRegistry, KernelSpec};
use crate::{manifest, ops, packing};

/// A device allocation of a fixed number of bytes.
#[derive(Debug)]
pub struct CudaBuffer {
    slice: CudaSlice<u8>,
    bytes: usize,
    /// The dtype and row length of the packed weight the buffer holds
    /// ([`crate::packing`]), set by [`Backend::upload_weight`] for packed dtypes.
    packed: Option<(DType, usize)>,
}

impl CudaBuffer {
    /// The dtype and row length of the packed weight this buffer holds, if any.
    pub fn packed(&self) -> Option<(DType, usize)> {
        self.packed
    }

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
    multiprocessors: u32,
    registry: KernelRegistry<NvrtcCompiler>,
    attention_workspace: ops::common::Workspace,
    matmul_workspace: ops::common::Workspace,
    epilogue_tickets: ops::common::Workspace,
    resident_warps: ops::matmul::ResidentWarps,
    gemm: ops::matmul::Gemm,
    gemm_min_rows: AtomicUsize,
    moe_routing: ops::moe::Routing,
    programmatic_launch: AtomicBool,
    fusions: AtomicU8,
    cuda_graphs: AtomicBool,
    capture: Capture,
    compiles: AtomicU64,
    staging: std::sync::Mutex<cudarc::driver::PinnedHostSlice<u8>>,
}

/// Bytes of page-locked host memory that small downloads (a decode step's sampled
/// token) go through: a copy from device memory into it is one DMA, not a copy
/// staged by the driver.
const STAGING_BYTES: usize = 4096;

/// The environment variable that, set to `0`, turns programmatic dependent launch off
/// ([`CudaBackend::programmatic_launch`]).
pub const PROGRAMMATIC_LAUNCH_ENV: &str = "KILN_PROGRAMMATIC_LAUNCH";

/// The environment variable that, set to `0`, turns CUDA-graph replay of executables
/// off ([`CudaBackend::cuda_graphs`]).
pub const CUDA_GRAPHS_ENV: &str = "KILN_CUDA_GRAPHS";

/// The environment variable that sets the fewest activation rows of a mat-mat on
/// cuBLASLt ([`CudaBackend::gemm_min_rows`]): a number, or `off` for never.
pub const GEMM_MIN_ROWS_ENV: &str = "KILN_GEMM_MIN_ROWS";

/// The fewest activation rows of a mat-mat on cuBLASLt that `value` of
/// [`GEMM_MIN_ROWS_ENV`] asks for: `None` (unset) gives
/// [`ops::matmul::GEMM_MIN_ROWS`], `off` gives `usize::MAX` (never).
pub fn parse_gemm_min_rows(value: Option<&str>) -> Result<usize> {
    match value.map(str::trim) {
        None => Ok(ops::matmul::GEMM_MIN_ROWS),
        Some("off") => Ok(usize::MAX),
        Some(v) => v.parse().map_err(|_| {
            Error::invalid(
                GEMM_MIN_ROWS_ENV,
                format!("expected a number of rows or `off`, got {v:?}"),
            )
        }),
    }
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
        // A count the driver reports, positive and far below u32::MAX.
        let multiprocessors = device.multiprocessors()?.max(1) as u32;
        let programmatic_launch = device.has_programmatic_launch()
            && std::env::var(PROGRAMMATIC_LAUNCH_ENV).map_or(true, |v| v != "0");
        let cuda_graphs = std::env::var(CUDA_GRAPHS_ENV).map_or(true, |v| v != "0");
        let fusions = Fusions::from_env();
        let gemm_min_rows = parse_gemm_min_rows(std::env::var(GEMM_MIN_ROWS_ENV).ok().as_deref())?;
        let capture = Capture::new(device.context())?;
        // SAFETY: the memory is only read after a copy into it has completed.
        let staging = unsafe {
            device
                .context()
                .alloc_pinned_with_flags::<u8>(STAGING_BYTES, 0)
        }
        .map_err(|e| driver_error("allocating page-locked staging memory", e))?;
        Ok(Self {
            device,
            multiprocessors,
            registry: KernelRegistry::new(compiler, cache),
            attention_workspace: ops::common::Workspace::default(),
            matmul_workspace: ops::common::Workspace::default(),
            epilogue_tickets: ops::common::Workspace::default(),
            resident_warps: ops::matmul::ResidentWarps::default(),
            gemm: ops::matmul::Gemm::default(),
            gemm_min_rows: AtomicUsize::new(gemm_min_rows),
            moe_routing: ops::moe::Routing::default(),
            programmatic_launch: AtomicBool::new(programmatic_launch),
            fusions: AtomicU8::new(fusions.bits()),
            cuda_graphs: AtomicBool::new(cuda_graphs),
            capture,
            compiles: AtomicU64::new(0),
            staging: std::sync::Mutex::new(staging),
        })
    }

    /// Whether [`Backend::run`] replays an executable as one captured CUDA graph
    /// (captured on its first run) rather than submitting its launches one by one. On
    /// unless `KILN_CUDA_GRAPHS=0`.
    pub fn cuda_graphs(&self) -> bool {
        self.cuda_graphs.load(Ordering::Relaxed)
    }

    /// Turns CUDA-graph replay on or off for the runs that follow.
    pub fn set_cuda_graphs(&self, on: bool) {
        self.cuda_graphs.store(on, Ordering::Relaxed);
    }

    /// Which fusions [`Backend::compile`] makes ([`crate::fusion`]): as the environment
    /// switches them when the backend was made, or as set since.
    pub fn fusions(&self) -> Fusions {
        Fusions::from_bits(self.fusions.load(Ordering::Relaxed))
    }

    /// Turns `kind` of fusion on or off for the graphs compiled after.
    pub fn set_fusion(&self, kind: Fusion, on: bool) {
        let bits = |f: Fusions| f.with(kind, on).bits();
        // The closure always returns Some: the update cannot fail.
        let _ = self
            .fusions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(bits(Fusions::from_bits(b)))
            });
    }

    /// How many graphs [`Backend::compile`] has compiled on this backend (each
    /// validates its graph, derives its kernels' specialisations and looks them up in
    /// the registry; a run does none of these).
    pub fn compiles(&self) -> u64 {
        self.compiles.load(Ordering::Relaxed)
    }

    /// Whether launches let each kernel start before the one before it in the stream
    /// ends (programmatic dependent launch, [`crate::launch`]). On by default where
    /// the device has it (compute capability 9.0 and later), unless
    /// `KILN_PROGRAMMATIC_LAUNCH=0`.
    pub fn programmatic_launch(&self) -> bool {
        self.programmatic_launch.load(Ordering::Relaxed)
    }

    /// Turns programmatic dependent launch on or off for the launches that follow;
    /// returns whether it is now on (never where the device lacks it).
    pub fn set_programmatic_launch(&self, on: bool) -> bool {
        let on = on && self.device.has_programmatic_launch();
        self.programmatic_launch.store(on, Ordering::Relaxed);
        on
    }

    /// The fewest activation rows of a mat-mat that runs on cuBLASLt (bf16 copies of
    /// the operands, [`ops::matmul::Gemm`]) rather than on kiln's mat-mat kernel:
    /// [`ops::matmul::GEMM_MIN_ROWS`] unless [`GEMM_MIN_ROWS_ENV`] or
    /// [`CudaBackend::set_gemm_min_rows`] says otherwise; `usize::MAX` (never) where
    /// cuBLASLt cannot be loaded (asked on first call, with a warning).
    pub fn gemm_min_rows(&self) -> usize {
        let rows = self.gemm_min_rows.load(Ordering::Relaxed);
        if rows == usize::MAX || !self.gemm.available(self) {
            return usize::MAX;
        }
        rows
    }

    /// Sets the fewest activation rows of a mat-mat on cuBLASLt for the launches that
    /// follow (`usize::MAX`: never).
    pub fn set_gemm_min_rows(&self, rows: usize) {
        self.gemm_min_rows.store(rows, Ordering::Relaxed);
    }

    /// cuBLASLt: its handle, algorithms, workspace and scratch memory.
    pub(crate) fn gemm(&self) -> &ops::matmul::Gemm {
        &self.gemm
    }

    /// Scratch memory of the attention kernels' split decode.
    pub(crate) fn attention_workspace(&self) -> &ops::common::Workspace {
        &self.attention_workspace
    }

    /// The split mat-mat's partial sums ([`ops::matmul`]).
    pub(crate) fn matmul_workspace(&self) -> &ops::common::Workspace {
        &self.matmul_workspace
    }

    /// The tickets of the launches that finish a fused op in their last blocks or
    /// warps ([`ops::fused_matvec`], [`ops::moe_epilogue`], [`ops::router_matvec`]):
    /// zero between launches, which run one after another.
    pub(crate) fn epilogue_tickets(&self) -> &ops::common::Workspace {
        &self.epilogue_tickets
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// The grouped expert-routed mat-mat's scratch lists.
    pub(crate) fn moe_routing(&self) -> &ops::moe::Routing {
        &self.moe_routing
    }

    /// How many warps of each resident mat-vec launch shape fit the device at once.
    pub(crate) fn resident_warps(&self) -> &ops::matmul::ResidentWarps {
        &self.resident_warps
    }

    /// The device's streaming multiprocessors.
    pub fn multiprocessors(&self) -> u32 {
        self.multiprocessors
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
            Op::Elementwise(e) => {
                bindings.with_operands(&[e.a, e.b], &op.outputs(), |ins, outs| {
                    let (out, out_q8) = with_q8_copy(outs);
                    ops::elementwise::elementwise(self, e.kind, ins[0], ins[1], out, out_q8, e.len)
                })?
            }
            Op::RmsNorm(n) => {
                let inputs: Vec<_> = std::iter::once(n.x).chain(n.weight).collect();
                bindings.with_operands(&inputs, &op.outputs(), |ins, outs| {
                    let (out, out_q8) = with_q8_copy(outs);
                    ops::norm::rms_norm(
                        self,
                        ins[0],
                        ins.get(1).copied(),
                        ops::norm::NormOut { out, out_q8 },
                        n.rows,
                        n.dim,
                        n.eps,
                    )
                })?
            }
            Op::AddRmsNorm(n) => {
                let inputs: Vec<_> = [n.x, n.residual].into_iter().chain(n.weight).collect();
                bindings.with_operands(&inputs, &op.outputs(), |ins, outs| {
                    let [sum, rest @ ..] = outs else {
                        unreachable!("add_rms_norm has at least two outputs")
                    };
                    let (out, out_q8) = with_q8_copy(rest);
                    ops::norm::add_rms_norm(
                        self,
                        ins[0],
                        ins[1],
                        ins.get(2).copied(),
                        sum,
                        ops::norm::NormOut { out, out_q8 },
                        n.rows,
                        n.dim,
                        n.eps,
                    )
                })?
            }
            Op::Embedding(e) => {
                let table = dtype(e.table)?;
                bindings.with_operands(&[e.table, e.ids], &op.outputs(), |ins, outs| {
                    let (out, out_q8) = with_q8_copy(outs);
                    ops::embedding::embedding(
                        self, ins[0], table, ins[1], out, out_q8, e.n_tokens, e.vocab, e.dim,
                    )
                })?
            }
            Op::Rope(r) => {
                let inputs: Vec<_> = [r.x, r.positions]
                    .into_iter()
                    .chain(r.freq_factors)
                    .collect();
                bindings.with_operands(&inputs, &[r.out], |ins, outs| {
                    let ff = ins.get(2).copied();
                    ops::rope::rope(
                        self, ins[0], ins[1], ff, outs[0], r.n_tokens, r.n_heads, &r.params,
                    )
                })?
            }
            Op::HeadNormRope(r) => {
                let inputs: Vec<_> = [r.x, r.positions]
                    .into_iter()
                    .chain(r.weight)
                    .chain(r.freq_factors)
                    .collect();
                let ff_at = 2 + usize::from(r.weight.is_some());
                bindings.with_operands(&inputs, &[r.out], |ins, outs| {
                    let weight = r.weight.map(|_| ins[2]);
                    let ff = r.freq_factors.map(|_| ins[ff_at]);
                    ops::rope::head_norm_rope(
                        self, ins[0], weight, ins[1], ff, outs[0], r.n_tokens, r.n_heads, r.eps,
                        &r.params,
                    )
                })?
            }
            Op::QkvRopeAppend(r) => {
                let cache = dtype(r.k_cache)?;
                let norm = r
                    .norm
                    .map_or([None, None], |n| [Some(n.q_weight), Some(n.k_weight)]);
                let inputs: Vec<_> = [r.qkv, r.positions]
                    .into_iter()
                    .chain(r.slots)
                    .chain(r.freq_factors)
                    .chain(norm.into_iter().flatten())
                    .collect();
                bindings.with_operands(&inputs, &op.outputs(), |ins, outs| {
                    let slots = r.slots.map(|_| ins[2]);
                    let at = 2 + usize::from(r.slots.is_some());
                    let ff = r.freq_factors.map(|_| ins[at]);
                    let at = at + usize::from(r.freq_factors.is_some());
                    let norm = r.norm.map(|n| ops::rope::QkNormWeights {
                        q_weight: ins[at],
                        k_weight: ins[at + 1],
                        eps: n.eps,
                    });
                    let [q_out, k, v] = outs else {
                        unreachable!("qkv_rope_append has three outputs")
                    };
                    let caches = ops::rope::KvCaches {
                        k,
                        v,
                        dtype: cache,
                        capacity: r.capacity,
                        slots: ops::CacheSlots {
                            ids: slots,
                            n_slots: r.n_slots,
                        },
                    };
                    ops::rope::qkv_rope_append(
                        self,
                        ins[0],
                        ins[1],
                        ff,
                        norm,
                        q_out,
                        caches,
                        r.n_tokens,
                        r.n_heads,
                        r.n_kv_heads,
                        &r.params,
                    )
                })?
            }
            Op::Glu(g) => bindings.with_operands(&[g.x], &op.outputs(), |ins, outs| {
                let (out, out_q8) = with_q8_copy(outs);
                ops::elementwise::glu(self, g.kind, ins[0], out, out_q8, g.rows, g.n)
            })?,
            Op::MatMul(m) => {
                let w = dtype(m.w)?;
                let inputs: Vec<_> = [m.x, m.w].into_iter().chain(m.x_q8).chain(m.bias).collect();
                bindings.with_operands(&inputs, &[m.out], |ins, outs| {
                    let x_q8 = m.x_q8.map(|_| ins[2]);
                    let bias = m.bias.map(|_| ins[2 + usize::from(m.x_q8.is_some())]);
                    let x = ops::matmul::Activations { x: ins[0], x_q8 };
                    ops::matmul::matmul(self, x, ins[1], w, bias, outs[0], m.m, m.n, m.k)
                })?
            }
            Op::Softmax(s) => bindings.with_operands(&[s.x], &[s.out], |ins, outs| {
                ops::softmax::softmax(
                    self,
                    ins[0],
                    outs[0],
                    s.rows,
                    s.cols,
                    s.scale,
                    s.causal_offset,
                )
            })?,
            Op::KvAppend(k) => {
                let cache = dtype(k.cache)?;
                bindings.with_operands(&op.inputs(), &[k.cache], |ins, outs| {
                    let slots = ops::CacheSlots {
                        ids: k.slots.map(|_| ins[2]),
                        n_slots: k.n_slots,
                    };
                    ops::kv_cache::kv_append(
                        self,
                        ins[0],
                        ins[1],
                        slots,
                        outs[0],
                        cache,
                        k.n_tokens,
                        k.n_kv_heads,
                        k.head_dim,
                        k.capacity,
                    )
                })?
            }
            Op::Attention(a) => {
                let cache = dtype(a.k_cache)?;
                bindings.with_operands(&op.inputs(), &op.outputs(), |ins, outs| {
                    let (out, out_q8) = with_q8_copy(outs);
                    ops::attention::attention(
                        self,
                        ins[0],
                        ins[1],
                        ins[2],
                        ins[3],
                        a.slots.map(|_| ins[4]),
                        out,
                        out_q8,
                        cache,
                        &a.into(),
                    )
                })?
            }
            Op::Argmax(a) => bindings.with_operands(&[a.x], &[a.out], |ins, outs| {
                ops::argmax::argmax(self, ins[0], outs[0], a.rows, a.cols)
            })?,
            Op::Sample(s) => {
                bindings.with_operands(&[s.logits, s.uniform], &[s.out], |ins, outs| {
                    ops::sample::sample(self, ins[0], ins[1], outs[0], s.rows, s.vocab, &s.params)
                })?
            }
            Op::MoeRouter(r) => {
                bindings.with_operands(&[r.logits], &[r.ids, r.weights], |ins, outs| {
                    let [ids, weights] = outs else {
                        unreachable!("moe_router has two outputs")
                    };
                    ops::moe::moe_router(self, ins[0], ids, weights, r)
                })?
            }
            Op::MoeCombine(c) => bindings.with_operands(&op.inputs(), &[c.out], |ins, outs| {
                let mut rest = ins[2..].iter().copied();
                let mut next = |present: bool| if present { rest.next() } else { None };
                let combine = ops::moe::CombineInputs {
                    y: ins[0],
                    weights: ins[1],
                    residual: next(c.residual.is_some()),
                    shared: next(c.shared.is_some()),
                    shared_gate: next(c.shared_gate.is_some()),
                };
                ops::moe::moe_combine(self, combine, outs[0], c.m, c.k, c.n)
            })?,
            Op::MoeMatMul(m) => {
                let w = dtype(m.w)?;
                bindings.with_operands(&[m.x, m.ids, m.w], &[m.out], |ins, outs| {
                    ops::moe::moe_matmul(self, ins[0], ins[1], ins[2], w, outs[0], m)
                })?
            }
            Op::CausalConv1d(c) => {
                bindings.with_operands(&[c.x, c.weight], &op.outputs(), |ins, outs| {
                    let [out, state] = outs else {
                        unreachable!("causal_conv1d has two outputs")
                    };
                    ops::delta_net::causal_conv1d(
                        self, ins[0], ins[1], state, out, c.n_tokens, c.channels, c.kernel,
                    )
                })?
            }
            Op::GatedDeltaNet(d) => {
                bindings.with_operands(&op.inputs(), &op.outputs(), |ins, outs| {
                    let [out, state] = outs else {
                        unreachable!("gated_delta_net has two outputs")
                    };
                    let operands = ops::delta_net::DeltaNetOperands {
                        qkv: ins[0],
                        a: ins[1],
                        b: ins[2],
                        ssm_a: ins[3],
                        dt_bias: ins[4],
                    };
                    ops::delta_net::gated_delta_net(
                        self, operands, state, out, d.n_tokens, d.heads, d.eps,
                    )
                })?
            }
            Op::GatedRmsNorm(n) => {
                bindings.with_operands(&op.inputs(), &[n.out], |ins, outs| {
                    ops::delta_net::gated_rms_norm(
                        self, ins[0], ins[1], ins[2], outs[0], n.rows, n.dim, n.eps,
                    )
                })?
            }
            Op::L2Norm(n) => bindings.with_operands(&[n.x], &[n.out], |ins, outs| {
                ops::delta_net::l2_norm(self, ins[0], outs[0], n.rows, n.dim, n.eps)
            })?,
        }
    }

    /// Runs the ops at `index` of `graph` as one launch where a fusion that is switched
    /// on finds a run there ([`crate::fusion::find`]) whose operands are bound apart;
    /// returns how many ops it ran, or None.
    fn run_fused(
        &self,
        graph: &Graph,
        index: usize,
        bindings: &mut Bindings<'_, CudaBuffer>,
    ) -> Result<Option<usize>> {
        match fusion::find(graph, index, self.fusions()).filter(|run| run.operands_apart(bindings))
        {
            Some(run) => {
                run.launch(self, graph, bindings)?;
                Ok(Some(run.ops()))
            }
            None => Ok(None),
        }
    }
}

/// Whether op `index` is a delta rule (whose recurrent kernel loads its state before
/// it waits for the kernel before it, kernels/delta_net.cu) right after an op that
/// writes memory its state shares: then its launch must wait for that op to end.
fn reads_state_early_after_its_writer(
    ops: &[Op],
    index: usize,
    bindings: &Bindings<'_, CudaBuffer>,
) -> bool {
    let (Some(Op::GatedDeltaNet(d)), Some(previous)) = (ops.get(index), index.checked_sub(1))
    else {
        return false;
    };
    ops[previous]
        .outputs()
        .iter()
        .any(|&o| bindings.shares_memory(o, d.state))
}

/// The outputs `outs` of an op writing `out` and optionally its Q8_1 copy `out_q8`
/// (in that order): `out` and the copy, when there is one.
fn with_q8_copy<'o>(
    outs: &'o mut [&mut CudaBuffer],
) -> (&'o mut CudaBuffer, Option<&'o mut CudaBuffer>) {
    match outs {
        [out] => (out, None),
        [out, out_q8, ..] => (out, Some(out_q8)),
        // Every op has at least one output.
        [] => unreachable!("an op without outputs"),
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;
    type Executable = CudaExecutable;

    fn name(&self) -> String {
        format!("cuda:{}", self.device.ordinal())
    }

    /// CUDA-graph replay, programmatic launch and which decode fusions are on (each the
    /// environment variable that switches it, `=1` on, `=0` off).
    fn settings(&self) -> String {
        let fusions = self.fusions();
        [
            (CUDA_GRAPHS_ENV, self.cuda_graphs()),
            (PROGRAMMATIC_LAUNCH_ENV, self.programmatic_launch()),
        ]
        .into_iter()
        .chain(Fusion::ALL.map(|kind| (kind.env(), fusions.contains(kind))))
        .map(|(name, on)| format!("{name}={}", u8::from(on)))
        .collect::<Vec<_>>()
        .join(" ")
    }

    fn supports(&self, op: &Op) -> bool {
        manifest::has_kernel(op)
    }

    /// Makes every kernel `graph` needs ready (compiled or read from the disk cache,
    /// and loaded), in parallel: its ops' and those of the fused runs compiling it
    /// launches.
    fn prepare(&self, graph: &Graph) -> Result<()> {
        let mut specs = manifest::specs_for_graph(graph)?;
        specs.extend(fusion::specs_for_graph(graph, self.fusions())?);
        self.registry.precompile(&specs, |_| {})
    }

    /// Allocates `bytes` bytes of device memory, zeroed.
    fn alloc(&self, bytes: usize) -> Result<CudaBuffer> {
        // cuMemAlloc rejects zero bytes; an empty buffer still owns one byte.
        let slice = self
            .stream()
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| self.alloc_error(bytes, e))?;
        Ok(CudaBuffer {
            slice,
            bytes,
            packed: None,
        })
    }

    fn upload(&self, dst: &mut CudaBuffer, src: &[u8]) -> Result<()> {
        check_transfer(&self.name(), "upload", src.len(), dst.bytes)?;
        dst.packed = None;
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

    /// Packs weights of the dtypes of [`packing::packed_planes`] into planes (the
    /// buffer remembers dtype and row length); uploads the others unchanged.
    fn upload_weight(
        &self,
        dst: &mut CudaBuffer,
        src: &[u8],
        dtype: DType,
        shape: &[usize],
    ) -> Result<()> {
        let row_len = shape.last().copied().unwrap_or(1);
        if !packing::is_packed(dtype) {
            return self.upload(dst, src);
        }
        let packed = packing::pack_rows(dtype, row_len, src)?;
        self.upload(dst, &packed)?;
        dst.packed = Some((dtype, row_len));
        Ok(())
    }

    /// The buffer's first `dst.len()` bytes; for a packed weight, the GGUF bytes of
    /// its first whole rows (`dst.len()` must then be whole rows).
    fn download(&self, src: &CudaBuffer, dst: &mut [u8]) -> Result<()> {
        check_transfer(&self.name(), "download", dst.len(), src.bytes)?;
        if dst.is_empty() {
            return Ok(());
        }
        let len = dst.len();
        let what = || format!("downloading {len} bytes from {}", self.name());
        if dst.len() <= STAGING_BYTES {
            // A poisoned lock still holds valid memory, fully rewritten below.
            let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
            let pinned = staging
                .as_mut_slice()
                .map_err(|e| driver_error(&what(), e))?;
            let (from, _guard) = src.slice.device_ptr(self.stream());
            // SAFETY: `from` holds at least dst.len() bytes (checked); the staging
            // memory is read only after the stream has finished the copy.
            unsafe {
                result::memcpy_dtoh_async(&mut pinned[..dst.len()], from, self.stream().cu_stream())
            }
            .map_err(|e| driver_error(&what(), e))?;
            self.device.synchronize()?;
            dst.copy_from_slice(&pinned[..dst.len()]);
        } else {
            let view = src.slice.slice(0..dst.len());
            self.stream()
                .memcpy_dtoh(&view, dst)
                .map_err(|e| driver_error(&what(), e))?;
            self.device.synchronize()?;
        }
        if let Some((dtype, row_len)) = src.packed {
            let gguf = packing::unpack_rows(dtype, row_len, dst)?;
            dst.copy_from_slice(&gguf);
        }
        Ok(())
    }

    /// Checks the graph and its bindings, makes every kernel it needs ready (in
    /// parallel), then runs each op's dispatch (every argument checked) with its
    /// launches recorded instead of submitted.
    fn compile(
        &self,
        graph: &Graph,
        bindings: &mut Bindings<'_, CudaBuffer>,
    ) -> Result<CudaExecutable> {
        graph.validate()?;
        bindings.check_complete(graph)?;
        self.prepare(graph)?;
        let recorder = Recorder::start()?;
        let graph_ops = graph.ops();
        let mut ops = Vec::with_capacity(graph_ops.len());
        let mut index = 0;
        while index < graph_ops.len() {
            let start = recorder.len();
            let ran = match self.run_fused(graph, index, bindings)? {
                Some(fused) => {
                    // The run's one launch is its last op's; the others have none.
                    let leading = &graph_ops[index..index + fused - 1];
                    for (i, op) in (index..).zip(leading) {
                        ops.push(OpLaunches {
                            index: i,
                            name: op.name(),
                            launches: start..start,
                        });
                    }
                    fused
                }
                None => {
                    self.run_op(graph, &graph_ops[index], bindings)?;
                    if reads_state_early_after_its_writer(graph_ops, index, bindings) {
                        recorder.serialize(start);
                    }
                    1
                }
            };
            let last = index + ran - 1;
            ops.push(OpLaunches {
                index: last,
                name: graph_ops[last].name(),
                launches: start..recorder.len(),
            });
            index += ran;
        }
        self.compiles.fetch_add(1, Ordering::Relaxed);
        Ok(CudaExecutable::new(recorder.finish(), ops))
    }

    /// Enqueues the executable's launches on the device's stream: as one CUDA graph
    /// (captured on the first run) when [`CudaBackend::cuda_graphs`] is on, else one
    /// by one.
    unsafe fn run(&self, exe: &mut CudaExecutable) -> Result<()> {
        let ctx = self.device.context();
        ctx.bind_to_thread()
            .map_err(|e| driver_error("binding the context to run a graph", e))?;
        let stream = self.stream().cu_stream();
        let programmatic = self.programmatic_launch();
        // SAFETY: the caller's contract keeps the bound buffers allocated.
        unsafe {
            if self.cuda_graphs() {
                exe.replay(ctx, &self.capture, stream, programmatic)
            } else {
                exe.submit_each(stream, programmatic)
            }
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.device.synchronize()
    }

    /// The device time of each launch of `exe`, run once with an event between each
    /// two launches (without programmatic launch, so that each launch is timed alone)
    /// in a CUDA graph of its own, so that launch overhead does not show.
    unsafe fn profile(&self, exe: &mut CudaExecutable) -> Result<Vec<LaunchProfile>> {
        // SAFETY: the caller's contract.
        unsafe {
            exe.profile(
                self.device.context(),
                &self.capture,
                self.stream().cu_stream(),
            )
        }
    }

    /// Compiles `graph` and submits its launches one by one (a graph run once gains
    /// nothing from being captured), then waits for them.
    fn execute(&self, graph: &Graph, bindings: &mut Bindings<'_, CudaBuffer>) -> Result<()> {
        let exe = self.compile(graph, bindings)?;
        self.device
            .context()
            .bind_to_thread()
            .map_err(|e| driver_error("binding the context to run a graph", e))?;
        // SAFETY: `bindings` borrows every bound buffer for this call, and the run is
        // complete before it returns.
        let ran = unsafe { exe.submit_each(self.stream().cu_stream(), self.programmatic_launch()) };
        let waited = self.synchronize();
        ran.and(waited)
    }

    /// A driver device-to-device copy (`cuMemcpyDtoDAsync`) on the device's stream.
    fn copy(&self, src: &CudaBuffer, dst: &mut CudaBuffer) -> Result<()> {
        check_transfer(&self.name(), "copy", src.bytes, dst.bytes)?;
        if src.bytes == 0 {
            return Ok(());
        }
        let (from, _g) = src.slice.device_ptr(self.stream());
        let (to, _h) = dst.slice.device_ptr_mut(self.stream());
        // SAFETY: both allocations hold at least `src.bytes` bytes (checked), on this
        // device; the copy is ordered on the stream after earlier work.
        unsafe { result::memcpy_dtod_async(to, from, src.bytes, self.stream().cu_stream()) }
            .map_err(|e| {
                driver_error(
                    &format!("copying {} bytes on {}", src.bytes, self.name()),
                    e,
                )
            })?;
        dst.packed = src.packed;
        Ok(())
    }
}
