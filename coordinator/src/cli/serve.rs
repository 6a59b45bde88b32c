//! `tpi serve`: an OpenAI-compatible HTTP server (see `tpi_coordinator::server`).

use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use tpi_coordinator::generate::Session;
use tpi_coordinator::server::{self, ServerConfig};

use super::{ClusterArgs, ModelArgs, SamplingArgs};

/// `tpi serve` flags.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Defaults for requests that do not set them.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Address to listen on (port 0: any free port; the address is printed first).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Model id reported by /v1/models (default: the model file's stem).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Requests that may wait for the generation worker; more are answered 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Keep the KV cache between requests so a shared prompt prefix is not recomputed.
    #[arg(long)]
    pub reuse_prefix: bool,
    /// Longest a request may run, in seconds, from arrival to its last token (0: no
    /// limit). At the limit the answer ends with finish_reason "length"; a request still
    /// in prefill gets a 504.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub request_timeout: f64,
    /// Longest a client may take to send a request's headers, and then its body, in
    /// seconds (an idle keep-alive connection is closed after the same time).
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub read_timeout: f64,
}

/// A positive, finite number of seconds (`what` names the flag).
fn seconds(what: &str, s: f64) -> anyhow::Result<std::time::Duration> {
    if !(s.is_finite() && s > 0.0 && s <= 1e7) {
        anyhow::bail!("{what} must be a number of seconds in (0, 1e7], got {s}");
    }
    Ok(std::time::Duration::from_secs_f64(s))
}

/// Runs `tpi serve` until interrupted.
pub fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let sampler = a.sampling.sampler()?;
    let read_timeout = seconds("--read-timeout", a.read_timeout)?;
    if a.request_timeout != 0.0 {
        seconds("--request-timeout", a.request_timeout)?;
    }
    let model_id = a.model_id.clone().unwrap_or_else(|| {
        let p = &a.model.model;
        let stem = if p.is_dir() {
            p.file_name()
        } else {
            p.file_stem()
        };
        stem.map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let ranks: Vec<Option<String>> = match (&a.cluster.local_cluster, &a.cluster.nodes) {
        (Some(n), _) => (0..(*n).max(1)).map(|_| None).collect(),
        (None, Some(list)) => std::iter::once(None)
            .chain(
                list.iter()
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| Some(s.trim().to_string())),
            )
            .collect(),
        (None, None) => vec![None],
    };
    // The backend is opened before any async runtime exists: the cluster backend runs its
    // own runtime, and the worker thread that owns it is a plain thread.
    let (loaded, backend) = super::open_backend(&a.model, &a.cluster, 0)?;
    let ctx = a
        .model
        .ctx
        .unwrap_or(loaded.files.config.max_position_embeddings);
    let session = Session::new(backend, ctx)?;
    let cfg = ServerConfig {
        model_id,
        sampler,
        max_tokens: a.sampling.max_tokens,
        ignore_eos: a.sampling.ignore_eos,
        max_queue: a.max_queue,
        reuse_prefix: a.reuse_prefix,
        ranks,
        request_timeout: if a.request_timeout == 0.0 {
            None
        } else {
            Some(seconds("--request-timeout", a.request_timeout)?)
        },
        body_timeout: read_timeout,
    };
    let srv = server::build(session, loaded, cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tpi-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let router = srv.router;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.http)
            .await
            .with_context(|| format!("cannot listen on {}", a.http))?;
        let addr = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on http://{addr}")?;
            out.flush()?;
        }
        eprintln!("tpi serve: OpenAI-compatible API at http://{addr}/v1 (Ctrl-C to stop)");
        server::listen::serve(listener, router, read_timeout, shutdown_signal())
            .await
            .context("HTTP server failed")
    })?;
    // Every request is gone with the runtime: the worker sees its queue close and ends,
    // dropping the session (and the local nodes) on its own thread.
    drop(rt);
    let _ = srv.worker.join();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
