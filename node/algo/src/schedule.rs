//! Each algorithm's allreduce as pure data: the steps one rank takes, in order (who
//! sends which elements to whom, what is received and whether it is added or copied,
//! where values are rounded to the wire type). `tpi_node::net::collective::Group` executes these steps
//! and nothing else, so what the tests below check is what runs.

use std::ops::Range;

use crate::{ring_chunk, tree_children, tree_parent, Algo};

/// What to do with received values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Add them in (a partial sum).
    Add,
    /// Overwrite (final values).
    Copy,
}

/// Where the elements a [`Step::Many`] receives go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Land {
    /// Set aside, one buffer per sender, for a later [`Step::SumInOrder`].
    Aside,
    /// Overwrite the same range of `x` (final values).
    Copy,
}

/// One step of a rank's allreduce over its vector `x`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Round `x[range]` to the wire type (nothing for f32): fixes the bits the sum
    /// starts from, or the bits every rank ends with.
    Round(Range<usize>),
    /// Receive `x[range]` from `from`, applying `op`.
    Recv {
        /// The sender.
        from: usize,
        /// The elements.
        range: Range<usize>,
        /// Add or overwrite.
        op: Op,
    },
    /// Send `x[range]` to every rank in `to` (one encoded frame, shared).
    Send {
        /// The receivers.
        to: Vec<usize>,
        /// The elements.
        range: Range<usize>,
    },
    /// Send `x[send]` to `to` while receiving `x[recv]` from `from`, concurrently.
    Exchange {
        /// The receiver.
        to: usize,
        /// The elements sent.
        send: Range<usize>,
        /// The sender.
        from: usize,
        /// The elements received.
        recv: Range<usize>,
        /// Add or overwrite the received elements.
        op: Op,
    },
    /// Send `x[range]` to each listed receiver and receive the listed elements from each
    /// listed sender, all concurrently: one hop, whatever the number of peers.
    Many {
        /// (receiver, elements sent to it).
        sends: Vec<(usize, Range<usize>)>,
        /// (sender, elements received from it).
        recvs: Vec<(usize, Range<usize>)>,
        /// Where the received elements go.
        land: Land,
    },
    /// `x[range]` becomes the sum, taken in ascending rank order over `ranks`, of this
    /// rank's own `x[range]` and what the last [`Step::Many`] set aside from the others:
    /// `((p0 + p1) + p2) + …`, the star hub's sum, so every rank gets the same bits.
    SumInOrder {
        /// The elements.
        range: Range<usize>,
        /// The ranks whose values are summed, ascending (this rank among them).
        ranks: Vec<usize>,
    },
}

/// The steps `rank` of `world` takes to allreduce `n` elements under `algo`. Empty for
/// one rank.
///
/// - Star: workers send their partial to rank 0, which adds them in rank order and sends
///   the sum back; with two ranks, one exchange in which both add.
/// - Ring: reduce-scatter (each step adds the chunk received from the left), then
///   allgather of each chunk's final bits, fixed once at its owner.
/// - Tree: children's subtree sums are added in rank order and passed up; the root's sum
///   comes back down.
/// - Mesh: every rank sends its partial to all others at once and sums all N in rank order.
/// - Rsag: every rank sends chunk k of its partial to rank k, sums its own chunk of all
///   N partials in rank order, and sends that chunk's sum to all.
pub fn schedule(algo: Algo, rank: usize, world: usize, n: usize) -> Vec<Step> {
    if world <= 1 || rank >= world {
        return Vec::new();
    }
    let all = 0..n;
    let round = Step::Round(all.clone());
    match algo {
        Algo::Star if world == 2 => {
            let peer = 1 - rank;
            vec![
                round.clone(),
                Step::Exchange {
                    to: peer,
                    send: all.clone(),
                    from: peer,
                    recv: all,
                    op: Op::Add,
                },
                round,
            ]
        }
        Algo::Star if rank == 0 => {
            let mut s = vec![round.clone()];
            s.extend((1..world).map(|from| Step::Recv {
                from,
                range: all.clone(),
                op: Op::Add,
            }));
            s.push(round);
            s.push(Step::Send {
                to: (1..world).collect(),
                range: all,
            });
            s
        }
        Algo::Star => vec![
            Step::Send {
                to: vec![0],
                range: all.clone(),
            },
            Step::Recv {
                from: 0,
                range: all,
                op: Op::Copy,
            },
        ],
        Algo::Ring => {
            let (w, r) = (world, rank);
            let (left, right) = ((r + w - 1) % w, (r + 1) % w);
            let chunk = |c: usize| ring_chunk(n, w, c % w);
            let mut s = vec![round];
            for k in 0..w - 1 {
                s.push(Step::Exchange {
                    to: right,
                    send: chunk(r + w - k),
                    from: left,
                    recv: chunk(r + 2 * w - k - 1),
                    op: Op::Add,
                });
            }
            // This rank now holds the whole sum of chunk r + 1.
            s.push(Step::Round(chunk(r + 1)));
            for k in 0..w - 1 {
                s.push(Step::Exchange {
                    to: right,
                    send: chunk(r + 1 + w - k),
                    from: left,
                    recv: chunk(r + w - k),
                    op: Op::Copy,
                });
            }
            s
        }
        Algo::Mesh => {
            let others: Vec<usize> = (0..world).filter(|&p| p != rank).collect();
            let to_all = |r: &Range<usize>| others.iter().map(|&p| (p, r.clone())).collect();
            vec![
                round.clone(),
                Step::Many {
                    sends: to_all(&all),
                    recvs: to_all(&all),
                    land: Land::Aside,
                },
                Step::SumInOrder {
                    range: all,
                    ranks: (0..world).collect(),
                },
                round,
            ]
        }
        Algo::Rsag => {
            let others: Vec<usize> = (0..world).filter(|&p| p != rank).collect();
            let chunk = |c: usize| ring_chunk(n, world, c);
            let own = chunk(rank);
            vec![
                round,
                Step::Many {
                    sends: others.iter().map(|&p| (p, chunk(p))).collect(),
                    recvs: others.iter().map(|&p| (p, own.clone())).collect(),
                    land: Land::Aside,
                },
                Step::SumInOrder {
                    range: own.clone(),
                    ranks: (0..world).collect(),
                },
                Step::Round(own.clone()),
                Step::Many {
                    sends: others.iter().map(|&p| (p, own.clone())).collect(),
                    recvs: others.iter().map(|&p| (p, chunk(p))).collect(),
                    land: Land::Copy,
                },
            ]
        }
        Algo::Tree => {
            let children = tree_children(rank, world);
            let mut s = vec![round.clone()];
            s.extend(children.iter().map(|&from| Step::Recv {
                from,
                range: all.clone(),
                op: Op::Add,
            }));
            match tree_parent(rank) {
                Some(p) => {
                    s.push(Step::Send {
                        to: vec![p],
                        range: all.clone(),
                    });
                    s.push(Step::Recv {
                        from: p,
                        range: all.clone(),
                        op: Op::Copy,
                    });
                }
                None => s.push(round),
            }
            if !children.is_empty() {
                s.push(Step::Send {
                    to: children,
                    range: all,
                });
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap, VecDeque};

    /// A value as a vector of how many times each rank's partial went into it.
    type Counts = Vec<u32>;

    /// Runs every rank's schedule against the others over FIFO links, on values that
    /// count contributions. Returns each rank's final vector, the ranks each talked to,
    /// and the number of rounds a rank waited on (the schedule's depth in hops).
    fn simulate(
        algo: Algo,
        world: usize,
        n: usize,
    ) -> (Vec<Vec<Counts>>, Vec<BTreeSet<usize>>, usize) {
        let steps: Vec<Vec<Step>> = (0..world).map(|r| schedule(algo, r, world, n)).collect();
        let mut x: Vec<Vec<Counts>> = (0..world)
            .map(|r| {
                (0..n)
                    .map(|_| (0..world).map(|k| (k == r) as u32).collect())
                    .collect()
            })
            .collect();
        let mut queues: HashMap<(usize, usize), VecDeque<Vec<Counts>>> = HashMap::new();
        let mut pc = vec![0usize; world];
        // An exchange whose send is done but whose receive waits.
        let mut half_done = vec![false; world];
        // What each rank's last `Many` set aside, by sender.
        let mut aside: Vec<HashMap<usize, Vec<Counts>>> = vec![HashMap::new(); world];
        let mut talked: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); world];
        let mut rounds = 0;
        loop {
            let mut progressed = false;
            let mut received = false;
            // One round: every rank does what it can with the messages sent before it.
            let mut sent: Vec<((usize, usize), Vec<Counts>)> = Vec::new();
            for r in 0..world {
                while let Some(step) = steps[r].get(pc[r]) {
                    let mut recv =
                        |from: usize, range: &Range<usize>, op: Op, x: &mut Vec<Counts>| {
                            let Some(v) = queues.get_mut(&(from, r)).and_then(|q| q.pop_front())
                            else {
                                return false;
                            };
                            assert_eq!(
                                v.len(),
                                range.len(),
                                "{algo} w={world}: size sent = size expected"
                            );
                            for (d, s) in x[range.clone()].iter_mut().zip(v) {
                                match op {
                                    Op::Add => d.iter_mut().zip(&s).for_each(|(a, b)| *a += b),
                                    Op::Copy => *d = s,
                                }
                            }
                            true
                        };
                    match step {
                        Step::Round(_) => {}
                        Step::Send { to, range } => {
                            for &t in to {
                                talked[r].insert(t);
                                sent.push(((r, t), x[r][range.clone()].to_vec()));
                            }
                        }
                        Step::Recv { from, range, op } => {
                            talked[r].insert(*from);
                            if !recv(*from, range, *op, &mut x[r]) {
                                break;
                            }
                            received = true;
                        }
                        Step::Many { sends, recvs, land } => {
                            if !half_done[r] {
                                for (t, range) in sends {
                                    talked[r].insert(*t);
                                    sent.push(((r, *t), x[r][range.clone()].to_vec()));
                                }
                                half_done[r] = true;
                            }
                            let ready = recvs
                                .iter()
                                .all(|(f, _)| queues.get(&(*f, r)).is_some_and(|q| !q.is_empty()));
                            if !ready {
                                break;
                            }
                            for (f, range) in recvs {
                                talked[r].insert(*f);
                                let v = queues.get_mut(&(*f, r)).unwrap().pop_front().unwrap();
                                assert_eq!(v.len(), range.len(), "{algo} w={world}: sizes");
                                match land {
                                    Land::Aside => {
                                        aside[r].insert(*f, v);
                                    }
                                    Land::Copy => x[r][range.clone()].clone_from_slice(&v),
                                }
                            }
                            half_done[r] = false;
                            received = !recvs.is_empty() || received;
                        }
                        Step::SumInOrder { range, ranks } => {
                            for i in range.clone() {
                                let own = x[r][i].clone();
                                let mut acc = vec![0u32; world];
                                for &k in ranks {
                                    let v = if k == r {
                                        &own
                                    } else {
                                        &aside[r][&k][i - range.start]
                                    };
                                    acc.iter_mut().zip(v).for_each(|(a, b)| *a += b);
                                }
                                x[r][i] = acc;
                            }
                        }
                        Step::Exchange {
                            to,
                            send,
                            from,
                            recv: rr,
                            op,
                        } => {
                            talked[r].insert(*to);
                            talked[r].insert(*from);
                            if !half_done[r] {
                                sent.push(((r, *to), x[r][send.clone()].to_vec()));
                                half_done[r] = true;
                            }
                            if !recv(*from, rr, *op, &mut x[r]) {
                                break;
                            }
                            half_done[r] = false;
                            received = true;
                        }
                    }
                    pc[r] += 1;
                    progressed = true;
                }
            }
            let any_sent = !sent.is_empty();
            for (k, v) in sent {
                queues.entry(k).or_default().push_back(v);
            }
            if pc.iter().zip(&steps).all(|(p, s)| *p == s.len()) {
                assert!(
                    queues.values().all(|q| q.is_empty()),
                    "{algo} w={world}: unread messages"
                );
                return (x, talked, rounds);
            }
            assert!(
                progressed || any_sent,
                "{algo} w={world} n={n}: deadlock at {pc:?}"
            );
            if received || any_sent {
                rounds += 1;
            }
        }
    }

    #[test]
    fn every_rank_ends_with_every_partial_exactly_once() {
        for algo in Algo::ALL {
            for world in 1..=16 {
                for n in [0usize, 1, 5, world, 3 * world + 2] {
                    let (x, talked, _) = simulate(algo, world, n);
                    for (r, v) in x.iter().enumerate() {
                        for (i, c) in v.iter().enumerate() {
                            assert!(
                                c.iter().all(|&k| k == 1),
                                "{algo} w={world} n={n}: rank {r} element {i} has {c:?}"
                            );
                        }
                    }
                    // A rank talks only over the links the algorithm sets up.
                    for (r, t) in talked.iter().enumerate() {
                        let peers: BTreeSet<usize> = algo.peers(r, world).into_iter().collect();
                        assert!(
                            t.is_subset(&peers),
                            "{algo} w={world}: rank {r} talks to {t:?}, links {peers:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn hop_counts() {
        for world in 2..=16 {
            let depth = |algo| simulate(algo, world, 64).2;
            let star = if world == 2 { 1 } else { 2 };
            assert_eq!(depth(Algo::Star), star, "star w={world}");
            assert_eq!(depth(Algo::Ring), 2 * (world - 1), "ring w={world}");
            assert_eq!(depth(Algo::Mesh), 1, "mesh w={world}");
            assert_eq!(depth(Algo::Rsag), 2, "rsag w={world}");
            let levels = (usize::BITS - 1 - world.leading_zeros()) as usize; // ⌊log2 N⌋
            assert!(
                depth(Algo::Tree) <= 2 * levels + 1,
                "tree w={world}: {}",
                depth(Algo::Tree)
            );
        }
    }

    #[test]
    fn star_shapes() {
        assert!(schedule(Algo::Star, 0, 1, 8).is_empty());
        assert_eq!(
            schedule(Algo::Star, 2, 4, 8),
            vec![
                Step::Send {
                    to: vec![0],
                    range: 0..8
                },
                Step::Recv {
                    from: 0,
                    range: 0..8,
                    op: Op::Copy
                },
            ]
        );
        let hub = schedule(Algo::Star, 0, 4, 8);
        let froms: Vec<usize> = hub
            .iter()
            .filter_map(|s| match s {
                Step::Recv { from, .. } => Some(*from),
                _ => None,
            })
            .collect();
        assert_eq!(froms, vec![1, 2, 3], "partials are added in rank order");
    }

    /// Block-quantised payloads (q8) quantise each message from its first element, so
    /// every message and every rounding must start on a block boundary: then a chunk's
    /// blocks are the whole vector's, and all algorithms round with the same scales.
    #[test]
    fn messages_and_roundings_start_on_block_boundaries() {
        for world in 2..=8 {
            for n in [1, 31, 33, 100, 576, 1000, 2048 + 5] {
                for algo in Algo::ALL {
                    for rank in 0..world {
                        for step in schedule(algo, rank, world, n) {
                            let starts: Vec<usize> = match &step {
                                Step::Round(r) | Step::Send { range: r, .. } => vec![r.start],
                                Step::Recv { range, .. } => vec![range.start],
                                Step::Exchange { send, recv, .. } => vec![send.start, recv.start],
                                Step::Many { sends, recvs, .. } => {
                                    sends.iter().chain(recvs).map(|(_, r)| r.start).collect()
                                }
                                Step::SumInOrder { .. } => vec![],
                            };
                            for at in starts {
                                assert!(
                                    at.is_multiple_of(crate::CHUNK_ALIGN) || at == n,
                                    "{algo} w={world} n={n} rank {rank}: {step:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ring_sends_each_element_2_times_n_minus_1_over_n() {
        for world in 2..=9 {
            let n = 10 * world * crate::CHUNK_ALIGN;
            let sent: usize = schedule(Algo::Ring, 0, world, n)
                .iter()
                .map(|s| match s {
                    Step::Exchange { send, .. } => send.len(),
                    _ => 0,
                })
                .sum();
            assert_eq!(sent, 2 * (world - 1) * 10 * crate::CHUNK_ALIGN);
        }
    }

    /// Bytes (in elements) one rank sends and receives under `algo`.
    fn volume(algo: Algo, rank: usize, world: usize, n: usize) -> (usize, usize) {
        let (mut out, mut inn) = (0, 0);
        for s in schedule(algo, rank, world, n) {
            match s {
                Step::Send { to, range } => out += to.len() * range.len(),
                Step::Recv { range, .. } => inn += range.len(),
                Step::Exchange { send, recv, .. } => {
                    out += send.len();
                    inn += recv.len();
                }
                Step::Many { sends, recvs, .. } => {
                    out += sends.iter().map(|(_, r)| r.len()).sum::<usize>();
                    inn += recvs.iter().map(|(_, r)| r.len()).sum::<usize>();
                }
                Step::Round(_) | Step::SumInOrder { .. } => {}
            }
        }
        (out, inn)
    }

    #[test]
    fn mesh_and_rsag_move_the_bytes_their_cost_says() {
        for world in 2..=9 {
            let n = 12 * world + 5;
            for r in 0..world {
                assert_eq!(
                    volume(Algo::Mesh, r, world, n),
                    ((world - 1) * n, (world - 1) * n)
                );
                let own = ring_chunk(n, world, r).len();
                let (out, inn) = volume(Algo::Rsag, r, world, n);
                // Reduce-scatter: everything but the own chunk out, (N-1) own chunks in;
                // all-gather the reverse.
                assert_eq!(out, (n - own) + (world - 1) * own, "rsag w={world} r={r}");
                assert_eq!(inn, (world - 1) * own + (n - own), "rsag w={world} r={r}");
            }
        }
    }

    #[test]
    fn mesh_and_rsag_sum_every_rank_in_order() {
        for algo in [Algo::Mesh, Algo::Rsag] {
            for s in schedule(algo, 2, 5, 17) {
                if let Step::SumInOrder { ranks, .. } = s {
                    assert_eq!(ranks, vec![0, 1, 2, 3, 4], "{algo}");
                }
            }
        }
    }
}
