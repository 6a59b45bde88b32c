//! `tpi-sim`: predict, plot, and relay through emulated links.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tpi_sim::{
    link::{parse_duration, parse_size},
    plot, predict, quant_bytes_per_weight, report, spawn_relay, Algo, Calibration, Cluster, Device,
    LinkSpec, ModelShape, Topology, Transport, Workload, PRESETS,
};

#[derive(Parser)]
#[command(
    name = "tpi-sim",
    version,
    about = "Link emulator and cluster simulator for tpi"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Predict TTFT, token latency, time split and memory for star/ring/tree.
    Predict {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// star, ring, tree or all.
        #[arg(long, default_value = "all")]
        algo: String,
    },
    /// Write token-latency figures (PNG and SVG) vs link latency, devices and bandwidth.
    Plot {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Also write SVG next to each PNG.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        svg: bool,
    },
    /// Relay UDP or TCP from --listen to --to, applying --link in each direction.
    Relay {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Target address.
        #[arg(long)]
        to: SocketAddr,
        /// Link spec, e.g. 2ms,300mbit,jitter=0.1ms,loss=0.1%.
        #[arg(long)]
        link: LinkSpec,
        /// Relay UDP datagrams (the default).
        #[arg(long, conflicts_with = "tcp")]
        udp: bool,
        /// Relay TCP connections.
        #[arg(long)]
        tcp: bool,
    },
}

#[derive(Args)]
struct ClusterArgs {
    /// Model shape preset.
    #[arg(long, default_value = "llama2-70b")]
    preset: String,
    /// Layers instead of the preset's (a scaled model with its real tensor sizes, as
    /// `tpi-testbed synth --layers` writes).
    #[arg(long)]
    layers: Option<usize>,
    /// Number of devices (ranks).
    #[arg(long, default_value_t = 8)]
    devices: usize,
    /// Link between every pair of devices (ignored for pairs a --topology covers).
    #[arg(long, default_value = "1ms,300mbit")]
    link: LinkSpec,
    /// JSON topology file (see sim/topologies/).
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Weight storage type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, q2_k..q6_k, iq4_xs.
    #[arg(long, default_value = "q4_0")]
    quant: String,
    /// GEMV weight-streaming rate per device, GB/s.
    #[arg(long, default_value_t = 10.0)]
    compute_gbs: f64,
    /// Prefill arithmetic rate per device, GFLOP/s.
    #[arg(long, default_value_t = 50.0)]
    gflops: f64,
    /// Disk read rate per device, GB/s.
    #[arg(long, default_value_t = 2.0)]
    disk_gbs: f64,
    /// Memory budget per device, e.g. 3GiB.
    #[arg(long, default_value = "8GiB")]
    mem_budget: String,
    /// Sliding-window blocks kept resident when streaming.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Generated tokens (sizes the KV cache).
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Software cost per message, e.g. 50us.
    #[arg(long, default_value = "50us")]
    msg_overhead: String,
}

impl ClusterArgs {
    fn build(&self) -> Result<Cluster> {
        let mut shape = ModelShape::preset(&self.preset).with_context(|| {
            format!(
                "unknown preset {:?} (known: {})",
                self.preset,
                PRESETS.join(", ")
            )
        })?;
        shape.bytes_per_weight = quant_bytes_per_weight(&self.quant).with_context(|| {
            format!(
                "unknown quantisation {:?} (known: {})",
                self.quant,
                tpi_kernels::DType::supported_names()
            )
        })?;
        if self.devices == 0 {
            bail!("--devices must be at least 1");
        }
        match self.layers {
            Some(0) => bail!("--layers must be at least 1"),
            Some(l) => shape.layers = l,
            None => {}
        }
        let topology = match &self.topology {
            Some(p) => Topology::load(p)?,
            None => Topology::uniform(self.link),
        };
        let device = Device {
            compute_gbs: self.compute_gbs,
            gflops: self.gflops,
            disk_gbs: self.disk_gbs,
            mem_budget_bytes: parse_size(&self.mem_budget)?,
            window_blocks: self.window,
        };
        Ok(Cluster {
            shape,
            devices: vec![device; self.devices],
            topology,
            calibration: Calibration {
                per_message_overhead: parse_duration(&self.msg_overhead)?,
                ..Calibration::default()
            },
            workload: Workload {
                prompt_len: self.prompt,
                gen_tokens: self.gen,
            },
        })
    }

    fn what(&self) -> String {
        format!("{} {}", self.preset, self.quant)
    }
}

fn main() -> std::process::ExitCode {
    // Output piped into `head` ends the process quietly, as for any Unix tool (Rust
    // ignores SIGPIPE, so every print after the reader left would panic).
    // SAFETY: setting a signal's disposition to the default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Predict { cluster, algo } => {
            let c = cluster.build()?;
            let algos: Vec<Algo> = if algo == "all" {
                Algo::ALL.to_vec()
            } else {
                vec![algo.parse().map_err(anyhow::Error::msg)?]
            };
            let links = match &cluster.topology {
                Some(p) => format!("topology {} ({})", p.display(), c.topology.name),
                None => format!("link {}", cluster.link),
            };
            println!(
                "{}: {:.1} GB of layer weights, {} devices, {links}, prompt {}",
                cluster.what(),
                c.shape.layer_stack_bytes() / 1e9,
                c.devices.len(),
                cluster.prompt
            );
            let preds: Vec<_> = algos.iter().map(|&a| predict(&c, a)).collect();
            print!("{}", report::table(&preds));
        }
        Cmd::Plot { cluster, out, svg } => {
            let c = cluster.build()?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            for fig in plot::standard_figures(&c, cluster.link, &cluster.what()) {
                let stem = format!("{}-{}", cluster.preset, fig.stem);
                let png = out.join(format!("{stem}.png"));
                plot::render(&fig, &png)?;
                println!("wrote {}", png.display());
                if svg {
                    let p = out.join(format!("{stem}.svg"));
                    plot::render(&fig, &p)?;
                    println!("wrote {}", p.display());
                }
            }
        }
        Cmd::Relay {
            listen,
            to,
            link,
            udp: _,
            tcp,
        } => {
            let transport = if tcp { Transport::Tcp } else { Transport::Udp };
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let relay = spawn_relay(transport, listen, to, link).await?;
                eprintln!(
                    "relaying {transport:?} {} -> {to} over {link}",
                    relay.local_addr
                );
                tokio::select! {
                    r = relay.task => r??,
                    _ = tokio::signal::ctrl_c() => {}
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
                anyhow::Ok(())
            })?;
        }
    }
    Ok(())
}
