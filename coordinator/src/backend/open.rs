//! Carrying out a [`Choice`]: the I/O [`choose`] leaves out, and the measurements the
//! planner needs of rank 0 and the model.

use std::net::SocketAddr;
use std::path::PathBuf;

use tpi_kernels::DType;
use tpi_node::model::{ModelConfig, ModelFiles, Role, SplitPlan};
use tpi_node::net::emulation::LinkEmulation;
use tpi_node::net::Credential;
use tpi_node::store::Quant;

use super::{choose, input, BackendSpec, Choice, Facts, Ranks};
use crate::cluster::{ClusterBackend, ClusterOptions};
use crate::discovery::DiscoveredNode;
use crate::engine::{Backend, LocalBackend};
use crate::local::LocalCluster;
use crate::planner::{self, RankCaps};
use crate::{Error, Result};

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

/// Opens the backend `spec` asks for on the model in `files`, with KV room for
/// `capacity` positions (0: the model's maximum).
pub fn open(spec: &BackendSpec, files: &ModelFiles, capacity: usize) -> Result<Box<dyn Backend>> {
    if let (Some(at), None) = (files.store.weights_elsewhere(), &spec.shards) {
        return Err(Error::Input(format!(
            "{} holds no weights, only the model's description: they are in {at}",
            files.path.display()
        )));
    }
    let choice = choose(spec, &files.config, &Facts::probe(files))?;
    let threads = choice.threads();
    let (nodes, credential, ratios, local) = match choice {
        Choice::InPlace { threads } => {
            return Ok(Box::new(LocalBackend::new(files, threads, spec.kv_dtype)?))
        }
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
                    return Ok(Box::new(LocalBackend::new(files, threads, spec.kv_dtype)?));
                }
                Err(e) => return Err(e),
            };
            let backend = LocalBackend::from_shard(
                &shards[0],
                threads,
                spec.window,
                spec.mem_budget,
                capacity,
                spec.kv_dtype,
            )?;
            return Ok(Box::new(backend));
        }
        Choice::LocalCluster {
            nodes,
            node_threads,
            ratios,
            node_args,
            park_waiting,
            ..
        } => {
            let mut env = Vec::new();
            if park_waiting && std::env::var_os("TPI_SPIN_US").is_none() {
                tracing::info!("more threads than cores: waiting ranks park at once");
                tpi_node::net::driven::set_default_spin(std::time::Duration::ZERO);
                env.push(("TPI_SPIN_US".to_string(), "0".to_string()));
            }
            // Given shards: each node maps its own rank's directory instead of receiving a
            // copy into its cache (on one machine, a second copy of every shard).
            let per_node: Vec<Vec<String>> = match &spec.shards {
                Some(dir) => (1..=nodes)
                    .map(|r| {
                        let d = crate::shards::rank_dir(dir, r);
                        vec!["--shard".to_string(), d.display().to_string()]
                    })
                    .collect(),
                None => Vec::new(),
            };
            let lc = LocalCluster::spawn(nodes, node_threads, &node_args, &per_node, &env)?;
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
        lm_head: spec.lm_head,
        kv_dtype: spec.kv_dtype,
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
        .role_shape(&files.config, Role::Wq, 0)
        .is_ok_and(|w| matches!(w.dtype, DType::Q4_0 | DType::Q4_1))
}

/// Bytes per weight of the shards a session with `quant` uses.
pub fn bytes_per_weight(files: &ModelFiles, quant: Quant) -> Result<f64> {
    if let Quant::To(dt) = quant {
        let b = dt.block_len();
        return Ok(dt.row_bytes(b).unwrap_or(4 * b) as f64 / b as f64);
    }
    let w = files.store.role_shape(&files.config, Role::Wq, 0)?;
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
