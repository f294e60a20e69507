//! An expert-routed gate-up product fused with the gated unit of its output:
//! kernels/matvec.cu's `moe_matvec_packed_glu`, the routed packed mat-vec of a decode
//! token's slots whose warps count their stored rows on a ticket per slot and group
//! of 32 gate rows and their 32 up rows, the warp that completes a group computing its
//! 32 gated values, so that the [`Glu`] costs no launch of its own.
//!
//! Compiling a graph ([`kiln_core::Backend::compile`]) fuses a pair where [`fusible`]
//! finds one and [`crate::CudaBackend::fuse_glus`] is on. The fused launch writes what
//! the two ops write (the product's `out` and the Glu's `out`), each bit for bit as
//! the two launches write it: the product is the routed mat-vec of the same plan, and
//! the gated values are the Glu kernel's functor of the stored products.

use kiln_core::ops::{ElementwiseKind, Glu, MoeMatMul};
use kiln_core::{Bindings, DType, DeviceBuffer, Error, Graph, Op, Result};

use super::check_bytes;
use super::common::{allow_dynamic_shared, launch, weight_tag};
use super::fused_matvec::FUSED_GLU_KINDS;
use super::matmul::{streaming_kernels, MatMulKernel, MATVEC};
use super::moe::{MoeMatMulArgs, MoeMatMulKernel};
use crate::constants::GLU_GROUP_ROWS;
use crate::launch::KernelArgs;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

const OP: &str = "moe_matmul+glu";

/// The ops at `index` and `index + 1` of `graph` when they are a fusible pair: a
/// [`MoeMatMul`] planned as the routed packed mat-vec, then a [`Glu`] of a kind of
/// [`FUSED_GLU_KINDS`] without a Q8_1 copy over its output (one row per slot), each
/// half of a slot's row whole Q8_1 blocks (`n` a multiple of 32).
pub fn fusible(graph: &Graph, index: usize) -> Option<(&MoeMatMul, &Glu)> {
    let (Some(Op::MoeMatMul(mm)), Some(Op::Glu(glu))) =
        (graph.ops().get(index), graph.ops().get(index + 1))
    else {
        return None;
    };
    let shape_fits = glu.x == mm.out
        && glu.out_q8.is_none()
        && FUSED_GLU_KINDS.contains(&glu.kind)
        && glu.rows == mm.m * mm.k
        && mm.rows == 2 * glu.n
        && glu.n % (GLU_GROUP_ROWS as usize / 2) == 0;
    if !shape_fits {
        return None;
    }
    let plan = MoeMatMulArgs::of_op(graph, mm).ok()?.check().ok()?;
    matches!(
        plan.kernel,
        MoeMatMulKernel::MatVec(MatMulKernel::MatVecPacked { m_tier: 1, .. })
    )
    .then_some((mm, glu))
}

/// Whether the fused launch's outputs (the product's and the Glu's) are in memory of
/// their own, apart from each other and from every input.
pub fn operands_apart<B: DeviceBuffer>(
    product: &MoeMatMul,
    glu: &Glu,
    bindings: &Bindings<'_, B>,
) -> bool {
    !bindings.shares_memory(product.out, glu.out)
        && [product.x, product.ids, product.w].into_iter().all(|i| {
            [product.out, glu.out]
                .into_iter()
                .all(|o| !bindings.shares_memory(i, o))
        })
}

/// The fused kernel of the routed packed mat-vec `kernel` for weights of `dtype` and
/// the gated unit `kind`.
pub fn spec(dtype: DType, kernel: MatMulKernel, kind: ElementwiseKind) -> Result<KernelSpec> {
    let MatMulKernel::MatVecPacked {
        m_tier: 1,
        rows,
        aligned,
    } = kernel
    else {
        return Err(Error::invalid(
            OP,
            format!("the fused gated unit runs only in the routed packed mat-vec, not {kernel:?}"),
        ));
    };
    let tag = weight_tag(OP, dtype)?;
    Ok(MATVEC.spec(
        format!(
            "moe_matvec_packed_glu|w={dtype}|glu={}|rows={rows}|aligned={}",
            kind.name(),
            u8::from(aligned)
        ),
        format!(
            "kiln::moe_matvec_packed_glu<{tag}, {}, {rows}, {aligned}>",
            super::elementwise::functor(kind)
        ),
    ))
}

/// The fused kernel for every routed packed mat-vec and each kind of
/// [`FUSED_GLU_KINDS`].
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    kiln_core::ops::WEIGHT_DTYPES
        .into_iter()
        .flat_map(|dtype| {
            streaming_kernels(dtype, 1)
                .into_iter()
                .flat_map(move |kernel| {
                    FUSED_GLU_KINDS
                        .into_iter()
                        .filter_map(move |kind| spec(dtype, kernel, kind).ok())
                })
        })
        .collect()
}

/// The routed product of `op` (its buffer ids are not read) of weights `w` of `dtype`
/// into `out`, then `act = kind(gate, up)` of each slot's row of `out` (`[slots,
/// op.rows / 2]`), in one launch. Errors unless the product's plan is the routed packed
/// mat-vec and each half of a row is whole Q8_1 blocks, and on operand sizes as the two
/// ops' own checks.
#[allow(clippy::too_many_arguments)] // the two ops' operands, each named
pub fn moe_matmul_glu(
    backend: &CudaBackend,
    x: &CudaBuffer,
    ids: &CudaBuffer,
    w: &CudaBuffer,
    dtype: DType,
    out: &mut CudaBuffer,
    act: &mut CudaBuffer,
    kind: ElementwiseKind,
    op: &MoeMatMul,
) -> Result<()> {
    let plan = MoeMatMulArgs {
        weight: dtype,
        m: op.m,
        k: op.k,
        n_expert: op.n_expert,
        rows: op.rows,
        cols: op.cols,
        per_slot: op.per_slot,
        x_bytes: x.bytes(),
        ids_bytes: ids.bytes(),
        w_bytes: w.bytes(),
        w_packed: w.packed(),
        out_bytes: out.bytes(),
    }
    .check()?;
    let MoeMatMulKernel::MatVec(kernel) = plan.kernel else {
        return Err(Error::invalid(
            OP,
            "the fused gated unit runs only in the routed mat-vec, not the grouped mat-mat",
        ));
    };
    let group = GLU_GROUP_ROWS as usize;
    if op.rows % group != 0 {
        return Err(Error::invalid(
            OP,
            format!(
                "the gate-up product's {} rows must be a multiple of {group} \
                 (two halves of whole Q8_1 blocks)",
                op.rows
            ),
        ));
    }
    let slots = op.m * op.k;
    let half = op.rows / 2;
    check_bytes(OP, "glu out", act.bytes(), DType::F32, slots * half)?;
    let fused = backend.kernel(&spec(dtype, kernel, kind)?)?;
    allow_dynamic_shared(&fused, &plan.config)?;
    let mut tickets = backend
        .epilogue_tickets()
        .at_least(backend, 4 * slots * (op.rows / group))?;
    let newest = tickets
        .last_mut()
        .ok_or_else(|| Error::invalid(OP, "the tickets were not allocated"))?;
    let mut args = KernelArgs::new(backend);
    args.arg(w.slice())
        .arg(ids.slice())
        .arg(x.slice())
        .arg(out.slice_mut())
        .arg(newest.slice_mut())
        .arg(act.slice_mut());
    plan.push_shape(&mut args);
    // SAFETY: the arguments match `kiln::moe_matvec_packed_glu<W, F, R, ALIGNED>`:
    // (const u8* w, const int* ids, const float* x, float* out, u32* tickets, float*
    // act, u32 k, u32 per_slot, u32 n_expert, u32 rows, u32 cols, u64 row_bytes), the
    // routed packed mat-vec's with the tickets and act after out. The buffers hold
    // their elements (checked as the routed product checks them; act holds the slots'
    // rows / 2 values), the tickets one zeroed u32 per slot and group of 64 rows (the
    // kernel leaves them zero), locked until the launch is queued and never freed while
    // the backend lives; a weight slice is read only for an id in 0..n_expert.
    unsafe { launch(&fused, &mut args, plan.config) }
}

/// Runs a pair that [`fusible`] found as one launch on the buffers `bindings` holds.
pub(crate) fn run(
    backend: &CudaBackend,
    graph: &Graph,
    product: &MoeMatMul,
    glu: &Glu,
    bindings: &mut Bindings<'_, CudaBuffer>,
) -> Result<()> {
    let dtype = graph.desc(product.w)?.dtype;
    let inputs = [product.x, product.ids, product.w];
    bindings.with_operands(&inputs, &[product.out, glu.out], |ins, outs| {
        let ([x, ids, w], [out, act]) = (ins, outs) else {
            return Err(Error::invalid(OP, "the pair's operands were not bound"));
        };
        moe_matmul_glu(backend, x, ids, w, dtype, out, act, glu.kind, product)
    })?
}
