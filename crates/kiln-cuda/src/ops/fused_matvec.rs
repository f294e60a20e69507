//! The resident mat-vec (kernels/matvec.cu's `resident_matvec`) fused with the one-row
//! ops around it in a decode step, so that they cost no launch of their own:
//! - before it, an [`AddRmsNorm`] whose Q8_1 copy the product reads: every block
//!   computes the residual add and the norm itself and rounds the result to Q8_1 in
//!   shared memory (`matvec_resident_add_norm`; the norms before the q-k-v and the
//!   gate-up products);
//! - after it, an [`Epilogue`] on groups of the product's rows, run by the warp that
//!   finishes a group's last row (each warp counts its rows on the group's ticket): a
//!   [`Glu`] of a gate-up product, 32 gate rows and their 32 up rows at a time
//!   (`matvec_resident_glu`), or the [`QkvRopeAppend`] of a q-k-v product, a head at a
//!   time (`matvec_resident_rope_append`); with a norm before, `matvec_resident_add_norm_glu`
//!   and `matvec_resident_add_norm_rope_append`.
//!
//! Compiling a graph ([`kiln_core::Backend::compile`]) fuses a run where [`fusible`]
//! finds one. The fused launch writes what the ops would, except the norm's `out` and
//! `out_q8`, which is why a norm is fused only when nothing else reads them (transient
//! buffers read by the product alone). The epilogue reads the product's stored f32
//! outputs and computes what its op's kernel computes from them, in the same order, so
//! its outputs are the unfused launches' bits.

use kiln_core::ops::{
    AddRmsNorm, ElementwiseKind, Glu, MatMul, QkvRopeAppend, RopeParams, RopeStyle,
};
use kiln_core::{Bindings, BufferId, BufferKind, DType, DeviceBuffer, Error, Graph, Op, Result};

use super::common::{allow_dynamic_shared, cache_tag, launch, weight_tag};
use super::matmul::{resident_config, MatMulArgs, MatMulKernel, MATVEC};
use super::rope::{style_name, KvCaches, QkNormWeights, QkvRopeArgs, QkvRopePlan};
use super::{check_bytes, check_q8_copy, to_u32};
use crate::constants::{GLU_GROUP_ROWS, Q8_1_BLOCK_ELEMS, RESIDENT_NORM_VECTORS};
use crate::launch::KernelArgs;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

/// The Glu kinds that compiling a graph fuses (the feed-forward of every architecture
/// kiln runs); [`fused_matvec`] takes any kind.
pub const FUSED_GLU_KINDS: [ElementwiseKind; 1] = [ElementwiseKind::SiluMul];

/// The cache dtypes of the [`QkvRopeAppend`]s that compiling a graph fuses (the
/// models' default); [`fused_matvec`] takes either.
pub const FUSED_ROPE_CACHES: [DType; 1] = [DType::F16];

/// Which of these fusions compiling a graph makes ([`crate::fusion::Fusions`]).
#[derive(Clone, Copy, Debug)]
pub struct Fusions {
    pub norms: bool,
    pub glus: bool,
    pub ropes: bool,
}

/// The op a fused launch runs on groups of the product's rows after the product.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue<'g> {
    Glu(&'g Glu),
    RopeAppend(&'g QkvRopeAppend),
}

/// What selects an epilogue's kernel: the Glu's kind, or the rotation's style and the
/// caches' dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EpilogueKind {
    Glu(ElementwiseKind),
    RopeAppend { style: RopeStyle, cache: DType },
}

/// Consecutive ops of a graph that one resident mat-vec launch computes: the product,
/// with the norm before it, an epilogue after it, or both.
#[derive(Clone, Copy, Debug)]
pub struct Fusion<'g> {
    pub norm: Option<&'g AddRmsNorm>,
    pub product: &'g MatMul,
    pub epilogue: Option<Epilogue<'g>>,
}

impl Fusion<'_> {
    /// How many ops of the graph the launch stands for.
    pub fn ops(&self) -> usize {
        1 + usize::from(self.norm.is_some()) + usize::from(self.epilogue.is_some())
    }

    /// The name of the run in errors: the ops' names joined by `+`.
    pub fn name(&self) -> &'static str {
        name(self.norm.is_some(), self.epilogue.map(|e| e.is_glu()))
    }

    /// The kernel the run's launch runs in `graph`.
    pub fn spec(&self, graph: &Graph) -> Result<KernelSpec> {
        let plan = MatMulArgs::of_op(graph, self.product, usize::MAX)?.check()?;
        let epilogue = match self.epilogue {
            None => None,
            Some(Epilogue::Glu(glu)) => Some(EpilogueKind::Glu(glu.kind)),
            Some(Epilogue::RopeAppend(r)) => Some(EpilogueKind::RopeAppend {
                style: r.params.style,
                cache: graph.desc(r.k_cache)?.dtype,
            }),
        };
        let dtype = graph.desc(self.product.w)?.dtype;
        spec(dtype, plan.kernel, self.norm.is_some(), epilogue)
    }
}

impl Epilogue<'_> {
    fn is_glu(&self) -> bool {
        matches!(self, Epilogue::Glu(_))
    }
}

/// The ops' names joined by `+`: with the norm, and with a Glu (`Some(true)`) or a
/// QkvRopeAppend (`Some(false)`) after the product.
fn name(norm: bool, glu: Option<bool>) -> &'static str {
    match (norm, glu) {
        (true, Some(true)) => "add_rms_norm+matmul+glu",
        (true, Some(false)) => "add_rms_norm+matmul+qkv_rope_append",
        (true, None) => "add_rms_norm+matmul",
        (false, Some(true)) => "matmul+glu",
        (false, Some(false)) => "matmul+qkv_rope_append",
        (false, None) => "matmul",
    }
}

/// The run of ops starting at `index` of `graph` that one fused launch computes, of
/// the kinds `fusions` allows: a one-row [`MatMul`] planned as the resident mat-vec
/// (one activation row with its Q8_1 copy), with
/// - before it (at `index`) a one-row [`AddRmsNorm`] with a weight and a Q8_1 copy
///   whose `out` and `out_q8` are the product's `x` and `x_q8`, both transient and read
///   by no other op, `k` a multiple of 128 and small enough for
///   [`RESIDENT_NORM_VECTORS`] float4s per thread;
/// - after it, a one-row [`Glu`] of a kind of [`FUSED_GLU_KINDS`] whose `x` is the
///   product's `out`, its `n` a multiple of 32 and half the product's rows; or a
///   one-token [`QkvRopeAppend`] of caches of [`FUSED_ROPE_CACHES`] whose `qkv` is the
///   product's `out`, of all the product's rows;
///
/// with at least one of the two. None when `index` starts no such run.
pub fn fusible(graph: &Graph, index: usize, fusions: Fusions) -> Option<Fusion<'_>> {
    let ops = graph.ops();
    let (norm, at) = match ops.get(index)? {
        Op::AddRmsNorm(norm) if fusions.norms => (Some(norm), index + 1),
        Op::MatMul(_) if fusions.glus || fusions.ropes => (None, index),
        _ => return None,
    };
    let Some(Op::MatMul(product)) = ops.get(at) else {
        return None;
    };
    let threads = resident_threads(graph, product)?;
    if let Some(norm) = norm {
        if !norm_fits(graph, index, norm, product, threads) {
            return None;
        }
    }
    let epilogue = match ops.get(at + 1) {
        Some(Op::Glu(glu)) if fusions.glus && glu_fits(product, glu) => Some(Epilogue::Glu(glu)),
        Some(Op::QkvRopeAppend(r)) if fusions.ropes && rope_fits(graph, product, r) => {
            Some(Epilogue::RopeAppend(r))
        }
        _ => None,
    };
    (norm.is_some() || epilogue.is_some()).then_some(Fusion {
        norm,
        product,
        epilogue,
    })
}

/// Threads of a block of `product`'s plan when that is the resident mat-vec.
fn resident_threads(graph: &Graph, product: &MatMul) -> Option<u32> {
    // One row is a mat-vec, never a product on cuBLASLt.
    let plan = MatMulArgs::of_op(graph, product, usize::MAX)
        .ok()?
        .check()
        .ok()?;
    match plan.kernel {
        MatMulKernel::MatVecResident { threads, .. } => Some(threads),
        _ => None,
    }
}

/// Whether the norm at `index` can be computed by every block of the product after it
/// (see [`fusible`]).
fn norm_fits(graph: &Graph, index: usize, norm: &AddRmsNorm, mm: &MatMul, threads: u32) -> bool {
    let (Some(out_q8), Some(_)) = (norm.out_q8, norm.weight) else {
        return false;
    };
    let shape_fits = norm.rows == 1
        && mm.m == 1
        && norm.dim == mm.k
        && mm.k % 128 == 0
        && mm.k / 4 <= (RESIDENT_NORM_VECTORS * threads) as usize;
    if !shape_fits || mm.x != norm.out || mm.x_q8 != Some(out_q8) {
        return false;
    }
    let transient = |id| {
        graph
            .desc(id)
            .is_ok_and(|d| d.kind == BufferKind::Transient)
    };
    let read_elsewhere = graph
        .ops()
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != index + 1)
        .any(|(_, op)| op.inputs().iter().any(|&id| id == norm.out || id == out_q8));
    transient(norm.out) && transient(out_q8) && !read_elsewhere
}

/// Whether `glu` can be computed in the epilogue of `product` (see [`fusible`]).
fn glu_fits(product: &MatMul, glu: &Glu) -> bool {
    FUSED_GLU_KINDS.contains(&glu.kind)
        && glu.rows == 1
        && product.m == 1
        && glu.x == product.out
        && glu.n % Q8_1_BLOCK_ELEMS as usize == 0
        && product.n == 2 * glu.n
}

/// Whether `r` can run in the epilogue of `product` (see [`fusible`]).
fn rope_fits(graph: &Graph, product: &MatMul, r: &QkvRopeAppend) -> bool {
    let heads = r.n_heads + 2 * r.n_kv_heads;
    r.n_tokens == 1
        && product.m == 1
        && r.qkv == product.out
        && product.n == heads * r.params.head_dim
        && graph
            .desc(r.k_cache)
            .is_ok_and(|d| FUSED_ROPE_CACHES.contains(&d.dtype))
}

/// The buffers the fused launch reads (the norm's `x`, `residual` and weight, or the
/// product's `x_q8`; the product's weight and bias; the epilogue's other inputs) and
/// writes (the norm's `sum`, the product's `out`, the epilogue's outputs), each where
/// its op has it.
fn operands(f: &Fusion<'_>) -> (Vec<BufferId>, Vec<BufferId>) {
    let staged = match f.norm {
        Some(norm) => [Some(norm.x), Some(norm.residual), norm.weight].to_vec(),
        None => vec![f.product.x_q8],
    };
    let (epilogue_in, epilogue_out) = match f.epilogue {
        None => (vec![], vec![]),
        Some(Epilogue::Glu(g)) => (vec![], vec![Some(g.out), g.out_q8]),
        Some(Epilogue::RopeAppend(r)) => {
            let norm = r
                .norm
                .map_or([None, None], |n| [Some(n.q_weight), Some(n.k_weight)]);
            let inputs = [Some(r.positions), r.slots, r.freq_factors, norm[0], norm[1]];
            let outputs = [r.q_out, r.k_cache, r.v_cache].map(Some);
            (inputs.to_vec(), outputs.to_vec())
        }
    };
    let inputs = staged
        .into_iter()
        .chain([Some(f.product.w), f.product.bias])
        .chain(epilogue_in)
        .flatten()
        .collect();
    let outputs = [f.norm.map(|n| n.sum), Some(f.product.out)]
        .into_iter()
        .chain(epilogue_out)
        .flatten()
        .collect();
    (inputs, outputs)
}

/// Whether the fused launch's outputs are in memory of their own, apart from each
/// other and from every input: the planner keeps consecutive ops' operands live
/// through both, but bindings made otherwise may not.
pub fn operands_apart<B: DeviceBuffer>(f: &Fusion<'_>, bindings: &Bindings<'_, B>) -> bool {
    let (inputs, outputs) = operands(f);
    outputs.iter().enumerate().all(|(i, &o)| {
        inputs
            .iter()
            .chain(&outputs[..i])
            .all(|&other| !bindings.shares_memory(other, o))
    })
}

/// The fused kernel of a resident mat-vec plan's shape for weights of `dtype`: with the
/// norm before the product when `norm`, with `epilogue`'s after it when given.
pub fn spec(
    dtype: DType,
    kernel: MatMulKernel,
    norm: bool,
    epilogue: Option<EpilogueKind>,
) -> Result<KernelSpec> {
    let op = name(norm, epilogue.map(|e| matches!(e, EpilogueKind::Glu(_))));
    let MatMulKernel::MatVecResident {
        threads,
        min_blocks,
        aligned,
    } = kernel
    else {
        return Err(Error::invalid(
            op,
            format!("the fused ops run only in the resident mat-vec, not {kernel:?}"),
        ));
    };
    if !norm && epilogue.is_none() {
        return Err(Error::invalid(op, "nothing to fuse with the product"));
    }
    let tag = weight_tag(op, dtype)?;
    let (suffix, key, args) = match epilogue {
        None => ("", String::new(), String::new()),
        Some(EpilogueKind::Glu(kind)) => (
            "_glu",
            format!("|glu={}", kind.name()),
            format!("{}, ", super::elementwise::functor(kind)),
        ),
        Some(EpilogueKind::RopeAppend { style, cache }) => (
            "_rope_append",
            format!("|style={}|cache={cache}", style_name(style)),
            format!("{}, {}, ", style == RopeStyle::NeoX, cache_tag(op, cache)?),
        ),
    };
    let entry = format!(
        "matvec_resident{}{suffix}",
        if norm { "_add_norm" } else { "" }
    );
    let aligned_key = u8::from(aligned);
    Ok(MATVEC.spec(
        format!(
            "{entry}|w={dtype}{key}|threads={threads}|min_blocks={min_blocks}|aligned={aligned_key}"
        ),
        format!("kiln::{entry}<{tag}, {args}{aligned}, {threads}, {min_blocks}>"),
    ))
}

/// The fused kernels for every resident mat-vec specialisation: the norm alone, and
/// each epilogue that compiling a graph fuses ([`FUSED_GLU_KINDS`], both rotation
/// styles over [`FUSED_ROPE_CACHES`]) with and without the norm.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    let glus = FUSED_GLU_KINDS.map(EpilogueKind::Glu);
    let ropes = [RopeStyle::Normal, RopeStyle::NeoX]
        .into_iter()
        .flat_map(|style| FUSED_ROPE_CACHES.map(|cache| EpilogueKind::RopeAppend { style, cache }));
    let variants: Vec<(bool, Option<EpilogueKind>)> = std::iter::once((true, None))
        .chain(
            glus.into_iter()
                .chain(ropes)
                .flat_map(|e| [(false, Some(e)), (true, Some(e))]),
        )
        .collect();
    super::matmul::resident_kernels()
        .into_iter()
        .flat_map(|(dtype, kernel)| {
            variants
                .iter()
                .filter_map(move |&(norm, epilogue)| spec(dtype, kernel, norm, epilogue).ok())
        })
        .collect()
}

/// The norm's operands: F32 `x` and `residual` of one row of `k` elements, the norm
/// weight, the `sum` it writes, and `eps`.
pub struct NormOperands<'a> {
    pub x: &'a CudaBuffer,
    pub residual: &'a CudaBuffer,
    pub weight: &'a CudaBuffer,
    pub sum: &'a mut CudaBuffer,
    pub eps: f32,
}

/// Where the product's row comes from.
pub enum Staging<'a> {
    /// x's Q8_1 copy ([`kiln_core::ops::Q8_COPY`], `k / 32` blocks).
    Copy(&'a CudaBuffer),
    /// The residual add and RMSNorm, computed by every block.
    AddNorm(NormOperands<'a>),
}

/// The product's operands: the weight of `dtype` (`n x k`, uploaded with
/// `upload_weight`), the optional bias and `out`.
pub struct ProductOperands<'a> {
    pub w: &'a CudaBuffer,
    pub dtype: DType,
    pub bias: Option<&'a CudaBuffer>,
    pub out: &'a mut CudaBuffer,
    pub n: usize,
    pub k: usize,
}

/// The Glu's operands: `out = kind(gate, up)` of the product's `n / 2` gate and up
/// values, and its optional Q8_1 copy.
pub struct GluOperands<'a> {
    pub kind: ElementwiseKind,
    pub out: &'a mut CudaBuffer,
    pub out_q8: Option<&'a mut CudaBuffer>,
}

/// The [`QkvRopeAppend`]'s operands but `qkv` (the product's `out`), for one token.
pub struct RopeAppendOperands<'a> {
    pub positions: &'a CudaBuffer,
    pub freq_factors: Option<&'a CudaBuffer>,
    pub norm: Option<QkNormWeights<'a>>,
    pub q_out: &'a mut CudaBuffer,
    pub caches: KvCaches<'a>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub params: RopeParams,
}

/// The epilogue's operands.
pub enum EpilogueOperands<'a> {
    Glu(GluOperands<'a>),
    RopeAppend(RopeAppendOperands<'a>),
}

impl EpilogueOperands<'_> {
    fn kind(&self) -> EpilogueKind {
        match self {
            EpilogueOperands::Glu(g) => EpilogueKind::Glu(g.kind),
            EpilogueOperands::RopeAppend(r) => EpilogueKind::RopeAppend {
                style: r.params.style,
                cache: r.caches.dtype,
            },
        }
    }
}

/// `out = row · wᵀ (+ bias)` for the row `staging` gives (the norm's `sum = x +
/// residual` stored, then `RmsNorm(sum, weight, eps)`, rounded to Q8_1 as the unfused
/// norm rounds its copy; or the copy given), and with `epilogue` its op on `out` as its
/// own kernel computes it, in one launch. Errors unless the product's plan is the
/// resident mat-vec, a norm's row fits the fused kernel (`k` a multiple of 128, at most
/// 4 · [`RESIDENT_NORM_VECTORS`] per thread), a Glu's halves are whole Q8_1 blocks (`n`
/// a multiple of 64) and a QkvRopeAppend is of one token and of all `n` rows, when
/// there is nothing to fuse, and on operand sizes as the ops' own checks.
pub fn fused_matvec(
    backend: &CudaBackend,
    staging: Staging<'_>,
    product: ProductOperands<'_>,
    epilogue: Option<EpilogueOperands<'_>>,
) -> Result<()> {
    let norm = matches!(staging, Staging::AddNorm(_));
    let epilogue_kind = epilogue.as_ref().map(EpilogueOperands::kind);
    let op = name(
        norm,
        epilogue_kind.map(|e| matches!(e, EpilogueKind::Glu(_))),
    );
    let ProductOperands {
        w,
        dtype,
        bias,
        out,
        n,
        k,
    } = product;
    let plan = MatMulArgs {
        weight: dtype,
        m: 1,
        n,
        k,
        // The fused kernels read the row through the staging, checked below.
        x_bytes: k.saturating_mul(4),
        x_q8_bytes: Some(match &staging {
            Staging::Copy(copy) => copy.bytes(),
            Staging::AddNorm(_) => k / 32 * DType::Q8_1.block_bytes(),
        }),
        w_bytes: w.bytes(),
        w_packed: w.packed(),
        bias_bytes: bias.map(|b| b.bytes()),
        out_bytes: out.bytes(),
        gemm_min_rows: usize::MAX,
    }
    .check()?;
    let MatMulKernel::MatVecResident { threads, .. } = plan.kernel else {
        return Err(Error::invalid(
            op,
            format!(
                "the fused ops run only in the resident mat-vec; this product's plan is {:?}",
                plan.kernel
            ),
        ));
    };
    if let Staging::AddNorm(norm) = &staging {
        check_norm(op, norm, k, threads)?;
    }
    let rope_plan = match &epilogue {
        Some(EpilogueOperands::RopeAppend(r)) => Some(check_rope(op, r, n, out.bytes())?),
        _ => None,
    };
    // The rows of a ticket's group.
    let group_rows = match (&epilogue, &rope_plan) {
        (Some(EpilogueOperands::Glu(glu)), _) => Some(check_glu(op, glu, n)?),
        (_, Some(plan)) => Some(plan.head_dim as usize),
        _ => None,
    };
    let kernel = backend.kernel(&spec(dtype, plan.kernel, norm, epilogue_kind)?)?;
    allow_dynamic_shared(&kernel, &plan.config)?;
    let launch_config = resident_config(backend, &kernel, plan.config, n, threads)?;
    let (n32, k32) = (to_u32(op, "n", n)?, to_u32(op, "k", k)?);
    let row_bytes = dtype.bytes_for(k)? as u64;
    // The epilogue's tickets: one zeroed u32 per group, held until the launch is queued.
    let mut tickets = match group_rows {
        Some(rows) => Some(
            backend
                .epilogue_tickets()
                .at_least(backend, 4 * (n / rows))?,
        ),
        None => None,
    };
    let mut args = KernelArgs::new(backend);
    args.arg(w.slice());
    match staging {
        Staging::Copy(copy) => args.arg(copy.slice()),
        Staging::AddNorm(norm) => args
            .arg(norm.x.slice())
            .arg(norm.residual.slice())
            .arg(norm.weight.slice())
            .arg(norm.sum.slice_mut())
            .arg(&norm.eps),
    };
    args.arg(bias.map(|b| b.slice())).arg(out.slice_mut());
    if let Some(held) = tickets.as_mut() {
        let newest = held
            .last_mut()
            .ok_or_else(|| Error::invalid(op, "the epilogue's tickets were not allocated"))?;
        args.arg(newest.slice_mut());
    }
    match (epilogue, &rope_plan) {
        (Some(EpilogueOperands::Glu(glu)), _) => {
            args.arg(glu.out.slice_mut())
                .arg(glu.out_q8.map(|q| q.slice_mut()));
        }
        (Some(EpilogueOperands::RopeAppend(r)), Some(rope_plan)) => {
            let eps = r.norm.map_or(0.0, |norm| norm.eps);
            args.arg(r.positions.slice())
                .arg(r.caches.slots.ids.map(|s| s.slice()))
                .arg(r.freq_factors.map(|f| f.slice()))
                .arg(r.norm.map(|norm| norm.q_weight.slice()))
                .arg(r.norm.map(|norm| norm.k_weight.slice()))
                .arg(r.q_out.slice_mut())
                .arg(r.caches.k.slice_mut())
                .arg(r.caches.v.slice_mut())
                .arg(&rope_plan.n_heads)
                .arg(&rope_plan.n_kv_heads)
                .arg(&rope_plan.head_dim)
                .arg(&rope_plan.rotary_dim)
                .arg(&r.params.base)
                .arg(&r.params.freq_scale)
                .arg(&eps)
                .arg(&rope_plan.capacity)
                .arg(&rope_plan.n_slots);
        }
        _ => {}
    }
    args.arg(&n32).arg(&k32).arg(&row_bytes);
    // SAFETY: the arguments match the kernel `spec` named (kernels/matvec.cu):
    // (const u8* w, then const u8* xq8 or (const float* x, const float* residual, const
    // float* norm_weight, float* sum, float eps), const float* bias, float* out, then with
    // an epilogue u32* tickets and its operands: (float* glu_out, u8* glu_q8) or rope.cu's
    // qkv_rope_append's from positions to n_slots without n_tokens; then u32 n, u32 k, u64
    // row_bytes). w holds n rows of row_bytes, bias is null or holds n values, out n; xq8
    // holds k / 32 Q8_1 blocks, x, residual, norm_weight and sum k values; glu_out n / 2
    // values, glu_q8 is null or holds n / 64 blocks; the rotation's operands hold one
    // token's (as qkv_rope_append checks them); the tickets one zeroed u32 per group
    // (the kernel leaves them zero), locked until the launch is queued and never freed
    // while the backend lives (all checked).
    unsafe { launch(&kernel, &mut args, launch_config) }
}

/// Errors unless the row fits the fused norm (`k` a multiple of 128, at most 4 ·
/// [`RESIDENT_NORM_VECTORS`] per thread of the plan's blocks) and the norm's buffers
/// hold `k` F32 values and a finite `eps >= 0`.
fn check_norm(op: &str, norm: &NormOperands<'_>, k: usize, threads: u32) -> Result<()> {
    if k % 128 != 0 || k / 4 > (RESIDENT_NORM_VECTORS * threads) as usize {
        return Err(Error::invalid(
            op,
            format!(
                "k {k} must be a multiple of 128 and at most {} for blocks of {threads} threads",
                4 * RESIDENT_NORM_VECTORS * threads
            ),
        ));
    }
    if !(norm.eps.is_finite() && norm.eps >= 0.0) {
        return Err(Error::invalid(
            op,
            format!("eps must be finite and >= 0, got {}", norm.eps),
        ));
    }
    for (role, bytes) in [
        ("x", norm.x.bytes()),
        ("residual", norm.residual.bytes()),
        ("norm weight", norm.weight.bytes()),
        ("sum", norm.sum.bytes()),
    ] {
        check_bytes(op, role, bytes, DType::F32, k)?;
    }
    Ok(())
}

/// Errors unless the product's `n` rows are whole groups of [`GLU_GROUP_ROWS`] (so that
/// each half is whole Q8_1 blocks) and the Glu's buffers hold `n / 2` values and their
/// copy; returns the rows of a group.
fn check_glu(op: &str, glu: &GluOperands<'_>, n: usize) -> Result<usize> {
    let group = GLU_GROUP_ROWS as usize;
    if n % group != 0 {
        return Err(Error::invalid(
            op,
            format!(
                "the gate-up product's {n} rows must be a multiple of {group} \
                 (two halves of whole Q8_1 blocks)"
            ),
        ));
    }
    let half = n / 2;
    check_bytes(op, "glu out", glu.out.bytes(), DType::F32, half)?;
    check_q8_copy(
        op,
        "glu out_q8",
        glu.out_q8.as_ref().map(|q| q.bytes()),
        half,
        half,
    )?;
    Ok(group)
}

/// The checked plan of the rotation and append of one token's `n` product values
/// (`qkv_bytes` of them in the product's out): errors unless `n` is the op's heads times
/// `head_dim`, and as [`QkvRopeArgs::check`].
fn check_rope(
    op: &str,
    r: &RopeAppendOperands<'_>,
    n: usize,
    qkv_bytes: usize,
) -> Result<QkvRopePlan> {
    let heads = r
        .n_kv_heads
        .checked_mul(2)
        .and_then(|kv| kv.checked_add(r.n_heads));
    if heads.and_then(|h| h.checked_mul(r.params.head_dim)) != Some(n) {
        return Err(Error::invalid(
            op,
            format!(
                "the q-k-v product's {n} rows must be (n_heads {} + 2 n_kv_heads {}) x head_dim {}",
                r.n_heads, r.n_kv_heads, r.params.head_dim
            ),
        ));
    }
    QkvRopeArgs {
        n_tokens: 1,
        n_heads: r.n_heads,
        n_kv_heads: r.n_kv_heads,
        capacity: r.caches.capacity,
        n_slots: r.caches.slots.n_slots,
        params: r.params,
        cache: r.caches.dtype,
        norm: r
            .norm
            .as_ref()
            .map(|norm| (norm.eps, norm.q_weight.bytes(), norm.k_weight.bytes())),
        qkv_bytes,
        positions_bytes: r.positions.bytes(),
        slots_bytes: r.caches.slots.ids.map(|s| s.bytes()),
        freq_factors_bytes: r.freq_factors.map(|f| f.bytes()),
        q_out_bytes: r.q_out.bytes(),
        k_cache_bytes: r.caches.k.bytes(),
        v_cache_bytes: r.caches.v.bytes(),
    }
    .check()
}

/// Runs `fusion` (found by [`fusible`]) as one launch on the buffers `bindings` holds.
pub(crate) fn run(
    backend: &CudaBackend,
    graph: &Graph,
    fusion: &Fusion<'_>,
    bindings: &mut Bindings<'_, CudaBuffer>,
) -> Result<()> {
    let op = fusion.name();
    let product = fusion.product;
    let dtype = graph.desc(product.w)?.dtype;
    let cache = match fusion.epilogue {
        Some(Epilogue::RopeAppend(r)) => Some(graph.desc(r.k_cache)?.dtype),
        _ => None,
    };
    let (inputs, outputs) = operands(fusion);
    bindings.with_operands(&inputs, &outputs, |ins, outs| {
        let missing = || Error::invalid(op, "an operand was not bound");
        let mut ins = ins.iter().copied();
        let mut outs = outs.iter_mut().map(|b| &mut **b);
        let staging = match fusion.norm {
            Some(norm) => Staging::AddNorm(NormOperands {
                x: ins.next().ok_or_else(missing)?,
                residual: ins.next().ok_or_else(missing)?,
                weight: ins.next().ok_or_else(missing)?,
                sum: outs.next().ok_or_else(missing)?,
                eps: norm.eps,
            }),
            None => Staging::Copy(ins.next().ok_or_else(missing)?),
        };
        let w = ins.next().ok_or_else(missing)?;
        let bias = match product.bias {
            Some(_) => Some(ins.next().ok_or_else(missing)?),
            None => None,
        };
        let out = outs.next().ok_or_else(missing)?;
        let epilogue = match fusion.epilogue {
            None => None,
            Some(Epilogue::Glu(glu)) => Some(EpilogueOperands::Glu(GluOperands {
                kind: glu.kind,
                out: outs.next().ok_or_else(missing)?,
                out_q8: match glu.out_q8 {
                    Some(_) => Some(outs.next().ok_or_else(missing)?),
                    None => None,
                },
            })),
            Some(Epilogue::RopeAppend(r)) => {
                let positions = ins.next().ok_or_else(missing)?;
                let mut optional = |id: Option<BufferId>| match id {
                    Some(_) => ins.next().ok_or_else(missing).map(Some),
                    None => Ok(None),
                };
                let slots = optional(r.slots)?;
                let freq_factors = optional(r.freq_factors)?;
                let norm = match r.norm {
                    Some(n) => Some(QkNormWeights {
                        q_weight: ins.next().ok_or_else(missing)?,
                        k_weight: ins.next().ok_or_else(missing)?,
                        eps: n.eps,
                    }),
                    None => None,
                };
                let q_out = outs.next().ok_or_else(missing)?;
                let k = outs.next().ok_or_else(missing)?;
                let v = outs.next().ok_or_else(missing)?;
                Some(EpilogueOperands::RopeAppend(RopeAppendOperands {
                    positions,
                    freq_factors,
                    norm,
                    q_out,
                    caches: KvCaches {
                        k,
                        v,
                        dtype: cache.ok_or_else(missing)?,
                        capacity: r.capacity,
                        slots: super::CacheSlots {
                            ids: slots,
                            n_slots: r.n_slots,
                        },
                    },
                    n_heads: r.n_heads,
                    n_kv_heads: r.n_kv_heads,
                    params: r.params,
                }))
            }
        };
        let product = ProductOperands {
            w,
            dtype,
            bias,
            out,
            n: product.n,
            k: product.k,
        };
        fused_matvec(backend, staging, product, epilogue)
    })?
}
