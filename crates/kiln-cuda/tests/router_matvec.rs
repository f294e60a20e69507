//! A one-token mixture-of-experts router fused with the f32 product of its logits:
//! which pairs of a graph are fused (no GPU needed), and on the GPU, one launch whose
//! logits, ids and weights are bit for bit the unfused pair's and match kiln-cpu's,
//! launch after launch.

mod common;
mod kernels;
use std::sync::{Mutex, PoisonError};

use common::*;
use kernels::invalid;
use kiln_core::ops::{Cast, Gating, MatMul, MoeRouter, Q8_COPY};
use kiln_core::{Aliasing, Backend, Bindings, BufferId, DType, Graph, Scratch};
use kiln_cpu::CpuBackend;
use kiln_cuda::fusion::Fusion;
use kiln_cuda::ops::matmul::MatMulKernel;
use kiln_cuda::ops::moe::MAX_EXPERTS;
use kiln_cuda::ops::router_matvec::{fusible, spec};
use kiln_cuda::CudaBackend;
use rand::rngs::StdRng;

/// A router's product and settings.
#[derive(Clone, Copy, Debug)]
struct Shape {
    weight: DType,
    tokens: usize,
    n_expert: usize,
    k: usize,
    hidden: usize,
    bias: bool,
    gating: Gating,
    normalize: bool,
}

/// Qwen3-30B-A3B's router of a decode step: 128 experts, k = 8, hidden 2048.
const QWEN3_MOE: Shape = Shape {
    weight: DType::F32,
    tokens: 1,
    n_expert: 128,
    k: 8,
    hidden: 2048,
    bias: false,
    gating: Gating::Softmax,
    normalize: true,
};

/// The persistent buffers of a router's product and routing in a graph.
#[derive(Clone, Copy)]
struct Router {
    x: BufferId,
    w: BufferId,
    bias: Option<BufferId>,
    logits: BufferId,
    ids: BufferId,
    weights: BufferId,
}

impl Router {
    fn outputs(&self) -> [BufferId; 3] {
        [self.logits, self.ids, self.weights]
    }
}

/// What [`push_router`] changes in a product and router pair.
#[derive(Clone, Copy, Default)]
struct Variant {
    /// The product reads x's Q8_1 copy.
    x_q8: bool,
    /// The router reads logits that the product does not write (`{layer}.out`).
    other_logits: bool,
    /// A cast of x runs between the product and the router.
    op_between: bool,
}

/// Adds `logits = x · wᵀ (+ bias)` and the router of those logits to `g`, with the
/// changes of `v`, its buffers named after `layer`; all persistent.
fn push_router(g: &mut Graph, layer: &str, s: &Shape, v: Variant) -> Router {
    let (t, e, k, d) = (s.tokens, s.n_expert, s.k, s.hidden);
    let mut buffer = |name: &str, dtype: DType, shape: &[usize]| {
        g.persistent(format!("{layer}.{name}"), dtype, shape)
            .unwrap()
    };
    let x = buffer("x", DType::F32, &[t, d]);
    let x_q8 = v.x_q8.then(|| buffer("x_q8", Q8_COPY, &[t, d]));
    let w = buffer("w", s.weight, &[e, d]);
    let bias = s.bias.then(|| buffer("bias", DType::F32, &[e]));
    let logits = buffer("logits", DType::F32, &[t, e]);
    let out = if v.other_logits {
        buffer("out", DType::F32, &[t, e])
    } else {
        logits
    };
    let ids = buffer("ids", DType::I32, &[t, k]);
    let weights = buffer("weights", DType::F32, &[t, k]);
    let x16 = v.op_between.then(|| buffer("x16", DType::F16, &[t, d]));
    g.push(MatMul {
        x,
        x_q8,
        w,
        bias,
        out,
        m: t,
        n: e,
        k: d,
    })
    .unwrap();
    if let Some(x16) = x16 {
        g.push(Cast {
            x,
            out: x16,
            len: t * d,
        })
        .unwrap();
    }
    g.push(MoeRouter {
        logits,
        ids,
        weights,
        m: t,
        n_expert: e,
        k,
        gating: s.gating,
        normalize: s.normalize,
    })
    .unwrap();
    Router {
        x,
        w,
        bias,
        logits,
        ids,
        weights,
    }
}

/// The pair of shape `s` with the changes of `v`, alone in a graph.
fn variant(s: &Shape, v: Variant) -> (Graph, Router) {
    let mut g = Graph::new();
    let r = push_router(&mut g, "l0", s, v);
    (g, r)
}

fn pair(s: &Shape) -> (Graph, Router) {
    variant(s, Variant::default())
}

#[test]
fn a_one_token_f32_router_product_and_its_router_are_fused() {
    for s in [
        QWEN3_MOE,
        Shape {
            n_expert: 7,
            k: 1,
            hidden: 199,
            bias: true,
            gating: Gating::Sigmoid,
            normalize: false,
            ..QWEN3_MOE
        },
        Shape {
            n_expert: MAX_EXPERTS,
            hidden: 64,
            ..QWEN3_MOE
        },
    ] {
        let (g, _) = pair(&s);
        assert!(fusible(&g, 0).is_some(), "{s:?}");
        assert!(fusible(&g, 1).is_none(), "the router starts no pair");
    }
}

#[test]
fn pairs_the_fused_kernel_cannot_stand_for_are_not_fused() {
    let not_fused = |g: &Graph, what: &str| assert!(fusible(g, 0).is_none(), "{what}");
    let shape = |s: Shape| pair(&s).0;
    not_fused(
        &shape(Shape {
            tokens: 2,
            ..QWEN3_MOE
        }),
        "two tokens",
    );
    not_fused(
        &shape(Shape {
            weight: DType::F16,
            ..QWEN3_MOE
        }),
        "a weight that is not f32",
    );
    not_fused(
        &shape(Shape {
            weight: DType::Q8_0,
            ..QWEN3_MOE
        }),
        "a quantized weight",
    );
    not_fused(
        &shape(Shape {
            n_expert: MAX_EXPERTS + 1,
            k: 1,
            hidden: 32,
            ..QWEN3_MOE
        }),
        "more experts than the router kernel takes",
    );

    let qwen = |v: Variant| variant(&QWEN3_MOE, v).0;
    not_fused(
        &qwen(Variant {
            x_q8: true,
            ..Variant::default()
        }),
        "a product of x's Q8_1 copy",
    );
    not_fused(
        &qwen(Variant {
            other_logits: true,
            ..Variant::default()
        }),
        "a router of other logits than the product's",
    );
    not_fused(
        &qwen(Variant {
            op_between: true,
            ..Variant::default()
        }),
        "an op between the product and the router",
    );
    assert!(
        fusible(&qwen(Variant::default()), 0).is_some(),
        "the variants' common graph is fused"
    );
}

#[test]
fn the_fused_kernel_is_the_router_of_a_one_row_staged_mat_vec() {
    let kernel = MatMulKernel::MatVec {
        m_tier: 1,
        rows: 2,
        load: 16,
        stages: 4,
    };
    let s = spec(Gating::Sigmoid, kernel).unwrap();
    assert_eq!(
        s.key,
        "moe_router_matvec|w=f32|gating=sigmoid|rows=2|load=16|stages=4"
    );
    assert_eq!(
        s.name_expression,
        "kiln::moe_router_matvec<kiln::WF32, true, 2, 16, 4>"
    );
    for other in [
        MatMulKernel::MatVec {
            m_tier: 2,
            rows: 2,
            load: 16,
            stages: 4,
        },
        MatMulKernel::MatMat,
    ] {
        let m = invalid(spec(Gating::Softmax, other));
        assert!(
            m.starts_with(
                "matmul+moe_router: the fused router runs only in the one-row staged mat-vec"
            ),
            "{m}"
        );
    }
}

/// Serializes this file's tests' use of the process-wide backend's fusion switch.
static FUSION: Mutex<()> = Mutex::new(());

/// `f` run with the fusion of routers `on`, the switch held against this file's other
/// tests, then put back off (its default).
fn with_fusion<R>(cuda: &CudaBackend, on: bool, f: impl FnOnce() -> R) -> R {
    let _held = FUSION.lock().unwrap_or_else(PoisonError::into_inner);
    cuda.set_fusion(Fusion::Routers, on);
    let r = f();
    cuda.set_fusion(Fusion::Routers, false);
    r
}

/// Random f32 x and (fixed: `with_weights`) weight and bias of router `r` of shape
/// `s`: logits of about unit scale, so that sigmoids do not saturate to ties.
fn router_inputs(
    rng: &mut StdRng,
    s: &Shape,
    r: &Router,
    with_weights: bool,
) -> Vec<(BufferId, Vec<u8>)> {
    let scale = 6.0 / (s.hidden as f32).sqrt();
    let mut inputs = vec![(r.x, f32_bytes(&uniform(rng, s.tokens * s.hidden, 1.0)))];
    if with_weights {
        let w = uniform(rng, s.n_expert * s.hidden, scale);
        inputs.push((r.w, f32_bytes(&w)));
        if let Some(b) = r.bias {
            inputs.push((b, f32_bytes(&uniform(rng, s.n_expert, 1.0))));
        }
    }
    inputs
}

/// Whether two of the `k + 1` largest of `logits` (or all of them) lie within 1e-3 of
/// each other, where another summation order may swap them.
fn near_tie(logits: &[f32], k: usize) -> bool {
    let mut sorted = logits.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted.truncate(k + 1);
    sorted.windows(2).any(|p| p[0] - p[1] < 1e-3)
}

/// Asserts that `got` and `want` hold the same bytes, naming the first 4-byte word
/// that differs.
fn assert_same_bits(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: sizes");
    if let Some(at) = got.chunks(4).zip(want.chunks(4)).position(|(a, b)| a != b) {
        panic!(
            "{what}: word {at} is {:02x?} (f32 {}), the unfused pair's {:02x?} (f32 {})",
            &got[4 * at..4 * at + 4],
            f32s(&got[4 * at..4 * at + 4])[0],
            &want[4 * at..4 * at + 4],
            f32s(&want[4 * at..4 * at + 4])[0],
        );
    }
}

/// Checks the fused pair's outputs against kiln-cpu's: logits within the one-row
/// mat-vec's error; ids equal and weights close unless the CPU's logits have a near
/// tie among the chosen (then the pick may differ in either direction).
fn assert_matches_cpu(what: &str, s: &Shape, got: &[Vec<u8>], cpu: &[Vec<u8>]) {
    let cpu_logits = f32s(&cpu[0]);
    assert_close(&format!("{what} logits"), &f32s(&got[0]), &cpu_logits, 1e-9);
    let ids = i32s(&got[1]);
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() == s.k && ids.iter().all(|&e| (0..s.n_expert as i32).contains(&e)),
        "{what}: ids {ids:?}"
    );
    if near_tie(&cpu_logits, s.k) {
        eprintln!("{what}: a near tie among the chosen logits; ids and weights not compared");
        return;
    }
    assert_eq!(ids, i32s(&cpu[1]), "{what}: ids");
    // expf and the order of the sums differ from the CPU's by ulps.
    assert_close(
        &format!("{what} weights"),
        &f32s(&got[2]),
        &f32s(&cpu[2]),
        1e-10,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_fused_pair_is_one_launch_bit_for_bit_the_unfused_pair() {
    let cuda = cuda();
    let mut rng = rng("the_fused_pair_is_one_launch_bit_for_bit_the_unfused_pair");
    let mut case = 0;
    for n_expert in [128, 60, 7] {
        for k in [8, 4, 1].map(|k: usize| k.min(n_expert)) {
            // A tile of the mat-vec; rows of 16-byte multiples (16-byte copies), and
            // of 4-byte ones (x read element by element).
            for hidden in [2048, 200, 199] {
                for gating in [Gating::Softmax, Gating::Sigmoid] {
                    for normalize in [false, true] {
                        case += 1;
                        let s = Shape {
                            n_expert,
                            k,
                            hidden,
                            bias: case % 3 == 0,
                            gating,
                            normalize,
                            ..QWEN3_MOE
                        };
                        let what = format!("{s:?}");
                        let (g, r) = pair(&s);
                        let fused = with_fusion(cuda, true, || compiled_launches(cuda, &g));
                        assert_eq!(fused.len(), 1, "{what}: {fused:?}");
                        assert!(
                            fused[0].0.starts_with("moe_router_matvec|"),
                            "{what}: {fused:?}"
                        );
                        let unfused = with_fusion(cuda, false, || compiled_launches(cuda, &g));
                        assert_eq!(unfused.len(), 2, "{what} unfused: {unfused:?}");
                        let inputs = router_inputs(&mut rng, &s, &r, true);
                        let outputs = r.outputs();
                        let run = |on| {
                            with_fusion(cuda, on, || {
                                run_on(cuda, &g, &inputs, &outputs, Aliasing::On).unwrap()
                            })
                        };
                        let (got, want) = (run(true), run(false));
                        for (i, name) in ["logits", "ids", "weights"].into_iter().enumerate() {
                            assert_same_bits(&format!("{what} {name}"), &got[i], &want[i]);
                        }
                        let cpu = run_on(&CpuBackend, &g, &inputs, &outputs, Aliasing::On).unwrap();
                        assert_matches_cpu(&what, &s, &got, &cpu);
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_compiled_executable_of_two_fused_pairs_routes_on_every_replay() {
    let cuda = cuda();
    let mut rng = rng("a_compiled_executable_of_two_fused_pairs_routes_on_every_replay");
    let shapes = [
        QWEN3_MOE,
        Shape {
            n_expert: 60,
            k: 4,
            hidden: 199,
            bias: true,
            gating: Gating::Sigmoid,
            normalize: false,
            ..QWEN3_MOE
        },
    ];
    let mut g = Graph::new();
    let routers = [
        push_router(&mut g, "l0", &shapes[0], Variant::default()),
        push_router(&mut g, "l1", &shapes[1], Variant::default()),
    ];
    let fixed: Vec<_> = shapes
        .iter()
        .zip(&routers)
        .flat_map(|(s, r)| router_inputs(&mut rng, s, r, true))
        .filter(|(id, _)| routers.iter().all(|r| r.x != *id))
        .collect();
    let (persistent, mut bufs) = upload_persistent(cuda, &g, &fixed).unwrap();
    let at = |id: BufferId| persistent.iter().position(|&p| p == id).unwrap();
    let memory = kiln_core::plan(&g, Aliasing::On);
    let mut scratch = Scratch::new();
    scratch.ensure(cuda, &memory).unwrap();
    let mut exe = with_fusion(cuda, true, || {
        let mut b = Bindings::new(&g, &memory, &mut scratch).unwrap();
        for (&id, buf) in persistent.iter().zip(bufs.iter_mut()) {
            b.bind(&g, id, buf).unwrap();
        }
        cuda.compile(&g, &mut b).unwrap()
    });
    assert_eq!(exe.launches().len(), 2, "one launch per pair");
    let ops: Vec<_> = exe
        .ops()
        .iter()
        .map(|o| (o.index, o.name, o.launches.clone()))
        .collect();
    assert_eq!(
        ops,
        [
            (0, "matmul", 0..0),
            (1, "moe_router", 0..1),
            (2, "matmul", 1..1),
            (3, "moe_router", 1..2)
        ],
        "each product's launch is its router's"
    );
    let outputs: Vec<BufferId> = routers.iter().flat_map(|r| r.outputs()).collect();
    for round in 0..6 {
        // Alternate replay as a CUDA graph with launch-by-launch submission.
        let graphs = round % 2 == 0;
        cuda.set_cuda_graphs(graphs);
        let mut inputs = fixed.clone();
        for (s, r) in shapes.iter().zip(&routers) {
            inputs.extend(router_inputs(&mut rng, s, r, false));
        }
        for (id, bytes) in &inputs {
            if routers.iter().any(|r| r.x == *id) {
                cuda.upload(&mut bufs[at(*id)], bytes).unwrap();
            }
        }
        for &id in &outputs {
            let buf = &mut bufs[at(id)];
            cuda.upload(buf, &poison(g.buffers()[id.index()].bytes()))
                .unwrap();
        }
        // SAFETY: `bufs` and `scratch` outlive `exe` and are not touched while it runs.
        unsafe { cuda.run(&mut exe) }.unwrap();
        cuda.synchronize().unwrap();
        let got: Vec<Vec<u8>> = outputs
            .iter()
            .map(|&id| {
                let mut out = vec![0u8; g.buffers()[id.index()].bytes()];
                cuda.download(&bufs[at(id)], &mut out).unwrap();
                out
            })
            .collect();
        let want = with_fusion(cuda, false, || {
            run_on(cuda, &g, &inputs, &outputs, Aliasing::On).unwrap()
        });
        let cpu = run_on(&CpuBackend, &g, &inputs, &outputs, Aliasing::On).unwrap();
        for (layer, s) in shapes.iter().enumerate() {
            let what = format!("round {round} (graphs {graphs}) layer {layer}");
            let (got, want, cpu) = (
                &got[3 * layer..3 * layer + 3],
                &want[3 * layer..3 * layer + 3],
                &cpu[3 * layer..3 * layer + 3],
            );
            for (i, name) in ["logits", "ids", "weights"].into_iter().enumerate() {
                assert_same_bits(&format!("{what} {name}"), &got[i], &want[i]);
            }
            assert_matches_cpu(&what, s, got, cpu);
        }
    }
    cuda.set_cuda_graphs(true);
}
