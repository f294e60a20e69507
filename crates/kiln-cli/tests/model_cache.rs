//! `kiln generate` without `-m` converts the project's small model once into the
//! cache directory and reuses the file; conversions that fail or die leave no
//! partial file behind; the model is found from the checkout or next to the
//! executable, and its absence is an error asking for `-m`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The checkout's root (the README runs kiln from there).
fn checkout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A fresh directory for one test.
fn fresh_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("model-cache-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `kiln generate` of a few greedy tokens of the default model, run by `exe` from
/// `cwd` with kiln's cache in `cache`.
fn generate(exe: &Path, cwd: &Path, cache: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args([
        "generate", "-p", "ROMEO:", "-n", "3", "--temp", "0", "--device", "cpu",
    ])
    .current_dir(cwd)
    .env("KILN_CACHE_DIR", cache);
    cmd
}

fn kiln() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kiln"))
}

fn assert_ok(what: &str, run: &Output) {
    assert!(
        run.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// The names in `dir`, sorted (none when it does not exist).
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Checks that `models` holds exactly one converted model and nothing else;
/// returns its path.
fn the_one_model(models: &Path) -> PathBuf {
    let names = names(models);
    assert!(
        names.len() == 1
            && names[0].starts_with("shakespeare-tiny-")
            && names[0].ends_with(".gguf"),
        "{}: {names:?}",
        models.display()
    );
    models.join(&names[0])
}

#[test]
fn two_runs_convert_the_default_model_once() {
    let cache = fresh_dir("twice");
    let models = cache.join("models");
    let first = generate(kiln(), &checkout(), &cache).output().unwrap();
    assert_ok("first run", &first);
    let model = the_one_model(&models);
    let stamp = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.ino(), m.mtime(), m.mtime_nsec(), m.len())
    };
    let converted = stamp(&model);
    let second = generate(kiln(), &checkout(), &cache).output().unwrap();
    assert_ok("second run", &second);
    assert_eq!(the_one_model(&models), model);
    assert_eq!(stamp(&model), converted, "the second run rewrote the file");
    assert_eq!(
        first.stdout, second.stdout,
        "greedy text from the cached file differs"
    );
}

/// The id of a process that has exited.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn a_run_cleans_up_after_conversions_that_died() {
    let cache = fresh_dir("stale");
    let models = cache.join("models");
    std::fs::create_dir_all(&models).unwrap();
    // What a run killed during its conversion leaves: its file under a temporary
    // name, and the writer's partial file.
    let pid = dead_pid();
    let stale = [
        format!("shakespeare-tiny-0123.gguf.tmp-{pid}-17"),
        format!("shakespeare-tiny-0123.gguf.tmp-{pid}-18.partial"),
    ];
    for name in &stale {
        std::fs::write(models.join(name), vec![0u8; 4096]).unwrap();
    }
    let run = generate(kiln(), &checkout(), &cache).output().unwrap();
    assert_ok("run after a killed one", &run);
    the_one_model(&models);
}

#[test]
fn a_conversion_killed_mid_way_leaves_only_a_temporary_file_the_next_run_removes() {
    // Kill a run as soon as its temporary file appears. The conversion is short;
    // a few attempts make catching it certain in practice.
    for attempt in 0..8 {
        let cache = fresh_dir(&format!("killed-{attempt}"));
        let models = cache.join("models");
        let mut child = generate(kiln(), &checkout(), &cache)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut caught = false;
        while Instant::now() < deadline {
            if names(&models).iter().any(|n| n.contains(".tmp-")) {
                child.kill().unwrap();
                caught = true;
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        child.wait().unwrap();
        if !caught {
            continue;
        }
        let left = names(&models);
        assert!(
            left.iter().all(|n| n.contains(".tmp-")),
            "a killed conversion left a file under its final name: {left:?}"
        );
        let run = generate(kiln(), &checkout(), &cache).output().unwrap();
        assert_ok("run after the killed one", &run);
        the_one_model(&models);
        return;
    }
    panic!("no attempt caught a conversion under way");
}

#[test]
fn a_failed_conversion_leaves_no_file() {
    let cache = fresh_dir("failed");
    let models = cache.join("models");
    assert_ok(
        "first run",
        &generate(kiln(), &checkout(), &cache).output().unwrap(),
    );
    // Where the converted file must go stands a directory: the conversion runs,
    // and renaming its file into place fails.
    let model = the_one_model(&models);
    std::fs::remove_file(&model).unwrap();
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("occupied"), b"x").unwrap();
    let run = generate(kiln(), &checkout(), &cache).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert_eq!(
        names(&models),
        [model.file_name().unwrap().to_string_lossy().into_owned()],
        "a failed conversion left files behind ({stderr})"
    );
}

/// A copy of the kiln executable at `dir/kiln` (a hard link where possible), of the
/// file itself where `kiln()` is a symbolic link, so that the copy runs as `dir/kiln`.
fn kiln_at(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let exe = dir.join("kiln");
    let real = std::fs::canonicalize(kiln()).unwrap();
    if std::fs::hard_link(&real, &exe).is_err() {
        std::fs::copy(&real, &exe).unwrap();
    }
    exe
}

#[test]
fn without_a_checkout_around_generate_asks_for_a_model() {
    // Outside any checkout: the test's own target directory may lie inside one.
    let root = std::env::temp_dir().join(format!("kiln-nowhere-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let exe = kiln_at(&root.join("bin"));
    let run = generate(&exe, &root, &root.join("cache")).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pass -m MODEL") && stderr.contains("models/shakespeare-tiny"),
        "{stderr}"
    );
    assert!(names(&root.join("cache")).is_empty());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn the_default_model_is_found_next_to_the_executable() {
    let root = fresh_dir("beside");
    // A checkout elsewhere: its model, and kiln built into its target directory.
    let elsewhere = root.join("checkout");
    std::fs::create_dir_all(elsewhere.join("models")).unwrap();
    std::os::unix::fs::symlink(
        checkout().join("models/shakespeare-tiny"),
        elsewhere.join("models/shakespeare-tiny"),
    )
    .unwrap();
    let exe = kiln_at(&elsewhere.join("target/release"));
    let cwd = root.join("somewhere-else");
    std::fs::create_dir_all(&cwd).unwrap();
    let run = generate(&exe, &cwd, &root.join("cache")).output().unwrap();
    assert_ok("kiln beside a checkout", &run);
    the_one_model(&root.join("cache/models"));
}
