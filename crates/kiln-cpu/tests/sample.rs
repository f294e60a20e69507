//! Sample: the reference against an independent sort-based float64 computation of the
//! sampler's steps, exact hand cases for ties, signed zeros and NaN, its exp and
//! fixed-order sum, and the op's validation.

mod common;
use common::*;
use kiln_core::ops::{Sample, SampleParams};
use kiln_core::DType::{F32, I32};
use kiln_cpu::ops::sample::{exp_nonpositive, lane_sum, sample_row};
use rand::rngs::StdRng;
use rand::Rng;

fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SampleParams {
    SampleParams {
        temperature,
        top_k,
        top_p,
        min_p,
    }
}

/// The token the sampler's steps choose, computed in f64 after a full sort, and the
/// smallest distance of any of its decisions from its threshold (absolute for the
/// cumulative sums against `top_p` and `u`, relative for min-p's floor).
fn oracle(logits: &[f32], u: f32, p: &SampleParams) -> (usize, f64) {
    let mut ranked: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
    ranked.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if ranked.is_empty() {
        return (0, f64::INFINITY);
    }
    if p.temperature <= 0.0 {
        let top = ranked[0];
        let best = ranked
            .iter()
            .copied()
            .filter(|&i| logits[i] == logits[top])
            .min()
            .unwrap();
        return (best, f64::INFINITY);
    }
    if p.top_k > 0 {
        ranked.truncate(p.top_k);
    }
    let l = |i: usize| f64::from(logits[i]);
    let m = l(ranked[0]);
    let softmax = |kept: &[usize], t: f64| -> Vec<f64> {
        let e: Vec<f64> = kept.iter().map(|&i| ((l(i) - m) / t).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    };
    let probs = softmax(&ranked, 1.0);
    let mut margin = f64::INFINITY;
    let mut keep = ranked.len();
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        let mut found = None;
        for (t, q) in probs.iter().enumerate() {
            cum += q;
            margin = margin.min((cum - f64::from(p.top_p)).abs());
            if found.is_none() && cum >= f64::from(p.top_p) {
                found = Some(t + 1);
            }
        }
        keep = found.unwrap_or(ranked.len());
    }
    if p.min_p > 0.0 {
        let floor = f64::from(p.min_p) * probs[0];
        for q in &probs {
            margin = margin.min((q - floor).abs() / floor);
        }
        keep = keep.min(probs.iter().filter(|&&q| q >= floor).count().max(1));
    }
    ranked.truncate(keep);
    let drawn = softmax(&ranked, f64::from(p.temperature));
    let mut cum = 0.0;
    let mut token = ranked[keep - 1];
    let mut chosen = false;
    for (t, q) in drawn.iter().enumerate() {
        cum += q;
        margin = margin.min((cum - f64::from(u)).abs());
        if !chosen && f64::from(u) < cum {
            token = ranked[t];
            chosen = true;
        }
    }
    (token, margin)
}

/// Runs the op on `rows` rows through the CPU backend.
fn sample_op(
    rows: usize,
    vocab: usize,
    logits: &[f32],
    uniform: &[f32],
    p: SampleParams,
) -> Vec<i32> {
    let mut g = G::new();
    let lb = g.p("logits", F32, &[rows, vocab]);
    let ub = g.p("uniform", F32, &[rows]);
    let out = g.p("out", I32, &[rows]);
    g.g.push(Sample {
        logits: lb,
        uniform: ub,
        out,
        rows,
        vocab,
        params: p,
    })
    .unwrap();
    i32s(
        &run(
            &g.g,
            &[(lb, f32_bytes(logits)), (ub, f32_bytes(uniform))],
            &[out],
        )[0],
    )
}

/// Logits for a row of `vocab`: normal values of scale `scale`, or, with `ties`,
/// values from a set of 5 so that most logits are shared by many indices.
fn row_logits(rng: &mut StdRng, vocab: usize, scale: f32, ties: bool) -> Vec<f32> {
    if ties {
        (0..vocab)
            .map(|_| rng.random_range(0..5) as f32 * scale)
            .collect()
    } else {
        randn(rng, vocab, scale)
    }
}

/// Settings with each filter alone, all together, and none.
fn settings() -> Vec<SampleParams> {
    vec![
        params(0.0, 0, 1.0, 0.0),
        params(1.0, 0, 1.0, 0.0),
        params(0.7, 5, 1.0, 0.0),
        params(1.3, 0, 0.8, 0.0),
        params(0.9, 0, 1.0, 0.1),
        params(0.8, 40, 0.95, 0.05),
    ]
}

#[test]
fn the_reference_agrees_with_a_sorted_f64_computation() {
    let mut rng = rng("sample_reference");
    let (mut checked, mut total) = (0, 0);
    for (vocab, rows) in [(1, 3), (7, 40), (300, 40), (151_936, 2)] {
        for p in settings() {
            for ties in [false, true] {
                let scale = if vocab > 1000 { 3.0 } else { 1.0 };
                let logits: Vec<f32> = (0..rows)
                    .flat_map(|_| row_logits(&mut rng, vocab, scale, ties))
                    .collect();
                let uniform: Vec<f32> = (0..rows).map(|_| rng.random::<f32>()).collect();
                let got = sample_op(rows, vocab, &logits, &uniform, p);
                for (r, (row, &u)) in logits.chunks(vocab).zip(&uniform).enumerate() {
                    total += 1;
                    let (want, margin) = oracle(row, u, &p);
                    // Decisions closer than this to their threshold may differ between
                    // f32 and f64 arithmetic.
                    if margin > 1e-4 {
                        checked += 1;
                        assert_eq!(
                            got[r] as usize, want,
                            "vocab {vocab}, {p:?}, ties {ties}, row {r}, u {u}"
                        );
                    }
                }
            }
        }
    }
    assert!(
        checked * 10 >= total * 9,
        "only {checked} of {total} rows were away from a threshold"
    );
}

#[test]
fn ties_rank_by_lower_index_and_positive_zero_above_negative_zero() {
    let p = |k| params(1.0, k, 1.0, 0.0);
    let logits = [1.0, 3.0, 3.0, 2.0];
    assert_eq!(sample_row(&logits, 0.99, &p(1)), 1);
    // Two equal candidates, each with probability 1/2, in index order.
    assert_eq!(sample_row(&logits, 0.25, &p(2)), 1);
    assert_eq!(sample_row(&logits, 0.75, &p(2)), 2);
    assert_eq!(sample_row(&[-0.0, 0.0], 0.9, &p(1)), 1);
    assert_eq!(sample_row(&[0.0, -0.0], 0.9, &p(1)), 0);
}

#[test]
fn temperature_zero_is_the_argmax_and_nan_is_never_chosen() {
    let greedy = params(0.0, 3, 0.5, 0.5);
    assert_eq!(sample_row(&[0.5, 2.0, f32::NAN, 2.0], 0.7, &greedy), 1);
    assert_eq!(sample_row(&[f32::NAN, -1.0, -3.0], 0.7, &greedy), 1);
    let warm = params(1.0, 1, 1.0, 0.0);
    assert_eq!(sample_row(&[f32::NAN, -5.0, f32::NAN], 0.3, &warm), 1);
    assert_eq!(sample_row(&[f32::NAN, f32::NAN], 0.3, &warm), 0);
}

#[test]
fn each_filter_cuts_where_its_definition_says() {
    // Probabilities at temperature 1: exp(0), exp(-1), exp(-2), exp(-3) over their sum
    // = 0.6439, 0.2369, 0.0871, 0.0321.
    let logits = [0.0, -1.0, -2.0, -3.0];
    let last = 0.999;
    assert_eq!(sample_row(&logits, last, &params(1.0, 0, 1.0, 0.0)), 3);
    assert_eq!(sample_row(&logits, last, &params(1.0, 2, 1.0, 0.0)), 1);
    // 0.6439 < 0.85 <= 0.6439 + 0.2369.
    assert_eq!(sample_row(&logits, last, &params(1.0, 0, 0.85, 0.0)), 1);
    assert_eq!(sample_row(&logits, last, &params(1.0, 0, 0.9, 0.0)), 2);
    // 0.0871 >= 0.13 * 0.6439 = 0.0837 > 0.0321.
    assert_eq!(sample_row(&logits, last, &params(1.0, 0, 1.0, 0.13)), 2);
    assert_eq!(sample_row(&logits, last, &params(1.0, 0, 1.0, 0.14)), 1);
    // The first token when u is below its probability.
    assert_eq!(sample_row(&logits, 0.6, &params(1.0, 0, 1.0, 0.0)), 0);
}

#[test]
fn exp_is_close_to_f64_exp_and_exact_at_its_edges() {
    assert_eq!(exp_nonpositive(0.0), 1.0);
    assert_eq!(exp_nonpositive(-0.0), 1.0);
    assert_eq!(exp_nonpositive(-105.0), 0.0);
    assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    assert!(exp_nonpositive(f32::NAN).is_nan());
    let mut x = -104.0f32;
    while x <= 0.0 {
        let got = f64::from(exp_nonpositive(x));
        let want = f64::from(x).exp();
        // A few f32 ulps for normal results; subnormal results round to a 2^-149 step.
        let tolerance = (want * 4.0 * f64::from(f32::EPSILON)).max(2.0f64.powi(-149));
        assert!(
            (got - want).abs() <= tolerance,
            "exp({x}) = {got}, want {want}"
        );
        x += 0.0137;
    }
}

#[test]
fn the_lane_sum_is_the_sum() {
    let mut rng = rng("sample_lane_sum");
    let values = uniform(&mut rng, 5000, 1.0);
    let got = lane_sum(
        values
            .iter()
            .copied()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0),
    );
    let want: f64 = values
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(_, &v)| f64::from(v))
        .sum();
    assert!((f64::from(got) - want).abs() < 1e-4, "{got} vs {want}");
}

fn invalid(p: SampleParams, uniform_len: usize) -> String {
    let mut g = G::new();
    let logits = g.p("logits", F32, &[2, 10]);
    let uniform = g.p("uniform", F32, &[uniform_len]);
    let out = g.p("out", I32, &[2]);
    let op = Sample {
        logits,
        uniform,
        out,
        rows: 2,
        vocab: 10,
        params: p,
    };
    g.g.push(op).unwrap_err().to_string()
}

#[test]
fn bad_settings_and_shapes_are_rejected() {
    let m = invalid(params(f32::NAN, 0, 1.0, 0.0), 2);
    assert!(m.contains("temperature must be finite, got NaN"), "{m}");
    let m = invalid(params(1.0, 0, 0.0, 0.0), 2);
    assert!(m.contains("top_p must be in (0, 1], got 0"), "{m}");
    let m = invalid(params(1.0, 0, 1.0, 1.5), 2);
    assert!(m.contains("min_p must be in [0, 1], got 1.5"), "{m}");
    let m = invalid(params(1.0, 0, 1.0, 0.0), 3);
    assert!(m.contains("uniform") && m.contains("expected 2"), "{m}");
}
