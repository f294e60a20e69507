//! Helpers shared by the CPU reference tests: random inputs, graph execution with
//! poisoned outputs, and error measurement against float64 references.
#![allow(dead_code)]

use half::{bf16, f16};
use kiln_core::{plan, Aliasing, Backend, Bindings, BufferId, BufferKind, DType, Graph, Scratch};
use kiln_cpu::{CpuBackend, CpuBuffer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// A generator seeded from `KILN_TEST_SEED` or, by default, from the clock; the seed
/// is printed so that a failure can be replayed.
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

/// `n` standard-normal values scaled by `scale`.
pub fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f64 = StandardNormal.sample(&mut *rng);
            scale * v as f32
        })
        .collect::<Vec<f32>>()
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian bytes of i32 values.
pub fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// f32 values of little-endian bytes.
pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// i32 values of little-endian bytes.
pub fn i32s(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Values of `dtype` (F32, F16 or BF16) in `b`, widened to f64 with `half`.
pub fn float_values(b: &[u8], dtype: DType) -> Vec<f64> {
    match dtype {
        DType::F32 => f32s(b).into_iter().map(f64::from).collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DType::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        other => panic!("float_values: {other} is not a float dtype"),
    }
}

/// `values` stored as `dtype` (F32, F16 or BF16), rounded by `half` from f64.
pub fn float_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => f32_bytes(values),
        DType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f64(v as f64).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f64(v as f64).to_le_bytes())
            .collect(),
        other => panic!("float_bytes: {other} is not a float dtype"),
    }
}

/// Random weight bytes: `rows` rows of `cols` elements of `dtype`. Float types hold
/// scaled normal values; block formats hold random bytes in which every byte at an odd
/// offset is forced into `0x20..0x3c` with a random sign bit, so that every 16-bit
/// scale field (ggml places them at even offsets of even-sized blocks) is a finite
/// value of magnitude about 2^-7..1, and every 32-bit one likewise finite.
pub fn random_weight(rng: &mut StdRng, dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
    if dtype.is_float() {
        return float_bytes(&randn(rng, rows * cols, 0.5), dtype);
    }
    assert_eq!(dtype.block_bytes() % 2, 0, "{dtype}: odd block size");
    let n = dtype.bytes_for(rows * cols).expect("whole blocks");
    (0..n)
        .map(|i| {
            let b: u8 = rng.random();
            if i % 2 == 1 {
                (b & 0x80) | (0x20 + b % 0x1c)
            } else {
                b
            }
        })
        .collect()
}

/// The f64 values of a weight: floats widened by `half`; block formats through their
/// definition in `kiln_core::quant` (tested on its own against hand-built golden blocks).
pub fn weight_values(bytes: &[u8], dtype: DType, elements: usize) -> Vec<f64> {
    if dtype.is_float() {
        return float_values(bytes, dtype);
    }
    let mut out = vec![0f32; elements];
    kiln_core::quant::dequantize(dtype, bytes, &mut out).expect("dequantize");
    out.into_iter().map(f64::from).collect()
}

/// Bytes of NaN (or -1 for integer types) for a buffer of `bytes` bytes: what outputs
/// hold before an op runs, so that an element it fails to write cannot pass.
pub fn poison(bytes: usize) -> Vec<u8> {
    vec![0xff; bytes]
}

/// Runs `graph` on the CPU backend with transient aliasing on. Every persistent buffer
/// gets the bytes `inputs` gives it, or poison. Returns the bytes of `outputs`.
pub fn run(graph: &Graph, inputs: &[(BufferId, Vec<u8>)], outputs: &[BufferId]) -> Vec<Vec<u8>> {
    run_with(graph, inputs, outputs, Aliasing::On).expect("graph runs")
}

/// As [`run`], with a choice of aliasing, returning errors.
pub fn run_with(
    graph: &Graph,
    inputs: &[(BufferId, Vec<u8>)],
    outputs: &[BufferId],
    aliasing: Aliasing,
) -> kiln_core::Result<Vec<Vec<u8>>> {
    let backend = CpuBackend;
    let persistent: Vec<BufferId> = (0..graph.buffers().len() as u32)
        .map(BufferId)
        .filter(|&id| graph.buffers()[id.index()].kind == BufferKind::Persistent)
        .collect();
    let mut bufs: Vec<CpuBuffer> = Vec::new();
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
    let memory = plan(graph, aliasing);
    let mut scratch = Scratch::new();
    scratch.ensure(&backend, &memory)?;
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
                .expect("output is persistent");
            let mut out = vec![0u8; graph.buffers()[id.index()].bytes()];
            backend.download(&bufs[p], &mut out)?;
            Ok(out)
        })
        .collect()
}

/// Asserts that `got` matches the float64 reference `want`: no NaN or infinity, and
/// a normalised mean squared error `sum (got - want)^2 / sum want^2` at most `nmse`.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], nmse: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(!want.is_empty(), "{what}: empty reference");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} is {} (reference {})", got[i], want[i]);
    }
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    assert!(
        norm > 0.0,
        "{what}: reference is all zeros, which tests nothing"
    );
    let e = err / norm;
    assert!(
        e <= nmse,
        "{what}: normalised MSE {e:.3e} exceeds {nmse:.1e}"
    );
}

/// A graph under construction with terse helpers for tests.
pub struct G {
    pub g: Graph,
}

impl G {
    pub fn new() -> Self {
        Self { g: Graph::new() }
    }
    pub fn p(&mut self, name: &str, dtype: DType, shape: &[usize]) -> BufferId {
        self.g.persistent(name, dtype, shape).expect("buffer")
    }
    pub fn t(&mut self, name: &str, dtype: DType, shape: &[usize]) -> BufferId {
        self.g.transient(name, dtype, shape).expect("buffer")
    }
}
