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

/// A CUDA backend of the caller's own on device 0, for a test that switches what
/// compiling fuses: [`cuda`]'s switches are shared by every test of its executable,
/// which run at once. Fails without a device, as [`cuda`] does.
pub fn own_cuda() -> CudaBackend {
    CacheConfig::from_env()
        .and_then(|cache| CudaBackend::with_cache(0, cache))
        .unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"))
}

/// The launches `graph` compiles to on `cuda` (each launch's key and whether it is
/// serialized), over its persistent buffers as `upload_persistent` makes them, those
/// of block formats given zero weights. The executable is not run.
pub fn compiled_launches(cuda: &CudaBackend, graph: &kiln_core::Graph) -> Vec<(String, bool)> {
    use kiln_core::{Aliasing, Backend, BufferId};
    let zero_weights: Vec<_> = (0..graph.buffers().len() as u32)
        .map(BufferId)
        .filter(|id| graph.buffers()[id.index()].dtype.is_quantized())
        .map(|id| (id, vec![0u8; graph.buffers()[id.index()].bytes()]))
        .collect();
    let (launches, _, _) = with_persistent_bound(cuda, graph, &zero_weights, Aliasing::On, |b| {
        let exe = cuda.compile(graph, b)?;
        Ok(exe
            .launches()
            .iter()
            .map(|l| (l.key().to_string(), l.serialized()))
            .collect())
    })
    .unwrap();
    launches
}

/// Asserts that `q8` is exactly the CPU codec's Q8_1 rounding of the f32 values in
/// `out` ([`kiln_core::ops::Q8_COPY`]): the GPU's copy of its own output.
pub fn assert_q8_copy(what: &str, out: &[u8], q8: &[u8]) {
    use kiln_core::ops::Q8_COPY;
    let values = f32s(out);
    let mut want = vec![0u8; Q8_COPY.bytes_for(values.len()).unwrap()];
    kiln_core::quant::quantize(Q8_COPY, &values, &mut want).unwrap();
    assert_eq!(q8.len(), want.len(), "{what}: q8 copy size");
    if let Some(at) = q8.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "{what}: q8 copy differs from the CPU rounding of out at byte {at} (block {}): {:02x?} vs {:02x?}",
            at / 36,
            &q8[at / 36 * 36..at / 36 * 36 + 36],
            &want[at / 36 * 36..at / 36 * 36 + 36],
        );
    }
}

/// Asserts that `got` and `want` are the same bytes, naming the first that differs.
pub fn assert_same_bits(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: sizes");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte {at} differs: {:02x?} vs {:02x?}",
            &got[at & !3..(at & !3) + 4],
            &want[at & !3..(at & !3) + 4]
        );
    }
}
