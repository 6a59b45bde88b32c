//! Command-line interface: argument types and subcommand dispatch.

mod bench;
mod chat;
mod cluster;
mod nodes;
mod plan_cmd;
mod run;
mod serve;
mod shard;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use tpi_coordinator::backend::{self, BackendSpec, Ranks};
use tpi_coordinator::engine::{Backend, StepReport};
use tpi_coordinator::loader::LoadedModel;
use tpi_coordinator::sampler::SamplerConfig;
use tpi_kernels::Layout;
use tpi_node::net::{Policy, WireDType};
use tpi_node::store::Quant;

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
    Plan(plan_cmd::PlanArgs),
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
    /// KV cache element type, on every rank: f32 (exact), or f16 (half the memory; keys
    /// and values rounded once when stored). Measured with f16 against transformers' f32
    /// logits on the random fixtures: max |Δ| 4e-3..3e-2 (of logits up to 10), greedy ids
    /// unchanged; SmolLM2's 64-token greedy continuation identical.
    #[arg(long, default_value = "f32")]
    pub kv_dtype: tpi_node::model::forward::KvDType,
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
    /// Allreduce algorithm: auto (the cheapest of star, mesh and rsag for each payload
    /// size, from the links measured at session start; --profile prints them), star
    /// (2 hops via rank 0; 1 with two ranks), mesh (1 hop: every rank sends to all), rsag
    /// (2 hops, 2(N-1)/N of the payload per rank), ring, tree. All give the same bits on
    /// every rank; auto, star, mesh and rsag give the same bits as each other.
    #[arg(long, default_value = "auto")]
    pub allreduce: Policy,
    /// Allreduce payload type: f32 (exact), or lossy and opt-in: f16 and bf16 (2 bytes an
    /// element), q8 (GGML Q8_0 blocks: 32 int8 with an f16 scale, 1.0625 bytes an element,
    /// 3.8x fewer than f32). Measured at N=2 and 4 against f32 payloads: the random f32
    /// fixtures' logits move by f16 6e-3..8e-3, bf16 7e-2..1e-1, q8 0.15..0.27 (of logits
    /// up to 10), greedy ids unchanged; SmolLM2's 64-token greedy continuation stays
    /// identical with f16, loses 2 tokens at the end with bf16 (N=2) and diverges after 23
    /// tokens with q8 (first-token logits off by 1.2..1.5).
    #[arg(long, default_value = "f32")]
    pub allreduce_dtype: WireDType,
    /// Rank 0's share of the work relative to a node (0 = only coordinate).
    #[arg(long, default_value_t = 1.0)]
    pub coordinator_share: f64,
    /// Where the LM head's vocabulary rows go: auto (split across the ranks when the head
    /// holds at least 100 MB, as a 70B model's 0.6-1 GB head does; rank 0 otherwise),
    /// rank0, or split (every rank computes its rows' logits and sends them to rank 0:
    /// one hop more per token, rank 0's head reads divided by N).
    #[arg(long, default_value = "auto")]
    pub lm_head: tpi_node::model::HeadSplit,
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

/// Parses a `--layout` value.
pub fn parse_layout(s: &str) -> Result<Layout, String> {
    Layout::from_name(s).ok_or_else(|| format!("unknown layout `{s}` (ggml, packed)"))
}

impl ClusterArgs {
    /// The backend these flags and `m`'s ask for (checked further by
    /// [`tpi_coordinator::backend::choose`]).
    pub fn spec(&self, m: &ModelArgs) -> anyhow::Result<BackendSpec> {
        if self.n.is_some() && !self.nodes.as_deref().is_some_and(is_auto) {
            bail!("--n picks discovered nodes; use it with --nodes auto");
        }
        let ranks = match (&self.local_cluster, &self.nodes) {
            (Some(n), _) => Ranks::LocalCluster(*n),
            (None, Some(list)) if is_auto(list) => Ranks::Discover(self.n),
            (None, Some(list)) => Ranks::Nodes(list.clone()),
            (None, None) => Ranks::Alone,
        };
        Ok(BackendSpec {
            ranks,
            threads: m.threads,
            node_threads: self.node_threads,
            window: m.window,
            mem_budget: m.mem_budget,
            kv_dtype: m.kv_dtype,
            ratios: self.ratios.clone(),
            coordinator_share: self.coordinator_share,
            lm_head: self.lm_head,
            credential: self.credential.clone(),
            algo: self.allreduce,
            dtype: self.allreduce_dtype,
            quant: self.quant,
            layout: self.layout,
            shards: self.shards.clone(),
            link: self.link,
            topology: self.topology.clone(),
        })
    }
}

/// Whether `--nodes` asks for discovery.
pub fn is_auto(list: &[String]) -> bool {
    list.len() == 1 && list[0].trim().eq_ignore_ascii_case("auto")
}

/// Opens the model and the backend that will run it: this device alone, the listed
/// nodes, or a spawned local cluster.
pub fn open_backend(
    m: &ModelArgs,
    c: &ClusterArgs,
    capacity: usize,
) -> anyhow::Result<(LoadedModel, Box<dyn Backend>)> {
    let spec = c.spec(m)?;
    let mut loaded = LoadedModel::open(&m.model)
        .with_context(|| format!("cannot load model {}", m.model.display()))?;
    if let (tpi_node::store::shard::Quant::To(dt), None) = (spec.quant, &spec.shards) {
        loaded.files.requantise_to(dt);
    }
    if let Some(ctx) = m.ctx {
        tpi_coordinator::generate::check_context(ctx, &loaded.files.config)
            .map_err(|e| anyhow::anyhow!("--ctx {ctx}: {e}"))?;
    }
    let backend = backend::open(&spec, &loaded.files, capacity)?;
    Ok((loaded, backend))
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
        Command::Plan(a) => plan_cmd::plan(a),
        Command::Serve(a) => serve::serve(a),
    }
}
