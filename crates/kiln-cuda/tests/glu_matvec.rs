//! A one-row GLU fused into the resident mat-vec that reads its Q8_1 copy: which pairs
//! of a graph are fused (no GPU needed), and on the GPU, one launch for the pair whose
//! product equals the unfused pair's bit for bit and matches kiln-cpu's two ops.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{ElementwiseKind, Glu, MatMul, Q8_COPY};
use kiln_core::{plan, Aliasing, Backend, Bindings, BufferId, DType, Graph, Scratch};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::glu_matvec::fusible;

/// The buffers of [`pair`]'s graph the caller binds or reads.
struct Pair {
    graph: Graph,
    x: BufferId,
    w: BufferId,
    bias: Option<BufferId>,
    out: BufferId,
    gated: BufferId,
}

/// The shape of a [`pair`]: `rows` rows of `x` (2k each), an `n x k` weight of `dtype`.
#[derive(Clone, Copy)]
struct Shape {
    kind: ElementwiseKind,
    dtype: DType,
    rows: usize,
    n: usize,
    k: usize,
    bias: bool,
}

impl Shape {
    fn new(dtype: DType, n: usize, k: usize) -> Self {
        Shape {
            kind: ElementwiseKind::SiluMul,
            dtype,
            rows: 1,
            n,
            k,
            bias: false,
        }
    }
}

/// `gated = Glu(x)` with its Q8_1 copy, `out = gated · wᵀ (+ bias)`; the GLU's outputs
/// are transient unless `gated_persistent`.
fn pair(s: Shape, gated_persistent: bool) -> Pair {
    let Shape {
        kind,
        dtype,
        rows,
        n,
        k,
        bias,
    } = s;
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[rows, 2 * k]).unwrap();
    let w = g.persistent("w", dtype, &[n, k]).unwrap();
    let bias = bias.then(|| g.persistent("bias", DType::F32, &[n]).unwrap());
    let out = g.persistent("out", DType::F32, &[rows, n]).unwrap();
    let (gated, gated_q8) = if gated_persistent {
        (
            g.persistent("gated", DType::F32, &[rows, k]).unwrap(),
            g.persistent("gated_q8", Q8_COPY, &[rows, k]).unwrap(),
        )
    } else {
        (
            g.transient("gated", DType::F32, &[rows, k]).unwrap(),
            g.transient("gated_q8", Q8_COPY, &[rows, k]).unwrap(),
        )
    };
    g.push(Glu {
        kind,
        x,
        out: gated,
        out_q8: Some(gated_q8),
        rows,
        n: k,
    })
    .unwrap();
    g.push(MatMul {
        x: gated,
        x_q8: Some(gated_q8),
        w,
        bias,
        out,
        m: rows,
        n,
        k,
    })
    .unwrap();
    Pair {
        graph: g,
        x,
        w,
        bias,
        out,
        gated,
    }
}

#[test]
fn a_one_row_glu_read_only_by_its_resident_product_is_fused() {
    for (dtype, n, k) in [
        (DType::Q4_0, 4096, 14336),
        (DType::Q1_0, 4096, 12288),
        (DType::Q6K, 1031, 2048),
    ] {
        let p = pair(Shape::new(dtype, n, k), false);
        assert!(fusible(&p.graph, 0).is_some(), "{dtype} {n}x{k}");
        assert!(fusible(&p.graph, 1).is_none(), "the product starts no pair");
    }
    let gelu = Shape {
        kind: ElementwiseKind::GeluMul,
        ..Shape::new(DType::Q4_0, 4096, 4096)
    };
    assert!(fusible(&pair(gelu, false).graph, 0).is_some(), "gelu_mul");
}

#[test]
fn pairs_the_fused_kernel_cannot_stand_for_are_not_fused() {
    let not_fused = |p: &Pair, what: &str| assert!(fusible(&p.graph, 0).is_none(), "{what}");
    let q4_0 = Shape::new(DType::Q4_0, 4096, 4096);
    not_fused(&pair(Shape { rows: 2, ..q4_0 }, false), "two rows");
    not_fused(
        &pair(
            Shape {
                kind: ElementwiseKind::Mul,
                ..q4_0
            },
            false,
        ),
        "a kind without a fused kernel",
    );
    not_fused(
        &pair(Shape::new(DType::F16, 4096, 4096), false),
        "a dtype without the resident kernel",
    );
    not_fused(
        &pair(Shape { n: 1000, ..q4_0 }, false),
        "fewer rows than the resident kernel takes",
    );
    not_fused(
        &pair(q4_0, true),
        "the GLU's output is persistent (the caller may read it)",
    );
    not_fused(
        &pair(Shape { k: 4064, ..q4_0 }, false),
        "k not a multiple of 128",
    );
    let mut read_twice = pair(q4_0, false);
    let other = read_twice
        .graph
        .persistent("other", DType::F32, &[1, 1024])
        .unwrap();
    let w2 = read_twice
        .graph
        .persistent("w2", DType::Q4_0, &[1024, 4096])
        .unwrap();
    read_twice
        .graph
        .push(MatMul {
            x: read_twice.gated,
            x_q8: None,
            w: w2,
            bias: None,
            out: other,
            m: 1,
            n: 1024,
            k: 4096,
        })
        .unwrap();
    not_fused(&read_twice, "the GLU's output is read by another op too");
}

/// The compiled pair's launch keys with the fusion of GLUs on or off.
fn launches(cuda: &kiln_cuda::CudaBackend, p: &Pair, fuse: bool) -> Vec<String> {
    cuda.set_fuse_glus(fuse);
    let memory = plan(&p.graph, Aliasing::On);
    let mut scratch = Scratch::new();
    scratch.ensure(cuda, &memory).unwrap();
    let ids: Vec<BufferId> = [p.x, p.w, p.out].into_iter().chain(p.bias).collect();
    let mut bufs: Vec<_> = ids
        .iter()
        .map(|&id| {
            let desc = &p.graph.buffers()[id.index()];
            let mut buf = cuda.alloc(desc.bytes()).unwrap();
            if id == p.w {
                // Quantized weights are uploaded in the layout their kernels read.
                let bytes = vec![0u8; desc.bytes()];
                cuda.upload_weight(&mut buf, &bytes, desc.dtype, &desc.shape)
                    .unwrap();
            }
            buf
        })
        .collect();
    let mut b = Bindings::new(&p.graph, &memory, &mut scratch).unwrap();
    for (&id, buf) in ids.iter().zip(bufs.iter_mut()) {
        b.bind(&p.graph, id, buf).unwrap();
    }
    let exe = cuda.compile(&p.graph, &mut b).unwrap();
    cuda.set_fuse_glus(true);
    exe.launches().iter().map(|l| l.key().to_string()).collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_fused_pair_is_one_launch_equal_to_the_unfused_pair_and_matches_the_cpu() {
    let cuda = cuda();
    let mut rng = rng("the_fused_pair_is_one_launch_equal_to_the_unfused_pair");
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
        // Small blocks (fewer than 4096 rows) and large ones; 14336 is 3.5 float4s per
        // thread of a large block (one round of loads, a partial one), 14 of a small
        // one (four rounds).
        for (n, k, bias, kind) in [
            (1031, 2048, true, ElementwiseKind::SiluMul),
            (4099, 14336, false, ElementwiseKind::SiluMul),
            (1024, 14336, true, ElementwiseKind::GeluMul),
        ] {
            let s = Shape {
                kind,
                dtype,
                rows: 1,
                n,
                k,
                bias,
            };
            let p = pair(s, false);
            let what = format!("{dtype} {n}x{k} bias={bias} {}", kind.name());
            let fused = launches(cuda, &p, true);
            assert_eq!(fused.len(), 1, "{what}: {fused:?}");
            assert!(
                fused[0].starts_with("matvec_resident_glu|"),
                "{what}: {fused:?}"
            );
            assert_eq!(launches(cuda, &p, false).len(), 2, "{what} unfused");
            let mut inputs = vec![
                (p.x, f32_bytes(&uniform(&mut rng, 2 * k, 3.0))),
                (p.w, encoded(&mut rng, dtype, n * k)),
            ];
            if let Some(b) = p.bias {
                inputs.push((b, f32_bytes(&uniform(&mut rng, n, 1.0))));
            }
            let outputs = [p.out];
            let want = run_on(&CpuBackend, &p.graph, &inputs, &outputs, Aliasing::On).unwrap();
            let got = run_on(cuda, &p.graph, &inputs, &outputs, Aliasing::On).unwrap();
            cuda.set_fuse_glus(false);
            let unfused = run_on(cuda, &p.graph, &inputs, &outputs, Aliasing::On);
            cuda.set_fuse_glus(true);
            // The fused kernel stages the GLU's values rounded exactly as the GLU kernel
            // writes its copy, and multiplies them as the resident kernel multiplies
            // that copy: the same bits.
            assert_eq!(got[0], unfused.unwrap()[0], "{what}: fused against unfused");
            // The GPU's expf differs from the CPU's by an ulp or so, which can move a
            // value across a Q8_1 rounding boundary (as for the fused norm).
            assert_close(
                &format!("{what} out"),
                &f32s(&got[0]),
                &f32s(&want[0]),
                1e-6,
            );
        }
    }
}
