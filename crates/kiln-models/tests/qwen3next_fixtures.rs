//! A tiny random-weight Qwen3-Next checkpoint, converted to GGUF by kiln and run on
//! the CPU backend (and, on a GPU machine, the CUDA backend), against the logits that
//! transformers' Qwen3NextForCausalLM computed in float32 for prompts of 1, 7 and 200
//! tokens and 16 greedy tokens fed back through its cache
//! (tests/fixtures/qwen3next-tiny, made by scripts/make_qwen3next_fixtures.py); a
//! prompt run in chunks against the same prompt token by token; the recurrent state's
//! reset and truncation rules.

mod device;
use device::cuda;
use kiln_core::{Backend, DType};
use kiln_cpu::CpuBackend;
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::{Arch, Gguf, GgufFile};
use kiln_models::{LoadOptions, Model};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3next-tiny")
}

struct Fixture {
    input_ids: Vec<u32>,
    /// After the prompt, then after each greedy token.
    logits: Vec<Vec<f64>>,
    greedy: Vec<u32>,
    greedy_min_margin: f64,
    router_min_margin: f64,
}

fn fixtures() -> Vec<Fixture> {
    let text = std::fs::read_to_string(model_dir().join("fixtures.json")).unwrap();
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
            router_min_margin: p["router_min_margin"].as_f64().unwrap(),
        })
        .collect()
}

/// The checkpoint converted to a GGUF of `dtype` in `dir`.
fn converted(dtype: DType, dir: &Path) -> GgufFile {
    let out = dir.join(format!("qwen3next-{dtype}.gguf"));
    HfCheckpoint::open(model_dir())
        .unwrap()
        .write_gguf(&out, dtype, &mut |_, _| {})
        .unwrap();
    Gguf::open(&out).unwrap()
}

/// Positions for the longest prompt and its decode steps.
const CONTEXT: usize = 256;

fn load<BE: Backend>(backend: BE, file: &GgufFile) -> Model<BE> {
    let options = LoadOptions {
        context: Some(CONTEXT),
        cache_dtype: DType::F32,
        slots: 1,
    };
    Model::load(backend, file, options, &mut |_, _| {}).unwrap()
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

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Runs every fixture's prompt from a reset model, then feeds its greedy tokens back
/// one at a time; each row of logits within `max_nmse` of transformers', and each
/// greedy token the argmax of the logits before it.
fn check_fixtures<BE: Backend>(model: &mut Model<BE>, max_nmse: f64, what: &str) {
    assert_eq!(model.config().arch, Arch::Qwen3Next);
    for f in fixtures() {
        // Margins far above f32 rounding (~1e-6 here), so that no expert choice or
        // greedy token may honestly differ.
        assert!(f.router_min_margin > 1e-3 && f.greedy_min_margin > 1e-2);
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

/// The f32 conversion keeps the checkpoint's weights exactly: the logits of every
/// prompt (the chunkwise delta rule over 200 tokens included) and of every decode
/// step (the recurrent form, the carried convolution and delta-rule states, the KV
/// cache) agree with transformers to f32 summation order.
#[test]
fn qwen3next_matches_transformers_logits_through_prompt_and_decode() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = load(CpuBackend, &converted(DType::F32, dir.path()));
    let lin = model.config().linear.clone().expect("a hybrid model");
    assert_eq!(lin.full_attention_interval, 4);
    assert_eq!(model.config().rope.rotary_dim, 4);
    check_fixtures(&mut model, 1e-10, "cpu f32");
}

/// Runs the first 100 tokens of the 200-token prompt on `backend` in one pass, in
/// chunks of 7 and token by token, then four more tokens after each: the logits after
/// the prompt and after each more token (which read the recurrent states and caches
/// the prompt left) agree within `max_nmse`.
fn check_chunked_prompt<BE: Backend>(backend: impl Fn() -> BE, max_nmse: f64, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = converted(DType::F32, dir.path());
    let f = &fixtures()[2];
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

/// On the CPU a prompt in chunks of 7 tokens, or token by token, leaves the state of
/// one pass (the chunkwise and the recurrent delta rule agree to f32 rounding).
#[test]
fn a_prompt_in_chunks_leaves_the_state_of_one_pass() {
    check_chunked_prompt(|| CpuBackend, 1e-10, "cpu");
}

/// On the GPU likewise, within the rounding of the one pass's products to bf16
/// operands (the mat-mat takes more than 8 rows; chunks of 7 and single tokens run
/// f32 mat-vecs).
#[test]
#[ignore = "needs a CUDA device"]
fn a_prompt_in_chunks_on_cuda_leaves_the_state_of_one_pass() {
    check_chunked_prompt(cuda, 1e-3, "cuda");
}

/// Resetting starts a new sequence with zeroed states: the same prompt gives the same
/// logits again. Truncation of the recurrent state is possible only to 0 or to the
/// current length (or beyond); anything between is an error that changes nothing.
#[test]
fn recurrent_state_resets_and_refuses_partial_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = load(CpuBackend, &converted(DType::F32, dir.path()));
    // Three linear-attention layers of a convolution state [128, 3] and a delta-rule
    // state [4, 16, 16], in f32.
    assert_eq!(
        model.recurrent_state_bytes(),
        3 * (128 * 3 + 4 * 16 * 16) * 4
    );
    let prompt = &fixtures()[1].input_ids;
    let first = model.forward(prompt).unwrap();
    let err = model.truncate(3).unwrap_err().to_string();
    assert!(
        err.contains("cannot be truncated to 3") && err.contains("qwen3next"),
        "{err}"
    );
    assert_eq!(model.n_past(), prompt.len());
    model.truncate(prompt.len()).unwrap();
    model.truncate(prompt.len() + 5).unwrap();
    assert_eq!(model.n_past(), prompt.len());
    // The state now holds the prompt: running it again continues the sequence.
    let continued = model.forward(prompt).unwrap();
    assert!(
        nmse(
            &continued,
            &first.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()
        ) > 1e-6
    );
    model.truncate(0).unwrap();
    assert_eq!(model.n_past(), 0);
    let again = model.forward(prompt).unwrap();
    assert_eq!(again, first, "a reset model repeats its first pass");
}

/// With Q8_0 weight matrices (their products reading Q8_1 copies of the
/// activations), the logits stay close to the float32 reference: about 2e-3 here,
/// where a width of 64 leaves two blocks per row.
/// The recurrent state holds one sequence: several slots and batched steps are
/// refused with an Unsupported error naming the architecture.
#[test]
fn several_slots_and_batched_steps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = converted(DType::F32, dir.path());
    let options = LoadOptions {
        context: Some(CONTEXT),
        cache_dtype: DType::F32,
        slots: 2,
    };
    let e = Model::load(CpuBackend, &file, options, &mut |_, _| {})
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, kiln_core::Error::Unsupported(_)), "{e}");
    assert!(
        e.to_string().contains("qwen3next") && e.to_string().contains("one slot"),
        "{e}"
    );
    let mut model = load(CpuBackend, &file);
    let row = kiln_models::BatchRow {
        slot: 0,
        token: 1,
        logits: true,
    };
    let e = model.forward_batch(&[row]).unwrap_err();
    assert!(matches!(e, kiln_core::Error::Unsupported(_)), "{e}");
    assert_eq!(model.n_past(), 0);
}

#[test]
fn q8_0_qwen3next_logits_stay_close() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = load(CpuBackend, &converted(DType::Q8_0, dir.path()));
    let f = &fixtures()[1];
    let e = nmse(&model.forward(&f.input_ids).unwrap(), &f.logits[0]);
    eprintln!("qwen3next q8_0: logits NMSE {e:.2e}");
    assert!(e < 1e-2, "qwen3next q8_0: logits NMSE {e:.2e}");
}

/// The fixtures on the GPU: prompts through the recurrent delta-rule kernel token by
/// token (CUDA has no chunkwise kernel), decode through the replayed graph. In chunks
/// of 8 tokens every product is an f32 mat-vec, so the logits agree with transformers
/// to f32 summation order; in one chunk the prompt's products take bf16 operands (the
/// mat-mat), whose rounding the logits show, carried into the decode steps by the
/// caches and recurrent states. The greedy tokens equal the fixture's either way
/// (their margins, above 0.02, far exceed the bf16 noise).
#[test]
#[ignore = "needs a CUDA device"]
fn qwen3next_on_cuda_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = load(cuda(), &converted(DType::F32, dir.path()));
    for (chunk, max_nmse) in [(8, 1e-6), (512, 1e-3)] {
        model.set_prefill_chunk(chunk).unwrap();
        check_fixtures(
            &mut model,
            max_nmse,
            &format!("cuda f32, chunks of {chunk}"),
        );
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

/// 32 greedy tokens on the GPU equal the CPU's from each fixture prompt, for F32 and
/// Q8_0 weights, prompts in chunks of 8 (f32 mat-vecs), with logits within NMSE 1e-6
/// (1e-3 for Q8_0, whose products read activations rounded to 8 bits on the GPU).
/// The backends sum in other orders: a step whose two best CPU
/// logits lie closer than four times the RMS difference of the two backends' logits
/// may choose the other token, and the comparison ends there; any other divergence
/// fails.
#[test]
#[ignore = "needs a CUDA device"]
fn qwen3next_greedy_tokens_on_cuda_equal_the_cpus() {
    let dir = tempfile::tempdir().unwrap();
    for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::Q8_0, 1e-3)] {
        let file = converted(dtype, dir.path());
        let mut gpu = load(cuda(), &file);
        gpu.set_prefill_chunk(8).unwrap();
        let mut cpu = load(CpuBackend, &file);
        greedy_tokens_agree(&mut gpu, &mut cpu, tolerance, &format!("{dtype}"));
    }
}

/// The greedy comparison of [`qwen3next_greedy_tokens_on_cuda_equal_the_cpus`] for
/// one file, logits within NMSE `tolerance`.
fn greedy_tokens_agree<G: Backend, C: Backend>(
    gpu: &mut Model<G>,
    cpu: &mut Model<C>,
    tolerance: f64,
    what: &str,
) {
    for f in fixtures() {
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

/// The f32 tensor `name` of the checkpoint's model.safetensors, read from its header
/// (a little-endian u64 length, then JSON with each tensor's dtype, shape and offsets).
fn checkpoint_tensor(name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(model_dir().join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header[name];
    assert_eq!(t["dtype"], "F32", "{name}");
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

/// kiln convert writes what llama.cpp's converter writes for Qwen3-Next: its keys,
/// the zero-centred norms plus one (not the gated norm), `ssm_a = -exp(A_log)`, the
/// convolution without its middle axis, and `in_proj_qkvz` (per key head q, k, v, z)
/// as `attn_qkv` (all q, all k, all v) and `attn_gate` (all z).
#[test]
fn conversion_writes_llama_cpp_tensors_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = converted(DType::F32, dir.path());
    let md = file.metadata();
    for (key, want) in [
        ("ssm.conv_kernel", 4),
        ("ssm.state_size", 16),
        ("ssm.group_count", 2),
        ("ssm.time_step_rank", 4),
        ("ssm.inner_size", 64),
        ("full_attention_interval", 4),
        ("rope.dimension_count", 4),
        ("attention.key_length", 16),
        ("expert_feed_forward_length", 16),
        ("expert_shared_feed_forward_length", 32),
    ] {
        assert_eq!(
            md.get_u64(&format!("qwen3next.{key}")).unwrap(),
            want,
            "{key}"
        );
    }
    let gguf = |name: &str| {
        let t = file.tensor(name).unwrap();
        (t.info.shape().to_vec(), t.to_f32().unwrap())
    };
    let close = |got: &[f32], want: &[f64], what: &str| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{what}: {g} vs {w}"
            );
        }
    };
    let (_, a_log) = checkpoint_tensor("model.layers.1.linear_attn.A_log");
    let want: Vec<f64> = a_log.iter().map(|&v| -f64::from(v).exp()).collect();
    close(&gguf("blk.1.ssm_a").1, &want, "ssm_a");
    for (hf, gg) in [
        (
            "model.layers.0.input_layernorm.weight",
            "blk.0.attn_norm.weight",
        ),
        (
            "model.layers.3.self_attn.q_norm.weight",
            "blk.3.attn_q_norm.weight",
        ),
        (
            "model.layers.2.post_attention_layernorm.weight",
            "blk.2.post_attention_norm.weight",
        ),
        ("model.norm.weight", "output_norm.weight"),
    ] {
        let want: Vec<f64> = checkpoint_tensor(hf)
            .1
            .iter()
            .map(|&v| 1.0 + f64::from(v))
            .collect();
        close(&gguf(gg).1, &want, gg);
    }
    let (_, norm) = checkpoint_tensor("model.layers.0.linear_attn.norm.weight");
    assert_eq!(gguf("blk.0.ssm_norm.weight").1, norm);
    let (shape, conv) = gguf("blk.0.ssm_conv1d.weight");
    assert_eq!(shape, [128, 4]);
    assert_eq!(
        conv,
        checkpoint_tensor("model.layers.0.linear_attn.conv1d.weight").1
    );
    // Per key head 96 rows: q 0..16, k 16..32, v 32..64, z 64..96.
    let (qkvz_shape, qkvz) = checkpoint_tensor("model.layers.2.linear_attn.in_proj_qkvz.weight");
    assert_eq!(qkvz_shape, [192, 64]);
    let row = |m: &[f32], r: usize| m[r * 64..(r + 1) * 64].to_vec();
    let (qkv_shape, qkv) = gguf("blk.2.attn_qkv.weight");
    let (gate_shape, gate) = gguf("blk.2.attn_gate.weight");
    assert_eq!((qkv_shape, gate_shape), (vec![128, 64], vec![64, 64]));
    for (got, hf_row) in [
        (0, 0),
        (16, 96),
        (32, 16),
        (48, 112),
        (64, 32),
        (95, 63),
        (96, 128),
        (127, 159),
    ] {
        assert_eq!(row(&qkv, got), row(&qkvz, hf_row), "attn_qkv row {got}");
    }
    for (got, hf_row) in [(0, 64), (31, 95), (32, 160), (63, 191)] {
        assert_eq!(row(&gate, got), row(&qkvz, hf_row), "attn_gate row {got}");
    }
    let (ba_shape, ba) = gguf("blk.2.ssm_ba.weight");
    assert_eq!(ba_shape, [8, 64]);
    assert_eq!(
        ba,
        checkpoint_tensor("model.layers.2.linear_attn.in_proj_ba.weight").1
    );
}

/// A checkpoint whose layers are not one full-attention layer in every
/// `full_attention_interval` is refused, naming layer_types.
#[test]
fn an_irregular_layer_pattern_is_a_conversion_error() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["model.safetensors", "tokenizer.json", "config.json"] {
        std::fs::copy(model_dir().join(file), dir.path().join(file)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["layer_types"] = serde_json::json!([
        "linear_attention",
        "full_attention",
        "linear_attention",
        "full_attention"
    ]);
    config["full_attention_interval"] = 4.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let e = HfCheckpoint::open(dir.path())
        .err()
        .expect("an irregular pattern converts");
    assert!(
        matches!(e, kiln_core::Error::Unsupported(_)) && e.to_string().contains("layer_types"),
        "{e}"
    );
}
