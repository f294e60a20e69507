//! Dispatch for [`kiln_core::ops::CausalConv1d`], [`kiln_core::ops::GatedDeltaNet`],
//! [`kiln_core::ops::GatedRmsNorm`] and [`kiln_core::ops::L2Norm`]
//! (kernels/delta_net.cu). The delta rule runs token by token (the recurrent form)
//! for decode and short prompts, chunkwise on tensor cores from [`CHUNK_MIN_TOKENS`]
//! tokens ([`DeltaNetArgs::check`] picks).

use cudarc::driver::LaunchConfig;
use kiln_core::ops::{DeltaNetHeads, GatedDeltaNet, HeadLayout};
use kiln_core::{DType, DeviceBuffer, Error, Graph, Result};

use super::common::{allow_dynamic_shared, config, grid_dim, launch, MAX_GRID_X, MAX_GRID_YZ};
use super::{check_buffer, check_bytes, check_nonzero, count, to_u32};
use crate::constants::{DN_CHUNK, DN_COLS, DN_COL_PAD, DN_PAD, DN_REC_WARPS, DN_WARPS};
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

/// Threads per block of every kernel of the family but the chunkwise delta rule
/// (whole warps).
const THREADS: u32 = 128;

/// Largest key head the recurrent delta rule's shared memory (two heads of f32) takes.
pub const MAX_D_K: usize = 4096;

/// The causal conv1d specialisation.
pub fn conv_spec() -> KernelSpec {
    DELTA_NET.spec(
        "causal_conv1d|x=f32".to_string(),
        "kiln::causal_conv1d".to_string(),
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
    let mut specs = vec![conv_spec(), delta_spec(DeltaNetKernel::Recurrent)];
    specs.extend(CHUNK_KEY_DIMS.map(|d_k| delta_spec(DeltaNetKernel::Chunkwise { d_k })));
    specs.extend([norm_spec(true), norm_spec(false)]);
    specs
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

/// Which form of the delta rule runs a [`kiln_core::ops::GatedDeltaNet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaNetForm {
    /// The backend's choice: chunkwise from [`CHUNK_MIN_TOKENS`] tokens when the key
    /// head has at most [`CHUNK_MAX_D_K`] elements, recurrent otherwise.
    Auto,
    /// `gated_delta_net`, token by token (benchmarks and tests force it).
    Recurrent,
    /// `gated_delta_net_chunk` (benchmarks and tests force it).
    Chunkwise,
}

/// The kernel that runs a gated delta rule, and its compile-time shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaNetKernel {
    /// `gated_delta_net`: one block per (value head, 32 value columns) of
    /// [`DN_REC_WARPS`] warps, tokens in order, the block's state columns held in
    /// registers (up to [`crate::constants::DN_REC_ROWS`] rows a thread) from the
    /// first token to the last.
    Recurrent,
    /// `gated_delta_net_chunk<d_k>`: one block per (value head, [`DN_COLS`] value
    /// columns), chunks of [`DN_CHUNK`] tokens in order, for key heads of up to `d_k`
    /// elements (one of [`CHUNK_KEY_DIMS`]).
    Chunkwise { d_k: u32 },
}

/// The fewest tokens the chunkwise kernel runs; fewer run on the recurrent kernel.
/// The recurrent kernel's time grows with every token (about 1.9 us each at
/// Qwen3-Next's heads on an H200, after 6 us for the first), the chunkwise kernel's
/// with every chunk of 64 (about 31 us, nearly all of it for a chunk of 2 tokens as
/// for one of 64): 8 tokens take 18.5 us on the recurrent kernel against the chunkwise
/// kernel's 32.0, 16 tokens 33.3 against 32.1 (`kiln bench-kernels --sections
/// delta-net`, docs/perf.md).
pub const CHUNK_MIN_TOKENS: usize = 16;

/// Key head sizes the chunkwise kernel is compiled for: a key head runs on the
/// smallest that holds it, its elements past `d_k` zeros.
pub const CHUNK_KEY_DIMS: [u32; 3] = [64, 128, 256];

/// The largest key head the chunkwise kernel takes (its shared memory holds a chunk's
/// queries and keys and the block's state columns); larger ones run recurrently.
pub const CHUNK_MAX_D_K: usize = 256;

/// Bytes of dynamic shared memory of `gated_delta_net_chunk<d_k>` (kernels/
/// delta_net.cu's ChunkLayout): queries and keys (rows of `d_k + DN_PAD`), the state
/// columns (`d_k` rows of `DN_COLS + DN_COL_PAD`), the value tile (as many rows as
/// the chunk), two chunk-square matrices (rows of `DN_CHUNK + DN_PAD`) and four
/// floats per token.
pub fn chunk_shared_bytes(d_k: u32) -> usize {
    let (c, cols) = (DN_CHUNK as usize, (DN_COLS + DN_COL_PAD) as usize);
    let floats = 2 * c * (d_k + DN_PAD) as usize
        + d_k as usize * cols
        + c * cols
        + 2 * c * (c + DN_PAD as usize)
        + 4 * c;
    4 * floats
}

/// The gated delta rule specialisation of `kernel`.
pub fn delta_spec(kernel: DeltaNetKernel) -> KernelSpec {
    match kernel {
        DeltaNetKernel::Recurrent => DELTA_NET.spec(
            "gated_delta_net|form=recurrent".to_string(),
            "kiln::gated_delta_net".to_string(),
        ),
        DeltaNetKernel::Chunkwise { d_k } => DELTA_NET.spec(
            format!("gated_delta_net|form=chunkwise|d_k={d_k}"),
            format!("kiln::gated_delta_net_chunk<{d_k}>"),
        ),
    }
}

/// A gated delta rule's shape and the sizes in bytes of its buffers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeltaNetArgs {
    pub n_tokens: usize,
    pub heads: DeltaNetHeads,
    pub eps: f32,
    pub qkv_bytes: usize,
    pub a_bytes: usize,
    pub b_bytes: usize,
    pub ssm_a_bytes: usize,
    pub dt_bias_bytes: usize,
    pub state_bytes: usize,
    pub out_bytes: usize,
}

/// A checked gated delta rule launch.
#[derive(Clone, Debug)]
pub struct DeltaNetPlan {
    pub kernel: DeltaNetKernel,
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    /// n_tokens, n_k_heads, n_v_heads, d_k, d_v, and 1 for value heads tiled across the
    /// key heads (else 0), as the kernels take them.
    dims: [u32; 6],
}

impl DeltaNetArgs {
    /// The arguments of `op`, with its buffers' sizes as `graph` declares them.
    pub fn of_op(op: &GatedDeltaNet, graph: &Graph) -> Result<Self> {
        let bytes = |id| graph.desc(id).map(|d| d.bytes());
        Ok(Self {
            n_tokens: op.n_tokens,
            heads: op.heads,
            eps: op.eps,
            qkv_bytes: bytes(op.qkv)?,
            a_bytes: bytes(op.a)?,
            b_bytes: bytes(op.b)?,
            ssm_a_bytes: bytes(op.ssm_a)?,
            dt_bias_bytes: bytes(op.dt_bias)?,
            state_bytes: bytes(op.state)?,
            out_bytes: bytes(op.out)?,
        })
    }

    /// [`Self::check_form`] with the backend's choice of form.
    pub fn check(&self) -> Result<DeltaNetPlan> {
        self.check_form(DeltaNetForm::Auto)
    }

    /// Checks non-zero sizes, `n_v_heads` a multiple of `n_k_heads`, a finite `eps >=
    /// 0`, F32 buffers of the op's element counts (qkv `n_tokens x (2 n_k_heads d_k +
    /// n_v_heads d_v)`, a and b `n_tokens x n_v_heads`, ssm_a and dt_bias `n_v_heads`,
    /// state `n_v_heads x d_k x d_v`, out `n_tokens x n_v_heads x d_v`), `d_k` within
    /// the kernel's limit (the recurrent kernel's [`MAX_D_K`], the chunkwise kernel's
    /// [`CHUNK_MAX_D_K`]) and the grid's limits; picks the kernel of `form`.
    pub fn check_form(&self, form: DeltaNetForm) -> Result<DeltaNetPlan> {
        let DeltaNetHeads {
            n_k_heads,
            n_v_heads,
            d_k,
            d_v,
            layout,
        } = self.heads;
        let n_tokens = self.n_tokens;
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
        check_eps(OP, self.eps)?;
        let width = count(OP, &[2, n_k_heads, d_k])?
            .checked_add(count(OP, &[n_v_heads, d_v])?)
            .ok_or_else(|| Error::invalid(OP, "the q/k/v row length overflows"))?;
        let gates = count(OP, &[n_tokens, n_v_heads])?;
        check_bytes(
            OP,
            "qkv",
            self.qkv_bytes,
            DType::F32,
            count(OP, &[n_tokens, width])?,
        )?;
        check_bytes(OP, "a", self.a_bytes, DType::F32, gates)?;
        check_bytes(OP, "b", self.b_bytes, DType::F32, gates)?;
        check_bytes(OP, "ssm_a", self.ssm_a_bytes, DType::F32, n_v_heads)?;
        check_bytes(OP, "dt_bias", self.dt_bias_bytes, DType::F32, n_v_heads)?;
        check_bytes(
            OP,
            "state",
            self.state_bytes,
            DType::F32,
            count(OP, &[n_v_heads, d_k, d_v])?,
        )?;
        check_bytes(
            OP,
            "out",
            self.out_bytes,
            DType::F32,
            count(OP, &[gates, d_v])?,
        )?;
        let chunkwise = match form {
            DeltaNetForm::Auto => n_tokens >= CHUNK_MIN_TOKENS && d_k <= CHUNK_MAX_D_K,
            DeltaNetForm::Recurrent => false,
            DeltaNetForm::Chunkwise => true,
        };
        let limit = if chunkwise { CHUNK_MAX_D_K } else { MAX_D_K };
        if d_k > limit {
            let form = if chunkwise { "chunkwise" } else { "recurrent" };
            return Err(Error::invalid(
                OP,
                format!("d_k = {d_k} exceeds the {form} kernel's {limit}"),
            ));
        }
        // The kernels index the qkv rows and the state with 64-bit offsets and tokens,
        // heads and columns with 32 bits.
        let dims = [
            to_u32(OP, "n_tokens", n_tokens)?,
            to_u32(OP, "n_k_heads", n_k_heads)?,
            to_u32(OP, "n_v_heads", n_v_heads)?,
            to_u32(OP, "d_k", d_k)?,
            to_u32(OP, "d_v", d_v)?,
            u32::from(layout == HeadLayout::Tiled),
        ];
        let heads_grid = grid_dim(OP, "n_v_heads", n_v_heads, MAX_GRID_X)?;
        let (kernel, config) = if chunkwise {
            let tier = CHUNK_KEY_DIMS
                .into_iter()
                .find(|&t| t as usize >= d_k)
                // At most CHUNK_MAX_D_K, the largest tier.
                .unwrap_or(CHUNK_KEY_DIMS[CHUNK_KEY_DIMS.len() - 1]);
            let tiles = grid_dim(OP, "d_v", d_v.div_ceil(DN_COLS as usize), MAX_GRID_YZ)?;
            // At most chunk_shared_bytes(256), about 215 KiB.
            let shared = chunk_shared_bytes(tier) as u32;
            (
                DeltaNetKernel::Chunkwise { d_k: tier },
                config((heads_grid, tiles, 1), 32 * DN_WARPS, shared),
            )
        } else {
            let tiles = grid_dim(OP, "d_v", d_v.div_ceil(32), MAX_GRID_YZ)?;
            // At most 2 * MAX_D_K floats (32 KiB), within the default dynamic shared
            // memory.
            let shared = (2 * d_k * std::mem::size_of::<f32>()) as u32;
            (
                DeltaNetKernel::Recurrent,
                config((heads_grid, tiles, 1), 32 * DN_REC_WARPS, shared),
            )
        };
        Ok(DeltaNetPlan {
            kernel,
            spec: delta_spec(kernel),
            config,
            dims,
        })
    }
}

const OP: &str = "gated_delta_net";

/// The gated delta rule over `n_tokens` tokens, continuing from and updating `state`,
/// as [`kiln_core::ops::GatedDeltaNet`] defines: recurrent for short prompts and
/// decode, chunkwise from [`CHUNK_MIN_TOKENS`] tokens ([`DeltaNetForm::Auto`]).
pub fn gated_delta_net(
    backend: &CudaBackend,
    ins: DeltaNetOperands<'_>,
    state: &mut CudaBuffer,
    out: &mut CudaBuffer,
    n_tokens: usize,
    heads: DeltaNetHeads,
    eps: f32,
) -> Result<()> {
    gated_delta_net_with(
        backend,
        ins,
        state,
        out,
        n_tokens,
        heads,
        eps,
        DeltaNetForm::Auto,
    )
}

/// [`gated_delta_net`] in the given `form`.
///
/// The recurrent kernel is f32 arithmetic in the definition's order but for its dot
/// products over the key dimension, each summed in [`DN_REC_WARPS`] interleaved parts
/// that are then added in order. The chunkwise kernel computes the same rule in chunks
/// of [`DN_CHUNK`] tokens as kiln-cpu's chunkwise form does (f32, its products on
/// tensor cores in 3xTF32: operands split into two TF32 parts, f32 accumulation,
/// within a few f32 roundings of an f32 product); its results differ from the
/// recurrence by f32 rounding, as the CPU's chunkwise form does.
#[allow(clippy::too_many_arguments)] // the op's operands and shape, each named
pub fn gated_delta_net_with(
    backend: &CudaBackend,
    ins: DeltaNetOperands<'_>,
    state: &mut CudaBuffer,
    out: &mut CudaBuffer,
    n_tokens: usize,
    heads: DeltaNetHeads,
    eps: f32,
    form: DeltaNetForm,
) -> Result<()> {
    let plan = DeltaNetArgs {
        n_tokens,
        heads,
        eps,
        qkv_bytes: ins.qkv.bytes(),
        a_bytes: ins.a.bytes(),
        b_bytes: ins.b.bytes(),
        ssm_a_bytes: ins.ssm_a.bytes(),
        dt_bias_bytes: ins.dt_bias.bytes(),
        state_bytes: state.bytes(),
        out_bytes: out.bytes(),
    }
    .check_form(form)?;
    let k = backend.kernel(&plan.spec)?;
    allow_dynamic_shared(&k, &plan.config)?;
    let mut args = KernelArgs::new(backend);
    args.arg(ins.qkv.slice())
        .arg(ins.a.slice())
        .arg(ins.b.slice())
        .arg(ins.ssm_a.slice())
        .arg(ins.dt_bias.slice())
        .arg(state.slice_mut())
        .arg(out.slice_mut());
    for d in &plan.dims {
        args.arg(d);
    }
    args.arg(&eps);
    if let DeltaNetKernel::Chunkwise { .. } = plan.kernel {
        // One block per multiprocessor, each running for the whole prompt: nothing to
        // gain from starting before the previous kernel ends.
        args.serialized();
    }
    // SAFETY: the arguments match `kiln::gated_delta_net(const float* qkv, const float*
    // a, const float* b, const float* ssm_a, const float* dt_bias, float* state, float*
    // out, u32 n_tokens, u32 n_k_heads, u32 n_v_heads, u32 d_k, u32 d_v, u32 tiled,
    // float eps)` and `kiln::gated_delta_net_chunk<DK>` (the same parameters, DK >= d_k); the
    // buffers hold their elements (checked) and the launch gives the kernel its shared
    // memory (2 d_k floats, or chunk_shared_bytes(DK)), opted in above when over the
    // default.
    unsafe { launch(&k, &mut args, plan.config) }
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
