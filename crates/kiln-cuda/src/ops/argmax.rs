//! Dispatch for [`kiln_core::ops::Argmax`] (kernels/argmax.cu).

use cudarc::driver::LaunchConfig;
use kiln_core::{DType, DeviceBuffer, Error, Result};

use super::common::{config, grid_dim, launch, MAX_GRID_X};
use super::{check_bytes, check_nonzero, count};
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::registry::{KernelSource, KernelSpec};
use crate::{CudaBackend, CudaBuffer};

/// [`kiln_core::ops::Argmax`].
pub const ARGMAX: Family = Family {
    name: "argmax",
    source: KernelSource {
        name: "argmax.cu",
        text: include_str!("../../kernels/argmax.cu"),
    },
};

const OP: &str = "argmax";

/// Threads per block (one block per row): a row of a 128k-token vocabulary is 32
/// values per thread, 8 float4s, half of them in flight at once.
const THREADS: u32 = 1024;

/// The argmax specialisation.
pub fn spec() -> KernelSpec {
    ARGMAX.spec("argmax|x=f32".to_string(), "kiln::argmax".to_string())
}

/// An argmax's shape and operand sizes in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct ArgmaxArgs {
    pub rows: usize,
    pub cols: usize,
    pub x_bytes: usize,
    pub out_bytes: usize,
}

/// A checked argmax launch.
#[derive(Clone, Debug)]
pub struct ArgmaxPlan {
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    cols: u32,
}

impl ArgmaxArgs {
    /// Checks non-zero sizes, `cols` within an I32 index, `rows x cols` F32 inputs
    /// and `rows` I32 outputs.
    pub fn check(&self) -> Result<ArgmaxPlan> {
        check_nonzero(OP, &[("rows", self.rows), ("cols", self.cols)])?;
        let cols = i32::try_from(self.cols).map_err(|_| {
            Error::invalid(OP, format!("cols {} does not fit an I32 index", self.cols))
        })?;
        check_bytes(
            OP,
            "x",
            self.x_bytes,
            DType::F32,
            count(OP, &[self.rows, self.cols])?,
        )?;
        check_bytes(OP, "out", self.out_bytes, DType::I32, self.rows)?;
        let rows = grid_dim(OP, "rows", self.rows, MAX_GRID_X)?;
        Ok(ArgmaxPlan {
            spec: spec(),
            config: config((rows, 1, 1), THREADS, 0),
            // Non-negative (checked non-zero, and from usize).
            cols: cols as u32,
        })
    }
}

/// `out[r] = argmax_c x[r, c]` over `rows` rows of `cols` F32 values, as
/// [`kiln_core::ops::Argmax`] defines (lowest index on ties, NaN never chosen).
pub fn argmax(
    backend: &CudaBackend,
    x: &CudaBuffer,
    out: &mut CudaBuffer,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let plan = ArgmaxArgs {
        rows,
        cols,
        x_bytes: x.bytes(),
        out_bytes: out.bytes(),
    }
    .check()?;
    let kernel = backend.kernel(&plan.spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(x.slice()).arg(out.slice_mut()).arg(&plan.cols);
    // SAFETY: the arguments match `kiln::argmax(const float* x, int* out, u32 cols)`;
    // x holds rows * cols values and out rows indices (checked), one block per row.
    unsafe { launch(&kernel, &mut args, plan.config) }
}
