//! The CUDA backend's fusions reach the decode graphs kiln builds: for small synthetic
//! models of each family, with weights as a CUDA model stacks them and products large
//! enough for the resident mat-vec, every layer offers the runs the fusions were
//! written for, and the planner binds each run's operands apart (so that compiling
//! would fuse it). No GPU needed: what compiling fuses is decided from the graph.

use std::collections::BTreeMap;

use kiln_core::{plan, Aliasing, Bindings, DType, Scratch};
use kiln_cpu::CpuBackend;
use kiln_cuda::fusion::{find, Fusions, Run};
use kiln_gguf::synth::{self, Preset, SynthOptions};
use kiln_gguf::Gguf;
use kiln_models::forward::CacheSpec;
use kiln_models::model::{graph_for, weight_descs};
use kiln_models::ModelConfig;

/// A preset of `family` with two (dense, MoE) or four (hybrid) layers whose products
/// have 1024 rows and more.
fn preset(family: &str) -> Preset {
    let real = synth::preset(match family {
        "llama" => "llama-3.1-8b",
        "qwen35" => "qwen3.5-27b",
        _ => "qwen3-8b",
    })
    .unwrap();
    let config_json = match family {
        "llama" => {
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 1024, "intermediate_size": 2048,
            "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": 800}"#
        }
        "qwen3moe" => {
            r#"{"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 1024, "intermediate_size": 2048, "head_dim": 128,
            "moe_intermediate_size": 512, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": true,
            "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 800}"#
        }
        _ => {
            r#"{"architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": {
            "hidden_size": 1024, "intermediate_size": 2048, "head_dim": 128, "full_attention_interval": 4,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_num_key_heads": 4, "linear_num_value_heads": 8, "num_hidden_layers": 4,
            "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-06, "vocab_size": 800, "tie_word_embeddings": true,
            "rope_parameters": {"rope_theta": 10000000, "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10]}}}"#
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

/// The fused runs of `family`'s one-token decode graph with every fusion on, counted
/// by kind, after asserting that the planner binds each apart.
fn fused_runs(family: &str, dir: &std::path::Path) -> BTreeMap<String, usize> {
    let preset = preset(family);
    let out = dir.join(format!("{family}.gguf"));
    let config = preset.config().unwrap();
    let options = SynthOptions {
        dtype: DType::Q4_0,
        seed: 1,
    };
    synth::write(&preset, &config, options, &out, &mut |_, _| {}).unwrap();
    let file = Gguf::open(&out).unwrap();
    let config = ModelConfig::from_gguf(&file).unwrap();
    let weights = weight_descs(&file).unwrap();
    let cache = CacheSpec {
        capacity: 64,
        dtype: DType::F16,
        slots: 1,
    };
    let graph = graph_for(&config, &weights, 1, cache).unwrap().graph;
    let mut runs = Vec::new();
    let mut index = 0;
    while index < graph.ops().len() {
        match find(&graph, index, Fusions::all()) {
            Some(run) => {
                index += run.ops();
                runs.push(run);
            }
            None => index += 1,
        }
    }
    let memory = plan(&graph, Aliasing::On);
    let mut scratch = Scratch::new();
    scratch.ensure(&CpuBackend, &memory).unwrap();
    // Persistent buffers never share memory: binding only the transient ones is enough.
    let bindings = Bindings::new(&graph, &memory, &mut scratch).unwrap();
    let mut kinds = BTreeMap::new();
    for run in &runs {
        let name = match run {
            Run::Router(..) => "router".to_string(),
            Run::Routed(_, kiln_cuda::ops::moe_epilogue::Epilogue::Glu(_)) => "routed glu".into(),
            Run::Routed(..) => "routed combine".into(),
            Run::Resident(fusion) => fusion.name().into(),
            Run::Siblings(s) => format!("{} siblings", s.products.len()),
        };
        assert!(
            run.operands_apart(&bindings),
            "{family}: {name} shares memory"
        );
        *kinds.entry(name).or_insert(0) += 1;
    }
    kinds
}

#[test]
fn every_decode_layer_offers_the_fused_runs() {
    let dir = tempfile::tempdir().unwrap();
    let count = |pairs: &[(&str, usize)]| -> BTreeMap<String, usize> {
        pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect()
    };
    // Two layers: the first's rotation without a norm before it (the first norm has no
    // residual), the second's with; both gated units. (The head, 800 rows, is too small
    // for the resident kernel, so the output norm is not fused into it.)
    assert_eq!(
        fused_runs("llama", dir.path()),
        count(&[
            ("add_rms_norm+matmul+glu", 2),
            ("add_rms_norm+matmul+qkv_rope_append", 1),
            ("matmul+qkv_rope_append", 1),
        ])
    );
    // Each layer's router, routed gate-up with its gated units, routed down with its
    // combine.
    assert_eq!(
        fused_runs("qwen3moe", dir.path()),
        count(&[
            ("add_rms_norm+matmul+qkv_rope_append", 1),
            ("matmul+qkv_rope_append", 1),
            ("router", 2),
            ("routed combine", 2),
            ("routed glu", 2),
        ])
    );
    // Each layer's four projections of its normed row, and its gated unit.
    assert_eq!(
        fused_runs("qwen35", dir.path()),
        count(&[("4 siblings", 4), ("add_rms_norm+matmul+glu", 4),])
    );
}
