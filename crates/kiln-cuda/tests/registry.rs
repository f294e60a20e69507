//! The kernel registry's logic with a fake compiler: keys, single flight, the disk
//! cache's modes and its recovery from corrupt files. Runs without a GPU.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::Duration;

use kiln_core::{Error, Result};
use kiln_cuda::registry::{
    cache_key, decode_cache_file, encode_cache_file, CacheConfig, CacheMode, CompiledKernel,
    ImageKind, KernelCompiler, KernelRegistry, KernelSource, KernelSpec,
};

const HEADERS: &[KernelSource] = &[KernelSource {
    name: "common.cuh",
    text: "#define ONE 1\n",
}];

fn spec(key: &str) -> KernelSpec {
    KernelSpec {
        key: key.to_string(),
        source: KernelSource {
            name: "fake.cu",
            text: "template <int N> __global__ void k() {}\n",
        },
        headers: HEADERS,
        name_expression: format!("k<{}>", key.len()),
        options: vec!["-DBLOCK=256".into()],
    }
}

/// Compiles in flight, and the signal that the count changed.
type InFlight = Arc<(Mutex<usize>, Condvar)>;

/// A loaded fake kernel: the image it was loaded from.
#[derive(Debug, PartialEq)]
struct FakeKernel {
    image: Vec<u8>,
}

/// A compiler whose "image" is the name expression's bytes; counts compiles and can
/// be told to reject loads, wait in compile, or fail to compile.
#[derive(Default)]
struct FakeCompiler {
    version: String,
    target: String,
    compiles: AtomicUsize,
    reject_next_load: AtomicBool,
    fail_compile: AtomicBool,
    compile_delay: Option<Duration>,
    /// When set, each compile waits (up to 5 s) until this many compiles are in flight.
    rendezvous: Option<(usize, InFlight)>,
    rendezvous_met: AtomicBool,
}

impl FakeCompiler {
    fn new() -> Self {
        Self {
            version: "fake 1.0".into(),
            target: "sm_90a".into(),
            ..Default::default()
        }
    }

    fn image_for(spec: &KernelSpec) -> Vec<u8> {
        format!("IMAGE:{}", spec.name_expression).into_bytes()
    }
}

impl KernelCompiler for FakeCompiler {
    type Kernel = FakeKernel;

    fn version(&self) -> String {
        self.version.clone()
    }
    fn target(&self) -> String {
        self.target.clone()
    }
    fn base_options(&self) -> Vec<String> {
        vec!["--std=c++17".into()]
    }

    fn compile(&self, spec: &KernelSpec) -> Result<CompiledKernel> {
        self.compiles.fetch_add(1, Ordering::SeqCst);
        if let Some(delay) = self.compile_delay {
            std::thread::sleep(delay);
        }
        if let Some((n, pair)) = &self.rendezvous {
            let (count, cv) = &**pair;
            let mut c = count.lock().unwrap();
            *c += 1;
            cv.notify_all();
            let (c, timeout) = cv
                .wait_timeout_while(c, Duration::from_secs(5), |c| *c < *n)
                .unwrap();
            if !timeout.timed_out() && *c >= *n {
                self.rendezvous_met.store(true, Ordering::SeqCst);
            }
        }
        if self.fail_compile.load(Ordering::SeqCst) {
            return Err(Error::Backend {
                backend: "fake",
                msg: format!("{}: error: expected ';'", spec.key),
            });
        }
        Ok(CompiledKernel {
            kind: ImageKind::Cubin,
            lowered_name: format!("_Z1k{}", spec.key.len()),
            image: Self::image_for(spec),
        })
    }

    fn load(&self, spec: &KernelSpec, compiled: &CompiledKernel) -> Result<FakeKernel> {
        if self.reject_next_load.swap(false, Ordering::SeqCst) {
            return Err(Error::Backend {
                backend: "fake",
                msg: "CUDA_ERROR_INVALID_IMAGE".into(),
            });
        }
        if compiled.image != Self::image_for(spec) {
            return Err(Error::Backend {
                backend: "fake",
                msg: "image does not match its spec".into(),
            });
        }
        Ok(FakeKernel {
            image: compiled.image.clone(),
        })
    }
}

fn key_of(s: &KernelSpec) -> String {
    cache_key(s, "nvrtc 13.0", "sm_90a", &["--std=c++17".to_string()])
}

/// Every file in `dir` with its bytes, sorted by name.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

#[test]
fn cache_key_is_stable_and_ignores_option_order_and_whitespace() {
    let a = spec("add");
    let mut b = a.clone();
    b.options = vec!["  -DBLOCK=256 ".into(), String::new(), "-DBLOCK=256".into()];
    assert_eq!(key_of(&a), key_of(&a.clone()));
    assert_eq!(key_of(&a), key_of(&b));
    let k = key_of(&a);
    assert_eq!(k.len(), 64, "a SHA-256 in hex: {k}");
    assert!(k.bytes().all(|c| c.is_ascii_hexdigit()));

    let mut two = a.clone();
    two.options = vec!["-DX=1".into(), "-DY=2".into()];
    let mut two_swapped = a.clone();
    two_swapped.options = vec!["-DY=2".into(), "-DX=1".into()];
    assert_eq!(key_of(&two), key_of(&two_swapped));
}

#[test]
fn cache_key_changes_with_every_input() {
    let base = spec("add");
    let base_key = key_of(&base);
    let mut variants: Vec<(&str, String)> = Vec::new();

    let mut s = base.clone();
    s.source.text = "template <int N> __global__ void k() { }\n";
    variants.push(("source text", key_of(&s)));

    let mut s = base.clone();
    s.source.name = "other.cu";
    variants.push(("source name", key_of(&s)));

    const EDITED_HEADER: &[KernelSource] = &[KernelSource {
        name: "common.cuh",
        text: "#define ONE 2\n",
    }];
    let mut s = base.clone();
    s.headers = EDITED_HEADER;
    variants.push(("header text", key_of(&s)));

    const MORE_HEADERS: &[KernelSource] = &[
        KernelSource {
            name: "common.cuh",
            text: "#define ONE 1\n",
        },
        KernelSource {
            name: "quant.cuh",
            text: "",
        },
    ];
    let mut s = base.clone();
    s.headers = MORE_HEADERS;
    variants.push(("added header", key_of(&s)));

    let mut s = base.clone();
    s.options.push("-DFUSE=1".into());
    variants.push(("options", key_of(&s)));

    let mut s = base.clone();
    s.name_expression = "k<99>".into();
    variants.push(("name expression", key_of(&s)));

    variants.push((
        "arch",
        cache_key(&base, "nvrtc 13.0", "sm_89", &["--std=c++17".to_string()]),
    ));
    variants.push((
        "compiler version",
        cache_key(&base, "nvrtc 13.1", "sm_90a", &["--std=c++17".to_string()]),
    ));
    variants.push((
        "compiler options",
        cache_key(&base, "nvrtc 13.0", "sm_90a", &["--std=c++20".to_string()]),
    ));

    for (what, k) in &variants {
        assert_ne!(*k, base_key, "changing the {what} must change the key");
    }
    let mut all: Vec<&String> = variants.iter().map(|(_, k)| k).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), variants.len(), "every variant has its own key");
}

#[test]
fn cache_key_does_not_depend_on_header_order() {
    const AB: &[KernelSource] = &[
        KernelSource {
            name: "a.cuh",
            text: "a",
        },
        KernelSource {
            name: "b.cuh",
            text: "b",
        },
    ];
    const BA: &[KernelSource] = &[
        KernelSource {
            name: "b.cuh",
            text: "b",
        },
        KernelSource {
            name: "a.cuh",
            text: "a",
        },
    ];
    let mut x = spec("add");
    x.headers = AB;
    let mut y = spec("add");
    y.headers = BA;
    assert_eq!(key_of(&x), key_of(&y));
}

#[test]
fn concurrent_requests_for_one_key_compile_once() {
    let dir = tempfile::tempdir().unwrap();
    let compiler = FakeCompiler {
        compile_delay: Some(Duration::from_millis(50)),
        ..FakeCompiler::new()
    };
    let registry = KernelRegistry::new(compiler, CacheConfig::read_write(dir.path()));
    let threads = 16;
    let barrier = Barrier::new(threads);
    let s = spec("rms_norm|weight=1");
    let kernels: Vec<Arc<FakeKernel>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    registry.get(&s).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(registry.compiler().compiles.load(Ordering::SeqCst), 1);
    assert!(kernels.iter().all(|k| Arc::ptr_eq(k, &kernels[0])));
    let stats = registry.stats();
    assert_eq!(stats.modules.len(), 1);
    let m = &stats.modules[0];
    assert_eq!(m.key, "rms_norm|weight=1");
    assert_eq!(
        (m.compiles, m.disk_hits, m.memory_hits),
        (1, 0, threads as u64 - 1)
    );
}

#[test]
fn different_keys_compile_in_parallel() {
    let pair = Arc::new((Mutex::new(0usize), Condvar::new()));
    let compiler = FakeCompiler {
        rendezvous: Some((2, pair)),
        ..FakeCompiler::new()
    };
    let registry = KernelRegistry::new(compiler, CacheConfig::off());
    std::thread::scope(|scope| {
        let a = scope.spawn(|| registry.get(&spec("a")).unwrap());
        let b = scope.spawn(|| registry.get(&spec("bb")).unwrap());
        a.join().unwrap();
        b.join().unwrap();
    });
    assert!(
        registry.compiler().rendezvous_met.load(Ordering::SeqCst),
        "two keys' compiles must overlap in time (no registry-wide lock while compiling)"
    );
}

#[test]
fn second_registry_loads_from_disk_without_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [spec("a"), spec("bb"), spec("ccc")];
    let first = KernelRegistry::new(FakeCompiler::new(), CacheConfig::read_write(dir.path()));
    first.precompile(&specs, |_| {}).unwrap();
    assert_eq!(first.compiler().compiles.load(Ordering::SeqCst), 3);
    assert_eq!(snapshot(dir.path()).len(), 3);

    let second = KernelRegistry::new(FakeCompiler::new(), CacheConfig::read_write(dir.path()));
    for s in &specs {
        let k = second.get(s).unwrap();
        assert_eq!(k.image, FakeCompiler::image_for(s));
    }
    assert_eq!(second.compiler().compiles.load(Ordering::SeqCst), 0);
    let total = second.stats().total();
    assert_eq!((total.disk_hits, total.compiles), (3, 0));
}

#[test]
fn a_new_compiler_version_misses_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec("add");
    let first = KernelRegistry::new(FakeCompiler::new(), CacheConfig::read_write(dir.path()));
    first.get(&s).unwrap();
    let newer = FakeCompiler {
        version: "fake 2.0".into(),
        ..FakeCompiler::new()
    };
    let second = KernelRegistry::new(newer, CacheConfig::read_write(dir.path()));
    second.get(&s).unwrap();
    assert_eq!(second.compiler().compiles.load(Ordering::SeqCst), 1);
    assert_eq!(snapshot(dir.path()).len(), 2);
}

/// Writes a valid cache with `first`, damages the file with `damage`, then checks
/// that a fresh read-write registry recompiles, replaces the file, and that a third
/// registry loads the replacement from disk.
fn check_recovery(damage: impl Fn(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let s = spec("rms_norm|weight=0");
    let first = KernelRegistry::new(FakeCompiler::new(), CacheConfig::read_write(dir.path()));
    first.get(&s).unwrap();
    let path = first.cache_path(&s).unwrap();
    let good = std::fs::read(&path).unwrap();
    damage(&path);
    assert_ne!(
        std::fs::read(&path).unwrap(),
        good,
        "the damage changed the file"
    );

    let second = KernelRegistry::new(FakeCompiler::new(), CacheConfig::read_write(dir.path()));
    let k = second.get(&s).unwrap();
    assert_eq!(k.image, FakeCompiler::image_for(&s));
    let stats = second.stats();
    assert_eq!((stats.total().compiles, stats.total().disk_hits), (1, 0));
    assert_eq!(stats.disk_rejects, 1);
    assert_eq!(std::fs::read(&path).unwrap(), good, "the file was replaced");

    let third = KernelRegistry::new(FakeCompiler::new(), CacheConfig::read_write(dir.path()));
    third.get(&s).unwrap();
    assert_eq!(third.compiler().compiles.load(Ordering::SeqCst), 0);
}

#[test]
fn truncated_cache_file_is_recompiled_and_replaced() {
    check_recovery(|p| {
        let bytes = std::fs::read(p).unwrap();
        std::fs::write(p, &bytes[..bytes.len() / 2]).unwrap();
    });
}

#[test]
fn corrupted_cache_file_is_recompiled_and_replaced() {
    check_recovery(|p| {
        let mut bytes = std::fs::read(p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x5a;
        std::fs::write(p, &bytes).unwrap();
    });
}

#[test]
fn empty_cache_file_is_recompiled_and_replaced() {
    check_recovery(|p| std::fs::write(p, b"").unwrap());
}

#[test]
fn cache_file_from_another_spec_is_recompiled_and_replaced() {
    // A well-formed file whose image the loader rejects, as the driver rejects an
    // image for another device.
    check_recovery(|p| {
        let wrong = CompiledKernel {
            kind: ImageKind::Cubin,
            lowered_name: "_Z5wrongv".into(),
            image: b"IMAGE:something else".to_vec(),
        };
        std::fs::write(p, encode_cache_file(&wrong)).unwrap();
    });
}

#[test]
fn image_the_loader_rejects_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec("add");
    let first = KernelRegistry::new(FakeCompiler::new(), CacheConfig::read_write(dir.path()));
    first.get(&s).unwrap();
    let rejecting = FakeCompiler::new();
    rejecting.reject_next_load.store(true, Ordering::SeqCst);
    let second = KernelRegistry::new(rejecting, CacheConfig::read_write(dir.path()));
    let k = second.get(&s).unwrap();
    assert_eq!(k.image, FakeCompiler::image_for(&s));
    assert_eq!(second.compiler().compiles.load(Ordering::SeqCst), 1);
    assert_eq!(second.stats().disk_rejects, 1);
}

#[test]
fn readonly_mode_never_writes() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec("add");
    let ro = KernelRegistry::new(FakeCompiler::new(), CacheConfig::read_only(dir.path()));
    ro.get(&s).unwrap();
    assert_eq!(ro.compiler().compiles.load(Ordering::SeqCst), 1);
    assert!(snapshot(dir.path()).is_empty(), "readonly wrote a file");

    // It does read what a read-write registry wrote.
    let rw = KernelRegistry::new(FakeCompiler::new(), CacheConfig::read_write(dir.path()));
    rw.get(&s).unwrap();
    let ro = KernelRegistry::new(FakeCompiler::new(), CacheConfig::read_only(dir.path()));
    ro.get(&s).unwrap();
    assert_eq!(ro.compiler().compiles.load(Ordering::SeqCst), 0);
    assert_eq!(ro.stats().total().disk_hits, 1);

    // A corrupt file is neither deleted nor replaced.
    let path = ro.cache_path(&s).unwrap();
    std::fs::write(&path, b"garbage").unwrap();
    let before = snapshot(dir.path());
    let ro = KernelRegistry::new(FakeCompiler::new(), CacheConfig::read_only(dir.path()));
    let k = ro.get(&s).unwrap();
    assert_eq!(k.image, FakeCompiler::image_for(&s));
    assert_eq!(ro.compiler().compiles.load(Ordering::SeqCst), 1);
    assert_eq!(
        snapshot(dir.path()),
        before,
        "readonly changed the directory"
    );
}

#[test]
fn off_mode_never_reads_or_writes() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec("add");
    let rw = KernelRegistry::new(FakeCompiler::new(), CacheConfig::read_write(dir.path()));
    rw.get(&s).unwrap();
    let before = snapshot(dir.path());
    assert_eq!(before.len(), 1);

    let off = KernelRegistry::new(
        FakeCompiler::new(),
        CacheConfig {
            mode: CacheMode::Off,
            dir: Some(dir.path().to_path_buf()),
        },
    );
    off.get(&s).unwrap();
    off.get(&spec("other")).unwrap();
    assert_eq!(off.compiler().compiles.load(Ordering::SeqCst), 2);
    assert_eq!(off.stats().total().disk_hits, 0);
    assert_eq!(
        snapshot(dir.path()),
        before,
        "off mode changed the directory"
    );
    assert_eq!(off.cache_path(&s), None);
}

#[test]
fn compile_errors_are_returned_and_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let compiler = FakeCompiler::new();
    compiler.fail_compile.store(true, Ordering::SeqCst);
    let registry = KernelRegistry::new(compiler, CacheConfig::read_write(dir.path()));
    let s = spec("broken");
    let err = registry.get(&s).unwrap_err().to_string();
    assert!(
        err.contains("broken") && err.contains("expected ';'"),
        "{err}"
    );
    assert!(snapshot(dir.path()).is_empty());

    registry
        .compiler()
        .fail_compile
        .store(false, Ordering::SeqCst);
    registry.get(&s).unwrap();
    assert_eq!(registry.compiler().compiles.load(Ordering::SeqCst), 2);
}

#[test]
fn precompile_reports_every_failure() {
    let compiler = FakeCompiler::new();
    compiler.fail_compile.store(true, Ordering::SeqCst);
    let registry = KernelRegistry::new(compiler, CacheConfig::off());
    let done = AtomicUsize::new(0);
    let err = registry
        .precompile(&[spec("x"), spec("yy")], |_| {
            done.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2 of 2") && err.contains("x:") && err.contains("yy:"),
        "{err}"
    );
    assert_eq!(done.load(Ordering::SeqCst), 2);
}

#[test]
fn cache_file_round_trips_and_rejects_damage() {
    let c = CompiledKernel {
        kind: ImageKind::Ptx,
        lowered_name: "_Z3addPfS_".into(),
        image: (0..=255u8).cycle().take(1000).collect(),
    };
    let bytes = encode_cache_file(&c);
    assert_eq!(decode_cache_file(&bytes).unwrap(), c);
    for cut in [0, 1, 8, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            decode_cache_file(&bytes[..cut]).is_err(),
            "truncated at {cut}"
        );
    }
    for at in [0, 9, 12, bytes.len() / 2, bytes.len() - 1] {
        let mut b = bytes.clone();
        b[at] ^= 1;
        assert!(decode_cache_file(&b).is_err(), "flipped byte {at}");
    }
}

#[test]
fn cache_config_reads_the_environment() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let c = CacheConfig::from_vars(vars(&[("KILN_CACHE_DIR", "/c"), ("HOME", "/h")])).unwrap();
    assert_eq!(c, CacheConfig::read_write("/c/kernels"));
    let c = CacheConfig::from_vars(vars(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")])).unwrap();
    assert_eq!(c, CacheConfig::read_write("/x/kiln/kernels"));
    let c =
        CacheConfig::from_vars(vars(&[("HOME", "/h"), ("KILN_KERNEL_CACHE", "readonly")])).unwrap();
    assert_eq!(c, CacheConfig::read_only("/h/.cache/kiln/kernels"));
    let c = CacheConfig::from_vars(vars(&[("KILN_KERNEL_CACHE", "off")])).unwrap();
    assert_eq!(c, CacheConfig::off());
    let e = CacheConfig::from_vars(vars(&[("KILN_KERNEL_CACHE", "sometimes")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("KILN_KERNEL_CACHE") && e.contains("sometimes"),
        "{e}"
    );
    assert!(
        CacheConfig::from_vars(vars(&[])).is_err(),
        "no directory at all"
    );
}
