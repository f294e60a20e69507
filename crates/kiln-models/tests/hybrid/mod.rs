//! The fixture checks of the hybrid models (Qwen3-Next, Qwen3.5): a tiny random-weight
//! checkpoint in tests/fixtures/NAME, converted to GGUF by kiln, against the logits
//! transformers computed in float32 (fixtures.json, made by
//! scripts/make_qwen3next_fixtures.py and scripts/make_qwen35_fixtures.py) for prompts
//! of 1, 7 and 200 tokens and 16 greedy tokens fed back through its cache; a prompt
//! in chunks against the same prompt token by token; greedy tokens on two backends.

use kiln_core::{Backend, DType};
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::{Gguf, GgufFile};
use kiln_models::{LoadOptions, Model};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The checkpoint directory tests/fixtures/`name`.
pub fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub struct Fixture {
    pub input_ids: Vec<u32>,
    /// After the prompt, then after each greedy token.
    pub logits: Vec<Vec<f64>>,
    pub greedy: Vec<u32>,
    pub greedy_min_margin: f64,
    /// The smallest gap between a router's k-th and (k+1)-th logit; none for a model
    /// without experts.
    pub router_min_margin: Option<f64>,
}

/// The fixtures of the checkpoint `name`.
pub fn fixtures(name: &str) -> Vec<Fixture> {
    let text = std::fs::read_to_string(model_dir(name).join("fixtures.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let ids = |x: &Value| -> Vec<u32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    let floats = |x: &Value| -> Vec<f64> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_f64().unwrap())
            .collect()
    };
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Fixture {
            input_ids: ids(&p["input_ids"]),
            logits: p["logits"].as_array().unwrap().iter().map(floats).collect(),
            greedy: ids(&p["greedy_ids"]),
            greedy_min_margin: p["greedy_min_margin"].as_f64().unwrap(),
            router_min_margin: p["router_min_margin"].as_f64(),
        })
        .collect()
}

/// The checkpoint `name` converted by kiln to a GGUF of `dtype` in `dir`.
pub fn converted(name: &str, dtype: DType, dir: &Path) -> GgufFile {
    let out = dir.join(format!("{name}-{dtype}.gguf"));
    HfCheckpoint::open(model_dir(name))
        .unwrap()
        .write_gguf(&out, dtype, &mut |_, _| {})
        .unwrap();
    Gguf::open(&out).unwrap()
}

/// Positions for the longest prompt and its decode steps.
pub const CONTEXT: usize = 256;

pub fn load<BE: Backend>(backend: BE, file: &GgufFile) -> Model<BE> {
    let options = LoadOptions {
        context: Some(CONTEXT),
        cache_dtype: DType::F32,
        slots: 1,
    };
    Model::load(backend, file, options, &mut |_, _| {}).unwrap()
}

pub fn nmse(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "non-finite logits");
    let e: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - w).powi(2))
        .sum();
    e / want.iter().map(|w| w * w).sum::<f64>()
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Runs every fixture of `name` from a reset model, its prompt then its greedy tokens
/// fed back one at a time; each row of logits within `max_nmse` of transformers', and
/// each greedy token the argmax of the logits before it.
pub fn check_fixtures<BE: Backend>(model: &mut Model<BE>, name: &str, max_nmse: f64, what: &str) {
    for f in fixtures(name) {
        // Margins far above f32 rounding (~1e-6 here), so that no expert choice or
        // greedy token may honestly differ.
        assert!(f.router_min_margin.is_none_or(|m| m > 1e-3) && f.greedy_min_margin > 1e-2);
        model.reset();
        let n = f.input_ids.len();
        let mut logits = model.forward(&f.input_ids).unwrap();
        for (step, want) in f.logits.iter().enumerate() {
            let e = nmse(&logits, want);
            assert!(
                e < max_nmse,
                "{what}, prompt of {n}, step {step}: logits NMSE {e:.2e}"
            );
            if step == 0 {
                eprintln!("{what}, prompt of {n}: logits NMSE {e:.2e}");
            }
            if let Some(&next) = f.greedy.get(step) {
                assert_eq!(argmax(&logits), next, "{what}, prompt of {n}, step {step}");
                logits = model.forward(&[next]).unwrap();
            }
        }
        assert_eq!(model.n_past(), n + f.greedy.len());
    }
}

/// Runs the first 100 tokens of `name`'s 200-token prompt in the f32 conversion on
/// `backend` in one pass, in chunks of 7 and token by token, then four more tokens
/// after each: the logits after the prompt and after each more token (which read the
/// recurrent states and caches the prompt left) agree within `max_nmse`.
pub fn check_chunked_prompt<BE: Backend>(
    name: &str,
    backend: impl Fn() -> BE,
    max_nmse: f64,
    what: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let file = converted(name, DType::F32, dir.path());
    let f = &fixtures(name)[2];
    let prompt = &f.input_ids[..100];
    let tail = &f.greedy[..4];
    let run = |chunk: Option<usize>| -> Vec<Vec<f32>> {
        let mut model = load(backend(), &file);
        let mut rows = Vec::new();
        match chunk {
            Some(c) => {
                model.set_prefill_chunk(c).unwrap();
                rows.push(model.forward(prompt).unwrap());
            }
            None => {
                for &t in prompt {
                    rows.push(model.forward(&[t]).unwrap());
                }
                rows.drain(..rows.len() - 1);
            }
        }
        for &t in tail {
            rows.push(model.forward(&[t]).unwrap());
        }
        rows
    };
    let whole = run(Some(512));
    for (label, other) in [("chunks of 7", run(Some(7))), ("token by token", run(None))] {
        for (i, (a, b)) in whole.iter().zip(&other).enumerate() {
            let want: Vec<f64> = a.iter().map(|&v| f64::from(v)).collect();
            let e = nmse(b, &want);
            assert!(
                e < max_nmse,
                "{what}, {label}, row {i}: NMSE {e:.2e} against one pass"
            );
        }
    }
}

/// The logits of `n` greedy steps after `prompt` (the prompt's, then after each
/// token), and the tokens.
fn greedy_logits<BE: Backend>(
    model: &mut Model<BE>,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    model.reset();
    let mut logits = vec![model.forward(prompt).unwrap()];
    let mut tokens = Vec::new();
    for _ in 0..n {
        let next = argmax(logits.last().unwrap());
        tokens.push(next);
        logits.push(model.forward(&[next]).unwrap());
    }
    logits.pop();
    (tokens, logits)
}

/// 32 greedy tokens on the GPU equal the CPU's from each of `name`'s fixture prompts,
/// with logits within NMSE `tolerance`. The backends sum in other orders: a step whose
/// two best CPU logits lie closer than four times the RMS difference of the two
/// backends' logits may choose the other token, and the comparison ends there; any
/// other divergence fails.
pub fn greedy_tokens_agree<G: Backend, C: Backend>(
    name: &str,
    gpu: &mut Model<G>,
    cpu: &mut Model<C>,
    tolerance: f64,
    what: &str,
) {
    for f in fixtures(name) {
        let n = f.input_ids.len();
        let (want_tokens, want) = greedy_logits(cpu, &f.input_ids, 32);
        let (tokens, got) = greedy_logits(gpu, &f.input_ids, 32);
        for step in 0..32 {
            let w: Vec<f64> = want[step].iter().map(|&v| f64::from(v)).collect();
            let e = nmse(&got[step], &w);
            assert!(
                e < tolerance,
                "{what}, prompt of {n}, step {step}: GPU vs CPU logits NMSE {e:.2e}"
            );
            if tokens[step] != want_tokens[step] {
                let gap = f64::from(
                    (want[step][want_tokens[step] as usize] - want[step][tokens[step] as usize])
                        .abs(),
                );
                let mean_square = w.iter().map(|v| v * v).sum::<f64>() / w.len() as f64;
                let noise = 4.0 * (e * mean_square).sqrt();
                assert!(
                    gap <= noise,
                    "{what}, prompt of {n}: GPU and CPU greedy tokens differ at step {step} ({} against {}) with a CPU gap {gap:.3e} above the noise {noise:.3e}",
                    tokens[step],
                    want_tokens[step]
                );
                eprintln!("{what}, prompt of {n}: a near-tie at step {step} (gap {gap:.3e})");
                break;
            }
        }
    }
}

/// The f32 tensor `tensor` of checkpoint `name`'s model.safetensors, read from its
/// header (a little-endian u64 length, then JSON with each tensor's dtype, shape and
/// offsets).
pub fn checkpoint_tensor(name: &str, tensor: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(model_dir(name).join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header[tensor];
    assert_eq!(t["dtype"], "F32", "{tensor}");
    let shape = t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let [start, end] = [0, 1].map(|i| t["data_offsets"][i].as_u64().unwrap() as usize + 8 + n);
    let values = bytes[start..end]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (shape, values)
}

/// The shape and f32 values of `file`'s tensor `name`.
pub fn gguf_tensor(file: &GgufFile, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = file.tensor(name).unwrap();
    (t.info.shape().to_vec(), t.to_f32().unwrap())
}
