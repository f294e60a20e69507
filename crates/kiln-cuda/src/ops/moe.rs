//! Dispatch for [`kiln_core::ops::MoeRouter`] and [`kiln_core::ops::MoeCombine`]
//! (kernels/moe.cu). [`kiln_core::ops::MoeMatMul`] has no kernel yet.

use cudarc::driver::LaunchConfig;
use kiln_core::ops::Gating;
use kiln_core::{DType, DeviceBuffer, Error, Result};

use super::common::{config, grid_dim, launch, MAX_GRID_X};
use super::{check_bytes, check_nonzero, count, grid_1d, to_u32};
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::registry::{KernelSource, KernelSpec};
use crate::{CudaBackend, CudaBuffer};

/// [`kiln_core::ops::MoeRouter`] and [`kiln_core::ops::MoeCombine`].
pub const MOE: Family = Family {
    name: "moe",
    source: KernelSource {
        name: "moe.cu",
        text: include_str!("../../kernels/moe.cu"),
    },
};

/// Threads per block of the router (one block per token).
const ROUTER_THREADS: u32 = 256;

/// The most experts a router kernel takes: their probabilities and flags fill at
/// most 40 KiB of shared memory, within the 48 KiB every launch may have.
pub const MAX_EXPERTS: usize = 8192;

fn gating_tag(gating: Gating) -> &'static str {
    match gating {
        Gating::Softmax => "softmax",
        Gating::Sigmoid => "sigmoid",
    }
}

/// The router specialisation for `gating`.
pub fn router_spec(gating: Gating) -> KernelSpec {
    MOE.spec(
        format!("moe_router|gating={}", gating_tag(gating)),
        format!("kiln::moe_router<{}>", gating == Gating::Sigmoid),
    )
}

/// The combine specialisation.
pub fn combine_spec() -> KernelSpec {
    MOE.spec(
        "moe_combine|x=f32".to_string(),
        "kiln::moe_combine".to_string(),
    )
}

/// Every specialisation of the family.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    vec![
        router_spec(Gating::Softmax),
        router_spec(Gating::Sigmoid),
        combine_spec(),
    ]
}

/// Errors unless `k <= n_expert <= MAX_EXPERTS`.
fn check_experts(op: &str, k: usize, n_expert: usize) -> Result<()> {
    if k > n_expert {
        return Err(Error::invalid(
            op,
            format!("k = {k} experts per token exceeds n_expert = {n_expert}"),
        ));
    }
    if n_expert > MAX_EXPERTS {
        return Err(Error::invalid(
            op,
            format!("n_expert = {n_expert} exceeds the kernel's {MAX_EXPERTS}"),
        ));
    }
    Ok(())
}

/// A router's shape, settings and operand sizes in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterArgs {
    pub m: usize,
    pub n_expert: usize,
    pub k: usize,
    pub gating: Gating,
    pub normalize: bool,
    pub logits_bytes: usize,
    pub ids_bytes: usize,
    pub weights_bytes: usize,
}

/// A checked router launch.
#[derive(Clone, Debug)]
pub struct RouterPlan {
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    n_expert: u32,
    k: u32,
    normalize: u32,
}

impl RouterArgs {
    /// Checks non-zero sizes, `k <= n_expert <= MAX_EXPERTS`, `[m, n_expert]` F32
    /// logits and `[m, k]` I32 ids and F32 weights.
    pub fn check(&self) -> Result<RouterPlan> {
        const OP: &str = "moe_router";
        check_nonzero(
            OP,
            &[("m", self.m), ("n_expert", self.n_expert), ("k", self.k)],
        )?;
        check_experts(OP, self.k, self.n_expert)?;
        let logits = count(OP, &[self.m, self.n_expert])?;
        check_bytes(OP, "logits", self.logits_bytes, DType::F32, logits)?;
        let chosen = count(OP, &[self.m, self.k])?;
        check_bytes(OP, "ids", self.ids_bytes, DType::I32, chosen)?;
        check_bytes(OP, "weights", self.weights_bytes, DType::F32, chosen)?;
        let blocks = grid_dim(OP, "m", self.m, MAX_GRID_X)?;
        // At most MAX_EXPERTS * 5 bytes (checked).
        let shared = (self.n_expert * 5) as u32;
        Ok(RouterPlan {
            spec: router_spec(self.gating),
            config: config((blocks, 1, 1), ROUTER_THREADS, shared),
            n_expert: to_u32(OP, "n_expert", self.n_expert)?,
            k: to_u32(OP, "k", self.k)?,
            normalize: u32::from(self.normalize),
        })
    }
}

/// Each token's top-k experts and their weights, as [`kiln_core::ops::MoeRouter`]
/// defines, for the router of `op` (its buffer ids are not read).
pub fn moe_router(
    backend: &CudaBackend,
    logits: &CudaBuffer,
    ids: &mut CudaBuffer,
    weights: &mut CudaBuffer,
    op: &kiln_core::ops::MoeRouter,
) -> Result<()> {
    let plan = RouterArgs {
        m: op.m,
        n_expert: op.n_expert,
        k: op.k,
        gating: op.gating,
        normalize: op.normalize,
        logits_bytes: logits.bytes(),
        ids_bytes: ids.bytes(),
        weights_bytes: weights.bytes(),
    }
    .check()?;
    let kernel = backend.kernel(&plan.spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(logits.slice())
        .arg(ids.slice_mut())
        .arg(weights.slice_mut())
        .arg(&plan.n_expert)
        .arg(&plan.k)
        .arg(&plan.normalize);
    // SAFETY: the arguments match `kiln::moe_router<Sigmoid>(const float* logits,
    // int* ids, float* weights, u32 n_expert, u32 k, u32 normalize)`; logits hold
    // m * n_expert values, ids and weights m * k (checked); one block per token with
    // n_expert * 5 bytes of dynamic shared memory.
    unsafe { launch(&kernel, &mut args, plan.config) }
}

/// A combine's shape and operand sizes in bytes (`None` for an absent operand).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CombineArgs {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub y_bytes: usize,
    pub weights_bytes: usize,
    pub residual_bytes: Option<usize>,
    pub shared_bytes: Option<usize>,
    pub shared_gate_bytes: Option<usize>,
    pub out_bytes: usize,
}

/// A checked combine launch.
#[derive(Clone, Debug)]
pub struct CombinePlan {
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    len: u64,
    k: u32,
    n: u32,
}

impl CombineArgs {
    /// Checks non-zero sizes, a shared gate only with a shared expert, and F32
    /// operands: `y` `[m, k, n]`, `weights` `[m, k]`, `residual`, `shared` and `out`
    /// `[m, n]`, `shared_gate` `[m]`.
    pub fn check(&self) -> Result<CombinePlan> {
        const OP: &str = "moe_combine";
        check_nonzero(OP, &[("m", self.m), ("k", self.k), ("n", self.n)])?;
        if self.shared_gate_bytes.is_some() && self.shared_bytes.is_none() {
            return Err(Error::invalid(
                OP,
                "shared_gate is given without a shared expert output",
            ));
        }
        let len = count(OP, &[self.m, self.n])?;
        let f32s = |role: &str, bytes: usize, elements: usize| {
            check_bytes(OP, role, bytes, DType::F32, elements)
        };
        f32s("y", self.y_bytes, count(OP, &[len, self.k])?)?;
        f32s("weights", self.weights_bytes, count(OP, &[self.m, self.k])?)?;
        for (role, bytes, elements) in [
            ("residual", self.residual_bytes, len),
            ("shared", self.shared_bytes, len),
            ("shared_gate", self.shared_gate_bytes, self.m),
        ] {
            bytes.map_or(Ok(()), |b| f32s(role, b, elements))?;
        }
        f32s("out", self.out_bytes, len)?;
        Ok(CombinePlan {
            spec: combine_spec(),
            config: grid_1d(len),
            len: len as u64,
            k: to_u32(OP, "k", self.k)?,
            n: to_u32(OP, "n", self.n)?,
        })
    }
}

/// A combine's operands: the experts' outputs `y` `[m, k, n]`, their `weights`
/// `[m, k]`, and the optional residual, shared expert output (`[m, n]`) and shared
/// gate logits (`[m]`).
pub struct CombineInputs<'a> {
    pub y: &'a CudaBuffer,
    pub weights: &'a CudaBuffer,
    pub residual: Option<&'a CudaBuffer>,
    pub shared: Option<&'a CudaBuffer>,
    pub shared_gate: Option<&'a CudaBuffer>,
}

/// The weighted sum of [`kiln_core::ops::MoeCombine`] into `out` `[m, n]`.
pub fn moe_combine(
    backend: &CudaBackend,
    ins: CombineInputs<'_>,
    out: &mut CudaBuffer,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    let plan = CombineArgs {
        m,
        k,
        n,
        y_bytes: ins.y.bytes(),
        weights_bytes: ins.weights.bytes(),
        residual_bytes: ins.residual.map(|b| b.bytes()),
        shared_bytes: ins.shared.map(|b| b.bytes()),
        shared_gate_bytes: ins.shared_gate.map(|b| b.bytes()),
        out_bytes: out.bytes(),
    }
    .check()?;
    let kernel = backend.kernel(&plan.spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(ins.y.slice())
        .arg(ins.weights.slice())
        .arg(ins.residual.map(|b| b.slice()))
        .arg(ins.shared.map(|b| b.slice()))
        .arg(ins.shared_gate.map(|b| b.slice()))
        .arg(out.slice_mut())
        .arg(&plan.len)
        .arg(&plan.k)
        .arg(&plan.n);
    // SAFETY: the arguments match `kiln::moe_combine(const float* y, const float*
    // weights, const float* residual, const float* shared, const float* shared_gate,
    // float* out, u64 len, u32 k, u32 n)`; every present buffer holds its elements
    // (checked), absent ones are null, and the grid strides over the m * n outputs.
    unsafe { launch(&kernel, &mut args, plan.config) }
}
