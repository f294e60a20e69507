//! Hand-built vocabularies with hand-derived expected ids: BOS/EOS, special-token
//! parsing, SentencePiece space prefix and byte fallback, decoding, streaming, and
//! reading GGUF metadata.

use super::*;
use kiln_gguf::Metadata;

fn strings(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|t| t.to_string()).collect()
}

/// A byte-level BPE vocabulary (GPT-2 pre-tokenizer) with merges "h i" and "Ġ hi".
fn bpe_spec() -> TokenizerSpec {
    let tokens = [
        "<s>",        // 0 control
        "</s>",       // 1 control
        "<|im_end|>", // 2 control
        "<tool>",     // 3 user-defined
        "h",          // 4
        "i",          // 5
        "Ġ",          // 6
        "hi",         // 7
        "Ġhi",        // 8
        "<",          // 9
        ">",          // 10
        "s",          // 11
        "|",          // 12
        "m",          // 13
        "_",          // 14
        "e",          // 15
        "n",          // 16
        "d",          // 17
    ];
    let mut types = vec![TokenType::Normal; tokens.len()];
    types[..3].fill(TokenType::Control);
    types[3] = TokenType::UserDefined;
    TokenizerSpec {
        token_types: Some(types),
        merges: strings(&["h i", "Ġ hi"]),
        special_ids: SpecialTokenIds {
            bos: Some(0),
            eos: Some(1),
            ..SpecialTokenIds::default()
        },
        ..TokenizerSpec::new(
            TokenizerModel::ByteLevelBpe {
                pre: Some("gpt-2".into()),
            },
            strings(&tokens),
        )
    }
}

fn bpe() -> Tokenizer {
    Tokenizer::from_spec(bpe_spec()).unwrap()
}

#[test]
fn bpe_adds_bos_and_eos_only_when_asked_and_configured() {
    let spec = TokenizerSpec {
        add_bos: Some(true),
        add_eos: Some(true),
        ..bpe_spec()
    };
    let tok = Tokenizer::from_spec(spec).unwrap();
    assert_eq!(tok.encode("hi hi", false, false), [7, 8]);
    assert_eq!(tok.encode("hi hi", true, false), [0, 7, 8, 1]);
    assert_eq!(tok.encode("", true, false), [0, 1]);
    // Byte-level BPE with the GPT-2 pre-type adds nothing by default.
    assert_eq!(bpe().encode("hi", true, false), [7]);
}

#[test]
fn control_tokens_are_parsed_only_when_asked() {
    let tok = bpe();
    assert_eq!(tok.encode("hi<|im_end|>", false, true), [7, 2]);
    // As text: "hi" | "<|" | "im" | "_" | "end" | "|>" (GPT-2 split), no merges
    // apply except "h i".
    assert_eq!(
        tok.encode("hi<|im_end|>", false, false),
        [7, 9, 12, 5, 13, 14, 15, 16, 17, 12, 10]
    );
    assert_eq!(tok.encode("<s>hi", true, true), [0, 7]);
}

#[test]
fn user_defined_tokens_are_always_cut_out() {
    let tok = bpe();
    assert_eq!(tok.encode("hi<tool>hi", false, false), [7, 3, 7]);
    assert_eq!(tok.encode("<tool><tool>", false, true), [3, 3]);
}

#[test]
fn longer_special_tokens_are_cut_first() {
    // "<a>" and "<a>b" are both user-defined; "<a>b" wins where both match, and
    // "<a>" is found in what remains.
    let tokens = ["<a>", "<a>b", "x"];
    let types = vec![
        TokenType::UserDefined,
        TokenType::UserDefined,
        TokenType::Normal,
    ];
    let spec = TokenizerSpec {
        token_types: Some(types),
        ..TokenizerSpec::new(
            TokenizerModel::ByteLevelBpe {
                pre: Some("gpt-2".into()),
            },
            strings(&tokens),
        )
    };
    let tok = Tokenizer::from_spec(spec).unwrap();
    assert_eq!(tok.encode("x<a>bx<a>x", false, false), [2, 1, 2, 0, 2]);
}

#[test]
fn decode_renders_user_defined_but_not_control_tokens() {
    let tok = bpe();
    assert_eq!(tok.decode(&[0, 7, 8, 3, 2, 1]), "hi hi<tool>");
    assert_eq!(tok.token_to_piece(2, true), b"<|im_end|>");
    assert_eq!(tok.token_to_piece(2, false), b"");
    assert_eq!(tok.token_to_piece(8, false), b" hi");
    assert_eq!(
        tok.token_to_piece(1000, true),
        b"",
        "out of range renders nothing"
    );
}

#[test]
fn end_of_generation_covers_eos_and_chat_end_tokens() {
    let tok = bpe();
    assert!(tok.is_eog(1), "EOS");
    assert!(tok.is_eog(2), "<|im_end|>");
    assert!(!tok.is_eog(0), "BOS");
    assert!(!tok.is_eog(7));
    assert_eq!(tok.special_ids().eot, Some(2));
    assert_eq!(tok.eog_tokens(), [1, 2]);
}

#[test]
fn adding_bos_without_a_bos_id_is_an_error() {
    let spec = TokenizerSpec {
        add_bos: Some(true),
        special_ids: SpecialTokenIds {
            bos: Some(99),
            ..SpecialTokenIds::default()
        },
        ..bpe_spec()
    };
    // 99 is out of range and the BPE default (11) is the normal token "s": llama.cpp
    // keeps the default.
    assert_eq!(Tokenizer::from_spec(spec).unwrap().bos(), Some(11));
    let spec = TokenizerSpec {
        add_bos: Some(true),
        tokens: strings(&["a", "b"]),
        token_types: None,
        special_ids: SpecialTokenIds::default(),
        ..bpe_spec()
    };
    let err = Tokenizer::from_spec(spec).unwrap_err().to_string();
    assert!(
        err.contains(keys::ADD_BOS) && err.contains(keys::BOS_ID),
        "{err}"
    );
}

#[test]
fn tokenizer_is_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    let tok = bpe();
    let ids = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| s.spawn(|| tok.encode("hi hi", false, false)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(ids, [vec![7, 8], vec![7, 8]]);
}

#[test]
fn repeated_token_is_an_error() {
    let spec = TokenizerSpec::new(TokenizerModel::SentencePiece, strings(&["<unk>", "a", "a"]));
    let err = Tokenizer::from_spec(spec).unwrap_err().to_string();
    assert!(
        err.contains("\"a\"") && err.contains("ids 1 and 2"),
        "{err}"
    );
}

/// A SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the byte tokens of '\n' and
/// of '€' (E2 82 AC), and pieces around "hi" (▁hi scores highest).
fn spm_spec() -> TokenizerSpec {
    let pieces: [(&str, f32, TokenType); 13] = [
        ("<unk>", 0.0, TokenType::Unknown), // 0
        ("<s>", 0.0, TokenType::Control),   // 1
        ("</s>", 0.0, TokenType::Control),  // 2
        ("<0x0A>", 0.0, TokenType::Byte),   // 3
        ("<0xE2>", 0.0, TokenType::Byte),   // 4
        ("<0x82>", 0.0, TokenType::Byte),   // 5
        ("<0xAC>", 0.0, TokenType::Byte),   // 6
        ("▁", -1.0, TokenType::Normal),     // 7
        ("h", -2.0, TokenType::Normal),     // 8
        ("i", -3.0, TokenType::Normal),     // 9
        ("hi", -5.0, TokenType::Normal),    // 10
        ("▁h", -4.0, TokenType::Normal),    // 11
        ("▁hi", -4.5, TokenType::Normal),   // 12
    ];
    TokenizerSpec {
        token_types: Some(pieces.iter().map(|p| p.2).collect()),
        scores: Some(pieces.iter().map(|p| p.1).collect()),
        ..TokenizerSpec::new(
            TokenizerModel::SentencePiece,
            pieces.iter().map(|p| p.0.to_string()).collect(),
        )
    }
}

#[test]
fn sentencepiece_prefixes_a_space_and_adds_bos_by_default() {
    let tok = Tokenizer::from_spec(spm_spec()).unwrap();
    // "▁hi": "▁h" (-4) merges before "hi" (-5), then "▁h"+"i" makes "▁hi".
    assert_eq!(tok.encode("hi", true, false), [1, 12]);
    assert_eq!(tok.encode("hi hi", false, false), [12, 12]);
    // After a special token the next text gets a space prefix again.
    assert_eq!(tok.encode("hi</s>hi", false, true), [12, 2, 12]);
    // Unparsed, "</s>" is text: no pieces, no byte tokens for its characters, so the
    // unknown token stands for each of its bytes.
    assert_eq!(tok.encode("</s>", false, false), [7, 0, 0, 0, 0]);
    let no_prefix = TokenizerSpec {
        add_space_prefix: Some(false),
        ..spm_spec()
    };
    let tok = Tokenizer::from_spec(no_prefix).unwrap();
    assert_eq!(tok.encode("hi", false, false), [10]);
}

#[test]
fn sentencepiece_falls_back_to_byte_tokens() {
    let tok = Tokenizer::from_spec(spm_spec()).unwrap();
    assert_eq!(tok.encode("hi\n€", false, false), [12, 3, 4, 5, 6]);
    assert_eq!(tok.decode(&[12, 3, 4, 5, 6]), "hi\n€");
}

#[test]
fn sentencepiece_decode_drops_the_prefix_space_of_the_first_token_only() {
    let tok = Tokenizer::from_spec(spm_spec()).unwrap();
    assert_eq!(tok.decode(&[12, 12]), "hi hi");
    // As llama_detokenize: a leading BOS takes the place of the first token, so the
    // space of "▁hi" stays.
    assert_eq!(tok.decode(&[1, 12]), " hi");
}

#[test]
fn stream_decoder_waits_for_complete_characters() {
    let tok = Tokenizer::from_spec(spm_spec()).unwrap();
    let mut stream = tok.stream_decoder(false);
    assert_eq!(stream.push(12).as_deref(), Some(" hi"));
    assert_eq!(stream.push(4), None);
    assert_eq!(stream.push(5), None);
    assert_eq!(stream.push(6).as_deref(), Some("€"));
    assert_eq!(stream.push(2), None, "control token renders nothing");
    // A continuation byte without a lead byte can never complete: emitted at once.
    assert_eq!(stream.push(5).as_deref(), Some("\u{FFFD}"));
    assert_eq!(stream.push(4), None);
    assert_eq!(stream.flush().as_deref(), Some("\u{FFFD}"));
    assert_eq!(stream.flush(), None);
    let mut special = tok.stream_decoder(true);
    assert_eq!(special.push(2).as_deref(), Some("</s>"));
}

fn gguf_bpe_metadata() -> Metadata {
    let spec = bpe_spec();
    let mut m = Metadata::new();
    m.set(keys::MODEL, "gpt2");
    m.set(keys::PRE, "gpt-2");
    m.set(keys::TOKENS, spec.tokens.clone());
    let types: Vec<i32> = spec
        .token_types
        .unwrap()
        .iter()
        .map(|t| match t {
            TokenType::Control => 3,
            TokenType::UserDefined => 4,
            _ => 1,
        })
        .collect();
    m.set(keys::TOKEN_TYPE, types);
    m.set(keys::MERGES, spec.merges.clone());
    m.set(keys::BOS_ID, 0u32);
    m.set(keys::EOS_ID, 1u32);
    m.set(keys::ADD_BOS, true);
    m
}

#[test]
fn gguf_metadata_builds_the_same_tokenizer() {
    let tok = Tokenizer::from_gguf_metadata(&gguf_bpe_metadata()).unwrap();
    assert_eq!(tok.vocab_size(), 18);
    assert_eq!(tok.encode("hi hi<|im_end|>", true, true), [0, 7, 8, 2]);
    assert_eq!(tok.token_type(3), Some(TokenType::UserDefined));
}

#[test]
fn gguf_metadata_errors_name_the_key() {
    let mut m = gguf_bpe_metadata();
    m.set(keys::MODEL, "bert");
    let err = Tokenizer::from_gguf_metadata(&m).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("\"bert\"") && msg.contains("gpt2") && msg.contains("llama"),
        "{msg}"
    );

    let mut m = gguf_bpe_metadata();
    m.set(keys::PRE, "no-such-pre");
    let msg = Tokenizer::from_gguf_metadata(&m).unwrap_err().to_string();
    assert!(
        msg.contains("no-such-pre") && msg.contains(keys::PRE),
        "{msg}"
    );

    let mut m = gguf_bpe_metadata();
    m.set(keys::TOKEN_TYPE, vec![1i32, 1]);
    let msg = Tokenizer::from_gguf_metadata(&m).unwrap_err().to_string();
    assert!(msg.contains("2 entries for 18 tokens"), "{msg}");

    let mut m = gguf_bpe_metadata();
    m.set(keys::MERGES, vec![1u32, 2]);
    let msg = Tokenizer::from_gguf_metadata(&m).unwrap_err().to_string();
    assert!(
        msg.contains(keys::MERGES) && msg.contains("item 0 is a u32"),
        "{msg}"
    );

    let without_merges: Metadata = {
        let mut m = Metadata::new();
        for (k, v) in gguf_bpe_metadata()
            .iter()
            .filter(|(k, _)| *k != keys::MERGES)
        {
            m.set(k, v.clone());
        }
        m
    };
    let msg = Tokenizer::from_gguf_metadata(&without_merges)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(keys::MERGES) && msg.contains("missing"),
        "{msg}"
    );
}
