//! Allreduce over per-peer data links: star (default), ring and tree.
//!
//! Guarantee: after [`Group::allreduce`] every rank holds a *bitwise identical* vector.
//! Star and tree results are deterministic functions of the inputs (sums are taken in
//! rank order, never in arrival order): see [`star_reference`] and [`tree_reference`].
//! The ring computes each chunk's final value once, at the chunk's owner, and
//! propagates those bits.
//!
//! The arithmetic lives in pure functions ([`ring_chunk`], [`tree_parent`],
//! [`tree_children`], [`sum_rank_order`], the references) that are tested without
//! sockets; [`DataLink`] abstracts the byte pipe (a QUIC stream or an in-memory channel).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::try_join_all;
use half::f16;
use tokio::sync::mpsc;

use super::frame::{decode_header, fill_prefix, read_frame_of, FrameKind, FRAME_HEADER_LEN};
use super::transport::{map_read_error, map_write_error, Connection, Endpoint, NetError, Stream};
use super::wire::{
    add_f16_le, add_f32_le, extend_f16_le, extend_f32_le, f16_le_to_f32, f32_from_le_bytes,
    round_to_f16, PROTOCOL_VERSION,
};

/// The stream tag of a collective data stream (see [`Connection::open_stream`]).
pub const DATA_STREAM_TAG: u8 = 0xDA;

pub use tpi_sim::{tree_children, tree_parent, Algo};

/// Element type on the wire. Summation is always in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum WireDType {
    /// 4 bytes per element, exact.
    F32,
    /// 2 bytes per element: partials and results are rounded to f16; every rank ends
    /// with the f16-rounded result (as f32 values).
    F16,
}

impl WireDType {
    /// Bytes per element on the wire.
    pub fn bytes(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::F16 => 2,
        }
    }
}

impl fmt::Display for WireDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireDType::F32 => "f32",
            WireDType::F16 => "f16",
        })
    }
}

impl FromStr for WireDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(WireDType::F32),
            "f16" => Ok(WireDType::F16),
            _ => Err(format!("unknown wire dtype {s:?} (expected f32 or f16)")),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Pure helpers

/// The element range of chunk `c` when `n` elements are split into `world` chunks for the
/// ring: `[c·n/world, (c+1)·n/world)`. Chunks differ in size by at most one and may be
/// empty when `n < world`.
pub fn ring_chunk(n: usize, world: usize, c: usize) -> Range<usize> {
    let at = |i: usize| ((i as u128 * n as u128) / world as u128) as usize;
    at(c)..at(c + 1)
}

/// `out = parts[0] + parts[1] + …`, added strictly left to right (`((p0 + p1) + p2) …`).
pub fn sum_rank_order(parts: &[&[f32]], out: &mut [f32]) {
    out.fill(0.0);
    if let Some(first) = parts.first() {
        out.copy_from_slice(first);
    }
    for p in parts.iter().skip(1) {
        for (o, v) in out.iter_mut().zip(p.iter()) {
            *o += v;
        }
    }
}

fn quantize(v: &mut [f32], dtype: WireDType) {
    if dtype == WireDType::F16 {
        round_to_f16(v, &mut Vec::new());
    }
}

/// What a star allreduce of `parts` (indexed by rank) yields on every rank: the rank-order
/// sum of the (f16-rounded, for F16) partials, rounded to f16 for F16.
pub fn star_reference(parts: &[Vec<f32>], dtype: WireDType) -> Vec<f32> {
    let q: Vec<Vec<f32>> = parts
        .iter()
        .map(|p| {
            let mut p = p.clone();
            quantize(&mut p, dtype);
            p
        })
        .collect();
    let refs: Vec<&[f32]> = q.iter().map(|v| v.as_slice()).collect();
    let mut out = vec![0.0; parts.first().map_or(0, |p| p.len())];
    sum_rank_order(&refs, &mut out);
    quantize(&mut out, dtype);
    out
}

/// What a tree allreduce of `parts` yields on every rank: each rank adds its children's
/// subtree sums (as sent: f16-rounded for F16) to its own partial in rank order; the
/// root's sum (f16-rounded for F16) is the result.
pub fn tree_reference(parts: &[Vec<f32>], dtype: WireDType) -> Vec<f32> {
    fn subtree(r: usize, parts: &[Vec<f32>], dtype: WireDType) -> Vec<f32> {
        let mut acc = parts[r].clone();
        quantize(&mut acc, dtype);
        for c in tree_children(r, parts.len()) {
            let s = subtree(c, parts, dtype);
            for (a, v) in acc.iter_mut().zip(&s) {
                *a += v;
            }
        }
        quantize(&mut acc, dtype);
        acc
    }
    if parts.is_empty() {
        return Vec::new();
    }
    subtree(0, parts, dtype)
}

// ---------------------------------------------------------------------------------------
// Links

enum TxHalf {
    Quic(quinn::SendStream),
    Mem(mpsc::UnboundedSender<Vec<u8>>),
}

enum RxHalf {
    Quic(quinn::RecvStream),
    Mem(mpsc::UnboundedReceiver<Vec<u8>>),
}

struct LinkTx {
    name: Arc<str>,
    half: TxHalf,
}

impl LinkTx {
    /// Sends a buffer whose first [`FRAME_HEADER_LEN`] bytes are an already-filled header.
    async fn send_prefixed(&mut self, framed: &[u8]) -> Result<(), NetError> {
        match &mut self.half {
            TxHalf::Quic(s) => s
                .write_all(framed)
                .await
                .map_err(|e| map_write_error(e).with_peer(&self.name)),
            TxHalf::Mem(tx) => {
                tx.send(framed[FRAME_HEADER_LEN..].to_vec())
                    .map_err(|_| NetError::Closed {
                        peer: self.name.to_string(),
                        reason: "in-memory link dropped".into(),
                    })
            }
        }
    }

    /// [`LinkTx::send_prefixed`] without copying: QUIC keeps a reference to `framed` until
    /// the peer acknowledges it, so one frame can go to many peers.
    async fn send_shared(&mut self, framed: Bytes) -> Result<(), NetError> {
        match &mut self.half {
            TxHalf::Quic(s) => s
                .write_chunk(framed)
                .await
                .map_err(|e| map_write_error(e).with_peer(&self.name)),
            TxHalf::Mem(_) => self.send_prefixed(&framed).await,
        }
    }
}

struct LinkRx {
    name: Arc<str>,
    half: RxHalf,
    buf: Vec<u8>,
}

impl LinkRx {
    async fn recv(&mut self, max: usize) -> Result<(), NetError> {
        match &mut self.half {
            RxHalf::Quic(r) => read_frame_of(r, FrameKind::Tensor, &mut self.buf, max)
                .await
                .map_err(|e| e.with_peer(&self.name)),
            RxHalf::Mem(rx) => match rx.recv().await {
                None => Err(NetError::Closed {
                    peer: self.name.to_string(),
                    reason: "in-memory link dropped".into(),
                }),
                Some(v) if v.len() > max => Err(NetError::FrameTooLarge {
                    len: v.len() as u64,
                    max,
                }
                .with_peer(&self.name)),
                Some(v) => {
                    self.buf = v;
                    Ok(())
                }
            },
        }
    }

    /// Receives exactly `expect` payload bytes (anything else is a protocol error).
    async fn recv_exact(&mut self, expect: usize) -> Result<(), NetError> {
        self.recv(expect).await?;
        check_tensor_len(self.buf.len(), expect).map_err(|e| e.with_peer(&self.name))
    }

    /// Receives a tensor frame of exactly `expect` payload bytes and hands it to `sink` in
    /// pieces of whole `elem`-byte elements, as `sink(first element index, bytes)`, straight
    /// from QUIC's received chunks: no copy into `buf`. An element split between two
    /// chunks goes through a small carry buffer.
    async fn recv_each(
        &mut self,
        expect: usize,
        elem: usize,
        mut sink: impl FnMut(usize, &[u8]) -> Result<(), NetError>,
    ) -> Result<(), NetError> {
        let r = match &mut self.half {
            RxHalf::Quic(r) => r,
            RxHalf::Mem(_) => {
                self.recv_exact(expect).await?;
                return sink(0, &self.buf);
            }
        };
        let name = &self.name;
        let mut hdr = [0u8; FRAME_HEADER_LEN];
        let mut have = 0;
        while have < FRAME_HEADER_LEN {
            let c = read_chunk(r, FRAME_HEADER_LEN - have, name).await?;
            hdr[have..have + c.len()].copy_from_slice(&c);
            have += c.len();
        }
        let (kind, len) = decode_header(&hdr, expect).map_err(|e| e.with_peer(name))?;
        if kind != FrameKind::Tensor {
            return Err(
                NetError::Protocol(format!("expected a Tensor frame, got {kind:?}"))
                    .with_peer(name),
            );
        }
        check_tensor_len(len, expect).map_err(|e| e.with_peer(name))?;
        let (mut pos, mut carry, mut nc) = (0, [0u8; 4], 0);
        while pos + nc < expect {
            // Never past this frame's end: the next frame stays in the stream.
            let c = read_chunk(r, expect - pos - nc, name).await?;
            let mut b: &[u8] = &c;
            if nc > 0 {
                let k = (elem - nc).min(b.len());
                carry[nc..nc + k].copy_from_slice(&b[..k]);
                (nc, b) = (nc + k, &b[k..]);
                if nc < elem {
                    continue;
                }
                sink(pos / elem, &carry[..elem])?;
                pos += elem;
            }
            let whole = b.len() / elem * elem;
            if whole > 0 {
                sink(pos / elem, &b[..whole])?;
                pos += whole;
            }
            nc = b.len() - whole;
            carry[..nc].copy_from_slice(&b[whole..]);
        }
        Ok(())
    }
}

/// Reads the next in-order chunk of at most `max` bytes; the stream's end is an error.
async fn read_chunk(r: &mut quinn::RecvStream, max: usize, name: &str) -> Result<Bytes, NetError> {
    match r.read_chunk(max, true).await {
        Ok(Some(c)) => Ok(c.bytes),
        Ok(None) => Err(NetError::Closed {
            peer: name.to_string(),
            reason: "stream ended by the peer inside a tensor frame".into(),
        }),
        Err(e) => Err(map_read_error(e).with_peer(name)),
    }
}

/// A tensor frame must carry exactly the allreduce's byte count.
fn check_tensor_len(len: usize, expect: usize) -> Result<(), NetError> {
    if len != expect {
        return Err(NetError::Protocol(format!(
            "sent a {len}-byte tensor, expected {expect} bytes (allreduce length mismatch across ranks?)"
        )));
    }
    Ok(())
}

/// A data link with one peer rank: a QUIC stream, or an in-memory channel (tests).
/// Tensor payloads travel as [`FrameKind::Tensor`] frames; errors name the peer rank.
pub struct DataLink {
    peer: usize,
    tx: LinkTx,
    rx: LinkRx,
    conn: Option<Connection>,
}

impl fmt::Debug for DataLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataLink")
            .field("peer", &self.tx.name)
            .finish_non_exhaustive()
    }
}

impl DataLink {
    /// A link to `peer` over an open stream. `conn` (optional) is kept alive with the link
    /// and its address is used in error messages.
    pub fn quic(peer: usize, stream: Stream, conn: Option<Connection>) -> DataLink {
        let name: Arc<str> = match &conn {
            Some(c) => format!("rank {peer} ({})", c.remote_addr()).into(),
            None => format!("rank {peer}").into(),
        };
        DataLink {
            peer,
            tx: LinkTx {
                name: name.clone(),
                half: TxHalf::Quic(stream.send),
            },
            rx: LinkRx {
                name,
                half: RxHalf::Quic(stream.recv),
                buf: Vec::new(),
            },
            conn,
        }
    }

    /// Two ends of an in-memory link: the first is held by rank `a` (its peer is `b`),
    /// the second by rank `b`.
    pub fn memory_pair(a: usize, b: usize) -> (DataLink, DataLink) {
        let (tx_ab, rx_ab) = mpsc::unbounded_channel();
        let (tx_ba, rx_ba) = mpsc::unbounded_channel();
        let mk = |peer: usize, tx, rx| {
            let name: Arc<str> = format!("rank {peer} (in-memory)").into();
            DataLink {
                peer,
                tx: LinkTx {
                    name: name.clone(),
                    half: TxHalf::Mem(tx),
                },
                rx: LinkRx {
                    name,
                    half: RxHalf::Mem(rx),
                    buf: Vec::new(),
                },
                conn: None,
            }
        };
        (mk(b, tx_ab, rx_ba), mk(a, tx_ba, rx_ab))
    }

    /// A full in-memory mesh for `world` ranks under `algo`: element `r` holds rank `r`'s
    /// links, ready for [`Group::new`].
    pub fn memory_mesh(world: usize, algo: Algo) -> Vec<BTreeMap<usize, DataLink>> {
        let mut out: Vec<BTreeMap<usize, DataLink>> = (0..world).map(|_| BTreeMap::new()).collect();
        for a in 0..world {
            for b in algo.peers(a, world) {
                if a < b {
                    let (la, lb) = DataLink::memory_pair(a, b);
                    out[a].insert(b, la);
                    out[b].insert(a, lb);
                }
            }
        }
        out
    }

    /// The peer's rank.
    pub fn peer(&self) -> usize {
        self.peer
    }

    /// The peer's name in errors, e.g. `"rank 2 (127.0.0.1:7001)"`.
    pub fn peer_name(&self) -> &str {
        &self.tx.name
    }

    /// The underlying connection, if any.
    pub fn connection(&self) -> Option<&Connection> {
        self.conn.as_ref()
    }

    /// Sends one tensor frame.
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), NetError> {
        let mut framed = vec![0u8; FRAME_HEADER_LEN + payload.len()];
        framed[FRAME_HEADER_LEN..].copy_from_slice(payload);
        fill_prefix(FrameKind::Tensor, &mut framed)?;
        self.tx.send_prefixed(&framed).await
    }

    /// Receives one tensor frame of at most `max` bytes into `buf` (its capacity is
    /// reused when the link is a QUIC stream).
    pub async fn recv(&mut self, buf: &mut Vec<u8>, max: usize) -> Result<(), NetError> {
        std::mem::swap(buf, &mut self.rx.buf);
        let r = self.rx.recv(max).await;
        std::mem::swap(buf, &mut self.rx.buf);
        r
    }
}

#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct LinkHello {
    version: u32,
    rank: u32,
    world: u32,
    algo: Algo,
}

const HELLO_MAX: usize = 1024;

fn check_hello(h: &LinkHello, world: usize, algo: Algo) -> Result<(), NetError> {
    if h.version != PROTOCOL_VERSION {
        return Err(NetError::Protocol(format!(
            "protocol version {} (we speak {PROTOCOL_VERSION})",
            h.version
        )));
    }
    if h.world as usize != world || h.algo != algo {
        return Err(NetError::Protocol(format!(
            "peer is in a world of {} with {} (we: {world}, {algo})",
            h.world, h.algo
        )));
    }
    Ok(())
}

/// Opens the data stream to `peer` over `conn`: sends a hello (protocol version, our
/// rank, world size, algorithm) and checks the peer's answer.
pub async fn open_data_link(
    conn: &Connection,
    rank: usize,
    world: usize,
    algo: Algo,
    peer: usize,
) -> Result<DataLink, NetError> {
    let conn = conn
        .clone()
        .with_peer_name(&format!("rank {peer} ({})", conn.remote_addr()));
    let mut s = conn.open_stream(DATA_STREAM_TAG).await?;
    s.send_msg(&LinkHello {
        version: PROTOCOL_VERSION,
        rank: rank as u32,
        world: world as u32,
        algo,
    })
    .await?;
    let h: LinkHello = s.recv_msg(HELLO_MAX).await?;
    check_hello(&h, world, algo).map_err(|e| e.with_peer(conn.peer_name()))?;
    if h.rank as usize != peer {
        return Err(NetError::Protocol(format!(
            "expected rank {peer}, the node says it is rank {}",
            h.rank
        ))
        .with_peer(&conn.remote_addr().to_string()));
    }
    Ok(DataLink::quic(peer, s, Some(conn)))
}

/// Accepts a data stream opened by [`open_data_link`] on `conn`, answers the hello and
/// returns the link (its peer rank comes from the hello).
pub async fn accept_data_link(
    conn: &Connection,
    rank: usize,
    world: usize,
    algo: Algo,
) -> Result<DataLink, NetError> {
    let s = conn.accept_stream().await?;
    accept_data_stream(conn, s, rank, world, algo).await
}

/// Completes [`accept_data_link`] on a stream already accepted (and tagged
/// [`DATA_STREAM_TAG`]), for servers that dispatch incoming streams by tag.
pub async fn accept_data_stream(
    conn: &Connection,
    mut s: Stream,
    rank: usize,
    world: usize,
    algo: Algo,
) -> Result<DataLink, NetError> {
    if s.tag != DATA_STREAM_TAG {
        return Err(NetError::Protocol(format!(
            "expected a data stream, got stream tag {:#x}",
            s.tag
        ))
        .with_peer(conn.peer_name()));
    }
    let h: LinkHello = s.recv_msg(HELLO_MAX).await?;
    check_hello(&h, world, algo).map_err(|e| e.with_peer(conn.peer_name()))?;
    s.send_msg(&LinkHello {
        version: PROTOCOL_VERSION,
        rank: rank as u32,
        world: world as u32,
        algo,
    })
    .await?;
    let peer = h.rank as usize;
    let conn = conn
        .clone()
        .with_peer_name(&format!("rank {peer} ({})", conn.remote_addr()));
    Ok(DataLink::quic(peer, s, Some(conn)))
}

/// Builds all of `rank`'s data links for `algo`: dials every lower-ranked peer at
/// `addrs[peer]` and accepts one connection from every higher-ranked peer on `ep`
/// (which must be a server endpoint if any higher-ranked peer exists). Consumes the
/// incoming connections it accepts; a connection from an unexpected rank is an error.
/// Everything must complete within `timeout`.
pub async fn establish_links(
    ep: &Endpoint,
    rank: usize,
    world: usize,
    algo: Algo,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<BTreeMap<usize, DataLink>, NetError> {
    if addrs.len() < world {
        return Err(NetError::Protocol(format!(
            "{} addresses for a world of {world}",
            addrs.len()
        )));
    }
    let peers = algo.peers(rank, world);
    let lower: Vec<usize> = peers.iter().copied().filter(|&p| p < rank).collect();
    let higher: Vec<usize> = peers.iter().copied().filter(|&p| p > rank).collect();
    let work = async {
        let dial = try_join_all(lower.iter().map(|&p| async move {
            let conn = ep.connect(addrs[p], timeout).await?;
            open_data_link(&conn, rank, world, algo, p).await
        }));
        let accept = async {
            let mut got = Vec::new();
            while got.len() < higher.len() {
                let conn = match ep.accept().await {
                    None => {
                        return Err(NetError::Protocol(
                            "endpoint closed while accepting links".into(),
                        ))
                    }
                    Some(c) => c?,
                };
                let link = accept_data_link(&conn, rank, world, algo).await?;
                if !higher.contains(&link.peer)
                    || got.iter().any(|l: &DataLink| l.peer == link.peer)
                {
                    return Err(NetError::Protocol(format!(
                        "unexpected data link from rank {} (expecting {higher:?})",
                        link.peer
                    )));
                }
                got.push(link);
            }
            Ok(got)
        };
        let (a, b) = futures::try_join!(dial, accept)?;
        Ok::<_, NetError>(a.into_iter().chain(b).map(|l| (l.peer, l)).collect())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| NetError::Timeout {
            what: format!("rank {rank} establishing {algo} links with {peers:?}"),
            after: timeout,
        })?
}

// ---------------------------------------------------------------------------------------
// Group

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

/// A rank's membership in a collective group: its links and scratch buffers.
pub struct Group {
    rank: usize,
    world: usize,
    algo: Algo,
    dtype: WireDType,
    links: BTreeMap<usize, DataLink>,
    tx: Vec<u8>,
    h16: Vec<f16>,
    poisoned: bool,
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("algo", &self.algo)
            .field("dtype", &self.dtype)
            .field("links", &self.links.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn split_link(
    links: &mut BTreeMap<usize, DataLink>,
    to: usize,
    from: usize,
) -> Result<(&mut LinkTx, &mut LinkRx), NetError> {
    let missing = |r: usize| NetError::Protocol(format!("no data link to rank {r}"));
    if to == from {
        let l = links.get_mut(&to).ok_or_else(|| missing(to))?;
        return Ok((&mut l.tx, &mut l.rx));
    }
    let mut tx = None;
    let mut rx = None;
    for (k, l) in links.iter_mut() {
        if *k == to {
            tx = Some(&mut l.tx);
        } else if *k == from {
            rx = Some(&mut l.rx);
        }
    }
    Ok((
        tx.ok_or_else(|| missing(to))?,
        rx.ok_or_else(|| missing(from))?,
    ))
}

impl Group {
    /// Creates the group. `links` must hold exactly one link per rank in
    /// `algo.peers(rank, world)`, each with the matching [`DataLink::peer`].
    pub fn new(
        rank: usize,
        world: usize,
        algo: Algo,
        dtype: WireDType,
        links: BTreeMap<usize, DataLink>,
    ) -> Result<Group, NetError> {
        if world == 0 || rank >= world {
            return Err(NetError::Protocol(format!(
                "rank {rank} outside a world of {world}"
            )));
        }
        let want = algo.peers(rank, world);
        let have: Vec<usize> = links.keys().copied().collect();
        if want != have {
            return Err(NetError::Protocol(format!(
                "rank {rank} of {world} under {algo} needs links to {want:?}, got {have:?}"
            )));
        }
        if let Some((k, l)) = links.iter().find(|(k, l)| **k != l.peer) {
            return Err(NetError::Protocol(format!(
                "link keyed as rank {k} leads to rank {}",
                l.peer
            )));
        }
        Ok(Group {
            rank,
            world,
            algo,
            dtype,
            links,
            tx: Vec::new(),
            h16: Vec::new(),
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

    /// The algorithm.
    pub fn algo(&self) -> Algo {
        self.algo
    }

    /// The wire element type.
    pub fn dtype(&self) -> WireDType {
        self.dtype
    }

    /// Changes the wire element type; every rank must make the same change between the
    /// same two allreduces.
    pub fn set_dtype(&mut self, dtype: WireDType) {
        self.dtype = dtype;
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
        if self.world > 1 {
            self.poisoned = true;
            match self.algo {
                Algo::Star => self.star(x, &mut st).await?,
                Algo::Ring => self.ring(x, &mut st).await?,
                Algo::Tree => self.tree(x, &mut st).await?,
            }
            self.poisoned = false;
        }
        st.total = start.elapsed();
        Ok(st)
    }

    /// Encodes `v` as a prefixed tensor frame into `tx`.
    fn encode(
        tx: &mut Vec<u8>,
        h16: &mut Vec<f16>,
        dtype: WireDType,
        v: &[f32],
    ) -> Result<(), NetError> {
        tx.clear();
        tx.resize(FRAME_HEADER_LEN, 0);
        match dtype {
            WireDType::F32 => extend_f32_le(tx, v),
            WireDType::F16 => extend_f16_le(tx, v, h16),
        }
        fill_prefix(FrameKind::Tensor, tx)
    }

    fn decode_into(
        dtype: WireDType,
        src: &[u8],
        dst: &mut [f32],
        h16: &mut Vec<f16>,
    ) -> Result<(), NetError> {
        match dtype {
            WireDType::F32 => f32_from_le_bytes(src, dst),
            WireDType::F16 => f16_le_to_f32(src, dst, h16),
        }
    }

    fn add_into(dtype: WireDType, src: &[u8], acc: &mut [f32]) -> Result<(), NetError> {
        match dtype {
            WireDType::F32 => add_f32_le(acc, src),
            WireDType::F16 => add_f16_le(acc, src),
        }
    }

    /// Encodes `v` as a prefixed tensor frame in a buffer of its own, to be sent without
    /// copies by [`LinkTx::send_shared`].
    fn encode_shared(h16: &mut Vec<f16>, dtype: WireDType, v: &[f32]) -> Result<Bytes, NetError> {
        let mut tx = Vec::with_capacity(FRAME_HEADER_LEN + v.len() * dtype.bytes());
        Self::encode(&mut tx, h16, dtype, v)?;
        Ok(Bytes::from(tx))
    }

    async fn star(&mut self, x: &mut [f32], st: &mut AllreduceStats) -> Result<(), NetError> {
        let Group {
            rank,
            world,
            dtype,
            links,
            h16,
            ..
        } = self;
        let (dtype, eb) = (*dtype, dtype.bytes());
        let nbytes = x.len() * eb;
        // Adds an element-aligned piece of a peer's partial into x (f32 sums in any dtype).
        let add = |x: &mut [f32], i: usize, b: &[u8]| {
            Self::add_into(dtype, b, &mut x[i..i + b.len() / eb])
        };
        if *world == 2 {
            // Two ranks: the star degenerates into a symmetric exchange. Each sends its partial
            // to the other and adds the one it receives: one hop instead of two, the same bytes,
            // and bitwise identical sums (f32 addition of two terms commutes).
            let l = links.values_mut().next().expect("one link");
            if dtype == WireDType::F16 {
                round_to_f16(x, h16);
            }
            let framed = Self::encode_shared(h16, dtype, x)?;
            let t = Instant::now();
            futures::try_join!(
                l.tx.send_shared(framed),
                l.rx.recv_each(nbytes, eb, |i, b| add(x, i, b))
            )?;
            st.wait += t.elapsed();
            st.bytes_sent += nbytes as u64;
            st.bytes_recv += nbytes as u64;
            if dtype == WireDType::F16 {
                round_to_f16(x, h16);
            }
            return Ok(());
        }
        if *rank == 0 {
            let t = Instant::now();
            if dtype == WireDType::F16 {
                round_to_f16(x, h16);
            }
            // QUIC receives every worker's stream at once in the background; consuming them
            // in ascending rank order (BTreeMap order) only fixes the order of the sums,
            // x0 + x1 + x2 + …, so the result never depends on arrival timing. Each partial
            // is added straight from the received chunks.
            for l in links.values_mut() {
                l.rx.recv_each(nbytes, eb, |i, b| add(x, i, b)).await?;
            }
            st.wait += t.elapsed();
            st.bytes_recv += (nbytes * links.len()) as u64;
            if dtype == WireDType::F16 {
                round_to_f16(x, h16);
            }
            // One encoded frame, shared (not copied) by every worker's stream.
            let framed = Self::encode_shared(h16, dtype, x)?;
            try_join_all(links.values_mut().map(|l| l.tx.send_shared(framed.clone()))).await?;
            st.bytes_sent += (nbytes * links.len()) as u64;
        } else {
            let hub = links
                .get_mut(&0)
                .ok_or_else(|| NetError::Protocol("no data link to rank 0".into()))?;
            hub.tx
                .send_shared(Self::encode_shared(h16, dtype, x)?)
                .await?;
            st.bytes_sent += nbytes as u64;
            let t = Instant::now();
            hub.rx
                .recv_each(nbytes, eb, |i, b| {
                    Self::decode_into(dtype, b, &mut x[i..i + b.len() / eb], h16)
                })
                .await?;
            st.wait += t.elapsed();
            st.bytes_recv += nbytes as u64;
        }
        Ok(())
    }

    async fn ring(&mut self, x: &mut [f32], st: &mut AllreduceStats) -> Result<(), NetError> {
        let Group {
            rank,
            world,
            dtype,
            links,
            tx,
            h16,
            ..
        } = self;
        let (r, w, dtype, bpe) = (*rank, *world, *dtype, dtype.bytes());
        let n = x.len();
        let (left, right) = ((r + w - 1) % w, (r + 1) % w);
        if dtype == WireDType::F16 {
            round_to_f16(x, h16);
        }
        // Reduce-scatter: after step s, the chunk received is the partial over s + 2 ranks.
        for s in 0..w - 1 {
            let send_c = ring_chunk(n, w, (r + w - s) % w);
            let recv_c = ring_chunk(n, w, (r + 2 * w - s - 1) % w);
            Self::encode(tx, h16, dtype, &x[send_c.clone()])?;
            let (ltx, lrx) = split_link(links, right, left)?;
            let t = Instant::now();
            futures::try_join!(ltx.send_prefixed(tx), lrx.recv_exact(recv_c.len() * bpe))?;
            st.wait += t.elapsed();
            st.bytes_sent += (send_c.len() * bpe) as u64;
            st.bytes_recv += (recv_c.len() * bpe) as u64;
            Self::add_into(dtype, &lrx.buf, &mut x[recv_c])?;
        }
        // This rank now owns chunk r + 1: fix its final bits once, then circulate them.
        let own = ring_chunk(n, w, (r + 1) % w);
        if dtype == WireDType::F16 {
            round_to_f16(&mut x[own], h16);
        }
        for s in 0..w - 1 {
            let send_c = ring_chunk(n, w, (r + 1 + w - s) % w);
            let recv_c = ring_chunk(n, w, (r + w - s) % w);
            Self::encode(tx, h16, dtype, &x[send_c.clone()])?;
            let (ltx, lrx) = split_link(links, right, left)?;
            let t = Instant::now();
            futures::try_join!(ltx.send_prefixed(tx), lrx.recv_exact(recv_c.len() * bpe))?;
            st.wait += t.elapsed();
            st.bytes_sent += (send_c.len() * bpe) as u64;
            st.bytes_recv += (recv_c.len() * bpe) as u64;
            Self::decode_into(dtype, &lrx.buf, &mut x[recv_c], h16)?;
        }
        Ok(())
    }

    async fn tree(&mut self, x: &mut [f32], st: &mut AllreduceStats) -> Result<(), NetError> {
        let Group {
            rank,
            world,
            dtype,
            links,
            tx,
            h16,
            ..
        } = self;
        let (r, dtype) = (*rank, *dtype);
        let nbytes = x.len() * dtype.bytes();
        let children = tree_children(r, *world);
        let parent = tree_parent(r);
        if dtype == WireDType::F16 {
            round_to_f16(x, h16);
        }
        // Reduce: children's subtree sums, added in rank order.
        let t = Instant::now();
        try_join_all(
            links
                .iter_mut()
                .filter(|(k, _)| children.contains(k))
                .map(|(_, l)| l.rx.recv_exact(nbytes)),
        )
        .await?;
        st.wait += t.elapsed();
        st.bytes_recv += (nbytes * children.len()) as u64;
        for c in &children {
            Self::add_into(dtype, &links[c].rx.buf, x)?;
        }
        match parent {
            Some(p) => {
                let up = links
                    .get_mut(&p)
                    .ok_or_else(|| NetError::Protocol(format!("no data link to rank {p}")))?;
                Self::encode(tx, h16, dtype, x)?;
                up.tx.send_prefixed(tx).await?;
                st.bytes_sent += nbytes as u64;
                let t = Instant::now();
                up.rx.recv_exact(nbytes).await?;
                st.wait += t.elapsed();
                st.bytes_recv += nbytes as u64;
                Self::decode_into(dtype, &up.rx.buf, x, h16)?;
                // Forward the parent's frame bytes verbatim.
                tx.clear();
                tx.resize(FRAME_HEADER_LEN, 0);
                tx.extend_from_slice(&up.rx.buf);
                fill_prefix(FrameKind::Tensor, tx)?;
            }
            None => {
                if dtype == WireDType::F16 {
                    round_to_f16(x, h16);
                }
                Self::encode(tx, h16, dtype, x)?;
            }
        }
        // Broadcast down.
        let framed: &[u8] = tx;
        try_join_all(
            links
                .iter_mut()
                .filter(|(k, _)| children.contains(k))
                .map(|(_, l)| l.tx.send_prefixed(framed)),
        )
        .await?;
        st.bytes_sent += (nbytes * children.len()) as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(world: usize, n: usize, seed: u64, positive: bool) -> Vec<Vec<f32>> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..world)
            .map(|_| {
                (0..n)
                    .map(|_| {
                        s = s
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let u = ((s >> 40) as f32) / (1u64 << 24) as f32; // [0, 1)
                        if positive {
                            0.01 + u * 3.0
                        } else {
                            (u - 0.5) * 8.0
                        }
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn chunks_cover_exactly() {
        for n in 0..40 {
            for w in 1..9 {
                let mut next = 0;
                for c in 0..w {
                    let r = ring_chunk(n, w, c);
                    assert_eq!(r.start, next);
                    assert!(r.len() <= n / w + 1 && r.len() >= n / w);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn tree_shape() {
        assert_eq!(tree_parent(0), None);
        assert_eq!(tree_parent(1), Some(0));
        assert_eq!(tree_parent(2), Some(0));
        assert_eq!(tree_parent(5), Some(2));
        assert_eq!(tree_children(0, 3), vec![1, 2]);
        assert_eq!(tree_children(1, 4), vec![3]);
        assert_eq!(tree_children(3, 4), Vec::<usize>::new());
    }

    #[test]
    fn peers_are_symmetric() {
        for algo in Algo::ALL {
            for w in 1..10 {
                for r in 0..w {
                    for p in algo.peers(r, w) {
                        assert_ne!(p, r);
                        assert!(algo.peers(p, w).contains(&r), "{algo} {w} {r} {p}");
                    }
                }
            }
        }
        assert_eq!(Algo::Star.peers(0, 4), vec![1, 2, 3]);
        assert_eq!(Algo::Star.peers(2, 4), vec![0]);
        assert_eq!(Algo::Ring.peers(0, 4), vec![1, 3]);
        assert_eq!(Algo::Ring.peers(1, 2), vec![0]);
        assert_eq!(Algo::Tree.peers(1, 5), vec![0, 3, 4]);
        assert!(Algo::Star.peers(0, 1).is_empty());
    }

    #[test]
    fn parse_display() {
        for a in Algo::ALL {
            assert_eq!(a.to_string().parse::<Algo>().unwrap(), a);
        }
        assert_eq!("F16".parse::<WireDType>().unwrap(), WireDType::F16);
        assert_eq!(WireDType::F32.to_string(), "f32");
        assert!("mesh".parse::<Algo>().is_err());
    }

    #[test]
    fn rank_order_sum() {
        let a = [1e8f32, 1.0];
        let b = [1.0f32, 1e8];
        let c = [-1e8f32, -1e8];
        let mut out = [0f32; 2];
        sum_rank_order(&[&a, &b, &c], &mut out);
        assert_eq!(out, [((1e8f32 + 1.0) + -1e8), ((1.0f32 + 1e8) + -1e8)]);
    }

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
            for &n in &[0usize, 1, 3, 7, 64, 1000] {
                for algo in Algo::ALL {
                    for dtype in [WireDType::F32, WireDType::F16] {
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
                            Algo::Ring => {
                                let reference = star_reference(&parts, WireDType::F32);
                                let tol = if dtype == WireDType::F32 { 1e-6 } else { 4e-3 };
                                for (a, b) in res[0].iter().zip(&reference) {
                                    assert!(
                                        (a - b).abs() <= tol * b.abs(),
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
    fn star_f32_is_sequential_sum() {
        let parts = inputs(5, 100, 9, false);
        let mut seq = parts[0].clone();
        for p in &parts[1..] {
            for (s, v) in seq.iter_mut().zip(p) {
                *s += v;
            }
        }
        assert_eq!(bits(&star_reference(&parts, WireDType::F32)), bits(&seq));
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
