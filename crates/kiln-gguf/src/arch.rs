//! The model architectures kiln converts and runs, by their names in GGUF and in
//! Hugging Face checkpoints.

use kiln_core::ops::RopeStyle;
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
}

impl Arch {
    /// Every supported architecture.
    pub const ALL: [Arch; 6] = [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Qwen2Moe,
        Arch::Qwen3Moe,
        Arch::Qwen3Next,
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
        }
    }

    /// The Hugging Face `model_type` (config.json): the GGUF name, except for the
    /// mixtures of experts (`qwen2_moe`, `qwen3_moe`) and Qwen3-Next (`qwen3_next`).
    pub fn hf_model_type(self) -> &'static str {
        match self {
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Qwen3Next => "qwen3_next",
            other => other.name(),
        }
    }

    /// Whether every layer's feed-forward is a mixture of experts.
    pub fn is_moe(self) -> bool {
        matches!(self, Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Qwen3Next)
    }

    /// Whether the mixture of experts has a shared expert scaled by a sigmoid gate.
    pub fn has_shared_expert(self) -> bool {
        matches!(self, Arch::Qwen2Moe | Arch::Qwen3Next)
    }

    /// Whether some layers are Gated DeltaNet linear attention with a recurrent
    /// state (a hybrid model: Qwen3-Next).
    pub fn is_hybrid(self) -> bool {
        self == Arch::Qwen3Next
    }

    /// Whether the architecture's attention has biases on q, k and v (the Qwen2
    /// family's).
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Arch::Qwen2 | Arch::Qwen2Moe)
    }

    /// Whether q and k are RMS-normalised per head before RoPE (the Qwen3 family).
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Qwen3Next)
    }

    /// Whether a mixture of experts renormalises its top-k weights to sum 1 when the
    /// file does not say ([`crate::keys::hparams::EXPERT_WEIGHTS_NORM`]): as llama.cpp
    /// runs them, Qwen3-MoE and Qwen3-Next do and Qwen2-MoE does not.
    pub fn default_expert_weights_norm(self) -> bool {
        matches!(self, Arch::Qwen3Moe | Arch::Qwen3Next)
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

    /// The architecture whose Hugging Face class name is `class`, if any.
    pub fn from_hf_class(class: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.hf_class() == class)
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
            Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Qwen3Next => {
                RopeStyle::NeoX
            }
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
            ]
        );
        assert_eq!(
            Arch::Qwen2.key(crate::keys::hparams::BLOCK_COUNT),
            "qwen2.block_count"
        );
    }

    #[test]
    fn unknown_architecture_is_an_error_naming_it() {
        let msg = Arch::from_name("gptneox").unwrap_err().to_string();
        assert!(
            msg.contains("\"gptneox\"")
                && msg.contains("llama, qwen2, qwen3, qwen2moe, qwen3moe, qwen3next"),
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
