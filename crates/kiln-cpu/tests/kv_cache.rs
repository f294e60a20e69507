//! KvAppend into F32 and F16 caches: written rows hold the (rounded) sources, all
//! other rows are untouched, out-of-range positions are rejected.

mod common;
use common::*;
use kiln_core::ops::KvAppend;
use kiln_core::DType::{self, F16, F32, I32};
use kiln_core::{Aliasing, Error};
use kiln_cpu::CpuBackend;
use rand::seq::SliceRandom;

fn append_graph(
    dtype: DType,
    n_tokens: usize,
    heads: usize,
    hd: usize,
    cap: usize,
) -> (G, [kiln_core::BufferId; 3]) {
    let mut g = G::new();
    let src = g.p("src", F32, &[n_tokens, heads, hd]);
    let pos = g.p("pos", I32, &[n_tokens]);
    let cache = g.p("cache", dtype, &[heads, cap, hd]);
    g.g.push(KvAppend {
        src,
        positions: pos,
        slots: None,
        cache,
        n_tokens,
        n_kv_heads: heads,
        head_dim: hd,
        capacity: cap,
        n_slots: 1,
    })
    .unwrap();
    (g, [src, pos, cache])
}

#[test]
fn kv_append_writes_exactly_the_positions() {
    let mut rng = rng("kv_append");
    for dtype in [F32, F16] {
        for (n_tokens, heads, hd, cap) in [(1, 1, 1, 1), (3, 2, 64, 16), (7, 8, 128, 33)] {
            let (g, [src, pos, cache]) = append_graph(dtype, n_tokens, heads, hd, cap);
            let mut slots: Vec<i32> = (0..cap as i32).collect();
            slots.shuffle(&mut rng);
            let pv = &slots[..n_tokens];
            let sv = randn(&mut rng, n_tokens * heads * hd, 2.0);
            let before = float_bytes(&randn(&mut rng, heads * cap * hd, 1.0), dtype);
            let inputs = [
                (src, f32_bytes(&sv)),
                (pos, i32_bytes(pv)),
                (cache, before.clone()),
            ];
            let after = run(&g.g, &inputs, &[cache]).remove(0);
            let (old, new) = (float_values(&before, dtype), float_values(&after, dtype));
            for h in 0..heads {
                for row in 0..cap {
                    let at = (h * cap + row) * hd;
                    match pv.iter().position(|&p| p as usize == row) {
                        Some(t) => {
                            let want = float_values(
                                &float_bytes(&sv[(t * heads + h) * hd..][..hd], dtype),
                                dtype,
                            );
                            assert_eq!(&new[at..at + hd], &want[..], "{dtype} head {h} row {row}");
                        }
                        None => assert_eq!(
                            &new[at..at + hd],
                            &old[at..at + hd],
                            "{dtype} untouched row {row} changed"
                        ),
                    }
                }
            }
        }
    }
}

#[test]
fn kv_append_rejects_positions_outside_the_cache() {
    for bad in [-1, 4] {
        let (g, [src, pos, _]) = append_graph(F16, 1, 1, 2, 4);
        let err = run_on(
            &CpuBackend,
            &g.g,
            &[(src, f32_bytes(&[1.0, 2.0])), (pos, i32_bytes(&[bad]))],
            &[],
            Aliasing::On,
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        assert!(
            err.to_string().contains(&format!("position {bad}")),
            "{err}"
        );
    }
}

/// An append of `n_tokens` tokens with slot ids into a cache of `n_slots` slots.
fn slot_append_graph(
    dtype: DType,
    n_tokens: usize,
    heads: usize,
    hd: usize,
    cap: usize,
    n_slots: usize,
) -> (G, [kiln_core::BufferId; 4]) {
    let mut g = G::new();
    let src = g.p("src", F32, &[n_tokens, heads, hd]);
    let pos = g.p("pos", I32, &[n_tokens]);
    let slots = g.p("slots", I32, &[n_tokens]);
    let cache = g.p("cache", dtype, &[n_slots, heads, cap, hd]);
    g.g.push(KvAppend {
        src,
        positions: pos,
        slots: Some(slots),
        cache,
        n_tokens,
        n_kv_heads: heads,
        head_dim: hd,
        capacity: cap,
        n_slots,
    })
    .unwrap();
    (g, [src, pos, slots, cache])
}

#[test]
fn kv_append_writes_each_tokens_slot() {
    let mut rng = rng("kv_append_slots");
    for dtype in [F32, F16] {
        let (n_slots, heads, hd, cap) = (3, 2, 24, 9);
        // Every (slot, position) pair at most once, in random order.
        let mut pairs: Vec<(i32, i32)> = (0..n_slots as i32)
            .flat_map(|s| (0..cap as i32).map(move |p| (s, p)))
            .collect();
        pairs.shuffle(&mut rng);
        pairs.truncate(11);
        let n_tokens = pairs.len();
        let (g, [src, pos, slots, cache]) =
            slot_append_graph(dtype, n_tokens, heads, hd, cap, n_slots);
        let sv = randn(&mut rng, n_tokens * heads * hd, 2.0);
        let before = float_bytes(&randn(&mut rng, n_slots * heads * cap * hd, 1.0), dtype);
        let inputs = [
            (src, f32_bytes(&sv)),
            (
                pos,
                i32_bytes(&pairs.iter().map(|p| p.1).collect::<Vec<_>>()),
            ),
            (
                slots,
                i32_bytes(&pairs.iter().map(|p| p.0).collect::<Vec<_>>()),
            ),
            (cache, before.clone()),
        ];
        let after = run(&g.g, &inputs, &[cache]).remove(0);
        let (old, new) = (float_values(&before, dtype), float_values(&after, dtype));
        for s in 0..n_slots {
            for h in 0..heads {
                for row in 0..cap {
                    let at = ((s * heads + h) * cap + row) * hd;
                    match pairs
                        .iter()
                        .position(|&(ps, pp)| ps as usize == s && pp as usize == row)
                    {
                        Some(t) => {
                            let want = float_values(
                                &float_bytes(&sv[(t * heads + h) * hd..][..hd], dtype),
                                dtype,
                            );
                            assert_eq!(
                                &new[at..at + hd],
                                &want[..],
                                "{dtype} slot {s} head {h} row {row}"
                            );
                        }
                        None => assert_eq!(
                            &new[at..at + hd],
                            &old[at..at + hd],
                            "{dtype} untouched row {row} of slot {s} changed"
                        ),
                    }
                }
            }
        }
    }
}

#[test]
fn kv_append_rejects_slots_outside_the_cache_naming_the_token() {
    for bad in [-1, 2] {
        let (g, [src, pos, slots, _]) = slot_append_graph(F16, 2, 1, 2, 4, 2);
        let err = run_on(
            &CpuBackend,
            &g.g,
            &[
                (src, f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
                (pos, i32_bytes(&[0, 1])),
                (slots, i32_bytes(&[1, bad])),
            ],
            &[],
            Aliasing::On,
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        assert!(
            err.to_string().contains(&format!("token 1 has slot {bad}")),
            "{err}"
        );
    }
}
