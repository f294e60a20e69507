//! Sample: the dispatch checks and launch plans (no GPU needed), the bound on weights
//! the kernel relies on, and exact token parity with kiln-cpu on the GPU: random
//! logits of many shapes and distributions at every setting, uniforms at the exact
//! boundaries where the reference's token changes, NaN rows and extreme values, a
//! small tuning that takes the kernel's every path, and repeated launches.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::sample::{exp_nonpositive, sample_row, weight};
use kiln_core::ops::{Sample, SampleParams};
use kiln_core::{Aliasing, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::sample::{
    sample_with, spec, spec_for, SampleArgs, SampleDevice, SampleLayout, SampleTuning, STRESS,
    TUNING,
};
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
fn a_row_is_a_cluster_of_8_blocks_staging_its_logits_on_hopper() {
    let plan = args().check(&SampleDevice::HOPPER).unwrap();
    assert_eq!(
        plan.spec.key,
        "sample|threads=512|bucket_bits=11|digit_bits=8|list=1024|budget=512|cluster=8"
    );
    assert_eq!(
        plan.spec.name_expression,
        "kiln::sample<512, 8, 11, 8, 1024, 512>"
    );
    assert_eq!(plan.config.grid_dim, (16, 1, 1));
    assert_eq!(plan.config.block_dim, (512, 1, 1));
    assert_eq!(plan.blocks_per_row, 8);
    // 151936 / 8 = 18992 logits a block, staged with their buckets (6 bytes each).
    assert_eq!(plan.chunk, 18_992);
    assert!(plan.staged && plan.buckets_cached);
    let fixed = TUNING.fixed_shared_bytes();
    assert_eq!(
        fixed,
        2048 + 8 * (2 * 2048 + 2 * 256 + 3 * 1024) + 4 * (2048 + 256)
    );
    assert_eq!(plan.config.shared_mem_bytes as usize, fixed + 6 * 18_992);
    // An odd vocabulary: chunks are whole multiples of 8.
    let odd = SampleArgs {
        rows: 1,
        vocab: 32_001,
        logits_bytes: 32_001 * 4,
        ..args()
    };
    assert_eq!(odd.check(&SampleDevice::HOPPER).unwrap().chunk, 4008);
}

#[test]
fn large_rows_stage_what_fits_and_old_devices_take_one_block_a_row() {
    let big = SampleArgs {
        rows: 1,
        vocab: 262_144,
        logits_bytes: 262_144 * 4,
        ..args()
    };
    // 32768 logits a block: 128 KiB staged, their buckets no longer fit.
    let plan = big.check(&SampleDevice::HOPPER).unwrap();
    assert!(plan.staged && !plan.buckets_cached);
    assert_eq!(
        plan.config.shared_mem_bytes as usize,
        TUNING.fixed_shared_bytes() + 4 * 32_768
    );
    let ampere = SampleDevice {
        clusters: false,
        max_shared_bytes: 166_912,
    };
    let plan = args().check(&ampere).unwrap();
    assert_eq!(plan.blocks_per_row, 1);
    assert_eq!(plan.config.grid_dim, (2, 1, 1));
    assert_eq!(plan.chunk, 151_936);
    assert!(!plan.staged && !plan.buckets_cached);
    assert_eq!(
        plan.config.shared_mem_bytes as usize,
        TUNING.fixed_shared_bytes()
    );
    let plan = args()
        .check_with(&SampleDevice::HOPPER, STRESS, SampleLayout::Block)
        .unwrap();
    assert_eq!(
        plan.spec.name_expression,
        "kiln::sample_block<512, 5, 3, 16, 8>"
    );
    assert_eq!(plan.blocks_per_row, 1);
    let tiny = SampleDevice {
        clusters: true,
        max_shared_bytes: 48 * 1024,
    };
    let err = args().check(&tiny).unwrap_err().to_string();
    assert!(err.contains("shared memory"), "{err}");
    // 16 blocks a row: half the slice each.
    let sixteen = SampleTuning {
        cluster_blocks: 16,
        ..TUNING
    };
    let plan = args()
        .check_with(&SampleDevice::HOPPER, sixteen, SampleLayout::Cluster)
        .unwrap();
    assert_eq!((plan.blocks_per_row, plan.chunk), (16, 9496));
    assert_eq!(
        plan.spec.name_expression,
        "kiln::sample<512, 16, 11, 8, 1024, 512>"
    );
    for bad in [
        SampleTuning {
            cluster_blocks: 3,
            ..TUNING
        },
        SampleTuning {
            cluster_blocks: 32,
            ..TUNING
        },
        SampleTuning {
            bucket_bits: 4,
            ..STRESS
        },
        SampleTuning {
            list: 1000,
            ..TUNING
        },
        SampleTuning {
            budget: 2048,
            ..TUNING
        },
    ] {
        let err = args()
            .check_with(&SampleDevice::HOPPER, bad, SampleLayout::Cluster)
            .unwrap_err()
            .to_string();
        assert!(err.contains("the kernel does not take"), "{err}");
    }
}

#[test]
fn temperature_zero_runs_the_argmax_kernel() {
    assert_eq!(
        spec_for(&params(0.0, 40, 0.9, 0.1)).key,
        kiln_cuda::ops::argmax::spec().key
    );
    assert_eq!(spec_for(&params(-1.0, 0, 1.0, 0.0)).key, "argmax|x=f32");
    assert_eq!(spec_for(&params(0.5, 0, 1.0, 0.0)).key, spec().key);
}

#[test]
fn bad_settings_are_rejected() {
    let with = |p| {
        invalid(
            SampleArgs {
                params: p,
                ..args()
            }
            .check(&SampleDevice::HOPPER),
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
    let check = |a: SampleArgs| invalid(a.check(&SampleDevice::HOPPER));
    assert_eq!(
        check(SampleArgs { vocab: 0, ..args() }),
        "sample: vocab must be > 0, got 0"
    );
    assert_eq!(
        check(SampleArgs {
            uniform_bytes: 4,
            ..args()
        }),
        "sample: uniform needs 2 f32 elements (8 bytes), its buffer has 4 bytes"
    );
    assert_eq!(
        check(SampleArgs {
            logits_bytes: 8,
            ..args()
        }),
        "sample: logits needs 303872 f32 elements (1215488 bytes), its buffer has 8 bytes"
    );
    let vocab = i32::MAX as usize + 1;
    assert_eq!(
        check(SampleArgs {
            rows: 1,
            vocab,
            logits_bytes: vocab * 4,
            ..args()
        }),
        "sample: vocab 2147483648 does not fit an I32 index"
    );
}

/// The kernel takes every candidate at least 23.99 below the maximum (times
/// max(1, temperature) for the draw) as weight 0, and skips the exponential below
/// -23.9 (kernels/sample.cu's SAMPLE_ZERO_WEIGHT_BELOW): every f32 from -104 to -23.9
/// has weight 0.
#[test]
fn weights_are_zero_beyond_the_kernels_tail_distance() {
    assert!(weight(exp_nonpositive(-22.87)) > 0);
    let mut bits = (-23.9f32).to_bits();
    let last = (-104.0f32).to_bits();
    while bits <= last {
        let x = f32::from_bits(bits);
        assert_eq!(weight(exp_nonpositive(x)), 0, "x = {x}");
        bits += 1;
    }
}

/// The GPU's and the CPU reference's tokens for `rows` rows, through a graph (outputs
/// poisoned before the launch).
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

/// The GPU's tokens from the kernel of `tuning` and `layout`, the output poisoned
/// (-7) before the launch.
fn gpu_with(
    tuning: SampleTuning,
    layout: SampleLayout,
    vocab: usize,
    logits: &[f32],
    uniform: &[f32],
    p: SampleParams,
) -> Vec<i32> {
    let cuda = cuda();
    let rows = uniform.len();
    let x = device(cuda, &f32_bytes(logits));
    let u = device(cuda, &f32_bytes(uniform));
    let mut out = device(cuda, &i32_bytes(&vec![-7; rows]));
    sample_with(cuda, &x, &u, &mut out, rows, vocab, &p, tuning, layout).unwrap();
    i32s(&host(cuda, &out, 4 * rows))
}

/// The CPU reference's tokens.
fn reference(vocab: usize, logits: &[f32], uniform: &[f32], p: &SampleParams) -> Vec<i32> {
    logits
        .chunks(vocab)
        .zip(uniform)
        .map(|(row, &u)| sample_row(row, u, p) as i32)
        .collect()
}

/// The settings of the brief (the defaults, a wide nucleus, min-p alone, temperature
/// alone, argmax) and some of each filter.
fn settings() -> Vec<SampleParams> {
    vec![
        params(0.8, 40, 0.95, 0.05),
        params(0.8, 0, 0.9, 0.0),
        params(0.8, 0, 1.0, 0.05),
        params(0.8, 0, 1.0, 0.0),
        params(1.0, 0, 1.0, 0.0),
        params(0.0, 0, 1.0, 0.0),
        params(0.7, 5, 1.0, 0.0),
        params(1.3, 0, 0.8, 0.1),
        params(2.5, 1000, 0.99, 0.0),
    ]
}

/// Random settings: any temperature, top-k at and around the edges, any top-p, min-p
/// from 0 to 1.
fn random_settings(rng: &mut StdRng, vocab: usize) -> SampleParams {
    let ks = [0, 1, 2, 40, 1000, vocab.saturating_sub(1), vocab, vocab + 7];
    params(
        rng.random_range(0.05..3.0),
        ks[rng.random_range(0..ks.len())],
        if rng.random() {
            1.0
        } else {
            rng.random_range(0.05..1.0)
        },
        match rng.random_range(0..4) {
            0 => 0.0,
            1 => 1.0,
            _ => rng.random_range(0.0..0.3),
        },
    )
}

/// Logits of `n` values of distribution `kind`: normal of scale 2 (0), narrow (1), wide
/// (2), few distinct values (3), normal with NaN (4), masked by -inf and -1e9 (5),
/// with +inf (6), all equal (7).
fn logits(rng: &mut StdRng, kind: usize, n: usize) -> Vec<f32> {
    // Box-Muller: a standard normal value from two uniform ones, times s.
    let mut normal = |s: f32| -> f32 {
        let (a, b): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
        ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32 * s
    };
    (0..n)
        .map(|i| match kind {
            0 => normal(2.0),
            1 => normal(0.02),
            2 => normal(12.0),
            3 => (normal(1.0) * 2.0).round() * 0.5,
            4 if i % 11 == 3 => f32::NAN,
            5 if i % 3 == 1 => f32::NEG_INFINITY,
            5 if i % 3 == 2 => -1e9,
            6 if i % 997 == 5 => f32::INFINITY,
            7 => 0.75,
            _ => normal(1.5),
        })
        .collect()
}

const KINDS: usize = 8;

#[test]
#[ignore = "needs a CUDA device"]
fn sample_matches_cpu_exactly_on_random_logits() {
    cuda();
    let mut rng = rng("sample_matches_cpu_exactly_on_random_logits");
    for (rows, vocab) in [
        (3, 1),
        (4, 31),
        (8, 1000),
        (3, 32_001),
        (2, 128_256),
        (2, 151_936),
    ] {
        let mut all = settings();
        all.extend((0..4).map(|_| random_settings(&mut rng, vocab)));
        for p in all {
            for kind in 0..KINDS {
                let x = logits(&mut rng, kind, rows * vocab);
                let u: Vec<f32> = (0..rows).map(|_| rng.random::<f32>()).collect();
                let (got, want) = both(vocab, &x, &u, p);
                assert_eq!(got, want, "{rows}x{vocab}, {p:?}, logits kind {kind}");
            }
        }
    }
}

/// Uniforms at which the reference's token for `row` changes (the smallest f32 with
/// the new token) and the f32 just below each, found by bisection between random
/// uniforms; at most `most` pairs.
fn boundaries(rng: &mut StdRng, row: &[f32], p: &SampleParams, most: usize) -> Vec<f32> {
    let mut us: Vec<f32> = (0..4 * most).map(|_| rng.random::<f32>()).collect();
    us.push(0.0);
    us.push(1.0 - f32::EPSILON / 2.0);
    us.sort_by(f32::total_cmp);
    let mut out = Vec::new();
    for pair in us.windows(2) {
        let (mut below, mut at) = (pair[0].to_bits(), pair[1].to_bits());
        let first = sample_row(row, pair[0], p);
        if sample_row(row, pair[1], p) == first {
            continue;
        }
        while at - below > 1 {
            let mid = below + (at - below) / 2;
            if sample_row(row, f32::from_bits(mid), p) == first {
                below = mid;
            } else {
                at = mid;
            }
        }
        out.push(f32::from_bits(below));
        out.push(f32::from_bits(at));
        if out.len() >= 2 * most {
            break;
        }
    }
    out
}

#[test]
#[ignore = "needs a CUDA device"]
fn sample_matches_cpu_exactly_at_decision_boundaries() {
    cuda();
    let mut rng = rng("sample_matches_cpu_exactly_at_decision_boundaries");
    let mut checked = 0;
    // Fewer boundaries at larger vocabularies: each bisection step runs the reference.
    for (vocab, most) in [(300, 24), (50_000, 12), (151_936, 4)] {
        let mut all = settings();
        all.extend((0..3).map(|_| random_settings(&mut rng, vocab)));
        for p in all.into_iter().filter(|p| p.temperature > 0.0) {
            for kind in [0, 3, 4] {
                // 60 logits 1 ulp apart (some repeated) among random ones.
                let mut row = logits(&mut rng, kind, vocab);
                for (k, v) in row.iter_mut().enumerate().take(60) {
                    *v = f32::from_bits(3.0f32.to_bits() + k as u32 % 7);
                }
                // Many uniforms for the one row: the row repeated, one uniform each.
                let mut u = boundaries(&mut rng, &row, &p, most);
                u.extend((0..8).map(|_| rng.random::<f32>()));
                u.extend([0.0, 1.0 - f32::EPSILON / 2.0, 1.0, f32::NAN, -0.25]);
                let x: Vec<f32> = u.iter().flat_map(|_| row.iter().copied()).collect();
                let got = gpu_with(TUNING, SampleLayout::Cluster, vocab, &x, &u, p);
                assert_eq!(
                    got,
                    reference(vocab, &x, &u, &p),
                    "vocab {vocab}, {p:?}, kind {kind}, uniforms {u:?}"
                );
                checked += u.len();
            }
        }
    }
    assert!(checked > 800, "only {checked} uniforms checked");
}

#[test]
#[ignore = "needs a CUDA device"]
fn sample_takes_every_path_with_a_small_tuning() {
    // 32 buckets and a list of 16: rows of a few hundred candidates refine their
    // buckets down to the index bits, both with clusters and with one block a row.
    cuda();
    let mut rng = rng("sample_takes_every_path_with_a_small_tuning");
    for layout in [SampleLayout::Cluster, SampleLayout::Block] {
        for vocab in [1, 7, 33, 300, 2000] {
            let mut all = settings();
            all.extend((0..6).map(|_| random_settings(&mut rng, vocab)));
            for p in all {
                for kind in 0..KINDS {
                    let rows = 3;
                    let x = logits(&mut rng, kind, rows * vocab);
                    let mut u: Vec<f32> = (0..rows).map(|_| rng.random::<f32>()).collect();
                    if let Some(b) = boundaries(&mut rng, &x[..vocab], &p, 1).get(1) {
                        u[0] = *b;
                    }
                    let got = gpu_with(STRESS, layout, vocab, &x, &u, p);
                    assert_eq!(
                        got,
                        reference(vocab, &x, &u, &p),
                        "{layout:?}, vocab {vocab}, {p:?}, kind {kind}, uniforms {u:?}"
                    );
                }
            }
        }
    }
    // The dispatch's tuning with one block a row (the kernel of devices without
    // clusters) at a full vocabulary.
    let vocab = 151_936;
    for p in settings() {
        let x = logits(&mut rng, 0, 2 * vocab);
        let u: Vec<f32> = (0..2).map(|_| rng.random::<f32>()).collect();
        let got = gpu_with(TUNING, SampleLayout::Block, vocab, &x, &u, p);
        assert_eq!(got, reference(vocab, &x, &u, &p), "one block a row, {p:?}");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn sample_cuts_top_k_inside_the_last_bucket() {
    // Logits 8 and 0 alternating: the spread, 8, is a power of two, so the zeros fill
    // the kernel's last bucket with positive weights (e^-8 of the top's), and a top-k
    // between the two counts cuts among them.
    cuda();
    let mut rng = rng("sample_cuts_top_k_inside_the_last_bucket");
    for vocab in [1000, 151_936] {
        let row: Vec<f32> = (0..vocab)
            .map(|i| if i % 2 == 0 { 8.0 } else { 0.0 })
            .collect();
        for p in [
            params(1.0, 3 * vocab / 4, 1.0, 0.0),
            params(0.7, 3 * vocab / 4 + 1, 0.999_999, 0.0),
            params(2.0, vocab - 1, 1.0, 0.0),
            params(1.0, vocab / 2 + 1, 1.0, 0.0),
        ] {
            let mut u = boundaries(&mut rng, &row, &p, 8);
            u.extend([0.999, 1.0 - f32::EPSILON / 2.0]);
            let x: Vec<f32> = u.iter().flat_map(|_| row.iter().copied()).collect();
            let want = reference(vocab, &x, &u, &p);
            for (tuning, layout) in [
                (TUNING, SampleLayout::Cluster),
                (STRESS, SampleLayout::Cluster),
                (STRESS, SampleLayout::Block),
            ] {
                let got = gpu_with(tuning, layout, vocab, &x, &u, p);
                assert_eq!(
                    got, want,
                    "vocab {vocab}, {p:?}, {tuning:?}, {layout:?}, {u:?}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn sample_handles_nan_rows_and_extreme_values() {
    cuda();
    let inf = f32::INFINITY;
    let rows: Vec<Vec<f32>> = vec![
        vec![f32::NAN; 1000],
        (0..1000)
            .map(|i| if i == 617 { 1.0 } else { f32::NAN })
            .collect(),
        (0..1000)
            .map(|i| if i % 2 == 0 { 0.0 } else { -0.0 })
            .collect(),
        (0..1000)
            .map(|i| match i % 4 {
                0 => inf,
                1 => f32::NAN,
                _ => i as f32,
            })
            .collect(),
        vec![f32::NEG_INFINITY; 1000],
        (0..1000)
            .map(|i| if i % 3 == 0 { f32::MAX } else { -f32::MAX })
            .collect(),
        (0..1000).map(|i| f32::from_bits(i as u32 % 17)).collect(),
        (0..1000).map(|i| (i % 50) as f32 - 30.0).collect(),
    ];
    let all: Vec<SampleParams> = settings()
        .into_iter()
        .chain([
            params(1.0, 5000, 1.0, 0.0),
            params(1.0, 0, 1.0, 1.0),
            params(0.3, 3, 0.01, 1.0),
            params(1e30, 0, 1.0, 0.0),
            params(1e-30, 0, 1.0, 0.0),
        ])
        .collect();
    for p in all {
        for u in [0.0, 0.5, 1.0 - f32::EPSILON / 2.0, 1.0, f32::NAN] {
            let x: Vec<f32> = rows.iter().flatten().copied().collect();
            let us = vec![u; rows.len()];
            let (got, want) = both(1000, &x, &us, p);
            assert_eq!(got, want, "{p:?}, u {u}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn repeated_launches_of_one_plan_stay_correct() {
    // As a replayed graph does: the same buffers and arguments, new logits each time,
    // launches queued back to back.
    let cuda = cuda();
    let mut rng = rng("repeated_launches_of_one_plan_stay_correct");
    let (rows, vocab) = (3, 128_256);
    for p in settings() {
        let mut x = device(cuda, &f32_bytes(&vec![0.0; rows * vocab]));
        let mut u = device(cuda, &f32_bytes(&vec![0.5; rows]));
        let mut outs: Vec<_> = (0..6)
            .map(|_| device(cuda, &i32_bytes(&vec![-7; rows])))
            .collect();
        let mut want = Vec::new();
        let launch = |x: &kiln_cuda::CudaBuffer, u: &kiln_cuda::CudaBuffer, out: &mut _| {
            let (l, t) = (SampleLayout::Cluster, TUNING);
            sample_with(cuda, x, u, out, rows, vocab, &p, t, l).unwrap()
        };
        for (i, out) in outs.iter_mut().enumerate() {
            let logits = logits(&mut rng, i % KINDS, rows * vocab);
            let uniform: Vec<f32> = (0..rows).map(|_| rng.random::<f32>()).collect();
            use kiln_core::Backend;
            cuda.upload(&mut x, &f32_bytes(&logits)).unwrap();
            cuda.upload(&mut u, &f32_bytes(&uniform)).unwrap();
            launch(&x, &u, out);
            want.push(reference(vocab, &logits, &uniform, &p));
        }
        // And the same inputs again and again, without reading back in between.
        let mut again: Vec<_> = (0..4)
            .map(|_| device(cuda, &i32_bytes(&vec![-7; rows])))
            .collect();
        for out in again.iter_mut() {
            launch(&x, &u, out);
        }
        for (i, out) in outs.iter().enumerate() {
            assert_eq!(
                i32s(&host(cuda, out, 4 * rows)),
                want[i],
                "{p:?}, launch {i}"
            );
        }
        for out in &again {
            assert_eq!(i32s(&host(cuda, out, 4 * rows)), want[5], "{p:?}, repeat");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn threads_launching_one_kernel_with_different_shared_memory_all_run() {
    // The same kernel for four vocabularies, each staging a chunk of a size of its
    // own above the default shared memory: a thread's opt-in must never drop below
    // another's launch.
    let vocabs = [151_936, 128_256, 100_000, 131_072];
    for &vocab in &vocabs {
        let plan = SampleArgs {
            rows: 1,
            vocab,
            params: settings()[0],
            logits_bytes: 4 * vocab,
            uniform_bytes: 4,
            out_bytes: 4,
        }
        .check(&SampleDevice::HOPPER)
        .unwrap();
        assert!(plan.config.shared_mem_bytes > 48 * 1024, "{vocab}");
    }
    std::thread::scope(|scope| {
        for (i, &vocab) in vocabs.iter().enumerate() {
            scope.spawn(move || {
                let mut rng = rng(&format!("threads_launching_one_kernel {i}"));
                let p = settings()[0];
                for round in 0..40 {
                    let x = logits(&mut rng, round % KINDS, vocab);
                    let u = [rng.random::<f32>()];
                    let got = gpu_with(TUNING, SampleLayout::Cluster, vocab, &x, &u, p);
                    assert_eq!(got, reference(vocab, &x, &u, &p), "{vocab}, round {round}");
                }
            });
        }
    });
}
