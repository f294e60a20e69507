//! Dispatch for [`kiln_core::ops::Elementwise`] and [`kiln_core::ops::Glu`]
//! (kernels/elementwise.cu).

use kiln_core::ops::ElementwiseKind;
use kiln_core::{DType, DeviceBuffer, Result};

use super::{check_buffer, check_nonzero, check_q8_copy, grid_1d};
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::registry::{KernelSource, KernelSpec};
use crate::{CudaBackend, CudaBuffer};

/// [`kiln_core::ops::Elementwise`].
pub const ELEMENTWISE: Family = Family {
    name: "elementwise",
    source: KernelSource {
        name: "elementwise.cu",
        text: include_str!("../../kernels/elementwise.cu"),
    },
};

/// Every kind, in declaration order.
const KINDS: [ElementwiseKind; 5] = ElementwiseKind::ALL;

/// The functor of `kind` in kernels/functors.cuh.
pub(crate) fn functor(kind: ElementwiseKind) -> &'static str {
    match kind {
        ElementwiseKind::Add => "kiln::Add",
        ElementwiseKind::Mul => "kiln::Mul",
        ElementwiseKind::SiluMul => "kiln::SiluMul",
        ElementwiseKind::GeluMul => "kiln::GeluMul",
        ElementwiseKind::SigmoidMul => "kiln::SigmoidMul",
    }
}

/// The specialisation computing `kind`.
pub fn spec(kind: ElementwiseKind) -> KernelSpec {
    ELEMENTWISE.spec(
        format!("elementwise|kind={}", kind.name()),
        format!("kiln::elementwise<{}>", functor(kind)),
    )
}

/// The specialisation of [`kiln_core::ops::Glu`] computing `kind`.
pub fn glu_spec(kind: ElementwiseKind) -> KernelSpec {
    ELEMENTWISE.spec(
        format!("glu|kind={}", kind.name()),
        format!("kiln::glu<{}>", functor(kind)),
    )
}

/// Every element-wise specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    KINDS
        .into_iter()
        .flat_map(|k| [spec(k), glu_spec(k)])
        .collect()
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

/// `out[r, i] = f(x[r, i], x[r, n + i])` over `rows` rows, `f` given by `kind`, and
/// `out` rounded to Q8_1 into `out_q8` when given, as [`kiln_core::ops::Glu`] defines.
#[allow(clippy::too_many_arguments)] // the op's operands and shape, each named
pub fn glu(
    backend: &CudaBackend,
    kind: ElementwiseKind,
    x: &CudaBuffer,
    out: &mut CudaBuffer,
    out_q8: Option<&mut CudaBuffer>,
    rows: usize,
    n: usize,
) -> Result<()> {
    let op = "glu";
    check_nonzero(op, &[("rows", rows), ("n", n)])?;
    let len = super::count(op, &[rows, n])?;
    check_buffer(op, "x", x, DType::F32, super::count(op, &[len, 2])?)?;
    check_buffer(op, "out", out, DType::F32, len)?;
    check_q8_copy(op, "out_q8", out_q8.as_ref().map(|q| q.bytes()), len, n)?;
    let kernel = backend.kernel(&glu_spec(kind))?;
    let (n64, len64) = (n as u64, len as u64);
    let mut args = KernelArgs::new(backend);
    args.arg(x.slice())
        .arg(out.slice_mut())
        .arg(out_q8.map(|q| q.slice_mut()))
        .arg(&n64)
        .arg(&len64);
    // SAFETY: the arguments match `kiln::glu<F>(const float* x, float* out, u8* out_q8,
    // u64 n, u64 len)`; x holds 2 len and out len f32 values, out_q8 is null or holds
    // len / 32 Q8_1 blocks with n a multiple of 32 (checked above). Rows of a multiple
    // of 4 take a thread per 4 elements.
    unsafe {
        crate::launch::launch(
            &kernel,
            &mut args,
            grid_1d(if n % 4 == 0 { len / 4 } else { len }),
        )
    }
}
