//! The ops of a Gated DeltaNet (linear-attention) layer, as Qwen3-Next and Qwen3.5
//! define it: the causal depthwise convolution over the fused q/k/v projection with
//! its rolling state, the gated delta rule with its recurrent state, the gated RMSNorm
//! of its output, and the L2 normalization it applies to queries and keys.
//!
//! Both states belong to one sequence and persist between steps: an op reads the state
//! its buffer holds and leaves the updated state in place, so a state must be a
//! persistent buffer (zeros before a sequence's first token).

use super::{Checker, OpSpec};
use crate::{BufferId, BufferKind, DType, Graph, Result};

/// Chunk length of the chunkwise form of [`GatedDeltaNet`] that backends use for
/// prompts (the CPU reference included).
pub const DELTA_NET_CHUNK: usize = 64;

/// Errors unless the state operand `role` is a persistent F32 buffer of `elements`.
fn check_state(c: &Checker, role: &str, id: BufferId, elements: usize) -> Result<()> {
    let desc = c.buffer(role, id, &[DType::F32], elements)?;
    c.ensure(desc.kind == BufferKind::Persistent, || {
        format!(
            "{role} {:?} must be a persistent buffer: it carries the sequence's state between runs",
            desc.name
        )
    })
}

fn check_eps(c: &Checker, eps: f32) -> Result<()> {
    c.ensure(eps.is_finite() && eps >= 0.0, || {
        format!("eps must be finite and >= 0, got {eps}")
    })
}

/// Causal depthwise convolution over time with a rolling state, then SiLU.
///
/// - `x`: F32 `[n_tokens, channels]`, consecutive tokens of one sequence.
/// - `weight`: F32 `[channels, kernel]`, one filter per channel (a Conv1d weight
///   `[channels, 1, kernel]` with its middle axis dropped); `kernel >= 2`.
/// - `state`: F32 `[channels, kernel - 1]`, persistent, read and written: the
///   channel's `kernel - 1` inputs before `x`, oldest first (zeros for a new sequence).
/// - `out`: F32 `[n_tokens, channels]`.
///
/// With `s[c]` the sequence `state[c, 0..kernel-1]` followed by `x[0..n_tokens, c]`:
/// `out[t, c] = silu(sum_j weight[c, j] * s[c][t + j])` for `j` in `0..kernel`
/// (the last tap multiplies token `t` itself), `silu(v) = v / (1 + exp(-v))`, summed in
/// f32. Afterwards `state[c, :]` holds the last `kernel - 1` values of `s[c]`. A prompt
/// run in pieces, state carried, equals one run of the whole prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct CausalConv1d {
    pub x: BufferId,
    pub weight: BufferId,
    pub state: BufferId,
    pub out: BufferId,
    pub n_tokens: usize,
    pub channels: usize,
    pub kernel: usize,
}

impl OpSpec for CausalConv1d {
    fn name(&self) -> &'static str {
        "causal_conv1d"
    }
    fn inputs(&self) -> Vec<BufferId> {
        vec![self.x, self.weight]
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.out, self.state]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[("n_tokens", self.n_tokens), ("channels", self.channels)])?;
        c.ensure(self.kernel >= 2, || {
            format!("kernel must be >= 2, got {}", self.kernel)
        })?;
        let n = c.count(&[self.n_tokens, self.channels])?;
        c.buffer("x", self.x, &[DType::F32], n)?;
        c.buffer("out", self.out, &[DType::F32], n)?;
        c.buffer(
            "weight",
            self.weight,
            &[DType::F32],
            c.count(&[self.channels, self.kernel])?,
        )?;
        check_state(
            &c,
            "state",
            self.state,
            c.count(&[self.channels, self.kernel - 1])?,
        )
    }
}

/// Which query/key head each value head of a [`GatedDeltaNet`] reads, when there are
/// more value heads than query/key heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadLayout {
    /// Value head `h` reads query/key head `h / group`: each query/key head's value
    /// heads are consecutive (transformers' order; Qwen3-Next's GGUF files).
    Grouped,
    /// Value head `h` reads query/key head `h % n_k_heads`: the value heads cycle
    /// through the query/key heads (Qwen3.5's GGUF files, whose converter reorders the
    /// checkpoint's grouped value heads so).
    Tiled,
}

/// The head counts and sizes of a [`GatedDeltaNet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaNetHeads {
    /// Query and key heads.
    pub n_k_heads: usize,
    /// Value heads: a multiple of `n_k_heads`; each has its own state.
    pub n_v_heads: usize,
    /// Elements of a query or key head.
    pub d_k: usize,
    /// Elements of a value head.
    pub d_v: usize,
    /// Which query/key head each value head reads.
    pub layout: HeadLayout,
}

impl DeltaNetHeads {
    /// Elements of one token's fused `q, k, v` row: `2 n_k_heads d_k + n_v_heads d_v`.
    pub fn qkv_width(&self) -> usize {
        2 * self.n_k_heads * self.d_k + self.n_v_heads * self.d_v
    }

    /// Value heads per query/key head.
    pub fn group(&self) -> usize {
        self.n_v_heads / self.n_k_heads
    }

    /// The query/key head value head `h` reads, as [`DeltaNetHeads::layout`] says:
    /// `h / group()` or `h % n_k_heads`.
    pub fn key_head(&self, h: usize) -> usize {
        match self.layout {
            HeadLayout::Grouped => h / self.group(),
            HeadLayout::Tiled => h % self.n_k_heads,
        }
    }

    /// Elements of the state: `n_v_heads d_k d_v`.
    pub fn state_elements(&self) -> usize {
        self.n_v_heads * self.d_k * self.d_v
    }

    fn check(&self, c: &Checker) -> Result<()> {
        c.nonzero(&[
            ("n_k_heads", self.n_k_heads),
            ("n_v_heads", self.n_v_heads),
            ("d_k", self.d_k),
            ("d_v", self.d_v),
        ])?;
        c.ensure(self.n_v_heads % self.n_k_heads == 0, || {
            format!(
                "n_v_heads {} is not a multiple of n_k_heads {}",
                self.n_v_heads, self.n_k_heads
            )
        })?;
        let qk = c.count(&[2, self.n_k_heads, self.d_k])?;
        let v = c.count(&[self.n_v_heads, self.d_v])?;
        qk.checked_add(v)
            .ok_or_else(|| c.error("the q/k/v row length overflows"))?;
        c.count(&[self.n_v_heads, self.d_k, self.d_v]).map(|_| ())
    }
}

/// The gated delta rule over a sequence's tokens, with a recurrent state per value
/// head (transformers' `torch_recurrent_gated_delta_rule` with the q/k L2 norm on).
///
/// - `qkv`: F32 `[n_tokens, qkv_width]` ([`DeltaNetHeads::qkv_width`]): per token its
///   `n_k_heads` query heads of `d_k`, then `n_k_heads` key heads of `d_k`, then
///   `n_v_heads` value heads of `d_v` (the output of [`CausalConv1d`]).
/// - `a`, `b`: F32 `[n_tokens, n_v_heads]`, the gate and strength projections.
/// - `ssm_a`, `dt_bias`: F32 `[n_v_heads]`, the layer's decay rate `-exp(A_log)`
///   (negative, as GGUF's `ssm_a` stores it) and its time-step bias.
/// - `state`: F32 `[n_v_heads, d_k, d_v]`, persistent, read and written (zeros for a
///   new sequence).
/// - `out`: F32 `[n_tokens, n_v_heads, d_v]`.
///
/// For each value head `h` (query/key head [`DeltaNetHeads::key_head`]`(h)`) and token
/// `t` in order:
/// `q = l2(q_t) / sqrt(d_k)`, `k = l2(k_t)` with `l2` as [`L2Norm`] defines it with
/// `eps`; `g = ssm_a[h] * softplus(a[t, h] + dt_bias[h])` with
/// `softplus(x) = ln(1 + exp(x))` (`x` itself above 20); `beta = sigmoid(b[t, h])`.
/// Then `S = exp(g) S`, `d = beta (v_t - S^T k)`, `S = S + k d^T`, and
/// `out[t, h, :] = S^T q`, where `S` is `state[h]` (`d_k x d_v`). All in f32.
///
/// A backend may compute a prompt chunkwise (chunks of [`DELTA_NET_CHUNK`]): the same
/// result up to rounding, in f32 or in products whose terms are within about 2^-20
/// of exact (the CUDA backend's 3xTF32 tensor-core products). A prompt run in pieces,
/// state carried, equals one run.
#[derive(Clone, Debug, PartialEq)]
pub struct GatedDeltaNet {
    pub qkv: BufferId,
    pub a: BufferId,
    pub b: BufferId,
    pub ssm_a: BufferId,
    pub dt_bias: BufferId,
    pub state: BufferId,
    pub out: BufferId,
    pub n_tokens: usize,
    pub heads: DeltaNetHeads,
    pub eps: f32,
}

impl OpSpec for GatedDeltaNet {
    fn name(&self) -> &'static str {
        "gated_delta_net"
    }
    fn inputs(&self) -> Vec<BufferId> {
        vec![self.qkv, self.a, self.b, self.ssm_a, self.dt_bias]
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.out, self.state]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        let h = self.heads;
        c.nonzero(&[("n_tokens", self.n_tokens)])?;
        h.check(&c)?;
        check_eps(&c, self.eps)?;
        let t = self.n_tokens;
        c.buffer(
            "qkv",
            self.qkv,
            &[DType::F32],
            c.count(&[t, h.qkv_width()])?,
        )?;
        let gates = c.count(&[t, h.n_v_heads])?;
        c.buffer("a", self.a, &[DType::F32], gates)?;
        c.buffer("b", self.b, &[DType::F32], gates)?;
        c.buffer("ssm_a", self.ssm_a, &[DType::F32], h.n_v_heads)?;
        c.buffer("dt_bias", self.dt_bias, &[DType::F32], h.n_v_heads)?;
        c.buffer(
            "out",
            self.out,
            &[DType::F32],
            c.count(&[t, h.n_v_heads, h.d_v])?,
        )?;
        check_state(&c, "state", self.state, h.state_elements())
    }
}

/// RMSNorm of each row gated by SiLU of a second input (Qwen3-Next's `RMSNormGated`).
///
/// `x`, `z`, `out`: F32 `[rows, dim]`; `weight`: F32 `[dim]`, the multiplier itself
/// (this norm's weight is not zero-centred).
/// `out[r, i] = x[r, i] / sqrt(mean_j(x[r, j]^2) + eps) * weight[i] * silu(z[r, i])`,
/// in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct GatedRmsNorm {
    pub x: BufferId,
    pub z: BufferId,
    pub weight: BufferId,
    pub out: BufferId,
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
}

impl OpSpec for GatedRmsNorm {
    fn name(&self) -> &'static str {
        "gated_rms_norm"
    }
    fn inputs(&self) -> Vec<BufferId> {
        vec![self.x, self.z, self.weight]
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.out]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[("rows", self.rows), ("dim", self.dim)])?;
        check_eps(&c, self.eps)?;
        let n = c.count(&[self.rows, self.dim])?;
        for (role, id) in [("x", self.x), ("z", self.z), ("out", self.out)] {
            c.buffer(role, id, &[DType::F32], n)?;
        }
        c.buffer("weight", self.weight, &[DType::F32], self.dim)
            .map(|_| ())
    }
}

/// L2 normalization of each row (as the FLA library and transformers' `l2norm`).
///
/// `x`, `out`: F32 `[rows, dim]`.
/// `out[r, i] = x[r, i] / sqrt(sum_j(x[r, j]^2) + eps)`, in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct L2Norm {
    pub x: BufferId,
    pub out: BufferId,
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
}

impl OpSpec for L2Norm {
    fn name(&self) -> &'static str {
        "l2_norm"
    }
    fn inputs(&self) -> Vec<BufferId> {
        vec![self.x]
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.out]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[("rows", self.rows), ("dim", self.dim)])?;
        check_eps(&c, self.eps)?;
        let n = c.count(&[self.rows, self.dim])?;
        c.buffer("x", self.x, &[DType::F32], n)?;
        c.buffer("out", self.out, &[DType::F32], n).map(|_| ())
    }
}
