//! A mock engine with deterministic logits and a hand-built tokenizer, for tests of
//! the scheduler and the server that need no model; and the library's own generation
//! loop over a model, which tests of a real engine compare against.

#![allow(dead_code)] // each test binary uses some of these

use kiln_core::{Error, Result};
use kiln_cpu::CpuBackend;
use kiln_models::generate::generate;
use kiln_models::sampler::argmax;
use kiln_models::tokenizer::{
    SpecialTokenIds, TokenType, Tokenizer, TokenizerModel, TokenizerSpec,
};
use kiln_models::{Model, Sampler, SamplerConfig};
use kiln_serve::engine::check_rows;
use kiln_serve::{BatchRow, Engine};
use std::sync::mpsc::{Receiver, Sender};

pub const BOS: u32 = 0;
pub const EOS: u32 = 1;
/// The first letter token: `a` is 2, `z` is 27.
pub const A: u32 = 2;
/// `Ġ`, a space.
pub const SPACE: u32 = 28;
/// The two byte-level pieces of "é" (bytes C3 A9).
pub const E_ACUTE_1: u32 = 29;
pub const E_ACUTE_2: u32 = 30;
pub const VOCAB: usize = 31;

/// A byte-level BPE vocabulary: `<s>`, `</s>`, the letters a to z, a space and the
/// two bytes of "é"; no merges, so each character is a token.
pub fn tokenizer() -> Tokenizer {
    let mut tokens = vec!["<s>".to_string(), "</s>".to_string()];
    tokens.extend(('a'..='z').map(String::from));
    tokens.extend(["Ġ", "Ã", "©"].map(String::from));
    let mut types = vec![TokenType::Normal; tokens.len()];
    types[..2].fill(TokenType::Control);
    Tokenizer::from_spec(TokenizerSpec {
        token_types: Some(types),
        special_ids: SpecialTokenIds {
            bos: Some(BOS),
            eos: Some(EOS),
            ..SpecialTokenIds::default()
        },
        add_bos: Some(true),
        ..TokenizerSpec::new(
            TokenizerModel::ByteLevelBpe {
                pre: Some("gpt-2".into()),
            },
            tokens,
        )
    })
    .expect("the test vocabulary is valid")
}

/// The letter token of `c`.
pub fn letter(c: char) -> u32 {
    A + (c as u32 - 'a' as u32)
}

/// The mock's default rule: the next token is a letter determined by the whole
/// history of the slot, so that tokens of one sequence routed into another's slot
/// change what follows.
pub fn hash_rule(history: &[u32]) -> u32 {
    let h = history
        .iter()
        .fold(17u64, |h, &t| h.wrapping_mul(31).wrapping_add(u64::from(t)));
    A + (h % 26) as u32
}

/// `n` tokens of `rule` after `prompt`, computed directly (what a sequence generates
/// alone, greedily, with no stop).
pub fn continuation(rule: fn(&[u32]) -> u32, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut history = prompt.to_vec();
    for _ in 0..n {
        let next = rule(&history);
        history.push(next);
    }
    history.split_off(prompt.len())
}

/// A model whose logits are one-hot on `rule(history of the slot)`, and whose greedy
/// tokens are their argmax. Every call's rows go to `log`, and with a `greedy_log`,
/// whether the call was [`Engine::forward_batch_greedy`]; with a `gate`, each call
/// first waits for a message on it. With `extra_row`, every step returns one row of
/// results more than its rows want (an engine that breaks its contract).
pub struct MockEngine {
    pub slots: Vec<Vec<u32>>,
    pub capacity: usize,
    pub rule: fn(&[u32]) -> u32,
    pub log: Sender<Vec<BatchRow>>,
    pub greedy_log: Option<Sender<bool>>,
    pub gate: Option<Receiver<()>>,
    pub extra_row: bool,
}

impl MockEngine {
    pub fn new(slots: usize, capacity: usize, log: Sender<Vec<BatchRow>>) -> Self {
        MockEngine {
            slots: vec![Vec::new(); slots],
            capacity,
            rule: hash_rule,
            log,
            greedy_log: None,
            gate: None,
            extra_row: false,
        }
    }

    /// Runs `rows` (a call of [`Engine::forward_batch_greedy`] when `greedy`) and
    /// returns the logits of those that want them.
    fn step(&mut self, rows: &[BatchRow], greedy: bool) -> Result<Vec<f32>> {
        check_rows(self, rows)?;
        let _ = self.log.send(rows.to_vec());
        if let Some(greedy_log) = &self.greedy_log {
            let _ = greedy_log.send(greedy);
        }
        if let Some(gate) = &self.gate {
            gate.recv()
                .map_err(|_| Error::invalid("mock", "the test closed the gate"))?;
        }
        let mut out = Vec::new();
        for row in rows {
            self.slots[row.slot].push(row.token);
            if row.logits {
                let next = (self.rule)(&self.slots[row.slot]);
                out.extend((0..VOCAB as u32).map(|t| if t == next { 1.0 } else { -1.0 }));
            }
        }
        if self.extra_row {
            out.extend(std::iter::repeat_n(0.0, VOCAB));
        }
        Ok(out)
    }
}

impl Engine for MockEngine {
    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn vocab(&self) -> usize {
        VOCAB
    }

    fn slot_len(&self, slot: usize) -> usize {
        self.slots.get(slot).map_or(0, Vec::len)
    }

    fn clear_slot(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.clear();
        }
    }

    fn forward_batch(&mut self, rows: &[BatchRow]) -> Result<Vec<f32>> {
        self.step(rows, false)
    }

    fn forward_batch_greedy(&mut self, rows: &[BatchRow]) -> Result<Vec<u32>> {
        let logits = self.step(rows, true)?;
        Ok(logits
            .chunks_exact(VOCAB)
            .map(|row| argmax(row) as u32)
            .collect())
    }
}

/// What the library's own generation loop produces for `prompt` with `sampler` on
/// `model`: the tokens (an end-of-generation token included) and their text.
pub fn generated(
    model: &mut Model<CpuBackend>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_tokens: usize,
    sampler: SamplerConfig,
) -> (Vec<u32>, String) {
    let mut sampler = Sampler::new(sampler);
    let mut tokens = Vec::new();
    generate(
        model,
        prompt,
        max_tokens,
        &mut sampler,
        &|t| tokenizer.is_eog(t),
        &mut |t| {
            tokens.push(t);
            Ok(())
        },
    )
    .unwrap();
    let mut decoder = tokenizer.stream_decoder(false);
    let mut text: String = tokens.iter().filter_map(|&t| decoder.push(t)).collect();
    text.extend(decoder.flush());
    (tokens, text)
}
