//! The sampler's definition: greedy, top-k, top-p, min-p, temperature, penalty, seed;
//! its uniform numbers for sampling elsewhere.

use kiln_core::ops::sample::sample_row;
use kiln_models::sampler::{apply_repeat_penalty, argmax};
use kiln_models::{Sampler, SamplerConfig};

fn counts(config: SamplerConfig, logits: &[f32], draws: usize) -> Vec<usize> {
    let mut s = Sampler::new(config);
    let mut c = vec![0; logits.len()];
    for _ in 0..draws {
        c[s.sample(logits, &[]) as usize] += 1;
    }
    c
}

fn plain(temperature: f32) -> SamplerConfig {
    SamplerConfig {
        temperature,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 0,
        seed: 7,
    }
}

#[test]
fn greedy_is_argmax_with_lowest_index_on_ties() {
    let mut s = Sampler::new(SamplerConfig::greedy());
    assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0], &[]), 1);
    assert_eq!(argmax(&[f32::NAN, -3.0, -2.0]), 2);
}

#[test]
fn draws_follow_softmax_over_temperature() {
    let logits = [1.0f32, 2.0, 0.0, 3.0];
    let t = 0.7;
    let z: f64 = logits.iter().map(|&l| (l as f64 / t as f64).exp()).sum();
    let n = 40_000;
    let c = counts(plain(t), &logits, n);
    for (i, &l) in logits.iter().enumerate() {
        let p = (l as f64 / t as f64).exp() / z;
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        let got = c[i] as f64 / n as f64;
        assert!(
            (got - p).abs() < 5.0 * sd + 1e-3,
            "token {i}: frequency {got:.4}, probability {p:.4}"
        );
    }
}

#[test]
fn top_k_top_p_and_min_p_remove_unlikely_tokens() {
    let logits = [3.0f32, 2.9, 0.0, -1.0, 2.8];
    let c = counts(
        SamplerConfig {
            top_k: 2,
            ..plain(1.0)
        },
        &logits,
        2000,
    );
    assert_eq!(
        (c[2], c[3], c[4]),
        (0, 0, 0),
        "top_k=2 keeps tokens 0 and 1: {c:?}"
    );
    assert!(c[0] > 0 && c[1] > 0, "{c:?}");
    // Probabilities are about 0.36, 0.33, 0.30, 0.018, 0.007 (in sorted order 0, 1, 4, 2, 3).
    let c = counts(
        SamplerConfig {
            top_p: 0.6,
            ..plain(1.0)
        },
        &logits,
        2000,
    );
    assert!(
        c[0] > 0 && c[1] > 0 && c[2] + c[3] + c[4] == 0,
        "top_p=0.6 keeps two: {c:?}"
    );
    let c = counts(
        SamplerConfig {
            min_p: 0.5,
            ..plain(1.0)
        },
        &logits,
        2000,
    );
    assert!(c[4] > 0 && c[2] + c[3] == 0, "min_p=0.5 keeps three: {c:?}");
}

#[test]
fn the_seed_determines_the_draws() {
    let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
    let draw = |seed| {
        let mut s = Sampler::new(SamplerConfig { seed, ..plain(1.0) });
        (0..64)
            .map(|_| s.sample(&logits, &[]))
            .collect::<Vec<u32>>()
    };
    assert_eq!(draw(1), draw(1));
    assert_ne!(draw(1), draw(2));
}

#[test]
fn repetition_penalty_scales_recent_tokens_once() {
    let mut l = [2.0f32, -2.0, 2.0, 1.0];
    apply_repeat_penalty(&mut l, &[0, 1, 0, 3], 2.0, 3);
    // The last 3 tokens are 1, 0, 3: token 0 once despite repeating, token 2 untouched.
    assert_eq!(l, [1.0, -4.0, 2.0, 0.5]);
}

#[test]
fn next_uniform_gives_the_numbers_sample_draws() {
    let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
    let config = SamplerConfig {
        top_k: 20,
        min_p: 0.05,
        seed: 9,
        ..plain(0.9)
    };
    let (mut host, mut elsewhere) = (Sampler::new(config), Sampler::new(config));
    for i in 0..64 {
        let u = elsewhere.next_uniform();
        assert!((0.0..1.0).contains(&u), "draw {i}: {u}");
        let want = sample_row(&logits, u, &elsewhere.params()) as u32;
        assert_eq!(host.sample(&logits, &[]), want, "draw {i}");
    }
    let mut greedy = Sampler::new(SamplerConfig::greedy());
    assert_eq!(greedy.next_uniform(), 0.0);
}

#[test]
fn only_an_active_penalty_uses_the_history() {
    let with = |repeat_penalty, repeat_last_n| {
        Sampler::new(SamplerConfig {
            repeat_penalty,
            repeat_last_n,
            ..plain(1.0)
        })
        .uses_history()
    };
    assert!(with(1.1, 64));
    assert!(with(0.9, 1));
    assert!(!with(1.0, 64));
    assert!(!with(1.3, 0));
    assert!(!Sampler::new(SamplerConfig::default()).uses_history());
}

#[test]
fn a_greedy_sampler_takes_the_argmax_of_the_logits_as_they_come() {
    let sampler = |temperature, repeat_penalty| {
        Sampler::new(SamplerConfig {
            repeat_penalty,
            repeat_last_n: 64,
            ..plain(temperature)
        })
    };
    assert!(Sampler::new(SamplerConfig::greedy()).is_greedy());
    assert!(sampler(-1.0, 1.0).is_greedy());
    assert!(
        !sampler(0.0, 1.1).is_greedy(),
        "a penalty changes the logits"
    );
    assert!(!sampler(0.8, 1.0).is_greedy());
    assert!(!Sampler::new(SamplerConfig::default()).is_greedy());
    // Whatever the history, a greedy sampler chooses the argmax (and a penalised one
    // may not: the history's token 3 loses to token 0).
    let logits = [1.9f32, -0.5, 0.3, 2.0, 2.0];
    let history = [3, 4, 3];
    assert_eq!(
        sampler(0.0, 1.0).sample(&logits, &history),
        argmax(&logits) as u32
    );
    assert_eq!(argmax(&logits), 3);
    assert_eq!(sampler(0.0, 1.1).sample(&logits, &history), 0);
}

#[test]
fn check_rejects_settings_out_of_range_by_name() {
    assert!(SamplerConfig::default().check().is_ok());
    assert!(SamplerConfig::greedy().check().is_ok());
    let cold = SamplerConfig {
        temperature: -1.0,
        ..SamplerConfig::default()
    };
    assert!(cold.check().is_ok(), "a negative temperature is greedy");
    let cases = [
        (
            "temperature",
            SamplerConfig {
                temperature: f32::NAN,
                ..SamplerConfig::default()
            },
        ),
        (
            "top_p",
            SamplerConfig {
                top_p: 1.5,
                ..SamplerConfig::default()
            },
        ),
        (
            "top_p",
            SamplerConfig {
                top_p: 0.0,
                ..SamplerConfig::default()
            },
        ),
        (
            "min_p",
            SamplerConfig {
                min_p: -0.1,
                ..SamplerConfig::default()
            },
        ),
        (
            "repeat_penalty",
            SamplerConfig {
                repeat_penalty: 0.0,
                ..SamplerConfig::default()
            },
        ),
        (
            "repeat_penalty",
            SamplerConfig {
                repeat_penalty: f32::NAN,
                ..SamplerConfig::default()
            },
        ),
    ];
    for (name, config) in cases {
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains(name), "{config:?}: {err}");
    }
}
