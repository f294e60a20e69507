//! Chunked prefill on the CPU with the project's small model: a prompt run in chunks
//! of `Model::prefill_chunk` tokens gives the last logits and the following greedy
//! tokens of the same prompt run in one graph, at one chunk, one chunk + 1 and several
//! chunks; its scratch memory is that of one chunk whatever the prompt's length.

mod common;

use kiln_core::DType;
use kiln_cpu::CpuBackend;
use kiln_gguf::GgufFile;
use kiln_models::model::DEFAULT_PREFILL_CHUNK;
use kiln_models::sampler::argmax;
use kiln_models::{LoadOptions, Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

const CHUNK: usize = 64;

/// The small model converted to an F32 GGUF in `dir`.
fn tiny(dir: &Path) -> GgufFile {
    common::small_model_gguf(dir, DType::F32)
}

fn load(file: &GgufFile, chunk: usize) -> Model<CpuBackend> {
    let options = LoadOptions {
        context: Some(512),
        cache_dtype: DType::F16,
        slots: 1,
    };
    let mut model = Model::load(CpuBackend, file, options, &mut |_, _| {}).unwrap();
    model.set_prefill_chunk(chunk).unwrap();
    model
}

/// `n` random token ids of the model's vocabulary (seed printed for a replay).
fn prompt(vocab: usize, n: usize) -> Vec<u32> {
    let seed: u64 = rand::random();
    eprintln!("prompt of {n} tokens from seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// The prompt's last logits, then 8 greedy tokens.
fn run(model: &mut Model<CpuBackend>, prompt: &[u32]) -> (Vec<f32>, Vec<u32>) {
    model.reset();
    let first = model.forward(prompt).unwrap();
    let mut logits = first.clone();
    let mut tokens = Vec::new();
    for _ in 0..8 {
        let t = argmax(&logits) as u32;
        tokens.push(t);
        logits = model.forward(&[t]).unwrap();
    }
    (first, tokens)
}

fn nmse(got: &[f32], want: &[f32]) -> f64 {
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum();
    err / want.iter().map(|&w| (w as f64).powi(2)).sum::<f64>()
}

#[test]
fn chunked_and_unchunked_prefill_agree() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    let mut whole = load(&file, DEFAULT_PREFILL_CHUNK);
    let mut chunked = load(&file, CHUNK);
    let vocab = whole.config().vocab;
    // One chunk, one chunk + 1 (a last chunk of one token, the decode graph), several
    // whole chunks, several and a part.
    for n in [CHUNK, CHUNK + 1, 3 * CHUNK, 4 * CHUNK + 37] {
        let prompt = prompt(vocab, n);
        let (want, want_tokens) = run(&mut whole, &prompt);
        let (got, tokens) = run(&mut chunked, &prompt);
        assert_eq!(whole.last_plan().unwrap().n_tokens, 1);
        let err = nmse(&got, &want);
        // The CPU computes each row alone: only the order of the caches' appends
        // differs, so the logits agree to rounding.
        assert!(err < 1e-10, "{n} tokens: NMSE {err:.2e}");
        assert_eq!(tokens, want_tokens, "{n} tokens: greedy tokens");
        assert_eq!(chunked.n_past(), n + 8);
    }
}

#[test]
fn the_scratch_of_a_chunked_prompt_does_not_grow_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    let mut model = load(&file, CHUNK);
    let vocab = model.config().vocab;
    let mut peaks = Vec::new();
    for n in [CHUNK, 2 * CHUNK + 1, 6 * CHUNK + 5] {
        model.reset();
        model.forward(&prompt(vocab, n)).unwrap();
        let plan = model.last_plan().unwrap();
        assert_eq!(plan.n_tokens, CHUNK, "{n} tokens: the largest graph");
        peaks.push((plan.persistent_bytes, plan.peak_bytes));
    }
    assert!(peaks.iter().all(|&p| p == peaks[0]), "{peaks:?}");
    // One graph for the longest prompt needs several times the scratch.
    model.set_prefill_chunk(6 * CHUNK + 5).unwrap();
    model.reset();
    model.forward(&prompt(vocab, 6 * CHUNK + 5)).unwrap();
    let whole = model.last_plan().unwrap();
    assert_eq!(whole.n_tokens, 6 * CHUNK + 5);
    let (persistent, chunk_peak) = peaks[0];
    assert!(
        whole.peak_bytes - whole.persistent_bytes > 3 * (chunk_peak - persistent),
        "{whole:?} vs {peaks:?}"
    );
}

#[test]
fn a_prompt_that_does_not_fit_consumes_no_position() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    let mut model = load(&file, CHUNK);
    let vocab = model.config().vocab;
    model.forward(&prompt(vocab, 100)).unwrap();
    // 100 + 500 positions exceed the 512 of the cache: checked before any chunk runs.
    let err = model.forward(&prompt(vocab, 500)).unwrap_err().to_string();
    assert!(err.contains("context full"), "{err}");
    assert_eq!(model.n_past(), 100);
    // A bad token id in the last chunk: found before any chunk runs.
    let mut bad = prompt(vocab, 3 * CHUNK);
    bad[3 * CHUNK - 1] = vocab as u32;
    assert!(model.forward(&bad).is_err());
    assert_eq!(model.n_past(), 100);
}

#[test]
fn a_chunk_of_zero_tokens_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    let mut model = load(&file, CHUNK);
    let err = model.set_prefill_chunk(0).unwrap_err().to_string();
    assert!(err.contains("at least 1 token"), "{err}");
    assert_eq!(model.prefill_chunk(), CHUNK);
}
