//! `tpi-testbed`: the whole emulated-cluster experience in one command.
//!
//! `cargo run -p tpi-testbed -- cluster --nodes 4 --link 2ms,300mbit --model M.gguf`
//! starts 3 `tpi-node` processes with emulated links, runs a generation from this
//! machine as rank 0, prints the text and where the time and memory went, and tears
//! everything down.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tpi_testbed::harness::{netns_available, ClusterSpec, Testbed};

#[derive(Parser)]
#[command(name = "tpi-testbed", about = "Emulated tpi clusters on one machine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start an emulated cluster, run one generation on it, report, tear down.
    Cluster {
        /// Ranks in total (this process is rank 0).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Link on every process's egress, e.g. 2ms,300mbit[,jitter=0.2ms][,loss=0.1%].
        #[arg(long)]
        link: Option<String>,
        /// A topology file instead of --link (e.g. sim/topologies/home-gateway.json).
        #[arg(long, conflicts_with = "link")]
        topology: Option<PathBuf>,
        /// The model (.gguf or HF dir); default: SmolLM2 from the tpi cache.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Prompt text.
        #[arg(long, default_value = "The capital of France is")]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Each node in its own network namespace (root only).
        #[arg(long)]
        netns: bool,
        /// Allreduce algorithm.
        #[arg(long, default_value = "star")]
        allreduce: String,
        /// Threads per node.
        #[arg(long, default_value_t = 1)]
        node_threads: usize,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let Cmd::Cluster {
        nodes,
        link,
        topology,
        model,
        prompt,
        max_tokens,
        netns,
        allreduce,
        node_threads,
    } = Cli::parse().cmd;
    if netns && !netns_available() {
        anyhow::bail!("--netns needs root and iproute2");
    }
    let model = model.unwrap_or_else(tpi_testbed::smollm2_gguf);
    eprintln!(
        "starting {} node(s) ({}; link {})",
        nodes.saturating_sub(1),
        if netns {
            "one network namespace each"
        } else {
            "loopback"
        },
        link.as_deref().unwrap_or("none")
    );
    let tb = Testbed::start(ClusterSpec {
        ranks: nodes,
        link,
        topology,
        netns,
        node_threads,
        node_args: Vec::new(),
    })?;
    let max = max_tokens.to_string();
    let r = tb.run(
        &model,
        &[
            "--prompt",
            &prompt,
            "--max-tokens",
            &max,
            "--threads",
            "1",
            "--allreduce",
            &allreduce,
        ],
    )?;
    println!("{}{}", prompt, r.json["text"].as_str().unwrap_or(""));
    println!();
    println!(
        "ttft {:.1} ms, decode {:.2} ms/token ({:.1} tokens/s)",
        r.json["ttft_ms"].as_f64().unwrap_or(0.0),
        r.decode_ms,
        1e3 / r.decode_ms.max(1e-9)
    );
    println!("rank  address                 compute  ar-wait  ar-xfer  peak RSS");
    for (i, (c, w, x)) in r.breakdown.iter().enumerate() {
        let addr = if i == 0 {
            "coordinator".to_string()
        } else {
            tb.nodes[i - 1].addr.to_string()
        };
        println!(
            "{i:>4}  {addr:<22} {c:>8.2} {w:>8.2} {x:>8.2}  {:>6.1} MB",
            r.peak_rss.get(i).copied().unwrap_or(0) as f64 / 1e6
        );
    }
    Ok(())
}
