//! The Gated DeltaNet ops on the GPU against the CPU reference (kiln-cpu): the causal
//! conv1d with its rolling state, the gated delta rule (the GPU's recurrent kernel
//! against the CPU's recurrent form for one token and its chunkwise form for
//! prompts), gated RMSNorm and L2 norm. Outputs poisoned, states random.

mod common;
use common::*;
use kiln_core::ops::{
    CausalConv1d, DeltaNetHeads, GatedDeltaNet, GatedRmsNorm, HeadLayout, L2Norm,
};
use kiln_core::{Aliasing, BufferId, DType::F32, Graph};
use kiln_cpu::CpuBackend;

/// Runs `g` on the CPU and on the GPU with the same inputs; returns the `outputs` of
/// each (CPU first).
fn both(
    g: &Graph,
    inputs: &[(BufferId, Vec<u8>)],
    outputs: &[BufferId],
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let floats = |r: Vec<Vec<u8>>| r.iter().map(|b| f32s(b)).collect();
    let cpu = run_on(&CpuBackend, g, inputs, outputs, Aliasing::On).expect("cpu run");
    let gpu = run_on(cuda(), g, inputs, outputs, Aliasing::On).expect("gpu run");
    (floats(cpu), floats(gpu))
}

#[test]
#[ignore = "needs a CUDA device"]
fn causal_conv1d_matches_cpu() {
    let mut rng = rng("causal_conv1d_matches_cpu");
    // (n_tokens, channels, kernel): Qwen3-Next's 8192 channels, odd ones, long prompts.
    for (n, ch, k) in [
        (1, 1, 2),
        (1, 8192, 4),
        (1, 8229, 4),
        (7, 13, 4),
        (200, 19, 4),
        (65, 8192, 4),
        (5, 3, 6),
    ] {
        let mut g = Graph::new();
        let x = g.persistent("x", F32, &[n, ch]).unwrap();
        let w = g.persistent("w", F32, &[ch, k]).unwrap();
        let state = g.persistent("state", F32, &[ch, k - 1]).unwrap();
        let out = g.persistent("out", F32, &[n, ch]).unwrap();
        g.push(CausalConv1d {
            x,
            weight: w,
            state,
            out,
            n_tokens: n,
            channels: ch,
            kernel: k,
        })
        .unwrap();
        let inputs = [
            (x, f32_bytes(&uniform(&mut rng, n * ch, 2.0))),
            (w, f32_bytes(&uniform(&mut rng, ch * k, 0.8))),
            (state, f32_bytes(&uniform(&mut rng, ch * (k - 1), 2.0))),
        ];
        let (cpu, gpu) = both(&g, &inputs, &[out, state]);
        let what = format!("conv n={n} ch={ch} k={k}");
        assert_close(&what, &gpu[0], &cpu[0], 1e-12);
        assert_eq!(gpu[1], cpu[1], "{what}: state (copies of inputs)");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gated_delta_net_matches_cpu() {
    let mut rng = rng("gated_delta_net_matches_cpu");
    // (n_k_heads, n_v_heads, d_k, d_v, tokens): odd sizes, several value heads per key
    // head, more value columns than a block's threads, Qwen3-Next's heads (16 / 32 of
    // 128) and Qwen3.5-27B's (16 / 48); each with grouped and with tiled value heads.
    let cases: &[(usize, usize, usize, usize, &[usize])] = &[
        (1, 1, 3, 5, &[1, 7, 65]),
        (2, 6, 7, 5, &[1, 63, 64, 200]),
        (3, 3, 16, 9, &[1, 65]),
        (1, 2, 33, 17, &[1, 7]),
        (2, 4, 128, 200, &[1, 7]),
        (16, 32, 128, 128, &[1, 7, 65]),
        (16, 48, 128, 128, &[1, 7]),
    ];
    let layouts = [HeadLayout::Grouped, HeadLayout::Tiled];
    for (&(nk, nv, dk, dv, tokens), layout) in cases.iter().flat_map(|c| layouts.map(|l| (c, l))) {
        let heads = DeltaNetHeads {
            n_k_heads: nk,
            n_v_heads: nv,
            d_k: dk,
            d_v: dv,
            layout,
        };
        for &n in tokens {
            let mut g = Graph::new();
            let mut p = |name: &str, shape: &[usize]| g.persistent(name, F32, shape).unwrap();
            let qkv = p("qkv", &[n, heads.qkv_width()]);
            let a = p("a", &[n, nv]);
            let b = p("b", &[n, nv]);
            let ssm_a = p("ssm_a", &[nv]);
            let dt_bias = p("dt_bias", &[nv]);
            let state = p("state", &[nv, dk, dv]);
            let out = p("out", &[n, nv, dv]);
            g.push(GatedDeltaNet {
                qkv,
                a,
                b,
                ssm_a,
                dt_bias,
                state,
                out,
                n_tokens: n,
                heads,
                eps: 1e-6,
            })
            .unwrap();
            let rates = uniform(&mut rng, nv, 4.0);
            let inputs = [
                (
                    qkv,
                    f32_bytes(&uniform(&mut rng, n * heads.qkv_width(), 2.0)),
                ),
                (a, f32_bytes(&uniform(&mut rng, n * nv, 2.0))),
                (b, f32_bytes(&uniform(&mut rng, n * nv, 3.0))),
                (
                    ssm_a,
                    f32_bytes(&rates.iter().map(|r| -r.abs()).collect::<Vec<_>>()),
                ),
                (dt_bias, f32_bytes(&uniform(&mut rng, nv, 1.0))),
                (
                    state,
                    f32_bytes(&uniform(&mut rng, heads.state_elements(), 1.0)),
                ),
            ];
            let (cpu, gpu) = both(&g, &inputs, &[out, state]);
            let what = format!("delta heads {nk}/{nv} {layout:?} d {dk}x{dv} n={n}");
            assert_close(&format!("{what}: out"), &gpu[0], &cpu[0], 1e-9);
            assert_close(&format!("{what}: state"), &gpu[1], &cpu[1], 1e-9);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gated_rms_norm_and_l2_norm_match_cpu() {
    let mut rng = rng("delta_net_norms_match_cpu");
    for (rows, dim) in [(1, 1), (3, 7), (64, 128), (5, 1000), (2, 4097)] {
        let mut g = Graph::new();
        let x = g.persistent("x", F32, &[rows, dim]).unwrap();
        let z = g.persistent("z", F32, &[rows, dim]).unwrap();
        let w = g.persistent("w", F32, &[dim]).unwrap();
        let gated = g.persistent("gated", F32, &[rows, dim]).unwrap();
        let l2 = g.persistent("l2", F32, &[rows, dim]).unwrap();
        let eps = 1e-6;
        g.push(GatedRmsNorm {
            x,
            z,
            weight: w,
            out: gated,
            rows,
            dim,
            eps,
        })
        .unwrap();
        g.push(L2Norm {
            x,
            out: l2,
            rows,
            dim,
            eps,
        })
        .unwrap();
        let inputs = [
            (x, f32_bytes(&uniform(&mut rng, rows * dim, 3.0))),
            (z, f32_bytes(&uniform(&mut rng, rows * dim, 3.0))),
            (w, f32_bytes(&uniform(&mut rng, dim, 1.5))),
        ];
        let (cpu, gpu) = both(&g, &inputs, &[gated, l2]);
        assert_close(
            &format!("gated_rms_norm {rows}x{dim}"),
            &gpu[0],
            &cpu[0],
            1e-11,
        );
        assert_close(&format!("l2_norm {rows}x{dim}"), &gpu[1], &cpu[1], 1e-11);
    }
}
