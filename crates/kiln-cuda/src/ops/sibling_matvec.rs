//! Consecutive one-row products of the same activation row, computed side by side in
//! one resident mat-vec launch (kernels/matvec.cu's `matvec_resident_siblings`): the
//! warps walk the rows of all of them as one weight, each row taken from its own
//! product's weight and stored to its own output, so that a hybrid layer's four
//! projections of one normed row (its q-k-v, gate, beta and alpha) cost one launch.
//!
//! Compiling a graph ([`kiln_core::Backend::compile`]) fuses a run where [`fusible`]
//! finds one and [`crate::fusion::Fusion::Siblings`] is on. Each product's outputs
//! are its [`MatMul`]'s values up to the order of the f32 sums: a row's sum is the
//! resident mat-vec's, whichever launch it is in, so a product that runs on the
//! resident kernel alone gives the same bits, and one that runs on another kernel
//! alone (fewer rows) gives the same sums in another order.

use kiln_core::ops::MatMul;
use kiln_core::{Bindings, BufferId, DType, DeviceBuffer, Error, Graph, Op, Result};

use super::common::{allow_dynamic_shared, launch, weight_tag};
use super::matmul::{resident_config, MatMulArgs, MatMulKernel, MATVEC};
use super::{check_bytes, to_u32};
use crate::constants::MAX_SIBLINGS;
use crate::launch::KernelArgs;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

const OP: &str = "matmul siblings";

/// Consecutive products of a graph that one launch computes.
#[derive(Clone, Debug)]
pub struct Siblings<'g> {
    pub products: Vec<&'g MatMul>,
}

impl Siblings<'_> {
    /// The rows of all the products.
    fn rows(&self) -> usize {
        self.products.iter().map(|p| p.n).sum()
    }

    /// The plan of one product of all the rows, which the fused launch runs.
    fn plan(&self, graph: &Graph) -> Result<super::matmul::MatMulPlan> {
        let first = self.products[0];
        let mut args = MatMulArgs::of_op(graph, first, usize::MAX)?;
        args.n = self.rows();
        args.w_bytes = usize::MAX;
        args.bias_bytes = None;
        args.out_bytes = usize::MAX;
        args.check()
    }

    /// The kernel the run's launch runs in `graph`.
    pub fn spec(&self, graph: &Graph) -> Result<KernelSpec> {
        spec(
            graph.desc(self.products[0].w)?.dtype,
            self.plan(graph)?.kernel,
        )
    }
}

/// The run starting at op `index` of `graph`: two to [`MAX_SIBLINGS`] consecutive
/// one-row [`MatMul`]s of the same `x` and Q8_1 copy `x_q8`, weights of one dtype and
/// `k`, none reading another's output, whose rows together the resident mat-vec takes.
/// None when `index` starts no such run.
pub fn fusible(graph: &Graph, index: usize) -> Option<Siblings<'_>> {
    let Some(Op::MatMul(first)) = graph.ops().get(index) else {
        return None;
    };
    first.x_q8?;
    let dtype = graph.desc(first.w).ok()?.dtype;
    let mut products = vec![first];
    for op in &graph.ops()[index + 1..] {
        let Op::MatMul(p) = op else {
            break;
        };
        let same_row = p.m == 1 && p.x == first.x && p.x_q8 == first.x_q8 && p.k == first.k;
        let reads_run = products
            .iter()
            .any(|q| p.x == q.out || p.x_q8 == Some(q.out));
        if products.len() == MAX_SIBLINGS as usize
            || !same_row
            || reads_run
            || graph.desc(p.w).ok()?.dtype != dtype
        {
            break;
        }
        products.push(p);
    }
    if first.m != 1 || products.len() < 2 {
        return None;
    }
    let run = Siblings { products };
    matches!(
        run.plan(graph).ok()?.kernel,
        MatMulKernel::MatVecResident { .. }
    )
    .then_some(run)
}

/// Whether the launch's outputs are in memory of their own, apart from each other and
/// from every input (the copy, the weights, the biases).
pub fn operands_apart<B: DeviceBuffer>(run: &Siblings<'_>, bindings: &Bindings<'_, B>) -> bool {
    let (inputs, outputs) = operands(run);
    outputs.iter().enumerate().all(|(i, &o)| {
        inputs
            .iter()
            .chain(&outputs[..i])
            .all(|&other| !bindings.shares_memory(other, o))
    })
}

/// The launch's inputs (the copy, then each product's weight and bias) and outputs.
fn operands(run: &Siblings<'_>) -> (Vec<BufferId>, Vec<BufferId>) {
    let copy = run.products[0].x_q8;
    let inputs = copy
        .into_iter()
        .chain(
            run.products
                .iter()
                .flat_map(|p| [Some(p.w), p.bias].into_iter().flatten()),
        )
        .collect();
    let outputs = run.products.iter().map(|p| p.out).collect();
    (inputs, outputs)
}

/// The kernel for weights of `dtype` in the resident mat-vec `kernel`'s shape.
pub fn spec(dtype: DType, kernel: MatMulKernel) -> Result<KernelSpec> {
    let MatMulKernel::MatVecResident {
        threads,
        min_blocks,
        aligned,
    } = kernel
    else {
        return Err(Error::invalid(
            OP,
            format!("sibling products run only in the resident mat-vec, not {kernel:?}"),
        ));
    };
    let tag = weight_tag(OP, dtype)?;
    Ok(MATVEC.spec(
        format!(
            "matvec_resident_siblings|w={dtype}|threads={threads}|min_blocks={min_blocks}|aligned={}",
            u8::from(aligned)
        ),
        format!("kiln::matvec_resident_siblings<{tag}, {aligned}, {threads}, {min_blocks}>"),
    ))
}

/// The kernel for every resident mat-vec specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    super::matmul::resident_kernels()
        .into_iter()
        .filter_map(|(dtype, kernel)| spec(dtype, kernel).ok())
        .collect()
}

/// One product's operands: its weight (`n x k`, uploaded with `upload_weight`), bias
/// and output.
pub struct Sibling<'a> {
    pub w: &'a CudaBuffer,
    pub bias: Option<&'a CudaBuffer>,
    pub out: &'a mut CudaBuffer,
    pub n: usize,
}

/// `products[s].out = row · products[s].wᵀ (+ bias)` for the row whose Q8_1 copy is
/// `x_q8` (`k` elements), every weight of `dtype`, in one launch. Errors unless there
/// are 2 to [`MAX_SIBLINGS`] products, the plan of their rows together is the resident
/// mat-vec, and on operand sizes as [`MatMul`]'s checks.
pub fn sibling_matvec(
    backend: &CudaBackend,
    x_q8: &CudaBuffer,
    dtype: DType,
    k: usize,
    products: Vec<Sibling<'_>>,
) -> Result<()> {
    let count = products.len();
    if !(2..=MAX_SIBLINGS as usize).contains(&count) {
        return Err(Error::invalid(
            OP,
            format!("2 to {MAX_SIBLINGS} products run side by side, not {count}"),
        ));
    }
    let n: usize = products.iter().map(|p| p.n).sum();
    let plan = MatMulArgs {
        weight: dtype,
        m: 1,
        n,
        k,
        x_bytes: k.saturating_mul(4),
        x_q8_bytes: Some(x_q8.bytes()),
        // Each product's weight, bias and output are checked below.
        w_bytes: usize::MAX,
        w_packed: Some((dtype, k)),
        bias_bytes: None,
        out_bytes: usize::MAX,
        gemm_min_rows: usize::MAX,
    }
    .check()?;
    let MatMulKernel::MatVecResident { threads, .. } = plan.kernel else {
        return Err(Error::invalid(
            OP,
            format!(
                "sibling products run only in the resident mat-vec; the plan of their {n} rows is {:?}",
                plan.kernel
            ),
        ));
    };
    for p in &products {
        super::check_packed(OP, "w", dtype, k, p.w.packed())?;
        check_bytes(OP, "w", p.w.bytes(), dtype, p.n.saturating_mul(k))?;
        if let Some(bias) = p.bias {
            check_bytes(OP, "bias", bias.bytes(), DType::F32, p.n)?;
        }
        check_bytes(OP, "out", p.out.bytes(), DType::F32, p.n)?;
    }
    let kernel = backend.kernel(&spec(dtype, plan.kernel)?)?;
    allow_dynamic_shared(&kernel, &plan.config)?;
    let launch_config = resident_config(backend, &kernel, plan.config, n, threads)?;
    let n32 = to_u32(OP, "n", n)?;
    let mut ends = [n32; MAX_SIBLINGS as usize];
    let mut end = 0usize;
    for (slot, p) in ends.iter_mut().zip(&products) {
        end += p.n;
        *slot = to_u32(OP, "rows", end)?;
    }
    let k32 = to_u32(OP, "k", k)?;
    let row_bytes = dtype.bytes_for(k)? as u64;
    let mut weights = [None; MAX_SIBLINGS as usize];
    let mut biases = [None; MAX_SIBLINGS as usize];
    let mut outs: Vec<Option<&mut CudaBuffer>> = Vec::with_capacity(MAX_SIBLINGS as usize);
    for (s, p) in products.into_iter().enumerate() {
        weights[s] = Some(p.w);
        biases[s] = p.bias;
        outs.push(Some(p.out));
    }
    outs.resize_with(MAX_SIBLINGS as usize, || None);
    let mut args = KernelArgs::new(backend);
    args.arg(x_q8.slice());
    for w in weights {
        args.arg(w.map(|w| w.slice()));
    }
    for b in biases {
        args.arg(b.map(|b| b.slice()));
    }
    for o in outs {
        args.arg(o.map(|o| o.slice_mut()));
    }
    for e in &ends {
        args.arg(e);
    }
    args.arg(&n32).arg(&k32).arg(&row_bytes);
    // SAFETY: the arguments match `kiln::matvec_resident_siblings<W, ALIGNED, THREADS,
    // MIN_BLOCKS>(const u8* xq8, const u8* w0..w3, const float* b0..b3, float* o0..o3,
    // u32 e0..e3, u32 n, u32 k, u64 row_bytes)`: xq8 holds k / 32 Q8_1 blocks (the
    // plan checked it), product s's weight holds its rows of row_bytes (packed for k),
    // its bias null or its rows' values, its output its rows' values (all checked), its
    // rows ending at e_s of the n; products past the last are null and end at n, so the
    // kernel never picks them.
    unsafe { launch(&kernel, &mut args, launch_config) }
}

/// Runs `run` (found by [`fusible`]) as one launch on the buffers `bindings` holds.
pub(crate) fn run(
    backend: &CudaBackend,
    graph: &Graph,
    run: &Siblings<'_>,
    bindings: &mut Bindings<'_, CudaBuffer>,
) -> Result<()> {
    let first = run.products[0];
    let dtype = graph.desc(first.w)?.dtype;
    let (inputs, outputs) = operands(run);
    bindings.with_operands(&inputs, &outputs, |ins, outs| {
        let missing = || Error::invalid(OP, "an operand was not bound");
        let mut ins = ins.iter().copied();
        let copy = ins.next().ok_or_else(missing)?;
        let mut siblings = Vec::with_capacity(run.products.len());
        for (p, out) in run.products.iter().zip(outs.iter_mut()) {
            let w = ins.next().ok_or_else(missing)?;
            let bias = match p.bias {
                Some(_) => Some(ins.next().ok_or_else(missing)?),
                None => None,
            };
            siblings.push(Sibling {
                w,
                bias,
                out,
                n: p.n,
            });
        }
        sibling_matvec(backend, copy, dtype, first.k, siblings)
    })?
}
