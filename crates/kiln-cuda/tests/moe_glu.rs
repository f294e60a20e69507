//! An expert-routed gate-up product fused with the gated unit of its output: which
//! pairs of a graph are fused (no GPU needed), and on the GPU, one launch whose outputs
//! are the two launches' bit for bit and kiln-cpu's within tolerance.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{ElementwiseKind, Glu, MoeMatMul, Q8_COPY};
use kiln_core::{Aliasing, BufferId, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::moe_glu::fusible;

/// A routed product's shape: tokens, experts per token, experts, rows (gate then up),
/// columns.
type Shape = (usize, usize, usize, usize, usize);

/// Qwen3-30B-A3B's routed gate-up product of one decode token.
const QWEN3_30B: Shape = (1, 8, 128, 1536, 2048);

/// The buffers of [`gated`]'s graph the caller binds or reads.
struct Gated {
    graph: Graph,
    x: BufferId,
    ids: BufferId,
    w: BufferId,
    out: BufferId,
    act: BufferId,
}

/// The routed product of `shape` over the tokens' rows of x, then the `kind` Glu of
/// every slot's row (with a Q8_1 copy when `copy`). Everything the ops write is
/// persistent.
fn gated(
    dtype: DType,
    (m, k, n_expert, rows, cols): Shape,
    kind: ElementwiseKind,
    copy: bool,
) -> Gated {
    let half = rows / 2;
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[m, cols]).unwrap();
    let ids = g.persistent("ids", DType::I32, &[m, k]).unwrap();
    let w = g.persistent("w", dtype, &[n_expert, rows, cols]).unwrap();
    let out = g.persistent("out", DType::F32, &[m, k, rows]).unwrap();
    let act = g.persistent("act", DType::F32, &[m * k, half]).unwrap();
    let act_q8 = copy.then(|| g.persistent("act_q8", Q8_COPY, &[m * k, half]).unwrap());
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
        per_slot: false,
    })
    .unwrap();
    g.push(Glu {
        kind,
        x: out,
        out: act,
        out_q8: act_q8,
        rows: m * k,
        n: half,
    })
    .unwrap();
    Gated {
        graph: g,
        x,
        ids,
        w,
        out,
        act,
    }
}

#[test]
fn a_routed_gate_up_product_and_its_glu_are_fused() {
    let silu = ElementwiseKind::SiluMul;
    for (dtype, shape) in [
        (DType::Q4_0, QWEN3_30B),
        (DType::Q4K, (2, 4, 60, 192, 256)),
        (DType::Q8_0, (1, 1, 7, 64, 512)),
    ] {
        let p = gated(dtype, shape, silu, false);
        assert!(fusible(&p.graph, 0).is_some(), "{dtype} {shape:?}");
        assert!(fusible(&p.graph, 1).is_none(), "a glu alone is no pair");
    }
    let not_fused = |dtype, shape, kind, copy, what: &str| {
        assert!(
            fusible(&gated(dtype, shape, kind, copy).graph, 0).is_none(),
            "{what}"
        )
    };
    not_fused(
        DType::Q4_0,
        QWEN3_30B,
        ElementwiseKind::GeluMul,
        false,
        "a kind without a fused kernel",
    );
    not_fused(DType::Q4_0, QWEN3_30B, silu, true, "a glu with a Q8_1 copy");
    not_fused(
        DType::F16,
        QWEN3_30B,
        silu,
        false,
        "a dtype without the packed mat-vec",
    );
    not_fused(
        DType::Q4_0,
        (1, 8, 128, 2000, 2048),
        silu,
        false,
        "halves that are not whole Q8_1 blocks",
    );
    not_fused(
        DType::Q4_0,
        (16, 8, 128, 1536, 2048),
        silu,
        false,
        "a prompt's grouped mat-mat",
    );
}

/// Random x, expert ids (`ids`, else distinct random ones per token) and weights of
/// `p` (built by [`gated`] with `shape`).
fn gated_inputs(
    rng: &mut rand::rngs::StdRng,
    p: &Gated,
    dtype: DType,
    (m, k, n_expert, rows, cols): Shape,
    ids: Option<Vec<i32>>,
) -> Vec<(BufferId, Vec<u8>)> {
    let ids = ids.unwrap_or_else(|| expert_ids(rng, m, k, n_expert));
    vec![
        (p.x, f32_bytes(&uniform(rng, m * cols, 1.0))),
        (p.ids, i32_bytes(&ids)),
        (p.w, encoded(rng, dtype, n_expert * rows * cols)),
    ]
}

/// Asserts that `got` and `want` are the same bytes, naming the first that differs.
fn assert_same_bits(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: sizes");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: byte {at} differs");
    }
}

/// `p`'s product and gated outputs on `cuda` fused and unfused (asserting one launch
/// and two), as bytes.
fn fused_and_unfused(
    cuda: &kiln_cuda::CudaBackend,
    p: &Gated,
    inputs: &[(BufferId, Vec<u8>)],
    what: &str,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let outputs = [p.out, p.act];
    cuda.set_fuse_glus(true);
    let fused = compiled_launches(cuda, &p.graph);
    assert_eq!(fused.len(), 1, "{what}: {fused:?}");
    assert!(
        fused[0].0.starts_with("moe_matvec_packed_glu|"),
        "{what}: {fused:?}"
    );
    let got = run_on(cuda, &p.graph, inputs, &outputs, Aliasing::On).unwrap();
    cuda.set_fuse_glus(false);
    assert_eq!(compiled_launches(cuda, &p.graph).len(), 2, "{what} unfused");
    let unfused = run_on(cuda, &p.graph, inputs, &outputs, Aliasing::On).unwrap();
    (got, unfused)
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_fused_routed_glu_is_one_launch_with_the_unfused_bits_and_the_cpus_values() {
    let cuda = own_cuda();
    let mut rng =
        rng("the_fused_routed_glu_is_one_launch_with_the_unfused_bits_and_the_cpus_values");
    // Qwen3-30B-A3B's decode token; two and three tokens of odd expert counts; one
    // expert per token, each half of its rows one group.
    let shapes = [
        QWEN3_30B,
        (2, 4, 60, 192, 256),
        (1, 1, 7, 64, 512),
        (3, 3, 5, 320, 256),
    ];
    let dtypes = [
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
    for dtype in dtypes {
        for shape in shapes {
            if dtype.block_size() > shape.4 || shape.4 % dtype.block_size() != 0 {
                continue;
            }
            let p = gated(dtype, shape, ElementwiseKind::SiluMul, false);
            let what = format!("{dtype} (m, k, E, rows, cols) {shape:?}");
            let inputs = gated_inputs(&mut rng, &p, dtype, shape, None);
            let (got, unfused) = fused_and_unfused(&cuda, &p, &inputs, &what);
            assert_same_bits(&format!("{what} out"), &got[0], &unfused[0]);
            assert_same_bits(&format!("{what} act"), &got[1], &unfused[1]);
            let want = run_on(
                &CpuBackend,
                &p.graph,
                &inputs,
                &[p.out, p.act],
                Aliasing::On,
            )
            .unwrap();
            // The routed product's tolerance (the same f32 sums in another order).
            assert_close(
                &format!("{what} out"),
                &f32s(&got[0]),
                &f32s(&want[0]),
                1e-9,
            );
            assert_close(
                &format!("{what} act"),
                &f32s(&got[1]),
                &f32s(&want[1]),
                1e-8,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn an_expert_id_out_of_range_gives_nan_units_and_leaves_the_tickets_ready() {
    let cuda = own_cuda();
    let mut rng = rng("an_expert_id_out_of_range_gives_nan_units_and_leaves_the_tickets_ready");
    let (dtype, shape) = (DType::Q4_0, (2, 2, 4, 192, 256));
    let p = gated(dtype, shape, ElementwiseKind::SiluMul, false);
    let bad = gated_inputs(&mut rng, &p, dtype, shape, Some(vec![1, 4, -1, 3]));
    let (got, unfused) = fused_and_unfused(&cuda, &p, &bad, "bad ids");
    assert_same_bits("bad ids out", &got[0], &unfused[0]);
    assert_same_bits("bad ids act", &got[1], &unfused[1]);
    for (slot, row) in f32s(&got[1]).chunks(shape.3 / 2).enumerate() {
        let bad = slot == 1 || slot == 2;
        assert!(
            row.iter().all(|v| v.is_nan() == bad),
            "slot {slot}: {:?}",
            &row[..4]
        );
    }
    // Every group of the bad slots was counted: the next launches start from zero.
    cuda.set_fuse_glus(true);
    for run in 0..2 {
        let inputs = gated_inputs(&mut rng, &p, dtype, shape, None);
        let got = run_on(&cuda, &p.graph, &inputs, &[p.act], Aliasing::On).unwrap();
        let want = run_on(&CpuBackend, &p.graph, &inputs, &[p.act], Aliasing::On).unwrap();
        assert_close(
            &format!("run {run} act"),
            &f32s(&got[0]),
            &f32s(&want[0]),
            1e-8,
        );
    }
}
