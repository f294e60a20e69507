//! The model architectures kiln converts and runs, by their names in GGUF and in
//! Hugging Face checkpoints.

use kiln_core::ops::{HeadLayout, RopeStyle};
use kiln_core::{Error, Result};

/// An architecture kiln supports: a GGUF `general.architecture` value, which
/// prefixes the architecture's hyperparameter keys ([`Arch::key`]), and the Hugging
/// Face class and `model_type` of its checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// Llama 2, 3, 3.1, 3.2 and Mistral: GGUF `llama`, `LlamaForCausalLM`.
    /// GGML-layout (normal) RoPE, so the converter permutes the checkpoint's q/k
    /// projections from rotate-half to interleaved order.
    Llama,
    /// Qwen2 and Qwen2.5: GGUF `qwen2`, `Qwen2ForCausalLM`. Biases on q, k, v;
    /// NeoX RoPE.
    Qwen2,
    /// Qwen3: GGUF `qwen3`, `Qwen3ForCausalLM`. Per-head RMSNorm of q and k before
    /// NeoX RoPE.
    Qwen3,
    /// Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): GGUF `qwen2moe`,
    /// `Qwen2MoeForCausalLM`. Qwen2's attention; every layer's feed-forward is a
    /// mixture of experts (softmax router, top-k weights not renormalised by
    /// default) plus a shared expert scaled by a sigmoid gate.
    Qwen2Moe,
    /// Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): GGUF `qwen3moe`,
    /// `Qwen3MoeForCausalLM`. Qwen3's attention; every layer's feed-forward is a
    /// mixture of experts (softmax router, top-k weights renormalised to sum 1).
    Qwen3Moe,
    /// Qwen3-Next (Qwen3-Next-80B-A3B): GGUF `qwen3next`, `Qwen3NextForCausalLM`. A
    /// hybrid: in every `full_attention_interval` layers one is gated full attention
    /// (a query projection that also yields a sigmoid gate of the output, q/k norm,
    /// partial NeoX RoPE), the others Gated DeltaNet linear attention with a
    /// recurrent state; every feed-forward is a mixture of experts (top-k weights
    /// renormalised) with a sigmoid-gated shared expert. Its RMSNorm weights are
    /// zero-centred in the checkpoint (the model multiplies by `1 + w`); GGUF stores
    /// `1 + w`.
    Qwen3Next,
    /// Qwen3.5, dense (Qwen3.5-27B and the smaller sizes): GGUF `qwen35`,
    /// `Qwen3_5ForCausalLM` (the text model of `Qwen3_5ForConditionalGeneration`).
    /// Qwen3-Next's hybrid layers and zero-centred norms with a SwiGLU feed-forward in
    /// every layer. Its linear-attention layers keep the checkpoint's separate
    /// projections (`attn_qkv`, `attn_gate`, `ssm_beta`, `ssm_alpha`), and GGUF stores
    /// their value heads tiled across the query/key heads
    /// ([`kiln_core::ops::HeadLayout::Tiled`]). Its rotary embedding is multi-section
    /// (`rope.dimension_sections`); for text every section has the token's position,
    /// so it is partial NeoX RoPE.
    Qwen35,
    /// Qwen3.5-MoE (Qwen3.5-35B-A3B, Qwen3.5-397B-A17B): GGUF `qwen35moe`,
    /// `Qwen3_5MoeForCausalLM`. [`Arch::Qwen35`] with Qwen3-Next's mixture of experts
    /// (top-k weights always renormalised, a sigmoid-gated shared expert) in every
    /// layer.
    Qwen35Moe,
}

impl Arch {
    /// Every supported architecture.
    pub const ALL: [Arch; 8] = [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Qwen2Moe,
        Arch::Qwen3Moe,
        Arch::Qwen3Next,
        Arch::Qwen35,
        Arch::Qwen35Moe,
    ];

    /// The GGUF name: the value of [`crate::keys::ARCHITECTURE`] and the prefix of
    /// the architecture's keys.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen2Moe => "qwen2moe",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Qwen3Next => "qwen3next",
            Arch::Qwen35 => "qwen35",
            Arch::Qwen35Moe => "qwen35moe",
        }
    }

    /// The Hugging Face class name (config.json's `architectures[0]`).
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Qwen2Moe => "Qwen2MoeForCausalLM",
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
            Arch::Qwen3Next => "Qwen3NextForCausalLM",
            Arch::Qwen35 => "Qwen3_5ForCausalLM",
            Arch::Qwen35Moe => "Qwen3_5MoeForCausalLM",
        }
    }

    /// The Hugging Face class of the multimodal checkpoints whose text model is this
    /// architecture (`Qwen3_5ForConditionalGeneration`, whose config.json nests the
    /// text model's hyperparameters in `text_config`), if any.
    pub fn hf_multimodal_class(self) -> Option<&'static str> {
        match self {
            Arch::Qwen35 => Some("Qwen3_5ForConditionalGeneration"),
            Arch::Qwen35Moe => Some("Qwen3_5MoeForConditionalGeneration"),
            _ => None,
        }
    }

    /// The Hugging Face `model_type` (config.json): the GGUF name, except for the
    /// mixtures of experts (`qwen2_moe`, `qwen3_moe`), Qwen3-Next (`qwen3_next`) and
    /// Qwen3.5 (`qwen3_5_text`, `qwen3_5_moe_text`: the text model's type, which a
    /// multimodal checkpoint gives in `text_config`).
    pub fn hf_model_type(self) -> &'static str {
        match self {
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Qwen3Next => "qwen3_next",
            Arch::Qwen35 => "qwen3_5_text",
            Arch::Qwen35Moe => "qwen3_5_moe_text",
            other => other.name(),
        }
    }

    /// Whether every layer's feed-forward is a mixture of experts.
    pub fn is_moe(self) -> bool {
        matches!(
            self,
            Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Qwen3Next | Arch::Qwen35Moe
        )
    }

    /// Whether the mixture of experts has a shared expert scaled by a sigmoid gate.
    pub fn has_shared_expert(self) -> bool {
        matches!(self, Arch::Qwen2Moe | Arch::Qwen3Next | Arch::Qwen35Moe)
    }

    /// Whether some layers are Gated DeltaNet linear attention with a recurrent
    /// state (a hybrid model: Qwen3-Next, Qwen3.5), the others gated full attention,
    /// and every RMSNorm weight but the linear attention's gated norm is zero-centred
    /// in the checkpoint (GGUF stores `1 + w`).
    pub fn is_hybrid(self) -> bool {
        matches!(self, Arch::Qwen3Next | Arch::Qwen35 | Arch::Qwen35Moe)
    }

    /// Whether the linear-attention layers' gate and strength projections are one
    /// tensor, `blk.N.ssm_ba.weight` (Qwen3-Next, per query/key head its value heads'
    /// `b` rows then their `a` rows), rather than `blk.N.ssm_beta.weight` and
    /// `blk.N.ssm_alpha.weight` (Qwen3.5).
    pub fn fuses_beta_alpha(self) -> bool {
        self == Arch::Qwen3Next
    }

    /// How the linear-attention layers' value heads are ordered in GGUF: tiled across
    /// the query/key heads for Qwen3.5 (llama.cpp's converter reorders them so),
    /// grouped by query/key head, as the checkpoint has them, for Qwen3-Next.
    pub fn value_head_layout(self) -> HeadLayout {
        match self {
            Arch::Qwen35 | Arch::Qwen35Moe => HeadLayout::Tiled,
            _ => HeadLayout::Grouped,
        }
    }

    /// Whether the architecture's attention has biases on q, k and v (the Qwen2
    /// family's).
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Arch::Qwen2 | Arch::Qwen2Moe)
    }

    /// Whether q and k are RMS-normalised per head before RoPE (the Qwen3 family).
    pub fn has_qk_norm(self) -> bool {
        matches!(
            self,
            Arch::Qwen3 | Arch::Qwen3Moe | Arch::Qwen3Next | Arch::Qwen35 | Arch::Qwen35Moe
        )
    }

    /// Whether a mixture of experts renormalises its top-k weights to sum 1 when the
    /// file does not say ([`crate::keys::hparams::EXPERT_WEIGHTS_NORM`]): as llama.cpp
    /// runs them, Qwen3-MoE, Qwen3-Next and Qwen3.5-MoE do and Qwen2-MoE does not.
    pub fn default_expert_weights_norm(self) -> bool {
        matches!(self, Arch::Qwen3Moe | Arch::Qwen3Next | Arch::Qwen35Moe)
    }

    /// The architecture whose GGUF name is `name`; an [`Error::Unsupported`] naming
    /// `name` and the supported names otherwise.
    pub fn from_name(name: &str) -> Result<Arch> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| {
                let supported: Vec<&str> = Arch::ALL.iter().map(|a| a.name()).collect();
                Error::Unsupported(format!(
                    "architecture {name:?}; kiln supports {}",
                    supported.join(", ")
                ))
            })
    }

    /// The architecture whose Hugging Face class name is `class` (its
    /// [`Arch::hf_class`] or [`Arch::hf_multimodal_class`]), if any.
    pub fn from_hf_class(class: &str) -> Option<Arch> {
        Arch::ALL
            .into_iter()
            .find(|a| a.hf_class() == class || a.hf_multimodal_class() == Some(class))
    }

    /// The architecture whose Hugging Face `model_type` is `model_type`, if any.
    pub fn from_hf_model_type(model_type: &str) -> Option<Arch> {
        Arch::ALL
            .into_iter()
            .find(|a| a.hf_model_type() == model_type)
    }

    /// The GGUF key of this architecture's hyperparameter `suffix` (one of
    /// [`crate::keys::hparams`]): `{name}.{suffix}`, e.g. `llama.block_count`.
    pub fn key(self, suffix: &str) -> String {
        format!("{}.{suffix}", self.name())
    }

    /// How this architecture's GGUF q/k weights pair rotary dimensions.
    pub fn rope_style(self) -> RopeStyle {
        match self {
            Arch::Llama => RopeStyle::Normal,
            Arch::Qwen2
            | Arch::Qwen3
            | Arch::Qwen2Moe
            | Arch::Qwen3Moe
            | Arch::Qwen3Next
            | Arch::Qwen35
            | Arch::Qwen35Moe => RopeStyle::NeoX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for arch in Arch::ALL {
            assert_eq!(Arch::from_name(arch.name()).unwrap(), arch);
            assert_eq!(Arch::from_hf_class(arch.hf_class()), Some(arch));
            assert_eq!(Arch::from_hf_model_type(arch.hf_model_type()), Some(arch));
        }
        let pairs: Vec<(&str, &str)> = Arch::ALL.iter().map(|a| (a.name(), a.hf_class())).collect();
        assert_eq!(
            pairs,
            [
                ("llama", "LlamaForCausalLM"),
                ("qwen2", "Qwen2ForCausalLM"),
                ("qwen3", "Qwen3ForCausalLM"),
                ("qwen2moe", "Qwen2MoeForCausalLM"),
                ("qwen3moe", "Qwen3MoeForCausalLM"),
                ("qwen3next", "Qwen3NextForCausalLM"),
                ("qwen35", "Qwen3_5ForCausalLM"),
                ("qwen35moe", "Qwen3_5MoeForCausalLM"),
            ]
        );
        assert_eq!(
            Arch::Qwen2.key(crate::keys::hparams::BLOCK_COUNT),
            "qwen2.block_count"
        );
    }

    #[test]
    fn multimodal_classes_name_their_text_models_architecture() {
        assert_eq!(
            Arch::from_hf_class("Qwen3_5ForConditionalGeneration"),
            Some(Arch::Qwen35)
        );
        assert_eq!(
            Arch::from_hf_class("Qwen3_5MoeForConditionalGeneration"),
            Some(Arch::Qwen35Moe)
        );
        assert_eq!(Arch::Qwen3Next.hf_multimodal_class(), None);
        assert_eq!(Arch::Qwen35.value_head_layout(), HeadLayout::Tiled);
        assert_eq!(Arch::Qwen3Next.value_head_layout(), HeadLayout::Grouped);
    }

    #[test]
    fn unknown_architecture_is_an_error_naming_it() {
        let msg = Arch::from_name("gptneox").unwrap_err().to_string();
        assert!(
            msg.contains("\"gptneox\"")
                && msg.contains(
                    "llama, qwen2, qwen3, qwen2moe, qwen3moe, qwen3next, qwen35, qwen35moe"
                ),
            "{msg}"
        );
        assert!(matches!(
            Arch::from_name("Llama"),
            Err(Error::Unsupported(_))
        ));
        assert_eq!(Arch::from_hf_class("GPTNeoXForCausalLM"), None);
        assert_eq!(Arch::from_hf_model_type("gpt_neox"), None);
    }
}
