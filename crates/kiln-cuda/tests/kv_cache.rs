//! KvAppend: the dispatch checks (no GPU needed) and parity with kiln-cpu on the GPU.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::KvAppend;
use kiln_core::{Aliasing, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::kv_cache::KvAppendArgs;

/// A valid append of 2 tokens into an F16 cache of 8 heads x 1024 x 128.
fn args() -> KvAppendArgs {
    KvAppendArgs {
        cache: DType::F16,
        n_tokens: 2,
        n_kv_heads: 8,
        head_dim: 128,
        capacity: 1024,
        n_slots: 1,
        src_bytes: 2 * 8 * 128 * 4,
        positions_bytes: 8,
        slots_bytes: None,
        cache_bytes: 8 * 1024 * 128 * 2,
    }
}

#[test]
fn an_append_runs_one_block_per_token() {
    let plan = args().check().unwrap();
    assert_eq!(plan.spec.key, "kv_append|cache=f16");
    assert_eq!(plan.config.grid_dim, (2, 1, 1));
}

#[test]
fn zero_tokens_are_rejected() {
    let m = invalid(
        KvAppendArgs {
            n_tokens: 0,
            ..args()
        }
        .check(),
    );
    assert_eq!(m, "kv_append: n_tokens must be > 0, got 0");
}

#[test]
fn zero_heads_are_rejected() {
    let m = invalid(
        KvAppendArgs {
            n_kv_heads: 0,
            ..args()
        }
        .check(),
    );
    assert_eq!(m, "kv_append: n_kv_heads must be > 0, got 0");
}

#[test]
fn a_zero_head_dim_is_rejected() {
    let m = invalid(
        KvAppendArgs {
            head_dim: 0,
            ..args()
        }
        .check(),
    );
    assert_eq!(m, "kv_append: head_dim must be > 0, got 0");
}

#[test]
fn a_zero_capacity_is_rejected() {
    let m = invalid(
        KvAppendArgs {
            capacity: 0,
            ..args()
        }
        .check(),
    );
    assert_eq!(m, "kv_append: capacity must be > 0, got 0");
}

#[test]
fn a_cache_dtype_other_than_f32_or_f16_is_rejected() {
    let m = invalid(
        KvAppendArgs {
            cache: DType::BF16,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "kv_append: cache has dtype bf16, expected one of [f32, f16]"
    );
}

#[test]
fn short_source_rows_are_rejected() {
    let m = invalid(
        KvAppendArgs {
            src_bytes: 4096,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "kv_append: src needs 2048 f32 elements (8192 bytes), its buffer has 4096 bytes"
    );
}

#[test]
fn short_positions_are_rejected() {
    let m = invalid(
        KvAppendArgs {
            positions_bytes: 7,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "kv_append: positions needs 2 i32 elements (8 bytes), its buffer has 7 bytes"
    );
}

#[test]
fn a_short_cache_is_rejected() {
    let m = invalid(
        KvAppendArgs {
            cache_bytes: 1024,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "kv_append: cache needs 1048576 f16 elements (2097152 bytes), its buffer has 1024 bytes"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn kv_append_matches_cpu_exactly() {
    let cuda = cuda();
    let mut rng = rng("kv_append_matches_cpu_exactly");
    for dtype in [DType::F32, DType::F16] {
        for (n_kv_heads, head_dim, capacity, positions) in [
            (8, 128, 4096, vec![4095]),
            (2, 80, 33, vec![3, 0, 32, 3]),
            (1, 64, 700, (0..512).map(|p| p + 100).collect::<Vec<i32>>()),
        ] {
            let n_tokens = positions.len();
            let mut g = Graph::new();
            let src = g
                .persistent("src", DType::F32, &[n_tokens, n_kv_heads, head_dim])
                .unwrap();
            let pos = g.persistent("pos", DType::I32, &[n_tokens]).unwrap();
            let cache = g
                .persistent("cache", dtype, &[n_kv_heads, capacity, head_dim])
                .unwrap();
            g.push(KvAppend {
                src,
                positions: pos,
                slots: None,
                cache,
                n_tokens,
                n_kv_heads,
                head_dim,
                capacity,
                n_slots: 1,
            })
            .unwrap();
            let inputs = [
                (
                    src,
                    f32_bytes(&uniform(&mut rng, n_tokens * n_kv_heads * head_dim, 4.0)),
                ),
                (pos, i32_bytes(&positions)),
                // Rows the append does not touch must keep these values.
                (
                    cache,
                    encoded(&mut rng, dtype, n_kv_heads * capacity * head_dim),
                ),
            ];
            let want = run_on(&CpuBackend, &g, &inputs, &[cache], Aliasing::On).unwrap();
            let got = run_on(cuda, &g, &inputs, &[cache], Aliasing::On).unwrap();
            // One rounding (f32 -> f16 to nearest even) on both sides: no tolerance.
            assert_eq!(got, want, "kv_append {dtype} positions {positions:?}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn positions_outside_the_cache_are_skipped_on_the_gpu() {
    let cuda = cuda();
    let mut rng = rng("positions_outside_the_cache_are_skipped_on_the_gpu");
    let (n_kv_heads, head_dim, capacity) = (2, 16, 4);
    let cache_before = encoded(&mut rng, DType::F16, n_kv_heads * capacity * head_dim);
    let src = device(
        cuda,
        &f32_bytes(&uniform(&mut rng, 2 * n_kv_heads * head_dim, 1.0)),
    );
    let pos = device(cuda, &i32_bytes(&[-1, 4]));
    let mut cache = device(cuda, &cache_before);
    kiln_cuda::ops::kv_cache::kv_append(
        cuda,
        &src,
        &pos,
        kiln_cuda::ops::CacheSlots::ONE,
        &mut cache,
        DType::F16,
        2,
        n_kv_heads,
        head_dim,
        capacity,
    )
    .unwrap();
    assert_eq!(host(cuda, &cache, cache_before.len()), cache_before);
}

#[test]
fn a_cache_too_small_for_its_slots_is_rejected() {
    let m = invalid(
        KvAppendArgs {
            n_slots: 2,
            slots_bytes: Some(8),
            ..args()
        }
        .check(),
    );
    assert!(m.contains("cache needs"), "{m}");
}

#[test]
fn slot_ids_too_few_for_the_tokens_are_rejected() {
    let m = invalid(
        KvAppendArgs {
            slots_bytes: Some(4),
            ..args()
        }
        .check(),
    );
    assert!(m.contains("slots needs 2 i32"), "{m}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn kv_append_into_slots_matches_cpu_exactly() {
    let cuda = cuda();
    let mut rng = rng("kv_append_into_slots_matches_cpu_exactly");
    // Tokens of three slots interleaved, one (slot, position) written twice (the later
    // token wins) and one position shared by two slots (both written).
    let (n_slots, n_kv_heads, head_dim, capacity) = (3, 3, 40, 37);
    let positions = [5, 0, 36, 5, 7, 5, 0];
    let slots = [0, 2, 1, 2, 2, 0, 1];
    for dtype in [DType::F32, DType::F16] {
        let n_tokens = positions.len();
        let mut g = Graph::new();
        let src = g
            .persistent("src", DType::F32, &[n_tokens, n_kv_heads, head_dim])
            .unwrap();
        let pos = g.persistent("pos", DType::I32, &[n_tokens]).unwrap();
        let ids = g.persistent("slots", DType::I32, &[n_tokens]).unwrap();
        let cache = g
            .persistent("cache", dtype, &[n_slots, n_kv_heads, capacity, head_dim])
            .unwrap();
        g.push(KvAppend {
            src,
            positions: pos,
            slots: Some(ids),
            cache,
            n_tokens,
            n_kv_heads,
            head_dim,
            capacity,
            n_slots,
        })
        .unwrap();
        let inputs = [
            (
                src,
                f32_bytes(&uniform(&mut rng, n_tokens * n_kv_heads * head_dim, 4.0)),
            ),
            (pos, i32_bytes(&positions)),
            (ids, i32_bytes(&slots)),
            (
                cache,
                encoded(&mut rng, dtype, n_slots * n_kv_heads * capacity * head_dim),
            ),
        ];
        let want = run_on(&CpuBackend, &g, &inputs, &[cache], Aliasing::On).unwrap();
        let got = run_on(cuda, &g, &inputs, &[cache], Aliasing::On).unwrap();
        assert_eq!(got, want, "kv_append into slots, {dtype}");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn slots_outside_the_cache_are_skipped_on_the_gpu() {
    let cuda = cuda();
    let mut rng = rng("slots_outside_the_cache_are_skipped_on_the_gpu");
    let (n_slots, n_kv_heads, head_dim, capacity) = (2, 2, 16, 4);
    let cache_before = encoded(
        &mut rng,
        DType::F16,
        n_slots * n_kv_heads * capacity * head_dim,
    );
    let src = device(
        cuda,
        &f32_bytes(&uniform(&mut rng, 2 * n_kv_heads * head_dim, 1.0)),
    );
    let pos = device(cuda, &i32_bytes(&[0, 1]));
    let ids = device(cuda, &i32_bytes(&[-1, 2]));
    let mut cache = device(cuda, &cache_before);
    kiln_cuda::ops::kv_cache::kv_append(
        cuda,
        &src,
        &pos,
        kiln_cuda::ops::CacheSlots {
            ids: Some(&ids),
            n_slots,
        },
        &mut cache,
        DType::F16,
        2,
        n_kv_heads,
        head_dim,
        capacity,
    )
    .unwrap();
    assert_eq!(host(cuda, &cache, cache_before.len()), cache_before);
}
