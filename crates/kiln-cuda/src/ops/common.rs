//! Helpers shared by the dispatch modules of the kernel catalogue: the kernel tags of
//! weight and cache dtypes, grid limits, dynamic shared memory, and the launch itself.

use std::sync::{Mutex, MutexGuard, PoisonError};

use cudarc::driver::{sys, LaunchConfig};
use kiln_core::ops::WEIGHT_DTYPES;
use kiln_core::{DType, DeviceBuffer, Error, Result};

use super::check_dtype;
use crate::context::driver_error;
use crate::nvrtc::CudaKernel;
use crate::{CudaBackend, CudaBuffer};

/// The decoder of a weight dtype in kernels/quant.cuh.
pub(crate) fn weight_tag(op: &str, dtype: DType) -> Result<&'static str> {
    check_dtype(op, "weight", dtype, &WEIGHT_DTYPES)?;
    Ok(match dtype {
        DType::F32 => "kiln::WF32",
        DType::F16 => "kiln::WF16",
        DType::BF16 => "kiln::WBF16",
        DType::Q4_0 => "kiln::Q4_0",
        DType::Q4_1 => "kiln::Q4_1",
        DType::Q5_0 => "kiln::Q5_0",
        DType::Q5_1 => "kiln::Q5_1",
        DType::Q8_0 => "kiln::Q8_0",
        DType::Q2K => "kiln::Q2_K",
        DType::Q3K => "kiln::Q3_K",
        DType::Q4K => "kiln::Q4_K",
        DType::Q5K => "kiln::Q5_K",
        DType::Q6K => "kiln::Q6_K",
        DType::Q1_0 => "kiln::Q1_0",
        DType::Q2_0 => "kiln::Q2_0",
        DType::TQ1_0 => "kiln::TQ1_0",
        DType::TQ2_0 => "kiln::TQ2_0",
        DType::MXFP4 => "kiln::MXFP4",
        _ => "kiln::IQ4_NL",
    })
}

pub use kiln_core::ops::CACHE_DTYPES;

/// The element tag (kernels/common.cuh) of a KV cache dtype.
pub(crate) fn cache_tag(op: &str, dtype: DType) -> Result<&'static str> {
    check_dtype(op, "cache", dtype, &CACHE_DTYPES)?;
    Ok(match dtype {
        DType::F16 => "kiln::F16",
        _ => "kiln::F32",
    })
}

/// Most blocks in the y and z dimensions of a grid.
pub(crate) const MAX_GRID_YZ: usize = 65_535;

/// Most blocks in the x dimension of a grid.
pub(crate) const MAX_GRID_X: usize = i32::MAX as usize;

/// `blocks` as a grid dimension of at most `max` blocks, or an error naming `op`
/// and what the blocks are for.
pub(crate) fn grid_dim(op: &str, what: &str, blocks: usize, max: usize) -> Result<u32> {
    if blocks > max {
        return Err(Error::invalid(
            op,
            format!("{what} needs {blocks} blocks, more than a grid dimension's {max}"),
        ));
    }
    // At most MAX_GRID_X, which fits u32.
    Ok(blocks as u32)
}

/// A launch configuration of `grid` blocks of `threads` threads with `shared` bytes of
/// dynamic shared memory.
pub(crate) fn config(grid: (u32, u32, u32), threads: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// Dynamic shared memory a launch may use without opting in: the 48 KiB default less
/// 1 KiB for the kernels' own static shared arrays.
const DEFAULT_DYNAMIC_SHARED: u32 = 47 * 1024;

/// Opts `kernel` in to `config`'s dynamic shared memory when it is above the default
/// and above what the kernel is already opted in to (one driver call, made only
/// then). The opt-in only grows: a launch with less shared memory is allowed by a
/// larger opt-in, and lowering it could fail a launch of another thread.
pub(crate) fn allow_dynamic_shared(kernel: &CudaKernel, config: &LaunchConfig) -> Result<()> {
    if config.shared_mem_bytes <= DEFAULT_DYNAMIC_SHARED {
        return Ok(());
    }
    let mut allowed = kernel
        .dynamic_shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if config.shared_mem_bytes <= *allowed {
        return Ok(());
    }
    kernel
        .function
        .set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            // At most the device's per-block limit (228 KiB), which fits i32.
            config.shared_mem_bytes as i32,
        )
        .map_err(|e| driver_error(&format!("{}: raising its shared memory", kernel.key), e))?;
    *allowed = config.shared_mem_bytes;
    Ok(())
}

pub(crate) use crate::launch::launch;

/// Errors when `backend`'s stream is being captured into a CUDA graph, in which the
/// allocation of `bytes` of scratch memory that `what` of `op` needs cannot happen.
pub(crate) fn check_not_capturing(
    backend: &crate::CudaBackend,
    op: &str,
    what: &str,
    bytes: usize,
) -> Result<()> {
    let status = backend
        .stream()
        .capture_status()
        .map_err(|e| driver_error("asking whether the stream is being captured", e))?;
    if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        return Err(Error::invalid(
            op,
            format!(
                "{what} needs {bytes} bytes of scratch memory, which cannot be allocated \
                 while the stream is captured into a CUDA graph; run the product once before \
                 capturing"
            ),
        ));
    }
    Ok(())
}

/// Device scratch memory a kernel keeps partial results in between the launches of
/// one op (the decode attention's counters and partials, the split mat-mat's partial
/// sums). A launch record holds the address of the buffer it was given, so no buffer
/// is ever freed or replaced while the backend lives: when a launch needs more than
/// the newest buffer holds, a larger one is added (at least twice the size, so there
/// are few) and handed out from then on. Launches on the backend's one stream take
/// their turns, so they share the newest buffer.
#[derive(Default)]
pub struct Workspace {
    buffers: Mutex<Vec<CudaBuffer>>,
}

impl Workspace {
    /// The workspace buffers, locked while the caller holds the guard; the last one
    /// holds at least `bytes` bytes. A new buffer is zeroed.
    pub(crate) fn at_least(
        &self,
        backend: &CudaBackend,
        bytes: usize,
    ) -> Result<MutexGuard<'_, Vec<CudaBuffer>>> {
        // Every state of the list is valid, so a poisoned lock is recovered.
        let mut held = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        let newest = held.last().map_or(0, |b| b.bytes());
        if newest < bytes {
            held.push(kiln_core::Backend::alloc(backend, bytes.max(2 * newest))?);
        }
        Ok(held)
    }
}
