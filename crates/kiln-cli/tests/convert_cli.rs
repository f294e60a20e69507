//! `kiln convert`, run as the built binary on the project's own model.

use kiln_core::DType;
use kiln_gguf::Gguf;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("the kiln binary runs")
}

fn shakespeare_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shakespeare-tiny")
}

#[test]
fn converts_the_shakespeare_model_to_q8_0() {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("convert-cli-q8_0.gguf");
    let dir = shakespeare_dir();
    let run = kiln(&[
        "convert",
        dir.to_str().unwrap(),
        out.to_str().unwrap(),
        "--type",
        "q8_0",
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("llama 6 layers") && stdout.contains("43 q8_0"),
        "{stdout}"
    );
    let file = Gguf::open(&out).unwrap();
    assert_eq!(file.metadata().get_u32("general.file_type").unwrap(), 7);
    let q = file.tensor("blk.5.attn_q.weight").unwrap();
    assert_eq!(q.info.dtype(), DType::Q8_0);
    assert_eq!(q.info.shape(), [384, 384]);
}

#[test]
fn a_missing_checkpoint_is_a_clear_error() {
    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-checkpoint");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("never-written.gguf");
    let run = kiln(&["convert", missing.to_str().unwrap(), out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("no-such-checkpoint") && stderr.contains("not a directory"),
        "{stderr}"
    );
    assert!(!out.exists());
}
