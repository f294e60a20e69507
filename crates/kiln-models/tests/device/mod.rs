//! The CUDA device of kiln-models' GPU tests (apart from `common`, which the fuzz
//! target also includes and which must not need kiln-cuda).

/// The CUDA backend of device 0, with the disk cache the environment configures;
/// panics (fails the test) where there is none. Every test that calls it is
/// `#[ignore = "needs a CUDA device"]`.
pub fn cuda() -> kiln_cuda::CudaBackend {
    kiln_cuda::CacheConfig::from_env()
        .and_then(|cache| kiln_cuda::CudaBackend::with_cache(0, cache))
        .unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"))
}
