//! A one-token rotation and cache append fused into the decode attention that reads
//! its queries: which pairs of a graph are fused (no GPU needed), and on the GPU, one
//! launch for the pair whose caches and output equal the unfused pair's bit for bit
//! and match kiln-cpu's two ops.

mod common;
use common::*;
use kiln_core::ops::{Attention, QkNorm, QkvRopeAppend, RopeParams, RopeStyle, Q8_COPY};
use kiln_core::{Aliasing, BufferId, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::rope_attention::fusible;

/// What a pair's graph computes besides its buffers.
#[derive(Clone, Copy, Debug)]
struct Shape {
    n_tokens: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    capacity: usize,
    n_slots: usize,
    window: Option<usize>,
    style: RopeStyle,
    norm: bool,
    freq_factors: bool,
    cache: DType,
    copy: bool,
}

const SHAPE: Shape = Shape {
    n_tokens: 1,
    n_heads: 32,
    n_kv_heads: 8,
    head_dim: 128,
    rotary_dim: 128,
    capacity: 4096,
    n_slots: 1,
    window: None,
    style: RopeStyle::Normal,
    norm: false,
    freq_factors: false,
    cache: DType::F16,
    copy: true,
};

/// The buffers of [`pair`]'s graph the caller binds or reads.
struct Pair {
    graph: Graph,
    qkv: BufferId,
    positions: BufferId,
    slots: Option<BufferId>,
    freq_factors: Option<BufferId>,
    norm: Option<QkNorm>,
    q_out: BufferId,
    k_cache: BufferId,
    v_cache: BufferId,
    out: BufferId,
    out_q8: Option<BufferId>,
}

/// `QkvRopeAppend` of a projection into `q_out` and the caches, then `Attention` of
/// `q_out` over them into `out` (and its Q8_1 copy with `s.copy`); `q_out` is
/// transient unless `q_out_persistent`.
fn pair(s: Shape, q_out_persistent: bool) -> Pair {
    let mut g = Graph::new();
    let (t, hd) = (s.n_tokens, s.head_dim);
    let heads = s.n_heads + 2 * s.n_kv_heads;
    let qkv = g.persistent("qkv", DType::F32, &[t, heads, hd]).unwrap();
    let positions = g.persistent("positions", DType::I32, &[t]).unwrap();
    let slots = (s.n_slots > 1).then(|| g.persistent("slots", DType::I32, &[t]).unwrap());
    let freq_factors = s
        .freq_factors
        .then(|| g.persistent("ff", DType::F32, &[s.rotary_dim / 2]).unwrap());
    let norm = s.norm.then(|| QkNorm {
        q_weight: g.persistent("q_norm", DType::F32, &[hd]).unwrap(),
        k_weight: g.persistent("k_norm", DType::F32, &[hd]).unwrap(),
        eps: 1e-6,
    });
    let q_shape = [t, s.n_heads, hd];
    let q_out = if q_out_persistent {
        g.persistent("q_out", DType::F32, &q_shape).unwrap()
    } else {
        g.transient("q_out", DType::F32, &q_shape).unwrap()
    };
    let cache_shape = [s.n_slots, s.n_kv_heads, s.capacity, hd];
    let k_cache = g.persistent("k_cache", s.cache, &cache_shape).unwrap();
    let v_cache = g.persistent("v_cache", s.cache, &cache_shape).unwrap();
    let out = g.persistent("out", DType::F32, &q_shape).unwrap();
    let out_q8 = s.copy.then(|| {
        g.persistent("out_q8", Q8_COPY, &[t, s.n_heads * hd])
            .unwrap()
    });
    g.push(QkvRopeAppend {
        qkv,
        positions,
        slots,
        freq_factors,
        norm,
        q_out,
        k_cache,
        v_cache,
        n_tokens: t,
        n_heads: s.n_heads,
        n_kv_heads: s.n_kv_heads,
        capacity: s.capacity,
        n_slots: s.n_slots,
        params: RopeParams {
            head_dim: hd,
            rotary_dim: s.rotary_dim,
            base: 500000.0,
            freq_scale: 0.5,
            style: s.style,
        },
    })
    .unwrap();
    g.push(Attention {
        q: q_out,
        k_cache,
        v_cache,
        positions,
        slots,
        out,
        out_q8,
        n_tokens: t,
        n_heads: s.n_heads,
        n_kv_heads: s.n_kv_heads,
        head_dim: hd,
        capacity: s.capacity,
        n_slots: s.n_slots,
        scale: 1.0 / (hd as f32).sqrt(),
        window: s.window,
        softcap: None,
    })
    .unwrap();
    Pair {
        graph: g,
        qkv,
        positions,
        slots,
        freq_factors,
        norm,
        q_out,
        k_cache,
        v_cache,
        out,
        out_q8,
    }
}

#[test]
fn a_one_token_rotation_read_only_by_its_decode_attention_is_fused() {
    for s in [
        SHAPE,
        Shape {
            n_heads: 32,
            n_kv_heads: 4,
            norm: true,
            style: RopeStyle::NeoX,
            ..SHAPE
        },
        Shape {
            n_heads: 5,
            n_kv_heads: 5,
            n_slots: 3,
            cache: DType::F32,
            copy: false,
            ..SHAPE
        },
    ] {
        let p = pair(s, false);
        assert!(fusible(&p.graph, 0).is_some(), "{s:?}");
        assert!(
            fusible(&p.graph, 1).is_none(),
            "the attention starts no pair"
        );
    }
}

#[test]
fn pairs_the_fused_kernel_cannot_stand_for_are_not_fused() {
    let not_fused = |p: &Pair, what: &str| assert!(fusible(&p.graph, 0).is_none(), "{what}");
    not_fused(
        &pair(
            Shape {
                n_tokens: 2,
                ..SHAPE
            },
            false,
        ),
        "two tokens (the second reads the first's rows)",
    );
    not_fused(
        &pair(
            Shape {
                n_heads: 16,
                n_kv_heads: 1,
                ..SHAPE
            },
            false,
        ),
        "a group of 16 query heads, which decode blocks split",
    );
    not_fused(
        &pair(SHAPE, true),
        "the rotated queries are persistent (the caller may read them)",
    );
    let mut read_twice = pair(SHAPE, false);
    let copy = read_twice
        .graph
        .persistent("copy", DType::F32, &[1, 32 * 128])
        .unwrap();
    read_twice
        .graph
        .push(kiln_core::ops::Elementwise {
            kind: kiln_core::ops::ElementwiseKind::Add,
            a: read_twice.q_out,
            b: read_twice.q_out,
            out: copy,
            out_q8: None,
            len: 32 * 128,
        })
        .unwrap();
    not_fused(
        &read_twice,
        "the rotated queries are read by another op too",
    );
}

/// The compiled pair's launch keys with the fusion on or off.
fn launches(cuda: &kiln_cuda::CudaBackend, p: &Pair, fuse: bool) -> Vec<String> {
    cuda.set_fuse_rope(fuse);
    let launches = compiled_launches(cuda, &p.graph);
    cuda.set_fuse_rope(true);
    launches.into_iter().map(|(key, _)| key).collect()
}

/// A cache's elements as f32.
fn cache_values(cache: DType, bytes: &[u8]) -> Vec<f32> {
    match cache {
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => f32s(bytes),
    }
}

/// Random values of a cache of `cache` holding `n` elements, as its bytes.
fn cache_bytes(rng: &mut rand::rngs::StdRng, cache: DType, n: usize) -> Vec<u8> {
    let values = uniform(rng, n, 1.0);
    match cache {
        DType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => f32_bytes(&values),
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_fused_pair_is_one_launch_equal_to_the_two_and_matches_the_cpu() {
    let cuda = cuda();
    let mut rng = rng("the_fused_pair_is_one_launch_equal_to_the_two_and_matches_the_cpu");
    let shapes = [
        // The 8B's attention: splits at long positions, a group of 4.
        SHAPE,
        // Qwen3's: per-head norms, NeoX pairs, a group of 8, frequency factors.
        Shape {
            n_heads: 32,
            n_kv_heads: 4,
            norm: true,
            style: RopeStyle::NeoX,
            freq_factors: true,
            capacity: 1000,
            ..SHAPE
        },
        // Odd sizes: 3 heads of one group, head dim 96 in part rotated, F32 caches,
        // three slots, a window, no copy.
        Shape {
            n_heads: 3,
            n_kv_heads: 1,
            head_dim: 96,
            rotary_dim: 34,
            capacity: 777,
            n_slots: 3,
            window: Some(300),
            cache: DType::F32,
            copy: false,
            ..SHAPE
        },
        // The 1B's head dim, a group of 2, a tiny cache.
        Shape {
            n_heads: 6,
            n_kv_heads: 3,
            head_dim: 64,
            rotary_dim: 64,
            capacity: 5,
            norm: true,
            ..SHAPE
        },
    ];
    for s in shapes {
        let p = pair(s, false);
        let fused = launches(cuda, &p, true);
        assert_eq!(fused.len(), 1, "{s:?}: {fused:?}");
        assert!(
            fused[0].starts_with("attention_decode|"),
            "{s:?}: {fused:?}"
        );
        assert_eq!(launches(cuda, &p, false).len(), 2, "{s:?} unfused");
        let cap = s.capacity as i32;
        // The first row, one mid-cache, the last; out of range (zeros, no row
        // written); with slots, an out-of-range slot too.
        let mut cases = vec![(0, 0), (cap / 2 + 1, 0), (cap - 1, 0), (-1, 0), (cap, 0)];
        if s.n_slots > 1 {
            cases.extend([(cap - 2, s.n_slots as i32 - 1), (3, s.n_slots as i32)]);
        }
        for (position, slot) in cases {
            let what = format!("{s:?} position {position} slot {slot}");
            let heads = s.n_heads + 2 * s.n_kv_heads;
            let cache_len = s.n_slots * s.n_kv_heads * s.capacity * s.head_dim;
            let old_k = cache_bytes(&mut rng, s.cache, cache_len);
            let old_v = cache_bytes(&mut rng, s.cache, cache_len);
            let mut inputs = vec![
                (
                    p.qkv,
                    f32_bytes(&uniform(&mut rng, heads * s.head_dim, 2.0)),
                ),
                (p.positions, i32_bytes(&[position])),
                (p.k_cache, old_k.clone()),
                (p.v_cache, old_v.clone()),
            ];
            if let Some(slots) = p.slots {
                inputs.push((slots, i32_bytes(&[slot])));
            }
            if let Some(ff) = p.freq_factors {
                let f: Vec<f32> = uniform(&mut rng, s.rotary_dim / 2, 4.0)
                    .iter()
                    .map(|v| 1.0 + v.abs())
                    .collect();
                inputs.push((ff, f32_bytes(&f)));
            }
            if let Some(n) = p.norm {
                inputs.push((n.q_weight, f32_bytes(&uniform(&mut rng, s.head_dim, 1.5))));
                inputs.push((n.k_weight, f32_bytes(&uniform(&mut rng, s.head_dim, 1.5))));
            }
            let outputs: Vec<_> = [p.out, p.k_cache, p.v_cache]
                .into_iter()
                .chain(p.out_q8)
                .collect();
            cuda.set_fuse_rope(false);
            let unfused = run_on(cuda, &p.graph, &inputs, &outputs, Aliasing::On);
            cuda.set_fuse_rope(true);
            let unfused = unfused.unwrap();
            let got = run_on(cuda, &p.graph, &inputs, &outputs, Aliasing::On).unwrap();
            for (i, name) in ["out", "k_cache", "v_cache", "out_q8"].iter().enumerate() {
                if i < got.len() {
                    assert!(
                        got[i] == unfused[i],
                        "{what}: fused {name} differs from unfused"
                    );
                }
            }
            if let Some(q8) = got.get(3) {
                assert_q8_copy(&what, &got[0], q8);
            }
            let in_range = (0..cap).contains(&position) && (0..s.n_slots as i32).contains(&slot);
            if !in_range {
                assert!(
                    f32s(&got[0]).iter().all(|&v| v == 0.0),
                    "{what}: out not zero"
                );
                assert!(
                    got[1] == old_k && got[2] == old_v,
                    "{what}: a cache changed"
                );
                continue;
            }
            assert!(got[1] != old_k && got[2] != old_v, "{what}: no row written");
            let want = run_on(&CpuBackend, &p.graph, &inputs, &outputs, Aliasing::On).unwrap();
            assert_close(
                &format!("{what} out"),
                &f32s(&got[0]),
                &f32s(&want[0]),
                1e-6,
            );
            for (i, name) in [(1, "k_cache"), (2, "v_cache")] {
                assert_close(
                    &format!("{what} {name}"),
                    &cache_values(s.cache, &got[i]),
                    &cache_values(s.cache, &want[i]),
                    1e-6,
                );
            }
        }
    }
}
