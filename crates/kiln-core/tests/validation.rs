//! Graph and op validation: each invalid argument is an InvalidArgument naming the op
//! and the offending values, and nothing is added to the graph.

use kiln_core::ops::*;
use kiln_core::DType::{self, F16, F32, I32, Q4K, Q4_0, Q8_1};
use kiln_core::{BufferId, Error, Graph};

fn expect_invalid(g: &mut Graph, op: impl Into<Op>, op_name: &str, needles: &[&str]) {
    let before = g.ops().len();
    let err = g.push(op).expect_err("invalid op was accepted");
    match &err {
        Error::InvalidArgument { op, msg } => {
            assert_eq!(op, op_name, "{err}");
            for n in needles {
                assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
            }
        }
        other => panic!("expected InvalidArgument, got {other}"),
    }
    assert_eq!(g.ops().len(), before, "a rejected op must not be added");
}

fn f32s(g: &mut Graph, name: &str, shape: &[usize]) -> BufferId {
    g.persistent(name, F32, shape).unwrap()
}

#[test]
fn wrong_element_counts_and_dtypes_are_named() {
    let mut g = Graph::new();
    let x = f32s(&mut g, "x", &[2, 8]);
    let short = f32s(&mut g, "short", &[2, 7]);
    let half = g.persistent("half", F16, &[2, 8]).unwrap();
    let ok = |out| RmsNorm {
        x,
        weight: None,
        out,
        out_q8: None,
        rows: 2,
        dim: 8,
        eps: 1e-5,
    };
    expect_invalid(
        &mut g,
        ok(short),
        "rms_norm",
        &["\"short\"", "14 elements", "expected 16"],
    );
    expect_invalid(&mut g, ok(half), "rms_norm", &["\"half\"", "f16", "f32"]);
    expect_invalid(
        &mut g,
        RmsNorm {
            eps: f32::NAN,
            ..ok(x)
        },
        "rms_norm",
        &["eps"],
    );
    expect_invalid(
        &mut g,
        RmsNorm {
            rows: 0,
            ..ok(short)
        },
        "rms_norm",
        &["rows must be > 0"],
    );
    expect_invalid(&mut g, ok(BufferId(99)), "rms_norm", &["99"]);
}

#[test]
fn outputs_must_differ_from_inputs_and_transients_need_a_writer() {
    let mut g = Graph::new();
    let x = f32s(&mut g, "x", &[16]);
    let t = g.transient("t", F32, &[16]).unwrap();
    let y = f32s(&mut g, "y", &[16]);
    let add = |a, b, out| Elementwise {
        kind: ElementwiseKind::Add,
        a,
        b,
        out,
        out_q8: None,
        len: 16,
    };
    expect_invalid(&mut g, add(x, x, x), "add", &["\"x\"", "distinct"]);
    expect_invalid(
        &mut g,
        add(t, x, y),
        "add",
        &["\"t\"", "before any op writes it"],
    );
    g.push(add(x, x, t)).unwrap();
    g.push(add(t, x, y)).unwrap();
    g.validate().unwrap();
}

#[test]
fn rope_rejects_bad_rotary_dims() {
    let mut g = Graph::new();
    let x = f32s(&mut g, "x", &[3, 2, 64]);
    let out = f32s(&mut g, "out", &[3, 2, 64]);
    let pos = g.persistent("pos", I32, &[3]).unwrap();
    let ff = f32s(&mut g, "ff", &[16]);
    let params = RopeParams {
        head_dim: 64,
        rotary_dim: 64,
        base: 1e4,
        freq_scale: 1.0,
        style: RopeStyle::NeoX,
    };
    let rope = |params, freq_factors| Rope {
        x,
        positions: pos,
        freq_factors,
        out,
        n_tokens: 3,
        n_heads: 2,
        params,
    };
    expect_invalid(
        &mut g,
        rope(
            RopeParams {
                rotary_dim: 128,
                ..params
            },
            None,
        ),
        "rope",
        &["rotary_dim 128", "head_dim 64"],
    );
    expect_invalid(
        &mut g,
        rope(
            RopeParams {
                rotary_dim: 31,
                ..params
            },
            None,
        ),
        "rope",
        &["31", "even"],
    );
    expect_invalid(
        &mut g,
        rope(
            RopeParams {
                base: -1.0,
                ..params
            },
            None,
        ),
        "rope",
        &["base"],
    );
    expect_invalid(
        &mut g,
        rope(params, Some(ff)),
        "rope",
        &["freq_factors", "16 elements", "expected 32"],
    );
    expect_invalid(
        &mut g,
        rope(
            RopeParams {
                head_dim: 32,
                rotary_dim: 32,
                ..params
            },
            None,
        ),
        "rope",
        &["\"x\"", "expected 192"],
    );
    g.push(rope(
        RopeParams {
            rotary_dim: 32,
            ..params
        },
        Some(ff),
    ))
    .unwrap();
}

#[test]
fn matmul_checks_weight_blocks_and_shapes() {
    let mut g = Graph::new();
    let x = f32s(&mut g, "x", &[2, 256]);
    let w = g.persistent("w", Q4K, &[3, 256]).unwrap();
    let w_i32 = g.persistent("w_i32", I32, &[3, 256]).unwrap();
    let out = f32s(&mut g, "out", &[2, 3]);
    let bias = f32s(&mut g, "bias", &[2]);
    let mm = |w, bias| MatMul {
        x,
        x_q8: None,
        w,
        bias,
        out,
        m: 2,
        n: 3,
        k: 256,
    };
    expect_invalid(&mut g, mm(w_i32, None), "matmul", &["\"w_i32\"", "i32"]);
    expect_invalid(&mut g, mm(w, Some(bias)), "matmul", &["bias", "expected 3"]);
    expect_invalid(
        &mut g,
        MatMul {
            m: 3,
            ..mm(w, None)
        },
        "matmul",
        &["\"x\"", "expected 768"],
    );
    // A q4_0 weight stored [6, 128] has the right count but rows of the wrong length.
    let w2 = g.persistent("w2", Q4_0, &[6, 128]).unwrap();
    expect_invalid(
        &mut g,
        mm(w2, None),
        "matmul",
        &["\"w2\"", "last dimension", "256"],
    );
    g.push(mm(w, None)).unwrap();
}

#[test]
fn q8_copies_are_q8_1_in_whole_blocks_of_the_right_size() {
    let mut g = Graph::new();
    let x = f32s(&mut g, "x", &[2, 64]);
    let out = f32s(&mut g, "out", &[2, 64]);
    let q8 = g.persistent("q8", Q8_1, &[2, 64]).unwrap();
    let q8_short = g.persistent("q8_short", Q8_1, &[64]).unwrap();
    let not_q8 = f32s(&mut g, "not_q8", &[2, 64]);
    let norm = |out_q8| RmsNorm {
        x,
        weight: None,
        out,
        out_q8: Some(out_q8),
        rows: 2,
        dim: 64,
        eps: 1e-5,
    };
    expect_invalid(
        &mut g,
        norm(not_q8),
        "rms_norm",
        &["out_q8", "\"not_q8\"", "q8_1"],
    );
    expect_invalid(
        &mut g,
        norm(q8_short),
        "rms_norm",
        &["out_q8", "\"q8_short\"", "expected 128"],
    );
    // 96 elements in rows of 48: the blocks of 32 would straddle rows.
    let flat = f32s(&mut g, "flat", &[96]);
    let flat_out = f32s(&mut g, "flat_out", &[96]);
    let q8_96 = g.persistent("q8_96", Q8_1, &[96]).unwrap();
    let sum = f32s(&mut g, "sum", &[96]);
    expect_invalid(
        &mut g,
        AddRmsNorm {
            x: flat,
            residual: flat,
            weight: None,
            sum,
            out: flat_out,
            out_q8: Some(q8_96),
            rows: 2,
            dim: 48,
            eps: 1e-5,
        },
        "add_rms_norm",
        &["out_q8", "48", "multiple of 32"],
    );
    expect_invalid(
        &mut g,
        Elementwise {
            kind: ElementwiseKind::SiluMul,
            a: x,
            b: x,
            out,
            out_q8: Some(q8_short),
            len: 128,
        },
        "silu_mul",
        &["out_q8", "expected 128"],
    );
    let w = g.persistent("w", Q4_0, &[3, 64]).unwrap();
    let mm_out = f32s(&mut g, "mm_out", &[2, 3]);
    let mm = |x_q8| MatMul {
        x,
        x_q8: Some(x_q8),
        w,
        bias: None,
        out: mm_out,
        m: 2,
        n: 3,
        k: 64,
    };
    expect_invalid(
        &mut g,
        mm(not_q8),
        "matmul",
        &["x_q8", "\"not_q8\"", "q8_1"],
    );
    expect_invalid(&mut g, mm(q8_short), "matmul", &["x_q8", "expected 128"]);
    let w48 = g.persistent("w48", F32, &[3, 48]).unwrap();
    expect_invalid(
        &mut g,
        MatMul {
            x: flat,
            x_q8: Some(q8_96),
            w: w48,
            bias: None,
            out: mm_out,
            m: 2,
            n: 3,
            k: 48,
        },
        "matmul",
        &["x_q8", "48", "multiple of 32"],
    );
    g.push(norm(q8)).unwrap();
    g.push(mm(q8)).unwrap();
}

#[test]
fn an_embedding_copy_needs_rows_of_whole_q8_1_blocks() {
    let mut g = Graph::new();
    let ids = g.persistent("ids", I32, &[2]).unwrap();
    let embedding = |g: &mut Graph, dim: usize, copy_elements: usize| {
        let table = g
            .persistent(format!("table{dim}"), F32, &[10, dim])
            .unwrap();
        let out = f32s(g, &format!("out{dim}"), &[2, dim]);
        let q8 = g
            .persistent(format!("q8_{dim}_{copy_elements}"), Q8_1, &[copy_elements])
            .unwrap();
        Embedding {
            table,
            ids,
            out,
            out_q8: Some(q8),
            n_tokens: 2,
            vocab: 10,
            dim,
        }
    };
    // 96 elements in rows of 48: the blocks of 32 would straddle rows.
    let op = embedding(&mut g, 48, 96);
    expect_invalid(&mut g, op, "embedding", &["out_q8", "48", "multiple of 32"]);
    let op = embedding(&mut g, 64, 64);
    expect_invalid(&mut g, op, "embedding", &["out_q8", "expected 128"]);
    let op = embedding(&mut g, 64, 128);
    assert_eq!(Op::from(op.clone()).outputs(), [op.out, op.out_q8.unwrap()]);
    g.push(op).unwrap();
}

#[test]
fn block_formats_need_whole_blocks() {
    let mut g = Graph::new();
    let err = g.persistent("w", Q4K, &[4, 100]).unwrap_err();
    assert!(err.to_string().contains("block size 256"), "{err}");
    let err = g.persistent("huge", F32, &[usize::MAX, 2]).unwrap_err();
    assert!(err.to_string().contains("overflows"), "{err}");
}

#[test]
fn attention_and_cache_checks() {
    let mut g = Graph::new();
    let q = f32s(&mut g, "q", &[1, 6, 64]);
    let out = f32s(&mut g, "out", &[1, 6, 64]);
    let pos = g.persistent("pos", I32, &[1]).unwrap();
    let k = g.persistent("k", F16, &[4, 16, 64]).unwrap();
    let v32 = g.persistent("v32", F32, &[4, 16, 64]).unwrap();
    let v = g.persistent("v", F16, &[4, 16, 64]).unwrap();
    let att = |v_cache, n_kv_heads| Attention {
        q,
        k_cache: k,
        v_cache,
        positions: pos,
        slots: None,
        out,
        out_q8: None,
        n_tokens: 1,
        n_heads: 6,
        n_kv_heads,
        head_dim: 64,
        capacity: 16,
        n_slots: 1,
        scale: 0.125,
        window: None,
        softcap: None,
    };
    expect_invalid(
        &mut g,
        att(v, 4),
        "attention",
        &["n_heads 6", "n_kv_heads 4"],
    );
    expect_invalid(
        &mut g,
        Attention {
            n_heads: 8,
            ..att(v, 4)
        },
        "attention",
        &["\"q\"", "expected 512"],
    );
    let q8 = f32s(&mut g, "q8", &[1, 8, 64]);
    let out8 = f32s(&mut g, "out8", &[1, 8, 64]);
    let att8 = |v_cache| Attention {
        q: q8,
        out: out8,
        n_heads: 8,
        ..att(v_cache, 4)
    };
    expect_invalid(
        &mut g,
        att8(v32),
        "attention",
        &["k_cache is f16", "v_cache is f32"],
    );
    expect_invalid(
        &mut g,
        Attention {
            window: Some(0),
            ..att8(v)
        },
        "attention",
        &["window"],
    );
    expect_invalid(
        &mut g,
        Attention {
            softcap: Some(-1.0),
            ..att8(v)
        },
        "attention",
        &["softcap"],
    );
    // A copy of the rows of n_heads * head_dim: q8_1 of the output's size, in rows
    // that are whole blocks.
    let att_q8 = g.persistent("att_q8", Q8_1, &[1, 8 * 64]).unwrap();
    let att_q8_short = g.persistent("att_q8_short", Q8_1, &[6 * 64]).unwrap();
    let with_copy = |out_q8| Attention {
        out_q8: Some(out_q8),
        ..att8(v)
    };
    expect_invalid(
        &mut g,
        with_copy(out8),
        "attention",
        &["out_q8", "\"out8\"", "q8_1"],
    );
    expect_invalid(
        &mut g,
        with_copy(att_q8_short),
        "attention",
        &["out_q8", "\"att_q8_short\"", "expected 512"],
    );
    // Two rows of 6 * 8 = 48: the blocks of 32 would straddle rows.
    let q48 = f32s(&mut g, "q48", &[2, 6, 8]);
    let out48 = f32s(&mut g, "out48", &[2, 6, 8]);
    let pos2 = g.persistent("pos2", I32, &[2]).unwrap();
    let kv48 = g.persistent("kv48", F16, &[2, 16, 8]).unwrap();
    let q8_96 = g.persistent("att_q8_96", Q8_1, &[96]).unwrap();
    expect_invalid(
        &mut g,
        Attention {
            q: q48,
            k_cache: kv48,
            v_cache: kv48,
            positions: pos2,
            out: out48,
            out_q8: Some(q8_96),
            n_tokens: 2,
            n_kv_heads: 2,
            head_dim: 8,
            ..att(v, 4)
        },
        "attention",
        &["out_q8", "48", "multiple of 32"],
    );
    g.push(att8(v)).unwrap();
    g.push(with_copy(att_q8)).unwrap();
    let bad_cache = g
        .persistent("bad_cache", DType::BF16, &[4, 16, 64])
        .unwrap();
    let src = f32s(&mut g, "src", &[1, 4, 64]);
    let append = KvAppend {
        src,
        positions: pos,
        slots: None,
        cache: bad_cache,
        n_tokens: 1,
        n_kv_heads: 4,
        head_dim: 64,
        capacity: 16,
        n_slots: 1,
    };
    expect_invalid(&mut g, append, "kv_append", &["\"bad_cache\"", "bf16"]);
}
