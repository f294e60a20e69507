//! The forward pass on the CPU backend against an independent float64 transformer
//! written here, on random tiny models of each architecture; prefill/decode
//! consistency; deterministic greedy generation; sampling on the device against the
//! logits path; clear errors.

// The reference transformer indexes by position on purpose, to read like its formulas.
#![allow(clippy::needless_range_loop)]

mod common;

use common::Stacking;
use kiln_core::ops::sample::sample_row;
use kiln_core::ops::SampleParams;
use kiln_core::{Backend, DType, Error};
use kiln_cpu::CpuBackend;
use kiln_gguf::{Gguf, GgufWriter, Metadata, SharedBytes, TensorDesc};
use kiln_models::generate::{generate, SamplingPath, StopReason};
use kiln_models::perplexity::{perplexity, token_nll, PerplexityOptions};
use kiln_models::{LoadOptions, Model, Sampler, SamplerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug)]
struct Spec {
    arch: &'static str,
    layers: usize,
    d: usize,
    ff: usize,
    heads: usize,
    kv: usize,
    vocab: usize,
    tied: bool,
    freq_factors: bool,
}

const EPS: f32 = 1e-5;
const BASE: f32 = 10_000.0;

fn specs() -> Vec<Spec> {
    let llama = Spec {
        arch: "llama",
        layers: 2,
        d: 32,
        ff: 48,
        heads: 4,
        kv: 2,
        vocab: 61,
        tied: false,
        freq_factors: true,
    };
    vec![
        llama,
        Spec {
            tied: true,
            freq_factors: false,
            heads: 2,
            kv: 2,
            ..llama
        },
        Spec {
            arch: "qwen2",
            tied: true,
            freq_factors: false,
            ..llama
        },
        Spec {
            arch: "qwen3",
            layers: 3,
            heads: 4,
            kv: 1,
            freq_factors: false,
            ..llama
        },
    ]
}

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Random weights (F32) named and shaped as llama.cpp's GGUF files have them.
fn random_weights(s: &Spec, rng: &mut StdRng) -> Tensors {
    let hd = s.d / s.heads;
    let mut t: Tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| {
                offset
                    + scale
                        * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, &mut *rng)
                            as f32
            })
            .collect::<Vec<f32>>();
        t.push((name, shape, v));
    };
    let w = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    add("token_embd.weight".into(), vec![s.vocab, s.d], 1.0, 0.0);
    for l in 0..s.layers {
        let p = |n: &str| format!("blk.{l}.{n}");
        add(p("attn_norm.weight"), vec![s.d], 0.1, 1.0);
        add(p("attn_q.weight"), vec![s.heads * hd, s.d], w(s.d), 0.0);
        add(p("attn_k.weight"), vec![s.kv * hd, s.d], w(s.d), 0.0);
        add(p("attn_v.weight"), vec![s.kv * hd, s.d], w(s.d), 0.0);
        if s.arch == "qwen2" {
            add(p("attn_q.bias"), vec![s.heads * hd], 0.1, 0.0);
            add(p("attn_k.bias"), vec![s.kv * hd], 0.1, 0.0);
            add(p("attn_v.bias"), vec![s.kv * hd], 0.1, 0.0);
        }
        if s.arch == "qwen3" {
            add(p("attn_q_norm.weight"), vec![hd], 0.1, 1.0);
            add(p("attn_k_norm.weight"), vec![hd], 0.1, 1.0);
        }
        add(
            p("attn_output.weight"),
            vec![s.d, s.heads * hd],
            w(s.heads * hd),
            0.0,
        );
        add(p("ffn_norm.weight"), vec![s.d], 0.1, 1.0);
        add(p("ffn_gate.weight"), vec![s.ff, s.d], w(s.d), 0.0);
        add(p("ffn_up.weight"), vec![s.ff, s.d], w(s.d), 0.0);
        add(p("ffn_down.weight"), vec![s.d, s.ff], w(s.ff), 0.0);
    }
    add("output_norm.weight".into(), vec![s.d], 0.1, 1.0);
    if !s.tied {
        add("output.weight".into(), vec![s.vocab, s.d], w(s.d), 0.0);
    }
    if s.freq_factors {
        add("rope_freqs.weight".into(), vec![hd / 2], 0.5, 2.0);
    }
    t
}

fn gguf_bytes(s: &Spec, tensors: &Tensors) -> Vec<u8> {
    gguf_bytes_as(s, tensors, |_| DType::F32)
}

/// The GGUF of `tensors` with each stored as `dtype_of(name)`: F32, F16 for tensors
/// whose values are already F16 values (so that both hold the same weights), or a
/// block format (quantized).
fn gguf_bytes_as(s: &Spec, tensors: &Tensors, dtype_of: impl Fn(&str) -> DType) -> Vec<u8> {
    let mut md = Metadata::new();
    md.set("general.architecture", s.arch);
    let k = |key: &str| format!("{}.{key}", s.arch);
    md.set(k("block_count"), s.layers as u32);
    md.set(k("embedding_length"), s.d as u32);
    md.set(k("feed_forward_length"), s.ff as u32);
    md.set(k("attention.head_count"), s.heads as u32);
    md.set(k("attention.head_count_kv"), s.kv as u32);
    md.set(k("context_length"), 64u32);
    md.set(k("attention.layer_norm_rms_epsilon"), EPS);
    md.set(k("rope.freq_base"), BASE);
    let descs: Vec<TensorDesc> = tensors
        .iter()
        .map(|(n, sh, _)| TensorDesc::new(n.clone(), dtype_of(n), sh))
        .collect();
    let mut w = GgufWriter::new(Vec::new(), "test.gguf", &md, &descs).unwrap();
    for (n, _, v) in tensors {
        let bytes: Vec<u8> = match dtype_of(n) {
            DType::F16 => v
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            dtype => {
                let mut b = vec![0u8; dtype.bytes_for(v.len()).unwrap()];
                kiln_core::quant::quantize(dtype, v, &mut b).unwrap();
                b
            }
        };
        w.write_tensor_data(&bytes).unwrap();
    }
    w.finish().unwrap()
}

/// The transformer in float64, written from the architectures' papers and model
/// cards, independent of kiln's graph: logits of every position of `tokens`.
fn reference_logits(s: &Spec, tensors: &Tensors, tokens: &[u32]) -> Vec<Vec<f64>> {
    let w: HashMap<&str, Vec<f64>> = tensors
        .iter()
        .map(|(n, _, v)| (n.as_str(), v.iter().map(|&x| x as f64).collect()))
        .collect();
    let hd = s.d / s.heads;
    let rms = |x: &[f64], g: &[f64]| -> Vec<f64> {
        let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + EPS as f64).sqrt();
        x.iter().zip(g).map(|(v, g)| v * inv * g).collect()
    };
    let lin = |x: &[f64], m: &[f64], bias: Option<&Vec<f64>>| -> Vec<f64> {
        let k = x.len();
        (0..m.len() / k)
            .map(|j| (0..k).map(|l| x[l] * m[j * k + l]).sum::<f64>() + bias.map_or(0.0, |b| b[j]))
            .collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        for i in 0..hd / 2 {
            let ff = if s.freq_factors {
                w["rope_freqs.weight"][i]
            } else {
                1.0
            };
            let theta = pos as f64 * (BASE as f64).powf(-2.0 * i as f64 / hd as f64) / ff;
            // GGUF llama weights pair adjacent dims; qwen pairs the two halves.
            let (a, b) = if s.arch == "llama" {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + hd / 2)
            };
            let (x, y) = (v[a], v[b]);
            v[a] = x * theta.cos() - y * theta.sin();
            v[b] = x * theta.sin() + y * theta.cos();
        }
    };
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| w["token_embd.weight"][t as usize * s.d..][..s.d].to_vec())
        .collect();
    for l in 0..s.layers {
        let g = |n: &str| &w[format!("blk.{l}.{n}").as_str()];
        let bias = |n: &str| w.get(format!("blk.{l}.{n}.bias").as_str());
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let h = rms(x, g("attn_norm.weight"));
            let mut q = lin(&h, g("attn_q.weight"), bias("attn_q"));
            let mut k = lin(&h, g("attn_k.weight"), bias("attn_k"));
            for (v, heads, norm) in [
                (&mut q, s.heads, "attn_q_norm.weight"),
                (&mut k, s.kv, "attn_k_norm.weight"),
            ] {
                for head in v.chunks_mut(hd).take(heads) {
                    if s.arch == "qwen3" {
                        let n = rms(head, g(norm));
                        head.copy_from_slice(&n);
                    }
                    rope(head, pos);
                }
            }
            qs.push(q);
            ks.push(k);
            vs.push(lin(&h, g("attn_v.weight"), bias("attn_v")));
        }
        for (t, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0f64; s.heads * hd];
            for h in 0..s.heads {
                let kvh = h / (s.heads / s.kv);
                let q = &qs[t][h * hd..][..hd];
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        q.iter()
                            .zip(&ks[j][kvh * hd..][..hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|v| (v - m).exp()).sum();
                for (j, sc) in scores.iter().enumerate() {
                    for i in 0..hd {
                        att[h * hd + i] += (sc - m).exp() / z * vs[j][kvh * hd + i];
                    }
                }
            }
            let o = lin(&att, g("attn_output.weight"), None);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let h = rms(x, g("ffn_norm.weight"));
            let gate = lin(&h, g("ffn_gate.weight"), None);
            let up = lin(&h, g("ffn_up.weight"), None);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                .collect();
            let down = lin(&act, g("ffn_down.weight"), None);
            x.iter_mut().zip(&down).for_each(|(x, d)| *x += d);
        }
    }
    let out = if s.tied {
        "token_embd.weight"
    } else {
        "output.weight"
    };
    xs.iter()
        .map(|x| lin(&rms(x, &w["output_norm.weight"]), &w[out], None))
        .collect()
}

fn nmse(got: &[f32], want: &[f64]) -> f64 {
    assert!(got.iter().all(|v| v.is_finite()), "non-finite logits");
    let e: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    e / want.iter().map(|w| w * w).sum::<f64>()
}

fn load(bytes: &[u8], cache_dtype: DType) -> Model<CpuBackend> {
    load_on(CpuBackend, bytes, cache_dtype)
}

fn load_on<BE: Backend>(backend: BE, bytes: &[u8], cache_dtype: DType) -> Model<BE> {
    let file = Gguf::from_shared(SharedBytes::new(bytes.to_vec()), "test.gguf").unwrap();
    Model::load(
        backend,
        &file,
        LoadOptions {
            context: Some(32),
            cache_dtype,
            slots: 1,
        },
        &mut |_, _| {},
    )
    .unwrap()
}

fn seeded() -> StdRng {
    let seed = rand::rng().random();
    eprintln!("seed {seed}");
    StdRng::seed_from_u64(seed)
}

#[test]
fn prefill_and_decode_match_the_f64_transformer() {
    let mut rng = seeded();
    for s in specs() {
        let tensors = random_weights(&s, &mut rng);
        let bytes = gguf_bytes(&s, &tensors);
        let tokens: Vec<u32> = (0..9)
            .map(|_| rng.random_range(0..s.vocab as u32))
            .collect();
        let want = reference_logits(&s, &tensors, &tokens);
        let mut model = load(&bytes, DType::F32);
        // Prefill the first 6 tokens in one pass, then decode the rest one by one.
        let got = model.forward(&tokens[..6]).unwrap();
        assert!(
            nmse(&got, &want[5]) < 1e-9,
            "{s:?} prefill: {}",
            nmse(&got, &want[5])
        );
        for t in 6..tokens.len() {
            let got = model.forward(&tokens[t..t + 1]).unwrap();
            assert!(
                nmse(&got, &want[t]) < 1e-9,
                "{s:?} decode at {t}: {}",
                nmse(&got, &want[t])
            );
        }
        // An F16 cache rounds keys and values: looser, but still close.
        let mut model = load(&bytes, DType::F16);
        let got = model.forward(&tokens).unwrap();
        assert!(
            nmse(&got, &want[8]) < 1e-5,
            "{s:?} f16 cache: {}",
            nmse(&got, &want[8])
        );
    }
}

#[test]
fn stacked_and_separate_projections_match_the_f64_transformer() {
    let mut rng = seeded();
    // Values and up-projections stored as F16 cannot stack with their F32 partners:
    // that file runs the separate projections, the all-F32 one the stacked ones.
    let separate = |name: &str| {
        if name.ends_with("attn_v.weight") || name.ends_with("ffn_up.weight") {
            DType::F16
        } else {
            DType::F32
        }
    };
    for s in specs() {
        let mut tensors = random_weights(&s, &mut rng);
        for (name, _, v) in &mut tensors {
            if separate(name) == DType::F16 {
                v.iter_mut()
                    .for_each(|x| *x = half::f16::from_f32(*x).to_f32());
            }
        }
        let tokens: Vec<u32> = (0..5)
            .map(|_| rng.random_range(0..s.vocab as u32))
            .collect();
        let want = reference_logits(&s, &tensors, &tokens);
        for (bytes, stacked) in [
            (gguf_bytes(&s, &tensors), true),
            (gguf_bytes_as(&s, &tensors, separate), false),
        ] {
            // The CPU backend stacks nothing; its stacking twin runs stacked weights.
            let mut model = load_on(Stacking::default(), &bytes, DType::F32);
            let names: Vec<String> = model
                .graph(1)
                .unwrap()
                .graph
                .buffers()
                .iter()
                .map(|b| b.name.clone())
                .collect();
            assert_eq!(
                names.iter().any(|n| n.ends_with("attn_qkv.weight")),
                stacked,
                "{s:?}: stacked {stacked}"
            );
            assert_eq!(
                names.iter().any(|n| n.ends_with("ffn_gate_up.weight")),
                stacked
            );
            let got = model.forward(&tokens[..3]).unwrap();
            assert!(
                nmse(&got, &want[2]) < 1e-9,
                "{s:?} stacked {stacked} prefill"
            );
            for t in 3..tokens.len() {
                let got = model.forward(&tokens[t..t + 1]).unwrap();
                let e = nmse(&got, &want[t]);
                assert!(e < 1e-9, "{s:?} stacked {stacked} decode at {t}: {e}");
            }
        }
    }
}

#[test]
fn greedy_generation_is_deterministic_and_stops_at_the_limit() {
    let mut rng = seeded();
    let s = specs()[0];
    let bytes = gguf_bytes(&s, &random_weights(&s, &mut rng));
    let mut model = load(&bytes, DType::F32);
    let run = |model: &mut Model<CpuBackend>| {
        let mut out = Vec::new();
        let mut sampler = Sampler::new(SamplerConfig::greedy());
        let stats = generate(model, &[1, 2, 3], 12, &mut sampler, &|_| false, &mut |t| {
            out.push(t);
            Ok(())
        })
        .unwrap();
        assert_eq!((stats.prompt_tokens, stats.generated_tokens), (3, 12));
        out
    };
    let first = run(&mut model);
    assert_eq!(first.len(), 12);
    assert_eq!(run(&mut model), first, "a second greedy run differs");
}

#[test]
fn generation_says_why_it_stopped() {
    let mut rng = seeded();
    let s = specs()[0];
    let bytes = gguf_bytes(&s, &random_weights(&s, &mut rng));
    let mut model = load(&bytes, DType::F32);
    let mut run = |max_tokens, end: u32| {
        let mut sampler = Sampler::new(SamplerConfig::greedy());
        let mut first = None;
        let stats = generate(
            &mut model,
            &[1, 2, 3],
            max_tokens,
            &mut sampler,
            &|t| t == end,
            &mut |t| {
                first.get_or_insert(t);
                Ok(())
            },
        )
        .unwrap();
        (stats, first.unwrap())
    };
    let (stats, first) = run(4, u32::MAX);
    assert_eq!(
        (stats.stop, stats.generated_tokens),
        (StopReason::MaxTokens, 4)
    );
    let (stats, _) = run(4, first);
    assert_eq!(
        (stats.stop, stats.generated_tokens),
        (StopReason::EndOfGeneration, 1)
    );
    // 32 positions: the prompt's 3, then 29 generated tokens run and a 30th chosen.
    let (stats, _) = run(100, u32::MAX);
    assert_eq!(
        (stats.stop, stats.generated_tokens),
        (StopReason::ContextFull, 30)
    );
}

#[test]
fn perplexity_scores_the_second_half_of_each_window_as_the_f64_transformer() {
    let mut rng = seeded();
    for s in specs() {
        let tensors = random_weights(&s, &mut rng);
        let mut model = load(&gguf_bytes(&s, &tensors), DType::F32);
        let tokens: Vec<u32> = (0..3 * 11 + 5)
            .map(|_| rng.random_range(0..s.vocab as u32))
            .collect();
        let options = PerplexityOptions {
            ctx: 11,
            max_chunks: None,
            bos: Some(0),
        };
        let mut running = Vec::new();
        let got = perplexity(&mut model, &tokens, options, &mut |i, n, p| {
            running.push((i, n, p.count));
            Ok(())
        })
        .unwrap();
        assert_eq!(running, [(0, 3, 5), (1, 3, 10), (2, 3, 15)]);
        // The reference: each window from BOS, scoring positions 5..=9 (predicting
        // 6..=10) of its f64 logits.
        let mut want = 0.0;
        for w in tokens.chunks_exact(11).take(3) {
            let mut window = w.to_vec();
            window[0] = 0;
            let logits = reference_logits(&s, &tensors, &window);
            for j in 5..10 {
                let l = &logits[j];
                let max = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + l.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                want += lse - l[window[j + 1] as usize];
            }
        }
        let mean = got.nll_sum / 15.0;
        assert_eq!(got.count, 15);
        assert!(
            (mean - want / 15.0).abs() < 1e-4,
            "{}: mean nll {mean}, f64 transformer {}",
            s.arch,
            want / 15.0
        );
        let f32_logits: Vec<f32> = (0..4).map(|i| i as f32).collect();
        assert!(token_nll(&f32_logits, 3) < token_nll(&f32_logits, 0));
    }
}

#[test]
fn perplexity_needs_a_window_that_fits() {
    let mut rng = seeded();
    let s = specs()[0];
    let mut model = load(&gguf_bytes(&s, &random_weights(&s, &mut rng)), DType::F32);
    let tokens = vec![1u32; 40];
    let run = |model: &mut Model<CpuBackend>, ctx| {
        let options = PerplexityOptions {
            ctx,
            max_chunks: None,
            bos: None,
        };
        perplexity(model, &tokens, options, &mut |_, _, _| Ok(()))
            .unwrap_err()
            .to_string()
    };
    assert!(run(&mut model, 2).contains("at least 3"));
    assert!(run(&mut model, 64).contains("cache of 32"));
    let short = PerplexityOptions {
        ctx: 8,
        max_chunks: None,
        bos: None,
    };
    let err = perplexity(&mut model, &tokens[..7], short, &mut |_, _, _| Ok(()));
    assert!(err
        .unwrap_err()
        .to_string()
        .contains("fewer than one window"));
}

#[test]
fn bad_requests_are_clear_errors() {
    let mut rng = seeded();
    let s = specs()[0];
    let tensors = random_weights(&s, &mut rng);
    let mut model = load(&gguf_bytes(&s, &tensors), DType::F32);
    let err = model.forward(&[s.vocab as u32]).unwrap_err().to_string();
    assert!(err.contains(&format!("token id {}", s.vocab)), "{err}");
    let err = model.forward(&[1; 33]).unwrap_err().to_string();
    assert!(err.contains("context full"), "{err}");
    assert!(matches!(
        model.forward(&[]),
        Err(Error::InvalidArgument { .. })
    ));

    let unsupported = gguf_bytes(&Spec { arch: "mamba", ..s }, &tensors);
    let file = Gguf::from_shared(SharedBytes::new(unsupported), "m.gguf").unwrap();
    let err = Model::load(
        CpuBackend,
        &file,
        LoadOptions {
            context: None,
            cache_dtype: DType::F32,
            slots: 1,
        },
        &mut |_, _| {},
    )
    .err()
    .expect("mamba is unsupported")
    .to_string();
    assert!(
        err.contains("mamba") && err.contains("llama, qwen2, qwen3"),
        "{err}"
    );

    let missing: Tensors = tensors
        .into_iter()
        .filter(|(n, _, _)| n != "blk.1.ffn_up.weight")
        .collect();
    // Loading builds the forward graphs, so a missing tensor is an error at load.
    let bytes = gguf_bytes(&s, &missing);
    let file = Gguf::from_shared(SharedBytes::new(bytes), "missing.gguf").unwrap();
    let options = LoadOptions {
        context: Some(32),
        cache_dtype: DType::F32,
        slots: 1,
    };
    let err = Model::load(CpuBackend, &file, options, &mut |_, _| {})
        .err()
        .expect("a model without blk.1.ffn_up.weight does not load")
        .to_string();
    assert!(err.contains("blk.1.ffn_up.weight"), "{err}");
}

/// Generates `n` tokens after `prompt` with `config` through [`generate`]; returns
/// them and the path it took.
fn generated(
    model: &mut Model<CpuBackend>,
    prompt: &[u32],
    n: usize,
    config: SamplerConfig,
) -> (Vec<u32>, SamplingPath) {
    let mut out = Vec::new();
    let mut sampler = Sampler::new(config);
    let stats = generate(model, prompt, n, &mut sampler, &|_| false, &mut |t| {
        out.push(t);
        Ok(())
    })
    .unwrap();
    assert_eq!(stats.generated_tokens, n);
    (out, stats.sampling)
}

/// The logits path written out: each step downloads the logits and the host's
/// sampler chooses from them (with the penalty over the history).
fn sampled_on_host(
    model: &mut Model<CpuBackend>,
    prompt: &[u32],
    n: usize,
    config: SamplerConfig,
) -> Vec<u32> {
    model.reset();
    let mut sampler = Sampler::new(config);
    let mut history = prompt.to_vec();
    let mut logits = model.forward(prompt).unwrap();
    for _ in 0..n {
        let token = sampler.sample(&logits, &history);
        history.push(token);
        logits = model.forward(&[token]).unwrap();
    }
    history.split_off(prompt.len())
}

/// Generates `n` tokens after `prompt` with `config` through [`generate`], checks that
/// it took `path` and gave the tokens of [`sampled_on_host`]; returns them. `context`
/// names the case in the failure messages.
fn generated_as_on_host(
    model: &mut Model<CpuBackend>,
    prompt: &[u32],
    n: usize,
    config: SamplerConfig,
    path: SamplingPath,
    context: &str,
) -> Vec<u32> {
    let (tokens, took) = generated(model, prompt, n, config);
    assert_eq!(took, path, "{context} {config:?}");
    assert_eq!(
        tokens,
        sampled_on_host(model, prompt, n, config),
        "{context} {config:?}"
    );
    tokens
}

fn settings(temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64) -> SamplerConfig {
    SamplerConfig {
        temperature,
        top_k,
        top_p,
        min_p,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed,
    }
}

#[test]
fn sampling_on_device_gives_the_tokens_of_the_logits_path() {
    let mut rng = seeded();
    let prompt = [1, 2, 3, 4];
    let n = 20;
    for s in [specs()[0], specs()[3]] {
        let bytes = gguf_bytes(&s, &random_weights(&s, &mut rng));
        let mut model = load(&bytes, DType::F32);
        let context = format!("{s:?}");
        let greedy = generated_as_on_host(
            &mut model,
            &prompt,
            n,
            SamplerConfig::greedy(),
            SamplingPath::Device,
            &context,
        );
        for config in [
            settings(0.8, 40, 0.9, 0.05, 11),
            settings(0.8, 40, 0.9, 0.05, 12),
            settings(1.5, 0, 1.0, 0.0, 13),
            settings(1.0, 5, 1.0, 0.0, 14),
            settings(0.6, 0, 0.5, 0.0, 15),
            settings(1.2, 0, 1.0, 0.2, 16),
            SamplerConfig {
                repeat_last_n: 0,
                repeat_penalty: 1.3,
                ..settings(0.9, 20, 0.95, 0.05, 17)
            },
        ] {
            generated_as_on_host(
                &mut model,
                &prompt,
                n,
                config,
                SamplingPath::Device,
                &context,
            );
        }
        // The draws reach the device: a hot, unrestricted sampler leaves the argmax.
        let (hot, _) = generated(&mut model, &prompt, n, settings(1.5, 0, 1.0, 0.0, 13));
        assert_ne!(
            hot, greedy,
            "{s:?}: sampling at temperature 1.5 gave the argmax"
        );
    }
}

#[test]
fn the_repetition_penalty_samples_on_the_host() {
    // A fixed model, so that the penalty is known to change the greedy tokens.
    let mut rng = StdRng::seed_from_u64(5);
    let s = specs()[0];
    let mut model = load(&gguf_bytes(&s, &random_weights(&s, &mut rng)), DType::F32);
    let prompt = [1, 2, 3];
    let n = 24;
    let penalized = |config: SamplerConfig| SamplerConfig {
        repeat_penalty: 50.0,
        repeat_last_n: 64,
        ..config
    };
    let (plain, _) = generated(&mut model, &prompt, n, SamplerConfig::greedy());
    for config in [SamplerConfig::greedy(), settings(0.8, 40, 0.9, 0.05, 3)] {
        generated_as_on_host(
            &mut model,
            &prompt,
            n,
            penalized(config),
            SamplingPath::Host,
            "penalized",
        );
    }
    let (greedy_penalized, _) =
        generated(&mut model, &prompt, n, penalized(SamplerConfig::greedy()));
    assert_ne!(greedy_penalized, plain, "the penalty changed nothing");
}

#[test]
fn forward_sample_checks_its_arguments_and_keeps_the_logits() {
    let mut rng = seeded();
    let s = specs()[0];
    let mut model = load(&gguf_bytes(&s, &random_weights(&s, &mut rng)), DType::F32);
    assert!(model.last_logits().is_err(), "logits before any step");
    let params = settings(0.8, 40, 0.9, 0.05, 0);
    let sample = SampleParams {
        temperature: params.temperature,
        top_k: params.top_k,
        top_p: params.top_p,
        min_p: params.min_p,
    };
    for bad in [1.0, -0.1, f32::NAN] {
        let err = model.forward_sample(&[1], sample, bad).unwrap_err();
        assert!(err.to_string().contains("uniform"), "{bad}: {err}");
    }
    let err = model
        .forward_sample(
            &[1],
            SampleParams {
                top_p: 0.0,
                ..sample
            },
            0.5,
        )
        .unwrap_err();
    assert!(err.to_string().contains("top_p"), "{err}");
    assert_eq!(model.n_past(), 0, "a refused step moved the position");

    // Prefill then decode steps: each token is the reference sample of the logits
    // the step left behind.
    let mut token = 5;
    for (i, u) in [0.1f32, 0.7, 0.35, 0.999].into_iter().enumerate() {
        let tokens: &[u32] = if i == 0 { &[3, 9, token] } else { &[token] };
        token = model.forward_sample(tokens, sample, u).unwrap();
        let logits = model.last_logits().unwrap();
        assert_eq!(logits.len(), s.vocab);
        assert_eq!(token as usize, sample_row(&logits, u, &sample), "step {i}");
    }
    assert_eq!(model.n_past(), 6);
}

#[test]
fn decode_graphs_give_the_projections_q8_copies_written_beside_their_inputs() {
    use kiln_core::ops::{Op, Q8_COPY};
    use kiln_models::forward::{build_batch, CacheSpec, ForwardGraph, BATCH_COPY_ROWS};
    use kiln_models::model::weight_descs;
    use kiln_models::ModelConfig;
    // Block-format matrices: their products read copies (float ones do not).
    let q8_0 = |name: &str| {
        let matrix = ["attn_", "ffn_", "output.weight", "token_embd"]
            .iter()
            .any(|p| name.contains(p))
            && !name.contains("norm");
        if matrix {
            DType::Q8_0
        } else {
            DType::F32
        }
    };
    // Widths that are whole Q8_1 blocks: every product of a quantized weight reads a
    // copy, the attention output's only where heads are whole blocks (head_dim 32, not
    // 8), as the attention op writes it.
    let head_dim_8 = Spec {
        ff: 64,
        ..specs()[0]
    };
    let head_dim_32 = Spec {
        d: 64,
        heads: 2,
        kv: 1,
        ..head_dim_8
    };
    // The copies the products of `f` read, each written beside the x it rounds, and
    // the op that writes the head's copy; a graph makes no copy it does not read.
    let copies = |f: &ForwardGraph| {
        let ops = f.graph.ops();
        let mut read = 0;
        let mut head = None;
        for (i, op) in ops.iter().enumerate() {
            let Op::MatMul(m) = op else { continue };
            let Some(q8) = m.x_q8 else { continue };
            read += 1;
            assert_eq!(f.graph.desc(q8).unwrap().dtype, Q8_COPY);
            // The last op before it that writes the copy also writes x.
            let writer = ops[..i]
                .iter()
                .rev()
                .find(|w| w.outputs().contains(&q8))
                .expect("a copy has a writer");
            assert!(
                writer.outputs().contains(&m.x),
                "{writer:?} writes the copy of another x"
            );
            if m.out == f.logits {
                head = Some(writer.variant());
            }
        }
        let made = f.graph.buffers().iter().filter(|b| b.dtype == Q8_COPY);
        assert_eq!(made.count(), read, "copies made that no product reads");
        (read, head)
    };
    for (s, per_layer) in [(head_dim_8, 3), (head_dim_32, 4)] {
        let bytes = gguf_bytes_as(&s, &random_weights(&s, &mut seeded()), q8_0);
        let model = load_on(Stacking::default(), &bytes, DType::F32);
        // The stacked q-k-v and gate-up projections and down of each layer (and the
        // attention output), and the head, which reads the final norm's copy.
        let decode = per_layer * s.layers + 1;
        let graph = |n_tokens| model.graph(n_tokens).unwrap();
        assert_eq!(copies(&graph(1)), (decode, Some("AddRmsNorm")), "{s:?}");
        // The prefill mat-mat does not read copies, so prefill graphs have none.
        assert_eq!(copies(&graph(3)), (0, None), "{s:?}");

        // Batched steps of up to BATCH_COPY_ROWS tokens read them as a token does; the
        // head reads the copy of the rows it gathers.
        let file = Gguf::from_shared(SharedBytes::new(bytes), "test.gguf").unwrap();
        let config = ModelConfig::from_gguf(&file).unwrap();
        let weights = weight_descs(&file).unwrap();
        let weight = |name: &str| {
            weights
                .get(name)
                .cloned()
                .ok_or_else(|| Error::format("test", format!("no tensor {name}")))
        };
        let cache = CacheSpec {
            capacity: 96,
            dtype: DType::F32,
            slots: 2,
        };
        let batch =
            |n_tokens, n_logits| build_batch(&config, &weight, n_tokens, n_logits, cache).unwrap();
        assert_eq!(copies(&batch(1, 1)), (decode, Some("AddRmsNorm")), "{s:?}");
        for (n_tokens, n_logits) in [(3, 2), (5, 1), (BATCH_COPY_ROWS, 7)] {
            assert_eq!(
                copies(&batch(n_tokens, n_logits)),
                (decode, Some("Embedding")),
                "{s:?}: {n_tokens} tokens, {n_logits} logits"
            );
        }
        assert_eq!(copies(&batch(BATCH_COPY_ROWS + 1, 3)), (0, None), "{s:?}");
        // A batched graph ends with the argmax of its logits rows; a one-sequence graph
        // has none.
        let f = batch(5, 3);
        let Some(Op::Argmax(a)) = f.graph.ops().last() else {
            panic!(
                "{s:?}: a batched graph ends with {:?}",
                f.graph.ops().last()
            );
        };
        assert_eq!(
            (a.x, Some(a.out), a.rows, a.cols),
            (f.logits, f.batch_tokens, 3, config.vocab)
        );
        assert_eq!(graph(1).batch_tokens, None);
    }
    // Float weights read none: their graphs make none.
    let s = specs()[0];
    let float = load(
        &gguf_bytes(&s, &random_weights(&s, &mut seeded())),
        DType::F32,
    );
    let f = float.graph(1).unwrap();
    assert!(f.graph.buffers().iter().all(|b| b.dtype != Q8_COPY));
}
