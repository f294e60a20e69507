//! The CUDA device: driver checks, the context and the one stream kiln submits to.

use std::sync::{Arc, OnceLock};

use cudarc::driver::result::DriverError;
use cudarc::driver::{sys, CudaContext, CudaStream};
use kiln_core::{Error, Result};

/// The oldest driver API version kiln-cuda's bindings are built for (CUDA 13.0).
pub const MIN_DRIVER_VERSION: i32 = 13000;

/// An [`Error::Backend`] from the CUDA backend.
pub(crate) fn cuda_error(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cuda",
        msg: msg.into(),
    }
}

/// A driver call's failure, naming what was attempted.
pub(crate) fn driver_error(what: &str, e: DriverError) -> Error {
    cuda_error(format!("{what}: {e:?}"))
}

/// Whether libcuda can be loaded; checked once. cudarc panics on its first driver
/// call when the library is missing, so every entry point checks this first.
fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: loading the library runs its initialisers, as cudarc's own first call
    // does; the handle is dropped again at once.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// The driver's CUDA version as `major * 1000 + minor * 10` (13000 for 13.0), after
/// checking that a driver is present and new enough.
///
/// Errors with "no CUDA driver found" when libcuda cannot be loaded, never panics.
pub fn driver_version() -> Result<i32> {
    if !driver_present() {
        return Err(cuda_error(
            "no CUDA driver found (libcuda.so could not be loaded)",
        ));
    }
    let mut version = 0;
    // SAFETY: the library is present (checked above); cuDriverGetVersion needs no
    // cuInit and writes one int.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| driver_error("cuDriverGetVersion", e))?;
    if version < MIN_DRIVER_VERSION {
        return Err(cuda_error(format!(
            "the CUDA driver supports CUDA {}, older than the {} kiln-cuda is built for; update the NVIDIA driver",
            format_version(version),
            format_version(MIN_DRIVER_VERSION)
        )));
    }
    Ok(version)
}

/// `13000` as `13.0`.
pub fn format_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Number of CUDA devices; errors when there is no usable driver.
pub fn device_count() -> Result<usize> {
    driver_version()?;
    cudarc::driver::result::init().map_err(|e| driver_error("cuInit", e))?;
    let n = CudaContext::device_count().map_err(|e| driver_error("cuDeviceGetCount", e))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// One CUDA device, its primary context and the stream all of kiln's work on it
/// goes to.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    driver_version: i32,
}

impl CudaDevice {
    /// Opens device `ordinal`. Errors (never panics) when there is no driver, the
    /// driver is too old, or there is no such device.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        let driver_version = driver_version()?;
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::invalid(
                "cuda device",
                format!("cuda:{ordinal} does not exist; this machine has {count} CUDA device(s)"),
            ));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| driver_error(&format!("creating a context on cuda:{ordinal}"), e))?;
        // SAFETY: every buffer and launch of this device goes to the one stream
        // created below, which orders them; no cross-stream events are needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_error(&format!("creating a stream on cuda:{ordinal}"), e))?;
        let name = ctx.name().map_err(|e| driver_error("cuDeviceGetName", e))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| driver_error("reading the compute capability", e))?;
        Ok(Arc::new(Self {
            ctx,
            stream,
            ordinal,
            name,
            compute_capability,
            driver_version,
        }))
    }

    /// The device's context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream all work on this device is submitted to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device ordinal (`N` in `cuda:N`).
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Whether the device has programmatic dependent launch (compute capability 9.0
    /// and later; see [`crate::launch`]).
    pub fn has_programmatic_launch(&self) -> bool {
        self.compute_capability.0 >= 9
    }

    /// The driver's CUDA version (`13000` for 13.0).
    pub fn driver_version(&self) -> i32 {
        self.driver_version
    }

    /// `(free, total)` device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| driver_error("cuMemGetInfo", e))
    }

    /// Number of streaming multiprocessors.
    pub fn multiprocessors(&self) -> Result<i32> {
        self.ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_error("reading the multiprocessor count", e))
    }

    /// Waits for all work submitted to the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error(&format!("synchronizing cuda:{}", self.ordinal), e))
    }
}
