//! RoPE (normal and NeoX, partial rotary, frequency factors) and the fused per-head
//! RMSNorm + RoPE, against float64.

mod common;
use common::*;
use kiln_core::ops::{HeadNormRope, Rope, RopeParams, RopeStyle};
use kiln_core::DType::{F32, I32};
use rand::Rng;

/// Rotates every head of `[n_tokens, n_heads, head_dim]` data in float64.
fn rope_f64(
    x: &[f64],
    pos: &[i32],
    ff: Option<&[f32]>,
    n_heads: usize,
    p: &RopeParams,
) -> Vec<f64> {
    let hd = p.head_dim;
    let mut out = x.to_vec();
    for (t, &ps) in pos.iter().enumerate() {
        for h in 0..n_heads {
            let head = &mut out[(t * n_heads + h) * hd..][..hd];
            for i in 0..p.rotary_dim / 2 {
                let theta = ps as f64
                    * p.freq_scale as f64
                    * (p.base as f64).powf(-2.0 * i as f64 / p.rotary_dim as f64)
                    / ff.map_or(1.0, |f| f[i] as f64);
                let (a, b) = match p.style {
                    RopeStyle::Normal => (2 * i, 2 * i + 1),
                    RopeStyle::NeoX => (i, i + p.rotary_dim / 2),
                };
                let (va, vb) = (head[a], head[b]);
                head[a] = va * theta.cos() - vb * theta.sin();
                head[b] = va * theta.sin() + vb * theta.cos();
            }
        }
    }
    out
}

/// (n_tokens, n_heads, head_dim, rotary_dim)
const CASES: [(usize, usize, usize, usize); 5] = [
    (1, 1, 2, 2),
    (3, 4, 64, 64),
    (5, 3, 128, 64),
    (2, 2, 80, 32),
    (7, 8, 128, 128),
];

fn params(head_dim: usize, rotary_dim: usize, style: RopeStyle) -> RopeParams {
    RopeParams {
        head_dim,
        rotary_dim,
        base: 500_000.0,
        freq_scale: 0.5,
        style,
    }
}

#[test]
fn rope_matches_f64() {
    let mut rng = rng("rope");
    for (n_tokens, n_heads, hd, rot) in CASES {
        for style in [RopeStyle::Normal, RopeStyle::NeoX] {
            for with_ff in [false, true] {
                let p = params(hd, rot, style);
                let mut g = G::new();
                let x = g.p("x", F32, &[n_tokens, n_heads, hd]);
                let pos = g.p("pos", I32, &[n_tokens]);
                let ff = with_ff.then(|| g.p("ff", F32, &[rot / 2]));
                let out = g.p("out", F32, &[n_tokens, n_heads, hd]);
                g.g.push(Rope {
                    x,
                    positions: pos,
                    freq_factors: ff,
                    out,
                    n_tokens,
                    n_heads,
                    params: p,
                })
                .unwrap();
                let xv = randn(&mut rng, n_tokens * n_heads * hd, 1.0);
                let pv: Vec<i32> = (0..n_tokens).map(|_| rng.random_range(0..8192)).collect();
                let ffv: Vec<f32> = (0..rot / 2).map(|_| rng.random_range(1.0..8.0)).collect();
                let mut inputs = vec![(x, f32_bytes(&xv)), (pos, i32_bytes(&pv))];
                if let Some(ff) = ff {
                    inputs.push((ff, f32_bytes(&ffv)));
                }
                let got = f32s(&run(&g.g, &inputs, &[out])[0]);
                let x64: Vec<f64> = xv.iter().map(|&v| v as f64).collect();
                let want = rope_f64(&x64, &pv, with_ff.then_some(&ffv[..]), n_heads, &p);
                // f32 angles of positions up to 8192 are off by up to ~1e-3 rad.
                assert_close(
                    &format!("rope {n_tokens}x{n_heads}x{hd} rot={rot} {style:?} ff={with_ff}"),
                    &got,
                    &want,
                    1e-6,
                );
                // Dimensions past rotary_dim pass through untouched.
                for (i, (&g, &x)) in got.iter().zip(&xv).enumerate() {
                    if i % hd >= rot {
                        assert_eq!(g, x, "element {i} past rotary_dim changed");
                    }
                }
            }
        }
    }
}

#[test]
fn head_norm_rope_matches_f64() {
    let mut rng = rng("head_norm_rope");
    for (n_tokens, n_heads, hd, rot) in CASES {
        for with_weight in [false, true] {
            let p = params(hd, rot, RopeStyle::NeoX);
            let eps = 1e-6;
            let mut g = G::new();
            let x = g.p("x", F32, &[n_tokens, n_heads, hd]);
            let w = with_weight.then(|| g.p("w", F32, &[hd]));
            let pos = g.p("pos", I32, &[n_tokens]);
            let out = g.p("out", F32, &[n_tokens, n_heads, hd]);
            g.g.push(HeadNormRope {
                x,
                weight: w,
                positions: pos,
                freq_factors: None,
                out,
                n_tokens,
                n_heads,
                eps,
                params: p,
            })
            .unwrap();
            let xv = randn(&mut rng, n_tokens * n_heads * hd, 3.0);
            let wv = randn(&mut rng, hd, 1.0);
            let pv: Vec<i32> = (0..n_tokens).map(|_| rng.random_range(0..4096)).collect();
            let mut inputs = vec![(x, f32_bytes(&xv)), (pos, i32_bytes(&pv))];
            if let Some(w) = w {
                inputs.push((w, f32_bytes(&wv)));
            }
            let got = f32s(&run(&g.g, &inputs, &[out])[0]);
            let mut normed = Vec::new();
            for head in xv.chunks(hd) {
                let ms = head.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / hd as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                for (i, &v) in head.iter().enumerate() {
                    normed.push(v as f64 * inv * if with_weight { wv[i] as f64 } else { 1.0 });
                }
            }
            let want = rope_f64(&normed, &pv, None, n_heads, &p);
            assert_close(
                &format!("head_norm_rope {n_tokens}x{n_heads}x{hd} rot={rot} w={with_weight}"),
                &got,
                &want,
                1e-6,
            );
        }
    }
}
