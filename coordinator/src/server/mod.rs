//! `tpi serve`: an OpenAI-compatible HTTP server over one [`Session`].
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both with SSE streaming),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
//!
//! Generation is serialised: a dedicated thread ([`worker::run`]) owns the session and takes
//! jobs from a bounded queue; each job streams its text back through its own channel. When
//! a client goes away (its SSE stream or response future is dropped) the job's cancellation
//! flag is set and the worker stops that generation at the next token.

pub mod listen;
pub mod metrics;
pub mod openai;
pub mod worker;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use tokio::sync::mpsc;

use crate::chat::{ChatTemplate, Message};
use crate::generate::{check_prompt, PromptError, Session};
use crate::loader::LoadedModel;
use crate::sampler::{SamplerConfig, SamplerError};
use metrics::Metrics;
use openai::*;
use worker::{CancelOnDrop, Job, JobEvent, TokenInfo};

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The id `/v1/models` lists and responses carry.
    pub model_id: String,
    /// Default sampling when a request does not say.
    pub sampler: SamplerConfig,
    /// Default `max_tokens` (clipped to what the context leaves).
    pub max_tokens: usize,
    /// Default for the `ignore_eos` extension field.
    pub ignore_eos: bool,
    /// Jobs that may wait for the worker; more are answered 429.
    pub max_queue: usize,
    /// Keep the KV cache between requests (reuse a shared prompt prefix).
    pub reuse_prefix: bool,
    /// Rank addresses (rank 0 first), for `/health`.
    pub ranks: Vec<Option<String>>,
    /// Longest a request may take from arrival to its last token (None: no limit).
    pub request_timeout: Option<Duration>,
    /// Longest a client may take to send a request body.
    pub body_timeout: Duration,
}

/// Largest request body read (a chat that fills the context is far smaller).
pub const MAX_BODY: usize = 4 << 20;

struct AppState {
    cfg: ServerConfig,
    model: Arc<LoadedModel>,
    template: Option<ChatTemplate>,
    context: usize,
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
}

/// A running server's router and the worker thread behind it.
pub struct Server {
    /// The axum router (serve it with `axum::serve`).
    pub router: Router,
    /// The worker thread; it ends once the router (and every in-flight request) is dropped.
    pub worker: std::thread::JoinHandle<()>,
}

/// Starts the generation worker on its own thread and builds the router.
pub fn build(session: Session, model: LoadedModel, cfg: ServerConfig) -> crate::Result<Server> {
    model.tokenizer()?;
    let template = model.chat().ok();
    let context = session.context();
    let model = Arc::new(model);
    let metrics = Arc::new(Metrics::new(cfg.ranks.clone()));
    let (tx, rx) = mpsc::channel(cfg.max_queue.max(1));
    let worker = {
        let (model, metrics, reuse) = (model.clone(), metrics.clone(), cfg.reuse_prefix);
        std::thread::Builder::new()
            .name("tpi-generate".into())
            .spawn(move || worker::run(session, model, rx, metrics, reuse))
            .map_err(|e| crate::Error::Io(format!("cannot start the worker thread: {e}")))?
    };
    let state = Arc::new(AppState {
        cfg,
        model,
        template,
        context,
        jobs: tx,
        metrics,
        next_id: AtomicU64::new(1),
    });
    let router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(state);
    Ok(Server { router, worker })
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    }
}

async fn models(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": st.cfg.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "tpi",
            "context_length": st.context,
        }],
    }))
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let body = st.metrics.health_json(&st.cfg.model_id, st.context);
    let code = if st.metrics.error().is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

/// A validated generation, ready to queue.
struct Prepared {
    prompt_ids: Vec<u32>,
    max_tokens: usize,
    sampler: SamplerConfig,
    ignore_eos: bool,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    /// Alternatives per token when log probabilities were asked for.
    logprobs: Option<usize>,
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

fn prepare(
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

/// A queued job's receiving side; dropping it cancels the job.
struct Ticket {
    rx: mpsc::UnboundedReceiver<JobEvent>,
    _cancel: CancelOnDrop,
}

fn submit(
    st: &AppState,
    endpoint: &'static str,
    p: &Prepared,
    arrived: Instant,
) -> Result<Ticket, ApiError> {
    let (etx, erx) = mpsc::unbounded_channel();
    let flag = Arc::new(AtomicBool::new(false));
    let job = Job {
        endpoint,
        prompt_ids: p.prompt_ids.clone(),
        max_tokens: p.max_tokens,
        sampler: p.sampler,
        ignore_eos: p.ignore_eos,
        stop: p.stop.clone(),
        cancel: flag.clone(),
        events: etx,
        arrived,
        deadline: st.cfg.request_timeout.map(|t| arrived + t),
        logprobs: p.logprobs,
    };
    st.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
    match st.jobs.try_send(job) {
        Ok(()) => Ok(Ticket {
            rx: erx,
            _cancel: CancelOnDrop(flag),
        }),
        Err(e) => {
            st.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            Err(match e {
                mpsc::error::TrySendError::Full(_) => ApiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    message: format!(
                        "the server is busy: {} requests are already waiting",
                        st.cfg.max_queue
                    ),
                    kind: "rate_limit_error",
                    param: None,
                    code: Some("queue_full"),
                },
                mpsc::error::TrySendError::Closed(_) => ApiError::server(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the generation worker has stopped",
                    Some("worker_stopped"),
                ),
            })
        }
    }
}

/// What the response builders need to know about the request.
#[derive(Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    include_usage: bool,
    logprobs: bool,
}

fn lost_worker() -> ApiError {
    ApiError::server(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the generation worker ended the request without an answer",
        None,
    )
}

/// A whole generation, collected.
struct Collected {
    text: String,
    finish: &'static str,
    completion_tokens: usize,
    tokens: Vec<TokenInfo>,
}

/// Collects a whole generation.
async fn collect(t: &mut Ticket) -> Result<Collected, ApiError> {
    let (mut text, mut tokens) = (String::new(), Vec::new());
    while let Some(ev) = t.rx.recv().await {
        match ev {
            JobEvent::Text(s, infos) => {
                text.push_str(&s);
                tokens.extend(infos);
            }
            JobEvent::Done {
                finish_reason,
                completion_tokens,
                ..
            } => {
                return Ok(Collected {
                    text,
                    finish: finish_reason,
                    completion_tokens,
                    tokens,
                })
            }
            JobEvent::Failed(e) => return Err(e),
        }
    }
    Err(lost_worker())
}

/// Chat's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(tokens: &[TokenInfo]) -> serde_json::Value {
    let entry =
        |t: &str, l: f32| serde_json::json!({"token": t, "logprob": l, "bytes": t.as_bytes()});
    let content: Vec<serde_json::Value> = tokens
        .iter()
        .map(|i| {
            let mut e = entry(&i.token, i.logprob);
            e["top_logprobs"] = i.top.iter().map(|(t, l)| entry(t, *l)).collect();
            e
        })
        .collect();
    serde_json::json!({ "content": content })
}

/// The completions endpoint's `logprobs` object: parallel lists of tokens, their log
/// probabilities, `{token: logprob}` maps of the alternatives, and text offsets.
fn completion_logprobs(tokens: &[TokenInfo]) -> serde_json::Value {
    serde_json::json!({
        "tokens": tokens.iter().map(|i| i.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|i| i.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens
            .iter()
            .map(|i| i.top.iter().map(|(t, l)| (t.clone(), serde_json::json!(l))).collect::<serde_json::Map<_, _>>())
            .collect::<Vec<_>>(),
        "text_offset": tokens.iter().map(|i| i.offset).collect::<Vec<_>>(),
    })
}

fn render_chat(st: &AppState, req: &ChatCompletionRequest) -> Result<Vec<u32>, ApiError> {
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
    template
        .encode(tok, &msgs, true)
        .map_err(|e| ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None))
}

fn encode_prompt(st: &AppState, prompt: PromptIn) -> Result<Vec<u32>, ApiError> {
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

async fn chat_completions(State(st): State<Arc<AppState>>, body: Body) -> Response {
    let r = match read_body(&st, body).await {
        Ok(b) => chat_inner(&st, b).await,
        Err(e) => Err(e),
    };
    finish_response(&st, "chat", r)
}

async fn completions(State(st): State<Arc<AppState>>, body: Body) -> Response {
    let r = match read_body(&st, body).await {
        Ok(b) => completions_inner(&st, b).await,
        Err(e) => Err(e),
    };
    finish_response(&st, "completions", r)
}

/// Reads a request body of at most [`MAX_BODY`] bytes within the body time limit: a
/// client that stalls mid-body gets a 408 instead of holding its connection forever.
async fn read_body(st: &AppState, body: Body) -> Result<Bytes, ApiError> {
    let limit = st.cfg.body_timeout;
    match tokio::time::timeout(limit, axum::body::to_bytes(body, MAX_BODY)).await {
        Err(_) => Err(ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("the request body did not arrive within {limit:?}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("body_timeout"),
        }),
        Ok(Err(e)) => Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("cannot read the request body (at most {MAX_BODY} bytes): {e}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("body_too_large"),
        }),
        Ok(Ok(b)) => Ok(b),
    }
}

fn finish_response(
    st: &AppState,
    endpoint: &'static str,
    r: Result<Response, ApiError>,
) -> Response {
    let resp = r.unwrap_or_else(|e| e.into_response());
    st.metrics.request(endpoint, resp.status().as_u16());
    resp
}

fn meta(st: &AppState, prefix: &str, prompt_tokens: usize) -> Meta {
    Meta {
        id: format!("{prefix}-{}", st.next_id.fetch_add(1, Ordering::Relaxed)),
        created: now_s(),
        model: st.cfg.model_id.clone(),
        prompt_tokens,
        include_usage: false,
        logprobs: false,
    }
}

async fn chat_inner(st: &Arc<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let (req, common): (ChatCompletionRequest, _) = parse_body(&body)?;
    let ids = render_chat(st, &req)?;
    let m = meta(st, "chatcmpl", ids.len());
    let p = prepare(st, common, ids, true)?;
    let m = Meta {
        include_usage: p.include_usage,
        logprobs: p.logprobs.is_some(),
        ..m
    };
    let mut ticket = submit(st, "chat", &p, arrived)?;
    if p.stream {
        let first = first_event(&mut ticket).await?;
        return Ok(sse(ticket, first, m, Kind::Chat));
    }
    let got = collect(&mut ticket).await?;
    let out = ChatCompletion {
        id: m.id,
        object: "chat.completion".into(),
        created: m.created,
        model: m.model,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatMessageOut {
                role: "assistant".into(),
                content: got.text,
            },
            logprobs: m.logprobs.then(|| chat_logprobs(&got.tokens)),
            finish_reason: Some(got.finish.into()),
        }],
        usage: Usage::new(m.prompt_tokens, got.completion_tokens),
    };
    Ok(Json(out).into_response())
}

async fn completions_inner(st: &Arc<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let (req, common): (CompletionRequest, _) = parse_body(&body)?;
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo is not supported", Some("echo")));
    }
    let ids = encode_prompt(st, req.prompt)?;
    let m = meta(st, "cmpl", ids.len());
    let p = prepare(st, common, ids, false)?;
    let m = Meta {
        include_usage: p.include_usage,
        logprobs: p.logprobs.is_some(),
        ..m
    };
    let mut ticket = submit(st, "completions", &p, arrived)?;
    if p.stream {
        let first = first_event(&mut ticket).await?;
        return Ok(sse(ticket, first, m, Kind::Completion));
    }
    let got = collect(&mut ticket).await?;
    let out = Completion {
        id: m.id,
        object: "text_completion".into(),
        created: m.created,
        model: m.model,
        choices: vec![CompletionChoice {
            index: 0,
            text: got.text,
            logprobs: m.logprobs.then(|| completion_logprobs(&got.tokens)),
            finish_reason: Some(got.finish.into()),
        }],
        usage: Some(Usage::new(m.prompt_tokens, got.completion_tokens)),
    };
    Ok(Json(out).into_response())
}

/// Waits for the job's first event, so that a failure before any text (a dead cluster)
/// is still answered with an error status rather than inside a 200 stream.
async fn first_event(t: &mut Ticket) -> Result<JobEvent, ApiError> {
    match t.rx.recv().await {
        Some(JobEvent::Failed(e)) => Err(e),
        Some(ev) => Ok(ev),
        None => Err(lost_worker()),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

fn chat_chunk(m: &Meta, delta: ChatDelta, finish: Option<&str>) -> Event {
    chat_chunk_with(m, delta, finish, None)
}

fn chat_chunk_with(
    m: &Meta,
    delta: ChatDelta,
    finish: Option<&str>,
    logprobs: Option<serde_json::Value>,
) -> Event {
    let c = ChatCompletionChunk {
        id: m.id.clone(),
        object: "chat.completion.chunk".into(),
        created: m.created,
        model: m.model.clone(),
        choices: vec![ChatChunkChoice {
            index: 0,
            delta,
            logprobs,
            finish_reason: finish.map(String::from),
        }],
        usage: None,
    };
    Event::default().data(serde_json::to_string(&c).unwrap_or_default())
}

fn text_chunk(m: &Meta, text: String, finish: Option<&str>) -> Event {
    text_chunk_with(m, text, finish, None)
}

fn text_chunk_with(
    m: &Meta,
    text: String,
    finish: Option<&str>,
    logprobs: Option<serde_json::Value>,
) -> Event {
    let c = Completion {
        id: m.id.clone(),
        object: "text_completion".into(),
        created: m.created,
        model: m.model.clone(),
        choices: vec![CompletionChoice {
            index: 0,
            text,
            logprobs,
            finish_reason: finish.map(String::from),
        }],
        usage: None,
    };
    Event::default().data(serde_json::to_string(&c).unwrap_or_default())
}

fn usage_chunk(m: &Meta, kind: Kind, usage: Usage) -> Event {
    let json = match kind {
        Kind::Chat => serde_json::to_string(&ChatCompletionChunk {
            id: m.id.clone(),
            object: "chat.completion.chunk".into(),
            created: m.created,
            model: m.model.clone(),
            choices: vec![],
            usage: Some(usage),
        }),
        Kind::Completion => serde_json::to_string(&Completion {
            id: m.id.clone(),
            object: "text_completion".into(),
            created: m.created,
            model: m.model.clone(),
            choices: vec![],
            usage: Some(usage),
        }),
    };
    Event::default().data(json.unwrap_or_default())
}

/// Turns one job event into the SSE events to send; `true` once the stream is over.
fn events_for(ev: JobEvent, m: &Meta, kind: Kind, out: &mut Vec<Event>) -> bool {
    match ev {
        JobEvent::Text(t, infos) => {
            out.push(match kind {
                Kind::Chat => chat_chunk_with(
                    m,
                    ChatDelta {
                        role: None,
                        content: Some(t),
                    },
                    None,
                    m.logprobs.then(|| chat_logprobs(&infos)),
                ),
                Kind::Completion => {
                    text_chunk_with(m, t, None, m.logprobs.then(|| completion_logprobs(&infos)))
                }
            });
            false
        }
        JobEvent::Done {
            finish_reason,
            completion_tokens,
            ..
        } => {
            out.push(match kind {
                Kind::Chat => chat_chunk(m, ChatDelta::default(), Some(finish_reason)),
                Kind::Completion => text_chunk(m, String::new(), Some(finish_reason)),
            });
            if m.include_usage {
                out.push(usage_chunk(
                    m,
                    kind,
                    Usage::new(m.prompt_tokens, completion_tokens),
                ));
            }
            out.push(Event::default().data("[DONE]"));
            true
        }
        JobEvent::Failed(e) => {
            out.push(Event::default().data(e.body().to_string()));
            true
        }
    }
}

struct StreamState {
    ticket: Ticket,
    meta: Meta,
    kind: Kind,
    pending: std::collections::VecDeque<Event>,
    over: bool,
}

/// The SSE response; the stream owns the ticket, so dropping it (client gone) cancels the job.
fn sse(ticket: Ticket, first: JobEvent, meta: Meta, kind: Kind) -> Response {
    let mut initial = Vec::new();
    if kind == Kind::Chat {
        initial.push(chat_chunk(
            &meta,
            ChatDelta {
                role: Some("assistant".into()),
                content: Some(String::new()),
            },
            None,
        ));
    }
    let over = events_for(first, &meta, kind, &mut initial);
    let state = StreamState {
        ticket,
        meta,
        kind,
        pending: initial.into(),
        over,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(ev) = s.pending.pop_front() {
                return Some((Ok::<Event, Infallible>(ev), s));
            }
            if s.over {
                return None;
            }
            let mut out = Vec::new();
            match s.ticket.rx.recv().await {
                Some(ev) => s.over = events_for(ev, &s.meta, s.kind, &mut out),
                None => {
                    out.push(Event::default().data(lost_worker().body().to_string()));
                    s.over = true;
                }
            }
            s.pending.extend(out);
        }
    });
    sse_response(stream)
}

fn sse_response<S>(stream: S) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(stream).into_response()
}
