//! Reference for [`kiln_core::ops::CausalConv1d`], [`kiln_core::ops::GatedDeltaNet`]
//! (its recurrent form, and the chunkwise form it runs prompts with),
//! [`kiln_core::ops::GatedRmsNorm`] and [`kiln_core::ops::L2Norm`].

use super::elementwise::silu;
use super::norm::rms_norm_row;
use crate::{Inputs, Outputs};
use kiln_core::ops::{
    CausalConv1d, DeltaNetHeads, GatedDeltaNet, GatedRmsNorm, L2Norm, DELTA_NET_CHUNK,
};
use kiln_core::Result;
use rayon::prelude::*;

/// The causal convolution with SiLU of `x` (`[n_tokens, channels]`) into `out`, each
/// channel continuing from its `kernel - 1` inputs in `state` (`[channels, kernel - 1]`),
/// which is left holding the channel's last `kernel - 1` inputs.
pub fn causal_conv1d(
    x: &[f32],
    weight: &[f32],
    state: &mut [f32],
    out: &mut [f32],
    channels: usize,
    kernel: usize,
) {
    let n_tokens = x.len() / channels;
    let history = kernel - 1;
    let mut seq = vec![0f32; history + n_tokens];
    for (c, (w, st)) in weight
        .chunks_exact(kernel)
        .zip(state.chunks_exact_mut(history))
        .enumerate()
    {
        seq[..history].copy_from_slice(st);
        for t in 0..n_tokens {
            seq[history + t] = x[t * channels + c];
        }
        for t in 0..n_tokens {
            let sum: f32 = w.iter().zip(&seq[t..t + kernel]).map(|(w, s)| w * s).sum();
            out[t * channels + c] = silu(sum);
        }
        st.copy_from_slice(&seq[n_tokens..]);
    }
}

/// `out = x / sqrt(sum(x^2) + eps)` for one row.
pub fn l2_norm_row(x: &[f32], out: &mut [f32], eps: f32) {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() + eps).sqrt();
    for (o, v) in out.iter_mut().zip(x) {
        *o = v * inv;
    }
}

/// [`l2_norm_row`] over every `dim`-element row of `x`.
pub fn l2_norm(x: &[f32], out: &mut [f32], dim: usize, eps: f32) {
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, x)| l2_norm_row(x, o, eps));
}

/// `out = rms_norm(x) * weight * silu(z)`, row by row over rows of `dim`.
pub fn gated_rms_norm(x: &[f32], z: &[f32], weight: &[f32], out: &mut [f32], dim: usize, eps: f32) {
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim).zip(z.par_chunks(dim)))
        .for_each(|(o, (x, z))| {
            rms_norm_row(x, Some(weight), o, eps);
            for (o, &z) in o.iter_mut().zip(z) {
                *o *= silu(z);
            }
        });
}

/// The inputs of a [`GatedDeltaNet`] over `n_tokens` tokens, as its definition lays
/// them out.
#[derive(Clone, Copy, Debug)]
pub struct DeltaNetInputs<'a> {
    pub qkv: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub ssm_a: &'a [f32],
    pub dt_bias: &'a [f32],
    pub heads: DeltaNetHeads,
    pub eps: f32,
}

/// `ln(1 + exp(x))`, and `x` itself above 20 (as torch's softplus).
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// One value head's inputs, prepared: per token the normalized and scaled query, the
/// normalized key (`d_k` each), the value (`d_v`), the log-decay `g` and `beta`.
struct HeadSeq {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    g: Vec<f32>,
    beta: Vec<f32>,
}

impl DeltaNetInputs<'_> {
    fn n_tokens(&self) -> usize {
        self.a.len() / self.heads.n_v_heads
    }

    /// Value head `h`'s sequence, as [`GatedDeltaNet`] defines q, k, g and beta.
    fn head(&self, h: usize) -> HeadSeq {
        let DeltaNetHeads {
            n_k_heads,
            n_v_heads,
            d_k,
            d_v,
            ..
        } = self.heads;
        let n = self.n_tokens();
        let kh = self.heads.key_head(h);
        let width = self.heads.qkv_width();
        let scale = 1.0 / (d_k as f32).sqrt();
        let mut s = HeadSeq {
            q: vec![0.0; n * d_k],
            k: vec![0.0; n * d_k],
            v: Vec::with_capacity(n * d_v),
            g: Vec::with_capacity(n),
            beta: Vec::with_capacity(n),
        };
        for t in 0..n {
            let row = &self.qkv[t * width..(t + 1) * width];
            let q = &row[kh * d_k..(kh + 1) * d_k];
            let k = &row[(n_k_heads + kh) * d_k..(n_k_heads + kh + 1) * d_k];
            let v0 = 2 * n_k_heads * d_k + h * d_v;
            l2_norm_row(q, &mut s.q[t * d_k..(t + 1) * d_k], self.eps);
            for x in &mut s.q[t * d_k..(t + 1) * d_k] {
                *x *= scale;
            }
            l2_norm_row(k, &mut s.k[t * d_k..(t + 1) * d_k], self.eps);
            s.v.extend_from_slice(&row[v0..v0 + d_v]);
            let a = self.a[t * n_v_heads + h] + self.dt_bias[h];
            s.g.push(self.ssm_a[h] * softplus(a));
            s.beta
                .push(1.0 / (1.0 + (-self.b[t * n_v_heads + h]).exp()));
        }
        s
    }
}

/// Runs `each(h, head, state_h, out_h)` for every value head in parallel, where
/// `out_h` is the head's output `[n_tokens, d_v]`, then scatters the heads' outputs
/// into `out` (`[n_tokens, n_v_heads, d_v]`).
fn per_head(
    inputs: &DeltaNetInputs,
    state: &mut [f32],
    out: &mut [f32],
    each: impl Fn(&HeadSeq, &mut [f32], &mut [f32]) + Sync,
) {
    let DeltaNetHeads {
        n_v_heads,
        d_k,
        d_v,
        ..
    } = inputs.heads;
    let n = inputs.n_tokens();
    let outs: Vec<Vec<f32>> = state
        .par_chunks_mut(d_k * d_v)
        .enumerate()
        .map(|(h, s)| {
            let mut o = vec![0f32; n * d_v];
            each(&inputs.head(h), s, &mut o);
            o
        })
        .collect();
    for (h, o) in outs.iter().enumerate() {
        for t in 0..n {
            let at = (t * n_v_heads + h) * d_v;
            out[at..at + d_v].copy_from_slice(&o[t * d_v..(t + 1) * d_v]);
        }
    }
}

/// The gated delta rule token by token, as [`GatedDeltaNet`] defines it: `state`
/// (`[n_v_heads, d_k, d_v]`) is updated in place, `out` is `[n_tokens, n_v_heads, d_v]`.
pub fn gated_delta_net_recurrent(inputs: &DeltaNetInputs, state: &mut [f32], out: &mut [f32]) {
    let (d_k, d_v) = (inputs.heads.d_k, inputs.heads.d_v);
    per_head(inputs, state, out, |s, state, out| {
        let mut delta = vec![0f32; d_v];
        for (t, o) in out.chunks_exact_mut(d_v).enumerate() {
            let q = &s.q[t * d_k..(t + 1) * d_k];
            let k = &s.k[t * d_k..(t + 1) * d_k];
            let decay = s.g[t].exp();
            state.iter_mut().for_each(|x| *x *= decay);
            delta.copy_from_slice(&s.v[t * d_v..(t + 1) * d_v]);
            for (row, &ki) in state.chunks_exact(d_v).zip(k) {
                for (d, &x) in delta.iter_mut().zip(row) {
                    *d -= x * ki;
                }
            }
            delta.iter_mut().for_each(|d| *d *= s.beta[t]);
            o.fill(0.0);
            for ((row, &ki), &qi) in state.chunks_exact_mut(d_v).zip(k).zip(q) {
                for ((x, &d), o) in row.iter_mut().zip(&delta).zip(o.iter_mut()) {
                    *x += ki * d;
                    *o += *x * qi;
                }
            }
        }
    });
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// `acc += alpha * x`.
fn axpy(acc: &mut [f32], alpha: f32, x: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(x) {
        *a += alpha * x;
    }
}

/// `out[j] = sum_i v[i] * m[i, j]` for `m` of rows of `out.len()`.
fn vec_mat(v: &[f32], m: &[f32], out: &mut [f32]) {
    out.fill(0.0);
    for (&vi, row) in v.iter().zip(m.chunks_exact(out.len())) {
        axpy(out, vi, row);
    }
}

/// The gated delta rule chunkwise, in chunks of [`DELTA_NET_CHUNK`] tokens (the last
/// one shorter): equal to [`gated_delta_net_recurrent`] up to f32 rounding.
///
/// Within a chunk starting from state `S0`, with `G_t` the cumulative sum of `g` up to
/// token `t` of the chunk, the recurrence unrolls to
/// `S_t = exp(G_t) S0 + sum_{s <= t} exp(G_t - G_s) k_s u_s^T`, where the corrections
/// `u_t` solve the unit lower-triangular system
/// `u_t + sum_{s < t} beta_t exp(G_t - G_s) (k_t . k_s) u_s = beta_t v_t - w_t S0`
/// with `w_t = beta_t exp(G_t) k_t`. Its solution is `u = U - W S0` with `U` and `W`
/// the system solved for `beta v` and for `w` (independent of `S0`, so parallel over
/// chunks); then `out_t = exp(G_t) S0^T q_t + sum_{s <= t} exp(G_t - G_s) (q_t . k_s) u_s`
/// and the next chunk starts from `S_last`.
pub fn gated_delta_net_chunked(inputs: &DeltaNetInputs, state: &mut [f32], out: &mut [f32]) {
    let (d_k, d_v) = (inputs.heads.d_k, inputs.heads.d_v);
    per_head(inputs, state, out, |s, state, out| {
        let n = s.g.len();
        for t0 in (0..n).step_by(DELTA_NET_CHUNK) {
            let c = DELTA_NET_CHUNK.min(n - t0);
            let q = &s.q[t0 * d_k..(t0 + c) * d_k];
            let k = &s.k[t0 * d_k..(t0 + c) * d_k];
            let beta = &s.beta[t0..t0 + c];
            let mut cum = Vec::with_capacity(c);
            s.g[t0..t0 + c].iter().fold(0f32, |acc, &g| {
                cum.push(acc + g);
                acc + g
            });
            let kt = |t: usize| &k[t * d_k..(t + 1) * d_k];
            // Rows of U (d_v) then W (d_k), solved together by forward substitution.
            let width = d_v + d_k;
            let mut uw = vec![0f32; c * width];
            for t in 0..c {
                let (done, rest) = uw.split_at_mut(t * width);
                let row = &mut rest[..width];
                for (r, &v) in row[..d_v].iter_mut().zip(&s.v[(t0 + t) * d_v..]) {
                    *r = beta[t] * v;
                }
                let w = beta[t] * cum[t].exp();
                for (r, &x) in row[d_v..].iter_mut().zip(kt(t)) {
                    *r = w * x;
                }
                for (sidx, prev) in done.chunks_exact(width).enumerate() {
                    let l = beta[t] * (cum[t] - cum[sidx]).exp() * dot(kt(t), kt(sidx));
                    axpy(row, -l, prev);
                }
            }
            // u = U - W S0, row by row.
            let mut u = vec![0f32; c * d_v];
            let mut ws = vec![0f32; d_v];
            for (ut, row) in u.chunks_exact_mut(d_v).zip(uw.chunks_exact(width)) {
                vec_mat(&row[d_v..], state, &mut ws);
                for ((u, &x), &y) in ut.iter_mut().zip(&row[..d_v]).zip(&ws) {
                    *u = x - y;
                }
            }
            for (t, o) in out[t0 * d_v..(t0 + c) * d_v]
                .chunks_exact_mut(d_v)
                .enumerate()
            {
                let qt = &q[t * d_k..(t + 1) * d_k];
                vec_mat(qt, state, o);
                let e = cum[t].exp();
                o.iter_mut().for_each(|x| *x *= e);
                for sidx in 0..=t {
                    let a = (cum[t] - cum[sidx]).exp() * dot(qt, kt(sidx));
                    axpy(o, a, &u[sidx * d_v..(sidx + 1) * d_v]);
                }
            }
            let last = cum[c - 1];
            let e = last.exp();
            state.iter_mut().for_each(|x| *x *= e);
            for sidx in 0..c {
                let ut = &u[sidx * d_v..(sidx + 1) * d_v];
                let decay = (last - cum[sidx]).exp();
                for (row, &ki) in state.chunks_exact_mut(d_v).zip(kt(sidx)) {
                    axpy(row, decay * ki, ut);
                }
            }
        }
    });
}

pub(crate) fn execute_causal_conv1d(
    op: &CausalConv1d,
    ins: &Inputs,
    outs: &mut Outputs,
) -> Result<()> {
    let n = op.n_tokens * op.channels;
    let (out, state) = outs.pair_sized::<f32>(n, op.channels * (op.kernel - 1));
    causal_conv1d(
        ins.view(op.x, n),
        ins.view(op.weight, op.channels * op.kernel),
        state,
        out,
        op.channels,
        op.kernel,
    );
    Ok(())
}

/// One token runs the recurrence; a prompt runs chunkwise, as transformers does.
pub(crate) fn execute_gated_delta_net(
    op: &GatedDeltaNet,
    ins: &Inputs,
    outs: &mut Outputs,
) -> Result<()> {
    let h = op.heads;
    let t = op.n_tokens;
    let inputs = DeltaNetInputs {
        qkv: ins.view(op.qkv, t * h.qkv_width()),
        a: ins.view(op.a, t * h.n_v_heads),
        b: ins.view(op.b, t * h.n_v_heads),
        ssm_a: ins.view(op.ssm_a, h.n_v_heads),
        dt_bias: ins.view(op.dt_bias, h.n_v_heads),
        heads: h,
        eps: op.eps,
    };
    let (out, state) = outs.pair_sized::<f32>(t * h.n_v_heads * h.d_v, h.state_elements());
    if t == 1 {
        gated_delta_net_recurrent(&inputs, state, out);
    } else {
        gated_delta_net_chunked(&inputs, state, out);
    }
    Ok(())
}

pub(crate) fn execute_gated_rms_norm(
    op: &GatedRmsNorm,
    ins: &Inputs,
    outs: &mut Outputs,
) -> Result<()> {
    let n = op.rows * op.dim;
    gated_rms_norm(
        ins.view(op.x, n),
        ins.view(op.z, n),
        ins.view(op.weight, op.dim),
        outs.view_mut(op.out, n),
        op.dim,
        op.eps,
    );
    Ok(())
}

pub(crate) fn execute_l2_norm(op: &L2Norm, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let n = op.rows * op.dim;
    l2_norm(ins.view(op.x, n), outs.view_mut(op.out, n), op.dim, op.eps);
    Ok(())
}
