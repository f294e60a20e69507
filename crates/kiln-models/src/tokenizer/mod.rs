//! Text to token ids and back, as llama.cpp's `llama_tokenize` and
//! `llama_token_to_piece` compute them, from a GGUF file's `tokenizer.ggml.*`
//! metadata.
//!
//! Two algorithms (`tokenizer.ggml.model`):
//! - `gpt2`: byte-level BPE with merge rules, after the pre-tokenizer that
//!   `tokenizer.ggml.pre` names (GPT-2, Llama 3, Qwen2 and the other regex pre-types
//!   of llama.cpp listed in `pretokenize.rs`);
//! - `llama`: SentencePiece BPE, merging by token score, with byte fallback and a
//!   leading space (`add_space_prefix`).
//!
//! Encoding first cuts special tokens out of the text: control and unknown tokens
//! only when `parse_special` is set, user-defined tokens always, longest text first.
//! The pieces between them are tokenized by the algorithm; BOS and EOS are added
//! when asked for and the vocabulary says so. Decoding concatenates each token's
//! piece; [`StreamDecoder`] does so incrementally for streaming output.

mod bpe;
mod gguf;
mod pretokenize;
mod special;
mod spm;
mod stream;
mod vocab;

pub use kiln_gguf::keys::tokenizer as keys;
pub use stream::StreamDecoder;

use bpe::BpeModel;
use kiln_core::{Error, Result};
use kiln_gguf::Metadata;
use pretokenize::PreTokenizer;
use spm::SpmModel;
use vocab::Vocab;

/// A token's index in the vocabulary.
pub type TokenId = u32;

/// What a token is (GGUF's `tokenizer.ggml.token_type`, llama.cpp's
/// `llama_token_type`); it decides how the token is matched in text and rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// Type 0 or a value GGUF does not define: never rendered.
    Undefined,
    /// Type 1: produced by the algorithm, rendered as its text.
    Normal,
    /// Type 2: the unknown token; matched in text only when parsing special tokens.
    Unknown,
    /// Type 3: BOS, EOS, chat markers; matched in text only when parsing special
    /// tokens, rendered only when asked for.
    Control,
    /// Type 4: added tokens, always matched in text and always rendered.
    UserDefined,
    /// Type 5: reserved, never rendered.
    Unused,
    /// Type 6: `<0xXX>`, one byte of UTF-8.
    Byte,
}

impl TokenType {
    /// The type that the GGUF value `value` stands for.
    pub fn from_gguf(value: i128) -> TokenType {
        match value {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }

    /// Whether text containing this token's text is cut at it before tokenizing:
    /// control and unknown tokens when special tokens are parsed, user-defined ones
    /// always.
    fn is_matched_in_text(self, parse_special: bool) -> bool {
        match self {
            TokenType::UserDefined => true,
            TokenType::Control | TokenType::Unknown => parse_special,
            _ => false,
        }
    }
}

/// The tokenization algorithm (`tokenizer.ggml.model`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerModel {
    /// `gpt2`: byte-level BPE after the pre-tokenizer named `pre`
    /// (`tokenizer.ggml.pre`; `None` is llama.cpp's "default").
    ByteLevelBpe { pre: Option<String> },
    /// `llama`: SentencePiece BPE by token scores, with byte fallback.
    SentencePiece,
}

/// Special token ids (`tokenizer.ggml.*_token_id`); `None` where not given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokenIds {
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    /// End of turn (`<|eot_id|>`, `<|im_end|>`, ...).
    pub eot: Option<TokenId>,
    /// End of message (`<|eom_id|>`).
    pub eom: Option<TokenId>,
    pub unknown: Option<TokenId>,
    pub padding: Option<TokenId>,
    pub fim_pre: Option<TokenId>,
    pub fim_suf: Option<TokenId>,
    pub fim_mid: Option<TokenId>,
    pub fim_pad: Option<TokenId>,
    pub fim_rep: Option<TokenId>,
    pub fim_sep: Option<TokenId>,
}

/// Everything a [`Tokenizer`] is built from, as plain values: what a GGUF file's
/// `tokenizer.ggml.*` keys hold ([`TokenizerSpec::from_gguf_metadata`]), or what a
/// test writes. `None` fields take llama.cpp's defaults for the model.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerSpec {
    pub model: TokenizerModel,
    /// Token texts, in id order (byte-level BPE tokens written with GPT-2's byte
    /// characters, SentencePiece tokens with '▁' for spaces).
    pub tokens: Vec<String>,
    /// One per token; `None`: all [`TokenType::Normal`].
    pub token_types: Option<Vec<TokenType>>,
    /// One per token; `None`: all 0.
    pub scores: Option<Vec<f32>>,
    /// BPE merge rules `"left right"`, highest priority first (unused by
    /// SentencePiece).
    pub merges: Vec<String>,
    pub special_ids: SpecialTokenIds,
    /// Default: true for SentencePiece and for the Llama 3 and Tekken pre-types.
    pub add_bos: Option<bool>,
    /// Default: false.
    pub add_eos: Option<bool>,
    /// Default: true for SentencePiece, false for byte-level BPE.
    pub add_space_prefix: Option<bool>,
}

impl TokenizerSpec {
    /// A spec of `tokens` for `model`, everything else unset.
    pub fn new(model: TokenizerModel, tokens: Vec<String>) -> TokenizerSpec {
        TokenizerSpec {
            model,
            tokens,
            token_types: None,
            scores: None,
            merges: Vec::new(),
            special_ids: SpecialTokenIds::default(),
            add_bos: None,
            add_eos: None,
            add_space_prefix: None,
        }
    }
}

/// The algorithm with its tables.
#[derive(Debug)]
enum Model {
    Bpe(Box<BpeModel>),
    Spm(Box<SpmModel>),
}

/// A part of the text being encoded: plain text or a special token cut out of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fragment<'t> {
    Text(&'t str),
    Token(TokenId),
}

/// Every token's piece (its bytes when rendered with special tokens), stored flat.
#[derive(Debug)]
struct Pieces {
    bytes: Vec<u8>,
    /// Piece `i` is `bytes[ends[i]..ends[i + 1]]`.
    ends: Vec<usize>,
}

/// A tokenizer: encodes text to token ids and decodes ids to text exactly as
/// llama.cpp does for the same GGUF metadata. `Send + Sync`, used through `&self`.
#[derive(Debug)]
pub struct Tokenizer {
    vocab: Vocab,
    model: Model,
    ids: SpecialTokenIds,
    /// End-of-generation ids, ascending.
    eog: Vec<TokenId>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    /// The tokens cut out of text before tokenizing (control, user-defined and
    /// unknown), longest text first, then by id.
    special_tokens: Vec<TokenId>,
    pieces: Pieces,
}

/// llama.cpp's default BOS and EOS for byte-level BPE files without those keys.
const BPE_DEFAULT_BOS_EOS: TokenId = 11;

/// llama.cpp's values for what the metadata leaves unset, per algorithm.
struct Defaults {
    ids: SpecialTokenIds,
    add_bos: bool,
    add_space_prefix: bool,
}

impl Defaults {
    /// The defaults of byte-level BPE with pre-tokenizer `pre` (BOS = EOS = 11,
    /// unless the pre-type has no default BOS; BOS added per pre-type; no space
    /// prefix), or of SentencePiece for `None` (BOS 1, EOS 2, unknown 0; BOS added;
    /// space prefix).
    fn for_model(pre: Option<&PreTokenizer>) -> Defaults {
        match pre {
            Some(pre) => Defaults {
                ids: SpecialTokenIds {
                    bos: (!pre.no_default_bos).then_some(BPE_DEFAULT_BOS_EOS),
                    eos: Some(BPE_DEFAULT_BOS_EOS),
                    ..SpecialTokenIds::default()
                },
                add_bos: pre.add_bos,
                add_space_prefix: false,
            },
            None => Defaults {
                ids: SpecialTokenIds {
                    bos: Some(1),
                    eos: Some(2),
                    unknown: Some(0),
                    ..SpecialTokenIds::default()
                },
                add_bos: true,
                add_space_prefix: true,
            },
        }
    }
}

impl SpecialTokenIds {
    /// Each id of `self` that is below `n_tokens`, else the one of `defaults` if
    /// that is (llama.cpp keeps the default when a given id is out of range, and
    /// warns, as this does through `tracing`).
    fn resolve(&self, defaults: &SpecialTokenIds, n_tokens: usize) -> SpecialTokenIds {
        let pick = |key: &str, given: Option<TokenId>, default: Option<TokenId>| {
            let in_range = |id: &TokenId| (*id as usize) < n_tokens;
            let chosen = given.filter(in_range).or(default.filter(in_range));
            if let Some(id) = given.filter(|id| !in_range(id)) {
                let instead = match chosen {
                    Some(d) => format!("using the default {d} instead"),
                    None => "the model has no such token".to_string(),
                };
                tracing::warn!(
                    "the model's {key} is {id}, but its vocabulary has only {n_tokens} tokens; {instead}"
                );
            }
            chosen
        };
        SpecialTokenIds {
            bos: pick(keys::BOS_ID, self.bos, defaults.bos),
            eos: pick(keys::EOS_ID, self.eos, defaults.eos),
            eot: pick(keys::EOT_ID, self.eot, defaults.eot),
            eom: pick(keys::EOM_ID, self.eom, defaults.eom),
            unknown: pick(keys::UNKNOWN_ID, self.unknown, defaults.unknown),
            padding: pick(keys::PADDING_ID, self.padding, defaults.padding),
            fim_pre: pick(keys::FIM_PRE_ID, self.fim_pre, defaults.fim_pre),
            fim_suf: pick(keys::FIM_SUF_ID, self.fim_suf, defaults.fim_suf),
            fim_mid: pick(keys::FIM_MID_ID, self.fim_mid, defaults.fim_mid),
            fim_pad: pick(keys::FIM_PAD_ID, self.fim_pad, defaults.fim_pad),
            fim_rep: pick(keys::FIM_REP_ID, self.fim_rep, defaults.fim_rep),
            fim_sep: pick(keys::FIM_SEP_ID, self.fim_sep, defaults.fim_sep),
        }
    }
}

impl Tokenizer {
    /// The tokenizer of a GGUF file's metadata (see
    /// [`TokenizerSpec::from_gguf_metadata`] and [`Tokenizer::from_spec`]).
    pub fn from_gguf_metadata(metadata: &Metadata) -> Result<Tokenizer> {
        Tokenizer::from_spec(TokenizerSpec::from_gguf_metadata(metadata)?)
    }

    /// Builds the tokenizer `spec` describes, applying llama.cpp's rules: default
    /// special ids per model (SentencePiece: BOS 1, EOS 2, unknown 0; byte-level
    /// BPE: BOS = EOS = 11), dropped when out of range; a given id out of range
    /// keeps the default; end-of-turn, end-of-message and fill-in-the-middle tokens
    /// found by their texts when not given; the end-of-generation set. Errors: no
    /// tokens, a repeated token, short types or scores, an unknown pre-type, or
    /// BOS/EOS to be added without an id.
    pub fn from_spec(spec: TokenizerSpec) -> Result<Tokenizer> {
        let TokenizerSpec {
            model,
            tokens,
            token_types,
            scores,
            merges,
            special_ids: given,
            add_bos,
            add_eos,
            add_space_prefix,
        } = spec;
        let mut vocab = Vocab::new(tokens, token_types, scores)?;
        let pre = match &model {
            TokenizerModel::ByteLevelBpe { pre } => Some(PreTokenizer::for_name(pre.as_deref())?),
            TokenizerModel::SentencePiece => None,
        };
        let defaults = Defaults::for_model(pre.as_ref());
        let mut ids = given.resolve(&defaults.ids, vocab.len());
        let add_bos = add_bos.unwrap_or(defaults.add_bos);
        let add_eos = add_eos.unwrap_or(false);
        require_id(add_bos, ids.bos, keys::ADD_BOS, keys::BOS_ID)?;
        require_id(add_eos, ids.eos, keys::ADD_EOS, keys::EOS_ID)?;

        special::detect_roles(&mut vocab, &mut ids);
        let eog = special::end_of_generation(&mut vocab, &ids);
        let model = match pre {
            Some(pre) => Model::Bpe(Box::new(BpeModel::new(&vocab, &merges, pre))),
            None => Model::Spm(Box::new(SpmModel::new(&vocab, ids.unknown))),
        };
        let special_tokens = special_tokens_longest_first(&vocab);
        let pieces = render_pieces(&vocab, &model);
        Ok(Tokenizer {
            vocab,
            model,
            ids,
            eog,
            add_bos,
            add_eos,
            add_space_prefix: add_space_prefix.unwrap_or(defaults.add_space_prefix),
            special_tokens,
            pieces,
        })
    }

    /// The token ids of `text`, as llama.cpp's `llama_tokenize(text, add_special,
    /// parse_special)`: `add_special` adds BOS (and EOS) where the vocabulary asks
    /// for them; `parse_special` lets control tokens written in the text (such as
    /// `<|im_start|>`) become their ids, where otherwise they are tokenized as text.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<TokenId> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.ids.bos);
        }
        let fragments = self.cut_special_tokens(text, parse_special);
        match &self.model {
            Model::Bpe(bpe) => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(text) => bpe.encode(&self.vocab, text, &mut out),
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
            Model::Spm(spm) => {
                // A space is prepended to the first text and to every text after a
                // special token.
                let mut after_special = true;
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(text) => {
                            let prefix = if self.add_space_prefix && after_special {
                                " "
                            } else {
                                ""
                            };
                            let escaped = [prefix, text].concat().replace(' ', "\u{2581}");
                            spm.encode(&self.vocab, &escaped, &mut out);
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.ids.eos);
        }
        out
    }

    /// `text` cut at the special tokens it contains: for each special token in turn
    /// (longest first), every text fragment is split at each of its occurrences.
    fn cut_special_tokens<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut fragments = if text.is_empty() {
            Vec::new()
        } else {
            vec![Fragment::Text(text)]
        };
        for &id in &self.special_tokens {
            let matched = self
                .vocab
                .token_type(id)
                .is_some_and(|t| t.is_matched_in_text(parse_special));
            let Some(special) = self.vocab.text(id).filter(|_| matched) else {
                continue;
            };
            let occurs = |f: &Fragment| matches!(f, Fragment::Text(t) if t.contains(special));
            if !fragments.iter().any(occurs) {
                continue;
            }
            let mut cut = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                match fragment {
                    Fragment::Text(t) => split_at_token(t, special, id, &mut cut),
                    token => cut.push(token),
                }
            }
            fragments = cut;
        }
        fragments
    }

    /// The bytes token `id` renders as (llama.cpp's `llama_token_to_piece`): normal
    /// tokens as their text (byte-level characters turned back into bytes, '▁' into
    /// spaces), byte tokens as their byte, user-defined tokens as their text, control
    /// and unknown tokens as their text when `special` is set and as nothing
    /// otherwise, unused and undefined tokens as nothing. A piece may be part of a
    /// UTF-8 character. An id out of range renders as nothing.
    pub fn token_to_piece(&self, id: TokenId, special: bool) -> &[u8] {
        let hidden = matches!(
            self.vocab.token_type(id),
            Some(TokenType::Control | TokenType::Unknown)
        );
        if hidden && !special {
            return &[];
        }
        let i = id as usize;
        match (self.pieces.ends.get(i), self.pieces.ends.get(i + 1)) {
            (Some(&start), Some(&end)) => &self.pieces.bytes[start..end],
            _ => &[],
        }
    }

    /// The text of `ids`: their pieces without special tokens' texts, concatenated,
    /// invalid UTF-8 replaced by U+FFFD. As llama.cpp's `llama_detokenize(ids,
    /// remove_special = false, unparse_special = false)`, the first piece loses one
    /// leading space when the vocabulary adds a space prefix, so that
    /// `decode(encode(s, false, _)) == s`; unlike it, kiln does not remove spaces
    /// before punctuation (`clean_spaces`), so that the text is exactly the pieces.
    pub fn decode(&self, ids: &[TokenId]) -> String {
        let mut bytes = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let piece = self.token_to_piece(id, false);
            let piece = match piece {
                [b' ', rest @ ..] if i == 0 && self.add_space_prefix => rest,
                _ => piece,
            };
            bytes.extend_from_slice(piece);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Checks that this tokenizer fits a model whose token embedding has `vocab`
    /// rows: a tokenizer with more tokens would give ids the model cannot embed
    /// (one with fewer is accepted; the ids it lacks decode to nothing).
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        let n = self.vocab_size();
        if n > vocab {
            return Err(Error::format(
                keys::TOKENS,
                format!(
                    "{n} tokens, but the model's token_embd.weight has {vocab} rows, one per \
                     token id"
                ),
            ));
        }
        Ok(())
    }

    /// A streaming decoder over this tokenizer (see [`StreamDecoder`]).
    pub fn stream_decoder(&self, render_special: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, render_special)
    }

    /// The number of tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The beginning-of-sequence token, if the vocabulary has one.
    pub fn bos(&self) -> Option<TokenId> {
        self.ids.bos
    }

    /// The end-of-sequence token, if the vocabulary has one.
    pub fn eos(&self) -> Option<TokenId> {
        self.ids.eos
    }

    /// The special token ids after llama.cpp's defaults and detection.
    pub fn special_ids(&self) -> &SpecialTokenIds {
        &self.ids
    }

    /// Whether generation stops at `id`: EOS, end of turn or message, and the other
    /// tokens llama.cpp treats as end of generation (`<|im_end|>`, `<|eot_id|>`,
    /// `<end_of_turn>`, `<|endoftext|>`, ...).
    pub fn is_eog(&self, id: TokenId) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// Every end-of-generation id, ascending.
    pub fn eog_tokens(&self) -> &[TokenId] {
        &self.eog
    }

    /// Whether `encode(_, add_special = true, _)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(_, add_special = true, _)` appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// The text of token `id` as stored in the vocabulary.
    pub fn token_text(&self, id: TokenId) -> Option<&str> {
        self.vocab.text(id)
    }

    /// The type of token `id` (after llama.cpp's corrections of special tokens).
    pub fn token_type(&self, id: TokenId) -> Option<TokenType> {
        self.vocab.token_type(id)
    }

    /// The id of the token whose stored text is `text`.
    pub fn token_id(&self, text: &str) -> Option<TokenId> {
        self.vocab.id(text)
    }
}

/// Fails when a token is to be added (`add_key` true) but has no id (`id_key`).
fn require_id(add: bool, id: Option<TokenId>, add_key: &str, id_key: &str) -> Result<()> {
    if add && id.is_none() {
        return Err(Error::invalid(
            "tokenizer",
            format!("{add_key} is true, but {id_key} is not set or out of range"),
        ));
    }
    Ok(())
}

/// Appends `text` split at each occurrence of `special` (as token `id`) to `out`,
/// dropping empty text.
fn split_at_token<'t>(text: &'t str, special: &str, id: TokenId, out: &mut Vec<Fragment<'t>>) {
    let mut rest_start = 0;
    for (at, _) in text.match_indices(special) {
        if at > rest_start {
            out.push(Fragment::Text(&text[rest_start..at]));
        }
        out.push(Fragment::Token(id));
        rest_start = at + special.len();
    }
    if rest_start < text.len() {
        out.push(Fragment::Text(&text[rest_start..]));
    }
}

/// Control, user-defined and unknown tokens, longest text first, then by id.
fn special_tokens_longest_first(vocab: &Vocab) -> Vec<TokenId> {
    let mut special: Vec<(usize, TokenId)> = vocab
        .iter()
        .filter(|(_, _, t)| {
            matches!(
                t,
                TokenType::Control | TokenType::UserDefined | TokenType::Unknown
            )
        })
        .map(|(id, text, _)| (text.len(), id))
        .collect();
    special.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    special.into_iter().map(|(_, id)| id).collect()
}

/// Every token's piece with special tokens rendered (see
/// [`Tokenizer::token_to_piece`]).
fn render_pieces(vocab: &Vocab, model: &Model) -> Pieces {
    let mut bytes = Vec::new();
    let mut ends = Vec::with_capacity(vocab.len() + 1);
    ends.push(0);
    for (_, text, token_type) in vocab.iter() {
        match token_type {
            TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
                bytes.extend_from_slice(text.as_bytes())
            }
            TokenType::Normal => match model {
                Model::Bpe(_) => push_byte_level_text(text, &mut bytes),
                Model::Spm(_) => bytes.extend_from_slice(text.replace('\u{2581}', " ").as_bytes()),
            },
            TokenType::Byte => bytes.push(byte_token_value(text)),
            TokenType::Unused | TokenType::Undefined => {}
        }
        ends.push(bytes.len());
    }
    Pieces { bytes, ends }
}

/// The bytes a byte-level BPE token's characters stand for; a character outside
/// GPT-2's byte map becomes llama.cpp's marker `[UNK_BYTE_0x<utf8 hex><token>]`.
fn push_byte_level_text(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match bpe::char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut utf8 = [0u8; 4];
                let hex: String = c
                    .encode_utf8(&mut utf8)
                    .bytes()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                out.extend_from_slice(format!("[UNK_BYTE_0x{hex}{text}]").as_bytes());
            }
        }
    }
}

/// The byte of a byte token `<0xXX>` (0 when the text is not of that form, as
/// llama.cpp's `strtol` gives).
fn byte_token_value(text: &str) -> u8 {
    text.get(3..5)
        .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
