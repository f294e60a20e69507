//! A decode token's expert-routed product fused with the op after it (the gated unit
//! of the gate-up products, the weighted sum of the down products): which pairs of a
//! graph are fused (no GPU needed), and on the GPU, one launch whose outputs are the two
//! launches' bit for bit and kiln-cpu's within tolerance.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{ElementwiseKind, Glu, MoeCombine, MoeMatMul, Q8_COPY};
use kiln_core::{Aliasing, BufferId, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::fusion::Fusion;
use kiln_cuda::ops::moe_epilogue::RoutedFusions;

/// A routed product's shape: tokens, experts per token, experts, rows, columns.
type Shape = (usize, usize, usize, usize, usize);

/// Qwen3-30B-A3B's routed gate-up product of one decode token.
const QWEN3_30B_GATE_UP: Shape = (1, 8, 128, 1536, 2048);

/// Qwen3-30B-A3B's routed down product of one decode token.
const QWEN3_30B_DOWN: Shape = (1, 8, 128, 2048, 768);

/// The op after the routed product.
#[derive(Clone, Copy, Debug)]
enum Next {
    /// A Glu of this kind over every slot's row, with a Q8_1 copy when `copy`.
    Glu { kind: ElementwiseKind, copy: bool },
    /// The weighted sum of each token's slots, without residual or shared expert.
    Combine,
}

const SILU: Next = Next::Glu {
    kind: ElementwiseKind::SiluMul,
    copy: false,
};

/// The buffers of [`routed`]'s graph the caller binds or reads.
struct Routed {
    graph: Graph,
    x: BufferId,
    ids: BufferId,
    w: BufferId,
    /// The combine's weights.
    weights: Option<BufferId>,
    out: BufferId,
    next_out: BufferId,
}

/// The routed product of `shape` (over the tokens' rows of x before a Glu, the slots'
/// rows before a combine, as a decode step has them), then `next`. Everything the ops
/// write is persistent.
fn routed(dtype: DType, (m, k, n_expert, rows, cols): Shape, next: Next) -> Routed {
    let per_slot = matches!(next, Next::Combine);
    let mut g = Graph::new();
    let x_rows = if per_slot { m * k } else { m };
    let x = g.persistent("x", DType::F32, &[x_rows, cols]).unwrap();
    let ids = g.persistent("ids", DType::I32, &[m, k]).unwrap();
    let w = g.persistent("w", dtype, &[n_expert, rows, cols]).unwrap();
    let out = g.persistent("out", DType::F32, &[m, k, rows]).unwrap();
    g.push(MoeMatMul {
        x,
        ids,
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
    let (weights, next_out) = match next {
        Next::Glu { kind, copy } => {
            let half = rows / 2;
            let act = g.persistent("act", DType::F32, &[m * k, half]).unwrap();
            let act_q8 = copy.then(|| g.persistent("act_q8", Q8_COPY, &[m * k, half]).unwrap());
            g.push(Glu {
                kind,
                x: out,
                out: act,
                out_q8: act_q8,
                rows: m * k,
                n: half,
            })
            .unwrap();
            (None, act)
        }
        Next::Combine => {
            let weights = g.persistent("weights", DType::F32, &[m, k]).unwrap();
            let combined = g.persistent("combined", DType::F32, &[m, rows]).unwrap();
            g.push(MoeCombine {
                y: out,
                weights,
                residual: None,
                shared: None,
                shared_gate: None,
                out: combined,
                m,
                k,
                n: rows,
            })
            .unwrap();
            (Some(weights), combined)
        }
    };
    Routed {
        graph: g,
        x,
        ids,
        w,
        weights,
        out,
        next_out,
    }
}

/// Whether `fusible` finds a pair at `index` of `graph` with both kinds allowed.
fn fused(graph: &Graph, index: usize) -> bool {
    let all = RoutedFusions {
        glus: true,
        combines: true,
    };
    kiln_cuda::ops::moe_epilogue::fusible(graph, index, all).is_some()
}

#[test]
fn a_routed_product_and_the_glu_or_combine_after_it_are_fused() {
    for (dtype, shape, next) in [
        (DType::Q4_0, QWEN3_30B_GATE_UP, SILU),
        (DType::Q4K, (2, 4, 60, 192, 256), SILU),
        (DType::Q8_0, (1, 1, 7, 64, 512), SILU),
        (DType::Q4_0, QWEN3_30B_DOWN, Next::Combine),
        (DType::Q6K, (3, 3, 5, 96, 256), Next::Combine),
    ] {
        let p = routed(dtype, shape, next);
        assert!(fused(&p.graph, 0), "{dtype} {shape:?} {next:?}");
        assert!(!fused(&p.graph, 1), "the next op alone is no pair");
    }
    let combine_off = RoutedFusions {
        glus: true,
        combines: false,
    };
    let down = routed(DType::Q4_0, QWEN3_30B_DOWN, Next::Combine);
    assert!(
        kiln_cuda::ops::moe_epilogue::fusible(&down.graph, 0, combine_off).is_none(),
        "a combine with combines off"
    );
    let not_fused = |dtype, shape, next, what: &str| {
        assert!(!fused(&routed(dtype, shape, next).graph, 0), "{what}")
    };
    let gelu = Next::Glu {
        kind: ElementwiseKind::GeluMul,
        copy: false,
    };
    let copied = Next::Glu {
        kind: ElementwiseKind::SiluMul,
        copy: true,
    };
    not_fused(
        DType::Q4_0,
        QWEN3_30B_GATE_UP,
        gelu,
        "a kind without a fused kernel",
    );
    not_fused(
        DType::Q4_0,
        QWEN3_30B_GATE_UP,
        copied,
        "a glu with a Q8_1 copy",
    );
    not_fused(
        DType::F16,
        QWEN3_30B_GATE_UP,
        SILU,
        "a dtype without the packed mat-vec",
    );
    let odd_halves = (1, 8, 128, 2000, 2048);
    not_fused(
        DType::Q4_0,
        odd_halves,
        SILU,
        "halves that are not whole Q8_1 blocks",
    );
    let odd_rows = (1, 8, 128, 2000, 768);
    not_fused(
        DType::Q4_0,
        odd_rows,
        Next::Combine,
        "rows that are not whole Q8_1 blocks",
    );
    let prompt = (16, 8, 128, 1536, 2048);
    not_fused(DType::Q4_0, prompt, SILU, "a prompt's grouped mat-mat");
}

#[test]
fn a_combine_with_a_residual_or_a_shared_expert_is_not_fused() {
    let (m, k, n_expert, rows, cols) = QWEN3_30B_DOWN;
    for (residual, shared) in [(true, false), (false, true)] {
        let mut g = Graph::new();
        let mut buf =
            |name: &str, dtype, shape: &[usize]| g.persistent(name, dtype, shape).unwrap();
        let x = buf("x", DType::F32, &[m * k, cols]);
        let ids = buf("ids", DType::I32, &[m, k]);
        let w = buf("w", DType::Q4_0, &[n_expert, rows, cols]);
        let out = buf("out", DType::F32, &[m, k, rows]);
        let weights = buf("weights", DType::F32, &[m, k]);
        let residual = residual.then(|| buf("residual", DType::F32, &[m, rows]));
        let shared = shared.then(|| buf("shared", DType::F32, &[m, rows]));
        let combined = buf("combined", DType::F32, &[m, rows]);
        g.push(MoeMatMul {
            x,
            ids,
            w,
            out,
            m,
            k,
            n_expert,
            rows,
            cols,
            per_slot: true,
        })
        .unwrap();
        g.push(MoeCombine {
            y: out,
            weights,
            residual,
            shared,
            shared_gate: None,
            out: combined,
            m,
            k,
            n: rows,
        })
        .unwrap();
        assert!(!fused(&g, 0), "residual {residual:?} shared {shared:?}");
    }
}

/// Random x, expert ids (`ids`, else distinct random ones per token), weights and
/// combine weights (positive, each token's summing to about 1) of `p` (built by
/// [`routed`] with `shape` and `next`).
fn routed_inputs(
    rng: &mut rand::rngs::StdRng,
    p: &Routed,
    dtype: DType,
    (m, k, n_expert, rows, cols): Shape,
    next: Next,
    ids: Option<Vec<i32>>,
) -> Vec<(BufferId, Vec<u8>)> {
    let x_rows = if matches!(next, Next::Combine) {
        m * k
    } else {
        m
    };
    let ids = ids.unwrap_or_else(|| expert_ids(rng, m, k, n_expert));
    let mut inputs = vec![
        (p.x, f32_bytes(&uniform(rng, x_rows * cols, 1.0))),
        (p.ids, i32_bytes(&ids)),
        (p.w, encoded(rng, dtype, n_expert * rows * cols)),
    ];
    if let Some(weights) = p.weights {
        let v: Vec<f32> = uniform(rng, m * k, 1.0)
            .iter()
            .map(|v| (1.0 + v.abs()) / (2 * k) as f32)
            .collect();
        inputs.push((weights, f32_bytes(&v)));
    }
    inputs
}

/// `p`'s product and next outputs on `cuda` fused and unfused (asserting one launch,
/// `entry`, and two), as bytes; `switch` turns the fusion on and off.
fn fused_and_unfused(
    cuda: &kiln_cuda::CudaBackend,
    p: &Routed,
    inputs: &[(BufferId, Vec<u8>)],
    switch: impl Fn(bool),
    entry: &str,
    what: &str,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let outputs = [p.out, p.next_out];
    switch(true);
    let fused = compiled_launches(cuda, &p.graph);
    assert_eq!(fused.len(), 1, "{what}: {fused:?}");
    assert!(fused[0].0.starts_with(entry), "{what}: {fused:?}");
    let got = run_on(cuda, &p.graph, inputs, &outputs, Aliasing::On).unwrap();
    switch(false);
    assert_eq!(compiled_launches(cuda, &p.graph).len(), 2, "{what} unfused");
    let unfused = run_on(cuda, &p.graph, inputs, &outputs, Aliasing::On).unwrap();
    (got, unfused)
}

/// The packed weight dtypes (the routed packed mat-vec's).
const PACKED: [DType; 11] = [
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
    DType::Q4K,
    DType::Q5K,
    DType::Q6K,
    DType::Q1_0,
    DType::Q2_0,
    DType::TQ2_0,
];

/// Checks every packed dtype and each of `shapes` (those whose columns its blocks
/// divide) fused before `next` against the unfused launches (bits) and the CPU.
fn check_fused(cuda: &kiln_cuda::CudaBackend, test: &str, next: Next, shapes: &[Shape]) {
    let mut rng = rng(test);
    let (switch, entry): (Box<dyn Fn(bool)>, _) = match next {
        Next::Glu { .. } => (
            Box::new(|on| cuda.set_fusion(Fusion::Glus, on)),
            "moe_matvec_packed_glu|",
        ),
        Next::Combine => (
            Box::new(|on| cuda.set_fusion(Fusion::Combines, on)),
            "moe_matvec_packed_combine|",
        ),
    };
    for dtype in PACKED {
        for &shape in shapes {
            if shape.4 % dtype.block_size() != 0 {
                continue;
            }
            let p = routed(dtype, shape, next);
            let what = format!("{dtype} (m, k, E, rows, cols) {shape:?} {next:?}");
            let inputs = routed_inputs(&mut rng, &p, dtype, shape, next, None);
            let (got, unfused) = fused_and_unfused(cuda, &p, &inputs, &switch, entry, &what);
            assert_same_bits(&format!("{what} product"), &got[0], &unfused[0]);
            assert_same_bits(&format!("{what} next"), &got[1], &unfused[1]);
            let outputs = [p.out, p.next_out];
            let want = run_on(&CpuBackend, &p.graph, &inputs, &outputs, Aliasing::On).unwrap();
            // The routed product's tolerance (the same f32 sums in another order).
            assert_close(
                &format!("{what} product"),
                &f32s(&got[0]),
                &f32s(&want[0]),
                1e-9,
            );
            assert_close(
                &format!("{what} next"),
                &f32s(&got[1]),
                &f32s(&want[1]),
                1e-8,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_fused_routed_glu_is_one_launch_with_the_unfused_bits_and_the_cpus_values() {
    // Qwen3-30B-A3B's decode token; two and three tokens of odd expert counts; one
    // expert per token, each half of its rows one group.
    check_fused(
        &own_cuda(),
        "the_fused_routed_glu_is_one_launch_with_the_unfused_bits_and_the_cpus_values",
        SILU,
        &[
            QWEN3_30B_GATE_UP,
            (2, 4, 60, 192, 256),
            (1, 1, 7, 64, 512),
            (3, 3, 5, 320, 256),
        ],
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_fused_routed_combine_is_one_launch_with_the_unfused_bits_and_the_cpus_values() {
    // Qwen3-30B-A3B's decode token; two and three tokens of odd expert counts and rows;
    // one expert per token of one group.
    check_fused(
        &own_cuda(),
        "the_fused_routed_combine_is_one_launch_with_the_unfused_bits_and_the_cpus_values",
        Next::Combine,
        &[
            QWEN3_30B_DOWN,
            (2, 4, 60, 96, 256),
            (1, 1, 7, 32, 512),
            (3, 3, 5, 160, 256),
        ],
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn an_expert_id_out_of_range_gives_nan_and_leaves_the_tickets_ready() {
    let cuda = own_cuda();
    let mut rng = rng("an_expert_id_out_of_range_gives_nan_and_leaves_the_tickets_ready");
    let dtype = DType::Q4_0;
    for (next, shape) in [
        (SILU, (2, 2, 4, 192, 256)),
        (Next::Combine, (2, 2, 4, 96, 256)),
    ] {
        let switch = |on| {
            cuda.set_fusion(Fusion::Glus, on);
            cuda.set_fusion(Fusion::Combines, on);
        };
        let entry = "moe_matvec_packed_";
        let p = routed(dtype, shape, next);
        let bad = routed_inputs(&mut rng, &p, dtype, shape, next, Some(vec![1, 4, -1, 3]));
        let what = format!("bad ids {next:?}");
        let (got, unfused) = fused_and_unfused(&cuda, &p, &bad, switch, entry, &what);
        assert_same_bits(&format!("{what} product"), &got[0], &unfused[0]);
        assert_same_bits(&format!("{what} next"), &got[1], &unfused[1]);
        // Slots 1 and 2 (token 0's second, token 1's first) chose no expert: their
        // gated units, or both tokens' sums, are NaN.
        let (row_len, bad_rows): (usize, &[usize]) = match next {
            Next::Glu { .. } => (shape.3 / 2, &[1, 2]),
            Next::Combine => (shape.3, &[0, 1]),
        };
        for (row, values) in f32s(&got[1]).chunks(row_len).enumerate() {
            let nan = bad_rows.contains(&row);
            assert!(
                values.iter().all(|v| v.is_nan() == nan),
                "{what} row {row}: {:?}",
                &values[..4]
            );
        }
        // Every group of the bad slots was counted: the next launches start from zero.
        switch(true);
        for run in 0..2 {
            let inputs = routed_inputs(&mut rng, &p, dtype, shape, next, None);
            let got = run_on(&cuda, &p.graph, &inputs, &[p.next_out], Aliasing::On).unwrap();
            let want = run_on(&CpuBackend, &p.graph, &inputs, &[p.next_out], Aliasing::On).unwrap();
            assert_close(
                &format!("{what} run {run}"),
                &f32s(&got[0]),
                &f32s(&want[0]),
                1e-8,
            );
        }
    }
}
