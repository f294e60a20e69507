//! The kernel manifest and the no-driver path. Runs without a GPU.

use kiln_core::ops::{
    Attention, Cast, Elementwise, ElementwiseKind, Gating, MatMul, MoeCombine, MoeMatMul,
    MoeRouter, RmsNorm,
};
use kiln_core::{DType, Error, Graph};
use kiln_cuda::manifest::{all_specs, headers, specs_for_graph, FAMILIES};

#[test]
fn every_spec_has_a_unique_canonical_key() {
    let specs = all_specs();
    assert_eq!(
        specs.len(),
        9 + 2 * 5 + 4 + 19 + 4 + 4 + 234 + 10 * 4 * 2 + 1 + 44 * 7 + 44 + 2 + 2 + 28 + 3 + 1 + 1 + 3 + 11 * 2 + 8 * 2 + 1 + 19 + 11 * 2 * 2 + 2 * 2 + 7,
        "cast pairs, element-wise and glu kinds, norm variants, embedding tables, rope \
         variants, qkv_rope_append (2 styles x 2 caches), matmul (11 packed dtypes x 4 mat-vec tiers x 2 plane alignments + 11 \
         resident dtypes x 2 block shapes x 2 alignments + 8 other dtypes x 4 tiers x 2 load widths + \
         19 mat-mat + 19 weight decoders of the cuBLASLt path + 10 dtypes x 4 row tiers x 2 alignments \
         of the 8-bit mat-mat and the sum of its splits), the resident mat-vecs with a fused norm, a fused SiLU gated unit or rotation (2 styles, F16 cache), each with or without the norm (11 x 2 x 2 x 7), the resident mat-vecs of sibling products (11 x 2 x 2), softmax, kv caches, \
         attention (2 caches x (4 group tiers x 3 lane widths decode + 2 prefill)), \
         flash attention (F16 cache x 3 head dims), \
         argmax, sample, moe (2 router gatings, combine, the one-row mat-vecs routed: \
         11 packed dtypes x 2 alignments + 8 other dtypes x 2 load widths, the grouping \
         launch and 19 grouped mat-mats), the routed packed mat-vecs with a fused SiLU gated unit or combine (11 x 2 x 2), the one-row f32 mat-vecs with a fused router (2 gatings x \
         2 load widths), \
         delta net (conv, recurrent delta rule, chunkwise delta rule x 3 key head sizes, \
         gated RMSNorm, L2 norm)"
    );
    let mut keys: Vec<&str> = specs.iter().map(|s| s.key.as_str()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), specs.len(), "duplicate keys: {keys:?}");
    for s in &specs {
        assert!(
            !s.key.contains(char::is_whitespace) && s.key.contains('|'),
            "key {:?} is not canonical",
            s.key
        );
    }
    assert!(keys.contains(&"cast|from=bf16|to=f16"));
    assert!(keys.contains(&"elementwise|kind=silu_mul"));
    assert!(keys.contains(&"glu|kind=silu_mul"));
    assert!(keys.contains(&"qkv_rope_append|style=neox|cache=f16"));
    assert!(keys.contains(&"add_rms_norm|weight=1"));
    assert!(keys.contains(&"dequant_bf16|w=q4_k"));
}

#[test]
fn every_name_expression_names_a_template_of_its_source() {
    for s in all_specs() {
        let template = s
            .name_expression
            .split('<')
            .next()
            .and_then(|q| q.rsplit("::").next())
            .unwrap();
        assert!(
            s.source.text.contains(&format!(" {template}(")),
            "{}: {} does not define {template}",
            s.key,
            s.source.name
        );
        assert_eq!(s.headers, headers());
    }
}

#[test]
fn every_family_source_includes_only_embedded_headers() {
    let names: Vec<&str> = headers().iter().map(|h| h.name).collect();
    for f in FAMILIES {
        assert!(
            f.source.name.starts_with(f.name),
            "{} is in {}",
            f.name,
            f.source.name
        );
        for line in f.source.text.lines().filter(|l| l.starts_with("#include")) {
            let included = line.split('"').nth(1).unwrap_or("");
            assert!(names.contains(&included), "{}: {line}", f.source.name);
        }
    }
}

#[test]
fn specs_for_graph_are_distinct_and_in_first_use_order() {
    let mut g = Graph::new();
    let a = g.persistent("a", DType::F32, &[8]).unwrap();
    let b = g.persistent("b", DType::F32, &[8]).unwrap();
    let h = g.persistent("h", DType::F16, &[8]).unwrap();
    let s = g.transient("s", DType::F32, &[8]).unwrap();
    let n = g.persistent("n", DType::F32, &[8]).unwrap();
    let m = g.persistent("m", DType::F32, &[8]).unwrap();
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
    g.push(RmsNorm {
        x: s,
        weight: None,
        out: n,
        out_q8: None,
        rows: 1,
        dim: 8,
        eps: 1e-6,
    })
    .unwrap();
    g.push(Elementwise {
        kind,
        a: s,
        b: n,
        out: m,
        out_q8: None,
        len: 8,
    })
    .unwrap();
    g.push(Cast {
        x: m,
        out: h,
        len: 8,
    })
    .unwrap();
    let keys: Vec<String> = specs_for_graph(&g)
        .unwrap()
        .into_iter()
        .map(|s| s.key)
        .collect();
    assert_eq!(
        keys,
        [
            "elementwise|kind=add",
            "rms_norm|weight=0",
            "cast|from=f32|to=f16"
        ]
    );
}

#[test]
fn a_mat_mat_on_cublaslt_needs_the_weight_decoder_and_the_cast_of_x() {
    use kiln_cuda::manifest::spec_for_op;
    use kiln_cuda::ops::matmul::GEMM_MIN_ROWS;
    let (m, n, k) = (GEMM_MIN_ROWS, 96, 256);
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[m, k]).unwrap();
    let w = g.persistent("w", DType::Q4_0, &[n, k]).unwrap();
    let out = g.persistent("out", DType::F32, &[m, n]).unwrap();
    g.push(MatMul {
        x,
        x_q8: None,
        w,
        bias: None,
        out,
        m,
        n,
        k,
    })
    .unwrap();
    let keys: Vec<String> = specs_for_graph(&g)
        .unwrap()
        .into_iter()
        .map(|s| s.key)
        .collect();
    assert_eq!(keys, ["dequant_bf16|w=q4_0", "cast|from=f32|to=bf16"]);
    assert_eq!(
        spec_for_op(&g.ops()[0], &g).unwrap().key,
        "dequant_bf16|w=q4_0"
    );
}

#[test]
fn ops_without_a_cuda_kernel_are_unsupported() {
    // Attention with a head dimension that is not a multiple of 8: valid IR, but the
    // CUDA kernels need 16-byte aligned cache rows.
    let mut g = Graph::new();
    let q = g.persistent("q", DType::F32, &[1, 2, 4]).unwrap();
    let k = g.persistent("k", DType::F16, &[1, 8, 4]).unwrap();
    let v = g.persistent("v", DType::F16, &[1, 8, 4]).unwrap();
    let positions = g.persistent("positions", DType::I32, &[1]).unwrap();
    let out = g.persistent("out", DType::F32, &[1, 2, 4]).unwrap();
    g.push(Attention {
        q,
        k_cache: k,
        v_cache: v,
        positions,
        slots: None,
        out,
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
    match specs_for_graph(&g) {
        Err(Error::Unsupported(msg)) => {
            assert!(
                msg.contains("cuda backend") && msg.contains("attention"),
                "{msg}"
            )
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn has_kernel_agrees_with_spec_for_op() {
    let mut g = Graph::new();
    let a = g.persistent("a", DType::F32, &[32]).unwrap();
    let b = g.persistent("b", DType::F32, &[32]).unwrap();
    let h = g.persistent("h", DType::BF16, &[32]).unwrap();
    let w = g.persistent("w", DType::F32, &[4, 32]).unwrap();
    let y = g.persistent("y", DType::F32, &[1, 4]).unwrap();
    let kind = ElementwiseKind::Mul;
    g.push(Elementwise {
        kind,
        a,
        b: a,
        out: b,
        out_q8: None,
        len: 32,
    })
    .unwrap();
    g.push(Cast {
        x: b,
        out: h,
        len: 32,
    })
    .unwrap();
    g.push(RmsNorm {
        x: b,
        weight: None,
        out: a,
        out_q8: None,
        rows: 1,
        dim: 32,
        eps: 0.0,
    })
    .unwrap();
    g.push(MatMul {
        x: a,
        x_q8: None,
        w,
        bias: None,
        out: y,
        m: 1,
        n: 4,
        k: 32,
    })
    .unwrap();
    for op in g.ops() {
        assert_eq!(
            kiln_cuda::manifest::has_kernel(op),
            kiln_cuda::manifest::spec_for_op(op, &g).is_ok(),
            "{}",
            op.name()
        );
    }
}

#[test]
fn the_mixture_of_experts_ops_have_kernels_and_a_router_beyond_its_limit_does_not() {
    let mut g = Graph::new();
    let logits = g.persistent("logits", DType::F32, &[2, 4]).unwrap();
    let ids = g.persistent("ids", DType::I32, &[2, 2]).unwrap();
    let weights = g.persistent("weights", DType::F32, &[2, 2]).unwrap();
    let x = g.persistent("x", DType::F32, &[2, 32]).unwrap();
    let w = g.persistent("w", DType::Q4_0, &[4, 3, 32]).unwrap();
    let y = g.persistent("y", DType::F32, &[2, 2, 3]).unwrap();
    let out = g.persistent("out", DType::F32, &[2, 3]).unwrap();
    g.push(MoeRouter {
        logits,
        ids,
        weights,
        m: 2,
        n_expert: 4,
        k: 2,
        gating: Gating::Softmax,
        normalize: true,
    })
    .unwrap();
    g.push(MoeMatMul {
        x,
        ids,
        w,
        out: y,
        m: 2,
        k: 2,
        n_expert: 4,
        rows: 3,
        cols: 32,
        per_slot: false,
    })
    .unwrap();
    g.push(MoeCombine {
        y,
        weights,
        residual: None,
        shared: None,
        shared_gate: None,
        out,
        m: 2,
        k: 2,
        n: 3,
    })
    .unwrap();
    let specs: Vec<String> = g
        .ops()
        .iter()
        .map(|op| {
            assert!(kiln_cuda::manifest::has_kernel(op), "{}", op.name());
            kiln_cuda::manifest::spec_for_op(op, &g).unwrap().key
        })
        .collect();
    assert_eq!(
        specs,
        [
            "moe_router|gating=softmax",
            "moe_matvec_packed|w=q4_0|rows=1|aligned=0",
            "moe_combine|x=f32"
        ]
    );
    let router = MoeRouter {
        logits,
        ids,
        weights,
        m: 2,
        n_expert: kiln_cuda::ops::moe::MAX_EXPERTS + 1,
        k: 2,
        gating: Gating::Softmax,
        normalize: true,
    };
    let op = kiln_core::Op::MoeRouter(router);
    assert!(!kiln_cuda::manifest::has_kernel(&op));
    match kiln_cuda::manifest::spec_for_op(&op, &g) {
        Err(Error::Unsupported(msg)) => assert!(
            msg.contains("cuda backend")
                && msg.contains("moe_router")
                && msg.contains("--device cpu"),
            "{msg}"
        ),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}
