//! A model whose metadata holds a 64M-element array: `kiln inspect` (text and
//! JSON), `generate` and `quantize` run on it with their heap and other private
//! memory limited to 512 MiB (`ulimit -d`), where materialising the array as
//! values took gigabytes.

#![cfg(target_os = "linux")]

#[path = "../../kiln-models/tests/common/mod.rs"]
mod common;

use common::{gguf_bytes, Tiny};
use kiln_core::DType;
use kiln_gguf::{Gguf, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Items of the array: as many as the file that exposed the problem held.
const N: usize = 64 << 20;

/// Private writable memory `kiln` may map, in KiB: heap, anonymous maps, stacks
/// (not the memory-mapped model file).
const LIMIT_KIB: usize = 512 << 10;

/// Runs `kiln args` under the memory limit; with `quiet`, its stdout goes nowhere.
fn kiln_limited(args: &[&str], quiet: bool) -> Output {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -d {LIMIT_KIB} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(args);
    if quiet {
        cmd.stdout(Stdio::null());
    }
    cmd.output().expect("sh runs kiln")
}

fn assert_ok(what: &str, run: &Output) {
    assert!(
        run.status.success(),
        "{what} failed under a {LIMIT_KIB} KiB data limit ({}): {}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
}

/// The tiny llama with a 64M-element u8 array in its metadata.
fn write_model(path: &Path) {
    let tiny = Tiny::LLAMA;
    let mut md = tiny.metadata();
    md.set("junk.large_array", Value::from(vec![7u8; N]));
    let bytes = gguf_bytes(&md, &tiny.tensors(), |_| DType::F32);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn commands_read_a_64m_element_array_in_bounded_memory() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join("large-metadata-array.gguf");
    write_model(&path);
    let p = path.to_str().unwrap();

    let run = kiln_limited(&["inspect", p], false);
    assert_ok("inspect", &run);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains(&format!("[u8; {N}]")) && stdout.contains("[7, 7, 7, 7, 7, 7, ..."),
        "{stdout}"
    );

    assert_ok(
        "inspect --json",
        &kiln_limited(&["inspect", "--json", p], true),
    );

    let run = kiln_limited(
        &[
            "generate", "-m", p, "-p", "ROMEO:", "-n", "2", "--device", "cpu",
        ],
        false,
    );
    assert_ok("generate", &run);

    let out = dir.join("large-metadata-array-q8_0.gguf");
    let run = kiln_limited(
        &["quantize", p, out.to_str().unwrap(), "--type", "q8_0"],
        false,
    );
    assert_ok("quantize", &run);
    let quantized = Gguf::open(&out).unwrap();
    let array = quantized.metadata().get_array("junk.large_array").unwrap();
    assert_eq!(array.len(), N);
    assert_eq!(array.get(N - 1), Some(Value::U8(7)));
    drop(quantized);
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&path);
}
