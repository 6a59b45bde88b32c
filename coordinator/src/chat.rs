//! Chat templates: turning a list of messages into the prompt text an instruct model expects.
//!
//! No Jinja engine is embedded. [`ChatTemplate::from_jinja`] recognises the template family from
//! the model's Jinja source and renders it natively:
//!
//! * **ChatML** (the source contains `<|im_start|>`; SmolLM2, Qwen2, ...):
//!   `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then `<|im_start|>assistant\n` when a
//!   generation prompt is asked for. If the template writes a fixed system turn
//!   (`<|im_start|>system\n<literal text><|im_end|>`), that text is the default system prompt,
//!   inserted when the first message is not a system message (SmolLM2 inserts
//!   "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
//! * **Llama 3** (the source contains `<|start_header_id|>`): `<|begin_of_text|>` then
//!   `<|start_header_id|>{role}<|end_header_id|>\n\n{content.trim()}<|eot_id|>` per message, then
//!   `<|start_header_id|>assistant<|end_header_id|>\n\n`. This is Llama-3.0's template; the 3.1+
//!   "Cutting Knowledge Date" system header and tool calling are not reproduced.
//!
//! Fallback: when there is no template, or it is not recognised, plain ChatML (no default system
//! prompt) is used if the vocabulary has `<|im_start|>` and `<|im_end|>`; otherwise it is an error
//! ([`TokenizerError::UnsupportedChatTemplate`]).
//!
//! The rendered text contains the special tokens (and BOS for Llama 3) literally. Encode it with
//! [`ChatTemplate::encode`]: the template's own text is tokenised with special tokens parsed,
//! message roles and contents with special-token parsing off, so `<|im_end|>` typed by a user
//! stays text and cannot forge a system or assistant turn.

use crate::tokenizer::{Tokenizer, TokenizerError};

/// A piece of rendered prompt: the template's own text (trusted: its special tokens are
/// meant), or text that came from a message (untrusted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// The text.
    pub text: String,
    /// Whether it came from a message's role or content.
    pub untrusted: bool,
}

/// One chat message.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    /// `"system"`, `"user"` or `"assistant"` (any string is rendered as given).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The template family a [`ChatTemplate`] renders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateKind {
    /// ChatML, with an optional default system prompt.
    ChatMl {
        /// Inserted as a system turn when the first message is not a system message.
        default_system: Option<String>,
    },
    /// Llama-3 header format; `bos` is written at the start of the prompt.
    Llama3 {
        /// The BOS text (`<|begin_of_text|>`).
        bos: String,
    },
}

/// Renders chat messages as a model's prompt (see the module docs for the supported families).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTemplate {
    kind: TemplateKind,
}

/// Un-escapes the few escapes a Jinja string literal uses.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(o) => out.push(o),
            None => out.push('\\'),
        }
    }
    out
}

/// The literal default system prompt of a ChatML template: the text of a
/// `<|im_start|>system\n...<|im_end|>` turn written out in full inside a string literal.
fn chatml_default_system(template: &str) -> Option<String> {
    const START: &str = "<|im_start|>system";
    let mut rest = template;
    while let Some(pos) = rest.find(START) {
        rest = &rest[pos + START.len()..];
        let body = rest
            .strip_prefix("\\n")
            .or_else(|| rest.strip_prefix('\n'))
            .unwrap_or(rest);
        let Some(end) = body.find("<|im_end|>") else {
            break;
        };
        let text = &body[..end];
        // A template expression (`' + message['content'] + '`, `{{ .. }}`) is not a literal.
        let literal = !text.is_empty()
            && !text.contains("{{")
            && !text.contains("{%")
            && !text.contains("' +")
            && !text.contains("\" +")
            && !text.contains("+ '")
            && !text.contains("+ \"");
        if literal {
            return Some(unescape(text));
        }
    }
    None
}

impl ChatTemplate {
    /// Picks the template from the model's Jinja template string (GGUF `tokenizer.chat_template`
    /// or `tokenizer_config.json`'s `chat_template`): ChatML if it contains `<|im_start|>`
    /// (with the default system prompt it injects, if any), Llama 3 if it contains
    /// `<|start_header_id|>`. Unknown or missing template: plain ChatML if `tok` has
    /// `<|im_start|>` and `<|im_end|>`, else [`TokenizerError::UnsupportedChatTemplate`].
    pub fn from_jinja(template: Option<&str>, tok: &Tokenizer) -> Result<Self, TokenizerError> {
        if let Some(t) = template {
            if t.contains("<|im_start|>") {
                return Ok(Self::chatml(chatml_default_system(t)));
            }
            if t.contains("<|start_header_id|>") {
                let bos = tok
                    .bos_id()
                    .and_then(|id| tok.id_to_token(id))
                    .unwrap_or_else(|| "<|begin_of_text|>".to_string());
                return Ok(ChatTemplate {
                    kind: TemplateKind::Llama3 { bos },
                });
            }
        }
        if tok.token_to_id("<|im_start|>").is_some() && tok.token_to_id("<|im_end|>").is_some() {
            return Ok(Self::chatml(None));
        }
        Err(TokenizerError::UnsupportedChatTemplate(match template {
            None => "the model has no chat template and its vocabulary has no <|im_start|>".into(),
            Some(t) => format!(
                "not ChatML or Llama 3, and the vocabulary has no <|im_start|>: {:?}",
                t.chars().take(120).collect::<String>()
            ),
        }))
    }

    /// A ChatML template with the given default system prompt.
    pub fn chatml(default_system: Option<String>) -> Self {
        ChatTemplate {
            kind: TemplateKind::ChatMl { default_system },
        }
    }

    /// The template family and its parameters.
    pub fn kind(&self) -> &TemplateKind {
        &self.kind
    }

    /// Renders `messages` as prompt text; with `add_generation_prompt`, the opening of an
    /// assistant turn is appended so the model continues as the assistant.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        self.render_parts(messages, add_generation_prompt)
            .into_iter()
            .map(|p| p.text)
            .collect()
    }

    /// Encodes `messages` as the prompt ids: [`ChatTemplate::render`]'s text, tokenised
    /// with special tokens parsed only in the template's own text. When no message holds
    /// special-token text, that is the whole prompt tokenised at once, exactly as
    /// transformers' `apply_chat_template(tokenize=True)`; otherwise each piece is
    /// tokenised on its own, the messages' with parsing off.
    pub fn encode(
        &self,
        tok: &Tokenizer,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let parts = self.render_parts(messages, add_generation_prompt);
        if !parts
            .iter()
            .any(|p| p.untrusted && tok.contains_special_text(&p.text))
        {
            let text: String = parts.into_iter().map(|p| p.text).collect();
            return tok.encode(&text, false);
        }
        let mut ids = Vec::new();
        for p in &parts {
            if p.untrusted {
                ids.extend(tok.encode_plain(&p.text, false)?);
            } else {
                ids.extend(tok.encode(&p.text, false)?);
            }
        }
        Ok(ids)
    }

    /// The rendered prompt as trusted template text and untrusted message text.
    pub fn render_parts(&self, messages: &[Message], add_generation_prompt: bool) -> Vec<Part> {
        let mut out = Vec::new();
        let lit = |out: &mut Vec<Part>, s: &str| {
            out.push(Part {
                text: s.to_string(),
                untrusted: false,
            })
        };
        let user = |out: &mut Vec<Part>, s: &str| {
            out.push(Part {
                text: s.to_string(),
                untrusted: true,
            })
        };
        match &self.kind {
            TemplateKind::ChatMl { default_system } => {
                if let (Some(first), Some(sys)) = (messages.first(), default_system) {
                    if first.role != "system" {
                        lit(&mut out, &format!("<|im_start|>system\n{sys}<|im_end|>\n"));
                    }
                }
                for m in messages {
                    lit(&mut out, "<|im_start|>");
                    user(&mut out, &m.role);
                    lit(&mut out, "\n");
                    user(&mut out, &m.content);
                    lit(&mut out, "<|im_end|>\n");
                }
                if add_generation_prompt {
                    lit(&mut out, "<|im_start|>assistant\n");
                }
            }
            TemplateKind::Llama3 { bos } => {
                lit(&mut out, bos);
                for m in messages {
                    lit(&mut out, "<|start_header_id|>");
                    user(&mut out, &m.role);
                    lit(&mut out, "<|end_header_id|>\n\n");
                    user(&mut out, m.content.trim());
                    lit(&mut out, "<|eot_id|>");
                }
                if add_generation_prompt {
                    lit(
                        &mut out,
                        "<|start_header_id|>assistant<|end_header_id|>\n\n",
                    );
                }
            }
        }
        out
    }
}
