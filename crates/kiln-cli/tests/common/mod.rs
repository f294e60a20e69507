//! Helpers shared by the CLI tests that run the built `kiln` binary on the
//! project's small model.

#![allow(dead_code)] // each test binary uses some of these

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// A path under the tests' temporary directory (shared by every test binary of the
/// target directory, so names carry the test file's prefix).
pub fn temp_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// `kiln ARGS` as a command, with `RUST_LOG` cleared so that tests see the default
/// log level unless they set it.
pub fn kiln_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args).env_remove("RUST_LOG");
    cmd
}

/// Runs `kiln ARGS`.
pub fn kiln(args: &[&str]) -> Output {
    kiln_command(args).output().expect("the kiln binary runs")
}

/// stdout and stderr of `out`, as text.
pub fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `kiln ARGS`, which must succeed; returns stdout and stderr.
pub fn kiln_ok(args: &[&str]) -> (String, String) {
    let out = kiln(args);
    let (stdout, stderr) = texts(&out);
    assert!(
        out.status.success(),
        "kiln {args:?} failed ({}): {stderr}",
        out.status
    );
    (stdout, stderr)
}

/// Runs `kiln ARGS`, which must fail; returns stderr.
pub fn kiln_err(args: &[&str]) -> String {
    let out = kiln(args);
    let (stdout, stderr) = texts(&out);
    assert!(
        !out.status.success(),
        "kiln {args:?} succeeded: {stdout}{stderr}"
    );
    stderr
}

/// The project's small model directory.
pub fn shakespeare_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shakespeare-tiny")
}

/// The small model converted to GGUF (f16) by `kiln convert`, once per test
/// binary, as `NAME`.
pub fn small_model(name: &str) -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = temp_path(name);
        let dir = shakespeare_dir();
        kiln_ok(&["convert", dir.to_str().unwrap(), path.to_str().unwrap()]);
        path.to_str().unwrap().to_owned()
    })
}
