//! One-row products of the same activation row side by side in one resident mat-vec
//! launch: which runs of a graph are fused (no GPU needed), and on the GPU, one launch
//! whose outputs match kiln-cpu's products, and the unfused launches' bits for the
//! products the resident kernel runs alone too.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{AddRmsNorm, MatMul, Q8_COPY};
use kiln_core::{Aliasing, BufferId, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::fusion::{specs_for_graph, Fusion, Fusions};
use kiln_cuda::ops::sibling_matvec::fusible;

/// Qwen3-Next's linear-attention projections of one token's normed row: q-k-v
/// (8192 rows), the output gate (4096), beta and alpha (32 each), of 2048 columns.
const QWEN3_NEXT: [usize; 4] = [8192, 4096, 32, 32];

/// The buffers of [`siblings`]'s graph the caller binds or reads.
struct Siblings {
    graph: Graph,
    x: BufferId,
    x_q8: BufferId,
    /// Each product's weight, bias and output.
    products: Vec<(BufferId, Option<BufferId>, BufferId)>,
}

/// Products of one row of `k` (x and its Q8_1 copy) by weights of `dtype` of `rows[s]`
/// rows each, product s with a bias when `bias(s)`, then a product of another dtype
/// when `then` is given (which no run may take). Outputs are persistent.
fn siblings(
    dtype: DType,
    rows: &[usize],
    k: usize,
    bias: impl Fn(usize) -> bool,
    then: Option<DType>,
) -> Siblings {
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[1, k]).unwrap();
    let x_q8 = g.persistent("x_q8", Q8_COPY, &[1, k]).unwrap();
    let mut products = Vec::new();
    let all = rows
        .iter()
        .map(|&n| (n, dtype))
        .chain(then.map(|d| (1024, d)));
    for (s, (n, dtype)) in all.enumerate() {
        let w = g.persistent(format!("w{s}"), dtype, &[n, k]).unwrap();
        let b = bias(s).then(|| g.persistent(format!("b{s}"), DType::F32, &[n]).unwrap());
        let out = g
            .persistent(format!("out{s}"), DType::F32, &[1, n])
            .unwrap();
        g.push(MatMul {
            x,
            x_q8: Some(x_q8),
            w,
            bias: b,
            out,
            m: 1,
            n,
            k,
        })
        .unwrap();
        products.push((w, b, out));
    }
    Siblings {
        graph: g,
        x,
        x_q8,
        products,
    }
}

/// How many ops `fusible` takes at `index`.
fn taken(graph: &Graph, index: usize) -> Option<usize> {
    fusible(graph, index).map(|run| run.products.len())
}

#[test]
fn consecutive_products_of_one_row_are_fused_up_to_four() {
    let none = |_| false;
    let p = siblings(DType::Q4_0, &QWEN3_NEXT, 2048, none, None);
    assert_eq!(taken(&p.graph, 0), Some(4));
    assert_eq!(
        taken(&p.graph, 1),
        Some(3),
        "the last three, from the second"
    );
    assert_eq!(taken(&p.graph, 2), None, "the last two: 64 rows");
    assert_eq!(taken(&p.graph, 3), None, "one product alone");
    let five = siblings(
        DType::Q8_0,
        &[1024, 512, 64, 64, 300],
        1024,
        |s| s % 2 == 0,
        None,
    );
    assert_eq!(taken(&five.graph, 0), Some(4), "at most four");
    let two = siblings(DType::Q4K, &[700, 400], 1024, none, None);
    assert_eq!(taken(&two.graph, 0), Some(2), "1100 rows together");
    let mixed = siblings(DType::Q4_0, &[4096, 4096], 2048, none, Some(DType::Q8_0));
    assert_eq!(
        taken(&mixed.graph, 0),
        Some(2),
        "not the product of another dtype"
    );
}

#[test]
fn products_the_fused_kernel_cannot_stand_for_are_not_fused() {
    let none = |_| false;
    let few = siblings(DType::Q4_0, &[300, 300], 2048, none, None);
    assert_eq!(
        taken(&few.graph, 0),
        None,
        "fewer rows than the resident kernel takes"
    );
    let dense = siblings(DType::F16, &[4096, 4096], 2048, none, None);
    assert_eq!(
        taken(&dense.graph, 0),
        None,
        "a dtype without the resident kernel"
    );
    // A second product of another row, then one reading the first's output.
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[1, 1024]).unwrap();
    let x_q8 = g.persistent("x_q8", Q8_COPY, &[1, 1024]).unwrap();
    let other = g.persistent("other", DType::F32, &[1, 1024]).unwrap();
    let other_q8 = g.persistent("other_q8", Q8_COPY, &[1, 1024]).unwrap();
    let out = |g: &mut Graph, name: &str| g.persistent(name, DType::F32, &[1, 1024]).unwrap();
    let weight =
        |g: &mut Graph, name: &str| g.persistent(name, DType::Q4_0, &[1024, 1024]).unwrap();
    let (w0, w1) = (weight(&mut g, "w0"), weight(&mut g, "w1"));
    let (o0, o1) = (out(&mut g, "o0"), out(&mut g, "o1"));
    for (x, x_q8, w, out) in [(x, x_q8, w0, o0), (other, other_q8, w1, o1)] {
        g.push(MatMul {
            x,
            x_q8: Some(x_q8),
            w,
            bias: None,
            out,
            m: 1,
            n: 1024,
            k: 1024,
        })
        .unwrap();
    }
    assert_eq!(taken(&g, 0), None, "products of two rows");
}

#[test]
fn a_graphs_kernels_include_the_siblings_kernel_when_switched_on() {
    let p = siblings(DType::Q4_0, &QWEN3_NEXT, 2048, |_| false, None);
    let keys = |fusions| -> Vec<String> {
        specs_for_graph(&p.graph, fusions)
            .unwrap()
            .into_iter()
            .map(|s| s.key)
            .collect()
    };
    let on = keys(Fusions::NONE.with(Fusion::Siblings, true));
    assert_eq!(on.len(), 1, "{on:?}");
    assert!(
        on[0].starts_with("matvec_resident_siblings|w=q4_0|"),
        "{on:?}"
    );
    assert!(keys(Fusions::all().with(Fusion::Siblings, false)).is_empty());
}

#[test]
fn a_planned_layers_sibling_outputs_are_bound_apart() {
    // A norm whose copy four products read (so the norm is not fused), their outputs
    // transient and read after the run.
    let (k, rows) = (2048, QWEN3_NEXT);
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[1, k]).unwrap();
    let residual = g.persistent("residual", DType::F32, &[1, k]).unwrap();
    let norm_weight = g.persistent("norm_weight", DType::F32, &[k]).unwrap();
    let sum = g.persistent("sum", DType::F32, &[1, k]).unwrap();
    let normed = g.transient("normed", DType::F32, &[1, k]).unwrap();
    let normed_q8 = g.transient("normed_q8", Q8_COPY, &[1, k]).unwrap();
    g.push(AddRmsNorm {
        x,
        residual,
        weight: Some(norm_weight),
        sum,
        out: normed,
        out_q8: Some(normed_q8),
        rows: 1,
        dim: k,
        eps: 1e-5,
    })
    .unwrap();
    let mut outs = Vec::new();
    for (s, n) in rows.into_iter().enumerate() {
        let w = g.persistent(format!("w{s}"), DType::Q4_0, &[n, k]).unwrap();
        let out = g.transient(format!("out{s}"), DType::F32, &[1, n]).unwrap();
        g.push(MatMul {
            x: normed,
            x_q8: Some(normed_q8),
            w,
            bias: None,
            out,
            m: 1,
            n,
            k,
        })
        .unwrap();
        outs.push(out);
    }
    // Read every output after the run: a cast of each into a persistent buffer.
    for (s, (&out, n)) in outs.iter().zip(rows).enumerate() {
        let kept = g
            .persistent(format!("kept{s}"), DType::F16, &[1, n])
            .unwrap();
        g.push(kiln_core::ops::Cast {
            x: out,
            out: kept,
            len: n,
        })
        .unwrap();
    }
    let run = fusible(&g, 1).expect("the four products are a run");
    let (apart, _, _) = with_persistent_bound(&CpuBackend, &g, &[], Aliasing::On, |bindings| {
        Ok(kiln_cuda::ops::sibling_matvec::operands_apart(
            &run, bindings,
        ))
    })
    .unwrap();
    assert!(apart, "the planner gave the run's operands shared memory");
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_fused_siblings_are_one_launch_and_match_the_cpu() {
    let cuda = own_cuda();
    let mut rng = rng("the_fused_siblings_are_one_launch_and_match_the_cpu");
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
    // Qwen3-Next's four; three of odd sizes with a bias on the first; two that only
    // together reach the resident kernel's rows.
    let cases: [(&[usize], usize); 3] = [
        (&QWEN3_NEXT, 2048),
        (&[1031, 24, 1000], 1024),
        (&[700, 400], 4096),
    ];
    for dtype in dtypes {
        for &(rows, k) in &cases {
            let p = siblings(dtype, rows, k, |s| s == 0 && rows.len() == 3, None);
            let what = format!("{dtype} {rows:?} x {k}");
            let x = uniform(&mut rng, k, 2.0);
            let mut copy = vec![0u8; Q8_COPY.bytes_for(k).unwrap()];
            kiln_core::quant::quantize(Q8_COPY, &x, &mut copy).unwrap();
            let mut inputs = vec![(p.x, f32_bytes(&x)), (p.x_q8, copy)];
            for (&(w, b, _), &n) in p.products.iter().zip(rows) {
                inputs.push((w, encoded(&mut rng, dtype, n * k)));
                if let Some(b) = b {
                    inputs.push((b, f32_bytes(&uniform(&mut rng, n, 1.0))));
                }
            }
            let outputs: Vec<BufferId> = p.products.iter().map(|&(_, _, o)| o).collect();
            cuda.set_fusion(Fusion::Siblings, true);
            let fused = compiled_launches(&cuda, &p.graph);
            assert_eq!(fused.len(), 1, "{what}: {fused:?}");
            assert!(
                fused[0].0.starts_with("matvec_resident_siblings|"),
                "{what}: {fused:?}"
            );
            let got = run_on(&cuda, &p.graph, &inputs, &outputs, Aliasing::On).unwrap();
            cuda.set_fusion(Fusion::Siblings, false);
            let alone = run_on(&cuda, &p.graph, &inputs, &outputs, Aliasing::On).unwrap();
            let want = run_on(&CpuBackend, &p.graph, &inputs, &outputs, Aliasing::On).unwrap();
            for (s, &n) in rows.iter().enumerate() {
                let what = format!("{what} product {s}");
                // The copy's values are the definition's operands: the sums differ in
                // order only.
                assert_close(&what, &f32s(&got[s]), &f32s(&want[s]), 1e-9);
                // A product of 1024 rows and more runs on the resident kernel alone too,
                // whose row sums do not depend on the launch.
                if n >= 1024 {
                    assert_eq!(got[s], alone[s], "{what}: fused and alone differ");
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn sibling_launch_arguments_out_of_range_are_rejected() {
    use kiln_cuda::ops::sibling_matvec::{sibling_matvec, Sibling};
    let cuda = cuda();
    let (n, k) = (1024, 1024);
    let mut rng = rng("sibling_launch_arguments_out_of_range_are_rejected");
    let w = device_weight(
        cuda,
        &encoded(&mut rng, DType::Q4_0, n * k),
        DType::Q4_0,
        &[n, k],
    );
    let copy = device(cuda, &vec![0u8; Q8_COPY.bytes_for(k).unwrap()]);
    let mut outs: Vec<_> = (0..5).map(|_| device(cuda, &poison(4 * n))).collect();
    fn siblings<'a>(
        w: &'a kiln_cuda::CudaBuffer,
        outs: &'a mut [kiln_cuda::CudaBuffer],
        n: usize,
    ) -> Vec<Sibling<'a>> {
        outs.iter_mut()
            .map(|out| Sibling {
                w,
                bias: None,
                out,
                n,
            })
            .collect()
    }
    for count in [1, 5] {
        let m = invalid(sibling_matvec(
            cuda,
            &copy,
            DType::Q4_0,
            k,
            siblings(&w, &mut outs[..count], n),
        ));
        assert!(m.contains("2 to 4 products"), "{count}: {m}");
    }
    let mut short = siblings(&w, &mut outs[..2], n);
    short[1].n = n + 1;
    let m = invalid(sibling_matvec(cuda, &copy, DType::Q4_0, k, short));
    assert!(m.contains("w needs"), "{m}");
}
