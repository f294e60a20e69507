//! Dispatch for [`kiln_core::ops::Sample`] (kernels/sample.cu; with `temperature <= 0`
//! the argmax kernel, which step 1 of the definition is; [`sample_with`] runs any
//! setting on the sampling kernel, its greedy pass included).
//!
//! One row per cluster of 8 blocks ([`TUNING`]) of [`THREADS`] threads on devices of
//! compute capability 9.0 and later (one block per row elsewhere), each block
//! holding a slice of the row in shared memory as far as the device allows. The
//! launch needs no workspace: the blocks of a cluster share their results through
//! distributed shared memory, so nothing outlives it and every launch starts clean.

use cudarc::driver::{sys, LaunchConfig};
use kiln_core::ops::SampleParams;
use kiln_core::{DType, DeviceBuffer, Error, Result};

use super::common::{allow_dynamic_shared, config, grid_dim, launch, MAX_GRID_X};
use super::{check_bytes, check_nonzero, count};
use crate::context::driver_error;
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::registry::{KernelSource, KernelSpec};
use crate::{CudaBackend, CudaBuffer};

/// [`kiln_core::ops::Sample`].
pub const SAMPLE: Family = Family {
    name: "sample",
    source: KernelSource {
        name: "sample.cu",
        text: include_str!("../../kernels/sample.cu"),
    },
};

const OP: &str = "sample";

/// Threads per block.
pub const THREADS: u32 = 512;

/// Bytes of the kernel's `Control` (kernels/sample.cu's `SAMPLE_CONTROL_BYTES`).
const CONTROL_BYTES: usize = 2048;

/// The kernel's sizes, its template arguments: a row's cluster has `cluster_blocks`
/// blocks (on devices with clusters; more than 8 is a size the device must allow), the
/// top `bucket_bits` bits of a candidate's rank key are its bucket, a bucket with more
/// candidates than `list` is histogrammed again on the next `digit_bits` bits, and a
/// gather takes the buckets above the one it needs while their candidates number at
/// most `budget`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleTuning {
    pub cluster_blocks: u32,
    pub bucket_bits: u32,
    pub digit_bits: u32,
    pub list: u32,
    pub budget: u32,
}

/// The tuning every dispatch uses: 2048 buckets, 8-bit digits, a list of 1024.
pub const TUNING: SampleTuning = SampleTuning {
    cluster_blocks: 8,
    bucket_bits: 11,
    digit_bits: 8,
    list: 1024,
    budget: 512,
};

/// A tuning for tests: 32 buckets, 3-bit digits and a list of 16, so that small rows
/// take every path (refinement down to the index bits, lists of several buckets).
pub const STRESS: SampleTuning = SampleTuning {
    cluster_blocks: 8,
    bucket_bits: 5,
    digit_bits: 3,
    list: 16,
    budget: 8,
};

impl SampleTuning {
    /// Errors unless the kernel takes these sizes: 1 to 16 blocks a cluster, a power
    /// of two dividing both histograms; 5 to 15 bucket bits; 1 to `bucket_bits` digit
    /// bits; a list of a power of two from 2, and a budget at most the list.
    pub fn check(&self) -> Result<()> {
        let ok = self.cluster_blocks.is_power_of_two()
            && self.cluster_blocks <= 16
            && (5..=15).contains(&self.bucket_bits)
            && (1..=self.bucket_bits).contains(&self.digit_bits)
            && (1u32 << self.digit_bits) % self.cluster_blocks == 0
            && self.list >= 2
            && self.list.is_power_of_two()
            && self.budget <= self.list;
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(
                OP,
                format!("the kernel does not take {self:?}"),
            ))
        }
    }

    /// Bytes of the kernel's fixed shared memory: `Control`, the two histograms, the
    /// list with its two running sums (rounded up to 16).
    pub fn fixed_shared_bytes(&self) -> usize {
        let (b1, b2, list) = (
            1usize << self.bucket_bits,
            1usize << self.digit_bits,
            self.list as usize,
        );
        (CONTROL_BYTES + 8 * (2 * b1 + 2 * b2 + 3 * list) + 4 * (b1 + b2)).next_multiple_of(16)
    }
}

/// How rows map to blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleLayout {
    /// The dispatch's kernel: a cluster of the tuning's blocks per row where the device
    /// has clusters (compute capability 9.0 and later), one block per row elsewhere.
    Cluster,
    /// One block per row on every device (tests and benchmarks).
    Block,
}

/// The sampling specialisation with `tuning` and `layout`.
pub fn spec_with(tuning: SampleTuning, layout: SampleLayout) -> KernelSpec {
    let SampleTuning {
        cluster_blocks,
        bucket_bits,
        digit_bits,
        list,
        budget,
    } = tuning;
    let sizes = format!(
        "threads={THREADS}|bucket_bits={bucket_bits}|digit_bits={digit_bits}|list={list}|budget={budget}"
    );
    match layout {
        SampleLayout::Cluster => SAMPLE.spec(
            format!("sample|{sizes}|cluster={cluster_blocks}"),
            format!(
                "kiln::sample<{THREADS}, {cluster_blocks}, {bucket_bits}, {digit_bits}, {list}, {budget}>"
            ),
        ),
        SampleLayout::Block => SAMPLE.spec(
            format!("sample_block|{sizes}"),
            format!("kiln::sample_block<{THREADS}, {bucket_bits}, {digit_bits}, {list}, {budget}>"),
        ),
    }
}

/// The specialisation every dispatch uses ([`TUNING`], [`SampleLayout::Cluster`]).
pub fn spec() -> KernelSpec {
    spec_with(TUNING, SampleLayout::Cluster)
}

/// The specialisation that runs a sample op with `params`: the argmax kernel for
/// `temperature <= 0` (step 1 of the definition), else [`spec`].
pub fn spec_for(params: &SampleParams) -> KernelSpec {
    if params.temperature <= 0.0 {
        super::argmax::spec()
    } else {
        spec()
    }
}

/// What a launch plan depends on in the device: whether it has thread block clusters
/// (compute capability 9.0 and later) and the most dynamic shared memory a block may
/// opt in to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleDevice {
    pub clusters: bool,
    pub max_shared_bytes: usize,
}

impl SampleDevice {
    /// An H100 or H200: clusters, 227 KiB of shared memory per block.
    pub const HOPPER: SampleDevice = SampleDevice {
        clusters: true,
        max_shared_bytes: 232_448,
    };

    /// The backend's device.
    pub fn of(backend: &CudaBackend) -> Result<Self> {
        let device = backend.device();
        let max_shared = device
            .context()
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| driver_error("reading the shared memory per block", e))?;
        Ok(SampleDevice {
            clusters: device.compute_capability().0 >= 9,
            // A count the driver reports, non-negative.
            max_shared_bytes: usize::try_from(max_shared).unwrap_or(0),
        })
    }
}

/// A sample op's shape, settings and operand sizes in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleArgs {
    pub rows: usize,
    pub vocab: usize,
    pub params: SampleParams,
    pub logits_bytes: usize,
    pub uniform_bytes: usize,
    pub out_bytes: usize,
}

/// A checked sampling launch.
#[derive(Clone, Debug)]
pub struct SamplePlan {
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    /// Blocks per row.
    pub blocks_per_row: u32,
    /// Logits per block (the last blocks of a row may hold fewer, or none).
    pub chunk: u32,
    /// Whether the blocks stage their logits in shared memory, and also cache their
    /// buckets there.
    pub staged: bool,
    pub buckets_cached: bool,
    vocab: u32,
    /// `top_k` clamped to `vocab` (the same candidates).
    top_k: u32,
}

impl SampleArgs {
    /// The arguments of a launch over these buffers.
    fn of(
        logits: &CudaBuffer,
        uniform: &CudaBuffer,
        out: &CudaBuffer,
        rows: usize,
        vocab: usize,
        params: &SampleParams,
    ) -> Self {
        SampleArgs {
            rows,
            vocab,
            params: *params,
            logits_bytes: logits.bytes(),
            uniform_bytes: uniform.bytes(),
            out_bytes: out.bytes(),
        }
    }

    /// Checks non-zero sizes, `vocab` within an I32 index, the settings' ranges (finite
    /// temperature, `top_p` in `(0, 1]`, `min_p` in `[0, 1]`), `rows x vocab` F32
    /// logits, `rows` F32 uniforms and `rows` I32 outputs; plans the launch of the
    /// dispatch's kernel on `device`.
    pub fn check(&self, device: &SampleDevice) -> Result<SamplePlan> {
        self.check_with(device, TUNING, SampleLayout::Cluster)
    }

    /// [`SampleArgs::check`] for the kernel of `tuning` and `layout`.
    pub fn check_with(
        &self,
        device: &SampleDevice,
        tuning: SampleTuning,
        layout: SampleLayout,
    ) -> Result<SamplePlan> {
        check_nonzero(OP, &[("rows", self.rows), ("vocab", self.vocab)])?;
        let vocab = i32::try_from(self.vocab).map_err(|_| {
            Error::invalid(
                OP,
                format!("vocab {} does not fit an I32 index", self.vocab),
            )
        })?;
        check_params(&self.params)?;
        tuning.check()?;
        check_bytes(
            OP,
            "logits",
            self.logits_bytes,
            DType::F32,
            count(OP, &[self.rows, self.vocab])?,
        )?;
        check_bytes(OP, "uniform", self.uniform_bytes, DType::F32, self.rows)?;
        check_bytes(OP, "out", self.out_bytes, DType::I32, self.rows)?;
        let blocks_per_row = match layout {
            SampleLayout::Cluster if device.clusters => tuning.cluster_blocks,
            _ => 1,
        };
        let blocks = count(OP, &[self.rows, blocks_per_row as usize])?;
        let grid = grid_dim(OP, "rows", blocks, MAX_GRID_X)?;
        // Whole multiples of 8 logits per block (aligned vector loads).
        let chunk = self
            .vocab
            .div_ceil(blocks_per_row as usize)
            .next_multiple_of(8);
        let fixed = tuning.fixed_shared_bytes();
        if fixed > device.max_shared_bytes {
            return Err(Error::Unsupported(format!(
                "sample: the kernel needs {fixed} bytes of shared memory per block, the device allows {}",
                device.max_shared_bytes
            )));
        }
        let (staged, buckets_cached) = if fixed + 6 * chunk <= device.max_shared_bytes {
            (true, true)
        } else {
            (fixed + 4 * chunk <= device.max_shared_bytes, false)
        };
        let shared = fixed
            + if buckets_cached {
                6 * chunk
            } else if staged {
                4 * chunk
            } else {
                0
            };
        Ok(SamplePlan {
            spec: spec_with(tuning, layout),
            // At most the device's shared memory per block, which fits u32.
            config: config((grid, 1, 1), THREADS, shared as u32),
            blocks_per_row,
            // At most vocab (rounded up by less than 8), which fits u32 with room.
            chunk: chunk as u32,
            staged,
            buckets_cached,
            // Non-negative (checked non-zero, and from usize).
            vocab: vocab as u32,
            // At most vocab, which fits u32.
            top_k: self.params.top_k.min(self.vocab) as u32,
        })
    }
}

fn check_params(p: &SampleParams) -> Result<()> {
    let fail = |msg: String| Err(Error::invalid(OP, msg));
    if !p.temperature.is_finite() {
        return fail(format!("temperature must be finite, got {}", p.temperature));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return fail(format!("top_p must be in (0, 1], got {}", p.top_p));
    }
    if !(0.0..=1.0).contains(&p.min_p) {
        return fail(format!("min_p must be in [0, 1], got {}", p.min_p));
    }
    Ok(())
}

/// One token id per row of `logits` (`rows x vocab` F32) with `uniform` (`rows` F32
/// numbers in `[0, 1)`), as [`kiln_core::ops::Sample`] defines, into `out` (`rows`
/// I32).
pub fn sample(
    backend: &CudaBackend,
    logits: &CudaBuffer,
    uniform: &CudaBuffer,
    out: &mut CudaBuffer,
    rows: usize,
    vocab: usize,
    params: &SampleParams,
) -> Result<()> {
    if params.temperature <= 0.0 {
        // Step 1 of the definition, on the argmax kernel, after the same checks.
        SampleArgs::of(logits, uniform, out, rows, vocab, params).check_with(
            &SampleDevice::of(backend)?,
            TUNING,
            SampleLayout::Cluster,
        )?;
        return super::argmax::argmax(backend, logits, out, rows, vocab);
    }
    sample_with(
        backend,
        logits,
        uniform,
        out,
        rows,
        vocab,
        params,
        TUNING,
        SampleLayout::Cluster,
    )
}

/// [`sample`] with the kernel of `tuning` and `layout`.
#[allow(clippy::too_many_arguments)] // the op's operands, each named, and the kernel
pub fn sample_with(
    backend: &CudaBackend,
    logits: &CudaBuffer,
    uniform: &CudaBuffer,
    out: &mut CudaBuffer,
    rows: usize,
    vocab: usize,
    params: &SampleParams,
    tuning: SampleTuning,
    layout: SampleLayout,
) -> Result<()> {
    let args = SampleArgs::of(logits, uniform, out, rows, vocab, params);
    let plan = args.check_with(&SampleDevice::of(backend)?, tuning, layout)?;
    let kernel = backend.kernel(&plan.spec)?;
    allow_dynamic_shared(&kernel, &plan.config)?;
    if plan.blocks_per_row > 8 {
        kernel
            .function
            .set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                1,
            )
            .map_err(|e| driver_error(&format!("{}: allowing its cluster size", kernel.key), e))?;
    }
    let mut launch_args = KernelArgs::new(backend);
    launch_args
        .arg(logits.slice())
        .arg(uniform.slice())
        .arg(out.slice_mut())
        .arg(&plan.vocab)
        .arg(&plan.chunk)
        .arg(&params.temperature)
        .arg(&plan.top_k)
        .arg(&params.top_p)
        .arg(&params.min_p);
    // SAFETY: the arguments match `kiln::sample<THREADS, CB, ...>(const float* logits,
    // const float* uniform, int* out, u32 vocab, u32 chunk, float temperature, u32
    // top_k, float top_p, float min_p)` (and sample_block's, the same); logits holds
    // rows * vocab values, uniform and out rows each (checked); the grid is
    // blocks_per_row blocks per row, each reading logits [rank * chunk, (rank + 1) *
    // chunk) of its row clamped to vocab, with the shared memory the plan sized for
    // that chunk.
    unsafe { launch(&kernel, &mut launch_args, plan.config) }
}
