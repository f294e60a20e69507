//! The small model on the CUDA backend against the CPU backend: logits within
//! tolerance and 64 identical greedy tokens for every fixture prompt; decode replayed
//! as a CUDA graph against the same executable launched one by one and against the
//! CPU, in several weight formats and on a qwen3-shaped model; the token the device's
//! sample op chooses against the CPU reference applied to the same logits; batched
//! steps over 4 and 16 sequence slots against the CPU's; the greedy tokens batched
//! steps choose on the device against the host's argmax of their logits.
//! Ignored where there is no GPU; run with `--include-ignored` on a GPU machine,
//! where a missing device fails the test.

mod common;
mod device;
use common::{assert_greedy_batches_take_the_argmax, batched_greedy, greedy_tokens, Sequence};
use device::cuda;
use kiln_core::ops::sample::sample_row;
use kiln_core::ops::SampleParams;
use kiln_core::{Backend, DType};
use kiln_cpu::CpuBackend;
use kiln_cuda::CudaBackend;
use kiln_gguf::{Gguf, GgufFile};
use kiln_models::{LoadOptions, Model};
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

/// The small model converted to an F16 GGUF in `dir`.
fn tiny_f16(dir: &Path) -> GgufFile {
    tiny(dir, DType::F16)
}

/// The small model converted to a GGUF of `dtype` in `dir`.
fn tiny(dir: &Path, dtype: DType) -> GgufFile {
    common::small_model_gguf(dir, dtype)
}

/// A random qwen3-shaped model (per-head q/k norms, NeoX rotation, tied embeddings)
/// of F32 weights, written to `dir`.
fn random_qwen3(dir: &Path, rng: &mut StdRng) -> GgufFile {
    use kiln_gguf::{GgufWriter, Metadata, TensorDesc};
    let (layers, d, ff, heads, kv, hd, vocab) = (
        2usize, 128usize, 256usize, 4usize, 2usize, 32usize, 300usize,
    );
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        tensors.push((name, shape, v));
    };
    let w = |fan_in: usize| 1.7 / (fan_in as f32).sqrt();
    add("token_embd.weight".into(), vec![vocab, d], 1.0, 0.0);
    for l in 0..layers {
        let p = |n: &str| format!("blk.{l}.{n}");
        add(p("attn_norm.weight"), vec![d], 0.1, 1.0);
        add(p("attn_q.weight"), vec![heads * hd, d], w(d), 0.0);
        add(p("attn_k.weight"), vec![kv * hd, d], w(d), 0.0);
        add(p("attn_v.weight"), vec![kv * hd, d], w(d), 0.0);
        add(p("attn_q_norm.weight"), vec![hd], 0.1, 1.0);
        add(p("attn_k_norm.weight"), vec![hd], 0.1, 1.0);
        add(
            p("attn_output.weight"),
            vec![d, heads * hd],
            w(heads * hd),
            0.0,
        );
        add(p("ffn_norm.weight"), vec![d], 0.1, 1.0);
        add(p("ffn_gate.weight"), vec![ff, d], w(d), 0.0);
        add(p("ffn_up.weight"), vec![ff, d], w(d), 0.0);
        add(p("ffn_down.weight"), vec![d, ff], w(ff), 0.0);
    }
    add("output_norm.weight".into(), vec![d], 0.1, 1.0);
    let mut md = Metadata::new();
    md.set("general.architecture", "qwen3");
    for (key, v) in [
        ("block_count", layers),
        ("embedding_length", d),
        ("feed_forward_length", ff),
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv),
        ("attention.key_length", hd),
        ("attention.value_length", hd),
        ("context_length", 512),
    ] {
        md.set(format!("qwen3.{key}"), v as u32);
    }
    md.set("qwen3.attention.layer_norm_rms_epsilon", 1e-6f32);
    md.set("qwen3.rope.freq_base", 1_000_000f32);
    let descs: Vec<TensorDesc> = tensors
        .iter()
        .map(|(n, sh, _)| TensorDesc::new(n.clone(), DType::F32, sh))
        .collect();
    let path = dir.join("qwen3-random.gguf");
    let file = std::fs::File::create(&path).unwrap();
    let mut writer = GgufWriter::new(
        std::io::BufWriter::new(file),
        "qwen3-random.gguf",
        &md,
        &descs,
    )
    .unwrap();
    for (_, _, v) in &tensors {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        writer.write_tensor_data(&bytes).unwrap();
    }
    writer.finish().unwrap();
    Gguf::open(&path).unwrap()
}

/// A CUDA backend of device 0 that replays executables as CUDA graphs (`graphs`) or
/// submits their launches one by one.
fn cuda_replaying(graphs: bool) -> CudaBackend {
    let cuda = cuda();
    cuda.set_cuda_graphs(graphs);
    cuda
}

/// The prompt's logits, then `steps` greedy decode steps: each step's token (the
/// argmax of the previous logits) and logits.
fn greedy_logits<BE: Backend>(
    model: &mut Model<BE>,
    prompt: &[u32],
    steps: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    model.reset();
    let mut logits = vec![model.forward(prompt).unwrap()];
    let mut tokens = Vec::new();
    for _ in 0..steps {
        let token = kiln_models::sampler::argmax(logits.last().unwrap()) as u32;
        tokens.push(token);
        logits.push(model.forward(&[token]).unwrap());
    }
    (tokens, logits)
}

fn mean_square(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len() as f64
}

fn nmse(got: &[f32], want: &[f32]) -> f64 {
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum();
    err / want.iter().map(|&w| (w as f64).powi(2)).sum::<f64>()
}

/// Decode replayed as a CUDA graph gives bit for bit the logits of the same
/// executable launched one by one, and the CPU's greedy tokens with logits within
/// `tolerance` (NMSE), for 64 steps after each prompt. The two backends sum in other
/// orders, so a step whose two best CPU logits lie closer than the noise between the
/// backends' logits at that step (four times their RMS difference) may choose the other
/// token: the comparison then ends there, since every later step has other inputs.
/// A divergence at any other step fails. Returns the worst NMSE.
fn assert_replay_matches(what: &str, file: &GgufFile, prompts: &[Vec<u32>], tolerance: f64) -> f64 {
    let mut cpu = load(CpuBackend, file, DType::F16);
    let mut replayed = load(cuda_replaying(true), file, DType::F16);
    let mut eager = load(cuda_replaying(false), file, DType::F16);
    let mut worst_of_all = 0.0f64;
    for prompt in prompts {
        let (want_tokens, want) = greedy_logits(&mut cpu, prompt, 64);
        let (tokens, got) = greedy_logits(&mut replayed, prompt, 64);
        let (eager_tokens, eager_logits) = greedy_logits(&mut eager, prompt, 64);
        assert_eq!(
            tokens, eager_tokens,
            "{what} {prompt:?}: replayed vs eager tokens"
        );
        for (step, (g, e)) in got.iter().zip(&eager_logits).enumerate() {
            assert!(
                g.iter().zip(e).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what} {prompt:?}: step {step}: replayed and eager logits differ"
            );
        }
        // Steps 0 ..= last have the same inputs on both backends.
        let last = match tokens.iter().zip(&want_tokens).position(|(a, b)| a != b) {
            None => got.len() - 1,
            Some(step) => {
                let (g, w) = (&got[step], &want[step]);
                let gap = (w[want_tokens[step] as usize] - w[tokens[step] as usize]).abs() as f64;
                let noise = 4.0 * (nmse(g, w) * mean_square(w)).sqrt();
                assert!(
                    gap <= noise,
                    "{what} {prompt:?}: GPU vs CPU greedy tokens differ at step {step} \
                     ({} against {}), where the CPU's logits of the two are {gap:.3e} \
                     apart, more than the noise between the backends ({noise:.3e})\n\
                     GPU {tokens:?}\nCPU {want_tokens:?}",
                    tokens[step],
                    want_tokens[step]
                );
                eprintln!(
                    "{what} {prompt:?}: a near-tie at step {step} (gap {gap:.3e}, noise \
                     {noise:.3e}) chose {} on the GPU and {} on the CPU",
                    tokens[step], want_tokens[step]
                );
                step
            }
        };
        let worst = got[..=last]
            .iter()
            .zip(&want)
            .map(|(g, w)| {
                assert!(g.iter().all(|v| v.is_finite()), "{what}: non-finite logits");
                nmse(g, w)
            })
            .fold(0.0, f64::max);
        eprintln!(
            "{what} {prompt:?}: worst logit NMSE over {} steps {worst:.2e}",
            last + 1
        );
        assert!(
            worst < tolerance,
            "{what} {prompt:?}: logit NMSE {worst:.2e}"
        );
        worst_of_all = worst_of_all.max(worst);
    }
    worst_of_all
}

#[test]
#[ignore = "needs a CUDA device"]
fn replayed_decode_matches_eager_and_cpu_on_the_small_model() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompts();
    // Both sides read the same weights and, for block formats, multiply the same Q8_1
    // copies of the activations; they sum in other orders, and an activation that
    // lands on a rounding boundary can round to a neighbouring 8-bit value on one side
    // (about 1e-5 of a block's scale), which later layers carry: the greedy tokens are
    // the sharp check (up to a near-tie, assert_replay_matches), the NMSE bound
    // catches a wrong kernel (those give 1e-1 and up). Over 65 steps an f16 cache
    // entry may round the other way too. Ternary weights turn such a flip into the
    // largest change (1.01e-3 measured on one prompt).
    let mut measured = Vec::new();
    for (dtype, tolerance) in [
        (DType::F16, 1e-4),
        (DType::Q8_0, 1e-3),
        (DType::Q4_0, 1e-3),
        (DType::Q4K, 1e-3),
        (DType::Q1_0, 1e-3),
        (DType::TQ2_0, 3e-3),
    ] {
        let file = tiny(dir.path(), dtype);
        let worst = assert_replay_matches(&format!("{dtype}"), &file, &prompts, tolerance);
        measured.push((dtype, worst));
    }
    eprintln!("worst logit NMSE per weight type: {measured:?}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn replayed_decode_matches_eager_and_cpu_on_a_qwen3_shaped_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    let file = random_qwen3(dir.path(), &mut rng);
    let prompts = vec![vec![1, 17, 42, 299, 5], vec![7]];
    assert_replay_matches("qwen3", &file, &prompts, 1e-5);
}

fn load<BE: Backend>(backend: BE, file: &GgufFile, cache_dtype: DType) -> Model<BE> {
    let options = LoadOptions {
        context: Some(256),
        cache_dtype,
        slots: 1,
    };
    Model::load(backend, file, options, &mut |_, _| {}).expect("model loads")
}

#[test]
#[ignore = "needs a CUDA device"]
fn chunked_prefill_on_the_gpu_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_f16(dir.path());
    let mut cpu = load(CpuBackend, &file, DType::F16);
    let mut whole = load(cuda(), &file, DType::F16);
    let mut chunked = load(cuda(), &file, DType::F16);
    chunked.set_prefill_chunk(48).unwrap();
    // Text (the fixture prompts, repeated) of one chunk, one chunk + 1 (a last chunk
    // that runs the decode graph) and several chunks and a part; 64 greedy tokens follow
    // within the 256 positions of the cache.
    let text: Vec<u32> = prompts().concat();
    for n in [48, 49, 4 * 48 - 5] {
        let prompt: Vec<u32> = text.iter().copied().cycle().take(n).collect();
        cpu.reset();
        whole.reset();
        chunked.reset();
        let want = cpu.forward(&prompt).unwrap();
        let one = whole.forward(&prompt).unwrap();
        let got = chunked.forward(&prompt).unwrap();
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{n} tokens: non-finite logits"
        );
        // As gpu_logits_and_greedy_tokens_match_the_cpu: other sum orders, f16
        // tensor-core operands.
        assert!(
            nmse(&got, &want) < 1e-5,
            "{n} tokens: NMSE {:.2e} vs the CPU",
            nmse(&got, &want)
        );
        assert!(
            nmse(&got, &one) < 1e-5,
            "{n} tokens: NMSE {:.2e} vs one graph",
            nmse(&got, &one)
        );
        assert_eq!(
            greedy_tokens(&mut chunked, &prompt, 64),
            greedy_tokens(&mut cpu, &prompt, 64),
            "{n} tokens: greedy tokens"
        );
    }
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
            greedy_tokens(&mut gpu, &prompt, 64),
            greedy_tokens(&mut cpu, &prompt, 64),
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

#[test]
#[ignore = "needs a CUDA device"]
fn batched_greedy_tokens_on_the_gpu_match_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_f16(dir.path());
    let text: Vec<u32> = prompts().concat();
    for slots in [4, 16] {
        // `slots` sequences start over the first three steps with prompts of 1 to 40
        // tokens; the first half leave after 12 tokens and as many join at step 16
        // (in their slots); each sequence runs for up to 32 steps.
        let sequences: Vec<Sequence> = (0..slots + slots / 2)
            .map(|i| {
                let len = 1 + (i * 13) % 40;
                let start = (i * 29) % (text.len() - len);
                let (join, tokens) = match i {
                    i if i < slots / 2 => (i % 3, 12),
                    i if i < slots => (i % 3, 32 - i % 3),
                    _ => (16, 16),
                };
                Sequence {
                    prompt: text[start..start + len].to_vec(),
                    join,
                    tokens,
                }
            })
            .collect();
        let options = LoadOptions {
            context: Some(96),
            cache_dtype: DType::F16,
            slots,
        };
        let mut cpu = Model::load(CpuBackend, &file, options, &mut |_, _| {}).unwrap();
        let mut gpu = Model::load(cuda(), &file, options, &mut |_, _| {}).unwrap();
        let want = batched_greedy(&mut cpu, &sequences);
        let got = batched_greedy(&mut gpu, &sequences);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g,
                w,
                "{slots} slots: sequence {i} (prompt of {})",
                sequences[i].prompt.len()
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn batched_greedy_tokens_chosen_on_the_gpu_are_the_argmax_of_its_logits() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_f16(dir.path());
    let options = LoadOptions {
        context: Some(96),
        cache_dtype: DType::F16,
        slots: 3,
    };
    let load = || Model::load(cuda(), &file, options, &mut |_, _| {}).unwrap();
    assert_greedy_batches_take_the_argmax(&mut load(), &mut load());
}
