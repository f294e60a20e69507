//! Argmax: largest value, lowest index on ties, NaN never chosen.

mod common;
use common::*;
use kiln_core::ops::Argmax;
use kiln_core::DType::{F32, I32};

fn argmax_of(rows: usize, cols: usize, xv: &[f32]) -> Vec<i32> {
    let mut g = G::new();
    let x = g.p("x", F32, &[rows, cols]);
    let out = g.p("out", I32, &[rows]);
    g.g.push(Argmax { x, out, rows, cols }).unwrap();
    i32s(&run(&g.g, &[(x, f32_bytes(xv))], &[out])[0])
}

#[test]
fn argmax_finds_the_planted_maximum() {
    let mut rng = rng("argmax");
    for (rows, cols) in [(1, 1), (3, 7), (2, 151_936), (9, 1000)] {
        let mut xv = randn(&mut rng, rows * cols, 1.0);
        let mut want = Vec::new();
        for r in 0..rows {
            let at = (r * 7919 + 13) % cols;
            xv[r * cols + at] = 10.0 + r as f32;
            want.push(at as i32);
        }
        assert_eq!(argmax_of(rows, cols, &xv), want, "{rows}x{cols}");
    }
}

#[test]
fn argmax_ties_take_the_lowest_index_and_skip_nan() {
    let row = [1.0, 3.0, f32::NAN, 3.0, -2.0];
    assert_eq!(argmax_of(1, 5, &row), vec![1]);
    let row = [f32::NAN, -5.0, -1.0, f32::NAN];
    assert_eq!(argmax_of(1, 4, &row), vec![2]);
    let row = [f32::NAN, f32::NAN];
    assert_eq!(argmax_of(1, 2, &row), vec![0]);
}
