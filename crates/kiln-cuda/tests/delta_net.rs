//! The Gated DeltaNet ops on the GPU against the CPU reference (kiln-cpu): the causal
//! conv1d with its rolling state, the gated delta rule (the GPU's recurrent kernel for
//! one token and short prompts, its chunkwise kernel for prompts, against the CPU's
//! recurrent form for one token and its chunkwise form for prompts), gated RMSNorm and
//! L2 norm. Outputs poisoned, states random. The choice of kernel and the arguments'
//! checks run without a GPU.

mod common;
use common::*;
use kiln_core::ops::{
    CausalConv1d, DeltaNetHeads, GatedDeltaNet, GatedRmsNorm, HeadLayout, L2Norm, DELTA_NET_CHUNK,
};
use kiln_core::{Aliasing, BufferId, DType::F32, Error, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::delta_net::{
    chunk_shared_bytes, DeltaNetArgs, DeltaNetForm, DeltaNetKernel, CHUNK_KEY_DIMS,
    CHUNK_MIN_TOKENS,
};
use rand::rngs::StdRng;

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
        let (xv, wv, sv) = (
            uniform(&mut rng, n * ch, 2.0),
            uniform(&mut rng, ch * k, 0.8),
            uniform(&mut rng, ch * (k - 1), 2.0),
        );
        let inputs = [
            (x, f32_bytes(&xv)),
            (w, f32_bytes(&wv)),
            (state, f32_bytes(&sv)),
        ];
        let (cpu, gpu) = both(&g, &inputs, &[out, state]);
        let what = format!("conv n={n} ch={ch} k={k}");
        let magnitudes = conv_term_magnitudes(&xv, &wv, &sv, n, ch, k);
        for (i, ((&g, &c), &m)) in gpu[0].iter().zip(&cpu[0]).zip(&magnitudes).enumerate() {
            let bound = 8.0 * k as f32 * f32::EPSILON * m;
            assert!(
                (g - c).abs() <= bound,
                "{what}: out[{i}] {g} against the CPU's {c}, beyond {bound:e} (f32 roundings of terms summing to {m} in magnitude)"
            );
        }
        assert_eq!(gpu[1], cpu[1], "{what}: state (copies of inputs)");
    }
}

/// Per output of the causal conv1d, the sum of its terms' magnitudes
/// `sum_j |weight[c, j] * s[c][t + j]|` (s: the state, then x): two f32 summation orders
/// of the same terms differ by a few roundings of it (SiLU keeps or shrinks the
/// difference), however much the terms cancel.
fn conv_term_magnitudes(
    x: &[f32],
    w: &[f32],
    state: &[f32],
    n: usize,
    ch: usize,
    k: usize,
) -> Vec<f32> {
    let mut out = vec![0.0; n * ch];
    for c in 0..ch {
        let s: Vec<f32> = state[c * (k - 1)..(c + 1) * (k - 1)]
            .iter()
            .copied()
            .chain((0..n).map(|t| x[t * ch + c]))
            .collect();
        for t in 0..n {
            out[t * ch + c] = (0..k).map(|j| (w[c * k + j] * s[t + j]).abs()).sum();
        }
    }
    out
}

/// The largest normalised MSE of either kernel of the delta rule against the CPU
/// reference. Both forms are f32 (the chunkwise kernel's products in 3xTF32, within a
/// few f32 roundings of f32 products), as are the CPU's, whose own error against a
/// float64 recurrence is held to 1e-9 (kiln-cpu's tests); what differs is the order of
/// the roundings, which the state carries from token to token.
const DELTA_NMSE: f64 = 1e-9;

/// A gated delta rule's random inputs over `n` tokens, as the models' ranges go, and a
/// running sequence's state.
struct DeltaCase {
    heads: DeltaNetHeads,
    n: usize,
    qkv: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    ssm_a: Vec<f32>,
    dt_bias: Vec<f32>,
    state: Vec<f32>,
}

/// A [`DeltaCase`]'s one-op graph.
struct DeltaGraph {
    graph: Graph,
    inputs: Vec<(BufferId, Vec<u8>)>,
    /// The op's `[out, state]`.
    outputs: [BufferId; 2],
    /// The kernel the CUDA backend runs the op with.
    kernel: DeltaNetKernel,
}

impl DeltaCase {
    /// Value heads grouped by key head (the checkpoints' layout).
    fn new(rng: &mut StdRng, nk: usize, nv: usize, dk: usize, dv: usize, n: usize) -> Self {
        Self::with_layout(rng, nk, nv, dk, dv, n, HeadLayout::Grouped)
    }

    fn with_layout(
        rng: &mut StdRng,
        nk: usize,
        nv: usize,
        dk: usize,
        dv: usize,
        n: usize,
        layout: HeadLayout,
    ) -> Self {
        let heads = DeltaNetHeads {
            n_k_heads: nk,
            n_v_heads: nv,
            d_k: dk,
            d_v: dv,
            layout,
        };
        DeltaCase {
            heads,
            n,
            qkv: uniform(rng, n * heads.qkv_width(), 2.0),
            a: uniform(rng, n * nv, 2.0),
            b: uniform(rng, n * nv, 3.0),
            ssm_a: uniform(rng, nv, 4.0).iter().map(|r| -r.abs()).collect(),
            dt_bias: uniform(rng, nv, 1.0),
            state: uniform(rng, heads.state_elements(), 1.0),
        }
    }

    /// The tokens of `range`, from the same starting state.
    fn tokens(&self, range: std::ops::Range<usize>) -> Self {
        let (w, nv) = (self.heads.qkv_width(), self.heads.n_v_heads);
        DeltaCase {
            heads: self.heads,
            n: range.len(),
            qkv: self.qkv[range.start * w..range.end * w].to_vec(),
            a: self.a[range.start * nv..range.end * nv].to_vec(),
            b: self.b[range.start * nv..range.end * nv].to_vec(),
            ssm_a: self.ssm_a.clone(),
            dt_bias: self.dt_bias.clone(),
            state: self.state.clone(),
        }
    }

    fn what(&self) -> String {
        let h = self.heads;
        format!(
            "delta heads {}/{} {:?} d {}x{} n={}",
            h.n_k_heads, h.n_v_heads, h.layout, h.d_k, h.d_v, self.n
        )
    }

    fn graph(&self) -> DeltaGraph {
        let (n, h) = (self.n, self.heads);
        let nv = h.n_v_heads;
        let mut g = Graph::new();
        let mut p = |name: &str, shape: &[usize]| g.persistent(name, F32, shape).unwrap();
        let qkv = p("qkv", &[n, h.qkv_width()]);
        let a = p("a", &[n, nv]);
        let b = p("b", &[n, nv]);
        let ssm_a = p("ssm_a", &[nv]);
        let dt_bias = p("dt_bias", &[nv]);
        let state = p("state", &[nv, h.d_k, h.d_v]);
        let out = p("out", &[n, nv, h.d_v]);
        let op = GatedDeltaNet {
            qkv,
            a,
            b,
            ssm_a,
            dt_bias,
            state,
            out,
            n_tokens: n,
            heads: h,
            eps: 1e-6,
        };
        let kernel = DeltaNetArgs::of_op(&op, &g)
            .unwrap()
            .check()
            .unwrap()
            .kernel;
        g.push(op).unwrap();
        let inputs = vec![
            (qkv, f32_bytes(&self.qkv)),
            (a, f32_bytes(&self.a)),
            (b, f32_bytes(&self.b)),
            (ssm_a, f32_bytes(&self.ssm_a)),
            (dt_bias, f32_bytes(&self.dt_bias)),
            (state, f32_bytes(&self.state)),
        ];
        DeltaGraph {
            graph: g,
            inputs,
            outputs: [out, state],
            kernel,
        }
    }

    /// Runs the case on the CPU and the GPU and compares the output and the final
    /// state; returns the kernel the GPU ran.
    fn check(&self) -> DeltaNetKernel {
        let DeltaGraph {
            graph,
            inputs,
            outputs,
            kernel,
        } = self.graph();
        let (cpu, gpu) = both(&graph, &inputs, &outputs);
        let what = format!("{} ({kernel:?})", self.what());
        assert_close(&format!("{what}: out"), &gpu[0], &cpu[0], DELTA_NMSE);
        assert_close(&format!("{what}: state"), &gpu[1], &cpu[1], DELTA_NMSE);
        kernel
    }

    /// The GPU's output and final state.
    fn run_gpu(&self) -> (Vec<f32>, Vec<f32>) {
        let g = self.graph();
        let res = run_on(cuda(), &g.graph, &g.inputs, &g.outputs, Aliasing::On).expect("gpu run");
        (f32s(&res[0]), f32s(&res[1]))
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gated_delta_net_matches_cpu() {
    let mut rng = rng("gated_delta_net_matches_cpu");
    // (n_k_heads, n_v_heads, d_k, d_v, tokens): odd sizes, grouped heads, more value
    // columns than a block's threads, Qwen3-Next's heads (16 / 32 of 128); one token
    // and short prompts (the recurrent kernel), prompts (the chunkwise kernel), and a
    // key head too long for the chunkwise kernel, which runs recurrently; Qwen3.5-27B's
    // heads (16 / 48); each with value heads grouped by key head and tiled across them.
    let cases: &[(usize, usize, usize, usize, &[usize])] = &[
        (1, 1, 3, 5, &[1, 3, 7, 65]),
        (2, 6, 7, 5, &[1, 2, 63, 64, 200]),
        (3, 3, 16, 9, &[1, 65]),
        (1, 2, 33, 17, &[1, 3, 7]),
        (2, 4, 128, 200, &[1, 3, 7]),
        (16, 32, 128, 128, &[1, 3, 7, 65]),
        (16, 48, 128, 128, &[1, 7, 70]),
        (1, 2, 300, 7, &[1, 70]),
    ];
    for layout in [HeadLayout::Grouped, HeadLayout::Tiled] {
        for &(nk, nv, dk, dv, tokens) in cases {
            for &n in tokens {
                DeltaCase::with_layout(&mut rng, nk, nv, dk, dv, n, layout).check();
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gated_delta_net_chunkwise_matches_cpu() {
    let mut rng = rng("gated_delta_net_chunkwise_matches_cpu");
    let (min, chunk) = (CHUNK_MIN_TOKENS, DELTA_NET_CHUNK);
    // (n_k_heads, n_v_heads, d_k, d_v, tokens): prompts from the threshold up, shorter
    // than a chunk, whole chunks, and chunk remainders of 17 and of 1 token; grouped
    // heads (3 and 2 value heads per key head); odd head sizes; each key-head size
    // the kernel is compiled for (64, 128, 256) and sizes between them; value heads of
    // one and of several column tiles (32 columns each); Qwen3-Next's heads.
    let cases: &[(usize, usize, usize, usize, &[usize])] = &[
        (1, 1, 3, 5, &[min, chunk - 1, chunk, 3 * chunk + 17]),
        (2, 6, 7, 5, &[2 * chunk, 3 * chunk + 1]),
        (3, 3, 16, 9, &[chunk + 1]),
        (1, 2, 33, 17, &[100]),
        (2, 4, 64, 40, &[3 * chunk + 17]),
        (1, 1, 129, 31, &[80]),
        (2, 4, 128, 200, &[2 * chunk + 2]),
        (1, 2, 256, 64, &[2 * chunk + 2]),
        (16, 32, 128, 128, &[min, 3 * chunk + 17]),
    ];
    for &(nk, nv, dk, dv, tokens) in cases {
        for &n in tokens {
            let kernel = DeltaCase::new(&mut rng, nk, nv, dk, dv, n).check();
            assert!(
                matches!(kernel, DeltaNetKernel::Chunkwise { .. }),
                "n={n} d_k={dk}: {kernel:?}"
            );
        }
    }
    // One token short of the threshold runs recurrently.
    let kernel = DeltaCase::new(&mut rng, 2, 4, 16, 8, min - 1).check();
    assert_eq!(kernel, DeltaNetKernel::Recurrent);
}

/// Two decode tokens as two delta-rule ops on one state in one graph: the recurrent
/// kernel loads its state before it waits for the kernel before it, so the second
/// launch (right after the first, which writes the state) is serialized, and both
/// tokens' outputs and the final state are the CPU's.
#[test]
#[ignore = "needs a CUDA device"]
fn back_to_back_decode_tokens_on_one_state_match_the_cpu() {
    let mut rng = rng("back_to_back_decode_tokens_on_one_state_match_the_cpu");
    let case = DeltaCase::new(&mut rng, 2, 4, 128, 128, 2);
    let (h, nv) = (case.heads, case.heads.n_v_heads);
    let mut g = Graph::new();
    let state = g.persistent("state", F32, &[nv, h.d_k, h.d_v]).unwrap();
    let ssm_a = g.persistent("ssm_a", F32, &[nv]).unwrap();
    let dt_bias = g.persistent("dt_bias", F32, &[nv]).unwrap();
    let mut inputs = vec![
        (state, f32_bytes(&case.state)),
        (ssm_a, f32_bytes(&case.ssm_a)),
        (dt_bias, f32_bytes(&case.dt_bias)),
    ];
    let mut outputs = Vec::new();
    for t in 0..2 {
        let token = case.tokens(t..t + 1);
        let qkv = g
            .persistent(format!("qkv{t}"), F32, &[1, h.qkv_width()])
            .unwrap();
        let a = g.persistent(format!("a{t}"), F32, &[1, nv]).unwrap();
        let b = g.persistent(format!("b{t}"), F32, &[1, nv]).unwrap();
        let out = g
            .persistent(format!("out{t}"), F32, &[1, nv, h.d_v])
            .unwrap();
        g.push(GatedDeltaNet {
            qkv,
            a,
            b,
            ssm_a,
            dt_bias,
            state,
            out,
            n_tokens: 1,
            heads: h,
            eps: 1e-6,
        })
        .unwrap();
        inputs.extend([
            (qkv, f32_bytes(&token.qkv)),
            (a, f32_bytes(&token.a)),
            (b, f32_bytes(&token.b)),
        ]);
        outputs.push(out);
    }
    outputs.push(state);
    let launches = compiled_launches(cuda(), &g);
    assert_eq!(launches.len(), 2);
    assert!(!launches[0].1 && launches[1].1, "{launches:?}");
    let (cpu, gpu) = both(&g, &inputs, &outputs);
    for (name, (got, want)) in ["out0", "out1", "state"].iter().zip(gpu.iter().zip(&cpu)) {
        assert_close(name, got, want, DELTA_NMSE);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gated_delta_net_chunkwise_prompt_in_pieces_equals_one_run() {
    let mut rng = rng("gated_delta_net_chunkwise_prompt_in_pieces_equals_one_run");
    // (tokens, split): both pieces chunkwise, off and on chunk boundaries; a piece
    // short enough to run recurrently.
    for (n, split) in [(3 * 64 + 17, 130), (200, 64), (100, 2)] {
        let case = DeltaCase::new(&mut rng, 2, 4, 48, 40, n);
        let (whole, whole_state) = case.run_gpu();
        let (first, mid) = case.tokens(0..split).run_gpu();
        let mut second = case.tokens(split..n);
        second.state = mid;
        let (rest, end) = second.run_gpu();
        let pieces: Vec<f32> = first.into_iter().chain(rest).collect();
        let what = format!("n={n} split={split}");
        assert_close(&format!("{what}: out"), &pieces, &whole, DELTA_NMSE);
        assert_close(&format!("{what}: state"), &end, &whole_state, DELTA_NMSE);
        // And the one run is the CPU's.
        case.check();
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

/// The arguments of a gated delta rule over `n` tokens with buffers of exactly the
/// sizes its shape needs.
fn delta_args(n: usize, nk: usize, nv: usize, dk: usize, dv: usize) -> DeltaNetArgs {
    let heads = DeltaNetHeads {
        n_k_heads: nk,
        n_v_heads: nv,
        d_k: dk,
        d_v: dv,
        layout: HeadLayout::Grouped,
    };
    DeltaNetArgs {
        n_tokens: n,
        heads,
        eps: 1e-6,
        qkv_bytes: 4 * n * heads.qkv_width(),
        a_bytes: 4 * n * nv,
        b_bytes: 4 * n * nv,
        ssm_a_bytes: 4 * nv,
        dt_bias_bytes: 4 * nv,
        state_bytes: 4 * heads.state_elements(),
        out_bytes: 4 * n * nv * dv,
    }
}

#[test]
fn decode_and_short_prompts_run_recurrently_and_prompts_chunkwise() {
    let qwen = |n| delta_args(n, 16, 32, 128, 128);
    for n in [1, 2, CHUNK_MIN_TOKENS - 1] {
        let plan = qwen(n).check().unwrap();
        assert_eq!(plan.kernel, DeltaNetKernel::Recurrent, "n={n}");
        // One block per (value head, 32 value columns), of 8 warps.
        assert_eq!(plan.config.grid_dim, (32, 4, 1));
        assert_eq!(plan.config.block_dim, (256, 1, 1));
        assert_eq!(plan.spec.key, "gated_delta_net|form=recurrent");
    }
    for n in [CHUNK_MIN_TOKENS, 64, 4096] {
        let plan = qwen(n).check().unwrap();
        assert_eq!(plan.kernel, DeltaNetKernel::Chunkwise { d_k: 128 }, "n={n}");
        // One block per (value head, 32 value columns), of 8 warps.
        assert_eq!(plan.config.grid_dim, (32, 4, 1));
        assert_eq!(plan.config.block_dim, (256, 1, 1));
        assert_eq!(
            plan.config.shared_mem_bytes as usize,
            chunk_shared_bytes(128)
        );
        assert_eq!(plan.spec.key, "gated_delta_net|form=chunkwise|d_k=128");
        assert_eq!(
            plan.spec.name_expression,
            "kiln::gated_delta_net_chunk<128>"
        );
    }
    // Forced forms, for benchmarks and tests.
    let plan = qwen(4096).check_form(DeltaNetForm::Recurrent).unwrap();
    assert_eq!(plan.kernel, DeltaNetKernel::Recurrent);
    let plan = qwen(1).check_form(DeltaNetForm::Chunkwise).unwrap();
    assert_eq!(plan.kernel, DeltaNetKernel::Chunkwise { d_k: 128 });
    // 33 value columns need two tiles.
    let plan = delta_args(100, 1, 1, 8, 33).check().unwrap();
    assert_eq!(plan.config.grid_dim, (1, 2, 1));
}

#[test]
fn the_chunkwise_kernel_takes_key_heads_up_to_256() {
    for (dk, tier) in [
        (1, 64),
        (64, 64),
        (65, 128),
        (128, 128),
        (129, 256),
        (256, 256),
    ] {
        let plan = delta_args(100, 1, 2, dk, 8).check().unwrap();
        assert_eq!(
            plan.kernel,
            DeltaNetKernel::Chunkwise { d_k: tier },
            "d_k={dk}"
        );
    }
    assert_eq!(CHUNK_KEY_DIMS, [64, 128, 256]);
    // Longer key heads run recurrently, or are refused when the chunkwise kernel is
    // asked for.
    let args = delta_args(100, 1, 2, 257, 8);
    assert_eq!(args.check().unwrap().kernel, DeltaNetKernel::Recurrent);
    match args.check_form(DeltaNetForm::Chunkwise) {
        Err(Error::InvalidArgument { op, msg }) => assert!(
            op == "gated_delta_net" && msg.contains("d_k = 257 exceeds the chunkwise kernel's 256"),
            "{msg}"
        ),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    // Every tier's shared memory fits a block of an H100 or H200 (227 KiB).
    for tier in CHUNK_KEY_DIMS {
        assert!(chunk_shared_bytes(tier) <= 227 * 1024, "d_k {tier}");
    }
    // 64 query and key rows of 132 floats, 128 state rows and 64 value rows of 40,
    // two 64 x 68 matrices and 4 floats per token.
    assert_eq!(
        chunk_shared_bytes(128),
        4 * (2 * 64 * 132 + 128 * 40 + 64 * 40 + 2 * 64 * 68 + 4 * 64)
    );
}

#[test]
fn the_delta_rule_rejects_invalid_arguments() {
    let invalid = |args: DeltaNetArgs, want: &str| match args.check() {
        Err(Error::InvalidArgument { op, msg }) => {
            assert!(op == "gated_delta_net" && msg.contains(want), "{msg}")
        }
        other => panic!("{want}: expected InvalidArgument, got {other:?}"),
    };
    let ok = delta_args(100, 2, 4, 16, 8);
    assert!(ok.check().is_ok());
    invalid(DeltaNetArgs { n_tokens: 0, ..ok }, "n_tokens must be > 0");
    invalid(delta_args(100, 3, 4, 16, 8), "not a multiple of n_k_heads");
    invalid(
        DeltaNetArgs {
            eps: f32::NAN,
            ..ok
        },
        "eps must be finite",
    );
    let short = |bytes: &mut usize| *bytes -= 4;
    for (role, field) in [
        (
            "qkv",
            (|a: &mut DeltaNetArgs| &mut a.qkv_bytes) as fn(&mut DeltaNetArgs) -> &mut usize,
        ),
        ("a", |a| &mut a.a_bytes),
        ("b", |a| &mut a.b_bytes),
        ("ssm_a", |a| &mut a.ssm_a_bytes),
        ("dt_bias", |a| &mut a.dt_bias_bytes),
        ("state", |a| &mut a.state_bytes),
        ("out", |a| &mut a.out_bytes),
    ] {
        let mut args = ok;
        short(field(&mut args));
        invalid(args, &format!("{role} needs"));
    }
}
