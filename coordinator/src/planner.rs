//! Heterogeneity-aware ratios: how much of every layer each rank gets.
//!
//! Pure functions. Each rank's share of heads and MLP columns follows its measured
//! compute (Q4_0 GEMV GB/s, the number nodes announce and rank 0 measures the same way),
//! so a node with twice the bandwidth gets about twice the work. Unless weights stream
//! from disk, no rank is given more weight bytes than its memory budget holds: a rank
//! that would overflow is capped at what fits and the rest goes to the others in
//! proportion to their compute. A model that fits nowhere is a clear error.

use tpi_node::model::{ModelConfig, RankSlice, SplitPlan};

/// Memory kept back on every rank besides weights (runtime, buffers, KV cache headroom).
pub const RESERVE_BYTES: u64 = tpi_node::worker::FIXED_OVERHEAD;

/// Fraction of a node's total RAM the planner lets weights use when no explicit
/// budget is given (the OS and other processes keep the rest).
pub const RAM_FRACTION: f64 = 0.8;

/// What the planner knows about one rank.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankCaps {
    /// Measured Q4_0 GEMV rate, GB/s (relative numbers are what matter).
    pub gemv_gbs: f64,
    /// Bytes this rank may use in all; None: unlimited.
    pub mem_budget: Option<u64>,
    /// Bytes it holds besides its shard (rank 0: embedding table and LM head).
    pub extra_bytes: u64,
}

impl RankCaps {
    /// A rank with a budget derived from its total RAM (see [`RAM_FRACTION`]); 0 RAM
    /// (unknown) means no budget.
    pub fn from_ram(gemv_gbs: f64, ram: u64) -> Self {
        RankCaps {
            gemv_gbs,
            mem_budget: (ram > 0).then_some((ram as f64 * RAM_FRACTION) as u64),
            extra_bytes: 0,
        }
    }

    /// Bytes of shard this rank may hold (None: unlimited).
    pub fn weight_budget(&self) -> Option<u64> {
        self.mem_budget
            .map(|b| b.saturating_sub(RESERVE_BYTES + self.extra_bytes))
    }
}

/// The planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// Ratios for `ClusterOptions::ratios` (sum 1), rank 0 first.
    pub weights: Vec<f64>,
    /// The split they give.
    pub plan: SplitPlan,
    /// Layer-stack weight bytes per rank.
    pub bytes: Vec<u64>,
    /// Whether a rank was held below its compute share by its memory budget.
    pub capped: Vec<bool>,
}

/// Weight bytes one rank holds for all layers (Q, K, V, O and gate, up, down slices).
pub fn slice_bytes(cfg: &ModelConfig, s: &RankSlice, bytes_per_weight: f64) -> u64 {
    let (h, hd) = (cfg.hidden_size as f64, cfg.head_dim as f64);
    let attn = h * hd * (2.0 * s.n_heads() as f64 + 2.0 * s.n_kv_heads() as f64);
    // An MoE rank holds its slice of every expert, and the router.
    let mlp =
        3.0 * h * s.ffn.len() as f64 * cfg.n_experts.max(1) as f64 + (cfg.n_experts as f64 * h);
    (cfg.n_layers as f64 * (attn + mlp) * bytes_per_weight).ceil() as u64
}

/// Weight bytes of the whole layer stack.
pub fn stack_bytes(cfg: &ModelConfig, bytes_per_weight: f64) -> u64 {
    let all = RankSlice {
        heads: 0..cfg.n_heads,
        kv_heads: 0..cfg.n_kv_heads,
        ffn: 0..cfg.ffn_dim(),
        vocab: 0..0,
    };
    slice_bytes(cfg, &all, bytes_per_weight)
}

/// Bytes rank 0 holds besides its shard: embedding table and (untied) LM head.
pub fn rank0_extra_bytes(cfg: &ModelConfig, bytes_per_weight: f64) -> u64 {
    let tables = if cfg.tie_word_embeddings { 1.0 } else { 2.0 };
    (tables * cfg.vocab_size as f64 * cfg.hidden_size as f64 * bytes_per_weight) as u64
}

fn normalise(v: &mut [f64]) {
    let s: f64 = v.iter().sum();
    if s > 0.0 {
        v.iter_mut().for_each(|x| *x /= s);
    }
}

/// Plans ratios for `ranks` (rank 0 first). With `streaming`, budgets are ignored
/// (the sliding window keeps only part of a shard resident).
pub fn choose_ratios(
    cfg: &ModelConfig,
    bytes_per_weight: f64,
    ranks: &[RankCaps],
    streaming: bool,
) -> anyhow::Result<Planned> {
    let n = ranks.len();
    anyhow::ensure!(n > 0, "no ranks to plan for");
    for (i, r) in ranks.iter().enumerate() {
        anyhow::ensure!(
            r.gemv_gbs.is_finite() && r.gemv_gbs > 0.0,
            "rank {i}: GEMV rate {} GB/s is not a positive number",
            r.gemv_gbs
        );
    }
    let speed: Vec<f64> = ranks.iter().map(|r| r.gemv_gbs).collect();
    let mut w = speed.clone();
    normalise(&mut w);
    let budgets: Vec<Option<u64>> = if streaming {
        vec![None; n]
    } else {
        ranks.iter().map(RankCaps::weight_budget).collect()
    };
    let total = stack_bytes(cfg, bytes_per_weight);
    if budgets.iter().all(Option::is_some) {
        let room: u64 = budgets.iter().map(|b| b.unwrap_or(0)).sum();
        if room < total {
            anyhow::bail!(
                "the model's layers need {} but the {n} ranks' memory budgets hold {} for weights \
                 (after {} reserved per rank{}); add nodes, quantise (--quant q4_0), or stream \
                 weights from disk (--window / --mem-budget)",
                gib(total),
                gib(room),
                gib(RESERVE_BYTES),
                if ranks[0].extra_bytes > 0 {
                    format!(" and {} of embeddings on rank 0", gib(ranks[0].extra_bytes))
                } else {
                    String::new()
                }
            );
        }
    }
    let mut capped = vec![false; n];
    for _ in 0..(8 * n + 32) {
        let p = SplitPlan::new(cfg, &w)?;
        let bytes: Vec<u64> = p
            .ranks
            .iter()
            .map(|s| slice_bytes(cfg, s, bytes_per_weight))
            .collect();
        let over: Vec<usize> = (0..n)
            .filter(|&i| budgets[i].is_some_and(|b| bytes[i] > b))
            .collect();
        if over.is_empty() {
            return Ok(Planned {
                weights: w,
                plan: p,
                bytes,
                capped,
            });
        }
        for &i in &over {
            let b = budgets[i].unwrap_or(0) as f64;
            // Shrink to what fits (a little under: heads move in whole KV groups).
            let f = (b / bytes[i] as f64).min(0.97);
            w[i] *= f;
            if w[i] < 1e-4 || b < 1.0 {
                w[i] = 0.0;
            }
            capped[i] = true;
        }
        // The uncapped ranks share what the capped ones gave up, by compute.
        let held: f64 = (0..n).filter(|&i| capped[i]).map(|i| w[i]).sum();
        let free: Vec<usize> = (0..n).filter(|&i| !capped[i]).collect();
        let free_speed: f64 = free.iter().map(|&i| speed[i]).sum();
        if free.is_empty() || held >= 1.0 {
            normalise(&mut w);
        } else {
            for &i in &free {
                w[i] = (1.0 - held) * speed[i] / free_speed;
            }
        }
        if w.iter().all(|&x| x == 0.0) {
            break;
        }
    }
    anyhow::bail!(
        "cannot fit the model's layers ({}) into the ranks' memory budgets ({}); add nodes, \
         quantise, or stream weights (--window / --mem-budget)",
        gib(total),
        budgets
            .iter()
            .map(|b| b.map(gib).unwrap_or_else(|| "unlimited".into()))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// [`choose_ratios`] for a rank 0 that computes `share` of its measured rate: with
/// share 0 (rank 0 only coordinates) it gets weight 0 and the nodes split the layers.
pub fn choose_ratios_with_share(
    cfg: &ModelConfig,
    bytes_per_weight: f64,
    ranks: &[RankCaps],
    streaming: bool,
    share: f64,
) -> anyhow::Result<Planned> {
    if share > 0.0 || ranks.len() == 1 {
        return choose_ratios(cfg, bytes_per_weight, ranks, streaming);
    }
    let p = choose_ratios(cfg, bytes_per_weight, &ranks[1..], streaming)?;
    let mut weights = vec![0.0];
    weights.extend(&p.weights);
    let plan = SplitPlan::new(cfg, &weights)?;
    let bytes = plan
        .ranks
        .iter()
        .map(|s| slice_bytes(cfg, s, bytes_per_weight))
        .collect();
    let mut capped = vec![false];
    capped.extend(&p.capped);
    Ok(Planned {
        weights,
        plan,
        bytes,
        capped,
    })
}

fn gib(b: u64) -> String {
    format!("{:.2}GiB", b as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A Llama-shaped config with `nh` heads, `nkv` KV heads and `ffn` MLP columns.
    pub(crate) fn cfg(nh: usize, nkv: usize, ffn: usize) -> ModelConfig {
        ModelConfig::llama(1000, 64 * nh, ffn, 4, (nh, nkv, 64))
    }

    fn caps(g: f64) -> RankCaps {
        RankCaps {
            gemv_gbs: g,
            mem_budget: None,
            extra_bytes: 0,
        }
    }

    #[test]
    fn twice_the_bandwidth_gets_about_twice_the_work() {
        let c = cfg(32, 8, 8192);
        let p = choose_ratios(&c, 18.0 / 32.0, &[caps(20.0), caps(10.0)], false).unwrap();
        let (a, b) = (&p.plan.ranks[0], &p.plan.ranks[1]);
        let hr = a.n_heads() as f64 / b.n_heads() as f64;
        let fr = a.ffn.len() as f64 / b.ffn.len() as f64;
        assert!(
            (hr - 2.0).abs() < 0.4,
            "heads {} vs {}",
            a.n_heads(),
            b.n_heads()
        );
        assert!(
            (fr - 2.0).abs() < 0.05,
            "ffn {} vs {}",
            a.ffn.len(),
            b.ffn.len()
        );
        assert!((p.weights[0] - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(p.capped, [false, false]);
        // Three ranks 1:2:4.
        let p = choose_ratios(&c, 1.0, &[caps(1.0), caps(2.0), caps(4.0)], false).unwrap();
        let f: Vec<usize> = p.plan.ranks.iter().map(|r| r.ffn.len()).collect();
        assert!((f[2] as f64 / f[0] as f64 - 4.0).abs() < 0.2, "{f:?}");
        assert!((f[1] as f64 / f[0] as f64 - 2.0).abs() < 0.1, "{f:?}");
    }

    #[test]
    fn memory_cap_is_respected_and_the_rest_redistributed() {
        let c = cfg(32, 8, 8192);
        let bpw = 1.0;
        let total = stack_bytes(&c, bpw);
        // Rank 1 is 4x faster but may hold only ~20% of the layers.
        let small = RESERVE_BYTES + total / 5;
        let ranks = [
            caps(1.0),
            RankCaps {
                gemv_gbs: 4.0,
                mem_budget: Some(small),
                extra_bytes: 0,
            },
            caps(1.0),
        ];
        let p = choose_ratios(&c, bpw, &ranks, false).unwrap();
        assert!(p.bytes[1] <= small - RESERVE_BYTES, "{:?}", p.bytes);
        assert_eq!(p.capped, [false, true, false]);
        // The others split the rest evenly (same compute).
        let (a, b) = (p.plan.ranks[0].ffn.len(), p.plan.ranks[2].ffn.len());
        assert!((a as f64 / b as f64 - 1.0).abs() < 0.05, "{a} vs {b}");
        assert!(
            p.weights[0] > 0.35 && p.weights[2] > 0.35,
            "{:?}",
            p.weights
        );
        // With streaming the budget is ignored.
        let s = choose_ratios(&c, bpw, &ranks, true).unwrap();
        assert!((s.weights[1] - 4.0 / 6.0).abs() < 1e-9);
        assert!(s.bytes[1] > small);
    }

    #[test]
    fn cascading_caps_and_rank0_extras() {
        let c = cfg(32, 8, 8192);
        let total = stack_bytes(&c, 1.0);
        let extra = rank0_extra_bytes(&c, 1.0);
        let r0 = RankCaps {
            gemv_gbs: 10.0,
            mem_budget: Some(RESERVE_BYTES + extra + total / 4),
            extra_bytes: extra,
        };
        let r1 = RankCaps {
            gemv_gbs: 10.0,
            mem_budget: Some(RESERVE_BYTES + total / 3),
            extra_bytes: 0,
        };
        let p = choose_ratios(&c, 1.0, &[r0, r1, caps(1.0)], false).unwrap();
        assert!(
            p.bytes[0] <= total / 4 && p.bytes[1] <= total / 3,
            "{:?}",
            p.bytes
        );
        assert!(p.bytes[2] >= total - total / 4 - total / 3, "{:?}", p.bytes);
    }

    #[test]
    fn model_that_fits_nowhere_is_a_clear_error() {
        let c = cfg(32, 8, 8192);
        let total = stack_bytes(&c, 1.0);
        let r = RankCaps {
            gemv_gbs: 1.0,
            mem_budget: Some(RESERVE_BYTES + total / 3),
            extra_bytes: 0,
        };
        let e = choose_ratios(&c, 1.0, &[r, r], false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("memory budgets") && e.contains("--mem-budget"),
            "{e}"
        );
        assert!(choose_ratios(&c, 1.0, &[r, r], true).is_ok());
        assert!(choose_ratios(&c, 1.0, &[caps(0.0)], false).is_err());
    }

    #[test]
    fn budget_from_ram() {
        let r = RankCaps::from_ram(5.0, 10 << 30);
        assert_eq!(r.mem_budget, Some(((10u64 << 30) as f64 * 0.8) as u64));
        assert_eq!(RankCaps::from_ram(5.0, 0).mem_budget, None);
    }
}
