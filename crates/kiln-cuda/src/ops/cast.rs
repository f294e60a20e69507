//! Dispatch for [`kiln_core::ops::Cast`] (kernels/cast.cu).

use kiln_core::ops::FLOAT_DTYPES;
use kiln_core::{DType, Result};

use super::{check_buffer, check_dtype, check_nonzero, grid_1d};
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::registry::{KernelSource, KernelSpec};
use crate::{CudaBackend, CudaBuffer};

/// [`kiln_core::ops::Cast`].
pub const CAST: Family = Family {
    name: "cast",
    source: KernelSource {
        name: "cast.cu",
        text: include_str!("../../kernels/cast.cu"),
    },
};

/// The kernel tag of a float dtype in kernels/common.cuh.
fn tag(dtype: DType) -> Result<&'static str> {
    check_dtype("cast", "operand", dtype, &FLOAT_DTYPES)?;
    Ok(match dtype {
        DType::F16 => "kiln::F16",
        DType::BF16 => "kiln::BF16",
        _ => "kiln::F32",
    })
}

/// The specialisation converting `from` to `to` (both F32, F16 or BF16).
pub fn spec(from: DType, to: DType) -> Result<KernelSpec> {
    Ok(CAST.spec(
        format!("cast|from={from}|to={to}"),
        format!("kiln::cast<{}, {}>", tag(from)?, tag(to)?),
    ))
}

/// Every cast specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    FLOAT_DTYPES
        .iter()
        .flat_map(|&from| FLOAT_DTYPES.iter().map(move |&to| (from, to)))
        // Both come from FLOAT_DTYPES, which `spec` accepts.
        .filter_map(|(from, to)| spec(from, to).ok())
        .collect()
}

/// Converts the first `len` elements of `x` (dtype `from`) into `out` (dtype `to`),
/// as [`kiln_core::ops::Cast`] defines.
pub fn cast(
    backend: &CudaBackend,
    x: &CudaBuffer,
    from: DType,
    out: &mut CudaBuffer,
    to: DType,
    len: usize,
) -> Result<()> {
    check_nonzero("cast", &[("len", len)])?;
    let spec = spec(from, to)?;
    check_buffer("cast", "x", x, from, len)?;
    check_buffer("cast", "out", out, to, len)?;
    let kernel = backend.kernel(&spec)?;
    let n = len as u64;
    let mut args = KernelArgs::new(backend);
    args.arg(x.slice()).arg(out.slice_mut()).arg(&n);
    // SAFETY: the arguments match `kiln::cast<In, Out>(const In*, Out*, u64)`; both
    // buffers hold `len` elements of their dtypes (checked above).
    unsafe { crate::launch::launch(&kernel, &mut args, grid_1d(len)) }
}
