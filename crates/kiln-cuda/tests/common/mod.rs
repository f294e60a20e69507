//! Helpers shared by the GPU tests: the device (or a clear failure), random inputs,
//! running one graph on any backend with poisoned outputs, and error measures.
#![allow(dead_code)] // each test file uses a subset

use std::sync::OnceLock;

use kiln_core::{plan, Aliasing, Backend, Bindings, BufferId, BufferKind, Graph, Scratch};
use kiln_cuda::{CacheConfig, CudaBackend};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

/// A generator seeded from `KILN_TEST_SEED` or the clock; the seed is printed so a
/// failure can be replayed.
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("KILN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{test}: KILN_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in `[-scale, scale)`, none exactly zero.
pub fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = rng.random_range(-scale..scale);
            if v == 0.0 {
                scale / 2.0
            } else {
                v
            }
        })
        .collect()
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// f32 values of little-endian bytes.
pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Bytes that read as NaN in F32, F16 and BF16: what outputs hold before an op
/// runs, so that an element the op fails to write cannot pass.
pub fn poison(bytes: usize) -> Vec<u8> {
    vec![0xff; bytes]
}

/// Runs `graph` on `backend` with transient aliasing on. Persistent buffers get the
/// bytes `inputs` gives them, or poison. Returns the bytes of `outputs`.
pub fn run_on<B: Backend>(
    backend: &B,
    graph: &Graph,
    inputs: &[(BufferId, Vec<u8>)],
    outputs: &[BufferId],
) -> kiln_core::Result<Vec<Vec<u8>>> {
    let persistent: Vec<BufferId> = (0..graph.buffers().len() as u32)
        .map(BufferId)
        .filter(|&id| graph.buffers()[id.index()].kind == BufferKind::Persistent)
        .collect();
    let mut bufs = Vec::new();
    for &id in &persistent {
        let bytes = graph.buffers()[id.index()].bytes();
        let mut buf = backend.alloc(bytes)?;
        let data = inputs
            .iter()
            .find(|(i, _)| *i == id)
            .map_or_else(|| poison(bytes), |(_, d)| d.clone());
        backend.upload(&mut buf, &data)?;
        bufs.push(buf);
    }
    let memory = plan(graph, Aliasing::On);
    let mut scratch = Scratch::new();
    scratch.ensure(backend, &memory)?;
    {
        let mut bindings = Bindings::new(graph, &memory, &mut scratch)?;
        for (&id, buf) in persistent.iter().zip(bufs.iter_mut()) {
            bindings.bind(graph, id, buf)?;
        }
        backend.execute(graph, &mut bindings)?;
    }
    outputs
        .iter()
        .map(|&id| {
            let p = persistent
                .iter()
                .position(|&p| p == id)
                .expect("test outputs are persistent buffers");
            let mut out = vec![0u8; graph.buffers()[id.index()].bytes()];
            backend.download(&bufs[p], &mut out)?;
            Ok(out)
        })
        .collect()
}

/// Asserts that `got` matches the reference `want`: every element finite where the
/// reference is, and a normalised mean squared error `sum (got - want)^2 / sum
/// want^2` at most `nmse`.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], nmse: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} is {} (reference {})", got[i], want[i]);
    }
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - f64::from(w)).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|&w| f64::from(w).powi(2)).sum();
    assert!(
        norm > 0.0,
        "{what}: reference is all zeros, which tests nothing"
    );
    let e = err / norm;
    eprintln!("{what}: nmse {e:.2e}");
    assert!(
        e <= nmse,
        "{what}: normalised MSE {e:.3e} exceeds {nmse:.1e}"
    );
}
