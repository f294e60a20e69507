//! Helpers of the CPU reference tests: the shared ones of `kiln_testkit` (seeded
//! generator, byte conversions, poisoned graph runs, `assert_close`) plus normal
//! random values, float and block-format weights, and a terse graph builder.
#![allow(dead_code)] // each test file uses a subset

use half::{bf16, f16};
use kiln_core::{Aliasing, BufferId, DType, Graph};
use kiln_cpu::CpuBackend;
pub use kiln_testkit::*;
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// `n` standard-normal values scaled by `scale`.
pub fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f64 = StandardNormal.sample(&mut *rng);
            scale * v as f32
        })
        .collect::<Vec<f32>>()
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
/// value of magnitude about 2^-7..1, and every 32-bit one likewise finite. MXFP4's
/// 17-byte blocks instead get random codes and an E8M0 exponent byte in `118..134`
/// (scales 2^-10..2^6).
pub fn random_weight(rng: &mut StdRng, dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
    if dtype.is_float() {
        return float_bytes(&randn(rng, rows * cols, 0.5), dtype);
    }
    let n = dtype.bytes_for(rows * cols).expect("whole blocks");
    if dtype == DType::MXFP4 {
        return (0..n)
            .map(|i| {
                let b: u8 = rng.random();
                if i % dtype.block_bytes() == 0 {
                    118 + b % 16
                } else {
                    b
                }
            })
            .collect();
    }
    assert_eq!(dtype.block_bytes() % 2, 0, "{dtype}: odd block size");
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

/// Runs `graph` on the CPU backend with transient aliasing on, through
/// [`run_on`]: persistent buffers get the bytes `inputs` gives them, or poison.
/// Returns the bytes of `outputs`; panics if the graph fails.
pub fn run(graph: &Graph, inputs: &[(BufferId, Vec<u8>)], outputs: &[BufferId]) -> Vec<Vec<u8>> {
    run_on(&CpuBackend, graph, inputs, outputs, Aliasing::On).expect("graph runs")
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

/// Checks that `bytes` are `values` rounded to Q8_1 blocks as
/// [`kiln_core::ops::Q8_COPY`] defines, reading the blocks by hand: per block of 32,
/// `d` (f16) is max |v| / 127 rounded to f16, every quant is within half a step of
/// `v / d` (`d` before its f16 rounding, which moves it by at most 2^-11) with the
/// largest at |q| = 127, and `s` (f16) is `d * sum(q)`.
pub fn check_q8_copy(what: &str, values: &[f32], bytes: &[u8]) {
    assert_eq!(bytes.len(), values.len() / 32 * 36, "{what}: size");
    for (b, (block, v)) in bytes
        .chunks_exact(36)
        .zip(values.chunks_exact(32))
        .enumerate()
    {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f64();
        let s = f16::from_le_bytes([block[2], block[3]]).to_f64();
        let amax = v.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
        let step = amax / 127.0;
        assert!(
            (d - step).abs() <= step * 2f64.powi(-11),
            "{what}: block {b}: d {d}, max {amax}"
        );
        let q: Vec<i32> = block[4..].iter().map(|&q| i32::from(q as i8)).collect();
        for (&q, &x) in q.iter().zip(v) {
            let exact = if step > 0.0 { f64::from(x) / step } else { 0.0 };
            assert!(
                (f64::from(q) - exact).abs() <= 0.5 + 1e-4,
                "{what}: block {b}: {x} became {q} at step {step}"
            );
        }
        if step > 0.0 {
            assert_eq!(
                q.iter().map(|q| q.abs()).max(),
                Some(127),
                "{what}: block {b}"
            );
        }
        let want_s = d * f64::from(q.iter().sum::<i32>());
        assert!(
            (s - want_s).abs() <= want_s.abs() * 2f64.powi(-10),
            "{what}: block {b}: s {s}, want {want_s}"
        );
    }
}
