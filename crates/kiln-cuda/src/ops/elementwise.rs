//! Dispatch for [`kiln_core::ops::Elementwise`] (kernels/elementwise.cu).

use kiln_core::ops::ElementwiseKind;
use kiln_core::{DType, DeviceBuffer, Result};

use super::{check_buffer, check_nonzero, check_q8_copy, grid_1d};
use crate::launch::KernelArgs;
use crate::manifest::ELEMENTWISE;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

/// Every kind, in declaration order.
const KINDS: [ElementwiseKind; 4] = [
    ElementwiseKind::Add,
    ElementwiseKind::Mul,
    ElementwiseKind::SiluMul,
    ElementwiseKind::GeluMul,
];

/// The functor of `kind` in kernels/elementwise.cu.
fn functor(kind: ElementwiseKind) -> &'static str {
    match kind {
        ElementwiseKind::Add => "kiln::Add",
        ElementwiseKind::Mul => "kiln::Mul",
        ElementwiseKind::SiluMul => "kiln::SiluMul",
        ElementwiseKind::GeluMul => "kiln::GeluMul",
    }
}

/// The specialisation computing `kind`.
pub fn spec(kind: ElementwiseKind) -> KernelSpec {
    ELEMENTWISE.spec(
        format!("elementwise|kind={}", kind.name()),
        format!("kiln::elementwise<{}>", functor(kind)),
    )
}

/// Every element-wise specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    KINDS.into_iter().map(spec).collect()
}

/// `out[i] = f(a[i], b[i])` for the first `len` F32 elements, `f` given by `kind`,
/// and `out` rounded to Q8_1 into `out_q8` when given, as
/// [`kiln_core::ops::Elementwise`] defines.
pub fn elementwise(
    backend: &CudaBackend,
    kind: ElementwiseKind,
    a: &CudaBuffer,
    b: &CudaBuffer,
    out: &mut CudaBuffer,
    out_q8: Option<&mut CudaBuffer>,
    len: usize,
) -> Result<()> {
    let op = kind.name();
    check_nonzero(op, &[("len", len)])?;
    check_buffer(op, "a", a, DType::F32, len)?;
    check_buffer(op, "b", b, DType::F32, len)?;
    check_buffer(op, "out", out, DType::F32, len)?;
    check_q8_copy(op, "out_q8", out_q8.as_ref().map(|q| q.bytes()), len, len)?;
    let spec = spec(kind);
    let kernel = backend.kernel(&spec)?;
    let n = len as u64;
    let mut args = KernelArgs::new(backend);
    args.arg(a.slice())
        .arg(b.slice())
        .arg(out.slice_mut())
        .arg(out_q8.map(|q| q.slice_mut()))
        .arg(&n);
    // SAFETY: the arguments match `kiln::elementwise<F>(const float*, const float*,
    // float*, u8*, u64)`; every buffer holds `len` f32 values and out_q8 is null or
    // holds len / 32 Q8_1 blocks, len a multiple of 32 (checked above).
    unsafe { crate::launch::launch(&kernel, &mut args, grid_1d(len)) }
}
