//! The small model quantized by kiln to the 1- and 2-bit formats generates on the
//! CPU: every token is a vocabulary id and greedy decoding is deterministic. (The
//! text may be poor: the model is tiny and these formats lose much of it.)

mod common;
use common::greedy_tokens;
use kiln_core::DType;
use kiln_cpu::CpuBackend;
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::Gguf;
use kiln_models::{LoadOptions, Model};
use std::path::Path;

/// Tokens to generate after the prompt.
const STEPS: usize = 24;

fn greedy(model: &mut Model<CpuBackend>, prompt: &[u32]) -> Vec<u32> {
    model.reset();
    greedy_tokens(model, prompt, STEPS)
}

#[test]
fn the_small_model_in_q1_0_and_tq2_0_generates_on_the_cpu() {
    let model_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shakespeare-tiny");
    let dir = tempfile::tempdir().unwrap();
    // (type, the type ffn_down (rows of 1024) gets, the type attn_q (rows of 384)
    // gets: a whole number of q1_0 blocks, not of tq2_0's, which falls back to q4_0).
    for (dtype, down, q) in [
        (DType::Q1_0, DType::Q1_0, DType::Q1_0),
        (DType::TQ2_0, DType::TQ2_0, DType::Q4_0),
    ] {
        let path = dir.path().join(format!("tiny-{dtype}.gguf"));
        HfCheckpoint::open(&model_dir)
            .unwrap()
            .write_gguf(&path, dtype, &mut |_, _| {})
            .unwrap();
        let file = Gguf::open(&path).unwrap();
        let type_of = |name: &str| file.tensor(name).unwrap().info.dtype();
        assert_eq!(type_of("blk.0.ffn_down.weight"), down, "{dtype}");
        assert_eq!(type_of("blk.0.attn_q.weight"), q, "{dtype}");
        let options = LoadOptions {
            context: Some(128),
            cache_dtype: DType::F16,
            slots: 1,
        };
        let mut model = Model::load(CpuBackend, &file, options, &mut |_, _| {}).unwrap();
        let vocab = model.config().vocab as u32;
        let prompt = [1u32, 200, 57, 903];
        let logits = model.forward(&prompt).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()), "{dtype}: logits");
        let first = greedy(&mut model, &prompt);
        assert_eq!(first.len(), STEPS, "{dtype}");
        assert!(first.iter().all(|&t| t < vocab), "{dtype}: {first:?}");
        assert_eq!(
            greedy(&mut model, &prompt),
            first,
            "{dtype}: not deterministic"
        );
        eprintln!("{dtype}: {first:?}");
    }
}
