//! A mixture-of-experts router fused with the one-row product that computes its
//! logits: kernels/moe.cu's `moe_router_matvec`, the staged f32 mat-vec of a decode
//! token's router weight (`ffn_gate_inp`) whose last block to finish then runs
//! [`MoeRouter`]'s softmax or sigmoid, top-k and normalization, so that the router
//! costs no launch of its own.
//!
//! Compiling a graph ([`kiln_core::Backend::compile`]) fuses a pair where [`fusible`]
//! finds one and [`crate::fusion::Fusion::Routers`] is on. The fused launch writes
//! everything the two ops write (the product's `out`, which is the router's `logits`,
//! and the router's `ids` and `weights`), each bit for bit as the unfused pair writes
//! it: the product is the staged mat-vec of the same plan, and the router's body is
//! the one `moe_router` runs, in blocks of the same size.

use kiln_core::ops::{Gating, MatMul, MoeRouter};
use kiln_core::{Bindings, DType, DeviceBuffer, Error, Graph, Op, Result};

use super::common::{allow_dynamic_shared, launch, weight_tag};
use super::matmul::{streaming_kernels, MatMulArgs, MatMulKernel};
use super::moe::{gating_tag, RouterArgs, MOE, ROUTER_THREADS};
use super::to_u32;
use crate::constants::MATVEC_THREADS;
use crate::launch::KernelArgs;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

const OP: &str = "matmul+moe_router";

// The router's sums run in the order of its blocks' threads: the fused kernel's
// blocks (the mat-vec's) must be the router's size for its weights to be bit for bit
// the unfused router's.
const _: () = assert!(MATVEC_THREADS == ROUTER_THREADS);

/// The only weight dtype the fused kernel is compiled for (a router's weight).
const WEIGHT: DType = DType::F32;

/// The ops at `index` and `index + 1` of `graph` when they are a fusible pair: a
/// one-row [`MatMul`] of an F32 weight without a Q8_1 copy of x, then a one-token
/// [`MoeRouter`] whose `logits` are that product's `out` (so `n == n_expert`), with at
/// most [`super::moe::MAX_EXPERTS`] experts, and whose plan is the staged mat-vec.
/// The logits may be read by other ops too: the fused launch writes them.
pub fn fusible(graph: &Graph, index: usize) -> Option<(&MatMul, &MoeRouter)> {
    let (Some(Op::MatMul(mm)), Some(Op::MoeRouter(router))) =
        (graph.ops().get(index), graph.ops().get(index + 1))
    else {
        return None;
    };
    let shape_fits = mm.m == 1
        && router.m == 1
        && mm.x_q8.is_none()
        && router.logits == mm.out
        && mm.n == router.n_expert
        && router.n_expert <= super::moe::MAX_EXPERTS;
    if !shape_fits || graph.desc(mm.w).ok()?.dtype != WEIGHT {
        return None;
    }
    let plan = MatMulArgs::of_op(graph, mm, usize::MAX)
        .ok()?
        .check()
        .ok()?;
    matches!(plan.kernel, MatMulKernel::MatVec { m_tier: 1, .. }).then_some((mm, router))
}

/// Whether the fused launch's outputs (the logits, `ids`, `weights`) are in memory of
/// their own, apart from each other and from every input (`x`, the weight, the bias):
/// the planner keeps a pair's operands live through both ops, but bindings made
/// otherwise may not.
pub fn operands_apart<B: DeviceBuffer>(
    product: &MatMul,
    router: &MoeRouter,
    bindings: &Bindings<'_, B>,
) -> bool {
    let inputs: Vec<_> = [product.x, product.w]
        .into_iter()
        .chain(product.bias)
        .collect();
    let outputs = [product.out, router.ids, router.weights];
    outputs.iter().enumerate().all(|(i, &o)| {
        outputs[i + 1..]
            .iter()
            .chain(&inputs)
            .all(|&other| !bindings.shares_memory(o, other))
    })
}

/// The fused kernel for `gating` and the staged one-row mat-vec `kernel` of an F32
/// weight.
pub fn spec(gating: Gating, kernel: MatMulKernel) -> Result<KernelSpec> {
    let MatMulKernel::MatVec {
        m_tier: 1,
        rows,
        load,
        stages,
    } = kernel
    else {
        return Err(Error::invalid(
            OP,
            format!("the fused router runs only in the one-row staged mat-vec, not {kernel:?}"),
        ));
    };
    let tag = weight_tag(OP, WEIGHT)?;
    Ok(MOE.spec(
        format!(
            "moe_router_matvec|w={WEIGHT}|gating={}|rows={rows}|load={load}|stages={stages}",
            gating_tag(gating)
        ),
        format!(
            "kiln::moe_router_matvec<{tag}, {}, {rows}, {load}, {stages}>",
            gating == Gating::Sigmoid
        ),
    ))
}

/// The kernel of the fused launch of `product` and `router` in `graph`.
pub fn spec_of(graph: &Graph, product: &MatMul, router: &MoeRouter) -> Result<KernelSpec> {
    let plan = MatMulArgs::of_op(graph, product, usize::MAX)?.check()?;
    spec(router.gating, plan.kernel)
}

/// The fused kernel for both gatings and every one-row staged mat-vec of an F32
/// weight (both staging widths).
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    streaming_kernels(WEIGHT, 1)
        .into_iter()
        .flat_map(|kernel| [Gating::Softmax, Gating::Sigmoid].map(|g| spec(g, kernel)))
        .filter_map(Result::ok)
        .collect()
}

/// The product's operands: one row `x` of `k` F32 values, the weight `w` of `dtype`
/// (which must be F32) of `n_expert` rows of `k`, the optional F32 bias of `n_expert`,
/// and `logits`, the `n_expert` F32 outputs (the router's input).
pub struct ProductOperands<'a> {
    pub x: &'a CudaBuffer,
    pub w: &'a CudaBuffer,
    pub dtype: DType,
    pub bias: Option<&'a CudaBuffer>,
    pub logits: &'a mut CudaBuffer,
    pub k: usize,
}

/// `logits = x · wᵀ (+ bias)` for one row (as [`MatMul`] defines, in f32, as the
/// one-row mat-vec sums it), then the top `router.k` of `router.n_expert` experts of
/// those logits into `ids` (I32) and their weights into `weights` (F32), as
/// [`MoeRouter`] `router` defines (its buffer ids are not read). Errors unless
/// `router.m` is 1, the weight is F32, the product's plan is the staged mat-vec, and on
/// operand sizes as the two ops' checks.
pub fn router_matvec(
    backend: &CudaBackend,
    product: ProductOperands<'_>,
    ids: &mut CudaBuffer,
    weights: &mut CudaBuffer,
    router: &MoeRouter,
) -> Result<()> {
    let ProductOperands {
        x,
        w,
        dtype,
        bias,
        logits,
        k,
    } = product;
    if router.m != 1 || dtype != WEIGHT {
        return Err(Error::invalid(
            OP,
            format!(
                "the fused router takes one token and an {WEIGHT} weight, got {} tokens and {dtype}",
                router.m
            ),
        ));
    }
    let n = router.n_expert;
    let plan = MatMulArgs {
        weight: dtype,
        m: 1,
        n,
        k,
        x_bytes: x.bytes(),
        x_q8_bytes: None,
        w_bytes: w.bytes(),
        w_packed: w.packed(),
        bias_bytes: bias.map(|b| b.bytes()),
        out_bytes: logits.bytes(),
        gemm_min_rows: usize::MAX,
    }
    .check()?;
    let routing = RouterArgs {
        m: 1,
        n_expert: n,
        k: router.k,
        gating: router.gating,
        normalize: router.normalize,
        logits_bytes: logits.bytes(),
        ids_bytes: ids.bytes(),
        weights_bytes: weights.bytes(),
    }
    .check()?;
    let kernel = backend.kernel(&spec(router.gating, plan.kernel)?)?;
    let mut launch_config = plan.config;
    launch_config.shared_mem_bytes = plan
        .config
        .shared_mem_bytes
        .max(routing.config.shared_mem_bytes);
    allow_dynamic_shared(&kernel, &launch_config)?;
    let (n32, k32) = (to_u32(OP, "n_expert", n)?, to_u32(OP, "k", k)?);
    let top_k = to_u32(OP, "router k", router.k)?;
    let normalize = u32::from(router.normalize);
    let row_bytes = dtype.bytes_for(k)? as u64;
    let mut tickets = backend.epilogue_tickets().at_least(backend, 4)?;
    let ticket = tickets
        .last_mut()
        .ok_or_else(|| Error::invalid(OP, "the ticket workspace holds no buffer"))?;
    let mut args = KernelArgs::new(backend);
    args.arg(w.slice())
        .arg(x.slice())
        .arg(bias.map(|b| b.slice()))
        .arg(logits.slice_mut())
        .arg(ids.slice_mut())
        .arg(weights.slice_mut())
        .arg(ticket.slice_mut())
        .arg(&n32)
        .arg(&k32)
        .arg(&row_bytes)
        .arg(&top_k)
        .arg(&normalize);
    // SAFETY: the arguments match `kiln::moe_router_matvec<W, Sigmoid, ROWS, LOAD,
    // STAGES>` (const u8* w, const float* x, const float* bias, float* logits, int* ids,
    // float* weights, u32* ticket, u32 n_expert, u32 cols, u64 row_bytes, u32 k, u32
    // normalize): x holds k f32, w n rows of row_bytes, bias is null or holds n values,
    // logits n, ids and weights router.k with router.k <= n <= MAX_EXPERTS (all
    // checked); the grid is the plan's staged mat-vec over n rows in blocks of the
    // router's size, with shared memory for both; the ticket is a zeroed u32 of the
    // backend's workspace, which every launch leaves at zero, never freed while the
    // backend lives and locked until the launch is queued.
    unsafe { launch(&kernel, &mut args, launch_config) }
}

/// Runs a pair that [`fusible`] found as one launch, its operands bound in
/// `bindings`.
pub(crate) fn run(
    backend: &CudaBackend,
    graph: &Graph,
    product: &MatMul,
    router: &MoeRouter,
    bindings: &mut Bindings<'_, CudaBuffer>,
) -> Result<()> {
    let dtype = graph.desc(product.w)?.dtype;
    let inputs: Vec<_> = [product.x, product.w]
        .into_iter()
        .chain(product.bias)
        .collect();
    let outputs = [product.out, router.ids, router.weights];
    bindings.with_operands(&inputs, &outputs, |ins, outs| {
        let [logits, ids, weights] = outs else {
            unreachable!("three outputs were asked for")
        };
        router_matvec(
            backend,
            ProductOperands {
                x: ins[0],
                w: ins[1],
                dtype,
                bias: ins.get(2).copied(),
                logits,
                k: product.k,
            },
            ids,
            weights,
            router,
        )
    })?
}
