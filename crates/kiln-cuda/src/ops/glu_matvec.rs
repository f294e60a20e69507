//! A one-row [`kiln_core::ops::Glu`] fused into the resident mat-vec that reads its
//! Q8_1 copy: kernels/matvec.cu's `matvec_resident_glu`, in which every block computes
//! the GLU of the row itself and rounds it to Q8_1 in shared memory, so that the GLU
//! costs no launch of its own (in a decode step, the SwiGLU before the down product).
//!
//! Compiling a graph ([`kiln_core::Backend::compile`]) fuses a pair where [`fusible`]
//! finds one. The fused launch writes the product's `out` as the two ops would; it does
//! not write the GLU's `out` and `out_q8`, which is why only a pair whose GLU outputs
//! nothing else reads (transient buffers read by the product alone) is fused.

use kiln_core::ops::{ElementwiseKind, Glu, MatMul};
use kiln_core::{Bindings, DType, DeviceBuffer, Error, Graph, Op, Result};

use super::common::{allow_dynamic_shared, launch, weight_tag};
use super::elementwise::functor;
use super::matmul::{
    resident_config, resident_kernels, MatMulArgs, MatMulKernel, ResidentProduct, MATVEC,
};
use super::{check_bytes, read_only_by, resident_threads, to_u32};
use crate::launch::KernelArgs;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

const OP: &str = "glu+matmul";

/// The GLU kinds the fused kernel is compiled for: the gates of SwiGLU and GeGLU.
const KINDS: [ElementwiseKind; 2] = [ElementwiseKind::SiluMul, ElementwiseKind::GeluMul];

/// The ops at `index` and `index + 1` of `graph` when they are a fusible pair: a
/// one-row [`Glu`] of a kind of [`KINDS`] with a Q8_1 copy, then a one-row [`MatMul`]
/// whose `x` and `x_q8` are that GLU's `out` and `out_q8`, both transient and read by
/// no other op, whose plan is the resident mat-vec, and whose `k` is a multiple of 128.
pub fn fusible(graph: &Graph, index: usize) -> Option<(&Glu, &MatMul)> {
    let (Some(Op::Glu(glu)), Some(Op::MatMul(mm))) =
        (graph.ops().get(index), graph.ops().get(index + 1))
    else {
        return None;
    };
    let out_q8 = glu.out_q8?;
    let shape_fits = glu.rows == 1 && mm.m == 1 && glu.n == mm.k && mm.k % 128 == 0;
    let reads_it = mm.x == glu.out && mm.x_q8 == Some(out_q8);
    if !KINDS.contains(&glu.kind) || !shape_fits || !reads_it {
        return None;
    }
    if !read_only_by(graph, &[glu.out, out_q8], index + 1) {
        return None;
    }
    resident_threads(graph, mm).map(|_| (glu, mm))
}

/// Whether the fused launch's output (the product's `out`) is in memory of its own,
/// apart from every input: the planner keeps a pair's operands live through both ops,
/// but bindings made otherwise may not.
pub fn operands_apart<B: DeviceBuffer>(
    glu: &Glu,
    product: &MatMul,
    bindings: &Bindings<'_, B>,
) -> bool {
    [glu.x, product.w]
        .into_iter()
        .chain(product.bias)
        .all(|input| !bindings.shares_memory(input, product.out))
}

/// The fused kernel of `kind` for a resident mat-vec plan's shape for weights of
/// `dtype`.
pub fn spec(kind: ElementwiseKind, dtype: DType, kernel: MatMulKernel) -> Result<KernelSpec> {
    let MatMulKernel::MatVecResident {
        threads,
        min_blocks,
        aligned,
    } = kernel
    else {
        return Err(Error::invalid(
            OP,
            format!("the fused GLU runs only in the resident mat-vec, not {kernel:?}"),
        ));
    };
    if !KINDS.contains(&kind) {
        return Err(Error::invalid(
            OP,
            format!("no fused kernel for a {} GLU", kind.name()),
        ));
    }
    let tag = weight_tag(OP, dtype)?;
    Ok(MATVEC.spec(
        format!(
            "matvec_resident_glu|kind={}|w={dtype}|threads={threads}|min_blocks={min_blocks}|aligned={}",
            kind.name(),
            u8::from(aligned)
        ),
        format!(
            "kiln::matvec_resident_glu<{tag}, {}, {aligned}, {threads}, {min_blocks}>",
            functor(kind)
        ),
    ))
}

/// The fused kernel of every kind for every resident mat-vec specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    resident_kernels()
        .into_iter()
        .flat_map(|(dtype, kernel)| KINDS.map(|kind| spec(kind, dtype, kernel)))
        .filter_map(Result::ok)
        .collect()
}

/// `out = Glu(x) · wᵀ (+ bias)` for one row `x` of `2k` F32 values (the gates, then
/// their partners), with the GLU's output rounded to Q8_1 ([`kiln_core::ops::Q8_COPY`])
/// as the unfused pair computes it. Errors unless `kind` has a fused kernel, the
/// product's plan is the resident mat-vec and `k` is a multiple of 128, and on operand
/// sizes as the two ops' checks.
pub fn glu_matvec(
    backend: &CudaBackend,
    kind: ElementwiseKind,
    x: &CudaBuffer,
    product: ResidentProduct<'_>,
) -> Result<()> {
    let ResidentProduct {
        w,
        dtype,
        bias,
        out,
        n,
        k,
    } = product;
    if k % 128 != 0 {
        return Err(Error::invalid(
            OP,
            format!("k {k} must be a multiple of 128"),
        ));
    }
    check_bytes(OP, "x", x.bytes(), DType::F32, 2 * k)?;
    let plan = MatMulArgs {
        weight: dtype,
        m: 1,
        n,
        k,
        x_bytes: x.bytes() / 2,
        x_q8_bytes: Some(k / 32 * DType::Q8_1.block_bytes()),
        w_bytes: w.bytes(),
        w_packed: w.packed(),
        bias_bytes: bias.map(|b| b.bytes()),
        out_bytes: out.bytes(),
        gemm_min_rows: usize::MAX,
    }
    .check()?;
    let kernel = backend.kernel(&spec(kind, dtype, plan.kernel)?)?;
    allow_dynamic_shared(&kernel, &plan.config)?;
    let launch_config = resident_config(backend, &kernel, &plan, n)?;
    let (n32, k32) = (to_u32(OP, "n", n)?, to_u32(OP, "k", k)?);
    let row_bytes = dtype.bytes_for(k)? as u64;
    let mut args = KernelArgs::new(backend);
    args.arg(w.slice())
        .arg(x.slice())
        .arg(bias.map(|b| b.slice()))
        .arg(out.slice_mut())
        .arg(&n32)
        .arg(&k32)
        .arg(&row_bytes);
    // SAFETY: the arguments match `kiln::matvec_resident_glu<W, F, ALIGNED, THREADS,
    // MIN_BLOCKS>`: (const u8* w, const float* x, const float* bias, float* out, u32 n,
    // u32 k, u64 row_bytes). x holds 2k values, w n rows of row_bytes, bias is null or
    // holds n values, out n (all checked).
    unsafe { launch(&kernel, &mut args, launch_config) }
}
