//! Rope, HeadNormRope and QkvRopeAppend: the dispatch checks (no GPU needed) and
//! parity with kiln-cpu on the GPU.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{HeadNormRope, QkNorm, QkvRopeAppend, Rope, RopeParams, RopeStyle};
use kiln_core::{Aliasing, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::rope::{HeadNorm, QkvRopeArgs, RopeArgs};

fn params() -> RopeParams {
    RopeParams {
        head_dim: 128,
        rotary_dim: 64,
        base: 10000.0,
        freq_scale: 1.0,
        style: RopeStyle::NeoX,
    }
}

/// A valid rope of 2 tokens x 4 heads x 128 with frequency factors.
fn args() -> RopeArgs {
    RopeArgs {
        n_tokens: 2,
        n_heads: 4,
        params: params(),
        norm: None,
        x_bytes: 2 * 4 * 128 * 4,
        positions_bytes: 2 * 4,
        freq_factors_bytes: Some(32 * 4),
        out_bytes: 2 * 4 * 128 * 4,
    }
}

fn with_norm() -> RopeArgs {
    RopeArgs {
        norm: Some(HeadNorm {
            eps: 1e-6,
            weight_bytes: Some(128 * 4),
        }),
        ..args()
    }
}

fn with_params(p: RopeParams) -> RopeArgs {
    RopeArgs {
        params: p,
        ..args()
    }
}

#[test]
fn rope_runs_a_block_per_token_and_head_norm_rope_a_warp_per_head() {
    let plan = args().check().unwrap();
    assert_eq!(plan.spec.key, "rope|style=neox");
    assert_eq!(plan.config.grid_dim, (2, 1, 1));
    let plan = with_norm().check().unwrap();
    assert_eq!(plan.spec.name_expression, "kiln::head_norm_rope<true>");
    assert_eq!(
        plan.config.grid_dim,
        (2, 1, 1),
        "8 heads, 4 warps per block"
    );
}

#[test]
fn zero_tokens_are_rejected() {
    let m = invalid(
        RopeArgs {
            n_tokens: 0,
            ..args()
        }
        .check(),
    );
    assert_eq!(m, "rope: n_tokens must be > 0, got 0");
}

#[test]
fn zero_heads_are_rejected() {
    let m = invalid(
        RopeArgs {
            n_heads: 0,
            ..with_norm()
        }
        .check(),
    );
    assert_eq!(m, "head_norm_rope: n_heads must be > 0, got 0");
}

#[test]
fn a_zero_head_dim_is_rejected() {
    let m = invalid(
        with_params(RopeParams {
            head_dim: 0,
            ..params()
        })
        .check(),
    );
    assert_eq!(m, "rope: head_dim must be > 0, got 0");
}

#[test]
fn a_zero_rotary_dim_is_rejected() {
    let m = invalid(
        with_params(RopeParams {
            rotary_dim: 0,
            ..params()
        })
        .check(),
    );
    assert_eq!(m, "rope: rotary_dim must be > 0, got 0");
}

#[test]
fn a_rotary_dim_above_the_head_dim_is_rejected() {
    let m = invalid(
        with_params(RopeParams {
            rotary_dim: 130,
            ..params()
        })
        .check(),
    );
    assert_eq!(m, "rope: rotary_dim 130 exceeds head_dim 128");
}

#[test]
fn an_odd_rotary_dim_is_rejected() {
    let m = invalid(
        with_params(RopeParams {
            rotary_dim: 63,
            ..params()
        })
        .check(),
    );
    assert_eq!(m, "rope: rotary_dim 63 must be even");
}

#[test]
fn a_base_that_is_not_finite_and_positive_is_rejected() {
    for base in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let m = invalid(with_params(RopeParams { base, ..params() }).check());
        assert_eq!(m, format!("rope: base must be finite and > 0, got {base}"));
    }
}

#[test]
fn a_frequency_scale_that_is_not_finite_and_positive_is_rejected() {
    let m = invalid(
        with_params(RopeParams {
            freq_scale: 0.0,
            ..params()
        })
        .check(),
    );
    assert_eq!(m, "rope: freq_scale must be finite and > 0, got 0");
}

#[test]
fn a_short_input_is_rejected() {
    let m = invalid(
        RopeArgs {
            x_bytes: 4,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "rope: x needs 1024 f32 elements (4096 bytes), its buffer has 4 bytes"
    );
}

#[test]
fn a_short_output_is_rejected() {
    let m = invalid(
        RopeArgs {
            out_bytes: 4092,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "rope: out needs 1024 f32 elements (4096 bytes), its buffer has 4092 bytes"
    );
}

#[test]
fn short_positions_are_rejected() {
    let m = invalid(
        RopeArgs {
            positions_bytes: 4,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "rope: positions needs 2 i32 elements (8 bytes), its buffer has 4 bytes"
    );
}

#[test]
fn short_frequency_factors_are_rejected() {
    let m = invalid(
        RopeArgs {
            freq_factors_bytes: Some(31 * 4),
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "rope: freq_factors needs 32 f32 elements (128 bytes), its buffer has 124 bytes"
    );
}

#[test]
fn a_negative_norm_epsilon_is_rejected() {
    let m = invalid(
        RopeArgs {
            norm: Some(HeadNorm {
                eps: -1e-6,
                weight_bytes: None,
            }),
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "head_norm_rope: eps must be finite and >= 0, got -0.000001"
    );
}

#[test]
fn a_short_norm_weight_is_rejected() {
    let m = invalid(
        RopeArgs {
            norm: Some(HeadNorm {
                eps: 1e-6,
                weight_bytes: Some(64 * 4),
            }),
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "head_norm_rope: weight needs 128 f32 elements (512 bytes), its buffer has 256 bytes"
    );
}

/// Normalised MSE allowed against the CPU: the GPU's powf and sincosf differ from
/// Rust's by an ulp or two, and an angle of p radians (positions up to 4096 here)
/// carries an absolute error of about p * 2^-23, so rotated values differ by up to
/// ~5e-4 relative at the largest positions.
const NMSE: f64 = 1e-6;

/// (head_dim, rotary_dim): full and partial rotary, small and large heads.
const HEADS: [(usize, usize); 4] = [(128, 128), (128, 64), (80, 80), (6, 4)];

#[test]
#[ignore = "needs a CUDA device"]
fn rope_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("rope_matches_cpu");
    for style in [RopeStyle::Normal, RopeStyle::NeoX] {
        for (head_dim, rotary_dim) in HEADS {
            for (n_tokens, n_heads) in [(1, 32), (7, 3), (64, 8)] {
                for with_ff in [false, true] {
                    let params = RopeParams {
                        head_dim,
                        rotary_dim,
                        base: 500000.0,
                        freq_scale: 0.25,
                        style,
                    };
                    let n = n_tokens * n_heads * head_dim;
                    let mut g = Graph::new();
                    let x = g
                        .persistent("x", DType::F32, &[n_tokens, n_heads, head_dim])
                        .unwrap();
                    let pos = g.persistent("pos", DType::I32, &[n_tokens]).unwrap();
                    let ff =
                        with_ff.then(|| g.persistent("ff", DType::F32, &[rotary_dim / 2]).unwrap());
                    let out = g
                        .persistent("out", DType::F32, &[n_tokens, n_heads, head_dim])
                        .unwrap();
                    g.push(Rope {
                        x,
                        positions: pos,
                        freq_factors: ff,
                        out,
                        n_tokens,
                        n_heads,
                        params,
                    })
                    .unwrap();
                    let positions: Vec<i32> = (0..n_tokens)
                        .map(|_| rand::Rng::random_range(&mut rng, 0..4096))
                        .collect();
                    let mut inputs = vec![
                        (x, f32_bytes(&uniform(&mut rng, n, 2.0))),
                        (pos, i32_bytes(&positions)),
                    ];
                    if let Some(ff) = ff {
                        let factors: Vec<f32> = uniform(&mut rng, rotary_dim / 2, 4.0)
                            .iter()
                            .map(|v| 1.0 + v.abs())
                            .collect();
                        inputs.push((ff, f32_bytes(&factors)));
                    }
                    let want =
                        f32s(&run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
                    let got = f32s(&run_on(cuda, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
                    assert_close(
                        &format!("rope {style:?} {n_tokens}x{n_heads}x{head_dim} rotary {rotary_dim} ff={with_ff}"),
                        &got,
                        &want,
                        NMSE,
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn head_norm_rope_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("head_norm_rope_matches_cpu");
    for style in [RopeStyle::Normal, RopeStyle::NeoX] {
        for (head_dim, rotary_dim) in HEADS {
            for (n_tokens, n_heads) in [(1, 32), (7, 3), (64, 8)] {
                for with_weight in [false, true] {
                    let params = RopeParams {
                        head_dim,
                        rotary_dim,
                        base: 1000000.0,
                        freq_scale: 1.0,
                        style,
                    };
                    let n = n_tokens * n_heads * head_dim;
                    let mut g = Graph::new();
                    let x = g
                        .persistent("x", DType::F32, &[n_tokens, n_heads, head_dim])
                        .unwrap();
                    let w =
                        with_weight.then(|| g.persistent("w", DType::F32, &[head_dim]).unwrap());
                    let pos = g.persistent("pos", DType::I32, &[n_tokens]).unwrap();
                    let ff = g.persistent("ff", DType::F32, &[rotary_dim / 2]).unwrap();
                    let out = g
                        .persistent("out", DType::F32, &[n_tokens, n_heads, head_dim])
                        .unwrap();
                    g.push(HeadNormRope {
                        x,
                        weight: w,
                        positions: pos,
                        freq_factors: Some(ff),
                        out,
                        n_tokens,
                        n_heads,
                        eps: 1e-6,
                        params,
                    })
                    .unwrap();
                    let positions: Vec<i32> = (0..n_tokens)
                        .map(|_| rand::Rng::random_range(&mut rng, 0..4096))
                        .collect();
                    let factors: Vec<f32> = uniform(&mut rng, rotary_dim / 2, 4.0)
                        .iter()
                        .map(|v| 1.0 + v.abs())
                        .collect();
                    let mut inputs = vec![
                        (x, f32_bytes(&uniform(&mut rng, n, 3.0))),
                        (pos, i32_bytes(&positions)),
                        (ff, f32_bytes(&factors)),
                    ];
                    if let Some(w) = w {
                        inputs.push((w, f32_bytes(&uniform(&mut rng, head_dim, 1.5))));
                    }
                    let want =
                        f32s(&run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
                    let got = f32s(&run_on(cuda, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
                    assert_close(
                        &format!("head_norm_rope {style:?} {n_tokens}x{n_heads}x{head_dim} rotary {rotary_dim} weight={with_weight}"),
                        &got,
                        &want,
                        NMSE,
                    );
                }
            }
        }
    }
}

/// A valid qkv_rope_append: 2 tokens of 4 query and 2 KV heads of 128, F16 caches of 9
/// positions, with a norm.
fn qkv_args() -> QkvRopeArgs {
    QkvRopeArgs {
        n_tokens: 2,
        n_heads: 4,
        n_kv_heads: 2,
        capacity: 9,
        n_slots: 1,
        params: params(),
        cache: DType::F16,
        norm: Some((1e-6, 128 * 4, 128 * 4)),
        qkv_bytes: 2 * 8 * 128 * 4,
        positions_bytes: 2 * 4,
        slots_bytes: None,
        freq_factors_bytes: None,
        q_out_bytes: 2 * 4 * 128 * 4,
        k_cache_bytes: 2 * 9 * 128 * 2,
        v_cache_bytes: 2 * 9 * 128 * 2,
    }
}

#[test]
fn qkv_rope_append_runs_a_warp_per_head_and_checks_its_operands() {
    let plan = qkv_args().check().unwrap();
    assert_eq!(plan.spec.key, "qkv_rope_append|style=neox|cache=f16");
    assert_eq!(
        plan.config.grid_dim,
        (4, 1, 1),
        "16 heads (2 tokens x 8), 4 warps per block"
    );
    let cases = [
        (
            QkvRopeArgs {
                qkv_bytes: 2 * 8 * 128 * 4 - 4,
                ..qkv_args()
            },
            "qkv_rope_append: qkv needs 2048 f32 elements (8192 bytes), its buffer has 8188 bytes",
        ),
        (
            QkvRopeArgs {
                v_cache_bytes: 2 * 9 * 128 * 2 - 2,
                ..qkv_args()
            },
            "qkv_rope_append: v_cache needs 2304 f16 elements (4608 bytes), its buffer has 4606 bytes",
        ),
        (
            QkvRopeArgs {
                cache: DType::BF16,
                ..qkv_args()
            },
            "qkv_rope_append: cache has dtype bf16, expected one of [f32, f16]",
        ),
        (
            QkvRopeArgs {
                norm: Some((-1.0, 512, 512)),
                ..qkv_args()
            },
            "qkv_rope_append: eps must be finite and >= 0, got -1",
        ),
        (
            QkvRopeArgs {
                norm: Some((1e-6, 512, 508)),
                ..qkv_args()
            },
            "qkv_rope_append: k norm weight needs 128 f32 elements (512 bytes), its buffer has 508 bytes",
        ),
        (
            QkvRopeArgs {
                n_kv_heads: 0,
                ..qkv_args()
            },
            "qkv_rope_append: n_kv_heads must be > 0, got 0",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(invalid(args.check()), want);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn qkv_rope_append_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("qkv_rope_append_matches_cpu");
    // (n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, capacity)
    let shapes = [
        (1, 32, 8, 128, 128, 4096),
        (1, 16, 8, 128, 128, 33),
        (5, 6, 3, 80, 32, 11),
        (37, 4, 2, 64, 64, 64),
        (3, 2, 1, 6, 4, 7),
    ];
    // One slot, and three with slot ids (the tokens of several sequences).
    let cases = [1, 3]
        .into_iter()
        .flat_map(|n_slots| shapes.iter().map(move |&shape| (n_slots, shape)));
    for (n_slots, (t, nh, nkv, hd, rot, cap)) in cases {
        for style in [RopeStyle::Normal, RopeStyle::NeoX] {
            for (with_norm, with_ff, cache) in [
                (false, true, DType::F32),
                (true, false, DType::F16),
                (false, false, DType::F16),
            ] {
                let p = RopeParams {
                    head_dim: hd,
                    rotary_dim: rot,
                    base: 500000.0,
                    freq_scale: 0.5,
                    style,
                };
                let heads = nh + 2 * nkv;
                let mut g = Graph::new();
                let mut buf =
                    |name: &str, dtype, shape: &[usize]| g.persistent(name, dtype, shape).unwrap();
                let qkv = buf("qkv", DType::F32, &[t, heads, hd]);
                let pos = buf("pos", DType::I32, &[t]);
                let ff = with_ff.then(|| buf("ff", DType::F32, &[rot / 2]));
                let norm = with_norm.then(|| QkNorm {
                    q_weight: buf("qw", DType::F32, &[hd]),
                    k_weight: buf("kw", DType::F32, &[hd]),
                    eps: 1e-6,
                });
                let q_out = buf("q_out", DType::F32, &[t, nh, hd]);
                let slots = (n_slots > 1).then(|| buf("slots", DType::I32, &[t]));
                let k_cache = buf("k", cache, &[n_slots, nkv, cap, hd]);
                let v_cache = buf("v", cache, &[n_slots, nkv, cap, hd]);
                g.push(QkvRopeAppend {
                    qkv,
                    positions: pos,
                    slots,
                    freq_factors: ff,
                    norm,
                    q_out,
                    k_cache,
                    v_cache,
                    n_tokens: t,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    capacity: cap,
                    n_slots,
                    params: p,
                })
                .unwrap();
                // Positions in range; with several tokens the last repeats the first's,
                // whose row the last must win.
                let mut positions: Vec<i32> = (0..t)
                    .map(|_| rand::Rng::random_range(&mut rng, 0..cap as i32))
                    .collect();
                let mut slot_ids: Vec<i32> = (0..t)
                    .map(|_| rand::Rng::random_range(&mut rng, 0..n_slots as i32))
                    .collect();
                if t > 1 {
                    positions[t - 1] = positions[0];
                    slot_ids[t - 1] = slot_ids[0];
                }
                let cache_len = n_slots * nkv * cap * hd;
                let cache_bytes = cache.bytes_for(cache_len).unwrap();
                let old: Vec<u8> = match cache {
                    DType::F16 => uniform(&mut rng, cache_len, 1.0)
                        .iter()
                        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                        .collect(),
                    _ => f32_bytes(&uniform(&mut rng, cache_len, 1.0)),
                };
                let mut inputs = vec![
                    (qkv, f32_bytes(&uniform(&mut rng, t * heads * hd, 2.0))),
                    (pos, i32_bytes(&positions)),
                    (k_cache, old.clone()),
                    (v_cache, old),
                ];
                if let Some(slots) = slots {
                    inputs.push((slots, i32_bytes(&slot_ids)));
                }
                if let Some(ff) = ff {
                    let f: Vec<f32> = uniform(&mut rng, rot / 2, 4.0)
                        .iter()
                        .map(|v| 1.0 + v.abs())
                        .collect();
                    inputs.push((ff, f32_bytes(&f)));
                }
                if let Some(n) = norm {
                    inputs.push((n.q_weight, f32_bytes(&uniform(&mut rng, hd, 1.5))));
                    inputs.push((n.k_weight, f32_bytes(&uniform(&mut rng, hd, 1.5))));
                }
                let outs = [q_out, k_cache, v_cache];
                let want = run_on(&CpuBackend, &g, &inputs, &outs, Aliasing::On).unwrap();
                let got = run_on(cuda, &g, &inputs, &outs, Aliasing::On).unwrap();
                let what = format!(
                    "qkv_rope_append {style:?} t={t} {nh}/{nkv}x{hd} rot={rot} cap={cap} slots={n_slots} norm={with_norm} ff={with_ff} {cache}"
                );
                assert_close(&format!("{what} q"), &f32s(&got[0]), &f32s(&want[0]), NMSE);
                let values = |b: &[u8]| -> Vec<f32> {
                    match cache {
                        DType::F16 => b
                            .chunks_exact(2)
                            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                            .collect(),
                        _ => f32s(b),
                    }
                };
                assert_eq!(got[1].len(), cache_bytes);
                assert_close(
                    &format!("{what} k"),
                    &values(&got[1]),
                    &values(&want[1]),
                    NMSE,
                );
                // Values are copied (and rounded the same way): exact.
                assert_eq!(got[2], want[2], "{what}: v cache");
            }
        }
    }
}
