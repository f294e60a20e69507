//! Dispatch for [`kiln_core::ops::Attention`] (kernels/attention.cu): flash-decoding
//! for up to [`DECODE_MAX_TOKENS`] queries, the tiled prefill kernel above.

use std::sync::{Mutex, MutexGuard, PoisonError};

use cudarc::driver::LaunchConfig;
use kiln_core::{Backend, DType, DeviceBuffer, Error, Result};

use super::common::{
    allow_dynamic_shared, cache_tag, config, grid_dim, launch, CACHE_DTYPES, MAX_GRID_X,
    MAX_GRID_YZ,
};
use super::{check_bytes, check_nonzero, count, to_u32};
use crate::launch::KernelArgs;
use crate::manifest::ATTENTION;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

const OP: &str = "attention";

/// The most queries the decode kernel takes; more run on the prefill kernel.
pub const DECODE_MAX_TOKENS: usize = 4;

/// The largest head dimension the kernels take (kernels/attention.cu's MAX_HEAD_DIM).
pub const MAX_HEAD_DIM: usize = 256;

/// Query heads per KV head (group) the decode kernel is compiled for: a group runs
/// on the smallest tier that holds it, or in chunks of the largest.
const GROUP_TIERS: [u32; 4] = [1, 2, 4, 8];

/// Threads per decode block and per prefill block.
const DECODE_THREADS: u32 = 128;
const PREFILL_THREADS: u32 = 128;

/// The most splits of the visible rows (kernels/attention.cu's AD_MAX_SPLITS).
const MAX_SPLITS: usize = 64;

/// A split gets at least this many rows (two tiles of 32) of the longest possible range.
const MIN_ROWS_PER_SPLIT: usize = 64;

/// Decode blocks to aim for: four per streaming multiprocessor of an H100 (132), so
/// that the cache reads of several blocks are in flight on every multiprocessor.
const TARGET_BLOCKS: usize = 528;

/// (query, head) rows per prefill block, and cache rows per step (AP_ROWS, AP_TILE).
const PREFILL_ROWS: usize = 32;
const PREFILL_TILE: usize = 16;

/// Counters at the start of the workspace, one per (query, decode grid row); the
/// partial results follow them.
const COUNTER_SLOTS: usize = 4096;

/// Which kernel runs an attention, and its compile-time shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// attention_decode for `group` query heads per block (a tier), `quads` groups of
    /// 4 columns per lane, the visible rows of each query split in `splits`.
    Decode { group: u32, quads: u32, splits: u32 },
    /// attention_prefill for head dimensions up to `max_head_dim`.
    Prefill { max_head_dim: u32 },
}

/// The specialisation of `kernel` (its runtime `splits` aside) for caches of `cache`.
pub fn spec(cache: DType, kernel: AttentionKernel) -> Result<KernelSpec> {
    let tag = cache_tag(OP, cache)?;
    Ok(match kernel {
        AttentionKernel::Decode { group, quads, .. } => ATTENTION.spec(
            format!("attention_decode|cache={cache}|group={group}|quads={quads}"),
            format!("kiln::attention_decode<{tag}, {group}, {quads}>"),
        ),
        AttentionKernel::Prefill { max_head_dim } => ATTENTION.spec(
            format!("attention_prefill|cache={cache}|max_head_dim={max_head_dim}"),
            format!("kiln::attention_prefill<{tag}, {max_head_dim}>"),
        ),
    })
}

/// Every attention specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    let mut kernels = Vec::new();
    for quads in [1, 2] {
        for group in GROUP_TIERS {
            kernels.push(AttentionKernel::Decode {
                group,
                quads,
                splits: 1,
            });
        }
        kernels.push(AttentionKernel::Prefill {
            max_head_dim: 128 * quads,
        });
    }
    CACHE_DTYPES
        .iter()
        .flat_map(|&c| kernels.iter().map(move |&k| (c, k)))
        // Every cache dtype has a tag.
        .filter_map(|(c, k)| spec(c, k).ok())
        .collect()
}

/// Errors unless the kernels take `head_dim`: a multiple of 8 (so that cache rows are
/// 16-byte aligned) and at most [`MAX_HEAD_DIM`].
pub fn check_head_dim(head_dim: usize) -> Result<()> {
    if head_dim % 8 != 0 || head_dim > MAX_HEAD_DIM {
        return Err(Error::invalid(
            OP,
            format!(
                "head_dim {head_dim} is not supported by the CUDA kernels: it must be a multiple of 8 and at most {MAX_HEAD_DIM}"
            ),
        ));
    }
    Ok(())
}

/// What an attention computes, besides its buffers: the fields of
/// [`kiln_core::ops::Attention`] of the same names.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    pub n_tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    pub scale: f32,
    pub window: Option<usize>,
    pub softcap: Option<f32>,
}

impl From<&kiln_core::ops::Attention> for AttentionShape {
    fn from(a: &kiln_core::ops::Attention) -> Self {
        Self {
            n_tokens: a.n_tokens,
            n_heads: a.n_heads,
            n_kv_heads: a.n_kv_heads,
            head_dim: a.head_dim,
            capacity: a.capacity,
            scale: a.scale,
            window: a.window,
            softcap: a.softcap,
        }
    }
}

/// An attention's shape, cache dtype and operand sizes in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionArgs {
    pub shape: AttentionShape,
    pub cache: DType,
    pub q_bytes: usize,
    pub k_bytes: usize,
    pub v_bytes: usize,
    pub positions_bytes: usize,
    pub out_bytes: usize,
}

/// A checked attention launch.
#[derive(Clone, Debug)]
pub struct AttentionPlan {
    pub kernel: AttentionKernel,
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    /// Bytes of workspace the launch needs (0 without one).
    pub workspace_bytes: usize,
    n_tokens: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    capacity: u32,
    window: u32,
    softcap: f32,
    heads_per_block: u32,
    tokens_per_block: u32,
}

impl AttentionArgs {
    /// Checks non-zero sizes; `n_heads` a multiple of `n_kv_heads`; a finite scale, a
    /// window > 0, a finite positive softcap; a head dimension the kernels take
    /// ([`check_head_dim`]); buffers of `n_tokens x n_heads x head_dim` F32 queries and
    /// outputs, `n_tokens` I32 positions and two `n_kv_heads x capacity x head_dim`
    /// caches of `cache` (F32 or F16); and grid limits. Picks the decode kernel for
    /// up to [`DECODE_MAX_TOKENS`] queries.
    pub fn check(&self) -> Result<AttentionPlan> {
        check_nonzero(
            OP,
            &[
                ("n_tokens", self.shape.n_tokens),
                ("n_heads", self.shape.n_heads),
                ("n_kv_heads", self.shape.n_kv_heads),
                ("head_dim", self.shape.head_dim),
                ("capacity", self.shape.capacity),
            ],
        )?;
        let invalid = |msg: String| Err(Error::invalid(OP, msg));
        if self.shape.n_heads % self.shape.n_kv_heads != 0 {
            return invalid(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.shape.n_heads, self.shape.n_kv_heads
            ));
        }
        if !self.shape.scale.is_finite() {
            return invalid(format!("scale must be finite, got {}", self.shape.scale));
        }
        if self.shape.window == Some(0) {
            return invalid("window must be > 0".to_string());
        }
        if let Some(cap) = self.shape.softcap {
            if !(cap.is_finite() && cap > 0.0) {
                return invalid(format!("softcap must be finite and > 0, got {cap}"));
            }
        }
        check_head_dim(self.shape.head_dim)?;
        cache_tag(OP, self.cache)?;
        let nq = count(
            OP,
            &[self.shape.n_tokens, self.shape.n_heads, self.shape.head_dim],
        )?;
        check_bytes(OP, "q", self.q_bytes, DType::F32, nq)?;
        check_bytes(OP, "out", self.out_bytes, DType::F32, nq)?;
        check_bytes(
            OP,
            "positions",
            self.positions_bytes,
            DType::I32,
            self.shape.n_tokens,
        )?;
        let nkv = count(
            OP,
            &[
                self.shape.n_kv_heads,
                self.shape.capacity,
                self.shape.head_dim,
            ],
        )?;
        check_bytes(OP, "k_cache", self.k_bytes, self.cache, nkv)?;
        check_bytes(OP, "v_cache", self.v_bytes, self.cache, nkv)?;
        let capacity = to_u32(OP, "capacity", self.shape.capacity)?;
        let launch = if self.shape.n_tokens <= DECODE_MAX_TOKENS {
            self.decode_launch()?
        } else {
            self.prefill_launch()?
        };
        Ok(AttentionPlan {
            kernel: launch.kernel,
            spec: spec(self.cache, launch.kernel)?,
            config: launch.config,
            workspace_bytes: launch.workspace_bytes,
            n_tokens: to_u32(OP, "n_tokens", self.shape.n_tokens)?,
            n_heads: to_u32(OP, "n_heads", self.shape.n_heads)?,
            n_kv_heads: to_u32(OP, "n_kv_heads", self.shape.n_kv_heads)?,
            head_dim: self.shape.head_dim as u32,
            capacity,
            // A window of at least the capacity hides nothing.
            window: self
                .shape
                .window
                .map_or(0, |w| w.min(self.shape.capacity) as u32),
            softcap: self.shape.softcap.unwrap_or(0.0),
            heads_per_block: launch.heads_per_block,
            tokens_per_block: launch.tokens_per_block,
        })
    }

    /// The decode kernel's launch: splits from the longest possible range, and the
    /// workspace their partial results need.
    fn decode_launch(&self) -> Result<KernelLaunch> {
        let group = self.shape.n_heads / self.shape.n_kv_heads;
        let tier = GROUP_TIERS
            .into_iter()
            .find(|&t| t as usize >= group)
            .unwrap_or(GROUP_TIERS[GROUP_TIERS.len() - 1]);
        let rows = count(OP, &[self.shape.n_kv_heads, group.div_ceil(tier as usize)])?;
        let rows_y = grid_dim(OP, "n_kv_heads * head groups", rows, MAX_GRID_YZ)?;
        let visible = self
            .shape
            .window
            .map_or(self.shape.capacity, |w| w.min(self.shape.capacity));
        let blocks = self.shape.n_tokens * rows;
        let mut splits = visible
            .div_ceil(MIN_ROWS_PER_SPLIT)
            .min(TARGET_BLOCKS.div_ceil(blocks))
            .clamp(1, MAX_SPLITS);
        if self.shape.n_tokens * rows > COUNTER_SLOTS {
            splits = 1;
        }
        let workspace = if splits > 1 {
            let partials = count(
                OP,
                &[
                    self.shape.n_tokens,
                    self.shape.n_heads,
                    splits,
                    self.shape.head_dim + 2,
                ],
            )?;
            COUNTER_SLOTS * 4 + partials * 4
        } else {
            0
        };
        let kernel = AttentionKernel::Decode {
            group: tier,
            quads: if self.shape.head_dim <= 128 { 1 } else { 2 },
            // At most MAX_SPLITS.
            splits: splits as u32,
        };
        // n_tokens is at most DECODE_MAX_TOKENS.
        let grid = (splits as u32, rows_y, self.shape.n_tokens as u32);
        Ok(KernelLaunch {
            kernel,
            config: config(grid, DECODE_THREADS, 0),
            workspace_bytes: workspace,
            heads_per_block: 0,
            tokens_per_block: 0,
        })
    }

    /// The prefill kernel's launch: 32 (query, head) rows per block.
    fn prefill_launch(&self) -> Result<KernelLaunch> {
        let group = self.shape.n_heads / self.shape.n_kv_heads;
        let heads_per_block = group.min(PREFILL_ROWS);
        let tokens_per_block = PREFILL_ROWS / heads_per_block;
        let rows = count(
            OP,
            &[self.shape.n_kv_heads, group.div_ceil(heads_per_block)],
        )?;
        let grid = (
            grid_dim(
                OP,
                "n_tokens",
                self.shape.n_tokens.div_ceil(tokens_per_block),
                MAX_GRID_X,
            )?,
            grid_dim(OP, "n_kv_heads * head groups", rows, MAX_GRID_YZ)?,
            1,
        );
        let kernel = AttentionKernel::Prefill {
            max_head_dim: if self.shape.head_dim <= 128 { 128 } else { 256 },
        };
        // At most (32 + 32) * 257 + 32 * 17 floats.
        let shared = prefill_shared_bytes(self.shape.head_dim) as u32;
        Ok(KernelLaunch {
            kernel,
            config: config(grid, PREFILL_THREADS, shared),
            workspace_bytes: 0,
            // Both at most PREFILL_ROWS.
            heads_per_block: heads_per_block as u32,
            tokens_per_block: tokens_per_block as u32,
        })
    }
}

/// One of the two kernels' launch: which, its configuration, its workspace, and (for
/// the prefill kernel) the heads and tokens of each block.
struct KernelLaunch {
    kernel: AttentionKernel,
    config: LaunchConfig,
    workspace_bytes: usize,
    heads_per_block: u32,
    tokens_per_block: u32,
}

/// Dynamic shared memory of the prefill kernel (kernels/attention.cu's
/// prefill_shared_floats): query rows, K and V tiles with rows padded by one, scores.
fn prefill_shared_bytes(head_dim: usize) -> usize {
    ((PREFILL_ROWS + 2 * PREFILL_TILE) * (head_dim + 1) + PREFILL_ROWS * (PREFILL_TILE + 1)) * 4
}

/// Device scratch memory for the decode kernel's partial results: a counter region,
/// zero between launches (each launch's last blocks reset the counters they used),
/// then the partials. Grown, never shrunk; launches on the backend's one stream take
/// their turns.
#[derive(Default)]
pub struct Workspace {
    buffer: Mutex<Option<CudaBuffer>>,
}

impl Workspace {
    /// The workspace buffer, of at least `bytes` bytes, locked while the caller holds
    /// the guard. A new buffer is zeroed.
    fn at_least(
        &self,
        backend: &CudaBackend,
        bytes: usize,
    ) -> Result<MutexGuard<'_, Option<CudaBuffer>>> {
        // Every state of the buffer is valid, so a poisoned lock is recovered.
        let mut held = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        if held.as_ref().is_none_or(|b| b.bytes() < bytes) {
            *held = Some(backend.alloc(bytes)?);
        }
        Ok(held)
    }
}

/// Causal grouped-query attention of `n_tokens` queries over the KV caches, as
/// [`kiln_core::ops::Attention`] defines; a query whose position lies outside
/// `0..capacity` gets an output of zeros.
#[allow(clippy::too_many_arguments)] // the op's operands, each named
pub fn attention(
    backend: &CudaBackend,
    q: &CudaBuffer,
    k_cache: &CudaBuffer,
    v_cache: &CudaBuffer,
    positions: &CudaBuffer,
    out: &mut CudaBuffer,
    cache: DType,
    shape: &AttentionShape,
) -> Result<()> {
    let plan = AttentionArgs {
        shape: *shape,
        cache,
        q_bytes: q.bytes(),
        k_bytes: k_cache.bytes(),
        v_bytes: v_cache.bytes(),
        positions_bytes: positions.bytes(),
        out_bytes: out.bytes(),
    }
    .check()?;
    let kernel = backend.kernel(&plan.spec)?;
    allow_dynamic_shared(&kernel, &plan.config)?;
    // The decode kernel's counters and partials, in the workspace, when it splits.
    let mut workspace = match plan.kernel {
        AttentionKernel::Decode { .. } if plan.workspace_bytes > 0 => Some(
            backend
                .attention_workspace()
                .at_least(backend, plan.workspace_bytes)?,
        ),
        _ => None,
    };
    let mut regions = workspace
        .as_mut()
        .and_then(|held| held.as_mut())
        .map(|w| w.slice_mut().split_at_mut(COUNTER_SLOTS * 4));
    let mut args = KernelArgs::new(backend);
    args.arg(q.slice())
        .arg(k_cache.slice())
        .arg(v_cache.slice())
        .arg(positions.slice())
        .arg(out.slice_mut());
    match plan.kernel {
        AttentionKernel::Decode { .. } => {
            let (counters, partials) = match regions.as_mut() {
                Some((counters, partials)) => (Some(counters), Some(partials)),
                None => (None, None),
            };
            args.arg(partials)
                .arg(counters)
                .arg(&plan.n_heads)
                .arg(&plan.n_kv_heads)
                .arg(&plan.head_dim)
                .arg(&plan.capacity)
                .arg(&shape.scale)
                .arg(&plan.window)
                .arg(&plan.softcap);
        }
        AttentionKernel::Prefill { .. } => {
            args.arg(&plan.n_tokens)
                .arg(&plan.n_heads)
                .arg(&plan.n_kv_heads)
                .arg(&plan.head_dim)
                .arg(&plan.capacity)
                .arg(&shape.scale)
                .arg(&plan.window)
                .arg(&plan.softcap)
                .arg(&plan.heads_per_block)
                .arg(&plan.tokens_per_block)
                .serialized();
        }
    }
    // SAFETY: the arguments match `kiln::attention_decode<C, GROUP, QUADS>(q, k_cache,
    // v_cache, positions, out, float* work, u32* counters, u32 n_heads, u32 n_kv_heads,
    // u32 head_dim, u32 capacity, float scale, u32 window, float softcap)` or
    // `kiln::attention_prefill<C, DMAX>(q, k_cache, v_cache, positions, out, u32
    // n_tokens, u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 capacity, float scale,
    // u32 window, float softcap, u32 heads_per_block, u32 tokens_per_block)`; the
    // buffers hold their elements (checked); the workspace holds the zeroed counters
    // and the partials of every split, and stays locked until the launch is queued.
    unsafe { launch(&kernel, &mut args, plan.config) }
}
