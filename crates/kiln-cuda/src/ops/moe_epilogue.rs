//! A decode token's expert-routed product fused with the op after it, run on groups
//! of the product's rows in its epilogue: each warp of the routed packed mat-vec
//! (kernels/matvec.cu) counts its stored rows on a ticket, and the warp that completes
//! a group does the group's share of the next op, so that it costs no launch of its
//! own:
//! - a [`Glu`] of the slots' gate-up products (`moe_matvec_packed_glu`): a ticket per
//!   slot and group of 32 gate rows and their 32 up rows, whose 32 gated values the
//!   completing warp writes;
//! - a [`MoeCombine`] without residual or shared expert of the slots' down products
//!   (`moe_matvec_packed_combine`): a ticket per token and group of 32 output rows,
//!   counting the rows of all its `k` slots, whose 32 weighted sums the completing warp
//!   writes.
//!
//! Compiling a graph ([`kiln_core::Backend::compile`]) fuses a pair where [`fusible`]
//! finds one of a kind switched on ([`crate::fusion::Fusion::Glus`],
//! [`crate::fusion::Fusion::Combines`]). The fused launch writes what the two ops
//! write, each bit for bit as the two launches write it: the product is the routed
//! mat-vec of the same plan, and the epilogue computes the next op's values from the
//! stored products as its kernel does (the Glu's functor; `add_routed`).

use kiln_core::ops::{ElementwiseKind, Glu, MoeCombine, MoeMatMul};
use kiln_core::{Bindings, BufferId, DType, DeviceBuffer, Error, Graph, Op, Result};

use super::check_bytes;
use super::common::{allow_dynamic_shared, launch, weight_tag};
use super::fused_matvec::FUSED_GLU_KINDS;
use super::matmul::{streaming_kernels, MatMulKernel, MATVEC};
use super::moe::{MoeMatMulArgs, MoeMatMulKernel};
use crate::constants::{GLU_GROUP_ROWS, Q8_1_BLOCK_ELEMS};
use crate::launch::KernelArgs;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

/// The op after the routed product that its epilogue runs.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue<'g> {
    Glu(&'g Glu),
    Combine(&'g MoeCombine),
}

/// What selects a fused kernel's epilogue.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EpilogueKind {
    Glu(ElementwiseKind),
    Combine,
}

impl EpilogueKind {
    fn op(self) -> &'static str {
        match self {
            EpilogueKind::Glu(_) => "moe_matmul+glu",
            EpilogueKind::Combine => "moe_matmul+moe_combine",
        }
    }
}

/// Which epilogues compiling a graph fuses.
#[derive(Clone, Copy, Debug)]
pub struct RoutedFusions {
    pub glus: bool,
    pub combines: bool,
}

/// The ops at `index` and `index + 1` of `graph` when they are a fusible pair, of a
/// kind `fusions` allows: a [`MoeMatMul`] planned as the routed packed mat-vec, then
/// - a [`Glu`] of a kind of [`FUSED_GLU_KINDS`] without a Q8_1 copy over its output
///   (one row per slot), each half of a slot's row whole Q8_1 blocks (`n` a multiple of
///   32); or
/// - a [`MoeCombine`] of its output without residual, shared expert or its gate, its
///   rows whole Q8_1 blocks (`n` a multiple of 32).
pub fn fusible(
    graph: &Graph,
    index: usize,
    fusions: RoutedFusions,
) -> Option<(&MoeMatMul, Epilogue<'_>)> {
    let ops = graph.ops();
    let Some(Op::MoeMatMul(mm)) = ops.get(index) else {
        return None;
    };
    let group = Q8_1_BLOCK_ELEMS as usize;
    let epilogue = match ops.get(index + 1)? {
        Op::Glu(glu)
            if fusions.glus
                && glu.x == mm.out
                && glu.out_q8.is_none()
                && FUSED_GLU_KINDS.contains(&glu.kind)
                && glu.rows == mm.m * mm.k
                && mm.rows == 2 * glu.n
                && glu.n % group == 0 =>
        {
            Epilogue::Glu(glu)
        }
        Op::MoeCombine(c)
            if fusions.combines
                && c.y == mm.out
                && c.residual.is_none()
                && c.shared.is_none()
                && c.shared_gate.is_none()
                && (c.m, c.k, c.n) == (mm.m, mm.k, mm.rows)
                && c.n % group == 0 =>
        {
            Epilogue::Combine(c)
        }
        _ => return None,
    };
    let plan = MoeMatMulArgs::of_op(graph, mm).ok()?.check().ok()?;
    matches!(
        plan.kernel,
        MoeMatMulKernel::MatVec(MatMulKernel::MatVecPacked { m_tier: 1, .. })
    )
    .then_some((mm, epilogue))
}

/// The epilogue's inputs other than the product's output, and its output.
fn epilogue_operands(epilogue: Epilogue<'_>) -> (Vec<BufferId>, BufferId) {
    match epilogue {
        Epilogue::Glu(glu) => (vec![], glu.out),
        Epilogue::Combine(c) => (vec![c.weights], c.out),
    }
}

/// Whether the fused launch's outputs (the product's and the epilogue's) are in memory
/// of their own, apart from each other and from every input.
pub fn operands_apart<B: DeviceBuffer>(
    product: &MoeMatMul,
    epilogue: Epilogue<'_>,
    bindings: &Bindings<'_, B>,
) -> bool {
    let (extra, out) = epilogue_operands(epilogue);
    let outputs = [product.out, out];
    !bindings.shares_memory(product.out, out)
        && [product.x, product.ids, product.w]
            .into_iter()
            .chain(extra)
            .all(|i| outputs.into_iter().all(|o| !bindings.shares_memory(i, o)))
}

/// The fused kernel of the routed packed mat-vec `kernel` for weights of `dtype` and
/// the epilogue `kind`.
pub fn spec(dtype: DType, kernel: MatMulKernel, kind: EpilogueKind) -> Result<KernelSpec> {
    let op = kind.op();
    let MatMulKernel::MatVecPacked {
        m_tier: 1,
        rows,
        aligned,
    } = kernel
    else {
        return Err(Error::invalid(
            op,
            format!("the fused epilogue runs only in the routed packed mat-vec, not {kernel:?}"),
        ));
    };
    let tag = weight_tag(op, dtype)?;
    let aligned_key = u8::from(aligned);
    Ok(match kind {
        EpilogueKind::Glu(glu) => MATVEC.spec(
            format!(
                "moe_matvec_packed_glu|w={dtype}|glu={}|rows={rows}|aligned={aligned_key}",
                glu.name()
            ),
            format!(
                "kiln::moe_matvec_packed_glu<{tag}, {}, {rows}, {aligned}>",
                super::elementwise::functor(glu)
            ),
        ),
        EpilogueKind::Combine => MATVEC.spec(
            format!("moe_matvec_packed_combine|w={dtype}|rows={rows}|aligned={aligned_key}"),
            format!("kiln::moe_matvec_packed_combine<{tag}, {rows}, {aligned}>"),
        ),
    })
}

/// The kernel of the fused launch of `product` and `epilogue` in `graph`.
pub fn spec_of(graph: &Graph, product: &MoeMatMul, epilogue: Epilogue<'_>) -> Result<KernelSpec> {
    let kind = match epilogue {
        Epilogue::Glu(glu) => EpilogueKind::Glu(glu.kind),
        Epilogue::Combine(_) => EpilogueKind::Combine,
    };
    let plan = MoeMatMulArgs::of_op(graph, product)?.check()?;
    let MoeMatMulKernel::MatVec(kernel) = plan.kernel else {
        return Err(Error::invalid(
            kind.op(),
            "the fused epilogue runs only in the routed mat-vec, not the grouped mat-mat",
        ));
    };
    spec(graph.desc(product.w)?.dtype, kernel, kind)
}

/// The fused kernels for every routed packed mat-vec: each kind of
/// [`FUSED_GLU_KINDS`] and the combine.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    let kinds: Vec<EpilogueKind> = FUSED_GLU_KINDS
        .map(EpilogueKind::Glu)
        .into_iter()
        .chain([EpilogueKind::Combine])
        .collect();
    kiln_core::ops::WEIGHT_DTYPES
        .into_iter()
        .flat_map(|dtype| {
            let kinds = kinds.clone();
            streaming_kernels(dtype, 1)
                .into_iter()
                .flat_map(move |kernel| {
                    kinds
                        .clone()
                        .into_iter()
                        .filter_map(move |kind| spec(dtype, kernel, kind).ok())
                })
        })
        .collect()
}

/// The routed product's operands: `x`, the expert `ids`, the stacked weight `w` of
/// `dtype` and the product's `out` (the shape is the op's; its buffer ids are not read).
pub struct RoutedOperands<'a> {
    pub x: &'a CudaBuffer,
    pub ids: &'a CudaBuffer,
    pub w: &'a CudaBuffer,
    pub dtype: DType,
    pub out: &'a mut CudaBuffer,
}

/// The epilogue's operands.
pub enum EpilogueOperands<'a> {
    /// The Glu's kind and output (`[slots, rows / 2]`).
    Glu {
        kind: ElementwiseKind,
        out: &'a mut CudaBuffer,
    },
    /// The combine's weights (`[m, k]`) and output (`[m, rows]`).
    Combine {
        weights: &'a CudaBuffer,
        out: &'a mut CudaBuffer,
    },
}

/// The routed product of `op` into `product.out`, then the epilogue's op on it, in one
/// launch. Errors unless the product's plan is the routed packed mat-vec and its rows
/// are whole groups (a Glu's halves, a combine's rows: whole Q8_1 blocks), and on
/// operand sizes as the two ops' own checks.
pub fn moe_matmul_fused(
    backend: &CudaBackend,
    product: RoutedOperands<'_>,
    epilogue: EpilogueOperands<'_>,
    op: &MoeMatMul,
) -> Result<()> {
    let RoutedOperands {
        x,
        ids,
        w,
        dtype,
        out,
    } = product;
    let kind = match &epilogue {
        EpilogueOperands::Glu { kind, .. } => EpilogueKind::Glu(*kind),
        EpilogueOperands::Combine { .. } => EpilogueKind::Combine,
    };
    let name = kind.op();
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
            name,
            "the fused epilogue runs only in the routed mat-vec, not the grouped mat-mat",
        ));
    };
    let slots = op.m * op.k;
    let (group, tickets) = match &epilogue {
        EpilogueOperands::Glu { out: act, .. } => {
            check_bytes(
                name,
                "glu out",
                act.bytes(),
                DType::F32,
                slots * (op.rows / 2),
            )?;
            (
                GLU_GROUP_ROWS as usize,
                slots * (op.rows / GLU_GROUP_ROWS as usize),
            )
        }
        EpilogueOperands::Combine {
            weights,
            out: combined,
        } => {
            check_bytes(name, "weights", weights.bytes(), DType::F32, slots)?;
            check_bytes(
                name,
                "combine out",
                combined.bytes(),
                DType::F32,
                op.m * op.rows,
            )?;
            let group = Q8_1_BLOCK_ELEMS as usize;
            (group, op.m * (op.rows / group))
        }
    };
    if op.rows % group != 0 {
        return Err(Error::invalid(
            name,
            format!(
                "the routed product's {} rows must be a multiple of {group} \
                 (whole Q8_1 blocks a group)",
                op.rows
            ),
        ));
    }
    let fused = backend.kernel(&spec(dtype, kernel, kind)?)?;
    allow_dynamic_shared(&fused, &plan.config)?;
    let mut held = backend.epilogue_tickets().at_least(backend, 4 * tickets)?;
    let newest = held
        .last_mut()
        .ok_or_else(|| Error::invalid(name, "the tickets were not allocated"))?;
    let mut args = KernelArgs::new(backend);
    args.arg(w.slice())
        .arg(ids.slice())
        .arg(x.slice())
        .arg(out.slice_mut())
        .arg(newest.slice_mut());
    match epilogue {
        EpilogueOperands::Glu { out: act, .. } => args.arg(act.slice_mut()),
        EpilogueOperands::Combine {
            weights,
            out: combined,
        } => args.arg(weights.slice()).arg(combined.slice_mut()),
    };
    plan.push_shape(&mut args);
    // SAFETY: the arguments match `kiln::moe_matvec_packed_glu<W, F, R, ALIGNED>` (const
    // u8* w, const int* ids, const float* x, float* out, u32* tickets, float* act, ...)
    // or `kiln::moe_matvec_packed_combine<W, R, ALIGNED>` (..., u32* tickets, const
    // float* weights, float* combined, ...), then u32 k, u32 per_slot, u32 n_expert, u32
    // rows, u32 cols, u64 row_bytes: the routed packed mat-vec's with the tickets and
    // the epilogue's operands after out. The buffers hold their elements (checked as the
    // routed product checks them; act the slots' rows / 2 values, weights the slots',
    // combined the tokens' rows), the tickets one zeroed u32 per group (the kernel
    // leaves them zero), locked until the launch is queued and never freed while the
    // backend lives; a weight slice is read only for an id in 0..n_expert.
    unsafe { launch(&fused, &mut args, plan.config) }
}

/// Runs a pair that [`fusible`] found as one launch on the buffers `bindings` holds.
pub(crate) fn run(
    backend: &CudaBackend,
    graph: &Graph,
    product: &MoeMatMul,
    epilogue: Epilogue<'_>,
    bindings: &mut Bindings<'_, CudaBuffer>,
) -> Result<()> {
    let dtype = graph.desc(product.w)?.dtype;
    let (extra, out) = epilogue_operands(epilogue);
    let inputs: Vec<BufferId> = [product.x, product.ids, product.w]
        .into_iter()
        .chain(extra)
        .collect();
    bindings.with_operands(&inputs, &[product.out, out], |ins, outs| {
        let ([x, ids, w, rest @ ..], [routed, next]) = (ins, outs) else {
            return Err(Error::invalid(
                "moe_matmul",
                "the pair's operands were not bound",
            ));
        };
        let epilogue = match (epilogue, rest) {
            (Epilogue::Glu(glu), []) => EpilogueOperands::Glu {
                kind: glu.kind,
                out: next,
            },
            (Epilogue::Combine(_), [weights]) => EpilogueOperands::Combine { weights, out: next },
            _ => {
                return Err(Error::invalid(
                    "moe_matmul",
                    "the epilogue's operands were not bound",
                ))
            }
        };
        let product_operands = RoutedOperands {
            x,
            ids,
            w,
            dtype,
            out: routed,
        };
        moe_matmul_fused(backend, product_operands, epilogue, product)
    })?
}
