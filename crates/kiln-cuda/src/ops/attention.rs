//! Dispatch for [`kiln_core::ops::Attention`] (kernels/attention.cu): flash-decoding
//! for up to [`DECODE_MAX_TOKENS`] queries (up to [`DECODE_MAX_SLOT_TOKENS`] when the
//! queries carry cache slots, where each is likely a different sequence's); above that,
//! flash attention on tensor cores over an F16 cache ([`FLASH_CACHES`]), the f32 tiled
//! prefill kernel over an F32 cache.
//!
//! The decode launch depends only on the shape (its grid on the capacity, not on the
//! positions, which live on the device), so one launch record serves every position:
//! the kernel derives from each query's position how many of the grid's splits it
//! needs, and its workspace stays at one address for the backend's lifetime.

use cudarc::driver::LaunchConfig;
use kiln_core::ops::Q8_COPY;
use kiln_core::{DType, DeviceBuffer, Error, Result};

use super::common::{
    allow_dynamic_shared, cache_tag, config, grid_dim, launch, CACHE_DTYPES, MAX_GRID_X,
    MAX_GRID_YZ,
};
use super::{check_bytes, check_nonzero, check_q8_copy, count, to_u32};
use crate::constants::{FA_PAD, FA_TILE_ROWS, FA_TILE_ROWS_WIDE, FA_WARPS};
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::registry::{KernelSource, KernelSpec};
use crate::{CudaBackend, CudaBuffer};

/// [`kiln_core::ops::Attention`].
pub const ATTENTION: Family = Family {
    name: "attention",
    source: KernelSource {
        name: "attention.cu",
        text: include_str!("../../kernels/attention.cu"),
    },
};

const OP: &str = "attention";

/// The most queries the decode kernel takes; more run on the prefill kernel.
pub const DECODE_MAX_TOKENS: usize = 4;

/// The most queries with slot ids the decode kernel takes. A batched decode step's
/// queries each read their own sequence's rows, which the decode kernel's grid (one
/// block row per query) spreads over the device; the flash and prefill kernels, whose
/// blocks hold the queries of several tokens, would walk several sequences per block.
pub const DECODE_MAX_SLOT_TOKENS: usize = 64;

/// The largest head dimension the kernels take (kernels/attention.cu's MAX_HEAD_DIM).
pub const MAX_HEAD_DIM: usize = 256;

/// The cache dtypes the flash kernel reads: its tensor-core operands are of the
/// cache's type (queries and softmax weights rounded to it).
pub const FLASH_CACHES: [DType; 1] = [DType::F16];

/// The head dimensions the flash kernel is compiled for: a head dimension runs on the
/// smallest that holds it, its columns past the head dimension zeros.
const FLASH_HEAD_DIMS: [u32; 3] = [64, 128, 256];

/// (query, head) rows per flash block: 16 per warp.
const FLASH_ROWS: usize = 16 * FA_WARPS as usize;

/// Query heads per KV head (group) the decode kernel is compiled for: a group runs
/// on the smallest tier that holds it, or in chunks of the largest.
const GROUP_TIERS: [u32; 4] = [1, 2, 4, 8];

/// Lanes per cache row the decode kernel is compiled for, each lane 8 columns: a head
/// dimension runs on the smallest that covers it.
const DECODE_LANES: [u32; 3] = [8, 16, 32];

/// The decode kernel's lanes per cache row for `head_dim` (at most 256).
fn decode_lanes(head_dim: usize) -> u32 {
    DECODE_LANES
        .into_iter()
        .find(|&l| 8 * l as usize >= head_dim)
        .unwrap_or(DECODE_LANES[DECODE_LANES.len() - 1])
}

/// Cache rows a decode warp reads per tile: `32 / lanes` rows per pass, one pass per
/// 64 bytes of a lane's 8 columns in each of K and V (4 passes for F16, 2 for F32).
pub fn decode_tile_rows(cache: DType, lanes: u32) -> Result<usize> {
    let chunk = cache.bytes_for(8)?;
    Ok((32 / lanes as usize) * (DECODE_STAGE_BYTES / (2 * 32 * chunk)))
}

/// Dynamic shared memory of attention_decode (kernels/attention.cu's
/// decode_shared_bytes): the warps' copy rings, then the queries as f32.
pub fn decode_shared_bytes(group: u32, lanes: u32) -> usize {
    DECODE_WARPS * DECODE_STAGES * DECODE_STAGE_BYTES + group as usize * lanes as usize * 32
}

/// Warps per decode block (kernels/attention.cu's AD_WARPS), and threads per decode
/// and prefill block.
const DECODE_WARPS: usize = 4;
const DECODE_THREADS: u32 = 32 * DECODE_WARPS as u32;
const PREFILL_THREADS: u32 = 128;

/// Tiles of cache rows in flight or in use per decode warp, and the bytes of one tile
/// (a lane's share: 64 bytes of K and 64 of V rows) (AD_STAGES, AD_STAGE_BYTES).
const DECODE_STAGES: usize = 4;
const DECODE_STAGE_BYTES: usize = 4096;

/// Decode blocks resident per multiprocessor (AD_MIN_BLOCKS, the kernel's launch bound;
/// its shared memory, at most 75 KiB, lets three fit in 228 KiB).
const DECODE_BLOCKS_PER_SM: usize = 3;

/// The most splits of the visible rows (kernels/attention.cu's AD_MAX_SPLITS).
const MAX_SPLITS: usize = 64;

/// Tiles per warp worth a split of their own: a split gets at least
/// `DECODE_WARPS * SPLIT_TILES` tiles of rows (64 KiB of K and V), so that at 4096
/// rows of 8 KV heads of 128 the grid has 256 blocks and each merge reads 32 partials.
const SPLIT_TILES: usize = 4;

/// Multiprocessors [`AttentionArgs::check`] plans for: an H100's or H200's.
pub const DEFAULT_MULTIPROCESSORS: u32 = 132;

/// (query, head) rows per prefill block, and cache rows per step (AP_ROWS, AP_TILE).
const PREFILL_ROWS: usize = 32;
const PREFILL_TILE: usize = 16;

/// Counters at the start of the workspace, one per (query, decode grid row); the
/// partial results follow them.
const COUNTER_SLOTS: usize = 4096;

/// Which kernel runs an attention, and its compile-time shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// attention_decode for `group` query heads per block (a tier) and `lanes` lanes per
    /// cache row (8 columns each), with a grid of `splits` splits: the most any position
    /// uses (the kernel uses `min(splits, ceil(rows / split_rows))` of them).
    Decode { group: u32, lanes: u32, splits: u32 },
    /// attention_prefill for head dimensions up to `max_head_dim`.
    Prefill { max_head_dim: u32 },
    /// attention_flash for head dimensions up to `head_dim` (64, 128 or 256).
    Flash { head_dim: u32 },
}

/// The specialisation of `kernel` (its runtime `splits` aside) for caches of `cache`.
pub fn spec(cache: DType, kernel: AttentionKernel) -> Result<KernelSpec> {
    let tag = cache_tag(OP, cache)?;
    Ok(match kernel {
        AttentionKernel::Decode { group, lanes, .. } => ATTENTION.spec(
            format!("attention_decode|cache={cache}|group={group}|lanes={lanes}"),
            format!("kiln::attention_decode<{tag}, {group}, {lanes}>"),
        ),
        AttentionKernel::Prefill { max_head_dim } => ATTENTION.spec(
            format!("attention_prefill|cache={cache}|max_head_dim={max_head_dim}"),
            format!("kiln::attention_prefill<{tag}, {max_head_dim}>"),
        ),
        AttentionKernel::Flash { head_dim } => ATTENTION.spec(
            format!("attention_flash|cache={cache}|head_dim={head_dim}"),
            format!("kiln::attention_flash<{tag}, {head_dim}>"),
        ),
    })
}

/// Every attention specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    let mut kernels = Vec::new();
    for lanes in DECODE_LANES {
        for group in GROUP_TIERS {
            kernels.push(AttentionKernel::Decode {
                group,
                lanes,
                splits: 1,
            });
        }
    }
    for max_head_dim in [128, 256] {
        kernels.push(AttentionKernel::Prefill { max_head_dim });
    }
    let flash = FLASH_HEAD_DIMS.map(|head_dim| AttentionKernel::Flash { head_dim });
    CACHE_DTYPES
        .iter()
        .flat_map(|&c| kernels.iter().map(move |&k| (c, k)))
        .chain(
            FLASH_CACHES
                .iter()
                .flat_map(|&c| flash.iter().map(move |&k| (c, k))),
        )
        // Every cache dtype has a tag.
        .filter_map(|(c, k)| spec(c, k).ok())
        .collect()
}

/// Errors unless the kernels take `head_dim`: a multiple of 8 (so that cache rows are
/// 16-byte aligned) and at most [`MAX_HEAD_DIM`]; with a Q8_1 copy of the output
/// (`out_q8`), a multiple of 32, so that each of the copy's blocks lies in one head.
pub fn check_head_dim(head_dim: usize, out_q8: bool) -> Result<()> {
    if head_dim % 8 != 0 || head_dim > MAX_HEAD_DIM {
        return Err(Error::invalid(
            OP,
            format!(
                "head_dim {head_dim} is not supported by the CUDA kernels: it must be a multiple of 8 and at most {MAX_HEAD_DIM}"
            ),
        ));
    }
    let block = Q8_COPY.block_size();
    if out_q8 && head_dim % block != 0 {
        return Err(Error::invalid(
            OP,
            format!(
                "out_q8 is not supported by the CUDA kernels for head_dim {head_dim}: the output's q8_1 copy needs a head_dim that is a multiple of {block}"
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
    pub n_slots: usize,
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
            n_slots: a.n_slots,
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
    /// The size of the slot ids, when there are some.
    pub slots_bytes: Option<usize>,
    pub out_bytes: usize,
    /// The size of the output's Q8_1 copy, when there is one.
    pub out_q8_bytes: Option<usize>,
}

/// A checked attention launch.
#[derive(Clone, Debug)]
pub struct AttentionPlan {
    pub kernel: AttentionKernel,
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    /// Bytes of workspace the launch needs (0 without one).
    pub workspace_bytes: usize,
    /// Decode: the fewest visible rows worth a split of their own (a query of `rows`
    /// visible rows uses `min(splits, ceil(rows / split_rows))` splits); 0 for prefill.
    pub split_rows: u32,
    n_tokens: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    capacity: u32,
    n_slots: u32,
    window: u32,
    softcap: f32,
    heads_per_block: u32,
    tokens_per_block: u32,
}

impl AttentionArgs {
    /// Checks non-zero sizes; `n_heads` a multiple of `n_kv_heads`; a finite scale, a
    /// window > 0, a finite positive softcap; a head dimension the kernels take
    /// ([`check_head_dim`]); buffers of `n_tokens x n_heads x head_dim` F32 queries and
    /// outputs (and as many Q8_1 elements for the copy, when given), `n_tokens` I32
    /// positions, the slots ([`super::check_slots`]) and two `n_slots x n_kv_heads x
    /// capacity x head_dim` caches of `cache` (F32 or F16); and grid limits. Picks the
    /// decode kernel for up to [`DECODE_MAX_TOKENS`] queries ([`DECODE_MAX_SLOT_TOKENS`]
    /// with slot ids), above that the flash kernel over a cache of [`FLASH_CACHES`] and
    /// the f32 prefill kernel over another. Plans for [`DEFAULT_MULTIPROCESSORS`].
    pub fn check(&self) -> Result<AttentionPlan> {
        self.check_on(DEFAULT_MULTIPROCESSORS)
    }

    /// [`Self::check`] for a device of `multiprocessors` streaming multiprocessors,
    /// which sizes the decode grid (enough splits for every multiprocessor to hold
    /// [`DECODE_BLOCKS_PER_SM`] blocks at full length).
    pub fn check_on(&self, multiprocessors: u32) -> Result<AttentionPlan> {
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
        check_head_dim(self.shape.head_dim, self.out_q8_bytes.is_some())?;
        cache_tag(OP, self.cache)?;
        let nq = count(
            OP,
            &[self.shape.n_tokens, self.shape.n_heads, self.shape.head_dim],
        )?;
        check_bytes(OP, "q", self.q_bytes, DType::F32, nq)?;
        check_bytes(OP, "out", self.out_bytes, DType::F32, nq)?;
        check_q8_copy(
            OP,
            "out_q8",
            self.out_q8_bytes,
            nq,
            self.shape.n_heads * self.shape.head_dim,
        )?;
        check_bytes(
            OP,
            "positions",
            self.positions_bytes,
            DType::I32,
            self.shape.n_tokens,
        )?;
        let n_slots = super::check_slots(
            OP,
            self.slots_bytes,
            self.shape.n_tokens,
            self.shape.n_slots,
            self.shape.capacity,
        )?;
        let nkv = count(
            OP,
            &[
                self.shape.n_slots,
                self.shape.n_kv_heads,
                self.shape.capacity,
                self.shape.head_dim,
            ],
        )?;
        check_bytes(OP, "k_cache", self.k_bytes, self.cache, nkv)?;
        check_bytes(OP, "v_cache", self.v_bytes, self.cache, nkv)?;
        let capacity = to_u32(OP, "capacity", self.shape.capacity)?;
        let decode_max = if self.slots_bytes.is_some() {
            DECODE_MAX_SLOT_TOKENS
        } else {
            DECODE_MAX_TOKENS
        };
        let launch = if self.shape.n_tokens <= decode_max {
            self.decode_launch(multiprocessors)?
        } else if FLASH_CACHES.contains(&self.cache) {
            self.flash_launch()?
        } else {
            self.prefill_launch()?
        };
        Ok(AttentionPlan {
            kernel: launch.kernel,
            spec: spec(self.cache, launch.kernel)?,
            config: launch.config,
            workspace_bytes: launch.workspace_bytes,
            split_rows: launch.split_rows,
            n_tokens: to_u32(OP, "n_tokens", self.shape.n_tokens)?,
            n_heads: to_u32(OP, "n_heads", self.shape.n_heads)?,
            n_kv_heads: to_u32(OP, "n_kv_heads", self.shape.n_kv_heads)?,
            head_dim: self.shape.head_dim as u32,
            capacity,
            n_slots,
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

    /// The decode kernel's launch: its grid holds the splits the longest possible range
    /// (the capacity, or the window) uses, at most enough for the device to hold every
    /// block at once; the workspace their partial results need.
    fn decode_launch(&self, multiprocessors: u32) -> Result<KernelLaunch> {
        let group = self.shape.n_heads / self.shape.n_kv_heads;
        let tier = GROUP_TIERS
            .into_iter()
            .find(|&t| t as usize >= group)
            .unwrap_or(GROUP_TIERS[GROUP_TIERS.len() - 1]);
        let lanes = decode_lanes(self.shape.head_dim);
        let rows = count(OP, &[self.shape.n_kv_heads, group.div_ceil(tier as usize)])?;
        let rows_y = grid_dim(OP, "n_kv_heads * head groups", rows, MAX_GRID_YZ)?;
        let split_rows = DECODE_WARPS * SPLIT_TILES * decode_tile_rows(self.cache, lanes)?;
        let visible = self
            .shape
            .window
            .map_or(self.shape.capacity, |w| w.min(self.shape.capacity));
        let blocks = self.shape.n_tokens * rows;
        let resident = (multiprocessors.max(1) as usize) * DECODE_BLOCKS_PER_SM;
        let splits = if blocks > COUNTER_SLOTS {
            1
        } else {
            visible
                .div_ceil(split_rows)
                .min(resident / blocks)
                .clamp(1, MAX_SPLITS)
        };
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
            lanes,
            // At most MAX_SPLITS.
            splits: splits as u32,
        };
        // n_tokens is at most DECODE_MAX_SLOT_TOKENS; the shared memory at most 72 KiB.
        let grid = (splits as u32, rows_y, self.shape.n_tokens as u32);
        let shared = decode_shared_bytes(tier, lanes) as u32;
        Ok(KernelLaunch {
            kernel,
            config: config(grid, DECODE_THREADS, shared),
            workspace_bytes: workspace,
            // At most 4 * 4 * 16 rows.
            split_rows: split_rows as u32,
            heads_per_block: 0,
            tokens_per_block: 0,
        })
    }

    /// The grid of a kernel whose blocks hold `rows` (query, head) rows of one KV head:
    /// as many heads of a group as fit (the group in chunks of `rows` when larger), and
    /// as many tokens as fill the rest. Returns the grid, heads and tokens per block.
    fn row_blocks(&self, rows: usize) -> Result<((u32, u32, u32), usize, usize)> {
        let group = self.shape.n_heads / self.shape.n_kv_heads;
        let heads_per_block = group.min(rows);
        let tokens_per_block = rows / heads_per_block;
        let chunks = count(
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
            grid_dim(OP, "n_kv_heads * head groups", chunks, MAX_GRID_YZ)?,
            1,
        );
        Ok((grid, heads_per_block, tokens_per_block))
    }

    /// The prefill kernel's launch: 32 (query, head) rows per block.
    fn prefill_launch(&self) -> Result<KernelLaunch> {
        let (grid, heads_per_block, tokens_per_block) = self.row_blocks(PREFILL_ROWS)?;
        let kernel = AttentionKernel::Prefill {
            max_head_dim: if self.shape.head_dim <= 128 { 128 } else { 256 },
        };
        // At most (32 + 32) * 257 + 32 * 17 floats.
        let shared = prefill_shared_bytes(self.shape.head_dim) as u32;
        Ok(KernelLaunch {
            kernel,
            config: config(grid, PREFILL_THREADS, shared),
            workspace_bytes: 0,
            split_rows: 0,
            // Both at most PREFILL_ROWS.
            heads_per_block: heads_per_block as u32,
            tokens_per_block: tokens_per_block as u32,
        })
    }

    /// The flash kernel's launch: [`FLASH_ROWS`] (query, head) rows per block, compiled
    /// for the smallest of [`FLASH_HEAD_DIMS`] that holds the head dimension.
    fn flash_launch(&self) -> Result<KernelLaunch> {
        let (grid, heads_per_block, tokens_per_block) = self.row_blocks(FLASH_ROWS)?;
        let head_dim = FLASH_HEAD_DIMS
            .into_iter()
            .find(|&d| d as usize >= self.shape.head_dim)
            // check_head_dim: at most 256.
            .unwrap_or(FLASH_HEAD_DIMS[FLASH_HEAD_DIMS.len() - 1]);
        Ok(KernelLaunch {
            kernel: AttentionKernel::Flash { head_dim },
            config: config(grid, 32 * FA_WARPS, flash_shared_bytes(head_dim)),
            workspace_bytes: 0,
            split_rows: 0,
            // Both at most FLASH_ROWS.
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
    split_rows: u32,
    heads_per_block: u32,
    tokens_per_block: u32,
}

/// Dynamic shared memory of the prefill kernel (kernels/attention.cu's
/// prefill_shared_floats): query rows, K and V tiles with rows padded by one, scores.
fn prefill_shared_bytes(head_dim: usize) -> usize {
    ((PREFILL_ROWS + 2 * PREFILL_TILE) * (head_dim + 1) + PREFILL_ROWS * (PREFILL_TILE + 1)) * 4
}

/// Cache rows per K and V tile of the flash kernel for head dimension `head_dim` (a
/// compiled one) (kernels/attention.cu's flash_tile_rows).
pub fn flash_tile_rows(head_dim: u32) -> u32 {
    if head_dim <= 128 {
        FA_TILE_ROWS
    } else {
        FA_TILE_ROWS_WIDE
    }
}

/// Dynamic shared memory of the flash kernel for a compiled head dimension
/// (kernels/attention.cu's flash_shared_bytes): two stages of K and V tiles, rows
/// padded by [`FA_PAD`] f16 elements, and for head dimensions above 128 the queries
/// after them (below, the queries use the stages' memory before the first tile).
pub fn flash_shared_bytes(head_dim: u32) -> u32 {
    let q_rows = if head_dim <= 128 {
        0
    } else {
        FLASH_ROWS as u32
    };
    (q_rows + 2 * 2 * flash_tile_rows(head_dim)) * (head_dim + FA_PAD) * 2
}

/// Causal grouped-query attention of `n_tokens` queries over the KV caches, and `out`
/// rounded to Q8_1 into `out_q8` when given, as [`kiln_core::ops::Attention`] defines;
/// a query whose position lies outside `0..capacity`, or whose slot outside
/// `0..n_slots`, gets an output of zeros (and a copy of those zeros). `slots` holds
/// the queries' slot ids (or none: every query in slot 0); `shape.n_slots` counts the
/// caches' slots.
#[allow(clippy::too_many_arguments)] // the op's operands, each named
pub fn attention(
    backend: &CudaBackend,
    q: &CudaBuffer,
    k_cache: &CudaBuffer,
    v_cache: &CudaBuffer,
    positions: &CudaBuffer,
    slots: Option<&CudaBuffer>,
    out: &mut CudaBuffer,
    out_q8: Option<&mut CudaBuffer>,
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
        slots_bytes: slots.map(|s| s.bytes()),
        out_bytes: out.bytes(),
        out_q8_bytes: out_q8.as_ref().map(|b| b.bytes()),
    }
    .check_on(backend.multiprocessors())?;
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
        .and_then(|held| held.last_mut())
        .map(|w| w.slice_mut().split_at_mut(COUNTER_SLOTS * 4));
    let mut args = KernelArgs::new(backend);
    args.arg(q.slice())
        .arg(k_cache.slice())
        .arg(v_cache.slice())
        .arg(positions.slice())
        .arg(slots.map(|s| s.slice()))
        .arg(out.slice_mut())
        .arg(out_q8.map(|b| b.slice_mut()));
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
                .arg(&plan.n_slots)
                .arg(&shape.scale)
                .arg(&plan.window)
                .arg(&plan.softcap)
                .arg(&plan.split_rows);
        }
        AttentionKernel::Prefill { .. } | AttentionKernel::Flash { .. } => {
            args.arg(&plan.n_tokens)
                .arg(&plan.n_heads)
                .arg(&plan.n_kv_heads)
                .arg(&plan.head_dim)
                .arg(&plan.capacity)
                .arg(&plan.n_slots)
                .arg(&shape.scale)
                .arg(&plan.window)
                .arg(&plan.softcap)
                .arg(&plan.heads_per_block)
                .arg(&plan.tokens_per_block)
                .serialized();
        }
    }
    // SAFETY: the arguments match `kiln::attention_decode<C, G, LPR>(q, k_cache,
    // v_cache, positions, const int* slots, out, u8* out_q8, float* work, u32*
    // counters, u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 capacity, u32 n_slots,
    // float scale, u32 window, float softcap, u32 split_rows)` or
    // `kiln::attention_prefill<C, DMAX>` or `kiln::attention_flash<C, DH>(q, k_cache,
    // v_cache, positions, const int* slots, out, u8* out_q8, u32 n_tokens, u32
    // n_heads, u32 n_kv_heads, u32 head_dim, u32 capacity, u32 n_slots, float scale,
    // u32 window, float softcap, u32 heads_per_block, u32 tokens_per_block)`; the
    // buffers hold their elements (checked); slots is null or holds n_tokens ids,
    // every row of every slot numbered by an i32 (checked); out_q8 is null
    // or holds the output's Q8_1 blocks with head_dim a multiple of 32 (checked); the
    // workspace holds the zeroed counters
    // and the partials of every split of the grid (the kernel uses at most those),
    // stays locked until the launch is queued and is never freed while the backend
    // lives.
    unsafe { launch(&kernel, &mut args, plan.config) }
}
