//! Chat templates rendered as llama-server and transformers render them: real
//! Llama-3, Mistral and ChatML (Qwen-style) templates against the renderings
//! llama.cpp's tests list for the same conversation; `raise_exception`; the default
//! template; BOS handling when the rendered prompt is tokenized.

mod common;

use kiln_gguf::Metadata;
use kiln_serve::chat::{ChatMessage, ChatTemplate, CHAT_TEMPLATE_KEY, DEFAULT_CHAT_TEMPLATE};

/// llama.cpp's test conversation (tests/test-chat-template.cpp).
fn conversation() -> Vec<ChatMessage> {
    [
        ("system", "You are a helpful assistant"),
        ("user", "Hello"),
        ("assistant", "Hi there"),
        ("user", "Who are you"),
        ("assistant", "   I am an assistant   "),
        ("user", "Another question"),
    ]
    .into_iter()
    .map(|(role, content)| ChatMessage::new(role, content))
    .collect()
}

fn render(source: &str, bos: &str, eos: &str) -> String {
    ChatTemplate::new(source, bos, eos)
        .unwrap()
        .render(&conversation(), true)
        .unwrap()
}

/// Meta-Llama-3-8B-Instruct's template.
const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

#[test]
fn llama3() {
    let want = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnother question<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
    assert_eq!(render(LLAMA3, "<|begin_of_text|>", "<|eot_id|>"), want);
}

/// teknium/OpenHermes-2.5-Mistral-7B's ChatML template, the format of Qwen's.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const CHATML_RENDERED: &str = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother question<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn chatml_and_the_default_template() {
    assert_eq!(render(CHATML, "", ""), CHATML_RENDERED);
    assert_eq!(
        render(DEFAULT_CHAT_TEMPLATE, "<s>", "</s>"),
        CHATML_RENDERED
    );
}

#[test]
fn mistral_v1_with_a_system_message() {
    let source = include_str!("templates/mistral-7b-instruct-v0.2-v1.jinja");
    let want = " [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s> [INST] Who are you [/INST]    I am an assistant   </s> [INST] Another question [/INST]";
    assert_eq!(render(source, "", "</s>"), want);
}

#[test]
fn mistral_v3_namespaces_selectattr_and_python_methods() {
    let source = include_str!("templates/mistral-large-instruct-2407-v3.jinja");
    let want = "[INST] Hello[/INST] Hi there</s>[INST] Who are you[/INST] I am an assistant</s>[INST] You are a helpful assistant\n\nAnother question[/INST]";
    assert_eq!(render(source, "", "</s>"), want);
}

#[test]
fn raise_exception_is_an_error_with_the_templates_message() {
    let source = include_str!("templates/mistral-7b-instruct-v0.2-v1.jinja");
    let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
    let messages = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
    let err = template.render(&messages, true).unwrap_err().to_string();
    assert!(err.contains("conversation roles must alternate"), "{err}");
}

#[test]
fn a_template_that_does_not_parse_is_an_error() {
    let err = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
    assert!(err.to_string().contains("chat template"), "{err}");
}

#[test]
fn the_gguf_template_is_used_and_chatml_stands_in_for_none() {
    let tokenizer = common::tokenizer();
    let mut metadata = Metadata::new();
    let plain = ChatTemplate::from_gguf(&metadata, &tokenizer).unwrap();
    assert!(plain.is_default());
    assert_eq!(plain.bos_token(), "<s>");
    metadata.set(
        CHAT_TEMPLATE_KEY,
        "{{ bos_token }}[{{ messages[0].content }}]",
    );
    let own = ChatTemplate::from_gguf(&metadata, &tokenizer).unwrap();
    assert!(!own.is_default());
    let rendered = own.render(&[ChatMessage::new("user", "hi")], true).unwrap();
    assert_eq!(rendered, "<s>[hi]");
}

#[test]
fn a_bos_the_template_writes_is_not_doubled() {
    use common::{letter, BOS};
    let tokenizer = common::tokenizer();
    let template = ChatTemplate::new("{{ bos_token }}ab", "<s>", "</s>").unwrap();
    let text = template.render(&[], true).unwrap();
    assert_eq!(text, "<s>ab");
    assert_eq!(
        template.encode(&tokenizer, &text),
        [BOS, letter('a'), letter('b')]
    );
    // Without a BOS in the text, the tokenizer still adds its own.
    assert_eq!(
        template.encode(&tokenizer, "ab"),
        [BOS, letter('a'), letter('b')]
    );
}
