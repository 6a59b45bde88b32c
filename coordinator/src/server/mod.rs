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
mod request;
mod stream;
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
use request::{encode_prompt, prepare, render_chat, Prepared};
use stream::{first_event, sse, Kind};
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
    let template = match model.chat() {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!("no chat completions: {e}");
            None
        }
    };
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
