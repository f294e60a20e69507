//! The mixture-of-experts router, expert-routed product and combine: the dispatch
//! checks (no GPU needed) and parity with kiln-cpu on the GPU.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{Gating, MoeCombine, MoeMatMul, MoeRouter};
use kiln_core::{Aliasing, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::matmul::MatMulKernel;
use kiln_cuda::ops::moe::{CombineArgs, MoeMatMulArgs, MoeMatMulKernel, RouterArgs, MAX_EXPERTS};

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

/// Qwen3-30B-A3B's gate projection for one decode token: 8 of 128 experts of 768 x 2048.
fn routed() -> MoeMatMulArgs {
    MoeMatMulArgs {
        weight: DType::Q4_0,
        m: 1,
        k: 8,
        n_expert: 128,
        rows: 768,
        cols: 2048,
        per_slot: false,
        x_bytes: 2048 * 4,
        ids_bytes: 8 * 4,
        w_bytes: 128 * 768 * 2048 / 32 * 18,
        w_packed: Some((DType::Q4_0, 2048)),
        out_bytes: 8 * 768 * 4,
    }
}

#[test]
fn a_routed_product_runs_the_one_row_mat_vec_per_slot() {
    let plan = routed().check().unwrap();
    // Packed Q4_0: matvec_packed's blocks of 8 warps of one row each, one grid row
    // per slot.
    assert_eq!(
        plan.kernel,
        MoeMatMulKernel::MatVec(MatMulKernel::MatVecPacked {
            m_tier: 1,
            rows: 1,
            aligned: true
        })
    );
    assert!(plan.group.is_none());
    assert_eq!(plan.spec.key, "moe_matvec_packed|w=q4_0|rows=1|aligned=1");
    assert_eq!(
        plan.spec.name_expression,
        "kiln::moe_matvec_packed<kiln::Q4_0, 1, true>"
    );
    assert_eq!(plan.config.grid_dim, (96, 8, 1));
    // The down projection of a 3-token prompt chunk: per-slot inputs, staged F16.
    let plan = MoeMatMulArgs {
        weight: DType::F16,
        m: 3,
        rows: 2048,
        cols: 768,
        per_slot: true,
        x_bytes: 3 * 8 * 768 * 4,
        ids_bytes: 3 * 8 * 4,
        w_bytes: 128 * 2048 * 768 * 2,
        w_packed: None,
        out_bytes: 3 * 8 * 2048 * 4,
        ..routed()
    }
    .check()
    .unwrap();
    assert!(
        plan.spec.key.starts_with("moe_matvec|w=f16|"),
        "{}",
        plan.spec.key
    );
    assert_eq!(plan.config.grid_dim.1, 24);
}

#[test]
fn a_routed_product_of_a_prompt_groups_the_slots_by_expert_into_tiles() {
    // pp512's gate projection: 4096 slots in tiles of 64, at most one partial tile for
    // each of the 128 experts.
    let plan = MoeMatMulArgs {
        m: 512,
        x_bytes: 512 * 2048 * 4,
        ids_bytes: 512 * 8 * 4,
        out_bytes: 512 * 8 * 768 * 4,
        ..routed()
    }
    .check()
    .unwrap();
    assert_eq!(
        plan.kernel,
        MoeMatMulKernel::Grouped {
            max_tiles: 64 + 128
        }
    );
    assert_eq!(plan.spec.key, "moe_matmul|w=q4_0");
    assert_eq!(plan.config.grid_dim, (768 / 64, 192, 1));
    let (group, config) = plan.group.clone().unwrap();
    assert_eq!(group.key, "moe_group|ids=i32");
    assert_eq!(
        (config.grid_dim, config.shared_mem_bytes),
        ((1, 1, 1), 128 * 8)
    );
    let keys: Vec<String> = plan.specs().into_iter().map(|s| s.key).collect();
    assert_eq!(keys, ["moe_group|ids=i32", "moe_matmul|w=q4_0"]);
    // 9 tokens of 2 slots of 2 experts: 18 slots, at most 1 whole tile's worth plus a
    // partial tile per expert.
    let plan = MoeMatMulArgs {
        m: 9,
        k: 2,
        n_expert: 2,
        x_bytes: 9 * 2048 * 4,
        ids_bytes: 9 * 2 * 4,
        w_bytes: 2 * 768 * 2048 / 32 * 18,
        out_bytes: 9 * 2 * 768 * 4,
        ..routed()
    }
    .check()
    .unwrap();
    assert_eq!(plan.kernel, MoeMatMulKernel::Grouped { max_tiles: 3 });
}

#[test]
fn routed_product_arguments_out_of_range_are_rejected() {
    let m = invalid(MoeMatMulArgs { k: 129, ..routed() }.check());
    assert_eq!(
        m,
        "moe_matmul: k = 129 experts per token exceeds n_expert = 128"
    );
    let m = invalid(
        MoeMatMulArgs {
            rows: 0,
            ..routed()
        }
        .check(),
    );
    assert_eq!(m, "moe_matmul: rows must be > 0, got 0");
    let m = invalid(
        MoeMatMulArgs {
            cols: 2047,
            ..routed()
        }
        .check(),
    );
    assert!(
        m.contains("cols 2047 is not a multiple of q4_0's block size 32"),
        "{m}"
    );
    // One expert's bytes short.
    let m = invalid(
        MoeMatMulArgs {
            w_bytes: 127 * 768 * 2048 / 32 * 18,
            ..routed()
        }
        .check(),
    );
    assert!(m.starts_with("moe_matmul: w"), "{m}");
    let m = invalid(
        MoeMatMulArgs {
            ids_bytes: 28,
            ..routed()
        }
        .check(),
    );
    assert!(m.starts_with("moe_matmul: ids"), "{m}");
    // Per-slot inputs need a row per slot.
    let m = invalid(
        MoeMatMulArgs {
            per_slot: true,
            ..routed()
        }
        .check(),
    );
    assert!(m.starts_with("moe_matmul: x"), "{m}");
    let m = invalid(
        MoeMatMulArgs {
            out_bytes: 4,
            ..routed()
        }
        .check(),
    );
    assert!(m.starts_with("moe_matmul: out"), "{m}");
    // A packed dtype uploaded as plain bytes.
    let m = invalid(
        MoeMatMulArgs {
            w_packed: None,
            ..routed()
        }
        .check(),
    );
    assert!(m.contains("upload_weight"), "{m}");
    // More tiles of slots than a grid has rows.
    let m = invalid(
        MoeMatMulArgs {
            m: 600_000,
            ids_bytes: 600_000 * 8 * 4,
            x_bytes: 600_000 * 2048 * 4,
            out_bytes: 600_000 * 8 * 768 * 4,
            ..routed()
        }
        .check(),
    );
    assert!(m.contains("tiles of slots"), "{m}");
}

/// A graph of one expert-routed product and its random inputs.
fn routed_case(
    rng: &mut rand::rngs::StdRng,
    dtype: DType,
    (m, k, n_expert, rows, cols): (usize, usize, usize, usize, usize),
    per_slot: bool,
    ids: Option<Vec<i32>>,
) -> (
    Graph,
    Vec<(kiln_core::BufferId, Vec<u8>)>,
    kiln_core::BufferId,
) {
    let mut g = Graph::new();
    let x_rows = if per_slot { m * k } else { m };
    let x = g.persistent("x", DType::F32, &[x_rows, cols]).unwrap();
    let ids_buf = g.persistent("ids", DType::I32, &[m, k]).unwrap();
    let w = g.persistent("w", dtype, &[n_expert, rows, cols]).unwrap();
    let out = g.persistent("out", DType::F32, &[m, k, rows]).unwrap();
    g.push(MoeMatMul {
        x,
        ids: ids_buf,
        w,
        out,
        m,
        k,
        n_expert,
        rows,
        cols,
        per_slot,
    })
    .unwrap();
    let ids = ids.unwrap_or_else(|| expert_ids(rng, m, k, n_expert));
    let inputs = vec![
        (x, f32_bytes(&uniform(rng, x_rows * cols, 1.0))),
        (ids_buf, i32_bytes(&ids)),
        (w, encoded(rng, dtype, n_expert * rows * cols)),
    ];
    (g, inputs, out)
}

#[test]
#[ignore = "needs a CUDA device"]
fn moe_matmul_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("moe_matmul_matches_cpu");
    // (m, k, n_expert, rows, cols): odd row and expert counts, tokens that leave
    // experts empty, in every weight dtype; then a decode token of Qwen3-30B-A3B's
    // expert shapes (gate/up and down; 16 of its 128 experts) in the formats it is
    // benchmarked in.
    let small = [(3, 2, 5, 37, 256), (7, 3, 9, 129, 512), (2, 1, 1, 5, 256)];
    // Prompts (the grouped mat-mat): experts with several tiles, one slot, or none.
    let prompts = [
        (37, 3, 9, 129, 512),
        (300, 8, 64, 70, 256),
        (9, 1, 1, 65, 256),
    ];
    let large = [(1, 8, 16, 768, 2048), (1, 8, 16, 2048, 768)];
    let cases = kiln_core::ops::WEIGHT_DTYPES
        .into_iter()
        .flat_map(|d| small.into_iter().chain(prompts).map(move |s| (d, s)))
        .chain(
            [DType::F16, DType::Q4_0, DType::Q4K]
                .into_iter()
                .flat_map(|d| large.map(|s| (d, s))),
        );
    for (dtype, shape) in cases {
        for per_slot in [false, true] {
            let (g, inputs, out) = routed_case(&mut rng, dtype, shape, per_slot, None);
            let want = f32s(&run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
            let got = f32s(&run_on(cuda, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
            let what =
                format!("moe_matmul {dtype} (m, k, E, rows, cols) {shape:?} per_slot={per_slot}");
            // The dense mat-vec's tolerance (the same f32 sums in another order) and the
            // mat-mat's (bf16 operands).
            let nmse = if shape.0 <= 8 { 1e-9 } else { 5e-5 };
            assert_close(&what, &got, &want, nmse);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn moe_matmul_gives_nan_rows_for_an_expert_id_out_of_range() {
    let cuda = cuda();
    let mut rng = rng("moe_matmul_gives_nan_rows_for_an_expert_id_out_of_range");
    let (m, k, n_expert, rows, cols) = (2, 2, 4, 70, 64);
    for dtype in [DType::Q4_0, DType::F16] {
        let ids = vec![1, 4, -1, 3];
        let (g, inputs, out) = routed_case(
            &mut rng,
            dtype,
            (m, k, n_expert, rows, cols),
            false,
            Some(ids),
        );
        // The CPU reference refuses the ids; the device marks the slots' rows.
        let e = run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap_err();
        assert!(
            e.to_string().contains("token 0 slot 1 chose expert 4"),
            "{e}"
        );
        let got = f32s(&run_on(cuda, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
        for (slot, row) in got.chunks(rows).enumerate() {
            let bad = slot == 1 || slot == 2;
            assert!(
                row.iter().all(|v| v.is_nan() == bad),
                "m={m} {dtype} slot {slot}: {:?}",
                &row[..4]
            );
        }
    }
}
