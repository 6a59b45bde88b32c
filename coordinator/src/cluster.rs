//! Rank 0 of a tensor-parallel cluster: connects to the nodes, hands out the split
//! plan and their weight slices, and runs each step with them (rank 0 is the hub of
//! the star allreduce and also computes its own slice unless its share is 0).
//!
//! Over 600 lines on purpose: this is rank 0's half of the session protocol, kept whole
//! until it and the node's half (`node/src/worker.rs`) become one state machine.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::future::{join_all, try_join_all};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tpi_kernels::{Layout, ThreadPool};
use tpi_node::model::forward::BlockHooks;
use tpi_node::model::{Head, KvCache, ModelConfig, ModelFiles, RankModel, SplitPlan};
use tpi_node::net::collective::open_data_link;
use tpi_node::net::driven::Driven;
use tpi_node::net::frame::{read_frame, write_frame, FrameKind};
use tpi_node::net::wire::{
    decode, f32_from_le_bytes, f32_to_le_bytes, MAX_CONTROL, PROTOCOL_VERSION,
};
use tpi_node::net::{
    Connection, Credential, Endpoint, Group, Policy, Stream, TransportOptions, WireDType,
};
use tpi_node::proto::{FromNode, Setup, ToNode, CONTROL_STREAM_TAG};
use tpi_node::store::{default_layout, layout_for_isa, Quant, Shard, Window};
use tpi_node::sys::{disk_read_bytes, peak_rss};

use crate::engine::{Backend, RankStep, StepReport};
use crate::error::{Error, Result};

/// How to build the cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Node addresses; node i becomes rank i+1.
    pub nodes: Vec<SocketAddr>,
    /// Allreduce policy: one algorithm, or `auto` (the cost model's choice per payload
    /// over links measured at session start).
    pub algo: Policy,
    /// Allreduce payload type.
    pub dtype: WireDType,
    /// Capability weight of every rank, rank 0 first (None: rank 0 `coordinator_share`, nodes 1).
    pub ratios: Option<Vec<f64>>,
    /// Rank 0's weight when `ratios` is None; 0 makes rank 0 only coordinate.
    pub coordinator_share: f64,
    /// Where the LM head's rows go.
    pub lm_head: tpi_node::model::HeadSplit,
    /// Element type of every rank's KV cache.
    pub kv_dtype: tpi_node::model::forward::KvDType,
    /// Rank 0's compute threads.
    pub threads: usize,
    /// Time allowed to reach each node.
    pub connect_timeout: Duration,
    /// Weight type of the shards made on demand.
    pub quant: Quant,
    /// Row layout of Q4 matrices in the shards made on demand; None: per rank, from the
    /// kernel path it runs ([`tpi_node::store::layout_for_isa`]).
    pub layout: Option<tpi_kernels::Layout>,
    /// A `tpi shard --out` directory to use instead of the cache.
    pub shards: Option<std::path::PathBuf>,
    /// Rank 0's sliding window (blocks); None: from `mem_budget`.
    pub window: Option<usize>,
    /// Rank 0's memory budget, bytes.
    pub mem_budget: Option<u64>,
    /// Emulated links for rank 0's outgoing traffic (testbed).
    pub link: Option<tpi_node::net::emulation::LinkEmulation>,
}

/// Shard bytes sent to each node when the session started (0 when its cache was complete).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SetupReport {
    /// Bytes sent per node, rank 1 first.
    pub shard_bytes_sent: Vec<u64>,
    /// Per node, rank 1 first: milliseconds from its shard's first block sent to its
    /// `ShardReady` (received, verified, loaded); 0 when it needed nothing.
    pub shard_transfer_ms: Vec<f64>,
    /// Blocks resident per rank's window (0: whole shard resident), rank 0 first.
    pub windows: Vec<u32>,
    /// The plan's identity.
    pub plan_id: String,
    /// The LM head rows (vocabulary ids) whose logits each rank computes, rank 0 first.
    pub vocab: Vec<std::ops::Range<usize>>,
    /// The links measured at session start and the allreduce algorithm per payload.
    pub links: Option<crate::links::LinkReport>,
}

/// Chunk size of shard transfers.
const CHUNK: usize = 4 << 20;

/// Time allowed for the link measurement at session start (a fraction of a second on
/// 5 ms links with 8 ranks).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

struct Node {
    addr: SocketAddr,
    conn: Connection,
    ctl: Stream,
}

/// The cluster backend for rank 0.
pub struct ClusterBackend {
    /// Runs the QUIC endpoint; the engine thread drives it while it waits (see [`Driven`]).
    net: Driven,
    endpoint: Endpoint,
    nodes: Vec<Node>,
    group: Group,
    head: Head,
    model: RankModel,
    cache: KvCache,
    pool: ThreadPool,
    plan: SplitPlan,
    window: Window,
    setup: SetupReport,
    last: StepReport,
    /// Rank 0's part of the step whose worker timings are still in flight.
    pending: Option<StepReport>,
    reports: Vec<StepReport>,
    last_end: Instant,
    /// Spawned local nodes this session runs on. Last, so they are killed only after
    /// [`Drop`] has ended the sessions and every other field is gone.
    local: Option<crate::local::LocalCluster>,
}

fn node_err(addr: SocketAddr, rank: usize, e: impl std::fmt::Display) -> Error {
    Error::Cluster(format!("node {addr} (rank {rank}): {e}"))
}

async fn expect_msg(node: &mut Node, rank: usize) -> Result<FromNode> {
    let m = node
        .ctl
        .recv_msg::<FromNode>(MAX_CONTROL)
        .await
        .map_err(|e| node_err(node.addr, rank, e))?;
    said(node.addr, rank, m)
}

/// A node's message, or the error it reports (a refusal, or a failure at the node).
fn said(addr: SocketAddr, rank: usize, m: FromNode) -> Result<FromNode> {
    match m {
        FromNode::Refused { reason } => Err(node_err(
            addr,
            rank,
            format!("refused the session: {reason}"),
        )),
        FromNode::Error { msg } => Err(node_err(addr, rank, format!("failed: {msg}"))),
        m => Ok(m),
    }
}

/// Waits for the node to say its shard is verified and loaded (however long its transfer
/// and its checks take: the connection's keep-alives tell a dead node from a busy one).
async fn shard_ready(node: &mut Node, rank: usize) -> Result<()> {
    match expect_msg(node, rank).await? {
        FromNode::ShardReady => Ok(()),
        other => Err(node_err(node.addr, rank, format!("unexpected {other:?}"))),
    }
}

/// The reason a node gives on its control stream for failing (a refusal, or an error
/// naming what failed there), if one arrives within half a second; step timings it sent
/// before are passed over. When a node fails, what the coordinator notices first is
/// usually just the stream or connection going away.
async fn reported(node: &mut Node, rank: usize) -> Option<Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    loop {
        let next = tokio::time::timeout_at(deadline, node.ctl.recv_msg::<FromNode>(MAX_CONTROL));
        match next.await {
            Ok(Ok(FromNode::StepDone(_))) => continue,
            Ok(Ok(m)) => return said(node.addr, rank, m).err(),
            _ => return None,
        }
    }
}

/// `e`, or better the reason the node gives for it ([`reported`]).
async fn with_reason(node: &mut Node, rank: usize, e: Error) -> Error {
    reported(node, rank).await.unwrap_or(e)
}

async fn send(node: &mut Node, rank: usize, msg: &ToNode) -> Result<()> {
    node.ctl
        .send_msg(msg)
        .await
        .map_err(|e| node_err(node.addr, rank, e))
}

/// Each rank's shard layout: `asked` for every rank if given, else the one its kernels read
/// fastest: `own` for rank 0, and from each node's reported kernel path for the others.
fn rank_layouts(asked: Option<Layout>, own: Layout, node_isas: &[String]) -> Vec<Layout> {
    match asked {
        Some(l) => vec![l; node_isas.len() + 1],
        None => std::iter::once(own)
            .chain(node_isas.iter().map(|i| layout_for_isa(i)))
            .collect(),
    }
}

impl ClusterBackend {
    /// Connects to every node, plans the split, ships each node its slices and builds the links.
    pub fn connect(
        files: &ModelFiles,
        credential: &Credential,
        opts: &ClusterOptions,
        capacity: usize,
    ) -> Result<Self> {
        files.validate()?;
        let cfg = files.config.clone();
        let world = opts.nodes.len() + 1;
        let weights = match &opts.ratios {
            Some(r) if r.len() != world => {
                return Err(Error::Input(format!(
                    "--ratios has {} values for {world} ranks (rank 0 plus {} nodes)",
                    r.len(),
                    opts.nodes.len()
                )))
            }
            Some(r) => r.clone(),
            None => crate::backend::even_ratios(opts.coordinator_share, world),
        };
        let plan = SplitPlan::for_model(files, &weights, opts.lm_head)?;
        let net = Driven::new().map_err(|e| Error::Io(e.to_string()))?;
        let endpoint = {
            let _g = net.handle().enter();
            let bind = "0.0.0.0:0".parse().unwrap();
            match &opts.link {
                Some(l) => {
                    let addrs: Vec<Option<SocketAddr>> = std::iter::once(None)
                        .chain(opts.nodes.iter().map(|a| Some(*a)))
                        .collect();
                    l.set_ranks(0, &addrs);
                    l.endpoint(bind, false, credential, &TransportOptions::default())?
                }
                None => Endpoint::client_bind(bind, credential, &TransportOptions::default())?,
            }
        };
        let (mut nodes, isas): (Vec<Node>, Vec<String>) = net.block_on(async {
            // Reach every node at once; the slowest bounds the wait.
            let joined: Vec<(Node, String)> = try_join_all(opts.nodes.iter().enumerate().map(|(i, &addr)| {
                let ep = endpoint.clone();
                async move {
                    let rank = i + 1;
                    let conn = ep
                        .connect(addr, opts.connect_timeout)
                        .await
                        .map_err(|e| node_err(addr, rank, e))?
                        .with_peer_name(&format!("rank {rank} ({addr})"));
                    match conn.peer_role().map_err(|e| node_err(addr, rank, e))? {
                        Some(r) if !r.may_serve() => {
                            return Err(node_err(
                                addr,
                                rank,
                                format!("its certificate has role {r}, not node: it is not a node of this cluster"),
                            ))
                        }
                        _ => {}
                    }
                    let ctl = conn
                        .open_stream(CONTROL_STREAM_TAG)
                        .await
                        .map_err(|e| node_err(addr, rank, e))?;
                    let mut node = Node { addr, conn, ctl };
                    send(&mut node, rank, &ToNode::Hello { version: PROTOCOL_VERSION }).await?;
                    let hello = tokio::time::timeout(opts.connect_timeout, expect_msg(&mut node, rank))
                        .await
                        .map_err(|_| node_err(addr, rank, "no answer to the session handshake"))??;
                    match hello {
                        FromNode::Welcome { version, isa, .. } if version == PROTOCOL_VERSION => Ok((node, isa)),
                        FromNode::Welcome { version, .. } => Err(node_err(
                            addr,
                            rank,
                            format!("protocol version mismatch: node speaks {version}, coordinator speaks {PROTOCOL_VERSION}"),
                        )),
                        other => Err(node_err(addr, rank, format!("unexpected answer {other:?}"))),
                    }
                }
            }))
            .await?;
            Ok::<_, Error>(joined.into_iter().unzip())
        })?;
        let layouts = rank_layouts(opts.layout, default_layout(), &isas);
        let shards: Vec<Shard> = crate::shards::ensure_shards(
            files,
            &plan,
            opts.quant,
            &layouts,
            opts.shards.as_deref(),
        )?;
        let mut model = shards[0].rank_model()?;
        model.kv_dtype = opts.kv_dtype;
        let head = shards[0]
            .head()?
            .ok_or_else(|| Error::Cluster("rank 0's shard holds no LM head rows".into()))?;
        let cache = model.new_cache(capacity);
        let window = shards[0].window(opts.window, opts.mem_budget, cache.bytes() as u64)?;
        let model_id = files.identity()?;
        let plan_id = plan.id();
        let (group, sent, windows) = net.block_on(async {
            let addrs: Vec<Option<SocketAddr>> = std::iter::once(None)
                .chain(nodes.iter().map(|n| Some(n.addr)))
                .collect();
            // Hand out setups; ship each node the blocks its cache lacks, all nodes at once.
            let bars = MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            let sent: Vec<(u64, f64)> =
                try_join_all(nodes.iter_mut().enumerate().map(|(i, node)| {
                    let rank = i + 1;
                    let shard = &shards[rank];
                    let setup = Setup {
                        rank: rank as u32,
                        world: world as u32,
                        model_id: model_id.clone(),
                        plan_id: plan_id.clone(),
                        manifest: shard.manifest.clone(),
                        algo: opts.algo,
                        dtype: opts.dtype,
                        addrs: addrs.clone(),
                        kv_dtype: opts.kv_dtype,
                        capacity: capacity as u32,
                    };
                    let (bars, style) = (&bars, &style);
                    async move {
                        send(node, rank, &ToNode::Setup(Box::new(setup))).await?;
                        let needs = match expect_msg(node, rank).await? {
                            FromNode::NeedBlocks(n) => n,
                            other => {
                                return Err(node_err(
                                    node.addr,
                                    rank,
                                    format!("unexpected {other:?}"),
                                ))
                            }
                        };
                        if needs.is_empty() {
                            return shard_ready(node, rank).await.map(|()| (0u64, 0.0));
                        }
                        let m = &shard.manifest;
                        let t0 = Instant::now();
                        let mut total = 0u64;
                        for n in &needs {
                            let b = m.blocks.get(n.index as usize).ok_or_else(|| {
                                node_err(
                                    node.addr,
                                    rank,
                                    format!("asked for unknown block {}", n.index),
                                )
                            })?;
                            total += b.len.saturating_sub(n.have);
                        }
                        let bar = bars.add(ProgressBar::new(total));
                        bar.set_style(style.clone());
                        bar.set_prefix(format!("shard → {}", node.addr));
                        // Read through a buffer, not the map: sending a shard should not
                        // make it resident in the coordinator.
                        let file = shard.file();
                        let mut chunk = vec![0u8; CHUNK];
                        for n in &needs {
                            let b = &m.blocks[n.index as usize];
                            let mut off = n.have.min(b.len);
                            while off < b.len {
                                let len = (b.len - off).min(CHUNK as u64);
                                let buf = &mut chunk[..len as usize];
                                {
                                    use std::os::unix::fs::FileExt;
                                    file.read_exact_at(buf, b.offset + off).map_err(|e| {
                                        Error::Io(format!("reading rank {rank}'s shard: {e}"))
                                    })?;
                                }
                                let buf = &chunk[..len as usize];
                                let r = async {
                                    send(
                                        node,
                                        rank,
                                        &ToNode::BlockData {
                                            index: n.index,
                                            offset: off,
                                        },
                                    )
                                    .await?;
                                    write_frame(&mut node.ctl.send, FrameKind::Tensor, buf)
                                        .await
                                        .map_err(|e| node_err(node.addr, rank, e))
                                }
                                .await;
                                if let Err(e) = r {
                                    // The node may have said why it stopped (e.g. its disk is full).
                                    return Err(with_reason(node, rank, e).await);
                                }
                                off += len;
                                bar.inc(len);
                            }
                        }
                        send(node, rank, &ToNode::BlocksDone).await?;
                        bar.finish_and_clear();
                        shard_ready(node, rank).await?;
                        Ok((total, t0.elapsed().as_secs_f64() * 1e3))
                    }
                }))
                .await?;
            // Only now, with every shard in place, may the nodes wait on one another.
            try_join_all(
                nodes
                    .iter_mut()
                    .enumerate()
                    .map(|(i, n)| async move { send(n, i + 1, &ToNode::Links).await }),
            )
            .await?;
            let mut links = std::collections::BTreeMap::new();
            for p in opts.algo.peers(0, world) {
                let n = &mut nodes[p - 1];
                let l = match open_data_link(&n.conn, 0, world, opts.algo, p).await {
                    Ok(l) => l,
                    // A node that failed after the transfer (a block that does not verify)
                    // said why on its control stream before it stopped answering.
                    Err(e) => return Err(with_reason(n, p, node_err(n.addr, p, e)).await),
                };
                links.insert(p, l);
            }
            let windows: Vec<u32> =
                try_join_all(nodes.iter_mut().enumerate().map(|(i, n)| async move {
                    match expect_msg(n, i + 1).await? {
                        FromNode::Ready { window } => Ok(window),
                        other => Err(node_err(n.addr, i + 1, format!("unexpected {other:?}"))),
                    }
                }))
                .await?;
            let mut group = Group::new(0, world, opts.algo, opts.dtype, links)?;
            // The nodes measure their links right after Ready; so does rank 0.
            group.probe_within(PROBE_TIMEOUT).await?;
            Ok::<_, Error>((group, sent, windows))
        })?;
        let setup = SetupReport {
            shard_bytes_sent: sent.iter().map(|s| s.0).collect(),
            shard_transfer_ms: sent.iter().map(|s| s.1).collect(),
            windows: std::iter::once(if window.is_streaming() {
                window.size() as u32
            } else {
                0
            })
            .chain(windows)
            .collect(),
            plan_id: plan.id(),
            vocab: plan.ranks.iter().map(|r| r.vocab.clone()).collect(),
            links: group.costs().map(|c| {
                crate::links::LinkReport::new(
                    "measured at session start",
                    c,
                    group.policy(),
                    group.dtype(),
                    cfg.hidden_size,
                )
            }),
        };
        Ok(ClusterBackend {
            net,
            endpoint,
            nodes,
            group,
            head,
            cache,
            model,
            pool: ThreadPool::new(opts.threads.max(1)),
            plan,
            window,
            setup,
            last: StepReport::default(),
            pending: None,
            reports: Vec::new(),
            last_end: Instant::now(),
            local: None,
        })
    }

    /// This backend, owning the local nodes it runs on so they live as long as it does.
    pub fn keeping(mut self, local: crate::local::LocalCluster) -> Self {
        self.local = Some(local);
        self
    }

    /// The split plan in force.
    pub fn plan(&self) -> &SplitPlan {
        &self.plan
    }

    /// Completes the previous step's report with the workers' timings. They were sent
    /// as each worker finished, so by the next step they have arrived: collecting them
    /// here keeps that round trip off every token's critical path.
    /// The whole vocabulary's logits: rank 0's own slice `own` and, when the plan splits
    /// the vocabulary, every other rank's, which each node sends on its control stream
    /// after its last layer (a node that failed sends its error instead).
    fn gather_logits(&mut self, own: Vec<f32>) -> Result<Vec<f32>> {
        if !self.plan.vocab_split() {
            return Ok(own);
        }
        let v = self.plan.vocab_size;
        let mut logits = vec![0f32; v];
        logits[self.head.vocab.clone()].copy_from_slice(&own);
        let slices: Vec<std::ops::Range<usize>> = self.plan.ranks[1..]
            .iter()
            .map(|r| r.vocab.clone())
            .collect();
        let nodes = &mut self.nodes;
        let parts: Vec<(std::ops::Range<usize>, Vec<u8>)> = self.net.block_on(try_join_all(
            nodes
                .iter_mut()
                .zip(slices)
                .enumerate()
                .filter(|(_, (_, r))| !r.is_empty())
                .map(|(i, (node, r))| async move {
                    let rank = i + 1;
                    let mut buf = Vec::new();
                    let kind =
                        read_frame(&mut node.ctl.recv, &mut buf, 4 * r.len().max(MAX_CONTROL))
                            .await
                            .map_err(|e| node_err(node.addr, rank, e))?;
                    match kind {
                        FrameKind::Tensor if buf.len() == 4 * r.len() => Ok((r, buf)),
                        FrameKind::Tensor => Err(node_err(
                            node.addr,
                            rank,
                            format!(
                                "sent {} bytes of logits for vocabulary rows {r:?} ({} expected)",
                                buf.len(),
                                4 * r.len()
                            ),
                        )),
                        _ => {
                            let m: FromNode =
                                decode(&buf).map_err(|e| node_err(node.addr, rank, e))?;
                            Err(said(node.addr, rank, m).err().unwrap_or_else(|| {
                                node_err(node.addr, rank, "sent a message instead of its logits")
                            }))
                        }
                    }
                }),
        ))?;
        for (r, bytes) in parts {
            f32_from_le_bytes(&bytes, &mut logits[r]).map_err(|e| Error::Cluster(e.to_string()))?;
        }
        Ok(logits)
    }

    fn finish_pending(&mut self) -> Result<()> {
        let Some(mut report) = self.pending.take() else {
            return Ok(());
        };
        let nodes = &mut self.nodes;
        let worker_times: Vec<RankStep> =
            self.net
                .block_on(try_join_all(nodes.iter_mut().enumerate().map(
                    |(i, node)| async move {
                        match expect_msg(node, i + 1).await? {
                            FromNode::StepDone(t) => Ok(t),
                            other => {
                                Err(node_err(node.addr, i + 1, format!("unexpected {other:?}")))
                            }
                        }
                    },
                )))?;
        // Node i is rank i+1 whatever it says.
        report.ranks.extend(
            worker_times
                .into_iter()
                .enumerate()
                .map(|(i, t)| RankStep { rank: i + 1, ..t }),
        );
        self.last = report.clone();
        self.reports.push(report);
        Ok(())
    }
}

impl ClusterBackend {
    /// Explains a failed allreduce. The network error names the rank whose link to rank 0
    /// broke, but when one node dies a surviving node can give up on the step first, and
    /// then the link rank 0 sees break is the survivor's. So the nodes' own reports, which
    /// each sends on its control stream as it fails and which name the link that broke
    /// there, lead the message when any arrive within half a second.
    fn explain_step_failure(&mut self, e: Error) -> Error {
        let seen = match e {
            Error::Net(n) => n.to_string(),
            other => return other,
        };
        let nodes = &mut self.nodes;
        let reports: Vec<String> = self
            .net
            .block_on(join_all(nodes.iter_mut().enumerate().map(
                |(i, n)| async move { reported(n, i + 1).await.map(|e| e.to_string()) },
            )))
            .into_iter()
            .flatten()
            .collect();
        if reports.is_empty() {
            Error::Cluster(format!("cluster step failed: {seen}"))
        } else {
            Error::Cluster(format!(
                "cluster step failed: {} (rank 0 saw: {seen})",
                reports.join("; ")
            ))
        }
    }
}

impl Backend for ClusterBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    fn reset(&mut self, capacity: usize) -> Result<()> {
        self.finish_pending()?;
        let nodes = &mut self.nodes;
        self.net
            .block_on(try_join_all(nodes.iter_mut().enumerate().map(|(i, n)| {
                let msg = ToNode::Reset {
                    capacity: capacity as u32,
                };
                async move { send(n, i + 1, &msg).await }
            })))?;
        self.cache = self.model.new_cache(capacity);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.cache.capacity
    }

    fn forward(&mut self, tokens: &[u32], start: usize) -> Result<Vec<f32>> {
        let t0 = Instant::now();
        let idle0 = (t0 - self.last_end).as_secs_f64();
        let n = tokens.len();
        if n == 0 {
            return Err(Error::Input("empty step".into()));
        }
        if start + n > self.cache.capacity {
            return Err(Error::Input(format!(
                "positions up to {} exceed the KV cache capacity {}",
                start + n,
                self.cache.capacity
            )));
        }
        let read0 = disk_read_bytes().unwrap_or(0);
        let load0 = self.window.stats().load_s;
        let expert0 = self.window.stats();
        self.finish_pending()?;
        let mut x = self.head.embed(tokens)?;
        let payload = f32_to_le_bytes(&x);
        let nodes = &mut self.nodes;
        self.net
            .block_on(try_join_all(nodes.iter_mut().enumerate().map(
                |(i, node)| {
                    let payload = &payload;
                    async move {
                        send(
                            node,
                            i + 1,
                            &ToNode::Step {
                                start: start as u32,
                                n: n as u32,
                            },
                        )
                        .await?;
                        write_frame(&mut node.ctl.send, FrameKind::Tensor, payload)
                            .await
                            .map_err(|e| node_err(node.addr, i + 1, e))
                    }
                },
            )))?;
        let (mut wait, mut total) = (0f64, 0f64);
        let group = &mut self.group;
        let net = &self.net;
        let spin = tpi_node::net::driven::spin_time();
        let res = self.model.forward_layers::<Error>(
            &self.pool,
            &mut x,
            n,
            start,
            &mut self.cache,
            Some(&self.window),
            &mut |part| {
                let st = net.block_on_spin(spin, group.allreduce(part))?;
                wait += st.wait.as_secs_f64();
                total += st.total.as_secs_f64();
                Ok(())
            },
        );
        let times = match res {
            Ok(t) => t,
            Err(e) => return Err(self.explain_step_failure(e)),
        };
        let d = self.model.cfg.hidden_size;
        let head_pos = 2 * self.model.cfg.n_layers;
        let tw = Instant::now();
        self.window.before(head_pos);
        let t1 = Instant::now();
        let own = self.head.logits(&self.pool, &x[(n - 1) * d..])?;
        self.window.after(head_pos);
        let head_s = t1.elapsed().as_secs_f64();
        let head_wait = (t1 - tw).as_secs_f64();
        let t2 = Instant::now();
        let logits = self.gather_logits(own)?;
        wait += t2.elapsed().as_secs_f64();
        total += t2.elapsed().as_secs_f64();
        let ms = |s: f64| s * 1e3;
        self.pending = Some(StepReport {
            tokens: n,
            wall_ms: ms(t0.elapsed().as_secs_f64()),
            ranks: vec![RankStep {
                rank: 0,
                compute_ms: ms(times.compute_s + head_s),
                allreduce_wait_ms: ms(wait),
                allreduce_transfer_ms: ms(total - wait),
                idle_ms: ms(idle0),
                disk_wait_ms: ms(times.disk_wait_s + head_wait),
                disk_load_ms: ms(self.window.stats().load_s - load0),
                expert_read_bytes: self.window.stats().expert_bytes - expert0.expert_bytes,
                expert_cache_hits: self.window.stats().expert_hits - expert0.expert_hits,
                disk_read_bytes: disk_read_bytes().unwrap_or(0).saturating_sub(read0),
                peak_rss_bytes: peak_rss().unwrap_or(0),
            }],
        });
        self.last_end = Instant::now();
        Ok(logits)
    }

    fn last_step(&self) -> StepReport {
        self.last.clone()
    }

    fn take_reports(&mut self) -> Result<Vec<StepReport>> {
        self.finish_pending()?;
        Ok(std::mem::take(&mut self.reports))
    }

    fn info(&self) -> serde_json::Value {
        serde_json::to_value(&self.setup).unwrap_or_default()
    }

    fn links(&self) -> Option<&crate::links::LinkReport> {
        self.setup.links.as_ref()
    }
}

impl Drop for ClusterBackend {
    fn drop(&mut self) {
        // End every session, then give the nodes a moment to close their side first so
        // they see a clean end rather than a lost connection.
        let nodes = &mut self.nodes;
        let _ = self.net.block_on(async {
            tokio::time::timeout(Duration::from_millis(500), async {
                for n in nodes.iter_mut() {
                    let _ = n.ctl.send_msg(&ToNode::End).await;
                    let _ = n.ctl.send.finish();
                }
                for n in nodes.iter() {
                    let _ = n.conn.closed().await;
                }
            })
            .await
        });
        self.endpoint.close("session over");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_gets_the_layout_its_kernels_read_fastest() {
        let isas = ["avx512vnni", "avx2", "neon", "avx512"].map(String::from);
        assert_eq!(
            rank_layouts(None, Layout::Packed, &isas),
            [
                Layout::Packed,
                Layout::Packed,
                Layout::Ggml,
                Layout::Ggml,
                Layout::Ggml
            ]
        );
        assert_eq!(
            rank_layouts(None, Layout::Ggml, &isas[..1]),
            [Layout::Ggml, Layout::Packed]
        );
        assert_eq!(
            rank_layouts(Some(Layout::Ggml), Layout::Packed, &isas),
            [Layout::Ggml; 5]
        );
        assert_eq!(rank_layouts(None, Layout::Packed, &[]), [Layout::Packed]);
    }
}
