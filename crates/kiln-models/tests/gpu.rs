//! The small model on the CUDA backend against the CPU backend: logits within
//! tolerance and 64 identical greedy tokens for every fixture prompt. Ignored where
//! there is no GPU; run with `--include-ignored` on a GPU machine, where a missing
//! device fails the test.

use kiln_core::{Backend, DType};
use kiln_cpu::CpuBackend;
use kiln_cuda::{CacheConfig, CudaBackend};
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::{Gguf, GgufFile};
use kiln_models::generate::generate;
use kiln_models::{LoadOptions, Model, Sampler, SamplerConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shakespeare-tiny")
}

fn prompts() -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(model_dir().join("fixtures.json")).expect("fixtures.json");
    let v: Value = serde_json::from_str(&text).expect("fixtures parse");
    v["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| {
            p["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn load<BE: Backend>(backend: BE, file: &GgufFile, cache_dtype: DType) -> Model<BE> {
    let options = LoadOptions {
        context: Some(256),
        cache_dtype,
    };
    Model::load(backend, file, options, &mut |_, _| {}).expect("model loads")
}

fn greedy<BE: Backend>(model: &mut Model<BE>, prompt: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    generate(model, prompt, 64, &mut sampler, &|_| false, &mut |t| {
        out.push(t);
        Ok(())
    })
    .expect("generation runs");
    out
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_logits_and_greedy_tokens_match_the_cpu() {
    let cuda = CacheConfig::from_env()
        .and_then(|cache| CudaBackend::with_cache(0, cache))
        .unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-f16.gguf");
    HfCheckpoint::open(model_dir())
        .unwrap()
        .write_gguf(&path, DType::F16, &mut |_, _| {})
        .unwrap();
    let file = Gguf::open(&path).unwrap();
    let mut cpu = load(CpuBackend, &file, DType::F16);
    let mut gpu = load(cuda, &file, DType::F16);
    for prompt in prompts() {
        cpu.reset();
        gpu.reset();
        let (want, got) = (cpu.forward(&prompt).unwrap(), gpu.forward(&prompt).unwrap());
        assert!(got.iter().all(|v| v.is_finite()), "non-finite GPU logits");
        let err: f64 = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
            .sum();
        let norm: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
        // Both use an f16 cache; kernels sum in other orders (and may round
        // activations for tensor cores): 1e-5 leaves room for that, not for a bug.
        assert!(
            err / norm < 1e-5,
            "prompt {prompt:?}: NMSE {:.2e}",
            err / norm
        );
        assert_eq!(
            greedy(&mut gpu, &prompt),
            greedy(&mut cpu, &prompt),
            "prompt {prompt:?}: greedy tokens"
        );
    }
}
