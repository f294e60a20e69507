//! Softmax with scale and causal mask against float64.

mod common;
use common::*;
use kiln_core::ops::Softmax;
use kiln_core::DType::F32;

fn softmax_f64(x: &[f32], cols: usize, scale: f32, causal: Option<usize>) -> Vec<f64> {
    let mut out = Vec::new();
    for (r, row) in x.chunks(cols).enumerate() {
        let visible = causal.map_or(cols, |o| (o + r + 1).min(cols));
        let s: Vec<f64> = row[..visible]
            .iter()
            .map(|&v| v as f64 * scale as f64)
            .collect();
        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|v| (v - max).exp()).sum();
        out.extend(s.iter().map(|v| (v - max).exp() / z));
        out.extend(std::iter::repeat_n(0.0, cols - visible));
    }
    out
}

#[test]
fn softmax_matches_f64() {
    let mut rng = rng("softmax");
    for (rows, cols) in [(1, 1), (3, 7), (4, 1000), (17, 33)] {
        for causal in [None, Some(0), Some(5)] {
            let mut g = G::new();
            let x = g.p("x", F32, &[rows, cols]);
            let out = g.p("out", F32, &[rows, cols]);
            let scale = 0.37;
            g.g.push(Softmax {
                x,
                out,
                rows,
                cols,
                scale,
                causal_offset: causal,
            })
            .unwrap();
            let xv = randn(&mut rng, rows * cols, 5.0);
            let got = f32s(&run(&g.g, &[(x, f32_bytes(&xv))], &[out])[0]);
            let want = softmax_f64(&xv, cols, scale, causal);
            assert_close(
                &format!("softmax {rows}x{cols} causal={causal:?}"),
                &got,
                &want,
                1e-11,
            );
            for (r, row) in got.chunks(cols).enumerate() {
                let s: f32 = row.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "row {r} sums to {s}");
            }
        }
    }
}
