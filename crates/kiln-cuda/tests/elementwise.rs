//! Elementwise on the GPU against the CPU reference (kiln-cpu), with its Q8_1 copy of
//! `out` where the length is a multiple of 32.

mod common;
use common::*;
use kiln_core::ops::{Elementwise, ElementwiseKind, Glu, Q8_COPY};
use kiln_core::{Aliasing, DType, Graph};
use kiln_cpu::CpuBackend;

const SIZES: [usize; 7] = [1, 7, 1023, 4096, 4097, 65536, 1_000_003];

/// Normalised MSE allowed against the CPU's f32 results, for gates drawn from
/// [-6, 6). Add and mul round the same single operation on both sides: exact. silu and
/// sigmoid take expf of -a, exact, whose CUDA and Rust results differ by a few ulp
/// (at most about 4e-7 relative: NMSE below 1e-12). gelu takes exp(-2u) of a computed
/// argument, u = sqrt(2/pi) (a + 0.044715 a^3), which the GPU contracts into fused
/// multiply-adds and the CPU does not: an ulp of u, |2u| up to 25 here, moves the
/// result by up to 25 ulp relative (about 3e-6), and with one element (len 1) that is
/// the whole NMSE (seen on the H200: 3.3e-12 to 4.0e-12 in 5 of 50 runs).
fn tolerance(kind: ElementwiseKind) -> f64 {
    match kind {
        ElementwiseKind::Add | ElementwiseKind::Mul => 0.0,
        ElementwiseKind::SiluMul | ElementwiseKind::SigmoidMul => 1e-12,
        ElementwiseKind::GeluMul => 1e-10,
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn elementwise_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("elementwise_matches_cpu");
    for kind in ElementwiseKind::ALL {
        for len in SIZES {
            let mut g = Graph::new();
            let a = g.persistent("a", DType::F32, &[len]).unwrap();
            let b = g.persistent("b", DType::F32, &[len]).unwrap();
            let out = g.persistent("out", DType::F32, &[len]).unwrap();
            let out_q8 = (len % 32 == 0).then(|| g.persistent("q8", Q8_COPY, &[len]).unwrap());
            g.push(Elementwise {
                kind,
                a,
                b,
                out,
                out_q8,
                len,
            })
            .unwrap();
            let inputs = [
                (a, f32_bytes(&uniform(&mut rng, len, 6.0))),
                (b, f32_bytes(&uniform(&mut rng, len, 2.0))),
            ];
            let want = f32s(&run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
            let outputs: Vec<_> = std::iter::once(out).chain(out_q8).collect();
            let got = run_on(cuda, &g, &inputs, &outputs, Aliasing::On).unwrap();
            let what = format!("{} len={len}", kind.name());
            assert_close(&what, &f32s(&got[0]), &want, tolerance(kind));
            if out_q8.is_some() {
                assert_q8_copy(&what, &got[0], &got[1]);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn glu_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("glu_matches_cpu");
    for kind in [
        ElementwiseKind::SiluMul,
        ElementwiseKind::GeluMul,
        ElementwiseKind::Mul,
    ] {
        for (rows, n) in [(1, 14336), (1, 1), (3, 33), (7, 96), (512, 1024)] {
            let mut g = Graph::new();
            let x = g.persistent("x", DType::F32, &[rows, 2 * n]).unwrap();
            let out = g.persistent("out", DType::F32, &[rows, n]).unwrap();
            let out_q8 = (n % 32 == 0).then(|| g.persistent("q8", Q8_COPY, &[rows, n]).unwrap());
            g.push(Glu {
                kind,
                x,
                out,
                out_q8,
                rows,
                n,
            })
            .unwrap();
            let inputs = [(x, f32_bytes(&uniform(&mut rng, rows * 2 * n, 6.0)))];
            let want = f32s(&run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
            let outputs: Vec<_> = std::iter::once(out).chain(out_q8).collect();
            let got = run_on(cuda, &g, &inputs, &outputs, Aliasing::On).unwrap();
            let what = format!("glu {} {rows}x{n}", kind.name());
            assert_close(&what, &f32s(&got[0]), &want, tolerance(kind));
            if out_q8.is_some() {
                assert_q8_copy(&what, &got[0], &got[1]);
            }
        }
    }
}
