//! Dispatch for [`kiln_core::ops::KvAppend`] (kernels/kv_cache.cu).

use cudarc::driver::LaunchConfig;
use kiln_core::{DType, DeviceBuffer, Result};

use super::common::{cache_tag, config, grid_dim, launch, CACHE_DTYPES, MAX_GRID_X};
use super::{check_bytes, check_nonzero, check_slots, count, to_u32, CacheSlots};
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::registry::{KernelSource, KernelSpec};
use crate::{CudaBackend, CudaBuffer};

/// [`kiln_core::ops::KvAppend`].
pub const KV_CACHE: Family = Family {
    name: "kv_cache",
    source: KernelSource {
        name: "kv_cache.cu",
        text: include_str!("../../kernels/kv_cache.cu"),
    },
};

const OP: &str = "kv_append";

/// Threads per block (one block per token).
const THREADS: u32 = 128;

/// The specialisation writing into a cache of `dtype` (F32 or F16).
pub fn spec(dtype: DType) -> Result<KernelSpec> {
    Ok(KV_CACHE.spec(
        format!("kv_append|cache={dtype}"),
        format!("kiln::kv_append<{}>", cache_tag(OP, dtype)?),
    ))
}

/// Every KV-cache specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    // Every cache dtype has a tag.
    CACHE_DTYPES.iter().filter_map(|&d| spec(d).ok()).collect()
}

/// A KV append's shape, cache dtype and operand sizes in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct KvAppendArgs {
    pub cache: DType,
    pub n_tokens: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    pub n_slots: usize,
    pub src_bytes: usize,
    pub positions_bytes: usize,
    /// The size of the slot ids, when there are some.
    pub slots_bytes: Option<usize>,
    pub cache_bytes: usize,
}

/// A checked KV append launch.
#[derive(Clone, Debug)]
pub struct KvAppendPlan {
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    n_tokens: u32,
    n_kv_heads: u32,
    head_dim: u32,
    capacity: u32,
    n_slots: u32,
}

impl KvAppendArgs {
    /// Checks non-zero sizes, a cache dtype of F32 or F16, `n_tokens x n_kv_heads x
    /// head_dim` F32 rows, `n_tokens` I32 positions, the slots ([`check_slots`]) and an
    /// `n_slots x n_kv_heads x capacity x head_dim` cache.
    pub fn check(&self) -> Result<KvAppendPlan> {
        check_nonzero(
            OP,
            &[
                ("n_tokens", self.n_tokens),
                ("n_kv_heads", self.n_kv_heads),
                ("head_dim", self.head_dim),
                ("capacity", self.capacity),
            ],
        )?;
        let spec = spec(self.cache)?;
        let per_token = count(OP, &[self.n_kv_heads, self.head_dim])?;
        check_bytes(
            OP,
            "src",
            self.src_bytes,
            DType::F32,
            count(OP, &[self.n_tokens, per_token])?,
        )?;
        check_bytes(
            OP,
            "positions",
            self.positions_bytes,
            DType::I32,
            self.n_tokens,
        )?;
        let n_slots = check_slots(
            OP,
            self.slots_bytes,
            self.n_tokens,
            self.n_slots,
            self.capacity,
        )?;
        check_bytes(
            OP,
            "cache",
            self.cache_bytes,
            self.cache,
            count(OP, &[self.n_slots, per_token, self.capacity])?,
        )?;
        to_u32(OP, "n_kv_heads * head_dim", per_token)?;
        let tokens = grid_dim(OP, "n_tokens", self.n_tokens, MAX_GRID_X)?;
        Ok(KvAppendPlan {
            spec,
            config: config((tokens, 1, 1), THREADS, 0),
            n_tokens: tokens,
            n_kv_heads: to_u32(OP, "n_kv_heads", self.n_kv_heads)?,
            head_dim: to_u32(OP, "head_dim", self.head_dim)?,
            capacity: to_u32(OP, "capacity", self.capacity)?,
            n_slots,
        })
    }
}

/// `cache[slots[t], h, positions[t], :] = src[t, h, :]` for `n_tokens` tokens, as
/// [`kiln_core::ops::KvAppend`] defines; a position outside `0..capacity` or a slot
/// outside `0..n_slots` is skipped.
#[allow(clippy::too_many_arguments)] // the op's operands and shape, each named
pub fn kv_append(
    backend: &CudaBackend,
    src: &CudaBuffer,
    positions: &CudaBuffer,
    slots: CacheSlots<'_>,
    cache: &mut CudaBuffer,
    dtype: DType,
    n_tokens: usize,
    n_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
) -> Result<()> {
    let plan = KvAppendArgs {
        cache: dtype,
        n_tokens,
        n_kv_heads,
        head_dim,
        capacity,
        n_slots: slots.n_slots,
        src_bytes: src.bytes(),
        positions_bytes: positions.bytes(),
        slots_bytes: slots.ids.map(|s| s.bytes()),
        cache_bytes: cache.bytes(),
    }
    .check()?;
    let kernel = backend.kernel(&plan.spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(src.slice())
        .arg(positions.slice())
        .arg(slots.ids.map(|s| s.slice()))
        .arg(cache.slice_mut())
        .arg(&plan.n_tokens)
        .arg(&plan.n_kv_heads)
        .arg(&plan.head_dim)
        .arg(&plan.capacity)
        .arg(&plan.n_slots);
    // SAFETY: the arguments match `kiln::kv_append<C>(const float* src, const int*
    // positions, const int* slots, C::storage* cache, u32 n_tokens, u32 n_kv_heads,
    // u32 head_dim, u32 capacity, u32 n_slots)`; the buffers hold their elements
    // (checked), slots is null or holds n_tokens ids, and the kernel writes only rows
    // at slots in 0..n_slots and positions in 0..capacity.
    unsafe { launch(&kernel, &mut args, plan.config) }
}
