//! The node server: accepts authenticated QUIC connections, serves one session at a
//! time (one after another without restarting), and runs its slice of every layer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tpi_kernels::ThreadPool;

use crate::model::forward::SliceSource;
use crate::model::gguf::ggml_dtype;
use crate::model::{ModelError, RankModel, Role, Weight};
use crate::net::collective::{accept_data_link, accept_data_stream, open_data_link, DATA_STREAM_TAG};
use crate::net::frame::{read_frame_of, FrameKind};
use crate::net::wire::{f32_from_le_bytes, PROTOCOL_VERSION};
use crate::net::{Connection, Credential, DataLink, Endpoint, Group, NetError, Stream, TransportOptions};
use crate::proto::{FromNode, NodeStepTimes, Setup, ToNode, CONTROL_STREAM_TAG, MAX_CONTROL};

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
}

/// Largest single weight tensor a node accepts (a guard against hostile sizes).
const MAX_TENSOR_BYTES: u64 = 16 << 30;
/// Time allowed to set up worker-to-worker links.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);

type Inbox = Arc<Mutex<Option<mpsc::Sender<(Connection, Stream)>>>>;

/// Errors of a session at the node.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Transport or protocol.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Model shapes or kernels.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The coordinator sent something out of order or inconsistent.
    #[error("{0}")]
    Protocol(String),
}

/// Binds the endpoint; returns it with its bound address (for `--listen 127.0.0.1:0`).
pub fn bind(opts: &NodeOptions) -> Result<(Endpoint, SocketAddr), NetError> {
    let ep = Endpoint::server_with(opts.listen, &opts.credential, &opts.transport)?;
    let addr = ep.local_addr()?;
    Ok((ep, addr))
}

/// Serves sessions on `ep` until the endpoint closes.
pub async fn serve(ep: Endpoint, opts: NodeOptions) {
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
        let (ep, pool, inbox, busy, threads) = (
            ep.clone(),
            pool.clone(),
            inbox.clone(),
            busy.clone(),
            opts.threads,
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
                    let Ok(_guard) = busy.try_lock() else {
                        let mut s = stream;
                        let _ = s
                            .send_msg(&FromNode::Refused {
                                reason: "node is busy with another session".into(),
                            })
                            .await;
                        return;
                    };
                    let peer = conn.remote_addr();
                    tracing::info!("session from {peer}");
                    match run_session(&ep, &conn, stream, &pool, threads, &inbox).await {
                        Ok(()) => tracing::info!("session from {peer} ended"),
                        Err(e) => tracing::warn!("session from {peer} failed: {e}"),
                    }
                    *inbox.lock().unwrap() = None;
                }
                DATA_STREAM_TAG => {
                    let tx = inbox.lock().unwrap().clone();
                    match tx {
                        Some(tx) => {
                            let _ = tx.send((conn, stream)).await;
                        }
                        None => conn.close("no session is expecting a data link"),
                    }
                }
                t => conn.close(&format!("unknown stream tag {t:#x}")),
            }
        });
    }
}

struct ReceivedWeights(HashMap<(Role, usize), Weight>, bool);

impl SliceSource for ReceivedWeights {
    fn fetch(&self, role: Role, layer: usize) -> Result<Weight, ModelError> {
        self.0
            .get(&(role, layer))
            .cloned()
            .ok_or_else(|| ModelError::MissingTensor(format!("{role:?} of layer {layer}")))
    }
    fn has_bias(&self) -> bool {
        self.1
    }
}

fn validate_setup(s: &Setup) -> Result<(), String> {
    s.config.validate().map_err(|e| e.to_string())?;
    s.plan.check().map_err(|e| e.to_string())?;
    let id = s.plan.id();
    if id != s.plan_id {
        return Err(format!(
            "plan identity differs: the coordinator says {}, the plan it sent hashes to {id}",
            s.plan_id
        ));
    }
    if s.plan.world() != s.world as usize || s.rank == 0 || s.rank >= s.world {
        return Err(format!(
            "rank {} of world {} does not fit a plan of {} ranks",
            s.rank,
            s.world,
            s.plan.world()
        ));
    }
    if s.plan.n_heads != s.config.n_heads
        || s.plan.n_kv_heads != s.config.n_kv_heads
        || s.plan.intermediate_size != s.config.intermediate_size
    {
        return Err("the plan was made for another model shape".into());
    }
    if s.addrs.len() != s.world as usize {
        return Err("address list does not match the world size".into());
    }
    Ok(())
}

async fn run_session(
    ep: &Endpoint,
    conn: &Connection,
    mut ctl: Stream,
    pool: &Arc<ThreadPool>,
    threads: usize,
    inbox: &Inbox,
) -> Result<(), SessionError> {
    match ctl.recv_msg::<ToNode>(MAX_CONTROL).await? {
        ToNode::Hello { version } if version == PROTOCOL_VERSION => {}
        ToNode::Hello { version } => {
            let reason = format!(
                "protocol version mismatch: the coordinator speaks {version}, this node speaks {PROTOCOL_VERSION}"
            );
            ctl.send_msg(&FromNode::Refused { reason: reason.clone() }).await?;
            return Err(SessionError::Protocol(reason));
        }
        other => return Err(SessionError::Protocol(format!("expected Hello, got {other:?}"))),
    }
    ctl.send_msg(&FromNode::Welcome {
        version: PROTOCOL_VERSION,
        threads: threads as u32,
    })
    .await?;
    let setup = match ctl.recv_msg::<ToNode>(MAX_CONTROL).await? {
        ToNode::Setup(s) => *s,
        other => return Err(SessionError::Protocol(format!("expected Setup, got {other:?}"))),
    };
    if let Err(reason) = validate_setup(&setup) {
        ctl.send_msg(&FromNode::Refused { reason: reason.clone() }).await?;
        return Err(SessionError::Protocol(reason));
    }
    let result = session_body(ep, conn, &mut ctl, pool, inbox, &setup).await;
    if let Err(e) = &result {
        let _ = ctl.send_msg(&FromNode::Error { msg: e.to_string() }).await;
    }
    result
}

async fn receive_weights(ctl: &mut Stream, setup: &Setup) -> Result<ReceivedWeights, SessionError> {
    let mut map = HashMap::new();
    let mut buf = Vec::new();
    loop {
        match ctl.recv_msg::<ToNode>(MAX_CONTROL).await? {
            ToNode::Tensor {
                role,
                layer,
                ggml_type,
                rows,
                cols,
            } => {
                let dtype = ggml_dtype(ggml_type)
                    .map_err(|t| SessionError::Protocol(format!("unsupported tensor type {t}")))?;
                let rb = dtype
                    .row_bytes(cols as usize)
                    .ok_or_else(|| SessionError::Protocol(format!("bad tensor width {cols}")))?
                    as u64;
                let bytes = rb
                    .checked_mul(rows)
                    .filter(|&b| b <= MAX_TENSOR_BYTES)
                    .ok_or_else(|| SessionError::Protocol("tensor too large".into()))?;
                if layer as usize >= setup.config.n_layers {
                    return Err(SessionError::Protocol(format!("layer {layer} out of range")));
                }
                read_frame_of(&mut ctl.recv, FrameKind::Tensor, &mut buf, bytes as usize).await?;
                if buf.len() as u64 != bytes {
                    return Err(SessionError::Protocol(format!(
                        "tensor {role:?}/{layer}: got {} bytes, expected {bytes}",
                        buf.len()
                    )));
                }
                let w = Weight::from_vec(dtype, rows as usize, cols as usize, std::mem::take(&mut buf))?;
                map.insert((role, layer as usize), w);
            }
            ToNode::WeightsDone => break,
            other => {
                return Err(SessionError::Protocol(format!("expected a tensor, got {other:?}")))
            }
        }
    }
    Ok(ReceivedWeights(map, setup.config.attention_bias))
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
        .map_err(|_| SessionError::Protocol(format!("rank {rank}: data links not up within {LINK_TIMEOUT:?}")))??;
    Ok(links)
}

async fn session_body(
    ep: &Endpoint,
    conn: &Connection,
    ctl: &mut Stream,
    pool: &Arc<ThreadPool>,
    inbox: &Inbox,
    setup: &Setup,
) -> Result<(), SessionError> {
    let (tx, mut rx) = mpsc::channel(16);
    *inbox.lock().unwrap() = Some(tx);
    let rank = setup.rank as usize;
    let slice = setup.plan.ranks[rank].clone();
    let weights = receive_weights(ctl, setup).await?;
    let model = RankModel::build(&setup.config, &slice, &weights)?;
    drop(weights);
    let links = build_links(ep, conn, setup, &mut rx).await?;
    let mut group = Group::new(rank, setup.world as usize, setup.algo, setup.dtype, links)?;
    let mut cache = model.new_cache(setup.capacity as usize);
    ctl.send_msg(&FromNode::Ready).await?;
    let d = setup.config.hidden_size;
    let mut buf = Vec::new();
    let mut x = Vec::new();
    let mut last_end = Instant::now();
    loop {
        let msg = ctl.recv_msg::<ToNode>(MAX_CONTROL).await?;
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
                read_frame_of(&mut ctl.recv, FrameKind::Tensor, &mut buf, n * d * 4).await?;
                x.resize(n * d, 0f32);
                f32_from_le_bytes(&buf, &mut x)?;
                let handle = tokio::runtime::Handle::current();
                let mut wait = 0f64;
                let mut total = 0f64;
                let times = tokio::task::block_in_place(|| {
                    model.forward_layers::<SessionError>(pool, &mut x, n, start, &mut cache, &mut |part| {
                        let st = handle.block_on(group.allreduce(part))?;
                        wait += st.wait.as_secs_f64();
                        total += st.total.as_secs_f64();
                        Ok(())
                    })
                })?;
                last_end = Instant::now();
                ctl.send_msg(&FromNode::StepDone(NodeStepTimes {
                    compute_s: times.compute_s,
                    reduce_wait_s: wait,
                    reduce_total_s: total,
                    idle_s,
                }))
                .await?;
            }
            ToNode::Reset { capacity } => {
                cache = model.new_cache(capacity as usize);
            }
            ToNode::End => return Ok(()),
            other => {
                return Err(SessionError::Protocol(format!("unexpected {other:?} during a session")))
            }
        }
    }
}
