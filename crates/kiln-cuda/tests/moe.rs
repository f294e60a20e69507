//! The mixture-of-experts router and combine: the dispatch checks (no GPU needed) and
//! parity with kiln-cpu on the GPU.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{Gating, MoeCombine, MoeRouter};
use kiln_core::{Aliasing, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::moe::{CombineArgs, RouterArgs, MAX_EXPERTS};

fn router() -> RouterArgs {
    RouterArgs {
        m: 3,
        n_expert: 128,
        k: 8,
        gating: Gating::Softmax,
        normalize: true,
        logits_bytes: 3 * 128 * 4,
        ids_bytes: 3 * 8 * 4,
        weights_bytes: 3 * 8 * 4,
    }
}

fn combine() -> CombineArgs {
    CombineArgs {
        m: 2,
        k: 3,
        n: 5,
        y_bytes: 2 * 3 * 5 * 4,
        weights_bytes: 2 * 3 * 4,
        residual_bytes: None,
        shared_bytes: Some(40),
        shared_gate_bytes: Some(8),
        out_bytes: 40,
    }
}

#[test]
fn a_router_runs_one_block_per_token_with_its_probabilities_in_shared_memory() {
    let plan = router().check().unwrap();
    assert_eq!(plan.spec.key, "moe_router|gating=softmax");
    assert_eq!(plan.config.grid_dim, (3, 1, 1));
    assert_eq!(plan.config.shared_mem_bytes, 128 * 5);
    let plan = RouterArgs {
        gating: Gating::Sigmoid,
        ..router()
    }
    .check()
    .unwrap();
    assert_eq!(plan.spec.name_expression, "kiln::moe_router<true>");
}

#[test]
fn router_arguments_out_of_range_are_rejected() {
    let m = invalid(RouterArgs { k: 129, ..router() }.check());
    assert_eq!(
        m,
        "moe_router: k = 129 experts per token exceeds n_expert = 128"
    );
    let m = invalid(RouterArgs { k: 0, ..router() }.check());
    assert_eq!(m, "moe_router: k must be > 0, got 0");
    let n_expert = MAX_EXPERTS + 1;
    let m = invalid(
        RouterArgs {
            n_expert,
            logits_bytes: 3 * n_expert * 4,
            ..router()
        }
        .check(),
    );
    assert!(m.contains("exceeds the kernel's 8192"), "{m}");
    let m = invalid(
        RouterArgs {
            logits_bytes: 100,
            ..router()
        }
        .check(),
    );
    assert!(m.starts_with("moe_router: logits needs 384 f32"), "{m}");
    let m = invalid(
        RouterArgs {
            ids_bytes: 95,
            ..router()
        }
        .check(),
    );
    assert!(m.starts_with("moe_router: ids needs 24 i32"), "{m}");
    let m = invalid(
        RouterArgs {
            weights_bytes: 0,
            ..router()
        }
        .check(),
    );
    assert!(m.starts_with("moe_router: weights needs 24 f32"), "{m}");
}

#[test]
fn combine_arguments_are_checked() {
    let plan = combine().check().unwrap();
    assert_eq!(plan.spec.key, "moe_combine|x=f32");
    let m = invalid(
        CombineArgs {
            shared_bytes: None,
            ..combine()
        }
        .check(),
    );
    assert_eq!(
        m,
        "moe_combine: shared_gate is given without a shared expert output"
    );
    let m = invalid(
        CombineArgs {
            y_bytes: 119,
            ..combine()
        }
        .check(),
    );
    assert!(m.starts_with("moe_combine: y needs 30 f32"), "{m}");
    let m = invalid(
        CombineArgs {
            residual_bytes: Some(39),
            ..combine()
        }
        .check(),
    );
    assert!(m.starts_with("moe_combine: residual needs 10 f32"), "{m}");
    let m = invalid(
        CombineArgs {
            shared_gate_bytes: Some(4),
            ..combine()
        }
        .check(),
    );
    assert!(m.starts_with("moe_combine: shared_gate needs 2 f32"), "{m}");
    let m = invalid(CombineArgs { n: 0, ..combine() }.check());
    assert_eq!(m, "moe_combine: n must be > 0, got 0");
}

#[test]
#[ignore = "needs a CUDA device"]
fn moe_router_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("moe_router_matches_cpu");
    // Decode and prompt token counts, odd expert counts, Qwen3-MoE's 128 choose 8.
    for (m, n_expert, k) in [(1, 128, 8), (7, 60, 4), (33, 8, 2), (5, 5, 5), (2, 1000, 3)] {
        for gating in [Gating::Softmax, Gating::Sigmoid] {
            for normalize in [false, true] {
                let mut g = Graph::new();
                let logits = g.persistent("logits", DType::F32, &[m, n_expert]).unwrap();
                let ids = g.persistent("ids", DType::I32, &[m, k]).unwrap();
                let weights = g.persistent("weights", DType::F32, &[m, k]).unwrap();
                g.push(MoeRouter {
                    logits,
                    ids,
                    weights,
                    m,
                    n_expert,
                    k,
                    gating,
                    normalize,
                })
                .unwrap();
                let inputs = [(logits, f32_bytes(&ladder_logits(&mut rng, m, n_expert)))];
                let outs = [ids, weights];
                let want = run_on(&CpuBackend, &g, &inputs, &outs, Aliasing::On).unwrap();
                let got = run_on(cuda, &g, &inputs, &outs, Aliasing::On).unwrap();
                let what =
                    format!("moe_router m={m} E={n_expert} k={k} {gating:?} norm={normalize}");
                assert_eq!(i32s(&got[0]), i32s(&want[0]), "{what}: experts");
                // expf and the sum's order differ from the CPU's by ulps.
                assert_close(&what, &f32s(&got[1]), &f32s(&want[1]), 1e-12);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn moe_router_ties_and_nan_match_cpu() {
    let cuda = cuda();
    let mut g = Graph::new();
    let logits = g.persistent("logits", DType::F32, &[3, 5]).unwrap();
    let ids = g.persistent("ids", DType::I32, &[3, 3]).unwrap();
    let weights = g.persistent("weights", DType::F32, &[3, 3]).unwrap();
    g.push(MoeRouter {
        logits,
        ids,
        weights,
        m: 3,
        n_expert: 5,
        k: 3,
        gating: Gating::Sigmoid,
        normalize: false,
    })
    .unwrap();
    let nan = f32::NAN;
    let lv = [
        1.0, 2.0, 2.0, 0.5, 2.0, nan, 1.0, nan, 3.0, nan, nan, nan, nan, nan, nan,
    ];
    let inputs = [(logits, f32_bytes(&lv))];
    let want = run_on(&CpuBackend, &g, &inputs, &[ids], Aliasing::On).unwrap();
    let got = run_on(cuda, &g, &inputs, &[ids], Aliasing::On).unwrap();
    assert_eq!(i32s(&want[0]), [1, 2, 4, 3, 1, 0, 0, 1, 2]);
    assert_eq!(i32s(&got[0]), i32s(&want[0]));
}

#[test]
#[ignore = "needs a CUDA device"]
fn moe_combine_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("moe_combine_matches_cpu");
    for (m, k, n) in [(1, 8, 2048), (7, 3, 33), (64, 2, 100)] {
        for (residual, shared, gate) in [
            (false, false, false),
            (true, false, false),
            (false, true, true),
            (true, true, false),
        ] {
            let mut g = Graph::new();
            let y = g.persistent("y", DType::F32, &[m, k, n]).unwrap();
            let weights = g.persistent("weights", DType::F32, &[m, k]).unwrap();
            let mut opt = |on: bool, name: &str, shape: &[usize]| {
                on.then(|| g.persistent(name, DType::F32, shape).unwrap())
            };
            let residual = opt(residual, "residual", &[m, n]);
            let shared = opt(shared, "shared", &[m, n]);
            let shared_gate = opt(gate, "shared_gate", &[m]);
            let out = g.persistent("out", DType::F32, &[m, n]).unwrap();
            g.push(MoeCombine {
                y,
                weights,
                residual,
                shared,
                shared_gate,
                out,
                m,
                k,
                n,
            })
            .unwrap();
            let mut inputs = vec![
                (y, f32_bytes(&uniform(&mut rng, m * k * n, 2.0))),
                (weights, f32_bytes(&uniform(&mut rng, m * k, 1.0))),
            ];
            for (id, len) in [(residual, m * n), (shared, m * n), (shared_gate, m)] {
                if let Some(id) = id {
                    inputs.push((id, f32_bytes(&uniform(&mut rng, len, 3.0))));
                }
            }
            let want = f32s(&run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
            let got = f32s(&run_on(cuda, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
            let what = format!(
                "moe_combine m={m} k={k} n={n} residual={} shared={} gate={gate}",
                residual.is_some(),
                shared.is_some()
            );
            // Fused multiply-adds and expf round differently from the CPU by ulps.
            assert_close(&what, &got, &want, 1e-12);
        }
    }
}
