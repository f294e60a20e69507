//! SentencePiece BPE (`tokenizer.ggml.model = "llama"`), as llama.cpp's
//! `llm_tokenizer_spm_session` computes it.
//!
//! The text (spaces already written as U+2581 '▁') starts as one symbol per
//! character. Two adjacent symbols whose concatenation is a token may merge; the
//! pair whose token has the highest score merges first, the leftmost among equal
//! scores, and each merge creates the new pairs with its neighbours. Every final
//! symbol is then a token, or a character without one, which falls back to the byte
//! tokens `<0xXX>` of its UTF-8 bytes.

use super::vocab::Vocab;
use super::TokenId;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Marks the end of the symbol chain.
const NONE: usize = usize::MAX;

/// The SentencePiece model: the byte-fallback table (scores live in the vocabulary).
#[derive(Debug)]
pub(crate) struct SpmModel {
    /// The token of each byte: `<0xXX>`, else the byte's one-character text (ASCII
    /// only), else the unknown token, else none (the byte is dropped).
    byte_tokens: [Option<TokenId>; 256],
}

impl SpmModel {
    /// The model of `vocab`; bytes without a token fall back to `unknown`.
    pub(crate) fn new(vocab: &Vocab, unknown: Option<TokenId>) -> SpmModel {
        let byte_tokens = std::array::from_fn(|b| {
            let byte = b as u8;
            vocab
                .id(&format!("<0x{byte:02X}>"))
                .or_else(|| {
                    byte.is_ascii()
                        .then(|| vocab.id(&(byte as char).to_string()))
                        .flatten()
                })
                .or(unknown)
        });
        SpmModel { byte_tokens }
    }

    /// The token of byte `b` (see [`SpmModel::byte_tokens`]).
    pub(crate) fn byte_token(&self, b: u8) -> Option<TokenId> {
        self.byte_tokens[b as usize]
    }

    /// Appends the tokens of `escaped` (a fragment with spaces written as '▁') to
    /// `out`.
    pub(crate) fn encode(&self, vocab: &Vocab, escaped: &str, out: &mut Vec<TokenId>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(escaped.len());
        for (start, c) in escaped.char_indices() {
            let index = symbols.len();
            symbols.push(Symbol {
                start,
                end: start + c.len_utf8(),
                prev: if index == 0 { NONE } else { index - 1 },
                next: index + 1,
            });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = NONE;
        }
        let mut queue = BinaryHeap::new();
        for right in 1..symbols.len() {
            queue_pair(vocab, escaped, &symbols, &mut queue, right - 1, right);
        }
        while let Some(pair) = queue.pop() {
            let (left, right) = (symbols[pair.left], symbols[pair.right]);
            if left.len() == 0 || right.len() == 0 || left.len() + right.len() != pair.len {
                continue;
            }
            symbols[pair.right].end = right.start;
            symbols[pair.left].end = right.end;
            symbols[pair.left].next = right.next;
            if right.next != NONE {
                symbols[right.next].prev = pair.left;
            }
            queue_pair(vocab, escaped, &symbols, &mut queue, left.prev, pair.left);
            queue_pair(vocab, escaped, &symbols, &mut queue, pair.left, right.next);
        }
        let mut i = if symbols.is_empty() { NONE } else { 0 };
        while i != NONE {
            let text = &escaped[symbols[i].start..symbols[i].end];
            match vocab.id(text) {
                Some(id) => out.push(id),
                None => out.extend(text.bytes().filter_map(|b| self.byte_token(b))),
            }
            i = symbols[i].next;
        }
    }
}

/// Queues the merge of adjacent symbols `left` and `right` if their text is a token.
fn queue_pair(
    vocab: &Vocab,
    text: &str,
    symbols: &[Symbol],
    queue: &mut BinaryHeap<QueuedPair>,
    left: usize,
    right: usize,
) {
    if left == NONE || right == NONE {
        return;
    }
    let (start, end) = (symbols[left].start, symbols[right].end);
    let Some(score) = vocab.id(&text[start..end]).and_then(|id| vocab.score(id)) else {
        return;
    };
    queue.push(QueuedPair {
        score,
        left,
        right,
        len: end - start,
    });
}

/// One symbol: a byte range of the text and its neighbours.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    end: usize,
    prev: usize,
    next: usize,
}

impl Symbol {
    fn len(&self) -> usize {
        self.end - self.start
    }
}

/// A candidate merge: the score of the token it makes, its symbols, and their
/// combined length when queued (a pair whose length changed is stale).
#[derive(Clone, Copy, Debug)]
struct QueuedPair {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

/// The queue pops the highest score first, then the lowest `left`.
impl Ord for QueuedPair {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for QueuedPair {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for QueuedPair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for QueuedPair {}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pieces: &[(&str, f32)]) -> Vocab {
        let texts = pieces.iter().map(|(t, _)| t.to_string()).collect();
        let scores = pieces.iter().map(|&(_, s)| s).collect();
        Vocab::new(texts, None, Some(scores)).unwrap()
    }

    fn encode(vocab: &Vocab, text: &str) -> Vec<TokenId> {
        let mut out = Vec::new();
        SpmModel::new(vocab, None).encode(vocab, text, &mut out);
        out
    }

    #[test]
    fn highest_score_merges_first() {
        // "abc": "bc" (score -1) beats "ab" (score -2); "abc" cannot form from
        // "a" + "bc" because "abc" is not a token.
        let v = vocab(&[
            ("a", 0.0),
            ("b", 0.0),
            ("c", 0.0),
            ("ab", -2.0),
            ("bc", -1.0),
        ]);
        assert_eq!(encode(&v, "abc"), [0, 4]);
        // With "ab" scored higher, it merges first instead.
        let v = vocab(&[
            ("a", 0.0),
            ("b", 0.0),
            ("c", 0.0),
            ("ab", -0.5),
            ("bc", -1.0),
        ]);
        assert_eq!(encode(&v, "abc"), [3, 2]);
    }

    #[test]
    fn equal_scores_merge_leftmost_first() {
        let v = vocab(&[("a", 0.0), ("aa", -1.0)]);
        assert_eq!(encode(&v, "aaa"), [1, 0]);
    }

    #[test]
    fn characters_without_tokens_fall_back_to_bytes() {
        // 'é' is C3 A9 in UTF-8: its byte tokens, in order; 'z' has neither a token
        // nor a byte token and is dropped.
        let v = vocab(&[("<0xC3>", 0.0), ("<0xA9>", 0.0), ("x", 0.0)]);
        assert_eq!(encode(&v, "xéz"), [2, 0, 1]);
    }
}
