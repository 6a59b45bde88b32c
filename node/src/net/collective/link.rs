//! Data links: one per peer rank, a QUIC stream or an in-memory channel, split into a
//! sending and a receiving half so that a rank can send to one peer while it receives
//! from another.
//!
//! Both kinds carry the same bytes: whole tensor frames, header included. The in-memory
//! kind hands the receiver its bytes in pieces cut at seeded random points, as QUIC hands
//! out packets, so the unit tests run the same header checks and the same reassembly
//! ([`super::reassemble`]) as a real cluster.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::reassemble::{Elements, Header};
use super::Policy;
use crate::net::error::{map_read_error, map_write_error, NetError};
use crate::net::frame::{decode_header, FrameKind};
use crate::net::transport::{Connection, Stream};

/// The sending half of a link.
pub(crate) struct LinkTx {
    name: Arc<str>,
    half: TxHalf,
}

enum TxHalf {
    Quic(quinn::SendStream),
    Mem(mpsc::UnboundedSender<Bytes>),
}

impl LinkTx {
    /// Sends one whole frame (header included) without copying it: QUIC keeps a
    /// reference to `framed` until the peer acknowledges it, so one frame can go to many
    /// peers.
    pub(crate) async fn send(&mut self, framed: Bytes) -> Result<(), NetError> {
        match &mut self.half {
            TxHalf::Quic(s) => s
                .write_chunk(framed)
                .await
                .map_err(|e| map_write_error(e).with_peer(&self.name)),
            TxHalf::Mem(tx) => tx.send(framed).map_err(|_| NetError::Closed {
                peer: self.name.to_string(),
                reason: "in-memory link dropped".into(),
            }),
        }
    }
}

/// The receiving half of a link.
pub(crate) struct LinkRx {
    name: Arc<str>,
    half: RxHalf,
}

enum RxHalf {
    Quic(quinn::RecvStream),
    Mem(MemRx),
}

/// The receiving end of an in-memory link: frames as sent, handed out in pieces.
struct MemRx {
    rx: mpsc::UnboundedReceiver<Bytes>,
    pending: Bytes,
    /// xorshift state choosing each piece's largest size.
    cuts: u64,
}

impl MemRx {
    async fn piece(&mut self, max: usize, name: &str) -> Result<Bytes, NetError> {
        if self.pending.is_empty() {
            self.pending = self.rx.recv().await.ok_or_else(|| NetError::Closed {
                peer: name.to_string(),
                reason: "in-memory link dropped".into(),
            })?;
        }
        self.cuts ^= self.cuts << 13;
        self.cuts ^= self.cuts >> 7;
        self.cuts ^= self.cuts << 17;
        // Mostly small pieces (1–64 bytes, splitting elements and headers), sometimes a
        // whole frame at once.
        let cut = if self.cuts & 7 == 0 {
            usize::MAX
        } else {
            1 + (self.cuts >> 8) as usize % 64
        };
        let take = max.min(cut).min(self.pending.len());
        Ok(self.pending.split_to(take))
    }
}

impl LinkRx {
    /// The next piece of the stream, of at most `max` bytes; the stream's end is an error.
    async fn piece(&mut self, max: usize) -> Result<Bytes, NetError> {
        match &mut self.half {
            RxHalf::Quic(r) => match r.read_chunk(max, true).await {
                Ok(Some(c)) => Ok(c.bytes),
                Ok(None) => Err(NetError::Closed {
                    peer: self.name.to_string(),
                    reason: "stream ended by the peer inside a tensor frame".into(),
                }),
                Err(e) => Err(map_read_error(e).with_peer(&self.name)),
            },
            RxHalf::Mem(m) => m.piece(max, &self.name).await,
        }
    }

    /// Receives a tensor frame of exactly `expect` payload bytes and hands it to `sink` in
    /// runs of whole `elem`-byte elements, as `sink(first element index, bytes)`, straight
    /// from the received pieces: no copy of the frame. Reads never go past the frame's
    /// end, so the next frame stays in the stream.
    pub(crate) async fn recv_each(
        &mut self,
        expect: usize,
        elem: usize,
        mut sink: impl FnMut(usize, &[u8]) -> Result<(), NetError>,
    ) -> Result<(), NetError> {
        let mut header = Header::default();
        let hdr = loop {
            let p = self.piece(header.missing()).await?;
            if let Some(h) = header.feed(&p) {
                break h;
            }
        };
        let name = &self.name;
        let (kind, len) = decode_header(&hdr, expect).map_err(|e| e.with_peer(name))?;
        if kind != FrameKind::Tensor {
            return Err(
                NetError::Protocol(format!("expected a Tensor frame, got {kind:?}"))
                    .with_peer(name),
            );
        }
        if len != expect {
            return Err(NetError::Protocol(format!(
                "sent a {len}-byte tensor, expected {expect} bytes (allreduce length mismatch across ranks?)"
            ))
            .with_peer(name));
        }
        let mut elements = Elements::new(expect, elem);
        while !elements.is_done() {
            let p = self.piece(elements.missing()).await?;
            elements.feed(&p, &mut sink)?;
        }
        Ok(())
    }
}

/// A data link with one peer rank: a QUIC stream, or an in-memory channel (tests).
/// Tensor payloads travel as [`FrameKind::Tensor`] frames; errors name the peer rank.
pub struct DataLink {
    peer: usize,
    pub(crate) tx: LinkTx,
    pub(crate) rx: LinkRx,
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
            },
            conn,
        }
    }

    /// Two ends of an in-memory link: the first is held by rank `a` (its peer is `b`),
    /// the second by rank `b`. `seed` chooses where the received bytes are cut.
    pub fn memory_pair(a: usize, b: usize, seed: u64) -> (DataLink, DataLink) {
        let (tx_ab, rx_ab) = mpsc::unbounded_channel();
        let (tx_ba, rx_ba) = mpsc::unbounded_channel();
        let mk = |peer: usize, tx, rx, salt: u64| {
            let name: Arc<str> = format!("rank {peer} (in-memory)").into();
            DataLink {
                peer,
                tx: LinkTx {
                    name: name.clone(),
                    half: TxHalf::Mem(tx),
                },
                rx: LinkRx {
                    name,
                    half: RxHalf::Mem(MemRx {
                        rx,
                        pending: Bytes::new(),
                        // Never zero: xorshift would stay at zero.
                        cuts: (seed ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                    }),
                },
                conn: None,
            }
        };
        (mk(b, tx_ab, rx_ba, 1), mk(a, tx_ba, rx_ab, 2))
    }

    /// In-memory links for `world` ranks under `policy` (an algorithm or `auto`): element
    /// `r` holds rank `r`'s links, ready for [`super::Group::new`].
    pub fn memory_mesh(world: usize, policy: impl Into<Policy>) -> Vec<BTreeMap<usize, DataLink>> {
        let policy = policy.into();
        let mut out: Vec<BTreeMap<usize, DataLink>> = (0..world).map(|_| BTreeMap::new()).collect();
        for a in 0..world {
            for b in policy.peers(a, world) {
                if a < b {
                    let (la, lb) = DataLink::memory_pair(a, b, (a * world + b) as u64);
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
}

/// The sending half of the link to `to` and the receiving half of the link from `from`
/// (the same link when `to == from`).
pub(crate) fn split_link(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::frame::{encode_header, FRAME_HEADER_LEN};

    fn frame(kind: FrameKind, payload: &[u8]) -> Bytes {
        let mut v = encode_header(kind, payload.len()).unwrap().to_vec();
        v.extend_from_slice(payload);
        Bytes::from(v)
    }

    #[tokio::test]
    async fn frames_in_a_row_arrive_whole_and_in_order() {
        for seed in 0..20 {
            let (mut a, mut b) = DataLink::memory_pair(0, 1, seed);
            let payloads: Vec<Vec<u8>> = (0..5).map(|i| vec![i as u8; 4 * (i * 37 + 1)]).collect();
            for p in &payloads {
                a.tx.send(frame(FrameKind::Tensor, p)).await.unwrap();
            }
            for p in &payloads {
                let mut got = Vec::new();
                b.rx.recv_each(p.len(), 4, |i, run| {
                    assert_eq!(i * 4, got.len());
                    got.extend_from_slice(run);
                    Ok(())
                })
                .await
                .unwrap();
                assert_eq!(&got, p, "seed {seed}");
            }
        }
    }

    #[tokio::test]
    async fn wrong_frames_are_refused_naming_the_peer() {
        let (mut a, mut b) = DataLink::memory_pair(0, 3, 7);
        a.tx.send(frame(FrameKind::Tensor, &[0; 8])).await.unwrap();
        let e = b.rx.recv_each(12, 4, |_, _| Ok(())).await.unwrap_err();
        assert!(
            e.to_string().contains("rank 0") && e.to_string().contains("8-byte tensor"),
            "{e}"
        );
        let (mut a, mut b) = DataLink::memory_pair(0, 3, 7);
        a.tx.send(frame(FrameKind::Control, &[0; 8])).await.unwrap();
        let e = b.rx.recv_each(8, 4, |_, _| Ok(())).await.unwrap_err();
        assert!(e.to_string().contains("expected a Tensor frame"), "{e}");
        let (mut a, mut b) = DataLink::memory_pair(0, 3, 7);
        a.tx.send(frame(FrameKind::Tensor, &[0; 64])).await.unwrap();
        let e = b.rx.recv_each(8, 4, |_, _| Ok(())).await.unwrap_err();
        assert!(matches!(e.root(), NetError::FrameTooLarge { .. }), "{e}");
        // A link whose sender vanished mid-frame.
        let (mut a, mut b) = DataLink::memory_pair(0, 3, 7);
        let f = frame(FrameKind::Tensor, &[0; 8]);
        a.tx.send(f.slice(..FRAME_HEADER_LEN + 3)).await.unwrap();
        drop(a);
        let e = b.rx.recv_each(8, 4, |_, _| Ok(())).await.unwrap_err();
        assert!(
            matches!(e, NetError::Closed { .. }) && e.to_string().contains("rank 0"),
            "{e}"
        );
    }
}
