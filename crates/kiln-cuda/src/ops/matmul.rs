//! Dispatch for [`kiln_core::ops::MatMul`]: the mat-vec kernels (kernels/matvec.cu)
//! for up to [`MATVEC_MAX_ROWS`] activation rows (decode); above (prefill), cuBLASLt on
//! bf16 copies of the operands ([`gemm`]) from [`GEMM_MIN_ROWS`] rows where the library
//! is present, else kiln's tensor-core mat-mat kernel (kernels/matmul.cu). A product
//! of at least [`Q8_MIN_ROWS`] rows given x's Q8_1 copy (a batched decode step) runs on the 8-bit
//! tensor-core kernel `matmul_q8` where the weight's format has one
//! ([`q8_tensor_cores`]), else as mat-vecs of the copy, [`MATVEC_MAX_ROWS`] rows at a
//! time.
//!
//! Weights of the dtypes of [`packing::packed_planes`] must be in the planes layout
//! ([`kiln_core::Backend::upload_weight`]); their mat-vec is `matvec_resident` (one
//! activation row of the dtypes of `resident_shape`) or `matvec_packed`.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::LaunchConfig;
use kiln_core::ops::WEIGHT_DTYPES;
use kiln_core::{DType, DeviceBuffer, Error, Result};

use super::common::{
    allow_dynamic_shared, config, grid_dim, launch, weight_tag, MAX_GRID_X, MAX_GRID_YZ,
};
use super::{check_bytes, check_nonzero, check_packed, check_q8_copy, count, to_u32};

use crate::constants::{
    MATVEC_THREADS, MM_BM, MM_BN, MM_THREADS, MQ_BN, MQ_KT, MQ_WARPS, PACKED_PAD, Q8_1_BLOCK_BYTES,
    Q8_1_BLOCK_ELEMS,
};
use crate::context::driver_error;
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::nvrtc::CudaKernel;
use crate::registry::{KernelSource, KernelSpec};
use crate::{packing, CudaBackend, CudaBuffer};

mod gemm;
pub use gemm::{bf16_product, Gemm, WORKSPACE_BYTES};

/// [`kiln_core::ops::MatMul`] with few activation rows (decode).
pub const MATVEC: Family = Family {
    name: "matvec",
    source: KernelSource {
        name: "matvec.cu",
        text: include_str!("../../kernels/matvec.cu"),
    },
};

/// [`kiln_core::ops::MatMul`] with many activation rows (prefill), on tensor cores.
pub const MATMUL: Family = Family {
    name: "matmul",
    source: KernelSource {
        name: "matmul.cu",
        text: include_str!("../../kernels/matmul.cu"),
    },
};

const OP: &str = "matmul";

/// The most activation rows the mat-vec kernels take; more run on the mat-mat kernel.
pub const MATVEC_MAX_ROWS: usize = 8;

/// Activation rows below which a product of more than [`MATVEC_MAX_ROWS`] rows (and
/// below the cuBLASLt threshold) runs as the mat-vec of [`MATVEC_MAX_ROWS`] rows once
/// per group of that many rows: it reads the weight once per group, which costs less
/// than kiln's mat-mat tile at these row counts (a batched decode step of 9 to 63
/// sequences, the last chunk of a prompt).
pub const MATVEC_GROUPS_BELOW: usize = 64;

/// Fewest activation rows for which the mat-mat runs on cuBLASLt ([`gemm`]) rather
/// than on kiln's kernel, by default ([`CudaBackend::gemm_min_rows`]). Below it,
/// decoding the whole weight to bf16 (2 bytes per element written and read again)
/// costs more than the faster product saves (docs/perf.md, "Prefill mat-mat").
pub const GEMM_MIN_ROWS: usize = 64;

/// The reduction length of a cuBLASLt product is a multiple of this (whole 16-byte
/// chunks of bf16 per row, which the weight decoder writes).
const GEMM_K_MULTIPLE: usize = 8;

/// Activation-row counts the mat-vec kernels are compiled for: `m` rows run on the
/// smallest tier that holds them.
const M_TIERS: [u32; 4] = [1, 2, 4, 8];

/// Activation rows per tile of `matmul_q8`: a product of m rows runs on the smallest
/// tier that holds them (above the largest, in several tiles of it).
const Q8_M_TIERS: [u32; 4] = [8, 16, 32, 64];

/// Fewest activation rows (given their Q8_1 copy) that run on `matmul_q8`. The packed
/// mat-vec's cost grows with the rows (one f32 FMA per weight element and row): on the
/// H200 an 8B step's products took 6.9 ms on it at 4 rows and 5.6 ms on `matmul_q8` at
/// 2 (docs/perf.md, "Batched decode"), so 2 rows stay on the mat-vec (about half its
/// 4-row time, not measured).
pub const Q8_MIN_ROWS: usize = 3;

/// Most splits of k of one `matmul_q8` launch.
const Q8_MAX_SPLITS: usize = 8;

/// Whether `matmul_q8` takes weights of `dtype`: the packed formats whose scale groups
/// are 32 elements (one 8-bit tensor-core product of k = 32 per group).
pub fn q8_tensor_cores(dtype: DType) -> bool {
    packing::is_packed(dtype) && packed_unit(dtype).2 == 32
}

/// Whether a product of `m` activation rows over a weight of `dtype`, given x's Q8_1
/// copy, runs on `matmul_q8`.
pub fn q8_takes(dtype: DType, m: usize) -> bool {
    m >= Q8_MIN_ROWS && q8_tensor_cores(dtype)
}

/// Dynamic shared memory of `matmul_q8` for weights of `dtype` and tiles of `m_tier`
/// activation rows (kernels/matmul.cu's mq_shared_bytes): two tiles of x's Q8_1
/// blocks (9 words per block, 4 words of padding per row), the f32 scale and sum of
/// each of one tile's blocks, and two tiles of the block's weight rows (each row's
/// bytes padded to 4 words more than a multiple of 8 words).
fn q8_shared_bytes(dtype: DType, m_tier: u32) -> u32 {
    let blocks_x = MQ_KT / Q8_1_BLOCK_ELEMS;
    let row_words = blocks_x * (Q8_1_BLOCK_BYTES / 4) + 4;
    let words = MQ_KT / dtype.block_size() as u32 * dtype.block_bytes() as u32 / 4;
    let weight_stride = 4 * (words + (12 - words % 8) % 8);
    2 * m_tier * row_words * 4 + m_tier * blocks_x * 8 + 2 * MQ_BN * weight_stride
}

/// Splits of k for `matmul_q8` over `n` weight rows and `m` activation rows in tiles
/// of `m_tier`, reducing over `k`, on a device of `multiprocessors`: enough that the
/// grid has about two blocks per multiprocessor, at most [`Q8_MAX_SPLITS`] and one
/// per tile of k. Returns the splits and the tiles of k each takes.
pub fn q8_splits(n: usize, m: usize, m_tier: u32, k: usize, multiprocessors: u32) -> (u32, u32) {
    let blocks = n.div_ceil(MQ_BN as usize) * m.div_ceil(m_tier as usize);
    let tiles = k.div_ceil(MQ_KT as usize);
    let wanted = (2 * multiprocessors as usize)
        .div_ceil(blocks)
        .clamp(1, Q8_MAX_SPLITS.min(tiles));
    let per_split = tiles.div_ceil(wanted);
    (tiles.div_ceil(per_split) as u32, per_split as u32)
}

/// Elements of each weight row a mat-vec block stages per tile.
const MATVEC_TILE_ELEMS: usize = crate::constants::MATVEC_TILE_ELEMS as usize;

/// Shared memory one tile of a mat-vec block's rows may take.
const MATVEC_SLOT_SHARED: usize = 16 * 1024;

/// Shared memory a mat-vec block's tiles in flight may take together.
const MATVEC_SHARED: usize = 64 * 1024;

/// Tiles a mat-vec block keeps in shared memory (one computed while the others load).
const MATVEC_STAGES: std::ops::RangeInclusive<usize> = 2..=4;

/// Which kernel runs a matmul, and its compile-time shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatMulKernel {
    /// kernels/matvec.cu for up to `m_tier` activation rows, with `rows` weight rows
    /// per block, copies of `load` bytes, and `stages` tiles in shared memory.
    MatVec {
        m_tier: u32,
        rows: u32,
        load: u32,
        stages: u32,
    },
    /// kernels/matvec.cu's `matvec_packed` for up to `m_tier` activation rows of a
    /// weight in the planes layout, with `rows` weight rows per warp; `aligned` when
    /// every plane starts at a multiple of 16 bytes.
    MatVecPacked {
        m_tier: u32,
        rows: u32,
        aligned: bool,
    },
    /// kernels/matvec.cu's `matvec_resident` for one activation row of a weight in the
    /// planes layout, given as its Q8_1 copy `x_q8`: blocks of `threads` that hold all
    /// of it in shared memory, compiled for `min_blocks` blocks per multiprocessor;
    /// `aligned` as for `MatVecPacked`.
    MatVecResident {
        threads: u32,
        min_blocks: u32,
        aligned: bool,
    },
    /// kernels/matmul.cu's `matmul`.
    MatMat,
    /// kernels/matmul.cu's `matmul_q8` for tiles of `m_tier` activation rows (of
    /// [`Q8_M_TIERS`]) given as their Q8_1 copy; `aligned` as for `MatVecPacked`.
    MatMatQ8 { m_tier: u32, aligned: bool },
    /// cuBLASLt on bf16 copies of the operands ([`gemm`]); the kernel is
    /// kernels/matmul.cu's `dequant_bf16`, which writes the weight's copy.
    Gemm,
}

/// Elements of a `matvec_packed` unit of a packed dtype, the units a lane loads per
/// round for up to 2 activation rows, and the elements of a scale group (quant.cuh's
/// UNIT_ELEMS, UNITS_IN_FLIGHT and GROUP_ELEMS, which the generated header gives them:
/// [`crate::constants::header`]).
pub(crate) fn packed_unit(dtype: DType) -> (usize, usize, usize) {
    match dtype {
        DType::Q8_0 => (32, 2, 32),
        DType::Q4K => (64, 2, 32),
        DType::Q5K => (64, 1, 32),
        DType::Q6K => (128, 1, 16),
        DType::Q1_0 | DType::TQ2_0 => (128, 2, 32),
        DType::Q2_0 => (64, 4, 32),
        _ => (32, 4, 32),
    }
}

/// Dynamic shared memory of `matvec_packed` for `m_tier` activation rows: one
/// round's activations, each unit's followed by 4 floats of padding, then their sum
/// per scale group (matvec.cu's packed_units, packed_stride, [`PACKED_PAD`] and
/// packed_groups).
fn packed_shared(dtype: DType, m_tier: u32) -> u32 {
    let (unit, in_flight, group) = packed_unit(dtype);
    let m = m_tier as usize;
    let units = if m <= 2 {
        in_flight
    } else {
        (in_flight * 2 / m).max(1)
    };
    (m * 32 * units * (unit + PACKED_PAD as usize + unit / group) * 4) as u32
}

/// Weight rows per warp of `matvec_packed`. Two rows share each activation load, but
/// a warp with one row needs fewer registers (four blocks per multiprocessor instead
/// of three) and the grid has twice the warps; which is faster depends on the format
/// (docs/perf.md). Above 2 activation rows the accumulators need the registers.
fn packed_rows(dtype: DType, m_tier: u32) -> u32 {
    let two_rows_faster = matches!(dtype, DType::Q5_1 | DType::Q4K | DType::Q6K);
    match m_tier {
        1 if two_rows_faster => 2,
        1 => 1,
        2 => 2,
        _ => 1,
    }
}

/// Threads per block and blocks per multiprocessor of `matvec_resident` for one
/// activation row of `dtype`, or `None` where `matvec_packed` measured faster at the
/// benchmark's shapes (docs/perf.md, "The resident mat-vec").
fn resident_shape(dtype: DType) -> Option<(u32, u32)> {
    match dtype {
        DType::Q4_0
        | DType::Q4_1
        | DType::Q5_0
        | DType::Q5_1
        | DType::Q8_0
        | DType::Q4K
        | DType::Q5K
        | DType::Q1_0
        | DType::Q2_0
        | DType::TQ2_0 => Some((1024, 1)),
        // More registers than 64 per thread, which its units need without spilling.
        DType::Q6K => Some((512, 1)),
        _ => None,
    }
}

/// [`resident_shape`] with the same registers per thread in blocks of
/// [`RESIDENT_SMALL_THREADS`]: for weights of fewer than [`RESIDENT_SMALL_BELOW`]
/// rows, whose grid of large blocks leaves multiprocessors idle or unevenly loaded.
fn resident_small_shape(dtype: DType) -> Option<(u32, u32)> {
    resident_shape(dtype).map(|(threads, min_blocks)| {
        (
            RESIDENT_SMALL_THREADS,
            min_blocks * threads / RESIDENT_SMALL_THREADS,
        )
    })
}

/// Threads of a small `matvec_resident` block.
const RESIDENT_SMALL_THREADS: u32 = 256;

/// Weight rows below which `matvec_resident` runs in small blocks: with one row per
/// warp, fewer than 4096 rows fill fewer than 128 blocks of 32 warps and leave
/// multiprocessors of an H100 or H200 idle (2048 rows: 64 of 132). From 4096 rows the
/// large blocks measured faster (docs/perf.md, "Decode on the H200").
const RESIDENT_SMALL_BELOW: usize = 4096;

/// Fewest weight rows `matvec_resident` is chosen for; below, `matvec_packed`.
const RESIDENT_MIN_ROWS: usize = 1024;

/// Most dynamic shared memory `matvec_resident` is chosen with: a block fits every
/// GPU kiln targets (sm_80 and later allow at least 99 KiB per block).
const RESIDENT_MAX_SHARED: usize = 96 * 1024;

/// Dynamic shared memory of `matvec_resident` for one activation row of `k`
/// elements rounded to Q8_1: per unit, its quants and 16 bytes of padding; per
/// scale group, two f32 (matvec.cu's matvec_resident and resident_unit_bytes).
fn resident_shared(dtype: DType, k: usize) -> usize {
    let (unit, _, group) = packed_unit(dtype);
    k / unit * (unit + 16) + 8 * (k / group)
}

/// Blocks of `warps_per_block` warps for `matvec_resident` over `n` weight rows when
/// `resident_warps` warps fit the device at once: each warp takes
/// ceil(n / resident_warps) rows, and the grid has just the warps that needs, so that
/// it is one wave in which every warp has the same work.
pub fn resident_blocks(n: usize, resident_warps: usize, warps_per_block: u32) -> usize {
    let rows_per_warp = n.div_ceil(resident_warps.max(1));
    n.div_ceil(rows_per_warp * warps_per_block as usize)
}

/// The launch of resident mat-vec `kernel` (blocks of `threads`) over `n` rows: the
/// plan's `config` with its grid cut to [`resident_blocks`] for the warps of the kernel
/// the device holds at once (at most the plan's blocks, one row per warp).
pub(crate) fn resident_config(
    backend: &CudaBackend,
    kernel: &crate::nvrtc::CudaKernel,
    config: LaunchConfig,
    n: usize,
    threads: u32,
) -> Result<LaunchConfig> {
    let warps = backend.resident_warps().get(backend, kernel, &config)?;
    let mut launch_config = config;
    launch_config.grid_dim.0 = resident_blocks(n, warps, threads / 32) as u32;
    Ok(launch_config)
}

/// The largest power of two dividing a block of `dtype`, at most 16: the alignment
/// every block start has.
fn block_alignment(dtype: DType) -> u32 {
    let bytes = dtype.block_bytes() as u32;
    (bytes & bytes.wrapping_neg()).min(16)
}

/// Bytes of one weight row's tile of [`MATVEC_TILE_ELEMS`] elements.
fn matvec_tile_bytes(dtype: DType) -> usize {
    // MATVEC_TILE_ELEMS is a multiple of every block size.
    dtype.bytes_for(MATVEC_TILE_ELEMS).unwrap_or(usize::MAX)
}

/// Weight rows per mat-vec block: more rows reuse each activation load more, fewer
/// keep the accumulators of many activation rows in registers; one tile of all rows
/// fits [`MATVEC_SLOT_SHARED`].
fn matvec_rows(dtype: DType, m_tier: u32) -> u32 {
    let by_m = match m_tier {
        1 | 2 => 8,
        4 => 4,
        _ => 2,
    };
    by_m.min((MATVEC_SLOT_SHARED / matvec_tile_bytes(dtype)) as u32)
        .max(1)
}

/// Tiles of `rows` rows a mat-vec block keeps in flight: as many as fit
/// [`MATVEC_SHARED`], within [`MATVEC_STAGES`].
fn matvec_stages(dtype: DType, rows: u32) -> u32 {
    let slot = rows as usize * matvec_tile_bytes(dtype);
    // At most 4.
    (MATVEC_SHARED / slot).clamp(*MATVEC_STAGES.start(), *MATVEC_STAGES.end()) as u32
}

/// Dynamic shared memory of a mat-vec launch: `stages` tiles of `rows` rows.
fn matvec_shared(dtype: DType, rows: u32, stages: u32) -> u32 {
    // At most 4 slots of at most MATVEC_SLOT_SHARED bytes (or one row's tile).
    (stages as usize * rows as usize * matvec_tile_bytes(dtype)) as u32
}

/// The mat-vec kernel for `m` activation rows of a weight of `n` rows of `k` elements in
/// `row_bytes`: `matvec_resident` for one activation row given as a Q8_1 copy (`q8`)
/// and a weight of the dtypes of `resident_shape`, when there are at least
/// RESIDENT_MIN_ROWS rows (in blocks of `resident_small_shape` below
/// RESIDENT_SMALL_BELOW rows) and x fits RESIDENT_MAX_SHARED; else `matvec_packed` for
/// packed dtypes; else the staged kernel, with 16-byte staging loads when rows are
/// 16-byte multiples, else the block alignment.
pub(crate) fn matvec_kernel(
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    row_bytes: usize,
    q8: bool,
) -> MatMulKernel {
    let m_tier = M_TIERS
        .into_iter()
        .find(|&t| t as usize >= m)
        .unwrap_or(M_TIERS[M_TIERS.len() - 1]);
    let aligned = packing::planes_aligned(dtype, k);
    let shape = if n < RESIDENT_SMALL_BELOW {
        resident_small_shape(dtype)
    } else {
        resident_shape(dtype)
    };
    if let Some((threads, min_blocks)) = shape {
        if q8
            && m_tier == 1
            && n >= RESIDENT_MIN_ROWS
            && resident_shared(dtype, k) <= RESIDENT_MAX_SHARED
        {
            return MatMulKernel::MatVecResident {
                threads,
                min_blocks,
                aligned,
            };
        }
    }
    if packing::is_packed(dtype) {
        return MatMulKernel::MatVecPacked {
            m_tier,
            rows: packed_rows(dtype, m_tier),
            aligned,
        };
    }
    let load = if row_bytes % 16 == 0 {
        16
    } else {
        block_alignment(dtype)
    };
    let rows = matvec_rows(dtype, m_tier);
    MatMulKernel::MatVec {
        m_tier,
        rows,
        load,
        stages: matvec_stages(dtype, rows),
    }
}

/// Threads, weight rows and dynamic shared memory of a block of the mat-vec `kernel`
/// over rows of `k` elements of `dtype` (`matvec_resident`: one row per warp, the grid
/// then fitted to the device); `None` for the mat-mat kernels.
pub(crate) fn matvec_block_shape(
    dtype: DType,
    kernel: MatMulKernel,
    k: usize,
) -> Option<(u32, u32, u32)> {
    Some(match kernel {
        MatMulKernel::MatVec { rows, stages, .. } => {
            (MATVEC_THREADS, rows, matvec_shared(dtype, rows, stages))
        }
        MatMulKernel::MatVecPacked { m_tier, rows, .. } => (
            MATVEC_THREADS,
            rows * MATVEC_THREADS / 32,
            packed_shared(dtype, m_tier),
        ),
        // At most RESIDENT_MAX_SHARED where matvec_kernel picks it.
        MatMulKernel::MatVecResident { threads, .. } => {
            (threads, threads / 32, resident_shared(dtype, k) as u32)
        }
        MatMulKernel::MatMat | MatMulKernel::MatMatQ8 { .. } | MatMulKernel::Gemm => return None,
    })
}

/// The specialisation of `kernel` for weights of `dtype`.
pub fn spec(dtype: DType, kernel: MatMulKernel) -> Result<KernelSpec> {
    let tag = weight_tag(OP, dtype)?;
    Ok(match kernel {
        MatMulKernel::MatVec {
            m_tier,
            rows,
            load,
            stages,
        } => MATVEC.spec(
            format!("matvec|w={dtype}|m={m_tier}|rows={rows}|load={load}|stages={stages}"),
            format!("kiln::matvec<{tag}, {m_tier}, {rows}, {load}, {stages}>"),
        ),
        MatMulKernel::MatVecPacked {
            m_tier,
            rows,
            aligned,
        } => MATVEC.spec(
            format!(
                "matvec_packed|w={dtype}|m={m_tier}|rows={rows}|aligned={}",
                u8::from(aligned)
            ),
            format!("kiln::matvec_packed<{tag}, {m_tier}, {rows}, {aligned}>"),
        ),
        MatMulKernel::MatVecResident {
            threads,
            min_blocks,
            aligned,
        } => MATVEC.spec(
            format!(
                "matvec_resident|w={dtype}|threads={threads}|min_blocks={min_blocks}|aligned={}",
                u8::from(aligned)
            ),
            format!("kiln::matvec_resident<{tag}, {aligned}, {threads}, {min_blocks}>"),
        ),
        MatMulKernel::MatMat => {
            MATMUL.spec(format!("matmat|w={dtype}"), format!("kiln::matmul<{tag}>"))
        }
        MatMulKernel::MatMatQ8 { m_tier, aligned } => MATMUL.spec(
            format!(
                "matmul_q8|w={dtype}|m={m_tier}|aligned={}",
                u8::from(aligned)
            ),
            format!("kiln::matmul_q8<{tag}, {}, {aligned}>", m_tier / 8),
        ),
        MatMulKernel::Gemm => MATMUL.spec(
            format!("dequant_bf16|w={dtype}"),
            format!("kiln::dequant_bf16<{tag}>"),
        ),
    })
}

/// Every `matvec_resident` shape: for each dtype it runs, large and small blocks, both
/// plane alignments.
pub(crate) fn resident_kernels() -> Vec<(DType, MatMulKernel)> {
    let mut kernels = Vec::new();
    for dtype in WEIGHT_DTYPES {
        let shapes = [resident_shape(dtype), resident_small_shape(dtype)];
        for (threads, min_blocks) in shapes.into_iter().flatten() {
            for aligned in [true, false] {
                kernels.push((
                    dtype,
                    MatMulKernel::MatVecResident {
                        threads,
                        min_blocks,
                        aligned,
                    },
                ));
            }
        }
    }
    kernels
}

/// The `matvec_packed` (packed dtypes: both plane alignments) or staged mat-vec
/// kernels (both staging widths) of `dtype` for `m_tier` activation rows.
pub(crate) fn streaming_kernels(dtype: DType, m_tier: u32) -> Vec<MatMulKernel> {
    if packing::is_packed(dtype) {
        return [true, false]
            .map(|aligned| MatMulKernel::MatVecPacked {
                m_tier,
                rows: packed_rows(dtype, m_tier),
                aligned,
            })
            .to_vec();
    }
    let rows = matvec_rows(dtype, m_tier);
    let stages = matvec_stages(dtype, rows);
    let mut kernels = Vec::new();
    for load in [16, block_alignment(dtype)] {
        let k = MatMulKernel::MatVec {
            m_tier,
            rows,
            load,
            stages,
        };
        if !kernels.contains(&k) {
            kernels.push(k);
        }
    }
    kernels
}

/// Every matmul specialisation: for each weight dtype, each mat-vec tier (and the
/// resident kernels), the mat-mat kernel and the weight decoder of the cuBLASLt path.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    let mut kernels = Vec::new();
    for dtype in WEIGHT_DTYPES {
        kernels.extend(resident_kernels().into_iter().filter(|&(d, _)| d == dtype));
        for m_tier in M_TIERS {
            kernels.extend(
                streaming_kernels(dtype, m_tier)
                    .into_iter()
                    .map(|k| (dtype, k)),
            );
        }
        kernels.push((dtype, MatMulKernel::MatMat));
        kernels.push((dtype, MatMulKernel::Gemm));
        if q8_tensor_cores(dtype) {
            for m_tier in Q8_M_TIERS {
                for aligned in [true, false] {
                    kernels.push((dtype, MatMulKernel::MatMatQ8 { m_tier, aligned }));
                }
            }
        }
    }
    // Every weight dtype has a tag.
    let mut specs: Vec<KernelSpec> = kernels
        .into_iter()
        .filter_map(|(d, k)| spec(d, k).ok())
        .collect();
    specs.push(q8_reduce_spec());
    specs
}

/// The kernel that adds the partial sums of a `matmul_q8` split over k.
fn q8_reduce_spec() -> KernelSpec {
    MATMUL.spec(
        "matmul_q8_reduce|out=f32".into(),
        "kiln::matmul_q8_reduce".into(),
    )
}

/// Warps of `matvec_resident` that fit the device at once, per kernel and shared
/// memory size: the driver's occupancy, asked once for each.
#[derive(Default)]
pub struct ResidentWarps {
    known: Mutex<HashMap<(String, u32), usize>>,
}

impl ResidentWarps {
    /// Warps of `kernel` launched with `config`'s block and shared memory that the
    /// device's multiprocessors hold at once.
    pub(crate) fn get(
        &self,
        backend: &CudaBackend,
        kernel: &CudaKernel,
        config: &LaunchConfig,
    ) -> Result<usize> {
        let key = (kernel.key.clone(), config.shared_mem_bytes);
        // A poisoned lock still holds whole entries (each is inserted in one step).
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&warps) = known.get(&key) {
            return Ok(warps);
        }
        let threads = config.block_dim.0;
        let blocks = kernel
            .function
            .occupancy_max_active_blocks_per_multiprocessor(
                threads,
                config.shared_mem_bytes as usize,
                None,
            )
            .map_err(|e| driver_error(&format!("{}: its occupancy", kernel.key), e))?;
        let warps = backend.multiprocessors() as usize * blocks as usize * (threads / 32) as usize;
        known.insert(key, warps);
        Ok(warps)
    }
}

/// A matmul's shape, weight dtype and operand sizes in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct MatMulArgs {
    pub weight: DType,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub x_bytes: usize,
    /// Bytes of the Q8_1 copy of x, when there is one.
    pub x_q8_bytes: Option<usize>,
    pub w_bytes: usize,
    /// The dtype and row length the weight buffer was packed for
    /// ([`CudaBuffer::packed`]); packed dtypes need `Some((weight, k))`.
    pub w_packed: Option<(DType, usize)>,
    pub bias_bytes: Option<usize>,
    pub out_bytes: usize,
    /// Fewest activation rows the cuBLASLt path takes (`usize::MAX`: never), as
    /// [`CudaBackend::gemm_min_rows`] gives it.
    pub gemm_min_rows: usize,
}

/// A checked matmul launch.
#[derive(Clone, Debug)]
pub struct MatMulPlan {
    pub kernel: MatMulKernel,
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    /// Launches of the mat-vec kernel, one per group of up to [`MATVEC_MAX_ROWS`]
    /// activation rows (1 for every other kernel).
    pub row_groups: u32,
    m: u32,
    n: u32,
    k: u32,
    row_bytes: u64,
}

impl MatMulArgs {
    /// The arguments of `op` in `graph`, its weight uploaded with `upload_weight` (as
    /// a graph's weights are), on cuBLASLt from `gemm_min_rows` rows.
    pub fn of_op(
        graph: &kiln_core::Graph,
        op: &kiln_core::ops::MatMul,
        gemm_min_rows: usize,
    ) -> Result<Self> {
        let bytes = |id| graph.desc(id).map(|d| d.bytes());
        let weight = graph.desc(op.w)?.dtype;
        Ok(Self {
            weight,
            m: op.m,
            n: op.n,
            k: op.k,
            x_bytes: bytes(op.x)?,
            x_q8_bytes: op.x_q8.map(bytes).transpose()?,
            w_bytes: bytes(op.w)?,
            w_packed: Some((weight, op.k)),
            bias_bytes: op.bias.map(bytes).transpose()?,
            out_bytes: bytes(op.out)?,
            gemm_min_rows,
        })
    }

    /// Checks non-zero sizes; a weight dtype of [`WEIGHT_DTYPES`] whose blocks divide
    /// `k`; buffers of `m x k` F32 activations (and their optional Q8_1 copy, `k` a
    /// multiple of 32), `n x k` weights, the optional `n` F32 bias and `m x n` F32
    /// outputs; and grid limits. Picks the mat-vec kernel for `m <= 8`; above, the
    /// cuBLASLt path from `gemm_min_rows` rows when `k` is a multiple of 8, else the
    /// mat-mat kernel.
    pub fn check(&self) -> Result<MatMulPlan> {
        check_nonzero(OP, &[("m", self.m), ("n", self.n), ("k", self.k)])?;
        weight_tag(OP, self.weight)?;
        let bs = self.weight.block_size();
        if self.k % bs != 0 {
            return Err(Error::invalid(
                OP,
                format!(
                    "k {} is not a multiple of {}'s block size {bs}",
                    self.k, self.weight
                ),
            ));
        }
        let x_elements = count(OP, &[self.m, self.k])?;
        check_bytes(OP, "x", self.x_bytes, DType::F32, x_elements)?;
        check_q8_copy(OP, "x_q8", self.x_q8_bytes, x_elements, self.k)?;
        check_bytes(
            OP,
            "w",
            self.w_bytes,
            self.weight,
            count(OP, &[self.n, self.k])?,
        )?;
        check_packed(OP, "w", self.weight, self.k, self.w_packed)?;
        if let Some(bytes) = self.bias_bytes {
            check_bytes(OP, "bias", bytes, DType::F32, self.n)?;
        }
        check_bytes(
            OP,
            "out",
            self.out_bytes,
            DType::F32,
            count(OP, &[self.m, self.n])?,
        )?;
        let row_bytes = self.weight.bytes_for(self.k)?;
        let q8 = self.x_q8_bytes.is_some();
        let q8_mma = q8 && q8_takes(self.weight, self.m);
        // With x's copy, a product of more rows than a mat-vec takes runs as mat-vecs
        // of the copy where matmul_q8 does not take the weight: the copy's values
        // are the definition's operands.
        let grouped = !q8_mma
            && self.m > MATVEC_MAX_ROWS
            && (q8
                || self.m < MATVEC_GROUPS_BELOW && !gemm_takes(self.m, self.k, self.gemm_min_rows));
        let row_groups = if grouped {
            self.m.div_ceil(MATVEC_MAX_ROWS)
        } else {
            1
        };
        let (kernel, launch_config) = if q8_mma {
            let m_tier = Q8_M_TIERS
                .into_iter()
                .find(|&t| t as usize >= self.m)
                .unwrap_or(Q8_M_TIERS[Q8_M_TIERS.len() - 1]);
            let x = grid_dim(OP, "n", self.n.div_ceil(MQ_BN as usize), MAX_GRID_X)?;
            let y = grid_dim(OP, "m", self.m.div_ceil(m_tier as usize), MAX_GRID_YZ)?;
            let kernel = MatMulKernel::MatMatQ8 {
                m_tier,
                aligned: packing::planes_aligned(self.weight, self.k),
            };
            let shared = q8_shared_bytes(self.weight, m_tier);
            (kernel, config((x, y, 1), MQ_WARPS * 32, shared))
        } else if self.m <= MATVEC_MAX_ROWS || grouped {
            let rows = self.m.min(MATVEC_MAX_ROWS);
            let kernel = matvec_kernel(self.weight, rows, self.n, self.k, row_bytes, q8);
            let (threads, rows_per_block, shared) = matvec_block_shape(self.weight, kernel, self.k)
                .ok_or_else(|| {
                    Error::invalid(OP, "the mat-vec choice returned a mat-mat kernel")
                })?;
            let blocks = grid_dim(
                OP,
                "n",
                self.n.div_ceil(rows_per_block as usize),
                MAX_GRID_X,
            )?;
            (kernel, config((blocks, 1, 1), threads, shared))
        } else if gemm_takes(self.m, self.k, self.gemm_min_rows) {
            // The weight decoder's launch: one thread per chunk of 8 elements.
            (MatMulKernel::Gemm, super::grid_1d(self.n * self.k / 8))
        } else {
            let x = grid_dim(OP, "n", self.n.div_ceil(MM_BN as usize), MAX_GRID_X)?;
            let y = grid_dim(OP, "m", self.m.div_ceil(MM_BM as usize), MAX_GRID_YZ)?;
            (MatMulKernel::MatMat, config((x, y, 1), MM_THREADS, 0))
        };
        Ok(MatMulPlan {
            kernel,
            spec: spec(self.weight, kernel)?,
            config: launch_config,
            row_groups: to_u32(OP, "m", row_groups)?,
            m: to_u32(OP, "m", self.m)?,
            n: to_u32(OP, "n", self.n)?,
            k: to_u32(OP, "k", self.k)?,
            row_bytes: row_bytes as u64,
        })
    }
}

impl MatMulPlan {
    /// Every kernel the launch may run: the plan's, on the cuBLASLt path the cast of x
    /// to bf16 after the weight decoder, and after `matmul_q8` the sum of its splits.
    pub fn specs(&self) -> Result<Vec<KernelSpec>> {
        let mut specs = vec![self.spec.clone()];
        match self.kernel {
            MatMulKernel::Gemm => specs.push(super::cast::spec(DType::F32, DType::BF16)?),
            MatMulKernel::MatMatQ8 { .. } => specs.push(q8_reduce_spec()),
            _ => {}
        }
        Ok(specs)
    }
}

/// Whether a mat-mat of `m` rows (more than [`MATVEC_MAX_ROWS`]) reducing over `k`
/// runs on cuBLASLt when it takes `min_rows` rows and more.
fn gemm_takes(m: usize, k: usize, min_rows: usize) -> bool {
    m >= min_rows && k % GEMM_K_MULTIPLE == 0
}

/// The activations of a matmul: `x`, F32, and optionally its Q8_1 copy `x_q8`
/// ([`kiln_core::ops::Q8_COPY`]).
#[derive(Clone, Copy)]
pub struct Activations<'a> {
    pub x: &'a CudaBuffer,
    pub x_q8: Option<&'a CudaBuffer>,
}

impl<'a> From<&'a CudaBuffer> for Activations<'a> {
    /// F32 activations without a Q8_1 copy.
    fn from(x: &'a CudaBuffer) -> Self {
        Self { x, x_q8: None }
    }
}

/// `out = x · wᵀ (+ bias)` for `m x k` F32 activations and an `n x k` weight of
/// `dtype`, as [`kiln_core::ops::MatMul`] defines: with a Q8_1 copy `x_q8` (mat-vec
/// only) the product reads the copy. The mat-mat (`m > 8`, cuBLASLt or kiln's kernel)
/// multiplies bf16-rounded operands on tensor cores, accumulating in f32.
#[allow(clippy::too_many_arguments)] // the op's operands and shape, each named
pub fn matmul<'a>(
    backend: &CudaBackend,
    x: impl Into<Activations<'a>>,
    w: &CudaBuffer,
    dtype: DType,
    bias: Option<&CudaBuffer>,
    out: &mut CudaBuffer,
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    let Activations { x, x_q8 } = x.into();
    let plan = MatMulArgs {
        weight: dtype,
        m,
        n,
        k,
        x_bytes: x.bytes(),
        x_q8_bytes: x_q8.map(|q| q.bytes()),
        w_bytes: w.bytes(),
        w_packed: w.packed(),
        bias_bytes: bias.map(|b| b.bytes()),
        out_bytes: out.bytes(),
        // Asked only for a mat-mat: the first ask loads cuBLASLt.
        gemm_min_rows: if m > MATVEC_MAX_ROWS {
            backend.gemm_min_rows()
        } else {
            usize::MAX
        },
    }
    .check()?;
    if plan.kernel == MatMulKernel::Gemm {
        return gemm::gemm(backend, x, w, dtype, bias, out, (m, n, k), plan.row_bytes);
    }
    let kernel = backend.kernel(&plan.spec)?;
    allow_dynamic_shared(&kernel, &plan.config)?;
    let mut launch_config = plan.config;
    if let MatMulKernel::MatVecResident { threads, .. } = plan.kernel {
        launch_config = resident_config(backend, &kernel, plan.config, n, threads)?;
    }
    if plan.row_groups > 1 {
        return row_groups(backend, &kernel, &plan, x, x_q8, w, bias, out);
    }
    if let MatMulKernel::MatMatQ8 { m_tier, .. } = plan.kernel {
        let x_q8 = x_q8.ok_or_else(|| Error::invalid(OP, "matmul_q8 reads x's Q8_1 copy"))?;
        return matmul_q8(backend, &kernel, &plan, m_tier, x_q8, w, bias, out);
    }
    let mut args = KernelArgs::new(backend);
    args.arg(w.slice());
    match plan.kernel {
        MatMulKernel::MatVecResident { .. } => args.arg(x_q8.map(|q| q.slice())),
        MatMulKernel::MatMat => args.arg(x.slice()),
        _ => args.arg(x.slice()).arg(x_q8.map(|q| q.slice())),
    };
    args.arg(bias.map(|b| b.slice()))
        .arg(out.slice_mut())
        .arg(&plan.m)
        .arg(&plan.n)
        .arg(&plan.k)
        .arg(&plan.row_bytes);
    if plan.kernel == MatMulKernel::MatMat {
        args.serialized();
    }
    // SAFETY: the arguments match `kiln::matmul<W>`: (const u8* w, const float* x,
    // const float* bias, float* out, u32 m, u32 n, u32 k, u64 row_bytes);
    // `kiln::matvec<W, M, ROWS, LOAD, STAGES>` and `kiln::matvec_packed<W, M, R,
    // ALIGNED>`, which take const u8* xq8 after x; and `kiln::matvec_resident<W,
    // ALIGNED, THREADS, MIN_BLOCKS>`, which takes xq8 in place of x. The buffers hold
    // their elements (checked); xq8 is null (never for the resident kernel, which
    // the plan picks only with a copy) or holds m * k / 32 Q8_1 blocks; bias is null
    // or holds n values; the mat-vec tier holds m rows.
    unsafe { launch(&kernel, &mut args, launch_config) }
}

/// The mat-vec `kernel` of a checked `plan` launched once per group of up to
/// [`MATVEC_MAX_ROWS`] rows of x (and of its Q8_1 copy, when given), each writing its
/// rows of out.
#[allow(clippy::too_many_arguments)] // the op's operands, each named
fn row_groups(
    backend: &CudaBackend,
    kernel: &std::sync::Arc<CudaKernel>,
    plan: &MatMulPlan,
    x: &CudaBuffer,
    x_q8: Option<&CudaBuffer>,
    w: &CudaBuffer,
    bias: Option<&CudaBuffer>,
    out: &mut CudaBuffer,
) -> Result<()> {
    let (m, n, k) = (plan.m as usize, plan.n as usize, plan.k as usize);
    // Bytes of one row of the copy (the plan checked whole blocks).
    let q8_row = k / Q8_1_BLOCK_ELEMS as usize * Q8_1_BLOCK_BYTES as usize;
    for group in 0..plan.row_groups as usize {
        let first = group * MATVEC_MAX_ROWS;
        let rows = (m - first).min(MATVEC_MAX_ROWS);
        let x_rows = x.slice().slice(4 * first * k..4 * (first + rows) * k);
        let q8_rows = x_q8.map(|q| q.slice().slice(q8_row * first..q8_row * (first + rows)));
        let mut out_rows = out
            .slice_mut()
            .slice_mut(4 * first * n..4 * (first + rows) * n);
        let rows = rows as u32;
        let mut args = KernelArgs::new(backend);
        args.arg(w.slice())
            .arg(&x_rows)
            .arg(q8_rows.as_ref())
            .arg(bias.map(|b| b.slice()))
            .arg(&mut out_rows)
            .arg(&rows)
            .arg(&plan.n)
            .arg(&plan.k)
            .arg(&plan.row_bytes);
        // SAFETY: as for `matmul`'s mat-vec launch: `kernel` is the plan's
        // `kiln::matvec<W, 8, ..>` or `kiln::matvec_packed<W, 8, ..>` (const u8* w, const
        // float* x, const u8* xq8, const float* bias, float* out, u32 m, u32 n, u32 k, u64
        // row_bytes); x's view holds this group's `rows` rows of k f32, xq8's (null or)
        // their Q8_1 blocks and out's their rows of n (the plan checked m x k, the copy
        // and m x n), bias null or n values.
        unsafe { launch(kernel, &mut args, plan.config) }?;
    }
    Ok(())
}

/// `matmul_q8` of a checked `plan` (tiles of `m_tier` rows): split over k as
/// [`q8_splits`] says for the device, its partial sums in the backend's workspace
/// added by `matmul_q8_reduce`.
#[allow(clippy::too_many_arguments)] // the op's operands, each named
fn matmul_q8(
    backend: &CudaBackend,
    kernel: &std::sync::Arc<CudaKernel>,
    plan: &MatMulPlan,
    m_tier: u32,
    x_q8: &CudaBuffer,
    w: &CudaBuffer,
    bias: Option<&CudaBuffer>,
    out: &mut CudaBuffer,
) -> Result<()> {
    let (m, n, k) = (plan.m as usize, plan.n as usize, plan.k as usize);
    let (splits, per_split) = q8_splits(n, m, m_tier, k, backend.multiprocessors());
    let mut launch_config = plan.config;
    launch_config.grid_dim.2 = splits;
    let outputs = count(OP, &[m, n])?;
    let mut workspace = if splits > 1 {
        Some(
            backend
                .matmul_workspace()
                .at_least(backend, 4 * outputs * splits as usize)?,
        )
    } else {
        None
    };
    let work = workspace.as_mut().and_then(|held| held.last_mut());
    let mut args = KernelArgs::new(backend);
    args.arg(w.slice())
        .arg(x_q8.slice())
        .arg(bias.map(|b| b.slice()))
        .arg(out.slice_mut())
        .arg(work.map(|b| b.slice_mut()))
        .arg(&plan.m)
        .arg(&plan.n)
        .arg(&plan.k)
        .arg(&plan.row_bytes)
        .arg(&per_split);
    args.serialized();
    // SAFETY: the arguments match `kiln::matmul_q8<W, NT, ALIGNED>` (const u8* w, const
    // u8* xq8, const float* bias, float* out, float* work, u32 m, u32 n, u32 k, u64
    // row_bytes, u32 tiles_per_split): the plan checked w (n rows of row_bytes), x's
    // copy (m x k / 32 Q8_1 blocks), bias (null or n) and out (m x n); work is null
    // for one split, else holds splits x m x n f32; the grid's z is the splits.
    unsafe { launch(kernel, &mut args, launch_config) }?;
    let Some(held) = workspace.as_mut() else {
        return Ok(());
    };
    let work = held.last_mut().expect("the workspace holds a buffer");
    let reduce = backend.kernel(&q8_reduce_spec())?;
    let mut args = KernelArgs::new(backend);
    args.arg(work.slice())
        .arg(bias.map(|b| b.slice()))
        .arg(out.slice_mut())
        .arg(&plan.m)
        .arg(&plan.n)
        .arg(&splits);
    args.serialized();
    // SAFETY: `kiln::matmul_q8_reduce` (const float* work, const float* bias, float*
    // out, u32 m, u32 n, u32 splits): work holds the splits' m x n partial sums just
    // written, bias null or n values, out m x n.
    unsafe { launch(&reduce, &mut args, super::grid_1d(outputs)) }
}
