//! Dispatch for [`kiln_core::ops::Sample`] (kernels/sample.cu; with `temperature <= 0`
//! the argmax kernel, which step 1 of the definition is).

use cudarc::driver::LaunchConfig;
use kiln_core::ops::SampleParams;
use kiln_core::{DType, DeviceBuffer, Error, Result};

use super::common::{config, grid_dim, launch, MAX_GRID_X};
use super::{check_bytes, check_nonzero, count};
use crate::launch::KernelArgs;
use crate::manifest::SAMPLE;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

const OP: &str = "sample";

/// Threads per block of the bisection kernel.
const SAMPLE_LANES: usize = 1024;

/// The sampling specialisation: one block of [`SAMPLE_LANES`] (the old kernel's) threads per row.
pub fn spec() -> KernelSpec {
    SAMPLE.spec(
        format!("sample|lanes={SAMPLE_LANES}"),
        format!("kiln::sample<{SAMPLE_LANES}>"),
    )
}

/// The specialisation that runs a sample op with `params`: the argmax kernel for
/// `temperature <= 0`, else [`spec`].
pub fn spec_for(params: &SampleParams) -> KernelSpec {
    if params.temperature <= 0.0 {
        super::argmax::spec()
    } else {
        spec()
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

/// A checked sampling launch (`temperature > 0`).
#[derive(Clone, Debug)]
pub struct SamplePlan {
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    vocab: u32,
    /// `top_k` clamped to `vocab` (the same candidates).
    top_k: u32,
}

impl SampleArgs {
    /// Checks non-zero sizes, `vocab` within an I32 index, the settings' ranges (finite
    /// temperature, `top_p` in `(0, 1]`, `min_p` in `[0, 1]`), `rows x vocab` F32
    /// logits, `rows` F32 uniforms and `rows` I32 outputs.
    pub fn check(&self) -> Result<SamplePlan> {
        check_nonzero(OP, &[("rows", self.rows), ("vocab", self.vocab)])?;
        let vocab = i32::try_from(self.vocab).map_err(|_| {
            Error::invalid(
                OP,
                format!("vocab {} does not fit an I32 index", self.vocab),
            )
        })?;
        check_params(&self.params)?;
        check_bytes(
            OP,
            "logits",
            self.logits_bytes,
            DType::F32,
            count(OP, &[self.rows, self.vocab])?,
        )?;
        check_bytes(OP, "uniform", self.uniform_bytes, DType::F32, self.rows)?;
        check_bytes(OP, "out", self.out_bytes, DType::I32, self.rows)?;
        let rows = grid_dim(OP, "rows", self.rows, MAX_GRID_X)?;
        // Non-negative (checked non-zero, and from usize).
        let vocab = vocab as u32;
        Ok(SamplePlan {
            spec: spec(),
            config: config((rows, 1, 1), SAMPLE_LANES as u32, 0),
            vocab,
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
    let args = SampleArgs {
        rows,
        vocab,
        params: *params,
        logits_bytes: logits.bytes(),
        uniform_bytes: uniform.bytes(),
        out_bytes: out.bytes(),
    };
    let plan = args.check()?;
    if params.temperature <= 0.0 {
        // Step 1 of the definition.
        return super::argmax::argmax(backend, logits, out, rows, vocab);
    }
    let kernel = backend.kernel(&plan.spec)?;
    let mut launch_args = KernelArgs::new(backend);
    launch_args
        .arg(logits.slice())
        .arg(uniform.slice())
        .arg(out.slice_mut())
        .arg(&plan.vocab)
        .arg(&params.temperature)
        .arg(&plan.top_k)
        .arg(&params.top_p)
        .arg(&params.min_p);
    // SAFETY: the arguments match `kiln::sample<LANES>(const float* logits, const
    // float* uniform, int* out, u32 vocab, float temperature, u32 top_k, float top_p,
    // float min_p)`; logits holds rows * vocab values, uniform and out rows each
    // (checked), one block of LANES threads per row.
    unsafe { launch(&kernel, &mut launch_args, plan.config) }
}
