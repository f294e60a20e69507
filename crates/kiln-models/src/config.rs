//! Architectures and hyperparameters from GGUF metadata.

use kiln_core::ops::{RopeParams, RopeStyle};
use kiln_core::{Error, Result};
use kiln_gguf::{keys, Gguf, Metadata};
use std::fmt;

/// The architectures kiln runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2, 3, 3.1, 3.2 and Mistral (GGUF `llama`): GGML-layout (normal) RoPE.
    Llama,
    /// Qwen2 and Qwen2.5 (`qwen2`): biases on q, k, v; NeoX RoPE.
    Qwen2,
    /// Qwen3 (`qwen3`): per-head RMSNorm of q and k before NeoX RoPE.
    Qwen3,
}

impl Arch {
    /// The GGUF `general.architecture` names kiln supports.
    pub const SUPPORTED: [&'static str; 3] = ["llama", "qwen2", "qwen3"];

    /// The architecture `name` (a `general.architecture` value) denotes.
    pub fn from_name(name: &str) -> Result<Arch> {
        match name {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "qwen3" => Ok(Arch::Qwen3),
            other => Err(Error::Unsupported(format!(
                "architecture {other:?}; kiln supports {}",
                Arch::SUPPORTED.join(", ")
            ))),
        }
    }

    /// The GGUF name, prefix of the architecture's metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    /// How this architecture's GGUF q/k weights pair rotary dimensions.
    pub fn rope_style(self) -> RopeStyle {
        match self {
            Arch::Llama => RopeStyle::Normal,
            Arch::Qwen2 | Arch::Qwen3 => RopeStyle::NeoX,
        }
    }
}

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
}

impl ModelConfig {
    /// Reads the configuration from a GGUF file's metadata and tensor names.
    pub fn from_gguf<B: AsRef<[u8]>>(file: &Gguf<B>) -> Result<ModelConfig> {
        let md = file.metadata();
        let arch = Arch::from_name(md.get_str(keys::ARCHITECTURE)?)?;
        let has = |name: &str| file.tensor(name).is_ok();
        let key = |k: &str| format!("{}.{k}", arch.name());
        let get = |k: &str| -> Result<usize> { Ok(md.get_u64(&key(k))? as usize) };
        let get_or = |k: &str, default: usize| -> Result<usize> {
            if md.contains_key(&key(k)) {
                get(k)
            } else {
                Ok(default)
            }
        };
        let n_embd = get("embedding_length")?;
        let n_heads = get("attention.head_count")?;
        if n_heads == 0 || n_embd % n_heads != 0 && !md.contains_key(&key("attention.key_length")) {
            return Err(Error::format(
                key("attention.head_count"),
                format!("{n_heads} heads do not divide embedding_length {n_embd}"),
            ));
        }
        let head_dim = get_or("attention.key_length", n_embd / n_heads)?;
        let vocab = file.tensor("token_embd.weight")?.info.shape()[0];
        let config = ModelConfig {
            arch,
            n_layers: get("block_count")?,
            n_embd,
            n_ff: get("feed_forward_length")?,
            n_heads,
            n_kv_heads: get_or("attention.head_count_kv", n_heads)?,
            head_dim,
            vocab,
            context_length: get("context_length")?,
            rms_eps: md.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
            rope: RopeParams {
                head_dim,
                rotary_dim: get_or("rope.dimension_count", head_dim)?,
                base: f32_or(md, &key("rope.freq_base"), 10_000.0)?,
                freq_scale: linear_rope_scale(md, arch)?,
                style: arch.rope_style(),
            },
            rope_freq_factors: has("rope_freqs.weight"),
            tied_embeddings: !has("output.weight"),
            qkv_bias: has("blk.0.attn_q.bias"),
            qk_norm: has("blk.0.attn_q_norm.weight"),
        };
        config.check()?;
        Ok(config)
    }

    /// Checks the hyperparameters' relations (heads divide evenly, rotary dims fit).
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
    let type_key = format!("{}.rope.scaling.type", arch.name());
    let factor_key = format!("{}.rope.scaling.factor", arch.name());
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
