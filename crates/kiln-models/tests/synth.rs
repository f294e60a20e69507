//! A synthetic model (kiln synth) runs: its tokenizer section loads and round-trips
//! text, and the forward pass gives finite, non-constant logits for each
//! architecture the presets cover.

use kiln_core::DType;
use kiln_cpu::CpuBackend;
use kiln_gguf::synth::{self, Preset, SynthOptions};
use kiln_gguf::Gguf;
use kiln_models::tokenizer::Tokenizer;
use kiln_models::{LoadOptions, Model};

/// Small configs of each family, with the vocabulary conventions of a real preset.
fn tiny(family: &str) -> Preset {
    let real = synth::preset(match family {
        "llama" => "llama-3.1-8b",
        "qwen35" | "qwen35moe" => "qwen3.5-27b",
        _ => "qwen3-8b",
    })
    .unwrap();
    let config_json = match family {
        "llama" => {
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": 800,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 64, "rope_type": "llama3"}}"#
        }
        "qwen2" => {
            r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": true, "vocab_size": 800}"#
        }
        "qwen2moe" => {
            r#"{"architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_experts": 6,
            "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 800}"#
        }
        "qwen3moe" => {
            r#"{"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "head_dim": 32,
            "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 3, "norm_topk_prob": true,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 800}"#
        }
        "qwen3next" => {
            r#"{"architectures": ["Qwen3NextForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "head_dim": 32, "partial_rotary_factor": 0.25, "full_attention_interval": 4,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_experts": 8,
            "num_experts_per_tok": 2, "norm_topk_prob": true, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000000, "vocab_size": 800}"#
        }
        // The multimodal layout of Qwen3.5's published configs; the MoE one without
        // intermediate_size, as theirs.
        "qwen35" => {
            r#"{"architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": {
            "hidden_size": 64, "intermediate_size": 96, "head_dim": 32, "full_attention_interval": 4,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
            "linear_num_key_heads": 2, "linear_num_value_heads": 6, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-06, "vocab_size": 800, "tie_word_embeddings": true,
            "rope_parameters": {"rope_theta": 10000000, "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10]}}}"#
        }
        "qwen35moe" => {
            r#"{"architectures": ["Qwen3_5MoeForConditionalGeneration"], "text_config": {
            "hidden_size": 64, "head_dim": 32, "full_attention_interval": 4,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_experts": 8,
            "num_experts_per_tok": 2, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-06,
            "vocab_size": 800, "rope_parameters": {"rope_theta": 10000000}}}"#
        }
        _ => {
            r#"{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "head_dim": 32,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 800}"#
        }
    };
    Preset {
        config_json,
        n_normal: 700,
        control_end: 780,
        named: &[],
        bos: 700,
        eos: 701,
        ..*real
    }
}

#[test]
fn synthetic_models_load_tokenize_and_run() {
    let dir = tempfile::tempdir().unwrap();
    for family in [
        "llama",
        "qwen2",
        "qwen3",
        "qwen2moe",
        "qwen3moe",
        "qwen3next",
        "qwen35",
        "qwen35moe",
    ] {
        let preset = tiny(family);
        let out = dir.path().join(format!("{family}.gguf"));
        let config = preset.config().unwrap();
        synth::write(
            &preset,
            &config,
            SynthOptions {
                dtype: DType::Q8_0,
                seed: 1,
            },
            &out,
            &mut |_, _| {},
        )
        .unwrap();
        let file = Gguf::open(&out).unwrap();
        let tokenizer = Tokenizer::from_gguf_metadata(file.metadata()).unwrap();
        let text = "Hello, world! 123 héllo";
        let ids = tokenizer.encode(text, false, false);
        assert!(
            !ids.is_empty() && ids.iter().all(|&id| id < 700),
            "{family}: {ids:?}"
        );
        assert_eq!(tokenizer.decode(&ids), text, "{family}: round trip");
        let options = LoadOptions {
            context: Some(32),
            cache_dtype: DType::F32,
            slots: 1,
        };
        let mut model = Model::load(CpuBackend, &file, options, &mut |_, _| {}).unwrap();
        let logits = model.forward(&ids).unwrap();
        assert_eq!(logits.len(), 800);
        assert!(
            logits.iter().all(|v| v.is_finite()),
            "{family}: non-finite logits"
        );
        let spread = logits.iter().cloned().fold(f32::MIN, f32::max)
            - logits.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 1e-3, "{family}: constant logits");
    }
}
