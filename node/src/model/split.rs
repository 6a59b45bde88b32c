//! The split plan: which attention heads and which MLP columns each rank computes.
//!
//! Pure and deterministic; the one source of truth for slice shapes. The loader, the
//! forward pass, the sharder and the simulator all read it.
//!
//! - Heads go out in whole KV groups. With more ranks than KV heads, a group's query
//!   heads are shared by several ranks and its KV head is replicated on each of them,
//!   so every N from 1 up to the number of attention heads works.
//! - The MLP intermediate dimension goes out in contiguous slices aligned to 32 (the
//!   quantisation block), so row-parallel slices of quantised weights stay whole blocks.
//! - Q/K/V and gate/up are column-parallel (output rows); O and down are row-parallel
//!   (input columns).
//! - The LM head's vocabulary rows stay on rank 0, or are split across the ranks in
//!   proportion to their weights ([`SplitPlan::split_vocab`], which
//!   [`SplitPlan::for_model`] does when the head is large): then every rank computes its
//!   slice of the logits from the replicated final hidden state and rank 0 gathers them.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::ModelConfig;
use super::error::ModelError;

/// MLP slices are aligned to this many columns (one GGML quantisation block).
pub const FFN_ALIGN: usize = 32;

/// One rank's share of every layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankSlice {
    /// Query heads, contiguous.
    pub heads: Range<usize>,
    /// KV heads this rank holds (replicated when shared with other ranks).
    pub kv_heads: Range<usize>,
    /// Columns of the MLP intermediate dimension.
    pub ffn: Range<usize>,
    /// Rows of the LM head (vocabulary ids) whose logits this rank computes.
    pub vocab: Range<usize>,
}

impl RankSlice {
    /// Whether the rank computes any attention.
    pub fn has_attn(&self) -> bool {
        !self.heads.is_empty()
    }
    /// Number of query heads.
    pub fn n_heads(&self) -> usize {
        self.heads.len()
    }
    /// Number of KV heads.
    pub fn n_kv_heads(&self) -> usize {
        self.kv_heads.len()
    }
}

/// How a model's layers are split across `world` ranks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitPlan {
    /// Per-rank slices; index = rank.
    pub ranks: Vec<RankSlice>,
    /// Query heads in the model.
    pub n_heads: usize,
    /// KV heads in the model.
    pub n_kv_heads: usize,
    /// MLP intermediate size.
    pub intermediate_size: usize,
    /// Head ranges start and end at multiples of this ([`super::config::SliceAlign::heads`]).
    pub head_align: usize,
    /// MLP slices start and end at multiples of this ([`super::config::SliceAlign::ffn`]).
    pub ffn_align: usize,
    /// Vocabulary size (LM head rows).
    pub vocab_size: usize,
}

/// Where the LM head's rows go (`--lm-head`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeadSplit {
    /// Split when the head holds at least [`VOCAB_SPLIT_MIN_BYTES`].
    #[default]
    Auto,
    /// All on rank 0.
    Rank0,
    /// Split across the ranks in proportion to their weights.
    Split,
}

impl std::str::FromStr for HeadSplit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(HeadSplit::Auto),
            "rank0" => Ok(HeadSplit::Rank0),
            "split" => Ok(HeadSplit::Split),
            _ => Err(format!(
                "unknown LM head placement {s:?} (expected auto, rank0 or split)"
            )),
        }
    }
}

/// An LM head of at least this many bytes is split across the ranks by
/// [`SplitPlan::for_model`]: reading it takes rank 0 about 5 ms at 20 GB/s, more than a
/// slow link's hop, which is what gathering the slices adds.
pub const VOCAB_SPLIT_MIN_BYTES: u64 = 100_000_000;

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Splits `total` units into contiguous pieces proportional to `weights` by rounding
/// cumulative sums; ranks with zero weight get nothing. When `min_one`, every
/// positive-weight rank gets at least one unit (callers ensure enough units).
fn proportional(total: usize, weights: &[f64], min_one: bool) -> Vec<Range<usize>> {
    let sum: f64 = weights.iter().sum();
    let active: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0.0).collect();
    let mut bounds = vec![0usize; weights.len() + 1];
    let mut cum = 0.0;
    for (i, &w) in weights.iter().enumerate() {
        cum += w;
        bounds[i + 1] = ((cum / sum) * total as f64).round() as usize;
    }
    bounds[weights.len()] = total;
    for i in 1..=weights.len() {
        bounds[i] = bounds[i].max(bounds[i - 1]).min(total);
    }
    if min_one && active.len() <= total {
        // Push boundaries so each active rank has one unit, keeping room for the rest.
        let mut ranges: Vec<usize> = vec![0; weights.len()];
        for i in 0..weights.len() {
            ranges[i] = bounds[i + 1] - bounds[i];
        }
        for &i in &active {
            if ranges[i] == 0 {
                // Steal one unit from the largest active range.
                let donor = active
                    .iter()
                    .copied()
                    .filter(|&j| ranges[j] > 1)
                    .max_by_key(|&j| (ranges[j], usize::MAX - j))
                    .expect("enough units for every active rank");
                ranges[donor] -= 1;
                ranges[i] += 1;
            }
        }
        let mut b = 0;
        for i in 0..weights.len() {
            bounds[i] = b;
            b += ranges[i];
        }
        bounds[weights.len()] = b;
    }
    (0..weights.len())
        .map(|i| bounds[i]..bounds[i + 1])
        .collect()
}

impl SplitPlan {
    /// Builds the plan for `cfg` over ranks with the given capability weights
    /// (any non-negative numbers; a zero weight gives a rank nothing to compute).
    pub fn new(cfg: &ModelConfig, weights: &[f64]) -> Result<Self, ModelError> {
        let n = weights.len();
        if n == 0 {
            return Err(ModelError::Plan("no ranks".into()));
        }
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err(ModelError::Plan(format!(
                "rank weights must be non-negative numbers, got {weights:?}"
            )));
        }
        let active: Vec<usize> = (0..n).filter(|&i| weights[i] > 0.0).collect();
        if active.is_empty() {
            return Err(ModelError::Plan("every rank has weight 0".into()));
        }
        let (nh, nkv) = (cfg.n_heads, cfg.n_kv_heads);
        if active.len() > nh {
            return Err(ModelError::Plan(format!(
                "{} computing ranks but the model has only {nh} attention heads; use at most {nh}",
                active.len()
            )));
        }
        let g = nh / nkv;
        let ha = cfg.slice_align.heads.max(1);
        // Whole KV groups go out in units of `gu` groups, so that every boundary is a
        // multiple of `ha` heads; a group's query heads can be shared out only in runs of
        // `ha` heads, so only when `ha` divides the group.
        let gu = ha / gcd(ha, g);
        let whole_units = if nkv.is_multiple_of(gu) { nkv / gu } else { 0 };
        let shared_max = if g.is_multiple_of(ha) {
            nkv * (g / ha)
        } else {
            0
        };
        let max_ranks = whole_units.max(shared_max);
        let a = active.len();
        if a > max_ranks {
            return Err(ModelError::Plan(format!(
                "no valid split over {a} computing ranks: the attention output's blocks need \
                 query heads in runs of {ha} ({nh} heads, {nkv} KV heads, head_dim {}), which \
                 allows at most {max_ranks} rank(s); use at most {max_ranks}, or shards with \
                 smaller blocks: `--quant f32` (lossless, 4 bytes a weight) or `--quant q8_0`",
                cfg.head_dim
            )));
        }
        let mut heads = vec![0..0; n];
        let mut kv = vec![0..0; n];
        if a <= whole_units {
            // Whole KV groups per rank, `gu` at a time.
            let aw: Vec<f64> = active.iter().map(|&i| weights[i]).collect();
            for (k, r) in proportional(whole_units, &aw, true).into_iter().enumerate() {
                let i = active[k];
                heads[i] = r.start * gu * g..r.end * gu * g;
                kv[i] = r.start * gu..r.end * gu;
            }
        } else {
            // More ranks than KV groups: each group is shared by a run of ranks, which
            // split its query heads (in runs of `ha`) and replicate its KV head.
            let units = g / ha;
            let mut next = 0;
            for grp in 0..nkv {
                let k = (a / nkv + usize::from(grp < a % nkv)).min(units);
                let members = &active[next..next + k];
                next += k;
                let mw: Vec<f64> = members.iter().map(|&i| weights[i]).collect();
                for (m, r) in proportional(units, &mw, true).into_iter().enumerate() {
                    let i = members[m];
                    heads[i] = grp * g + r.start * ha..grp * g + r.end * ha;
                    kv[i] = grp..grp + 1;
                }
            }
            debug_assert_eq!(next, a);
        }
        let f = cfg.ffn_dim();
        let need = cfg.slice_align.ffn.max(1);
        if !f.is_multiple_of(need) {
            return Err(ModelError::Plan(format!(
                "the MLP's {f} columns are not a whole number of the down projection's \
                 {need}-column blocks"
            )));
        }
        // 32-column slices keep the allreduce chunks and the 32-blocks whole when they fit.
        let pref = need * (FFN_ALIGN / gcd(FFN_ALIGN, need));
        let align = if f.is_multiple_of(pref) { pref } else { need };
        let ffn_blocks = proportional(f / align, weights, false);
        let v = cfg.vocab_size;
        let ranks = (0..n)
            .map(|i| RankSlice {
                heads: heads[i].clone(),
                kv_heads: kv[i].clone(),
                ffn: ffn_blocks[i].start * align..ffn_blocks[i].end * align,
                vocab: if i == 0 { 0..v } else { v..v },
            })
            .collect();
        let plan = SplitPlan {
            ranks,
            n_heads: nh,
            n_kv_heads: nkv,
            intermediate_size: f,
            head_align: ha,
            ffn_align: need,
            vocab_size: v,
        };
        plan.check()?;
        Ok(plan)
    }

    /// An even plan over `n` ranks.
    pub fn even(cfg: &ModelConfig, n: usize) -> Result<Self, ModelError> {
        Self::new(cfg, &vec![1.0; n])
    }

    /// Shares the LM head's vocabulary rows out in proportion to `weights` (one per
    /// rank), in contiguous runs of 32 rows. Ranks of weight 0 get none, except rank 0,
    /// which samples and so always computes a share (at least the lightest rank's).
    pub fn split_vocab(&mut self, weights: &[f64]) -> Result<(), ModelError> {
        if weights.len() != self.world() {
            return Err(ModelError::Plan(format!(
                "{} vocabulary weights for {} ranks",
                weights.len(),
                self.world()
            )));
        }
        let mut w = weights.to_vec();
        if w[0] <= 0.0 {
            w[0] = w
                .iter()
                .copied()
                .filter(|x| *x > 0.0)
                .fold(f64::INFINITY, f64::min);
        }
        let v = self.vocab_size;
        let units = v.div_ceil(32);
        for (r, u) in self.ranks.iter_mut().zip(proportional(units, &w, true)) {
            r.vocab = (u.start * 32).min(v)..(u.end * 32).min(v);
        }
        self.check()
    }

    /// Whether the vocabulary is split across ranks (not all on rank 0).
    pub fn vocab_split(&self) -> bool {
        self.ranks.iter().skip(1).any(|r| !r.vocab.is_empty())
    }

    /// The plan for `files` over ranks of `weights`, with the vocabulary placed as `head`
    /// says (`Auto`: split when the LM head holds at least [`VOCAB_SPLIT_MIN_BYTES`]).
    pub fn for_model(
        files: &super::ModelFiles,
        weights: &[f64],
        head: HeadSplit,
    ) -> Result<Self, ModelError> {
        let mut plan = Self::new(&files.config, weights)?;
        let split = match head {
            HeadSplit::Rank0 => false,
            HeadSplit::Split => true,
            HeadSplit::Auto => files.lm_head_bytes()? >= VOCAB_SPLIT_MIN_BYTES,
        };
        if plan.world() > 1 && split {
            plan.split_vocab(weights)?;
        }
        Ok(plan)
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    /// Verifies coverage and the group invariants (used on plans received from a peer too).
    pub fn check(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Plan(m));
        if self.n_kv_heads == 0
            || self.n_heads < self.n_kv_heads
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return bad(format!(
                "{} heads are not a positive multiple of {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        let g = self.n_heads / self.n_kv_heads;
        let (ha, fa) = (self.head_align, self.ffn_align);
        if ha == 0 || fa == 0 {
            return bad(format!(
                "alignments must be positive, got heads {ha}, ffn {fa}"
            ));
        }
        let (mut h, mut f, mut v) = (0, 0, 0);
        for (i, r) in self.ranks.iter().enumerate() {
            if r.vocab.start != v || r.vocab.end < r.vocab.start {
                return bad(format!(
                    "rank {i}: vocabulary rows {:?} leave a gap or overlap",
                    r.vocab
                ));
            }
            v = r.vocab.end;
            if !r.heads.start.is_multiple_of(ha) || !r.heads.end.is_multiple_of(ha) {
                return bad(format!(
                    "rank {i}: heads {:?} cut the attention output inside a block (heads go \
                     in runs of {ha})",
                    r.heads
                ));
            }
            if !r.ffn.start.is_multiple_of(fa) || !r.ffn.end.is_multiple_of(fa) {
                return bad(format!(
                    "rank {i}: MLP columns {:?} cut the down projection inside a {fa}-column \
                     block",
                    r.ffn
                ));
            }
            if r.heads.start != h || r.heads.end < r.heads.start {
                return bad(format!(
                    "rank {i}: heads {:?} leave a gap or overlap",
                    r.heads
                ));
            }
            h = r.heads.end;
            if r.ffn.start != f || r.ffn.end < r.ffn.start {
                return bad(format!("rank {i}: ffn {:?} leaves a gap or overlap", r.ffn));
            }
            f = r.ffn.end;
            if r.heads.is_empty() {
                if !r.kv_heads.is_empty() {
                    return bad(format!("rank {i}: KV heads without query heads"));
                }
                continue;
            }
            let whole = r.heads.start % g == 0 && r.heads.end % g == 0;
            let expect = if whole {
                r.heads.start / g..r.heads.end / g
            } else {
                let grp = r.heads.start / g;
                if (r.heads.end - 1) / g != grp {
                    return bad(format!(
                        "rank {i}: heads {:?} straddle KV groups of {g}",
                        r.heads
                    ));
                }
                grp..grp + 1
            };
            if r.kv_heads != expect {
                return bad(format!(
                    "rank {i}: KV heads {:?}, expected {expect:?}",
                    r.kv_heads
                ));
            }
        }
        if h != self.n_heads || f != self.intermediate_size || v != self.vocab_size {
            return bad(format!(
                "plan covers {h}/{} heads, {f}/{} MLP columns and {v}/{} vocabulary rows",
                self.n_heads, self.intermediate_size, self.vocab_size
            ));
        }
        if self.vocab_size > 0 && self.ranks.first().is_none_or(|r| r.vocab.is_empty()) {
            return bad("rank 0 computes no logits (it samples, so it holds a slice)".into());
        }

        Ok(())
    }

    /// A short stable identity of the plan (for handshakes and shard caches).
    pub fn id(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        hex::encode(&Sha256::digest(text.as_bytes())[..8])
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn plans_with_no_heads_are_refused_not_divided_by() {
        // Found by fuzzing a manifest: 0 heads over 4 KV heads made a zero group size.
        let cfg = crate::model::ModelConfig::llama(64, 96, 192, 2, (12, 4, 8));
        let mut p = SplitPlan::even(&cfg, 2).unwrap();
        p.check().unwrap();
        p.n_heads = 0;
        assert!(p.check().is_err());
        p.n_heads = 2;
        assert!(p.check().is_err());
    }
    use super::*;
    use crate::model::config::ModelConfig;

    fn cfg(nh: usize, nkv: usize, ffn: usize) -> ModelConfig {
        ModelConfig::llama(100, 64 * nh, ffn, 2, (nh, nkv, 64))
    }

    #[test]
    fn every_n_up_to_heads_is_valid() {
        for (nh, nkv) in [(9, 3), (12, 4), (8, 8), (8, 1), (32, 8), (4, 2)] {
            let c = cfg(nh, nkv, 1536);
            for n in 1..=nh {
                let p = SplitPlan::even(&c, n).unwrap_or_else(|e| panic!("{nh}/{nkv} n={n}: {e}"));
                p.check().unwrap();
                assert_eq!(p.world(), n);
                for r in &p.ranks {
                    assert!(r.has_attn(), "{nh}/{nkv} n={n}: {:?}", p.ranks);
                    assert_eq!(r.ffn.start % 32, 0);
                    assert_eq!(r.n_heads() % r.n_kv_heads(), 0);
                }
            }
            assert!(SplitPlan::even(&c, nh + 1).is_err());
        }
    }

    #[test]
    fn smollm2_three_ranks_one_group_each() {
        let p = SplitPlan::even(&cfg(9, 3, 1536), 3).unwrap();
        assert_eq!(p.ranks[0].heads, 0..3);
        assert_eq!(p.ranks[1].kv_heads, 1..2);
        assert_eq!(p.ranks[2].ffn, 1024..1536);
    }

    #[test]
    fn uneven_ratios_follow_weights() {
        let p = SplitPlan::new(&cfg(8, 8, 1024), &[3.0, 1.0]).unwrap();
        assert_eq!(p.ranks[0].heads, 0..6);
        assert_eq!(p.ranks[1].heads, 6..8);
        assert_eq!(p.ranks[0].ffn, 0..768);
        assert_eq!(p.ranks[1].ffn, 768..1024);
    }

    #[test]
    fn zero_weight_rank_only_coordinates() {
        let p = SplitPlan::new(&cfg(9, 3, 1536), &[0.0, 1.0, 1.0]).unwrap();
        assert!(p.ranks[0].heads.is_empty() && p.ranks[0].ffn.is_empty());
        assert!(p.ranks[0].kv_heads.is_empty());
        assert_eq!(p.ranks[1].heads.len() + p.ranks[2].heads.len(), 9);
    }

    #[test]
    fn replication_shares_a_group() {
        let p = SplitPlan::even(&cfg(9, 3, 1536), 4).unwrap();
        // 4 ranks over 3 groups: the first group is split in two.
        assert_eq!(p.ranks[0].kv_heads, 0..1);
        assert_eq!(p.ranks[1].kv_heads, 0..1);
        assert_eq!(p.ranks[0].heads.len() + p.ranks[1].heads.len(), 3);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let c = cfg(4, 2, 64);
        assert!(SplitPlan::new(&c, &[]).is_err());
        assert!(SplitPlan::new(&c, &[0.0, 0.0]).is_err());
        assert!(SplitPlan::new(&c, &[1.0, f64::NAN]).is_err());
        assert!(SplitPlan::new(&c, &[1.0, -1.0]).is_err());
    }

    #[test]
    fn tampered_plan_fails_check() {
        let mut p = SplitPlan::even(&cfg(9, 3, 1536), 3).unwrap();
        p.ranks[1].heads = 3..5;
        assert!(p.check().is_err());
        let mut p = SplitPlan::even(&cfg(9, 3, 1536), 4).unwrap();
        p.ranks[1].kv_heads = 1..2;
        assert!(p.check().is_err());
    }

    #[test]
    fn block_alignment_shapes_every_cut() {
        use crate::model::config::SliceAlign;
        // Llama-3-70B-like groups (8 q heads per KV head, head_dim 128) with Q4_K O and
        // down: heads in runs of 2, MLP cuts at multiples of 256.
        let mut c = cfg(64, 8, 28672);
        c.head_dim = 128;
        c.slice_align = SliceAlign::from_blocks(256, 256, 128);
        assert_eq!(c.slice_align, SliceAlign { ffn: 256, heads: 2 });
        for n in 1..=32 {
            let p = SplitPlan::even(&c, n).unwrap_or_else(|e| panic!("n={n}: {e}"));
            for r in &p.ranks {
                assert_eq!(r.heads.start % 2, 0, "n={n}: {:?}", r.heads);
                assert_eq!(r.ffn.start % 256, 0, "n={n}: {:?}", r.ffn);
            }
        }
        let e = SplitPlan::even(&c, 33).unwrap_err().to_string();
        assert!(e.contains("at most 32"), "{e}");
        // A received plan that cuts inside a block is refused.
        let mut p = SplitPlan::even(&cfg(64, 8, 28672), 3).unwrap();
        p.head_align = 2;
        p.ffn_align = 256;
        assert!(p.check().is_err());
        // MHA with head_dim 64 and 256-blocks: whole groups of 4 heads, at most nh/4 ranks.
        let mut c = cfg(8, 8, 1024);
        c.slice_align = SliceAlign::from_blocks(256, 256, 64);
        assert_eq!(c.slice_align.heads, 4);
        assert_eq!(SplitPlan::even(&c, 2).unwrap().ranks[1].heads, 4..8);
        let e = SplitPlan::even(&c, 3).unwrap_err().to_string();
        assert!(e.contains("at most 2"), "{e}");
        // An MLP that is not whole blocks cannot be cut at all.
        let mut c = cfg(8, 8, 1000);
        c.slice_align.ffn = 256;
        assert!(SplitPlan::even(&c, 1).is_err());
    }

    #[test]
    fn the_vocabulary_stays_on_rank_0_unless_split_then_covers_every_row_once() {
        let c = cfg(8, 8, 1024);
        let mut p = SplitPlan::new(&c, &[1.0, 1.0, 2.0]).unwrap();
        assert!(!p.vocab_split());
        assert_eq!(p.ranks[0].vocab, 0..100);
        assert!(p.ranks[1].vocab.is_empty() && p.ranks[2].vocab.is_empty());
        p.split_vocab(&[1.0, 1.0, 2.0]).unwrap();
        assert!(p.vocab_split());
        let v: Vec<_> = p.ranks.iter().map(|r| r.vocab.clone()).collect();
        assert_eq!(v, vec![0..32, 32..64, 64..100]);
        // Rank 0 of weight 0 still samples, so it gets the lightest computing rank's share.
        let mut q = SplitPlan::new(&c, &[0.0, 1.0, 1.0]).unwrap();
        q.split_vocab(&[0.0, 1.0, 1.0]).unwrap();
        assert!(q.ranks.iter().all(|r| !r.vocab.is_empty()), "{:?}", q.ranks);
        assert!(q.split_vocab(&[1.0, 1.0]).is_err());
        // A gap, an overlap, or rank 0 without rows is refused.
        let mut bad = p.clone();
        bad.ranks[1].vocab = 30..64;
        assert!(bad.check().is_err());
        let mut bad = p.clone();
        bad.ranks[2].vocab = 64..99;
        assert!(bad.check().is_err());
        let mut bad = p;
        bad.ranks[0].vocab = 0..0;
        bad.ranks[1].vocab = 0..64;
        assert!(bad.check().is_err());
    }
}
