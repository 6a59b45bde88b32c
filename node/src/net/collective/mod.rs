//! Allreduce over per-peer data links: star, ring, tree, mesh and rsag, or `auto` (the
//! default): the cost model's choice per payload over links measured at session start.
//!
//! Guarantee: after [`Group::allreduce`] every rank holds a *bitwise identical* vector.
//! Star and tree results are deterministic functions of the inputs (sums are taken in
//! rank order, never in arrival order): see [`star_reference`] and [`tree_reference`].
//! Mesh and rsag take the star hub's sum (every rank, or each chunk's owner, adds the
//! partials in rank order), so their results equal the star's bit for bit.
//! The ring computes each chunk's final value once, at the chunk's owner, and
//! propagates those bits.
//!
//! - [`schedule`](mod@schedule): each algorithm's steps as pure data, tested without sockets;
//! - [`reduce`]: the wire element type, rank-order sums, tensor-frame encoding;
//! - [`payload`]: the bf16 and block-int8 (q8) encodings;
//! - [`reassemble`]: a frame's pieces into header and whole elements;
//! - [`link`]: per-peer links (QUIC or in-memory, both carrying whole frames);
//! - [`handshake`]: link setup;
//! - [`probe`]: link measurement at session start, for `auto`;
//! - this file: [`Group`], which executes a schedule over the links.

pub mod handshake;
pub mod link;
pub mod payload;
pub mod probe;
pub mod reassemble;
pub mod reduce;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use half::f16;

pub use handshake::{
    accept_data_link, accept_data_stream, establish_links, open_data_link, DATA_STREAM_TAG,
};
pub use link::DataLink;
pub use reduce::{star_reference, sum_rank_order, tree_reference, WireDType};
pub use tpi_algo::cost::{Costs, LinkCost};
pub use tpi_algo::schedule::{self, schedule, Land, Op, Step};
pub use tpi_algo::{ring_chunk, tree_children, tree_parent, Algo, Policy};

use crate::net::error::NetError;
use link::{split_link, LinkRx};
use reduce::{add_into, decode_into, encode_frame, quantize};

/// Timing and volume of one allreduce at this rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllreduceStats {
    /// Wall time of the whole call.
    pub total: Duration,
    /// Wall time blocked in awaits that receive peers' data (for the ring: each step's
    /// joined send + receive). It includes the peers' lateness (skew) and network time;
    /// `total − wait` is local work (encoding, summing, decoding, send-only awaits).
    pub wait: Duration,
    /// Tensor payload bytes this rank sent (frame headers excluded).
    pub bytes_sent: u64,
    /// Tensor payload bytes this rank received (frame headers excluded).
    pub bytes_recv: u64,
}

/// A rank's membership in a collective group: its links, its allreduce policy and the
/// link costs `auto` chooses by, the schedule of the last length reduced, and scratch
/// space.
pub struct Group {
    rank: usize,
    world: usize,
    policy: Policy,
    /// The measured link costs ([`Group::probe`]); `auto` runs the star until then.
    costs: Option<Costs>,
    /// The algorithm of the cached schedule.
    algo: Algo,
    dtype: WireDType,
    links: BTreeMap<usize, DataLink>,
    steps: Vec<Step>,
    steps_len: Option<usize>,
    scratch: Scratch,
    /// Per peer: what a [`Step::Many`] set aside, and that receive's scratch.
    aside: BTreeMap<usize, Aside>,
    /// This rank's own values during a [`Step::SumInOrder`].
    mine: Vec<f32>,
    poisoned: bool,
}

/// One peer's received elements, kept for a [`Step::SumInOrder`].
#[derive(Default)]
struct Aside {
    vals: Vec<f32>,
    scratch: Scratch,
}

/// Buffers a receive reuses: f16 conversion space, and a whole message of a block type.
#[derive(Default)]
struct Scratch {
    h16: Vec<f16>,
    bytes: Vec<u8>,
}

/// Receives one tensor frame of `dst.len()` elements from `rx` and adds it into `dst` or
/// overwrites `dst` with it. Element types are applied run by run as pieces arrive;
/// block types once the whole message is in.
async fn recv_apply(
    rx: &mut LinkRx,
    dtype: WireDType,
    op: Op,
    dst: &mut [f32],
    sc: &mut Scratch,
) -> Result<(), NetError> {
    let len = dtype.wire_len(dst.len());
    let apply = |dst: &mut [f32], b: &[u8], h16: &mut Vec<f16>| match op {
        Op::Add => add_into(dtype, b, dst),
        Op::Copy => decode_into(dtype, b, dst, h16),
    };
    let Scratch { h16, bytes } = sc;
    match dtype.unit() {
        Some(eb) => {
            rx.recv_each(len, eb, |i, b| apply(&mut dst[i..i + b.len() / eb], b, h16))
                .await
        }
        None => {
            bytes.clear();
            bytes.resize(len, 0);
            rx.recv_each(len, 1, |i, b| {
                bytes[i..i + b.len()].copy_from_slice(b);
                Ok(())
            })
            .await?;
            apply(dst, bytes, h16)
        }
    }
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("policy", &self.policy)
            .field("dtype", &self.dtype)
            .field("links", &self.links.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Group {
    /// Creates the group. `links` must hold exactly one link per rank in
    /// `policy.peers(rank, world)` (every other rank under `auto`), each with the
    /// matching [`DataLink::peer`].
    pub fn new(
        rank: usize,
        world: usize,
        policy: impl Into<Policy>,
        dtype: WireDType,
        links: BTreeMap<usize, DataLink>,
    ) -> Result<Group, NetError> {
        let policy = policy.into();
        if world == 0 || rank >= world {
            return Err(NetError::Protocol(format!(
                "rank {rank} outside a world of {world}"
            )));
        }
        let want = policy.peers(rank, world);
        let have: Vec<usize> = links.keys().copied().collect();
        if want != have {
            return Err(NetError::Protocol(format!(
                "rank {rank} of {world} under {policy} needs links to {want:?}, got {have:?}"
            )));
        }
        if let Some((k, l)) = links.iter().find(|(k, l)| **k != l.peer()) {
            return Err(NetError::Protocol(format!(
                "link keyed as rank {k} leads to rank {}",
                l.peer()
            )));
        }
        let aside = links.keys().map(|&p| (p, Aside::default())).collect();
        Ok(Group {
            rank,
            world,
            policy,
            costs: None,
            algo: policy.algo_for(None, 0, dtype.elem_bytes()),
            dtype,
            links,
            steps: Vec::new(),
            steps_len: None,
            scratch: Scratch::default(),
            aside,
            mine: Vec::new(),
            poisoned: false,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The allreduce policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The algorithm the last allreduce ran (the policy's choice for its length).
    pub fn algo(&self) -> Algo {
        self.algo
    }

    /// The link costs measured by [`Group::probe`], if it ran.
    pub fn costs(&self) -> Option<&Costs> {
        self.costs.as_ref()
    }

    /// The wire element type.
    pub fn dtype(&self) -> WireDType {
        self.dtype
    }

    /// Changes the wire element type; every rank must make the same change between the
    /// same two allreduces.
    pub fn set_dtype(&mut self, dtype: WireDType) {
        self.dtype = dtype;
        self.steps_len = None;
    }

    /// The links, by peer rank.
    pub fn links(&self) -> &BTreeMap<usize, DataLink> {
        &self.links
    }

    /// Sums `x` element-wise across all ranks in place; afterwards every rank holds the
    /// same bits. All ranks must call it with the same length, in the same order.
    ///
    /// Not cancellation safe: if this future is dropped before completing, or returns an
    /// error, the group is poisoned (streams may be mid-frame) and every later call fails.
    pub async fn allreduce(&mut self, x: &mut [f32]) -> Result<AllreduceStats, NetError> {
        if self.poisoned {
            return Err(NetError::Protocol(
                "collective group unusable after an earlier error".into(),
            ));
        }
        let start = Instant::now();
        let mut st = AllreduceStats::default();
        if self.steps_len != Some(x.len()) {
            let eb = self.dtype.elem_bytes();
            self.algo = self.policy.algo_for(self.costs.as_ref(), x.len(), eb);
            self.steps = schedule(self.algo, self.rank, self.world, x.len());
            self.steps_len = Some(x.len());
        }
        self.poisoned = true;
        let steps = std::mem::take(&mut self.steps);
        let r = self.run(&steps, x, &mut st).await;
        self.steps = steps;
        r?;
        self.poisoned = false;
        st.total = start.elapsed();
        Ok(st)
    }

    /// Executes `steps` on `x`. Time spent awaiting received data counts as wait;
    /// send-only awaits do not.
    async fn run(
        &mut self,
        steps: &[Step],
        x: &mut [f32],
        st: &mut AllreduceStats,
    ) -> Result<(), NetError> {
        let Group {
            rank,
            dtype,
            links,
            scratch,
            aside,
            mine,
            ..
        } = self;
        let (rank, dtype) = (*rank, *dtype);
        let wire = |r: &std::ops::Range<usize>| dtype.wire_len(r.len()) as u64;
        for step in steps {
            match step {
                Step::Round(range) => quantize(&mut x[range.clone()], dtype, &mut scratch.h16)?,
                Step::Send { to, range } => {
                    let framed = encode_frame(dtype, &x[range.clone()], &mut scratch.h16)?;
                    try_join_all(
                        links
                            .iter_mut()
                            .filter(|(k, _)| to.contains(k))
                            .map(|(_, l)| l.tx.send(framed.clone())),
                    )
                    .await?;
                    st.bytes_sent += wire(range) * to.len() as u64;
                }
                Step::Recv { from, range, op } => {
                    let l = links.get_mut(from).ok_or_else(|| {
                        NetError::Protocol(format!("no data link to rank {from}"))
                    })?;
                    let t = Instant::now();
                    recv_apply(&mut l.rx, dtype, *op, &mut x[range.clone()], scratch).await?;
                    st.wait += t.elapsed();
                    st.bytes_recv += wire(range);
                }
                Step::Many { sends, recvs, land } => {
                    let t = Instant::now();
                    many(dtype, links, aside, x, sends, recvs, &mut scratch.h16).await?;
                    st.wait += t.elapsed();
                    st.bytes_sent += sends.iter().map(|(_, r)| wire(r)).sum::<u64>();
                    st.bytes_recv += recvs.iter().map(|(_, r)| wire(r)).sum::<u64>();
                    if *land == Land::Copy {
                        for (p, r) in recvs {
                            x[r.clone()].copy_from_slice(&aside[p].vals);
                        }
                    }
                }
                Step::SumInOrder { range, ranks } => {
                    sum_in_order(rank, ranks, aside, &mut x[range.clone()], mine);
                }
                Step::Exchange {
                    to,
                    send,
                    from,
                    recv,
                    op,
                } => {
                    let framed = encode_frame(dtype, &x[send.clone()], &mut scratch.h16)?;
                    let (tx, rx) = split_link(links, *to, *from)?;
                    let xr = &mut x[recv.clone()];
                    let t = Instant::now();
                    futures::try_join!(tx.send(framed), recv_apply(rx, dtype, *op, xr, scratch))?;
                    st.wait += t.elapsed();
                    st.bytes_sent += wire(send);
                    st.bytes_recv += wire(recv);
                }
            }
        }
        Ok(())
    }
}

/// Executes a [`Step::Many`]: every send and every receive at once, each link's send
/// and receive concurrently too. Received elements land in `aside` (decoded to f32).
async fn many(
    dtype: WireDType,
    links: &mut BTreeMap<usize, DataLink>,
    aside: &mut BTreeMap<usize, Aside>,
    x: &[f32],
    sends: &[(usize, std::ops::Range<usize>)],
    recvs: &[(usize, std::ops::Range<usize>)],
    h16: &mut Vec<f16>,
) -> Result<(), NetError> {
    // One frame per distinct range (a mesh sends the same one to everybody).
    let mut frames: Vec<(std::ops::Range<usize>, bytes::Bytes)> = Vec::new();
    for (_, r) in sends {
        if !frames.iter().any(|(f, _)| f == r) {
            frames.push((r.clone(), encode_frame(dtype, &x[r.clone()], h16)?));
        }
    }
    for (p, _) in sends.iter().chain(recvs) {
        if !links.contains_key(p) {
            return Err(NetError::Protocol(format!("no data link to rank {p}")));
        }
    }
    let work = links
        .iter_mut()
        .zip(aside.iter_mut())
        .filter_map(|((p, l), (q, a))| {
            debug_assert_eq!(p, q);
            let send = sends.iter().find(|(t, _)| t == p).map(|(_, r)| {
                frames
                    .iter()
                    .find(|(f, _)| f == r)
                    .map(|(_, b)| b.clone())
                    .expect("every sent range was encoded")
            });
            let recv = recvs.iter().find(|(f, _)| f == p).map(|(_, r)| r.len());
            if send.is_none() && recv.is_none() {
                return None;
            }
            let DataLink { tx, rx, .. } = l;
            Some(async move {
                let s = async {
                    match send {
                        Some(f) => tx.send(f).await,
                        None => Ok(()),
                    }
                };
                let r = async {
                    let Some(len) = recv else { return Ok(()) };
                    let Aside { vals, scratch } = a;
                    vals.clear();
                    vals.resize(len, 0.0);
                    recv_apply(rx, dtype, Op::Copy, vals, scratch).await
                };
                futures::try_join!(s, r).map(drop)
            })
        });
    try_join_all(work).await.map(drop)
}

/// `out` (this rank's own values on entry) becomes the sum over `ranks`, in that order, of
/// this rank's values and the others' set-aside ones: the same additions in the same
/// order on every rank. `mine` is scratch for the own values when this rank is not first.
fn sum_in_order(
    rank: usize,
    ranks: &[usize],
    aside: &BTreeMap<usize, Aside>,
    out: &mut [f32],
    mine: &mut Vec<f32>,
) {
    let Some((&first, rest)) = ranks.split_first() else {
        return;
    };
    if first != rank {
        mine.clear();
        mine.extend_from_slice(out);
        out.copy_from_slice(&aside[&first].vals);
    }
    for &k in rest {
        let v: &[f32] = if k == rank { mine } else { &aside[&k].vals };
        for (o, a) in out.iter_mut().zip(v) {
            *o += a;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reduce::tests::inputs;

    async fn run_group(
        world: usize,
        algo: Algo,
        dtype: WireDType,
        parts: &[Vec<f32>],
    ) -> Vec<Vec<f32>> {
        let mesh = DataLink::memory_mesh(world, algo);
        let mut tasks = Vec::new();
        for (r, links) in mesh.into_iter().enumerate() {
            let mut x = parts[r].clone();
            tasks.push(tokio::spawn(async move {
                let mut g = Group::new(r, world, algo, dtype, links).unwrap();
                // Twice, to exercise buffer reuse.
                let mut y = x.clone();
                g.allreduce(&mut y).await.unwrap();
                let st = g.allreduce(&mut x).await.unwrap();
                assert_eq!(x, y);
                if world > 1 {
                    assert!(st.bytes_sent > 0 || x.is_empty());
                }
                x
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_memory_all_algos_identical_bits() {
        for world in 1..=8 {
            for &n in &[0usize, 1, 3, 7, 33, 64, 1000] {
                for algo in Algo::ALL {
                    for dtype in WireDType::ALL {
                        let positive = algo == Algo::Ring;
                        let parts = inputs(world, n, (world * 131 + n) as u64, positive);
                        let res = run_group(world, algo, dtype, &parts).await;
                        for r in 1..world {
                            assert_eq!(
                                bits(&res[r]),
                                bits(&res[0]),
                                "{algo} {dtype} w={world} n={n} rank {r}"
                            );
                        }
                        match algo {
                            _ if world == 1 => {}
                            Algo::Star => {
                                assert_eq!(bits(&res[0]), bits(&star_reference(&parts, dtype)))
                            }
                            Algo::Tree => {
                                assert_eq!(bits(&res[0]), bits(&tree_reference(&parts, dtype)))
                            }
                            // Both take the star hub's sum, so they equal it bit for bit.
                            Algo::Mesh | Algo::Rsag => {
                                assert_eq!(bits(&res[0]), bits(&star_reference(&parts, dtype)))
                            }
                            Algo::Ring => {
                                // The ring rounds each partial sum on every hop: at most
                                // one rounding step per hop (relative for the float
                                // types, of the largest sum for q8's block scales).
                                let reference = star_reference(&parts, WireDType::F32);
                                let top = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
                                let hops = world as f32;
                                for (a, b) in res[0].iter().zip(&reference) {
                                    let tol = match dtype {
                                        WireDType::F32 => 1e-6 * b.abs(),
                                        WireDType::F16 => 4e-3 * b.abs(),
                                        WireDType::Bf16 => hops / 256.0 * b.abs(),
                                        WireDType::Q8 => hops * top / 127.0,
                                    };
                                    assert!(
                                        (a - b).abs() <= tol,
                                        "ring {dtype} w={world}: {a} vs {b}"
                                    );
                                }
                            }
                        }
                        if world == 1 {
                            assert_eq!(bits(&res[0]), bits(&parts[0]));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn group_validates_links() {
        let mut mesh = DataLink::memory_mesh(3, Algo::Ring);
        assert!(Group::new(0, 3, Algo::Star, WireDType::F32, mesh.remove(0)).is_ok()); // ring(3) == star for rank 0
        let mut mesh = DataLink::memory_mesh(4, Algo::Ring);
        let e = Group::new(0, 4, Algo::Star, WireDType::F32, mesh.remove(0)).unwrap_err();
        assert!(e.to_string().contains("needs links"), "{e}");
    }

    #[tokio::test]
    async fn dropped_memory_peer_is_named() {
        let mut mesh = DataLink::memory_mesh(3, Algo::Star);
        let l0 = mesh.remove(0);
        drop(mesh); // ranks 1 and 2 vanish
        let mut g = Group::new(0, 3, Algo::Star, WireDType::F32, l0).unwrap();
        let e = g.allreduce(&mut [1.0; 4]).await.unwrap_err();
        assert!(
            e.to_string().contains("rank 1") || e.to_string().contains("rank 2"),
            "{e}"
        );
        assert!(g.allreduce(&mut [1.0; 4]).await.is_err());
    }
}
