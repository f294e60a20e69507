//! The forward pass of a decoder-only transformer as a graph of Op IR ops.
//!
//! One builder serves prefill (many tokens) and decode (one token): the graph reads
//! token ids and positions from input buffers, appends the new keys and values to
//! each layer's KV cache at those positions, and writes the logits of the last
//! token only (with several tokens, the hidden state of the last row is gathered
//! before the final norm's output is projected onto the vocabulary).
//! [`ForwardGraph::with_sample`] appends a [`Sample`] op that chooses the next token
//! on the device from those logits.
//!
//! [`build_batch`] builds the graph of a batched step: each token carries the slot of
//! the KV caches it belongs to ([`names::SLOTS`]), so one graph advances several
//! sequences, and the logits of the rows [`names::LOGIT_ROWS`] lists are projected
//! ([`names::BATCH_LOGITS`]) and each row's argmax taken ([`names::BATCH_TOKENS`]).
//!
//! Where the model holds stacked weights (`blk.N.attn_qkv.weight`,
//! `blk.N.ffn_gate_up.weight`, `blk.N.ffn_gate_up_exps.weight`,
//! `blk.N.ffn_gate_up_shexp.weight`: [`crate::model::weight_stacks`]), one product
//! computes the queries, keys and values ([`QkvRopeAppend`] then rotates and appends
//! them) and one the gate and up projections of a feed-forward, of the chosen experts
//! or of the shared expert ([`Glu`] then gates them).
//!
//! A mixture-of-experts layer ([`MoeConfig`]) routes each token to its experts
//! ([`MoeRouter`] over the logits of `blk.N.ffn_gate_inp.weight`), runs the chosen
//! experts' SwiGLU with [`MoeMatMul`]s over the stacked `blk.N.ffn_*_exps.weight`, the
//! shared expert (where there is one) with ordinary products, and sums them with
//! [`MoeCombine`].
//!
//! A hybrid model's layers (Qwen3-Next, Qwen3.5:
//! [`crate::config::LinearAttentionConfig`]) are built by the [`hybrid`] module: Gated
//! DeltaNet linear attention over a per-sequence recurrent state, and full attention
//! with a sigmoid-gated output.

mod hybrid;

use crate::config::{ModelConfig, MoeConfig};
use kiln_core::ops::{
    AddRmsNorm, Argmax, Attention, Elementwise, ElementwiseKind, Embedding, Gating, Glu,
    HeadNormRope, KvAppend, MatMul, MoeCombine, MoeMatMul, MoeRouter, QkNorm, QkvRopeAppend,
    RmsNorm, Rope, Sample, SampleParams, Q8_COPY,
};
use kiln_core::{BufferId, DType, Error, Graph, Result};

/// Names of the graph's non-weight persistent buffers.
pub mod names {
    /// I32 `[n_tokens]`: the tokens to run.
    pub const TOKEN_IDS: &str = "input.token_ids";
    /// I32 `[n_tokens]`: each token's position in the sequence.
    pub const POSITIONS: &str = "input.positions";
    /// I32 `[1]`: the index of the row whose logits are wanted (`n_tokens - 1`); read
    /// by graphs of more than one token.
    pub const LAST_ROW: &str = "input.last_row";
    /// F32 `[1, vocab]`: the logits of the last token.
    pub const LOGITS: &str = "output.logits";
    /// I32 `[n_tokens]`: each token's cache slot, in a batched graph.
    pub const SLOTS: &str = "input.slots";
    /// I32 `[n_logits]`: the rows whose logits a batched graph projects, in order.
    pub const LOGIT_ROWS: &str = "input.logit_rows";
    /// F32 `[n_logits, vocab]`: a batched graph's logits, one row per
    /// [`LOGIT_ROWS`] entry.
    pub const BATCH_LOGITS: &str = "output.batch_logits";
    /// I32 `[n_logits]`: a batched graph's greedy tokens, the argmax of each
    /// [`BATCH_LOGITS`] row (lowest index on ties, [`kiln_core::ops::Argmax`]).
    pub const BATCH_TOKENS: &str = "output.batch_tokens";
    /// F32 `[1]`: the uniform number in `[0, 1)` of the sampling head's draw.
    pub const UNIFORM: &str = "input.uniform";
    /// I32 `[1]`: the token the sampling head chose.
    pub const TOKEN: &str = "output.token";

    /// The key cache of layer `l`.
    pub fn k_cache(l: usize) -> String {
        format!("cache.k.{l}")
    }

    /// The value cache of layer `l`.
    pub fn v_cache(l: usize) -> String {
        format!("cache.v.{l}")
    }

    /// The causal convolution's state of linear-attention layer `l`: F32
    /// `[qkv_width, conv_kernel - 1]`.
    pub fn conv_state(l: usize) -> String {
        format!("state.conv.{l}")
    }

    /// The delta rule's recurrent state of linear-attention layer `l`: F32
    /// `[n_v_heads, d_k, d_v]`.
    pub fn delta_state(l: usize) -> String {
        format!("state.delta.{l}")
    }
}

/// A weight tensor as the graph declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightDesc {
    pub name: String,
    pub dtype: DType,
    /// Row-major shape.
    pub shape: Vec<usize>,
}

/// A forward graph and the ids of its inputs and outputs.
#[derive(Debug)]
pub struct ForwardGraph {
    pub graph: Graph,
    pub n_tokens: usize,
    pub token_ids: BufferId,
    pub positions: BufferId,
    /// The tokens' cache slots ([`names::SLOTS`]) of a batched graph; none (every
    /// token in slot 0) otherwise.
    pub slots: Option<BufferId>,
    /// The rows whose logits are projected: [`names::LAST_ROW`] (`[1]`), or for a
    /// batched graph [`names::LOGIT_ROWS`] (`[n_logits]`).
    pub last_row: BufferId,
    /// [`names::LOGITS`] (`[1, vocab]`), or for a batched graph
    /// [`names::BATCH_LOGITS`] (`[n_logits, vocab]`).
    pub logits: BufferId,
    /// [`names::BATCH_TOKENS`] (`[n_logits]`), the argmax of each logits row, of a
    /// batched graph; none otherwise.
    pub batch_tokens: Option<BufferId>,
    /// The sampling head, when [`ForwardGraph::with_sample`] added one.
    pub sample: Option<SampleHead>,
}

/// A [`Sample`] op at the end of a forward graph: its settings, its uniform-number
/// input and its token output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleHead {
    pub params: SampleParams,
    /// F32 `[1]`, [`names::UNIFORM`].
    pub uniform: BufferId,
    /// I32 `[1]`, [`names::TOKEN`].
    pub token: BufferId,
}

impl ForwardGraph {
    /// This graph followed by a [`Sample`] op with `params` over the logits of the
    /// last token: it reads the uniform number from [`names::UNIFORM`] and writes the
    /// chosen token id to [`names::TOKEN`]. The logits stay in [`names::LOGITS`].
    /// Errors when `params` are out of range or the graph already has a head.
    pub fn with_sample(mut self, params: SampleParams) -> Result<Self> {
        if self.sample.is_some() {
            return Err(Error::invalid(
                "forward graph",
                "the graph already ends with a sample op",
            ));
        }
        let g = &mut self.graph;
        let uniform = g.persistent(names::UNIFORM, DType::F32, &[1])?;
        let token = g.persistent(names::TOKEN, DType::I32, &[1])?;
        let shape = &g.desc(self.logits)?.shape;
        if shape[0] != 1 {
            return Err(Error::invalid(
                "forward graph",
                "a sample op needs a graph with one row of logits",
            ));
        }
        let vocab = shape[1];
        g.push(Sample {
            logits: self.logits,
            uniform,
            out: token,
            rows: 1,
            vocab,
            params,
        })?;
        self.sample = Some(SampleHead {
            params,
            uniform,
            token,
        });
        Ok(self)
    }
}

/// Sizes of the KV caches a graph appends to: `[slots, n_kv_heads, capacity,
/// head_dim]` per layer.
#[derive(Clone, Copy, Debug)]
pub struct CacheSpec {
    /// Positions each slot of each layer's cache holds.
    pub capacity: usize,
    /// F32 or F16.
    pub dtype: DType,
    /// Sequences (slots) each cache holds.
    pub slots: usize,
}

/// Builds the forward graph for `n_tokens` new tokens.
///
/// `weight(name)` gives the dtype and shape of each GGUF tensor (llama.cpp names:
/// `token_embd.weight`, `blk.N.attn_q.weight`, ...); a missing or misshapen weight is
/// an error naming it.
pub fn build(
    config: &ModelConfig,
    weight: &dyn Fn(&str) -> Result<WeightDesc>,
    n_tokens: usize,
    cache: CacheSpec,
) -> Result<ForwardGraph> {
    build_graph(config, weight, n_tokens, cache, None)
}

/// Builds the graph of a batched step of `n_tokens` tokens, each in the cache slot
/// [`names::SLOTS`] gives (rows of one slot at the positions [`names::POSITIONS`]
/// gives), that projects the logits of the `n_logits` rows [`names::LOGIT_ROWS`]
/// lists into [`names::BATCH_LOGITS`] and writes the argmax of each of those rows to
/// [`names::BATCH_TOKENS`]. Weights as [`build`].
pub fn build_batch(
    config: &ModelConfig,
    weight: &dyn Fn(&str) -> Result<WeightDesc>,
    n_tokens: usize,
    n_logits: usize,
    cache: CacheSpec,
) -> Result<ForwardGraph> {
    build_graph(config, weight, n_tokens, cache, Some(n_logits))
}

/// [`build`], or with `batch` (its number of logits rows) [`build_batch`].
fn build_graph(
    config: &ModelConfig,
    weight: &dyn Fn(&str) -> Result<WeightDesc>,
    n_tokens: usize,
    cache: CacheSpec,
    batch: Option<usize>,
) -> Result<ForwardGraph> {
    let mut b = Builder {
        g: Graph::new(),
        c: config,
        t: n_tokens,
        copy_rows: if batch.is_some() { BATCH_COPY_ROWS } else { 1 },
        weight,
    };
    let token_ids = b.g.persistent(names::TOKEN_IDS, DType::I32, &[n_tokens])?;
    let positions = b.g.persistent(names::POSITIONS, DType::I32, &[n_tokens])?;
    let (slots, last_row, logits, n_logits) = match batch {
        Some(n_logits) => (
            Some(b.g.persistent(names::SLOTS, DType::I32, &[n_tokens])?),
            b.g.persistent(names::LOGIT_ROWS, DType::I32, &[n_logits])?,
            b.g.persistent(names::BATCH_LOGITS, DType::F32, &[n_logits, config.vocab])?,
            n_logits,
        ),
        None => (
            None,
            b.g.persistent(names::LAST_ROW, DType::I32, &[1])?,
            b.g.persistent(names::LOGITS, DType::F32, &[1, config.vocab])?,
            1,
        ),
    };
    let kv = KvSlots { cache, slots };
    let (d, t) = (config.n_embd, n_tokens);

    let embd = b.w("token_embd.weight", &[config.vocab, d])?;
    let x = b.act("embd", d)?;
    b.g.push(Embedding {
        table: embd,
        ids: token_ids,
        out: x,
        out_q8: None,
        n_tokens: t,
        vocab: config.vocab,
        dim: d,
    })?;
    let freq_factors = if config.rope_freq_factors {
        Some(b.w("rope_freqs.weight", &[config.rope.rotary_dim / 2])?)
    } else {
        None
    };

    // The residual stream `resid` and the pending branch output `branch` to add to it.
    let (mut resid, mut branch) = (x, None);
    for l in 0..config.n_layers {
        let attn_copy = b.quantized(
            &["attn_qkv", "attn_q", "attn_q.q", "attn_k", "attn_v"]
                .map(|w| format!("blk.{l}.{w}.weight")),
        );
        let (r, normed) = b.residual_norm(
            resid,
            branch,
            &format!("blk.{l}.attn_norm.weight"),
            &format!("l{l}.attn"),
            attn_copy,
        )?;
        let attn = match &config.linear {
            Some(lin) => hybrid::mixer(&mut b, l, lin, normed, positions, kv)?,
            None => b.attention(l, normed, positions, freq_factors, kv)?,
        };
        let ffn_copy = b.quantized(
            &[
                "ffn_gate_up",
                "ffn_gate",
                "ffn_up",
                "ffn_gate_up_shexp",
                "ffn_gate_shexp",
                "ffn_up_shexp",
            ]
            .map(|w| format!("blk.{l}.{w}.weight")),
        );
        let (r, normed) = b.residual_norm(
            r,
            Some(attn),
            &format!("blk.{l}.{}.weight", config.ffn_norm()),
            &format!("l{l}.ffn"),
            ffn_copy,
        )?;
        resid = r;
        branch = Some(match &config.moe {
            Some(moe) => b.moe_feed_forward(l, normed, moe)?,
            None => b.feed_forward(l, normed)?,
        });
    }
    // One token: the head reads the final norm (and its Q8_1 copy). Several: the
    // gathered rows of it (the last, or a batch's listed rows), and the gather writes
    // the copy the norm would have.
    let head = if config.tied_embeddings {
        "token_embd.weight"
    } else {
        "output.weight"
    };
    let head_copy = b.quantized(&[head.to_string()]);
    let gather = t > 1 || n_logits > 1;
    let (_, normed) = b.residual_norm(
        resid,
        branch,
        "output_norm.weight",
        "out",
        head_copy && !gather,
    )?;
    let last = if gather {
        let last = b.rows_with_copy("last_hidden", n_logits, d, head_copy)?;
        b.g.push(Embedding {
            table: normed.x,
            ids: last_row,
            out: last.x,
            out_q8: last.q8,
            n_tokens: n_logits,
            vocab: t,
            dim: d,
        })?;
        last
    } else {
        normed
    };
    let out_w = if config.tied_embeddings {
        embd
    } else {
        b.w("output.weight", &[config.vocab, d])?
    };
    // The copy exists only for a quantized head (`head_copy`).
    b.g.push(MatMul {
        x: last.x,
        x_q8: last.q8,
        w: out_w,
        bias: None,
        out: logits,
        m: n_logits,
        n: config.vocab,
        k: d,
    })?;
    let batch_tokens = match batch {
        Some(_) => {
            let tokens =
                b.g.persistent(names::BATCH_TOKENS, DType::I32, &[n_logits])?;
            b.g.push(Argmax {
                x: logits,
                out: tokens,
                rows: n_logits,
                cols: config.vocab,
            })?;
            Some(tokens)
        }
        None => None,
    };
    Ok(ForwardGraph {
        graph: b.g,
        n_tokens,
        token_ids,
        positions,
        slots,
        last_row,
        logits,
        batch_tokens,
        sample: None,
    })
}

/// The KV caches' sizes and the tokens' slots ([`ForwardGraph::slots`]).
#[derive(Clone, Copy)]
pub(crate) struct KvSlots {
    cache: CacheSpec,
    slots: Option<BufferId>,
}

/// An F32 activation and its optional Q8_1 copy.
#[derive(Clone, Copy)]
struct Act {
    x: BufferId,
    q8: Option<BufferId>,
}

impl From<BufferId> for Act {
    /// An activation without a copy.
    fn from(x: BufferId) -> Self {
        Act { x, q8: None }
    }
}

/// The most rows of a batched graph whose block-format products read Q8_1 copies of
/// their activations, as a one-token graph's do: every bucket of a batched decode step
/// (kiln-cuda multiplies them with 8-bit integers on tensor cores), so that a
/// sequence's decode tokens are computed the same way alone and in a batch.
pub const BATCH_COPY_ROWS: usize = 64;

/// The gate and up projections of a SwiGLU: one stacked product whose rows hold the
/// gate then the up values, or two products.
enum GateUp {
    Stacked(BufferId),
    Separate { gate: BufferId, up: BufferId },
}

struct Builder<'a> {
    g: Graph,
    c: &'a ModelConfig,
    t: usize,
    /// The most rows for which activations get Q8_1 copies ([`Builder::act_with_copy`]).
    copy_rows: usize,
    weight: &'a dyn Fn(&str) -> Result<WeightDesc>,
}

impl Builder<'_> {
    /// Whether any of the weights `names` the model has is of a block format: its
    /// product reads a Q8_1 copy of its activations, which the op writing them makes.
    fn quantized(&self, names: &[String]) -> bool {
        names
            .iter()
            .any(|n| (self.weight)(n).is_ok_and(|w| w.dtype.is_quantized()))
    }

    /// Whether the model has weight `name`.
    fn has(&self, name: &str) -> bool {
        (self.weight)(name).is_ok()
    }

    /// Declares weight `name`, checking its shape.
    fn w(&mut self, name: &str, shape: &[usize]) -> Result<BufferId> {
        let desc = (self.weight)(name)?;
        if desc.shape != shape {
            return Err(kiln_core::Error::format(
                format!("tensor {name:?}"),
                format!(
                    "shape {:?}, the model's hyperparameters need {shape:?}",
                    desc.shape
                ),
            ));
        }
        self.g.persistent(name, desc.dtype, shape)
    }

    /// A transient F32 activation of `[n_tokens, width]`.
    fn act(&mut self, name: &str, width: usize) -> Result<BufferId> {
        self.g.transient(name, DType::F32, &[self.t, width])
    }

    /// A transient F32 activation of `[n_tokens, width]` and, for a decode graph (one
    /// token, or a batched graph of up to [`BATCH_COPY_ROWS`]) when `copy` is set and
    /// the width allows it, a Q8_1 copy for the mat-vecs that read it
    /// ([`kiln_core::ops::Q8_COPY`]; the prefill mat-mat does not read one).
    fn act_with_copy(&mut self, name: &str, width: usize, copy: bool) -> Result<Act> {
        self.rows_with_copy(name, self.t, width, copy)
    }

    /// As [`Builder::act_with_copy`], for an activation of `rows` rows (the copy still
    /// decided by the graph's number of tokens).
    fn rows_with_copy(&mut self, name: &str, rows: usize, width: usize, copy: bool) -> Result<Act> {
        let x = self.g.transient(name, DType::F32, &[rows, width])?;
        let q8 = if copy && self.t <= self.copy_rows && width % Q8_COPY.block_size() == 0 {
            Some(
                self.g
                    .transient(format!("{name}.q8"), Q8_COPY, &[rows, width])?,
            )
        } else {
            None
        };
        Ok(Act { x, q8 })
    }

    /// Adds `branch` (if any) to the residual stream and RMS-normalizes the sum with
    /// weight `norm`; returns the new residual stream and the normalized activation
    /// (with its Q8_1 copy as [`Builder::act_with_copy`] gives one for `copy`).
    fn residual_norm(
        &mut self,
        resid: BufferId,
        branch: Option<BufferId>,
        norm: &str,
        tag: &str,
        copy: bool,
    ) -> Result<(BufferId, Act)> {
        let d = self.c.n_embd;
        let weight = Some(self.w(norm, &[d])?);
        let normed = self.act_with_copy(&format!("{tag}.normed"), d, copy)?;
        let (out, out_q8) = (normed.x, normed.q8);
        let (rows, eps) = (self.t, self.c.rms_eps);
        match branch {
            None => {
                self.g.push(RmsNorm {
                    x: resid,
                    weight,
                    out,
                    out_q8,
                    rows,
                    dim: d,
                    eps,
                })?;
                Ok((resid, normed))
            }
            Some(branch) => {
                let sum = self.act(&format!("{tag}.resid"), d)?;
                self.g.push(AddRmsNorm {
                    x: resid,
                    residual: branch,
                    weight,
                    sum,
                    out,
                    out_q8,
                    rows,
                    dim: d,
                    eps,
                })?;
                Ok((sum, normed))
            }
        }
    }

    /// `x · Wᵀ (+ b)` with weight `blk.{l}.{name}.weight` of `[n, k]`.
    fn linear(
        &mut self,
        l: usize,
        name: &str,
        x: Act,
        n: usize,
        k: usize,
        bias: bool,
    ) -> Result<BufferId> {
        let w = self.w(&format!("blk.{l}.{name}.weight"), &[n, k])?;
        // Products of block-format weights read the activations' Q8_1 copy.
        let x_q8 =
            x.q8.filter(|_| self.g.desc(w).is_ok_and(|d| d.dtype.is_quantized()));
        let bias = if bias {
            Some(self.w(&format!("blk.{l}.{name}.bias"), &[n])?)
        } else {
            None
        };
        let out = self.act(&format!("l{l}.{name}"), n)?;
        self.g.push(MatMul {
            x: x.x,
            x_q8,
            w,
            bias,
            out,
            m: self.t,
            n,
            k,
        })?;
        Ok(out)
    }

    /// Self-attention of layer `l`: projections, RoPE (with Qwen3's q/k norm),
    /// cache append, attention over the cache, output projection. With the stacked
    /// `attn_qkv` weight, one product and one [`QkvRopeAppend`] replace three products,
    /// two rotations and two appends.
    fn attention(
        &mut self,
        l: usize,
        x: Act,
        positions: BufferId,
        freq_factors: Option<BufferId>,
        kv: KvSlots,
    ) -> Result<BufferId> {
        let c = self.c;
        let (d, t, hd) = (c.n_embd, self.t, c.head_dim);
        let (cache, slots) = (kv.cache, kv.slots);
        let [k_cache, v_cache] = self.kv_caches(l, kv)?;
        let q = if self.has(&format!("blk.{l}.attn_qkv.weight")) {
            let n = c.q_dim() + 2 * c.kv_dim();
            let qkv = self.linear(l, "attn_qkv", x, n, d, c.qkv_bias)?;
            let norm = if c.qk_norm {
                Some(QkNorm {
                    q_weight: self.w(&format!("blk.{l}.attn_q_norm.weight"), &[hd])?,
                    k_weight: self.w(&format!("blk.{l}.attn_k_norm.weight"), &[hd])?,
                    eps: c.rms_eps,
                })
            } else {
                None
            };
            let q_out = self.act(&format!("l{l}.q_rope"), c.q_dim())?;
            self.g.push(QkvRopeAppend {
                qkv,
                positions,
                slots,
                freq_factors,
                norm,
                q_out,
                k_cache,
                v_cache,
                n_tokens: t,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                capacity: cache.capacity,
                n_slots: cache.slots,
                params: c.rope,
            })?;
            q_out
        } else {
            let q = self.linear(l, "attn_q", x, c.q_dim(), d, c.qkv_bias)?;
            let k = self.linear(l, "attn_k", x, c.kv_dim(), d, c.qkv_bias)?;
            let v = self.linear(l, "attn_v", x, c.kv_dim(), d, c.qkv_bias)?;
            let q = self.rope(l, "q", q, c.n_heads, positions, freq_factors)?;
            let k = self.rope(l, "k", k, c.n_kv_heads, positions, freq_factors)?;
            self.append_kv([k, v], [k_cache, v_cache], positions, kv)?;
            q
        };
        // The output projection reads a Q8_1 copy of the attention's output when its
        // weight is of a block format and each of the copy's blocks lies in one head
        // (as the CUDA kernels need to write it).
        let copy = self.quantized(&[format!("blk.{l}.attn_output.weight")])
            && hd % Q8_COPY.block_size() == 0;
        let out = self.act_with_copy(&format!("l{l}.attn"), c.q_dim(), copy)?;
        self.attend(q, [k_cache, v_cache], positions, kv, out)?;
        self.linear(l, "attn_output", out, d, c.q_dim(), false)
    }

    /// Layer `l`'s K and V caches, `[slots, n_kv_heads, capacity, head_dim]` each.
    fn kv_caches(&mut self, l: usize, kv: KvSlots) -> Result<[BufferId; 2]> {
        let (c, cache) = (self.c, kv.cache);
        let shape = [cache.slots, c.n_kv_heads, cache.capacity, c.head_dim];
        Ok([
            self.g.persistent(names::k_cache(l), cache.dtype, &shape)?,
            self.g.persistent(names::v_cache(l), cache.dtype, &shape)?,
        ])
    }

    /// Appends each token's keys and values (`[k, v]`, `[t, kv_dim]` each) to `caches`
    /// at its position and slot.
    fn append_kv(
        &mut self,
        rows: [BufferId; 2],
        caches: [BufferId; 2],
        positions: BufferId,
        kv: KvSlots,
    ) -> Result<()> {
        let c = self.c;
        for (src, cache) in rows.into_iter().zip(caches) {
            self.g.push(KvAppend {
                src,
                positions,
                slots: kv.slots,
                cache,
                n_tokens: self.t,
                n_kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
                capacity: kv.cache.capacity,
                n_slots: kv.cache.slots,
            })?;
        }
        Ok(())
    }

    /// Causal attention of the queries `q` (`[t, q_dim]`) over `caches` at each
    /// token's position and slot, scaled by `1 / sqrt(head_dim)`, into `out` (and its
    /// Q8_1 copy where it has one).
    fn attend(
        &mut self,
        q: BufferId,
        [k_cache, v_cache]: [BufferId; 2],
        positions: BufferId,
        kv: KvSlots,
        out: Act,
    ) -> Result<()> {
        let c = self.c;
        self.g.push(Attention {
            q,
            k_cache,
            v_cache,
            positions,
            slots: kv.slots,
            out: out.x,
            out_q8: out.q8,
            n_tokens: self.t,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            capacity: kv.cache.capacity,
            n_slots: kv.cache.slots,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window: None,
            softcap: None,
        })?;
        Ok(())
    }

    /// RoPE of `n_heads` heads of `x`, preceded by the per-head norm
    /// `blk.{l}.attn_{which}_norm.weight` where the architecture has one.
    fn rope(
        &mut self,
        l: usize,
        which: &str,
        x: BufferId,
        n_heads: usize,
        positions: BufferId,
        freq_factors: Option<BufferId>,
    ) -> Result<BufferId> {
        let c = self.c;
        let out = self.act(&format!("l{l}.{which}_rope"), n_heads * c.head_dim)?;
        let (n_tokens, params) = (self.t, c.rope);
        if c.qk_norm {
            let weight = Some(self.w(&format!("blk.{l}.attn_{which}_norm.weight"), &[c.head_dim])?);
            self.g.push(HeadNormRope {
                x,
                weight,
                positions,
                freq_factors,
                out,
                n_tokens,
                n_heads,
                eps: c.rms_eps,
                params,
            })?;
        } else {
            self.g.push(Rope {
                x,
                positions,
                freq_factors,
                out,
                n_tokens,
                n_heads,
                params,
            })?;
        }
        Ok(out)
    }

    /// SwiGLU feed-forward of layer `l`: `down(silu(gate(x)) * up(x))` over the
    /// `ffn_*` weights ([`Builder::swiglu`]).
    fn feed_forward(&mut self, l: usize, x: Act) -> Result<BufferId> {
        self.swiglu(l, x, self.c.n_ff, "", "ffn_act")
    }

    /// `down(silu(gate(x)) * up(x))` of width `ff` over layer `l`'s weights
    /// `ffn_{gate,up,down}{suffix}`, its activation buffer named `l{l}.{act}`; with the
    /// stacked `ffn_gate_up{suffix}`, one product and one [`Glu`].
    fn swiglu(&mut self, l: usize, x: Act, ff: usize, suffix: &str, act: &str) -> Result<BufferId> {
        let d = self.c.n_embd;
        let copy = self.quantized(&[format!("blk.{l}.ffn_down{suffix}.weight")]);
        let act = self.act_with_copy(&format!("l{l}.{act}"), ff, copy)?;
        let products = if self.has(&format!("blk.{l}.ffn_gate_up{suffix}.weight")) {
            GateUp::Stacked(self.linear(l, &format!("ffn_gate_up{suffix}"), x, 2 * ff, d, false)?)
        } else {
            GateUp::Separate {
                gate: self.linear(l, &format!("ffn_gate{suffix}"), x, ff, d, false)?,
                up: self.linear(l, &format!("ffn_up{suffix}"), x, ff, d, false)?,
            }
        };
        self.silu_gate(products, act.x, act.q8, self.t, ff)?;
        self.linear(l, &format!("ffn_down{suffix}"), act, d, ff, false)
    }

    /// `out` (with its Q8_1 copy `out_q8` where given) = `silu(gate) * up` over `rows`
    /// rows of width `ff`: [`Glu`] over the two halves of each row of a stacked
    /// gate-up product, or [`Elementwise`] over separate gate and up products.
    fn silu_gate(
        &mut self,
        products: GateUp,
        out: BufferId,
        out_q8: Option<BufferId>,
        rows: usize,
        ff: usize,
    ) -> Result<()> {
        let kind = ElementwiseKind::SiluMul;
        match products {
            GateUp::Stacked(x) => self.g.push(Glu {
                kind,
                x,
                out,
                out_q8,
                rows,
                n: ff,
            }),
            GateUp::Separate { gate, up } => self.g.push(Elementwise {
                kind,
                a: gate,
                b: up,
                out,
                out_q8,
                len: rows * ff,
            }),
        }
    }

    /// Mixture-of-experts feed-forward of layer `l`: router logits (a product with
    /// `ffn_gate_inp`), the top-k choice, the chosen experts'
    /// `down(silu(gate(x)) * up(x))`, the shared expert's (scaled by the sigmoid of
    /// `ffn_gate_inp_shexp · x`) where the model has one, and their weighted sum.
    fn moe_feed_forward(&mut self, l: usize, x: Act, moe: &MoeConfig) -> Result<BufferId> {
        let (d, t) = (self.c.n_embd, self.t);
        let (e, k, ff) = (moe.n_expert, moe.n_expert_used, moe.n_ff_exp);
        let logits = self.linear(l, "ffn_gate_inp", x, e, d, false)?;
        let ids = self
            .g
            .transient(format!("l{l}.moe_ids"), DType::I32, &[t, k])?;
        let weights = self
            .g
            .transient(format!("l{l}.moe_weights"), DType::F32, &[t, k])?;
        self.g.push(MoeRouter {
            logits,
            ids,
            weights,
            m: t,
            n_expert: e,
            k,
            gating: Gating::Softmax,
            normalize: moe.norm_weights,
        })?;
        let act = self
            .g
            .transient(format!("l{l}.moe_act"), DType::F32, &[t, k, ff])?;
        let products = if self.has(&format!("blk.{l}.ffn_gate_up_exps.weight")) {
            GateUp::Stacked(self.experts(
                l,
                "ffn_gate_up_exps",
                x.x,
                ids,
                moe,
                [2 * ff, d],
                false,
            )?)
        } else {
            GateUp::Separate {
                gate: self.experts(l, "ffn_gate_exps", x.x, ids, moe, [ff, d], false)?,
                up: self.experts(l, "ffn_up_exps", x.x, ids, moe, [ff, d], false)?,
            }
        };
        self.silu_gate(products, act, None, t * k, ff)?;
        let y = self.experts(l, "ffn_down_exps", act, ids, moe, [d, ff], true)?;
        let (shared, shared_gate) = match moe.n_ff_shexp {
            Some(sff) => {
                // The shared expert (unscaled here).
                let shared = self.swiglu(l, x, sff, "_shexp", "shexp_act")?;
                let w = self.w(&format!("blk.{l}.ffn_gate_inp_shexp.weight"), &[d])?;
                let gate = self.act(&format!("l{l}.shexp_gate"), 1)?;
                self.g.push(MatMul {
                    x: x.x,
                    x_q8: None,
                    w,
                    bias: None,
                    out: gate,
                    m: t,
                    n: 1,
                    k: d,
                })?;
                (Some(shared), Some(gate))
            }
            None => (None, None),
        };
        let out = self.act(&format!("l{l}.moe_out"), d)?;
        self.g.push(MoeCombine {
            y,
            weights,
            residual: None,
            shared,
            shared_gate,
            out,
            m: t,
            k,
            n: d,
        })?;
        Ok(out)
    }

    /// The chosen experts' products with `blk.{l}.{name}.weight` (`[n_expert, rows,
    /// cols]`): F32 `[n_tokens, k, rows]`.
    #[allow(clippy::too_many_arguments)]
    fn experts(
        &mut self,
        l: usize,
        name: &str,
        x: BufferId,
        ids: BufferId,
        moe: &MoeConfig,
        [rows, cols]: [usize; 2],
        per_slot: bool,
    ) -> Result<BufferId> {
        let (e, k) = (moe.n_expert, moe.n_expert_used);
        let w = self.w(&format!("blk.{l}.{name}.weight"), &[e, rows, cols])?;
        let out = self
            .g
            .transient(format!("l{l}.{name}"), DType::F32, &[self.t, k, rows])?;
        self.g.push(MoeMatMul {
            x,
            ids,
            w,
            out,
            m: self.t,
            k,
            n_expert: e,
            rows,
            cols,
            per_slot,
        })?;
        Ok(out)
    }
}
