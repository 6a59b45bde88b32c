//! Which backend a run uses, and opening it.
//!
//! [`choose`] is pure policy: from the flags ([`BackendSpec`]), the model's shape and a
//! few facts about this machine ([`Facts`]) it decides where the ranks are, how many
//! threads each computes with, and which credential directory authenticates them, or
//! says why the flags cannot be served. [`open`] carries the choice out: it reads the
//! credential, spawns or discovers nodes, writes shards and connects. Thread counts and
//! the credential are worked out once, in `choose`.

mod open;

pub use open::{
    auto_ratios, bytes_per_weight, default_credential, has_q4_matrices, local_gemv, open,
    rank0_caps, resolve_nodes,
};

use std::path::PathBuf;

use tpi_kernels::Layout;
use tpi_node::model::{ModelConfig, SplitPlan};
use tpi_node::net::{Policy, WireDType};
use tpi_node::store::Quant;

use crate::{Error, Result};

/// Where the ranks other than rank 0 (this process) are.
#[derive(Clone, Debug, PartialEq)]
pub enum Ranks {
    /// No other rank: this device alone.
    Alone,
    /// `N` ranks in all, N-1 of them `tpi-node` processes spawned on this machine.
    LocalCluster(usize),
    /// Nodes at these `host:port` addresses (unresolved).
    Nodes(Vec<String>),
    /// Nodes found over mDNS: `Some(n)` ranks in all, or every node found.
    Discover(Option<usize>),
}

/// What the user asked for: the run's flags, validated by [`choose`].
#[derive(Clone, Debug)]
pub struct BackendSpec {
    /// Where the other ranks are.
    pub ranks: Ranks,
    /// Rank 0's compute threads (None: all cores, or cores / N for a local cluster).
    pub threads: Option<usize>,
    /// Threads per spawned local node (None: cores / N, at least 1).
    pub node_threads: Option<usize>,
    /// Rank 0's sliding window in blocks (local nodes get the same).
    pub window: Option<usize>,
    /// Rank 0's memory budget in bytes (local nodes get the same).
    pub mem_budget: Option<u64>,
    /// Work ratios of every rank, rank 0 first (None: even, or the planner's for Discover).
    pub ratios: Option<Vec<f64>>,
    /// Rank 0's share of the work relative to a node when `ratios` is None.
    pub coordinator_share: f64,
    /// Where the LM head's rows go.
    pub lm_head: tpi_node::model::HeadSplit,
    /// Element type of every rank's KV cache.
    pub kv_dtype: tpi_node::model::forward::KvDType,
    /// Cluster credential directory (None: [`Facts::default_credential`]).
    pub credential: Option<PathBuf>,
    /// Allreduce policy: one algorithm, or `auto`.
    pub algo: Policy,
    /// Allreduce payload type.
    pub dtype: WireDType,
    /// Weight type of shards made on demand.
    pub quant: Quant,
    /// Q4 row layout of shards made on demand (None: per rank, from its kernel path).
    pub layout: Option<Layout>,
    /// A `tpi shard --out` directory to use instead of the cache.
    pub shards: Option<PathBuf>,
    /// Emulate this link on every rank's outgoing traffic.
    pub link: Option<tpi_sim::LinkSpec>,
    /// Emulate the links of this topology file (index = rank).
    pub topology: Option<PathBuf>,
}

/// What [`choose`] needs to know about this machine and the model file.
#[derive(Clone, Debug, PartialEq)]
pub struct Facts {
    /// Cores of this machine.
    pub cores: usize,
    /// Whether the model's matrices are Q4 ([`has_q4_matrices`]).
    pub q4_matrices: bool,
    /// The Q4 layout this machine's kernel path reads fastest.
    pub default_layout: Layout,
    /// `~/.config/tpi/credential`, when it holds a credential.
    pub default_credential: Option<PathBuf>,
    /// Where spawned local nodes keep their shard cache.
    pub cache_root: PathBuf,
}

/// What to open, with every count resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum Choice {
    /// Compute on this device from the model file itself.
    InPlace {
        /// Compute threads.
        threads: usize,
    },
    /// Compute on this device from a one-rank shard in `layout`. With `or_in_place`, a
    /// shard that cannot be written falls back to [`Choice::InPlace`] (nothing asked for
    /// the shard; it is only faster).
    OneRankShard {
        /// Compute threads.
        threads: usize,
        /// Q4 row layout of the shard.
        layout: Layout,
        /// Whether a failure to write the shard falls back to the model file.
        or_in_place: bool,
    },
    /// Spawn `nodes` local `tpi-node serve` processes and run across them.
    LocalCluster {
        /// Processes to spawn (ranks 1..).
        nodes: usize,
        /// Threads per spawned node.
        node_threads: usize,
        /// Rank 0's threads.
        threads: usize,
        /// Work ratios, rank 0 first (checked against the model).
        ratios: Vec<f64>,
        /// Arguments every spawned node gets after `serve`.
        node_args: Vec<String>,
        /// More threads than cores: every rank parks at once while it waits for an
        /// allreduce instead of busy-polling, which would take the core from a rank still
        /// computing (`TPI_SPIN_US`, when set, still wins).
        park_waiting: bool,
    },
    /// Connect to nodes elsewhere, authenticated with the credential in `credential`.
    Remote {
        /// The listed addresses, or a discovery.
        ranks: Ranks,
        /// Credential directory.
        credential: PathBuf,
        /// Rank 0's threads.
        threads: usize,
    },
}

impl Choice {
    /// Rank 0's compute threads.
    pub fn threads(&self) -> usize {
        match self {
            Choice::InPlace { threads }
            | Choice::OneRankShard { threads, .. }
            | Choice::LocalCluster { threads, .. }
            | Choice::Remote { threads, .. } => *threads,
        }
    }
}

fn input(msg: impl Into<String>) -> Error {
    Error::Input(msg.into())
}

/// Rank weights when none are given: rank 0 `share`, every node 1.
pub fn even_ratios(share: f64, world: usize) -> Vec<f64> {
    std::iter::once(share)
        .chain(std::iter::repeat_n(1.0, world.saturating_sub(1)))
        .collect()
}

/// Decides what to open for `spec` on a machine described by `facts`. Pure.
pub fn choose(spec: &BackendSpec, cfg: &ModelConfig, facts: &Facts) -> Result<Choice> {
    let check = |what: &str, t: Option<usize>| -> Result<()> {
        match t {
            Some(t) => tpi_kernels::pool::check_threads_on(what, t, facts.cores)
                .map(drop)
                .map_err(input),
            None => Ok(()),
        }
    };
    check("--threads", spec.threads)?;
    check("--node-threads", spec.node_threads)?;
    let all_cores = spec.threads.unwrap_or(facts.cores.max(1));
    let credential = |what: &str| -> Result<PathBuf> {
        spec.credential
            .clone()
            .or_else(|| facts.default_credential.clone())
            .ok_or_else(|| {
                input(format!(
                    "{what} needs the cluster credential: pass --credential DIR (made by `tpi cluster init`)"
                ))
            })
    };
    match &spec.ranks {
        Ranks::LocalCluster(0) => Err(input("--local-cluster needs N >= 1")),
        Ranks::Alone | Ranks::LocalCluster(1) => {
            if spec.ratios.is_some() {
                return Err(input(
                    "--ratios needs a cluster (--nodes or --local-cluster N with N >= 2)",
                ));
            }
            let layout = spec.layout.unwrap_or(facts.default_layout);
            // Nothing asks for a shard: read the file in place, unless a packed shard
            // would run faster.
            let in_place = spec.window.is_none()
                && spec.mem_budget.is_none()
                && spec.shards.is_none()
                && spec.quant == Quant::Keep;
            if in_place && !(layout == Layout::Packed && facts.q4_matrices) {
                return Ok(Choice::InPlace { threads: all_cores });
            }
            Ok(Choice::OneRankShard {
                threads: all_cores,
                layout,
                or_in_place: in_place,
            })
        }
        Ranks::LocalCluster(n) => {
            let n = *n;
            let per_rank = (facts.cores / n).max(1);
            let ratios = match &spec.ratios {
                Some(r) if r.len() != n => {
                    return Err(input(format!(
                        "--ratios has {} values for {n} ranks",
                        r.len()
                    )))
                }
                Some(r) => r.clone(),
                None => even_ratios(spec.coordinator_share, n),
            };
            // The plan must exist before any process is spawned for it.
            SplitPlan::new(cfg, &ratios).map_err(|e| input(format!("--local-cluster {n}: {e}")))?;
            let mut node_args = vec![
                "--data-dir".to_string(),
                facts.cache_root.display().to_string(),
            ];
            if let Some(w) = spec.window {
                node_args.extend(["--window".to_string(), w.to_string()]);
            }
            if let Some(b) = spec.mem_budget {
                node_args.extend(["--mem-budget".to_string(), b.to_string()]);
            }
            if let Some(l) = &spec.link {
                node_args.extend(["--link".to_string(), l.to_string()]);
            }
            if let Some(t) = &spec.topology {
                node_args.extend(["--topology".to_string(), t.display().to_string()]);
            }
            // Local nodes are private to this run: do not announce them.
            node_args.push("--no-mdns".to_string());
            let node_threads = spec.node_threads.unwrap_or(per_rank);
            let threads = spec.threads.unwrap_or(per_rank);
            Ok(Choice::LocalCluster {
                nodes: n - 1,
                node_threads,
                threads,
                ratios,
                node_args,
                park_waiting: threads + (n - 1) * node_threads > facts.cores,
            })
        }
        Ranks::Nodes(list) => {
            if list.iter().all(|s| s.trim().is_empty()) {
                return Err(input("--nodes lists no address"));
            }
            Ok(Choice::Remote {
                ranks: spec.ranks.clone(),
                credential: credential("--nodes")?,
                threads: all_cores,
            })
        }
        Ranks::Discover(_) => Ok(Choice::Remote {
            ranks: spec.ranks.clone(),
            credential: credential("--nodes auto")?,
            threads: all_cores,
        }),
    }
}

#[cfg(test)]
mod tests;
