//! The node server: accepts authenticated QUIC connections, serves one session at a
//! time (one after another without restarting), and runs its slice of every layer.
//!
//! Each session runs on a thread of its own: its compute runs with the network runtime
//! idle, and every wait on the network (control messages, allreduces) drives the runtime
//! from that thread (see [`Driven`]), so an allreduce costs no thread hand-offs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tpi_kernels::ThreadPool;

use crate::model::forward::BlockHooks;
use crate::model::ModelError;
use crate::net::collective::{
    accept_data_link, accept_data_stream, open_data_link, DATA_STREAM_TAG,
};
use crate::net::driven::Driven;
use crate::net::emulation::LinkEmulation;
use crate::net::frame::{read_frame_of, FrameKind};
use crate::net::wire::{f32_from_le_bytes, MAX_CONTROL, PROTOCOL_VERSION};
use crate::net::{
    Connection, Credential, DataLink, Endpoint, Group, NetError, Stream, TransportOptions,
};
use crate::proto::{FromNode, RankStep, Setup, ToNode, CONTROL_STREAM_TAG};
use crate::store::{Shard, ShardCache, StoreError};
use crate::sys::{disk_read_bytes, peak_rss, reset_peak_rss};

/// How a node serves.
#[derive(Clone)]
pub struct NodeOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Compute threads.
    pub threads: usize,
    /// Cluster credential (peers must present certificates from the same CA).
    pub credential: Credential,
    /// QUIC tuning.
    pub transport: TransportOptions,
    /// Root of the node's state; shards are cached under `data_dir/shards`.
    pub data_dir: PathBuf,
    /// A shard directory given directly (used read-only when it matches the session).
    pub shard_dir: Option<PathBuf>,
    /// Blocks to keep resident (sliding window); None: derive from `mem_budget`.
    pub window: Option<usize>,
    /// Memory budget in bytes from which the window is derived; None with no
    /// `window` keeps the whole shard resident.
    pub mem_budget: Option<u64>,
    /// Emulated links for this node's outgoing traffic (testbed).
    pub link: Option<LinkEmulation>,
}

pub use crate::store::shard::{choose_window, FIXED_OVERHEAD};

/// Largest shard chunk frame a node accepts.
pub const MAX_CHUNK: usize = 16 << 20;
/// Time allowed to set up worker-to-worker links.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the link measurement at session start.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

type Inbox = Arc<Mutex<Option<mpsc::Sender<(Connection, Stream)>>>>;

/// The current session's inbox for data links, waiting up to `within` for a session to
/// open one: a faster peer may dial us while our Setup is still on its way (dropping its
/// stream then closed the peer's connection, and failed the session).
async fn session_inbox(
    inbox: &Inbox,
    within: Duration,
) -> Option<mpsc::Sender<(Connection, Stream)>> {
    let until = Instant::now() + within;
    loop {
        if let Some(tx) = inbox.lock().unwrap().clone() {
            return Some(tx);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Errors of a session at the node.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Transport or protocol.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Model shapes or kernels.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Shard files.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The coordinator sent something out of order or inconsistent.
    #[error("{0}")]
    Protocol(String),
}

/// Binds the endpoint; returns it with its bound address (for `--listen 127.0.0.1:0`).
pub fn bind(opts: &NodeOptions) -> Result<(Endpoint, SocketAddr), NetError> {
    let ep = match &opts.link {
        Some(l) => l.endpoint(opts.listen, true, &opts.credential, &opts.transport)?,
        None => Endpoint::server_with(opts.listen, &opts.credential, &opts.transport)?,
    };
    let addr = ep.local_addr()?;
    Ok((ep, addr))
}

/// Serves sessions on `ep` until the endpoint closes. Each session runs on a thread of its
/// own that drives `net` (the runtime `ep` lives on) while it waits on the network.
pub async fn serve(ep: Endpoint, opts: NodeOptions, net: Arc<Driven>) {
    let pool = Arc::new(ThreadPool::new(opts.threads.max(1)));
    let inbox: Inbox = Arc::new(Mutex::new(None));
    let busy = Arc::new(tokio::sync::Mutex::new(()));
    while let Some(conn) = ep.accept().await {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("refused a connection: {e}");
                continue;
            }
        };
        let (ep, pool, inbox, busy, opts, net) = (
            ep.clone(),
            pool.clone(),
            inbox.clone(),
            busy.clone(),
            opts.clone(),
            net.clone(),
        );
        tokio::spawn(async move {
            let stream = match conn.accept_stream().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("connection from {} failed: {e}", conn.remote_addr());
                    return;
                }
            };
            match stream.tag {
                CONTROL_STREAM_TAG => {
                    if let Err(reason) = may_start_sessions(&conn) {
                        tracing::warn!("refused a session from {}: {reason}", conn.remote_addr());
                        turn_away(&conn, stream, reason).await;
                        return;
                    }
                    // A session that just ended may still be releasing the node: wait a little.
                    let guard = tokio::time::timeout(Duration::from_secs(3), busy.lock()).await;
                    let Ok(_guard) = guard else {
                        turn_away(&conn, stream, "node is busy with another session".into()).await;
                        return;
                    };
                    let peer = conn.remote_addr();
                    tracing::info!("session from {peer}");
                    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                    let spawned = std::thread::Builder::new()
                        .name("tpi-session".into())
                        .spawn({
                            let (conn, inbox) = (conn.clone(), inbox.clone());
                            move || {
                                let r = run_session(&net, &ep, &conn, stream, &pool, &opts, &inbox);
                                let _ = done_tx.send(r);
                            }
                        });
                    let result = match spawned {
                        Ok(_) => done_rx.await.unwrap_or_else(|_| {
                            Err(SessionError::Protocol("the session thread panicked".into()))
                        }),
                        Err(e) => Err(SessionError::Protocol(format!(
                            "cannot start a session thread: {e}"
                        ))),
                    };
                    match result {
                        Ok(()) => tracing::info!("session from {peer} ended"),
                        Err(e) => {
                            tracing::warn!("session from {peer} failed: {e}");
                            // Let the last message (an error, a refusal) reach the
                            // coordinator before the connection goes away.
                            let _ =
                                tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                        }
                    }
                    *inbox.lock().unwrap() = None;
                }
                DATA_STREAM_TAG => match session_inbox(&inbox, LINK_TIMEOUT).await {
                    Some(tx) => {
                        let _ = tx.send((conn, stream)).await;
                    }
                    // Drop just the stream: the connection may carry a session's
                    // control stream whose last message (why it failed) must still
                    // reach the coordinator.
                    None => drop(stream),
                },
                t => conn.close(&format!("unknown stream tag {t:#x}")),
            }
        });
    }
}

/// Whether the peer's certificate allows it to start a session: a coordinator (or both)
/// role. A certificate from before roles is accepted with a warning.
fn may_start_sessions(conn: &Connection) -> Result<(), String> {
    match conn.peer_role() {
        Ok(Some(r)) if r.may_coordinate() => Ok(()),
        Ok(Some(r)) => Err(format!(
            "the certificate of {} has role {r}: only coordinator credentials may start sessions (issue one with `tpi cluster issue --role coordinator`)",
            conn.remote_addr()
        )),
        Ok(None) => {
            tracing::warn!(
                "{} uses a credential issued before roles: accepted as a coordinator; re-issue it with `tpi cluster issue --role coordinator`",
                conn.remote_addr()
            );
            Ok(())
        }
        Err(e) => Err(format!("cannot read the role in the peer's certificate: {e}")),
    }
}

/// Tells the coordinator why the session cannot go on, then fails it.
async fn refuse<T>(ctl: &mut Stream, reason: String) -> Result<T, SessionError> {
    ctl.send_msg(&FromNode::Refused {
        reason: reason.clone(),
    })
    .await?;
    Err(SessionError::Protocol(reason))
}

/// Refuses a session before it starts: says why, and lets that reach the peer.
async fn turn_away(conn: &Connection, mut ctl: Stream, reason: String) {
    let _ = ctl.send_msg(&FromNode::Refused { reason }).await;
    linger(conn, ctl).await;
}

/// Finishes our side of `s` and waits (briefly) for the peer to close, so what we
/// sent last is delivered rather than cut off by the connection closing.
async fn linger(conn: &Connection, mut s: Stream) {
    let _ = s.send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
}

fn validate_setup(s: &Setup) -> Result<(), String> {
    let m = &s.manifest;
    m.check()?;
    m.config.validate().map_err(|e| e.to_string())?;
    m.is_for(&s.model_id, &s.plan_id, s.rank)
        .map_err(|e| format!("the session's manifest {e}"))?;
    if m.plan.world() != s.world as usize || s.rank == 0 || s.rank >= s.world || m.rank != s.rank {
        return Err(format!(
            "rank {} of world {} does not fit a manifest for rank {} of {}",
            s.rank,
            s.world,
            m.rank,
            m.plan.world()
        ));
    }
    if s.addrs.len() != s.world as usize {
        return Err("address list does not match the world size".into());
    }
    Ok(())
}

/// Checks that a shard directory given with `--shard` is the one the session needs.
fn check_given_shard(dir: &std::path::Path, s: &Setup) -> Result<Shard, String> {
    let shard = Shard::open_verified(dir).map_err(|e| e.to_string())?;
    let m = &shard.manifest;
    let want = &s.manifest;
    m.is_for(&want.model_id, &want.plan_id, want.rank)
        .map_err(|e| format!("the local shard {} {e}", dir.display()))?;
    if m != want {
        return Err(format!(
            "the local shard {} differs from the session's manifest",
            dir.display()
        ));
    }
    let bad = shard.corrupt_blocks();
    if !bad.is_empty() {
        return Err(format!(
            "the local shard {} has corrupt blocks {bad:?}",
            dir.display()
        ));
    }
    Ok(shard)
}

/// Runs one session on the calling (session) thread: the handshake and setup as futures
/// on `net`, then the steps, whose compute runs outside the runtime and whose allreduces
/// drive it.
fn run_session(
    net: &Driven,
    ep: &Endpoint,
    conn: &Connection,
    mut ctl: Stream,
    pool: &Arc<ThreadPool>,
    opts: &NodeOptions,
    inbox: &Inbox,
) -> Result<(), SessionError> {
    let setup = net.block_on(handshake(&mut ctl, opts))?;
    let result = net
        .block_on(prepare(ep, conn, &mut ctl, opts, inbox, &setup))
        .and_then(|mut live| run_steps(net, &mut ctl, &mut live, pool));
    if let Err(e) = &result {
        let _ = net.block_on(ctl.send_msg(&FromNode::Error { msg: e.to_string() }));
    }
    result
}

/// Hello, Welcome and Setup; refusals tell the coordinator what differs.
async fn handshake(ctl: &mut Stream, opts: &NodeOptions) -> Result<Setup, SessionError> {
    match ctl.recv_msg::<ToNode>(MAX_CONTROL).await? {
        ToNode::Hello { version } if version == PROTOCOL_VERSION => {}
        ToNode::Hello { version } => {
            let reason = format!(
                "protocol version mismatch: the coordinator speaks {version}, this node speaks {PROTOCOL_VERSION}"
            );
            return refuse(ctl, reason).await;
        }
        other => return refuse(ctl, format!("expected Hello, got {other:?}")).await,
    }
    ctl.send_msg(&FromNode::Welcome {
        version: PROTOCOL_VERSION,
        threads: opts.threads as u32,
        isa: tpi_kernels::active_isa().name().to_string(),
    })
    .await?;
    let setup = match ctl.recv_msg::<ToNode>(MAX_CONTROL).await? {
        ToNode::Setup(s) => *s,
        other => return refuse(ctl, format!("expected Setup, got {other:?}")).await,
    };
    if let Err(reason) = validate_setup(&setup) {
        return refuse(ctl, reason).await;
    }
    Ok(setup)
}

/// Runs `work` (disk reads, hashing: seconds on a large shard) on tokio's blocking pool, so
/// the session's runtime keeps answering the network meanwhile: a runtime blocked for
/// longer than the idle timeout looks like a dead node to the coordinator.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SessionError> + Send + 'static,
) -> Result<T, SessionError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| SessionError::Protocol(format!("the node's loader failed: {e}")))?
}

/// Brings the session's shard to this node: the given `--shard` directory, the intact
/// cached copy, or whatever blocks the coordinator sends for the cache.
async fn obtain_shard(
    ctl: &mut Stream,
    opts: &NodeOptions,
    setup: &Setup,
) -> Result<Shard, SessionError> {
    if let Some(dir) = &opts.shard_dir {
        let (d, s) = (dir.clone(), setup.clone());
        return match off_runtime(move || Ok(check_given_shard(&d, &s))).await? {
            Ok(s) => {
                ctl.send_msg(&FromNode::NeedBlocks(Vec::new())).await?;
                Ok(s)
            }
            Err(reason) => refuse(ctl, reason).await,
        };
    }
    let cache = ShardCache::new(&opts.data_dir.join("shards"));
    let m = &setup.manifest;
    let needs = {
        let (c, m) = (cache.clone(), m.clone());
        off_runtime(move || Ok(c.needs(&m)?)).await?
    };
    let receiver = if needs.is_empty() {
        None
    } else {
        Some(cache.receiver(m)?)
    };
    ctl.send_msg(&FromNode::NeedBlocks(needs.clone())).await?;
    let Some(mut rx) = receiver else {
        let d = cache.dir_for(m);
        return off_runtime(move || Ok(Shard::open(&d)?)).await;
    };
    let mut buf = Vec::new();
    loop {
        match ctl.recv_msg::<ToNode>(MAX_CONTROL).await {
            Ok(ToNode::BlockData { index, offset }) => {
                if let Err(e) =
                    read_frame_of(&mut ctl.recv, FrameKind::Tensor, &mut buf, MAX_CHUNK).await
                {
                    let _ = rx.checkpoint();
                    return Err(e.into());
                }
                rx.write(index, offset, &buf)?;
            }
            Ok(ToNode::BlocksDone) => break,
            Ok(other) => {
                let _ = rx.checkpoint();
                return Err(SessionError::Protocol(format!(
                    "expected shard data, got {other:?}"
                )));
            }
            Err(e) => {
                let _ = rx.checkpoint();
                return Err(e.into());
            }
        }
    }
    off_runtime(move || Ok(rx.finish()?)).await
}

async fn build_links(
    ep: &Endpoint,
    conn: &Connection,
    setup: &Setup,
    inbox_rx: &mut mpsc::Receiver<(Connection, Stream)>,
) -> Result<std::collections::BTreeMap<usize, DataLink>, SessionError> {
    let (rank, world, algo) = (setup.rank as usize, setup.world as usize, setup.algo);
    let peers = algo.peers(rank, world);
    let mut links = std::collections::BTreeMap::new();
    let work = async {
        // Rank 0 opens its link on the control connection; lower workers are dialled;
        // higher workers dial us and arrive through the inbox.
        let higher: Vec<usize> = peers.iter().copied().filter(|&p| p > rank).collect();
        if peers.contains(&0) {
            let l = accept_data_link(conn, rank, world, algo).await?;
            if l.peer() != 0 {
                return Err(SessionError::Protocol(format!(
                    "expected rank 0's link, got rank {}",
                    l.peer()
                )));
            }
            links.insert(0, l);
        }
        for &p in peers.iter().filter(|&&p| p != 0 && p < rank) {
            let addr = setup.addrs[p]
                .ok_or_else(|| SessionError::Protocol(format!("no address for rank {p}")))?;
            let c = ep.connect(addr, LINK_TIMEOUT).await?;
            links.insert(p, open_data_link(&c, rank, world, algo, p).await?);
        }
        let mut got = 0;
        while got < higher.len() {
            let (c, s) = inbox_rx
                .recv()
                .await
                .ok_or_else(|| SessionError::Protocol("inbox closed".into()))?;
            let l = accept_data_stream(&c, s, rank, world, algo).await?;
            if !higher.contains(&l.peer()) || links.contains_key(&l.peer()) {
                return Err(SessionError::Protocol(format!(
                    "unexpected data link from rank {}",
                    l.peer()
                )));
            }
            links.insert(l.peer(), l);
            got += 1;
        }
        Ok::<_, SessionError>(())
    };
    tokio::time::timeout(LINK_TIMEOUT, work)
        .await
        .map_err(|_| {
            SessionError::Protocol(format!(
                "rank {rank}: data links not up within {LINK_TIMEOUT:?}"
            ))
        })??;
    Ok(links)
}

/// A session ready to run steps.
struct Live {
    model: crate::model::RankModel,
    cache: crate::model::KvCache,
    window: crate::store::Window,
    group: Group,
    hidden: usize,
    /// This rank's rows of the LM head, when the plan splits the vocabulary.
    head: Option<crate::model::Head>,
    /// Keeps the shard's files mapped.
    _shard: Shard,
}

/// Brings the shard, builds the model slice, KV cache and window, links up with the other
/// ranks and reports Ready.
async fn prepare(
    ep: &Endpoint,
    conn: &Connection,
    ctl: &mut Stream,
    opts: &NodeOptions,
    inbox: &Inbox,
    setup: &Setup,
) -> Result<Live, SessionError> {
    let (tx, mut rx) = mpsc::channel(16);
    *inbox.lock().unwrap() = Some(tx);
    let rank = setup.rank as usize;
    reset_peak_rss();
    if let Some(l) = &opts.link {
        l.set_ranks(rank, &setup.addrs);
    }
    let shard = obtain_shard(ctl, opts, setup).await?;
    let (window, budget) = (opts.window, opts.mem_budget);
    let (kv_dtype, capacity) = (setup.kv_dtype, setup.capacity as usize);
    let (shard, model, head, cache, window) = off_runtime(move || {
        let mut model = shard.rank_model()?;
        model.kv_dtype = kv_dtype;
        let head = shard.head()?;
        let cache = model.new_cache(capacity);
        let window = shard.window(window, budget, cache.bytes() as u64)?;
        Ok((shard, model, head, cache, window))
    })
    .await?;
    ctl.send_msg(&FromNode::ShardReady).await?;
    match ctl.recv_msg::<ToNode>(MAX_CONTROL).await? {
        ToNode::Links => {}
        ToNode::End => {
            return Err(SessionError::Protocol(
                "the session ended before it began".into(),
            ))
        }
        other => {
            return Err(SessionError::Protocol(format!(
                "expected Links, got {other:?}"
            )))
        }
    }
    let links = build_links(ep, conn, setup, &mut rx).await?;
    let mut group = Group::new(rank, setup.world as usize, setup.algo, setup.dtype, links)?;
    ctl.send_msg(&FromNode::Ready {
        window: if window.is_streaming() {
            window.size() as u32
        } else {
            0
        },
    })
    .await?;
    // Rank 0 measures the links once every rank is Ready; so do we.
    group.probe_within(PROBE_TIMEOUT).await?;
    Ok(Live {
        hidden: shard.manifest.config.hidden_size,
        head,
        model,
        cache,
        window,
        group,
        _shard: shard,
    })
}

/// Serves Step/Reset/End messages until the session ends. Compute runs on this thread
/// with the runtime idle; every network wait drives it (allreduces busy-poll first).
fn run_steps(
    net: &Driven,
    ctl: &mut Stream,
    live: &mut Live,
    pool: &Arc<ThreadPool>,
) -> Result<(), SessionError> {
    let Live {
        model,
        cache,
        window,
        group,
        hidden: d,
        head,
        ..
    } = live;
    let d = *d;
    let spin = crate::net::driven::spin_time();
    let mut buf = Vec::new();
    let mut x = Vec::new();
    let mut last_end = Instant::now();
    loop {
        let msg = net.block_on(ctl.recv_msg::<ToNode>(MAX_CONTROL))?;
        match msg {
            ToNode::Step { start, n } => {
                let idle_s = last_end.elapsed().as_secs_f64();
                let (start, n) = (start as usize, n as usize);
                if n == 0 || start + n > cache.capacity {
                    return Err(SessionError::Protocol(format!(
                        "step of {n} tokens at {start} exceeds the KV capacity {}",
                        cache.capacity
                    )));
                }
                net.block_on(read_frame_of(
                    &mut ctl.recv,
                    FrameKind::Tensor,
                    &mut buf,
                    n * d * 4,
                ))?;
                x.resize(n * d, 0f32);
                f32_from_le_bytes(&buf, &mut x)?;
                let read0 = disk_read_bytes().unwrap_or(0);
                let load0 = window.stats().load_s;
                let expert0 = window.stats();
                let mut wait = 0f64;
                let mut total = 0f64;
                let times = model.forward_layers::<SessionError>(
                    pool,
                    &mut x,
                    n,
                    start,
                    cache,
                    Some(window),
                    &mut |part| {
                        let st = net.block_on_spin(spin, group.allreduce(part))?;
                        wait += st.wait.as_secs_f64();
                        total += st.total.as_secs_f64();
                        Ok(())
                    },
                )?;
                // This rank's logits of the last position, for rank 0 to gather.
                let (mut head_s, mut head_wait) = (0f64, 0f64);
                if let Some(h) = head {
                    let pos = 2 * model.cfg.n_layers;
                    let tw = Instant::now();
                    window.before(pos);
                    let t1 = Instant::now();
                    let logits = h.logits(pool, &x[(n - 1) * d..])?;
                    window.after(pos);
                    head_s = t1.elapsed().as_secs_f64();
                    head_wait = (t1 - tw).as_secs_f64();
                    let bytes = crate::net::wire::f32_to_le_bytes(&logits);
                    net.block_on(crate::net::frame::write_frame(
                        &mut ctl.send,
                        FrameKind::Tensor,
                        &bytes,
                    ))?;
                }
                last_end = Instant::now();
                let ms = |s: f64| s * 1e3;
                net.block_on(ctl.send_msg(&FromNode::StepDone(RankStep {
                    rank: group.rank(),
                    compute_ms: ms(times.compute_s + head_s),
                    allreduce_wait_ms: ms(wait),
                    allreduce_transfer_ms: ms(total - wait),
                    idle_ms: ms(idle_s),
                    disk_wait_ms: ms(times.disk_wait_s + head_wait),
                    disk_load_ms: ms(window.stats().load_s - load0),
                    expert_read_bytes: window.stats().expert_bytes - expert0.expert_bytes,
                    expert_cache_hits: window.stats().expert_hits - expert0.expert_hits,
                    disk_read_bytes: disk_read_bytes().unwrap_or(0).saturating_sub(read0),
                    peak_rss_bytes: peak_rss().unwrap_or(0),
                })))?;
            }
            ToNode::Reset { capacity } => {
                *cache = model.new_cache(capacity as usize);
            }
            ToNode::End => return Ok(()),
            other => {
                return Err(SessionError::Protocol(format!(
                    "unexpected {other:?} during a session"
                )))
            }
        }
    }
}
