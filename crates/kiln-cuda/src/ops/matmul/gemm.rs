//! The cuBLASLt path of the mat-mat ([`super::MatMulKernel::Gemm`]): the weight is
//! decoded to bf16 into scratch memory (kernels/matmul.cu's `dequant_bf16`, a copy
//! for a BF16 weight), x is rounded to bf16 into scratch memory (the cast
//! kernel), and cuBLASLt computes `out[m, n] = x · wᵀ (+ bias)` in f32 with
//! `CUBLAS_COMPUTE_32F`, the bias added by its epilogue.
//!
//! In cuBLASLt's column-major terms the product is a "TN" GEMM: D (n x m, f32, ld n)
//! = op(A) · B with A the weight as k x n (bf16, ld k) transposed, B x as k x m (bf16,
//! ld k).
//!
//! The library is loaded at run time (cudarc's dynamic loading): where it is missing
//! or its handle cannot be created, [`Gemm::available`] says so once, with a warning,
//! and the mat-mat runs on kiln's own kernel.
//!
//! Memory: a cuBLASLt workspace of [`WORKSPACE_BYTES`] and the two bf16 scratch
//! buffers are owned by the backend and allocated on first need by the dispatch (for
//! a compiled graph, when it is compiled; never while an executable is captured or
//! replayed, which only submit recorded work). A larger need allocates a larger
//! buffer; the smaller ones stay allocated, since executables compiled earlier hold
//! their addresses. Allocating while the backend's stream is being captured into a
//! CUDA graph is an error.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys as lt_sys;
use cudarc::driver::{sys, DevicePtr};
use kiln_core::{DType, DeviceBuffer, Result};

use super::{spec, MatMulKernel};
use crate::context::{cuda_error, driver_error};
use crate::launch::{call_library, KernelArgs, LibraryCall};
use crate::ops::common::check_not_capturing;
use crate::ops::{cast, grid_1d};
use crate::{CudaBackend, CudaBuffer};

/// Bytes of the cuBLASLt workspace (NVIDIA's recommendation for Hopper).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// Largest pointer alignment cuBLASLt's heuristic distinguishes.
const MAX_ALIGNMENT: u64 = 256;

/// A backend's cuBLASLt state: the handle (or why there is none), the chosen
/// algorithm per product shape, the workspace and the bf16 scratch buffers.
#[derive(Default)]
pub struct Gemm {
    handle: OnceLock<Option<Arc<Handle>>>,
    algos: Mutex<HashMap<Shape, lt_sys::cublasLtMatmulAlgo_t>>,
    scratch: Mutex<Scratch>,
}

/// What the algorithm of a product depends on: its sizes, whether the epilogue adds a
/// bias, and the alignment of the addresses of A, B and D.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape {
    m: usize,
    n: usize,
    k: usize,
    bias: bool,
    align: [u32; 3],
}

/// Buffers of each kind, the newest (largest) last; earlier ones stay allocated.
#[derive(Default)]
struct Scratch {
    workspace: Vec<CudaBuffer>,
    weights: Vec<CudaBuffer>,
    activations: Vec<CudaBuffer>,
}

impl Gemm {
    /// Whether cuBLASLt can be used: the library loads and a handle was created (tried
    /// once; a failure is logged as a warning once).
    pub fn available(&self, backend: &CudaBackend) -> bool {
        self.handle(backend).is_some()
    }

    fn handle(&self, backend: &CudaBackend) -> Option<&Arc<Handle>> {
        self.handle
            .get_or_init(|| match Handle::create(backend) {
                Ok(h) => Some(Arc::new(h)),
                Err(e) => {
                    tracing::warn!("the prefill mat-mat runs on kiln's own kernel: {e}");
                    None
                }
            })
            .as_ref()
    }

    /// The algorithm cuBLASLt's heuristic picks for `shape` under `desc` and the
    /// layouts, asked once per shape.
    fn algo(
        &self,
        handle: &Handle,
        shape: Shape,
        desc: &Desc,
        layouts: &[Layout; 3],
    ) -> Result<lt_sys::cublasLtMatmulAlgo_t> {
        let mut known = self.algos.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(algo) = known.get(&shape) {
            return Ok(*algo);
        }
        let fail = |e: CublasError| {
            cuda_error(format!(
                "cuBLASLt finds no algorithm for the matmul m={} n={} k={}: {e}",
                shape.m, shape.n, shape.k
            ))
        };
        let pref = Pref(lt::create_matmul_pref().map_err(fail)?);
        use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
        let workspace = WORKSPACE_BYTES as u64;
        let [a, b, d] = shape.align;
        let attrs = [
            (P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, u64::from(a)),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, u64::from(b)),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, u64::from(d)),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, u64::from(d)),
        ];
        for (attr, value) in attrs {
            // The workspace size is a u64; the alignments are u32.
            let bytes = if attr == P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES {
                8
            } else {
                4
            };
            let small = value as u32;
            let ptr: *const c_void = if bytes == 8 {
                (&value as *const u64).cast()
            } else {
                (&small as *const u32).cast()
            };
            // SAFETY: the preference is live; `ptr` holds `bytes` bytes of the value.
            unsafe { lt::set_matmul_pref_attribute(pref.0, attr, ptr, bytes) }.map_err(fail)?;
        }
        let [a, b, d] = layouts;
        // SAFETY: every descriptor is live and describes the product's operands.
        let found =
            unsafe { lt::get_matmul_algo_heuristic(handle.0, desc.0, a.0, b.0, d.0, d.0, pref.0) }
                .map_err(fail)?;
        known.insert(shape, found.algo);
        Ok(found.algo)
    }

    /// The scratch buffers, locked for the caller: the newest workspace, the newest
    /// weight buffer of at least `weight_bytes` and the newest activation buffer of at
    /// least `x_bytes`, allocating what is missing.
    fn scratch(
        &self,
        backend: &CudaBackend,
        weight_bytes: usize,
        x_bytes: usize,
    ) -> Result<MutexGuard<'_, Scratch>> {
        let mut held = self.scratch.lock().unwrap_or_else(PoisonError::into_inner);
        let s = &mut *held;
        for (list, bytes) in [
            (&mut s.workspace, WORKSPACE_BYTES),
            (&mut s.weights, weight_bytes),
            (&mut s.activations, x_bytes),
        ] {
            if list.last().map_or(0, |b| b.bytes()) < bytes {
                check_not_capturing(backend, "matmul", "the cuBLASLt mat-mat", bytes)?;
                list.push(backend_alloc(backend, bytes)?);
            }
        }
        Ok(held)
    }
}

/// Allocates `bytes` of device memory on `backend`.
fn backend_alloc(backend: &CudaBackend, bytes: usize) -> Result<CudaBuffer> {
    kiln_core::Backend::alloc(backend, bytes)
}

/// The largest power of two dividing `address`, at most [`MAX_ALIGNMENT`].
fn alignment(address: u64) -> u32 {
    let a = if address == 0 {
        MAX_ALIGNMENT
    } else {
        (address & address.wrapping_neg()).min(MAX_ALIGNMENT)
    };
    a as u32
}

/// The device address of `buf`.
fn address(backend: &CudaBackend, buf: &CudaBuffer) -> u64 {
    // Event tracking is off on kiln's contexts, so the guard does nothing.
    let (address, _guard) = buf.slice().device_ptr(backend.stream());
    address
}

/// `out = x · wᵀ (+ bias)` on the cuBLASLt path, for arguments the plan checked
/// (`k` a multiple of 8).
#[allow(clippy::too_many_arguments)] // the op's operands and shape, each named
pub(super) fn gemm(
    backend: &CudaBackend,
    x: &CudaBuffer,
    w: &CudaBuffer,
    dtype: DType,
    bias: Option<&CudaBuffer>,
    out: &mut CudaBuffer,
    (m, n, k): (usize, usize, usize),
    row_bytes: u64,
) -> Result<()> {
    let gemm = backend.gemm();
    // Held until the product is enqueued, so that no other product's scratch writes
    // come between this one's writes and its reads.
    let mut scratch = gemm.scratch(backend, 2 * n * k, 2 * m * k)?;
    let s = &mut *scratch;
    let (workspace, w16, x16) = (
        s.workspace.last().expect("allocated by scratch"),
        s.weights.last_mut().expect("allocated by scratch"),
        s.activations.last_mut().expect("allocated by scratch"),
    );
    dequant_bf16(backend, w, dtype, w16, n, k, row_bytes)?;
    cast::cast(backend, x, DType::F32, x16, DType::BF16, m * k)?;
    let operands = [&*w16, &*x16, &*out].map(|b| address(backend, b));
    let bias = bias.map(|b| address(backend, b));
    // SAFETY: w16 and x16 hold 2 * n * k and 2 * m * k bytes (allocated by scratch),
    // out m x n f32 and bias n f32 (checked by the plan).
    unsafe { product(backend, operands, bias, workspace, (m, n, k)) }
}

/// `out[m, n] = x16 · w16ᵀ` in f32 for bf16 `x16` (`m x k`) and `w16` (`n x k`) by
/// cuBLASLt, as the cuBLASLt path computes its product: the bf16 matrix-product
/// ceiling `kiln bench-kernels` measures the mat-mat against.
pub fn bf16_product(
    backend: &CudaBackend,
    x16: &CudaBuffer,
    w16: &CudaBuffer,
    out: &mut CudaBuffer,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    let op = "bf16 product";
    crate::ops::check_nonzero(op, &[("m", m), ("n", n), ("k", k)])?;
    let elements = |a: usize, b: usize| crate::ops::count(op, &[a, b]);
    crate::ops::check_buffer(op, "x16", x16, DType::BF16, elements(m, k)?)?;
    crate::ops::check_buffer(op, "w16", w16, DType::BF16, elements(n, k)?)?;
    crate::ops::check_buffer(op, "out", out, DType::F32, elements(m, n)?)?;
    let scratch = backend.gemm().scratch(backend, 0, 0)?;
    let workspace = scratch.workspace.last().expect("allocated by scratch");
    let operands = [w16, x16, &*out].map(|b| address(backend, b));
    // SAFETY: the buffers hold the operands (checked above).
    unsafe { product(backend, operands, None, workspace, (m, n, k)) }
}

/// Enqueues (or records) D = op(A) · B (+ bias) for the device addresses `[A, B, D]`
/// of the bf16 weight (`n x k`), the bf16 activations (`m x k`) and the f32 output
/// (`m x n`), all row-major, and the optional f32 `bias` (`n`).
///
/// # Safety
/// Each address must hold its operand, and stay allocated while the product (or a
/// record of it) may run; `workspace` is the backend's.
unsafe fn product(
    backend: &CudaBackend,
    [a, b, d]: [u64; 3],
    bias: Option<u64>,
    workspace: &CudaBuffer,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    let gemm = backend.gemm();
    let handle =
        Arc::clone(gemm.handle(backend).ok_or_else(|| {
            cuda_error("a product was planned for cuBLASLt, which is not available")
        })?);
    let shape = Shape {
        m,
        n,
        k,
        bias: bias.is_some(),
        align: [a, b, d].map(alignment),
    };
    let desc = Desc::new(bias)?;
    let layouts = [
        Layout::new(lt_sys::cudaDataType::CUDA_R_16BF, k, n)?,
        Layout::new(lt_sys::cudaDataType::CUDA_R_16BF, k, m)?,
        Layout::new(lt_sys::cudaDataType::CUDA_R_32F, n, m)?,
    ];
    let algo = gemm.algo(&handle, shape, &desc, &layouts)?;
    let call = GemmCall {
        key: format!("cublaslt|m={m}|n={n}|k={k}|bias={}", u8::from(shape.bias)),
        handle,
        desc,
        layouts,
        algo,
        operands: [a, b, d],
        workspace: address(backend, workspace),
        scales: [1.0, 0.0],
    };
    // SAFETY: the caller's contract; the workspace holds WORKSPACE_BYTES.
    unsafe { call_library(backend, Box::new(call)) }
}

/// Decodes the `n x k` weight `w` of `dtype` (rows of `row_bytes`, `k` a multiple of
/// 8) into `out` as bf16, row-major.
fn dequant_bf16(
    backend: &CudaBackend,
    w: &CudaBuffer,
    dtype: DType,
    out: &mut CudaBuffer,
    n: usize,
    k: usize,
    row_bytes: u64,
) -> Result<()> {
    let spec = spec(dtype, MatMulKernel::Gemm)?;
    let kernel = backend.kernel(&spec)?;
    let (n32, k32) = (n as u32, k as u32);
    let mut args = KernelArgs::new(backend);
    args.arg(w.slice())
        .arg(out.slice_mut())
        .arg(&n32)
        .arg(&k32)
        .arg(&row_bytes)
        .serialized();
    // SAFETY: the arguments match `kiln::dequant_bf16<W>(const u8* w, u16* out, u32 n,
    // u32 k, u64 row_bytes)`; w holds n rows of row_bytes (checked by the plan), out
    // 2 * n * k bytes (allocated by scratch).
    unsafe { crate::launch::launch(&kernel, &mut args, grid_1d(n * k / 8)) }
}

/// A cuBLASLt handle, destroyed when dropped.
struct Handle(lt_sys::cublasLtHandle_t);

// SAFETY: a cuBLASLt handle may be used from any thread; kiln serialises the work on
// it through the backend's one stream.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Handle {
    /// Loads the library and creates a handle on the backend's context.
    fn create(backend: &CudaBackend) -> Result<Self> {
        // SAFETY: loading the library runs its initialisers, as cudarc's first call
        // would; cudarc panics on a call when the library is missing, so this is asked
        // first.
        if !unsafe { lt_sys::is_culib_present() } {
            return Err(cuda_error(
                "cuBLASLt was not found (libcublasLt.so.13 or a name cudarc tries)",
            ));
        }
        backend
            .device()
            .context()
            .bind_to_thread()
            .map_err(|e| driver_error("binding the context to create a cuBLASLt handle", e))?;
        lt::create_handle()
            .map(Self)
            .map_err(|e| cuda_error(format!("creating a cuBLASLt handle: {e}")))
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtCreate, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.0) };
    }
}

/// A matmul descriptor, destroyed when dropped.
struct Desc(lt_sys::cublasLtMatmulDesc_t);

// SAFETY: a descriptor is plain host memory, only read once built.
unsafe impl Send for Desc {}
unsafe impl Sync for Desc {}

impl Desc {
    /// f32 compute and scales, the weight (A) transposed, and with `bias` (a device
    /// address) the bias epilogue.
    fn new(bias: Option<u64>) -> Result<Self> {
        let fail = |e: CublasError| cuda_error(format!("building a cuBLASLt matmul: {e}"));
        let desc = Self(
            lt::create_matmul_desc(
                lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                lt_sys::cudaDataType::CUDA_R_32F,
            )
            .map_err(fail)?,
        );
        use lt_sys::cublasLtMatmulDescAttributes_t as A;
        let transpose: i32 = 1; // CUBLAS_OP_T
                                // SAFETY: the descriptor is live; each value is the attribute's type and size.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc.0,
                A::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transpose as *const i32).cast(),
                4,
            )
            .map_err(fail)?;
            if let Some(bias) = bias {
                let epilogue = lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
                lt::set_matmul_desc_attribute(
                    desc.0,
                    A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    (&epilogue as *const lt_sys::cublasLtEpilogue_t).cast(),
                    std::mem::size_of::<lt_sys::cublasLtEpilogue_t>(),
                )
                .map_err(fail)?;
                lt::set_matmul_desc_attribute(
                    desc.0,
                    A::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&bias as *const u64).cast(),
                    8,
                )
                .map_err(fail)?;
            }
        }
        Ok(desc)
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulDescCreate, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

/// A column-major matrix layout, destroyed when dropped.
struct Layout(lt_sys::cublasLtMatrixLayout_t);

// SAFETY: as for Desc.
unsafe impl Send for Layout {}
unsafe impl Sync for Layout {}

impl Layout {
    /// `rows x cols` elements of `dtype`, column-major, columns packed (ld = rows).
    fn new(dtype: lt_sys::cudaDataType, rows: usize, cols: usize) -> Result<Self> {
        lt::create_matrix_layout(dtype, rows as u64, cols as u64, rows as i64)
            .map(Self)
            .map_err(|e| cuda_error(format!("building a cuBLASLt matrix layout: {e}")))
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatrixLayoutCreate, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

/// A matmul preference, destroyed when dropped.
struct Pref(lt_sys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulPreferenceCreate, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// One recorded cuBLASLt product: D = alpha · op(A) · B + beta · D with the operands'
/// device addresses `[A, B, D]`, `scales` `[alpha, beta]` = `[1, 0]`.
struct GemmCall {
    key: String,
    handle: Arc<Handle>,
    desc: Desc,
    layouts: [Layout; 3],
    algo: lt_sys::cublasLtMatmulAlgo_t,
    operands: [u64; 3],
    workspace: u64,
    scales: [f32; 2],
}

impl LibraryCall for GemmCall {
    fn key(&self) -> &str {
        &self.key
    }

    unsafe fn submit(&self, stream: sys::CUstream) -> Result<()> {
        let [a, b, d] = self.operands;
        let [la, lb, ld] = &self.layouts;
        // SAFETY: the descriptors are live and describe the operands, whose buffers
        // the caller keeps allocated; the scales are host f32 (the default pointer
        // mode), read when the call is enqueued.
        unsafe {
            lt::matmul(
                self.handle.0,
                self.desc.0,
                (&self.scales[0] as *const f32).cast(),
                (&self.scales[1] as *const f32).cast(),
                a as *const c_void,
                la.0,
                b as *const c_void,
                lb.0,
                d as *const c_void,
                ld.0,
                d as *mut c_void,
                ld.0,
                &self.algo,
                self.workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream as lt_sys::cudaStream_t,
            )
        }
        .map_err(|e| cuda_error(format!("{}: {e}", self.key)))
    }
}
