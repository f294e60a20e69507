//! Tiny random-weight Qwen3-MoE and Qwen2-MoE checkpoints, converted to GGUF by kiln
//! and run on the CPU backend, against the logits and greedy tokens that
//! transformers' Qwen3MoeForCausalLM and Qwen2MoeForCausalLM computed in float32
//! (tests/fixtures/{qwen3moe,qwen2moe}-tiny, made by scripts/make_moe_fixtures.py);
//! on the CUDA backend (ignored without a GPU) against the same logits and the CPU's
//! greedy tokens.

use kiln_core::DType;
use kiln_cpu::CpuBackend;
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::{Arch, Gguf};
use kiln_models::{LoadOptions, Model};
mod common;
mod device;
use device::cuda;

use serde_json::Value;
use std::path::{Path, PathBuf};

fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Fixture {
    input_ids: Vec<u32>,
    last_logits: Vec<f64>,
    greedy: Vec<u32>,
    greedy_min_margin: f64,
    router_min_margin: f64,
}

fn fixtures(name: &str) -> Vec<Fixture> {
    let text = std::fs::read_to_string(model_dir(name).join("fixtures.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let ids = |x: &Value| -> Vec<u32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Fixture {
            input_ids: ids(&p["input_ids"]),
            last_logits: p["last_logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect(),
            greedy: ids(&p["greedy_ids"]),
            greedy_min_margin: p["greedy_min_margin"].as_f64().unwrap(),
            router_min_margin: p["router_min_margin"].as_f64().unwrap(),
        })
        .collect()
}

/// Converts checkpoint `name` to a GGUF of `dtype` in `dir` and loads it on the CPU.
fn converted(name: &str, dtype: DType, dir: &Path) -> Model<CpuBackend> {
    converted_on(CpuBackend, name, dtype, dir)
}

/// Converts checkpoint `name` to a GGUF of `dtype` in `dir` and loads it on `backend`
/// with an F32 cache of 64 positions.
fn converted_on<BE: kiln_core::Backend>(
    backend: BE,
    name: &str,
    dtype: DType,
    dir: &Path,
) -> Model<BE> {
    let out = dir.join(format!("{name}-{dtype}.gguf"));
    HfCheckpoint::open(model_dir(name))
        .unwrap()
        .write_gguf(&out, dtype, &mut |_, _| {})
        .unwrap();
    let file = Gguf::open(&out).unwrap();
    let options = LoadOptions {
        context: Some(64),
        cache_dtype: DType::F32,
        slots: 1,
    };
    Model::load(backend, &file, options, &mut |_, _| {}).unwrap()
}

fn nmse(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "non-finite logits");
    let e: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - w).powi(2))
        .sum();
    e / want.iter().map(|w| w * w).sum::<f64>()
}

/// The f32 conversion keeps the checkpoint's weights exactly: logits agree to f32
/// summation order (NMSE < 1e-10), and the greedy continuation is the same.
fn matches_transformers(name: &str, arch: Arch) {
    let dir = tempfile::tempdir().unwrap();
    let mut model = converted(name, DType::F32, dir.path());
    assert_eq!(model.config().arch, arch);
    assert!(model.config().moe.is_some());
    for f in fixtures(name) {
        // Margins far above f32 rounding (~1e-6 here), so that no expert choice or
        // greedy token may honestly differ.
        assert!(f.router_min_margin > 1e-3 && f.greedy_min_margin > 5e-4);
        model.reset();
        let logits = model.forward(&f.input_ids).unwrap();
        let e = nmse(&logits, &f.last_logits);
        eprintln!("{name} {:?}: logits NMSE {e:.2e}", f.input_ids);
        assert!(e < 1e-10, "{name} {:?}: logits NMSE {e:.2e}", f.input_ids);
        let out = common::greedy_tokens(&mut model, &f.input_ids, f.greedy.len());
        assert_eq!(out, f.greedy, "{name} {:?}: greedy tokens", f.input_ids);
    }
}

#[test]
fn qwen3moe_matches_transformers_logits_and_greedy_tokens() {
    matches_transformers("qwen3moe-tiny", Arch::Qwen3Moe);
}

#[test]
fn qwen2moe_matches_transformers_logits_and_greedy_tokens() {
    matches_transformers("qwen2moe-tiny", Arch::Qwen2Moe);
}

/// With Q8_0 experts (and every other matrix), the logits stay close to the float32
/// reference: the routed products read block-format weights.
#[test]
fn q8_0_moe_logits_stay_close() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["qwen3moe-tiny", "qwen2moe-tiny"] {
        let mut model = converted(name, DType::Q8_0, dir.path());
        let f = &fixtures(name)[0];
        let e = nmse(&model.forward(&f.input_ids).unwrap(), &f.last_logits);
        eprintln!("{name} q8_0: logits NMSE {e:.2e}");
        assert!(e < 1e-3, "{name} q8_0: logits NMSE {e:.2e}");
    }
}

/// On the GPU, checkpoint `name` in F32: with prompts in chunks of 8 tokens every
/// product is an f32 mat-vec, so the logits agree with transformers' to f32 summation
/// order and the 32 greedy tokens after each prompt equal the CPU's; in one chunk the
/// dense products take bf16 operands (the mat-mat), which the logits show within
/// bf16 rounding.
fn gpu_matches_transformers_and_cpu(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut cpu = converted(name, DType::F32, dir.path());
    let mut gpu = converted_on(cuda(), name, DType::F32, dir.path());
    for f in fixtures(name) {
        for (chunk, tolerance) in [(8, 1e-9), (512, 1e-4)] {
            gpu.set_prefill_chunk(chunk).unwrap();
            gpu.reset();
            let e = nmse(&gpu.forward(&f.input_ids).unwrap(), &f.last_logits);
            eprintln!(
                "{name} {:?} chunk {chunk}: GPU logits NMSE {e:.2e}",
                f.input_ids
            );
            assert!(
                e < tolerance,
                "{name} {:?} chunk {chunk}: NMSE {e:.2e}",
                f.input_ids
            );
        }
        gpu.set_prefill_chunk(8).unwrap();
        gpu.reset();
        cpu.reset();
        let want = common::greedy_tokens(&mut cpu, &f.input_ids, 32);
        let got = common::greedy_tokens(&mut gpu, &f.input_ids, 32);
        assert_eq!(
            got, want,
            "{name} {:?}: greedy tokens GPU vs CPU",
            f.input_ids
        );
        assert_eq!(
            &want[..f.greedy.len()],
            f.greedy,
            "{name}: the CPU's tokens"
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn qwen3moe_on_the_gpu_matches_transformers_and_the_cpu() {
    gpu_matches_transformers_and_cpu("qwen3moe-tiny");
}

#[test]
#[ignore = "needs a CUDA device"]
fn qwen2moe_on_the_gpu_matches_transformers_and_the_cpu() {
    gpu_matches_transformers_and_cpu("qwen2moe-tiny");
}

/// A copy of checkpoint `name` in a temporary directory with config.json's `key` set
/// to `value` (removed where `value` is null); the error opening it gives.
fn convert_error(name: &str, key: &str, value: Value) -> kiln_core::Error {
    let dir = tempfile::tempdir().unwrap();
    for file in ["model.safetensors", "tokenizer.json", "config.json"] {
        std::fs::copy(model_dir(name).join(file), dir.path().join(file)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let map = config.as_object_mut().unwrap();
    if value.is_null() {
        map.remove(key);
    } else {
        map.insert(key.into(), value);
    }
    std::fs::write(&path, config.to_string()).unwrap();
    match HfCheckpoint::open(dir.path()) {
        Ok(_) => panic!("{name} with {key} changed converts"),
        Err(e) => e,
    }
}

#[test]
fn bad_mixture_of_experts_configs_are_conversion_errors() {
    let e = convert_error("qwen3moe-tiny", "num_experts_per_tok", 9.into());
    assert!(
        e.to_string()
            .contains("9 experts per token exceed the 8 experts"),
        "{e}"
    );
    let e = convert_error("qwen2moe-tiny", "mlp_only_layers", serde_json::json!([1]));
    assert!(matches!(e, kiln_core::Error::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("mlp_only_layers"), "{e}");
    let e = convert_error("qwen2moe-tiny", "decoder_sparse_step", 2.into());
    assert!(matches!(e, kiln_core::Error::Unsupported(_)), "{e}");
    let e = convert_error("qwen3moe-tiny", "moe_intermediate_size", 17.into());
    let msg = e.to_string();
    assert!(
        msg.contains("model.layers.0.mlp.experts.0.gate_proj.weight") && msg.contains("[17, 64]"),
        "{msg}"
    );
    let e = convert_error(
        "qwen2moe-tiny",
        "shared_expert_intermediate_size",
        Value::Null,
    );
    assert!(
        e.to_string().contains("shared_expert_intermediate_size"),
        "{e}"
    );
    let e = convert_error("qwen2moe-tiny", "num_experts", 0.into());
    assert!(e.to_string().contains("num_experts"), "{e}");
}

/// The converted qwen3moe-tiny file, its metadata changed by `edit` and its tensors
/// (with other values) filtered by `keep`; the error loading it gives.
fn load_error(edit: impl FnOnce(&mut kiln_gguf::Metadata), keep: impl Fn(&str) -> bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("moe.gguf");
    HfCheckpoint::open(model_dir("qwen3moe-tiny"))
        .unwrap()
        .write_gguf(&out, DType::F32, &mut |_, _| {})
        .unwrap();
    let file = Gguf::open(&out).unwrap();
    let mut md = file.metadata().clone();
    edit(&mut md);
    let tensors: Vec<(String, Vec<usize>)> = file
        .tensor_infos()
        .iter()
        .filter(|t| keep(t.name()))
        .map(|t| (t.name().to_string(), t.shape().to_vec()))
        .collect();
    let bytes = common::gguf_bytes(&md, &tensors, |_| DType::F32);
    let file = Gguf::from_shared(kiln_gguf::SharedBytes::new(bytes), "bad.gguf").unwrap();
    let options = LoadOptions {
        context: Some(16),
        cache_dtype: DType::F32,
        slots: 1,
    };
    match Model::load(CpuBackend, &file, options, &mut |_, _| {}) {
        Ok(_) => panic!("the edited model loads"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_mixture_of_experts_files_are_load_errors_naming_the_key_or_tensor() {
    let set = |key: &'static str, value: kiln_gguf::Value| {
        move |md: &mut kiln_gguf::Metadata| md.set(format!("qwen3moe.{key}"), value)
    };
    let all = |_: &str| true;
    let msg = load_error(set("expert_used_count", 9u32.into()), all);
    assert!(
        msg.contains("expert_used_count 9 must be in 1..=expert_count 8"),
        "{msg}"
    );
    let msg = load_error(set("expert_count", 0u32.into()), all);
    assert!(msg.contains("expert_count 0"), "{msg}");
    let msg = load_error(set("expert_feed_forward_length", 17u32.into()), all);
    assert!(
        msg.contains("blk.0.ffn_gate_exps.weight") && msg.contains("[8, 17, 64]"),
        "{msg}"
    );
    let msg = load_error(set("expert_weights_norm", "yes".into()), all);
    assert!(msg.contains("qwen3moe.expert_weights_norm"), "{msg}");
    let msg = load_error(|_| {}, |name| name != "blk.1.ffn_up_exps.weight");
    assert!(
        msg.contains("blk.1.ffn_up_exps.weight") && msg.contains("missing"),
        "{msg}"
    );
}
