//! tokenizer.json and tokenizer_config.json of a byte-level BPE tokenizer (GPT-2's
//! scheme, as Llama 3 and Qwen use) to the tokenizer metadata llama.cpp writes:
//! `tokenizer.ggml.model = "gpt2"`, the pre-tokenizer's name, tokens, token types,
//! merges, special token ids, whether BOS/EOS are added, and the chat template.

use super::json::{self, Object};
use crate::keys::tokenizer as keys;
use crate::Metadata;
use kiln_core::{Error, Result};
use serde_json::{Map, Value as Json};
use std::collections::HashMap;
use std::path::Path;

/// llama.cpp's token types (`llama_token_type`).
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
}

/// The split regex of Llama 3's tokenizer.json (llama.cpp's pre-tokenizer `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The split regex of Qwen2's and Qwen3's tokenizer.json (pre-tokenizer `qwen2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The split regex of Qwen3.5's tokenizer.json (pre-tokenizer `qwen35`): Qwen2's with
/// combining marks (`\p{M}`) joining letters.
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special tokens llama.cpp records: tokenizer_config.json's `{kind}_token`
/// (or config.json's `{kind}_token_id`) and the GGUF key of its id.
const SPECIAL_TOKENS: [(&str, &str); 5] = [
    ("bos", keys::BOS_ID),
    ("eos", keys::EOS_ID),
    ("unk", keys::UNKNOWN_ID),
    ("sep", keys::SEPARATOR_ID),
    ("pad", keys::PADDING_ID),
];

/// A tokenizer's GGUF metadata.
#[derive(Debug)]
pub struct Vocab {
    /// `tokenizer.ggml.pre`.
    pub pre: &'static str,
    /// One string per id up to the model's vocabulary size, in the tokenizer's
    /// byte-level encoding (`Ġ` for a space); ids the tokenizer lacks are `[PAD{id}]`.
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    /// `"left right"` pairs, highest priority first; a space inside a part is
    /// written as `Ġ`.
    pub merges: Vec<String>,
    /// (GGUF key, id) of each special token found.
    pub special_ids: Vec<(&'static str, u32)>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub chat_template: Option<String>,
}

impl Vocab {
    /// Reads `dir`'s tokenizer.json (required) and tokenizer_config.json (optional),
    /// with `config` (config.json) for special token ids the tokenizer files lack.
    /// `vocab_size` is the model's (its embedding rows).
    pub fn load(dir: &Path, config: &Map<String, Json>, vocab_size: usize) -> Result<Vocab> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(Error::invalid(
                "convert",
                format!(
                    "{} is missing: kiln convert needs the Hugging Face fast tokenizer",
                    tokenizer_path.display()
                ),
            ));
        }
        let source = tokenizer_path.display().to_string();
        let tokenizer = json::read_object(&tokenizer_path)?;
        let tokenizer = Object::new(&tokenizer, &source);
        let config_path = dir.join("tokenizer_config.json");
        let config_source = config_path.display().to_string();
        let tokenizer_config = if config_path.is_file() {
            Some(json::read_object(&config_path)?)
        } else {
            None
        };
        let tokenizer_config = tokenizer_config
            .as_ref()
            .map(|m| Object::new(m, &config_source));

        let model = tokenizer
            .opt_object("model")?
            .ok_or_else(|| tokenizer.error("model", "key is missing"))?;
        let model = Object::new(model, &source);
        check_byte_level_bpe(tokenizer, model)?;
        let added = added_tokens(tokenizer)?;
        let (tokens, token_types) = token_list(model, &added, vocab_size)?;
        let special = SpecialTokens::find(tokenizer_config, config, &added, vocab_size);
        let (add_bos, add_eos) = add_flags(tokenizer, tokenizer_config, &special)?;
        Ok(Vocab {
            pre: pre_tokenizer_name(tokenizer)?,
            tokens,
            token_types,
            merges: merges(model)?,
            special_ids: special.ids,
            add_bos,
            add_eos,
            chat_template: chat_template(dir, tokenizer_config)?,
        })
    }

    /// Writes the `tokenizer.*` keys in llama.cpp's order.
    pub fn write_metadata(&self, md: &mut Metadata) {
        md.set(keys::MODEL, "gpt2");
        md.set(keys::PRE, self.pre);
        md.set(keys::TOKENS, self.tokens.clone());
        md.set(keys::TOKEN_TYPE, self.token_types.clone());
        md.set(keys::MERGES, self.merges.clone());
        for &(key, id) in &self.special_ids {
            md.set(key, id);
        }
        if let Some(add) = self.add_bos {
            md.set(keys::ADD_BOS, add);
        }
        if let Some(add) = self.add_eos {
            md.set(keys::ADD_EOS, add);
        }
        if let Some(template) = &self.chat_template {
            md.set(keys::CHAT_TEMPLATE, template.as_str());
        }
    }
}

/// Rejects tokenizers other than byte-level BPE (SentencePiece-style BPE with byte
/// fallback, WordPiece, Unigram).
fn check_byte_level_bpe(tokenizer: Object<'_>, model: Object<'_>) -> Result<()> {
    let model_type = model.opt_str("type")?;
    let byte_fallback = model.opt_bool("byte_fallback")?.unwrap_or(false);
    let decoder = match tokenizer.opt_object("decoder")? {
        Some(d) => Object::new(d, tokenizer.source).opt_str("type")?,
        None => None,
    };
    if model_type == Some("BPE") && !byte_fallback && decoder == Some("ByteLevel") {
        return Ok(());
    }
    Err(Error::Unsupported(format!(
        "{}: a {} model (byte_fallback {byte_fallback}) with a {} decoder; kiln convert \
         supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen)",
        tokenizer.source,
        model_type.unwrap_or("untyped"),
        decoder.unwrap_or("missing")
    )))
}

/// llama.cpp's name for the tokenizer's pre-tokenizer: `gpt-2` for GPT-2's
/// ByteLevel split, `llama-bpe`, `qwen2` and `qwen35` for the Llama 3, Qwen2 and
/// Qwen3.5 split regexes followed by a ByteLevel mapping.
fn pre_tokenizer_name(tokenizer: Object<'_>) -> Result<&'static str> {
    let unsupported = |what: String| {
        Error::Unsupported(format!(
            "{}: pre_tokenizer {what}; kiln convert recognises GPT-2's ByteLevel split and the \
             Llama 3, Qwen2 and Qwen3.5 split regexes",
            tokenizer.source
        ))
    };
    let pre = tokenizer
        .opt_object("pre_tokenizer")?
        .ok_or_else(|| unsupported("is missing".into()))?;
    let pre = Object::new(pre, tokenizer.source);
    match pre.opt_str("type")? {
        Some("ByteLevel") => {
            if pre.opt_bool("add_prefix_space")?.unwrap_or(false) {
                return Err(unsupported("ByteLevel adds a prefix space".into()));
            }
            if pre.opt_bool("use_regex")?.unwrap_or(true) {
                Ok("gpt-2")
            } else {
                Err(unsupported("ByteLevel without a split regex".into()))
            }
        }
        Some("Sequence") => {
            let steps = pre.opt_array("pretokenizers")?.map(Vec::as_slice);
            let regex = match steps {
                Some([split, byte_level]) if is_plain_byte_level(byte_level) => split_regex(split),
                _ => None,
            };
            match regex {
                Some(LLAMA3_SPLIT) => Ok("llama-bpe"),
                Some(QWEN2_SPLIT) => Ok("qwen2"),
                Some(QWEN35_SPLIT) => Ok("qwen35"),
                Some(other) => Err(unsupported(format!("splits by the regex {other:?}"))),
                None => Err(unsupported(
                    "is a sequence other than a regex split and a ByteLevel mapping".into(),
                )),
            }
        }
        other => Err(unsupported(format!(
            "of type {}",
            other.unwrap_or("(untyped)")
        ))),
    }
}

/// The regex of an isolating `Split` pre-tokenizer step.
fn split_regex(step: &Json) -> Option<&str> {
    let step = step.as_object()?;
    let isolated = step.get("behavior").and_then(Json::as_str) == Some("Isolated");
    let inverted = step.get("invert").and_then(Json::as_bool).unwrap_or(false);
    if step.get("type").and_then(Json::as_str) != Some("Split") || !isolated || inverted {
        return None;
    }
    step.get("pattern")?.get("Regex")?.as_str()
}

/// Whether `step` is a ByteLevel step that only maps bytes (no regex, no prefix).
fn is_plain_byte_level(step: &Json) -> bool {
    let field = |k: &str| step.get(k).and_then(Json::as_bool);
    step.get("type").and_then(Json::as_str) == Some("ByteLevel")
        && field("use_regex") == Some(false)
        && field("add_prefix_space") != Some(true)
}

/// An entry of tokenizer.json's `added_tokens`.
struct AddedToken {
    content: String,
    special: bool,
}

fn added_tokens(tokenizer: Object<'_>) -> Result<HashMap<usize, AddedToken>> {
    let mut added = HashMap::new();
    for (i, entry) in tokenizer
        .opt_array("added_tokens")?
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let bad = || {
            tokenizer.error(
                "added_tokens",
                format!("entry {i} is not an {{id, content}} object"),
            )
        };
        let entry = entry.as_object().ok_or_else(bad)?;
        let entry = Object::new(entry, tokenizer.source);
        let id = entry.opt_usize("id")?.ok_or_else(bad)?;
        let content = entry.opt_str("content")?.ok_or_else(bad)?.to_owned();
        let special = entry.opt_bool("special")?.unwrap_or(false);
        added.insert(id, AddedToken { content, special });
    }
    Ok(added)
}

/// Whether an added token that is not marked special looks like a control token
/// (llama.cpp's heuristic).
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<\u{ff5c}") && token.ends_with("\u{ff5c}>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// The token strings and types for ids `0..vocab_size`.
fn token_list(
    model: Object<'_>,
    added: &HashMap<usize, AddedToken>,
    vocab_size: usize,
) -> Result<(Vec<String>, Vec<i32>)> {
    let vocab = model
        .opt_object("vocab")?
        .ok_or_else(|| model.error("model.vocab", "key is missing"))?;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut place = |id: usize, token: String, kind: i32| -> Result<()> {
        let slot = tokens.get_mut(id).ok_or_else(|| {
            model.error(
                "model.vocab",
                format!("token {token:?} has id {id}, beyond the model's vocab_size {vocab_size}"),
            )
        })?;
        *slot = Some((token, kind));
        Ok(())
    };
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|id| usize::try_from(id).ok())
            .ok_or_else(|| model.error("model.vocab", format!("token {token:?} has id {id}")))?;
        place(id, token.clone(), token_type::NORMAL)?;
    }
    for (&id, token) in added {
        let (text, kind) = if token.special || looks_special(&token.content) {
            (token.content.clone(), token_type::CONTROL)
        } else {
            (
                token.content.replace('\u{2581}', " "),
                token_type::USER_DEFINED,
            )
        };
        place(id, text, kind)?;
    }
    Ok(tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| t.unwrap_or_else(|| (format!("[PAD{id}]"), token_type::UNUSED)))
        .unzip())
}

/// The merges as `"left right"` strings, from either tokenizer.json form: strings,
/// or `[left, right]` pairs (whose parts may contain spaces, written as `Ġ`).
fn merges(model: Object<'_>) -> Result<Vec<String>> {
    let list = model
        .opt_array("merges")?
        .map(Vec::as_slice)
        .unwrap_or_default();
    list.iter()
        .enumerate()
        .map(|(i, merge)| match merge {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(left), Json::String(right)] => Ok(format!(
                    "{} {}",
                    left.replace(' ', "\u{120}"),
                    right.replace(' ', "\u{120}")
                )),
                _ => Err(model.error(
                    "model.merges",
                    format!("merge {i} is not a pair of strings"),
                )),
            },
            other => Err(model.error(
                "model.merges",
                format!("merge {i} is {}", json::describe(other)),
            )),
        })
        .collect()
}

/// The special tokens' contents and ids.
struct SpecialTokens {
    /// tokenizer_config.json's `bos_token` and `eos_token` contents.
    bos_content: Option<String>,
    eos_content: Option<String>,
    ids: Vec<(&'static str, u32)>,
}

impl SpecialTokens {
    /// Each special token's id: that of the added token whose content
    /// tokenizer_config.json names, else config.json's `{kind}_token_id` (an
    /// integer; lists are ignored, as llama.cpp does).
    fn find(
        tokenizer_config: Option<Object<'_>>,
        config: &Map<String, Json>,
        added: &HashMap<usize, AddedToken>,
        vocab_size: usize,
    ) -> SpecialTokens {
        let content = |kind: &str| -> Option<String> {
            match tokenizer_config?.get(&format!("{kind}_token"))? {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_owned),
                _ => None,
            }
        };
        let mut ids = Vec::new();
        for (kind, key) in SPECIAL_TOKENS {
            let by_content = content(kind).and_then(|c| {
                let mut matching: Vec<usize> = added
                    .iter()
                    .filter(|(_, t)| t.content == c)
                    .map(|(&id, _)| id)
                    .collect();
                matching.sort_unstable();
                matching.first().copied()
            });
            let by_config = config
                .get(&format!("{kind}_token_id"))
                .and_then(Json::as_u64)
                .and_then(|id| usize::try_from(id).ok());
            if let Some(id) = by_content.or(by_config).filter(|&id| id < vocab_size) {
                // Ids below vocab_size, which check() bounded to u32.
                ids.push((key, id as u32));
            }
        }
        SpecialTokens {
            bos_content: content("bos"),
            eos_content: content("eos"),
            ids,
        }
    }
}

/// Whether BOS and EOS are added to encoded text: from the post-processor's
/// template (a leading/trailing special token), overridden by tokenizer_config.json's
/// `add_bos_token`/`add_eos_token`.
fn add_flags(
    tokenizer: Object<'_>,
    tokenizer_config: Option<Object<'_>>,
    special: &SpecialTokens,
) -> Result<(Option<bool>, Option<bool>)> {
    let (mut add_bos, mut add_eos) = (None, None);
    if let Some(post) = tokenizer.opt_object("post_processor")? {
        let processors = match post.get("processors").and_then(Json::as_array) {
            Some(list) => list.iter().filter_map(Json::as_object).collect(),
            None => vec![post],
        };
        for p in processors {
            if p.get("type").and_then(Json::as_str) != Some("TemplateProcessing") {
                continue;
            }
            let single = p.get("single").and_then(Json::as_array).map(Vec::as_slice);
            let special_id = |item: &Json| {
                item.get("SpecialToken")?
                    .get("id")?
                    .as_str()
                    .map(str::to_owned)
            };
            if let Some(single @ [_, _, ..]) = single {
                let matches = |id: Option<String>, content: &Option<String>| {
                    id.map(|id| content.as_ref().is_none_or(|c| *c == id))
                };
                add_bos = matches(special_id(&single[0]), &special.bos_content).or(add_bos);
                add_eos = matches(special_id(&single[single.len() - 1]), &special.eos_content)
                    .or(add_eos);
            }
        }
    }
    if let Some(tc) = tokenizer_config {
        add_bos = tc.opt_bool("add_bos_token")?.or(add_bos);
        add_eos = tc.opt_bool("add_eos_token")?.or(add_eos);
    }
    Ok((add_bos, add_eos))
}

/// tokenizer_config.json's `chat_template` string, else chat_template.jinja.
fn chat_template(dir: &Path, tokenizer_config: Option<Object<'_>>) -> Result<Option<String>> {
    if let Some(template) = tokenizer_config.and_then(|tc| tc.get("chat_template")) {
        if let Some(s) = template.as_str() {
            return Ok(Some(s.to_owned()));
        }
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::io(jinja, e));
    }
    Ok(None)
}
