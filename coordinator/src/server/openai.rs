//! OpenAI-compatible request and response bodies (the subset `tpi serve` speaks), and the
//! OpenAI-style error body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// An error answered as `{"error":{"message","type","param","code"}}`.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable explanation.
    pub message: String,
    /// OpenAI error type (`invalid_request_error`, `server_error`, ...).
    pub kind: &'static str,
    /// The request field at fault, if known.
    pub param: Option<String>,
    /// A machine-readable code, if any.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error` about `param`.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(String::from),
            code: None,
        }
    }

    /// A server-side failure with the given status.
    pub fn server(
        status: StatusCode,
        message: impl Into<String>,
        code: Option<&'static str>,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind: "server_error",
            param: None,
            code,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Parses a JSON request body, turning every failure (syntax, wrong type, missing field)
/// into a 400 that names the offending field. The body must be a JSON object; `T` and
/// [`CommonParams`] are both read from it (unknown fields are ignored).
pub fn parse_body<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<(T, CommonParams), ApiError> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("could not parse the JSON body: {e}"), None))?;
    if !v.is_object() {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    }
    Ok((from_value(&v)?, from_value(&v)?))
}

fn from_value<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            ApiError::invalid(format!("invalid request body: {inner}"), None)
        } else {
            ApiError::invalid(
                format!("invalid request body: `{path}`: {inner}"),
                Some(&path),
            )
        }
    })
}

/// `stop`: one string or several.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    /// One stop sequence.
    One(String),
    /// Several stop sequences.
    Many(Vec<String>),
}

impl StopSpec {
    /// The non-empty stop sequences.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage (and empty `choices`).
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// A message's content: a string or a list of parts (only text parts are accepted).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    /// The part type; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// One input chat message.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// The content (null allowed for an assistant turn).
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// Sampling and length fields common to both endpoints.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CommonParams {
    /// Echoed model name (any value accepted).
    #[serde(default)]
    pub model: Option<String>,
    /// Upper bound on new tokens.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Newer spelling of `max_tokens` (chat).
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature (0 = greedy).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus threshold.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k (extension; 0 = off).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// RNG seed.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop sequences on the decoded text.
    #[serde(default)]
    pub stop: Option<StopSpec>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Number of choices; only 1.
    #[serde(default)]
    pub n: Option<i64>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Keep generating past end-of-sequence tokens (extension).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Penalty per earlier occurrence of a token (-2 … 2).
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Penalty for any earlier occurrence of a token (-2 … 2).
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Log probabilities: a bool (chat) or the number of alternatives (completions).
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    /// Most likely alternatives per token (with `logprobs`).
    #[serde(default)]
    pub top_logprobs: Option<serde_json::Value>,
    /// Fields that change the answer and that tpi does not implement: refused unless
    /// absent, null, or at their neutral value (see [`unsupported_field`]).
    #[serde(default)]
    pub logit_bias: Option<serde_json::Value>,
    /// See `logit_bias`.
    #[serde(default)]
    pub tools: Option<serde_json::Value>,
    /// See `logit_bias`.
    #[serde(default)]
    pub tool_choice: Option<serde_json::Value>,
    /// See `logit_bias`.
    #[serde(default)]
    pub functions: Option<serde_json::Value>,
    /// See `logit_bias`.
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
    /// See `logit_bias`.
    #[serde(default)]
    pub best_of: Option<serde_json::Value>,
    /// See `logit_bias`.
    #[serde(default)]
    pub suffix: Option<serde_json::Value>,
}

/// A field tpi refuses unless neutral: its name, its value, the test for a neutral
/// value, and why anything else is refused.
type Refusable<'a> = (
    &'static str,
    &'a Option<serde_json::Value>,
    fn(&serde_json::Value) -> bool,
    &'static str,
);

impl CommonParams {
    /// The first field set to something tpi would otherwise silently ignore, with why.
    pub fn unsupported_field(&self) -> Option<(&'static str, String)> {
        use serde_json::Value as V;
        let fields: [Refusable; 7] = [
            (
                "logit_bias",
                &self.logit_bias,
                |v: &V| v.as_object().is_some_and(|m| m.is_empty()),
                "logit_bias is not supported",
            ),
            (
                "tools",
                &self.tools,
                |v: &V| v.as_array().is_some_and(|a| a.is_empty()),
                "tool calling is not supported",
            ),
            (
                "tool_choice",
                &self.tool_choice,
                |v: &V| v == "none" || v == "auto",
                "tool calling is not supported",
            ),
            (
                "functions",
                &self.functions,
                |v: &V| v.as_array().is_some_and(|a| a.is_empty()),
                "function calling is not supported",
            ),
            (
                "response_format",
                &self.response_format,
                |v: &V| v["type"] == "text",
                "only response_format {\"type\": \"text\"} is supported",
            ),
            (
                "best_of",
                &self.best_of,
                |v: &V| v.as_u64() == Some(1),
                "only best_of = 1 is supported",
            ),
            (
                "suffix",
                &self.suffix,
                |v: &V| v.as_str() == Some(""),
                "suffix (insertion) is not supported",
            ),
        ];
        fields.into_iter().find_map(|(name, v, ok, why)| {
            let v = v.as_ref()?;
            (!(v.is_null() || ok(v))).then(|| (name, format!("{why} (got {name} = {v})")))
        })
    }
}

/// `POST /v1/chat/completions` body (besides [`CommonParams`]).
#[derive(Clone, Debug, Deserialize)]
pub struct ChatCompletionRequest {
    /// The conversation.
    pub messages: Vec<ChatMessageIn>,
}

/// A completion prompt: text, one text in a list, or token ids.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// Several texts (only one is supported).
    Texts(Vec<String>),
    /// Several token lists (only one is supported).
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions` body (besides [`CommonParams`]).
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: PromptIn,
    /// Echo the prompt back (not supported when true).
    #[serde(default)]
    pub echo: Option<bool>,
}

/// Token counts.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage from the two counts.
    pub fn new(prompt: usize, completion: usize) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// An output chat message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChatMessageOut {
    /// Always `assistant`.
    pub role: String,
    /// The reply.
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Always 0.
    pub index: usize,
    /// The reply.
    pub message: ChatMessageOut,
    /// Always null.
    pub logprobs: Option<serde_json::Value>,
    /// `stop` or `length`.
    pub finish_reason: Option<String>,
}

/// `chat.completion`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// `chatcmpl-<n>`.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// One choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// A streamed delta.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChatDelta {
    /// `assistant` in the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a streamed chat chunk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    /// Always 0.
    pub index: usize,
    /// What is new.
    pub delta: ChatDelta,
    /// Always null.
    pub logprobs: Option<serde_json::Value>,
    /// Set in the last chunk.
    pub finish_reason: Option<String>,
}

/// `chat.completion.chunk`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// Same id in every chunk of a stream.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// One choice, or none in the usage chunk.
    pub choices: Vec<ChatChunkChoice>,
    /// Only in the usage chunk (with `stream_options.include_usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One choice of a text completion (or of one of its chunks).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// Always 0.
    pub index: usize,
    /// The text (new text, in a chunk).
    pub text: String,
    /// Always null.
    pub logprobs: Option<serde_json::Value>,
    /// `stop` or `length` (null in a chunk before the last).
    pub finish_reason: Option<String>,
}

/// `text_completion` (also the object of each streamed chunk).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Completion {
    /// `cmpl-<n>`.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// One choice, or none in the usage chunk.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (streamed only in the usage chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}
