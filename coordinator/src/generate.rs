//! The generation loop: batched prefill, then one token at a time, with streaming,
//! stop conditions, optional logits capture and timings. A [`Session`] keeps the KV
//! cache between calls so a chat only prefills what is new.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tpi_node::model::ModelConfig;

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
    /// `", 12.3 tokens/s"` for a summary line, or nothing when fewer than two tokens were
    /// generated (the first token's time is the TTFT; there was no decode to rate).
    pub fn rate_note(&self) -> String {
        if self.generated_ids.len() < 2 {
            String::new()
        } else {
            format!(", {:.1} tokens/s", self.tokens_per_s())
        }
    }

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

/// Checks a context length of `ctx` positions against the model's trained context,
/// naming the KV memory a too-long one would need.
pub fn check_context(ctx: usize, cfg: &ModelConfig) -> std::result::Result<(), String> {
    let max = cfg.max_position_embeddings;
    if ctx == 0 {
        return Err("a context holds at least 1 position".into());
    }
    if ctx > max {
        let fmt = |p: usize| crate::discovery::fmt_bytes(kv_bytes(cfg, p) as u64);
        return Err(format!(
            "exceeds the model's maximum context of {max} positions (its KV cache would need {} in all; {max} positions need {})",
            fmt(ctx),
            fmt(max)
        ));
    }
    Ok(())
}

/// Bytes of f32 KV cache for `positions` positions of every layer, summed over all ranks.
pub fn kv_bytes(cfg: &ModelConfig, positions: usize) -> f64 {
    2.0 * 4.0 * cfg.n_layers as f64 * cfg.kv_dim() as f64 * positions as f64
}

/// Why a prompt cannot be generated from.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PromptError {
    /// No tokens at all.
    #[error("the prompt is empty")]
    Empty,
    /// No room is left for a new token.
    #[error(
        "the prompt has {prompt} tokens but the context holds {context} (leave room for at least one new token)"
    )]
    TooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Positions in the context.
        context: usize,
    },
    /// An id outside the vocabulary.
    #[error("{0}")]
    BadToken(String),
}

/// Checks that `ids` can be generated from in a `context`-position window on a
/// `vocab`-token model: not empty, room for one new token, every id in the vocabulary.
pub fn check_prompt(ids: &[u32], context: usize, vocab: usize) -> Result<(), PromptError> {
    if ids.is_empty() {
        return Err(PromptError::Empty);
    }
    if ids.len() >= context {
        return Err(PromptError::TooLong {
            prompt: ids.len(),
            context,
        });
    }
    tpi_node::model::config::check_token_ids(ids, vocab).map_err(PromptError::BadToken)
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
        check_context(context.min(max), backend.config()).map_err(Error::Input)?;
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
        req.sampler
            .validate()
            .map_err(|e| Error::Input(e.to_string()))?;
        let vocab = self.backend.config().vocab_size;
        check_prompt(&req.prompt_ids, self.context, vocab)
            .map_err(|e| Error::Input(e.to_string()))?;
        let p = req.prompt_ids.len();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_checked_for_length_room_and_vocabulary() {
        assert_eq!(check_prompt(&[], 8, 10), Err(PromptError::Empty));
        assert_eq!(check_prompt(&[1, 2, 3], 4, 10), Ok(()));
        assert_eq!(
            check_prompt(&[1, 2, 3, 4], 4, 10),
            Err(PromptError::TooLong {
                prompt: 4,
                context: 4
            })
        );
        let e = check_prompt(&[1, 10], 4, 10).unwrap_err().to_string();
        assert!(e.contains("token id 10 is out of range"), "{e}");
    }

    #[test]
    fn a_context_is_at_least_one_position_and_at_most_the_models() {
        let cfg = crate::planner::tests::cfg(4, 2, 64);
        let max = cfg.max_position_embeddings;
        assert!(check_context(0, &cfg).is_err());
        assert!(check_context(1, &cfg).is_ok());
        assert!(check_context(max, &cfg).is_ok());
        let e = check_context(max + 1, &cfg).unwrap_err();
        assert!(
            e.contains("maximum context") && e.contains("KV cache"),
            "{e}"
        );
    }
}
