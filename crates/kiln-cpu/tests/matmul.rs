//! MatMul with every weight dtype, with and without bias, against float64; and the
//! blocked loops against the definition, one dot product at a time, bit for bit.

mod common;
use common::*;
use kiln_core::ops::{MatMul, WEIGHT_DTYPES};
use kiln_core::quant;
use kiln_core::DType::F32;
use kiln_cpu::ops::matmul::dot;

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

/// Each output is exactly `dot(x_i, dequantize(w_j)) + bias_j`, computed here one row
/// at a time: the product's loops (weight rows in groups, k in steps, activation rows
/// in passes) change the order of nothing. Shapes cross every boundary of those loops:
/// row counts that leave a partial group, k over several steps with a partial last
/// one, more activation rows than a pass, float rows with a tail after the last
/// chunk of 8.
#[test]
fn matmul_equals_the_dot_of_each_pair_of_rows_bit_for_bit() {
    let mut rng = rng("matmul_bitwise");
    for dtype in WEIGHT_DTYPES {
        let bs = dtype.block_size();
        let k = if bs == 1 {
            1301
        } else {
            1280_usize.next_multiple_of(bs) + bs
        };
        for (m, n) in [(1, 7), (2, 4), (130, 5)] {
            let mut g = G::new();
            let x = g.p("x", F32, &[m, k]);
            let w = g.p("w", dtype, &[n, k]);
            let bias = g.p("bias", F32, &[n]);
            let out = g.p("out", F32, &[m, n]);
            g.g.push(MatMul {
                x,
                x_q8: None,
                w,
                bias: Some(bias),
                out,
                m,
                n,
                k,
            })
            .unwrap();
            let xv = randn(&mut rng, m * k, 1.0);
            let wb = random_weight(&mut rng, dtype, n, k);
            let bv = randn(&mut rng, n, 1.0);
            let inputs = [(x, f32_bytes(&xv)), (w, wb.clone()), (bias, f32_bytes(&bv))];
            let got = f32s(&run(&g.g, &inputs, &[out])[0]);
            let mut wv = vec![0f32; n * k];
            quant::dequantize(dtype, &wb, &mut wv).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let want = dot(&xv[i * k..][..k], &wv[j * k..][..k]) + bv[j];
                    let got = got[i * n + j];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "matmul {dtype} m={m} n={n} k={k}: out[{i}, {j}] is {got}, the dot gives {want}"
                    );
                }
            }
        }
    }
}

/// `dot_rows` (attention's scores) gives `dot` of each row bit for bit, for row counts
/// around its groups of four and lengths with and without a tail after the last
/// chunk of 8.
#[test]
fn dot_rows_equals_the_dot_of_each_row_bit_for_bit() {
    let mut rng = rng("dot_rows");
    for k in [1, 7, 8, 64, 129] {
        for n in 1..=9 {
            let x = randn(&mut rng, k, 1.0);
            let rows = randn(&mut rng, n * k, 1.0);
            let mut got = vec![f32::NAN; n];
            kiln_cpu::ops::matmul::dot_rows(&x, &rows, &mut got);
            for (r, &g) in got.iter().enumerate() {
                let want = dot(&x, &rows[r * k..][..k]);
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "k={k} n={n} row {r}: {g} against {want}"
                );
            }
        }
    }
}

/// A product over rows of no elements is an error, not a panic.
#[test]
fn matmul_of_empty_rows_is_an_error() {
    let mut out = [0.0f32; 2];
    let err = kiln_cpu::ops::matmul::matmul(&[], &[], F32, None, &mut out, 1, 2, 0).unwrap_err();
    assert!(err.to_string().contains("k must be at least 1"), "{err}");
}
