//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`), as llama.cpp's
//! `llm_tokenizer_bpe_session` computes it.
//!
//! Each pre-token's UTF-8 bytes become one symbol per byte, written with GPT-2's
//! byte-to-character map (printable bytes stand for themselves, the others for
//! U+0100 and up). Adjacent symbols whose texts form a merge rule are merged, the
//! lowest-ranked rule first and, among equal ranks, the leftmost; each merge creates
//! the new pairs with its neighbours. The final symbols are looked up in the
//! vocabulary; one that is not a token falls back to the tokens of its single
//! printable characters, and what has no token is dropped, as llama.cpp does.
//!
//! Merge rules are strings (`"Ġ t"`); to compare them cheaply every string that takes
//! part in a rule is interned: a vocabulary token keeps its id, any other string
//! (a rule whose result is not a token) gets an id past the vocabulary.

use super::pretokenize::PreTokenizer;
use super::vocab::Vocab;
use super::TokenId;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

pub(crate) use kiln_gguf::byte_level::{char_to_byte, BYTE_CHARS};

/// The id of a string that takes part in merges: a vocabulary id, or an id past it.
type SymbolId = u32;

/// A symbol id that no merge rule mentions (a byte whose character is in no rule
/// and no token).
const NO_SYMBOL: SymbolId = SymbolId::MAX;

/// Marks the end of the symbol chain.
const NONE: usize = usize::MAX;

/// A merge rule: its rank (position in `tokenizer.ggml.merges`) and the symbol it
/// makes.
#[derive(Clone, Copy, Debug)]
struct Merge {
    rank: u32,
    result: SymbolId,
}

/// The byte-level BPE model: merge rules and the per-byte symbol tables.
#[derive(Debug)]
pub(crate) struct BpeModel {
    pre: PreTokenizer,
    merges: HashMap<(SymbolId, SymbolId), Merge>,
    /// The symbol of each byte's character.
    byte_symbols: [SymbolId; 256],
    /// The token a byte falls back to when its symbol is not a token: the token of
    /// the byte's character when that character is one byte of UTF-8 (llama.cpp looks
    /// up each byte of the symbol's UTF-8 text alone, which only finds ASCII).
    byte_fallback: [Option<TokenId>; 256],
}

/// Interns the strings of merge rules: vocabulary tokens keep their id, the others
/// get ids from `vocab.len()` on.
struct Interner<'v> {
    vocab: &'v Vocab,
    extra: HashMap<String, SymbolId>,
}

impl Interner<'_> {
    fn intern(&mut self, text: &str) -> SymbolId {
        if let Some(id) = self.vocab.id(text) {
            return id;
        }
        let next = (self.vocab.len() + self.extra.len()) as SymbolId;
        *self.extra.entry(text.to_owned()).or_insert(next)
    }

    fn lookup(&self, text: &str) -> SymbolId {
        self.vocab
            .id(text)
            .or_else(|| self.extra.get(text).copied())
            .unwrap_or(NO_SYMBOL)
    }
}

impl BpeModel {
    /// The model of `vocab` with merge rules `merges` (`"left right"`, split at the
    /// first space after the first byte, as llama.cpp does; the first rule for a pair
    /// wins; a rule without a space is ignored) and pre-tokenizer `pre`.
    pub(crate) fn new(vocab: &Vocab, merges: &[String], pre: PreTokenizer) -> BpeModel {
        let mut interner = Interner {
            vocab,
            extra: HashMap::new(),
        };
        let mut rules = HashMap::with_capacity(merges.len());
        for (rank, rule) in merges.iter().enumerate() {
            let Some(split) = rule.bytes().skip(1).position(|b| b == b' ') else {
                continue;
            };
            // A space byte is never inside a multi-byte character, so both halves
            // are on character boundaries.
            let (left, right) = (&rule[..split + 1], &rule[split + 2..]);
            let pair = (interner.intern(left), interner.intern(right));
            let result = interner.intern(&[left, right].concat());
            rules.entry(pair).or_insert(Merge {
                rank: u32::try_from(rank).unwrap_or(u32::MAX),
                result,
            });
        }
        let mut char_buf = [0u8; 4];
        let byte_symbols =
            std::array::from_fn(|b| interner.lookup(BYTE_CHARS[b].encode_utf8(&mut char_buf)));
        let byte_fallback = std::array::from_fn(|b| {
            let c = BYTE_CHARS[b];
            if c.is_ascii() {
                vocab.id(c.encode_utf8(&mut char_buf))
            } else {
                None
            }
        });
        BpeModel {
            pre,
            merges: rules,
            byte_symbols,
            byte_fallback,
        }
    }

    /// Appends the tokens of `text` (a fragment without special tokens) to `out`.
    pub(crate) fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<TokenId>) {
        let mut scratch = Scratch::default();
        for word in self.pre.split(text) {
            self.encode_word(vocab, word, &mut scratch, out);
        }
    }

    fn encode_word(
        &self,
        vocab: &Vocab,
        word: &str,
        scratch: &mut Scratch,
        out: &mut Vec<TokenId>,
    ) {
        if self.pre.ignore_merges {
            scratch.encoded.clear();
            scratch
                .encoded
                .extend(word.bytes().map(|b| BYTE_CHARS[b as usize]));
            if let Some(id) = vocab.id(&scratch.encoded) {
                out.push(id);
                return;
            }
        }
        let bytes = word.as_bytes();
        scratch.symbols.clear();
        scratch
            .symbols
            .extend(bytes.iter().enumerate().map(|(i, &b)| Symbol {
                id: self.byte_symbols[b as usize],
                start: i,
                end: i + 1,
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 == bytes.len() { NONE } else { i + 1 },
            }));
        scratch.queue.clear();
        for left in 1..scratch.symbols.len() {
            self.queue_pair(scratch, left - 1, left);
        }
        while let Some(Reverse(pair)) = scratch.queue.pop() {
            self.apply(scratch, pair);
        }
        let mut i = if scratch.symbols.is_empty() { NONE } else { 0 };
        while i != NONE {
            let symbol = &scratch.symbols[i];
            if (symbol.id as usize) < vocab.len() {
                out.push(symbol.id);
            } else {
                let fallback = bytes[symbol.start..symbol.end]
                    .iter()
                    .filter_map(|&b| self.byte_fallback[b as usize]);
                out.extend(fallback);
            }
            i = symbol.next;
        }
    }

    /// Queues the merge of adjacent symbols `left` and `right`, if a rule exists.
    fn queue_pair(&self, scratch: &mut Scratch, left: usize, right: usize) {
        if left == NONE || right == NONE {
            return;
        }
        let ids = (scratch.symbols[left].id, scratch.symbols[right].id);
        if let Some(merge) = self.merges.get(&ids) {
            scratch.queue.push(Reverse(QueuedPair {
                rank: merge.rank,
                left,
                right,
                ids,
                result: merge.result,
            }));
        }
    }

    /// Merges a queued pair unless either symbol changed since it was queued.
    fn apply(&self, scratch: &mut Scratch, pair: QueuedPair) {
        let (left, right) = (scratch.symbols[pair.left], scratch.symbols[pair.right]);
        let unchanged = left.next == pair.right
            && left.is_alive()
            && right.is_alive()
            && (left.id, right.id) == pair.ids;
        if !unchanged {
            return;
        }
        let symbols = &mut scratch.symbols;
        symbols[pair.right].end = right.start;
        symbols[pair.left] = Symbol {
            id: pair.result,
            end: right.end,
            next: right.next,
            ..left
        };
        if right.next != NONE {
            symbols[right.next].prev = pair.left;
        }
        self.queue_pair(scratch, left.prev, pair.left);
        self.queue_pair(scratch, pair.left, right.next);
    }
}

/// One symbol of a word being merged: a byte range and its neighbours.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    id: SymbolId,
    start: usize,
    end: usize,
    prev: usize,
    next: usize,
}

impl Symbol {
    /// Whether the symbol has not been merged into its left neighbour.
    fn is_alive(&self) -> bool {
        self.end > self.start
    }
}

/// A candidate merge; the queue pops the lowest rank first, then the leftmost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct QueuedPair {
    rank: u32,
    left: usize,
    right: usize,
    /// The symbols' ids when queued: a pair whose ids changed is stale.
    ids: (SymbolId, SymbolId),
    /// The symbol the merge makes.
    result: SymbolId,
}

/// Buffers reused across the words of one text.
#[derive(Default)]
struct Scratch {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Reverse<QueuedPair>>,
    encoded: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(tokens: &[&str], merges: &[&str], pre: &str) -> (Vocab, BpeModel) {
        let vocab = Vocab::new(tokens.iter().map(|t| t.to_string()).collect(), None, None).unwrap();
        let merges: Vec<String> = merges.iter().map(|m| m.to_string()).collect();
        let pre = PreTokenizer::for_name(Some(pre)).unwrap();
        let model = BpeModel::new(&vocab, &merges, pre);
        (vocab, model)
    }

    fn encode(vocab: &Vocab, model: &BpeModel, text: &str) -> Vec<TokenId> {
        let mut out = Vec::new();
        model.encode(vocab, text, &mut out);
        out
    }

    #[test]
    fn lowest_rank_merges_first_and_ties_go_left() {
        // "aaa": rule "a a" applies to (0,1) and (1,2) at the same rank; the left one
        // wins, leaving "aa" + "a".
        let (vocab, model) = model(&["a", "aa", "b", "ab"], &["a a", "a b"], "gpt-2");
        assert_eq!(encode(&vocab, &model, "aaa"), [1, 0]);
        // "aab": "a a" (rank 0) beats "a b" (rank 1).
        assert_eq!(encode(&vocab, &model, "aab"), [1, 2]);
    }

    #[test]
    fn rule_whose_result_is_not_a_token_falls_back_to_characters() {
        // "x y" makes "xy", which is not a token; "xy z" makes the token "xyz".
        let (vocab, model) = model(&["x", "y", "z", "xyz"], &["x y", "xy z"], "gpt-2");
        assert_eq!(encode(&vocab, &model, "xyz"), [3]);
        assert_eq!(encode(&vocab, &model, "xy"), [0, 1]);
    }

    #[test]
    fn bytes_without_tokens_are_dropped() {
        // No token for 'Ġ' (space) or for the bytes of 'é': only "a" and "b" remain.
        let (vocab, model) = model(&["a", "b"], &[], "gpt-2");
        assert_eq!(encode(&vocab, &model, "a é b"), [0, 1]);
    }

    #[test]
    fn ignore_merges_takes_whole_words_from_the_vocabulary() {
        // With llama-bpe (ignore_merges) the word "abc" is a token and is taken whole;
        // with gpt-2 the rules give "a" + "bc".
        let tokens = ["a", "b", "c", "bc", "abc", "ab"];
        let merges = ["b c", "a b", "ab c"];
        let (vocab, model) = model(&tokens, &merges, "llama-bpe");
        assert_eq!(encode(&vocab, &model, "abc"), [4]);
        let (vocab, model) = super::tests::model(&tokens, &merges, "gpt-2");
        assert_eq!(encode(&vocab, &model, "abc"), [0, 3]);
    }
}
