//! Link measurement at session start: a short ping train, a bulk transfer and a burst of
//! small messages over every data link, giving each directed link's one-way latency,
//! bandwidth and per-message cost, shared so that every rank holds the same
//! [`Costs`] and `--allreduce auto` makes the same choice everywhere.
//!
//! Pairs are measured in rounds of disjoint pairs (the circle method), so a link's
//! numbers are not disturbed by the rank's other links. Within a pair, each side measures
//! its own direction: it sends, the other echoes.

use std::time::Instant;

use bytes::Bytes;
use half::f16;
use tpi_algo::cost::{Costs, LinkCost};

use super::link::{LinkRx, LinkTx};
use super::reduce::encode_frame;
use super::{Group, WireDType};
use crate::net::error::NetError;

/// Round trips in the ping train; the fastest counts (queueing only adds).
pub const PINGS: usize = 3;
/// Elements (f32) of the bulk transfer: 128 KiB, a few ms on a 300 Mbit/s link.
pub const BULK_ELEMS: usize = 32 * 1024;
/// Small messages sent back to back for the per-message cost.
pub const BURST: usize = 8;
/// Software cost per received byte (decode, copy, sum) the cost model assumes, in
/// seconds: about 2 GB/s through QUIC's receive path and the sum.
pub const PER_BYTE_S: f64 = 0.5e-9;

/// The rounds of disjoint pairs `(low, high)` that cover every pair of `0..world` once
/// (the circle method; with an odd world one rank sits out each round).
pub fn pair_rounds(world: usize) -> Vec<Vec<(usize, usize)>> {
    if world < 2 {
        return Vec::new();
    }
    let m = world + world % 2;
    (0..m - 1)
        .map(|r| {
            let mut round = vec![(m - 1, r)];
            round.extend((1..m / 2).map(|k| ((r + k) % (m - 1), (r + m - 1 - k) % (m - 1))));
            round
                .into_iter()
                .filter(|&(a, b)| a < world && b < world)
                .map(|(a, b)| (a.min(b), a.max(b)))
                .collect()
        })
        .collect()
}

/// One tiny tensor frame (one f32), the ping and the acknowledgement.
fn tiny() -> Result<Bytes, NetError> {
    encode_frame(WireDType::F32, &[0.0], &mut Vec::new())
}

async fn recv_frame(rx: &mut LinkRx, elems: usize) -> Result<(), NetError> {
    rx.recv_each(elems * 4, 4, |_, _| Ok(())).await
}

/// Measures the direction `tx` → peer: the peer runs [`echo`].
async fn measure(tx: &mut LinkTx, rx: &mut LinkRx) -> Result<LinkCost, NetError> {
    let ping = tiny()?;
    let mut rtt = f64::INFINITY;
    for _ in 0..PINGS {
        let t = Instant::now();
        tx.send(ping.clone()).await?;
        recv_frame(rx, 1).await?;
        rtt = rtt.min(t.elapsed().as_secs_f64());
    }
    let bulk = encode_frame(
        WireDType::F32,
        &vec![0.0; BULK_ELEMS],
        &mut Vec::<f16>::new(),
    )?;
    let t = Instant::now();
    tx.send(bulk).await?;
    recv_frame(rx, 1).await?;
    let bulk_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..BURST {
        tx.send(ping.clone()).await?;
    }
    recv_frame(rx, 1).await?;
    let burst_s = t.elapsed().as_secs_f64();
    Ok(link_cost(rtt, bulk_s, burst_s))
}

/// The link cost from a ping train's fastest round trip, the bulk transfer's time to its
/// acknowledgement and the burst's: latency is half the round trip; the bulk's time past
/// a round trip is its wire time; the burst's past a round trip is spent on its extra
/// messages.
pub fn link_cost(rtt_s: f64, bulk_s: f64, burst_s: f64) -> LinkCost {
    let bytes = (BULK_ELEMS * 4) as f64;
    LinkCost {
        latency_s: rtt_s / 2.0,
        bytes_per_s: Some(bytes / (bulk_s - rtt_s).max(1e-6)),
        per_message_s: ((burst_s - rtt_s) / (BURST - 1) as f64).max(0.0),
    }
}

/// The peer's side of [`measure`].
async fn echo(tx: &mut LinkTx, rx: &mut LinkRx) -> Result<(), NetError> {
    let ack = tiny()?;
    for _ in 0..PINGS {
        recv_frame(rx, 1).await?;
        tx.send(ack.clone()).await?;
    }
    recv_frame(rx, BULK_ELEMS).await?;
    tx.send(ack.clone()).await?;
    for _ in 0..BURST {
        recv_frame(rx, 1).await?;
    }
    tx.send(ack).await
}

/// Fields per directed link in the shared table.
const FIELDS: usize = 3;

impl Group {
    /// Measures every data link (see the module doc) and shares the results, so that
    /// every rank returns the same [`Costs`] and keeps them for `auto`'s choices. Every
    /// rank must call it at the same point, before or between allreduces. A link this
    /// group does not have (a fixed algorithm links only some pairs) is given the slowest
    /// measured link's cost.
    pub async fn probe(&mut self) -> Result<Costs, NetError> {
        let (me, w) = (self.rank, self.world);
        let mut table = vec![0.0f32; w * w * FIELDS];
        for round in pair_rounds(w) {
            let Some(&(lo, hi)) = round.iter().find(|&&(a, b)| a == me || b == me) else {
                continue;
            };
            let peer = if lo == me { hi } else { lo };
            let Some(link) = self.links.get_mut(&peer) else {
                continue;
            };
            let (tx, rx) = (&mut link.tx, &mut link.rx);
            let mine = if me == lo {
                let c = measure(tx, rx).await?;
                echo(tx, rx).await?;
                c
            } else {
                echo(tx, rx).await?;
                measure(tx, rx).await?
            };
            let at = (me * w + peer) * FIELDS;
            table[at] = mine.latency_s as f32;
            table[at + 1] = mine.bytes_per_s.unwrap_or(0.0) as f32;
            table[at + 2] = mine.per_message_s as f32;
        }
        // Each entry is non-zero at one rank only, so the f32 sum is exact.
        let dtype = self.dtype;
        self.set_dtype(WireDType::F32);
        let shared = self.allreduce(&mut table).await;
        self.set_dtype(dtype);
        shared?;
        let costs = costs_from_table(w, &table, |a, b| self.links_between(a, b));
        self.costs = Some(costs.clone());
        self.steps_len = None;
        Ok(costs)
    }

    /// [`Group::probe`], failing with [`NetError::Timeout`] after `timeout`.
    pub async fn probe_within(&mut self, timeout: std::time::Duration) -> Result<Costs, NetError> {
        let rank = self.rank;
        tokio::time::timeout(timeout, self.probe())
            .await
            .map_err(|_| NetError::Timeout {
                what: format!("rank {rank} measuring its links"),
                after: timeout,
            })?
    }

    /// Whether ranks `a` and `b` have a data link under this group's policy.
    fn links_between(&self, a: usize, b: usize) -> bool {
        self.policy.peers(a, self.world).contains(&b)
    }
}

/// The [`Costs`] of a shared table; links `linked` says do not exist get the slowest
/// measured link's cost.
fn costs_from_table(w: usize, table: &[f32], linked: impl Fn(usize, usize) -> bool) -> Costs {
    let at = |f: usize, t: usize| {
        let i = (f * w + t) * FIELDS;
        LinkCost {
            latency_s: table[i] as f64,
            bytes_per_s: Some(table[i + 1] as f64),
            per_message_s: table[i + 2] as f64,
        }
    };
    let measured = (0..w * w)
        .map(|i| (i / w, i % w))
        .filter(|&(f, t)| f != t && linked(f, t));
    let slowest = measured
        .map(|(f, t)| at(f, t))
        .reduce(|a, b| LinkCost {
            latency_s: a.latency_s.max(b.latency_s),
            bytes_per_s: Some(
                a.bytes_per_s
                    .unwrap_or(0.0)
                    .min(b.bytes_per_s.unwrap_or(0.0)),
            ),
            per_message_s: a.per_message_s.max(b.per_message_s),
        })
        .unwrap_or(LinkCost::FREE);
    Costs::from_fn(
        w,
        PER_BYTE_S,
        |f, t| {
            if linked(f, t) {
                at(f, t)
            } else {
                slowest
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_cover_every_pair_once_and_are_disjoint() {
        for w in 1..=9 {
            let rounds = pair_rounds(w);
            let mut seen = std::collections::BTreeSet::new();
            for round in &rounds {
                let mut busy = std::collections::BTreeSet::new();
                for &(a, b) in round {
                    assert!(a < b && b < w, "{w}: {a} {b}");
                    assert!(
                        busy.insert(a) && busy.insert(b),
                        "{w}: rank twice in a round"
                    );
                    assert!(seen.insert((a, b)), "{w}: pair twice");
                }
            }
            assert_eq!(seen.len(), w * w.saturating_sub(1) / 2, "{w}");
            assert!(rounds.len() <= w, "{w}");
        }
    }

    #[test]
    fn link_cost_from_timings() {
        // 2 ms round trip; 128 KiB took 3.5 ms more; 8 messages took 0.7 ms more.
        let c = link_cost(2e-3, 5.5e-3, 2.7e-3);
        assert!((c.latency_s - 1e-3).abs() < 1e-12);
        let bw = c.bytes_per_s.unwrap();
        assert!((bw - 131072.0 / 3.5e-3).abs() / bw < 1e-9, "{bw}");
        assert!((c.per_message_s - 1e-4).abs() < 1e-12);
        // Timer noise never gives a negative cost or an infinite bandwidth.
        let c = link_cost(2e-3, 1.9e-3, 1.9e-3);
        assert_eq!(c.per_message_s, 0.0);
        assert!(c.bytes_per_s.unwrap().is_finite());
    }

    #[test]
    fn unlinked_pairs_get_the_slowest_link() {
        let w = 3;
        let mut t = vec![0.0f32; w * w * FIELDS];
        let mut put = |f: usize, to: usize, lat: f32, bw: f32| {
            let i = (f * w + to) * FIELDS;
            t[i] = lat;
            t[i + 1] = bw;
        };
        put(0, 1, 1e-3, 1e8);
        put(1, 0, 1e-3, 1e8);
        put(0, 2, 5e-3, 1e7);
        put(2, 0, 5e-3, 1e7);
        // A star: 1 and 2 have no link.
        let c = costs_from_table(w, &t, |a, b| a == 0 || b == 0);
        assert!((c.link(0, 1).latency_s - 1e-3).abs() < 1e-9);
        assert!((c.link(1, 2).latency_s - 5e-3).abs() < 1e-9);
        assert!((c.link(2, 1).bytes_per_s.unwrap() - 1e7).abs() < 1.0);
    }
}
