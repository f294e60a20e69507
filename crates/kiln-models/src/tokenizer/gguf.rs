//! Reading a [`TokenizerSpec`] from GGUF metadata (llama.cpp's `tokenizer.ggml.*`).

use super::{SpecialTokenIds, TokenType, TokenizerModel, TokenizerSpec};
use kiln_core::{Error, Result};
use kiln_gguf::keys::tokenizer as keys;
use kiln_gguf::{Metadata, Value};

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
