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
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * a * (1.0 + (c * (a + 0.044715 * a.powi(3))).tanh()) * b
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
            assert_close(&format!("{} len={len}", kind.name()), &got, &want, 1e-11);
        }
    }
}
