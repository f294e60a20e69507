//! What `kiln generate` says about the context and the model's vocabulary: a
//! generation stopped by a full context, a `--ctx-size` above the trained context,
//! special token ids outside the vocabulary, and a tokenizer larger than the
//! embedding table.

mod common;
use common::{kiln_err, kiln_ok, small_model, temp_path};
use kiln_gguf::{Gguf, GgufWriter, Metadata, TensorDesc, Value};

fn model() -> &'static str {
    small_model("context-small.gguf")
}

fn generate(extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "generate",
        "-m",
        model(),
        "-p",
        "ROMEO:",
        "--temp",
        "0",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    kiln_ok(&args)
}

#[test]
fn a_full_context_is_named_as_the_reason_generation_stopped() {
    let (_, stderr) = generate(&["-n", "100", "-c", "16", "--ignore-eos"]);
    assert!(stderr.contains("generated 14 tokens"), "{stderr}");
    assert!(
        stderr.contains("context") && stderr.contains("full") && stderr.contains("--ctx-size"),
        "{stderr}"
    );
    let (_, stderr) = generate(&["-n", "4", "-c", "64"]);
    assert!(
        !stderr.contains("full"),
        "stopped by -n, not the context: {stderr}"
    );
}

#[test]
fn a_context_above_the_trained_one_is_a_warning() {
    let (_, stderr) = generate(&["-n", "2", "-c", "2048"]);
    assert!(
        stderr.contains("warning:") && stderr.contains("2048") && stderr.contains("512"),
        "{stderr}"
    );
    let (_, stderr) = generate(&["-n", "2", "-c", "512"]);
    assert!(!stderr.contains("warning:"), "{stderr}");
}

/// A copy of the small model with its metadata changed by `edit`.
fn with_metadata(name: &str, edit: impl FnOnce(&mut Metadata)) -> String {
    let path = temp_path(name);
    let src = Gguf::open(model()).unwrap();
    let mut metadata = src.metadata().clone();
    edit(&mut metadata);
    let descs: Vec<TensorDesc> = src
        .tensor_infos()
        .iter()
        .map(|t| TensorDesc::new(t.name(), t.dtype(), t.shape()))
        .collect();
    let mut w = GgufWriter::create(&path, &metadata, &descs).unwrap();
    for t in src.tensors() {
        w.write_tensor_data(t.data).unwrap();
    }
    w.finish().unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn special_ids_outside_the_vocabulary_are_warnings() {
    let bad = with_metadata("context-bad-special-ids.gguf", |m| {
        m.set("tokenizer.ggml.bos_token_id", 5000u32);
        m.set("tokenizer.ggml.eos_token_id", 4096u32);
    });
    let (_, stderr) = kiln_ok(&[
        "generate", "-m", &bad, "-p", "ROMEO:", "-n", "2", "--temp", "0", "--device", "cpu",
    ]);
    for (key, id) in [("bos_token_id", "5000"), ("eos_token_id", "4096")] {
        let line = stderr
            .lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("no warning about {key}: {stderr}"));
        assert!(line.contains("warning:") && line.contains(id), "{line}");
    }
}

#[test]
fn a_tokenizer_larger_than_the_embedding_table_is_an_error() {
    let bad = with_metadata("context-long-tokenizer.gguf", |m| {
        let extend = |v: &Value, more: Vec<Value>| match v {
            Value::Array(a) => {
                let mut items: Vec<Value> = a.iter().collect();
                items.extend(more);
                Value::Array(kiln_gguf::Array::new(a.item_type(), items).unwrap())
            }
            other => panic!("not an array: {other:?}"),
        };
        let tokens = m.get("tokenizer.ggml.tokens").unwrap().clone();
        let extra: Vec<Value> = (0..4)
            .map(|i| Value::String(format!("[EXTRA{i}]")))
            .collect();
        m.set("tokenizer.ggml.tokens", extend(&tokens, extra));
        if let Some(types) = m.get("tokenizer.ggml.token_type").cloned() {
            m.set(
                "tokenizer.ggml.token_type",
                extend(&types, vec![Value::I32(1); 4]),
            );
        }
    });
    let stderr = kiln_err(&[
        "generate", "-m", &bad, "-p", "ROMEO:", "-n", "2", "--device", "cpu",
    ]);
    assert!(
        stderr.contains("4100") && stderr.contains("4096") && stderr.contains("token_embd"),
        "{stderr}"
    );
}
