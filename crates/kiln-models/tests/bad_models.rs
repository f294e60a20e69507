//! Malformed models: misshapen, missing and extra tensors, out-of-range
//! hyperparameters and corrupted bytes are errors naming what is wrong, never
//! panics. The corpus test runs the `load_model` fuzz target's function
//! ([`common::load_untrusted`]) on hundreds of mutants of tiny valid models.

mod common;

use common::{gguf_bytes, load_untrusted, with_shape, Tiny, CONTEXT};
use kiln_core::{DType, Error};
use kiln_cpu::CpuBackend;
use kiln_gguf::{Gguf, Metadata, SharedBytes, Value};
use kiln_models::tokenizer::Tokenizer;
use kiln_models::{LoadOptions, Model, ModelConfig};
use rand::{Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// `Model::load` of `bytes` on the CPU: the error's text, or a note that it loaded.
fn load_error(bytes: &[u8]) -> std::result::Result<String, String> {
    let file = Gguf::from_shared(SharedBytes::new(bytes.to_vec()), "bad.gguf")
        .map_err(|e| format!("parse: {e}"))?;
    let options = LoadOptions {
        context: Some(CONTEXT),
        cache_dtype: DType::F32,
        slots: 1,
    };
    match Model::load(CpuBackend, &file, options, &mut |_, _| {}) {
        Ok(_) => Err("the model loaded".into()),
        Err(e) => Ok(e.to_string()),
    }
}

/// Runs `f`, turning a panic into an `Err` with its message.
fn no_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into())
    })
}

#[test]
fn tiny_models_load_and_run() {
    for tiny in [Tiny::LLAMA, Tiny::QWEN2, Tiny::QWEN3] {
        load_untrusted(&tiny.bytes()).unwrap_or_else(|e| panic!("{}: {e}", tiny.arch));
    }
}

#[test]
fn misshapen_and_missing_tensors_are_errors_naming_the_tensor_and_its_shape() {
    let (llama, qwen3) = (Tiny::LLAMA, Tiny::QWEN3);
    // (model, tensor, its new shape or None to remove it, text the error must hold)
    let cases: [(Tiny, &str, Option<&[usize]>, &str); 12] = [
        (llama, "token_embd.weight", Some(&[]), "[vocab, 8]"),
        (llama, "token_embd.weight", Some(&[96]), "[vocab, 8]"),
        (llama, "token_embd.weight", Some(&[12, 9]), "[vocab, 8]"),
        (llama, "token_embd.weight", Some(&[1, 12, 8]), "[vocab, 8]"),
        (llama, "blk.0.attn_q.weight", Some(&[8, 16]), "[8, 8]"),
        (llama, "blk.0.attn_k.weight", Some(&[5, 8]), "[4, 8]"),
        (llama, "blk.0.ffn_norm.weight", Some(&[1, 1, 8]), "[8]"),
        (llama, "output_norm.weight", None, "[8]"),
        (llama, "output.weight", Some(&[12, 4]), "[12, 8]"),
        (llama, "rope_freqs.weight", Some(&[3]), "[2]"),
        (llama, "blk.0.ffn_down.weight", Some(&[16, 8]), "[8, 16]"),
        (qwen3, "blk.0.attn_q_norm.weight", Some(&[8]), "[4]"),
    ];
    let mut failures = Vec::new();
    for (tiny, name, shape, expected) in cases {
        let bytes = with_shape(&tiny, name, shape);
        let case = format!("{} {name} as {shape:?}", tiny.arch);
        match no_panic(|| load_error(&bytes)) {
            Err(panic) => failures.push(format!("{case}: panicked: {panic}")),
            Ok(Err(e)) => failures.push(format!("{case}: {e}")),
            Ok(Ok(err)) if !(err.contains(&format!("{name:?}")) && err.contains(expected)) => {
                failures.push(format!(
                    "{case}: the error does not name the tensor and {expected}: {err}"
                ))
            }
            Ok(Ok(_)) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The tiny llama's metadata with `key` (under `llama.`) set to `value`.
fn llama_with(key: &str, value: Value) -> Vec<u8> {
    let tiny = Tiny::LLAMA;
    let mut md = tiny.metadata();
    md.set(format!("llama.{key}"), value);
    gguf_bytes(&md, &tiny.tensors(), |_| DType::F32)
}

#[test]
fn out_of_range_hyperparameters_are_errors() {
    let cases = [
        ("embedding_length", Value::U32(0)),
        ("embedding_length", Value::U64(1 << 62)),
        ("attention.head_count", Value::U32(0)),
        ("attention.head_count", Value::U64(1 << 40)),
        ("attention.head_count_kv", Value::U32(0)),
        ("attention.head_count_kv", Value::U32(3)),
        ("attention.key_length", Value::U64(1 << 62)),
        ("attention.key_length", Value::U32(0)),
        ("feed_forward_length", Value::U64(u64::MAX)),
        ("block_count", Value::U32(u32::MAX)),
        ("block_count", Value::U32(0)),
        ("rope.dimension_count", Value::U32(3)),
        ("rope.dimension_count", Value::U32(64)),
        ("context_length", Value::U64(u64::MAX)),
        ("attention.head_count", Value::String("two".into())),
    ];
    let mut failures = Vec::new();
    for (key, value) in cases {
        let bytes = llama_with(key, value.clone());
        let case = format!("llama.{key} = {value:?}");
        match no_panic(|| load_error(&bytes)) {
            Err(panic) => failures.push(format!("{case}: panicked: {panic}")),
            Ok(Err(e)) if key != "context_length" => failures.push(format!("{case}: {e}")),
            _ => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_context_length_too_large_for_the_caches_is_an_error() {
    let bytes = llama_with("context_length", Value::U64(u64::MAX));
    let file = Gguf::from_shared(SharedBytes::new(bytes), "huge-context.gguf").unwrap();
    let options = LoadOptions {
        context: Some(usize::MAX / 2),
        cache_dtype: DType::F32,
        slots: 1,
    };
    let result = no_panic(|| Model::load(CpuBackend, &file, options, &mut |_, _| {}).err());
    let err = result
        .expect("no panic")
        .expect("caches of usize::MAX / 2 positions");
    assert!(
        matches!(
            err,
            Error::InvalidArgument { .. } | Error::OutOfMemory { .. }
        ),
        "{err}"
    );
}

#[test]
fn a_tokenizer_larger_than_the_embedding_is_an_error_naming_both() {
    let tiny = Tiny::LLAMA;
    let tensors: Vec<(String, Vec<usize>)> = tiny
        .tensors()
        .into_iter()
        .map(|(n, s)| match n.as_str() {
            "token_embd.weight" | "output.weight" => (n, vec![10, 8]),
            _ => (n, s),
        })
        .collect();
    let bytes = gguf_bytes(&tiny.metadata(), &tensors, |_| DType::F32);
    let file = Gguf::from_bytes(&bytes[..], "small-embedding.gguf").unwrap();
    let config = ModelConfig::from_gguf(&file).unwrap();
    let tokenizer = Tokenizer::from_gguf_metadata(file.metadata()).unwrap();
    let err = tokenizer.check_vocab(config.vocab).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.ggml.tokens")
            && err.contains("12 tokens")
            && err.contains("token_embd.weight")
            && err.contains("10"),
        "{err}"
    );
    assert!(load_untrusted(&bytes).is_err());
    tokenizer.check_vocab(12).unwrap();
    tokenizer.check_vocab(16).unwrap();
}

/// What one mutant gave.
#[derive(Default, Debug)]
struct Tally {
    loaded: usize,
    rejected: usize,
    panics: Vec<String>,
}

impl Tally {
    fn run(&mut self, case: &str, bytes: &[u8]) {
        match no_panic(|| load_untrusted(bytes)) {
            Ok(Ok(())) => self.loaded += 1,
            Ok(Err(e)) => {
                assert!(
                    matches!(
                        e,
                        Error::Format { .. }
                            | Error::Unsupported(_)
                            | Error::InvalidArgument { .. }
                            | Error::OutOfMemory { .. }
                    ),
                    "{case}: unexpected error kind: {e:?}"
                );
                self.rejected += 1;
            }
            Err(panic) => self.panics.push(format!("{case}: {panic}")),
        }
    }
}

/// Shapes a fuzzer would try for a tensor of `shape`.
fn distortions(shape: &[usize]) -> Vec<Vec<usize>> {
    let mut out = vec![
        vec![],
        vec![shape.iter().product()],
        shape.iter().rev().copied().collect(),
        [&[1], shape].concat(),
        [shape, &[1]].concat(),
        vec![0; shape.len()],
    ];
    for i in 0..shape.len() {
        for delta in [-1isize, 1, 7] {
            let mut s = shape.to_vec();
            s[i] = s[i].saturating_add_signed(delta);
            out.push(s);
        }
    }
    out
}

/// Every metadata key the tiny model sets, and the optional hyperparameters, with
/// values a fuzzer would try (and removed).
fn metadata_mutants(tiny: &Tiny) -> Vec<(String, Option<Value>)> {
    let md = tiny.metadata();
    let optional = [
        "attention.key_length",
        "rope.dimension_count",
        "rope.scaling.type",
        "rope.scaling.factor",
    ]
    .map(|k| format!("{}.{k}", tiny.arch));
    let keys = md.iter().map(|(k, _)| k.to_string()).chain(optional);
    let mut out = Vec::new();
    for key in keys {
        out.push((key.clone(), None));
        let values = [
            Value::U32(0),
            Value::U32(1),
            Value::U32(3),
            Value::U32(1 << 31),
            Value::U32(u32::MAX),
            Value::U64(1 << 62),
            Value::I32(-1),
            Value::F32(f32::NAN),
            Value::F32(f32::INFINITY),
            Value::F32(-1.0),
            Value::F32(0.25),
            Value::String("x".into()),
            Value::String("linear".into()),
        ];
        out.extend(values.into_iter().map(|v| (key.clone(), Some(v))));
    }
    out
}

fn with_metadata(tiny: &Tiny, key: &str, value: Option<Value>) -> Vec<u8> {
    let mut md = Metadata::new();
    for (k, v) in tiny.metadata().iter() {
        if k != key {
            md.set(k, v.clone());
        }
    }
    if let Some(v) = value {
        md.set(key, v);
    }
    gguf_bytes(&md, &tiny.tensors(), |_| DType::F32)
}

#[test]
fn the_load_harness_survives_a_corpus_of_malformed_models() {
    let mut tally = Tally::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b69_6c6e);
    for tiny in [Tiny::LLAMA, Tiny::QWEN2, Tiny::QWEN3] {
        let arch = tiny.arch;
        let valid = tiny.bytes();
        tally.run(&format!("{arch} as it is"), &valid);
        for (name, shape) in tiny.tensors() {
            tally.run(
                &format!("{arch} without {name}"),
                &with_shape(&tiny, &name, None),
            );
            for s in distortions(&shape) {
                let case = format!("{arch} {name} as {s:?}");
                tally.run(&case, &with_shape(&tiny, &name, Some(&s)));
            }
            for dtype in [DType::F16, DType::BF16, DType::I32] {
                let bytes = gguf_bytes(&tiny.metadata(), &tiny.tensors(), |n| {
                    if n == name {
                        dtype
                    } else {
                        DType::F32
                    }
                });
                tally.run(&format!("{arch} {name} in {dtype}"), &bytes);
            }
        }
        for (key, value) in metadata_mutants(&tiny) {
            let case = format!("{arch} {key} = {value:?}");
            tally.run(&case, &with_metadata(&tiny, &key, value));
        }
        let mut extra = tiny.tensors();
        extra.push(("blk.7.attn_q.weight".into(), vec![3, 5]));
        extra.push(("unused.weight".into(), vec![]));
        let bytes = gguf_bytes(&tiny.metadata(), &extra, |_| DType::F32);
        tally.run(&format!("{arch} with extra tensors"), &bytes);
        // Weight matrices in other types (rows of 32 for the block formats).
        let wide = Tiny {
            d: 32,
            ff: 32,
            ..tiny
        };
        for dtype in [DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0] {
            let bytes = gguf_bytes(&wide.metadata(), &wide.tensors(), |n| {
                let matrix =
                    n.ends_with(".weight") && !n.contains("norm") && n != "rope_freqs.weight";
                if matrix {
                    dtype
                } else {
                    DType::F32
                }
            });
            tally.run(&format!("{arch} in {dtype}"), &bytes);
        }
        // Random damage: bit flips anywhere, and overwritten 4-byte fields.
        for i in 0..200 {
            let mut bytes = valid.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..bytes.len());
                if i % 2 == 0 {
                    bytes[at] ^= 1 << rng.random_range(0..8);
                } else {
                    let field: u32 = [0, 1, 3, 0xffff_ffff, rng.random()][rng.random_range(0..5)];
                    let end = (at + 4).min(bytes.len());
                    bytes[at..end].copy_from_slice(&field.to_le_bytes()[..end - at]);
                }
            }
            tally.run(&format!("{arch} mutant {i}"), &bytes);
        }
    }
    eprintln!(
        "{} loaded, {} rejected, {} panicked",
        tally.loaded,
        tally.rejected,
        tally.panics.len()
    );
    assert!(
        tally.panics.is_empty(),
        "{} of {} malformed models panicked:\n{}",
        tally.panics.len(),
        tally.loaded + tally.rejected + tally.panics.len(),
        tally.panics.join("\n")
    );
    assert!(tally.loaded >= 3 && tally.rejected > 500, "{tally:?}");
}
