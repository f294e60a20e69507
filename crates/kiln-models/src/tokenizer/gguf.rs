//! Reading a [`TokenizerSpec`] from GGUF metadata (llama.cpp's `tokenizer.ggml.*`).

use super::{SpecialTokenIds, TokenType, TokenizerModel, TokenizerSpec};
use kiln_core::{Error, Result};
use kiln_gguf::{Metadata, Value};

/// llama.cpp's GGUF metadata keys for the tokenizer.
pub mod keys {
    /// The tokenization algorithm: `gpt2` (byte-level BPE), `llama` (SentencePiece
    /// BPE), ...: string.
    pub const MODEL: &str = "tokenizer.ggml.model";
    /// The pre-tokenizer of a byte-level BPE vocabulary (`llama-bpe`, `qwen2`, ...):
    /// string.
    pub const PRE: &str = "tokenizer.ggml.pre";
    /// Every token's text, in id order: array of strings.
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    /// Every token's type (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte): array of i32.
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    /// Every token's score (SentencePiece merge priority): array of f32.
    pub const SCORES: &str = "tokenizer.ggml.scores";
    /// BPE merge rules, `"left right"`, highest priority first: array of strings.
    pub const MERGES: &str = "tokenizer.ggml.merges";
    /// Beginning of sequence: u32.
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    /// End of sequence: u32.
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    /// End of turn: u32.
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    /// End of message: u32.
    pub const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
    /// Unknown token: u32.
    pub const UNKNOWN_ID: &str = "tokenizer.ggml.unknown_token_id";
    /// Padding: u32.
    pub const PADDING_ID: &str = "tokenizer.ggml.padding_token_id";
    /// Fill-in-the-middle prefix: u32.
    pub const FIM_PRE_ID: &str = "tokenizer.ggml.fim_pre_token_id";
    /// Fill-in-the-middle suffix: u32.
    pub const FIM_SUF_ID: &str = "tokenizer.ggml.fim_suf_token_id";
    /// Fill-in-the-middle middle: u32.
    pub const FIM_MID_ID: &str = "tokenizer.ggml.fim_mid_token_id";
    /// Fill-in-the-middle pad: u32.
    pub const FIM_PAD_ID: &str = "tokenizer.ggml.fim_pad_token_id";
    /// Fill-in-the-middle repository name: u32.
    pub const FIM_REP_ID: &str = "tokenizer.ggml.fim_rep_token_id";
    /// Fill-in-the-middle file separator: u32.
    pub const FIM_SEP_ID: &str = "tokenizer.ggml.fim_sep_token_id";
    /// Whether encoding with special tokens prepends BOS: bool.
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    /// Whether encoding with special tokens appends EOS: bool.
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    /// Whether SentencePiece text gets a leading space: bool.
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
}

impl TokenizerSpec {
    /// The tokenizer that `metadata`'s `tokenizer.ggml.*` keys describe. Errors: a
    /// missing or mistyped key ([`Error::Format`] naming it), a `tokenizer.ggml.model`
    /// other than `gpt2` and `llama` ([`Error::Unsupported`]), missing merges for
    /// `gpt2`.
    pub fn from_gguf_metadata(metadata: &Metadata) -> Result<TokenizerSpec> {
        let model_name = metadata.get_str(keys::MODEL)?;
        let model = match model_name {
            "gpt2" => TokenizerModel::ByteLevelBpe {
                pre: optional(metadata, keys::PRE, |m, k| m.get_str(k).map(str::to_owned))?,
            },
            "llama" => TokenizerModel::SentencePiece,
            other => {
                return Err(Error::Unsupported(format!(
                    "tokenizer model {other:?} ({}); kiln supports \"gpt2\" (byte-level BPE) \
                     and \"llama\" (SentencePiece BPE)",
                    keys::MODEL
                )))
            }
        };
        let merges = match model {
            TokenizerModel::ByteLevelBpe { .. } => strings(metadata, keys::MERGES)?,
            TokenizerModel::SentencePiece => Vec::new(),
        };
        let token_types = optional(metadata, keys::TOKEN_TYPE, |m, k| {
            array_of(m, k, "integer", |v| {
                v.as_integer().map(TokenType::from_gguf)
            })
        })?;
        let scores = optional(metadata, keys::SCORES, |m, k| array_of(m, k, "f32", score))?;
        let id = |key| optional(metadata, key, Metadata::get_u32);
        let flag = |key| optional(metadata, key, Metadata::get_bool);
        Ok(TokenizerSpec {
            model,
            tokens: strings(metadata, keys::TOKENS)?,
            token_types,
            scores,
            merges,
            special_ids: SpecialTokenIds {
                bos: id(keys::BOS_ID)?,
                eos: id(keys::EOS_ID)?,
                eot: id(keys::EOT_ID)?,
                eom: id(keys::EOM_ID)?,
                unknown: id(keys::UNKNOWN_ID)?,
                padding: id(keys::PADDING_ID)?,
                fim_pre: id(keys::FIM_PRE_ID)?,
                fim_suf: id(keys::FIM_SUF_ID)?,
                fim_mid: id(keys::FIM_MID_ID)?,
                fim_pad: id(keys::FIM_PAD_ID)?,
                fim_rep: id(keys::FIM_REP_ID)?,
                fim_sep: id(keys::FIM_SEP_ID)?,
            },
            add_bos: flag(keys::ADD_BOS)?,
            add_eos: flag(keys::ADD_EOS)?,
            add_space_prefix: flag(keys::ADD_SPACE_PREFIX)?,
        })
    }
}

/// `read(metadata, key)` when `key` is present, else `None`.
fn optional<T>(
    metadata: &Metadata,
    key: &str,
    read: impl FnOnce(&Metadata, &str) -> Result<T>,
) -> Result<Option<T>> {
    if metadata.contains_key(key) {
        read(metadata, key).map(Some)
    } else {
        Ok(None)
    }
}

/// The array at `key` with every item converted by `item` (`None`: the item is not
/// `expected`, an error naming the key and the item).
fn array_of<T>(
    metadata: &Metadata,
    key: &str,
    expected: &str,
    item: impl Fn(Value) -> Option<T>,
) -> Result<Vec<T>> {
    metadata
        .get_array(key)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let found = v.value_type();
            item(v).ok_or_else(|| {
                Error::format(
                    format!("metadata key {key:?}"),
                    format!("item {i} is a {found}, expected {expected}"),
                )
            })
        })
        .collect()
}

/// The array of strings at `key` (which must be present).
fn strings(metadata: &Metadata, key: &str) -> Result<Vec<String>> {
    array_of(metadata, key, "string", |v| match v {
        Value::String(s) => Some(s),
        _ => None,
    })
}

/// A score: f32, or an integer (llama.cpp also accepts i32 scores).
fn score(value: Value) -> Option<f32> {
    match value {
        Value::F32(s) => Some(s),
        other => other.as_integer().map(|i| i as f32),
    }
}
