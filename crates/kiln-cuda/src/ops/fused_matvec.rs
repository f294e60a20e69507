//! A one-row [`kiln_core::ops::AddRmsNorm`] fused into the resident mat-vec that reads
//! its Q8_1 copy: kernels/matvec.cu's `matvec_resident_add_norm`, in which every block
//! computes the residual add and the norm itself and rounds the result to Q8_1 in
//! shared memory, so that the norm costs no launch of its own (in a decode step, the
//! norm before the q-k-v and before the gate-up products).
//!
//! Compiling a graph ([`kiln_core::Backend::compile`]) fuses a pair where [`fusible`]
//! finds one. The fused launch writes the norm's `sum` and the product's `out` as the
//! two ops would; it does not write the norm's `out` and `out_q8`, which is why only
//! a pair whose norm outputs nothing else reads (transient buffers read by the product
//! alone) is fused.

use kiln_core::ops::{AddRmsNorm, MatMul};
use kiln_core::{Bindings, BufferKind, DType, DeviceBuffer, Error, Graph, Op, Result};

use super::common::{allow_dynamic_shared, launch, weight_tag};
use super::matmul::{resident_blocks, MatMulArgs, MatMulKernel, MatMulPlan, MATVEC};
use super::{check_bytes, to_u32};
use crate::constants::RESIDENT_NORM_VECTORS;
use crate::launch::KernelArgs;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

const OP: &str = "add_rms_norm+matmul";

/// The ops at `index` and `index + 1` of `graph` when they are a fusible pair: a
/// one-row [`AddRmsNorm`] with a weight and a Q8_1 copy, then a one-row [`MatMul`]
/// whose `x` and `x_q8` are that norm's `out` and `out_q8`, both transient and read by
/// no other op, and whose plan is the resident mat-vec with x small enough for
/// [`RESIDENT_NORM_VECTORS`] float4s per thread.
pub fn fusible(graph: &Graph, index: usize) -> Option<(&AddRmsNorm, &MatMul)> {
    let (Some(Op::AddRmsNorm(norm)), Some(Op::MatMul(mm))) =
        (graph.ops().get(index), graph.ops().get(index + 1))
    else {
        return None;
    };
    let out_q8 = norm.out_q8?;
    norm.weight?;
    let shape_fits = norm.rows == 1 && mm.m == 1 && norm.dim == mm.k && mm.k % 128 == 0;
    if !shape_fits || mm.x != norm.out || mm.x_q8 != Some(out_q8) {
        return None;
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
    if !transient(norm.out) || !transient(out_q8) || read_elsewhere {
        return None;
    }
    // One row is a mat-vec, never a product on cuBLASLt.
    let plan = MatMulArgs::of_op(graph, mm, usize::MAX)
        .ok()?
        .check()
        .ok()?;
    let MatMulKernel::MatVecResident { threads, .. } = plan.kernel else {
        return None;
    };
    (mm.k / 4 <= (RESIDENT_NORM_VECTORS * threads) as usize).then_some((norm, mm))
}

/// Whether the fused launch's outputs (the norm's `sum`, the product's `out`) are in
/// memory of their own, apart from each other and from every input: the planner keeps
/// a pair's operands live through both ops, but bindings made otherwise may not.
pub fn operands_apart<B: kiln_core::DeviceBuffer>(
    norm: &AddRmsNorm,
    product: &MatMul,
    bindings: &Bindings<'_, B>,
) -> bool {
    let inputs = [norm.x, norm.residual, product.w]
        .into_iter()
        .chain(norm.weight)
        .chain(product.bias);
    let outputs = [norm.sum, product.out];
    !bindings.shares_memory(norm.sum, product.out)
        && inputs
            .flat_map(|i| outputs.map(|o| (i, o)))
            .all(|(i, o)| !bindings.shares_memory(i, o))
}

/// The fused kernel of a resident mat-vec plan's shape for weights of `dtype`.
pub fn spec(dtype: DType, kernel: MatMulKernel) -> Result<KernelSpec> {
    let MatMulKernel::MatVecResident {
        threads,
        min_blocks,
        aligned,
    } = kernel
    else {
        return Err(Error::invalid(
            OP,
            format!("the fused norm runs only in the resident mat-vec, not {kernel:?}"),
        ));
    };
    let tag = weight_tag(OP, dtype)?;
    Ok(MATVEC.spec(
        format!(
            "matvec_resident_add_norm|w={dtype}|threads={threads}|min_blocks={min_blocks}|aligned={}",
            u8::from(aligned)
        ),
        format!("kiln::matvec_resident_add_norm<{tag}, {aligned}, {threads}, {min_blocks}>"),
    ))
}

/// The fused kernel for every resident mat-vec specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    super::matmul::resident_kernels()
        .into_iter()
        .filter_map(|(dtype, kernel)| spec(dtype, kernel).ok())
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

/// `sum = x + residual`, then `out = RmsNorm(sum, weight, eps) · wᵀ (+ bias)` with the
/// normalized row rounded to Q8_1 ([`kiln_core::ops::Q8_COPY`]) as the unfused pair
/// computes it. Errors unless the product's plan is the resident mat-vec and the row
/// fits the fused kernel (`k` a multiple of 128, at most 4 ·
/// [`RESIDENT_NORM_VECTORS`] per thread), and on operand sizes as the two ops' checks.
pub fn add_norm_matvec(
    backend: &CudaBackend,
    norm: NormOperands<'_>,
    product: ProductOperands<'_>,
) -> Result<()> {
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
        x_bytes: norm.x.bytes(),
        x_q8_bytes: Some(k / 32 * DType::Q8_1.block_bytes()),
        w_bytes: w.bytes(),
        w_packed: w.packed(),
        bias_bytes: bias.map(|b| b.bytes()),
        out_bytes: out.bytes(),
        gemm_min_rows: usize::MAX,
    }
    .check()?;
    check_norm(&plan, &norm, k)?;
    let kernel = backend.kernel(&spec(dtype, plan.kernel)?)?;
    allow_dynamic_shared(&kernel, &plan.config)?;
    let MatMulKernel::MatVecResident { threads, .. } = plan.kernel else {
        unreachable!("check_norm accepts only the resident plan");
    };
    let warps = backend
        .resident_warps()
        .get(backend, &kernel, &plan.config)?;
    let mut launch_config = plan.config;
    // At most the plan's blocks (one row per warp), which fit the grid.
    launch_config.grid_dim.0 = resident_blocks(n, warps, threads / 32) as u32;
    let (n32, k32) = (to_u32(OP, "n", n)?, to_u32(OP, "k", k)?);
    let row_bytes = dtype.bytes_for(k)? as u64;
    let mut args = KernelArgs::new(backend);
    args.arg(w.slice())
        .arg(norm.x.slice())
        .arg(norm.residual.slice())
        .arg(norm.weight.slice())
        .arg(norm.sum.slice_mut())
        .arg(&norm.eps)
        .arg(bias.map(|b| b.slice()))
        .arg(out.slice_mut())
        .arg(&n32)
        .arg(&k32)
        .arg(&row_bytes);
    // SAFETY: the arguments match `kiln::matvec_resident_add_norm<W, ALIGNED, THREADS,
    // MIN_BLOCKS>`: (const u8* w, const float* x, const float* residual, const float*
    // norm_weight, float* sum, float eps, const float* bias, float* out, u32 n, u32 k,
    // u64 row_bytes). x, residual, norm_weight and sum hold k values, w n rows of
    // row_bytes, bias is null or holds n values, out n (all checked).
    unsafe { launch(&kernel, &mut args, launch_config) }
}

/// Errors unless `plan` is the resident mat-vec, the row fits the fused kernel, and
/// the norm's buffers hold `k` F32 values and a finite `eps >= 0`.
fn check_norm(plan: &MatMulPlan, norm: &NormOperands<'_>, k: usize) -> Result<()> {
    let MatMulKernel::MatVecResident { threads, .. } = plan.kernel else {
        return Err(Error::invalid(
            OP,
            format!(
                "the fused norm runs only in the resident mat-vec; this product's plan is {:?}",
                plan.kernel
            ),
        ));
    };
    if k % 128 != 0 || k / 4 > (RESIDENT_NORM_VECTORS * threads) as usize {
        return Err(Error::invalid(
            OP,
            format!(
                "k {k} must be a multiple of 128 and at most {} for blocks of {threads} threads",
                4 * RESIDENT_NORM_VECTORS * threads
            ),
        ));
    }
    if !(norm.eps.is_finite() && norm.eps >= 0.0) {
        return Err(Error::invalid(
            OP,
            format!("eps must be finite and >= 0, got {}", norm.eps),
        ));
    }
    for (role, bytes) in [
        ("x", norm.x.bytes()),
        ("residual", norm.residual.bytes()),
        ("norm weight", norm.weight.bytes()),
        ("sum", norm.sum.bytes()),
    ] {
        check_bytes(OP, role, bytes, DType::F32, k)?;
    }
    Ok(())
}
