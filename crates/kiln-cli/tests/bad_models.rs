//! Malformed model files given to `kiln generate` and `kiln bench` (run as the built
//! binary) end in an error naming the tensor and the shape the model needs, never a
//! panic.

#[path = "../../kiln-models/tests/common/mod.rs"]
mod common;

use common::{with_shape, Tiny};
use std::path::PathBuf;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("the kiln binary runs")
}

/// Writes `bytes` to a file called `name` in the target's temp dir.
fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Checks that `run` failed with an error (exit status 1, not a panic's 101) whose
/// text holds each of `wanted`.
fn assert_error(what: &str, run: &Output, wanted: &[&str]) {
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{what}: stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    for w in wanted {
        assert!(stderr.contains(w), "{what}: no {w:?} in: {stderr}");
    }
}

#[test]
fn generate_and_bench_report_misshapen_tensors_by_name() {
    let tiny = Tiny::LLAMA;
    let cases: [(&str, Option<&[usize]>, &str); 4] = [
        ("token_embd.weight", Some(&[]), "[vocab, 8]"),
        ("blk.0.attn_q.weight", Some(&[8, 16]), "[8, 8]"),
        ("output_norm.weight", None, "[8]"),
        ("blk.0.attn_norm.weight", Some(&[1, 1, 8]), "[8]"),
    ];
    for (i, (name, shape, expected)) in cases.into_iter().enumerate() {
        let path = file(
            &format!("bad-model-{i}.gguf"),
            &with_shape(&tiny, name, shape),
        );
        let path = path.to_str().unwrap();
        let quoted = format!("{name:?}");
        let what = format!("{name} as {shape:?}");
        let run = kiln(&[
            "generate", "-m", path, "-p", "ROMEO:", "-n", "2", "--device", "cpu",
        ]);
        assert_error(&format!("generate, {what}"), &run, &[&quoted, expected]);
        let run = kiln(&["bench", "-m", path, "-p", "4", "-n", "2", "--device", "cpu"]);
        assert_error(&format!("bench, {what}"), &run, &[&quoted, expected]);
    }
}

#[test]
fn generate_runs_the_tiny_model_and_rejects_a_tokenizer_larger_than_the_model() {
    let tiny = Tiny::LLAMA;
    let path = file("tiny-llama.gguf", &tiny.bytes());
    let path = path.to_str().unwrap();
    let run = kiln(&[
        "generate", "-m", path, "-p", "ROMEO:", "-n", "3", "--device", "cpu", "--temp", "0",
    ]);
    assert!(
        run.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );

    let tensors: Vec<(String, Vec<usize>)> = tiny
        .tensors()
        .into_iter()
        .map(|(n, s)| match n.as_str() {
            "token_embd.weight" | "output.weight" => (n, vec![10, 8]),
            _ => (n, s),
        })
        .collect();
    let bytes = common::gguf_bytes(&tiny.metadata(), &tensors, |_| kiln_core::DType::F32);
    let path = file("tiny-llama-small-embedding.gguf", &bytes);
    let run = kiln(&[
        "generate",
        "-m",
        path.to_str().unwrap(),
        "-p",
        "ROMEO:",
        "--device",
        "cpu",
    ]);
    assert_error(
        "generate, 12 tokens for 10 rows",
        &run,
        &["tokenizer.ggml.tokens", "token_embd.weight"],
    );
}
