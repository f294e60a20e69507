//! The scheduler over a hybrid model (Qwen3-Next's tiny random-weight checkpoint, on
//! the CPU): its one slot's steps run in order through the one-sequence path, so a
//! request gets what the library's own generation loop gives for the same prompt,
//! greedy and sampled, and again after the slot is reused.

mod common;

use kiln_core::DType;
use kiln_cpu::CpuBackend;
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::{Gguf, GgufFile};
use kiln_models::tokenizer::Tokenizer;
use kiln_models::{LoadOptions, Model, SamplerConfig};
use kiln_serve::scheduler::Event;
use kiln_serve::{GenerationRequest, ModelEngine, Scheduler, SchedulerOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The checkpoint converted to an F32 GGUF in `dir`; its path.
fn converted(dir: &Path) -> PathBuf {
    let checkpoint =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../kiln-models/tests/fixtures/qwen3next-tiny");
    let out = dir.join("qwen3next-tiny.gguf");
    HfCheckpoint::open(&checkpoint)
        .unwrap()
        .write_gguf(&out, DType::F32, &mut |_, _| {})
        .unwrap();
    out
}

fn load(file: &GgufFile) -> Model<CpuBackend> {
    let options = LoadOptions {
        context: Some(64),
        cache_dtype: DType::F32,
        slots: 1,
    };
    Model::load(CpuBackend, file, options, &mut |_, _| {}).unwrap()
}

#[test]
fn a_hybrid_models_requests_get_the_librarys_generation() {
    let dir = tempfile::tempdir().unwrap();
    let path = converted(dir.path());
    let file = Gguf::open(&path).unwrap();
    let tokenizer = Arc::new(Tokenizer::from_gguf_metadata(file.metadata()).unwrap());
    let engine_file = Gguf::open(&path).unwrap();
    let (_scheduler, submitter) = Scheduler::spawn(
        move || Ok(ModelEngine::new(load(&engine_file))),
        tokenizer.clone(),
        // Prompts in chunks of 3 rows: several steps before the first token.
        SchedulerOptions {
            queue: 4,
            ubatch: 3,
        },
    )
    .unwrap();
    let prompt: Vec<u32> = vec![1, 40, 12, 77, 5, 9, 31];
    let n = 10;
    let sampled = SamplerConfig {
        temperature: 0.8,
        seed: 7,
        ..SamplerConfig::greedy()
    };
    // Greedy twice (the second reuses the slot, whose state must start from zero),
    // then sampled.
    for config in [SamplerConfig::greedy(), SamplerConfig::greedy(), sampled] {
        let (want, want_text) = common::generated(&mut load(&file), &tokenizer, &prompt, n, config);
        let mut events = submitter
            .submit(GenerationRequest {
                prompt: prompt.clone(),
                max_tokens: n,
                sampler: config,
                stop: Vec::new(),
            })
            .unwrap();
        let mut pieces = String::new();
        let finish = loop {
            match events.blocking_recv().expect("the sequence ends with Done") {
                Event::Text(t) => pieces.push_str(&t),
                Event::Done(f) => break f,
                Event::Error(e) => panic!("{config:?}: the sequence failed: {e}"),
            }
        };
        assert_eq!(pieces, want_text, "{config:?}");
        assert_eq!(finish.prompt_tokens, prompt.len(), "{config:?}");
        assert_eq!(finish.completion_tokens, want.len(), "{config:?}");
    }
}
