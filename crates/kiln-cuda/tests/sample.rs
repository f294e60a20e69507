//! Sample: the dispatch checks (no GPU needed) and exact token parity with kiln-cpu on
//! the GPU, at random uniforms and at the uniforms where the reference's token changes.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{Sample, SampleParams};
use kiln_core::{Aliasing, DType, Graph};
use kiln_cpu::ops::sample::sample_row;
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::sample::{spec_for, SampleArgs};
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

fn args() -> SampleArgs {
    SampleArgs {
        rows: 2,
        vocab: 151_936,
        params: params(0.8, 40, 0.95, 0.05),
        logits_bytes: 2 * 151_936 * 4,
        uniform_bytes: 8,
        out_bytes: 8,
    }
}

#[test]
fn sampling_runs_one_block_of_1024_threads_per_row() {
    let plan = args().check().unwrap();
    assert_eq!(plan.spec.key, "sample|lanes=1024");
    assert_eq!(plan.spec.name_expression, "kiln::sample<1024>");
    assert_eq!(plan.config.grid_dim, (2, 1, 1));
    assert_eq!(plan.config.block_dim, (1024, 1, 1));
}

#[test]
fn temperature_zero_runs_the_argmax_kernel() {
    assert_eq!(spec_for(&params(0.0, 40, 0.9, 0.1)).key, "argmax|x=f32");
    assert_eq!(spec_for(&params(0.5, 0, 1.0, 0.0)).key, "sample|lanes=1024");
}

#[test]
fn bad_settings_are_rejected() {
    let with = |p| {
        invalid(
            SampleArgs {
                params: p,
                ..args()
            }
            .check(),
        )
    };
    assert_eq!(
        with(params(f32::INFINITY, 0, 1.0, 0.0)),
        "sample: temperature must be finite, got inf"
    );
    assert_eq!(
        with(params(1.0, 0, 1.5, 0.0)),
        "sample: top_p must be in (0, 1], got 1.5"
    );
    assert_eq!(
        with(params(1.0, 0, 1.0, -0.5)),
        "sample: min_p must be in [0, 1], got -0.5"
    );
}

#[test]
fn bad_shapes_are_rejected() {
    assert_eq!(
        invalid(SampleArgs { vocab: 0, ..args() }.check()),
        "sample: vocab must be > 0, got 0"
    );
    assert_eq!(
        invalid(
            SampleArgs {
                uniform_bytes: 4,
                ..args()
            }
            .check()
        ),
        "sample: uniform needs 2 f32 elements (8 bytes), its buffer has 4 bytes"
    );
    assert_eq!(
        invalid(
            SampleArgs {
                logits_bytes: 8,
                ..args()
            }
            .check()
        ),
        "sample: logits needs 303872 f32 elements (1215488 bytes), its buffer has 8 bytes"
    );
    let vocab = i32::MAX as usize + 1;
    let m = invalid(
        SampleArgs {
            rows: 1,
            vocab,
            logits_bytes: vocab * 4,
            ..args()
        }
        .check(),
    );
    assert_eq!(m, "sample: vocab 2147483648 does not fit an I32 index");
}

/// The GPU's and the CPU reference's tokens for `rows` rows.
fn both(vocab: usize, logits: &[f32], uniform: &[f32], p: SampleParams) -> (Vec<i32>, Vec<i32>) {
    let rows = uniform.len();
    let mut g = Graph::new();
    let lb = g.persistent("logits", DType::F32, &[rows, vocab]).unwrap();
    let ub = g.persistent("uniform", DType::F32, &[rows]).unwrap();
    let out = g.persistent("out", DType::I32, &[rows]).unwrap();
    g.push(Sample {
        logits: lb,
        uniform: ub,
        out,
        rows,
        vocab,
        params: p,
    })
    .unwrap();
    let inputs = [(lb, f32_bytes(logits)), (ub, f32_bytes(uniform))];
    let want = i32s(&run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
    let got = i32s(&run_on(cuda(), &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
    (got, want)
}

fn settings() -> [SampleParams; 6] {
    [
        params(0.0, 0, 1.0, 0.0),
        params(1.0, 0, 1.0, 0.0),
        params(0.7, 5, 1.0, 0.0),
        params(1.3, 0, 0.8, 0.0),
        params(0.9, 0, 1.0, 0.1),
        params(0.8, 40, 0.95, 0.05),
    ]
}

/// Logits of `n` values: uniform in `[-scale, scale)`, or with `ties` from a set of 4.
fn logits(rng: &mut StdRng, n: usize, scale: f32, ties: bool) -> Vec<f32> {
    if ties {
        (0..n)
            .map(|_| rng.random_range(0..4) as f32 * 0.5)
            .collect()
    } else {
        uniform(rng, n, scale)
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn sample_matches_cpu_exactly_on_random_logits() {
    cuda();
    let mut rng = rng("sample_matches_cpu_exactly_on_random_logits");
    for (rows, vocab) in [(3, 1), (8, 7), (8, 1000), (4, 32_001), (2, 151_936)] {
        for p in settings() {
            for ties in [false, true] {
                let x = logits(&mut rng, rows * vocab, 8.0, ties);
                let u: Vec<f32> = (0..rows).map(|_| rng.random::<f32>()).collect();
                let (got, want) = both(vocab, &x, &u, p);
                assert_eq!(got, want, "{rows}x{vocab}, {p:?}, ties {ties}");
            }
        }
    }
}

/// The smallest f32 `u` at which the reference's token differs from its token at 0:
/// there the draw's cumulative sum equals `u`, the closest a GPU rounding difference
/// could flip the result.
fn boundary(row: &[f32], p: &SampleParams) -> Option<f32> {
    let first = sample_row(row, 0.0, p);
    let (mut below, mut at) = (0u32, (1.0f32 - f32::EPSILON / 2.0).to_bits());
    if sample_row(row, f32::from_bits(at), p) == first {
        return None;
    }
    while at - below > 1 {
        let mid = below + (at - below) / 2;
        if sample_row(row, f32::from_bits(mid), p) == first {
            below = mid;
        } else {
            at = mid;
        }
    }
    Some(f32::from_bits(at))
}

#[test]
#[ignore = "needs a CUDA device"]
fn sample_matches_cpu_exactly_at_decision_boundaries() {
    cuda();
    let mut rng = rng("sample_matches_cpu_exactly_at_decision_boundaries");
    let mut boundaries = 0;
    for vocab in [300, 50_000] {
        for p in settings().into_iter().skip(1) {
            // 60 logits 1 ulp apart (some repeated) among random ones.
            let mut row = logits(&mut rng, vocab, 2.0, false);
            for (k, v) in row.iter_mut().enumerate().take(60) {
                *v = f32::from_bits(1.0f32.to_bits() + k as u32 % 7);
            }
            let Some(at) = boundary(&row, &p) else {
                continue;
            };
            boundaries += 1;
            let below = f32::from_bits(at.to_bits() - 1);
            let x: Vec<f32> = row.iter().chain(&row).copied().collect();
            let (got, want) = both(vocab, &x, &[below, at], p);
            assert_ne!(want[0], want[1], "the reference's token changes at {at}");
            assert_eq!(got, want, "vocab {vocab}, {p:?}, u {below} and {at}");
        }
    }
    assert!(boundaries >= 8, "only {boundaries} boundaries found");
}
