//! Rank 0 of a tensor-parallel cluster: connects to the nodes, hands out the split
//! plan and their weight slices, and runs each step with them (rank 0 is the hub of
//! the star allreduce and also computes its own slice unless its share is 0).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use tpi_kernels::ThreadPool;
use tpi_node::model::forward::slice_weight;
use tpi_node::model::gguf::ggml_type_id;
use tpi_node::model::{Head, KvCache, ModelConfig, ModelFiles, RankModel, RankSlice, Role, SplitPlan};
use tpi_node::net::collective::open_data_link;
use tpi_node::net::frame::{write_frame, FrameKind};
use tpi_node::net::wire::{f32_to_le_bytes, PROTOCOL_VERSION};
use tpi_node::net::{Algo, Connection, Credential, Endpoint, Group, NetError, Stream, TransportOptions, WireDType};
use tpi_node::proto::{FromNode, NodeStepTimes, Setup, ToNode, CONTROL_STREAM_TAG, MAX_CONTROL};

use crate::engine::{Backend, RankStep, StepReport};
use crate::error::{Error, Result};

/// How to build the cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Node addresses; node i becomes rank i+1.
    pub nodes: Vec<SocketAddr>,
    /// Allreduce algorithm.
    pub algo: Algo,
    /// Allreduce payload type.
    pub dtype: WireDType,
    /// Capability weight of every rank, rank 0 first (None: rank 0 `coordinator_share`, nodes 1).
    pub ratios: Option<Vec<f64>>,
    /// Rank 0's weight when `ratios` is None; 0 makes rank 0 only coordinate.
    pub coordinator_share: f64,
    /// Rank 0's compute threads.
    pub threads: usize,
    /// Time allowed to reach each node.
    pub connect_timeout: Duration,
}

struct Node {
    addr: SocketAddr,
    conn: Connection,
    ctl: Stream,
}

/// The cluster backend for rank 0.
pub struct ClusterBackend {
    rt: tokio::runtime::Runtime,
    endpoint: Endpoint,
    nodes: Vec<Node>,
    group: Group,
    head: Head,
    model: RankModel,
    cache: KvCache,
    pool: ThreadPool,
    plan: SplitPlan,
    last: StepReport,
    last_end: Instant,
}

fn node_err(addr: SocketAddr, rank: usize, e: impl std::fmt::Display) -> Error {
    Error::Cluster(format!("node {addr} (rank {rank}): {e}"))
}

/// Which tensors a rank needs for its slice, in send order.
fn roles_for(cfg: &ModelConfig, s: &RankSlice) -> Vec<Role> {
    let mut r = vec![Role::AttnNorm, Role::MlpNorm];
    if s.has_attn() {
        r.extend([Role::Wq, Role::Wk, Role::Wv, Role::Wo]);
        if cfg.attention_bias {
            r.extend([Role::Bq, Role::Bk, Role::Bv]);
        }
    }
    if !s.ffn.is_empty() {
        r.extend([Role::Gate, Role::Up, Role::Down]);
    }
    r
}

async fn expect_msg(node: &mut Node, rank: usize) -> Result<FromNode> {
    let m = node
        .ctl
        .recv_msg::<FromNode>(MAX_CONTROL)
        .await
        .map_err(|e| node_err(node.addr, rank, e))?;
    match m {
        FromNode::Refused { reason } => Err(node_err(node.addr, rank, format!("refused the session: {reason}"))),
        FromNode::Error { msg } => Err(node_err(node.addr, rank, format!("failed: {msg}"))),
        m => Ok(m),
    }
}

async fn send(node: &mut Node, rank: usize, msg: &ToNode) -> Result<()> {
    node.ctl
        .send_msg(msg)
        .await
        .map_err(|e| node_err(node.addr, rank, e))
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
            None => std::iter::once(opts.coordinator_share)
                .chain(std::iter::repeat_n(1.0, opts.nodes.len()))
                .collect(),
        };
        let plan = SplitPlan::new(&cfg, &weights)?;
        let model = files.rank_model(&plan.ranks[0])?;
        let head = files.head()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::Io(e.to_string()))?;
        let endpoint = {
            let _g = rt.enter();
            Endpoint::client_bind(
                "0.0.0.0:0".parse().unwrap(),
                credential,
                &TransportOptions::default(),
            )?
        };
        let model_id = files.identity();
        let plan_id = plan.id();
        let (nodes, group) = rt.block_on(async {
            // Reach every node at once; the slowest bounds the wait.
            let mut nodes: Vec<Node> = try_join_all(opts.nodes.iter().enumerate().map(|(i, &addr)| {
                let ep = endpoint.clone();
                async move {
                    let rank = i + 1;
                    let conn = ep
                        .connect(addr, opts.connect_timeout)
                        .await
                        .map_err(|e| node_err(addr, rank, e))?
                        .with_peer_name(&format!("rank {rank} ({addr})"));
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
                        FromNode::Welcome { version, .. } if version == PROTOCOL_VERSION => Ok(node),
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
            let addrs: Vec<Option<SocketAddr>> = std::iter::once(None)
                .chain(nodes.iter().map(|n| Some(n.addr)))
                .collect();
            // Ship setup and weights to all nodes concurrently.
            try_join_all(nodes.iter_mut().enumerate().map(|(i, node)| {
                let rank = i + 1;
                let setup = Setup {
                    rank: rank as u32,
                    world: world as u32,
                    config: cfg.clone(),
                    model_id: model_id.clone(),
                    plan: plan.clone(),
                    plan_id: plan_id.clone(),
                    algo: opts.algo,
                    dtype: opts.dtype,
                    addrs: addrs.clone(),
                    capacity: capacity as u32,
                };
                let (cfg, plan) = (&cfg, &plan);
                async move {
                    send(node, rank, &ToNode::Setup(Box::new(setup))).await?;
                    let s = &plan.ranks[rank];
                    for l in 0..cfg.n_layers {
                        for role in roles_for(cfg, s) {
                            let full = files.store.role(cfg, role, l)?;
                            let w = slice_weight(cfg, s, role, &full)?;
                            send(
                                node,
                                rank,
                                &ToNode::Tensor {
                                    role,
                                    layer: l as u32,
                                    ggml_type: ggml_type_id(w.dtype),
                                    rows: w.rows as u64,
                                    cols: w.cols as u64,
                                },
                            )
                            .await?;
                            write_frame(&mut node.ctl.send, FrameKind::Tensor, &w.to_dense_bytes())
                                .await
                                .map_err(|e| node_err(node.addr, rank, e))?;
                        }
                    }
                    send(node, rank, &ToNode::WeightsDone).await
                }
            }))
            .await?;
            let mut links = std::collections::BTreeMap::new();
            for p in opts.algo.peers(0, world) {
                let n = &nodes[p - 1];
                let l = open_data_link(&n.conn, 0, world, opts.algo, p)
                    .await
                    .map_err(|e| node_err(n.addr, p, e))?;
                links.insert(p, l);
            }
            try_join_all(nodes.iter_mut().enumerate().map(|(i, n)| async move {
                match expect_msg(n, i + 1).await? {
                    FromNode::Ready => Ok(()),
                    other => Err(node_err(n.addr, i + 1, format!("unexpected {other:?}"))),
                }
            }))
            .await?;
            let group = Group::new(0, world, opts.algo, opts.dtype, links)?;
            Ok::<_, Error>((nodes, group))
        })?;
        Ok(ClusterBackend {
            rt,
            endpoint,
            nodes,
            group,
            head,
            cache: model.new_cache(capacity),
            model,
            pool: ThreadPool::new(opts.threads.max(1)),
            plan,
            last: StepReport::default(),
            last_end: Instant::now(),
        })
    }

    /// The split plan in force.
    pub fn plan(&self) -> &SplitPlan {
        &self.plan
    }

    /// Explains a failed allreduce: names the node whose link broke.
    fn cluster_error(&self, e: Error) -> Error {
        match e {
            Error::Net(n) => {
                let msg = n.to_string();
                Error::Cluster(format!("cluster step failed: {msg}"))
            }
            other => other,
        }
    }
}

impl Backend for ClusterBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    fn reset(&mut self, capacity: usize) -> Result<()> {
        let nodes = &mut self.nodes;
        self.rt.block_on(try_join_all(nodes.iter_mut().enumerate().map(|(i, n)| {
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
        let mut x = self.head.embed(tokens)?;
        let payload = f32_to_le_bytes(&x);
        let nodes = &mut self.nodes;
        self.rt.block_on(try_join_all(nodes.iter_mut().enumerate().map(|(i, node)| {
            let payload = &payload;
            async move {
                send(node, i + 1, &ToNode::Step { start: start as u32, n: n as u32 }).await?;
                write_frame(&mut node.ctl.send, FrameKind::Tensor, payload)
                    .await
                    .map_err(|e| node_err(node.addr, i + 1, e))
            }
        })))?;
        let (mut wait, mut total) = (0f64, 0f64);
        let group = &mut self.group;
        let rt = &self.rt;
        let res = self.model.forward_layers::<Error>(
            &self.pool,
            &mut x,
            n,
            start,
            &mut self.cache,
            &mut |part| {
                let st = rt.block_on(group.allreduce(part))?;
                wait += st.wait.as_secs_f64();
                total += st.total.as_secs_f64();
                Ok(())
            },
        );
        let times = match res {
            Ok(t) => t,
            Err(e) => return Err(self.cluster_error(e)),
        };
        let d = self.model.cfg.hidden_size;
        let t1 = Instant::now();
        let logits = self.head.logits(&self.pool, &x[(n - 1) * d..])?;
        let head_s = t1.elapsed().as_secs_f64();
        let nodes = &mut self.nodes;
        let worker_times: Vec<NodeStepTimes> =
            self.rt
                .block_on(try_join_all(nodes.iter_mut().enumerate().map(|(i, node)| async move {
                    match expect_msg(node, i + 1).await? {
                        FromNode::StepDone(t) => Ok(t),
                        other => Err(node_err(node.addr, i + 1, format!("unexpected {other:?}"))),
                    }
                })))?;
        let ms = |s: f64| s * 1e3;
        let mut ranks = vec![RankStep {
            rank: 0,
            compute_ms: ms(times.compute_s + head_s),
            allreduce_wait_ms: ms(wait),
            allreduce_transfer_ms: ms(total - wait),
            idle_ms: ms(idle0),
        }];
        for (i, t) in worker_times.iter().enumerate() {
            ranks.push(RankStep {
                rank: i + 1,
                compute_ms: ms(t.compute_s),
                allreduce_wait_ms: ms(t.reduce_wait_s),
                allreduce_transfer_ms: ms(t.reduce_total_s - t.reduce_wait_s),
                idle_ms: ms(t.idle_s),
            });
        }
        self.last_end = Instant::now();
        self.last = StepReport {
            tokens: n,
            wall_ms: ms(t0.elapsed().as_secs_f64()),
            ranks,
        };
        Ok(logits)
    }

    fn last_step(&self) -> StepReport {
        self.last.clone()
    }
}

impl Drop for ClusterBackend {
    fn drop(&mut self) {
        // End every session, then give the nodes a moment to close their side first so
        // they see a clean end rather than a lost connection.
        let nodes = &mut self.nodes;
        let _ = self.rt.block_on(async {
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

/// Turns a connect-time [`NetError`] into an error naming the node.
pub fn describe(addr: SocketAddr, e: NetError) -> Error {
    Error::Cluster(format!("node {addr}: {e}"))
}
