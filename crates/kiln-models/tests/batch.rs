//! Batched steps over sequence slots on the CPU with the project's small model
//! (`Model::forward_batch`): each sequence's greedy tokens are those it gets alone,
//! while others of different prompt lengths share every step (joining mid-way,
//! leaving and their slots reused); the rows' logits are those of one-sequence
//! forward passes; the greedy tokens chosen on the backend
//! (`Model::forward_batch_greedy`) are the argmax of those logits; bad batches, and
//! token ids outside the vocabulary from the backend, are errors that change nothing.

mod common;
use common::*;
use kiln_core::{Backend, DType};
use kiln_cpu::CpuBackend;
use kiln_gguf::GgufFile;
use kiln_models::forward::names;
use kiln_models::{BatchRow, LoadOptions, Model};
use std::path::Path;

/// The small model converted to an F32 GGUF in `dir`.
fn tiny(dir: &Path) -> GgufFile {
    common::small_model_gguf(dir, DType::F32)
}

fn load(file: &GgufFile, slots: usize) -> Model<CpuBackend> {
    load_on(CpuBackend, file, slots)
}

fn load_on<BE: Backend>(backend: BE, file: &GgufFile, slots: usize) -> Model<BE> {
    let options = LoadOptions {
        context: Some(96),
        cache_dtype: DType::F16,
        slots,
    };
    Model::load(backend, file, options, &mut |_, _| {}).unwrap()
}

/// Token ids of the vocabulary, varied and deterministic.
fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (seed * 977 + i * 131 + 7) % 4000 + 3)
        .collect()
}

/// Five sequences over four slots: three start together (prompts of 5, 12 and 1
/// tokens), one joins at step 3, one joins once the second has left (step 7) and
/// takes its slot.
fn scenario() -> Vec<Sequence> {
    let seq = |seed, n, join, tokens| Sequence {
        prompt: prompt(seed, n),
        join,
        tokens,
    };
    vec![
        seq(1, 5, 0, 14),
        seq(2, 12, 0, 6),
        seq(3, 1, 0, 14),
        seq(4, 9, 3, 10),
        seq(5, 7, 7, 6),
    ]
}

fn nmse(got: &[f32], want: &[f32]) -> f64 {
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum();
    err / want.iter().map(|&w| (w as f64).powi(2)).sum::<f64>()
}

#[test]
fn each_sequence_of_a_batch_gets_the_tokens_it_gets_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    let mut alone = load(&file, 1);
    let mut batched = load(&file, 4);
    let sequences = scenario();
    let got = batched_greedy(&mut batched, &sequences);
    for (i, s) in sequences.iter().enumerate() {
        alone.reset();
        let want = greedy_tokens(&mut alone, &s.prompt, s.tokens);
        assert_eq!(got[i], want, "sequence {i} (prompt of {})", s.prompt.len());
    }
    // Every sequence left: every slot is empty.
    assert!((0..4).all(|slot| batched.slot_len(slot) == 0));
}

#[test]
fn batch_rows_have_the_logits_of_one_sequence_passes() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    let mut alone = load(&file, 1);
    // A one-slot model runs a batch of its one slot too (no padding slot).
    for slots in [3, 1] {
        let mut model = load(&file, slots);
        let a = prompt(11, 70);
        let b = prompt(12, 4);
        // Slot 0 first runs b; then one batch runs all of a (70 rows: more than the
        // largest bucket) in the last slot, with logits at rows 9 and 69, and b's next
        // token in slot 0.
        let rows: Vec<BatchRow> = b
            .iter()
            .map(|&token| BatchRow {
                slot: 0,
                token,
                logits: false,
            })
            .collect();
        assert!(model.forward_batch(&rows).unwrap().is_empty());
        let last = slots - 1;
        let mut rows: Vec<BatchRow> = a
            .iter()
            .enumerate()
            .map(|(i, &token)| BatchRow {
                slot: last,
                token,
                logits: i == 9 || i == 69,
            })
            .collect();
        if slots > 1 {
            rows.insert(
                30,
                BatchRow {
                    slot: 0,
                    token: 5,
                    logits: true,
                },
            );
        }
        let got = model.forward_batch(&rows).unwrap();
        let vocab = model.config().vocab;
        // With one slot, a continues b in slot 0.
        let before: &[u32] = if slots > 1 { &[] } else { &b };
        let mut want = Vec::new();
        alone.reset();
        want.extend(alone.forward(&[before, &a[..10]].concat()).unwrap());
        if slots > 1 {
            alone.reset();
            alone.forward(&b).unwrap();
            want.extend(alone.forward(&[5]).unwrap());
        }
        alone.reset();
        want.extend(alone.forward(&[before, &a].concat()).unwrap());
        assert_eq!(got.len(), want.len(), "{slots} slots: logits rows");
        for (i, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
            let e = nmse(g, w);
            assert!(e < 1e-10, "{slots} slots: row {i} of logits: NMSE {e:.2e}");
        }
        assert_eq!(model.slot_len(last), if slots > 1 { 70 } else { 74 });
        if slots > 1 {
            assert_eq!(model.slot_len(0), 5);
        }
        // Slot 0 is what forward continues.
        assert_eq!(model.n_past(), model.slot_len(0));
    }
}

#[test]
fn bad_batches_are_errors_that_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    let mut model = load(&file, 2);
    let row = |slot, token| BatchRow {
        slot,
        token,
        logits: true,
    };
    model.forward_batch(&[row(0, 10), row(1, 20)]).unwrap();
    let vocab = model.config().vocab as u32;
    let full: Vec<BatchRow> = (0..96).map(|i| row(1, i + 3)).collect();
    let cases: [(&[BatchRow], &str); 4] = [
        (&[], "no rows"),
        (&[row(0, 1), row(2, 1)], "row 1 is in slot 2"),
        (&[row(1, 1), row(0, vocab)], "outside the vocabulary"),
        (&full, "context full: slot 1"),
    ];
    for (rows, want) in cases {
        for op in ["forward_batch", "forward_batch_greedy"] {
            let result = match op {
                "forward_batch" => model.forward_batch(rows).map(drop),
                _ => model.forward_batch_greedy(rows).map(drop),
            };
            let err = result.unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains(&format!("to {op}:")),
                "{err}"
            );
            assert_eq!(
                (model.slot_len(0), model.slot_len(1)),
                (1, 1),
                "{op}: {want}"
            );
        }
    }
    // The model is still usable: its next step is that of a model that never erred.
    let got = model.forward_batch(&[row(1, 30), row(0, 40)]).unwrap();
    let mut fresh = load(&file, 2);
    fresh.forward_batch(&[row(0, 10), row(1, 20)]).unwrap();
    let want = fresh.forward_batch(&[row(1, 30), row(0, 40)]).unwrap();
    assert_eq!(got, want);
    // Up to the capacity fits exactly.
    let room = 96 - model.slot_len(1) as u32;
    let fill: Vec<BatchRow> = (0..room).map(|i| row(1, i + 3)).collect();
    model.forward_batch(&fill).unwrap();
    assert_eq!(model.slot_len(1), 96);
}

#[test]
fn greedy_batches_return_the_argmax_of_their_logits_rows() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    assert_greedy_batches_take_the_argmax(&mut load(&file, 3), &mut load(&file, 3));
}

#[test]
fn greedy_ids_outside_the_vocabulary_are_errors_that_consume_no_position() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    // Every download's bytes 0x7F: token ids of 2139062143, past any vocabulary.
    let ids_out_of_range = Stacking {
        download_fill: Some(0x7F),
    };
    let mut model = load_on(ids_out_of_range, &file, 2);
    let row = |slot, token, logits| BatchRow {
        slot,
        token,
        logits,
    };
    // 70 rows: the graph built for them; then a bucket's executable.
    let long: Vec<BatchRow> = (0..70).map(|i| row(1, i + 3, i == 69)).collect();
    for rows in [&[row(0, 10, true), row(1, 20, false)][..], &long] {
        let err = model.forward_batch_greedy(rows).unwrap_err().to_string();
        assert!(
            err.contains(names::BATCH_TOKENS) && err.contains("token id 2139062143 is outside"),
            "{err}"
        );
        assert_eq!((model.slot_len(0), model.slot_len(1)), (0, 0));
    }
    // A step without logits rows downloads no id.
    let none = model.forward_batch_greedy(&[row(0, 10, false)]).unwrap();
    assert!(none.is_empty());
    assert_eq!((model.slot_len(0), model.slot_len(1)), (1, 0));
}
