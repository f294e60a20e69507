//! kiln's tokenizer against token ids from independent implementations: Hugging
//! Face `tokenizers` (byte-level BPE with the GPT-2, Llama 3 and Qwen2 pre-tokenizers,
//! and the project's shakespeare-tiny tokenizer) and `sentencepiece` (BPE with byte
//! fallback). The fixtures are written by scripts/make_tokenizer_fixtures.py as GGUF
//! tokenizer metadata plus texts and expected ids; see that script for how each
//! side's settings correspond to llama.cpp's.

use kiln_gguf::{Array, Metadata, Value, ValueType};
use kiln_models::tokenizer::{keys, TokenId, TokenType, Tokenizer, TokenizerModel, TokenizerSpec};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture(name: &str) -> Json {
    read_json(
        &manifest_dir()
            .join("tests/fixtures/tokenizer")
            .join(format!("{name}.json")),
    )
}

/// The GGUF value of a fixture's metadata entry, typed as llama.cpp's converter
/// writes it.
fn gguf_value(key: &str, json: &Json) -> Value {
    match json {
        Json::String(s) => Value::String(s.clone()),
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => Value::U32(
            n.as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .expect("token id"),
        ),
        Json::Array(items) => {
            let (item_type, items): (ValueType, Vec<Value>) = match key {
                keys::TOKEN_TYPE => (
                    ValueType::I32,
                    items
                        .iter()
                        .map(|v| Value::I32(v.as_i64().expect("type") as i32))
                        .collect(),
                ),
                keys::SCORES => (
                    ValueType::F32,
                    items
                        .iter()
                        .map(|v| Value::F32(v.as_f64().expect("score") as f32))
                        .collect(),
                ),
                _ => (
                    ValueType::String,
                    items
                        .iter()
                        .map(|v| Value::String(v.as_str().expect("string").to_owned()))
                        .collect(),
                ),
            };
            Value::Array(Array::new(item_type, items).unwrap())
        }
        other => panic!("{key}: unexpected fixture value {other}"),
    }
}

fn tokenizer_from_fixture(fixture: &Json) -> Tokenizer {
    let mut metadata = Metadata::new();
    for (key, value) in fixture["metadata"].as_object().expect("metadata object") {
        metadata.set(key.as_str(), gguf_value(key, value));
    }
    Tokenizer::from_gguf_metadata(&metadata).unwrap()
}

struct Case {
    text: String,
    parse_special: bool,
    ids: Vec<TokenId>,
}

fn cases(fixture: &Json) -> Vec<Case> {
    fixture["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_owned(),
            parse_special: c["parse_special"].as_bool().expect("parse_special"),
            ids: c["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as TokenId)
                .collect(),
        })
        .collect()
}

/// Every case's ids match exactly, and the ids decode back to the text: with
/// `decode` where no control token was parsed, else by concatenating the pieces with
/// special tokens rendered.
fn check_cases(name: &str, tok: &Tokenizer, cases: &[Case]) {
    assert!(cases.len() >= 20, "{name}: only {} cases", cases.len());
    for case in cases {
        let ids = tok.encode(&case.text, false, case.parse_special);
        assert_eq!(
            ids, case.ids,
            "{name}: {:?} (parse_special {})",
            case.text, case.parse_special
        );
        let has_control = ids
            .iter()
            .any(|&id| tok.token_type(id) == Some(TokenType::Control));
        let decoded = if has_control {
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&id| tok.token_to_piece(id, true).to_vec())
                .collect();
            String::from_utf8(bytes).expect("pieces form UTF-8")
        } else {
            tok.decode(&ids)
        };
        assert_eq!(decoded, case.text, "{name}: round trip of {:?}", case.text);
    }
}

fn token(tok: &Tokenizer, text: &str) -> TokenId {
    tok.token_id(text)
        .unwrap_or_else(|| panic!("no token {text:?}"))
}

#[test]
fn gpt2_byte_level_bpe_matches_hf_tokenizers() {
    let fixture = fixture("gpt2");
    let tok = tokenizer_from_fixture(&fixture);
    check_cases("gpt2", &tok, &cases(&fixture));
    // GPT-2 adds no BOS; <|endoftext|> is BOS, EOS and end of generation.
    let eot = token(&tok, "<|endoftext|>");
    assert_eq!(
        tok.encode("Hello world", true, true),
        tok.encode("Hello world", false, true)
    );
    assert_eq!((tok.bos(), tok.eos()), (Some(eot), Some(eot)));
    assert_eq!(tok.eog_tokens(), [eot]);
}

#[test]
fn llama3_byte_level_bpe_matches_hf_tokenizers() {
    let fixture = fixture("llama3");
    let tok = tokenizer_from_fixture(&fixture);
    check_cases("llama3", &tok, &cases(&fixture));
    let bos = token(&tok, "<|begin_of_text|>");
    let mut expected = vec![bos];
    expected.extend(tok.encode("Hello world", false, true));
    assert_eq!(tok.encode("Hello world", true, true), expected);
    let eog = [token(&tok, "<|end_of_text|>"), token(&tok, "<|eot_id|>")];
    assert!(eog.iter().all(|&id| tok.is_eog(id)));
    assert_eq!(tok.eog_tokens().len(), 2);
    assert_eq!(tok.special_ids().eot, Some(eog[1]));
}

#[test]
fn qwen2_byte_level_bpe_matches_hf_tokenizers() {
    let fixture = fixture("qwen2");
    let tok = tokenizer_from_fixture(&fixture);
    check_cases("qwen2", &tok, &cases(&fixture));
    let end = [token(&tok, "<|endoftext|>"), token(&tok, "<|im_end|>")];
    assert!(end.iter().all(|&id| tok.is_eog(id)));
    assert!(!tok.is_eog(token(&tok, "<|im_start|>")));
}

#[test]
fn sentencepiece_bpe_matches_sentencepiece() {
    let fixture = fixture("spm");
    let tok = tokenizer_from_fixture(&fixture);
    let cases = cases(&fixture);
    check_cases("spm", &tok, &cases);
    // Some case exercises byte fallback (byte tokens are ids 3..=258 here).
    let byte = |id: &TokenId| tok.token_type(*id) == Some(TokenType::Byte);
    assert!(cases.iter().any(|c| c.ids.iter().any(byte)));
    // llama.cpp adds BOS by default for SentencePiece vocabularies.
    let text = "Hello world";
    let mut expected = vec![tok.bos().unwrap()];
    expected.extend(tok.encode(text, false, false));
    assert_eq!(tok.encode(text, true, false), expected);
}

/// The shakespeare-tiny tokenizer as llama.cpp's converter stores it: vocabulary,
/// merges, special added tokens as control tokens, the GPT-2 pre-tokenizer.
fn shakespeare_spec(tokenizer_json: &Json) -> TokenizerSpec {
    let model = &tokenizer_json["model"];
    let vocab = model["vocab"].as_object().expect("vocab");
    let mut tokens = vec![String::new(); vocab.len()];
    for (text, id) in vocab {
        tokens[id.as_u64().expect("id") as usize] = text.clone();
    }
    let mut types = vec![TokenType::Normal; tokens.len()];
    for added in tokenizer_json["added_tokens"]
        .as_array()
        .expect("added_tokens")
    {
        let id = added["id"].as_u64().expect("id") as usize;
        let special = added["special"].as_bool().expect("special");
        types[id] = if special {
            TokenType::Control
        } else {
            TokenType::UserDefined
        };
    }
    let merges = model["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .map(|m| match m {
            Json::Array(pair) => format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ),
            other => other.as_str().expect("merge").to_owned(),
        })
        .collect();
    TokenizerSpec {
        token_types: Some(types),
        merges,
        ..TokenizerSpec::new(
            TokenizerModel::ByteLevelBpe {
                pre: Some("gpt-2".into()),
            },
            tokens,
        )
    }
}

#[test]
fn shakespeare_tiny_tokenizer_matches_hf_tokenizers() {
    let fixture = fixture("shakespeare_tiny");
    let model_dir = manifest_dir().join("../../models/shakespeare-tiny");
    let path = model_dir.join("tokenizer.json");
    let raw = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let sha: String = Sha256::digest(&raw)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        sha,
        fixture["tokenizer_json_sha256"].as_str().unwrap(),
        "{} changed: re-run scripts/make_tokenizer_fixtures.py",
        path.display()
    );
    let cases = cases(&fixture);
    let tok = Tokenizer::from_spec(shakespeare_spec(&read_json(&path))).unwrap();
    assert_eq!(tok.vocab_size(), 4096);
    check_cases("shakespeare_tiny", &tok, &cases);

    // The same through kiln convert's metadata, as `kiln generate` loads it.
    let checkpoint = kiln_gguf::convert::HfCheckpoint::open(&model_dir).unwrap();
    let mut metadata = Metadata::new();
    checkpoint.vocab().write_metadata(&mut metadata);
    let converted = Tokenizer::from_gguf_metadata(&metadata).unwrap();
    check_cases("shakespeare_tiny via kiln convert", &converted, &cases);
    let bos = token(&converted, "<|begin_of_text|>");
    assert_eq!(converted.encode("ROMEO:", true, false)[0], bos);
    assert!(converted.is_eog(token(&converted, "<|end_of_text|>")));
}
