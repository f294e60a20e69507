//! Chat messages to a prompt: the model's own chat template (`tokenizer.chat_template`
//! in the GGUF metadata), a Jinja template rendered as llama-server and Hugging Face
//! transformers render it.

use kiln_gguf::Metadata;
use kiln_models::tokenizer::{TokenId, Tokenizer};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;

/// The GGUF metadata key of a model's chat template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// The template of models without their own: ChatML, each message as
/// `<|im_start|>ROLE\nCONTENT<|im_end|>\n`, then `<|im_start|>assistant\n` to prompt
/// the answer.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{%- for message in messages -%}\n\
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\n\
    {%- endfor -%}\n\
    {%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}";

const NAME: &str = "chat_template";

/// One message of a conversation, as a template sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A chat template with the special tokens it is rendered with.
///
/// Rendering follows transformers' `apply_chat_template`, which llama-server
/// imitates: `trim_blocks` and `lstrip_blocks` on, the variables `messages` (each with
/// `role` and `content`), `add_generation_prompt`, `bos_token` and `eos_token`, the
/// function `raise_exception(message)`, and Python's string and dict methods
/// (`.strip()`, `.startswith()`, `.items()` ...).
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    is_default: bool,
}

/// A template that does not parse or that fails to render (`raise_exception` included):
/// the message says where and why.
#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(String);

impl From<minijinja::Error> for TemplateError {
    fn from(e: minijinja::Error) -> Self {
        if e.kind() == ErrorKind::InvalidOperation {
            if let Some(detail) = e.detail() {
                // raise_exception: the template's own message is what a user needs.
                return TemplateError(detail.to_string());
            }
        }
        TemplateError(format!("{e:#}"))
    }
}

impl ChatTemplate {
    /// Parses `source`, to be rendered with `bos_token` and `eos_token`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(NAME, source.to_string())?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            is_default: false,
        })
    }

    /// The template of a model: `tokenizer.chat_template` of its `metadata`, else
    /// [`DEFAULT_CHAT_TEMPLATE`]; the special tokens are `tokenizer`'s BOS and EOS
    /// texts (empty where it has none).
    pub fn from_gguf(metadata: &Metadata, tokenizer: &Tokenizer) -> Result<Self, TemplateError> {
        let text = |id: Option<TokenId>| {
            id.and_then(|id| tokenizer.token_text(id))
                .unwrap_or_default()
                .to_string()
        };
        let (bos, eos) = (text(tokenizer.bos()), text(tokenizer.eos()));
        match metadata.get_str(CHAT_TEMPLATE_KEY) {
            Ok(source) => ChatTemplate::new(source, &bos, &eos),
            Err(_) => {
                let mut template = ChatTemplate::new(DEFAULT_CHAT_TEMPLATE, &bos, &eos)?;
                template.is_default = true;
                Ok(template)
            }
        }
    }

    /// Whether this is [`DEFAULT_CHAT_TEMPLATE`] standing in for a model without one.
    pub fn is_default(&self) -> bool {
        self.is_default
    }

    /// The BOS text the template is rendered with.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The prompt for `messages`, ending with the start of the assistant's answer when
    /// `add_generation_prompt` holds.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template(NAME)?;
        Ok(template.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })?)
    }

    /// The token ids of a rendered prompt, as llama-server tokenizes it: special
    /// tokens written in the text become their ids, and where the tokenizer adds BOS
    /// itself a BOS text the template wrote at the start is dropped, so the prompt
    /// starts with one BOS, not two.
    pub fn encode(&self, tokenizer: &Tokenizer, prompt: &str) -> Vec<TokenId> {
        let prompt = match prompt.strip_prefix(self.bos_token.as_str()) {
            Some(rest) if tokenizer.add_bos() && !self.bos_token.is_empty() => rest,
            _ => prompt,
        };
        tokenizer.encode(prompt, true, true)
    }
}
