//! Causal grouped-query attention over F32 and F16 caches, with sliding window and
//! soft-cap, for prefill (many queries) and decode (one), and over caches of several
//! sequence slots, against float64, and the output's Q8_1 copy.

mod common;
use common::*;
use kiln_core::ops::Attention;
use kiln_core::DType::{self, F16, F32, I32};
use rand::Rng;

struct Case {
    n_tokens: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    cap: usize,
    window: Option<usize>,
    softcap: Option<f32>,
    /// Slots of the caches; with more than one, each query gets a random slot and
    /// position.
    n_slots: usize,
}

#[allow(clippy::too_many_arguments)]
fn attention_f64(
    q: &[f32],
    k: &[f64],
    v: &[f64],
    pos: &[i32],
    slots: &[i32],
    c: &Case,
    scale: f32,
) -> Vec<f64> {
    let hd = c.hd;
    let mut out = vec![0f64; q.len()];
    for (t, &p) in pos.iter().enumerate() {
        for h in 0..c.n_heads {
            // Head g of the token's slot, as one head of n_slots * n_kv.
            let g = slots[t] as usize * c.n_kv + h / (c.n_heads / c.n_kv);
            let qv = &q[(t * c.n_heads + h) * hd..][..hd];
            let visible: Vec<usize> = (0..=p as usize)
                .filter(|&j| c.window.is_none_or(|w| (p as usize - j) < w))
                .collect();
            let scores: Vec<f64> = visible
                .iter()
                .map(|&j| {
                    let kj = &k[(g * c.cap + j) * hd..][..hd];
                    let s =
                        scale as f64 * qv.iter().zip(kj).map(|(&a, &b)| a as f64 * b).sum::<f64>();
                    c.softcap
                        .map_or(s, |cap| cap as f64 * (s / cap as f64).tanh())
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            let o = &mut out[(t * c.n_heads + h) * hd..][..hd];
            for (&j, s) in visible.iter().zip(&scores) {
                let a = (s - max).exp() / z;
                for (o, &vv) in o.iter_mut().zip(&v[(g * c.cap + j) * hd..][..hd]) {
                    *o += a * vv;
                }
            }
        }
    }
    out
}

fn check(case: Case, dtype: DType, rng: &mut rand::rngs::StdRng, decode: bool) {
    let c = &case;
    let mut g = G::new();
    let q = g.p("q", F32, &[c.n_tokens, c.n_heads, c.hd]);
    let kc = g.p("k", dtype, &[c.n_slots, c.n_kv, c.cap, c.hd]);
    let vc = g.p("v", dtype, &[c.n_slots, c.n_kv, c.cap, c.hd]);
    let pos = g.p("pos", I32, &[c.n_tokens]);
    let slots = (c.n_slots > 1).then(|| g.p("slots", I32, &[c.n_tokens]));
    let out = g.p("out", F32, &[c.n_tokens, c.n_heads, c.hd]);
    // Every case whose rows are whole Q8_1 blocks also writes the copy.
    let width = c.n_heads * c.hd;
    let out_q8 = (width % 32 == 0).then(|| g.p("out_q8", DType::Q8_1, &[c.n_tokens, width]));
    let scale = 1.0 / (c.hd as f32).sqrt();
    g.g.push(Attention {
        q,
        k_cache: kc,
        v_cache: vc,
        positions: pos,
        slots,
        out,
        out_q8,
        n_tokens: c.n_tokens,
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv,
        head_dim: c.hd,
        capacity: c.cap,
        n_slots: c.n_slots,
        scale,
        window: c.window,
        softcap: c.softcap,
    })
    .unwrap();
    let qv = randn(rng, c.n_tokens * c.n_heads * c.hd, 1.0);
    let cache = c.n_slots * c.n_kv * c.cap * c.hd;
    let kb = float_bytes(&randn(rng, cache, 1.5), dtype);
    let vb = float_bytes(&randn(rng, cache, 1.0), dtype);
    // Prefill: consecutive positions from a random start; decode: one random position;
    // several slots: a random slot and position per query.
    let start = rng.random_range(0..=c.cap - c.n_tokens);
    let pv: Vec<i32> = if decode {
        vec![rng.random_range(0..c.cap as i32)]
    } else if c.n_slots > 1 {
        (0..c.n_tokens)
            .map(|_| rng.random_range(0..c.cap as i32))
            .collect()
    } else {
        (start..start + c.n_tokens).map(|p| p as i32).collect()
    };
    let sv: Vec<i32> = (0..c.n_tokens)
        .map(|_| rng.random_range(0..c.n_slots as i32))
        .collect();
    let mut inputs = vec![
        (q, f32_bytes(&qv)),
        (kc, kb.clone()),
        (vc, vb.clone()),
        (pos, i32_bytes(&pv)),
    ];
    inputs.extend(slots.map(|s| (s, i32_bytes(&sv))));
    let outputs: Vec<_> = std::iter::once(out).chain(out_q8).collect();
    let results = run(&g.g, &inputs, &outputs);
    let got = f32s(&results[0]);
    let want = attention_f64(
        &qv,
        &float_values(&kb, dtype),
        &float_values(&vb, dtype),
        &pv,
        &sv,
        c,
        scale,
    );
    let what = format!(
        "attention {dtype} t={} h={}/{} hd={} cap={} window={:?} softcap={:?} slots {sv:?} positions {pv:?}",
        c.n_tokens, c.n_heads, c.n_kv, c.hd, c.cap, c.window, c.softcap
    );
    assert_close(&what, &got, &want, 1e-10);
    if out_q8.is_some() {
        let mut q8 = vec![0u8; DType::Q8_1.bytes_for(got.len()).unwrap()];
        kiln_core::quant::quantize(DType::Q8_1, &got, &mut q8).unwrap();
        assert_eq!(results[1], q8, "{what}: q8 copy");
    }
}

#[test]
fn attention_prefill_matches_f64() {
    let mut rng = rng("attention_prefill");
    for dtype in [F32, F16] {
        for (n_tokens, n_heads, n_kv, hd, cap) in [
            (1, 1, 1, 1, 1),
            (5, 4, 4, 64, 9),
            (13, 8, 2, 128, 40),
            (7, 6, 1, 80, 7),
        ] {
            for (window, softcap) in [
                (None, None),
                (Some(3), None),
                (None, Some(30.0)),
                (Some(5), Some(5.0)),
            ] {
                let case = Case {
                    n_tokens,
                    n_heads,
                    n_kv,
                    hd,
                    cap,
                    window,
                    softcap,
                    n_slots: 1,
                };
                check(case, dtype, &mut rng, false);
            }
        }
    }
}

#[test]
fn attention_decode_matches_f64() {
    let mut rng = rng("attention_decode");
    for dtype in [F32, F16] {
        for (n_heads, n_kv, hd, cap) in [(32, 8, 128, 1000), (4, 2, 64, 3), (14, 2, 64, 257)] {
            for window in [None, Some(100)] {
                let case = Case {
                    n_tokens: 1,
                    n_heads,
                    n_kv,
                    hd,
                    cap,
                    window,
                    softcap: None,
                    n_slots: 1,
                };
                check(case, dtype, &mut rng, true);
            }
        }
    }
}

#[test]
fn attention_over_slots_matches_f64() {
    let mut rng = rng("attention_over_slots");
    for dtype in [F32, F16] {
        for (n_tokens, n_heads, n_kv, hd, cap, n_slots) in [
            (9, 4, 2, 64, 11, 3),
            (6, 6, 1, 40, 30, 5),
            (1, 2, 2, 8, 3, 2),
        ] {
            for (window, softcap) in [(None, None), (Some(4), Some(20.0))] {
                let case = Case {
                    n_tokens,
                    n_heads,
                    n_kv,
                    hd,
                    cap,
                    window,
                    softcap,
                    n_slots,
                };
                check(case, dtype, &mut rng, false);
            }
        }
    }
}

#[test]
fn a_slot_outside_the_cache_is_an_error_naming_the_token() {
    let mut g = G::new();
    let (n_heads, hd, cap) = (2, 8, 4);
    let q = g.p("q", F32, &[3, n_heads, hd]);
    let kc = g.p("k", F32, &[2, 1, cap, hd]);
    let vc = g.p("v", F32, &[2, 1, cap, hd]);
    let pos = g.p("pos", I32, &[3]);
    let slots = g.p("slots", I32, &[3]);
    let out = g.p("out", F32, &[3, n_heads, hd]);
    g.g.push(Attention {
        q,
        k_cache: kc,
        v_cache: vc,
        positions: pos,
        slots: Some(slots),
        out,
        out_q8: None,
        n_tokens: 3,
        n_heads,
        n_kv_heads: 1,
        head_dim: hd,
        capacity: cap,
        n_slots: 2,
        scale: 1.0,
        window: None,
        softcap: None,
    })
    .unwrap();
    let inputs = [
        (q, f32_bytes(&[0.5; 3 * 2 * 8])),
        (kc, f32_bytes(&[0.25; 2 * 4 * 8])),
        (vc, f32_bytes(&[1.0; 2 * 4 * 8])),
        (pos, i32_bytes(&[0, 1, 2])),
        (slots, i32_bytes(&[1, 0, 2])),
    ];
    let err = run_on(
        &kiln_cpu::CpuBackend,
        &g.g,
        &inputs,
        &[out],
        kiln_core::Aliasing::On,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("token 2 has slot 2"), "{err}");
}
