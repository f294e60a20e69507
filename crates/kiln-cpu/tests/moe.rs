//! The mixture-of-experts ops against float64 oracles written here, and each invalid
//! argument they reject.

mod common;
use common::*;
use kiln_core::ops::{Gating, MoeCombine, MoeMatMul, MoeRouter, WEIGHT_DTYPES};
use kiln_core::DType::{F32, I32};
use kiln_core::{quant, Aliasing, Error};
use kiln_cpu::ops::matmul::dot;
use kiln_cpu::CpuBackend;
use rand::rngs::StdRng;
use rand::Rng;

/// The f64 oracle of one token's routing: (experts, weights).
fn route_f64(logits: &[f32], k: usize, gating: Gating, normalize: bool) -> (Vec<i32>, Vec<f64>) {
    let l: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
    let p: Vec<f64> = match gating {
        Gating::Softmax => {
            let max = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = l.iter().map(|v| (v - max).exp()).sum();
            l.iter().map(|v| (v - max).exp() / sum).collect()
        }
        Gating::Sigmoid => l.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
    };
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
    let ids: Vec<i32> = order[..k].iter().map(|&e| e as i32).collect();
    let mut w: Vec<f64> = order[..k].iter().map(|&e| p[e]).collect();
    if normalize {
        let s: f64 = w.iter().sum();
        w.iter_mut().for_each(|v| *v /= s);
    }
    (ids, w)
}

fn router_graph(
    m: usize,
    n_expert: usize,
    k: usize,
    gating: Gating,
    normalize: bool,
) -> (G, [kiln_core::BufferId; 3]) {
    let mut g = G::new();
    let logits = g.p("logits", F32, &[m, n_expert]);
    let ids = g.p("ids", I32, &[m, k]);
    let weights = g.p("weights", F32, &[m, k]);
    g.g.push(MoeRouter {
        logits,
        ids,
        weights,
        m,
        n_expert,
        k,
        gating,
        normalize,
    })
    .unwrap();
    (g, [logits, ids, weights])
}

#[test]
fn moe_router_matches_f64() {
    let mut rng = rng("moe_router");
    // (m, n_expert, k): decode, odd counts, Qwen3-MoE's 128 choose 8, k = n_expert.
    for (m, n_expert, k) in [
        (1, 8, 2),
        (5, 7, 3),
        (3, 128, 8),
        (4, 4, 4),
        (2, 1, 1),
        (9, 60, 4),
    ] {
        for gating in [Gating::Softmax, Gating::Sigmoid] {
            for normalize in [false, true] {
                let (g, [logits, ids, weights]) = router_graph(m, n_expert, k, gating, normalize);
                let lv = ladder_logits(&mut rng, m, n_expert);
                let out = run(&g.g, &[(logits, f32_bytes(&lv))], &[ids, weights]);
                let (got_ids, got_w) = (i32s(&out[0]), f32s(&out[1]));
                let what = format!("router m={m} E={n_expert} k={k} {gating:?} norm={normalize}");
                let mut want_w = Vec::new();
                for t in 0..m {
                    let (want_ids, w) =
                        route_f64(&lv[t * n_expert..][..n_expert], k, gating, normalize);
                    assert_eq!(
                        &got_ids[t * k..][..k],
                        want_ids.as_slice(),
                        "{what}: token {t}"
                    );
                    want_w.extend(w);
                }
                for (i, (&g, &w)) in got_w.iter().zip(&want_w).enumerate() {
                    assert!(
                        (f64::from(g) - w).abs() <= 1e-6 * w.abs().max(1e-3),
                        "{what}: weight {i} is {g}, want {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn moe_router_breaks_ties_to_the_lower_expert_and_never_prefers_nan() {
    let (g, [logits, ids, weights]) = router_graph(2, 5, 3, Gating::Softmax, true);
    let lv = [1.0, 2.0, 2.0, 0.5, 2.0, f32::NAN, 1.0, 1.0, 3.0, 1.0];
    let out = run(&g.g, &[(logits, f32_bytes(&lv))], &[ids, weights]);
    assert_eq!(i32s(&out[0])[..3], [1, 2, 4]);
    // The normalized weights of three equal probabilities.
    for w in &f32s(&out[1])[..3] {
        assert!((w - 1.0 / 3.0).abs() < 1e-6, "{w}");
    }
    // A NaN logit makes every softmax probability NaN: the order is by index then.
    assert_eq!(i32s(&out[0])[3..], [0, 1, 2]);

    let (g, [logits, ids, _]) = router_graph(1, 4, 2, Gating::Sigmoid, false);
    let out = run(
        &g.g,
        &[(logits, f32_bytes(&[f32::NAN, 0.0, f32::NAN, -1.0]))],
        &[ids],
    );
    assert_eq!(i32s(&out[0]), [1, 3]);
}

/// `m` tokens' choices of `k` distinct experts among `n_expert`, skewed to the low
/// experts so that some experts get many tokens and others none.
fn random_ids(rng: &mut StdRng, m: usize, k: usize, n_expert: usize) -> Vec<i32> {
    (0..m)
        .flat_map(|_| {
            let mut chosen: Vec<i32> = Vec::with_capacity(k);
            while chosen.len() < k {
                let e = if rng.random::<bool>() {
                    rng.random_range(0..k.max(n_expert / 3).min(n_expert))
                } else {
                    rng.random_range(0..n_expert)
                } as i32;
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            chosen
        })
        .collect()
}

struct MatCase {
    m: usize,
    k: usize,
    n_expert: usize,
    rows: usize,
    cols: usize,
    per_slot: bool,
}

fn moe_matmul_graph(dtype: kiln_core::DType, c: &MatCase) -> (G, [kiln_core::BufferId; 4]) {
    let mut g = G::new();
    let slots = if c.per_slot { c.k } else { 1 };
    let x = g.p("x", F32, &[c.m, slots, c.cols]);
    let ids = g.p("ids", I32, &[c.m, c.k]);
    let w = g.p("w", dtype, &[c.n_expert, c.rows, c.cols]);
    let out = g.p("out", F32, &[c.m, c.k, c.rows]);
    g.g.push(MoeMatMul {
        x,
        ids,
        w,
        out,
        m: c.m,
        k: c.k,
        n_expert: c.n_expert,
        rows: c.rows,
        cols: c.cols,
        per_slot: c.per_slot,
    })
    .unwrap();
    (g, [x, ids, w, out])
}

/// A run of `c` on random inputs: activations, expert ids, weight bytes and output.
struct MatRun {
    xv: Vec<f32>,
    idv: Vec<i32>,
    wb: Vec<u8>,
    got: Vec<f32>,
}

fn run_random(rng: &mut StdRng, dtype: kiln_core::DType, c: &MatCase) -> MatRun {
    let (g, [x, ids, w, out]) = moe_matmul_graph(dtype, c);
    let slots = if c.per_slot { c.k } else { 1 };
    let xv = randn(rng, c.m * slots * c.cols, 1.0);
    let idv = random_ids(rng, c.m, c.k, c.n_expert);
    let wb = random_weight(rng, dtype, c.n_expert * c.rows, c.cols);
    let inputs = [(x, f32_bytes(&xv)), (ids, i32_bytes(&idv)), (w, wb.clone())];
    let got = f32s(&run(&g.g, &inputs, &[out])[0]);
    MatRun { xv, idv, wb, got }
}

#[test]
fn moe_matmul_every_weight_dtype_matches_f64() {
    let mut rng = rng("moe_matmul");
    for dtype in WEIGHT_DTYPES {
        let bs = dtype.block_size();
        let cases = [
            MatCase {
                m: 1,
                k: 2,
                n_expert: 8,
                rows: 5,
                cols: bs * 2,
                per_slot: false,
            },
            MatCase {
                m: 7,
                k: 3,
                n_expert: 5,
                rows: 3,
                cols: bs,
                per_slot: true,
            },
            MatCase {
                m: 13,
                k: 4,
                n_expert: 11,
                rows: 9,
                cols: bs * 3,
                per_slot: false,
            },
            MatCase {
                m: 2,
                k: 1,
                n_expert: 1,
                rows: 1,
                cols: bs,
                per_slot: true,
            },
        ];
        for c in cases {
            let slots = if c.per_slot { c.k } else { 1 };
            let MatRun { xv, idv, wb, got } = run_random(&mut rng, dtype, &c);
            let wv = weight_values(&wb, dtype, c.n_expert * c.rows * c.cols);
            let mut want = vec![0f64; c.m * c.k * c.rows];
            let mut magnitude = want.clone();
            for t in 0..c.m {
                for j in 0..c.k {
                    let e = idv[t * c.k + j] as usize;
                    let xr = &xv[(t * slots + if c.per_slot { j } else { 0 }) * c.cols..][..c.cols];
                    for r in 0..c.rows {
                        let wr = &wv[(e * c.rows + r) * c.cols..][..c.cols];
                        let terms = xr.iter().zip(wr).map(|(&a, &b)| f64::from(a) * b);
                        let o = (t * c.k + j) * c.rows + r;
                        want[o] = terms.clone().sum();
                        magnitude[o] = terms.map(f64::abs).sum();
                    }
                }
            }
            let what = format!(
                "moe_matmul {dtype} m={} k={} E={} rows={} cols={} per_slot={}",
                c.m, c.k, c.n_expert, c.rows, c.cols, c.per_slot
            );
            for (e, ((&g, &w), &mag)) in got.iter().zip(&want).zip(&magnitude).enumerate() {
                let tol = (c.cols as f64 + 1.0) * f64::from(f32::EPSILON) * mag;
                assert!(
                    (f64::from(g) - w).abs() <= tol,
                    "{what}: element {e} is {g}, want {w}"
                );
            }
        }
    }
}

/// Each output row is exactly `dot` of its activation row and a dequantized row of
/// its expert, computed here pair by pair: grouping the pairs by expert changes the
/// order of nothing. Experts with more pairs than a pass of the product (64), with
/// one, and with none; float rows with a tail after the last chunk of 8.
#[test]
fn moe_matmul_equals_the_dot_of_each_pair_bit_for_bit() {
    let mut rng = rng("moe_matmul_bitwise");
    for dtype in WEIGHT_DTYPES {
        let bs = dtype.block_size();
        let cols = if bs == 1 { 601 } else { 3 * bs };
        for (m, n_expert, per_slot) in [(50, 3, false), (9, 16, true)] {
            let c = MatCase {
                m,
                k: 4.min(n_expert),
                n_expert,
                rows: 6,
                cols,
                per_slot,
            };
            let slots = if c.per_slot { c.k } else { 1 };
            let MatRun { xv, idv, wb, got } = run_random(&mut rng, dtype, &c);
            let mut wv = vec![0f32; c.n_expert * c.rows * c.cols];
            quant::dequantize(dtype, &wb, &mut wv).unwrap();
            for (pair, &e) in idv.iter().enumerate() {
                let (t, j) = (pair / c.k, pair % c.k);
                let xr = &xv[(t * slots + if c.per_slot { j } else { 0 }) * c.cols..][..c.cols];
                for r in 0..c.rows {
                    let wr = &wv[(e as usize * c.rows + r) * c.cols..][..c.cols];
                    let (got, want) = (got[pair * c.rows + r], dot(xr, wr));
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "moe_matmul {dtype} m={m} E={n_expert}: token {t} slot {j} (expert {e}) row {r} is {got}, the dot gives {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn moe_matmul_reads_only_the_chosen_experts() {
    let mut rng = rng("moe_matmul_only_chosen");
    let c = MatCase {
        m: 3,
        k: 2,
        n_expert: 6,
        rows: 4,
        cols: 8,
        per_slot: false,
    };
    let (g, [x, ids, w, out]) = moe_matmul_graph(F32, &c);
    let idv = [0, 3, 3, 5, 5, 0];
    // Experts 1, 2 and 4 are NaN: any read of them would reach the output.
    let mut wv = randn(&mut rng, c.n_expert * c.rows * c.cols, 1.0);
    for e in [1, 2, 4] {
        wv[e * c.rows * c.cols..][..c.rows * c.cols].fill(f32::NAN);
    }
    let xv = randn(&mut rng, c.m * c.cols, 1.0);
    let inputs = [
        (x, f32_bytes(&xv)),
        (ids, i32_bytes(&idv)),
        (w, f32_bytes(&wv)),
    ];
    let got = f32s(&run(&g.g, &inputs, &[out])[0]);
    assert!(got.iter().all(|v| v.is_finite()), "{got:?}");
    // Slots with the same expert and input agree: token 1's slot 0 and token 0's
    // slot 1 both use expert 3, but on different inputs, so compare by recomputing.
    let e3 = &wv[3 * c.rows * c.cols..][..c.rows * c.cols];
    for r in 0..c.rows {
        let want: f64 = (0..c.cols)
            .map(|i| f64::from(xv[c.cols + i]) * f64::from(e3[r * c.cols + i]))
            .sum();
        assert!((f64::from(got[(c.k) * c.rows + r]) - want).abs() < 1e-5);
    }
}

#[test]
fn moe_matmul_rejects_an_expert_id_out_of_range_when_run() {
    let c = MatCase {
        m: 2,
        k: 2,
        n_expert: 4,
        rows: 2,
        cols: 4,
        per_slot: false,
    };
    for bad in [4, -1] {
        let (g, [x, ids, w, out]) = moe_matmul_graph(F32, &c);
        let inputs = [
            (x, f32_bytes(&[0.5; 8])),
            (ids, i32_bytes(&[0, 1, 2, bad])),
            (w, f32_bytes(&[0.25; 32])),
        ];
        let err = run_on(&CpuBackend, &g.g, &inputs, &[out], Aliasing::On).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{msg}");
        assert!(
            msg.contains("token 1 slot 1") && msg.contains(&format!("expert {bad}")),
            "{msg}"
        );
    }
}

#[test]
fn moe_combine_matches_f64() {
    let mut rng = rng("moe_combine");
    for (m, k, n) in [(1, 2, 64), (5, 3, 7), (4, 8, 33)] {
        for (residual, shared, gate) in [
            (false, false, false),
            (true, false, false),
            (false, true, false),
            (true, true, true),
            (false, true, true),
        ] {
            let mut g = G::new();
            let y = g.p("y", F32, &[m, k, n]);
            let weights = g.p("weights", F32, &[m, k]);
            let residual = residual.then(|| g.p("residual", F32, &[m, n]));
            let shared = shared.then(|| g.p("shared", F32, &[m, n]));
            let shared_gate = gate.then(|| g.p("shared_gate", F32, &[m]));
            let out = g.p("out", F32, &[m, n]);
            g.g.push(MoeCombine {
                y,
                weights,
                residual,
                shared,
                shared_gate,
                out,
                m,
                k,
                n,
            })
            .unwrap();
            let yv = randn(&mut rng, m * k * n, 1.0);
            let wv = uniform(&mut rng, m * k, 1.0);
            let rv = randn(&mut rng, m * n, 1.0);
            let sv = randn(&mut rng, m * n, 1.0);
            let gv = randn(&mut rng, m, 2.0);
            let mut inputs = vec![(y, f32_bytes(&yv)), (weights, f32_bytes(&wv))];
            inputs.extend(residual.map(|b| (b, f32_bytes(&rv))));
            inputs.extend(shared.map(|b| (b, f32_bytes(&sv))));
            inputs.extend(shared_gate.map(|b| (b, f32_bytes(&gv))));
            let got = f32s(&run(&g.g, &inputs, &[out])[0]);
            let mut want = vec![0f64; m * n];
            for t in 0..m {
                for i in 0..n {
                    let mut v = if residual.is_some() {
                        f64::from(rv[t * n + i])
                    } else {
                        0.0
                    };
                    for j in 0..k {
                        v += f64::from(wv[t * k + j]) * f64::from(yv[(t * k + j) * n + i]);
                    }
                    if shared.is_some() {
                        let s = if gate {
                            1.0 / (1.0 + (-f64::from(gv[t])).exp())
                        } else {
                            1.0
                        };
                        v += s * f64::from(sv[t * n + i]);
                    }
                    want[t * n + i] = v;
                }
            }
            let what = format!(
                "moe_combine m={m} k={k} n={n} residual={} shared={} gate={gate}",
                residual.is_some(),
                shared.is_some()
            );
            assert_close(&what, &got, &want, 1e-12);
        }
    }
}

/// The message of the error pushing `op` onto `g` gives; panics if it succeeds.
fn rejected(g: &mut G, op: impl Into<kiln_core::Op>) -> String {
    let err = g.g.push(op).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    err.to_string()
}

#[test]
fn moe_router_rejects_invalid_arguments() {
    let mut g = G::new();
    let logits = g.p("logits", F32, &[2, 4]);
    let ids = g.p("ids", I32, &[2, 5]);
    let weights = g.p("weights", F32, &[2, 5]);
    let f32_ids = g.p("f32_ids", F32, &[2, 2]);
    let weights2 = g.p("weights2", F32, &[2, 2]);
    let op = MoeRouter {
        logits,
        ids,
        weights,
        m: 2,
        n_expert: 4,
        k: 5,
        gating: Gating::Softmax,
        normalize: true,
    };
    let msg = rejected(&mut g, op.clone());
    assert!(
        msg.contains("k = 5") && msg.contains("n_expert = 4"),
        "{msg}"
    );
    let msg = rejected(&mut g, MoeRouter { k: 0, ..op.clone() });
    assert!(msg.contains("k must be > 0"), "{msg}");
    let msg = rejected(
        &mut g,
        MoeRouter {
            ids: f32_ids,
            weights: weights2,
            k: 2,
            ..op.clone()
        },
    );
    assert!(msg.contains("ids") && msg.contains("dtype f32"), "{msg}");
    let msg = rejected(
        &mut g,
        MoeRouter {
            n_expert: 3,
            k: 2,
            ids: weights2,
            weights: weights2,
            ..op.clone()
        },
    );
    assert!(msg.contains("logits"), "{msg}");
}

#[test]
fn moe_matmul_rejects_invalid_arguments() {
    let c = MatCase {
        m: 2,
        k: 2,
        n_expert: 4,
        rows: 3,
        cols: 32,
        per_slot: false,
    };
    let (mut g, [x, _, _, out]) = moe_matmul_graph(F32, &c);
    let op = match g.g.ops()[0].clone() {
        kiln_core::Op::MoeMatMul(op) => op,
        other => panic!("{other:?}"),
    };
    let msg = rejected(&mut g, MoeMatMul { k: 5, ..op.clone() });
    assert!(
        msg.contains("k = 5") && msg.contains("n_expert = 4"),
        "{msg}"
    );
    // The same elements in another shape: [4, 3, 32] read as [3, 4, 32].
    let msg = rejected(
        &mut g,
        MoeMatMul {
            n_expert: 3,
            rows: 4,
            ..op.clone()
        },
    );
    assert!(msg.contains("[n_expert, rows, cols] = [3, 4, 32]"), "{msg}");
    let msg = rejected(
        &mut g,
        MoeMatMul {
            per_slot: true,
            ..op.clone()
        },
    );
    assert!(msg.contains("x ") && msg.contains("expected 128"), "{msg}");
    let msg = rejected(
        &mut g,
        MoeMatMul {
            rows: 2,
            ..op.clone()
        },
    );
    assert!(msg.contains("w "), "{msg}");
    let q4 = g.p("q4", kiln_core::DType::Q4_0, &[4, 3, 32]);
    let bad_ids = g.p("bad_ids", F32, &[2, 2]);
    let msg = rejected(
        &mut g,
        MoeMatMul {
            ids: bad_ids,
            w: q4,
            ..op.clone()
        },
    );
    assert!(msg.contains("ids") && msg.contains("dtype f32"), "{msg}");
    let msg = rejected(
        &mut g,
        MoeMatMul {
            x: out,
            out: x,
            ..op.clone()
        },
    );
    assert!(msg.contains("x ") || msg.contains("out "), "{msg}");
}

#[test]
fn moe_combine_rejects_invalid_arguments() {
    let mut g = G::new();
    let y = g.p("y", F32, &[2, 3, 8]);
    let weights = g.p("weights", F32, &[2, 3]);
    let gate = g.p("gate", F32, &[2]);
    let short = g.p("short", F32, &[2, 7]);
    let out = g.p("out", F32, &[2, 8]);
    let op = MoeCombine {
        y,
        weights,
        residual: None,
        shared: None,
        shared_gate: None,
        out,
        m: 2,
        k: 3,
        n: 8,
    };
    let msg = rejected(
        &mut g,
        MoeCombine {
            shared_gate: Some(gate),
            ..op.clone()
        },
    );
    assert!(
        msg.contains("shared_gate is given without a shared expert"),
        "{msg}"
    );
    let msg = rejected(
        &mut g,
        MoeCombine {
            shared: Some(short),
            ..op.clone()
        },
    );
    assert!(
        msg.contains("shared") && msg.contains("expected 16"),
        "{msg}"
    );
    let msg = rejected(&mut g, MoeCombine { k: 2, ..op.clone() });
    assert!(msg.contains("y "), "{msg}");
    let msg = rejected(
        &mut g,
        MoeCombine {
            weights: gate,
            ..op.clone()
        },
    );
    assert!(msg.contains("weights"), "{msg}");
    g.g.push(op).unwrap();
}
