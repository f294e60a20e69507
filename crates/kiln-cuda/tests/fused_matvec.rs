//! One-row ops fused into the resident mat-vec that reads their Q8_1 copy (a residual
//! add and RMSNorm; a gated unit): which pairs of a graph are fused (no GPU needed),
//! and on the GPU, one launch for the pair whose outputs match kiln-cpu's two ops and
//! the unfused launches'.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{AddRmsNorm, ElementwiseKind, Glu, MatMul, Q8_COPY};
use kiln_core::{plan, Aliasing, Backend, Bindings, BufferId, DType, Graph, Scratch};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::fused_matvec::fusible;

/// A pair's graph and the buffers the caller binds or reads.
struct Pair {
    graph: Graph,
    /// The persistent inputs, in the order [`pair_inputs`] fills them.
    inputs: Vec<BufferId>,
    w: BufferId,
    bias: Option<BufferId>,
    /// The persistent outputs: the norm's sum (for a norm), then the product's out.
    outputs: Vec<BufferId>,
    /// The first op's output, which the product reads.
    row: BufferId,
}

/// The first op's output and its Q8_1 copy, `rows x k`: transient unless `persistent`.
fn row_buffers(g: &mut Graph, rows: usize, k: usize, persistent: bool) -> (BufferId, BufferId) {
    if persistent {
        (
            g.persistent("row", DType::F32, &[rows, k]).unwrap(),
            g.persistent("row_q8", Q8_COPY, &[rows, k]).unwrap(),
        )
    } else {
        (
            g.transient("row", DType::F32, &[rows, k]).unwrap(),
            g.transient("row_q8", Q8_COPY, &[rows, k]).unwrap(),
        )
    }
}

/// Pushes `out = row · wᵀ (+ bias)` for `rows` rows of `k` and an `n x k` weight of
/// `dtype`, reading the row's copy; returns the weight, the bias and out.
#[allow(clippy::too_many_arguments)] // the product's operands and shape, each named
fn push_product(
    g: &mut Graph,
    row: (BufferId, BufferId),
    dtype: DType,
    rows: usize,
    n: usize,
    k: usize,
    bias: bool,
) -> (BufferId, Option<BufferId>, BufferId) {
    let w = g.persistent("w", dtype, &[n, k]).unwrap();
    let bias = bias.then(|| g.persistent("bias", DType::F32, &[n]).unwrap());
    let out = g.persistent("out", DType::F32, &[rows, n]).unwrap();
    g.push(MatMul {
        x: row.0,
        x_q8: Some(row.1),
        w,
        bias,
        out,
        m: rows,
        n,
        k,
    })
    .unwrap();
    (w, bias, out)
}

/// `sum = x + residual`, `row = RmsNorm(sum)` with its Q8_1 copy, `out = row · wᵀ
/// (+ bias)` for `rows` rows of `k` and an `n x k` weight of `dtype`; the norm's
/// outputs are transient unless `row_persistent`.
fn norm_pair(
    dtype: DType,
    rows: usize,
    n: usize,
    k: usize,
    bias: bool,
    row_persistent: bool,
) -> Pair {
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[rows, k]).unwrap();
    let residual = g.persistent("residual", DType::F32, &[rows, k]).unwrap();
    let norm_weight = g.persistent("norm_weight", DType::F32, &[k]).unwrap();
    let sum = g.persistent("sum", DType::F32, &[rows, k]).unwrap();
    let row = row_buffers(&mut g, rows, k, row_persistent);
    g.push(AddRmsNorm {
        x,
        residual,
        weight: Some(norm_weight),
        sum,
        out: row.0,
        out_q8: Some(row.1),
        rows,
        dim: k,
        eps: 1e-5,
    })
    .unwrap();
    let (w, bias, out) = push_product(&mut g, row, dtype, rows, n, k, bias);
    Pair {
        graph: g,
        inputs: vec![x, residual, norm_weight],
        w,
        bias,
        outputs: vec![sum, out],
        row: row.0,
    }
}

/// `row = f(gate, partner)` (a [`Glu`] of `kind` over `x = [gate | partner]`) with its
/// Q8_1 copy, `out = row · wᵀ (+ bias)`, as [`norm_pair`].
#[allow(clippy::too_many_arguments)] // the pair's kind, shape and options, each named
fn glu_pair(
    kind: ElementwiseKind,
    dtype: DType,
    rows: usize,
    n: usize,
    k: usize,
    bias: bool,
    row_persistent: bool,
) -> Pair {
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[rows, 2 * k]).unwrap();
    let row = row_buffers(&mut g, rows, k, row_persistent);
    g.push(Glu {
        kind,
        x,
        out: row.0,
        out_q8: Some(row.1),
        rows,
        n: k,
    })
    .unwrap();
    let (w, bias, out) = push_product(&mut g, row, dtype, rows, n, k, bias);
    Pair {
        graph: g,
        inputs: vec![x],
        w,
        bias,
        outputs: vec![out],
        row: row.0,
    }
}

/// Both kinds of pair of the same shape, with a SwiGLU unit.
fn pairs(dtype: DType, rows: usize, n: usize, k: usize, bias: bool, persistent: bool) -> [Pair; 2] {
    [
        norm_pair(dtype, rows, n, k, bias, persistent),
        glu_pair(
            ElementwiseKind::SiluMul,
            dtype,
            rows,
            n,
            k,
            bias,
            persistent,
        ),
    ]
}

#[test]
fn a_one_row_op_read_only_by_its_resident_product_is_fused() {
    for (dtype, n, k) in [
        (DType::Q4_0, 4096, 4096),
        (DType::Q4K, 1031, 2048),
        (DType::Q6K, 28672, 4096),
        (DType::Q8_0, 4096, 14336),
    ] {
        let mut cases = vec![("norm".to_string(), norm_pair(dtype, 1, n, k, true, false))];
        for kind in [ElementwiseKind::SiluMul, ElementwiseKind::GeluMul] {
            let pair = glu_pair(kind, dtype, 1, n, k, true, false);
            cases.push((kind.name().to_string(), pair));
        }
        for (what, p) in cases {
            assert!(fusible(&p.graph, 0).is_some(), "{what} {dtype} {n}x{k}");
            assert!(fusible(&p.graph, 1).is_none(), "the product starts no pair");
        }
    }
}

#[test]
fn pairs_the_fused_kernel_cannot_stand_for_are_not_fused() {
    let not_fused = |p: &Pair, what: &str| assert!(fusible(&p.graph, 0).is_none(), "{what}");
    for (i, name) in ["norm", "glu"].into_iter().enumerate() {
        let case = |dtype, rows, n, k, persistent| {
            let [norm, glu] = pairs(dtype, rows, n, k, false, persistent);
            [norm, glu].into_iter().nth(i).unwrap()
        };
        not_fused(
            &case(DType::Q4_0, 2, 4096, 4096, false),
            &format!("{name}: two rows"),
        );
        not_fused(
            &case(DType::F16, 1, 4096, 4096, false),
            &format!("{name}: a dtype without the resident kernel"),
        );
        not_fused(
            &case(DType::Q4_0, 1, 1000, 4096, false),
            &format!("{name}: fewer rows than the resident kernel takes"),
        );
        not_fused(
            &case(DType::Q4_0, 1, 4096, 4096, true),
            &format!("{name}: its output is persistent (the caller may read it)"),
        );
        not_fused(
            &case(DType::Q4_0, 1, 4096, 4064, false),
            &format!("{name}: k not a multiple of 128"),
        );
        let mut read_twice = case(DType::Q4_0, 1, 4096, 4096, false);
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
                x: read_twice.row,
                x_q8: None,
                w: w2,
                bias: None,
                out: other,
                m: 1,
                n: 1024,
                k: 4096,
            })
            .unwrap();
        not_fused(
            &read_twice,
            &format!("{name}: its output is read by another op too"),
        );
    }
    not_fused(
        &norm_pair(DType::Q4_0, 1, 1031, 14336, false, false),
        "a norm's row longer than a small block's registers hold (8192)",
    );
    not_fused(
        &glu_pair(
            ElementwiseKind::SigmoidMul,
            DType::Q4_0,
            1,
            4096,
            4096,
            false,
            false,
        ),
        "a gated unit's kind without a fused kernel",
    );
}

/// The compiled pair's launch keys with the fusions on or off.
fn launches(cuda: &kiln_cuda::CudaBackend, p: &Pair, fuse: bool) -> Vec<String> {
    cuda.set_fuse_norms(fuse);
    cuda.set_fuse_glu(fuse);
    let memory = plan(&p.graph, Aliasing::On);
    let mut scratch = Scratch::new();
    scratch.ensure(cuda, &memory).unwrap();
    let ids: Vec<BufferId> = p
        .inputs
        .iter()
        .chain([&p.w])
        .chain(&p.outputs)
        .chain(&p.bias)
        .copied()
        .collect();
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
    cuda.set_fuse_norms(true);
    cuda.set_fuse_glu(true);
    exe.launches().iter().map(|l| l.key().to_string()).collect()
}

/// Random inputs of `p` (`k` elements per row of x and residual, the gated unit's x
/// of `2 k`), its weight of `dtype` and bias.
fn pair_inputs(
    rng: &mut rand::rngs::StdRng,
    p: &Pair,
    dtype: DType,
    n: usize,
    k: usize,
) -> Vec<(BufferId, Vec<u8>)> {
    let mut inputs: Vec<(BufferId, Vec<u8>)> = match p.inputs.as_slice() {
        &[x, residual, norm_weight] => vec![
            (x, f32_bytes(&uniform(rng, k, 2.0))),
            (residual, f32_bytes(&uniform(rng, k, 2.0))),
            (norm_weight, f32_bytes(&uniform(rng, k, 1.5))),
        ],
        // Gates over [-6, 6), where SiLU and GELU bend.
        &[x] => vec![(x, f32_bytes(&uniform(rng, 2 * k, 6.0)))],
        other => panic!("a pair with inputs {other:?}"),
    };
    inputs.push((p.w, encoded(rng, dtype, n * k)));
    if let Some(b) = p.bias {
        inputs.push((b, f32_bytes(&uniform(rng, n, 1.0))));
    }
    inputs
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_fused_pair_is_one_launch_and_matches_the_cpu() {
    let cuda = cuda();
    let mut rng = rng("the_fused_pair_is_one_launch_and_matches_the_cpu");
    let dtypes = [
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
    ];
    for dtype in dtypes {
        // Small blocks (fewer than 4096 rows) and large ones; 8192 is two float4s per
        // thread of a large block, eight of a small one; 14336 (the gated unit only)
        // takes a small block's staging four passes.
        let shapes = [
            (1031, 2048, true),
            (4099, 4096, false),
            (1024, 8192, true),
            (1029, 14336, false),
        ];
        for (n, k, bias) in shapes {
            let mut cases = Vec::new();
            if k <= 8192 {
                cases.push(("norm".to_string(), norm_pair(dtype, 1, n, k, bias, false)));
            }
            for kind in [ElementwiseKind::SiluMul, ElementwiseKind::GeluMul] {
                let pair = glu_pair(kind, dtype, 1, n, k, bias, false);
                cases.push((kind.name().to_string(), pair));
            }
            for (name, p) in cases {
                check_fused_pair(
                    cuda,
                    &mut rng,
                    &p,
                    &format!("{name} {dtype} {n}x{k} bias={bias}"),
                    dtype,
                    n,
                    k,
                );
            }
        }
    }
}

/// Asserts that `p` compiles to one fused launch (two unfused), and that its outputs
/// equal the unfused launches' bit for bit and kiln-cpu's within tolerance.
fn check_fused_pair(
    cuda: &kiln_cuda::CudaBackend,
    rng: &mut rand::rngs::StdRng,
    p: &Pair,
    what: &str,
    dtype: DType,
    n: usize,
    k: usize,
) {
    let fused = launches(cuda, p, true);
    assert_eq!(fused.len(), 1, "{what}: {fused:?}");
    assert!(
        fused[0].starts_with("matvec_resident_add_norm|")
            || fused[0].starts_with("matvec_resident_glu|"),
        "{what}: {fused:?}"
    );
    assert_eq!(launches(cuda, p, false).len(), 2, "{what} unfused");
    let inputs = pair_inputs(rng, p, dtype, n, k);
    let want = run_on(&CpuBackend, &p.graph, &inputs, &p.outputs, Aliasing::On).unwrap();
    let got = run_on(cuda, &p.graph, &inputs, &p.outputs, Aliasing::On).unwrap();
    cuda.set_fuse_norms(false);
    cuda.set_fuse_glu(false);
    let unfused = run_on(cuda, &p.graph, &inputs, &p.outputs, Aliasing::On);
    cuda.set_fuse_norms(true);
    cuda.set_fuse_glu(true);
    let unfused = unfused.unwrap();
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        let last = i + 1 == p.outputs.len();
        if !last {
            // The norm's sum is one f32 addition on both backends.
            assert_close(&format!("{what} sum"), &f32s(got), &f32s(want), 1e-12);
            continue;
        }
        // A norm's scale differs from the CPU's by a few ulp (another summation
        // order), and the GPU's expf from the CPU's exp by an ulp or two, either of
        // which can move an activation across a Q8_1 rounding boundary: each such
        // move is about 6e-8 of NMSE at these sizes, and rare.
        assert_close(&format!("{what} out"), &f32s(got), &f32s(want), 1e-6);
    }
    if p.outputs.len() == 1 {
        // The gated unit rounds the same f32 values to the same copy as the unfused
        // kernel, and the product sums them in the same order.
        assert_eq!(got, unfused, "{what}: fused and unfused launches differ");
    }
}
