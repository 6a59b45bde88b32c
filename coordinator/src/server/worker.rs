//! The generation worker: one thread owns the [`Session`] (the backend is not thread-safe
//! and the cluster holds one KV cache) and runs queued jobs one at a time, streaming text
//! back per job and stopping a job as soon as its client goes away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use tokio::sync::mpsc;

use super::metrics::Metrics;
use super::openai::ApiError;
use crate::error::Error;
use crate::generate::{Finish, GenRequest, Session};
use crate::loader::LoadedModel;
use crate::logprobs::token_logprob;
use crate::sampler::SamplerConfig;

/// A generated token's log probability as a client sees it: its text, and the text of
/// each of the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenInfo {
    /// The token's text (special tokens included).
    pub token: String,
    /// Its log probability.
    pub logprob: f32,
    /// The most likely tokens at that step, most likely first.
    pub top: Vec<(String, f32)>,
    /// Characters of completion text before this token.
    pub offset: usize,
}

/// What a job streams back.
#[derive(Debug)]
pub enum JobEvent {
    /// Newly decoded text, with the log probabilities of the tokens it completes (when
    /// the request asked for them).
    Text(String, Vec<TokenInfo>),
    /// The generation ended.
    Done {
        /// `stop` or `length`.
        finish_reason: &'static str,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
    /// The generation failed.
    Failed(ApiError),
}

/// One generation to run.
pub struct Job {
    /// `chat` or `completions` (for the metrics).
    pub endpoint: &'static str,
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Upper bound on new tokens.
    pub max_tokens: usize,
    /// Sampling.
    pub sampler: SamplerConfig,
    /// Keep going past the model's stop tokens.
    pub ignore_eos: bool,
    /// Stop sequences on the decoded text.
    pub stop: Vec<String>,
    /// Set when the client goes away.
    pub cancel: Arc<AtomicBool>,
    /// Where the text goes.
    pub events: mpsc::UnboundedSender<JobEvent>,
    /// When the request arrived (for the TTFT).
    pub arrived: Instant,
    /// When the request must end (the server's per-request time limit).
    pub deadline: Option<Instant>,
    /// Report log probabilities with this many alternatives per token (None: no logprobs).
    pub logprobs: Option<usize>,
}

impl Job {
    fn abandoned(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }
}

/// Sets the job's cancellation flag when dropped: held by whatever serves the client
/// (the response future, or the SSE stream).
pub struct CancelOnDrop(pub Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Finds stop sequences in streamed text, holding back a tail that could be the start of one.
pub struct StopMatcher {
    stops: Vec<String>,
    buf: String,
}

impl StopMatcher {
    /// Watches for `stops` (empty strings ignored).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            buf: String::new(),
        }
    }

    /// Adds text; returns what can be shown now, and whether a stop sequence was found
    /// (the returned text then ends right before it, and the rest is dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.buf.push_str(piece);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.buf.find(s.as_str()))
            .min()
        {
            let out = self.buf[..pos].to_string();
            self.buf.clear();
            return (out, true);
        }
        let mut keep = 0;
        for s in &self.stops {
            for k in (1..s.len()).rev() {
                if k <= keep {
                    break;
                }
                if s.is_char_boundary(k) && self.buf.ends_with(&s[..k]) {
                    keep = k;
                    break;
                }
            }
        }
        let cut = self.buf.len() - keep;
        let out = self.buf[..cut].to_string();
        self.buf.drain(..cut);
        (out, false)
    }

    /// The held-back tail, once generation ended without a stop sequence.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.buf)
    }
}

/// Maps a generation error to the HTTP answer.
fn api_error(e: &Error) -> ApiError {
    match e {
        Error::Input(m) => ApiError::invalid(m.clone(), None),
        Error::Cluster(_) | Error::Net(_) => ApiError::server(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the inference backend failed: {e}"),
            Some("backend_unavailable"),
        ),
        other => ApiError::server(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("generation failed: {other}"),
            None,
        ),
    }
}

/// Runs jobs from `rx` until every sender is gone. `reuse_prefix` keeps the KV cache
/// between jobs so a shared prompt prefix is not recomputed (outputs then may differ in
/// the last bits from a fresh prefill); otherwise every job starts from an empty cache.
pub fn run(
    mut session: Session,
    model: Arc<LoadedModel>,
    mut rx: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
    reuse_prefix: bool,
) {
    let Ok(tok) = model.tokenizer() else {
        return;
    };
    let stop_ids = model.stop_ids();
    while let Some(job) = rx.blocking_recv() {
        metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        if job.abandoned() {
            metrics.cancelled(job.endpoint);
            continue;
        }
        metrics.set_busy(true);
        if !reuse_prefix {
            session.clear();
        }
        let req = GenRequest {
            prompt_ids: job.prompt_ids.clone(),
            max_tokens: job.max_tokens,
            sampler: job.sampler,
            stop_ids: stop_ids.clone(),
            ignore_eos: job.ignore_eos,
            keep_logits: false,
            cancel: Some(job.cancel.clone()),
            deadline: job.deadline,
        };
        let mut dec = tok.stream_decoder();
        let mut stopper = StopMatcher::new(job.stop.clone());
        let (mut first, mut hit_stop, mut gone) = (true, false, false);
        // Log probabilities of tokens whose text the stop matcher still holds back.
        let mut held: Vec<TokenInfo> = Vec::new();
        let mut chars = 0usize;
        let res = session.generate(&req, &mut |id, logits| {
            if first {
                first = false;
                metrics.ttft(job.arrived.elapsed());
            }
            if job.abandoned() {
                gone = true;
                return false;
            }
            let piece = dec.push(id).unwrap_or_default();
            if let Some(n) = job.logprobs {
                let lp = token_logprob(logits, id, n);
                let text_of = |t: u32| tok.decode(&[t], false).unwrap_or_default();
                held.push(TokenInfo {
                    token: text_of(id),
                    logprob: lp.logprob,
                    top: lp.top.iter().map(|&(t, l)| (text_of(t), l)).collect(),
                    offset: chars,
                });
                chars += piece.chars().count();
            }
            let (text, stopped) = stopper.push(&piece);
            if !text.is_empty()
                && job
                    .events
                    .send(JobEvent::Text(text, std::mem::take(&mut held)))
                    .is_err()
            {
                gone = true;
                return false;
            }
            if stopped {
                hit_stop = true;
                return false;
            }
            true
        });
        match res {
            Ok(out) => {
                metrics.generation(
                    job.prompt_ids.len(),
                    out.generated_ids.len(),
                    out.tokens_per_s(),
                    &out.steps,
                );
                if out.finish == Finish::TimedOut {
                    metrics.timed_out(job.endpoint);
                    if out.generated_ids.is_empty() {
                        let _ = job.events.send(JobEvent::Failed(ApiError::server(
                            StatusCode::GATEWAY_TIMEOUT,
                            format!(
                                "the request reached the server's time limit during prefill ({} prompt tokens); raise --request-timeout or send a shorter prompt",
                                job.prompt_ids.len()
                            ),
                            Some("timeout"),
                        )));
                        metrics.set_busy(false);
                        continue;
                    }
                }
                let finish_reason = match out.finish {
                    _ if hit_stop => Some("stop"),
                    Finish::Stop => Some("stop"),
                    // Out of time with text to show: the answer ends as if cut by max_tokens.
                    Finish::Length | Finish::TimedOut => Some("length"),
                    Finish::Cancelled => None,
                };
                match finish_reason {
                    Some(r) if !gone => {
                        if !hit_stop {
                            let tail = stopper.finish();
                            if !tail.is_empty() || !held.is_empty() {
                                let _ = job.events.send(JobEvent::Text(tail, held));
                            }
                        }
                        let _ = job.events.send(JobEvent::Done {
                            finish_reason: r,
                            prompt_tokens: job.prompt_ids.len(),
                            completion_tokens: out.generated_ids.len(),
                        });
                    }
                    _ => metrics.cancelled(job.endpoint),
                }
            }
            Err(e) => {
                if matches!(e, Error::Cluster(_) | Error::Net(_)) {
                    metrics.backend_failed(&e.to_string());
                }
                tracing::warn!("generation failed: {e}");
                let _ = job.events.send(JobEvent::Failed(api_error(&e)));
            }
        }
        metrics.set_busy(false);
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_sequences_hold_back_and_cut() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dgame"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("an E"), ("an ".to_string(), false));
        assert_eq!(m.push("x"), ("Ex".to_string(), false));
        assert_eq!(m.push(" E"), (" ".to_string(), false));
        assert_eq!(m.finish(), "E");
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("abc"), ("abc".to_string(), false));
    }
}
