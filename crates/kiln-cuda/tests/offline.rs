//! The registry with NVRTC and no device: the offline compiler fills a disk cache
//! that a second registry reads without compiling, under the keys the device's own
//! compiler computes. Needs only libnvrtc (CUDA 13).

use kiln_cuda::manifest::all_specs;
use kiln_cuda::nvrtc::{nvrtc_version, NvrtcTarget, OfflineCompiler};
use kiln_cuda::registry::{cache_dir_usage, decode_cache_file, ImageKind, KernelRegistry};
use kiln_cuda::CacheConfig;

/// Fails the calling test when NVRTC cannot be loaded: the tests that call it are
/// ignored unless asked for.
fn require_nvrtc() {
    if let Err(e) = nvrtc_version() {
        panic!("this test needs NVRTC: {e}");
    }
}

#[test]
#[ignore = "needs NVRTC"]
fn offline_cache_serves_a_second_registry() {
    require_nvrtc();
    let dir = tempfile::tempdir().unwrap();
    // One family's worth keeps this quick; the manifest's order groups families.
    let specs: Vec<_> = all_specs()
        .into_iter()
        .filter(|s| s.key.starts_with("elementwise|") || s.key.starts_with("rms_norm|"))
        .collect();
    assert!(specs.len() >= 4, "{} specs", specs.len());
    let cache = CacheConfig::read_write(dir.path());

    let cold = KernelRegistry::new(OfflineCompiler::new("sm_90a").unwrap(), cache.clone());
    cold.precompile(&specs, |_| {}).unwrap();
    let t = cold.stats().total();
    assert_eq!((t.compiles, t.disk_hits), (specs.len() as u64, 0));
    let (files, bytes) = cache_dir_usage(dir.path()).unwrap();
    assert_eq!(files, specs.len() as u64);
    assert!(bytes > 1000 * files, "{bytes} bytes in {files} files");
    for s in &specs {
        let file = std::fs::read(cold.cache_path(s).unwrap()).unwrap();
        let compiled = decode_cache_file(&file).unwrap();
        assert_eq!(compiled.kind, ImageKind::Cubin);
        assert!(compiled.image.starts_with(b"\x7fELF"), "{}", s.key);
        assert!(
            compiled.lowered_name.starts_with("_Z"),
            "{}: {}",
            s.key,
            compiled.lowered_name
        );
    }

    let warm = KernelRegistry::new(OfflineCompiler::new("sm_90a").unwrap(), cache);
    warm.precompile(&specs, |_| {}).unwrap();
    let t = warm.stats().total();
    assert_eq!((t.compiles, t.disk_hits), (0, specs.len() as u64));
}

#[test]
#[ignore = "needs NVRTC"]
fn offline_sm_90a_is_the_target_an_h100_gets() {
    require_nvrtc();
    let device = NvrtcTarget::for_device((9, 0)).unwrap();
    let offline = NvrtcTarget::for_arch("sm_90a").unwrap();
    assert_eq!(device, offline);
    assert_eq!(offline.image_kind(), ImageKind::Cubin);
    let e = NvrtcTarget::for_arch("sm_91").unwrap_err().to_string();
    assert!(e.contains("sm_91") && e.contains("cannot compile"), "{e}");
}
