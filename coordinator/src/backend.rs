//! Which backend a run uses, and opening it.
//!
//! [`choose`] is pure policy: from the flags ([`BackendSpec`]), the model's shape and a
//! few facts about this machine ([`Facts`]) it decides where the ranks are, how many
//! threads each computes with, and which credential directory authenticates them, or
//! says why the flags cannot be served. [`open`] carries the choice out: it reads the
//! credential, spawns or discovers nodes, writes shards and connects. Thread counts and
//! the credential are worked out once, in `choose`.

use std::net::SocketAddr;
use std::path::PathBuf;

use tpi_kernels::{DType, Layout};
use tpi_node::model::{ModelConfig, ModelFiles, Role, SplitPlan};
use tpi_node::net::emulation::LinkEmulation;
use tpi_node::net::{Algo, Credential, WireDType};
use tpi_node::store::Quant;

use crate::cluster::{ClusterBackend, ClusterOptions};
use crate::discovery::DiscoveredNode;
use crate::engine::{Backend, LocalBackend};
use crate::local::LocalCluster;
use crate::planner::{self, RankCaps};
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
    /// Cluster credential directory (None: [`Facts::default_credential`]).
    pub credential: Option<PathBuf>,
    /// Allreduce algorithm.
    pub algo: Algo,
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

impl Facts {
    /// Reads the facts from this machine and `files`.
    pub fn probe(files: &ModelFiles) -> Self {
        Facts {
            cores: std::thread::available_parallelism()
                .map(|x| x.get())
                .unwrap_or(1),
            q4_matrices: has_q4_matrices(files),
            default_layout: tpi_node::store::default_layout(),
            default_credential: default_credential(),
            cache_root: crate::shards::cache_root(),
        }
    }
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
            Ok(Choice::LocalCluster {
                nodes: n - 1,
                node_threads: spec.node_threads.unwrap_or(per_rank),
                threads: spec.threads.unwrap_or(per_rank),
                ratios,
                node_args,
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

/// Opens the backend `spec` asks for on the model in `files`, with KV room for
/// `capacity` positions (0: the model's maximum).
pub fn open(spec: &BackendSpec, files: &ModelFiles, capacity: usize) -> Result<Box<dyn Backend>> {
    let choice = choose(spec, &files.config, &Facts::probe(files))?;
    let threads = choice.threads();
    let (nodes, credential, ratios, local) = match choice {
        Choice::InPlace { threads } => return Ok(Box::new(LocalBackend::new(files, threads)?)),
        Choice::OneRankShard {
            threads,
            layout,
            or_in_place,
        } => {
            let plan = SplitPlan::even(&files.config, 1)?;
            let shards = match crate::shards::ensure_shards(
                files,
                &plan,
                spec.quant,
                &[layout],
                spec.shards.as_deref(),
            ) {
                Ok(s) => s,
                Err(e) if or_in_place => {
                    tracing::warn!("no packed shard ({e}); reading the model file in place");
                    return Ok(Box::new(LocalBackend::new(files, threads)?));
                }
                Err(e) => return Err(e),
            };
            let backend = LocalBackend::from_shard(
                &shards[0],
                threads,
                spec.window,
                spec.mem_budget,
                capacity,
            )?;
            return Ok(Box::new(backend));
        }
        Choice::LocalCluster {
            nodes,
            node_threads,
            ratios,
            node_args,
            ..
        } => {
            let lc = LocalCluster::spawn(nodes, node_threads, &node_args)?;
            (
                lc.addrs.clone(),
                lc.credential.clone(),
                Some(ratios),
                Some(lc),
            )
        }
        Choice::Remote {
            ranks, credential, ..
        } => {
            let (addrs, ratios) = match ranks {
                Ranks::Discover(n) => {
                    let found = crate::discovery::discover(n)
                        .map_err(|e| Error::Cluster(format!("{e:#}")))?;
                    let ratios = match &spec.ratios {
                        Some(r) => r.clone(),
                        None => {
                            let p = auto_ratios(files, spec, &found, threads)?;
                            tracing::info!("planner ratios {:?}", p.weights);
                            p.weights
                        }
                    };
                    (found.iter().map(|d| d.addr).collect(), Some(ratios))
                }
                Ranks::Nodes(list) => (resolve_nodes(&list)?, spec.ratios.clone()),
                _ => unreachable!("choose returns Remote only for Nodes and Discover"),
            };
            let cred = Credential::load(&credential).map_err(|e| {
                input(format!(
                    "cannot load the credential in {}: {e}",
                    credential.display()
                ))
            })?;
            (addrs, cred, ratios, None)
        }
    };
    let link = match (&spec.link, &spec.topology) {
        (Some(l), _) => Some(LinkEmulation::uniform(*l)),
        (None, Some(t)) => Some(LinkEmulation::with_topology(
            tpi_sim::Topology::load(t)
                .map_err(|e| input(format!("cannot load topology {}: {e}", t.display())))?,
        )),
        (None, None) => None,
    };
    let opts = ClusterOptions {
        nodes,
        algo: spec.algo,
        dtype: spec.dtype,
        ratios,
        coordinator_share: spec.coordinator_share,
        threads,
        connect_timeout: std::time::Duration::from_secs(5),
        quant: spec.quant,
        layout: spec.layout,
        shards: spec.shards.clone(),
        window: spec.window,
        mem_budget: spec.mem_budget,
        link,
    };
    let backend = ClusterBackend::connect(files, &credential, &opts, capacity)?;
    Ok(Box::new(match local {
        Some(lc) => backend.keeping(lc),
        None => backend,
    }))
}

/// Resolves `host:port` strings (blank entries skipped).
pub fn resolve_nodes(list: &[String]) -> Result<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs;
    list.iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .to_socket_addrs()
                .map_err(|e| {
                    input(format!(
                        "cannot resolve node address `{s}` (expected host:port): {e}"
                    ))
                })?
                .next()
                .ok_or_else(|| input(format!("`{s}` resolves to no address")))
        })
        .collect()
}

/// `~/.config/tpi/credential`, when it holds a certificate.
pub fn default_credential() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".config/tpi/credential"))
        .filter(|p| p.join("cert.pem").exists())
}

/// Whether the model's matrices are Q4 (judged by layer 0's query projection), so that a
/// packed shard would run faster than the file itself.
pub fn has_q4_matrices(files: &ModelFiles) -> bool {
    files
        .store
        .role(&files.config, Role::Wq, 0)
        .is_ok_and(|w| matches!(w.dtype, DType::Q4_0 | DType::Q4_1))
}

/// Bytes per weight of the shards a session with `quant` uses.
pub fn bytes_per_weight(files: &ModelFiles, quant: Quant) -> Result<f64> {
    if let Quant::To(dt) = quant {
        let b = dt.block_len();
        return Ok(dt.row_bytes(b).unwrap_or(4 * b) as f64 / b as f64);
    }
    let w = files.store.role(&files.config, Role::Wq, 0)?;
    Ok(w.nbytes() as f64 / (w.rows * w.cols).max(1) as f64)
}

/// Rank 0's GEMV rate with `threads`, measured the way nodes measure the rate they announce.
pub fn local_gemv(threads: usize) -> f64 {
    tpi_node::discovery::measure_gemv_gbs(threads)
}

/// What the planner knows of rank 0: its measured rate times `share`, its RAM, and the
/// embedding tables it holds besides its shard.
pub fn rank0_caps(cfg: &ModelConfig, bpw: f64, threads: usize, share: f64) -> RankCaps {
    let mut r = RankCaps::from_ram(
        local_gemv(threads) * share.max(0.0),
        tpi_node::sys::total_ram().unwrap_or(0),
    );
    r.extra_bytes = planner::rank0_extra_bytes(cfg, bpw);
    r
}

/// The planner's ratios for rank 0 (measured here with `threads`) plus the discovered `nodes`.
pub fn auto_ratios(
    files: &ModelFiles,
    spec: &BackendSpec,
    nodes: &[DiscoveredNode],
    threads: usize,
) -> Result<planner::Planned> {
    let bpw = bytes_per_weight(files, spec.quant)?;
    let mut caps = vec![rank0_caps(
        &files.config,
        bpw,
        threads,
        spec.coordinator_share,
    )];
    caps.extend(
        nodes
            .iter()
            .map(|d| RankCaps::from_ram(d.gemv_gbs.max(1e-3), d.ram)),
    );
    let streaming = spec.window.is_some() || spec.mem_budget.is_some();
    planner::choose_ratios_with_share(&files.config, bpw, &caps, streaming, spec.coordinator_share)
        .map_err(|e| input(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        crate::planner::tests::cfg(8, 4, 256)
    }

    fn spec(ranks: Ranks) -> BackendSpec {
        BackendSpec {
            ranks,
            threads: None,
            node_threads: None,
            window: None,
            mem_budget: None,
            ratios: None,
            coordinator_share: 1.0,
            credential: None,
            algo: Algo::Star,
            dtype: WireDType::F32,
            quant: Quant::Keep,
            layout: None,
            shards: None,
            link: None,
            topology: None,
        }
    }

    fn facts() -> Facts {
        Facts {
            cores: 8,
            q4_matrices: false,
            default_layout: Layout::Ggml,
            default_credential: None,
            cache_root: PathBuf::from("/cache"),
        }
    }

    fn err(s: &BackendSpec, f: &Facts) -> String {
        choose(s, &cfg(), f).unwrap_err().to_string()
    }

    #[test]
    fn alone_reads_the_file_in_place_on_every_core() {
        let c = choose(&spec(Ranks::Alone), &cfg(), &facts()).unwrap();
        assert_eq!(c, Choice::InPlace { threads: 8 });
        let mut s = spec(Ranks::LocalCluster(1));
        s.threads = Some(3);
        assert_eq!(
            choose(&s, &cfg(), &facts()).unwrap(),
            Choice::InPlace { threads: 3 }
        );
    }

    #[test]
    fn a_q4_model_on_a_packed_machine_reads_a_packed_shard_or_the_file() {
        let f = Facts {
            q4_matrices: true,
            default_layout: Layout::Packed,
            ..facts()
        };
        let c = choose(&spec(Ranks::Alone), &cfg(), &f).unwrap();
        assert_eq!(
            c,
            Choice::OneRankShard {
                threads: 8,
                layout: Layout::Packed,
                or_in_place: true
            }
        );
        // An explicit GGML layout reads the file.
        let mut s = spec(Ranks::Alone);
        s.layout = Some(Layout::Ggml);
        assert_eq!(
            choose(&s, &cfg(), &f).unwrap(),
            Choice::InPlace { threads: 8 }
        );
    }

    #[test]
    fn a_window_or_quant_asks_for_a_shard_that_must_be_written() {
        for s in [
            BackendSpec {
                window: Some(2),
                ..spec(Ranks::Alone)
            },
            BackendSpec {
                mem_budget: Some(1 << 30),
                ..spec(Ranks::Alone)
            },
            BackendSpec {
                quant: Quant::To(DType::Q8_0),
                ..spec(Ranks::Alone)
            },
            BackendSpec {
                shards: Some("/s".into()),
                ..spec(Ranks::Alone)
            },
        ] {
            assert_eq!(
                choose(&s, &cfg(), &facts()).unwrap(),
                Choice::OneRankShard {
                    threads: 8,
                    layout: Layout::Ggml,
                    or_in_place: false
                }
            );
        }
    }

    #[test]
    fn a_local_cluster_splits_the_cores_and_passes_the_flags_on() {
        let mut s = spec(Ranks::LocalCluster(4));
        s.window = Some(3);
        s.link = Some("2ms,100mbit".parse().unwrap());
        let Choice::LocalCluster {
            nodes,
            node_threads,
            threads,
            ratios,
            node_args,
        } = choose(&s, &cfg(), &facts()).unwrap()
        else {
            panic!("not a local cluster")
        };
        assert_eq!((nodes, node_threads, threads), (3, 2, 2));
        assert_eq!(ratios, vec![1.0; 4]);
        assert_eq!(&node_args[..2], ["--data-dir", "/cache"]);
        assert!(node_args.windows(2).any(|w| w == ["--window", "3"]));
        assert!(node_args.iter().any(|a| a == "--link"));
        assert_eq!(node_args.last().unwrap(), "--no-mdns");
        // As many ranks as cores: one thread each, unless a flag says otherwise.
        s.ranks = Ranks::LocalCluster(8);
        s.node_threads = Some(5);
        let c = choose(&s, &cfg(), &facts()).unwrap();
        assert!(matches!(
            c,
            Choice::LocalCluster {
                node_threads: 5,
                threads: 1,
                ..
            }
        ));
    }

    #[test]
    fn ratios_are_checked_against_the_ranks_and_the_model() {
        let mut s = spec(Ranks::LocalCluster(2));
        s.ratios = Some(vec![1.0, 2.0, 3.0]);
        assert!(err(&s, &facts()).contains("--ratios has 3 values for 2 ranks"));
        s.ratios = Some(vec![0.0, 0.0]);
        assert!(err(&s, &facts()).contains("--local-cluster 2"));
        s.ratios = Some(vec![1.0]);
        s.ranks = Ranks::Alone;
        assert!(err(&s, &facts()).contains("--ratios needs a cluster"));
        s.ratios = None;
        s.coordinator_share = 0.0;
        s.ranks = Ranks::LocalCluster(3);
        let Choice::LocalCluster { ratios, .. } = choose(&s, &cfg(), &facts()).unwrap() else {
            panic!()
        };
        assert_eq!(ratios, vec![0.0, 1.0, 1.0]);
    }

    #[test]
    fn absurd_counts_are_refused() {
        assert!(err(&spec(Ranks::LocalCluster(0)), &facts()).contains("needs N >= 1"));
        let mut s = spec(Ranks::Alone);
        s.threads = Some(0);
        assert!(err(&s, &facts()).contains("--threads must be at least 1"));
        s.threads = Some(33);
        assert!(err(&s, &facts()).contains("at most 32"));
        s.threads = None;
        s.node_threads = Some(1000);
        assert!(err(&s, &facts()).contains("--node-threads 1000"));
        let s = spec(Ranks::Nodes(vec![" ".into()]));
        assert!(err(&s, &facts()).contains("--nodes lists no address"));
    }

    #[test]
    fn remote_ranks_need_a_credential_given_or_default() {
        let s = spec(Ranks::Nodes(vec!["10.0.0.2:7000".into()]));
        assert!(err(&s, &facts()).contains("--nodes needs the cluster credential"));
        let s = spec(Ranks::Discover(Some(3)));
        assert!(err(&s, &facts()).contains("--nodes auto needs the cluster credential"));
        let f = Facts {
            default_credential: Some("/home/u/.config/tpi/credential".into()),
            ..facts()
        };
        assert_eq!(
            choose(&s, &cfg(), &f).unwrap(),
            Choice::Remote {
                ranks: Ranks::Discover(Some(3)),
                credential: "/home/u/.config/tpi/credential".into(),
                threads: 8
            }
        );
        let mut s = spec(Ranks::Nodes(vec!["a:1".into()]));
        s.credential = Some("/given".into());
        s.threads = Some(2);
        assert_eq!(
            choose(&s, &cfg(), &f).unwrap(),
            Choice::Remote {
                ranks: Ranks::Nodes(vec!["a:1".into()]),
                credential: "/given".into(),
                threads: 2
            }
        );
    }
}
