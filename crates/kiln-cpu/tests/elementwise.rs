//! Add, Mul, SiLU·mul, GELU·mul and sigmoid·mul against float64 formulas, element-wise and as a
//! gated linear unit over the two halves of each row.

mod common;
use common::*;
use kiln_core::ops::{Elementwise, ElementwiseKind, Glu};
use kiln_core::DType::{self, F32};

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
        ElementwiseKind::SigmoidMul => b / (1.0 + (-a).exp()),
    }
}

#[test]
fn elementwise_kinds_match_f64() {
    let mut rng = rng("elementwise");
    let kinds = ElementwiseKind::ALL;
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
                out_q8: None,
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

#[test]
fn the_q8_copy_rounds_half_away_from_zero_with_an_f16_scale() {
    // a * 1 = a exactly. Block 0: max |a| = 127, so d = 1 and each quant is a rounded
    // to an integer, ties away from zero. Block 1: all zero. Block 2: max 2.54, so
    // d = 0.02 (f16 0x251f, 0.0200043), and -0.033 / 0.02 = -1.65 rounds to -2.
    let mut av = vec![0f32; 96];
    av[..6].copy_from_slice(&[127.0, -63.5, 0.5, 1.5, -2.5, 3.4]);
    av[64] = 2.54;
    av[65] = -0.033;
    let mut g = G::new();
    let a = g.p("a", F32, &[96]);
    let b = g.p("b", F32, &[96]);
    let out = g.p("out", F32, &[96]);
    let out_q8 = g.p("out_q8", DType::Q8_1, &[96]);
    g.g.push(Elementwise {
        kind: ElementwiseKind::Mul,
        a,
        b,
        out,
        out_q8: Some(out_q8),
        len: 96,
    })
    .unwrap();
    let got = run(
        &g.g,
        &[(a, f32_bytes(&av)), (b, f32_bytes(&[1.0; 96]))],
        &[out, out_q8],
    );
    assert_eq!(f32s(&got[0]), av);
    let q8 = &got[1];
    assert_eq!(q8.len(), 3 * 36);
    // Block 0: d = 1.0 (f16 0x3c00), quants 127, -64, 1, 2, -3, 3, then zeros;
    // s = 66 (f16 0x5420).
    assert_eq!(&q8[..4], &[0x00, 0x3c, 0x20, 0x54]);
    assert_eq!(&q8[4..10], &[127, (-64i8) as u8, 1, 2, (-3i8) as u8, 3]);
    assert!(q8[10..36].iter().all(|&q| q == 0));
    assert!(
        q8[36..72].iter().all(|&q| q == 0),
        "an all-zero block is all zero"
    );
    assert_eq!(&q8[72..74], &[0x1f, 0x25]);
    assert_eq!(&q8[76..78], &[127, (-2i8) as u8]);
    assert!(q8[78..108].iter().all(|&q| q == 0));
}

#[test]
fn silu_mul_writes_its_q8_copy() {
    let mut rng = rng("elementwise_q8");
    let len = 32 * 129;
    let mut g = G::new();
    let a = g.p("a", F32, &[len]);
    let b = g.p("b", F32, &[len]);
    let out = g.p("out", F32, &[len]);
    let out_q8 = g.p("out_q8", DType::Q8_1, &[len]);
    g.g.push(Elementwise {
        kind: ElementwiseKind::SiluMul,
        a,
        b,
        out,
        out_q8: Some(out_q8),
        len,
    })
    .unwrap();
    let (av, bv) = (randn(&mut rng, len, 4.0), randn(&mut rng, len, 2.0));
    let got = run(
        &g.g,
        &[(a, f32_bytes(&av)), (b, f32_bytes(&bv))],
        &[out, out_q8],
    );
    check_q8_copy("silu_mul", &f32s(&got[0]), &got[1]);
}

#[test]
fn glu_gates_each_row_with_its_second_half() {
    let mut rng = rng("glu");
    for kind in [
        ElementwiseKind::SiluMul,
        ElementwiseKind::GeluMul,
        ElementwiseKind::Add,
    ] {
        for (rows, n) in [(1, 1), (3, 7), (2, 64), (5, 96)] {
            let with_copy = n % 32 == 0;
            let mut g = G::new();
            let x = g.p("x", F32, &[rows, 2 * n]);
            let out = g.p("out", F32, &[rows, n]);
            let out_q8 = with_copy.then(|| g.p("out_q8", DType::Q8_1, &[rows, n]));
            g.g.push(Glu {
                kind,
                x,
                out,
                out_q8,
                rows,
                n,
            })
            .unwrap();
            let xv = randn(&mut rng, rows * 2 * n, 3.0);
            let outputs: Vec<_> = std::iter::once(out).chain(out_q8).collect();
            let got = run(&g.g, &[(x, f32_bytes(&xv))], &outputs);
            let want: Vec<f64> = (0..rows * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    let row = &xv[r * 2 * n..];
                    reference(kind, row[c] as f64, row[n + c] as f64)
                })
                .collect();
            let what = format!("glu {} {rows}x{n}", kind.name());
            assert_close(&what, &f32s(&got[0]), &want, 1e-11);
            if with_copy {
                let mut q8 = vec![0u8; DType::Q8_1.bytes_for(rows * n).unwrap()];
                kiln_core::quant::quantize(DType::Q8_1, &f32s(&got[0]), &mut q8).unwrap();
                assert_eq!(got[1], q8, "{what}: q8 copy");
            }
        }
    }
}
