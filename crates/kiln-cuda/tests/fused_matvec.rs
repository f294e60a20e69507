//! A one-row residual add and RMSNorm fused into the resident mat-vec that reads its
//! Q8_1 copy: which pairs of a graph are fused (no GPU needed), and on the GPU, one
//! launch for the pair whose sum and product match kiln-cpu's two ops.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{AddRmsNorm, MatMul, Q8_COPY};
use kiln_core::{Aliasing, BufferId, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::norm_matvec::fusible;

/// The buffers of [`pair`]'s graph the caller binds or reads.
struct Pair {
    graph: Graph,
    x: BufferId,
    residual: BufferId,
    norm_weight: BufferId,
    w: BufferId,
    bias: Option<BufferId>,
    sum: BufferId,
    out: BufferId,
    normed: BufferId,
}

/// `sum = x + residual`, `normed = RmsNorm(sum)` with its Q8_1 copy, `out = normed · wᵀ
/// (+ bias)` for `rows` rows of `k` and an `n x k` weight of `dtype`; the norm's
/// outputs are transient unless `normed_persistent`.
fn pair(
    dtype: DType,
    rows: usize,
    n: usize,
    k: usize,
    bias: bool,
    normed_persistent: bool,
) -> Pair {
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[rows, k]).unwrap();
    let residual = g.persistent("residual", DType::F32, &[rows, k]).unwrap();
    let norm_weight = g.persistent("norm_weight", DType::F32, &[k]).unwrap();
    let w = g.persistent("w", dtype, &[n, k]).unwrap();
    let bias = bias.then(|| g.persistent("bias", DType::F32, &[n]).unwrap());
    let sum = g.persistent("sum", DType::F32, &[rows, k]).unwrap();
    let out = g.persistent("out", DType::F32, &[rows, n]).unwrap();
    let (normed, normed_q8) = if normed_persistent {
        (
            g.persistent("normed", DType::F32, &[rows, k]).unwrap(),
            g.persistent("normed_q8", Q8_COPY, &[rows, k]).unwrap(),
        )
    } else {
        (
            g.transient("normed", DType::F32, &[rows, k]).unwrap(),
            g.transient("normed_q8", Q8_COPY, &[rows, k]).unwrap(),
        )
    };
    g.push(AddRmsNorm {
        x,
        residual,
        weight: Some(norm_weight),
        sum,
        out: normed,
        out_q8: Some(normed_q8),
        rows,
        dim: k,
        eps: 1e-5,
    })
    .unwrap();
    g.push(MatMul {
        x: normed,
        x_q8: Some(normed_q8),
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
        residual,
        norm_weight,
        w,
        bias,
        sum,
        out,
        normed,
    }
}

#[test]
fn a_one_row_norm_read_only_by_its_resident_product_is_fused() {
    for (dtype, n, k) in [
        (DType::Q4_0, 4096, 4096),
        (DType::Q4K, 1031, 2048),
        (DType::Q6K, 28672, 4096),
    ] {
        let p = pair(dtype, 1, n, k, true, false);
        assert!(fusible(&p.graph, 0).is_some(), "{dtype} {n}x{k}");
        assert!(fusible(&p.graph, 1).is_none(), "the product starts no pair");
    }
}

#[test]
fn pairs_the_fused_kernel_cannot_stand_for_are_not_fused() {
    let not_fused = |p: &Pair, what: &str| assert!(fusible(&p.graph, 0).is_none(), "{what}");
    not_fused(&pair(DType::Q4_0, 2, 4096, 4096, false, false), "two rows");
    not_fused(
        &pair(DType::F16, 1, 4096, 4096, false, false),
        "a dtype without the resident kernel",
    );
    not_fused(
        &pair(DType::Q4_0, 1, 1000, 4096, false, false),
        "fewer rows than the resident kernel takes",
    );
    not_fused(
        &pair(DType::Q4_0, 1, 4096, 4096, false, true),
        "the norm's output is persistent (the caller may read it)",
    );
    not_fused(
        &pair(DType::Q4_0, 1, 4096, 4064, false, false),
        "k not a multiple of 128",
    );
    let mut read_twice = pair(DType::Q4_0, 1, 4096, 4096, false, false);
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
            x: read_twice.normed,
            x_q8: None,
            w: w2,
            bias: None,
            out: other,
            m: 1,
            n: 1024,
            k: 4096,
        })
        .unwrap();
    not_fused(&read_twice, "the norm's output is read by another op too");
}

/// The compiled pair's launches with the fusion on or off.
fn launches(cuda: &kiln_cuda::CudaBackend, p: &Pair, fuse: bool) -> Vec<String> {
    cuda.set_fuse_norms(fuse);
    let launches = compiled_launches(cuda, &p.graph);
    cuda.set_fuse_norms(true);
    launches.into_iter().map(|(key, _)| key).collect()
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
        DType::Q1_0,
        DType::Q2_0,
        DType::TQ2_0,
    ];
    for dtype in dtypes {
        // Small blocks (fewer than 4096 rows) and large ones; 8192 is two float4s per
        // thread of a large block, eight of a small one.
        for (n, k, bias) in [(1031, 2048, true), (4099, 4096, false), (1024, 8192, true)] {
            let p = pair(dtype, 1, n, k, bias, false);
            let what = format!("{dtype} {n}x{k} bias={bias}");
            let fused = launches(cuda, &p, true);
            assert_eq!(fused.len(), 1, "{what}: {fused:?}");
            assert!(
                fused[0].starts_with("matvec_resident_add_norm|"),
                "{what}: {fused:?}"
            );
            assert_eq!(launches(cuda, &p, false).len(), 2, "{what} unfused");
            let mut inputs = vec![
                (p.x, f32_bytes(&uniform(&mut rng, k, 2.0))),
                (p.residual, f32_bytes(&uniform(&mut rng, k, 2.0))),
                (p.norm_weight, f32_bytes(&uniform(&mut rng, k, 1.5))),
                (p.w, encoded(&mut rng, dtype, n * k)),
            ];
            if let Some(b) = p.bias {
                inputs.push((b, f32_bytes(&uniform(&mut rng, n, 1.0))));
            }
            let outputs = [p.sum, p.out];
            let want = run_on(&CpuBackend, &p.graph, &inputs, &outputs, Aliasing::On).unwrap();
            let got = run_on(cuda, &p.graph, &inputs, &outputs, Aliasing::On).unwrap();
            // The sum is one f32 addition on both backends.
            assert_close(
                &format!("{what} sum"),
                &f32s(&got[0]),
                &f32s(&want[0]),
                1e-12,
            );
            // The norm's scale differs from the CPU's by a few ulp (another summation
            // order), which can move an activation across a Q8_1 rounding boundary:
            // each such move is about 6e-8 of NMSE at these sizes, and rare.
            assert_close(
                &format!("{what} out"),
                &f32s(&got[1]),
                &f32s(&want[1]),
                1e-6,
            );
        }
    }
}
