//! Pre-tokenization of byte-level BPE vocabularies: the split regexes that
//! `tokenizer.ggml.pre` names, applied as llama.cpp's `unicode_regex_split` does.
//!
//! A pre-type is a list of regexes. The text starts as one piece; each regex in turn
//! splits every current piece into its matches and the gaps between them (a gap is
//! kept as a piece of its own, nothing is dropped), and a regex sees only the piece it
//! splits, so a lookahead never looks past a piece's end. The patterns are llama.cpp's
//! (its rewrites of the models' `tokenizer.json` regexes: `(?i:'s|...)` spelt out
//! as `'[sS]|...`), run by `fancy-regex`, whose backtracking semantics (leftmost
//! alternative first, lookaround) are those of the ECMAScript engine llama.cpp uses;
//! `\s`, `\p{L}`, `\p{N}`, `\p{P}`, `\p{S}` and `\p{M}` are Unicode's classes, as
//! llama.cpp's category tables define them.

use fancy_regex::{Regex, RegexBuilder};
use kiln_core::{Error, Result};

/// GPT-2's split: contractions, optionally space-prefixed runs of letters, of digits
/// and of other characters, then whitespace (a whitespace run before a non-space
/// leaves its last character to prefix the next word).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's split: case-insensitive contractions, letters with one optional leading
/// non-letter, digits in groups of at most three, punctuation runs with trailing
/// newlines, newline runs, whitespace.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split: Llama 3's with every digit a piece of its own.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen3.5's split: Qwen2's with combining marks kept inside words.
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Seed-Coder's split: Qwen2's, with newlines never inside punctuation runs.
const SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Ling (BailingMoE)'s split: Qwen2's with one newline per newline piece.
const BAILINGMOE: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// Qwen2's split without contractions, so that apostrophe suffixes stay on words.
const UFAKZEKA: &str =
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// EXAONE MoE's split: words may contain marks and single inner spaces.
const EXAONE_MOE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+";

/// MiniCPM5's word split (after digits are grouped by three).
const MINICPM5: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Tekken's split: upper-case-led and lower-case words are separate pieces
/// (`(?=\p{L})[^a-z]` is a letter that is not a-z).
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o's split: Tekken's words with contractions attached, digits by three.
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// DeepSeek-V3's word split (after digit groups and CJK runs).
const DEEPSEEK3: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;

/// BLOOM's split: runs of anything but whitespace and sentence punctuation.
const BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// What one `tokenizer.ggml.pre` value selects.
struct PreType {
    /// The names llama.cpp maps to this pre-type.
    names: &'static [&'static str],
    /// The split regexes, applied in order.
    regexes: &'static [&'static str],
    /// Whether a pre-token that is itself in the vocabulary is taken whole, without
    /// applying merges (llama.cpp's `ignore_merges`).
    ignore_merges: bool,
    /// Whether BOS is added by default (before `tokenizer.ggml.add_bos_token`).
    add_bos: bool,
    /// Whether the vocabulary has no default BOS id (llama.cpp clears it for GLM-4).
    no_default_bos: bool,
}

impl PreType {
    const fn new(names: &'static [&'static str], regexes: &'static [&'static str]) -> PreType {
        PreType {
            names,
            regexes,
            ignore_merges: false,
            add_bos: false,
            no_default_bos: false,
        }
    }
}

/// The pre-type used when `tokenizer.ggml.pre` is absent or "default".
const DEFAULT_PRE: PreType = PreType::new(
    &["default"],
    &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
);

/// Every pre-type kiln supports, with the names llama.cpp accepts for it.
const PRE_TYPES: &[PreType] = &[
    DEFAULT_PRE,
    PreType {
        ignore_merges: true,
        add_bos: true,
        ..PreType::new(
            &[
                "llama3",
                "llama-v3",
                "llama-bpe",
                "falcon3",
                "falcon-h1",
                "pixtral",
                "midm-2.0",
                "lfm2",
                "jina-v5-nano",
            ],
            &[LLAMA3],
        )
    },
    PreType::new(&["dbrx", "smaug-bpe"], &[LLAMA3]),
    PreType {
        no_default_bos: true,
        ..PreType::new(&["glm4", "chatglm-bpe"], &[LLAMA3])
    },
    PreType::new(
        &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
        ],
        &[GPT2],
    ),
    PreType::new(
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "solar-open",
            "grok-2",
        ],
        &[QWEN2],
    ),
    PreType::new(&["qwen35"], &[QWEN35]),
    PreType::new(
        &[
            "starcoder",
            "refact",
            "command-r",
            "smollm",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        &[r"\p{N}", GPT2],
    ),
    PreType::new(
        &["falcon"],
        &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
    ),
    PreType::new(
        &["deepseek-coder"],
        &[
            r"[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            r"[一-龥ࠀ-一가-퟿]+",
            r"\p{N}",
        ],
    ),
    PreType::new(
        &["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"],
        &[r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3],
    ),
    PreType::new(&["poro-chat", "bloom", "gpt3-finnish"], &[BLOOM]),
    PreType::new(&["viking"], &[BLOOM, r"\p{N}"]),
    PreType {
        ignore_merges: true,
        add_bos: true,
        ..PreType::new(&["tekken"], &[TEKKEN])
    },
    PreType::new(
        &["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"],
        &[GPT4O],
    ),
    PreType::new(&["seed-coder"], &[SEED_CODER]),
    PreType::new(&["bailingmoe", "bailingmoe2", "llada-moe"], &[BAILINGMOE]),
    PreType::new(&["ufakzeka"], &[UFAKZEKA]),
    PreType::new(&["exaone-moe"], &[EXAONE_MOE]),
    PreType {
        ignore_merges: true,
        ..PreType::new(&["minicpm5"], &[r"\p{N}{1,3}", MINICPM5])
    },
];

/// The most backtracking steps one regex search may take. fancy-regex's default
/// (one million) could be reached by a pathological whitespace run of a few hundred
/// thousand characters; a search that still exceeds this keeps its piece whole.
const BACKTRACK_LIMIT: usize = 100_000_000;

/// A compiled pre-tokenizer: its split regexes and the flags of its pre-type.
pub(crate) struct PreTokenizer {
    /// The pre-type's name as the metadata gave it ("default" when absent).
    name: String,
    regexes: Vec<Regex>,
    /// See [`PreType::ignore_merges`].
    pub(crate) ignore_merges: bool,
    /// See [`PreType::add_bos`].
    pub(crate) add_bos: bool,
    /// See [`PreType::no_default_bos`].
    pub(crate) no_default_bos: bool,
}

impl std::fmt::Debug for PreTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreTokenizer")
            .field("name", &self.name)
            .field("regexes", &self.regexes.len())
            .finish()
    }
}

impl PreTokenizer {
    /// The pre-tokenizer `tokenizer.ggml.pre` names; `None` is llama.cpp's "default".
    /// An unknown name is [`Error::Unsupported`] listing the supported names.
    pub(crate) fn for_name(name: Option<&str>) -> Result<PreTokenizer> {
        let name = name.unwrap_or("default");
        let pre_type = PRE_TYPES
            .iter()
            .find(|p| p.names.contains(&name))
            .ok_or_else(|| {
                let supported: Vec<&str> = PRE_TYPES
                    .iter()
                    .flat_map(|p| p.names.iter().copied())
                    .collect();
                Error::Unsupported(format!(
                    "pre-tokenizer {name:?} (tokenizer.ggml.pre); kiln supports: {}",
                    supported.join(", ")
                ))
            })?;
        let regexes = pre_type
            .regexes
            .iter()
            .map(|pattern| compile(name, pattern))
            .collect::<Result<Vec<_>>>()?;
        Ok(PreTokenizer {
            name: name.to_owned(),
            regexes,
            ignore_merges: pre_type.ignore_merges,
            add_bos: pre_type.add_bos,
            no_default_bos: pre_type.no_default_bos,
        })
    }

    /// Splits `text` into pre-tokens, in order; their concatenation is `text`.
    pub(crate) fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        for regex in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                split_piece(regex, piece, &mut next);
            }
            pieces = next;
        }
        pieces
    }
}

fn compile(name: &str, pattern: &str) -> Result<Regex> {
    RegexBuilder::new(pattern)
        .backtrack_limit(BACKTRACK_LIMIT)
        .build()
        .map_err(|e| {
            Error::invalid(
                "tokenizer pre-type",
                format!("{name:?}: split regex {pattern:?} does not compile: {e}"),
            )
        })
}

/// Appends to `out` the matches of `regex` in `piece` and the non-empty gaps between
/// them, in order. A search that fails (backtracking limit) keeps the rest whole.
fn split_piece<'t>(regex: &Regex, piece: &'t str, out: &mut Vec<&'t str>) {
    let mut end_of_last = 0;
    for found in regex.find_iter(piece) {
        let Ok(found) = found else { break };
        if found.start() > end_of_last {
            out.push(&piece[end_of_last..found.start()]);
        }
        if found.end() > found.start() {
            out.push(found.as_str());
        }
        end_of_last = found.end();
    }
    if end_of_last < piece.len() {
        out.push(&piece[end_of_last..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pre: &str, text: &str) -> Vec<String> {
        let pre = PreTokenizer::for_name(Some(pre)).unwrap();
        let pieces = pre.split(text);
        assert_eq!(pieces.concat(), text, "pieces must cover the text");
        pieces.into_iter().map(str::to_owned).collect()
    }

    #[test]
    fn every_pre_type_compiles_and_covers_its_input() {
        let text = "Hello, WORLD's 12345 ünï 日本語 🙂\t\n\n  x  ";
        for pre_type in PRE_TYPES {
            for name in pre_type.names {
                let pre = PreTokenizer::for_name(Some(name)).unwrap();
                assert_eq!(pre.split(text).concat(), text, "pre-type {name}");
            }
        }
    }

    #[test]
    fn gpt2_split_keeps_last_space_for_the_next_word() {
        assert_eq!(
            split("gpt-2", "a  b's 12\tc"),
            ["a", " ", " b", "'s", " 12", "\t", "c"]
        );
    }

    #[test]
    fn llama3_groups_digits_by_three_and_qwen2_by_one() {
        assert_eq!(
            split("llama-bpe", "x 1234567"),
            ["x", " ", "123", "456", "7"]
        );
        assert_eq!(split("qwen2", "x 123"), ["x", " ", "1", "2", "3"]);
        assert_eq!(
            split("llama-bpe", "IT'S ok\n\n  next"),
            ["IT", "'S", " ok", "\n\n", " ", " next"]
        );
    }

    #[test]
    fn default_pre_type_applies_its_regexes_in_sequence() {
        // Punctuation runs split first, then words, then digits; a piece already cut
        // by an earlier regex is never rejoined.
        assert_eq!(
            split("default", "a,b 123456"),
            ["a", ",", "b", " ", "123", "456"]
        );
    }

    #[test]
    fn unknown_pre_type_lists_the_supported_ones() {
        let err = PreTokenizer::for_name(Some("no-such-pre")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"no-such-pre\""), "{msg}");
        assert!(msg.contains("llama-bpe") && msg.contains("qwen2"), "{msg}");
    }
}
