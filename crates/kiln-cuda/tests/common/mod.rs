//! Helpers of the GPU tests: the device (or a clear failure), plus the shared ones
//! of `kiln_testkit` (seeded generator, random values, byte conversions, running one
//! graph on any backend with poisoned outputs, `assert_close`).
#![allow(dead_code)] // each test file uses a subset

use std::sync::OnceLock;

use kiln_cuda::{CacheConfig, CudaBackend};
pub use kiln_testkit::*;

/// The process-wide CUDA backend on device 0, with the disk cache the environment
/// configures. Every test that calls it is `#[ignore = "needs a CUDA device"]`, so
/// running it means a GPU is expected: a missing device fails the test, never
/// passes it.
pub fn cuda() -> &'static CudaBackend {
    static BACKEND: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    let backend = BACKEND.get_or_init(|| {
        CacheConfig::from_env()
            .and_then(|cache| CudaBackend::with_cache(0, cache))
            .map_err(|e| e.to_string())
    });
    match backend {
        Ok(b) => b,
        Err(e) => panic!("this test needs a CUDA device: {e}"),
    }
}
