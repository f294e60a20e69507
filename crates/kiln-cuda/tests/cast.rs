//! Cast on the GPU against the CPU reference (kiln-cpu): bit-exact.

mod common;
use common::*;
use kiln_core::ops::{Cast, FLOAT_DTYPES};
use kiln_core::{Aliasing, DType, Graph};
use kiln_cpu::CpuBackend;
use rand::rngs::StdRng;
use rand::Rng;

const SIZES: [usize; 6] = [1, 7, 1023, 4096, 4097, 300_001];

/// Random source bytes of `dtype` spanning its whole range. F32 values run from
/// 2^-30 to 2^20 with random signs, so that casts to F16 meet subnormals, rounding
/// and overflow to infinity. F16 and BF16 are random bit patterns, NaNs excluded.
fn random_source(rng: &mut StdRng, dtype: DType, len: usize) -> Vec<u8> {
    match dtype {
        DType::F32 => {
            let v: Vec<f32> = (0..len)
                .map(|_| {
                    let exponent: f32 = rng.random_range(-30.0..20.0);
                    let sign = if rng.random::<bool>() { -1.0 } else { 1.0 };
                    sign * exponent.exp2()
                })
                .collect();
            f32_bytes(&v)
        }
        DType::F16 | DType::BF16 => {
            let exponent_mask: u16 = if dtype == DType::F16 { 0x7c00 } else { 0x7f80 };
            (0..len)
                .flat_map(|_| loop {
                    let bits: u16 = rng.random();
                    let is_nan = bits & exponent_mask == exponent_mask
                        && bits & !(exponent_mask | 0x8000) != 0;
                    if !is_nan {
                        break bits.to_le_bytes();
                    }
                })
                .collect()
        }
        other => panic!("{other} is not a cast dtype"),
    }
}

/// Casts round to nearest even on both sides, so the results must be identical,
/// bit for bit (no element is NaN: the sources hold none, and poison that survives
/// would differ from the CPU's written value).
#[test]
#[ignore = "needs a CUDA device"]
fn cast_matches_cpu_bit_for_bit() {
    let cuda = cuda();
    let mut rng = rng("cast_matches_cpu_bit_for_bit");
    for from in FLOAT_DTYPES {
        for to in FLOAT_DTYPES {
            for len in SIZES {
                let mut g = Graph::new();
                let x = g.persistent("x", from, &[len]).unwrap();
                let out = g.persistent("out", to, &[len]).unwrap();
                g.push(Cast { x, out, len }).unwrap();
                let inputs = [(x, random_source(&mut rng, from, len))];
                let want = run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On)
                    .unwrap()
                    .remove(0);
                let got = run_on(cuda, &g, &inputs, &[out], Aliasing::On)
                    .unwrap()
                    .remove(0);
                let width = to.block_bytes();
                let first_diff = got
                    .chunks(width)
                    .zip(want.chunks(width))
                    .position(|(g, w)| g != w);
                assert_eq!(
                    first_diff, None,
                    "cast {from}->{to} len={len}: first differing element"
                );
            }
        }
    }
}
