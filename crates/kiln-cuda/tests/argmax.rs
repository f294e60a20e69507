//! Argmax: the dispatch checks (no GPU needed) and parity with kiln-cpu on the GPU.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::Argmax;
use kiln_core::{Aliasing, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::argmax::ArgmaxArgs;

fn args() -> ArgmaxArgs {
    ArgmaxArgs {
        rows: 2,
        cols: 151_936,
        x_bytes: 2 * 151_936 * 4,
        out_bytes: 8,
    }
}

#[test]
fn argmax_runs_one_block_per_row() {
    let plan = args().check().unwrap();
    assert_eq!(plan.spec.key, "argmax|x=f32");
    assert_eq!(plan.config.grid_dim, (2, 1, 1));
}

#[test]
fn zero_rows_are_rejected() {
    assert_eq!(
        invalid(ArgmaxArgs { rows: 0, ..args() }.check()),
        "argmax: rows must be > 0, got 0"
    );
}

#[test]
fn zero_columns_are_rejected() {
    assert_eq!(
        invalid(ArgmaxArgs { cols: 0, ..args() }.check()),
        "argmax: cols must be > 0, got 0"
    );
}

#[test]
fn columns_beyond_an_i32_index_are_rejected() {
    let cols = i32::MAX as usize + 1;
    let m = invalid(
        ArgmaxArgs {
            rows: 1,
            cols,
            x_bytes: cols * 4,
            out_bytes: 4,
        }
        .check(),
    );
    assert_eq!(m, "argmax: cols 2147483648 does not fit an I32 index");
}

#[test]
fn a_short_input_is_rejected() {
    let m = invalid(
        ArgmaxArgs {
            x_bytes: 4,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "argmax: x needs 303872 f32 elements (1215488 bytes), its buffer has 4 bytes"
    );
}

#[test]
fn a_short_output_is_rejected() {
    let m = invalid(
        ArgmaxArgs {
            out_bytes: 4,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "argmax: out needs 2 i32 elements (8 bytes), its buffer has 4 bytes"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn argmax_matches_cpu_with_ties_and_nans() {
    let cuda = cuda();
    let mut rng = rng("argmax_matches_cpu_with_ties_and_nans");
    for (rows, cols) in [(1, 1), (3, 7), (4, 151_936), (2, 32_001)] {
        let mut x = uniform(&mut rng, rows * cols, 5.0);
        for row in x.chunks_mut(cols).skip(1) {
            // A NaN, and the row's maximum twice (the lower index must win).
            let last = row.len() - 1;
            row[0] = f32::NAN;
            let max = row.iter().copied().fold(f32::MIN, f32::max);
            row[last] = max;
            row[last / 2] = max;
        }
        if rows > 2 {
            x[2 * cols..3 * cols].fill(f32::NAN);
        }
        let mut g = Graph::new();
        let xb = g.persistent("x", DType::F32, &[rows, cols]).unwrap();
        let out = g.persistent("out", DType::I32, &[rows]).unwrap();
        g.push(Argmax {
            x: xb,
            out,
            rows,
            cols,
        })
        .unwrap();
        let inputs = [(xb, f32_bytes(&x))];
        let want = i32s(&run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
        let got = i32s(&run_on(cuda, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
        assert_eq!(got, want, "argmax {rows}x{cols}");
    }
}
