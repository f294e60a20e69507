//! The token list: texts, types, scores and the text-to-id map.

use super::{TokenId, TokenType};
use kiln_core::{Error, Result};
use std::collections::HashMap;

/// Every token's text, type and score, and the id of each text.
#[derive(Clone, Debug)]
pub(crate) struct Vocab {
    texts: Vec<String>,
    types: Vec<TokenType>,
    scores: Vec<f32>,
    ids: HashMap<String, TokenId>,
}

impl Vocab {
    /// A vocabulary of `texts` (id = index). Missing `types` make every token
    /// [`TokenType::Normal`] and missing `scores` make every score 0, as in
    /// llama.cpp; given ones must have an entry per token (extra entries are ignored).
    /// An empty text becomes `[EMPTY_<id>]`, as llama.cpp renames it. Errors: no
    /// tokens, more than `u32::MAX`, short `types`/`scores`, a repeated text.
    pub(crate) fn new(
        mut texts: Vec<String>,
        types: Option<Vec<TokenType>>,
        scores: Option<Vec<f32>>,
    ) -> Result<Vocab> {
        let n = texts.len();
        if n == 0 || u32::try_from(n).is_err() {
            return Err(Error::invalid(
                "tokenizer vocabulary",
                format!("needs 1 to {} tokens, got {n}", u32::MAX),
            ));
        }
        let types = per_token(
            "token types (tokenizer.ggml.token_type)",
            types,
            n,
            TokenType::Normal,
        )?;
        let scores = per_token("scores (tokenizer.ggml.scores)", scores, n, 0.0)?;
        let mut ids = HashMap::with_capacity(n);
        for (id, text) in texts.iter_mut().enumerate() {
            if text.is_empty() {
                *text = format!("[EMPTY_{id}]");
            }
            // `n` fits in u32 (checked above), so every index does.
            let id = id as TokenId;
            if let Some(first) = ids.insert(text.clone(), id) {
                return Err(Error::invalid(
                    "tokenizer vocabulary",
                    format!("token {text:?} appears twice, as ids {first} and {id}"),
                ));
            }
        }
        Ok(Vocab {
            texts,
            types,
            scores,
            ids,
        })
    }

    /// The number of tokens.
    pub(crate) fn len(&self) -> usize {
        self.texts.len()
    }

    /// The id of the token whose text is `text`, if any (of any type).
    pub(crate) fn id(&self, text: &str) -> Option<TokenId> {
        self.ids.get(text).copied()
    }

    /// The text of token `id`, if `id` is in range.
    pub(crate) fn text(&self, id: TokenId) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// The type of token `id`, if `id` is in range.
    pub(crate) fn token_type(&self, id: TokenId) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Changes the type of token `id` (llama.cpp's corrections of special tokens);
    /// an id out of range changes nothing.
    pub(crate) fn set_type(&mut self, id: TokenId, token_type: TokenType) {
        if let Some(t) = self.types.get_mut(id as usize) {
            *t = token_type;
        }
    }

    /// The score of token `id` (SentencePiece merge priority), if `id` is in range.
    pub(crate) fn score(&self, id: TokenId) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }

    /// `(id, text, type)` of every token, in id order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (TokenId, &str, TokenType)> {
        self.texts
            .iter()
            .zip(&self.types)
            .enumerate()
            .map(|(id, (text, &t))| (id as TokenId, text.as_str(), t))
    }
}

/// `values` cut to `n` entries, or `n` copies of `default` when absent; fewer than
/// `n` values is an error naming `what`.
fn per_token<T: Clone>(what: &str, values: Option<Vec<T>>, n: usize, default: T) -> Result<Vec<T>> {
    match values {
        None => Ok(vec![default; n]),
        Some(mut v) if v.len() >= n => {
            v.truncate(n);
            Ok(v)
        }
        Some(v) => Err(Error::invalid(
            "tokenizer vocabulary",
            format!("{what} has {} entries for {n} tokens", v.len()),
        )),
    }
}
