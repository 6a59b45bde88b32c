//! `tpi-node`: serves one rank of a tpi cluster.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tpi_node::net::driven::Driven;
use tpi_node::net::emulation::LinkEmulation;
use tpi_node::net::{Credential, TransportOptions};
use tpi_node::worker::{bind, serve, NodeOptions};

#[derive(Parser, Debug)]
#[command(
    name = "tpi-node",
    version,
    about = "A tpi cluster node: holds a slice of every layer and computes it."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve sessions from coordinators, one after another.
    Serve {
        /// Address to listen on (UDP, QUIC).
        #[arg(long, default_value = "0.0.0.0:7070")]
        listen: SocketAddr,
        /// Compute threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Where the node keeps its state (identity, shard cache); default $TPI_CACHE or ~/.cache/tpi.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Use this shard directory (made by `tpi shard`) when it matches the session.
        #[arg(long)]
        shard: Option<PathBuf>,
        /// Stream weights keeping W blocks resident.
        #[arg(long, value_name = "W")]
        window: Option<usize>,
        /// Memory budget (e.g. 1.5GiB) from which the window is derived.
        #[arg(long, value_parser = tpi_node::store::parse_bytes)]
        mem_budget: Option<u64>,
        /// Emulate this link on all outgoing traffic, e.g. 2ms,300mbit[,jitter=0.2ms][,loss=0.1%].
        #[arg(long, conflicts_with = "topology")]
        link: Option<tpi_sim::LinkSpec>,
        /// Emulate the links of this topology file (node index = session rank).
        #[arg(long)]
        topology: Option<PathBuf>,
        /// Cluster credential directory (ca.pem, cert.pem, key.pem), made by `tpi cluster init`.
        /// Default: DATA_DIR/credential, then ~/.config/tpi/credential.
        #[arg(long)]
        credential: Option<PathBuf>,
        /// Do not announce this node over mDNS (`_tpi._udp.local.`).
        #[arg(long)]
        no_mdns: bool,
        /// Name to announce over mDNS (default: the host name).
        #[arg(long)]
        advertise_name: Option<String>,
    },
}

/// $TPI_CACHE, else ~/.cache/tpi (shared with the coordinator on one machine, so a
/// local cluster finds the shards the coordinator wrote).
fn default_data_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("TPI_CACHE") {
        return PathBuf::from(p);
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/tpi"))
        .unwrap_or_else(|| std::env::temp_dir().join("tpi-node"))
}

fn default_credential(data_dir: Option<&PathBuf>) -> Option<PathBuf> {
    let mut c = Vec::new();
    if let Some(d) = data_dir {
        c.push(d.join("credential"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        c.push(PathBuf::from(h).join(".config/tpi/credential"));
    }
    c.into_iter().find(|p| p.join("cert.pem").exists())
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    tpi_kernels::set_isa_from_env()?;
    let Cmd::Serve {
        listen,
        threads,
        data_dir,
        credential,
        shard,
        window,
        mem_budget,
        link,
        topology,
        no_mdns,
        advertise_name,
    } = Cli::parse().cmd;
    let link = match (link, topology) {
        (Some(l), _) => Some(LinkEmulation::uniform(l)),
        (None, Some(t)) => Some(LinkEmulation::with_topology(
            tpi_sim::Topology::load(&t)
                .with_context(|| format!("cannot load topology {}", t.display()))?,
        )),
        (None, None) => None,
    };
    let data_dir = data_dir.unwrap_or_else(default_data_dir);
    if let Some(t) = threads {
        tpi_kernels::pool::check_threads("--threads", t).map_err(anyhow::Error::msg)?;
    }
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let cred_dir = credential
        .or_else(|| default_credential(Some(&data_dir)))
        .context("no cluster credential: pass --credential DIR (made by `tpi cluster init`)")?;
    let credential = Credential::load(&cred_dir)
        .with_context(|| format!("cannot load the credential in {}", cred_dir.display()))?;
    match credential.role()? {
        Some(r) if !r.may_serve() => anyhow::bail!(
            "the credential in {} has role {r}: a node needs a node credential (`tpi cluster issue --role node`)",
            cred_dir.display()
        ),
        Some(_) => {}
        None => tracing::warn!(
            "the credential in {} was issued before roles; it keeps working, but re-issue it with `tpi cluster issue --role node`",
            cred_dir.display()
        ),
    }
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let opts = NodeOptions {
        listen,
        threads,
        credential,
        transport: TransportOptions::default(),
        data_dir,
        shard_dir: shard,
        window,
        mem_budget,
        link,
    };
    // QUIC runs on a runtime that session threads drive while they wait (see `Driven`).
    let net = Arc::new(Driven::new()?);
    let (ep, addr) = {
        let _g = net.handle().enter();
        bind(&opts).with_context(|| format!("cannot listen on {listen}"))?
    };
    // The first stdout line announces the bound address (used by `tpi --local-cluster`).
    println!("listening on {addr}");
    std::io::stdout().flush()?;
    // Announce over mDNS (in the background; dropped, i.e. withdrawn, on exit).
    let _advert = if no_mdns {
        None
    } else {
        let o = tpi_node::discovery::AdvertOptions {
            data_dir: opts.data_dir.clone(),
            listen: addr,
            threads,
            name: advertise_name,
            duplicate_check: std::time::Duration::from_secs(2),
        };
        match tpi_node::discovery::spawn_advert(o) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("no mDNS advert: {e}");
                None
            }
        }
    };
    tracing::info!("tpi-node serving on {addr} with {threads} threads");
    // Serving is a task on `net`; this thread only waits for it to end, since holding the
    // runtime here would keep session threads from driving it.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    net.handle().spawn({
        let net = net.clone();
        async move {
            // SIGINT/SIGTERM end serving gracefully, so the mDNS advert says goodbye.
            let r = async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = serve(ep, opts, net) => {}
                    _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
                    _ = term.recv() => tracing::info!("terminated; stopping"),
                }
                Ok::<_, std::io::Error>(())
            }
            .await;
            let _ = done_tx.send(r);
        }
    });
    done_rx
        .recv()
        .context("the serving task ended without a result")??;
    Ok(())
}
