//! Request validation: a chat or completion request becomes a [`Prepared`] generation,
//! or an OpenAI-style error naming the field at fault.

use super::*;
use crate::tokenizer::TokenizerError;

/// A validated generation, ready to queue.
pub(super) struct Prepared {
    pub(super) prompt_ids: Vec<u32>,
    pub(super) max_tokens: usize,
    pub(super) sampler: SamplerConfig,
    pub(super) ignore_eos: bool,
    pub(super) stop: Vec<String>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    /// Alternatives per token when log probabilities were asked for.
    pub(super) logprobs: Option<usize>,
}

/// The log probabilities a request asks for: chat's `logprobs: true` with
/// `top_logprobs` 0–20, or the completions endpoint's `logprobs` 0–5 (OpenAI's ranges).
fn logprobs_wanted(c: &CommonParams, chat: bool) -> Result<Option<usize>, ApiError> {
    use serde_json::Value as V;
    let int = |field: &str, v: &V, max: u64| match v.as_u64() {
        Some(n) if n <= max => Ok(n as usize),
        _ => Err(ApiError::invalid(
            format!("{field} must be an integer from 0 to {max}, got {v}"),
            Some(field),
        )),
    };
    let top = match &c.top_logprobs {
        None | Some(V::Null) => None,
        Some(v) => Some(int("top_logprobs", v, 20)?),
    };
    if chat {
        let on = match &c.logprobs {
            None | Some(V::Null) => false,
            Some(V::Bool(b)) => *b,
            Some(v) => {
                return Err(ApiError::invalid(
                    format!("logprobs must be true or false, got {v}"),
                    Some("logprobs"),
                ))
            }
        };
        if top.is_some() && !on {
            return Err(ApiError::invalid(
                "top_logprobs needs logprobs: true",
                Some("top_logprobs"),
            ));
        }
        Ok(on.then_some(top.unwrap_or(0)))
    } else {
        if top.is_some() {
            return Err(ApiError::invalid(
                "the completions endpoint takes the number of alternatives in logprobs, not top_logprobs",
                Some("top_logprobs"),
            ));
        }
        match &c.logprobs {
            None | Some(V::Null) => Ok(None),
            Some(v) => Ok(Some(int("logprobs", v, 5)?)),
        }
    }
}

pub(super) fn prepare(
    st: &AppState,
    c: CommonParams,
    prompt_ids: Vec<u32>,
    chat: bool,
) -> Result<Prepared, ApiError> {
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::invalid(
                format!("only n=1 is supported, got n={n}"),
                Some("n"),
            ));
        }
    }
    if let Some((field, why)) = c.unsupported_field() {
        return Err(ApiError::invalid(why, Some(field)));
    }
    let logprobs = logprobs_wanted(&c, chat)?;
    let mut sampler = st.cfg.sampler;
    let vocab = st.model.files.config.vocab_size;
    let bad_setting = |e: SamplerError| ApiError::invalid(e.message, Some(e.field));
    sampler.temperature = c.temperature.unwrap_or(sampler.temperature);
    sampler.frequency_penalty = c.frequency_penalty.unwrap_or(sampler.frequency_penalty);
    sampler.presence_penalty = c.presence_penalty.unwrap_or(sampler.presence_penalty);
    sampler.top_p = c.top_p.unwrap_or(sampler.top_p);
    if let Some(k) = c.top_k {
        // Documented rule: a top_k of at least the vocabulary size keeps every token.
        sampler.top_k = SamplerConfig::top_k_for(k, vocab).map_err(bad_setting)?;
    }
    sampler.validate().map_err(bad_setting)?;
    if let Some(s) = c.seed {
        sampler.seed = s as u64;
    }
    let p = prompt_ids.len();
    let ctx = st.context;
    let prompt_field = Some(if chat { "messages" } else { "prompt" });
    match check_prompt(&prompt_ids, ctx, vocab) {
        Ok(()) => {}
        Err(e @ PromptError::TooLong { .. }) => {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(e.to_string(), prompt_field)
            })
        }
        Err(e) => return Err(ApiError::invalid(e.to_string(), prompt_field)),
    }
    let (field, asked) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(m), _) if chat => ("max_completion_tokens", Some(m)),
        (_, m) => ("max_tokens", m),
    };
    let max_tokens = match asked {
        Some(m) if m < 1 => {
            return Err(ApiError::invalid(
                format!("{field} must be at least 1, got {m}"),
                Some(field),
            ));
        }
        Some(m) if p as i64 + m > ctx as i64 => {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    format!(
                        "this model's maximum context length is {ctx} tokens; the prompt has {p} tokens \
                         and {field} is {m} ({} in all)",
                        p as i64 + m
                    ),
                    Some(field),
                )
            });
        }
        Some(m) => m as usize,
        None => st.cfg.max_tokens.clamp(1, ctx - p),
    };
    Ok(Prepared {
        prompt_ids,
        max_tokens,
        sampler,
        ignore_eos: c.ignore_eos.unwrap_or(st.cfg.ignore_eos),
        stop: c.stop.map(StopSpec::into_vec).unwrap_or_default(),
        stream: c.stream.unwrap_or(false),
        include_usage: c
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs,
    })
}

pub(super) fn render_chat(
    st: &AppState,
    req: &ChatCompletionRequest,
) -> Result<Vec<u32>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must not be empty",
            Some("messages"),
        ));
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "unknown role `{other}` in messages[{i}]: expected system, developer, user or assistant"
                    ),
                    Some(&format!("messages[{i}].role")),
                ))
            }
        };
        let content = match &m.content {
            None if role == "assistant" => String::new(),
            None => {
                return Err(ApiError::invalid(
                    format!("messages[{i}] has no content"),
                    Some(&format!("messages[{i}].content")),
                ))
            }
            Some(MessageContent::Text(s)) => s.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut s = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => s.push_str(t),
                        (k, _) => {
                            return Err(ApiError::invalid(
                                format!(
                                "messages[{i}]: only text content parts are supported, got `{k}`"
                            ),
                                Some(&format!("messages[{i}].content")),
                            ))
                        }
                    }
                }
                s
            }
        };
        msgs.push(Message::new(role, content));
    }
    let template = st.template.as_ref().ok_or_else(|| {
        ApiError::invalid("this model has no chat template: use /v1/completions", None)
    })?;
    let tok = st
        .model
        .tokenizer()
        .map_err(|e| ApiError::invalid(e.to_string(), None))?;
    template.encode(tok, &msgs, true).map_err(|e| match e {
        // The template refused these messages (roles out of order, say): the request's fault.
        TokenizerError::ChatTemplate(_) => ApiError::invalid(e.to_string(), Some("messages")),
        _ => ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    })
}

pub(super) fn encode_prompt(st: &AppState, prompt: PromptIn) -> Result<Vec<u32>, ApiError> {
    let tok = st
        .model
        .tokenizer()
        .map_err(|e| ApiError::invalid(e.to_string(), None))?;
    let enc = |s: &str| {
        // A text prompt is untrusted: its special-token text stays text (ids are the
        // way to send control tokens).
        tok.encode_plain(s, true)
            .map_err(|e| ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None))
    };
    let batch = || ApiError::invalid("only one prompt per request is supported", Some("prompt"));
    let ids = match prompt {
        PromptIn::Text(s) => enc(&s)?,
        PromptIn::Texts(v) if v.len() == 1 => enc(&v[0])?,
        PromptIn::Texts(_) => return Err(batch()),
        PromptIn::Tokens(ids) => ids,
        PromptIn::TokenLists(mut v) if v.len() == 1 => v.remove(0),
        PromptIn::TokenLists(_) => return Err(batch()),
    };
    Ok(ids)
}
