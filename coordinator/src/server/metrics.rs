//! Server counters and the cluster's health, rendered as Prometheus text and `/health` JSON.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::engine::StepReport;

/// TTFT histogram bucket bounds, seconds.
const TTFT_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// One rank's state as last seen.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeStatus {
    /// Rank index (0 = this process).
    pub rank: usize,
    /// Address, when known.
    pub addr: Option<String>,
    /// `up`, or `down` after a step that failed because of it.
    pub status: &'static str,
    /// Compute time of its last step, ms.
    pub last_compute_ms: Option<f64>,
    /// Allreduce wait of its last step, ms.
    pub last_allreduce_wait_ms: Option<f64>,
}

/// Reads one total of a rank.
type RankField = fn(&RankTotals) -> f64;

#[derive(Default, Clone, Copy)]
struct RankTotals {
    compute_s: f64,
    allreduce_wait_s: f64,
    allreduce_transfer_s: f64,
}

struct Inner {
    requests: BTreeMap<(&'static str, u16), u64>,
    cancelled: BTreeMap<&'static str, u64>,
    timed_out: BTreeMap<&'static str, u64>,
    generated: u64,
    prompt: u64,
    ttft_counts: [u64; TTFT_BUCKETS.len()],
    ttft_sum: f64,
    ttft_n: u64,
    tokens_per_s: f64,
    steps: u64,
    ranks: Vec<RankTotals>,
    nodes: Vec<NodeStatus>,
    error: Option<String>,
    busy: bool,
}

/// Everything `/metrics` and `/health` report.
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Jobs waiting for the worker (not counting the one running).
    pub queue_depth: AtomicI64,
}

impl Metrics {
    /// Fresh counters for a cluster of `addrs.len()` ranks (rank 0 first; address if known).
    pub fn new(addrs: Vec<Option<String>>) -> Self {
        let nodes = addrs
            .into_iter()
            .enumerate()
            .map(|(rank, addr)| NodeStatus {
                rank,
                addr,
                status: "up",
                last_compute_ms: None,
                last_allreduce_wait_ms: None,
            })
            .collect::<Vec<_>>();
        Metrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                cancelled: BTreeMap::new(),
                timed_out: BTreeMap::new(),
                generated: 0,
                prompt: 0,
                ttft_counts: [0; TTFT_BUCKETS.len()],
                ttft_sum: 0.0,
                ttft_n: 0,
                tokens_per_s: 0.0,
                steps: 0,
                ranks: vec![RankTotals::default(); nodes.len()],
                nodes,
                error: None,
                busy: false,
            }),
            queue_depth: AtomicI64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an answered request.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        *self.lock().requests.entry((endpoint, status)).or_default() += 1;
    }

    /// Counts a generation the client abandoned.
    pub fn cancelled(&self, endpoint: &'static str) {
        *self.lock().cancelled.entry(endpoint).or_default() += 1;
    }

    /// Counts a generation stopped by the per-request time limit.
    pub fn timed_out(&self, endpoint: &'static str) {
        *self.lock().timed_out.entry(endpoint).or_default() += 1;
    }

    /// Records a time to first token.
    pub fn ttft(&self, d: Duration) {
        let s = d.as_secs_f64();
        let mut g = self.lock();
        for (i, b) in TTFT_BUCKETS.iter().enumerate() {
            if s <= *b {
                g.ttft_counts[i] += 1;
            }
        }
        g.ttft_sum += s;
        g.ttft_n += 1;
    }

    /// Marks the worker busy or idle.
    pub fn set_busy(&self, busy: bool) {
        self.lock().busy = busy;
    }

    /// Records a finished generation (possibly cut short by its client).
    pub fn generation(
        &self,
        prompt: usize,
        generated: usize,
        tokens_per_s: f64,
        steps: &[StepReport],
    ) {
        let mut g = self.lock();
        g.prompt += prompt as u64;
        g.generated += generated as u64;
        if generated > 1 && tokens_per_s > 0.0 {
            g.tokens_per_s = tokens_per_s;
        }
        g.steps += steps.len() as u64;
        for st in steps {
            for r in &st.ranks {
                if g.ranks.len() <= r.rank {
                    g.ranks.resize(r.rank + 1, RankTotals::default());
                }
                let t = &mut g.ranks[r.rank];
                t.compute_s += r.compute_ms / 1e3;
                t.allreduce_wait_s += r.allreduce_wait_ms / 1e3;
                t.allreduce_transfer_s += r.allreduce_transfer_ms / 1e3;
            }
        }
        if let Some(last) = steps.last() {
            for r in &last.ranks {
                if let Some(n) = g.nodes.iter_mut().find(|n| n.rank == r.rank) {
                    n.status = "up";
                    n.last_compute_ms = Some(r.compute_ms);
                    n.last_allreduce_wait_ms = Some(r.allreduce_wait_ms);
                }
            }
            g.error = None;
        }
    }

    /// Records a backend failure: `/health` turns to `error`, and the rank the message
    /// names (`rank R`) is marked down, or every remote rank when none is named.
    pub fn backend_failed(&self, msg: &str) {
        let mut g = self.lock();
        g.error = Some(msg.to_string());
        // The first `rank N` in the message names the rank at fault.
        let named = msg.match_indices("rank ").find_map(|(i, _)| {
            let rest = &msg[i + 5..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..end].parse::<usize>().ok()
        });
        for n in g.nodes.iter_mut() {
            match named {
                Some(r) if n.rank == r => n.status = "down",
                None if n.rank > 0 => n.status = "down",
                _ => {}
            }
        }
    }

    /// The last backend failure, if the backend has not worked since.
    pub fn error(&self) -> Option<String> {
        self.lock().error.clone()
    }

    /// `/health` body.
    pub fn health_json(&self, model: &str, context: usize) -> serde_json::Value {
        let g = self.lock();
        serde_json::json!({
            "status": if g.error.is_some() { "error" } else { "ok" },
            "model": model,
            "context": context,
            "ranks": g.nodes.len(),
            "nodes": g.nodes,
            "busy": g.busy,
            "queue_depth": self.queue_depth.load(Ordering::Relaxed).max(0),
            "last_error": g.error,
        })
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = self.lock();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP tpi_requests_total HTTP requests answered, by endpoint and status code."
        );
        let _ = writeln!(s, "# TYPE tpi_requests_total counter");
        for ((ep, st), n) in &g.requests {
            let _ = writeln!(
                s,
                "tpi_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP tpi_requests_cancelled_total Generations stopped because the client went away."
        );
        let _ = writeln!(s, "# TYPE tpi_requests_cancelled_total counter");
        if g.cancelled.is_empty() {
            let _ = writeln!(s, "tpi_requests_cancelled_total{{endpoint=\"chat\"}} 0");
        }
        for (ep, n) in &g.cancelled {
            let _ = writeln!(s, "tpi_requests_cancelled_total{{endpoint=\"{ep}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP tpi_requests_timed_out_total Generations stopped by the per-request time limit."
        );
        let _ = writeln!(s, "# TYPE tpi_requests_timed_out_total counter");
        if g.timed_out.is_empty() {
            let _ = writeln!(s, "tpi_requests_timed_out_total{{endpoint=\"chat\"}} 0");
        }
        for (ep, n) in &g.timed_out {
            let _ = writeln!(s, "tpi_requests_timed_out_total{{endpoint=\"{ep}\"}} {n}");
        }
        let _ = writeln!(s, "# HELP tpi_generated_tokens_total Tokens generated.");
        let _ = writeln!(s, "# TYPE tpi_generated_tokens_total counter");
        let _ = writeln!(s, "tpi_generated_tokens_total {}", g.generated);
        let _ = writeln!(
            s,
            "# HELP tpi_prompt_tokens_total Prompt tokens received by generations."
        );
        let _ = writeln!(s, "# TYPE tpi_prompt_tokens_total counter");
        let _ = writeln!(s, "tpi_prompt_tokens_total {}", g.prompt);
        let _ = writeln!(s, "# HELP tpi_ttft_seconds Time from request arrival (queueing included) to the first token.");
        let _ = writeln!(s, "# TYPE tpi_ttft_seconds histogram");
        for (i, b) in TTFT_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                s,
                "tpi_ttft_seconds_bucket{{le=\"{b}\"}} {}",
                g.ttft_counts[i]
            );
        }
        let _ = writeln!(s, "tpi_ttft_seconds_bucket{{le=\"+Inf\"}} {}", g.ttft_n);
        let _ = writeln!(s, "tpi_ttft_seconds_sum {}", g.ttft_sum);
        let _ = writeln!(s, "tpi_ttft_seconds_count {}", g.ttft_n);
        let _ = writeln!(
            s,
            "# HELP tpi_tokens_per_second Decode speed of the last generation."
        );
        let _ = writeln!(s, "# TYPE tpi_tokens_per_second gauge");
        let _ = writeln!(s, "tpi_tokens_per_second {}", g.tokens_per_s);
        let _ = writeln!(
            s,
            "# HELP tpi_steps_total Forward steps run (prefills and decode steps)."
        );
        let _ = writeln!(s, "# TYPE tpi_steps_total counter");
        let _ = writeln!(s, "tpi_steps_total {}", g.steps);
        let per_rank: [(&str, &str, RankField); 3] = [
            (
                "tpi_compute_seconds_total",
                "Seconds each rank spent computing.",
                |t| t.compute_s,
            ),
            (
                "tpi_allreduce_wait_seconds_total",
                "Seconds each rank spent blocked in allreduce waiting for peers.",
                |t| t.allreduce_wait_s,
            ),
            (
                "tpi_allreduce_transfer_seconds_total",
                "Seconds each rank spent transferring and summing allreduce data.",
                |t| t.allreduce_transfer_s,
            ),
        ];
        for (name, help, f) in per_rank {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} counter");
            for (r, t) in g.ranks.iter().enumerate() {
                let _ = writeln!(s, "{name}{{rank=\"{r}\"}} {}", f(t));
            }
        }
        let _ = writeln!(
            s,
            "# HELP tpi_queue_depth Requests waiting for the generation worker."
        );
        let _ = writeln!(s, "# TYPE tpi_queue_depth gauge");
        let _ = writeln!(
            s,
            "tpi_queue_depth {}",
            self.queue_depth.load(Ordering::Relaxed).max(0)
        );
        let _ = writeln!(s, "# HELP tpi_busy 1 while a generation is running.");
        let _ = writeln!(s, "# TYPE tpi_busy gauge");
        let _ = writeln!(s, "tpi_busy {}", g.busy as u8);
        let _ = writeln!(
            s,
            "# HELP tpi_node_up 1 if the rank worked in the last step (0 after it failed)."
        );
        let _ = writeln!(s, "# TYPE tpi_node_up gauge");
        for n in &g.nodes {
            let _ = writeln!(
                s,
                "tpi_node_up{{rank=\"{}\"}} {}",
                n.rank,
                (n.status == "up") as u8
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn backend_failure_marks_the_named_rank_down() {
        let m = Metrics::new(vec![None, None, None]);
        m.backend_failed("cluster step failed: connection to rank 2 (127.0.0.1:1) lost");
        let h = m.health_json("m", 16);
        assert_eq!(h["status"], "error");
        let st: Vec<_> = h["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["status"].clone())
            .collect();
        assert_eq!(st, ["up", "up", "down"]);
        assert!(m.render().contains("tpi_node_up{rank=\"2\"} 0"));
        let m = Metrics::new(vec![None, None]);
        m.backend_failed("something broke");
        assert_eq!(m.health_json("m", 16)["nodes"][1]["status"], "down");
        assert_eq!(m.health_json("m", 16)["nodes"][0]["status"], "up");
    }
}
