//! Graph execution on the GPU: several ops chained through aliased transient
//! buffers, against the CPU backend; a compiled executable run many times over new
//! inputs, replayed as a CUDA graph and launch by launch, and profiled; and the
//! errors execution and dispatch give.

mod common;
use common::*;
use kiln_core::ops::{AddRmsNorm, Attention, Cast, Elementwise, ElementwiseKind, RmsNorm};
use kiln_core::{plan, Aliasing, Backend, Bindings, DType, Error, Graph, Scratch};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops;

/// A small block: cast the bf16 input up, norm it, gate it, add the residual and
/// norm again, then cast down to f16. Transients are aliased by the planner.
fn block(rows: usize, dim: usize) -> (Graph, [kiln_core::BufferId; 5]) {
    let n = rows * dim;
    let mut g = Graph::new();
    let x16 = g.persistent("x_bf16", DType::BF16, &[rows, dim]).unwrap();
    let gate = g.persistent("gate", DType::F32, &[rows, dim]).unwrap();
    let w = g.persistent("w", DType::F32, &[dim]).unwrap();
    let sum = g.persistent("sum", DType::F32, &[rows, dim]).unwrap();
    let out = g.persistent("out_f16", DType::F16, &[rows, dim]).unwrap();
    let x = g.transient("x", DType::F32, &[rows, dim]).unwrap();
    let normed = g.transient("normed", DType::F32, &[rows, dim]).unwrap();
    let gated = g.transient("gated", DType::F32, &[rows, dim]).unwrap();
    let normed2 = g.transient("normed2", DType::F32, &[rows, dim]).unwrap();
    g.push(Cast {
        x: x16,
        out: x,
        len: n,
    })
    .unwrap();
    g.push(RmsNorm {
        x,
        weight: Some(w),
        out: normed,
        out_q8: None,
        rows,
        dim,
        eps: 1e-6,
    })
    .unwrap();
    let kind = ElementwiseKind::SiluMul;
    g.push(Elementwise {
        kind,
        a: gate,
        b: normed,
        out: gated,
        out_q8: None,
        len: n,
    })
    .unwrap();
    g.push(AddRmsNorm {
        x: gated,
        residual: x,
        weight: None,
        sum,
        out: normed2,
        out_q8: None,
        rows,
        dim,
        eps: 1e-6,
    })
    .unwrap();
    g.push(Cast {
        x: normed2,
        out,
        len: n,
    })
    .unwrap();
    (g, [x16, gate, w, sum, out])
}

#[test]
#[ignore = "needs a CUDA device"]
fn chained_ops_with_aliased_transients_match_cpu() {
    let cuda = cuda();
    let mut rng = rng("chained_ops_with_aliased_transients_match_cpu");
    for (rows, dim) in [(1, 7), (3, 1023), (4, 4096)] {
        let (g, [x16, gate, w, sum, out]) = block(rows, dim);
        let n = rows * dim;
        let x_bf16: Vec<u8> = uniform(&mut rng, n, 4.0)
            .into_iter()
            .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let inputs = [
            (x16, x_bf16),
            (gate, f32_bytes(&uniform(&mut rng, n, 3.0))),
            (w, f32_bytes(&uniform(&mut rng, dim, 1.5))),
        ];
        let want = run_on(&CpuBackend, &g, &inputs, &[sum, out], Aliasing::On).unwrap();
        let got = run_on(cuda, &g, &inputs, &[sum, out], Aliasing::On).unwrap();
        let what = format!("block {rows}x{dim}");
        // Normalised MSE against the CPU: the two norms and silu differ by a few f32
        // ulp (1e-11), and the final f16 rounding can flip on those (2^-11 relative
        // for the few elements that do).
        assert_close(
            &format!("{what} sum"),
            &f32s(&got[0]),
            &f32s(&want[0]),
            1e-10,
        );
        let f16s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        };
        assert_close(
            &format!("{what} out"),
            &f16s(&got[1]),
            &f16s(&want[1]),
            1e-7,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_compiled_executable_replays_over_new_inputs() {
    let cuda = cuda();
    let mut rng = rng("a_compiled_executable_replays_over_new_inputs");
    let (rows, dim) = (3, 1000);
    let (g, [x16, gate, w, sum, out]) = block(rows, dim);
    let n = rows * dim;
    let memory = plan(&g, Aliasing::On);
    let mut scratch = Scratch::new();
    scratch.ensure(cuda, &memory).unwrap();
    let descs = g.buffers();
    let mut bufs: Vec<_> = [x16, gate, w, sum, out]
        .iter()
        .map(|&id| cuda.alloc(descs[id.index()].bytes()).unwrap())
        .collect();
    let new_inputs = |rng: &mut rand::rngs::StdRng| {
        let x: Vec<u8> = uniform(rng, n, 4.0)
            .into_iter()
            .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        [
            x,
            f32_bytes(&uniform(rng, n, 3.0)),
            f32_bytes(&uniform(rng, dim, 1.5)),
        ]
    };
    let mut exe = {
        let mut b = Bindings::new(&g, &memory, &mut scratch).unwrap();
        for (&id, buf) in [x16, gate, w, sum, out].iter().zip(bufs.iter_mut()) {
            b.bind(&g, id, buf).unwrap();
        }
        cuda.compile(&g, &mut b).unwrap()
    };
    assert_eq!(exe.launches().len(), 5, "one launch per op");
    let names: Vec<&str> = exe.ops().iter().map(|o| o.name).collect();
    assert_eq!(
        names,
        ["cast", "rms_norm", "silu_mul", "add_rms_norm", "cast"]
    );
    for round in 0..6 {
        // Alternate replay as a CUDA graph with launch-by-launch submission.
        let graphs = round % 2 == 0;
        cuda.set_cuda_graphs(graphs);
        let inputs = new_inputs(&mut rng);
        for (buf, bytes) in bufs.iter_mut().zip(&inputs) {
            cuda.upload(buf, bytes).unwrap();
        }
        for buf in &mut bufs[3..] {
            cuda.upload(buf, &poison(buf_bytes(buf))).unwrap();
        }
        // SAFETY: `bufs` and `scratch` outlive `exe` and are not touched while it runs.
        unsafe { cuda.run(&mut exe) }.unwrap();
        cuda.synchronize().unwrap();
        let cpu_inputs = [x16, gate, w]
            .into_iter()
            .zip(inputs.iter().cloned())
            .collect::<Vec<_>>();
        let want = run_on(&CpuBackend, &g, &cpu_inputs, &[sum], Aliasing::On).unwrap();
        let mut got = vec![0u8; n * 4];
        cuda.download(&bufs[3], &mut got).unwrap();
        assert_close(
            &format!("round {round} (graphs {graphs}) sum"),
            &f32s(&got),
            &f32s(&want[0]),
            1e-10,
        );
        assert!(exe.is_captured(), "captured on the first replay and kept");
    }
    // SAFETY: as above; profile waits for its run.
    let times = unsafe { cuda.profile(&mut exe) }.unwrap();
    assert_eq!(times.len(), 5);
    for (i, t) in times.iter().enumerate() {
        assert_eq!(t.op_index, i);
        assert!(
            t.seconds > 0.0 && t.seconds < 0.1,
            "{} took {} s",
            t.key,
            t.seconds
        );
    }
    assert!(times[0].key.starts_with("cast|"));
    cuda.set_cuda_graphs(true);
}

/// The byte size of a device buffer.
fn buf_bytes(buf: &kiln_cuda::CudaBuffer) -> usize {
    use kiln_core::DeviceBuffer;
    buf.bytes()
}

#[test]
#[ignore = "needs a CUDA device"]
fn unimplemented_ops_are_unsupported_before_anything_runs() {
    let cuda = cuda();
    let mut g = Graph::new();
    let a = g.persistent("a", DType::F32, &[8]).unwrap();
    let b = g.persistent("b", DType::F32, &[8]).unwrap();
    let s = g.persistent("s", DType::F32, &[8]).unwrap();
    let k = g.persistent("k", DType::F16, &[1, 8, 4]).unwrap();
    let v = g.persistent("v", DType::F16, &[1, 8, 4]).unwrap();
    let positions = g.persistent("positions", DType::I32, &[1]).unwrap();
    let y = g.persistent("y", DType::F32, &[1, 2, 4]).unwrap();
    let kind = ElementwiseKind::Add;
    g.push(Elementwise {
        kind,
        a,
        b,
        out: s,
        out_q8: None,
        len: 8,
    })
    .unwrap();
    // A head dimension the CUDA attention kernels do not take (not a multiple of 8).
    g.push(Attention {
        q: s,
        k_cache: k,
        v_cache: v,
        positions,
        slots: None,
        out: y,
        out_q8: None,
        n_tokens: 1,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        capacity: 8,
        n_slots: 1,
        scale: 0.5,
        window: None,
        softcap: None,
    })
    .unwrap();
    let inputs = [(a, f32_bytes(&[1.0; 8])), (b, f32_bytes(&[2.0; 8]))];
    match run_on(cuda, &g, &inputs, &[s], Aliasing::On) {
        Err(Error::Unsupported(msg)) => {
            assert!(msg.starts_with("cuda backend: op attention"), "{msg}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn dispatch_rejects_bad_arguments_before_launch() {
    let cuda = cuda();
    let small = cuda.alloc(4 * 100).unwrap();
    let big = cuda.alloc(4 * 1000).unwrap();
    let mut out = cuda.alloc(4 * 1000).unwrap();
    let invalid = |r: kiln_core::Result<()>| match r {
        Err(Error::InvalidArgument { op, msg }) => format!("{op}: {msg}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    };

    let m = invalid(ops::elementwise::elementwise(
        cuda,
        ElementwiseKind::Add,
        &small,
        &big,
        &mut out,
        None,
        1000,
    ));
    assert!(
        m.starts_with("add: a needs 1000 f32 elements (4000 bytes)") && m.contains("400 bytes"),
        "{m}"
    );

    let m = invalid(ops::elementwise::elementwise(
        cuda,
        ElementwiseKind::Mul,
        &big,
        &big,
        &mut out,
        None,
        0,
    ));
    assert_eq!(m, "mul: len must be > 0, got 0");

    let m = invalid(ops::cast::cast(
        cuda,
        &big,
        DType::Q4_0,
        &mut out,
        DType::F32,
        32,
    ));
    assert!(m.contains("cast") && m.contains("q4_0"), "{m}");

    let m = invalid(ops::norm::rms_norm(
        cuda,
        &big,
        Some(&small),
        &mut out,
        2,
        500,
        1e-6,
    ));
    assert!(
        m.starts_with("rms_norm: weight needs 500 f32 elements"),
        "{m}"
    );

    let m = invalid(ops::norm::rms_norm(
        cuda,
        &big,
        None,
        &mut out,
        10,
        100,
        f32::NAN,
    ));
    assert!(m.starts_with("rms_norm: eps must be finite"), "{m}");

    let mut sum = cuda.alloc(4 * 1000).unwrap();
    let m = invalid(ops::norm::add_rms_norm(
        cuda, &big, &small, None, &mut sum, &mut out, 10, 100, 1e-6,
    ));
    assert!(
        m.starts_with("add_rms_norm: residual needs 1000 f32 elements"),
        "{m}"
    );

    // Q8_1 copies: rows of whole blocks of 32, and room for them.
    let mut q8 = cuda.alloc(36 * 16).unwrap();
    let mut norm_with_copy = |rows, dim| {
        let out = ops::norm::NormOut {
            out: &mut out,
            out_q8: Some(&mut q8),
        };
        invalid(ops::norm::rms_norm(cuda, &big, None, out, rows, dim, 1e-6))
    };
    assert_eq!(
        norm_with_copy(10, 100),
        "rms_norm: out_q8: rows of 100 elements cannot be rounded to q8_1, which needs a multiple of 32"
    );
    let m = norm_with_copy(4, 192);
    assert!(
        m.starts_with("rms_norm: out_q8 needs 768 q8_1 elements"),
        "{m}"
    );
    let m = invalid(ops::elementwise::elementwise(
        cuda,
        ElementwiseKind::SiluMul,
        &big,
        &big,
        &mut out,
        Some(&mut q8),
        1000,
    ));
    assert_eq!(
        m,
        "silu_mul: out_q8: rows of 1000 elements cannot be rounded to q8_1, which needs a multiple of 32"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn transfers_check_sizes_and_round_trip() {
    let cuda = cuda();
    let mut buf = cuda.alloc(10).unwrap();
    assert!(matches!(
        cuda.upload(&mut buf, &[1u8; 11]),
        Err(Error::InvalidArgument { .. })
    ));
    cuda.upload(&mut buf, &[7, 1, 2, 3, 4, 5, 6, 7, 8, 9])
        .unwrap();
    let mut back = [0u8; 6];
    cuda.download(&buf, &mut back).unwrap();
    assert_eq!(back, [7, 1, 2, 3, 4, 5]);
    assert!(matches!(
        cuda.download(&buf, &mut [0u8; 11]),
        Err(Error::InvalidArgument { .. })
    ));
    let fresh = cuda.alloc(64).unwrap();
    let mut zeros = [0xffu8; 64];
    cuda.download(&fresh, &mut zeros).unwrap();
    assert_eq!(zeros, [0u8; 64], "alloc zeroes its memory");
    let empty = cuda.alloc(0).unwrap();
    assert_eq!(kiln_core::DeviceBuffer::bytes(&empty), 0);
}
