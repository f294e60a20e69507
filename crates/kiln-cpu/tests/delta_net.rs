//! The Gated DeltaNet family against float64 computations written here: the causal
//! conv1d with its rolling state, the gated delta rule (recurrent and chunkwise forms,
//! grouped heads, chunk remainders, state carried across pieces of a prompt), the
//! gated RMSNorm and the L2 norm; and each invalid argument.

mod common;
use common::*;
use kiln_core::ops::{
    CausalConv1d, DeltaNetHeads, GatedDeltaNet, GatedRmsNorm, HeadLayout, L2Norm, DELTA_NET_CHUNK,
};
use kiln_core::DType::{F16, F32};
use kiln_core::{Error, Graph, Op};
use kiln_cpu::ops::delta_net::{
    gated_delta_net_chunked, gated_delta_net_recurrent, DeltaNetInputs,
};
use rand::rngs::StdRng;

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// The conv's outputs and final state in f64.
fn conv_f64(
    x: &[f32],
    w: &[f32],
    state: &[f32],
    channels: usize,
    kernel: usize,
) -> (Vec<f64>, Vec<f64>) {
    let n = x.len() / channels;
    let mut out = vec![0f64; x.len()];
    let mut new_state = Vec::new();
    for c in 0..channels {
        let mut s: Vec<f64> = state[c * (kernel - 1)..(c + 1) * (kernel - 1)]
            .iter()
            .map(|&v| v as f64)
            .collect();
        s.extend((0..n).map(|t| x[t * channels + c] as f64));
        for t in 0..n {
            let sum: f64 = (0..kernel)
                .map(|j| w[c * kernel + j] as f64 * s[t + j])
                .sum();
            out[t * channels + c] = silu(sum);
        }
        new_state.extend_from_slice(&s[n..]);
    }
    (out, new_state)
}

/// A conv graph over `n_tokens`; returns (graph, x, weight, state, out).
fn conv_graph(
    n_tokens: usize,
    channels: usize,
    kernel: usize,
) -> (Graph, [kiln_core::BufferId; 4]) {
    let mut g = G::new();
    let x = g.p("x", F32, &[n_tokens, channels]);
    let w = g.p("w", F32, &[channels, kernel]);
    let state = g.p("state", F32, &[channels, kernel - 1]);
    let out = g.p("out", F32, &[n_tokens, channels]);
    g.g.push(CausalConv1d {
        x,
        weight: w,
        state,
        out,
        n_tokens,
        channels,
        kernel,
    })
    .unwrap();
    (g.g, [x, w, state, out])
}

/// Runs the conv on `x` from `state`; returns (out, new state).
fn run_conv(
    x: &[f32],
    w: &[f32],
    state: &[f32],
    channels: usize,
    kernel: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (g, [xb, wb, sb, ob]) = conv_graph(x.len() / channels, channels, kernel);
    let res = run(
        &g,
        &[
            (xb, f32_bytes(x)),
            (wb, f32_bytes(w)),
            (sb, f32_bytes(state)),
        ],
        &[ob, sb],
    );
    (f32s(&res[0]), f32s(&res[1]))
}

#[test]
fn causal_conv1d_matches_f64_and_rolls_its_state() {
    let mut rng = rng("causal_conv1d");
    // (n_tokens, channels, kernel)
    for (n, ch, k) in [
        (1, 1, 2),
        (1, 37, 4),
        (2, 5, 4),
        (7, 13, 4),
        (200, 19, 4),
        (5, 3, 6),
        (13, 8, 3),
    ] {
        let x = randn(&mut rng, n * ch, 1.0);
        let w = randn(&mut rng, ch * k, 0.5);
        let state = randn(&mut rng, ch * (k - 1), 1.0);
        let (out, new_state) = run_conv(&x, &w, &state, ch, k);
        let (want, want_state) = conv_f64(&x, &w, &state, ch, k);
        let what = format!("conv n={n} ch={ch} k={k}");
        assert_close(&what, &out, &want, 1e-12);
        // The state is a copy of inputs: exact.
        let got_state: Vec<f64> = new_state.iter().map(|&v| v as f64).collect();
        assert_eq!(got_state, want_state, "{what}: state");
    }
}

#[test]
fn causal_conv1d_in_pieces_equals_one_run() {
    let mut rng = rng("causal_conv1d_pieces");
    let (ch, k) = (11, 4);
    for (n, split) in [(9, 1), (9, 2), (9, 5), (30, 29)] {
        let x = randn(&mut rng, n * ch, 1.0);
        let w = randn(&mut rng, ch * k, 0.5);
        let zeros = vec![0f32; ch * (k - 1)];
        let (whole, whole_state) = run_conv(&x, &w, &zeros, ch, k);
        let (a, mid) = run_conv(&x[..split * ch], &w, &zeros, ch, k);
        let (b, end) = run_conv(&x[split * ch..], &w, &mid, ch, k);
        let pieces: Vec<f32> = a.into_iter().chain(b).collect();
        assert_eq!(pieces, whole, "n={n} split={split}: outputs");
        assert_eq!(end, whole_state, "n={n} split={split}: state");
    }
}

/// Random inputs of a delta net over `n` tokens.
struct Case {
    heads: DeltaNetHeads,
    n: usize,
    qkv: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    ssm_a: Vec<f32>,
    dt_bias: Vec<f32>,
    state: Vec<f32>,
}

const EPS: f32 = 1e-6;

/// A form of the delta rule: [`gated_delta_net_recurrent`] or [`gated_delta_net_chunked`].
type Form = fn(&DeltaNetInputs, &mut [f32], &mut [f32]);

impl Case {
    /// Decay rates `-ssm_a` drawn in `0..max_rate`, as the models initialise them.
    fn new(rng: &mut StdRng, heads: DeltaNetHeads, n: usize, max_rate: f32) -> Self {
        let nv = heads.n_v_heads;
        let rates = uniform(rng, nv, max_rate);
        Case {
            heads,
            n,
            qkv: randn(rng, n * heads.qkv_width(), 1.0),
            a: randn(rng, n * nv, 1.0),
            b: randn(rng, n * nv, 1.5),
            ssm_a: rates.iter().map(|r| -r.abs()).collect(),
            dt_bias: uniform(rng, nv, 1.0),
            state: randn(rng, heads.state_elements(), 0.5),
        }
    }

    fn tokens(&self, range: std::ops::Range<usize>) -> Self {
        let (w, nv) = (self.heads.qkv_width(), self.heads.n_v_heads);
        Case {
            heads: self.heads,
            n: range.len(),
            qkv: self.qkv[range.start * w..range.end * w].to_vec(),
            a: self.a[range.start * nv..range.end * nv].to_vec(),
            b: self.b[range.start * nv..range.end * nv].to_vec(),
            ssm_a: self.ssm_a.clone(),
            dt_bias: self.dt_bias.clone(),
            state: self.state.clone(),
        }
    }

    fn inputs(&self) -> DeltaNetInputs<'_> {
        DeltaNetInputs {
            qkv: &self.qkv,
            a: &self.a,
            b: &self.b,
            ssm_a: &self.ssm_a,
            dt_bias: &self.dt_bias,
            heads: self.heads,
            eps: EPS,
        }
    }

    /// The recurrence in f64, written from the op's definition: (out, final state).
    fn f64(&self) -> (Vec<f64>, Vec<f64>) {
        let DeltaNetHeads {
            n_k_heads,
            n_v_heads,
            d_k,
            d_v,
            layout,
        } = self.heads;
        let w = self.heads.qkv_width();
        let l2 = |x: &[f32]| -> Vec<f64> {
            let ss: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
            let inv = 1.0 / (ss + EPS as f64).sqrt();
            x.iter().map(|&v| v as f64 * inv).collect()
        };
        let mut state: Vec<f64> = self.state.iter().map(|&v| v as f64).collect();
        let mut out = vec![0f64; self.n * n_v_heads * d_v];
        for h in 0..n_v_heads {
            let kh = match layout {
                HeadLayout::Grouped => h * n_k_heads / n_v_heads,
                HeadLayout::Tiled => h % n_k_heads,
            };
            let s = &mut state[h * d_k * d_v..(h + 1) * d_k * d_v];
            for t in 0..self.n {
                let row = &self.qkv[t * w..(t + 1) * w];
                let q: Vec<f64> = l2(&row[kh * d_k..(kh + 1) * d_k])
                    .into_iter()
                    .map(|v| v / (d_k as f64).sqrt())
                    .collect();
                let k = l2(&row[(n_k_heads + kh) * d_k..(n_k_heads + kh + 1) * d_k]);
                let v0 = 2 * n_k_heads * d_k + h * d_v;
                let v = &row[v0..v0 + d_v];
                let x = self.a[t * n_v_heads + h] as f64 + self.dt_bias[h] as f64;
                let g = self.ssm_a[h] as f64 * x.exp().ln_1p();
                let beta = 1.0 / (1.0 + (-(self.b[t * n_v_heads + h] as f64)).exp());
                s.iter_mut().for_each(|x| *x *= g.exp());
                for j in 0..d_v {
                    let kv: f64 = (0..d_k).map(|i| s[i * d_v + j] * k[i]).sum();
                    let d = beta * (v[j] as f64 - kv);
                    for i in 0..d_k {
                        s[i * d_v + j] += k[i] * d;
                    }
                }
                for j in 0..d_v {
                    out[(t * n_v_heads + h) * d_v + j] =
                        (0..d_k).map(|i| s[i * d_v + j] * q[i]).sum();
                }
            }
        }
        (out, state)
    }

    /// Runs the op in a graph on the CPU backend: (out, final state).
    fn run(&self) -> (Vec<f32>, Vec<f32>) {
        let h = self.heads;
        let mut g = G::new();
        let qkv = g.p("qkv", F32, &[self.n, h.qkv_width()]);
        let a = g.p("a", F32, &[self.n, h.n_v_heads]);
        let b = g.p("b", F32, &[self.n, h.n_v_heads]);
        let ssm_a = g.p("ssm_a", F32, &[h.n_v_heads]);
        let dt_bias = g.p("dt_bias", F32, &[h.n_v_heads]);
        let state = g.p("state", F32, &[h.n_v_heads, h.d_k, h.d_v]);
        let out = g.p("out", F32, &[self.n, h.n_v_heads, h.d_v]);
        g.g.push(GatedDeltaNet {
            qkv,
            a,
            b,
            ssm_a,
            dt_bias,
            state,
            out,
            n_tokens: self.n,
            heads: h,
            eps: EPS,
        })
        .unwrap();
        let res = run(
            &g.g,
            &[
                (qkv, f32_bytes(&self.qkv)),
                (a, f32_bytes(&self.a)),
                (b, f32_bytes(&self.b)),
                (ssm_a, f32_bytes(&self.ssm_a)),
                (dt_bias, f32_bytes(&self.dt_bias)),
                (state, f32_bytes(&self.state)),
            ],
            &[out, state],
        );
        (f32s(&res[0]), f32s(&res[1]))
    }
}

fn heads(n_k_heads: usize, n_v_heads: usize, d_k: usize, d_v: usize) -> DeltaNetHeads {
    DeltaNetHeads {
        n_k_heads,
        n_v_heads,
        d_k,
        d_v,
        layout: HeadLayout::Grouped,
    }
}

/// Head shapes: single heads, odd dims, grouped heads (3 and 2 value heads per key
/// head), and a model-sized head.
const HEADS: [(usize, usize, usize, usize); 5] = [
    (1, 1, 3, 5),
    (2, 6, 7, 5),
    (3, 3, 16, 9),
    (1, 2, 33, 17),
    (1, 2, 128, 128),
];

/// Prompt lengths around the chunk: shorter, equal, a remainder, several chunks.
const TOKENS: [usize; 6] = [1, 7, 63, 64, 65, 200];

#[test]
fn gated_delta_net_matches_f64_recurrent_and_chunkwise() {
    let mut rng = rng("gated_delta_net");
    assert_eq!(DELTA_NET_CHUNK, 64);
    let layouts = [HeadLayout::Grouped, HeadLayout::Tiled];
    for ((nk, nv, dk, dv), layout) in HEADS.into_iter().flat_map(|h| layouts.map(|l| (h, l))) {
        for n in TOKENS {
            let heads = DeltaNetHeads {
                layout,
                ..heads(nk, nv, dk, dv)
            };
            let case = Case::new(&mut rng, heads, n, 4.0);
            let what = format!("heads {nk}/{nv} {layout:?} d {dk}x{dv} n={n}");
            let (want, want_state) = case.f64();
            let (out, state) = case.run();
            assert_close(&format!("{what}: op out"), &out, &want, 1e-9);
            assert_close(&format!("{what}: op state"), &state, &want_state, 1e-9);
            let forms: [(&str, Form); 2] = [
                ("recurrent", gated_delta_net_recurrent),
                ("chunked", gated_delta_net_chunked),
            ];
            for (form, f) in forms {
                let mut state = case.state.clone();
                let mut out = vec![f32::NAN; n * nv * dv];
                f(&case.inputs(), &mut state, &mut out);
                assert_close(&format!("{what}: {form} out"), &out, &want, 1e-9);
                assert_close(&format!("{what}: {form} state"), &state, &want_state, 1e-9);
            }
        }
    }
}

#[test]
fn gated_delta_net_forms_agree_under_strong_and_weak_decay() {
    let mut rng = rng("gated_delta_net_decay");
    // Rates up to 16 (as Qwen3-Next initialises A) decay a chunk's cumulative gate
    // far below f32's range; rates near 0 keep the whole history.
    for max_rate in [16.0, 1e-3] {
        let case = Case::new(&mut rng, heads(2, 4, 32, 24), 150, max_rate);
        let what = format!("rate < {max_rate}");
        let (want, want_state) = case.f64();
        let mut rs = case.state.clone();
        let mut ro = vec![f32::NAN; want.len()];
        gated_delta_net_recurrent(&case.inputs(), &mut rs, &mut ro);
        let mut cs = case.state.clone();
        let mut co = vec![f32::NAN; want.len()];
        gated_delta_net_chunked(&case.inputs(), &mut cs, &mut co);
        assert_close(&format!("{what}: recurrent out"), &ro, &want, 1e-9);
        assert_close(&format!("{what}: chunked out"), &co, &want, 1e-9);
        assert_close(&format!("{what}: recurrent state"), &rs, &want_state, 1e-9);
        assert_close(&format!("{what}: chunked state"), &cs, &want_state, 1e-9);
        let ro64: Vec<f64> = ro.iter().map(|&v| v as f64).collect();
        assert_close(&format!("{what}: chunked vs recurrent"), &co, &ro64, 1e-9);
    }
}

#[test]
fn gated_delta_net_prompt_in_pieces_equals_one_piece() {
    let mut rng = rng("gated_delta_net_pieces");
    // (tokens, split): both pieces chunked, a chunk then a single token, a single
    // token then chunks.
    for (n, split) in [(200, 130), (65, 64), (65, 1), (9, 4)] {
        let case = Case::new(&mut rng, heads(1, 3, 12, 10), n, 4.0);
        let (whole, whole_state) = case.run();
        let (first, mid) = case.tokens(0..split).run();
        let mut second = case.tokens(split..n);
        second.state = mid;
        let (rest, end) = second.run();
        let pieces: Vec<f32> = first.into_iter().chain(rest).collect();
        let w64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let what = format!("n={n} split={split}");
        assert_close(&format!("{what}: out"), &pieces, &w64(&whole), 1e-10);
        assert_close(&format!("{what}: state"), &end, &w64(&whole_state), 1e-10);
    }
}

#[test]
fn gated_rms_norm_matches_f64() {
    let mut rng = rng("gated_rms_norm");
    for (rows, dim) in [(1, 1), (3, 7), (32, 128), (5, 1000)] {
        let mut g = G::new();
        let x = g.p("x", F32, &[rows, dim]);
        let z = g.p("z", F32, &[rows, dim]);
        let w = g.p("w", F32, &[dim]);
        let out = g.p("out", F32, &[rows, dim]);
        let eps = 1e-6;
        g.g.push(GatedRmsNorm {
            x,
            z,
            weight: w,
            out,
            rows,
            dim,
            eps,
        })
        .unwrap();
        let (xv, zv, wv) = (
            randn(&mut rng, rows * dim, 2.0),
            randn(&mut rng, rows * dim, 2.0),
            randn(&mut rng, dim, 1.0),
        );
        let res = run(
            &g.g,
            &[
                (x, f32_bytes(&xv)),
                (z, f32_bytes(&zv)),
                (w, f32_bytes(&wv)),
            ],
            &[out],
        );
        let mut want = Vec::new();
        for (xr, zr) in xv.chunks(dim).zip(zv.chunks(dim)) {
            let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for i in 0..dim {
                want.push(xr[i] as f64 * inv * wv[i] as f64 * silu(zr[i] as f64));
            }
        }
        assert_close(
            &format!("gated_rms_norm {rows}x{dim}"),
            &f32s(&res[0]),
            &want,
            1e-11,
        );
    }
}

#[test]
fn l2_norm_matches_f64() {
    let mut rng = rng("l2_norm");
    for (rows, dim, eps) in [(1, 1, 1e-6), (3, 7, 1e-6), (16, 128, 1e-6), (4, 33, 0.5)] {
        let mut g = G::new();
        let x = g.p("x", F32, &[rows, dim]);
        let out = g.p("out", F32, &[rows, dim]);
        g.g.push(L2Norm {
            x,
            out,
            rows,
            dim,
            eps,
        })
        .unwrap();
        let xv = randn(&mut rng, rows * dim, 3.0);
        let res = run(&g.g, &[(x, f32_bytes(&xv))], &[out]);
        let mut want = Vec::new();
        for r in xv.chunks(dim) {
            let ss = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
            want.extend(r.iter().map(|&v| v as f64 / (ss + eps as f64).sqrt()));
        }
        assert_close(
            &format!("l2_norm {rows}x{dim}"),
            &f32s(&res[0]),
            &want,
            1e-12,
        );
    }
}

fn expect_invalid(g: &mut Graph, op: impl Into<Op>, op_name: &str, needles: &[&str]) {
    let err = g.push(op).expect_err("invalid op was accepted");
    match &err {
        Error::InvalidArgument { op, msg } => {
            assert_eq!(op, op_name, "{err}");
            for n in needles {
                assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
            }
        }
        other => panic!("expected InvalidArgument, got {other}"),
    }
    assert!(g.ops().is_empty(), "a rejected op must not be added");
}

#[test]
fn causal_conv1d_rejects_invalid_arguments() {
    let mut g = G::new();
    let x = g.p("x", F32, &[3, 8]);
    let w = g.p("w", F32, &[8, 4]);
    let state = g.p("state", F32, &[8, 3]);
    let short_state = g.p("short_state", F32, &[8, 4]);
    let transient_state = g.t("transient_state", F32, &[8, 3]);
    let half = g.p("half", F16, &[8, 4]);
    let out = g.p("out", F32, &[3, 8]);
    let op = CausalConv1d {
        x,
        weight: w,
        state,
        out,
        n_tokens: 3,
        channels: 8,
        kernel: 4,
    };
    let mut g = g.g;
    let with = |f: &dyn Fn(&mut CausalConv1d)| {
        let mut o = op.clone();
        f(&mut o);
        o
    };
    expect_invalid(
        &mut g,
        with(&|o| o.kernel = 1),
        "causal_conv1d",
        &["kernel", ">= 2"],
    );
    expect_invalid(
        &mut g,
        with(&|o| o.n_tokens = 0),
        "causal_conv1d",
        &["n_tokens"],
    );
    expect_invalid(
        &mut g,
        with(&|o| o.channels = 7),
        "causal_conv1d",
        &["\"x\"", "expected 21"],
    );
    expect_invalid(
        &mut g,
        with(&|o| o.weight = half),
        "causal_conv1d",
        &["\"half\"", "f16"],
    );
    expect_invalid(
        &mut g,
        with(&|o| o.kernel = 5),
        "causal_conv1d",
        &["\"w\"", "expected 40"],
    );
    expect_invalid(
        &mut g,
        with(&|o| o.state = short_state),
        "causal_conv1d",
        &["\"short_state\"", "expected 24"],
    );
    expect_invalid(
        &mut g,
        with(&|o| o.state = transient_state),
        "causal_conv1d",
        &["\"transient_state\"", "persistent"],
    );
    expect_invalid(
        &mut g,
        with(&|o| o.out = x),
        "causal_conv1d",
        &["\"x\"", "distinct"],
    );
    g.push(op).expect("the valid op");
}

#[test]
fn gated_delta_net_rejects_invalid_arguments() {
    let h = heads(2, 6, 4, 3);
    let mut g = G::new();
    let qkv = g.p("qkv", F32, &[5, h.qkv_width()]);
    let a = g.p("a", F32, &[5, 6]);
    let b = g.p("b", F32, &[5, 6]);
    let short_b = g.p("short_b", F32, &[5, 5]);
    let ssm_a = g.p("ssm_a", F32, &[6]);
    let dt_bias = g.p("dt_bias", F32, &[6]);
    let state = g.p("state", F32, &[6, 4, 3]);
    let wrong_state = g.p("wrong_state", F32, &[6, 3, 3]);
    let transient_state = g.t("transient_state", F32, &[6, 4, 3]);
    let out = g.p("out", F32, &[5, 6, 3]);
    let op = GatedDeltaNet {
        qkv,
        a,
        b,
        ssm_a,
        dt_bias,
        state,
        out,
        n_tokens: 5,
        heads: h,
        eps: 1e-6,
    };
    let mut g = g.g;
    let with = |f: &dyn Fn(&mut GatedDeltaNet)| {
        let mut o = op.clone();
        f(&mut o);
        o
    };
    let name = "gated_delta_net";
    expect_invalid(
        &mut g,
        with(&|o| o.heads.n_k_heads = 4),
        name,
        &["n_v_heads 6", "multiple of n_k_heads 4"],
    );
    expect_invalid(
        &mut g,
        with(&|o| o.heads.d_k = 0),
        name,
        &["d_k must be > 0"],
    );
    expect_invalid(&mut g, with(&|o| o.n_tokens = 0), name, &["n_tokens"]);
    expect_invalid(&mut g, with(&|o| o.eps = f32::NAN), name, &["eps"]);
    expect_invalid(
        &mut g,
        with(&|o| o.n_tokens = 4),
        name,
        &["\"qkv\"", "expected 136"],
    );
    expect_invalid(
        &mut g,
        with(&|o| o.b = short_b),
        name,
        &["\"short_b\"", "expected 30"],
    );
    expect_invalid(
        &mut g,
        with(&|o| o.ssm_a = a),
        name,
        &["\"a\"", "expected 6"],
    );
    expect_invalid(
        &mut g,
        with(&|o| o.state = wrong_state),
        name,
        &["\"wrong_state\"", "expected 72"],
    );
    expect_invalid(
        &mut g,
        with(&|o| o.state = transient_state),
        name,
        &["\"transient_state\"", "persistent"],
    );
    expect_invalid(
        &mut g,
        with(&|o| o.heads.n_v_heads = usize::MAX - 1),
        name,
        &["overflow"],
    );
    g.push(op).expect("the valid op");
}

#[test]
fn gated_rms_norm_and_l2_norm_reject_invalid_arguments() {
    let mut g = G::new();
    let x = g.p("x", F32, &[4, 8]);
    let z = g.p("z", F32, &[4, 8]);
    let short_z = g.p("short_z", F32, &[4, 7]);
    let w = g.p("w", F32, &[8]);
    let out = g.p("out", F32, &[4, 8]);
    let norm = GatedRmsNorm {
        x,
        z,
        weight: w,
        out,
        rows: 4,
        dim: 8,
        eps: 1e-6,
    };
    let l2 = L2Norm {
        x,
        out,
        rows: 4,
        dim: 8,
        eps: 1e-6,
    };
    let mut g = g.g;
    let name = "gated_rms_norm";
    expect_invalid(
        &mut g,
        GatedRmsNorm {
            z: short_z,
            ..norm.clone()
        },
        name,
        &["\"short_z\"", "expected 32"],
    );
    expect_invalid(
        &mut g,
        GatedRmsNorm {
            weight: z,
            ..norm.clone()
        },
        name,
        &["\"z\"", "expected 8"],
    );
    expect_invalid(
        &mut g,
        GatedRmsNorm {
            eps: -1.0,
            ..norm.clone()
        },
        name,
        &["eps"],
    );
    expect_invalid(
        &mut g,
        GatedRmsNorm {
            rows: 0,
            ..norm.clone()
        },
        name,
        &["rows"],
    );
    expect_invalid(
        &mut g,
        L2Norm {
            dim: 7,
            ..l2.clone()
        },
        "l2_norm",
        &["\"x\"", "expected 28"],
    );
    expect_invalid(
        &mut g,
        L2Norm {
            eps: f32::INFINITY,
            ..l2.clone()
        },
        "l2_norm",
        &["eps"],
    );
    g.push(norm).expect("the valid gated norm");
    g.push(l2).expect("the valid l2 norm");
}
