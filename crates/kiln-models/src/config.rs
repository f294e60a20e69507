//! Architectures and hyperparameters from GGUF metadata.

use kiln_core::ops::{DeltaNetHeads, RopeParams};
use kiln_core::{Error, Result};
use kiln_gguf::keys::{self, hparams};
use kiln_gguf::{Gguf, Metadata};

pub use kiln_gguf::Arch;
use std::collections::HashMap;
use std::fmt;

/// The shape and hyperparameters of a decoder-only transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Hidden width of the SwiGLU feed-forward block.
    pub n_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// The context length the model was trained for.
    pub context_length: usize,
    pub rms_eps: f32,
    pub rope: RopeParams,
    /// Whether a `rope_freqs.weight` tensor of per-pair frequency factors is present
    /// (Llama 3.1's rope scaling).
    pub rope_freq_factors: bool,
    /// Whether the output projection reuses the token embedding (no `output.weight`).
    pub tied_embeddings: bool,
    /// Whether q, k and v projections have biases (Qwen2).
    pub qkv_bias: bool,
    /// Whether q and k are RMS-normalized per head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// The mixture of experts that replaces every layer's feed-forward (qwen2moe,
    /// qwen3moe, qwen3next, qwen35moe).
    pub moe: Option<MoeConfig>,
    /// The Gated DeltaNet linear attention of a hybrid model's other layers
    /// (qwen3next, qwen35, qwen35moe); its full-attention layers gate their output.
    pub linear: Option<LinearAttentionConfig>,
}

/// The linear-attention layers of a hybrid model (Qwen3-Next, Qwen3.5): one layer in
/// every `full_attention_interval` is full attention (layers `l` with
/// `(l + 1) % full_attention_interval == 0`), the others Gated DeltaNet: the fused
/// q/k/v projection `blk.N.attn_qkv.weight` (`[qkv_width, n_embd]`), its causal
/// convolution `blk.N.ssm_conv1d.weight` (`[qkv_width, conv_kernel]`), the output gate
/// `blk.N.attn_gate.weight` (`[n_v_heads d_v, n_embd]`), the gate and strength
/// projections (Qwen3-Next: `blk.N.ssm_ba.weight`, `[2 n_v_heads, n_embd]`, per
/// query/key head its value heads' `b` rows then their `a` rows; Qwen3.5:
/// `blk.N.ssm_beta.weight` and `blk.N.ssm_alpha.weight`, `[n_v_heads, n_embd]` each),
/// `blk.N.ssm_a` and `blk.N.ssm_dt.bias` (`[n_v_heads]`), the gated norm
/// `blk.N.ssm_norm.weight` (`[d_v]`) and the output projection `blk.N.ssm_out.weight`
/// (`[n_embd, n_v_heads d_v]`). Every per-value-head row, element and column is in the
/// order of [`DeltaNetHeads::layout`] (Qwen3.5's tiled). Each such layer carries a
/// convolution state and a delta-rule state per sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearAttentionConfig {
    pub conv_kernel: usize,
    pub heads: DeltaNetHeads,
    pub full_attention_interval: usize,
    /// Whether the gate and strength projections are one `ssm_ba` tensor
    /// ([`Arch::fuses_beta_alpha`]).
    pub fused_beta_alpha: bool,
}

impl LinearAttentionConfig {
    /// Reads `arch`'s `ssm.*` keys and `full_attention_interval` (4 when absent) as
    /// llama.cpp does; value heads are `ssm.inner_size / ssm.time_step_rank` wide and
    /// ordered as [`Arch::value_head_layout`] says.
    fn from_metadata(md: &Metadata, arch: Arch) -> Result<LinearAttentionConfig> {
        let key = |k: &str| arch.key(k);
        let get = |k: &str| -> Result<usize> {
            let v = md.get_u64(&key(k))?;
            usize::try_from(v)
                .map_err(|_| Error::format(key(k), format!("{v} does not fit in usize")))
        };
        let n_v_heads = get(hparams::SSM_TIME_STEP_RANK)?;
        let inner = get(hparams::SSM_INNER_SIZE)?;
        if n_v_heads == 0 || inner % n_v_heads != 0 {
            return Err(Error::format(
                key(hparams::SSM_INNER_SIZE),
                format!("{inner} is not a multiple of ssm.time_step_rank {n_v_heads}"),
            ));
        }
        let interval = if md.contains_key(&key(hparams::FULL_ATTENTION_INTERVAL)) {
            get(hparams::FULL_ATTENTION_INTERVAL)?
        } else {
            4
        };
        Ok(LinearAttentionConfig {
            conv_kernel: get(hparams::SSM_CONV_KERNEL)?,
            heads: DeltaNetHeads {
                n_k_heads: get(hparams::SSM_GROUP_COUNT)?,
                n_v_heads,
                d_k: get(hparams::SSM_STATE_SIZE)?,
                d_v: inner / n_v_heads,
                layout: arch.value_head_layout(),
            },
            full_attention_interval: interval,
            fused_beta_alpha: arch.fuses_beta_alpha(),
        })
    }

    /// Whether layer `l` is linear attention (else full attention).
    pub fn is_linear(&self, l: usize) -> bool {
        (l + 1) % self.full_attention_interval != 0
    }

    /// Elements of a linear-attention layer's convolution state,
    /// `[qkv_width, conv_kernel - 1]`.
    pub fn conv_state_elements(&self) -> usize {
        self.heads.qkv_width() * (self.conv_kernel - 1)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let h = &self.heads;
        if self.full_attention_interval == 0 || self.conv_kernel < 2 {
            return Err(format!(
                "full_attention_interval {} must be > 0 and ssm.conv_kernel {} >= 2",
                self.full_attention_interval, self.conv_kernel
            ));
        }
        if [h.n_k_heads, h.n_v_heads, h.d_k, h.d_v].contains(&0) || h.n_v_heads % h.n_k_heads != 0 {
            return Err(format!(
                "ssm.group_count {} must divide ssm.time_step_rank {}, heads of {} and {} > 0",
                h.n_k_heads, h.n_v_heads, h.d_k, h.d_v
            ));
        }
        let sizes = h
            .n_k_heads
            .checked_mul(h.d_k)
            .and_then(|k| k.checked_mul(2))
            .zip(h.n_v_heads.checked_mul(h.d_v))
            .and_then(|(k, v)| k.checked_add(v)?.checked_mul(self.conv_kernel))
            .zip(
                h.n_v_heads
                    .checked_mul(h.d_k)
                    .and_then(|s| s.checked_mul(h.d_v)),
            );
        if sizes.is_none() {
            return Err("the linear attention's sizes overflow".into());
        }
        Ok(())
    }
}

/// The shape of a mixture-of-experts feed-forward: a softmax router over `n_expert`
/// experts (`blk.N.ffn_gate_inp.weight`, `[n_expert, n_embd]`), the top
/// `n_expert_used` of them per token, each a SwiGLU of hidden width `n_ff_exp`
/// (stacked in `blk.N.ffn_{gate,up,down}_exps.weight`), and an optional shared
/// expert of width `n_ff_shexp` scaled by the sigmoid of its one-row gate
/// (`blk.N.ffn_{gate,up,down}_shexp.weight`, `blk.N.ffn_gate_inp_shexp.weight`).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_ff_exp: usize,
    pub n_ff_shexp: Option<usize>,
    /// Whether the chosen experts' weights are renormalised to sum 1.
    pub norm_weights: bool,
}

impl MoeConfig {
    /// Reads `arch`'s expert keys as llama.cpp does: `expert_feed_forward_length`
    /// defaults to `n_ff / expert_used_count`, `expert_shared_feed_forward_length`
    /// (where the file has a shared expert, `has_shared`) to `n_ff`.
    fn from_metadata(
        md: &Metadata,
        arch: Arch,
        n_ff: usize,
        has_shared: bool,
    ) -> Result<MoeConfig> {
        let key = |k: &str| arch.key(k);
        let get = |k: &str| -> Result<Option<usize>> {
            if !md.contains_key(&key(k)) {
                return Ok(None);
            }
            let v = md.get_u64(&key(k))?;
            usize::try_from(v)
                .map(Some)
                .map_err(|_| Error::format(key(k), format!("{v} does not fit in usize")))
        };
        let required = |k: &str| get(k)?.ok_or_else(|| Error::format(key(k), "missing"));
        let n_expert_used = required(hparams::EXPERT_USED_COUNT)?;
        Ok(MoeConfig {
            n_expert: required(hparams::EXPERT_COUNT)?,
            n_expert_used,
            n_ff_exp: match get(hparams::EXPERT_FEED_FORWARD_LENGTH)? {
                Some(n) => n,
                None => n_ff.checked_div(n_expert_used).unwrap_or(0),
            },
            n_ff_shexp: if has_shared {
                Some(get(hparams::EXPERT_SHARED_FEED_FORWARD_LENGTH)?.unwrap_or(n_ff))
            } else {
                None
            },
            norm_weights: match md.get(&key(hparams::EXPERT_WEIGHTS_NORM)) {
                Some(_) => md.get_bool(&key(hparams::EXPERT_WEIGHTS_NORM))?,
                None => arch.default_expert_weights_norm(),
            },
        })
    }

    /// Checks the counts: at least one expert chosen, no more than there are,
    /// non-zero widths, and sizes computed from them that fit in `usize`.
    fn check(&self, n_embd: usize) -> std::result::Result<(), String> {
        let (e, k) = (self.n_expert, self.n_expert_used);
        if e == 0 || k == 0 || k > e || i32::try_from(e).is_err() {
            return Err(format!(
                "expert_used_count {k} must be in 1..=expert_count {e} (and expert_count fit i32)"
            ));
        }
        if self.n_ff_exp == 0 || self.n_ff_shexp == Some(0) {
            return Err("the experts' feed-forward widths must be > 0".into());
        }
        let width = self.n_ff_exp.max(self.n_ff_shexp.unwrap_or(0)).max(n_embd);
        if e.checked_mul(width)
            .and_then(|v| v.checked_mul(n_embd))
            .is_none()
        {
            return Err(format!("{e} experts of {width} x {n_embd}: sizes overflow"));
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Reads the configuration from a GGUF file's metadata and tensor names, and
    /// checks it: the hyperparameters' relations ([`ModelConfig::check`]) and the
    /// shape of every tensor the model reads ([`ModelConfig::check_tensors`]), so
    /// that a malformed file is an error naming the key or tensor before anything
    /// is sized from it.
    pub fn from_gguf<B: AsRef<[u8]>>(file: &Gguf<B>) -> Result<ModelConfig> {
        let md = file.metadata();
        let arch = Arch::from_name(md.get_str(keys::ARCHITECTURE)?)?;
        let has = |name: &str| file.tensor(name).is_ok();
        let key = |k: &str| arch.key(k);
        let get = |k: &str| -> Result<usize> {
            let v = md.get_u64(&key(k))?;
            usize::try_from(v)
                .map_err(|_| Error::format(key(k), format!("{v} does not fit in usize")))
        };
        let get_or = |k: &str, default: usize| -> Result<usize> {
            if md.contains_key(&key(k)) {
                get(k)
            } else {
                Ok(default)
            }
        };
        let n_embd = get(hparams::EMBEDDING_LENGTH)?;
        let n_heads = get(hparams::HEAD_COUNT)?;
        if n_heads == 0 || n_embd % n_heads != 0 && !md.contains_key(&key(hparams::KEY_LENGTH)) {
            return Err(Error::format(
                key(hparams::HEAD_COUNT),
                format!("{n_heads} heads do not divide embedding_length {n_embd}"),
            ));
        }
        let head_dim = get_or(hparams::KEY_LENGTH, n_embd / n_heads)?;
        let vocab = vocab_rows(file, n_embd)?;
        // A mixture of experts' file may lack feed_forward_length (Qwen3.5-MoE's): the
        // experts' width stands in for it.
        let n_ff = if arch.is_moe() && !md.contains_key(&key(hparams::FEED_FORWARD_LENGTH)) {
            get(hparams::EXPERT_FEED_FORWARD_LENGTH)?
        } else {
            get(hparams::FEED_FORWARD_LENGTH)?
        };
        // Multi-token-prediction layers stored after the model's (llama.cpp's Qwen3.5
        // files may carry them) count in block_count; kiln runs the model's own.
        let block_count = get(hparams::BLOCK_COUNT)?;
        let nextn = get_or(hparams::NEXTN_PREDICT_LAYERS, 0)?;
        if nextn > 0 && nextn >= block_count {
            return Err(Error::format(
                key(hparams::NEXTN_PREDICT_LAYERS),
                format!("{nextn} of block_count {block_count} leave the model no layer"),
            ));
        }
        let n_layers = block_count - nextn;
        let moe = if arch.is_moe() {
            let shared = has("blk.0.ffn_gate_inp_shexp.weight");
            Some(MoeConfig::from_metadata(md, arch, n_ff, shared)?)
        } else {
            None
        };
        let linear = if arch.is_hybrid() {
            Some(LinearAttentionConfig::from_metadata(md, arch)?)
        } else {
            None
        };
        // A hybrid model's layer 0 is linear attention: its first full-attention
        // layer tells whether q and k are normalised per head.
        let first_attention = linear
            .as_ref()
            .map_or(0, |lin| lin.full_attention_interval - 1);
        let config = ModelConfig {
            arch,
            n_layers,
            n_embd,
            n_ff,
            n_heads,
            n_kv_heads: get_or(hparams::HEAD_COUNT_KV, n_heads)?,
            head_dim,
            vocab,
            context_length: get(hparams::CONTEXT_LENGTH)?,
            rms_eps: md.get_f32(&key(hparams::RMS_EPSILON))?,
            rope: RopeParams {
                head_dim,
                rotary_dim: get_or(hparams::ROPE_DIMENSION_COUNT, head_dim)?,
                base: f32_or(md, &key(hparams::ROPE_FREQ_BASE), 10_000.0)?,
                freq_scale: linear_rope_scale(md, arch)?,
                style: arch.rope_style(),
            },
            rope_freq_factors: has("rope_freqs.weight"),
            tied_embeddings: !has("output.weight"),
            qkv_bias: has("blk.0.attn_q.bias"),
            qk_norm: has(&format!("blk.{first_attention}.attn_q_norm.weight")),
            moe,
            linear,
        };
        config.check()?;
        let shapes: HashMap<&str, &[usize]> = file
            .tensor_infos()
            .iter()
            .map(|t| (t.name(), t.shape()))
            .collect();
        config.check_tensors(|name| shapes.get(name).copied())?;
        Ok(config)
    }

    /// The GGUF tensors a model of this configuration reads, each with the row-major
    /// shape its hyperparameters give it, in the order llama.cpp writes them, one
    /// layer at a time. `has(name)` tells whether the file holds a tensor: a layer's
    /// fused `attn_qkv` or `ffn_gate_up` weight, where a file holds one, replaces the
    /// separate projections it fuses.
    pub fn tensor_shapes<'a>(
        &'a self,
        has: impl Fn(&str) -> bool + 'a,
    ) -> impl Iterator<Item = (String, Vec<usize>)> + 'a {
        let (d, vocab) = (self.n_embd, self.vocab);
        let mut head = vec![("token_embd.weight".to_string(), vec![vocab, d])];
        if self.rope_freq_factors {
            head.push(("rope_freqs.weight".into(), vec![self.rope.rotary_dim / 2]));
        }
        let mut tail = vec![("output_norm.weight".to_string(), vec![d])];
        if !self.tied_embeddings {
            tail.push(("output.weight".into(), vec![vocab, d]));
        }
        let layers = (0..self.n_layers).flat_map(move |l| self.layer_shapes(l, &has));
        head.into_iter().chain(layers).chain(tail)
    }

    /// The tensors of layer `l`, as [`ModelConfig::tensor_shapes`] lists them.
    fn layer_shapes(&self, l: usize, has: &dyn Fn(&str) -> bool) -> Vec<(String, Vec<usize>)> {
        let (d, hd) = (self.n_embd, self.head_dim);
        // Saturating: a configuration that [`ModelConfig::check`] would reject gets
        // shapes no tensor has, not an overflow.
        let q = self.n_heads.saturating_mul(hd);
        let kv = self.n_kv_heads.saturating_mul(hd);
        let name = |n: &str| format!("blk.{l}.{n}");
        let mut out = Vec::new();
        let mut add = |n: &str, shape: Vec<usize>| out.push((name(n), shape));
        add("attn_norm.weight", vec![d]);
        if let Some(lin) = &self.linear {
            let h = &lin.heads;
            if lin.is_linear(l) {
                let (width, value) = (h.qkv_width(), h.n_v_heads.saturating_mul(h.d_v));
                add("attn_qkv.weight", vec![width, d]);
                add("attn_gate.weight", vec![value, d]);
                if lin.fused_beta_alpha {
                    add("ssm_ba.weight", vec![h.n_v_heads.saturating_mul(2), d]);
                } else {
                    add("ssm_beta.weight", vec![h.n_v_heads, d]);
                    add("ssm_alpha.weight", vec![h.n_v_heads, d]);
                }
                add("ssm_conv1d.weight", vec![width, lin.conv_kernel]);
                add("ssm_dt.bias", vec![h.n_v_heads]);
                add("ssm_a", vec![h.n_v_heads]);
                add("ssm_norm.weight", vec![h.d_v]);
                add("ssm_out.weight", vec![d, value]);
            } else {
                // Each head's query, then its output gate.
                add("attn_q.weight", vec![q.saturating_mul(2), d]);
                add("attn_k.weight", vec![kv, d]);
                add("attn_v.weight", vec![kv, d]);
                add("attn_output.weight", vec![d, q]);
                add("attn_q_norm.weight", vec![hd]);
                add("attn_k_norm.weight", vec![hd]);
            }
            add("post_attention_norm.weight", vec![d]);
            self.add_feed_forward(&mut add, has, l);
            return out;
        }
        let projections: Vec<(&str, usize)> = if has(&name("attn_qkv.weight")) {
            vec![("attn_qkv", q.saturating_add(kv.saturating_mul(2)))]
        } else {
            vec![("attn_q", q), ("attn_k", kv), ("attn_v", kv)]
        };
        for &(p, rows) in &projections {
            add(&format!("{p}.weight"), vec![rows, d]);
        }
        if self.qkv_bias {
            for &(p, rows) in &projections {
                add(&format!("{p}.bias"), vec![rows]);
            }
        }
        if self.qk_norm {
            add("attn_q_norm.weight", vec![hd]);
            add("attn_k_norm.weight", vec![hd]);
        }
        add("attn_output.weight", vec![d, q]);
        add("ffn_norm.weight", vec![d]);
        self.add_feed_forward(&mut add, has, l);
        out
    }

    /// The feed-forward tensors of layer `l`, added by `add(name, shape)`: the
    /// mixture of experts', or the SwiGLU's; each gate and up pair stacked where `has`
    /// says the model holds the stack ([`add_gate_up`]).
    fn add_feed_forward(
        &self,
        add: &mut dyn FnMut(&str, Vec<usize>),
        has: &dyn Fn(&str) -> bool,
        l: usize,
    ) {
        let (d, ff) = (self.n_embd, self.n_ff);
        let Some(moe) = &self.moe else {
            add_gate_up(add, has, l, "", &[], ff, d);
            add("ffn_down.weight", vec![d, ff]);
            return;
        };
        let (e, ff) = (moe.n_expert, moe.n_ff_exp);
        add("ffn_gate_inp.weight", vec![e, d]);
        add_gate_up(add, has, l, "_exps", &[e], ff, d);
        add("ffn_down_exps.weight", vec![e, d, ff]);
        if let Some(ff) = moe.n_ff_shexp {
            add("ffn_gate_inp_shexp.weight", vec![d]);
            add_gate_up(add, has, l, "_shexp", &[], ff, d);
            add("ffn_down_shexp.weight", vec![d, ff]);
        }
    }

    /// Whether layer `l` is full attention with a KV cache (every layer but a hybrid
    /// model's linear-attention layers).
    pub fn has_kv_cache(&self, l: usize) -> bool {
        self.linear.as_ref().is_none_or(|lin| !lin.is_linear(l))
    }

    /// The norm before layer `l`'s feed-forward: `ffn_norm`, or a hybrid model's
    /// `post_attention_norm`.
    pub fn ffn_norm(&self) -> &'static str {
        if self.linear.is_some() {
            "post_attention_norm"
        } else {
            "ffn_norm"
        }
    }

    /// Checks every tensor the model reads ([`ModelConfig::tensor_shapes`]) against
    /// `shape_of(name)`, the row-major shape of the file's tensor `name`: a missing
    /// or misshapen tensor is an error naming it and the shape the hyperparameters
    /// need. Stops at the first, so that a huge `block_count` costs nothing.
    pub fn check_tensors<'a>(&self, shape_of: impl Fn(&str) -> Option<&'a [usize]>) -> Result<()> {
        for (name, want) in self.tensor_shapes(|n| shape_of(n).is_some()) {
            match shape_of(&name) {
                None => {
                    return Err(Error::format(
                        format!("tensor {name:?}"),
                        format!("missing; the model's hyperparameters need it, of shape {want:?}"),
                    ))
                }
                Some(got) if got != want.as_slice() => {
                    return Err(Error::format(
                        format!("tensor {name:?}"),
                        format!("shape {got:?}, the model's hyperparameters need {want:?}"),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Checks the hyperparameters' relations (heads divide evenly, rotary dims fit,
    /// every size the model computes from them fits in `usize`).
    pub fn check(&self) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::format(
                format!("{} hyperparameters", self.arch.name()),
                msg,
            ))
        };
        if self.n_layers == 0 || self.n_embd == 0 || self.n_ff == 0 || self.vocab == 0 {
            return bad(format!(
                "block_count {}, embedding_length {}, feed_forward_length {} and vocabulary {} must all be > 0",
                self.n_layers, self.n_embd, self.n_ff, self.vocab
            ));
        }
        if self.head_dim == 0 {
            return bad("the head dimension (attention.key_length) must be > 0".into());
        }
        let sizes = self
            .n_heads
            .checked_mul(self.head_dim)
            .zip(self.n_kv_heads.checked_mul(self.head_dim))
            .and_then(|(q, kv)| kv.checked_mul(2)?.checked_add(q))
            .zip(self.n_ff.checked_mul(2))
            .zip(self.vocab.checked_mul(self.n_embd));
        if sizes.is_none() {
            return bad(format!(
                "head_count {} (head_count_kv {}) of {} dimensions, feed_forward_length {} or \
                 vocabulary {} x embedding_length {}: sizes overflow",
                self.n_heads, self.n_kv_heads, self.head_dim, self.n_ff, self.vocab, self.n_embd
            ));
        }
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "head_count {} is not a multiple of head_count_kv {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.rope.rotary_dim > self.head_dim || self.rope.rotary_dim % 2 != 0 {
            return bad(format!(
                "rope.dimension_count {} must be even and at most the head dimension {}",
                self.rope.rotary_dim, self.head_dim
            ));
        }
        if let Some(moe) = &self.moe {
            moe.check(self.n_embd).or_else(bad)?;
        }
        if let Some(lin) = &self.linear {
            lin.check().or_else(bad)?;
        }
        Ok(())
    }

    /// Elements of the query projection's output per token.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Elements of the key (or value) projection's output per token.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// The rows of `token_embd.weight`, the vocabulary size: the tensor must be
/// `[vocab, n_embd]`, with at least one row.
fn vocab_rows<B: AsRef<[u8]>>(file: &Gguf<B>, n_embd: usize) -> Result<usize> {
    let name = "token_embd.weight";
    match *file.tensor(name)?.info.shape() {
        [vocab, width] if width == n_embd && vocab > 0 => Ok(vocab),
        ref shape => Err(Error::format(
            format!("tensor {name:?}"),
            format!(
                "shape {shape:?}, the model's hyperparameters need [vocab, {n_embd}]: one row \
                 of embedding_length {n_embd} per token, at least one token"
            ),
        )),
    }
}

/// One sentence: "llama, 6 layers of width 384, 6 attention heads of 64 (2 key-value
/// heads), feed-forward 1024, vocabulary 4096, trained on 512 positions, RoPE base
/// 10000".
impl fmt::Display for ModelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, {} layers of width {}, {} attention heads of {} ({} key-value heads), feed-forward {}, vocabulary {}, trained on {} positions, RoPE base {}",
            self.arch.name(),
            self.n_layers,
            self.n_embd,
            self.n_heads,
            self.head_dim,
            self.n_kv_heads,
            self.n_ff,
            self.vocab,
            self.context_length,
            self.rope.base,
        )?;
        if self.rope.freq_scale != 1.0 {
            write!(f, " scaled by {}", 1.0 / self.rope.freq_scale)?;
        }
        if self.rope_freq_factors {
            f.write_str(" with frequency factors")?;
        }
        if let Some(moe) = &self.moe {
            write!(
                f,
                ", {} of {} experts of feed-forward {} per token",
                moe.n_expert_used, moe.n_expert, moe.n_ff_exp
            )?;
            if let Some(ff) = moe.n_ff_shexp {
                write!(f, " and a shared expert of {ff}")?;
            }
        }
        if let Some(lin) = &self.linear {
            let h = &lin.heads;
            write!(
                f,
                ", Gated DeltaNet linear attention in {} of every {} layers ({} key heads of {}, {} value heads of {}, convolution of {})",
                lin.full_attention_interval - 1, lin.full_attention_interval, h.n_k_heads, h.d_k, h.n_v_heads, h.d_v, lin.conv_kernel
            )?;
        }
        let extras = [
            (self.tied_embeddings, "tied embeddings"),
            (self.qkv_bias, "q-k-v biases"),
            (self.qk_norm, "q and k normalised per head"),
        ];
        for (on, what) in extras {
            if on {
                write!(f, ", {what}")?;
            }
        }
        Ok(())
    }
}

fn f32_or(md: &Metadata, key: &str, default: f32) -> Result<f32> {
    if md.contains_key(key) {
        md.get_f32(key)
    } else {
        Ok(default)
    }
}

/// `1 / factor` for linear rope scaling (`{arch}.rope.scaling.type = "linear"`),
/// else 1. Other scaling types that change the angles are rejected, except Llama 3's,
/// which arrives as the `rope_freqs.weight` tensor.
fn linear_rope_scale(md: &Metadata, arch: Arch) -> Result<f32> {
    let type_key = arch.key(hparams::ROPE_SCALING_TYPE);
    let factor_key = arch.key(hparams::ROPE_SCALING_FACTOR);
    match md.get(&type_key).map(|_| md.get_str(&type_key)).transpose()? {
        None | Some("none") => Ok(1.0),
        Some("linear") => {
            let f = md.get_f32(&factor_key)?;
            if f > 0.0 && f.is_finite() {
                Ok(1.0 / f)
            } else {
                Err(Error::format(&factor_key, format!("scaling factor {f} must be > 0")))
            }
        }
        Some(other) => Err(Error::Unsupported(format!(
            "rope scaling type {other:?} ({type_key}); kiln supports none and linear, and Llama 3's frequency factors"
        ))),
    }
}

/// Adds, through `add(name, shape)`, the gate and up weights of layer `l`'s
/// feed-forward `suffix` (`""`, `"_exps"` or `"_shexp"`): `ffn_gate{suffix}` and
/// `ffn_up{suffix}` of shape `lead + [ff, d]`, or, where `has` says the model holds
/// it, their stack `ffn_gate_up{suffix}` (`lead + [2 ff, d]`,
/// `crate::model::weight_stacks`).
fn add_gate_up(
    add: &mut dyn FnMut(&str, Vec<usize>),
    has: &dyn Fn(&str) -> bool,
    l: usize,
    suffix: &str,
    lead: &[usize],
    ff: usize,
    d: usize,
) {
    let shape = |rows: usize| [lead, &[rows, d]].concat();
    if has(&format!("blk.{l}.ffn_gate_up{suffix}.weight")) {
        add(
            &format!("ffn_gate_up{suffix}.weight"),
            shape(ff.saturating_mul(2)),
        );
    } else {
        add(&format!("ffn_gate{suffix}.weight"), shape(ff));
        add(&format!("ffn_up{suffix}.weight"), shape(ff));
    }
}
