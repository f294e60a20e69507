//! The token mixers of the hybrid models (Qwen3-Next, Qwen3.5): Gated DeltaNet linear
//! attention, and full attention whose output a sigmoid gate scales. Both models'
//! layers compute the same; their files differ in how the linear attention's gate
//! and strength projections are stored and in the order of its value heads
//! ([`LinearAttentionConfig`]).
//!
//! They read weights a model derives at load from the file's
//! ([`crate::model::weight_splits`]): `blk.N.attn_q.weight` holds each head's query
//! rows and then its gate rows, split into `blk.N.attn_q.q.weight` and
//! `blk.N.attn_q.gate.weight`; Qwen3-Next's `blk.N.ssm_ba.weight` holds, per query/key
//! head, its value heads' `b` rows and then their `a` rows, split into
//! `blk.N.ssm_ba.b.weight` and `blk.N.ssm_ba.a.weight` (Qwen3.5's files hold them
//! apart, as `blk.N.ssm_beta.weight` and `blk.N.ssm_alpha.weight`). So every
//! projection is one plain product.
//!
//! The full-attention layers' rotary embedding is partial NeoX RoPE at each token's
//! position. Qwen3.5's is multi-section (`rope.dimension_sections`: the rotated pairs
//! interleave temporal, height and width positions); text gives every section the
//! token's position, which makes it this one, and text is all kiln runs.
//!
//! A linear-attention layer's states ([`names::conv_state`], [`names::delta_state`])
//! are persistent buffers of one sequence, read and advanced by every graph.

use super::{names, Act, Builder, KvSlots};
use crate::config::LinearAttentionConfig;
use kiln_core::ops::{
    CausalConv1d, Elementwise, ElementwiseKind, GatedDeltaNet, GatedRmsNorm, Q8_COPY,
};
use kiln_core::{BufferId, DType, Result};

/// Layer `l`'s token mixer over the normed activation `x`: linear attention or gated
/// full attention, as `lin` says. Returns the branch to add to the residual stream.
pub(super) fn mixer(
    b: &mut Builder,
    l: usize,
    lin: &LinearAttentionConfig,
    x: Act,
    positions: BufferId,
    kv: KvSlots,
) -> Result<BufferId> {
    if lin.is_linear(l) {
        linear_attention(b, l, lin, x)
    } else {
        gated_attention(b, l, x, positions, kv)
    }
}

/// `ssm_out(gated_rms_norm(delta_rule(conv(attn_qkv · x)), attn_gate · x))`: the
/// fused q/k/v projection through the causal convolution (with its state), the gated
/// delta rule over each value head (with its state, gates from the `b` and `a`
/// projections), the norm of each value head gated by SiLU of `attn_gate · x`, and
/// the output projection.
fn linear_attention(
    b: &mut Builder,
    l: usize,
    lin: &LinearAttentionConfig,
    x: Act,
) -> Result<BufferId> {
    let (d, t, eps) = (b.c.n_embd, b.t, b.c.rms_eps);
    let h = lin.heads;
    let (width, value) = (h.qkv_width(), h.n_v_heads * h.d_v);
    let qkv = b.linear(l, "attn_qkv", x, width, d, false)?;
    let z = b.linear(l, "attn_gate", x, value, d, false)?;
    let [beta, alpha] = if lin.fused_beta_alpha {
        ["ssm_ba.b", "ssm_ba.a"]
    } else {
        ["ssm_beta", "ssm_alpha"]
    };
    let beta = b.linear(l, beta, x, h.n_v_heads, d, false)?;
    let alpha = b.linear(l, alpha, x, h.n_v_heads, d, false)?;
    let weight = b.w(
        &format!("blk.{l}.ssm_conv1d.weight"),
        &[width, lin.conv_kernel],
    )?;
    let conv_state = b.g.persistent(
        names::conv_state(l),
        DType::F32,
        &[width, lin.conv_kernel - 1],
    )?;
    let conv = b.act(&format!("l{l}.conv"), width)?;
    b.g.push(CausalConv1d {
        x: qkv,
        weight,
        state: conv_state,
        out: conv,
        n_tokens: t,
        channels: width,
        kernel: lin.conv_kernel,
    })?;
    let ssm_a = b.w(&format!("blk.{l}.ssm_a"), &[h.n_v_heads])?;
    let dt_bias = b.w(&format!("blk.{l}.ssm_dt.bias"), &[h.n_v_heads])?;
    let state = b.g.persistent(
        names::delta_state(l),
        DType::F32,
        &[h.n_v_heads, h.d_k, h.d_v],
    )?;
    let core = b.act(&format!("l{l}.delta"), value)?;
    b.g.push(GatedDeltaNet {
        qkv: conv,
        a: alpha,
        b: beta,
        ssm_a,
        dt_bias,
        state,
        out: core,
        n_tokens: t,
        heads: h,
        eps,
    })?;
    let norm = b.w(&format!("blk.{l}.ssm_norm.weight"), &[h.d_v])?;
    let normed = b.act(&format!("l{l}.ssm_normed"), value)?;
    b.g.push(GatedRmsNorm {
        x: core,
        z,
        weight: norm,
        out: normed,
        rows: t * h.n_v_heads,
        dim: h.d_v,
        eps,
    })?;
    b.linear(l, "ssm_out", Act::from(normed), d, value, false)
}

/// Full attention whose output is gated: queries (and per head a gate) from the split
/// `attn_q`, keys and values, q/k norm and partial NeoX RoPE, the cache append,
/// attention over the cache, `attn * sigmoid(gate)`, the output projection.
fn gated_attention(
    b: &mut Builder,
    l: usize,
    x: Act,
    positions: BufferId,
    kv: KvSlots,
) -> Result<BufferId> {
    let c = b.c;
    let (d, t) = (c.n_embd, b.t);
    let caches = b.kv_caches(l, kv)?;
    let q = b.linear(l, "attn_q.q", x, c.q_dim(), d, false)?;
    let gate = b.linear(l, "attn_q.gate", x, c.q_dim(), d, false)?;
    let k = b.linear(l, "attn_k", x, c.kv_dim(), d, false)?;
    let v = b.linear(l, "attn_v", x, c.kv_dim(), d, false)?;
    let q = b.rope(l, "q", q, c.n_heads, positions, None)?;
    let k = b.rope(l, "k", k, c.n_kv_heads, positions, None)?;
    b.append_kv([k, v], caches, positions, kv)?;
    let attn = b.act(&format!("l{l}.attn"), c.q_dim())?;
    b.attend(q, caches, positions, kv, Act::from(attn))?;
    // The output projection reads the gated output's Q8_1 copy where its weight is of
    // a block format.
    let copy = b.quantized(&[format!("blk.{l}.attn_output.weight")])
        && c.q_dim() % Q8_COPY.block_size() == 0;
    let gated = b.act_with_copy(&format!("l{l}.attn_gated"), c.q_dim(), copy)?;
    b.g.push(Elementwise {
        kind: ElementwiseKind::SigmoidMul,
        a: gate,
        b: attn,
        out: gated.x,
        out_q8: gated.q8,
        len: t * c.q_dim(),
    })?;
    b.linear(l, "attn_output", gated, d, c.q_dim(), false)
}
