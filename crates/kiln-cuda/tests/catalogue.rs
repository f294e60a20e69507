//! The catalogue covers the IR: every op kind with every dtype the IR allows has a
//! CUDA kernel (`has_kernel`, which `CudaBackend::supports` answers with), its
//! specialisation is one `kiln precompile --all` builds (the Gated DeltaNet ops
//! included, the delta rule's recurrent and chunkwise kernels both), and the only parameters without a kernel are attention head dimensions
//! the kernels do not take (with or without a Q8_1 copy of the output). No GPU.

use kiln_core::ops::{
    Argmax, Attention, CausalConv1d, DeltaNetHeads, Embedding, GatedDeltaNet, GatedRmsNorm,
    HeadLayout, HeadNormRope, KvAppend, L2Norm, MatMul, Rope, RopeParams, RopeStyle, Sample,
    SampleParams, Softmax, WEIGHT_DTYPES,
};
use kiln_core::{DType, Graph, Op};
use kiln_cuda::manifest::{all_specs, has_kernel, spec_for_op};

/// Asserts that every op of `g` has a kernel whose specialisation is in the manifest.
fn assert_covered(g: &Graph) {
    let keys: Vec<String> = all_specs().into_iter().map(|s| s.key).collect();
    for op in g.ops() {
        assert!(has_kernel(op), "{op:?}");
        let spec = spec_for_op(op, g).unwrap_or_else(|e| panic!("{}: {e}", op.name()));
        assert!(
            keys.contains(&spec.key),
            "{} needs {}, which all_specs() does not list",
            op.name(),
            spec.key
        );
    }
}

#[test]
fn embedding_and_matmul_have_kernels_for_every_weight_dtype_and_row_count() {
    for dtype in WEIGHT_DTYPES {
        for k in [dtype.block_size() * 3, 4096] {
            let mut g = Graph::new();
            let table = g.persistent("table", dtype, &[9, k]).unwrap();
            let ids = g.persistent("ids", DType::I32, &[2]).unwrap();
            let rows = g.persistent("rows", DType::F32, &[2, k]).unwrap();
            g.push(Embedding {
                table,
                ids,
                out: rows,
                out_q8: None,
                n_tokens: 2,
                vocab: 9,
                dim: k,
            })
            .unwrap();
            for m in [1, 2, 3, 7, 8, 9, 100] {
                let x = g.persistent(format!("x{m}"), DType::F32, &[m, k]).unwrap();
                let out = g
                    .persistent(format!("out{m}"), DType::F32, &[m, 9])
                    .unwrap();
                let bias = g.persistent(format!("bias{m}"), DType::F32, &[9]).unwrap();
                g.push(MatMul {
                    x,
                    x_q8: None,
                    w: table,
                    bias: Some(bias),
                    out,
                    m,
                    n: 9,
                    k,
                })
                .unwrap();
            }
            assert_covered(&g);
        }
    }
}

#[test]
fn rope_softmax_argmax_and_kv_cache_ops_have_kernels() {
    for style in [RopeStyle::Normal, RopeStyle::NeoX] {
        for cache in [DType::F32, DType::F16] {
            let mut g = Graph::new();
            let params = RopeParams {
                head_dim: 64,
                rotary_dim: 32,
                base: 10000.0,
                freq_scale: 1.0,
                style,
            };
            let x = g.persistent("x", DType::F32, &[3, 2, 64]).unwrap();
            let pos = g.persistent("pos", DType::I32, &[3]).unwrap();
            let ff = g.persistent("ff", DType::F32, &[16]).unwrap();
            let w = g.persistent("w", DType::F32, &[64]).unwrap();
            let roped = g.persistent("roped", DType::F32, &[3, 2, 64]).unwrap();
            let normed = g.persistent("normed", DType::F32, &[3, 2, 64]).unwrap();
            let probs = g.persistent("probs", DType::F32, &[6, 64]).unwrap();
            let best = g.persistent("best", DType::I32, &[6]).unwrap();
            let kv = g.persistent("kv", cache, &[2, 10, 64]).unwrap();
            g.push(Rope {
                x,
                positions: pos,
                freq_factors: Some(ff),
                out: roped,
                n_tokens: 3,
                n_heads: 2,
                params,
            })
            .unwrap();
            g.push(HeadNormRope {
                x,
                weight: Some(w),
                positions: pos,
                freq_factors: None,
                out: normed,
                n_tokens: 3,
                n_heads: 2,
                eps: 1e-6,
                params,
            })
            .unwrap();
            g.push(Softmax {
                x: roped,
                out: probs,
                rows: 6,
                cols: 64,
                scale: 1.0,
                causal_offset: Some(3),
            })
            .unwrap();
            g.push(Argmax {
                x: probs,
                out: best,
                rows: 6,
                cols: 64,
            })
            .unwrap();
            g.push(KvAppend {
                src: normed,
                positions: pos,
                slots: None,
                cache: kv,
                n_tokens: 3,
                n_kv_heads: 2,
                head_dim: 64,
                capacity: 10,
                n_slots: 1,
            })
            .unwrap();
            assert_covered(&g);
        }
    }
}

/// An attention of `n_tokens` queries of 8 heads over 2 KV heads of `head_dim`.
#[test]
fn sample_has_kernels_greedy_and_not() {
    for temperature in [0.0, 0.8] {
        let mut g = Graph::new();
        let logits = g.persistent("logits", DType::F32, &[2, 100]).unwrap();
        let uniform = g.persistent("uniform", DType::F32, &[2]).unwrap();
        let out = g.persistent("out", DType::I32, &[2]).unwrap();
        g.push(Sample {
            logits,
            uniform,
            out,
            rows: 2,
            vocab: 100,
            params: SampleParams {
                temperature,
                top_k: 40,
                top_p: 0.95,
                min_p: 0.05,
            },
        })
        .unwrap();
        assert_covered(&g);
    }
}

fn attention(n_tokens: usize, head_dim: usize, cache: DType, capacity: usize) -> (Graph, Op) {
    attention_with(n_tokens, head_dim, cache, capacity, false)
}

/// An attention of 8 query heads over 2 KV heads, with a Q8_1 copy of its output when
/// `copy` is set.
fn attention_with(
    n_tokens: usize,
    head_dim: usize,
    cache: DType,
    capacity: usize,
    copy: bool,
) -> (Graph, Op) {
    let mut g = Graph::new();
    let q = g
        .persistent("q", DType::F32, &[n_tokens, 8, head_dim])
        .unwrap();
    let k = g.persistent("k", cache, &[2, capacity, head_dim]).unwrap();
    let v = g.persistent("v", cache, &[2, capacity, head_dim]).unwrap();
    let pos = g.persistent("pos", DType::I32, &[n_tokens]).unwrap();
    let out = g
        .persistent("out", DType::F32, &[n_tokens, 8, head_dim])
        .unwrap();
    let out_q8 = copy.then(|| {
        g.persistent("out_q8", DType::Q8_1, &[n_tokens, 8 * head_dim])
            .unwrap()
    });
    let op = Attention {
        q,
        k_cache: k,
        v_cache: v,
        positions: pos,
        slots: None,
        out,
        out_q8,
        n_tokens,
        n_heads: 8,
        n_kv_heads: 2,
        head_dim,
        capacity,
        n_slots: 1,
        scale: 0.1,
        window: Some(100),
        softcap: Some(30.0),
    };
    g.push(op.clone()).unwrap();
    (g, op.into())
}

#[test]
fn attention_has_kernels_for_head_dims_that_are_multiples_of_8_up_to_256() {
    for cache in [DType::F32, DType::F16] {
        for head_dim in [8, 64, 80, 96, 112, 128, 136, 256] {
            for (n_tokens, capacity) in [(1, 16), (4, 100_000), (5, 64), (300, 4096)] {
                let (g, _) = attention(n_tokens, head_dim, cache, capacity);
                assert_covered(&g);
            }
        }
    }
}

#[test]
fn attention_writes_a_q8_copy_for_head_dims_that_are_multiples_of_32() {
    for cache in [DType::F32, DType::F16] {
        for head_dim in [32, 64, 96, 128, 160, 256] {
            for (n_tokens, capacity) in [(1, 16), (4, 100_000), (300, 4096)] {
                let (g, _) = attention_with(n_tokens, head_dim, cache, capacity, true);
                assert_covered(&g);
            }
        }
    }
    // Rows of 8 heads are whole Q8_1 blocks (valid IR), but a block would straddle
    // two heads.
    for head_dim in [8, 80, 136] {
        let (g, op) = attention_with(1, head_dim, DType::F16, 16, true);
        assert!(!has_kernel(&op), "head_dim {head_dim}");
        match spec_for_op(&op, &g) {
            Err(kiln_core::Error::Unsupported(msg)) => {
                assert!(msg.starts_with("cuda backend: op attention"), "{msg}")
            }
            other => panic!("head_dim {head_dim}: expected Unsupported, got {other:?}"),
        }
    }
}

#[test]
fn attention_with_other_head_dims_has_no_kernel() {
    for head_dim in [4, 36, 100, 264, 512] {
        let (g, op) = attention(2, head_dim, DType::F16, 16);
        assert!(!has_kernel(&op), "head_dim {head_dim}");
        match spec_for_op(&op, &g) {
            Err(kiln_core::Error::Unsupported(msg)) => {
                assert!(msg.starts_with("cuda backend: op attention"), "{msg}")
            }
            other => panic!("head_dim {head_dim}: expected Unsupported, got {other:?}"),
        }
    }
}

#[test]
fn delta_net_ops_have_kernels() {
    let heads = DeltaNetHeads {
        n_k_heads: 2,
        n_v_heads: 4,
        d_k: 8,
        d_v: 6,
        layout: HeadLayout::Tiled,
    };
    let width = heads.qkv_width();
    let mut g = Graph::new();
    let mut p = |name: &str, shape: &[usize]| g.persistent(name, DType::F32, shape).unwrap();
    let (x, w, conv_state, qkv) = (
        p("x", &[3, width]),
        p("w", &[width, 4]),
        p("conv_state", &[width, 3]),
        p("qkv", &[3, width]),
    );
    let (a, b, ssm_a, dt_bias) = (
        p("a", &[3, 4]),
        p("b", &[3, 4]),
        p("ssm_a", &[4]),
        p("dt_bias", &[4]),
    );
    let (state, out, z, nw, normed, l2) = (
        p("state", &[4, 8, 6]),
        p("out", &[3, 4, 6]),
        p("z", &[12, 6]),
        p("nw", &[6]),
        p("normed", &[12, 6]),
        p("l2", &[12, 6]),
    );
    g.push(CausalConv1d {
        x,
        weight: w,
        state: conv_state,
        out: qkv,
        n_tokens: 3,
        channels: width,
        kernel: 4,
    })
    .unwrap();
    g.push(GatedDeltaNet {
        qkv,
        a,
        b,
        ssm_a,
        dt_bias,
        state,
        out,
        n_tokens: 3,
        heads,
        eps: 1e-6,
    })
    .unwrap();
    // A prompt long enough for the chunkwise kernel, at each key-head size it is
    // compiled for and between them, and a key head too long for it.
    for (n, d_k) in [
        (209, 8),
        (209, 64),
        (100, 128),
        (100, 129),
        (64, 256),
        (64, 300),
    ] {
        let h = DeltaNetHeads { d_k, ..heads };
        let mut p = |name: &str, shape: &[usize]| {
            g.persistent(format!("{name}.{d_k}"), DType::F32, shape)
                .unwrap()
        };
        let op = GatedDeltaNet {
            qkv: p("qkv", &[n, h.qkv_width()]),
            a: p("a", &[n, 4]),
            b: p("b", &[n, 4]),
            ssm_a: p("ssm_a", &[4]),
            dt_bias: p("dt_bias", &[4]),
            state: p("state", &[4, d_k, 6]),
            out: p("out", &[n, 4, 6]),
            n_tokens: n,
            heads: h,
            eps: 1e-6,
        };
        let form = if d_k <= 256 { "chunkwise" } else { "recurrent" };
        let key = spec_for_op(&Op::GatedDeltaNet(op.clone()), &g).unwrap().key;
        assert!(key.contains(form), "d_k {d_k}: {key}");
        g.push(op).unwrap();
    }
    g.push(GatedRmsNorm {
        x: out,
        z,
        weight: nw,
        out: normed,
        rows: 12,
        dim: 6,
        eps: 1e-6,
    })
    .unwrap();
    g.push(L2Norm {
        x: out,
        out: l2,
        rows: 12,
        dim: 6,
        eps: 1e-6,
    })
    .unwrap();
    assert_covered(&g);
}
