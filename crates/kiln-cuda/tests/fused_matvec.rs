//! The resident mat-vec fused with a one-row residual add and RMSNorm before it (which
//! reads its Q8_1 copy) and with a one-row Glu after it: which runs of a graph are
//! fused (no GPU needed), and on the GPU, one launch whose outputs match kiln-cpu's
//! ops, and the unfused launches' bit for bit where both compute the same values.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{
    AddRmsNorm, ElementwiseKind, Glu, MatMul, QkNorm, QkvRopeAppend, RopeParams, RopeStyle, Q8_COPY,
};
use kiln_core::{Aliasing, BufferId, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::fusion::Fusion;
use kiln_cuda::ops::fused_matvec::{Fusions, FUSED_GLU_KINDS};

/// The weight dtypes of the resident mat-vec.
const RESIDENT_DTYPES: [DType; 11] = [
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

/// Every fusion allowed.
const ALL: Fusions = Fusions {
    norms: true,
    glus: true,
    ropes: true,
};

/// Whether `fusible` finds a run at `index` of `graph` with every fusion allowed, and
/// how many ops it covers.
fn fused_ops(graph: &Graph, index: usize) -> Option<usize> {
    kiln_cuda::ops::fused_matvec::fusible(graph, index, ALL).map(|f| f.ops())
}

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
        assert_eq!(fused_ops(&p.graph, 0), Some(2), "{dtype} {n}x{k}");
        assert_eq!(fused_ops(&p.graph, 1), None, "the product alone is no run");
    }
}

#[test]
fn pairs_the_fused_kernel_cannot_stand_for_are_not_fused() {
    let not_fused = |p: &Pair, what: &str| assert_eq!(fused_ops(&p.graph, 0), None, "{what}");
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
fn launches(cuda: &kiln_cuda::CudaBackend, graph: &Graph, fuse: bool) -> Vec<String> {
    cuda.set_fusion(Fusion::Norms, fuse);
    let launches = compiled_launches(cuda, graph);
    cuda.set_fusion(Fusion::Norms, true);
    launches.into_iter().map(|(key, _)| key).collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_fused_pair_is_one_launch_and_matches_the_cpu() {
    let cuda = cuda();
    let mut rng = rng("the_fused_pair_is_one_launch_and_matches_the_cpu");
    for dtype in RESIDENT_DTYPES {
        // Small blocks (fewer than 4096 rows) and large ones; 8192 is two float4s per
        // thread of a large block, eight of a small one.
        for (n, k, bias) in [(1031, 2048, true), (4099, 4096, false), (1024, 8192, true)] {
            let p = pair(dtype, 1, n, k, bias, false);
            let what = format!("{dtype} {n}x{k} bias={bias}");
            let fused = launches(cuda, &p.graph, true);
            assert_eq!(fused.len(), 1, "{what}: {fused:?}");
            assert!(
                fused[0].starts_with("matvec_resident_add_norm|"),
                "{what}: {fused:?}"
            );
            assert_eq!(launches(cuda, &p.graph, false).len(), 2, "{what} unfused");
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

/// The row a fused product reads: `RmsNorm(x + residual)` rounded to Q8_1 (both
/// transient), or x's Q8_1 copy given; and the buffers the caller binds or reads.
struct Staged {
    x: BufferId,
    /// x's copy, when there is no norm.
    x_q8: Option<BufferId>,
    /// The norm's residual, weight and sum, when there is one.
    norm: Option<[BufferId; 3]>,
    /// The product's `x` and `x_q8`.
    row: BufferId,
    row_q8: BufferId,
}

/// A row of `k` for a product in `g`: with the norm (pushed) when `norm`, else x's
/// copy.
fn staged(g: &mut Graph, k: usize, norm: bool) -> Staged {
    let x = g.persistent("x", DType::F32, &[1, k]).unwrap();
    if !norm {
        let x_q8 = g.persistent("x_q8", Q8_COPY, &[1, k]).unwrap();
        return Staged {
            x,
            x_q8: Some(x_q8),
            norm: None,
            row: x,
            row_q8: x_q8,
        };
    }
    let residual = g.persistent("residual", DType::F32, &[1, k]).unwrap();
    let weight = g.persistent("norm_weight", DType::F32, &[k]).unwrap();
    let sum = g.persistent("sum", DType::F32, &[1, k]).unwrap();
    let normed = g.transient("normed", DType::F32, &[1, k]).unwrap();
    let normed_q8 = g.transient("normed_q8", Q8_COPY, &[1, k]).unwrap();
    g.push(AddRmsNorm {
        x,
        residual,
        weight: Some(weight),
        sum,
        out: normed,
        out_q8: Some(normed_q8),
        rows: 1,
        dim: k,
        eps: 1e-5,
    })
    .unwrap();
    Staged {
        x,
        x_q8: None,
        norm: Some([residual, weight, sum]),
        row: normed,
        row_q8: normed_q8,
    }
}

/// Random inputs of `s` (a row of `k`): x, and its copy or the norm's residual and
/// weight.
fn staged_inputs(rng: &mut rand::rngs::StdRng, s: &Staged, k: usize) -> Vec<(BufferId, Vec<u8>)> {
    let x = uniform(rng, k, 2.0);
    let mut inputs = vec![(s.x, f32_bytes(&x))];
    if let Some(x_q8) = s.x_q8 {
        let mut copy = vec![0u8; Q8_COPY.bytes_for(k).unwrap()];
        kiln_core::quant::quantize(Q8_COPY, &x, &mut copy).unwrap();
        inputs.push((x_q8, copy));
    }
    if let Some([residual, weight, _]) = s.norm {
        inputs.push((residual, f32_bytes(&uniform(rng, k, 2.0))));
        inputs.push((weight, f32_bytes(&uniform(rng, k, 1.5))));
    }
    inputs
}

/// `row · wᵀ (+ bias)` of `staged`'s row by a weight of `dtype` of `n` rows into a
/// new persistent `out`; returns the weight, the bias and `out`.
fn product(
    g: &mut Graph,
    staged: &Staged,
    dtype: DType,
    n: usize,
    k: usize,
    bias: bool,
    out_name: &str,
) -> (BufferId, Option<BufferId>, BufferId) {
    let w = g.persistent("w", dtype, &[n, k]).unwrap();
    let bias = bias.then(|| g.persistent("bias", DType::F32, &[n]).unwrap());
    let out = g.persistent(out_name, DType::F32, &[1, n]).unwrap();
    g.push(MatMul {
        x: staged.row,
        x_q8: Some(staged.row_q8),
        w,
        bias,
        out,
        m: 1,
        n,
        k,
    })
    .unwrap();
    (w, bias, out)
}

/// The buffers of [`gated`]'s graph the caller binds or reads.
struct Gated {
    graph: Graph,
    staged: Staged,
    w: BufferId,
    bias: Option<BufferId>,
    gate_up: BufferId,
    act: BufferId,
    act_q8: BufferId,
}

/// `gate_up = row · wᵀ (+ bias)` for a `2 half x k` weight of `dtype`, then `act =
/// kind(gate, up)` with its Q8_1 copy, for one row ([`staged`]: with the norm when
/// `norm`). The product's and the Glu's outputs are persistent.
fn gated(
    dtype: DType,
    half: usize,
    k: usize,
    bias: bool,
    norm: bool,
    kind: ElementwiseKind,
) -> Gated {
    let mut g = Graph::new();
    let staged = staged(&mut g, k, norm);
    let (w, bias, gate_up) = product(&mut g, &staged, dtype, 2 * half, k, bias, "gate_up");
    let act = g.persistent("act", DType::F32, &[1, half]).unwrap();
    let act_q8 = g.persistent("act_q8", Q8_COPY, &[1, half]).unwrap();
    g.push(Glu {
        kind,
        x: gate_up,
        out: act,
        out_q8: Some(act_q8),
        rows: 1,
        n: half,
    })
    .unwrap();
    Gated {
        graph: g,
        staged,
        w,
        bias,
        gate_up,
        act,
        act_q8,
    }
}

#[test]
fn a_one_row_glu_of_a_resident_gate_up_product_is_fused_with_it() {
    let silu = ElementwiseKind::SiluMul;
    let with_norm = gated(DType::Q4_0, 2048, 4096, false, true, silu);
    assert_eq!(
        fused_ops(&with_norm.graph, 0),
        Some(3),
        "norm, product, glu"
    );
    let only = |norms, glus| Fusions {
        norms,
        glus,
        ropes: false,
    };
    let fusible = kiln_cuda::ops::fused_matvec::fusible;
    assert_eq!(
        fusible(&with_norm.graph, 0, only(true, false)).map(|f| f.ops()),
        Some(2),
        "the glu left out when glus are off"
    );
    assert!(
        fusible(&with_norm.graph, 0, only(false, true)).is_none(),
        "a norm is never fused when norms are off"
    );
    assert_eq!(
        fusible(&with_norm.graph, 1, only(false, true)).map(|f| f.ops()),
        Some(2),
        "with norms off, the product after the norm starts a run with its glu"
    );
    for (dtype, half, k) in [
        (DType::Q4_0, 14336, 4096),
        (DType::Q6K, 1056, 2048),
        (DType::TQ2_0, 4128, 1024),
    ] {
        let p = gated(dtype, half, k, true, false, silu);
        assert_eq!(fused_ops(&p.graph, 0), Some(2), "{dtype} {half}x{k}");
        assert_eq!(fused_ops(&p.graph, 1), None, "a glu alone is no run");
    }
    assert_eq!(
        FUSED_GLU_KINDS,
        [silu],
        "the kinds the cases below leave out"
    );
}

#[test]
fn glus_the_fused_kernel_cannot_stand_for_are_not_fused() {
    let silu = ElementwiseKind::SiluMul;
    let not_fused = |p: &Gated, what: &str| assert_eq!(fused_ops(&p.graph, 0), None, "{what}");
    not_fused(
        &gated(
            DType::Q4_0,
            2048,
            4096,
            false,
            false,
            ElementwiseKind::GeluMul,
        ),
        "a kind without a fused kernel",
    );
    not_fused(
        &gated(DType::F16, 2048, 4096, false, false, silu),
        "a dtype without the resident kernel",
    );
    assert_eq!(
        fused_ops(&uncopied_glu(2040, true), 0),
        None,
        "halves that are not whole Q8_1 blocks"
    );
    assert_eq!(
        fused_ops(&uncopied_glu(2048, true), 0),
        Some(2),
        "the same of 2048"
    );
    assert_eq!(
        fused_ops(&uncopied_glu(2048, false), 0),
        None,
        "a glu of another buffer than the product's out"
    );
}

/// A one-row Q4_0 product of `2 half x 4096` over x's copy, then a SiLU Glu without a
/// copy of the product's out (`of_product`) or of another buffer.
fn uncopied_glu(half: usize, of_product: bool) -> Graph {
    let (n, k) = (2 * half, 4096);
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[1, k]).unwrap();
    let x_q8 = g.persistent("x_q8", Q8_COPY, &[1, k]).unwrap();
    let w = g.persistent("w", DType::Q4_0, &[n, k]).unwrap();
    let gate_up = g.persistent("gate_up", DType::F32, &[1, n]).unwrap();
    let other = g.persistent("other", DType::F32, &[1, n]).unwrap();
    let act = g.persistent("act", DType::F32, &[1, half]).unwrap();
    g.push(MatMul {
        x,
        x_q8: Some(x_q8),
        w,
        bias: None,
        out: gate_up,
        m: 1,
        n,
        k,
    })
    .unwrap();
    g.push(Glu {
        kind: ElementwiseKind::SiluMul,
        x: if of_product { gate_up } else { other },
        out: act,
        out_q8: None,
        rows: 1,
        n: half,
    })
    .unwrap();
    g
}

/// Random inputs of `p` (built by [`gated`] with these sizes): the row's
/// ([`staged_inputs`]), the weight and the bias.
fn gated_inputs(
    rng: &mut rand::rngs::StdRng,
    p: &Gated,
    dtype: DType,
    half: usize,
    k: usize,
) -> Vec<(BufferId, Vec<u8>)> {
    let mut inputs = staged_inputs(rng, &p.staged, k);
    inputs.push((p.w, encoded(rng, dtype, 2 * half * k)));
    if let Some(b) = p.bias {
        inputs.push((b, f32_bytes(&uniform(rng, 2 * half, 1.0))));
    }
    inputs
}

/// The outputs of `p` the tests read: the product's, the Glu's and its copy, and the
/// norm's sum when there is one, with their names.
fn gated_outputs(p: &Gated) -> (Vec<BufferId>, Vec<&'static str>) {
    let mut ids = vec![p.gate_up, p.act, p.act_q8];
    let mut names = vec!["gate_up", "act", "act_q8"];
    if let Some([_, _, sum]) = p.staged.norm {
        ids.push(sum);
        names.push("sum");
    }
    (ids, names)
}

/// A graph whose fused run the tests compare with its unfused launches.
struct Fused<'a> {
    graph: &'a Graph,
    inputs: &'a [(BufferId, Vec<u8>)],
    outputs: &'a [BufferId],
    names: &'a [&'a str],
}

impl Fused<'_> {
    /// Runs the graph on `cuda` with `switch` on, then off: asserts one launch fused
    /// (`matvec_resident_{epilogue}`, with `_add_norm` before the epilogue when `norm`)
    /// and two unfused, and the same bytes of every output both ways. Returns the
    /// fused run's outputs and the CPU backend's.
    fn bit_for_bit(
        &self,
        cuda: &kiln_cuda::CudaBackend,
        switch: impl Fn(bool),
        norm: bool,
        epilogue: &str,
        what: &str,
    ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let on_cuda = || run_on(cuda, self.graph, self.inputs, self.outputs, Aliasing::On).unwrap();
        let entry = format!(
            "matvec_resident{}_{epilogue}|",
            if norm { "_add_norm" } else { "" }
        );
        switch(true);
        let fused = compiled_launches(cuda, self.graph);
        assert_eq!(fused.len(), 1, "{what}: {fused:?}");
        assert!(fused[0].0.starts_with(&entry), "{what}: {fused:?}");
        let got = on_cuda();
        switch(false);
        let unfused = compiled_launches(cuda, self.graph);
        assert_eq!(unfused.len(), 2, "{what} unfused: {unfused:?}");
        let separate = on_cuda();
        for ((name, got), separate) in self.names.iter().zip(&got).zip(&separate) {
            assert_same_bits(&format!("{what} {name}: fused vs unfused"), got, separate);
        }
        let cpu = run_on(
            &CpuBackend,
            self.graph,
            self.inputs,
            self.outputs,
            Aliasing::On,
        )
        .unwrap();
        (got, cpu)
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_fused_glu_is_one_launch_with_the_unfused_bits_and_the_cpus_values() {
    let cuda = own_cuda();
    let mut rng = rng("the_fused_glu_is_one_launch_with_the_unfused_bits_and_the_cpus_values");
    let kind = ElementwiseKind::SiluMul;
    // Small resident blocks (fewer than 4096 rows) and large ones, group counts odd and
    // even, with and without the norm and the bias; the 8B's gate-up for two formats.
    let mut cases = vec![
        (1056, 2048, true, true),
        (1024, 1024, false, false),
        (2080, 4096, false, true),
        (4128, 1024, true, false),
    ];
    for dtype in RESIDENT_DTYPES {
        if matches!(dtype, DType::Q4_0 | DType::Q4K) {
            cases.push((14336, 4096, false, true));
        }
        for &(half, k, bias, norm) in &cases {
            let p = gated(dtype, half, k, bias, norm, kind);
            let what = format!("{dtype} 2x{half}x{k} bias={bias} norm={norm}");
            let inputs = gated_inputs(&mut rng, &p, dtype, half, k);
            let (outputs, names) = gated_outputs(&p);

            let fused = Fused {
                graph: &p.graph,
                inputs: &inputs,
                outputs: &outputs,
                names: &names,
            };
            let switch = |on| cuda.set_fusion(Fusion::Glus, on);
            let (got, want) = fused.bit_for_bit(&cuda, switch, norm, "glu", &what);
            // As the fused norm's test says: a few ulp of the norm's scale can move an
            // activation across a Q8_1 rounding boundary.
            assert_close(
                &format!("{what} gate_up"),
                &f32s(&got[0]),
                &f32s(&want[0]),
                1e-6,
            );
            assert_close(
                &format!("{what} act"),
                &f32s(&got[1]),
                &f32s(&want[1]),
                1e-5,
            );
            assert_q8_copy(&what, &got[1], &got[2]);
        }
        cases.truncate(4);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn back_to_back_fused_glus_leave_their_tickets_ready_for_the_next() {
    let cuda = own_cuda();
    cuda.set_fusion(Fusion::Glus, true);
    let mut rng = rng("back_to_back_fused_glus_leave_their_tickets_ready_for_the_next");
    let (dtype, half, k) = (DType::Q4_0, 2080, 2048);
    let p = gated(dtype, half, k, false, true, ElementwiseKind::SiluMul);
    let (outputs, _) = gated_outputs(&p);
    // Each run's tickets start where the last run left them: a count left over would
    // compute a group's unit early (from values not yet stored) or never (NaN left).
    for run in 0..3 {
        let inputs = gated_inputs(&mut rng, &p, dtype, half, k);
        let got = run_on(&cuda, &p.graph, &inputs, &outputs, Aliasing::On).unwrap();
        let want = run_on(&CpuBackend, &p.graph, &inputs, &outputs, Aliasing::On).unwrap();
        let what = format!("run {run}");
        assert_close(
            &format!("{what} act"),
            &f32s(&got[1]),
            &f32s(&want[1]),
            1e-5,
        );
        assert_q8_copy(&what, &got[1], &got[2]);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_fused_launch_rejects_what_it_cannot_compute() {
    use kiln_cuda::ops::fused_matvec::{
        fused_matvec, EpilogueOperands, GluOperands, ProductOperands, Staging,
    };
    let cuda = cuda();
    let (n, k) = (2048, 1024);
    let mut rng = rng("the_fused_launch_rejects_what_it_cannot_compute");
    let w = device_weight(
        cuda,
        &encoded(&mut rng, DType::Q4_0, n * k),
        DType::Q4_0,
        &[n, k],
    );
    let copy = device(cuda, &vec![0u8; Q8_COPY.bytes_for(k).unwrap()]);
    let mut out = device(cuda, &poison(4 * n));
    let mut act = device(cuda, &poison(4 * n / 2));
    fn product<'a>(
        w: &'a kiln_cuda::CudaBuffer,
        out: &'a mut kiln_cuda::CudaBuffer,
        n: usize,
        k: usize,
    ) -> ProductOperands<'a> {
        ProductOperands {
            w,
            dtype: DType::Q4_0,
            bias: None,
            out,
            n,
            k,
        }
    }
    let nothing = invalid(fused_matvec(
        cuda,
        Staging::Copy(&copy),
        product(&w, &mut out, n, k),
        None,
    ));
    assert!(nothing.contains("nothing to fuse"), "{nothing}");
    let mut short = device(cuda, &poison(4 * (n / 2 - 1)));
    let glu = |out| {
        EpilogueOperands::Glu(GluOperands {
            kind: ElementwiseKind::SiluMul,
            out,
            out_q8: None,
        })
    };
    let too_short = invalid(fused_matvec(
        cuda,
        Staging::Copy(&copy),
        product(&w, &mut out, n, k),
        Some(glu(&mut short)),
    ));
    assert!(too_short.contains("glu out"), "{too_short}");
    let odd = ProductOperands {
        n: n - 32,
        ..product(&w, &mut out, n, k)
    };
    let odd = invalid(fused_matvec(
        cuda,
        Staging::Copy(&copy),
        odd,
        Some(glu(&mut act)),
    ));
    assert!(odd.contains("multiple of 64"), "{odd}");
}

#[test]
fn a_planned_decode_layers_norm_product_and_glu_are_bound_apart() {
    // x = a + b, then the fused run (its norm reading x), then the down product: with
    // aliasing, the Glu's outputs must not take the memory of x or of the norm's sum,
    // which the fused launch reads and writes at its start.
    let (half, k) = (2048, 1024);
    let mut g = Graph::new();
    let a = g.persistent("a", DType::F32, &[1, k]).unwrap();
    let b = g.persistent("b", DType::F32, &[1, k]).unwrap();
    let residual = g.persistent("residual", DType::F32, &[1, k]).unwrap();
    let norm_weight = g.persistent("norm_weight", DType::F32, &[k]).unwrap();
    let w = g.persistent("w", DType::Q4_0, &[2 * half, k]).unwrap();
    let w_down = g.persistent("w_down", DType::Q4_0, &[k, half]).unwrap();
    let out = g.persistent("out", DType::F32, &[1, k]).unwrap();
    let x = g.transient("x", DType::F32, &[1, k]).unwrap();
    let sum = g.transient("sum", DType::F32, &[1, k]).unwrap();
    let normed = g.transient("normed", DType::F32, &[1, k]).unwrap();
    let normed_q8 = g.transient("normed_q8", Q8_COPY, &[1, k]).unwrap();
    let gate_up = g.transient("gate_up", DType::F32, &[1, 2 * half]).unwrap();
    let act = g.transient("act", DType::F32, &[1, half]).unwrap();
    let act_q8 = g.transient("act_q8", Q8_COPY, &[1, half]).unwrap();
    g.push(kiln_core::ops::Elementwise {
        kind: ElementwiseKind::Add,
        a,
        b,
        out: x,
        out_q8: None,
        len: k,
    })
    .unwrap();
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
    g.push(MatMul {
        x: normed,
        x_q8: Some(normed_q8),
        w,
        bias: None,
        out: gate_up,
        m: 1,
        n: 2 * half,
        k,
    })
    .unwrap();
    g.push(Glu {
        kind: ElementwiseKind::SiluMul,
        x: gate_up,
        out: act,
        out_q8: Some(act_q8),
        rows: 1,
        n: half,
    })
    .unwrap();
    g.push(MatMul {
        x: act,
        x_q8: Some(act_q8),
        w: w_down,
        bias: None,
        out,
        m: 1,
        n: k,
        k: half,
    })
    .unwrap();
    let fusion = kiln_cuda::ops::fused_matvec::fusible(&g, 1, ALL).expect("the run is fusible");
    assert_eq!(fusion.ops(), 3);
    let (apart, _, _) = with_persistent_bound(&CpuBackend, &g, &[], Aliasing::On, |bindings| {
        Ok(kiln_cuda::ops::fused_matvec::operands_apart(
            &fusion, bindings,
        ))
    })
    .unwrap();
    assert!(
        apart,
        "the planner gave the fused run's operands shared memory"
    );
}

/// A q-k-v product's shape and its rotation and append: heads, key-value heads, head
/// size, rotated size, style, the per-head norm, frequency factors, cache slots.
#[derive(Clone, Copy, Debug)]
struct Heads {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    style: RopeStyle,
    qk_norm: bool,
    freq_factors: bool,
    n_slots: usize,
}

impl Heads {
    fn rows(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }
}

/// The cache rows of [`rotated`]'s graphs.
const CAPACITY: usize = 37;

/// The buffers of [`rotated`]'s graph the caller binds or reads.
struct Rotated {
    graph: Graph,
    staged: Staged,
    w: BufferId,
    bias: Option<BufferId>,
    qkv: BufferId,
    positions: BufferId,
    slots: Option<BufferId>,
    freq_factors: Option<BufferId>,
    qk_norm: Option<QkNorm>,
    q_out: BufferId,
    k_cache: BufferId,
    v_cache: BufferId,
}

/// `qkv = row · wᵀ (+ bias)` for a weight of `dtype` of `h.rows()` rows of `k`, then
/// the [`QkvRopeAppend`] of that token into caches of `cache` ([`CAPACITY`] rows per
/// slot), for one row ([`staged`]: with the norm when `norm`). Everything the ops
/// write is persistent.
fn rotated(dtype: DType, h: Heads, k: usize, bias: bool, norm: bool, cache: DType) -> Rotated {
    let mut g = Graph::new();
    let staged = staged(&mut g, k, norm);
    let (w, bias, qkv) = product(&mut g, &staged, dtype, h.rows(), k, bias, "qkv");
    let positions = g.persistent("positions", DType::I32, &[1]).unwrap();
    let slots = (h.n_slots > 1).then(|| g.persistent("slots", DType::I32, &[1]).unwrap());
    let freq_factors = h
        .freq_factors
        .then(|| g.persistent("ff", DType::F32, &[h.rotary_dim / 2]).unwrap());
    let qk_norm = h.qk_norm.then(|| QkNorm {
        q_weight: g.persistent("q_norm", DType::F32, &[h.head_dim]).unwrap(),
        k_weight: g.persistent("k_norm", DType::F32, &[h.head_dim]).unwrap(),
        eps: 1e-6,
    });
    let q_out = g
        .persistent("q_out", DType::F32, &[1, h.n_heads, h.head_dim])
        .unwrap();
    let cache_shape = [h.n_slots, h.n_kv_heads, CAPACITY, h.head_dim];
    let k_cache = g.persistent("k_cache", cache, &cache_shape).unwrap();
    let v_cache = g.persistent("v_cache", cache, &cache_shape).unwrap();
    g.push(QkvRopeAppend {
        qkv,
        positions,
        slots,
        freq_factors,
        norm: qk_norm,
        q_out,
        k_cache,
        v_cache,
        n_tokens: 1,
        n_heads: h.n_heads,
        n_kv_heads: h.n_kv_heads,
        capacity: CAPACITY,
        n_slots: h.n_slots,
        params: RopeParams {
            head_dim: h.head_dim,
            rotary_dim: h.rotary_dim,
            base: 500000.0,
            freq_scale: 1.0,
            style: h.style,
        },
    })
    .unwrap();
    Rotated {
        graph: g,
        staged,
        w,
        bias,
        qkv,
        positions,
        slots,
        freq_factors,
        qk_norm,
        q_out,
        k_cache,
        v_cache,
    }
}

/// Llama-3.1-8B's heads, rotated whole in the normal style, one cache slot.
const LLAMA_HEADS: Heads = Heads {
    n_heads: 32,
    n_kv_heads: 8,
    head_dim: 128,
    rotary_dim: 128,
    style: RopeStyle::Normal,
    qk_norm: false,
    freq_factors: false,
    n_slots: 1,
};

#[test]
fn a_one_token_rotation_of_a_resident_qkv_product_is_fused_with_it() {
    let f16 = DType::F16;
    let with_norm = rotated(DType::Q4_0, LLAMA_HEADS, 4096, false, true, f16);
    assert_eq!(
        fused_ops(&with_norm.graph, 0),
        Some(3),
        "norm, product, rotation"
    );
    let fusible = kiln_cuda::ops::fused_matvec::fusible;
    let ropes_off = Fusions {
        norms: true,
        glus: true,
        ropes: false,
    };
    assert_eq!(
        fusible(&with_norm.graph, 0, ropes_off).map(|f| f.ops()),
        Some(2),
        "the rotation left out when ropes are off"
    );
    let qwen3 = Heads {
        n_heads: 14,
        n_kv_heads: 2,
        style: RopeStyle::NeoX,
        qk_norm: true,
        n_slots: 3,
        ..LLAMA_HEADS
    };
    let p = rotated(DType::Q8_0, qwen3, 1024, true, false, f16);
    assert_eq!(fused_ops(&p.graph, 0), Some(2), "product and rotation");
    assert_eq!(fused_ops(&p.graph, 1), None, "a rotation alone is no run");
    let f32_cache = rotated(DType::Q4_0, LLAMA_HEADS, 4096, false, false, DType::F32);
    assert_eq!(
        fused_ops(&f32_cache.graph, 0),
        None,
        "caches of a dtype without a fused kernel"
    );
    let narrow = Heads {
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 64,
        rotary_dim: 64,
        ..LLAMA_HEADS
    };
    let few_rows = rotated(DType::Q4_0, narrow, 4096, false, false, f16);
    assert_eq!(
        fused_ops(&few_rows.graph, 0),
        None,
        "fewer rows than the resident kernel takes"
    );
}

/// Random inputs of `p` (built by [`rotated`] with these sizes and `cache`): the
/// row's ([`staged_inputs`]), the weight, the bias, the position and slot, the
/// frequency factors, the per-head norm's weights and the caches' old rows.
fn rotated_inputs(
    rng: &mut rand::rngs::StdRng,
    p: &Rotated,
    dtype: DType,
    h: Heads,
    k: usize,
    cache: DType,
) -> Vec<(BufferId, Vec<u8>)> {
    use rand::Rng;
    let mut inputs = staged_inputs(rng, &p.staged, k);
    inputs.push((p.w, encoded(rng, dtype, h.rows() * k)));
    inputs.push((
        p.positions,
        i32_bytes(&[rng.random_range(0..CAPACITY as i32)]),
    ));
    if let Some(b) = p.bias {
        inputs.push((b, f32_bytes(&uniform(rng, h.rows(), 1.0))));
    }
    if let Some(slots) = p.slots {
        inputs.push((slots, i32_bytes(&[rng.random_range(0..h.n_slots as i32)])));
    }
    if let Some(ff) = p.freq_factors {
        let f: Vec<f32> = uniform(rng, h.rotary_dim / 2, 4.0)
            .iter()
            .map(|v| 1.0 + v.abs())
            .collect();
        inputs.push((ff, f32_bytes(&f)));
    }
    if let Some(n) = p.qk_norm {
        inputs.push((n.q_weight, f32_bytes(&uniform(rng, h.head_dim, 1.5))));
        inputs.push((n.k_weight, f32_bytes(&uniform(rng, h.head_dim, 1.5))));
    }
    let cache_len = h.n_slots * h.n_kv_heads * CAPACITY * h.head_dim;
    let old: Vec<u8> = match cache {
        DType::F16 => uniform(rng, cache_len, 1.0)
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => f32_bytes(&uniform(rng, cache_len, 1.0)),
    };
    inputs.push((p.k_cache, old.clone()));
    inputs.push((p.v_cache, old));
    inputs
}

/// The f32 values of a cache's bytes.
fn cache_values(cache: DType, bytes: &[u8]) -> Vec<f32> {
    match cache {
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => f32s(bytes),
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_fused_rotation_is_one_launch_with_the_unfused_bits_and_the_cpus_values() {
    let cuda = own_cuda();
    let mut rng = rng("the_fused_rotation_is_one_launch_with_the_unfused_bits_and_the_cpus_values");
    let cache = DType::F16;
    // The 8B's heads; Qwen3's (NeoX, per-head norms, a slot of three); a partial
    // rotation with frequency factors in heads of 64; heads of 256.
    let shapes = [
        (LLAMA_HEADS, 4096, false, true),
        (
            Heads {
                n_heads: 14,
                n_kv_heads: 2,
                style: RopeStyle::NeoX,
                qk_norm: true,
                n_slots: 3,
                ..LLAMA_HEADS
            },
            1024,
            true,
            false,
        ),
        (
            Heads {
                n_heads: 16,
                n_kv_heads: 4,
                head_dim: 64,
                rotary_dim: 32,
                freq_factors: true,
                ..LLAMA_HEADS
            },
            2048,
            false,
            true,
        ),
        (
            Heads {
                n_heads: 8,
                n_kv_heads: 4,
                head_dim: 256,
                rotary_dim: 256,
                style: RopeStyle::NeoX,
                ..LLAMA_HEADS
            },
            1024,
            true,
            true,
        ),
    ];
    for dtype in RESIDENT_DTYPES {
        for &(h, k, bias, norm) in &shapes {
            let p = rotated(dtype, h, k, bias, norm, cache);
            let what = format!("{dtype} {h:?} k={k} bias={bias} norm={norm}");
            let inputs = rotated_inputs(&mut rng, &p, dtype, h, k, cache);
            let outputs = [p.qkv, p.q_out, p.k_cache, p.v_cache];
            let names = ["qkv", "q_out", "k_cache", "v_cache"];

            let fused = Fused {
                graph: &p.graph,
                inputs: &inputs,
                outputs: &outputs,
                names: &names,
            };
            let switch = |on| cuda.set_fusion(Fusion::Ropes, on);
            let (got, want) = fused.bit_for_bit(&cuda, switch, norm, "rope_append", &what);
            assert_close(
                &format!("{what} qkv"),
                &f32s(&got[0]),
                &f32s(&want[0]),
                1e-6,
            );
            assert_close(
                &format!("{what} q_out"),
                &f32s(&got[1]),
                &f32s(&want[1]),
                1e-5,
            );
            for (i, name) in [(2, "k_cache"), (3, "v_cache")] {
                assert_close(
                    &format!("{what} {name}"),
                    &cache_values(cache, &got[i]),
                    &cache_values(cache, &want[i]),
                    1e-5,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_backend_reports_its_fusion_switches_in_its_settings() {
    use kiln_core::Backend;
    let cuda = own_cuda();
    cuda.set_fusion(Fusion::Glus, false);
    cuda.set_fusion(Fusion::Ropes, true);
    let settings = cuda.settings();
    for want in [
        "KILN_CUDA_FUSE_GLUS=0",
        "KILN_CUDA_FUSE_ROPES=1",
        "KILN_CUDA_GRAPHS=",
    ] {
        assert!(settings.contains(want), "{want} in {settings:?}");
    }
    cuda.set_fusion(Fusion::Glus, true);
    assert!(cuda.settings().contains("KILN_CUDA_FUSE_GLUS=1"));
}

#[test]
fn fusions_switch_each_kind_alone_and_the_faster_ones_are_on_by_default() {
    use kiln_cuda::fusion::Fusions;
    let all = Fusions::all();
    for kind in Fusion::ALL {
        assert!(all.contains(kind), "{kind:?}");
        assert!(!Fusions::NONE.contains(kind), "{kind:?}");
        let one = Fusions::NONE.with(kind, true);
        for other in Fusion::ALL {
            assert_eq!(one.contains(other), other == kind, "{kind:?} on, {other:?}");
        }
        assert!(!all.with(kind, false).contains(kind), "{kind:?} off");
        let measured_faster = matches!(kind, Fusion::Norms | Fusion::Siblings);
        assert_eq!(kind.default_on(), measured_faster, "{kind:?}");
        assert!(kind.env().starts_with("KILN_CUDA_FUSE_"), "{}", kind.env());
    }
}

#[test]
fn the_kernels_a_graph_compiles_to_include_its_fused_runs_as_switched() {
    use kiln_cuda::fusion::{specs_for_graph, Fusions};
    let p = gated(
        DType::Q4_0,
        2048,
        4096,
        false,
        true,
        ElementwiseKind::SiluMul,
    );
    let keys = |fusions| -> Vec<String> {
        specs_for_graph(&p.graph, fusions)
            .unwrap()
            .into_iter()
            .map(|s| s.key)
            .collect()
    };
    let all = keys(Fusions::all());
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(
        all[0].starts_with("matvec_resident_add_norm_glu|w=q4_0|glu=silu_mul|"),
        "{all:?}"
    );
    let norms = keys(Fusions::NONE.with(Fusion::Norms, true));
    assert_eq!(norms.len(), 1, "{norms:?}");
    assert!(
        norms[0].starts_with("matvec_resident_add_norm|w=q4_0|"),
        "{norms:?}"
    );
    // The norm runs alone; the product after it, reading its copy, takes the unit.
    let glus = keys(Fusions::NONE.with(Fusion::Glus, true));
    assert_eq!(glus.len(), 1, "{glus:?}");
    assert!(
        glus[0].starts_with("matvec_resident_glu|w=q4_0|glu=silu_mul|"),
        "{glus:?}"
    );
    assert!(keys(Fusions::NONE).is_empty());
}
