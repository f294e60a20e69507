//! Softmax: the dispatch checks (no GPU needed) and parity with kiln-cpu on the GPU.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::Softmax;
use kiln_core::{Aliasing, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::softmax::SoftmaxArgs;

fn args() -> SoftmaxArgs {
    SoftmaxArgs {
        rows: 4,
        cols: 100,
        scale: 0.125,
        causal_offset: Some(50),
        x_bytes: 1600,
        out_bytes: 1600,
    }
}

#[test]
fn a_masked_softmax_runs_the_causal_kernel_one_block_per_row() {
    let plan = args().check().unwrap();
    assert_eq!(plan.spec.key, "softmax|causal=1");
    assert_eq!(plan.config.grid_dim, (4, 1, 1));
    let plan = SoftmaxArgs {
        causal_offset: None,
        ..args()
    }
    .check()
    .unwrap();
    assert_eq!(plan.spec.name_expression, "kiln::softmax<false>");
}

#[test]
fn zero_rows_are_rejected() {
    assert_eq!(
        invalid(SoftmaxArgs { rows: 0, ..args() }.check()),
        "softmax: rows must be > 0, got 0"
    );
}

#[test]
fn zero_columns_are_rejected() {
    assert_eq!(
        invalid(SoftmaxArgs { cols: 0, ..args() }.check()),
        "softmax: cols must be > 0, got 0"
    );
}

#[test]
fn a_scale_that_is_not_finite_is_rejected() {
    let m = invalid(
        SoftmaxArgs {
            scale: f32::INFINITY,
            ..args()
        }
        .check(),
    );
    assert_eq!(m, "softmax: scale must be finite, got inf");
}

#[test]
fn a_short_input_is_rejected() {
    let m = invalid(
        SoftmaxArgs {
            x_bytes: 1599,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "softmax: x needs 400 f32 elements (1600 bytes), its buffer has 1599 bytes"
    );
}

#[test]
fn a_short_output_is_rejected() {
    let m = invalid(
        SoftmaxArgs {
            out_bytes: 0,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "softmax: out needs 400 f32 elements (1600 bytes), its buffer has 0 bytes"
    );
}

/// Normalised MSE allowed: the max and the sum reduce in another order and expf
/// differs from Rust's exp by an ulp or two.
const NMSE: f64 = 1e-10;

#[test]
#[ignore = "needs a CUDA device"]
fn softmax_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("softmax_matches_cpu");
    for (rows, cols) in [(1, 1), (3, 7), (32, 4096), (5, 32001), (17, 1000)] {
        for causal_offset in [None, Some(0), Some(cols / 2)] {
            let mut g = Graph::new();
            let x = g.persistent("x", DType::F32, &[rows, cols]).unwrap();
            let out = g.persistent("out", DType::F32, &[rows, cols]).unwrap();
            g.push(Softmax {
                x,
                out,
                rows,
                cols,
                scale: 0.3,
                causal_offset,
            })
            .unwrap();
            let inputs = [(x, f32_bytes(&uniform(&mut rng, rows * cols, 10.0)))];
            let want = f32s(&run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
            let got = f32s(&run_on(cuda, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
            assert_close(
                &format!("softmax {rows}x{cols} causal {causal_offset:?}"),
                &got,
                &want,
                NMSE,
            );
        }
    }
}
