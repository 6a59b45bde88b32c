//! Backends that run the model's layers for rank 0: on this device alone, or across a
//! cluster (see [`crate::cluster`]).

use std::time::Instant;

use tpi_kernels::ThreadPool;
use tpi_node::model::forward::{BlockHooks, ForwardTimes, KvDType};
use tpi_node::model::{Head, KvCache, ModelConfig, ModelFiles, RankModel, SplitPlan};
use tpi_node::store::{Shard, Window};
use tpi_node::sys::{disk_read_bytes, peak_rss};

use crate::error::{Error, Result};

pub use tpi_node::proto::RankStep;

/// What one forward step cost.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StepReport {
    /// Tokens in the step (prompt length for prefill, 1 for decode).
    pub tokens: usize,
    /// Wall-clock milliseconds of the step at rank 0.
    pub wall_ms: f64,
    /// Per-rank breakdown (rank 0 first).
    pub ranks: Vec<RankStep>,
}

/// Runs the model for rank 0: embeds tokens, runs every layer, returns logits.
pub trait Backend: Send {
    /// The model's hyper-parameters.
    fn config(&self) -> &ModelConfig;
    /// Drops all KV state and prepares room for `capacity` positions.
    fn reset(&mut self, capacity: usize) -> Result<()>;
    /// Positions the KV cache can hold.
    fn capacity(&self) -> usize;
    /// Runs `tokens` at positions `start..`; returns the logits after the last one.
    fn forward(&mut self, tokens: &[u32], start: usize) -> Result<Vec<f32>>;
    /// The most recent complete step report (in a cluster, worker timings arrive
    /// after the step, so this may lag one step behind).
    fn last_step(&self) -> StepReport;
    /// Every step report since the last call, completed (waits for late worker timings).
    fn take_reports(&mut self) -> Result<Vec<StepReport>>;
    /// Facts about the backend's setup (cluster, shard transfers, windows), as JSON.
    fn info(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// The links measured at session start and the allreduce choices made from them
    /// (None: one rank, nothing to measure).
    fn links(&self) -> Option<&crate::links::LinkReport> {
        None
    }
}

/// All layers on this device.
pub struct LocalBackend {
    head: Head,
    model: RankModel,
    cache: KvCache,
    pool: ThreadPool,
    window: Option<Window>,
    last: StepReport,
    reports: Vec<StepReport>,
}

impl LocalBackend {
    /// Runs from a one-rank shard through a sliding window of `window` blocks (or one
    /// derived from `mem_budget`; neither: the whole shard stays resident).
    pub fn from_shard(
        shard: &Shard,
        threads: usize,
        window: Option<usize>,
        mem_budget: Option<u64>,
        capacity: usize,
        kv_dtype: KvDType,
    ) -> Result<Self> {
        let mut model = shard.rank_model()?;
        model.kv_dtype = kv_dtype;
        let head = shard
            .head()?
            .ok_or_else(|| Error::Input("the shard holds no LM head rows".into()))?;
        let cache = model.new_cache(capacity);
        let window = shard.window(window, mem_budget, cache.bytes() as u64)?;
        Ok(LocalBackend {
            head,
            model,
            cache,
            pool: ThreadPool::new(threads.max(1)),
            window: Some(window),
            last: StepReport::default(),
            reports: Vec::new(),
        })
    }

    /// Loads the model (mapped, not copied) for `threads` compute threads. The weight
    /// views keep the file maps alive, so `files` may be dropped afterwards.
    pub fn new(files: &ModelFiles, threads: usize, kv_dtype: KvDType) -> Result<Self> {
        files.validate()?;
        let plan = SplitPlan::even(&files.config, 1)?;
        let mut model = files.rank_model(&plan.ranks[0])?;
        model.kv_dtype = kv_dtype;
        let head = files.head()?;
        let cache = model.new_cache(0);
        Ok(LocalBackend {
            head,
            model,
            cache,
            pool: ThreadPool::new(threads.max(1)),
            window: None,
            last: StepReport::default(),
            reports: Vec::new(),
        })
    }
}

impl Backend for LocalBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }
    fn reset(&mut self, capacity: usize) -> Result<()> {
        self.cache = self.model.new_cache(capacity);
        Ok(())
    }
    fn capacity(&self) -> usize {
        self.cache.capacity
    }
    fn forward(&mut self, tokens: &[u32], start: usize) -> Result<Vec<f32>> {
        let t0 = Instant::now();
        let n = tokens.len();
        if n == 0 {
            return Err(Error::Input("empty step".into()));
        }
        let read0 = disk_read_bytes().unwrap_or(0);
        let load0 = self
            .window
            .as_ref()
            .map(|w| w.stats().load_s)
            .unwrap_or(0.0);
        let stats0 = self.window.as_ref().map(|w| w.stats()).unwrap_or_default();
        let mut x = self.head.embed(tokens)?;
        let hooks = self.window.as_ref().map(|w| w as &dyn BlockHooks);
        let times: ForwardTimes = self.model.forward_layers::<Error>(
            &self.pool,
            &mut x,
            n,
            start,
            &mut self.cache,
            hooks,
            &mut |_| Ok(()),
        )?;
        let d = self.model.cfg.hidden_size;
        let head_pos = 2 * self.model.cfg.n_layers;
        let tw = Instant::now();
        if let Some(h) = hooks {
            h.before(head_pos);
        }
        let t1 = Instant::now();
        let logits = self.head.logits(&self.pool, &x[(n - 1) * d..])?;
        if let Some(h) = hooks {
            h.after(head_pos);
        }
        let head_s = t1.elapsed().as_secs_f64();
        let head_wait = (t1 - tw).as_secs_f64();
        let stats1 = self.window.as_ref().map(|w| w.stats()).unwrap_or_default();
        self.last = StepReport {
            tokens: n,
            wall_ms: t0.elapsed().as_secs_f64() * 1e3,
            ranks: vec![RankStep {
                rank: 0,
                compute_ms: (times.compute_s + head_s) * 1e3,
                disk_wait_ms: (times.disk_wait_s + head_wait) * 1e3,
                disk_load_ms: (self
                    .window
                    .as_ref()
                    .map(|w| w.stats().load_s)
                    .unwrap_or(0.0)
                    - load0)
                    * 1e3,
                disk_read_bytes: disk_read_bytes().unwrap_or(0).saturating_sub(read0),
                expert_read_bytes: stats1.expert_bytes - stats0.expert_bytes,
                expert_cache_hits: stats1.expert_hits - stats0.expert_hits,
                peak_rss_bytes: peak_rss().unwrap_or(0),
                ..Default::default()
            }],
        };
        self.reports.push(self.last.clone());
        Ok(logits)
    }
    fn last_step(&self) -> StepReport {
        self.last.clone()
    }
    fn take_reports(&mut self) -> Result<Vec<StepReport>> {
        Ok(std::mem::take(&mut self.reports))
    }
    fn info(&self) -> serde_json::Value {
        serde_json::json!({
            "windows": [self.window.as_ref().map(|w| if w.is_streaming() { w.size() } else { 0 }).unwrap_or(0)],
        })
    }
}
