//! The project's small model, converted to GGUF by kiln and run on the CPU backend,
//! against the logits and greedy tokens that transformers' LlamaForCausalLM (an
//! implementation independent of kiln) computed in float32
//! (models/shakespeare-tiny/fixtures.json, made by scripts/make_fixtures.py).

mod common;
use common::greedy_tokens;
use kiln_core::DType;
use kiln_cpu::CpuBackend;
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::Gguf;
use kiln_models::tokenizer::Tokenizer;
use kiln_models::{LoadOptions, Model};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shakespeare-tiny")
}

struct Fixture {
    text: String,
    input_ids: Vec<u32>,
    last_logits: Vec<f64>,
    top20: Vec<u32>,
    greedy: Vec<u32>,
    /// The smallest gap between the best and second-best logit along the greedy path.
    greedy_min_margin: f64,
}

fn fixtures() -> Vec<Fixture> {
    let text = std::fs::read_to_string(model_dir().join("fixtures.json")).expect("fixtures.json");
    let v: Value = serde_json::from_str(&text).expect("fixtures parse");
    let ids = |x: &Value| {
        x.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect::<Vec<u32>>()
    };
    v["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| Fixture {
            text: p["text"].as_str().unwrap().to_string(),
            input_ids: ids(&p["input_ids"]),
            last_logits: p["last_logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect(),
            top20: ids(&p["top20_ids"]),
            greedy: ids(&p["greedy_ids"]),
            greedy_min_margin: p["greedy_min_margin"].as_f64().unwrap(),
        })
        .collect()
}

/// Converts the checkpoint to a GGUF of `dtype` in `dir` and loads it on the CPU.
fn converted(dtype: DType, dir: &Path) -> (Model<CpuBackend>, Tokenizer) {
    let out = dir.join(format!("tiny-{dtype}.gguf"));
    HfCheckpoint::open(model_dir())
        .unwrap()
        .write_gguf(&out, dtype, &mut |_, _| {})
        .unwrap();
    let file = Gguf::open(&out).unwrap();
    let tokenizer = Tokenizer::from_gguf_metadata(file.metadata()).unwrap();
    let options = LoadOptions {
        context: Some(256),
        cache_dtype: DType::F32,
        slots: 1,
    };
    (
        Model::load(CpuBackend, &file, options, &mut |_, _| {}).unwrap(),
        tokenizer,
    )
}

fn nmse(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "non-finite logits");
    let e: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    e / want.iter().map(|w| w * w).sum::<f64>()
}

fn top_ids(logits: &[f32], k: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    ids.truncate(k);
    ids
}

#[test]
fn f16_gguf_matches_transformers_logits_tokens_and_greedy_text() {
    let dir = tempfile::tempdir().unwrap();
    let (mut model, tokenizer) = converted(DType::F16, dir.path());
    for f in fixtures() {
        assert_eq!(
            tokenizer.encode(&f.text, true, false),
            f.input_ids,
            "tokenization of {:?}",
            f.text
        );
        model.reset();
        let logits = model.forward(&f.input_ids).unwrap();
        // Same f16 weights, both computed in f32: only summation order differs.
        let e = nmse(&logits, &f.last_logits);
        eprintln!("f16 {:?}: logits NMSE {e:.2e}", f.text);
        assert!(e < 1e-9, "{:?}: logits NMSE {e:.2e}", f.text);
        let top = top_ids(&logits, 20);
        assert_eq!(top[0], f.top20[0], "{:?}: top token", f.text);
        let shared = top.iter().filter(|id| f.top20.contains(id)).count();
        assert!(
            shared >= 19,
            "{:?}: only {shared} of the top 20 agree",
            f.text
        );
        // Greedy continuation: every step's margin is far above f32 rounding.
        assert!(
            f.greedy_min_margin > 1e-3,
            "fixture margin too small to compare"
        );
        let out = greedy_tokens(&mut model, &f.input_ids, f.greedy.len());
        assert_eq!(out, f.greedy, "{:?}: greedy tokens", f.text);
    }
}

#[test]
fn quantized_ggufs_stay_close_to_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = fixtures();
    // Tolerances: q8_0 keeps about 0.5% relative error per weight, q4_0 about 8%
    // (docs/quantization.md). Measured on these prompts: q8_0 1e-5..3e-5, q4_0
    // 2e-3..1.1e-2; the bounds leave about 5-10x of headroom.
    for (dtype, max_nmse, min_top1) in [(DType::Q8_0, 2e-4, 5), (DType::Q4_0, 5e-2, 3)] {
        let (mut model, _) = converted(dtype, dir.path());
        let mut top1 = 0;
        for f in &fixtures {
            model.reset();
            let logits = model.forward(&f.input_ids).unwrap();
            let e = nmse(&logits, &f.last_logits);
            eprintln!("{dtype} {:?}: logits NMSE {e:.2e}", f.text);
            assert!(
                e < max_nmse,
                "{dtype} {:?}: logits NMSE {e:.2e} > {max_nmse:.0e}",
                f.text
            );
            top1 += usize::from(top_ids(&logits, 1)[0] == f.top20[0]);
        }
        assert!(
            top1 >= min_top1,
            "{dtype}: top token agrees on {top1} of {} prompts",
            fixtures.len()
        );
    }
}
