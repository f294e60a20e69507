//! The resident mat-vec (kernels/matvec.cu's `resident_matvec`) fused with the one-row
//! ops around it in a decode step, so that they cost no launch of their own:
//! - before it, an [`AddRmsNorm`] whose Q8_1 copy the product reads: every block
//!   computes the residual add and the norm itself and rounds the result to Q8_1 in
//!   shared memory (`matvec_resident_add_norm`; the norms before the q-k-v and the
//!   gate-up products);
//! - after it, a [`Glu`] of its output: the warps take the product's rows 32 gate rows
//!   and their 32 up rows at a time, and the last warp to finish such a group computes
//!   its 32 gated values and their Q8_1 block (`matvec_resident_glu`, and
//!   `matvec_resident_add_norm_glu` with both).
//!
//! Compiling a graph ([`kiln_core::Backend::compile`]) fuses a run where [`fusible`]
//! finds one. The fused launch writes what the ops would, except the norm's `out` and
//! `out_q8`, which is why a norm is fused only when nothing else reads them (transient
//! buffers read by the product alone). The Glu's values are computed from the
//! product's stored f32 outputs with the Glu kernel's functor and rounding, so they
//! are the unfused pair's bits.

use kiln_core::ops::{AddRmsNorm, ElementwiseKind, Glu, MatMul};
use kiln_core::{Bindings, BufferId, BufferKind, DType, DeviceBuffer, Error, Graph, Op, Result};

use super::common::{allow_dynamic_shared, launch, weight_tag};
use super::matmul::{resident_blocks, MatMulArgs, MatMulKernel, MATVEC};
use super::{check_bytes, check_q8_copy, to_u32};
use crate::constants::{GLU_GROUP_ROWS, Q8_1_BLOCK_ELEMS, RESIDENT_NORM_VECTORS};
use crate::launch::KernelArgs;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

/// The Glu kinds that compiling a graph fuses (the feed-forward of every architecture
/// kiln runs); [`fused_matvec`] takes any kind.
pub const FUSED_GLU_KINDS: [ElementwiseKind; 1] = [ElementwiseKind::SiluMul];

/// Which fusions compiling a graph makes ([`CudaBackend::fuse_norms`],
/// [`CudaBackend::fuse_glus`]).
#[derive(Clone, Copy, Debug)]
pub struct Fusions {
    pub norms: bool,
    pub glus: bool,
}

/// Consecutive ops of a graph that one resident mat-vec launch computes: the product,
/// with the norm before it, the Glu after it, or both.
#[derive(Clone, Copy, Debug)]
pub struct Fusion<'g> {
    pub norm: Option<&'g AddRmsNorm>,
    pub product: &'g MatMul,
    pub glu: Option<&'g Glu>,
}

impl Fusion<'_> {
    /// How many ops of the graph the launch stands for.
    pub fn ops(&self) -> usize {
        1 + usize::from(self.norm.is_some()) + usize::from(self.glu.is_some())
    }

    /// The name of the run in errors and profiles: the ops' names joined by `+`.
    pub fn name(&self) -> &'static str {
        name(self.norm.is_some(), self.glu.is_some())
    }
}

fn name(norm: bool, glu: bool) -> &'static str {
    match (norm, glu) {
        (true, true) => "add_rms_norm+matmul+glu",
        (true, false) => "add_rms_norm+matmul",
        (false, true) => "matmul+glu",
        (false, false) => "matmul",
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
///   product's `out`, its `n` a multiple of 32 and half the product's rows;
///
/// with at least one of the two. None when `index` starts no such run.
pub fn fusible(graph: &Graph, index: usize, fusions: Fusions) -> Option<Fusion<'_>> {
    let ops = graph.ops();
    let (norm, at) = match ops.get(index)? {
        Op::AddRmsNorm(norm) if fusions.norms => (Some(norm), index + 1),
        Op::MatMul(_) if fusions.glus => (None, index),
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
    let glu = match ops.get(at + 1) {
        Some(Op::Glu(glu)) if fusions.glus && glu_fits(product, glu) => Some(glu),
        _ => None,
    };
    (norm.is_some() || glu.is_some()).then_some(Fusion { norm, product, glu })
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

/// The buffers the fused launch reads (the norm's `x`, `residual` and weight, or the
/// product's `x_q8`; then the product's weight and bias) and writes (the norm's `sum`,
/// the product's `out`, the Glu's `out` and `out_q8`), each where its op has it.
fn operands(f: &Fusion<'_>) -> (Vec<BufferId>, Vec<BufferId>) {
    let staged = match f.norm {
        Some(norm) => [Some(norm.x), Some(norm.residual), norm.weight].to_vec(),
        None => vec![f.product.x_q8],
    };
    let inputs = staged
        .into_iter()
        .chain([Some(f.product.w), f.product.bias])
        .flatten()
        .collect();
    let outputs = [f.norm.map(|n| n.sum), Some(f.product.out)]
        .into_iter()
        .chain(f.glu.map(|g| [Some(g.out), g.out_q8]).into_iter().flatten())
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
/// norm before the product when `norm`, with a Glu of `glu`'s kind after it when given.
pub fn spec(
    dtype: DType,
    kernel: MatMulKernel,
    norm: bool,
    glu: Option<ElementwiseKind>,
) -> Result<KernelSpec> {
    let op = name(norm, glu.is_some());
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
    if !norm && glu.is_none() {
        return Err(Error::invalid(op, "nothing to fuse with the product"));
    }
    let tag = weight_tag(op, dtype)?;
    let entry = format!(
        "matvec_resident{}{}",
        if norm { "_add_norm" } else { "" },
        if glu.is_some() { "_glu" } else { "" }
    );
    let (glu_key, functor) = match glu {
        Some(kind) => (
            format!("|glu={}", kind.name()),
            format!("{}, ", super::elementwise::functor(kind)),
        ),
        None => (String::new(), String::new()),
    };
    let aligned_key = u8::from(aligned);
    Ok(MATVEC.spec(
        format!(
            "{entry}|w={dtype}{glu_key}|threads={threads}|min_blocks={min_blocks}|aligned={aligned_key}"
        ),
        format!("kiln::{entry}<{tag}, {functor}{aligned}, {threads}, {min_blocks}>"),
    ))
}

/// The fused kernels for every resident mat-vec specialisation: the norm, each kind of
/// [`FUSED_GLU_KINDS`], and both.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    let variants = std::iter::once((true, None))
        .chain(
            FUSED_GLU_KINDS
                .iter()
                .flat_map(|&k| [(false, Some(k)), (true, Some(k))]),
        )
        .collect::<Vec<_>>();
    super::matmul::resident_kernels()
        .into_iter()
        .flat_map(|(dtype, kernel)| {
            variants
                .iter()
                .filter_map(move |&(norm, glu)| spec(dtype, kernel, norm, glu).ok())
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

/// `out = row · wᵀ (+ bias)` for the row `staging` gives (the norm's `sum = x +
/// residual` stored, then `RmsNorm(sum, weight, eps)`, rounded to Q8_1 as the unfused
/// norm rounds its copy; or the copy given), and with `glu` the [`Glu`] of `out` as the
/// Glu kernel computes it, in one launch. Errors unless the product's plan is the
/// resident mat-vec, a norm's row fits the fused kernel (`k` a multiple of 128, at most
/// 4 · [`RESIDENT_NORM_VECTORS`] per thread) and a Glu's halves are whole Q8_1 blocks
/// (`n` a multiple of 64), when there is nothing to fuse, and on operand sizes as the
/// ops' own checks.
pub fn fused_matvec(
    backend: &CudaBackend,
    staging: Staging<'_>,
    product: ProductOperands<'_>,
    glu: Option<GluOperands<'_>>,
) -> Result<()> {
    let norm = matches!(staging, Staging::AddNorm(_));
    let op = name(norm, glu.is_some());
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
    if let Some(glu) = &glu {
        check_glu(op, glu, n)?;
    }
    let kernel = backend.kernel(&spec(
        dtype,
        plan.kernel,
        norm,
        glu.as_ref().map(|g| g.kind),
    )?)?;
    allow_dynamic_shared(&kernel, &plan.config)?;
    let warps = backend
        .resident_warps()
        .get(backend, &kernel, &plan.config)?;
    let mut launch_config = plan.config;
    // At most the plan's blocks (one row per warp), which fit the grid.
    launch_config.grid_dim.0 = resident_blocks(n, warps, threads / 32) as u32;
    let (n32, k32) = (to_u32(op, "n", n)?, to_u32(op, "k", k)?);
    let row_bytes = dtype.bytes_for(k)? as u64;
    // The Glu's tickets: one zeroed u32 per group of GLU_GROUP_ROWS product rows, held
    // until the launch is queued.
    let groups = n / GLU_GROUP_ROWS as usize;
    let mut tickets = match glu {
        Some(_) => Some(backend.glu_tickets().at_least(backend, 4 * groups)?),
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
    if let (Some(glu), Some(held)) = (glu, tickets.as_mut()) {
        let newest = held
            .last_mut()
            .ok_or_else(|| Error::invalid(op, "the Glu's tickets were not allocated"))?;
        args.arg(glu.out.slice_mut())
            .arg(glu.out_q8.map(|q| q.slice_mut()))
            .arg(newest.slice_mut());
    }
    args.arg(&n32).arg(&k32).arg(&row_bytes);
    // SAFETY: the arguments match the kernel `spec` named (kernels/matvec.cu):
    // (const u8* w, then const u8* xq8 or (const float* x, const float* residual, const
    // float* norm_weight, float* sum, float eps), const float* bias, float* out, then with
    // a Glu (float* glu_out, u8* glu_q8, u32* tickets), u32 n, u32 k, u64 row_bytes). w
    // holds n rows of row_bytes, bias is null or holds n values, out n; xq8 holds k / 32
    // Q8_1 blocks, x, residual, norm_weight and sum k values; glu_out n / 2 values, glu_q8
    // is null or holds n / 64 blocks, and the tickets n / 64 zeroed u32s (the kernel
    // leaves them zero), locked until the launch is queued and never freed while the
    // backend lives (all checked).
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
/// copy.
fn check_glu(op: &str, glu: &GluOperands<'_>, n: usize) -> Result<()> {
    if n % GLU_GROUP_ROWS as usize != 0 {
        return Err(Error::invalid(
            op,
            format!(
                "the gate-up product's {n} rows must be a multiple of {GLU_GROUP_ROWS} \
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
    )
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
    let (inputs, outputs) = operands(fusion);
    bindings.with_operands(&inputs, &outputs, |ins, outs| {
        let mut outs = outs.iter_mut();
        let mut next_out = || {
            outs.next()
                .map(|b| &mut **b)
                .ok_or_else(|| Error::invalid(op, "an output was not bound"))
        };
        let (staging, rest) = match fusion.norm {
            Some(norm) => {
                let [x, residual, weight, rest @ ..] = ins else {
                    return Err(Error::invalid(op, "the fused norm needs a weight"));
                };
                let norm = NormOperands {
                    x,
                    residual,
                    weight,
                    sum: next_out()?,
                    eps: norm.eps,
                };
                (Staging::AddNorm(norm), rest)
            }
            None => {
                let [copy, rest @ ..] = ins else {
                    return Err(Error::invalid(op, "the product needs x's Q8_1 copy"));
                };
                (Staging::Copy(copy), rest)
            }
        };
        let [w, bias @ ..] = rest else {
            return Err(Error::invalid(op, "the product needs its weight"));
        };
        let out = next_out()?;
        let glu = match fusion.glu {
            Some(glu) => Some(GluOperands {
                kind: glu.kind,
                out: next_out()?,
                out_q8: glu.out_q8.map(|_| next_out()).transpose()?,
            }),
            None => None,
        };
        let product = ProductOperands {
            w,
            dtype,
            bias: bias.first().copied(),
            out,
            n: product.n,
            k: product.k,
        };
        fused_matvec(backend, staging, product, glu)
    })?
}
