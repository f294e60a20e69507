//! RmsNorm and AddRmsNorm on the GPU against the CPU reference (kiln-cpu), with their
//! Q8_1 copies of `out` where the row length is a multiple of 32.

mod common;
use common::*;
use kiln_core::ops::{AddRmsNorm, RmsNorm, Q8_COPY};
use kiln_core::{Aliasing, DType, Graph};
use kiln_cpu::CpuBackend;

/// (rows, dim): single elements, odd and round widths, wider than one block.
const SHAPES: [(usize, usize); 7] = [
    (1, 1),
    (1, 7),
    (3, 1023),
    (5, 4096),
    (2, 4097),
    (64, 8192),
    (7, 131),
];

/// Normalised MSE allowed against the CPU's f32 results: the sum of squares is
/// accumulated in another order (a tree on the GPU, a sequence on the CPU), which
/// moves the scale by a few ulp of f32.
const NMSE: f64 = 1e-11;

#[test]
#[ignore = "needs a CUDA device"]
fn rms_norm_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("rms_norm_matches_cpu");
    for (rows, dim) in SHAPES {
        for with_weight in [false, true] {
            let mut g = Graph::new();
            let x = g.persistent("x", DType::F32, &[rows, dim]).unwrap();
            let w = with_weight.then(|| g.persistent("w", DType::F32, &[dim]).unwrap());
            let out = g.persistent("out", DType::F32, &[rows, dim]).unwrap();
            let out_q8 =
                (dim % 32 == 0).then(|| g.persistent("q8", Q8_COPY, &[rows, dim]).unwrap());
            let eps = 1e-5;
            g.push(RmsNorm {
                x,
                weight: w,
                out,
                out_q8,
                rows,
                dim,
                eps,
            })
            .unwrap();
            let mut inputs = vec![(x, f32_bytes(&uniform(&mut rng, rows * dim, 3.0)))];
            if let Some(w) = w {
                inputs.push((w, f32_bytes(&uniform(&mut rng, dim, 1.5))));
            }
            let outputs: Vec<_> = std::iter::once(out).chain(out_q8).collect();
            let want = f32s(&run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
            let got = run_on(cuda, &g, &inputs, &outputs, Aliasing::On).unwrap();
            let what = format!("rms_norm {rows}x{dim} weight={with_weight}");
            assert_close(&what, &f32s(&got[0]), &want, NMSE);
            if out_q8.is_some() {
                assert_q8_copy(&what, &got[0], &got[1]);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn add_rms_norm_matches_cpu_and_stores_the_exact_sum() {
    let cuda = cuda();
    let mut rng = rng("add_rms_norm_matches_cpu");
    for (rows, dim) in SHAPES {
        for with_weight in [false, true] {
            let mut g = Graph::new();
            let x = g.persistent("x", DType::F32, &[rows, dim]).unwrap();
            let r = g.persistent("residual", DType::F32, &[rows, dim]).unwrap();
            let w = with_weight.then(|| g.persistent("w", DType::F32, &[dim]).unwrap());
            let sum = g.persistent("sum", DType::F32, &[rows, dim]).unwrap();
            let out = g.persistent("out", DType::F32, &[rows, dim]).unwrap();
            let out_q8 =
                (dim % 32 == 0).then(|| g.persistent("q8", Q8_COPY, &[rows, dim]).unwrap());
            let eps = 1e-6;
            g.push(AddRmsNorm {
                x,
                residual: r,
                weight: w,
                sum,
                out,
                out_q8,
                rows,
                dim,
                eps,
            })
            .unwrap();
            let mut inputs = vec![
                (x, f32_bytes(&uniform(&mut rng, rows * dim, 3.0))),
                (r, f32_bytes(&uniform(&mut rng, rows * dim, 1.0))),
            ];
            if let Some(w) = w {
                inputs.push((w, f32_bytes(&uniform(&mut rng, dim, 1.5))));
            }
            let want = run_on(&CpuBackend, &g, &inputs, &[sum, out], Aliasing::On).unwrap();
            let outputs: Vec<_> = [sum, out].into_iter().chain(out_q8).collect();
            let got = run_on(cuda, &g, &inputs, &outputs, Aliasing::On).unwrap();
            let what = format!("add_rms_norm {rows}x{dim} weight={with_weight}");
            // One f32 addition per element, rounded the same on both sides.
            assert_eq!(f32s(&got[0]), f32s(&want[0]), "{what}: sum");
            assert_close(&what, &f32s(&got[1]), &f32s(&want[1]), NMSE);
            if out_q8.is_some() {
                assert_q8_copy(&what, &got[1], &got[2]);
            }
        }
    }
}
