//! One-row ops fused into the resident mat-vec that reads their Q8_1 copy: every block
//! of kernels/matvec.cu's `resident_matvec` computes the op's row itself and rounds it
//! to Q8_1 in shared memory, so that the op costs no launch of its own. Two ops fuse
//! so ([`Prologue`]):
//! - a one-row [`AddRmsNorm`] with a weight (`matvec_resident_add_norm`): in a decode
//!   step, the norms before the q-k-v and the gate-up products;
//! - a one-row [`Glu`] of the kinds in [`GLU_KINDS`] (`matvec_resident_glu`): the
//!   gated unit before the down product.
//!
//! Compiling a graph ([`kiln_core::Backend::compile`]) fuses a pair where [`fusible`]
//! finds one and the backend's switch for its kind is on. The fused launch writes what
//! the two ops write except the first op's `out` and `out_q8` (so the norm's `sum` and
//! the product's `out`), which is why only a pair whose first op's outputs nothing
//! else reads (transient buffers read by the product alone) is fused.

use kiln_core::ops::{AddRmsNorm, ElementwiseKind, Glu, MatMul, OpSpec};
use kiln_core::{Bindings, BufferId, BufferKind, DType, DeviceBuffer, Error, Graph, Op, Result};

use super::common::{allow_dynamic_shared, launch, weight_tag};
use super::elementwise::functor;
use super::matmul::{resident_blocks, MatMulArgs, MatMulKernel, MatMulPlan, MATVEC};
use super::{check_bytes, to_u32};
use crate::constants::RESIDENT_NORM_VECTORS;
use crate::launch::KernelArgs;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

/// The kinds of [`Glu`] with a fused kernel: the gated units of the supported
/// architectures' feed-forward layers (SwiGLU, GeGLU).
pub const GLU_KINDS: [ElementwiseKind; 2] = [ElementwiseKind::SiluMul, ElementwiseKind::GeluMul];

/// The op before a product that a fused launch computes.
#[derive(Clone, Copy, Debug)]
pub enum Prologue<'g> {
    AddNorm(&'g AddRmsNorm),
    Glu(&'g Glu),
}

/// What a fused kernel computes before the product, without its operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrologueKind {
    AddNorm,
    Glu(ElementwiseKind),
}

impl Prologue<'_> {
    /// Its kind.
    pub fn kind(&self) -> PrologueKind {
        match self {
            Prologue::AddNorm(_) => PrologueKind::AddNorm,
            Prologue::Glu(g) => PrologueKind::Glu(g.kind),
        }
    }

    /// The buffers it reads.
    pub fn inputs(&self) -> Vec<BufferId> {
        match self {
            Prologue::AddNorm(n) => n.inputs(),
            Prologue::Glu(g) => g.inputs(),
        }
    }

    /// The buffers the fused launch writes for it (its outputs but `out` and
    /// `out_q8`).
    pub fn writes(&self) -> Vec<BufferId> {
        match self {
            Prologue::AddNorm(n) => vec![n.sum],
            Prologue::Glu(_) => Vec::new(),
        }
    }

    /// Its rows, the length of each, its `out` and its `out_q8`.
    fn output(&self) -> (usize, usize, BufferId, Option<BufferId>) {
        match self {
            Prologue::AddNorm(n) => (n.rows, n.dim, n.out, n.out_q8),
            Prologue::Glu(g) => (g.rows, g.n, g.out, g.out_q8),
        }
    }

    /// Whether a fused kernel computes it.
    fn has_kernel(&self) -> bool {
        match self {
            Prologue::AddNorm(n) => n.weight.is_some(),
            Prologue::Glu(g) => GLU_KINDS.contains(&g.kind),
        }
    }
}

impl PrologueKind {
    /// The fused pair's name in errors.
    fn op(self) -> &'static str {
        match self {
            PrologueKind::AddNorm => "add_rms_norm+matmul",
            PrologueKind::Glu(_) => "glu+matmul",
        }
    }

    /// Whether its staging holds a block's share of the row in registers, which
    /// bounds the row's length (StageAddNorm).
    fn row_in_registers(self) -> bool {
        self == PrologueKind::AddNorm
    }
}

/// The ops at `index` and `index + 1` of `graph` when they are a fusible pair: a
/// one-row [`Prologue`] with a fused kernel and a Q8_1 copy, then a one-row [`MatMul`]
/// whose `x` and `x_q8` are the prologue's `out` and `out_q8`, both transient and read
/// by no other op, and whose plan is the resident mat-vec (for a norm, with x small
/// enough for [`RESIDENT_NORM_VECTORS`] float4s per thread).
pub fn fusible(graph: &Graph, index: usize) -> Option<(Prologue<'_>, &MatMul)> {
    let prologue = match graph.ops().get(index)? {
        Op::AddRmsNorm(norm) => Prologue::AddNorm(norm),
        Op::Glu(glu) => Prologue::Glu(glu),
        _ => return None,
    };
    let Some(Op::MatMul(mm)) = graph.ops().get(index + 1) else {
        return None;
    };
    let (rows, dim, out, out_q8) = prologue.output();
    let out_q8 = out_q8?;
    let shape_fits = rows == 1 && mm.m == 1 && dim == mm.k && mm.k % 128 == 0;
    if !prologue.has_kernel() || !shape_fits || mm.x != out || mm.x_q8 != Some(out_q8) {
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
        .any(|(_, op)| op.inputs().iter().any(|&id| id == out || id == out_q8));
    if !transient(out) || !transient(out_q8) || read_elsewhere {
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
    let row_fits = !prologue.kind().row_in_registers()
        || mm.k / 4 <= (RESIDENT_NORM_VECTORS * threads) as usize;
    row_fits.then_some((prologue, mm))
}

/// Whether the fused launch's outputs (the prologue's [`Prologue::writes`], the
/// product's `out`) are in memory of their own, apart from each other and from every
/// input: the planner keeps a pair's operands live through both ops, but bindings
/// made otherwise may not.
pub fn operands_apart<B: DeviceBuffer>(
    prologue: Prologue<'_>,
    product: &MatMul,
    bindings: &Bindings<'_, B>,
) -> bool {
    let inputs: Vec<BufferId> = prologue
        .inputs()
        .into_iter()
        .chain([product.w])
        .chain(product.bias)
        .collect();
    let outputs: Vec<BufferId> = prologue.writes().into_iter().chain([product.out]).collect();
    let outputs_apart = outputs.iter().enumerate().all(|(i, &a)| {
        outputs[i + 1..]
            .iter()
            .all(|&b| !bindings.shares_memory(a, b))
    });
    outputs_apart
        && inputs
            .iter()
            .all(|&i| outputs.iter().all(|&o| !bindings.shares_memory(i, o)))
}

/// The fused kernel computing `prologue` for a resident mat-vec plan's shape for
/// weights of `dtype`.
pub fn spec(prologue: PrologueKind, dtype: DType, kernel: MatMulKernel) -> Result<KernelSpec> {
    let op = prologue.op();
    let MatMulKernel::MatVecResident {
        threads,
        min_blocks,
        aligned,
    } = kernel
    else {
        return Err(Error::invalid(
            op,
            format!("the fused op runs only in the resident mat-vec, not {kernel:?}"),
        ));
    };
    let tag = weight_tag(op, dtype)?;
    let shape = format!(
        "w={dtype}|threads={threads}|min_blocks={min_blocks}|aligned={}",
        u8::from(aligned)
    );
    Ok(match prologue {
        PrologueKind::AddNorm => MATVEC.spec(
            format!("matvec_resident_add_norm|{shape}"),
            format!("kiln::matvec_resident_add_norm<{tag}, {aligned}, {threads}, {min_blocks}>"),
        ),
        PrologueKind::Glu(kind) => {
            if !GLU_KINDS.contains(&kind) {
                return Err(Error::Unsupported(format!(
                    "a fused {} gated unit (fused kinds: silu_mul, gelu_mul)",
                    kind.name()
                )));
            }
            MATVEC.spec(
                format!("matvec_resident_glu|kind={}|{shape}", kind.name()),
                format!(
                    "kiln::matvec_resident_glu<{tag}, {}, {aligned}, {threads}, {min_blocks}>",
                    functor(kind)
                ),
            )
        }
    })
}

/// The fused kernels for every resident mat-vec specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    let prologues = [PrologueKind::AddNorm]
        .into_iter()
        .chain(GLU_KINDS.map(PrologueKind::Glu));
    let kernels = super::matmul::resident_kernels();
    prologues
        .flat_map(|p| {
            kernels
                .iter()
                .filter_map(move |&(dtype, kernel)| spec(p, dtype, kernel).ok())
        })
        .collect()
}

/// The prologue's operands: for the norm, F32 `x` and `residual` of one row of `k`
/// elements, the norm weight, the `sum` it writes, and `eps`; for the gated unit, its
/// kind and F32 `x` of one row of `2 k` elements (the gate's `k`, then the partner's).
pub enum PrologueOperands<'a> {
    AddNorm {
        x: &'a CudaBuffer,
        residual: &'a CudaBuffer,
        weight: &'a CudaBuffer,
        sum: &'a mut CudaBuffer,
        eps: f32,
    },
    Glu {
        kind: ElementwiseKind,
        x: &'a CudaBuffer,
    },
}

impl PrologueOperands<'_> {
    fn kind(&self) -> PrologueKind {
        match self {
            PrologueOperands::AddNorm { .. } => PrologueKind::AddNorm,
            PrologueOperands::Glu { kind, .. } => PrologueKind::Glu(*kind),
        }
    }
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

/// The prologue's row, then `out = row · wᵀ (+ bias)` with the row rounded to Q8_1
/// ([`kiln_core::ops::Q8_COPY`]) as the unfused pair computes it: for the norm,
/// `sum = x + residual` and row = `RmsNorm(sum, weight, eps)`; for the gated unit,
/// row = `f(gate, partner)` ([`Glu`]). Errors unless the product's plan is the
/// resident mat-vec and the row fits the fused kernel (`k` a multiple of 128; for the
/// norm at most 4 · [`RESIDENT_NORM_VECTORS`] per thread), on a gated unit's kind
/// outside [`GLU_KINDS`], and on operand sizes as the two ops' checks.
pub fn fused_matvec(
    backend: &CudaBackend,
    prologue: PrologueOperands<'_>,
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
    let kind = prologue.kind();
    let op = kind.op();
    let plan = MatMulArgs {
        weight: dtype,
        m: 1,
        n,
        k,
        // The plan reads x only through its copy; the row's own length is checked below.
        x_bytes: k * 4,
        x_q8_bytes: Some(k / 32 * DType::Q8_1.block_bytes()),
        w_bytes: w.bytes(),
        w_packed: w.packed(),
        bias_bytes: bias.map(|b| b.bytes()),
        out_bytes: out.bytes(),
        gemm_min_rows: usize::MAX,
    }
    .check()?;
    let threads = check_row(kind, &plan, k)?;
    let kernel = backend.kernel(&spec(kind, dtype, plan.kernel)?)?;
    allow_dynamic_shared(&kernel, &plan.config)?;
    let warps = backend
        .resident_warps()
        .get(backend, &kernel, &plan.config)?;
    let mut launch_config = plan.config;
    // At most the plan's blocks (one row per warp), which fit the grid.
    launch_config.grid_dim.0 = resident_blocks(n, warps, threads / 32) as u32;
    let (n32, k32) = (to_u32(op, "n", n)?, to_u32(op, "k", k)?);
    let row_bytes = dtype.bytes_for(k)? as u64;
    let mut args = KernelArgs::new(backend);
    args.arg(w.slice());
    match prologue {
        PrologueOperands::AddNorm {
            x,
            residual,
            weight,
            sum,
            eps,
        } => {
            check_norm(x, residual, weight, sum, eps, k)?;
            args.arg(x.slice())
                .arg(residual.slice())
                .arg(weight.slice())
                .arg(sum.slice_mut())
                .arg(&eps);
        }
        PrologueOperands::Glu { x, .. } => {
            check_bytes(op, "x", x.bytes(), DType::F32, 2 * k)?;
            args.arg(x.slice());
        }
    }
    args.arg(bias.map(|b| b.slice()))
        .arg(out.slice_mut())
        .arg(&n32)
        .arg(&k32)
        .arg(&row_bytes);
    // SAFETY: the arguments match `kiln::matvec_resident_add_norm<W, ALIGNED, THREADS,
    // MIN_BLOCKS>`: (const u8* w, const float* x, const float* residual, const float*
    // norm_weight, float* sum, float eps, const float* bias, float* out, u32 n, u32 k,
    // u64 row_bytes), x, residual, norm_weight and sum holding k values; or
    // `kiln::matvec_resident_glu<W, F, ALIGNED, THREADS, MIN_BLOCKS>`: (const u8* w,
    // const float* x, const float* bias, float* out, u32 n, u32 k, u64 row_bytes), x
    // holding 2 k values. w holds n rows of row_bytes, bias is null or holds n values,
    // out n (all checked).
    unsafe { launch(&kernel, &mut args, launch_config) }
}

/// The threads of `plan`'s blocks; errors unless `plan` is the resident mat-vec and a
/// row of `k` fits the fused kernel of `kind`.
fn check_row(kind: PrologueKind, plan: &MatMulPlan, k: usize) -> Result<u32> {
    let op = kind.op();
    let MatMulKernel::MatVecResident { threads, .. } = plan.kernel else {
        return Err(Error::invalid(
            op,
            format!(
                "the fused op runs only in the resident mat-vec; this product's plan is {:?}",
                plan.kernel
            ),
        ));
    };
    if k % 128 != 0 {
        return Err(Error::invalid(
            op,
            format!("k {k} must be a multiple of 128"),
        ));
    }
    let most = 4 * RESIDENT_NORM_VECTORS * threads;
    if kind.row_in_registers() && k > most as usize {
        return Err(Error::invalid(
            op,
            format!("k {k} must be at most {most} for blocks of {threads} threads"),
        ));
    }
    Ok(threads)
}

/// Errors unless the norm's buffers hold `k` F32 values and `eps` is finite and >= 0.
fn check_norm(
    x: &CudaBuffer,
    residual: &CudaBuffer,
    weight: &CudaBuffer,
    sum: &CudaBuffer,
    eps: f32,
    k: usize,
) -> Result<()> {
    let op = PrologueKind::AddNorm.op();
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(
            op,
            format!("eps must be finite and >= 0, got {eps}"),
        ));
    }
    for (role, bytes) in [
        ("x", x.bytes()),
        ("residual", residual.bytes()),
        ("norm weight", weight.bytes()),
        ("sum", sum.bytes()),
    ] {
        check_bytes(op, role, bytes, DType::F32, k)?;
    }
    Ok(())
}
