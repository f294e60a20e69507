//! MatMul with every weight dtype, with and without bias, against float64.

mod common;
use common::*;
use kiln_core::ops::{MatMul, WEIGHT_DTYPES};
use kiln_core::DType::F32;

#[test]
fn matmul_every_weight_dtype_matches_f64() {
    let mut rng = rng("matmul");
    for dtype in WEIGHT_DTYPES {
        let bs = dtype.block_size();
        // (m, n, k): decode rows, odd row counts, several blocks per row.
        let shapes = [
            (1, 1, bs),
            (3, 5, 3 * bs),
            (8, 33, 2 * bs),
            (17, 7, bs * if bs == 1 { 1023 } else { 4 }),
        ];
        for (m, n, k) in shapes {
            for with_bias in [false, true] {
                let mut g = G::new();
                let x = g.p("x", F32, &[m, k]);
                let w = g.p("w", dtype, &[n, k]);
                let bias = with_bias.then(|| g.p("bias", F32, &[n]));
                let out = g.p("out", F32, &[m, n]);
                g.g.push(MatMul {
                    x,
                    x_q8: None,
                    w,
                    bias,
                    out,
                    m,
                    n,
                    k,
                })
                .unwrap();
                let xv = randn(&mut rng, m * k, 1.0);
                let wb = random_weight(&mut rng, dtype, n, k);
                let bv = randn(&mut rng, n, 1.0);
                let mut inputs = vec![(x, f32_bytes(&xv)), (w, wb.clone())];
                if let Some(b) = bias {
                    inputs.push((b, f32_bytes(&bv)));
                }
                let got = f32s(&run(&g.g, &inputs, &[out])[0]);
                let wv = weight_values(&wb, dtype, n * k);
                let mut want = vec![0f64; m * n];
                // The sum of the terms' magnitudes: an f32 sum of k terms is off by at
                // most about k * 2^-24 of it, whatever cancellation the result has.
                let mut magnitude = vec![0f64; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let terms = (0..k).map(|l| xv[i * k + l] as f64 * wv[j * k + l]);
                        let b = if with_bias { bv[j] as f64 } else { 0.0 };
                        want[i * n + j] = terms.clone().sum::<f64>() + b;
                        magnitude[i * n + j] = terms.map(f64::abs).sum::<f64>() + b.abs();
                    }
                }
                let what = format!("matmul {dtype} m={m} n={n} k={k} bias={with_bias}");
                for (e, ((&g, &w), &mag)) in got.iter().zip(&want).zip(&magnitude).enumerate() {
                    let tol = (k as f64 + 1.0) * f32::EPSILON as f64 * mag;
                    assert!(
                        (g as f64 - w).abs() <= tol,
                        "{what}: element {e} is {g}, want {w} (bound {tol:.2e})"
                    );
                }
                // Over whole outputs the error is far smaller than that worst case.
                if m * n > 8 {
                    assert_close(&what, &got, &want, 1e-10);
                }
            }
        }
    }
}
