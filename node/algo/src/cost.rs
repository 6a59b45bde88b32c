//! The allreduce cost model: what one allreduce takes, found by running every rank's
//! [`schedule`] against the others over links with a latency, a bandwidth and a
//! per-message sender cost. `tpi-node` uses it to pick an algorithm per payload size
//! (`--allreduce auto`) from links it measured at session start; the simulator uses it
//! to price every algorithm over a topology. One implementation, so the choice a cluster
//! makes is the one the simulator predicts.
//!
//! The model, per rank (all start at time 0):
//! - a send costs the sender `per_message_s` of its own time (messages leave one after
//!   another), then waits for its link to be free, occupies it for `bytes ÷ bandwidth`,
//!   and arrives `latency` after it left the wire;
//! - a receive waits for the message, then costs `per_byte_s` per byte (decode, sum);
//! - the allreduce ends when the last rank has taken its last step.

use std::collections::VecDeque;

use crate::schedule::{schedule, Step};
use crate::Algo;

/// One directed link's cost.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinkCost {
    /// One-way latency, in seconds.
    pub latency_s: f64,
    /// Bandwidth in bytes per second (`None`: unlimited).
    pub bytes_per_s: Option<f64>,
    /// The sender's own time per message on this link, in seconds.
    pub per_message_s: f64,
}

impl LinkCost {
    /// A link that costs nothing.
    pub const FREE: LinkCost = LinkCost {
        latency_s: 0.0,
        bytes_per_s: None,
        per_message_s: 0.0,
    };

    /// The time `bytes` occupy the link.
    pub fn wire_s(&self, bytes: f64) -> f64 {
        match self.bytes_per_s {
            Some(b) if b > 0.0 => bytes / b,
            Some(_) => f64::INFINITY,
            None => 0.0,
        }
    }
}

/// The cost of every directed link of a world, plus the software cost per byte received.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Costs {
    world: usize,
    /// Row-major `[from][to]`; the diagonal is unused.
    links: Vec<LinkCost>,
    /// Software cost per payload byte received (decode, copy, sum), in seconds.
    pub per_byte_s: f64,
}

impl Costs {
    /// Every link costs `link`.
    pub fn uniform(world: usize, link: LinkCost, per_byte_s: f64) -> Costs {
        Costs {
            world,
            links: vec![link; world * world],
            per_byte_s,
        }
    }

    /// Link `(from, to)` costs `f(from, to)`.
    pub fn from_fn(
        world: usize,
        per_byte_s: f64,
        mut f: impl FnMut(usize, usize) -> LinkCost,
    ) -> Costs {
        let links = (0..world * world)
            .map(|i| {
                let (from, to) = (i / world, i % world);
                if from == to {
                    LinkCost::FREE
                } else {
                    f(from, to)
                }
            })
            .collect();
        Costs {
            world,
            links,
            per_byte_s,
        }
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The link from `from` to `to`.
    pub fn link(&self, from: usize, to: usize) -> LinkCost {
        self.links[from * self.world + to]
    }

    /// Replaces the link from `from` to `to`.
    pub fn set(&mut self, from: usize, to: usize, cost: LinkCost) {
        self.links[from * self.world + to] = cost;
    }

    /// The seconds one allreduce of `n` elements of `elem_bytes` each takes under
    /// `algo`: every rank's schedule run against the others (see the module doc).
    /// Zero for one rank.
    pub fn price(&self, algo: Algo, n: usize, elem_bytes: f64) -> f64 {
        let w = self.world;
        if w <= 1 {
            return 0.0;
        }
        let steps: Vec<Vec<Step>> = (0..w).map(|r| schedule(algo, r, w, n)).collect();
        let mut clock = vec![0.0f64; w];
        let mut next = vec![0usize; w];
        // Whether the current step's sends have left.
        let mut sent = vec![false; w];
        let mut wires = Wires {
            costs: self,
            elem_bytes,
            busy: vec![0.0; w * w],
            inbox: vec![VecDeque::new(); w * w],
        };
        loop {
            let mut moved = false;
            for r in 0..w {
                while let Some(step) = steps[r].get(next[r]) {
                    if !sent[r] {
                        match step {
                            Step::Send { to, range } => {
                                for &t in to {
                                    wires.send(&mut clock[r], r, t, range.len());
                                }
                            }
                            Step::Exchange { to, send: s, .. } => {
                                wires.send(&mut clock[r], r, *to, s.len())
                            }
                            Step::Many { sends, .. } => {
                                for (t, s) in sends {
                                    wires.send(&mut clock[r], r, *t, s.len());
                                }
                            }
                            Step::Round(_) | Step::Recv { .. } | Step::SumInOrder { .. } => {}
                        }
                        sent[r] = true;
                    }
                    let recvs: Vec<(usize, usize)> = match step {
                        Step::Recv { from, range, .. } => vec![(*from, range.len())],
                        Step::Exchange { from, recv, .. } => vec![(*from, recv.len())],
                        Step::Many { recvs, .. } => {
                            recvs.iter().map(|(f, rg)| (*f, rg.len())).collect()
                        }
                        Step::Round(_) | Step::Send { .. } | Step::SumInOrder { .. } => vec![],
                    };
                    if recvs
                        .iter()
                        .any(|&(f, _)| wires.inbox[f * w + r].is_empty())
                    {
                        break;
                    }
                    for (f, elems) in recvs {
                        let arrival = wires.inbox[f * w + r].pop_front().expect("checked above");
                        clock[r] =
                            clock[r].max(arrival) + elems as f64 * elem_bytes * self.per_byte_s;
                    }
                    next[r] += 1;
                    sent[r] = false;
                    moved = true;
                }
            }
            if (0..w).all(|r| next[r] == steps[r].len()) {
                return clock.into_iter().fold(0.0, f64::max);
            }
            if !moved {
                // A schedule that waits for a message nobody sends (the schedule tests
                // rule this out): it never ends.
                return f64::INFINITY;
            }
        }
    }

    /// The cheapest of [`Algo::AUTO`] for `n` elements of `elem_bytes` each, with every
    /// algorithm's price in [`Algo::ALL`] order. Ties go to the earlier algorithm in
    /// `AUTO` (the star first). A deterministic function of its inputs, so ranks holding
    /// the same `Costs` choose the same algorithm.
    pub fn choose(&self, n: usize, elem_bytes: f64) -> (Algo, [f64; 5]) {
        let prices = Algo::ALL.map(|a| self.price(a, n, elem_bytes));
        let price = |a: Algo| prices[Algo::ALL.iter().position(|&x| x == a).expect("in ALL")];
        let mut best = Algo::AUTO[0];
        for a in Algo::AUTO {
            if price(a) < price(best) {
                best = a;
            }
        }
        (best, prices)
    }
}

/// The links' state while [`Costs::price`] runs the schedules.
struct Wires<'a> {
    costs: &'a Costs,
    elem_bytes: f64,
    /// Per directed link: when it is next free.
    busy: Vec<f64>,
    /// Per directed link: arrival times of the messages on it, in order.
    inbox: Vec<VecDeque<f64>>,
}

impl Wires<'_> {
    /// `from` sends `elems` elements to `to` at `*clock`, which advances by the message's
    /// sender cost.
    fn send(&mut self, clock: &mut f64, from: usize, to: usize, elems: usize) {
        let l = self.costs.link(from, to);
        let i = from * self.costs.world + to;
        *clock += l.per_message_s;
        let start = clock.max(self.busy[i]);
        let done = start + l.wire_s(elems as f64 * self.elem_bytes);
        self.busy[i] = done;
        self.inbox[i].push_back(done + l.latency_s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(latency_ms: f64, mbit: Option<f64>, per_message_us: f64) -> LinkCost {
        LinkCost {
            latency_s: latency_ms * 1e-3,
            bytes_per_s: mbit.map(|m| m * 1e6 / 8.0),
            per_message_s: per_message_us * 1e-6,
        }
    }

    fn ms(s: f64) -> f64 {
        s * 1e3
    }

    #[test]
    fn latency_only_prices_count_hops() {
        let c = Costs::uniform(8, link(1.0, None, 0.0), 0.0);
        let p = |a| ms(c.price(a, 512, 4.0));
        assert!((p(Algo::Star) - 2.0).abs() < 1e-9);
        assert!((p(Algo::Ring) - 14.0).abs() < 1e-9);
        assert!((p(Algo::Tree) - 6.0).abs() < 1e-9);
        assert!((p(Algo::Mesh) - 1.0).abs() < 1e-9);
        assert!((p(Algo::Rsag) - 2.0).abs() < 1e-9);
        let two = Costs::uniform(2, link(1.0, None, 0.0), 0.0);
        for a in Algo::ALL {
            let t = ms(two.price(a, 512, 4.0));
            // Star and mesh exchange once; the others reduce, then send the result back.
            let want = if matches!(a, Algo::Star | Algo::Mesh) {
                1.0
            } else {
                2.0
            };
            assert!((t - want).abs() < 1e-9, "{a}: {t}");
        }
        assert_eq!(
            Costs::uniform(1, link(1.0, None, 0.0), 0.0).price(Algo::Mesh, 9, 4.0),
            0.0
        );
    }

    #[test]
    fn bandwidth_and_message_costs() {
        // 1.024 MB at 8.192 Mbit/s is 1 s on the wire (8000 blocks: whole chunks).
        let c = Costs::uniform(4, link(0.0, Some(8.192), 0.0), 0.0);
        let star = c.price(Algo::Star, 256_000, 4.0);
        let ring = c.price(Algo::Ring, 256_000, 4.0);
        let rsag = c.price(Algo::Rsag, 256_000, 4.0);
        let mesh = c.price(Algo::Mesh, 256_000, 4.0);
        assert!((star - 2.0).abs() < 1e-9, "{star}");
        assert!((ring - 1.5).abs() < 1e-9, "{ring}");
        // Rsag: a quarter of the payload to each owner, then a quarter back: 2 × 0.25 s.
        assert!((rsag - 0.5).abs() < 1e-9, "{rsag}");
        // Mesh: the whole payload to each peer, on separate links at once.
        assert!((mesh - 1.0).abs() < 1e-9, "{mesh}");
        // The sender pays per message: the hub's 7 sends leave one after another.
        let c = Costs::uniform(8, link(1.0, None, 50.0), 0.0);
        let star = ms(c.price(Algo::Star, 4, 4.0));
        assert!((star - 2.4).abs() < 1e-9, "{star}");
        let mesh = ms(c.price(Algo::Mesh, 4, 4.0));
        assert!((mesh - 1.35).abs() < 1e-9, "{mesh}");
    }

    #[test]
    fn a_slow_link_slows_what_crosses_it() {
        let mut c = Costs::uniform(4, link(1.0, None, 0.0), 0.0);
        // Rank 3 sits behind a 10 ms link to everyone.
        for p in 0..3 {
            c.set(3, p, link(10.0, None, 0.0));
            c.set(p, 3, link(10.0, None, 0.0));
        }
        let star = ms(c.price(Algo::Star, 64, 4.0));
        let mesh = ms(c.price(Algo::Mesh, 64, 4.0));
        assert!((star - 20.0).abs() < 1e-9, "{star}");
        assert!((mesh - 10.0).abs() < 1e-9, "{mesh}");
    }

    /// `auto` from injected measurements: mesh on low-latency, high-bandwidth links;
    /// on a slow link, mesh for a decode step's payload but rsag for a prefill's, whose
    /// wire time outweighs a second hop. (Links are independent, as in tpi's emulator:
    /// mesh's N−1 messages leave on N−1 links at once.)
    #[test]
    fn choose_follows_the_links() {
        let lan = Costs::uniform(4, link(1.0, Some(1000.0), 20.0), 0.05e-9);
        assert_eq!(lan.choose(512, 4.0).0, Algo::Mesh);
        assert_eq!(lan.choose(8192, 4.0).0, Algo::Mesh);
        let slow = Costs::uniform(4, link(5.0, Some(100.0), 20.0), 0.05e-9);
        // One token of a 70B-class model (8192 f32): 2.6 ms on the wire, under a hop.
        assert_eq!(slow.choose(8192, 4.0).0, Algo::Mesh);
        // A 32-token prefill of it: 84 ms whole, 21 ms a quarter.
        assert_eq!(slow.choose(32 * 8192, 4.0).0, Algo::Rsag);
        let eight = Costs::uniform(8, link(5.0, Some(100.0), 20.0), 0.05e-9);
        assert_eq!(eight.choose(8 * 8192, 4.0).0, Algo::Rsag);
        // Two ranks: every algorithm but the ring is one exchange; the star wins the tie.
        let two = Costs::uniform(2, link(1.0, Some(300.0), 20.0), 0.0);
        assert_eq!(two.choose(512, 4.0).0, Algo::Star);
        // The prices come back in Algo::ALL order; the choice is the cheapest of AUTO.
        let (a, p) = slow.choose(32 * 8192, 4.0);
        let at = |x: Algo| p[Algo::ALL.iter().position(|&y| y == x).unwrap()];
        assert!(Algo::AUTO.iter().all(|&x| at(a) <= at(x)));
        // Never the ring or the tree, whose sums are grouped differently.
        let fan = Costs::uniform(8, link(0.01, None, 500.0), 0.0);
        let (a, p) = fan.choose(4, 4.0);
        assert!(Algo::AUTO.contains(&a), "{a} {p:?}");
    }
}
