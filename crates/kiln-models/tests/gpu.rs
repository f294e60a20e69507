//! The small model on the CUDA backend against the CPU backend: logits within
//! tolerance and 64 identical greedy tokens for every fixture prompt; the token the
//! device's sample op chooses against the CPU reference applied to the same logits.
//! Ignored where there is no GPU; run with `--include-ignored` on a GPU machine,
//! where a missing device fails the test.

use kiln_core::ops::SampleParams;
use kiln_core::{Backend, DType};
use kiln_cpu::ops::sample::sample_row;
use kiln_cpu::CpuBackend;
use kiln_cuda::{CacheConfig, CudaBackend};
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::{Gguf, GgufFile};
use kiln_models::generate::generate;
use kiln_models::{LoadOptions, Model, Sampler, SamplerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
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

/// The CUDA backend of device 0; panics (fails the test) where there is none.
fn cuda() -> CudaBackend {
    CacheConfig::from_env()
        .and_then(|cache| CudaBackend::with_cache(0, cache))
        .unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"))
}

/// The small model converted to an F16 GGUF in `dir`.
fn tiny_f16(dir: &Path) -> GgufFile {
    let path = dir.join("tiny-f16.gguf");
    HfCheckpoint::open(model_dir())
        .unwrap()
        .write_gguf(&path, DType::F16, &mut |_, _| {})
        .unwrap();
    Gguf::open(&path).unwrap()
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
    let cuda = cuda();
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_f16(dir.path());
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

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_sample_op_chooses_the_reference_token_of_its_logits() {
    let cuda = cuda();
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_f16(dir.path());
    let mut gpu = load(cuda, &file, DType::F16);
    let mut rng = StdRng::seed_from_u64(2024);
    let settings = |temperature, top_k, top_p, min_p| SampleParams {
        temperature,
        top_k,
        top_p,
        min_p,
    };
    for params in [
        settings(0.0, 0, 1.0, 0.0),
        settings(0.8, 40, 0.9, 0.05),
        settings(1.0, 0, 1.0, 0.0),
        settings(1.5, 0, 0.95, 0.0),
        settings(0.7, 5, 1.0, 0.1),
    ] {
        for prompt in prompts() {
            gpu.reset();
            // The prefill, then decode steps fed with the device's own tokens.
            let mut tokens = prompt.clone();
            for step in 0..12 {
                let u: f32 = rng.random();
                let token = gpu.forward_sample(&tokens, params, u).unwrap();
                // The logits the sample op read, left in the model's output buffer.
                let logits = gpu.last_logits().unwrap();
                assert!(
                    logits.iter().all(|v| v.is_finite()),
                    "non-finite GPU logits"
                );
                assert_eq!(
                    token as usize,
                    sample_row(&logits, u, &params),
                    "{params:?}, prompt {prompt:?}, step {step}, u {u}"
                );
                tokens = vec![token];
            }
        }
    }
}
