//! The Gated DeltaNet ops against transformers' Qwen3-Next functions on the same
//! inputs (tests/fixtures/delta_net.safetensors, made by
//! scripts/make_delta_net_fixtures.py): its recurrent and chunked gated delta rules
//! (grouped heads, from a zero and from a random state), its causal conv1d for a
//! prompt then decode steps, its gated RMSNorm and its L2 norm. Both sides compute in
//! float32, in different orders, so the tolerance is rounding's.

mod common;
use common::*;
use kiln_core::ops::{
    CausalConv1d, DeltaNetHeads, GatedDeltaNet, GatedRmsNorm, HeadLayout, L2Norm,
};
use kiln_core::DType::F32;
use safetensors::SafeTensors;

/// The heads the fixtures were made with (the script's HK, HV, DK, DV).
const HEADS: DeltaNetHeads = DeltaNetHeads {
    n_k_heads: 2,
    n_v_heads: 4,
    d_k: 16,
    d_v: 12,
    layout: HeadLayout::Grouped,
};
const KERNEL: usize = 4;
const EPS: f32 = 1e-6;
/// Normalised mean squared error allowed between two float32 computations.
const NMSE: f64 = 1e-10;

struct Fixtures(Vec<u8>);

impl Fixtures {
    fn load() -> Self {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/delta_net.safetensors"
        );
        Fixtures(std::fs::read(path).expect("delta_net.safetensors"))
    }

    /// Tensor `name` as f32 values and its shape.
    fn get(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = SafeTensors::deserialize(&self.0).expect("safetensors parse");
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        (f32s(t.data()), t.shape().to_vec())
    }

    fn values(&self, name: &str) -> Vec<f32> {
        self.get(name).0
    }
}

#[test]
fn gated_delta_net_matches_transformers() {
    let fx = Fixtures::load();
    for case in ["recurrent_1", "recurrent_7", "chunk_65", "chunk_130"] {
        let (qkv, shape) = fx.get(&format!("{case}.qkv"));
        assert_eq!(shape[1], HEADS.qkv_width(), "{case}");
        let n = shape[0];
        let mut g = G::new();
        let ids = [
            g.p("qkv", F32, &[n, HEADS.qkv_width()]),
            g.p("a", F32, &[n, HEADS.n_v_heads]),
            g.p("b", F32, &[n, HEADS.n_v_heads]),
            g.p("ssm_a", F32, &[HEADS.n_v_heads]),
            g.p("dt_bias", F32, &[HEADS.n_v_heads]),
            g.p("state", F32, &[HEADS.n_v_heads, HEADS.d_k, HEADS.d_v]),
        ];
        let out = g.p("out", F32, &[n, HEADS.n_v_heads, HEADS.d_v]);
        let [qkv_id, a, b, ssm_a, dt_bias, state] = ids;
        g.g.push(GatedDeltaNet {
            qkv: qkv_id,
            a,
            b,
            ssm_a,
            dt_bias,
            state,
            out,
            n_tokens: n,
            heads: HEADS,
            eps: EPS,
        })
        .unwrap();
        let mut inputs = vec![(qkv_id, f32_bytes(&qkv))];
        for (id, name) in ids[1..]
            .iter()
            .zip(["a", "b", "ssm_a", "dt_bias", "state_in"])
        {
            inputs.push((*id, f32_bytes(&fx.values(&format!("{case}.{name}")))));
        }
        let res = run(&g.g, &inputs, &[out, state]);
        let want_out = fx.values(&format!("{case}.out"));
        let want_state = fx.values(&format!("{case}.state_out"));
        assert_close(&format!("{case}: out"), &f32s(&res[0]), &want_out, NMSE);
        assert_close(&format!("{case}: state"), &f32s(&res[1]), &want_state, NMSE);
    }
}

#[test]
fn causal_conv1d_matches_transformers_for_a_prompt_then_decode_steps() {
    let fx = Fixtures::load();
    let (x, shape) = fx.get("conv.x");
    let (n, channels) = (shape[0], shape[1]);
    let weight = fx.values("conv.weight");
    let want = fx.values("conv.out");
    // The script's prompt length: the rest are decode steps, one token per run.
    let prompt = 7;
    let mut state = vec![0f32; channels * (KERNEL - 1)];
    let mut out = Vec::new();
    let pieces = std::iter::once(0..prompt).chain((prompt..n).map(|t| t..t + 1));
    for tokens in pieces {
        let mut g = G::new();
        let xb = g.p("x", F32, &[tokens.len(), channels]);
        let wb = g.p("w", F32, &[channels, KERNEL]);
        let sb = g.p("state", F32, &[channels, KERNEL - 1]);
        let ob = g.p("out", F32, &[tokens.len(), channels]);
        g.g.push(CausalConv1d {
            x: xb,
            weight: wb,
            state: sb,
            out: ob,
            n_tokens: tokens.len(),
            channels,
            kernel: KERNEL,
        })
        .unwrap();
        let piece = &x[tokens.start * channels..tokens.end * channels];
        let inputs = [
            (xb, f32_bytes(piece)),
            (wb, f32_bytes(&weight)),
            (sb, f32_bytes(&state)),
        ];
        let res = run(&g.g, &inputs, &[ob, sb]);
        out.extend(f32s(&res[0]));
        state = f32s(&res[1]);
    }
    assert_close("conv: out", &out, &want, NMSE);
    assert_eq!(
        state,
        fx.values("conv.state"),
        "conv: state (copies of inputs)"
    );
}

#[test]
fn gated_rms_norm_and_l2_norm_match_transformers() {
    let fx = Fixtures::load();
    let (x, shape) = fx.get("gated_norm.x");
    let (rows, dim) = (shape[0], shape[1]);
    let mut g = G::new();
    let ids = [
        g.p("x", F32, &[rows, dim]),
        g.p("z", F32, &[rows, dim]),
        g.p("w", F32, &[dim]),
    ];
    let out = g.p("out", F32, &[rows, dim]);
    g.g.push(GatedRmsNorm {
        x: ids[0],
        z: ids[1],
        weight: ids[2],
        out,
        rows,
        dim,
        eps: EPS,
    })
    .unwrap();
    let inputs = [
        (ids[0], f32_bytes(&x)),
        (ids[1], f32_bytes(&fx.values("gated_norm.z"))),
        (ids[2], f32_bytes(&fx.values("gated_norm.weight"))),
    ];
    let res = run(&g.g, &inputs, &[out]);
    assert_close(
        "gated_norm",
        &f32s(&res[0]),
        &fx.values("gated_norm.out"),
        NMSE,
    );

    let (x, shape) = fx.get("l2.x");
    let (rows, dim) = (shape[0], shape[1]);
    let mut g = G::new();
    let xb = g.p("x", F32, &[rows, dim]);
    let out = g.p("out", F32, &[rows, dim]);
    g.g.push(L2Norm {
        x: xb,
        out,
        rows,
        dim,
        eps: EPS,
    })
    .unwrap();
    let res = run(&g.g, &[(xb, f32_bytes(&x))], &[out]);
    assert_close("l2", &f32s(&res[0]), &fx.values("l2.out"), NMSE);
}
