//! Kernel launches: [`KernelArgs`] gathers a launch's arguments, [`launch`] turns them
//! into a [`LaunchRecord`] and submits it with `cuLaunchKernelEx` on the backend's
//! stream, or, while a [`Recorder`] is active on the thread, keeps the record instead
//! (how [`crate::CudaBackend`] compiles a graph into launch records that it replays).
//! [`call_library`] does the same for work a library enqueues ([`LibraryCall`]).
//!
//! Programmatic dependent launch (compute capability 9.0 and later) lets a kernel's
//! blocks start while the kernel before it in the stream is still finishing. Every
//! kiln kernel launched that way is written for it (kernels/common.cuh): it waits for
//! the grids before it (`chain_after_prior_grids`) before it reads anything they may
//! write or writes anything they may read, and only the resident mat-vec (loads of
//! weights, which only host copies write) and the recurrent delta rule (loads of its
//! state, which only it writes, and never in the launch just before) do work before
//! that wait. The kernels
//! always launched [`KernelArgs::serialized`] do not wait.

use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{
    sys, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig,
};
use kiln_core::{Error, Result};

use crate::context::driver_error;
use crate::nvrtc::CudaKernel;
use crate::CudaBackend;

/// A value a kernel takes as a parameter.
pub(crate) trait KernelArg {
    /// Adds the parameter to `args`.
    fn push_to(self, args: &mut KernelArgs<'_>);
}

/// The parameters of one launch, in order, each held by value in 8 bytes (scalars in
/// the low bytes, little-endian; buffers as their device address).
pub(crate) struct KernelArgs<'a> {
    backend: &'a CudaBackend,
    values: Vec<u64>,
    serialized: bool,
}

impl<'a> KernelArgs<'a> {
    /// An empty parameter list for a launch on `backend`'s stream.
    pub(crate) fn new(backend: &'a CudaBackend) -> Self {
        Self {
            backend,
            values: Vec::with_capacity(16),
            serialized: false,
        }
    }

    /// Launches after the previous kernel ends even where programmatic launch is on:
    /// for grids of many blocks per multiprocessor, whose blocks an early start would
    /// crowd onto the multiprocessors the previous kernel frees first. A kernel always
    /// launched this way does not call `chain_after_prior_grids` (kernels/common.cuh).
    pub(crate) fn serialized(&mut self) -> &mut Self {
        self.serialized = true;
        self
    }

    /// Appends a parameter.
    pub(crate) fn arg(&mut self, value: impl KernelArg) -> &mut Self {
        value.push_to(self);
        self
    }

    fn push(&mut self, value: u64) {
        self.values.push(value);
    }
}

macro_rules! scalar_kernel_args {
    ($($t:ty => $to_u64:expr),* $(,)?) => {$(
        impl KernelArg for &$t {
            fn push_to(self, args: &mut KernelArgs<'_>) {
                let to_u64: fn($t) -> u64 = $to_u64;
                args.push(to_u64(*self));
            }
        }
    )*};
}
scalar_kernel_args!(
    u32 => u64::from,
    i32 => |v| u64::from(v as u32),
    u64 => |v| v,
    f32 => |v| u64::from(v.to_bits()),
);

/// An optional buffer: its address, or a null pointer for `None` (the operands a
/// kernel is told are absent).
impl<A: KernelArg> KernelArg for Option<A> {
    fn push_to(self, args: &mut KernelArgs<'_>) {
        match self {
            Some(value) => value.push_to(args),
            None => args.push(0),
        }
    }
}

impl<T> KernelArg for &CudaView<'_, T> {
    fn push_to(self, args: &mut KernelArgs<'_>) {
        // As for a whole slice: the guard does nothing when dropped.
        let (address, _guard) = self.device_ptr(args.backend.stream());
        args.push(address);
    }
}

impl<T> KernelArg for &CudaSlice<T> {
    fn push_to(self, args: &mut KernelArgs<'_>) {
        // Event tracking is off on kiln's contexts (one stream orders all work), so
        // the guard does nothing when dropped.
        let (address, _guard) = self.device_ptr(args.backend.stream());
        args.push(address);
    }
}

impl<T> KernelArg for &mut CudaSlice<T> {
    fn push_to(self, args: &mut KernelArgs<'_>) {
        let (address, _guard) = self.device_ptr_mut(args.backend.stream());
        args.push(address);
    }
}

impl<T> KernelArg for &mut CudaViewMut<'_, T> {
    fn push_to(self, args: &mut KernelArgs<'_>) {
        let (address, _guard) = self.device_ptr_mut(args.backend.stream());
        args.push(address);
    }
}

/// Work a library enqueues on a stream in place of a kiln kernel (a cuBLASLt
/// product), recorded and replayed as launches are. It is never launched
/// programmatically: stream order puts it after the work before it, and the kernels
/// after it wait for it to complete (kernels/common.cuh).
pub(crate) trait LibraryCall: Send + Sync {
    /// What the call computes, as a kernel's specialisation key names a launch.
    fn key(&self) -> &str;

    /// Enqueues the call on `stream`.
    ///
    /// # Safety
    /// Every buffer whose address the call holds must still be allocated.
    unsafe fn submit(&self, stream: sys::CUstream) -> Result<()>;
}

/// One launch with everything it needs: a kernel launch (the loaded kernel, its
/// configuration and its parameter values, device addresses included) or a library
/// call. Submitting it again launches the same work on the same memory.
pub struct LaunchRecord(Work);

enum Work {
    Kernel(KernelLaunch),
    Library(Box<dyn LibraryCall>),
}

/// A kernel launch.
struct KernelLaunch {
    kernel: Arc<CudaKernel>,
    config: LaunchConfig,
    values: Box<[u64]>,
    serialized: bool,
}

impl LaunchRecord {
    /// The kernel's specialisation key, e.g. `matvec_resident|w=q4_0|...`, or the
    /// library call's.
    pub fn key(&self) -> &str {
        match &self.0 {
            Work::Kernel(k) => &k.kernel.key,
            Work::Library(call) => call.key(),
        }
    }

    /// The kernel launch's grid, block and dynamic shared memory; `None` for a
    /// library call.
    pub fn config(&self) -> Option<LaunchConfig> {
        match &self.0 {
            Work::Kernel(k) => Some(k.config),
            Work::Library(_) => None,
        }
    }

    /// Whether the launch waits for the work before it to end even where programmatic
    /// launch is on (a serialized kernel, or a library call).
    pub fn serialized(&self) -> bool {
        match &self.0 {
            Work::Kernel(k) => k.serialized,
            Work::Library(_) => true,
        }
    }

    /// Submits the launch on `stream`, letting a kernel start early (programmatic
    /// dependent launch) when `programmatic` is set and the record is not serialized;
    /// with the `nvtx` feature, inside an NVTX range named by the key.
    ///
    /// # Safety
    /// Every buffer whose address the record holds must still be allocated.
    pub(crate) unsafe fn submit(&self, stream: sys::CUstream, programmatic: bool) -> Result<()> {
        #[cfg(feature = "nvtx")]
        nvtx::range_push!("{}", self.key());
        // SAFETY: the caller's contract.
        let submitted = unsafe {
            match &self.0 {
                Work::Kernel(k) => k.submit(stream, programmatic),
                Work::Library(call) => call.submit(stream),
            }
        };
        #[cfg(feature = "nvtx")]
        nvtx::range_pop!();
        submitted
    }
}

impl KernelLaunch {
    /// [`LaunchRecord::submit`] for a kernel, without the NVTX range.
    ///
    /// # Safety
    /// As [`LaunchRecord::submit`].
    unsafe fn submit(&self, stream: sys::CUstream, programmatic: bool) -> Result<()> {
        let mut attributes = [programmatic_serialization()];
        let mut params: Vec<*mut c_void> = self
            .values
            .iter()
            .map(|v| v as *const u64 as *mut c_void)
            .collect();
        let config = &self.config;
        let launch_config = sys::CUlaunchConfig {
            gridDimX: config.grid_dim.0,
            gridDimY: config.grid_dim.1,
            gridDimZ: config.grid_dim.2,
            blockDimX: config.block_dim.0,
            blockDimY: config.block_dim.1,
            blockDimZ: config.block_dim.2,
            sharedMemBytes: config.shared_mem_bytes,
            hStream: stream,
            attrs: attributes.as_mut_ptr(),
            numAttrs: u32::from(programmatic && !self.serialized),
        };
        // SAFETY: the parameters were gathered for this kernel by its dispatch, which
        // checked them (the caller's contract keeps their buffers allocated); each
        // pointer addresses one 8-byte value, of which the driver reads the
        // parameter's size; `launch_config` and its attribute outlive the call.
        unsafe {
            sys::cuLaunchKernelEx(
                &launch_config,
                self.kernel.function.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(|e| driver_error(&format!("launching {}", self.kernel.key), e))
    }
}

thread_local! {
    /// The launches of the [`Recorder`] active on this thread, if any.
    static RECORDING: RefCell<Option<Vec<LaunchRecord>>> = const { RefCell::new(None) };
}

/// While it lives, [`launch`] on this thread keeps its records instead of submitting
/// them. Dropping it without [`Recorder::finish`] discards them.
pub(crate) struct Recorder(());

impl Recorder {
    /// Starts recording on this thread; errors when a recorder is already active.
    pub(crate) fn start() -> Result<Self> {
        RECORDING.with(|r| {
            let mut r = r.borrow_mut();
            if r.is_some() {
                return Err(Error::invalid(
                    "cuda compile",
                    "a graph is already being compiled on this thread",
                ));
            }
            *r = Some(Vec::new());
            Ok(Recorder(()))
        })
    }

    /// Launches recorded so far.
    pub(crate) fn len(&self) -> usize {
        RECORDING.with(|r| r.borrow().as_ref().map_or(0, Vec::len))
    }

    /// Makes the kernel launch recorded at `index` (if any) wait for the kernel before
    /// it to end, as [`KernelArgs::serialized`] does.
    pub(crate) fn serialize(&self, index: usize) {
        RECORDING.with(|r| {
            if let Some(Work::Kernel(k)) = r
                .borrow_mut()
                .as_mut()
                .and_then(|l| l.get_mut(index))
                .map(|l| &mut l.0)
            {
                k.serialized = true;
            }
        });
    }

    /// Stops recording and returns the records, in launch order.
    pub(crate) fn finish(self) -> Vec<LaunchRecord> {
        RECORDING.with(|r| r.borrow_mut().take().unwrap_or_default())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        RECORDING.with(|r| r.borrow_mut().take());
    }
}

/// Launches `kernel` with `args` under `config` on the backend's stream, with
/// programmatic dependent launch when [`CudaBackend::programmatic_launch`] is on and
/// `args` is not [`KernelArgs::serialized`]; while a [`Recorder`] is active on this
/// thread, records the launch instead.
///
/// # Safety
/// `args` must match the kernel's parameters in number, order and type, and every
/// buffer the kernel touches under `config` must be large enough.
pub(crate) unsafe fn launch(
    kernel: &Arc<CudaKernel>,
    args: &mut KernelArgs<'_>,
    config: LaunchConfig,
) -> Result<()> {
    let record = LaunchRecord(Work::Kernel(KernelLaunch {
        kernel: Arc::clone(kernel),
        config,
        values: std::mem::take(&mut args.values).into_boxed_slice(),
        serialized: args.serialized,
    }));
    // SAFETY: the caller's contract.
    unsafe { record_or_submit(args.backend, record) }
}

/// Enqueues `call` on the backend's stream; while a [`Recorder`] is active on this
/// thread, records it instead.
///
/// # Safety
/// Every buffer the call touches must be large enough for it.
pub(crate) unsafe fn call_library(backend: &CudaBackend, call: Box<dyn LibraryCall>) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { record_or_submit(backend, LaunchRecord(Work::Library(call))) }
}

/// Keeps `record` in the active [`Recorder`] of this thread, or submits it on the
/// backend's stream when there is none.
///
/// # Safety
/// Every buffer the record addresses must be allocated and large enough for it.
unsafe fn record_or_submit(backend: &CudaBackend, record: LaunchRecord) -> Result<()> {
    let record = match RECORDING.with(|r| match r.borrow_mut().as_mut() {
        Some(records) => {
            records.push(record);
            None
        }
        None => Some(record),
    }) {
        Some(record) => record,
        None => return Ok(()),
    };
    backend
        .device()
        .context()
        .bind_to_thread()
        .map_err(|e| driver_error(&format!("launching {}", record.key()), e))?;
    // SAFETY: the caller's contract; the buffers are borrowed for this call.
    unsafe { record.submit(backend.stream().cu_stream(), backend.programmatic_launch()) }
}

/// The launch attribute that lets a kernel start before the one before it ends.
fn programmatic_serialization() -> sys::CUlaunchAttribute {
    // SAFETY: the attribute is plain data; all-zero bytes are a valid value of it.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    attribute
}
