//! Special token roles and the end-of-generation set, found as llama.cpp finds them:
//! from the ids the metadata names, else from well-known token texts.

use super::vocab::Vocab;
use super::{SpecialTokenIds, TokenId, TokenType};
use std::collections::BTreeSet;

/// Texts of end-of-turn tokens, in the order they are tried.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// Texts of tokens that end generation.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Fills each role the metadata left unset (end of turn, end of message, the six
/// fill-in-the-middle roles) with the first token of its well-known texts that the
/// vocabulary has, and makes such a token a control token.
pub(crate) fn detect_roles(vocab: &mut Vocab, ids: &mut SpecialTokenIds) {
    let roles: [(&mut Option<TokenId>, &[&str]); 8] = [
        (&mut ids.eot, EOT_TEXTS),
        (&mut ids.eom, EOM_TEXTS),
        (&mut ids.fim_pre, FIM_PRE_TEXTS),
        (&mut ids.fim_suf, FIM_SUF_TEXTS),
        (&mut ids.fim_mid, FIM_MID_TEXTS),
        (&mut ids.fim_pad, FIM_PAD_TEXTS),
        (&mut ids.fim_rep, FIM_REP_TEXTS),
        (&mut ids.fim_sep, FIM_SEP_TEXTS),
    ];
    for (role, texts) in roles {
        if role.is_some() {
            continue;
        }
        *role = texts.iter().find_map(|t| vocab.id(t));
        if let Some(id) = *role {
            vocab.set_type(id, TokenType::Control);
        }
    }
}

/// The ids that end generation, ascending: the fill-in-the-middle pad, repo and
/// separator tokens, every token with a text of [`EOG_TEXTS`] (made a control
/// token), EOS, EOT and EOM; then llama.cpp's two corrections: `<|end|>` is not one
/// (and becomes user-defined) when `<|return|>` or `<|flush|>` and `<|call|>` or
/// `<|calls|>` are, and `</s>` is not one (and becomes normal) when
/// `<|tool_response>` is.
pub(crate) fn end_of_generation(vocab: &mut Vocab, ids: &SpecialTokenIds) -> Vec<TokenId> {
    let mut eog: BTreeSet<TokenId> = [ids.fim_pad, ids.fim_rep, ids.fim_sep]
        .into_iter()
        .flatten()
        .collect();
    let by_text: Vec<TokenId> = EOG_TEXTS.iter().filter_map(|t| vocab.id(t)).collect();
    for id in by_text {
        eog.insert(id);
        vocab.set_type(id, TokenType::Control);
    }
    eog.extend([ids.eos, ids.eot, ids.eom].into_iter().flatten());

    let member = |eog: &BTreeSet<TokenId>, text: &str| vocab.id(text).filter(|id| eog.contains(id));
    let has = |eog: &BTreeSet<TokenId>, text: &str| member(eog, text).is_some();
    let has_call = has(&eog, "<|call|>") || has(&eog, "<|calls|>");
    let end_is_not_eog = has_call && (has(&eog, "<|return|>") || has(&eog, "<|flush|>"));
    let demoted_end = member(&eog, "<|end|>").filter(|_| end_is_not_eog);
    let demoted_s = member(&eog, "</s>").filter(|_| has(&eog, "<|tool_response>"));
    if let Some(end) = demoted_end {
        eog.remove(&end);
        vocab.set_type(end, TokenType::UserDefined);
    }
    if let Some(s) = demoted_s {
        eog.remove(&s);
        vocab.set_type(s, TokenType::Normal);
    }
    eog.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(texts: &[&str]) -> Vocab {
        Vocab::new(texts.iter().map(|t| t.to_string()).collect(), None, None).unwrap()
    }

    #[test]
    fn chat_end_tokens_are_found_by_text_and_made_control() {
        let mut v = vocab(&[
            "a",
            "<|im_start|>",
            "<|im_end|>",
            "<|endoftext|>",
            "<|fim_pad|>",
        ]);
        let mut ids = SpecialTokenIds {
            eos: Some(3),
            ..SpecialTokenIds::default()
        };
        detect_roles(&mut v, &mut ids);
        assert_eq!(ids.eot, Some(2), "<|im_end|> comes before <|endoftext|>");
        assert_eq!(ids.fim_pad, Some(4));
        assert_eq!(end_of_generation(&mut v, &ids), [2, 3, 4]);
        assert_eq!(v.token_type(2), Some(TokenType::Control));
        assert_eq!(v.token_type(1), Some(TokenType::Normal), "not an end token");
    }

    #[test]
    fn harmony_end_token_is_not_end_of_generation() {
        let mut v = vocab(&["x", "<|end|>", "<|return|>", "<|call|>"]);
        let ids = SpecialTokenIds::default();
        assert_eq!(end_of_generation(&mut v, &ids), [2, 3]);
        assert_eq!(v.token_type(1), Some(TokenType::UserDefined));
    }

    #[test]
    fn roles_named_by_metadata_are_kept() {
        let mut v = vocab(&["<|eot_id|>", "<turn_end>"]);
        let mut ids = SpecialTokenIds {
            eot: Some(1),
            ..SpecialTokenIds::default()
        };
        detect_roles(&mut v, &mut ids);
        assert_eq!(ids.eot, Some(1));
        assert_eq!(
            v.token_type(1),
            Some(TokenType::Normal),
            "named, not detected"
        );
        assert_eq!(end_of_generation(&mut v, &ids), [0, 1]);
    }
}
