//! Attention: the dispatch checks and kernel choice (no GPU needed) and parity of the
//! decode, flash and prefill kernels with kiln-cpu on the GPU, with and without the
//! Q8_1 copy of the output.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::Attention;
use kiln_core::{Aliasing, BufferId, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::attention::{
    flash_shared_bytes, AttentionArgs, AttentionKernel, AttentionShape,
};

/// One decode query of 32 heads over an F16 cache of 8 KV heads x 4096 x 128.
fn shape() -> AttentionShape {
    AttentionShape {
        n_tokens: 1,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        capacity: 4096,
        n_slots: 1,
        scale: 0.088,
        window: None,
        softcap: None,
    }
}

fn args_for(shape: AttentionShape) -> AttentionArgs {
    args_with(shape, DType::F16)
}

fn args_with(shape: AttentionShape, cache: DType) -> AttentionArgs {
    let nq = shape.n_tokens * shape.n_heads * shape.head_dim * 4;
    let nkv = shape.n_slots
        * shape.n_kv_heads
        * shape.capacity
        * shape.head_dim
        * cache.bytes_for(1).unwrap();
    AttentionArgs {
        shape,
        cache,
        q_bytes: nq,
        k_bytes: nkv,
        v_bytes: nkv,
        positions_bytes: shape.n_tokens * 4,
        slots_bytes: None,
        out_bytes: nq,
        out_q8_bytes: None,
    }
}

/// [`args_for`] with a Q8_1 copy of the output of the size it needs.
fn args_with_copy(shape: AttentionShape) -> AttentionArgs {
    let n = shape.n_tokens * shape.n_heads * shape.head_dim;
    AttentionArgs {
        out_q8_bytes: Some(DType::Q8_1.bytes_for(n).unwrap()),
        ..args_for(shape)
    }
}

/// Whether the CUDA kernels write a Q8_1 copy of `shape`'s output: a head dimension
/// that is a multiple of 32.
fn takes_copy(shape: &AttentionShape) -> bool {
    shape.head_dim % 32 == 0
}

fn args() -> AttentionArgs {
    args_for(shape())
}

#[test]
fn one_query_runs_the_split_decode_kernel_with_a_workspace() {
    let plan = args().check().unwrap();
    // 16 lanes per row of 128 columns: a warp's tile is 2 rows x 4 passes = 8 rows, a
    // split at least 4 warps x 4 tiles = 128 rows. Splits: min(4096 rows / 128, 132
    // multiprocessors x 3 blocks / 8 KV heads = 49, 64).
    assert_eq!(
        plan.kernel,
        AttentionKernel::Decode {
            group: 4,
            lanes: 16,
            splits: 32
        }
    );
    assert_eq!(plan.split_rows, 128);
    assert_eq!(plan.config.grid_dim, (32, 8, 1));
    assert_eq!(plan.config.block_dim, (128, 1, 1));
    // Four warps x 4 tiles of 4 KiB, then 4 heads x 128 f32 queries.
    assert_eq!(plan.config.shared_mem_bytes, 4 * 4 * 4096 + 4 * 128 * 4);
    assert_eq!(
        plan.spec.name_expression,
        "kiln::attention_decode<kiln::F16, 4, 16>"
    );
    // Counters, then 32 heads x 32 splits of 128 values, a max and a sum.
    assert_eq!(plan.workspace_bytes, 4096 * 4 + 32 * 32 * 130 * 4);
}

#[test]
fn the_decode_grid_is_sized_by_the_capacity_and_the_device() {
    // Positions live on the device: the plan sees only the capacity (or the window).
    for (capacity, splits) in [(128, 1), (129, 2), (1000, 8), (6272, 49), (1 << 20, 49)] {
        let plan = args_for(AttentionShape {
            capacity,
            n_slots: 1,
            ..shape()
        })
        .check()
        .unwrap();
        assert_eq!(plan.config.grid_dim, (splits, 8, 1), "capacity {capacity}");
    }
    let windowed = args_for(AttentionShape {
        window: Some(200),
        ..shape()
    })
    .check()
    .unwrap();
    assert_eq!(windowed.config.grid_dim.0, 2, "200 rows in splits of 128");
    // Half the multiprocessors, half the blocks; four queries share them.
    assert_eq!(args().check_on(66).unwrap().config.grid_dim.0, 24);
    let four = args_for(AttentionShape {
        n_tokens: 4,
        ..shape()
    })
    .check()
    .unwrap();
    assert_eq!(four.config.grid_dim, (12, 8, 4));
}

#[test]
fn decode_lanes_and_split_rows_follow_the_head_dim_and_cache() {
    // (head_dim, cache, lanes, rows per split): 4 warps x 4 tiles of (32 / lanes) rows
    // x (64 bytes / a lane's 8 elements) passes.
    for (head_dim, cache, lanes, rows) in [
        (64, DType::F16, 8, 256),
        (72, DType::F16, 16, 128),
        (128, DType::F32, 16, 64),
        (200, DType::F16, 32, 64),
        (256, DType::F32, 32, 32),
        (8, DType::F32, 8, 128),
    ] {
        let plan = args_with(
            AttentionShape {
                head_dim,
                ..shape()
            },
            cache,
        )
        .check()
        .unwrap();
        assert!(
            matches!(plan.kernel, AttentionKernel::Decode { lanes: l, .. } if l == lanes),
            "{head_dim} {cache}: {:?}",
            plan.kernel
        );
        assert_eq!(plan.split_rows, rows, "{head_dim} {cache}");
    }
}

#[test]
fn a_small_cache_is_not_split_and_needs_no_workspace() {
    let plan = args_for(AttentionShape {
        capacity: 64,
        n_slots: 1,
        ..shape()
    })
    .check()
    .unwrap();
    assert!(matches!(
        plan.kernel,
        AttentionKernel::Decode { splits: 1, .. }
    ));
    assert_eq!(plan.workspace_bytes, 0);
}

#[test]
fn large_groups_run_in_chunks_of_eight_heads() {
    let plan = args_for(AttentionShape {
        n_heads: 40,
        n_kv_heads: 2,
        head_dim: 256,
        ..shape()
    })
    .check()
    .unwrap();
    assert!(matches!(
        plan.kernel,
        AttentionKernel::Decode {
            group: 8,
            lanes: 32,
            ..
        }
    ));
    assert_eq!(
        plan.config.grid_dim.1,
        2 * 3,
        "2 KV heads x 3 chunks of 20 heads"
    );
}

#[test]
fn many_queries_over_an_f16_cache_run_the_flash_kernel() {
    let plan = args_for(AttentionShape {
        n_tokens: 512,
        ..shape()
    })
    .check()
    .unwrap();
    assert_eq!(plan.kernel, AttentionKernel::Flash { head_dim: 128 });
    // 4 heads per KV head: 16 tokens per block of 64 rows (4 warps of 16).
    assert_eq!(plan.config.grid_dim, (32, 8, 1));
    assert_eq!(plan.config.block_dim, (128, 1, 1));
    assert_eq!(plan.workspace_bytes, 0);
    // Two stages of 64-row K and V tiles, rows of 128 + 8 f16 (Q shares them).
    assert_eq!(plan.config.shared_mem_bytes, 2 * 2 * 64 * 136 * 2);
    assert_eq!(
        plan.spec.name_expression,
        "kiln::attention_flash<kiln::F16, 128>"
    );
}

#[test]
fn the_flash_kernel_runs_on_the_smallest_head_dim_that_holds_the_heads() {
    for (head_dim, compiled) in [
        (8, 64),
        (64, 64),
        (80, 128),
        (128, 128),
        (136, 256),
        (256, 256),
    ] {
        let plan = args_for(AttentionShape {
            n_tokens: 5,
            head_dim,
            ..shape()
        })
        .check()
        .unwrap();
        assert_eq!(
            plan.kernel,
            AttentionKernel::Flash { head_dim: compiled },
            "{head_dim}"
        );
        assert_eq!(plan.config.shared_mem_bytes, flash_shared_bytes(compiled));
    }
    // 64: two stages of 64-row tiles of 72; 256: 32-row tiles of 264, then 64 query rows.
    assert_eq!(flash_shared_bytes(64), 4 * 64 * 72 * 2);
    assert_eq!(flash_shared_bytes(256), (4 * 32 + 64) * 264 * 2);
}

#[test]
fn flash_blocks_hold_64_rows_of_one_kv_head() {
    // (n_heads, n_kv_heads, grid): groups of 1, 8 and 5 (12 tokens, 60 rows), 40 (one token
    // per block), 80 (chunks of 64 heads, then 16).
    for (n_heads, n_kv_heads, grid) in [
        (8, 8, (16, 8, 1)),
        (32, 4, (125, 4, 1)),
        (40, 8, (84, 8, 1)),
        (40, 1, (1000, 1, 1)),
        (80, 1, (1000, 2, 1)),
    ] {
        let plan = args_for(AttentionShape {
            n_tokens: 1000,
            n_heads,
            n_kv_heads,
            capacity: 1000,
            n_slots: 1,
            ..shape()
        })
        .check()
        .unwrap();
        assert_eq!(plan.config.grid_dim, grid, "{n_heads} / {n_kv_heads}");
    }
}

#[test]
fn many_queries_over_an_f32_cache_run_the_prefill_kernel() {
    let plan = args_with(
        AttentionShape {
            n_tokens: 512,
            ..shape()
        },
        DType::F32,
    )
    .check()
    .unwrap();
    assert_eq!(plan.kernel, AttentionKernel::Prefill { max_head_dim: 128 });
    // 4 heads per KV head: 8 tokens per block of 32 rows.
    assert_eq!(plan.config.grid_dim, (64, 8, 1));
    assert_eq!(plan.workspace_bytes, 0);
    assert_eq!(
        plan.config.shared_mem_bytes as usize,
        ((32 + 2 * 16) * 129 + 32 * 17) * 4
    );
}

fn rejected(shape: AttentionShape) -> String {
    invalid(args_for(shape).check())
}

#[test]
fn zero_tokens_are_rejected() {
    let m = rejected(AttentionShape {
        n_tokens: 0,
        ..shape()
    });
    assert_eq!(m, "attention: n_tokens must be > 0, got 0");
}

#[test]
fn zero_heads_are_rejected() {
    let m = rejected(AttentionShape {
        n_heads: 0,
        ..shape()
    });
    assert_eq!(m, "attention: n_heads must be > 0, got 0");
}

#[test]
fn zero_kv_heads_are_rejected() {
    let m = rejected(AttentionShape {
        n_kv_heads: 0,
        ..shape()
    });
    assert_eq!(m, "attention: n_kv_heads must be > 0, got 0");
}

#[test]
fn a_zero_capacity_is_rejected() {
    let m = rejected(AttentionShape {
        capacity: 0,
        n_slots: 1,
        ..shape()
    });
    assert_eq!(m, "attention: capacity must be > 0, got 0");
}

#[test]
fn heads_that_are_not_a_multiple_of_the_kv_heads_are_rejected() {
    let m = rejected(AttentionShape {
        n_heads: 30,
        ..shape()
    });
    assert_eq!(m, "attention: n_heads 30 is not a multiple of n_kv_heads 8");
}

#[test]
fn a_scale_that_is_not_finite_is_rejected() {
    let m = rejected(AttentionShape {
        scale: f32::NAN,
        ..shape()
    });
    assert_eq!(m, "attention: scale must be finite, got NaN");
}

#[test]
fn an_empty_window_is_rejected() {
    let m = rejected(AttentionShape {
        window: Some(0),
        ..shape()
    });
    assert_eq!(m, "attention: window must be > 0");
}

#[test]
fn a_softcap_that_is_not_finite_and_positive_is_rejected() {
    for cap in [0.0, -30.0, f32::INFINITY] {
        let m = rejected(AttentionShape {
            softcap: Some(cap),
            ..shape()
        });
        assert_eq!(
            m,
            format!("attention: softcap must be finite and > 0, got {cap}")
        );
    }
}

#[test]
fn a_head_dim_that_is_not_a_multiple_of_8_is_rejected() {
    let m = rejected(AttentionShape {
        head_dim: 36,
        ..shape()
    });
    assert_eq!(
        m,
        "attention: head_dim 36 is not supported by the CUDA kernels: it must be a multiple of 8 and at most 256"
    );
}

#[test]
fn a_head_dim_above_256_is_rejected() {
    let m = rejected(AttentionShape {
        head_dim: 264,
        ..shape()
    });
    assert!(
        m.starts_with("attention: head_dim 264 is not supported"),
        "{m}"
    );
}

#[test]
fn a_cache_dtype_other_than_f32_or_f16_is_rejected() {
    let m = invalid(
        AttentionArgs {
            cache: DType::Q8_0,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "attention: cache has dtype q8_0, expected one of [f32, f16]"
    );
}

#[test]
fn short_queries_are_rejected() {
    let m = invalid(
        AttentionArgs {
            q_bytes: 4,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "attention: q needs 4096 f32 elements (16384 bytes), its buffer has 4 bytes"
    );
}

#[test]
fn a_short_output_is_rejected() {
    let m = invalid(
        AttentionArgs {
            out_bytes: 16380,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "attention: out needs 4096 f32 elements (16384 bytes), its buffer has 16380 bytes"
    );
}

#[test]
fn short_positions_are_rejected() {
    let m = invalid(
        AttentionArgs {
            positions_bytes: 0,
            slots_bytes: None,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "attention: positions needs 1 i32 elements (4 bytes), its buffer has 0 bytes"
    );
}

#[test]
fn a_short_key_cache_is_rejected() {
    let m = invalid(
        AttentionArgs {
            k_bytes: 2,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "attention: k_cache needs 4194304 f16 elements (8388608 bytes), its buffer has 2 bytes"
    );
}

#[test]
fn a_short_value_cache_is_rejected() {
    let m = invalid(
        AttentionArgs {
            v_bytes: 2,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "attention: v_cache needs 4194304 f16 elements (8388608 bytes), its buffer has 2 bytes"
    );
}

#[test]
fn both_kernels_take_a_q8_copy_of_the_output() {
    for n_tokens in [1, 4, 5, 300] {
        let shape = AttentionShape {
            n_tokens,
            ..shape()
        };
        let with = args_with_copy(shape).check().unwrap();
        let without = args_for(shape).check().unwrap();
        assert_eq!(with.kernel, without.kernel, "{n_tokens} tokens");
        assert_eq!(with.spec.key, without.spec.key, "{n_tokens} tokens");
    }
}

#[test]
fn a_q8_copy_needs_a_head_dim_that_is_a_multiple_of_32() {
    // 32 heads of 80: rows of whole Q8_1 blocks, but blocks that straddle heads.
    let m = invalid(
        args_with_copy(AttentionShape {
            head_dim: 80,
            ..shape()
        })
        .check(),
    );
    assert_eq!(
        m,
        "attention: out_q8 is not supported by the CUDA kernels for head_dim 80: the output's q8_1 copy needs a head_dim that is a multiple of 32"
    );
}

#[test]
fn a_short_q8_copy_is_rejected() {
    let m = invalid(
        AttentionArgs {
            out_q8_bytes: Some(4572),
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "attention: out_q8 needs 4096 q8_1 elements (4608 bytes), its buffer has 4572 bytes"
    );
}

/// Normalised MSE allowed against the CPU: scores, softmax and values are summed in
/// another order (online softmax over tiles and splits) and expf/tanhf differ from
/// Rust's by an ulp or two.
const NMSE: f64 = 1e-9;

/// Normalised MSE allowed for the flash kernel (F16 cache): its tensor-core operands
/// round the scaled queries and the softmax weights to f16 (relative error up to 2^-11
/// each, an NMSE near 1e-7 on these inputs), then sum in f32; 1e-5 leaves a margin.
const FLASH_NMSE: f64 = 1e-5;

/// One attention problem: shape, cache dtype, each query's position and (over caches
/// of several slots) its slot.
struct Problem {
    shape: AttentionShape,
    cache: DType,
    positions: Vec<i32>,
    slots: Option<Vec<i32>>,
}

/// The graph of one attention problem, with a Q8_1 copy of its output when `copy` is
/// set, and its buffers: `[q, k, v, positions, out]`, the copy and the slot ids.
fn problem_graph(
    p: &Problem,
    copy: bool,
) -> (Graph, [BufferId; 5], Option<BufferId>, Option<BufferId>) {
    let s = p.shape;
    let mut g = Graph::new();
    let qdims = [s.n_tokens, s.n_heads, s.head_dim];
    let cdims = [s.n_slots, s.n_kv_heads, s.capacity, s.head_dim];
    let q = g.persistent("q", DType::F32, &qdims).unwrap();
    let k = g.persistent("k", p.cache, &cdims).unwrap();
    let v = g.persistent("v", p.cache, &cdims).unwrap();
    let pos = g.persistent("pos", DType::I32, &[s.n_tokens]).unwrap();
    let slots = p
        .slots
        .as_ref()
        .map(|_| g.persistent("slots", DType::I32, &[s.n_tokens]).unwrap());
    let out = g.persistent("out", DType::F32, &qdims).unwrap();
    let out_q8 = copy.then(|| {
        g.persistent("out_q8", DType::Q8_1, &[s.n_tokens, s.n_heads * s.head_dim])
            .unwrap()
    });
    g.push(Attention {
        q,
        k_cache: k,
        v_cache: v,
        positions: pos,
        slots,
        out,
        out_q8,
        n_tokens: s.n_tokens,
        n_heads: s.n_heads,
        n_kv_heads: s.n_kv_heads,
        head_dim: s.head_dim,
        capacity: s.capacity,
        n_slots: s.n_slots,
        scale: s.scale,
        window: s.window,
        softcap: s.softcap,
    })
    .unwrap();
    (g, [q, k, v, pos, out], out_q8, slots)
}

/// Runs `p` on the GPU and the CPU (outputs poisoned) and compares the outputs; where
/// the kernels take a copy, runs the GPU again with one and checks that the output is
/// the same bits and the copy the CPU's Q8_1 rounding of it.
fn compare(cuda: &kiln_cuda::CudaBackend, rng: &mut rand::rngs::StdRng, p: &Problem) {
    let s = p.shape;
    let cache_len = s.n_slots * s.n_kv_heads * s.capacity * s.head_dim;
    let k = encoded(rng, p.cache, cache_len);
    let v = encoded(rng, p.cache, cache_len);
    compare_caches(cuda, rng, p, k, v);
}

/// [`compare`] over the given caches (bytes of `p.cache`).
fn compare_caches(
    cuda: &kiln_cuda::CudaBackend,
    rng: &mut rand::rngs::StdRng,
    p: &Problem,
    k: Vec<u8>,
    v: Vec<u8>,
) {
    let s = p.shape;
    let data = [
        f32_bytes(&uniform(rng, s.n_tokens * s.n_heads * s.head_dim, 1.0)),
        k,
        v,
        i32_bytes(&p.positions),
    ];
    let slot_bytes = p.slots.as_ref().map(|ids| i32_bytes(ids));
    let inputs = |ids: &[BufferId; 5], slots: Option<BufferId>| -> Vec<(BufferId, Vec<u8>)> {
        ids.iter()
            .copied()
            .zip(data.iter().cloned())
            .chain(slots.zip(slot_bytes.clone()))
            .collect()
    };
    let (g, ids, _, slots) = problem_graph(p, false);
    let out = ids[4];
    let kernel = AttentionArgs {
        slots_bytes: slot_bytes.as_ref().map(Vec::len),
        ..args_with(s, p.cache)
    }
    .check()
    .unwrap()
    .kernel;
    let want =
        f32s(&run_on(&CpuBackend, &g, &inputs(&ids, slots), &[out], Aliasing::On).unwrap()[0]);
    let got = run_on(cuda, &g, &inputs(&ids, slots), &[out], Aliasing::On).unwrap();
    let what = format!(
        "attention {:?} {kernel:?} cache {} slots {:?}",
        s, p.cache, p.slots
    );
    let nmse = match kernel {
        AttentionKernel::Flash { .. } => FLASH_NMSE,
        _ => NMSE,
    };
    assert_close(&what, &f32s(&got[0]), &want, nmse);
    if takes_copy(&s) {
        let (g, ids, out_q8, slots) = problem_graph(p, true);
        let outputs = [ids[4], out_q8.unwrap()];
        let both = run_on(cuda, &g, &inputs(&ids, slots), &outputs, Aliasing::On).unwrap();
        assert!(both[0] == got[0], "{what}: the copy changes the output");
        assert_q8_copy(&format!("{what} with a copy"), &both[0], &both[1]);
    }
}

fn problems(n_tokens_max: usize, rng: &mut rand::rngs::StdRng) -> Vec<Problem> {
    let mut out = Vec::new();
    // (n_heads, n_kv_heads, head_dim, capacity, window, softcap)
    let shapes = [
        (32, 8, 128, 4096, None, None),
        (32, 8, 128, 32768, None, None),
        (14, 2, 64, 1000, None, None),
        (12, 2, 80, 300, Some(64), Some(50.0)),
        (16, 16, 256, 513, None, Some(30.0)),
        (40, 1, 96, 777, Some(4096), None),
        (8, 4, 112, 17, None, None),
    ];
    for cache in [DType::F16, DType::F32] {
        for &(n_heads, n_kv_heads, head_dim, capacity, window, softcap) in &shapes {
            for n_tokens in [1, 3, n_tokens_max] {
                if n_tokens > capacity {
                    continue;
                }
                let positions: Vec<i32> = (0..n_tokens)
                    .map(|t| {
                        if t == 0 {
                            capacity as i32 - 1
                        } else {
                            rand::Rng::random_range(&mut *rng, 0..capacity as i32)
                        }
                    })
                    .collect();
                out.push(Problem {
                    shape: AttentionShape {
                        n_tokens,
                        n_heads,
                        n_kv_heads,
                        head_dim,
                        capacity,
                        n_slots: 1,
                        scale: 1.0 / (head_dim as f32).sqrt(),
                        window,
                        softcap,
                    },
                    cache,
                    positions,
                    slots: None,
                });
            }
        }
    }
    out
}

#[test]
#[ignore = "needs a CUDA device"]
fn decode_attention_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("decode_attention_matches_cpu");
    for p in problems(4, &mut rng) {
        compare(cuda, &mut rng, &p);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn prefill_attention_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("prefill_attention_matches_cpu");
    for p in problems(200, &mut rng)
        .into_iter()
        .filter(|p| p.shape.n_tokens > 4)
    {
        compare(cuda, &mut rng, &p);
    }
    // A causal prefill of consecutive positions, as a model's prompt runs.
    let shape = AttentionShape {
        n_tokens: 512,
        capacity: 1024,
        n_slots: 1,
        ..shape()
    };
    let positions = (0..512).collect();
    compare(
        cuda,
        &mut rng,
        &Problem {
            shape,
            cache: DType::F16,
            positions,
            slots: None,
        },
    );
}

/// A prompt chunk: `n_tokens` queries at consecutive positions `n_past ..` over a cache
/// of `n_past + n_tokens + 3` rows (rows past the last query are never seen).
fn chunk(
    n_tokens: usize,
    n_past: usize,
    heads: (usize, usize),
    head_dim: usize,
    window: Option<usize>,
    softcap: Option<f32>,
) -> Problem {
    Problem {
        shape: AttentionShape {
            n_tokens,
            n_heads: heads.0,
            n_kv_heads: heads.1,
            head_dim,
            capacity: n_past + n_tokens + 3,
            n_slots: 1,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window,
            softcap,
        },
        cache: DType::F16,
        positions: (n_past..n_past + n_tokens).map(|p| p as i32).collect(),
        slots: None,
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn flash_attention_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("flash_attention_matches_cpu");
    // Chunks of a prompt: fewer tokens than a warp's 16 rows, one past a block or a
    // tile, odd lengths, after a cache already holding n_past rows; head dims 64, 128,
    // 256 and ones the kernel pads (80, 96); groups of 1, 4, 8 and 5; windows and
    // soft-caps.
    let cases = [
        (5, 0, (32, 8), 128, None, None),
        (15, 7, (8, 8), 64, None, None),
        (17, 0, (32, 4), 128, None, None),
        (65, 100, (32, 8), 128, None, None),
        (129, 33, (16, 16), 256, None, Some(30.0)),
        (1000, 0, (32, 8), 128, None, None),
        (1000, 517, (8, 1), 64, None, None),
        (333, 0, (16, 2), 256, Some(100), None),
        (200, 1000, (40, 8), 128, Some(64), Some(50.0)),
        (77, 3, (12, 2), 80, None, None),
        (130, 64, (6, 2), 96, Some(4096), None),
    ];
    for (n_tokens, n_past, heads, head_dim, window, softcap) in cases {
        let p = chunk(n_tokens, n_past, heads, head_dim, window, softcap);
        assert!(
            matches!(
                args_with(p.shape, p.cache).check().unwrap().kernel,
                AttentionKernel::Flash { .. }
            ),
            "{:?}",
            p.shape
        );
        compare(cuda, &mut rng, &p);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn flash_attention_ignores_cache_rows_no_query_sees() {
    let cuda = cuda();
    let mut rng = rng("flash_attention_ignores_cache_rows_no_query_sees");
    // Two runs of 4 queries far apart with a window of 50: the rows between the runs'
    // windows, and the rows past the last query, hold NaN, which a query that read
    // them (even with weight 0) would return.
    let (n_heads, n_kv_heads, head_dim, capacity) = (8, 2, 128, 1200);
    let positions = vec![100, 101, 102, 103, 900, 901, 902, 903];
    let p = Problem {
        shape: AttentionShape {
            n_tokens: positions.len(),
            n_heads,
            n_kv_heads,
            head_dim,
            capacity,
            n_slots: 1,
            scale: 0.1,
            window: Some(50),
            softcap: None,
        },
        cache: DType::F16,
        positions,
        slots: None,
    };
    let cache_len = n_kv_heads * capacity * head_dim;
    let nan = |bytes: &mut Vec<u8>| {
        for g in 0..n_kv_heads {
            for row in (104..851).chain(904..capacity) {
                let at = (g * capacity + row) * head_dim * 2;
                for e in bytes[at..at + head_dim * 2].chunks_exact_mut(2) {
                    e.copy_from_slice(&0x7e00u16.to_le_bytes());
                }
            }
        }
    };
    let mut k = encoded(&mut rng, DType::F16, cache_len);
    let mut v = encoded(&mut rng, DType::F16, cache_len);
    nan(&mut k);
    nan(&mut v);
    compare_caches(cuda, &mut rng, &p, k, v);
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_query_outside_the_cache_gets_zeros_on_the_gpu() {
    let cuda = cuda();
    let mut rng = rng("a_query_outside_the_cache_gets_zeros_on_the_gpu");
    // One query (decode: one split, then a grid of splits) and eight (prefill); without
    // and with a Q8_1 copy, which must then encode the zeros.
    for (n_tokens, capacity) in [(1, 64), (1, 4096), (8, 64)] {
        for copy in [false, true] {
            let s = AttentionShape {
                n_tokens,
                capacity,
                n_slots: 1,
                ..shape()
            };
            let nq = n_tokens * s.n_heads * s.head_dim;
            let q8_bytes = DType::Q8_1.bytes_for(nq).unwrap();
            let cache_len = s.n_kv_heads * s.capacity * s.head_dim;
            let q = device(cuda, &f32_bytes(&uniform(&mut rng, nq, 1.0)));
            let k = device(cuda, &encoded(&mut rng, DType::F16, cache_len));
            let v = device(cuda, &encoded(&mut rng, DType::F16, cache_len));
            let mut positions = vec![capacity as i32 - 1; n_tokens];
            positions[0] = capacity as i32;
            let pos = device(cuda, &i32_bytes(&positions));
            let mut out = device(cuda, &poison(nq * 4));
            let mut out_q8 = copy.then(|| device(cuda, &poison(q8_bytes)));
            kiln_cuda::ops::attention::attention(
                cuda,
                &q,
                &k,
                &v,
                &pos,
                None,
                &mut out,
                out_q8.as_mut(),
                DType::F16,
                &s,
            )
            .unwrap();
            let bytes = host(cuda, &out, nq * 4);
            let got = f32s(&bytes);
            let per_token = s.n_heads * s.head_dim;
            let what = format!("position {capacity} of {capacity}, {n_tokens} queries");
            assert!(got[..per_token].iter().all(|&x| x == 0.0), "{what}");
            assert!(
                got[per_token..].iter().all(|x| x.is_finite() && *x != 0.0),
                "{what}: the other queries are computed"
            );
            if let Some(out_q8) = &out_q8 {
                let q8 = host(cuda, out_q8, q8_bytes);
                let token_bytes = DType::Q8_1.bytes_for(per_token).unwrap();
                assert!(
                    q8[..token_bytes].iter().all(|&b| b == 0),
                    "{what}: the copy of zeros is zeros"
                );
                assert_q8_copy(&what, &bytes, &q8);
            }
        }
    }
}

/// One decode attention problem on the device, launched through the dispatch again
/// and again with new positions: the same plan (its grid fixed by the capacity) at
/// every position, as a recorded launch replays. Where the kernels take a Q8_1 copy
/// of the output, each check launches again with one.
struct DecodeRig {
    shape: AttentionShape,
    cache: DType,
    q: Vec<f32>,
    k: Vec<u8>,
    v: Vec<u8>,
    q_dev: kiln_cuda::CudaBuffer,
    k_dev: kiln_cuda::CudaBuffer,
    v_dev: kiln_cuda::CudaBuffer,
    pos_dev: kiln_cuda::CudaBuffer,
    out_dev: kiln_cuda::CudaBuffer,
    q8_dev: Option<kiln_cuda::CudaBuffer>,
}

impl DecodeRig {
    fn new(
        cuda: &kiln_cuda::CudaBackend,
        rng: &mut rand::rngs::StdRng,
        shape: AttentionShape,
        cache: DType,
    ) -> Self {
        let nq = shape.n_tokens * shape.n_heads * shape.head_dim;
        let cache_len = shape.n_kv_heads * shape.capacity * shape.head_dim;
        let q = uniform(rng, nq, 1.0);
        let k = encoded(rng, cache, cache_len);
        let v = encoded(rng, cache, cache_len);
        Self {
            q_dev: device(cuda, &f32_bytes(&q)),
            k_dev: device(cuda, &k),
            v_dev: device(cuda, &v),
            pos_dev: device(cuda, &i32_bytes(&vec![0; shape.n_tokens])),
            out_dev: device(cuda, &poison(nq * 4)),
            q8_dev: takes_copy(&shape)
                .then(|| device(cuda, &poison(DType::Q8_1.bytes_for(nq).unwrap()))),
            shape,
            cache,
            q,
            k,
            v,
        }
    }

    /// The plan every launch of this rig gets.
    fn plan(&self, cuda: &kiln_cuda::CudaBackend) -> kiln_cuda::ops::attention::AttentionPlan {
        args_with(self.shape, self.cache)
            .check_on(cuda.multiprocessors())
            .unwrap()
    }

    /// Launches over a poisoned output (and, with `copy`, a poisoned Q8_1 copy) and
    /// returns the output's bytes and the copy's.
    fn launch(&mut self, cuda: &kiln_cuda::CudaBackend, copy: bool) -> (Vec<u8>, Vec<u8>) {
        use kiln_core::Backend;
        let s = self.shape;
        let nq = s.n_tokens * s.n_heads * s.head_dim;
        // Only shapes that take a copy have a whole number of Q8_1 blocks.
        let q8_bytes = || DType::Q8_1.bytes_for(nq).unwrap();
        cuda.upload(&mut self.out_dev, &poison(nq * 4)).unwrap();
        let mut out_q8 = self.q8_dev.as_mut().filter(|_| copy);
        if let Some(q8) = out_q8.as_deref_mut() {
            cuda.upload(q8, &poison(q8_bytes())).unwrap();
        }
        kiln_cuda::ops::attention::attention(
            cuda,
            &self.q_dev,
            &self.k_dev,
            &self.v_dev,
            &self.pos_dev,
            None,
            &mut self.out_dev,
            out_q8,
            self.cache,
            &s,
        )
        .unwrap();
        let q8 = match (&self.q8_dev, copy) {
            (Some(q8), true) => host(cuda, q8, q8_bytes()),
            _ => Vec::new(),
        };
        (host(cuda, &self.out_dev, nq * 4), q8)
    }

    /// Launches at `positions` and checks the output against kiln-cpu; with a copy,
    /// launches again with it and checks that the output is the same bits and the copy
    /// the CPU's Q8_1 rounding of it.
    fn check(&mut self, cuda: &kiln_cuda::CudaBackend, positions: &[i32]) {
        use kiln_core::Backend;
        let s = self.shape;
        let nq = s.n_tokens * s.n_heads * s.head_dim;
        cuda.upload(&mut self.pos_dev, &i32_bytes(positions))
            .unwrap();
        let (bytes, _) = self.launch(cuda, false);
        let got = f32s(&bytes);
        let mut want = vec![0f32; nq];
        kiln_cpu::ops::attention::attention(
            &self.q,
            &self.k,
            &self.v,
            self.cache,
            positions,
            None,
            &mut want,
            &kiln_cpu::ops::attention::AttentionParams {
                n_heads: s.n_heads,
                cache: kiln_cpu::ops::kv_cache::CacheShape {
                    n_kv_heads: s.n_kv_heads,
                    capacity: s.capacity,
                    n_slots: 1,
                    head_dim: s.head_dim,
                },
                scale: s.scale,
                window: s.window,
                softcap: s.softcap,
            },
        )
        .unwrap();
        let what = format!(
            "attention {s:?} cache {} positions {positions:?}",
            self.cache
        );
        assert_close(&what, &got, &want, NMSE);
        if self.q8_dev.is_some() {
            let (with_copy, q8) = self.launch(cuda, true);
            assert!(with_copy == bytes, "{what}: the copy changes the output");
            assert_q8_copy(&what, &with_copy, &q8);
        }
    }

    /// Positions where the number of splits a query uses changes (a query of `rows`
    /// visible rows uses min(splits, ceil(rows / split_rows))), one row either side,
    /// where a window starts to hide rows, and the first and last.
    fn boundaries(&self, cuda: &kiln_cuda::CudaBackend) -> Vec<i32> {
        let plan = self.plan(cuda);
        let split_rows = plan.split_rows as usize;
        let splits = plan.config.grid_dim.0 as usize;
        let cap = self.shape.capacity;
        let window = self.shape.window.unwrap_or(usize::MAX);
        let mut rows: Vec<usize> = vec![1, 2, cap];
        for a in 1..=splits {
            let edge = a * split_rows;
            rows.extend([edge - 1, edge, edge + 1]);
        }
        rows.extend([window.saturating_sub(1), window, window.saturating_add(1)]);
        let mut positions: Vec<i32> = rows
            .into_iter()
            // Rows past the window are as many as the window: position p sees
            // min(p + 1, window) rows.
            .filter(|&r| (1..=cap).contains(&r) && r <= window.saturating_add(1))
            .map(|r| (r - 1) as i32)
            .collect();
        positions.sort_unstable();
        positions.dedup();
        positions
    }
}

/// Decode shapes for the replay tests, with `n_tokens` queries: capacities that are
/// multiples of nothing, windows shorter than the capacity, groups of 1 to 40 (powers
/// of two or not), head dims 8 to 256, F16 and F32 caches. With a copy (head dims that
/// are multiples of 32), the split merge's items of 4 columns fill whole warps (4
/// heads of 128, 3 of 128), end part-way through one (3 of 96, 7 of 64) or take two
/// threads each (1 of 256).
fn replay_shapes(n_tokens: usize) -> Vec<(AttentionShape, DType)> {
    // (n_heads, n_kv_heads, head_dim, capacity, window, softcap)
    let shapes = [
        (32, 8, 128, 4096, None, None),
        (14, 2, 64, 1000, None, None),
        (12, 2, 80, 777, Some(130), Some(50.0)),
        (40, 1, 72, 643, Some(300), None),
        (8, 8, 256, 517, None, Some(30.0)),
        (6, 2, 200, 333, None, None),
        (10, 2, 8, 1031, Some(1000), None),
        (24, 8, 128, 3001, None, None),
        (6, 2, 96, 2000, None, None),
    ];
    shapes
        .into_iter()
        .enumerate()
        .map(
            |(i, (n_heads, n_kv_heads, head_dim, capacity, window, softcap))| {
                let shape = AttentionShape {
                    n_tokens,
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    capacity,
                    n_slots: 1,
                    scale: 1.0 / (head_dim as f32).sqrt(),
                    window,
                    softcap,
                };
                let cache = if i % 2 == 0 { DType::F16 } else { DType::F32 };
                (shape, cache)
            },
        )
        .collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn one_decode_plan_serves_every_position() {
    let cuda = cuda();
    let mut rng = rng("one_decode_plan_serves_every_position");
    for (shape, cache) in replay_shapes(1) {
        let mut rig = DecodeRig::new(cuda, &mut rng, shape, cache);
        let plan = rig.plan(cuda);
        assert!(
            shape.capacity <= plan.split_rows as usize || plan.config.grid_dim.0 > 1,
            "{shape:?}: the grid splits"
        );
        let positions = rig.boundaries(cuda);
        for &p in &positions {
            rig.check(cuda, &[p]);
        }
        // Again, at earlier positions in another order: no launch leaves state behind.
        for _ in 0..positions.len().min(24) {
            let p = positions[rand::Rng::random_range(&mut rng, 0..positions.len())];
            rig.check(cuda, &[p]);
        }
        for _ in 0..8 {
            let p = rand::Rng::random_range(&mut rng, 0..shape.capacity as i32);
            rig.check(cuda, &[p]);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn decode_queries_at_different_positions_share_one_launch() {
    let cuda = cuda();
    let mut rng = rng("decode_queries_at_different_positions_share_one_launch");
    for n_tokens in 2..=4 {
        for (shape, cache) in replay_shapes(n_tokens) {
            let mut rig = DecodeRig::new(cuda, &mut rng, shape, cache);
            let edges = rig.boundaries(cuda);
            for _ in 0..6 {
                // Each query at its own position: one short (no split), one at a split
                // boundary, the others anywhere.
                let mut positions: Vec<i32> = (0..n_tokens)
                    .map(|_| rand::Rng::random_range(&mut rng, 0..shape.capacity as i32))
                    .collect();
                positions[0] = rand::Rng::random_range(&mut rng, 0..4.min(shape.capacity as i32));
                positions[1] = edges[rand::Rng::random_range(&mut rng, 0..edges.len())];
                rig.check(cuda, &positions);
            }
            // The last row of the cache and the first, side by side.
            let mut positions = vec![0; n_tokens];
            positions[n_tokens - 1] = shape.capacity as i32 - 1;
            rig.check(cuda, &positions);
        }
    }
}

/// Queries of a batched step over `n_slots` slots: a prompt chunk of `chunk`
/// consecutive positions of one slot, then one decode query of each other slot (each
/// at its own length, some at the cache's last row), then random (slot, position)
/// queries up to `n_tokens`.
fn batch_queries(
    rng: &mut rand::rngs::StdRng,
    n_tokens: usize,
    chunk: usize,
    n_slots: usize,
    capacity: usize,
) -> (Vec<i32>, Vec<i32>) {
    use rand::Rng;
    let (mut positions, mut slots) = (Vec::new(), Vec::new());
    let prompt_slot = rng.random_range(0..n_slots as i32);
    let start = rng.random_range(0..=capacity - chunk) as i32;
    for p in start..start + chunk as i32 {
        positions.push(p);
        slots.push(prompt_slot);
    }
    for s in (0..n_slots as i32).filter(|&s| s != prompt_slot) {
        if positions.len() < n_tokens {
            let last = capacity as i32 - 1;
            positions.push(if s % 3 == 0 {
                last
            } else {
                rng.random_range(0..=last)
            });
            slots.push(s);
        }
    }
    while positions.len() < n_tokens {
        positions.push(rng.random_range(0..capacity as i32));
        slots.push(rng.random_range(0..n_slots as i32));
    }
    (positions, slots)
}

#[test]
#[ignore = "needs a CUDA device"]
fn attention_over_slots_matches_cpu() {
    let cuda = cuda();
    let mut rng = rng("attention_over_slots_matches_cpu");
    // (n_heads, n_kv_heads, head_dim, capacity, window, softcap, n_slots)
    let shapes = [
        (32, 8, 128, 300, None, None, 5),
        (12, 2, 80, 200, Some(64), Some(50.0), 17),
        (8, 4, 112, 17, None, None, 3),
        (16, 16, 256, 129, None, Some(30.0), 4),
    ];
    for cache in [DType::F16, DType::F32] {
        for &(n_heads, n_kv_heads, head_dim, capacity, window, softcap, n_slots) in &shapes {
            // The decode kernel (up to 64 queries with slots), then the flash (F16) or
            // prefill (F32) kernel.
            for (n_tokens, chunk) in [(1, 1), (5, 1), (37, 9), (64, 17), (150, 100)] {
                let chunk = chunk.min(capacity);
                let (positions, slots) =
                    batch_queries(&mut rng, n_tokens, chunk, n_slots, capacity);
                let p = Problem {
                    shape: AttentionShape {
                        n_tokens,
                        n_heads,
                        n_kv_heads,
                        head_dim,
                        capacity,
                        n_slots,
                        scale: 1.0 / (head_dim as f32).sqrt(),
                        window,
                        softcap,
                    },
                    cache,
                    positions,
                    slots: Some(slots),
                };
                compare(cuda, &mut rng, &p);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn queries_of_slots_outside_the_cache_get_zeros_on_the_gpu() {
    let cuda = cuda();
    let mut rng = rng("queries_of_slots_outside_the_cache_get_zeros_on_the_gpu");
    for (cache, n_tokens) in [(DType::F16, 3), (DType::F16, 70), (DType::F32, 70)] {
        let shape = AttentionShape {
            n_tokens,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            capacity: 32,
            n_slots: 2,
            scale: 0.125,
            window: None,
            softcap: None,
        };
        let mut slots = vec![1; n_tokens];
        slots[1] = 2;
        slots[2] = -1;
        let p = Problem {
            shape,
            cache,
            positions: (0..n_tokens as i32).map(|t| t % 32).collect(),
            slots: Some(slots),
        };
        let (g, ids, _, slot_id) = problem_graph(&p, false);
        let n = shape.n_tokens * shape.n_heads * shape.head_dim;
        let cache_len = 2 * shape.n_kv_heads * shape.capacity * shape.head_dim;
        let inputs = vec![
            (ids[0], f32_bytes(&uniform(&mut rng, n, 1.0))),
            (ids[1], encoded(&mut rng, cache, cache_len)),
            (ids[2], encoded(&mut rng, cache, cache_len)),
            (ids[3], i32_bytes(&p.positions)),
            (slot_id.unwrap(), i32_bytes(p.slots.as_ref().unwrap())),
        ];
        let got = f32s(&run_on(cuda, &g, &inputs, &[ids[4]], Aliasing::On).unwrap()[0]);
        let per_token = shape.n_heads * shape.head_dim;
        for t in [1, 2] {
            assert!(
                got[t * per_token..(t + 1) * per_token]
                    .iter()
                    .all(|&x| x == 0.0),
                "{cache} {n_tokens} tokens: token {t} of a slot outside the cache"
            );
        }
        assert!(
            got[..per_token].iter().any(|&x| x != 0.0),
            "{cache}: token 0 is in the cache"
        );
    }
}
