//! RoPE (normal and NeoX, partial rotary, frequency factors), the fused per-head
//! RMSNorm + RoPE, and the split-rotate-append of a fused QKV projection, against
//! float64.

mod common;
use common::*;
use kiln_core::ops::{HeadNormRope, QkNorm, QkvRopeAppend, Rope, RopeParams, RopeStyle};
use kiln_core::DType::{F16, F32, I32};
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

/// Per-head RMSNorm of `[.., head_dim]` data in float64, with an optional weight.
fn head_norm_f64(x: &[f32], weight: Option<&[f32]>, hd: usize, eps: f32) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for head in x.chunks(hd) {
        let ms = head.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / hd as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for (i, &v) in head.iter().enumerate() {
            out.push(v as f64 * inv * weight.map_or(1.0, |w| w[i] as f64));
        }
    }
    out
}

#[test]
fn qkv_rope_append_matches_f64() {
    let mut rng = rng("qkv_rope_append");
    // (n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, capacity)
    let cases = [
        (1, 4, 2, 64, 64, 9),
        (3, 4, 1, 128, 64, 17),
        (6, 6, 3, 80, 32, 11),
        (2, 2, 2, 18, 10, 5),
    ];
    for (t, nh, nkv, hd, rot, cap) in cases {
        for (style, with_norm, with_ff, cache) in [
            (RopeStyle::Normal, false, true, F32),
            (RopeStyle::NeoX, true, false, F32),
            (RopeStyle::NeoX, false, false, F16),
        ] {
            let p = params(hd, rot, style);
            let eps = 1e-6;
            let heads = nh + 2 * nkv;
            let mut g = G::new();
            let qkv = g.p("qkv", F32, &[t, heads, hd]);
            let pos = g.p("pos", I32, &[t]);
            let ff = with_ff.then(|| g.p("ff", F32, &[rot / 2]));
            let norm = with_norm.then(|| QkNorm {
                q_weight: g.p("qw", F32, &[hd]),
                k_weight: g.p("kw", F32, &[hd]),
                eps,
            });
            let q_out = g.p("q_out", F32, &[t, nh, hd]);
            let k_cache = g.p("k_cache", cache, &[nkv, cap, hd]);
            let v_cache = g.p("v_cache", cache, &[nkv, cap, hd]);
            g.g.push(QkvRopeAppend {
                qkv,
                positions: pos,
                slots: None,
                freq_factors: ff,
                norm,
                q_out,
                k_cache,
                v_cache,
                n_tokens: t,
                n_heads: nh,
                n_kv_heads: nkv,
                capacity: cap,
                n_slots: 1,
                params: p,
            })
            .unwrap();
            let xv = randn(&mut rng, t * heads * hd, 2.0);
            // Distinct positions, but the last token repeats the first's when t > 1:
            // the later token's row is the one kept.
            let mut pv: Vec<i32> = (0..cap as i32).collect();
            for i in (1..pv.len()).rev() {
                pv.swap(i, rng.random_range(0..=i));
            }
            pv.truncate(t);
            if t > 1 {
                pv[t - 1] = pv[0];
            }
            let ffv: Vec<f32> = (0..rot / 2).map(|_| rng.random_range(1.0..8.0)).collect();
            let (qw, kw) = (randn(&mut rng, hd, 1.0), randn(&mut rng, hd, 1.0));
            let cache_elems = nkv * cap * hd;
            let old_k = randn(&mut rng, cache_elems, 1.0);
            let old_v = randn(&mut rng, cache_elems, 1.0);
            let stored = |v: &[f32]| -> Vec<u8> {
                match cache {
                    F16 => v
                        .iter()
                        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                        .collect(),
                    _ => f32_bytes(v),
                }
            };
            let mut inputs = vec![
                (qkv, f32_bytes(&xv)),
                (pos, i32_bytes(&pv)),
                (k_cache, stored(&old_k)),
                (v_cache, stored(&old_v)),
            ];
            if let Some(ff) = ff {
                inputs.push((ff, f32_bytes(&ffv)));
            }
            if let Some(n) = norm {
                inputs.push((n.q_weight, f32_bytes(&qw)));
                inputs.push((n.k_weight, f32_bytes(&kw)));
            }
            let got = run(&g.g, &inputs, &[q_out, k_cache, v_cache]);
            let read_cache = |b: &[u8]| -> Vec<f32> {
                match cache {
                    F16 => b
                        .chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                    _ => f32s(b),
                }
            };
            // The reference: split, normalize, rotate, then write rows in token order.
            let part = |from: usize, n: usize| -> Vec<f32> {
                xv.chunks(heads * hd)
                    .flat_map(|tok| tok[from * hd..(from + n) * hd].to_vec())
                    .collect()
            };
            let (q, k, v) = (part(0, nh), part(nh, nkv), part(nh + nkv, nkv));
            let ffr = with_ff.then_some(&ffv[..]);
            let prep = |x: &[f32], w: &[f32]| -> Vec<f64> {
                if with_norm {
                    head_norm_f64(x, Some(w), hd, eps)
                } else {
                    x.iter().map(|&v| v as f64).collect()
                }
            };
            let want_q = rope_f64(&prep(&q, &qw), &pv, ffr, nh, &p);
            let want_k = rope_f64(&prep(&k, &kw), &pv, ffr, nkv, &p);
            let mut want_kc: Vec<f64> = old_k.iter().map(|&v| v as f64).collect();
            let mut want_vc: Vec<f64> = old_v.iter().map(|&v| v as f64).collect();
            for (ti, &ps) in pv.iter().enumerate() {
                for h in 0..nkv {
                    let row = (h * cap + ps as usize) * hd;
                    let src = (ti * nkv + h) * hd;
                    want_kc[row..row + hd].copy_from_slice(&want_k[src..src + hd]);
                    for d in 0..hd {
                        want_vc[row + d] = v[src + d] as f64;
                    }
                }
            }
            let what = format!("qkv_rope_append t={t} {nh}/{nkv}x{hd} rot={rot} {style:?} norm={with_norm} ff={with_ff} {cache}");
            assert_close(&format!("{what} q"), &f32s(&got[0]), &want_q, 1e-6);
            // F16 caches hold values rounded to 11 significant bits.
            let tol = if cache == F16 { 1e-6 } else { 1e-10 };
            assert_close(&format!("{what} k"), &read_cache(&got[1]), &want_kc, tol);
            assert_close(&format!("{what} v"), &read_cache(&got[2]), &want_vc, tol);
            // Rows no token wrote keep their old values exactly.
            let written: Vec<usize> = pv.iter().map(|&p| p as usize).collect();
            let kc = read_cache(&got[1]);
            for h in 0..nkv {
                for r in (0..cap).filter(|r| !written.contains(r)) {
                    let at = (h * cap + r) * hd;
                    let old = read_cache(&stored(&old_k[at..at + hd]));
                    assert_eq!(
                        &kc[at..at + hd],
                        &old[..],
                        "{what}: row {r} of head {h} changed"
                    );
                }
            }
        }
    }
}
