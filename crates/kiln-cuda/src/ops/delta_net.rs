//! Dispatch for [`kiln_core::ops::CausalConv1d`], [`kiln_core::ops::GatedDeltaNet`],
//! [`kiln_core::ops::GatedRmsNorm`] and [`kiln_core::ops::L2Norm`]
//! (kernels/delta_net.cu). The delta rule runs token by token (the recurrent form)
//! for a prompt as for one token.

use kiln_core::ops::{DeltaNetHeads, HeadLayout};
use kiln_core::{DType, Error, Result};

use super::common::{config, grid_dim, launch, MAX_GRID_X, MAX_GRID_YZ};
use super::{check_buffer, check_nonzero, count, to_u32};
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::registry::{KernelSource, KernelSpec};
use crate::{CudaBackend, CudaBuffer};

/// The Gated DeltaNet ops.
pub const DELTA_NET: Family = Family {
    name: "delta_net",
    source: KernelSource {
        name: "delta_net.cu",
        text: include_str!("../../kernels/delta_net.cu"),
    },
};

/// Threads per block of every kernel of the family (whole warps).
const THREADS: u32 = 128;

/// Largest key head the delta rule's shared memory (two heads of f32) takes.
const MAX_D_K: usize = 4096;

/// The causal conv1d specialisation.
pub fn conv_spec() -> KernelSpec {
    DELTA_NET.spec(
        "causal_conv1d|x=f32".to_string(),
        "kiln::causal_conv1d".to_string(),
    )
}

/// The gated delta rule specialisation.
pub fn delta_spec() -> KernelSpec {
    DELTA_NET.spec(
        "gated_delta_net|form=recurrent".to_string(),
        "kiln::gated_delta_net".to_string(),
    )
}

/// The gated RMSNorm (`gated`) or L2 norm specialisation.
pub fn norm_spec(gated: bool) -> KernelSpec {
    let key = if gated { "gated_rms_norm" } else { "l2_norm" };
    DELTA_NET.spec(
        format!("{key}|x=f32"),
        format!("kiln::delta_net_norm<{gated}>"),
    )
}

/// Every specialisation of the family.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    vec![conv_spec(), delta_spec(), norm_spec(true), norm_spec(false)]
}

fn check_eps(op: &str, eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("eps must be finite and >= 0, got {eps}"),
        ))
    }
}

/// The causal conv1d with SiLU of `n_tokens` rows of `channels` in `x`, continuing
/// from and updating `state`, as [`kiln_core::ops::CausalConv1d`] defines.
#[allow(clippy::too_many_arguments)] // the op's operands and shape, each named
pub fn causal_conv1d(
    backend: &CudaBackend,
    x: &CudaBuffer,
    weight: &CudaBuffer,
    state: &mut CudaBuffer,
    out: &mut CudaBuffer,
    n_tokens: usize,
    channels: usize,
    kernel: usize,
) -> Result<()> {
    const OP: &str = "causal_conv1d";
    check_nonzero(OP, &[("n_tokens", n_tokens), ("channels", channels)])?;
    if kernel < 2 {
        return Err(Error::invalid(
            OP,
            format!("kernel must be >= 2, got {kernel}"),
        ));
    }
    let n = count(OP, &[n_tokens, channels])?;
    check_buffer(OP, "x", x, DType::F32, n)?;
    check_buffer(OP, "out", out, DType::F32, n)?;
    check_buffer(
        OP,
        "weight",
        weight,
        DType::F32,
        count(OP, &[channels, kernel])?,
    )?;
    check_buffer(
        OP,
        "state",
        state,
        DType::F32,
        count(OP, &[channels, kernel - 1])?,
    )?;
    to_u32(OP, "n_tokens * channels", n)?;
    let blocks = grid_dim(
        OP,
        "channels",
        channels.div_ceil(THREADS as usize),
        MAX_GRID_X,
    )?;
    let (n_tokens, channels, kernel) = (
        to_u32(OP, "n_tokens", n_tokens)?,
        to_u32(OP, "channels", channels)?,
        to_u32(OP, "kernel", kernel)?,
    );
    let spec = conv_spec();
    let k = backend.kernel(&spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(x.slice())
        .arg(weight.slice())
        .arg(state.slice_mut())
        .arg(out.slice_mut())
        .arg(&n_tokens)
        .arg(&channels)
        .arg(&kernel);
    // SAFETY: the arguments match `kiln::causal_conv1d(const float* x, const float*
    // weight, float* state, float* out, u32 n_tokens, u32 channels, u32 kernel)`; the
    // buffers hold their elements (checked).
    unsafe { launch(&k, &mut args, config((blocks, 1, 1), THREADS, 0)) }
}

/// The operands of a gated delta rule ([`kiln_core::ops::GatedDeltaNet`]).
pub struct DeltaNetOperands<'a> {
    pub qkv: &'a CudaBuffer,
    pub a: &'a CudaBuffer,
    pub b: &'a CudaBuffer,
    pub ssm_a: &'a CudaBuffer,
    pub dt_bias: &'a CudaBuffer,
}

/// The gated delta rule over `n_tokens` tokens, token by token, continuing from and
/// updating `state`, as [`kiln_core::ops::GatedDeltaNet`] defines.
pub fn gated_delta_net(
    backend: &CudaBackend,
    ins: DeltaNetOperands<'_>,
    state: &mut CudaBuffer,
    out: &mut CudaBuffer,
    n_tokens: usize,
    heads: DeltaNetHeads,
    eps: f32,
) -> Result<()> {
    const OP: &str = "gated_delta_net";
    let DeltaNetHeads {
        n_k_heads,
        n_v_heads,
        d_k,
        d_v,
        layout,
    } = heads;
    check_nonzero(
        OP,
        &[
            ("n_tokens", n_tokens),
            ("n_k_heads", n_k_heads),
            ("n_v_heads", n_v_heads),
            ("d_k", d_k),
            ("d_v", d_v),
        ],
    )?;
    if n_v_heads % n_k_heads != 0 {
        return Err(Error::invalid(
            OP,
            format!("n_v_heads {n_v_heads} is not a multiple of n_k_heads {n_k_heads}"),
        ));
    }
    if d_k > MAX_D_K {
        return Err(Error::invalid(
            OP,
            format!("d_k = {d_k} exceeds the kernel's {MAX_D_K}"),
        ));
    }
    check_eps(OP, eps)?;
    let width = count(OP, &[2, n_k_heads, d_k])?
        .checked_add(count(OP, &[n_v_heads, d_v])?)
        .ok_or_else(|| Error::invalid(OP, "the q/k/v row length overflows"))?;
    let gates = count(OP, &[n_tokens, n_v_heads])?;
    check_buffer(
        OP,
        "qkv",
        ins.qkv,
        DType::F32,
        count(OP, &[n_tokens, width])?,
    )?;
    check_buffer(OP, "a", ins.a, DType::F32, gates)?;
    check_buffer(OP, "b", ins.b, DType::F32, gates)?;
    check_buffer(OP, "ssm_a", ins.ssm_a, DType::F32, n_v_heads)?;
    check_buffer(OP, "dt_bias", ins.dt_bias, DType::F32, n_v_heads)?;
    check_buffer(
        OP,
        "state",
        state,
        DType::F32,
        count(OP, &[n_v_heads, d_k, d_v])?,
    )?;
    check_buffer(OP, "out", out, DType::F32, count(OP, &[gates, d_v])?)?;
    let heads_grid = grid_dim(OP, "n_v_heads", n_v_heads, MAX_GRID_X)?;
    let tiles = grid_dim(OP, "d_v", d_v.div_ceil(THREADS as usize), MAX_GRID_YZ)?;
    let dims = [
        to_u32(OP, "n_tokens", n_tokens)?,
        to_u32(OP, "n_k_heads", n_k_heads)?,
        to_u32(OP, "n_v_heads", n_v_heads)?,
        to_u32(OP, "d_k", d_k)?,
        to_u32(OP, "d_v", d_v)?,
        u32::from(layout == HeadLayout::Tiled),
    ];
    let spec = delta_spec();
    let k = backend.kernel(&spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(ins.qkv.slice())
        .arg(ins.a.slice())
        .arg(ins.b.slice())
        .arg(ins.ssm_a.slice())
        .arg(ins.dt_bias.slice())
        .arg(state.slice_mut())
        .arg(out.slice_mut());
    for d in &dims {
        args.arg(d);
    }
    args.arg(&eps);
    // At most 2 * MAX_D_K floats (32 KiB), within the default dynamic shared memory.
    let shared = (2 * d_k * std::mem::size_of::<f32>()) as u32;
    // SAFETY: the arguments match `kiln::gated_delta_net(const float* qkv, const float*
    // a, const float* b, const float* ssm_a, const float* dt_bias, float* state, float*
    // out, u32 n_tokens, u32 n_k_heads, u32 n_v_heads, u32 d_k, u32 d_v, u32 tiled, float
    // eps)`;
    // the buffers hold their elements (checked) and the launch gives the kernel its
    // 2 * d_k floats of shared memory.
    unsafe {
        launch(
            &k,
            &mut args,
            config((heads_grid, tiles, 1), THREADS, shared),
        )
    }
}

/// One block per row of `dim`: the gated RMSNorm with `z` and `weight`, or the L2
/// norm without them.
#[allow(clippy::too_many_arguments)] // both ops' operands and shape, each named
fn norm(
    op: &str,
    backend: &CudaBackend,
    x: &CudaBuffer,
    gate: Option<(&CudaBuffer, &CudaBuffer)>,
    out: &mut CudaBuffer,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    check_nonzero(op, &[("rows", rows), ("dim", dim)])?;
    check_eps(op, eps)?;
    let n = count(op, &[rows, dim])?;
    check_buffer(op, "x", x, DType::F32, n)?;
    check_buffer(op, "out", out, DType::F32, n)?;
    if let Some((z, weight)) = gate {
        check_buffer(op, "z", z, DType::F32, n)?;
        check_buffer(op, "weight", weight, DType::F32, dim)?;
    }
    let blocks = grid_dim(op, "rows", rows, MAX_GRID_X)?;
    let dim32 = to_u32(op, "dim", dim)?;
    let spec = norm_spec(gate.is_some());
    let k = backend.kernel(&spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(x.slice())
        .arg(gate.map(|g| g.0.slice()))
        .arg(gate.map(|g| g.1.slice()))
        .arg(out.slice_mut())
        .arg(&dim32)
        .arg(&eps);
    // SAFETY: the arguments match `kiln::delta_net_norm<Gated>(const float* x, const
    // float* z, const float* weight, float* out, u32 dim, float eps)`; x and out hold
    // rows * dim values, z and weight (read only when Gated, then non-null) rows * dim
    // and dim (checked).
    unsafe { launch(&k, &mut args, config((blocks, 1, 1), THREADS, 0)) }
}

/// `out = rms_norm(x) * weight * silu(z)` over `rows` rows of `dim`, as
/// [`kiln_core::ops::GatedRmsNorm`] defines.
#[allow(clippy::too_many_arguments)] // the op's operands and shape, each named
pub fn gated_rms_norm(
    backend: &CudaBackend,
    x: &CudaBuffer,
    z: &CudaBuffer,
    weight: &CudaBuffer,
    out: &mut CudaBuffer,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    norm(
        "gated_rms_norm",
        backend,
        x,
        Some((z, weight)),
        out,
        rows,
        dim,
        eps,
    )
}

/// `out = x / sqrt(sum(x^2) + eps)` over `rows` rows of `dim`, as
/// [`kiln_core::ops::L2Norm`] defines.
pub fn l2_norm(
    backend: &CudaBackend,
    x: &CudaBuffer,
    out: &mut CudaBuffer,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    norm("l2_norm", backend, x, None, out, rows, dim, eps)
}
