//! Dispatch functions, one module per op family: each checks every argument against
//! its contract, then launches its kernel on the backend's stream with shapes by
//! value.

pub mod argmax;
pub mod attention;
pub mod cast;
pub(crate) mod common;
pub mod delta_net;
pub mod elementwise;
pub mod embedding;
pub mod fused_matvec;
pub mod kv_cache;
pub mod matmul;
pub mod moe;
pub mod moe_epilogue;
pub mod norm;
pub mod rope;
pub mod router_matvec;
pub mod sample;
pub mod sibling_matvec;
pub mod softmax;

use cudarc::driver::LaunchConfig;
use kiln_core::ops::Q8_COPY;
use kiln_core::{DType, DeviceBuffer, Error, Result};

use crate::CudaBuffer;

/// Threads per block of the one-dimensional element-wise kernels (whole warps, which
/// their Q8_1 copies need).
const THREADS_1D: u32 = 256;

/// Most blocks a one-dimensional launch uses; kernels loop over the rest (grid-stride).
const MAX_BLOCKS_1D: u64 = 1 << 20;

/// A grid covering `len` elements with [`THREADS_1D`] threads per block.
pub(crate) fn grid_1d(len: usize) -> LaunchConfig {
    let blocks = (len as u64)
        .div_ceil(u64::from(THREADS_1D))
        .clamp(1, MAX_BLOCKS_1D);
    LaunchConfig {
        // At most MAX_BLOCKS_1D, which fits u32.
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS_1D, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Errors unless every named dimension is non-zero.
pub(crate) fn check_nonzero(op: &str, dims: &[(&str, usize)]) -> Result<()> {
    match dims.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => Err(Error::invalid(op, format!("{name} must be > 0, got 0"))),
        None => Ok(()),
    }
}

/// Errors unless `dtype` is one of `allowed`.
pub(crate) fn check_dtype(op: &str, role: &str, dtype: DType, allowed: &[DType]) -> Result<()> {
    if allowed.contains(&dtype) {
        return Ok(());
    }
    let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
    Err(Error::invalid(
        op,
        format!(
            "{role} has dtype {dtype}, expected one of [{}]",
            names.join(", ")
        ),
    ))
}

/// Errors unless `buf` holds at least `elements` elements of `dtype`.
pub(crate) fn check_buffer(
    op: &str,
    role: &str,
    buf: &CudaBuffer,
    dtype: DType,
    elements: usize,
) -> Result<()> {
    check_bytes(op, role, buf.bytes(), dtype, elements)
}

/// Checks the optional Q8_1 copy `role` ([`kiln_core::ops::Q8_COPY`]) of `elements`
/// activations in rows of `row`, a buffer of `bytes`: rows must be whole Q8_1 blocks.
pub(crate) fn check_q8_copy(
    op: &str,
    role: &str,
    bytes: Option<usize>,
    elements: usize,
    row: usize,
) -> Result<()> {
    let Some(bytes) = bytes else {
        return Ok(());
    };
    let block = Q8_COPY.block_size();
    if row % block != 0 {
        return Err(Error::invalid(
            op,
            format!("{role}: rows of {row} elements cannot be rounded to q8_1, which needs a multiple of {block}"),
        ));
    }
    check_bytes(op, role, bytes, Q8_COPY, elements)
}

/// Errors unless a buffer of `bytes` bytes holds at least `elements` elements of
/// `dtype`.
pub(crate) fn check_bytes(
    op: &str,
    role: &str,
    bytes: usize,
    dtype: DType,
    elements: usize,
) -> Result<()> {
    let need = dtype
        .bytes_for(elements)
        .map_err(|e| Error::invalid(op, format!("{role}: {e}")))?;
    if bytes < need {
        return Err(Error::invalid(
            op,
            format!(
                "{role} needs {elements} {dtype} elements ({need} bytes), its buffer has {bytes} bytes"
            ),
        ));
    }
    Ok(())
}

/// Checks that a weight of a packed dtype ([`crate::packing::packed_planes`]) was
/// uploaded in the planes layout for rows of `row_len` elements of `dtype`: `packed`
/// is what its buffer holds ([`crate::CudaBuffer::packed`]).
pub(crate) fn check_packed(
    op: &str,
    role: &str,
    dtype: DType,
    row_len: usize,
    packed: Option<(DType, usize)>,
) -> Result<()> {
    if !crate::packing::is_packed(dtype) || packed == Some((dtype, row_len)) {
        return Ok(());
    }
    let holds = match packed {
        Some((d, len)) => format!("planes of {d} rows of {len}"),
        None => "bytes from a plain upload".to_string(),
    };
    Err(Error::invalid(
        op,
        format!(
            "{role} of {dtype} must be uploaded with upload_weight as rows of {row_len} \
             (the planes layout); its buffer holds {holds}"
        ),
    ))
}

/// A cache op's sequence slots ([`kiln_core::ops::KvAppend`] defines them): the
/// optional I32 `[n_tokens]` slot of each token and the cache's slot count.
#[derive(Clone, Copy)]
pub struct CacheSlots<'a> {
    pub ids: Option<&'a crate::CudaBuffer>,
    pub n_slots: usize,
}

impl CacheSlots<'_> {
    /// Every token in slot 0 of a one-slot cache.
    pub const ONE: CacheSlots<'static> = CacheSlots {
        ids: None,
        n_slots: 1,
    };
}

/// Checks a cache op's slots: `n_slots > 0`, every row of every slot numbered by an
/// `i32` (the attention kernels' virtual rows, `slot * capacity + row`), and, when
/// given (`slots_bytes`), `n_tokens` I32 slot ids. Returns `n_slots` as the kernels
/// take it.
pub(crate) fn check_slots(
    op: &str,
    slots_bytes: Option<usize>,
    n_tokens: usize,
    n_slots: usize,
    capacity: usize,
) -> Result<u32> {
    check_nonzero(op, &[("n_slots", n_slots)])?;
    let rows = count(op, &[n_slots, capacity])?;
    if i32::try_from(rows).is_err() {
        return Err(Error::invalid(
            op,
            format!(
                "n_slots {n_slots} x capacity {capacity} rows exceed {}",
                i32::MAX
            ),
        ));
    }
    if let Some(bytes) = slots_bytes {
        check_bytes(op, "slots", bytes, DType::I32, n_tokens)?;
    }
    to_u32(op, "n_slots", n_slots)
}

/// The product of `dims`, or an error naming `op` when it overflows.
pub(crate) fn count(op: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::invalid(op, format!("dimensions {dims:?} overflow")))
}

/// `v` as the `u32` a kernel takes, or an error naming `op` and `name`.
pub(crate) fn to_u32(op: &str, name: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::invalid(op, format!("{name} = {v} exceeds {}", u32::MAX)))
}
