//! The registry with NVRTC on a real device: every kernel compiles, loads and
//! launches; a second process finds them all in the disk cache; concurrent first
//! requests compile once.

mod common;
use common::*;
use std::process::Command;
use std::sync::Barrier;

use kiln_core::ops::ElementwiseKind;
use kiln_core::{Backend, DType};
use kiln_cuda::manifest::all_specs;
use kiln_cuda::{ops, CacheConfig, CudaBackend};

/// Builds every kernel of the manifest with the cache the environment configures
/// and prints the registry's totals on a line starting with `KILN_STATS`, which the
/// parent test parses when it runs this test in a child process.
#[test]
#[ignore = "needs a CUDA device"]
fn every_kernel_builds_and_loads() {
    let shared = cuda();
    let backend =
        CudaBackend::on_device(shared.device().clone(), CacheConfig::from_env().unwrap()).unwrap();
    let specs = all_specs();
    backend.registry().precompile(&specs, |_| {}).unwrap();
    let stats = backend.registry().stats();
    assert_eq!(stats.modules.len(), specs.len());
    let t = stats.total();
    assert_eq!(
        t.compiles + t.disk_hits,
        specs.len() as u64,
        "each kernel built once: {t:?}"
    );
    println!(
        "KILN_STATS compiles={} disk_hits={}",
        t.compiles, t.disk_hits
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_compiled_kernel_launches_and_computes() {
    let shared = cuda();
    let dir = tempfile::tempdir().unwrap();
    let backend =
        CudaBackend::on_device(shared.device().clone(), CacheConfig::read_write(dir.path()))
            .unwrap();
    let len = 5000;
    let a: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 + 1.0).collect();
    let b: Vec<f32> = (0..len).map(|i| 3.0 - i as f32).collect();
    let mut da = backend.alloc(len * 4).unwrap();
    let mut db = backend.alloc(len * 4).unwrap();
    let mut dout = backend.alloc(len * 4).unwrap();
    backend.upload(&mut da, &f32_bytes(&a)).unwrap();
    backend.upload(&mut db, &f32_bytes(&b)).unwrap();
    backend.upload(&mut dout, &poison(len * 4)).unwrap();
    ops::elementwise::elementwise(
        &backend,
        ElementwiseKind::Add,
        &da,
        &db,
        &mut dout,
        None,
        len,
    )
    .unwrap();
    let mut out = vec![0u8; len * 4];
    backend.download(&dout, &mut out).unwrap();
    // Small integers and halves: every sum is exact in f32.
    let want: Vec<f32> = (0..len).map(|i| i as f32 * -0.5 + 4.0).collect();
    assert_eq!(f32s(&out), want);
    let t = backend.registry().stats().total();
    assert_eq!((t.compiles, t.disk_hits), (1, 0), "a fresh cache compiles");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "and writes one file"
    );
}

/// Runs [`every_kernel_builds_and_loads`] in a child process with `dir` as the cache;
/// returns its (compiles, disk hits).
fn child_build_all(dir: &std::path::Path) -> (u64, u64) {
    let exe = std::env::current_exe().unwrap();
    let output = Command::new(exe)
        .args([
            "--exact",
            "every_kernel_builds_and_loads",
            "--include-ignored",
            "--nocapture",
        ])
        .env("KILN_CACHE_DIR", dir)
        .env("KILN_KERNEL_CACHE", "on")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("KILN_STATS "))
        .unwrap_or_else(|| panic!("no KILN_STATS line in:\n{stdout}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    (field("compiles"), field("disk_hits"))
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_second_process_finds_every_kernel_in_the_disk_cache() {
    cuda();
    let dir = tempfile::tempdir().unwrap();
    let n = all_specs().len() as u64;
    assert_eq!(
        child_build_all(dir.path()),
        (n, 0),
        "first process: everything compiles"
    );
    assert_eq!(
        child_build_all(dir.path()),
        (0, n),
        "second process: everything from disk"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn concurrent_first_requests_compile_once() {
    let shared = cuda();
    let backend = CudaBackend::on_device(shared.device().clone(), CacheConfig::off()).unwrap();
    let spec = ops::cast::spec(DType::BF16, DType::F16).unwrap();
    let threads = 8;
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                backend.kernel(&spec).unwrap();
            });
        }
    });
    let stats = backend.registry().stats();
    let m = &stats.modules[0];
    assert_eq!(stats.modules.len(), 1);
    assert_eq!(
        (m.compiles, m.memory_hits),
        (1, threads as u64 - 1),
        "{m:?}"
    );
}
