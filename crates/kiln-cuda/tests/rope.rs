//! Rope and HeadNormRope: the dispatch checks (no GPU needed) and parity with
//! kiln-cpu on the GPU.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{HeadNormRope, Rope, RopeParams, RopeStyle};
use kiln_core::{Aliasing, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::rope::{HeadNorm, RopeArgs};

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
