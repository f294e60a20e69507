//! RmsNorm and AddRmsNorm against a float64 computation, and their Q8_1 copies of
//! `out` where the row length allows one.

mod common;
use common::*;
use kiln_core::ops::{AddRmsNorm, RmsNorm};
use kiln_core::DType::{F32, Q8_1};

const SHAPES: [(usize, usize); 5] = [(1, 1), (3, 7), (2, 1023), (5, 4096), (1, 5120)];

fn rms_norm_f64(x: &[f32], w: Option<&[f32]>, dim: usize, eps: f32) -> Vec<f64> {
    let mut out = Vec::new();
    for row in x.chunks(dim) {
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / dim as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for (i, &v) in row.iter().enumerate() {
            out.push(v as f64 * inv * w.map_or(1.0, |w| w[i] as f64));
        }
    }
    out
}

#[test]
fn rms_norm_matches_f64() {
    let mut rng = rng("rms_norm");
    for (rows, dim) in SHAPES {
        for with_weight in [false, true] {
            let mut g = G::new();
            let x = g.p("x", F32, &[rows, dim]);
            let w = with_weight.then(|| g.p("w", F32, &[dim]));
            let out = g.p("out", F32, &[rows, dim]);
            let out_q8 = (dim % 32 == 0).then(|| g.p("out_q8", Q8_1, &[rows, dim]));
            let eps = 1e-5;
            g.g.push(RmsNorm {
                x,
                weight: w,
                out,
                out_q8,
                rows,
                dim,
                eps,
            })
            .unwrap();
            let xv = randn(&mut rng, rows * dim, 3.0);
            let wv = randn(&mut rng, dim, 1.0);
            let mut inputs = vec![(x, f32_bytes(&xv))];
            if let Some(w) = w {
                inputs.push((w, f32_bytes(&wv)));
            }
            let outputs: Vec<_> = std::iter::once(out).chain(out_q8).collect();
            let res = run(&g.g, &inputs, &outputs);
            let got = f32s(&res[0]);
            let want = rms_norm_f64(&xv, with_weight.then_some(&wv[..]), dim, eps);
            let what = format!("rms_norm {rows}x{dim} w={with_weight}");
            assert_close(&what, &got, &want, 1e-10);
            if out_q8.is_some() {
                check_q8_copy(&what, &got, &res[1]);
            }
        }
    }
}

#[test]
fn add_rms_norm_matches_f64_and_writes_the_sum() {
    let mut rng = rng("add_rms_norm");
    for (rows, dim) in SHAPES {
        let mut g = G::new();
        let x = g.p("x", F32, &[rows, dim]);
        let r = g.p("residual", F32, &[rows, dim]);
        let w = g.p("w", F32, &[dim]);
        let sum = g.p("sum", F32, &[rows, dim]);
        let out = g.p("out", F32, &[rows, dim]);
        let out_q8 = (dim % 32 == 0).then(|| g.p("out_q8", Q8_1, &[rows, dim]));
        let eps = 1e-6;
        g.g.push(AddRmsNorm {
            x,
            residual: r,
            weight: Some(w),
            sum,
            out,
            out_q8,
            rows,
            dim,
            eps,
        })
        .unwrap();
        let (xv, rv, wv) = (
            randn(&mut rng, rows * dim, 2.0),
            randn(&mut rng, rows * dim, 2.0),
            randn(&mut rng, dim, 1.0),
        );
        let res = run(
            &g.g,
            &[
                (x, f32_bytes(&xv)),
                (r, f32_bytes(&rv)),
                (w, f32_bytes(&wv)),
            ],
            &[[sum, out].as_slice(), out_q8.as_slice()].concat(),
        );
        let sum_want: Vec<f32> = xv.iter().zip(&rv).map(|(a, b)| a + b).collect();
        assert_eq!(f32s(&res[0]), sum_want, "sum is the f32 sum");
        let want = rms_norm_f64(&sum_want, Some(&wv), dim, eps);
        let what = format!("add_rms_norm {rows}x{dim}");
        assert_close(&what, &f32s(&res[1]), &want, 1e-10);
        if out_q8.is_some() {
            check_q8_copy(&what, &f32s(&res[1]), &res[2]);
        }
    }
}
