//! Command-line interface: argument types and subcommand dispatch.

mod bench;
mod chat;
mod run;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use tpi_coordinator::engine::{Backend, LocalBackend};
use tpi_coordinator::loader::LoadedModel;
use tpi_coordinator::sampler::SamplerConfig;

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

/// Sampling flags.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
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
}

impl SamplingArgs {
    /// The sampler settings, validated.
    pub fn sampler(&self) -> anyhow::Result<SamplerConfig> {
        let s = SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        };
        s.validate().map_err(anyhow::Error::msg)?;
        Ok(s)
    }
}

/// Opens the model and builds the backend that will run it.
pub fn open_backend(m: &ModelArgs) -> anyhow::Result<(LoadedModel, Box<dyn Backend>)> {
    if m.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let loaded = LoadedModel::open(&m.model)
        .with_context(|| format!("cannot load model {}", m.model.display()))?;
    let backend = LocalBackend::new(&loaded.files, m.threads())?;
    Ok((loaded, Box::new(backend)))
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
    match cli.cmd {
        Command::Run(a) => run::run(a),
        Command::Chat(a) => chat::chat(a),
        Command::Bench(a) => bench::bench(a),
    }
}
