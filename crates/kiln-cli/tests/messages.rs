//! What `kiln` says about the user's files and flags: `inspect` on a directory and
//! into a closed pipe, warnings through `tracing` (shown by default, filtered by
//! `RUST_LOG`, debug messages with `-v`), and `--verbose` in sentences.

mod common;
use common::{kiln, kiln_command, kiln_err, kiln_ok, small_model, temp_path, texts};
use kiln_gguf::{Gguf, GgufWriter, TensorDesc};
use std::io::Read;
use std::process::Stdio;

fn model() -> &'static str {
    small_model("messages-small.gguf")
}

#[test]
fn inspect_on_a_directory_says_it_is_a_directory() {
    let dir = common::shakespeare_dir();
    let stderr = kiln_err(&["inspect", dir.to_str().unwrap()]);
    assert!(stderr.contains("is a directory"), "{stderr}");
    assert!(!stderr.contains("No such device"), "{stderr}");
}

#[test]
fn inspect_into_a_closed_pipe_exits_quietly() {
    // Every value of the embedding table: megabytes, far more than a pipe buffers,
    // so the writer meets the closed pipe whenever the reader closes it.
    let mut child = kiln_command(&[
        "inspect",
        model(),
        "--tensor",
        "token_embd.weight",
        "--json",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("kiln runs");
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).expect("kiln starts writing");
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let (_, stderr) = texts(&out);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");
}

/// The small model with `extra` rows of zeros appended to its (tied) embedding
/// table: a vocabulary shorter than the table, which runs but can choose ids that
/// have no text.
fn padded_embedding_model(extra: usize) -> String {
    let path = temp_path("messages-padded-embedding.gguf");
    let src = Gguf::open(model()).unwrap();
    let descs: Vec<TensorDesc> = src
        .tensor_infos()
        .iter()
        .map(|t| {
            let mut shape = t.shape().to_vec();
            if t.name() == "token_embd.weight" {
                shape[0] += extra;
            }
            TensorDesc::new(t.name(), t.dtype(), &shape)
        })
        .collect();
    let mut w = GgufWriter::create(&path, src.metadata(), &descs).unwrap();
    for t in src.tensors() {
        w.write_tensor_data(t.data).unwrap();
        if t.info.name() == "token_embd.weight" {
            let row = t.data.len() / t.info.shape()[0];
            w.write_tensor_data(&vec![0u8; extra * row]).unwrap();
        }
    }
    w.finish().unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn warnings_go_through_tracing_shown_by_default_and_filtered_by_rust_log() {
    let padded = padded_embedding_model(4);
    let args = [
        "generate",
        padded.as_str(),
        "-p",
        "ROMEO:",
        "-n",
        "2",
        "--temp",
        "0",
        "--device",
        "cpu",
    ];
    let mut args = args.to_vec();
    args.insert(1, "-m");
    let (_, stderr) = kiln_ok(&args);
    assert!(
        stderr.contains("warning:") && stderr.contains("4096") && stderr.contains("4100"),
        "{stderr}"
    );
    let quiet = kiln_command(&args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let (_, stderr) = texts(&quiet);
    assert!(quiet.status.success(), "{stderr}");
    assert!(
        !stderr.contains("warning:"),
        "RUST_LOG=error hides warnings: {stderr}"
    );
}

#[test]
fn verbose_shows_debug_messages_and_rust_log_does_too() {
    let base = [
        "generate",
        "-m",
        model(),
        "-p",
        "ROMEO:",
        "-n",
        "2",
        "--temp",
        "0",
        "--device",
        "cpu",
    ];
    let (_, plain) = kiln_ok(&base);
    assert!(!plain.contains("debug:"), "{plain}");
    let mut verbose = base.to_vec();
    verbose.push("-v");
    let (_, stderr) = kiln_ok(&verbose);
    assert!(stderr.contains("debug:"), "{stderr}");
    let logged = kiln_command(&base)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let (_, stderr) = texts(&logged);
    assert!(stderr.contains("debug:"), "{stderr}");
}

#[test]
fn verbose_describes_the_model_in_words() {
    let (_, stderr) = kiln_ok(&[
        "generate",
        "-m",
        model(),
        "-p",
        "ROMEO:",
        "-n",
        "2",
        "--temp",
        "0",
        "--device",
        "cpu",
        "--verbose",
    ]);
    assert!(!stderr.contains("ModelConfig"), "no Rust struct: {stderr}");
    assert!(!stderr.contains("RopeParams"), "no Rust struct: {stderr}");
    assert!(
        stderr.contains("6 layers") && stderr.contains("trained on 512"),
        "{stderr}"
    );
}

#[test]
fn an_invalid_rust_log_is_named() {
    let out = kiln_command(&["version"])
        .env("RUST_LOG", "kiln=loud")
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("kiln "), "{stdout}");
    assert!(stderr.contains("RUST_LOG"), "{stderr}");
    let _ = kiln(&["version"]);
}
