//! The allreduce algorithms and their shapes (which ranks link with which, the binary
//! tree and the ring's chunks), each algorithm's [`schedule`], and the [`cost`] model
//! that prices schedules and picks one per payload ([`Policy::Auto`]).
//!
//! Kept in a crate of its own so that the simulator prices exactly what `tpi-node` runs
//! without depending on the node, whose link emulation depends on the simulator.

use std::{fmt, ops::Range, str::FromStr};

pub mod cost;
pub mod schedule;

/// An allreduce algorithm: what `tpi-node` runs and what the simulator prices (one type, so
/// the two cannot drift apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Algo {
    /// Workers send partials to rank 0, which sums in rank order and sends the sum back
    /// (2 one-way hops, 1 with two ranks: a direct exchange; the default on latency-bound
    /// edge links).
    Star,
    /// Reduce-scatter then allgather around a ring: 2(N−1) steps of payload/N
    /// (bandwidth-optimal).
    Ring,
    /// Reduce up the binary tree rooted at rank 0 (see [`tree_parent`]), then broadcast
    /// down: 2⌊log2 N⌋ levels.
    Tree,
    /// Every rank sends its partial to every other rank and sums all N in rank order:
    /// 1 hop, (N−1)·P bytes out of and into each rank.
    Mesh,
    /// Direct reduce-scatter then all-gather: each rank owns 1/N of the vector
    /// ([`ring_chunk`]), sums its chunk of every partial in rank order and sends the sum
    /// to all: 2 hops, 2·P·(N−1)/N bytes out of and into each rank.
    Rsag,
}

impl Algo {
    /// All algorithms, in display order.
    pub const ALL: [Algo; 5] = [Algo::Star, Algo::Ring, Algo::Tree, Algo::Mesh, Algo::Rsag];

    /// The algorithms `auto` chooses among: those whose results equal the star's bit for
    /// bit, so what a cluster computes never depends on what its links measured.
    pub const AUTO: [Algo; 3] = [Algo::Star, Algo::Mesh, Algo::Rsag];

    /// The ranks `rank` needs a data link with, ascending: star: 0 ↔ every worker;
    /// ring: rank ± 1 mod N; tree: parent and children in the binary tree rooted at 0;
    /// mesh and rsag: every other rank.
    /// Empty when `world <= 1`.
    pub fn peers(self, rank: usize, world: usize) -> Vec<usize> {
        if world <= 1 || rank >= world {
            return Vec::new();
        }
        let mut p: Vec<usize> = match self {
            Algo::Star if rank == 0 => (1..world).collect(),
            Algo::Star => vec![0],
            Algo::Ring => vec![(rank + world - 1) % world, (rank + 1) % world],
            Algo::Tree => tree_parent(rank)
                .into_iter()
                .chain(tree_children(rank, world))
                .collect(),
            Algo::Mesh | Algo::Rsag => (0..world).filter(|&p| p != rank).collect(),
        };
        p.sort_unstable();
        p.dedup();
        p
    }
}

/// The parent of `rank` in the binary tree rooted at 0 (`None` for the root).
pub fn tree_parent(rank: usize) -> Option<usize> {
    (rank > 0).then(|| (rank - 1) / 2)
}

/// The children of `rank` in the binary tree rooted at 0, ascending.
pub fn tree_children(rank: usize, world: usize) -> Vec<usize> {
    [2 * rank + 1, 2 * rank + 2]
        .into_iter()
        .filter(|&c| c < world)
        .collect()
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algo::Star => "star",
            Algo::Ring => "ring",
            Algo::Tree => "tree",
            Algo::Mesh => "mesh",
            Algo::Rsag => "rsag",
        })
    }
}

impl FromStr for Algo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "star" => Ok(Algo::Star),
            "ring" => Ok(Algo::Ring),
            "tree" => Ok(Algo::Tree),
            "mesh" => Ok(Algo::Mesh),
            "rsag" => Ok(Algo::Rsag),
            _ => Err(format!(
                "unknown allreduce algorithm {s:?} (expected star, ring, tree, mesh or rsag)"
            )),
        }
    }
}

/// How a group picks the algorithm of each allreduce: one algorithm always, or the
/// cheapest for the payload under the cost model ([`cost::Costs::choose`]) over the links
/// measured at session start. A wire type: the coordinator tells every rank.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Policy {
    /// The cost model's choice per payload size (`auto`).
    #[default]
    Auto,
    /// Always this algorithm.
    Fixed(Algo),
}

impl Policy {
    /// The ranks `rank` needs a data link with: every other rank for `auto`, since any
    /// algorithm may be chosen.
    pub fn peers(self, rank: usize, world: usize) -> Vec<usize> {
        match self {
            Policy::Auto => Algo::Mesh.peers(rank, world),
            Policy::Fixed(a) => a.peers(rank, world),
        }
    }

    /// The algorithm for `n` elements of `elem_bytes` each: the fixed one, or the cost
    /// model's choice over `costs`. Without costs (not measured yet), `auto` runs the
    /// star.
    pub fn algo_for(self, costs: Option<&cost::Costs>, n: usize, elem_bytes: f64) -> Algo {
        match (self, costs) {
            (Policy::Fixed(a), _) => a,
            (Policy::Auto, Some(c)) => c.choose(n, elem_bytes).0,
            (Policy::Auto, None) => Algo::Star,
        }
    }
}

impl From<Algo> for Policy {
    fn from(a: Algo) -> Policy {
        Policy::Fixed(a)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Auto => f.write_str("auto"),
            Policy::Fixed(a) => a.fmt(f),
        }
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Policy::Auto);
        }
        s.parse::<Algo>().map(Policy::Fixed).map_err(|_| {
            format!(
                "unknown allreduce algorithm {s:?} (expected auto, star, ring, tree, mesh or rsag)"
            )
        })
    }
}

/// Chunk boundaries of [`ring_chunk`] fall on multiples of this many elements: the
/// block of a block-quantised payload (q8), so that a chunk's blocks are the same
/// blocks as the whole vector's and every algorithm rounds a value with the same scale.
pub const CHUNK_ALIGN: usize = 32;

/// The element range of chunk `c` when `n` elements are split into `world` chunks (the
/// ring's and rsag's): whole [`CHUNK_ALIGN`]-element blocks, `[c·B/world, (c+1)·B/world)`
/// of the `B = ⌈n/32⌉` blocks, the last one cut at `n`. Chunks differ by at most one
/// block and may be empty when there are fewer blocks than ranks.
pub fn ring_chunk(n: usize, world: usize, c: usize) -> Range<usize> {
    let blocks = n.div_ceil(CHUNK_ALIGN);
    let at = |i: usize| {
        let b = ((i as u128 * blocks as u128) / world as u128) as usize;
        (b * CHUNK_ALIGN).min(n)
    };
    at(c)..at(c + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_exactly() {
        for n in (0..200).chain([576, 2048, 8192 + 5]) {
            for w in 1..9 {
                let mut next = 0;
                for c in 0..w {
                    let r = ring_chunk(n, w, c);
                    assert_eq!(r.start, next);
                    assert!(r.start.is_multiple_of(CHUNK_ALIGN));
                    let blocks = n.div_ceil(CHUNK_ALIGN);
                    let (lo, hi) = (blocks / w, blocks.div_ceil(w));
                    if r.end < n {
                        assert!(r.len().is_multiple_of(CHUNK_ALIGN), "n {n} w {w} c {c}");
                        assert!((lo..=hi).contains(&(r.len() / CHUNK_ALIGN)));
                    } else {
                        assert!(r.len() <= hi * CHUNK_ALIGN, "n {n} w {w} c {c}: {r:?}");
                    }
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
        assert!("hypercube".parse::<Algo>().is_err());
        assert_eq!("auto".parse::<Policy>().unwrap(), Policy::Auto);
        assert_eq!("Mesh".parse::<Policy>().unwrap(), Policy::Fixed(Algo::Mesh));
        assert_eq!(Policy::Auto.to_string(), "auto");
        assert!("hypercube".parse::<Policy>().unwrap_err().contains("auto"));
        assert_eq!(Policy::Auto.peers(2, 4), vec![0, 1, 3]);
        assert_eq!(Policy::Fixed(Algo::Star).peers(2, 4), vec![0]);
        assert_eq!(Policy::Auto.algo_for(None, 8, 4.0), Algo::Star);
        assert_eq!(Algo::Mesh.peers(1, 4), vec![0, 2, 3]);
        assert_eq!(Algo::Rsag.peers(0, 3), vec![1, 2]);
    }
}
