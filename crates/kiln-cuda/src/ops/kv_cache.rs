//! Dispatch for [`kiln_core::ops::KvAppend`] (kernels/kv_cache.cu).

use cudarc::driver::LaunchConfig;
use kiln_core::{DType, DeviceBuffer, Result};

use super::common::{cache_tag, config, grid_dim, launch, CACHE_DTYPES, MAX_GRID_X};
use super::{check_bytes, check_nonzero, count, to_u32};
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
    pub src_bytes: usize,
    pub positions_bytes: usize,
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
}

impl KvAppendArgs {
    /// Checks non-zero sizes, a cache dtype of F32 or F16, `n_tokens x n_kv_heads x
    /// head_dim` F32 rows, `n_tokens` I32 positions and an `n_kv_heads x capacity x
    /// head_dim` cache.
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
        check_bytes(
            OP,
            "cache",
            self.cache_bytes,
            self.cache,
            count(OP, &[per_token, self.capacity])?,
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
        })
    }
}

/// `cache[h, positions[t], :] = src[t, h, :]` for `n_tokens` tokens, as
/// [`kiln_core::ops::KvAppend`] defines; a position outside `0..capacity` is skipped.
#[allow(clippy::too_many_arguments)] // the op's operands and shape, each named
pub fn kv_append(
    backend: &CudaBackend,
    src: &CudaBuffer,
    positions: &CudaBuffer,
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
        src_bytes: src.bytes(),
        positions_bytes: positions.bytes(),
        cache_bytes: cache.bytes(),
    }
    .check()?;
    let kernel = backend.kernel(&plan.spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(src.slice())
        .arg(positions.slice())
        .arg(cache.slice_mut())
        .arg(&plan.n_tokens)
        .arg(&plan.n_kv_heads)
        .arg(&plan.head_dim)
        .arg(&plan.capacity);
    // SAFETY: the arguments match `kiln::kv_append<C>(const float* src, const int*
    // positions, C::storage* cache, u32 n_tokens, u32 n_kv_heads, u32 head_dim, u32
    // capacity)`; the buffers hold their elements (checked) and the kernel writes only
    // rows at positions in 0..capacity.
    unsafe { launch(&kernel, &mut args, plan.config) }
}
