//! Command-line interface: argument types and subcommand dispatch.

mod bench;
mod chat;
mod cluster;
mod nodes;
mod plan;
mod run;
mod serve;
mod shard;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use tpi_coordinator::cluster::{ClusterBackend, ClusterOptions};
use tpi_coordinator::engine::{Backend, LocalBackend, StepReport};
use tpi_coordinator::loader::LoadedModel;
use tpi_coordinator::local::LocalCluster;
use tpi_coordinator::sampler::SamplerConfig;
use tpi_kernels::{DType, Layout};
use tpi_node::model::ModelConfig;
use tpi_node::net::emulation::LinkEmulation;
use tpi_node::net::{Algo, Credential, WireDType};
use tpi_node::store::{default_layout, Quant};

/// tpi: run large language models tensor-parallel across small devices.
#[derive(Parser, Debug)]
#[command(name = "tpi", version, about)]
pub struct Cli {
    /// Log more (repeat for debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub cmd: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a completion for one prompt.
    Run(run::RunArgs),
    /// Chat interactively using the model's chat template.
    Chat(chat::ChatArgs),
    /// Measure kernels and model speed on this machine.
    Bench(bench::BenchArgs),
    /// Manage the cluster credential (CA and device certificates).
    Cluster(cluster::ClusterCmd),
    /// Pre-split a model into per-rank shard directories.
    Shard(shard::ShardArgs),
    /// List the nodes announcing themselves on the local network (mDNS).
    Nodes(nodes::NodesArgs),
    /// Print the split plan for a cluster and the simulator's predicted latency.
    Plan(plan::PlanArgs),
    /// Serve an OpenAI-compatible HTTP API (chat and text completions).
    Serve(serve::ServeArgs),
}

/// Where the model is and how to compute it.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file or an HF model directory (config.json + *.safetensors).
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Context length (prompt + generated); default: the model's maximum.
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Stream weights from disk keeping W blocks resident (rank 0 and local nodes).
    #[arg(long, value_name = "W")]
    pub window: Option<usize>,
    /// Memory budget (e.g. 1.5GiB) from which the window is derived; weights stay
    /// resident when the whole shard fits.
    #[arg(long, value_parser = parse_size)]
    pub mem_budget: Option<u64>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    tpi_node::store::parse_bytes(s)
}

impl ModelArgs {
    /// Threads to use.
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
}

/// Where the other ranks are and how they talk.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Nodes to run across, as host:port,host:port (each a `tpi-node serve`), or
    /// `auto` to find them over mDNS (fastest first; see --n).
    #[arg(long, value_delimiter = ',', conflicts_with = "local_cluster")]
    pub nodes: Option<Vec<String>>,
    /// With --nodes auto: ranks in all, rank 0 included (default: every node found + 1).
    #[arg(long = "n", value_name = "N")]
    pub n: Option<usize>,
    /// Spawn N-1 local tpi-node processes on 127.0.0.1 (rank 0 is this process).
    #[arg(long, value_name = "N")]
    pub local_cluster: Option<usize>,
    /// Allreduce algorithm.
    #[arg(long, default_value = "star")]
    pub allreduce: Algo,
    /// Allreduce payload type (f16 halves the bytes).
    #[arg(long, default_value = "f32")]
    pub allreduce_dtype: WireDType,
    /// Rank 0's share of the work relative to a node (0 = only coordinate).
    #[arg(long, default_value_t = 1.0)]
    pub coordinator_share: f64,
    /// Work ratios of every rank, rank 0 first (e.g. 3,1).
    #[arg(long, value_delimiter = ',')]
    pub ratios: Option<Vec<f64>>,
    /// Threads per local node (default: cores / N, at least 1).
    #[arg(long)]
    pub node_threads: Option<usize>,
    /// Cluster credential directory (from `tpi cluster init`); needed with --nodes.
    #[arg(long)]
    pub credential: Option<PathBuf>,
    /// Print where each step's time went, per rank.
    #[arg(long)]
    pub profile: bool,
    /// Weight type of shards made on demand (keep, q8_0, q4_0, q4_1, f16, f32).
    #[arg(long, default_value = "keep")]
    pub quant: Quant,
    /// Use the shards in this `tpi shard --out` directory.
    #[arg(long)]
    pub shards: Option<PathBuf>,
    /// Row layout of Q4 weights in shards made on demand: packed (what the AVX-512 VNNI
    /// kernel reads without permutes) or ggml. Default: per rank, packed where that rank
    /// runs that kernel (nodes say which kernel they run); there a one-device run of a Q4
    /// model also reads a packed one-rank shard (written once into the cache) instead of
    /// the model file.
    #[arg(long, value_parser = parse_layout)]
    pub layout: Option<Layout>,
    /// Emulate this link on every rank's outgoing traffic (rank 0 and local nodes),
    /// e.g. 2ms,300mbit[,jitter=0.2ms][,loss=0.1%].
    #[arg(long, conflicts_with = "topology")]
    pub link: Option<tpi_sim::LinkSpec>,
    /// Emulate the links of this topology file (index = rank).
    #[arg(long)]
    pub topology: Option<PathBuf>,
}

/// Sampling flags.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// RNG seed (same seed, same output).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Lower a token's logit by this much per time it was already generated (-2 … 2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Lower the logit of every token already generated by this much (-2 … 2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
}

impl SamplingArgs {
    /// The sampler settings, validated.
    pub fn sampler(&self) -> anyhow::Result<SamplerConfig> {
        let s = SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
        };
        s.validate().map_err(anyhow::Error::msg)?;
        Ok(s)
    }
}

/// A cluster backend plus the local nodes it runs on (dropped after the backend, so
/// the session ends cleanly before the processes are killed).
struct WithLocal {
    backend: ClusterBackend,
    _local: Option<LocalCluster>,
}

impl Backend for WithLocal {
    fn config(&self) -> &ModelConfig {
        self.backend.config()
    }
    fn reset(&mut self, capacity: usize) -> tpi_coordinator::Result<()> {
        self.backend.reset(capacity)
    }
    fn capacity(&self) -> usize {
        self.backend.capacity()
    }
    fn forward(&mut self, tokens: &[u32], start: usize) -> tpi_coordinator::Result<Vec<f32>> {
        self.backend.forward(tokens, start)
    }
    fn last_step(&self) -> StepReport {
        self.backend.last_step()
    }
    fn take_reports(&mut self) -> tpi_coordinator::Result<Vec<StepReport>> {
        self.backend.take_reports()
    }
    fn info(&self) -> serde_json::Value {
        self.backend.info()
    }
}

fn resolve_nodes(list: &[String]) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs;
    list.iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .to_socket_addrs()
                .with_context(|| format!("cannot resolve node address `{s}` (expected host:port)"))?
                .next()
                .with_context(|| format!("`{s}` resolves to no address"))
        })
        .collect()
}

fn default_credential() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".config/tpi/credential"))
        .filter(|p| p.join("cert.pem").exists())
}

/// Checks `--ctx` against the model's trained context, naming the KV memory it needs.
pub fn check_ctx(ctx: usize, cfg: &ModelConfig) -> anyhow::Result<()> {
    let max = cfg.max_position_embeddings;
    if ctx == 0 {
        bail!("--ctx must be at least 1");
    }
    if ctx > max {
        let kv = kv_bytes(cfg, ctx);
        bail!(
            "--ctx {ctx} exceeds the model's maximum context of {max} positions (its KV cache would need {} in all; {max} positions need {})",
            human_bytes(kv),
            human_bytes(kv_bytes(cfg, max))
        );
    }
    Ok(())
}

/// Bytes of f32 KV cache for `positions` positions of every layer, summed over all ranks.
pub fn kv_bytes(cfg: &ModelConfig, positions: usize) -> f64 {
    2.0 * 4.0 * cfg.n_layers as f64 * cfg.kv_dim() as f64 * positions as f64
}

/// `1.5 GB`-style size for messages.
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Parses a `--layout` value.
pub fn parse_layout(s: &str) -> Result<Layout, String> {
    Layout::from_name(s).ok_or_else(|| format!("unknown layout `{s}` (ggml, packed)"))
}

/// Whether the model's matrices are Q4 (judged by layer 0's query projection), so that a
/// packed shard would run faster than the file itself.
pub(crate) fn has_q4_matrices(files: &tpi_node::model::ModelFiles) -> bool {
    files
        .store
        .role(&files.config, tpi_node::model::Role::Wq, 0)
        .is_ok_and(|w| matches!(w.dtype, DType::Q4_0 | DType::Q4_1))
}

/// Opens the model and builds the backend that will run it: this device alone, the
/// listed nodes, or a spawned local cluster.
pub fn open_backend(
    m: &ModelArgs,
    c: &ClusterArgs,
    capacity: usize,
) -> anyhow::Result<(LoadedModel, Box<dyn Backend>)> {
    if let Some(t) = m.threads {
        tpi_kernels::pool::check_threads("--threads", t).map_err(anyhow::Error::msg)?;
    }
    if let Some(t) = c.node_threads {
        tpi_kernels::pool::check_threads("--node-threads", t).map_err(anyhow::Error::msg)?;
    }
    let loaded = LoadedModel::open(&m.model)
        .with_context(|| format!("cannot load model {}", m.model.display()))?;
    if let Some(ctx) = m.ctx {
        check_ctx(ctx, &loaded.files.config)?;
    }
    if c.n.is_some() && !c.nodes.as_deref().is_some_and(plan::is_auto) {
        bail!("--n picks discovered nodes; use it with --nodes auto");
    }
    let mut auto_ratios: Option<Vec<f64>> = None;
    let (local, nodes, credential) = match (&c.local_cluster, &c.nodes) {
        (Some(0), _) => bail!("--local-cluster needs N >= 1"),
        (Some(1), _) | (None, None) => {
            if c.ratios.is_some() {
                bail!("--ratios needs a cluster (--nodes or --local-cluster N with N >= 2)");
            }
            let layout = c.layout.unwrap_or_else(default_layout);
            // Nothing asks for a shard: read the file in place, unless a packed shard
            // would run faster (then a failure to write one falls back to the file).
            let in_place = m.window.is_none()
                && m.mem_budget.is_none()
                && c.shards.is_none()
                && c.quant == Quant::Keep;
            if in_place && !(layout == Layout::Packed && has_q4_matrices(&loaded.files)) {
                let backend = LocalBackend::new(&loaded.files, m.threads())?;
                return Ok((loaded, Box::new(backend)));
            }
            let plan = tpi_node::model::SplitPlan::even(&loaded.files.config, 1)?;
            let shards = match tpi_coordinator::shards::ensure_shards(
                &loaded.files,
                &plan,
                c.quant,
                &[layout],
                c.shards.as_deref(),
            ) {
                Ok(d) => d,
                Err(e) if in_place => {
                    tracing::warn!("no packed shard ({e}); reading the model file in place");
                    let backend = LocalBackend::new(&loaded.files, m.threads())?;
                    return Ok((loaded, Box::new(backend)));
                }
                Err(e) => return Err(e.into()),
            };
            let backend = LocalBackend::from_shard(
                &shards[0],
                m.threads(),
                m.window,
                m.mem_budget,
                capacity,
            )?;
            return Ok((loaded, Box::new(backend)));
        }
        (Some(n), _) => {
            let cores = std::thread::available_parallelism()
                .map(|x| x.get())
                .unwrap_or(1);
            let t = c.node_threads.unwrap_or((cores / n).max(1));
            // The plan must exist before any process is spawned for it.
            let weights = match &c.ratios {
                Some(r) if r.len() != *n => bail!("--ratios has {} values for {n} ranks", r.len()),
                Some(r) => r.clone(),
                None => std::iter::once(c.coordinator_share)
                    .chain(std::iter::repeat_n(1.0, n - 1))
                    .collect(),
            };
            tpi_node::model::SplitPlan::new(&loaded.files.config, &weights)
                .with_context(|| format!("--local-cluster {n}"))?;
            let mut extra = vec![
                "--data-dir".to_string(),
                tpi_coordinator::shards::cache_root().display().to_string(),
            ];
            if let Some(w) = m.window {
                extra.extend(["--window".to_string(), w.to_string()]);
            }
            if let Some(b) = m.mem_budget {
                extra.extend(["--mem-budget".to_string(), b.to_string()]);
            }
            if let Some(l) = &c.link {
                extra.extend(["--link".to_string(), l.to_string()]);
            }
            if let Some(t) = &c.topology {
                extra.extend(["--topology".to_string(), t.display().to_string()]);
            }
            // Local nodes are private to this run: do not announce them.
            extra.push("--no-mdns".to_string());
            let lc = LocalCluster::spawn(n - 1, t, &extra)?;
            let (addrs, cred) = (lc.addrs.clone(), lc.credential.clone());
            (Some(lc), addrs, cred)
        }
        (None, Some(list)) if plan::is_auto(list) => {
            let found = plan::discover(c)?;
            if c.ratios.is_none() {
                let t = m.threads();
                let p = plan::auto_ratios(&loaded.files, m, c, &found, t)?;
                tracing::info!("planner ratios {:?}", p.weights);
                auto_ratios = Some(p.weights);
            }
            let dir = c
                .credential
                .clone()
                .or_else(default_credential)
                .context("--nodes auto needs the cluster credential: pass --credential DIR (made by `tpi cluster init`)")?;
            let cred = Credential::load(&dir)
                .with_context(|| format!("cannot load the credential in {}", dir.display()))?;
            (None, found.iter().map(|d| d.addr).collect(), cred)
        }
        (None, Some(list)) => {
            let addrs = resolve_nodes(list)?;
            if addrs.is_empty() {
                bail!("--nodes lists no address");
            }
            let dir = c
                .credential
                .clone()
                .or_else(default_credential)
                .context("--nodes needs the cluster credential: pass --credential DIR (made by `tpi cluster init`)")?;
            let cred = Credential::load(&dir)
                .with_context(|| format!("cannot load the credential in {}", dir.display()))?;
            (None, addrs, cred)
        }
    };
    let threads = match (&c.local_cluster, m.threads) {
        (_, Some(t)) => t,
        (Some(n), None) => {
            let cores = std::thread::available_parallelism()
                .map(|x| x.get())
                .unwrap_or(1);
            (cores / n).max(1)
        }
        _ => m.threads(),
    };
    let opts = ClusterOptions {
        nodes,
        algo: c.allreduce,
        dtype: c.allreduce_dtype,
        ratios: c.ratios.clone().or(auto_ratios),
        coordinator_share: c.coordinator_share,
        threads,
        connect_timeout: std::time::Duration::from_secs(5),
        quant: c.quant,
        layout: c.layout,
        shards: c.shards.clone(),
        window: m.window,
        mem_budget: m.mem_budget,
        link: match (&c.link, &c.topology) {
            (Some(l), _) => Some(LinkEmulation::uniform(*l)),
            (None, Some(t)) => Some(LinkEmulation::with_topology(
                tpi_sim::Topology::load(t)
                    .with_context(|| format!("cannot load topology {}", t.display()))?,
            )),
            (None, None) => None,
        },
    };
    let backend = ClusterBackend::connect(&loaded.files, &credential, &opts, capacity)?;
    Ok((
        loaded,
        Box::new(WithLocal {
            backend,
            _local: local,
        }),
    ))
}

/// A readable per-rank summary of where decode time went (prefill shown separately).
pub fn profile_summary(steps: &[StepReport]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let Some(first) = steps.first() else {
        return s;
    };
    let _ = writeln!(
        s,
        "profile: prefill of {} tokens took {:.1} ms",
        first.tokens, first.wall_ms
    );
    let dec = &steps[1..];
    if dec.is_empty() {
        return s;
    }
    let n = dec.len() as f64;
    let wall: f64 = dec.iter().map(|d| d.wall_ms).sum::<f64>() / n;
    let _ = writeln!(
        s,
        "profile: {} decode steps, {wall:.2} ms/token at rank 0; per rank (ms/token):",
        dec.len()
    );
    let _ = writeln!(
        s,
        "  rank   compute  ar-wait  ar-xfer     idle disk-wait disk-load  disk MB  peak RSS MB"
    );
    for r in 0..first.ranks.len() {
        let avg = |f: &dyn Fn(&tpi_coordinator::engine::RankStep) -> f64| {
            dec.iter()
                .filter_map(|d| d.ranks.get(r))
                .map(f)
                .sum::<f64>()
                / n
        };
        let peak = dec
            .iter()
            .filter_map(|d| d.ranks.get(r))
            .map(|x| x.peak_rss_bytes)
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            s,
            "  {r:>4} {:>9.2} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>8.2} {:>12.1}",
            avg(&|x| x.compute_ms),
            avg(&|x| x.allreduce_wait_ms),
            avg(&|x| x.allreduce_transfer_ms),
            avg(&|x| x.idle_ms),
            avg(&|x| x.disk_wait_ms),
            avg(&|x| x.disk_load_ms),
            avg(&|x| x.disk_read_bytes as f64 / 1e6),
            peak as f64 / 1e6
        );
    }
    s
}

/// Installs the log subscriber (stderr; RUST_LOG overrides).
pub fn init_tracing(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the chosen subcommand.
pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    tpi_kernels::set_isa_from_env()?;
    match cli.cmd {
        Command::Run(a) => run::run(a),
        Command::Chat(a) => chat::chat(a),
        Command::Bench(a) => bench::bench(a),
        Command::Cluster(a) => cluster::cluster(a),
        Command::Shard(a) => shard::shard(a),
        Command::Nodes(a) => nodes::nodes(a),
        Command::Plan(a) => plan::plan(a),
        Command::Serve(a) => serve::serve(a),
    }
}
