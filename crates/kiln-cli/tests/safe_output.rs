//! Every command that writes a file (quantize, convert, synth -o, inspect --out)
//! refuses to write over its inputs by any path, refuses outputs that are not
//! regular files, leaves a pre-existing output as it was when it fails, and leaves
//! no temporary files behind; quantize and convert give weight matrices the same
//! types. Run as the built binary.

use kiln_core::DType;
use kiln_gguf::{keys, Gguf, GgufFile, GgufWriter, Metadata, TensorDesc};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A command that has not finished after this long is killed and fails the test
/// (writing into a FIFO without a reader blocks forever).
const TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `kiln ARGS` to completion (or the timeout), returning its output.
fn kiln(args: &[&Path]) -> Output {
    let logs = TempDir::new().unwrap();
    let (out_path, err_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("the kiln binary runs");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kiln {args:?} did not finish in {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(out_path).unwrap(),
        stderr: std::fs::read(err_path).unwrap(),
    }
}

/// `kiln ARGS` must fail; returns its stderr.
fn kiln_fails(args: &[&Path]) -> String {
    let out = kiln(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "kiln {args:?} succeeded; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.status.code().is_some(),
        "kiln {args:?} was killed by a signal ({:?}); stderr: {stderr}",
        out.status
    );
    stderr
}

/// `kiln ARGS` must succeed; returns its stdout.
fn kiln_ok(args: &[&Path]) -> String {
    let out = kiln(args);
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn p(s: &str) -> &Path {
    Path::new(s)
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn shakespeare_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shakespeare-tiny")
}

/// A copy of the project's checkpoint in a fresh directory.
fn checkpoint_copy() -> TempDir {
    let dir = TempDir::new().unwrap();
    for entry in std::fs::read_dir(shakespeare_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Writes a small GGUF model: f32 weight matrices whose rows are whole q4_0/q8_0
/// blocks, a norm; with `nan`, the last matrix holds a NaN, which no block format
/// can store, so quantizing it fails after the earlier tensors were written.
fn write_model(path: &Path, nan: bool) {
    let mut m = Metadata::new();
    m.set(keys::ARCHITECTURE, "llama");
    m.set("llama.block_count", 1u32);
    let shapes: [(&str, &[usize]); 4] = [
        ("token_embd.weight", &[64, 64]),
        ("blk.0.attn_norm.weight", &[64]),
        ("blk.0.attn_q.weight", &[64, 64]),
        ("blk.0.ffn_down.weight", &[64, 128]),
    ];
    let descs: Vec<TensorDesc> = shapes
        .iter()
        .map(|(n, s)| TensorDesc::new(*n, DType::F32, s))
        .collect();
    let mut w = GgufWriter::create(path, &m, &descs).unwrap();
    for (i, d) in descs.iter().enumerate() {
        let n: usize = d.shape.iter().product();
        let mut values: Vec<f32> = (0..n).map(|j| ((i * n + j) as f32 * 0.37).sin()).collect();
        if nan && i == descs.len() - 1 {
            values[n / 2] = f32::NAN;
        }
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_tensor_data(&bytes).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn quantize_refuses_a_hard_link_to_its_input() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("in.gguf");
    write_model(&input, false);
    let before = std::fs::read(&input).unwrap();
    let link = dir.path().join("link.gguf");
    std::fs::hard_link(&input, &link).unwrap();

    let err = kiln_fails(&[p("quantize"), &input, &link, p("--type"), p("q4_0")]);
    assert!(
        err.contains("link.gguf") && err.contains("in.gguf") && err.contains("hard link"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&input).unwrap(),
        before,
        "the input is intact"
    );
    assert_eq!(names(dir.path()), ["in.gguf", "link.gguf"]);
}

#[cfg(unix)]
#[test]
fn outputs_that_are_symbolic_links_to_an_input_are_refused() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("in.gguf");
    write_model(&input, false);
    let before = std::fs::read(&input).unwrap();
    let link = dir.path().join("link.gguf");
    std::os::unix::fs::symlink(&input, &link).unwrap();

    let quantize_err = kiln_fails(&[p("quantize"), &input, &link, p("--type"), p("q8_0")]);
    let inspect_err = kiln_fails(&[
        p("inspect"),
        &input,
        p("--tensor"),
        p("blk.0.attn_q.weight"),
        p("--out"),
        &link,
    ]);
    assert_eq!(
        std::fs::read(&input).unwrap(),
        before,
        "the input is intact"
    );
    for err in [quantize_err, inspect_err] {
        assert!(
            err.contains("link.gguf") && err.contains("symbolic link") && err.contains("in.gguf"),
            "{err}"
        );
    }

    // A link elsewhere to the checkpoint's weights.
    let checkpoint = checkpoint_copy();
    let weights = checkpoint.path().join("model.safetensors");
    let weights_before = std::fs::read(&weights).unwrap();
    let weights_link = dir.path().join("weights.gguf");
    std::os::unix::fs::symlink(&weights, &weights_link).unwrap();
    let err = kiln_fails(&[p("convert"), checkpoint.path(), &weights_link]);
    assert!(err.contains("model.safetensors"), "{err}");
    assert_eq!(std::fs::read(&weights).unwrap(), weights_before);
    assert!(std::fs::symlink_metadata(&weights_link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(names(dir.path()), ["in.gguf", "link.gguf", "weights.gguf"]);
}

#[test]
fn convert_refuses_to_write_over_its_checkpoint() {
    let checkpoint = checkpoint_copy();
    let dir = checkpoint.path();
    let files = names(dir);
    let contents: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    for target in ["model.safetensors", "config.json", "tokenizer.json"] {
        let err = kiln_fails(&[p("convert"), dir, &dir.join(target), p("--type"), p("q8_0")]);
        assert!(
            err.contains(target) && err.contains("is the input file"),
            "{target}: {err}"
        );
    }
    // The same file through a hard link outside the directory.
    let elsewhere = TempDir::new().unwrap();
    let link = elsewhere.path().join("model.gguf");
    std::fs::hard_link(dir.join("model.safetensors"), &link).unwrap();
    let err = kiln_fails(&[p("convert"), dir, &link]);
    assert!(err.contains("hard link"), "{err}");

    assert_eq!(names(dir), files, "no file added or removed");
    for (f, bytes) in files.iter().zip(&contents) {
        assert!(std::fs::read(dir.join(f)).unwrap() == *bytes, "{f} changed");
    }
    // A new file in the checkpoint directory is fine.
    let gguf = dir.join("model.gguf");
    kiln_ok(&[p("convert"), dir, &gguf, p("--type"), p("q8_0")]);
    assert!(Gguf::open(&gguf).is_ok());
}

#[cfg(unix)]
#[test]
fn outputs_that_are_not_regular_files_are_refused_and_left_in_place() {
    use std::os::unix::fs::FileTypeExt;
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("in.gguf");
    write_model(&input, false);
    let fifo = dir.path().join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo");
    let subdir = dir.path().join("subdir");
    std::fs::create_dir(&subdir).unwrap();
    std::fs::write(subdir.join("keep"), b"keep").unwrap();
    let checkpoint = shakespeare_dir();

    for target in [&fifo, &subdir] {
        let kind = if target == &fifo {
            "a FIFO"
        } else {
            "a directory"
        };
        let runs: [Vec<&Path>; 4] = [
            vec![p("quantize"), &input, target, p("--type"), p("q8_0")],
            vec![p("convert"), &checkpoint, target, p("--type"), p("q8_0")],
            vec![
                p("inspect"),
                &input,
                p("--tensor"),
                p("blk.0.attn_q.weight"),
                p("--out"),
                target,
            ],
            vec![
                p("synth"),
                p("--preset"),
                p("qwen2.5-0.5b"),
                p("-o"),
                target,
            ],
        ];
        for args in runs {
            let err = kiln_fails(&args);
            assert!(
                err.contains(&format!("is {kind}, not a regular file")),
                "{args:?}: {err}"
            );
        }
    }
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(names(&subdir), ["keep"]);
    assert_eq!(names(dir.path()), ["fifo", "in.gguf", "subdir"]);
}

#[test]
fn a_failed_write_leaves_the_old_output_and_no_temporary_files() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("nan.gguf");
    write_model(&input, true);
    let output = dir.path().join("out.gguf");
    std::fs::write(&output, b"an earlier result, to be kept").unwrap();

    // Fails at the last tensor, after the others were written.
    let nan_err = kiln_fails(&[p("quantize"), &input, &output, p("--type"), p("q8_0")]);
    // An unsupported type fails before anything is written.
    let type_err = kiln_fails(&[p("quantize"), &input, &output, p("--type"), p("q8_1")]);
    assert_eq!(
        std::fs::read(&output).unwrap(),
        b"an earlier result, to be kept"
    );
    assert_eq!(names(dir.path()), ["nan.gguf", "out.gguf"]);
    assert!(nan_err.contains("blk.0.ffn_down.weight"), "{nan_err}");
    assert!(type_err.contains("q8_1"), "{type_err}");

    // convert: an infinity in the last layer's weights fails mid-file too.
    let checkpoint = checkpoint_copy();
    put_f16_infinity(
        &checkpoint.path().join("model.safetensors"),
        "model.layers.5.self_attn.v_proj.weight",
    );
    let err = kiln_fails(&[
        p("convert"),
        checkpoint.path(),
        &output,
        p("--type"),
        p("q8_0"),
    ]);
    assert_eq!(
        std::fs::read(&output).unwrap(),
        b"an earlier result, to be kept"
    );
    assert_eq!(names(dir.path()), ["nan.gguf", "out.gguf"]);
    assert!(err.contains("blk.5.attn_v.weight"), "{err}");
}

/// Sets the first element of the f16 tensor `name` of a safetensors file to +inf.
fn put_f16_infinity(path: &Path, name: &str) {
    let mut bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(header[name]["dtype"], "F16", "{name}");
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize + 8 + header_len;
    bytes[start..start + 2].copy_from_slice(&0x7C00u16.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// Each tensor's name and type, and the file type.
fn types(path: &Path) -> (Vec<(String, DType)>, u32) {
    let file: GgufFile = Gguf::open(path).unwrap();
    let tensors = file
        .tensor_infos()
        .iter()
        .map(|t| (t.name().to_owned(), t.dtype()))
        .collect();
    (tensors, file.metadata().get_u32(keys::FILE_TYPE).unwrap())
}

#[test]
fn quantize_and_convert_give_q4_k_the_same_tensor_types() {
    // The project's model has rows of 384 (not whole 256-element super-blocks) and
    // of 1024.
    let dir = TempDir::new().unwrap();
    let checkpoint = shakespeare_dir();
    let f16 = dir.path().join("f16.gguf");
    let converted = dir.path().join("converted-q4_k.gguf");
    let quantized = dir.path().join("quantized-q4_k.gguf");
    kiln_ok(&[p("convert"), &checkpoint, &f16, p("--type"), p("f16")]);
    kiln_ok(&[
        p("convert"),
        &checkpoint,
        &converted,
        p("--type"),
        p("q4_k"),
    ]);
    let stdout = kiln_ok(&[p("quantize"), &f16, &quantized, p("--type"), p("q4_k")]);

    let (want, want_file_type) = types(&converted);
    let (got, got_file_type) = types(&quantized);
    assert_eq!(got, want);
    assert_eq!(got_file_type, want_file_type);
    assert_eq!(got_file_type, 14, "mostly q4_k");
    let count = |d: DType| got.iter().filter(|(_, t)| *t == d).count();
    assert!(count(DType::Q4K) > 0 && count(DType::Q5_0) > 0, "{got:?}");
    assert!(
        stdout.contains(&format!(
            "where rows are not whole q4_k blocks {} to q5_0;",
            count(DType::Q5_0)
        )),
        "{stdout}"
    );
}
