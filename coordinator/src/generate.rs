//! The generation loop: batched prefill, then one token at a time, with streaming,
//! stop conditions, optional logits capture and timings. A [`Session`] keeps the KV
//! cache between calls so a chat only prefills what is new.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Backend, StepReport};
use crate::error::{Error, Result};
use crate::sampler::{Sampler, SamplerConfig};

/// One generation request, in token ids.
#[derive(Clone, Debug)]
pub struct GenRequest {
    /// The whole context so far (prompt, or the rendered conversation).
    pub prompt_ids: Vec<u32>,
    /// Upper bound on new tokens.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampler: SamplerConfig,
    /// Tokens that end generation (unless `ignore_eos`).
    pub stop_ids: Vec<u32>,
    /// Keep going past stop tokens.
    pub ignore_eos: bool,
    /// Keep the logits behind every generated token.
    pub keep_logits: bool,
    /// When set, generation stops (between prefill chunks, or before the next token).
    pub cancel: Option<Arc<AtomicBool>>,
    /// Generation stops once this instant has passed (checked at the same points).
    pub deadline: Option<Instant>,
}

impl GenRequest {
    /// A request for `prompt_ids` with no cancellation flag and no deadline.
    pub fn new(prompt_ids: Vec<u32>, max_tokens: usize, sampler: SamplerConfig) -> Self {
        GenRequest {
            prompt_ids,
            max_tokens,
            sampler,
            stop_ids: Vec::new(),
            ignore_eos: false,
            keep_logits: false,
            cancel: None,
            deadline: None,
        }
    }

    /// Why the request should stop now, if it should.
    fn interrupted(&self) -> Option<Finish> {
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Some(Finish::Cancelled);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some(Finish::TimedOut);
        }
        None
    }
}

/// Prompt tokens per prefill step for long prompts: between chunks a request can be
/// cancelled or time out. Prompts up to this length prefill in one step, as before.
pub const PREFILL_CHUNK: usize = 512;

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// A stop token was produced.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The caller asked to stop.
    Cancelled,
    /// The request's deadline passed.
    #[serde(rename = "timeout")]
    TimedOut,
}

/// What a generation produced.
#[derive(Clone, Debug)]
pub struct GenOutput {
    /// New token ids (a final stop token included).
    pub generated_ids: Vec<u32>,
    /// Logits behind each generated token (when requested).
    pub logits: Vec<Vec<f32>>,
    /// Time to first token (prefill plus first sample).
    pub ttft: Duration,
    /// Time from the first token to the last.
    pub decode_time: Duration,
    /// Prompt tokens actually computed (after reusing the cache).
    pub prefilled: usize,
    /// Why it ended.
    pub finish: Finish,
    /// Timing report of every step.
    pub steps: Vec<StepReport>,
}

impl GenOutput {
    /// Decode speed over the tokens after the first.
    pub fn tokens_per_s(&self) -> f64 {
        let n = self.generated_ids.len().saturating_sub(1);
        if n == 0 || self.decode_time.is_zero() {
            0.0
        } else {
            n as f64 / self.decode_time.as_secs_f64()
        }
    }
}

/// A backend plus the tokens its KV cache currently holds.
pub struct Session {
    backend: Box<dyn Backend>,
    cached: Vec<u32>,
    context: usize,
}

impl Session {
    /// Wraps a backend; `context` bounds prompt plus generated tokens.
    pub fn new(backend: Box<dyn Backend>, context: usize) -> Result<Self> {
        let max = backend.config().max_position_embeddings;
        if context == 0 {
            return Err(Error::Input("context length must be positive".into()));
        }
        Ok(Session {
            backend,
            cached: Vec::new(),
            context: context.min(max),
        })
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The context length in force.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Forgets the cached tokens.
    pub fn clear(&mut self) {
        self.cached.clear();
    }

    /// Generates; `on_token` sees each new id as it is made, with the logits it was
    /// sampled from, and returns false to stop.
    pub fn generate(
        &mut self,
        req: &GenRequest,
        on_token: &mut dyn FnMut(u32, &[f32]) -> bool,
    ) -> Result<GenOutput> {
        req.sampler.validate().map_err(Error::Input)?;
        let p = req.prompt_ids.len();
        if p == 0 {
            return Err(Error::Input("the prompt is empty".into()));
        }
        if p >= self.context {
            return Err(Error::Input(format!(
                "the prompt has {p} tokens but the context holds {} (leave room for at least one new token)",
                self.context
            )));
        }
        let vocab = self.backend.config().vocab_size;
        if let Some(&bad) = req.prompt_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is out of range: the vocabulary has {vocab} tokens"
            )));
        }
        let budget = req.max_tokens.min(self.context - p);
        // Reuse the cached prefix (a chat's earlier turns); always recompute at least the last token.
        let mut reuse = self
            .cached
            .iter()
            .zip(&req.prompt_ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(p - 1);
        let need = (p + budget).min(self.context);
        if self.backend.capacity() < need {
            // Grow: a new cache, nothing reusable.
            let cap = if self.cached.is_empty() {
                need
            } else {
                self.context
            };
            self.backend.reset(cap.max(need))?;
            reuse = 0;
        }
        self.cached.truncate(reuse);
        let t0 = Instant::now();
        let mut sampler = Sampler::new(req.sampler);
        let mut out = GenOutput {
            generated_ids: Vec::new(),
            logits: Vec::new(),
            ttft: Duration::ZERO,
            decode_time: Duration::ZERO,
            prefilled: p - reuse,
            finish: Finish::Length,
            steps: Vec::new(),
        };
        // Drop reports of earlier calls so this output's steps are its own.
        self.backend.take_reports()?;
        let mut logits = Vec::new();
        let mut at = reuse;
        while at < p {
            if let Some(f) = req.interrupted() {
                out.finish = f;
                out.steps = self.backend.take_reports()?;
                return Ok(out);
            }
            let end = (at + PREFILL_CHUNK).min(p);
            logits = match self.backend.forward(&req.prompt_ids[at..end], at) {
                Ok(l) => l,
                Err(e) => {
                    self.cached.clear();
                    return Err(e);
                }
            };
            self.cached.extend_from_slice(&req.prompt_ids[at..end]);
            at = end;
        }
        let mut t_first = None;
        while out.generated_ids.len() < budget {
            let id = sampler.sample(&logits);
            out.generated_ids.push(id);
            if t_first.is_none() {
                t_first = Some(Instant::now());
                out.ttft = t0.elapsed();
            }
            let go_on = on_token(id, &logits);
            if req.keep_logits {
                out.logits.push(std::mem::take(&mut logits));
            }
            if !req.ignore_eos && req.stop_ids.contains(&id) {
                out.finish = Finish::Stop;
                break;
            }
            if !go_on {
                out.finish = Finish::Cancelled;
                break;
            }
            if out.generated_ids.len() == budget {
                break;
            }
            if let Some(f) = req.interrupted() {
                out.finish = f;
                break;
            }
            let pos = self.cached.len();
            logits = match self.backend.forward(&[id], pos) {
                Ok(l) => l,
                Err(e) => {
                    self.cached.clear();
                    return Err(e);
                }
            };
            self.cached.push(id);
        }
        if let Some(t) = t_first {
            out.decode_time = t.elapsed();
        }
        out.steps = self.backend.take_reports()?;
        Ok(out)
    }
}
