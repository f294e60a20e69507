//! Dispatch for [`kiln_core::ops::RmsNorm`] and [`kiln_core::ops::AddRmsNorm`]
//! (kernels/norm.cu).

use cudarc::driver::LaunchConfig;
use kiln_core::{DType, DeviceBuffer, Error, Result};

use super::{check_buffer, check_nonzero, check_q8_copy, count, to_u32};
use crate::constants::NORM_VECTORS;
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::registry::{KernelSource, KernelSpec};
use crate::{CudaBackend, CudaBuffer};

/// [`kiln_core::ops::RmsNorm`] and [`kiln_core::ops::AddRmsNorm`].
pub const NORM: Family = Family {
    name: "norm",
    source: KernelSource {
        name: "norm.cu",
        text: include_str!("../../kernels/norm.cu"),
    },
};

/// The specialisation with or without a weight, and with or without the fused
/// residual add.
pub fn spec(weight: bool, add: bool) -> KernelSpec {
    let name = if add { "add_rms_norm" } else { "rms_norm" };
    NORM.spec(
        format!("{name}|weight={}", u8::from(weight)),
        format!("kiln::rms_norm<{weight}, {add}>"),
    )
}

/// Every norm specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    [(false, false), (true, false), (false, true), (true, true)]
        .into_iter()
        .map(|(weight, add)| spec(weight, add))
        .collect()
}

/// Threads per row: a multiple of 32, at most 1024, enough that each holds at most
/// NORM_VECTORS float4s of the row.
fn threads_for(dim: u32) -> u32 {
    dim.div_ceil(4 * NORM_VECTORS).div_ceil(32).clamp(1, 32) * 32
}

/// The fused residual operands of [`kiln_core::ops::AddRmsNorm`].
struct Residual<'a> {
    residual: &'a CudaBuffer,
    sum: &'a mut CudaBuffer,
}

/// Where a norm writes: `out`, and its Q8_1 copy `out_q8` when given.
pub struct NormOut<'a> {
    pub out: &'a mut CudaBuffer,
    pub out_q8: Option<&'a mut CudaBuffer>,
}

impl<'a> From<&'a mut CudaBuffer> for NormOut<'a> {
    /// `out` without a Q8_1 copy.
    fn from(out: &'a mut CudaBuffer) -> Self {
        Self { out, out_q8: None }
    }
}

/// Normalizes each of `rows` rows of `dim` F32 values of `x` into `out`, as
/// [`kiln_core::ops::RmsNorm`] defines.
pub fn rms_norm<'a>(
    backend: &CudaBackend,
    x: &CudaBuffer,
    weight: Option<&CudaBuffer>,
    out: impl Into<NormOut<'a>>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    launch(
        "rms_norm",
        backend,
        x,
        None,
        weight,
        out.into(),
        rows,
        dim,
        eps,
    )
}

/// `sum = x + residual`, `out = rms_norm(sum)`, over `rows` rows of `dim` F32
/// values, as [`kiln_core::ops::AddRmsNorm`] defines.
#[allow(clippy::too_many_arguments)] // the op's operands and shape, each named
pub fn add_rms_norm<'a>(
    backend: &CudaBackend,
    x: &CudaBuffer,
    residual: &CudaBuffer,
    weight: Option<&CudaBuffer>,
    sum: &mut CudaBuffer,
    out: impl Into<NormOut<'a>>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    let fused = Residual { residual, sum };
    launch(
        "add_rms_norm",
        backend,
        x,
        Some(fused),
        weight,
        out.into(),
        rows,
        dim,
        eps,
    )
}

#[allow(clippy::too_many_arguments)] // the union of both ops' operands
fn launch(
    op: &str,
    backend: &CudaBackend,
    x: &CudaBuffer,
    fused: Option<Residual<'_>>,
    weight: Option<&CudaBuffer>,
    out: NormOut<'_>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    let NormOut { out, out_q8 } = out;
    check_nonzero(op, &[("rows", rows), ("dim", dim)])?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(
            op,
            format!("eps must be finite and >= 0, got {eps}"),
        ));
    }
    let n = count(op, &[rows, dim])?;
    let dim32 = to_u32(op, "dim", dim)?;
    let grid_rows = u32::try_from(rows)
        .ok()
        .filter(|&r| r <= i32::MAX as u32)
        .ok_or_else(|| {
            Error::invalid(
                op,
                format!("rows = {rows} exceeds the grid limit {}", i32::MAX),
            )
        })?;
    check_buffer(op, "x", x, DType::F32, n)?;
    check_buffer(op, "out", out, DType::F32, n)?;
    check_q8_copy(op, "out_q8", out_q8.as_ref().map(|q| q.bytes()), n, dim)?;
    if let Some(w) = weight {
        check_buffer(op, "weight", w, DType::F32, dim)?;
    }
    if let Some(f) = &fused {
        check_buffer(op, "residual", f.residual, DType::F32, n)?;
        check_buffer(op, "sum", f.sum, DType::F32, n)?;
    }

    let spec = spec(weight.is_some(), fused.is_some());
    let kernel = backend.kernel(&spec)?;
    // Null pointers stand for the operands this specialisation never reads.
    let (residual, sum) = match fused {
        Some(f) => (Some(f.residual), Some(f.sum)),
        None => (None, None),
    };
    let mut args = KernelArgs::new(backend);
    args.arg(x.slice())
        .arg(residual.map(|r| r.slice()))
        .arg(weight.map(|w| w.slice()))
        .arg(sum.map(|s| s.slice_mut()))
        .arg(out.slice_mut())
        .arg(out_q8.map(|q| q.slice_mut()))
        .arg(&dim32)
        .arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (grid_rows, 1, 1),
        block_dim: (threads_for(dim32), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `kiln::rms_norm<HasWeight, AddResidual>(const
    // float* x, const float* residual, const float* weight, float* sum, float* out,
    // u8* out_q8, u32 dim, float eps)`; the pointers a specialisation reads or writes
    // are non-null and hold `rows * dim` values (`dim` for the weight), out_q8 is null
    // or holds rows * dim / 32 Q8_1 blocks with dim a multiple of 32, checked above.
    unsafe { crate::launch::launch(&kernel, &mut args, cfg) }
}
