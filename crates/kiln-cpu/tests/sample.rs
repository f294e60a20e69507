//! Sample: the reference against a plain exact-integer rendering of the definition and
//! against a sort-based float64 computation of the sampler's steps; hand cases for each
//! setting, ties, signed zeros, NaN, infinities and weights that round to zero; exact
//! boundaries of `u` and `top_p`; draw frequencies against the defined probabilities;
//! its exp, its exact products; and the op's validation.

mod common;
use common::*;
use kiln_core::ops::sample::{
    draw_target, exp_nonpositive, min_p_floor, sample_row, top_p_target, weight,
};
use kiln_core::ops::{Sample, SampleParams};
use kiln_core::DType::{F32, I32};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SampleParams {
    SampleParams {
        temperature,
        top_k,
        top_p,
        min_p,
    }
}

const ONE: u64 = 1 << 32;

/// The definition step by step, with a full sort and u128 rationals: the kept ranks
/// (candidate indices in rank order) and their draw weights `w'`.
fn kept_and_weights(logits: &[f32], p: &SampleParams) -> (Vec<usize>, Vec<u64>) {
    let mut ranked: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
    ranked.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if p.top_k > 0 {
        ranked.truncate(p.top_k);
    }
    if ranked.is_empty() {
        return (ranked, Vec::new());
    }
    let m = logits[ranked[0]];
    let x = |i: usize| {
        if logits[i] == m {
            0.0
        } else {
            logits[i] - m
        }
    };
    let w: Vec<u64> = ranked
        .iter()
        .map(|&i| weight(exp_nonpositive(x(i))))
        .collect();
    let z: u128 = w.iter().map(|&v| u128::from(v)).sum();
    let mut keep = ranked.len();
    if p.top_p < 1.0 {
        // top_p = a / 2^40 exactly for the values these tests use (checked).
        let a = (f64::from(p.top_p) * 2f64.powi(40)) as u128;
        assert_eq!(a as f64, f64::from(p.top_p) * 2f64.powi(40));
        let mut cum = 0u128;
        for (t, &v) in w.iter().enumerate() {
            cum += u128::from(v);
            if cum << 40 >= a * z {
                keep = keep.min(t + 1);
                break;
            }
        }
    }
    if p.min_p > 0.0 {
        let a = (f64::from(p.min_p) * 2f64.powi(40)) as u128;
        assert_eq!(a as f64, f64::from(p.min_p) * 2f64.powi(40));
        let n = w
            .iter()
            .filter(|&&v| u128::from(v) << 40 >= a << 32)
            .count();
        keep = keep.min(n.max(1));
    }
    ranked.truncate(keep);
    let w_t = ranked
        .iter()
        .map(|&i| weight(exp_nonpositive(x(i) / p.temperature)))
        .collect();
    (ranked, w_t)
}

/// The token of the definition with `u = a / 2^40` (exact for the uniforms used here).
fn exact(logits: &[f32], u: f32, p: &SampleParams) -> usize {
    if p.temperature <= 0.0 {
        return kiln_core::ops::argmax::argmax_row(logits);
    }
    let (kept, w) = kept_and_weights(logits, p);
    if kept.is_empty() {
        return 0;
    }
    let z: u128 = w.iter().map(|&v| u128::from(v)).sum();
    let a = (f64::from(u) * 2f64.powi(40)) as u128;
    assert_eq!(
        a as f64,
        f64::from(u) * 2f64.powi(40),
        "u {u} is not a / 2^40"
    );
    // D = floor(u z); the first rank whose running sum exceeds D.
    let d = (a * z) >> 40;
    let mut cum = 0u128;
    for (r, &v) in w.iter().enumerate() {
        cum += u128::from(v);
        if cum > d {
            return kept[r];
        }
    }
    unreachable!("u < 1 so D < Z'")
}

/// A uniform number that is a multiple of 2^-24 (so of 2^-40).
fn random_u(rng: &mut StdRng) -> f32 {
    rng.random_range(0..1u32 << 24) as f32 / (1u32 << 24) as f32
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

/// Settings with each filter alone, all together, and none (every `top_p` and `min_p`
/// a multiple of 2^-40, for [`exact`]).
fn settings() -> Vec<SampleParams> {
    vec![
        params(0.0, 0, 1.0, 0.0),
        params(1.0, 0, 1.0, 0.0),
        params(0.8, 0, 1.0, 0.0),
        params(0.7, 5, 1.0, 0.0),
        params(1.3, 0, 0.8125, 0.0),
        params(0.9, 0, 1.0, 0.125),
        params(0.8, 40, 0.9375, 0.0625),
        params(2.0, 0, 0.5, 0.03125),
    ]
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

#[test]
fn the_reference_is_the_definition_computed_exactly() {
    let mut rng = rng("sample_exact");
    for (vocab, rows) in [(1, 3), (7, 40), (300, 40), (5000, 4)] {
        for p in settings() {
            for ties in [false, true] {
                let scale = if ties { 0.5 } else { 2.0 };
                let logits: Vec<f32> = (0..rows)
                    .flat_map(|_| row_logits(&mut rng, vocab, scale, ties))
                    .collect();
                let uniform: Vec<f32> = (0..rows).map(|_| random_u(&mut rng)).collect();
                let got = sample_op(rows, vocab, &logits, &uniform, p);
                for (r, (row, &u)) in logits.chunks(vocab).zip(&uniform).enumerate() {
                    assert_eq!(
                        got[r] as usize,
                        exact(row, u, &p),
                        "vocab {vocab}, {p:?}, ties {ties}, row {r}, u {u}"
                    );
                }
            }
        }
    }
}

/// The token the sampler's steps choose, computed in f64 after a full sort with the
/// true exponential, and the smallest distance of any of its decisions from its
/// threshold (absolute for the cumulative sums against `top_p` and `u`, relative for
/// min-p's floor).
fn float_oracle(logits: &[f32], u: f32, p: &SampleParams) -> (usize, f64) {
    let mut ranked: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
    ranked.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
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

#[test]
fn the_reference_agrees_with_a_float64_softmax_away_from_thresholds() {
    let mut rng = rng("sample_float64");
    let (mut checked, mut total) = (0, 0);
    for (vocab, rows) in [(7, 40), (300, 40), (151_936, 2)] {
        for p in settings().into_iter().skip(1) {
            let scale = if vocab > 1000 { 3.0 } else { 1.0 };
            let logits: Vec<f32> = (0..rows)
                .flat_map(|_| row_logits(&mut rng, vocab, scale, false))
                .collect();
            let uniform: Vec<f32> = (0..rows).map(|_| rng.random::<f32>()).collect();
            let got = sample_op(rows, vocab, &logits, &uniform, p);
            for (r, (row, &u)) in logits.chunks(vocab).zip(&uniform).enumerate() {
                total += 1;
                let (want, margin) = float_oracle(row, u, &p);
                // Decisions closer than this to their threshold may differ between the
                // fixed-point weights (and the f32 exponential) and f64.
                if margin > 1e-5 {
                    checked += 1;
                    assert_eq!(
                        got[r] as usize, want,
                        "vocab {vocab}, {p:?}, row {r}, u {u}"
                    );
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
fn equal_logits_split_the_mass_exactly_and_in_index_order() {
    // Four candidates of weight 2^32 each: the draw's boundaries are at u = 1/4, 2/4,
    // 3/4 exactly, and top_p's at 1/4, 2/4, 3/4 of the mass.
    let logits = [5.0, 5.0, 5.0, 5.0];
    let all = params(1.0, 0, 1.0, 0.0);
    for (u, want) in [
        (0.0, 0),
        (0.249_999_99, 0),
        (0.25, 1),
        (0.5, 2),
        (0.749_999_9, 2),
        (0.75, 3),
        (0.999_999_94, 3),
    ] {
        assert_eq!(sample_row(&logits, u, &all), want, "u {u}");
    }
    // top_p 0.5: the first 2 ranks reach exactly half, so 2 are kept.
    let half = params(1.0, 0, 0.5, 0.0);
    assert_eq!(sample_row(&logits, 0.999, &half), 1);
    assert_eq!(sample_row(&logits, 0.5, &half), 1);
    assert_eq!(sample_row(&logits, 0.499_999_97, &half), 0);
    // Just above half: a third rank is needed.
    let more = params(1.0, 0, 0.500_000_06, 0.0);
    assert_eq!(sample_row(&logits, 0.999, &more), 2);
    // top_k 3 of equal logits: the three lowest indices.
    assert_eq!(sample_row(&logits, 0.999, &params(1.0, 3, 1.0, 0.0)), 2);
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
    // -0 and +0 are both the maximum's value: equal weights, +0 ranked first.
    assert_eq!(sample_row(&[-0.0, 0.0], 0.25, &p(0)), 1);
    assert_eq!(sample_row(&[-0.0, 0.0], 0.75, &p(0)), 0);
}

#[test]
fn temperature_zero_is_the_argmax_and_nan_is_never_chosen() {
    let greedy = params(0.0, 3, 0.5, 0.5);
    assert_eq!(sample_row(&[0.5, 2.0, f32::NAN, 2.0], 0.7, &greedy), 1);
    assert_eq!(sample_row(&[f32::NAN, -1.0, -3.0], 0.7, &greedy), 1);
    // The argmax takes -0 and +0 as equal: the lower index.
    assert_eq!(sample_row(&[-0.0, 0.0], 0.7, &greedy), 0);
    assert_eq!(sample_row(&[f32::NAN, f32::NAN], 0.7, &greedy), 0);
    let warm = params(1.0, 1, 1.0, 0.0);
    assert_eq!(sample_row(&[f32::NAN, -5.0, f32::NAN], 0.3, &warm), 1);
    assert_eq!(sample_row(&[f32::NAN, f32::NAN], 0.3, &warm), 0);
    let all = params(1.0, 0, 1.0, 0.0);
    for u in [0.0, 0.3, 0.999_999_94] {
        assert_eq!(sample_row(&[f32::NAN, 1.0, f32::NAN, 1.0], u, &all) % 2, 1);
    }
}

#[test]
fn each_filter_cuts_where_its_definition_says() {
    // Probabilities at temperature 1: exp(0), exp(-1), exp(-2), exp(-3) over their sum
    // = 0.6439, 0.2369, 0.0871, 0.0321.
    let logits = [0.0, -1.0, -2.0, -3.0];
    let last = 0.999;
    assert_eq!(sample_row(&logits, last, &params(1.0, 0, 1.0, 0.0)), 3);
    assert_eq!(sample_row(&logits, last, &params(1.0, 2, 1.0, 0.0)), 1);
    // top_k at or above the number of candidates keeps all.
    assert_eq!(sample_row(&logits, last, &params(1.0, 4, 1.0, 0.0)), 3);
    assert_eq!(sample_row(&logits, last, &params(1.0, 99, 1.0, 0.0)), 3);
    // 0.6439 < 0.85 <= 0.6439 + 0.2369.
    assert_eq!(sample_row(&logits, last, &params(1.0, 0, 0.85, 0.0)), 1);
    assert_eq!(sample_row(&logits, last, &params(1.0, 0, 0.9, 0.0)), 2);
    // 0.0871 >= 0.13 * 0.6439 = 0.0837 > 0.0321.
    assert_eq!(sample_row(&logits, last, &params(1.0, 0, 1.0, 0.13)), 2);
    assert_eq!(sample_row(&logits, last, &params(1.0, 0, 1.0, 0.14)), 1);
    // min_p 1 keeps the candidates of weight 2^32: the maximum alone here.
    assert_eq!(sample_row(&logits, last, &params(1.0, 0, 1.0, 1.0)), 0);
    assert_eq!(
        sample_row(&[2.0, 1.0, 2.0], last, &params(1.0, 0, 1.0, 1.0)),
        2
    );
    // The first token when u is below its probability.
    assert_eq!(sample_row(&logits, 0.6, &params(1.0, 0, 1.0, 0.0)), 0);
    // The temperature: at 0.25 the probabilities are 0.9817, 0.0180, ...
    assert_eq!(sample_row(&logits, 0.98, &params(0.25, 0, 1.0, 0.0)), 0);
    assert_eq!(sample_row(&logits, 0.99, &params(0.25, 0, 1.0, 0.0)), 1);
}

#[test]
fn weights_below_two_to_the_minus_33_are_never_drawn() {
    // e^-22 * 2^32 = 1.19 rounds to 1; e^-23 * 2^32 = 0.44 and e^-30 round to 0.
    let logits = [0.0, -22.0, -23.0, -30.0, f32::NEG_INFINITY];
    assert_eq!(weight(exp_nonpositive(-22.0)), 1);
    assert_eq!(weight(exp_nonpositive(-23.0)), 0);
    let all = params(1.0, 0, 1.0, 0.0);
    // Rank 1 holds 1 of Z' = 2^32 + 1: only D = Z' - 1 draws it, which no f32 u below
    // 1 gives, but u >= 1 does (D is at most Z' - 1).
    let u_last = 1.0 - f32::EPSILON / 2.0;
    assert_eq!(sample_row(&logits, u_last, &all), 0);
    assert_eq!(sample_row(&logits, 1.0, &all), 1);
    assert_eq!(sample_row(&logits, 7.5, &all), 1);
    assert_eq!(sample_row(&logits, f32::INFINITY, &all), 1);
    // u below 0 or NaN counts as 0.
    assert_eq!(sample_row(&logits, -0.5, &all), 0);
    assert_eq!(sample_row(&logits, f32::NAN, &all), 0);
    // A higher temperature gives them weight: e^(-30 / 2) * 2^32 = 1.3e-6 * 2^32.
    let hot = params(2.0, 0, 1.0, 0.0);
    assert_eq!(sample_row(&logits, u_last, &hot), 3);
}

#[test]
fn infinite_and_extreme_logits() {
    let all = params(1.0, 0, 1.0, 0.0);
    let inf = f32::INFINITY;
    // An infinite maximum takes all the mass, shared equally by equal ones.
    assert_eq!(sample_row(&[1.0, inf, 3.0, inf], 0.2, &all), 1);
    assert_eq!(sample_row(&[1.0, inf, 3.0, inf], 0.7, &all), 3);
    assert_eq!(sample_row(&[1.0, inf, 3.0], 0.999, &all), 1);
    // A row of -inf: all candidates are the maximum, with equal weights.
    let neg = [f32::NEG_INFINITY; 4];
    assert_eq!(sample_row(&neg, 0.6, &all), 2);
    // The largest finite logits: x = -inf for the others.
    assert_eq!(sample_row(&[f32::MAX, -f32::MAX, 0.0], 0.999, &all), 0);
    // Subnormal differences: equal weights.
    let tiny = f32::from_bits(1);
    assert_eq!(sample_row(&[0.0, tiny, -tiny], 0.1, &all), 1);
    assert_eq!(sample_row(&[0.0, tiny, -tiny], 0.5, &all), 0);
    assert_eq!(sample_row(&[0.0, tiny, -tiny], 0.9, &all), 2);
    // A huge temperature flattens, a tiny one sharpens (to the maximum alone).
    assert_eq!(
        sample_row(&[0.0, -1.0, -2.0], 0.9, &params(1e30, 0, 1.0, 0.0)),
        2
    );
    assert_eq!(
        sample_row(&[0.0, -1e-3, -2.0], 0.999, &params(1e-30, 0, 1.0, 0.0)),
        0
    );
}

#[test]
fn draws_follow_the_defined_probabilities() {
    // A fixed seed: 400k draws over 6 candidates, a chi-square bound well above its
    // expected value (5 degrees of freedom: mean 5, 0.9999 quantile 25.7).
    let mut rng = StdRng::seed_from_u64(20_240_531);
    let logits = [1.0f32, 2.5, 0.0, 2.4, -1.0, 1.7, -9.0];
    for p in [
        params(1.0, 0, 1.0, 0.0),
        params(0.7, 0, 0.95, 0.0),
        params(1.3, 4, 1.0, 0.05),
        params(0.9, 0, 1.0, 0.2),
    ] {
        let (kept, w) = kept_and_weights(&logits, &p);
        let z: u64 = w.iter().sum();
        let n = 400_000;
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[sample_row(&logits, rng.random::<f32>(), &p)] += 1;
        }
        let mut chi2 = 0.0;
        for (&i, &v) in kept.iter().zip(&w) {
            let expected = n as f64 * v as f64 / z as f64;
            chi2 += (counts[i] as f64 - expected).powi(2) / expected;
        }
        let drawn: usize = kept.iter().map(|&i| counts[i]).sum();
        assert_eq!(
            drawn, n,
            "{p:?}: only kept candidates are drawn: {counts:?}"
        );
        let dof = kept.len().saturating_sub(1) as f64;
        assert!(
            chi2 < dof + 8.0 * (2.0 * dof).sqrt() + 1.0,
            "{p:?}: chi-square {chi2:.1} over {dof} degrees of freedom, {counts:?}"
        );
        // And the defined probabilities are the softmax's, to the fixed point's
        // precision.
        let t = f64::from(p.temperature);
        let m = f64::from(logits[kept[0]]);
        let zt: f64 = kept
            .iter()
            .map(|&i| ((f64::from(logits[i]) - m) / t).exp())
            .sum();
        for (&i, &v) in kept.iter().zip(&w) {
            let q = ((f64::from(logits[i]) - m) / t).exp() / zt;
            assert!((v as f64 / z as f64 - q).abs() < 1e-6, "{p:?}: token {i}");
        }
    }
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
fn weights_and_targets_are_exact() {
    assert_eq!(weight(1.0), ONE);
    assert_eq!(weight(0.0), 0);
    assert_eq!(weight(0.5), ONE / 2);
    // 2^-33 is a tie: to even (0); 3 * 2^-33 is a tie: to even (2).
    assert_eq!(weight(2f32.powi(-33)), 0);
    assert_eq!(weight(3.0 * 2f32.powi(-33)), 2);
    assert_eq!(weight(f32::from_bits(1)), 0);
    assert_eq!(min_p_floor(1.0), ONE);
    assert_eq!(min_p_floor(0.5), ONE / 2);
    assert_eq!(min_p_floor(f32::from_bits(1)), 1);
    // 0.05 is 0x3d4ccccd = 13421773 * 2^-28: 13421773 * 16 = 214748368 exactly.
    assert_eq!(min_p_floor(0.05), 214_748_368);
    assert_eq!(top_p_target(0.5, 3 << 40), 3 << 39);
    assert_eq!(top_p_target(0.5, 3), 2);
    assert_eq!(top_p_target(f32::from_bits(1), 1 << 40), 1);
    assert_eq!(draw_target(0.5, 3), 1);
    assert_eq!(draw_target(0.0, 3), 0);
    assert_eq!(draw_target(-0.0, 3), 0);
    assert_eq!(draw_target(1.0, 3), 2);
    assert_eq!(draw_target(f32::NAN, 3), 0);
    assert_eq!(draw_target(f32::from_bits(1), u64::MAX), 0);
    // Against f64, exact while f * z has at most 53 significant bits.
    let mut rng = rng("sample_targets");
    for _ in 0..100_000 {
        let f: f32 = rng.random();
        let z: u64 = rng.random_range(1..1u64 << 29);
        let real = f64::from(f) * z as f64;
        assert_eq!(top_p_target(f, z), real.ceil() as u64, "{f} * {z}");
        assert_eq!(draw_target(f, z), real.floor() as u64, "{f} * {z}");
    }
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
