//! Dispatch for [`kiln_core::ops::Softmax`] (kernels/softmax.cu).

use cudarc::driver::LaunchConfig;
use kiln_core::{DType, DeviceBuffer, Error, Result};

use super::common::{config, grid_dim, launch, MAX_GRID_X};
use super::{check_bytes, check_nonzero, count, to_u32};
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::registry::{KernelSource, KernelSpec};
use crate::{CudaBackend, CudaBuffer};

/// [`kiln_core::ops::Softmax`].
pub const SOFTMAX: Family = Family {
    name: "softmax",
    source: KernelSource {
        name: "softmax.cu",
        text: include_str!("../../kernels/softmax.cu"),
    },
};

const OP: &str = "softmax";

/// Threads per block (one block per row).
const THREADS: u32 = 256;

/// The specialisation with or without a causal mask.
pub fn spec(causal: bool) -> KernelSpec {
    SOFTMAX.spec(
        format!("softmax|causal={}", u8::from(causal)),
        format!("kiln::softmax<{causal}>"),
    )
}

/// Every softmax specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    vec![spec(false), spec(true)]
}

/// A softmax's shape, parameters and operand sizes in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct SoftmaxArgs {
    pub rows: usize,
    pub cols: usize,
    pub scale: f32,
    pub causal_offset: Option<usize>,
    pub x_bytes: usize,
    pub out_bytes: usize,
}

/// A checked softmax launch.
#[derive(Clone, Debug)]
pub struct SoftmaxPlan {
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    cols: u32,
    scale: f32,
    causal_offset: u64,
}

impl SoftmaxArgs {
    /// Checks non-zero sizes, a finite scale, and `rows x cols` F32 inputs and
    /// outputs.
    pub fn check(&self) -> Result<SoftmaxPlan> {
        check_nonzero(OP, &[("rows", self.rows), ("cols", self.cols)])?;
        if !self.scale.is_finite() {
            return Err(Error::invalid(
                OP,
                format!("scale must be finite, got {}", self.scale),
            ));
        }
        let n = count(OP, &[self.rows, self.cols])?;
        check_bytes(OP, "x", self.x_bytes, DType::F32, n)?;
        check_bytes(OP, "out", self.out_bytes, DType::F32, n)?;
        let rows = grid_dim(OP, "rows", self.rows, MAX_GRID_X)?;
        Ok(SoftmaxPlan {
            spec: spec(self.causal_offset.is_some()),
            config: config((rows, 1, 1), THREADS, 0),
            cols: to_u32(OP, "cols", self.cols)?,
            scale: self.scale,
            causal_offset: self.causal_offset.unwrap_or(0) as u64,
        })
    }
}

/// Row-wise softmax of `scale * x` over `rows` rows of `cols` F32 values, with
/// `causal_offset = Some(o)` masking columns past `o + r` in row `r`, as
/// [`kiln_core::ops::Softmax`] defines.
pub fn softmax(
    backend: &CudaBackend,
    x: &CudaBuffer,
    out: &mut CudaBuffer,
    rows: usize,
    cols: usize,
    scale: f32,
    causal_offset: Option<usize>,
) -> Result<()> {
    let plan = SoftmaxArgs {
        rows,
        cols,
        scale,
        causal_offset,
        x_bytes: x.bytes(),
        out_bytes: out.bytes(),
    }
    .check()?;
    let kernel = backend.kernel(&plan.spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(x.slice())
        .arg(out.slice_mut())
        .arg(&plan.cols)
        .arg(&plan.scale)
        .arg(&plan.causal_offset);
    // SAFETY: the arguments match `kiln::softmax<Causal>(const float* x, float* out,
    // u32 cols, float scale, u64 causal_offset)`; x and out hold rows * cols values
    // (checked), one block per row.
    unsafe { launch(&kernel, &mut args, plan.config) }
}
