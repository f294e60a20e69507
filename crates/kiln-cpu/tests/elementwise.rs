//! Add, Mul, SiLU·mul and GELU·mul against float64 formulas.

mod common;
use common::*;
use kiln_core::ops::{Elementwise, ElementwiseKind};
use kiln_core::DType::F32;

fn reference(kind: ElementwiseKind, a: f64, b: f64) -> f64 {
    match kind {
        ElementwiseKind::Add => a + b,
        ElementwiseKind::Mul => a * b,
        ElementwiseKind::SiluMul => a / (1.0 + (-a).exp()) * b,
        ElementwiseKind::GeluMul => {
            // 0.5 a (1 + tanh(u)) = a sigmoid(2u); the latter does not cancel to 0 in
            // f64 for very negative a.
            let u = (2.0 / std::f64::consts::PI).sqrt() * (a + 0.044715 * a.powi(3));
            a / (1.0 + (-2.0 * u).exp()) * b
        }
    }
}

#[test]
fn elementwise_kinds_match_f64() {
    let mut rng = rng("elementwise");
    let kinds = [
        ElementwiseKind::Add,
        ElementwiseKind::Mul,
        ElementwiseKind::SiluMul,
        ElementwiseKind::GeluMul,
    ];
    for kind in kinds {
        for len in [1, 7, 4097, 100_003] {
            let mut g = G::new();
            let a = g.p("a", F32, &[len]);
            let b = g.p("b", F32, &[len]);
            let out = g.p("out", F32, &[len]);
            g.g.push(Elementwise {
                kind,
                a,
                b,
                out,
                len,
            })
            .unwrap();
            let (av, bv) = (randn(&mut rng, len, 4.0), randn(&mut rng, len, 2.0));
            let got = f32s(&run(&g.g, &[(a, f32_bytes(&av)), (b, f32_bytes(&bv))], &[out])[0]);
            let want: Vec<f64> = av
                .iter()
                .zip(&bv)
                .map(|(&a, &b)| reference(kind, a as f64, b as f64))
                .collect();
            let what = format!("{} len={len}", kind.name());
            // Per element: the relative error of exp(x) from an f32 x is about
            // |x| * 2^-24, and |x| reaches ~100 for the gates of a < -5, so 2e-5; plus
            // an absolute floor for results that underflow f32 (they round to 0).
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let tol = 2e-5 * w.abs() + 1e-30;
                assert!(
                    (g as f64 - w).abs() <= tol,
                    "{what}: element {i} ({}, {}) is {g}, want {w}",
                    av[i],
                    bv[i]
                );
            }
            if len > 1 {
                assert_close(&what, &got, &want, 1e-11);
            }
        }
    }
}
