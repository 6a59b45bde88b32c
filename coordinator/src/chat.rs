//! Chat templates: turning a list of messages into the prompt text an instruct model expects,
//! by running the model's own Jinja template (GGUF `tokenizer.chat_template`, HF
//! `tokenizer_config.json` or `chat_template.jinja`) with minijinja, configured as
//! transformers' `apply_chat_template` configures jinja2: `trim_blocks`, `lstrip_blocks`,
//! loop controls, and the helpers HF templates call (`raise_exception`, `strftime_now`,
//! Python's string and dict methods, a `tojson` that writes what Python's `json.dumps`
//! writes).
//!
//! A model without a template gets a built-in one chosen by its vocabulary (Gemma's turns,
//! else ChatML), with a warning.
//!
//! [`ChatTemplate::encode`] keeps message text from forging control tokens: when a message
//! holds special-token text (`<|im_end|>` typed by a user), the template is rendered once
//! more with that text replaced by markers, the markers locate it in the prompt, and it is
//! tokenised with special-token parsing off. Otherwise the prompt is tokenised at once,
//! exactly as `apply_chat_template(tokenize=True)`.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use crate::tokenizer::{Tokenizer, TokenizerError};

/// One chat message.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    /// `"system"`, `"user"` or `"assistant"` (any string is passed to the template as given).
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

/// ChatML, for models without a template whose vocabulary has no better-known turns.
const CHATML: &str = "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + \
    message['content'] + '<|im_end|>' + '\n' }}{%- endfor %}\
    {%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}";

/// Gemma 3's template (its `tokenizer_config.json`), for Gemma GGUFs that ship without one.
const GEMMA: &str = include_str!("../templates/gemma3.jinja");

/// Where a template came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateSource {
    /// The model's own.
    Model,
    /// tpi's built-in ChatML (the model has none).
    BuiltinChatMl,
    /// tpi's copy of Gemma 3's (the model has none, and Gemma's turn tokens).
    BuiltinGemma,
}

/// A compiled chat template with the special-token strings it is rendered with.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    origin: TemplateSource,
    bos: String,
    eos: String,
}

/// The work one render may do (minijinja fuel units).
const RENDER_FUEL: u64 = 20_000_000;

/// The private-use marker of untrusted piece `i` (never in real text: it is replaced).
fn marker(i: usize) -> String {
    format!("\u{F8F0}{i}\u{F8F1}")
}

impl ChatTemplate {
    /// The model's template `template`, or a built-in one when it has none: Gemma 3's when
    /// the vocabulary has `<start_of_turn>`, else ChatML when it has `<|im_start|>` and
    /// `<|im_end|>`; otherwise [`TokenizerError::UnsupportedChatTemplate`]. The template is
    /// compiled here, so a syntax error is reported at load.
    pub fn from_jinja(template: Option<&str>, tok: &Tokenizer) -> Result<Self, TokenizerError> {
        let (source, origin) = match template {
            Some(t) => (t.to_string(), TemplateSource::Model),
            None if tok.token_to_id("<start_of_turn>").is_some() => {
                (GEMMA.to_string(), TemplateSource::BuiltinGemma)
            }
            None if tok.token_to_id("<|im_start|>").is_some()
                && tok.token_to_id("<|im_end|>").is_some() =>
            {
                (CHATML.to_string(), TemplateSource::BuiltinChatMl)
            }
            None => {
                return Err(TokenizerError::UnsupportedChatTemplate(
                    "the model has no chat template, and its vocabulary has neither \
                     <start_of_turn> nor <|im_start|>/<|im_end|> for a built-in one"
                        .into(),
                ))
            }
        };
        if origin != TemplateSource::Model {
            tracing::warn!(
                "the model has no chat template; using tpi's built-in {}",
                if origin == TemplateSource::BuiltinGemma {
                    "Gemma 3 template"
                } else {
                    "ChatML"
                }
            );
        }
        let token = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
        let mut t = ChatTemplate::new(
            &source,
            &token(tok.bos_id()),
            &token(tok.eos_ids().first().copied()),
        )?;
        t.origin = origin;
        Ok(t)
    }

    /// A template from its Jinja source, rendered with these `bos_token` and `eos_token`
    /// strings (empty when the model has none); compiled here, so a syntax error shows now.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, TokenizerError> {
        let t = ChatTemplate {
            source: source.to_string(),
            origin: TemplateSource::Model,
            bos: bos.to_string(),
            eos: eos.to_string(),
        };
        t.env()
            .template_from_str(&t.source)
            .map_err(|e| template_error("does not compile", &e))?;
        Ok(t)
    }

    /// Where the template came from.
    pub fn origin(&self) -> TemplateSource {
        self.origin
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn env(&self) -> Environment<'_> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A template is the model author's code: bound its work, so a looping one fails
        // instead of hanging the server (real templates use a few thousand units).
        env.set_fuel(Some(RENDER_FUEL));
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env
    }

    /// Renders `messages` as prompt text; with `add_generation_prompt`, the opening of an
    /// assistant turn is appended so the model continues as the assistant. A template that
    /// raises (roles out of order, say) gives [`TokenizerError::ChatTemplate`].
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let env = self.env();
        let tmpl = env
            .template_from_str(&self.source)
            .map_err(|e| template_error("does not compile", &e))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
            tools => Value::from(()),
            documents => Value::from(()),
        };
        tmpl.render(ctx)
            .map_err(|e| template_error("failed on these messages", &e))
    }

    /// Encodes `messages` as the prompt ids: [`ChatTemplate::render`]'s text, with
    /// special-token text in messages tokenised as plain text (see the module docs).
    pub fn encode(
        &self,
        tok: &Tokenizer,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let text = self.render(messages, add_generation_prompt)?;
        // The pieces that could forge control tokens, replaced by markers.
        let mut risky = Vec::new();
        let masked: Vec<Message> = messages
            .iter()
            .map(|m| {
                let mut mask = |s: &str| {
                    if tok.contains_special_text(s) {
                        risky.push(s.to_string());
                        marker(risky.len() - 1)
                    } else {
                        s.to_string()
                    }
                };
                Message::new(mask(&m.role), mask(&m.content))
            })
            .collect();
        if risky.is_empty() {
            return tok.encode(&text, false);
        }
        let with_markers = self.render(&masked, add_generation_prompt)?;
        // Templates pass message text through as is or trimmed: find which one gives back
        // the real prompt, and so where each piece sits in it.
        for trim in [false, true] {
            let mut spans = Vec::new();
            let mut rebuilt = String::with_capacity(text.len());
            let mut rest = with_markers.as_str();
            while let Some(start) = rest.find('\u{F8F0}') {
                let Some(len) = rest[start..].find('\u{F8F1}') else {
                    break;
                };
                let Ok(i) = rest[start + 3..start + len].parse::<usize>() else {
                    break;
                };
                rebuilt.push_str(&rest[..start]);
                let piece = risky.get(i).map_or("", |s| if trim { s.trim() } else { s });
                spans.push((rebuilt.len(), rebuilt.len() + piece.len()));
                rebuilt.push_str(piece);
                rest = &rest[start + len + 3..];
            }
            rebuilt.push_str(rest);
            if rebuilt != text {
                continue;
            }
            let mut ids = Vec::new();
            let mut at = 0;
            for (s, e) in spans {
                ids.extend(tok.encode(&text[at..s], false)?);
                ids.extend(tok.encode_plain(&text[s..e], false)?);
                at = e;
            }
            ids.extend(tok.encode(&text[at..], false)?);
            return Ok(ids);
        }
        Err(TokenizerError::ChatTemplate(
            "a message contains special-token text that the template transforms, so it \
             cannot be kept from acting as control tokens; remove it from the message"
                .into(),
        ))
    }
}

fn template_error(what: &str, e: &Error) -> TokenizerError {
    let mut msg = format!("the chat template {what}: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    TokenizerError::ChatTemplate(msg)
}

/// HF templates' `raise_exception(message)`: fails the render with the template's message.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// HF templates' `strftime_now(format)`: the local time in Python's `strftime` format.
fn strftime_now(format: String) -> Result<Value, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: bad format {format:?}"),
        )
    })?;
    Ok(Value::from(out))
}

/// `tojson` as transformers defines it: Python's `json.dumps(value, ensure_ascii=False,
/// indent=indent)` (", " and ": " separators on one line; newlines and `indent` spaces with
/// an indent), not minijinja's HTML-safe variant.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(Value::from(out))
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    depth: usize,
) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&v.to_string()),
        ValueKind::String => out.push_str(
            &serde_json::to_string(v.as_str().unwrap_or_default())
                .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                write_json(out, x, indent, depth + 1)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                write_json(out, &Value::from(k.to_string()), indent, depth + 1)?;
                out.push_str(": ");
                write_json(out, &v.get_item(k)?, indent, depth + 1)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialise a {}", v.kind()),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        let v = Value::from_serialize(serde_json::json!({"a": [1, "é\"<x>"], "b": null}));
        let render = |src: &str| {
            env.render_str(src, minijinja::context! { v => &v })
                .unwrap()
        };
        assert_eq!(
            render("{{ v | tojson }}"),
            r#"{"a": [1, "é\"<x>"], "b": null}"#
        );
        assert_eq!(
            render("{{ v | tojson(indent=2) }}"),
            "{\n  \"a\": [\n    1,\n    \"é\\\"<x>\"\n  ],\n  \"b\": null\n}"
        );
        assert_eq!(render("{{ [] | tojson }}|{{ {} | tojson(2) }}"), "[]|{}");
    }
}
