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
    /// Write a random-weight GGUF of a named real shape (streamed; never held in memory),
    /// e.g. `synth --shape llama3-70b --quant q4_k_m --out llama3-70b.gguf`.
    Synth {
        /// Shape: llama3-70b, llama2-70b or llama3-8b.
        #[arg(long)]
        shape: String,
        /// Layers instead of the shape's own (a scaled model with the real tensor sizes).
        #[arg(long)]
        layers: Option<usize>,
        /// Weight quantisation: q4_k_m (llama.cpp's mix of Q4_K and Q6_K) or q4_0.
        #[arg(long, default_value = "q4_k_m")]
        quant: String,
        /// RNG seed of the weights.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output file.
        #[arg(long, required_unless_present_any = ["size_only", "shards_out"], conflicts_with = "shards_out")]
        out: Option<PathBuf>,
        /// Write the ranks' shards into this directory instead of a GGUF (what `tpi shard
        /// --out DIR --nodes N` would make of it), beside a header-only `model.gguf`: for
        /// models whose file and shards do not both fit on the disk.
        #[arg(long, requires = "nodes")]
        shards_out: Option<PathBuf>,
        /// Ranks of the shards (even split), rank 0 included.
        #[arg(long, requires = "shards_out")]
        nodes: Option<usize>,
        /// Row layout of the shards' Q4 matrices (packed or ggml); default: what this
        /// machine's kernels read fastest, as `tpi shard`.
        #[arg(long, requires = "shards_out")]
        layout: Option<String>,
        /// Print the file's length in bytes and write nothing.
        #[arg(long)]
        size_only: bool,
    },
    /// Fuzz the parsers of untrusted input (see tpi_testbed::fuzz); new behaviours are
    /// added to testbed/fuzz/corpus/<target>/, crashes saved to testbed/fuzz/crashes/.
    Fuzz {
        /// Targets (default: all): gguf, safetensors, config, manifest, wire, http, chat.
        #[arg(long, value_delimiter = ',')]
        target: Vec<String>,
        /// Executions per target.
        #[arg(long, default_value_t = 1_000_000)]
        execs: u64,
        /// RNG seed (different seeds explore differently).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Do not add new inputs to the committed corpus.
        #[arg(long)]
        no_save: bool,
    },
}

/// Where `synth` writes: a GGUF file, or the shards of N ranks.
enum SynthOut<'a> {
    File(&'a std::path::Path),
    Shards {
        dir: &'a std::path::Path,
        nodes: usize,
        layout: tpi_kernels::Layout,
    },
}

fn synth(
    shape: &str,
    layers: Option<usize>,
    quant: &str,
    seed: u64,
    out: Option<SynthOut>,
    size_only: bool,
) -> anyhow::Result<()> {
    use tpi_testbed::synth::gguf_model as g;
    let base = g::shape(shape).map_err(anyhow::Error::msg)?;
    if layers == Some(0) || layers.is_some_and(|l| l > 1000) {
        anyhow::bail!("--layers must be 1..=1000");
    }
    let s = g::with_layers(base, layers);
    let q: g::SynthQuant = quant.parse().map_err(anyhow::Error::msg)?;
    if size_only {
        println!("{}", g::file_len(&s, q));
        return Ok(());
    }
    let out = match out {
        Some(SynthOut::File(f)) => f,
        Some(SynthOut::Shards { dir, nodes, layout }) => {
            let t0 = std::time::Instant::now();
            eprintln!(
                "writing the shards of {} ({} layers, {quant}) for {nodes} ranks to {}",
                s.name,
                s.layers,
                dir.display()
            );
            let w = tpi_testbed::synth::shards_out::write_shards(
                &s,
                q,
                seed,
                nodes,
                layout,
                dir,
                |i, n| {
                    if i % 45 == 0 {
                        eprintln!("  tensor {i}/{n}");
                    }
                },
            )
            .map_err(anyhow::Error::msg)?;
            let bytes: u64 = w.manifests.iter().map(|m| m.file_len).sum();
            let secs = t0.elapsed().as_secs_f64();
            for m in &w.manifests {
                println!(
                    "  rank {}: {} blocks, {:.2} GB",
                    m.rank,
                    m.blocks.len(),
                    m.file_len as f64 / 1e9
                );
            }
            println!(
                "{}: {nodes} shards, {bytes} bytes in {secs:.1} s ({:.0} MB/s); model {}",
                dir.display(),
                bytes as f64 / 1e6 / secs.max(1e-9),
                w.model.display()
            );
            return Ok(());
        }
        None => anyhow::bail!("--out or --shards-out is required"),
    };
    let t0 = std::time::Instant::now();
    eprintln!(
        "writing {} ({} layers, {quant}, {:.2} GB) to {}",
        s.name,
        s.layers,
        g::file_len(&s, q) as f64 / 1e9,
        out.display()
    );
    let w = g::write_model(&s, q, seed, out, |i, n| {
        if i % 45 == 0 {
            eprintln!("  tensor {i}/{n}");
        }
    })
    .map_err(anyhow::Error::msg)?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{}: {} tensors, {} bytes in {secs:.1} s ({:.0} MB/s)",
        out.display(),
        w.tensors,
        w.bytes,
        w.bytes as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(())
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
    let cmd = Cli::parse().cmd;
    if let Cmd::Synth {
        shape,
        layers,
        quant,
        seed,
        out,
        shards_out,
        nodes,
        layout,
        size_only,
    } = &cmd
    {
        let out = match (out, shards_out) {
            (Some(f), _) => Some(SynthOut::File(f)),
            (None, Some(dir)) => Some(SynthOut::Shards {
                dir,
                nodes: nodes.unwrap_or(1),
                layout: match layout.as_deref() {
                    None => tpi_node::store::default_layout(),
                    Some(l) => tpi_kernels::Layout::from_name(l)
                        .ok_or_else(|| anyhow::anyhow!("unknown --layout `{l}` (ggml, packed)"))?,
                },
            }),
            (None, None) => None,
        };
        return synth(shape, *layers, quant, *seed, out, *size_only);
    }
    if let Cmd::Fuzz {
        target,
        execs,
        seed,
        no_save,
    } = cmd
    {
        return fuzz(&target, execs, seed, !no_save);
    }
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
    } = cmd
    else {
        unreachable!("handled above");
    };
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
    let emulated = link.is_some() || topology.is_some();
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
    println!("> {prompt}");
    println!("{}", r.json["text"].as_str().unwrap_or("").trim());
    println!();
    println!(
        "first token after {:.1} ms, then {:.2} ms per token ({:.1} tokens/s)",
        r.json["ttft_ms"].as_f64().unwrap_or(0.0),
        r.decode_ms,
        1e3 / r.decode_ms.max(1e-9)
    );
    println!();
    println!("where a token's time went, per rank (ms per token):");
    println!("rank  address                 compute  allreduce wait  allreduce transfer  peak RSS");
    for (i, (c, w, x)) in r.breakdown.iter().enumerate() {
        let addr = if i == 0 {
            "coordinator".to_string()
        } else {
            tb.nodes[i - 1].addr.to_string()
        };
        println!(
            "{i:>4}  {addr:<22} {c:>8.2} {w:>15.2} {x:>19.2}  {:>6.1} MB",
            r.peak_rss.get(i).copied().unwrap_or(0) as f64 / 1e6
        );
    }
    if let Some(&(_, w, x)) = r.breakdown.first() {
        println!();
        println!(
            "{:.0} of {:.0} ms per token is rank 0 waiting on its allreduces (two per layer, over the {}): {}",
            w + x,
            r.decode_ms,
            if emulated { "emulated links" } else { "loopback" },
            if (w + x) > 0.5 * r.decode_ms {
                "the links' latency, not compute, sets the pace"
            } else {
                "compute sets the pace"
            }
        );
    }
    Ok(())
}

fn fuzz(names: &[String], execs: u64, seed: u64, save: bool) -> anyhow::Result<()> {
    use tpi_testbed::fuzz;
    let all = fuzz::targets();
    for n in names {
        if !all.iter().any(|t| t.name == n) {
            let known: Vec<&str> = all.iter().map(|t| t.name).collect();
            anyhow::bail!("unknown fuzz target `{n}` (known: {})", known.join(", "));
        }
    }
    let crash_dir = fuzz::corpus_dir("x")
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("crashes"))
        .unwrap_or_else(|| "crashes".into());
    let mut crashed = false;
    for t in all
        .iter()
        .filter(|t| names.is_empty() || names.iter().any(|n| n == t.name))
    {
        let dir = fuzz::corpus_dir(t.name);
        let corpus = fuzz::read_corpus(&dir);
        let start = std::time::Instant::now();
        let r = fuzz::fuzz(
            t,
            execs,
            seed,
            corpus,
            save.then_some(dir.as_path()),
            Some(&crash_dir.join(t.name)),
        );
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{:<12} {:>10} execs in {secs:>7.1} s ({:>8.0}/s): {} behaviours, corpus {}, {} crash(es)",
            t.name,
            r.execs,
            r.execs as f64 / secs.max(1e-9),
            r.signatures,
            r.corpus,
            r.crashes.len()
        );
        for (input, msg) in r.crashes.iter().take(5) {
            println!("  crash ({} bytes): {msg}", input.len());
        }
        crashed |= !r.crashes.is_empty();
    }
    if crashed {
        anyhow::bail!("crashes found: inputs saved under {}", crash_dir.display());
    }
    Ok(())
}
