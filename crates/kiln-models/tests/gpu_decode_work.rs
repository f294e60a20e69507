//! What a decode step does on the CUDA backend after its first: no graph validation,
//! no kernel specialisation derived, no registry lookup, no compile; the step only
//! uploads its inputs and replays the executable. The counters are process-wide, so
//! this file holds one test (its own process). Ignored where there is no GPU; run
//! with `--include-ignored` on a GPU machine, where a missing device fails the test.

use kiln_core::ops::SampleParams;
use kiln_core::DType;
use kiln_cuda::{CacheConfig, CudaBackend};
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::Gguf;
use kiln_models::{LoadOptions, Model};
use std::path::Path;

/// Graph validations, specialisations derived, registry requests (every kind) and
/// compiles of `backend`, so far.
fn work(backend: &CudaBackend) -> [u64; 4] {
    let total = backend.registry().stats().total();
    [
        kiln_core::graph::validations(),
        kiln_cuda::manifest::spec_derivations(),
        total.memory_hits + total.disk_hits + total.compiles,
        backend.compiles(),
    ]
}

#[test]
#[ignore = "needs a CUDA device"]
fn decode_steps_after_the_first_validate_derive_and_look_up_nothing() {
    let cuda = CacheConfig::from_env()
        .and_then(|cache| CudaBackend::with_cache(0, cache))
        .unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-q4_0.gguf");
    let model_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shakespeare-tiny");
    HfCheckpoint::open(model_dir)
        .unwrap()
        .write_gguf(&path, DType::Q4_0, &mut |_, _| {})
        .unwrap();
    let file = Gguf::open(&path).unwrap();
    let options = LoadOptions {
        context: Some(128),
        cache_dtype: DType::F16,
        slots: 1,
    };
    let mut model = Model::load(cuda, &file, options, &mut |_, _| {}).unwrap();
    let params = SampleParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
    };
    let mut token = model.forward_sample(&[0, 5, 9], params, 0.5).unwrap();
    // The first decode step of each head compiles its executable.
    token = model.forward_sample(&[token], params, 0.25).unwrap();
    model.forward(&[token]).unwrap();
    let before = work(model.backend());
    assert!(
        before.iter().all(|&n| n > 0),
        "the counters count: {before:?}"
    );
    for step in 0..20 {
        let u = step as f32 / 20.0;
        token = model.forward_sample(&[token], params, u).unwrap();
        model.forward(&[token]).unwrap();
    }
    assert_eq!(
        work(model.backend()),
        before,
        "[validations, specialisations derived, registry requests, compiles] changed over 40 decode steps"
    );
}
