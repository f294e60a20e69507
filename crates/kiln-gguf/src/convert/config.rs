//! config.json: the hyperparameters of a llama, qwen2, qwen3, qwen2moe, qwen3moe,
//! qwen3next, qwen35 or qwen35moe checkpoint, and the architecture metadata llama.cpp's
//! convert_hf_to_gguf.py writes for them.

use super::json::Object;
use crate::keys::hparams;
use crate::{Arch, Metadata};
use kiln_core::ops::HeadLayout;
use kiln_core::{Error, Result};
use serde_json::{Map, Value as Json};

/// The architecture of `architectures[0]`, or of `model_type` (a multimodal
/// checkpoint's `text_config.model_type`) where there is no `architectures` list; an
/// error naming both and the supported classes otherwise.
fn detect_arch(config: Object<'_>) -> Result<Arch> {
    let class = match config.opt_array("architectures")? {
        Some(list) => list.first().and_then(Json::as_str),
        None => None,
    };
    let model_type = config.opt_str("model_type")?;
    let text_model_type = match config.opt_object("text_config")? {
        Some(text) => Object::new(text, config.source).opt_str("model_type")?,
        None => None,
    };
    let found = match class {
        Some(class) => Arch::from_hf_class(class),
        None => model_type
            .and_then(Arch::from_hf_model_type)
            .or_else(|| text_model_type.and_then(Arch::from_hf_model_type)),
    };
    found.ok_or_else(|| {
        let supported: Vec<&str> = Arch::ALL.iter().map(|a| a.hf_class()).collect();
        Error::Unsupported(format!(
            "{}: architecture {:?} (model_type {:?}); kiln convert supports {}",
            config.source,
            class.unwrap_or("none given"),
            model_type.unwrap_or("none given"),
            supported.join(", ")
        ))
    })
}

/// How the rotary embedding's frequencies are scaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// YaRN, written as metadata for the runtime to apply.
    Yarn {
        factor: f64,
        original_context: usize,
        ext_factor: Option<f64>,
        attn_factor: Option<f64>,
        beta_fast: Option<f64>,
        beta_slow: Option<f64>,
    },
    /// Llama 3.1's per-frequency factors, written as the `rope_freqs.weight` tensor.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: usize,
    },
}

/// config.json's object of the text model's hyperparameters: its `text_config`
/// where a checkpoint of a multimodal class nests them there
/// ([`Arch::hf_multimodal_class`]: Qwen3.5's published checkpoints), else config.json
/// itself.
pub(crate) fn text_config(map: &Map<String, Json>, arch: Arch) -> &Map<String, Json> {
    match map.get("text_config") {
        Some(Json::Object(text)) if arch.hf_multimodal_class().is_some() => text,
        _ => map,
    }
}

/// The hyperparameters of a checkpoint, from config.json (a multimodal checkpoint's
/// `text_config`: kiln converts the text model only).
#[derive(Clone, Debug)]
pub struct HfConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub hidden: usize,
    /// `intermediate_size`, the dense feed-forward's hidden width: required for a
    /// dense model, absent from some mixtures of experts (Qwen3.5-MoE), for which
    /// llama.cpp then writes no `feed_forward_length`.
    pub n_ff: Option<usize>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// The width of one attention head: `head_dim`, else `hidden / n_heads`.
    pub head_dim: usize,
    /// Whether config.json states `head_dim` (llama.cpp then writes key/value lengths).
    pub explicit_head_dim: bool,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_scaling: RopeScaling,
    /// Whether the output projection is the token embedding (no `lm_head.weight`).
    pub tied_embeddings: bool,
    /// Biases on the attention projections: q, k, v for qwen2 (always), q, k, v and o
    /// where `attention_bias` is set (llama, qwen3).
    pub attention_bias: bool,
    /// Biases on the feed-forward projections (llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// The mixture of experts of every layer (qwen2moe, qwen3moe, qwen3next,
    /// qwen35moe).
    pub moe: Option<HfMoe>,
    /// The linear-attention layers of a hybrid model (qwen3next, qwen35, qwen35moe).
    pub linear: Option<HfLinearAttention>,
    /// `partial_rotary_factor` (the hybrid models; in `rope_parameters` for
    /// transformers 5): the fraction of each head RoPE rotates.
    pub partial_rotary_factor: Option<f64>,
    /// Qwen3.5's multi-section rotary embedding: `rope_parameters.mrope_section`
    /// (temporal, height and width pairs; `[11, 11, 10]` where absent, as transformers
    /// and llama.cpp's converter take it), padded with a 0 to llama.cpp's four
    /// sections.
    pub rope_sections: Option<[i32; 4]>,
}

/// The Gated DeltaNet linear attention of a hybrid checkpoint (Qwen3-Next, Qwen3.5).
#[derive(Clone, Debug, PartialEq)]
pub struct HfLinearAttention {
    /// `linear_conv_kernel_dim`: taps of the causal convolution.
    pub conv_kernel: usize,
    /// `linear_num_key_heads`.
    pub n_k_heads: usize,
    /// `linear_num_value_heads`: a multiple of `n_k_heads`.
    pub n_v_heads: usize,
    /// `linear_key_head_dim`.
    pub d_k: usize,
    /// `linear_value_head_dim`.
    pub d_v: usize,
    /// One layer in every `full_attention_interval` is full attention (layers `i`
    /// with `(i + 1) % interval == 0`): `full_attention_interval`, or the period of
    /// `layer_types` (transformers 5), else 4.
    pub full_attention_interval: usize,
    /// How GGUF orders the value heads ([`Arch::value_head_layout`]); the checkpoint
    /// groups them by query/key head.
    pub layout: HeadLayout,
}

impl HfLinearAttention {
    fn parse(c: Object<'_>, n_layers: usize, arch: Arch) -> Result<HfLinearAttention> {
        let interval = match c.opt_usize("full_attention_interval")? {
            Some(n) => n,
            None => match c.opt_array("layer_types")? {
                Some(types) => {
                    let full = |t: &Json| t.as_str() == Some("full_attention");
                    types.iter().position(full).map_or(n_layers + 1, |i| i + 1)
                }
                None => 4,
            },
        };
        if interval == 0 {
            return Err(c.error("full_attention_interval", "0 is not an interval"));
        }
        if let Some(types) = c.opt_array("layer_types")? {
            let periodic = types.len() == n_layers
                && types.iter().enumerate().all(|(i, t)| {
                    let want = if (i + 1) % interval == 0 {
                        "full_attention"
                    } else {
                        "linear_attention"
                    };
                    t.as_str() == Some(want)
                });
            if !periodic {
                return Err(Error::Unsupported(format!(
                    "{}: layer_types is not one full-attention layer in every {interval} \
                     (the pattern llama.cpp's {} files describe)",
                    c.source,
                    arch.name()
                )));
            }
        }
        let linear = HfLinearAttention {
            conv_kernel: c.usize("linear_conv_kernel_dim")?,
            n_k_heads: c.usize("linear_num_key_heads")?,
            n_v_heads: c.usize("linear_num_value_heads")?,
            d_k: c.usize("linear_key_head_dim")?,
            d_v: c.usize("linear_value_head_dim")?,
            full_attention_interval: interval,
            layout: arch.value_head_layout(),
        };
        let sizes = [
            ("linear_conv_kernel_dim", linear.conv_kernel),
            ("linear_num_key_heads", linear.n_k_heads),
            ("linear_num_value_heads", linear.n_v_heads),
            ("linear_key_head_dim", linear.d_k),
            ("linear_value_head_dim", linear.d_v),
        ];
        for (key, value) in sizes {
            if value == 0 || u32::try_from(value).is_err() {
                return Err(c.error(key, format!("{value} is not in 1..=u32::MAX")));
            }
        }
        if linear.conv_kernel < 2 {
            return Err(c.error("linear_conv_kernel_dim", "a convolution needs >= 2 taps"));
        }
        if linear.n_v_heads % linear.n_k_heads != 0 {
            return Err(c.error(
                "linear_num_value_heads",
                format!(
                    "{} value heads are not a multiple of {} key heads",
                    linear.n_v_heads, linear.n_k_heads
                ),
            ));
        }
        // The sizes below fit: each factor is at most u32::MAX and usize is 64 bits
        // wherever kiln converts models this large.
        Ok(linear)
    }

    /// Whether layer `l` is linear attention (else full attention).
    pub fn is_linear(&self, l: usize) -> bool {
        (l + 1) % self.full_attention_interval != 0
    }

    /// Elements of the query and key heads together (`n_k_heads * d_k`).
    pub fn key_dim(&self) -> usize {
        self.n_k_heads * self.d_k
    }

    /// Elements of the value heads together (`n_v_heads * d_v`).
    pub fn value_dim(&self) -> usize {
        self.n_v_heads * self.d_v
    }

    /// Channels of the causal convolution: the fused q, k, v row.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }

    /// For each value head in GGUF's order, its index among the checkpoint's value
    /// heads (grouped by query/key head: head `g r + j` is query/key head `g`'s `j`-th
    /// of `r`). Tiled, GGUF's head `j n_k_heads + g` is the checkpoint's `g r + j`.
    pub fn value_heads(&self) -> Vec<usize> {
        let (n_k, r) = (self.n_k_heads, self.n_v_heads / self.n_k_heads);
        match self.layout {
            HeadLayout::Grouped => (0..self.n_v_heads).collect(),
            HeadLayout::Tiled => (0..r)
                .flat_map(|j| (0..n_k).map(move |g| g * r + j))
                .collect(),
        }
    }

    /// The indices of GGUF's value-head elements in the checkpoint's value elements,
    /// `len` per head ([`HfLinearAttention::value_heads`]).
    pub fn value_elements(&self, len: usize) -> Vec<usize> {
        self.value_heads()
            .into_iter()
            .flat_map(|h| h * len..(h + 1) * len)
            .collect()
    }

    fn write_metadata(&self, md: &mut Metadata, arch: Arch) {
        let key = |k: &str| arch.key(k);
        // parse() bounded every count to u32.
        md.set(key(hparams::SSM_CONV_KERNEL), self.conv_kernel as u32);
        md.set(key(hparams::SSM_STATE_SIZE), self.d_k as u32);
        md.set(key(hparams::SSM_GROUP_COUNT), self.n_k_heads as u32);
        md.set(key(hparams::SSM_TIME_STEP_RANK), self.n_v_heads as u32);
        md.set(key(hparams::SSM_INNER_SIZE), self.value_dim() as u32);
        md.set(
            key(hparams::FULL_ATTENTION_INTERVAL),
            self.full_attention_interval as u32,
        );
    }
}

/// The mixture-of-experts hyperparameters of a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct HfMoe {
    /// `num_experts` (`num_local_experts` as transformers 5 writes it).
    pub n_expert: usize,
    /// `num_experts_per_tok`: the top k.
    pub n_expert_used: usize,
    /// `moe_intermediate_size`: one expert's hidden width.
    pub n_ff_exp: usize,
    /// `shared_expert_intermediate_size` (qwen2moe): the shared expert's hidden width.
    pub n_ff_shexp: Option<usize>,
    /// `norm_topk_prob`: whether the top-k weights are renormalised; the
    /// architecture's default where absent.
    pub norm_topk_prob: bool,
}

impl HfMoe {
    fn parse(c: Object<'_>, arch: Arch) -> Result<HfMoe> {
        let n_expert = match c.opt_usize("num_experts")? {
            Some(n) => n,
            None => c.usize("num_local_experts")?,
        };
        if !c.opt_array("mlp_only_layers")?.is_none_or(Vec::is_empty)
            || c.opt_usize("decoder_sparse_step")?.is_some_and(|s| s != 1)
        {
            return Err(Error::Unsupported(format!(
                "{}: dense layers among the experts' (mlp_only_layers, decoder_sparse_step);                  kiln convert supports a mixture of experts in every layer",
                c.source
            )));
        }
        let moe = HfMoe {
            n_expert,
            n_expert_used: c.usize("num_experts_per_tok")?,
            n_ff_exp: c.usize("moe_intermediate_size")?,
            n_ff_shexp: if arch.has_shared_expert() {
                Some(c.usize("shared_expert_intermediate_size")?)
            } else {
                None
            },
            // Qwen3.5-MoE's router renormalises whatever config.json says.
            norm_topk_prob: arch == Arch::Qwen35Moe
                || c.opt_bool("norm_topk_prob")?
                    .unwrap_or(arch.default_expert_weights_norm()),
        };
        let sizes = [
            ("num_experts", moe.n_expert),
            ("num_experts_per_tok", moe.n_expert_used),
            ("moe_intermediate_size", moe.n_ff_exp),
            (
                "shared_expert_intermediate_size",
                moe.n_ff_shexp.unwrap_or(1),
            ),
        ];
        for (key, value) in sizes {
            if value == 0 || u32::try_from(value).is_err() {
                return Err(c.error(key, format!("{value} is not in 1..=u32::MAX")));
            }
        }
        if moe.n_expert_used > moe.n_expert {
            return Err(c.error(
                "num_experts_per_tok",
                format!(
                    "{} experts per token exceed the {} experts",
                    moe.n_expert_used, moe.n_expert
                ),
            ));
        }
        Ok(moe)
    }

    /// Writes the `{arch}.expert_*` keys as llama.cpp's converter does, and
    /// `expert_weights_norm` where it differs from the architecture's default.
    fn write_metadata(&self, md: &mut Metadata, arch: Arch) {
        let key = |k: &str| arch.key(k);
        // parse() bounded every count to u32.
        md.set(key(hparams::EXPERT_COUNT), self.n_expert as u32);
        md.set(key(hparams::EXPERT_USED_COUNT), self.n_expert_used as u32);
        md.set(
            key(hparams::EXPERT_FEED_FORWARD_LENGTH),
            self.n_ff_exp as u32,
        );
        if let Some(n) = self.n_ff_shexp {
            md.set(key(hparams::EXPERT_SHARED_FEED_FORWARD_LENGTH), n as u32);
        }
        if self.norm_topk_prob != arch.default_expert_weights_norm() {
            md.set(key(hparams::EXPERT_WEIGHTS_NORM), self.norm_topk_prob);
        }
    }
}

impl HfConfig {
    /// Parses config.json's object; `source` names it in errors.
    pub fn parse(map: &Map<String, Json>, source: &str) -> Result<HfConfig> {
        let top = Object::new(map, source);
        let arch = detect_arch(top)?;
        let text_map = text_config(map, arch);
        let text_source = format!("{source} text_config");
        let c = if std::ptr::eq(text_map, map) {
            top
        } else {
            Object::new(text_map, &text_source)
        };
        if let Some(act) = c.opt_str("hidden_act")? {
            if act != "silu" {
                return Err(Error::Unsupported(format!(
                    "{source}: hidden_act {act:?}; kiln convert supports the SwiGLU (silu) feed-forward"
                )));
            }
        }
        let hidden = c.usize("hidden_size")?;
        let n_heads = c.usize("num_attention_heads")?;
        let explicit_head_dim = c.opt_usize("head_dim")?;
        let n_layers = c.usize("num_hidden_layers")?;
        let config = HfConfig {
            arch,
            n_layers,
            hidden,
            n_ff: if arch.is_moe() {
                c.opt_usize("intermediate_size")?
            } else {
                Some(c.usize("intermediate_size")?)
            },
            n_heads,
            n_kv_heads: c.opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
            head_dim: explicit_head_dim.unwrap_or(hidden.checked_div(n_heads).unwrap_or(0)),
            explicit_head_dim: explicit_head_dim.is_some(),
            vocab_size: c.usize("vocab_size")?,
            context_length: c.usize("max_position_embeddings")?,
            rms_eps: c.f64("rms_norm_eps")?,
            rope_theta: rope_theta(c)?,
            rope_scaling: rope_scaling(c)?,
            tied_embeddings: match c.opt_bool("tie_word_embeddings")? {
                Some(tied) => tied,
                None => top.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            },
            attention_bias: arch.has_qkv_bias() || c.opt_bool("attention_bias")?.unwrap_or(false),
            mlp_bias: arch == Arch::Llama && c.opt_bool("mlp_bias")?.unwrap_or(false),
            moe: if arch.is_moe() {
                Some(HfMoe::parse(c, arch)?)
            } else {
                None
            },
            linear: if arch.is_hybrid() {
                Some(HfLinearAttention::parse(c, n_layers, arch)?)
            } else {
                None
            },
            partial_rotary_factor: partial_rotary_factor(c, arch)?,
            rope_sections: rope_sections(c, arch)?,
        };
        config.check(c)?;
        Ok(config)
    }

    fn check(&self, c: Object<'_>) -> Result<()> {
        let sizes = [
            ("num_hidden_layers", self.n_layers),
            ("hidden_size", self.hidden),
            ("intermediate_size", self.n_ff.unwrap_or(1)),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.context_length),
        ];
        for (key, value) in sizes {
            if value == 0 || u32::try_from(value).is_err() {
                return Err(c.error(key, format!("{value} is not in 1..=u32::MAX")));
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return Err(c.error(
                "num_key_value_heads",
                format!(
                    "{} key/value heads do not divide {} attention heads",
                    self.n_kv_heads, self.n_heads
                ),
            ));
        }
        if !self.explicit_head_dim && self.hidden % self.n_heads != 0 {
            return Err(c.error(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {} (and head_dim is not given)",
                    self.n_heads, self.hidden
                ),
            ));
        }
        if self.rotary_dim() % 2 != 0 || self.rotary_dim() > self.head_dim {
            return Err(c.error(
                "partial_rotary_factor",
                format!(
                    "{:?} of a head of {} is not an even number of rotated dimensions",
                    self.partial_rotary_factor, self.head_dim
                ),
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return Err(c.error(
                "head_dim",
                format!("head width {} must be even and > 0 for RoPE", self.head_dim),
            ));
        }
        Ok(())
    }

    /// Dimensions of each head RoPE rotates: the head's width, scaled by
    /// `partial_rotary_factor` (rounded down, as llama.cpp's converter does) where the
    /// checkpoint gives one.
    pub fn rotary_dim(&self) -> usize {
        match self.partial_rotary_factor {
            Some(f) => (self.head_dim as f64 * f) as usize,
            None => self.head_dim,
        }
    }

    /// Writes the architecture keys (`{arch}.block_count`, ...) as llama.cpp does.
    pub fn write_metadata(&self, md: &mut Metadata) {
        let key = |k: &str| self.arch.key(k);
        // check() bounded every count to u32.
        let u32_of = |v: usize| v as u32;
        md.set(key(hparams::BLOCK_COUNT), u32_of(self.n_layers));
        md.set(key(hparams::CONTEXT_LENGTH), u32_of(self.context_length));
        md.set(key(hparams::EMBEDDING_LENGTH), u32_of(self.hidden));
        if let Some(n_ff) = self.n_ff {
            md.set(key(hparams::FEED_FORWARD_LENGTH), u32_of(n_ff));
        }
        md.set(key(hparams::HEAD_COUNT), u32_of(self.n_heads));
        md.set(key(hparams::HEAD_COUNT_KV), u32_of(self.n_kv_heads));
        self.write_rope_scaling(md, &key);
        if let Some(theta) = self.rope_theta {
            md.set(key(hparams::ROPE_FREQ_BASE), theta as f32);
        }
        md.set(key(hparams::RMS_EPSILON), self.rms_eps as f32);
        if self.explicit_head_dim {
            md.set(key(hparams::KEY_LENGTH), u32_of(self.head_dim));
            md.set(key(hparams::VALUE_LENGTH), u32_of(self.head_dim));
        }
        if let Some(moe) = &self.moe {
            moe.write_metadata(md, self.arch);
        }
        if let Some(linear) = &self.linear {
            linear.write_metadata(md, self.arch);
        }
        if self.arch == Arch::Llama {
            md.set(key(hparams::VOCAB_SIZE), u32_of(self.vocab_size));
            md.set(key(hparams::ROPE_DIMENSION_COUNT), u32_of(self.head_dim));
        }
        if self.arch.is_hybrid() {
            md.set(
                key(hparams::ROPE_DIMENSION_COUNT),
                u32_of(self.rotary_dim()),
            );
        }
        if let Some(sections) = self.rope_sections {
            md.set(key(hparams::ROPE_DIMENSION_SECTIONS), sections.to_vec());
        }
    }

    fn write_rope_scaling(&self, md: &mut Metadata, key: &dyn Fn(&str) -> String) {
        match &self.rope_scaling {
            RopeScaling::None | RopeScaling::Llama3 { .. } => {}
            RopeScaling::Linear { factor } => {
                md.set(key(hparams::ROPE_SCALING_TYPE), "linear");
                md.set(key(hparams::ROPE_SCALING_FACTOR), *factor as f32);
            }
            RopeScaling::Yarn {
                factor,
                original_context,
                ext_factor,
                attn_factor,
                beta_fast,
                beta_slow,
            } => {
                md.set(key(hparams::ROPE_SCALING_TYPE), "yarn");
                md.set(key(hparams::ROPE_SCALING_FACTOR), *factor as f32);
                md.set(
                    key(hparams::ROPE_SCALING_ORIGINAL_CONTEXT_LENGTH),
                    *original_context as u32,
                );
                let optional = [
                    (hparams::ROPE_SCALING_YARN_EXT_FACTOR, ext_factor),
                    (hparams::ROPE_SCALING_YARN_ATTN_FACTOR, attn_factor),
                    (hparams::ROPE_SCALING_YARN_BETA_FAST, beta_fast),
                    (hparams::ROPE_SCALING_YARN_BETA_SLOW, beta_slow),
                ];
                for (k, v) in optional {
                    if let Some(v) = v {
                        md.set(key(k), *v as f32);
                    }
                }
            }
        }
    }
}

/// The rope parameters object: `rope_parameters` (transformers 5) or `rope_scaling`.
fn rope_object(c: Object<'_>) -> Result<Option<(Object<'_>, &'static str)>> {
    if let Some(map) = c.opt_object("rope_parameters")? {
        return Ok(Some((Object::new(map, c.source), "rope_parameters")));
    }
    Ok(c.opt_object("rope_scaling")?
        .map(|map| (Object::new(map, c.source), "rope_scaling")))
}

fn rope_theta(c: Object<'_>) -> Result<Option<f64>> {
    if let Some(theta) = c.opt_f64("rope_theta")? {
        return Ok(Some(theta));
    }
    match rope_object(c)? {
        Some((rope, _)) => rope.opt_f64("rope_theta"),
        None => Ok(None),
    }
}

/// A hybrid model's `partial_rotary_factor` (Qwen3-Next, Qwen3.5), at the top level or
/// in the rope parameters object, 0.25 where neither gives one (as transformers and
/// llama.cpp's converter take it); `None` for the other architectures, which rotate
/// whole heads.
fn partial_rotary_factor(c: Object<'_>, arch: Arch) -> Result<Option<f64>> {
    if !arch.is_hybrid() {
        return Ok(None);
    }
    let key = "partial_rotary_factor";
    let given = match c.opt_f64(key)? {
        Some(f) => Some(f),
        None => match rope_object(c)? {
            Some((rope, _)) => rope.opt_f64(key)?,
            None => None,
        },
    };
    let f = given.unwrap_or(0.25);
    if !(f > 0.0 && f <= 1.0) {
        return Err(c.error(key, format!("{f} is not in (0, 1]")));
    }
    Ok(Some(f))
}

/// Qwen3.5's `mrope_section` from the rope parameters object (`[11, 11, 10]` where
/// absent), as llama.cpp's four sections; `None` for the other architectures.
fn rope_sections(c: Object<'_>, arch: Arch) -> Result<Option<[i32; 4]>> {
    if !matches!(arch, Arch::Qwen35 | Arch::Qwen35Moe) {
        return Ok(None);
    }
    let key = "mrope_section";
    let given = match rope_object(c)? {
        Some((rope, _)) => rope.opt_array(key)?.map(|list| (rope, list)),
        None => None,
    };
    let Some((rope, list)) = given else {
        return Ok(Some([11, 11, 10, 0]));
    };
    let sections: Option<Vec<i32>> = list
        .iter()
        .map(|v| v.as_u64().and_then(|n| i32::try_from(n).ok()))
        .collect();
    match sections.as_deref() {
        Some(&[t, h, w]) => Ok(Some([t, h, w, 0])),
        _ => Err(rope.error(
            key,
            format!(
                "expected three section sizes, found {}",
                super::json::describe(&Json::Array(list.clone()))
            ),
        )),
    }
}

fn rope_scaling(c: Object<'_>) -> Result<RopeScaling> {
    let Some((rope, name)) = rope_object(c)? else {
        return Ok(RopeScaling::None);
    };
    let kind = match rope.opt_str("rope_type")? {
        Some(kind) => Some(kind),
        None => rope.opt_str("type")?,
    };
    let original_context = |default: Option<usize>| -> Result<usize> {
        let key = "original_max_position_embeddings";
        match (rope.opt_usize(key)?, c.opt_usize(key)?, default) {
            (Some(n), _, _) | (None, Some(n), _) | (None, None, Some(n)) => Ok(n),
            (None, None, None) => Err(rope.error(key, format!("missing from {name}"))),
        }
    };
    Ok(match kind.map(str::to_ascii_lowercase).as_deref() {
        None | Some("default") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: rope.f64("factor")?,
        },
        Some("yarn") => RopeScaling::Yarn {
            factor: rope.f64("factor")?,
            original_context: original_context(None)?,
            ext_factor: rope.opt_f64("extrapolation_factor")?,
            attn_factor: match rope.opt_f64("attention_factor")? {
                Some(f) => Some(f),
                None => rope.opt_f64("attn_factor")?,
            },
            beta_fast: rope.opt_f64("beta_fast")?,
            beta_slow: rope.opt_f64("beta_slow")?,
        },
        Some("llama3") => RopeScaling::Llama3 {
            factor: rope.opt_f64("factor")?.unwrap_or(8.0),
            low_freq_factor: rope.opt_f64("low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: rope.opt_f64("high_freq_factor")?.unwrap_or(4.0),
            original_context: original_context(Some(8192))?,
        },
        Some(other) => {
            return Err(Error::Unsupported(format!(
                "{}: {name} type {other:?}; kiln convert supports default, linear, yarn and llama3",
                c.source
            )))
        }
    })
}
