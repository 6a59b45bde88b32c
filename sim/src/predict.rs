//! The cluster simulator: TTFT, token latency, time split and memory per device.
//!
//! Pure arithmetic over [`ModelShape`], [`Device`]s, a [`Topology`] and a
//! [`Calibration`]. Work is split in proportion to `compute_gbs`; every layer
//! has two blocks (attention, MLP), each followed by one allreduce of the
//! hidden vector; disk streaming (when a shard exceeds its budget) overlaps
//! with compute and the allreduce of the same block.

use std::time::Duration;

pub use tpi_algo::cost::{Costs, LinkCost};
pub use tpi_algo::{tree_children, tree_parent, Algo, Policy};

use crate::{
    model::{Calibration, Device, ModelShape, Workload},
    topology::Topology,
};

/// Everything one prediction needs.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// The model.
    pub shape: ModelShape,
    /// One entry per rank; rank 0 is the coordinator and the star's hub.
    pub devices: Vec<Device>,
    /// Links between ranks.
    pub topology: Topology,
    /// Software costs.
    pub calibration: Calibration,
    /// Prompt and generation lengths.
    pub workload: Workload,
}

/// Where one token's time goes (critical path).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Breakdown {
    /// Compute on the slowest rank, LM head included.
    pub compute: Duration,
    /// Disk reads not hidden behind compute and allreduce.
    pub disk_wait: Duration,
    /// Allreduces (2 per layer).
    pub allreduce: Duration,
    /// Per-step overhead: rank 0 broadcasting the step to every rank.
    pub overhead: Duration,
}

impl Breakdown {
    /// The sum of the parts.
    pub fn total(&self) -> Duration {
        self.compute + self.disk_wait + self.allreduce + self.overhead
    }
}

/// Memory and streaming for one rank.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceReport {
    /// Fraction of every layer this rank computes.
    pub share: f64,
    /// Bytes of this rank's shard of the layer stack.
    pub shard_bytes: f64,
    /// Shard bytes kept resident (all of it, or the budget / window when streaming).
    pub resident_weight_bytes: f64,
    /// Shard bytes read from disk per token.
    pub streamed_bytes_per_token: f64,
    /// KV cache at the end of the workload.
    pub kv_bytes: f64,
    /// Fixed bytes, plus embedding and LM head on rank 0.
    pub fixed_bytes: f64,
    /// Peak memory: resident weights + KV cache + fixed.
    pub peak_bytes: f64,
}

/// The prediction for one allreduce policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// The allreduce policy: one algorithm, or `auto`.
    pub algo: Policy,
    /// The algorithm a decode step's allreduces run (the policy's choice for one token).
    pub decode_algo: Algo,
    /// The algorithm the prompt's prefill allreduces run.
    pub prefill_algo: Algo,
    /// Time to first token (prefill of the prompt plus the first sample).
    pub ttft: Duration,
    /// Steady-state time per generated token.
    pub token: Duration,
    /// The split of `token`.
    pub breakdown: Breakdown,
    /// One allreduce of one token's hidden vector.
    pub allreduce_once: Duration,
    /// Per-rank memory.
    pub devices: Vec<DeviceReport>,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// The cost model's view of `topo`'s links among ranks `0..n`: each link's latency and
/// bandwidth, and the calibration's per-message and per-byte software costs.
pub fn link_costs(topo: &Topology, cal: &Calibration, n: usize) -> Costs {
    Costs::from_fn(n, cal.per_byte_ns * 1e-9, |from, to| {
        let l = topo.link(from, to);
        LinkCost {
            latency_s: l.latency.as_secs_f64(),
            bytes_per_s: l.bandwidth_bps.map(|bps| bps as f64 / 8.0),
            per_message_s: cal.per_message_overhead.as_secs_f64(),
        }
    })
}

/// Time of one allreduce of `bytes` over ranks `0..n` with `algo`: the schedules
/// `tpi-node` runs, priced by the cost model its `--allreduce auto` chooses with
/// ([`Costs::price`]).
pub fn allreduce_time(
    algo: Algo,
    topo: &Topology,
    cal: &Calibration,
    n: usize,
    bytes: f64,
) -> Duration {
    let elems = (bytes / cal.activation_bytes).round() as usize;
    secs(link_costs(topo, cal, n).price(algo, elems, cal.activation_bytes))
}

/// The algorithm `--allreduce auto` picks for `bytes` over ranks `0..n` of `topo`.
pub fn auto_choice(topo: &Topology, cal: &Calibration, n: usize, bytes: f64) -> Algo {
    let elems = (bytes / cal.activation_bytes).round() as usize;
    link_costs(topo, cal, n)
        .choose(elems, cal.activation_bytes)
        .0
}

/// Per-rank shares and memory, independent of the algorithm.
fn device_reports(c: &Cluster) -> Vec<DeviceReport> {
    let s = &c.shape;
    let total_gbs: f64 = c.devices.iter().map(|d| d.compute_gbs).sum();
    let n = c.devices.len();
    let ctx = (c.workload.prompt_len + c.workload.gen_tokens) as f64;
    let blocks = 2.0 * s.layers as f64;
    c.devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let share = d.compute_gbs / total_gbs;
            let shard = s.layer_stack_bytes() * share;
            // KV heads go out in whole groups; with more ranks than KV heads they are replicated.
            let kv_heads = (s.kv_heads as f64 * share).max(if n > s.kv_heads { 1.0 } else { 0.0 });
            let kv =
                2.0 * s.layers as f64 * kv_heads * s.head_dim as f64 * ctx * c.calibration.kv_bytes;
            let fixed =
                c.calibration.fixed_bytes as f64 + if i == 0 { s.rank0_extra_bytes() } else { 0.0 };
            let budget = (d.mem_budget_bytes as f64 - kv - fixed).max(0.0);
            let window = d.window_blocks as f64 * shard / blocks;
            let (resident, streamed) = if shard <= budget {
                (shard, 0.0)
            } else {
                let resident = budget.max(window).min(shard);
                (resident, shard - budget.min(shard))
            };
            DeviceReport {
                share,
                shard_bytes: shard,
                resident_weight_bytes: resident,
                streamed_bytes_per_token: streamed,
                kv_bytes: kv,
                fixed_bytes: fixed,
                peak_bytes: resident + kv + fixed,
            }
        })
        .collect()
}

/// One pass over all layers for `tokens` tokens: (algorithm, compute, disk wait,
/// allreduce).
fn pass(
    c: &Cluster,
    costs: &Costs,
    reports: &[DeviceReport],
    policy: Policy,
    tokens: usize,
) -> (Algo, f64, f64, f64) {
    let s = &c.shape;
    let t = tokens as f64;
    let act = c.calibration.activation_bytes;
    let elems = tokens * s.hidden;
    let algo = policy.algo_for(Some(costs), elems, act);
    let ar = costs.price(algo, elems, act);
    let blocks = 2.0 * s.layers as f64;
    // Causal attention scores and weighted sum: ~2·T²·heads·head_dim FLOPs per layer.
    let attn_flops = 2.0 * t * t * (s.heads * s.head_dim) as f64;
    let (mut compute, mut disk_wait) = (0.0, 0.0);
    for (params, extra_flops) in [(s.attn_params(), attn_flops), (s.mlp_params(), 0.0)] {
        let mut crit = 0.0f64;
        let mut local = 0.0f64;
        for (d, r) in c.devices.iter().zip(reports) {
            let bytes = params * s.bytes_per_weight * r.share;
            let flops = (2.0 * params * t + extra_flops) * r.share;
            let comp = (bytes / (d.compute_gbs * 1e9)).max(flops / (d.gflops * 1e9));
            let disk = r.streamed_bytes_per_token / blocks / (d.disk_gbs * 1e9);
            crit = crit.max(comp);
            local = local.max(comp + (disk - comp - ar).max(0.0));
        }
        compute += crit * s.layers as f64;
        disk_wait += (local - crit) * s.layers as f64;
    }
    (algo, compute, disk_wait, ar * blocks)
}

/// Predict TTFT, token latency, time split and memory for an algorithm or `auto`.
pub fn predict(c: &Cluster, policy: impl Into<Policy>) -> Prediction {
    let policy = policy.into();
    assert!(!c.devices.is_empty(), "a cluster needs at least one device");
    let reports = device_reports(c);
    let s = &c.shape;
    let n = c.devices.len();
    let costs = link_costs(&c.topology, &c.calibration, n);
    let d0 = &c.devices[0];
    let head = s.head_bytes() / (d0.compute_gbs * 1e9);
    // Rank 0 sends the step to each rank in turn.
    let step = |bytes: f64| {
        (1..n)
            .map(|w| {
                let l = costs.link(0, w);
                w as f64 * l.per_message_s + l.wire_s(bytes) + l.latency_s
            })
            .fold(0.0, f64::max)
    };
    let (decode_algo, compute, disk_wait, allreduce) = pass(c, &costs, &reports, policy, 1);
    let breakdown = Breakdown {
        compute: secs(compute + head),
        disk_wait: secs(disk_wait),
        allreduce: secs(allreduce),
        overhead: secs(step(16.0)),
    };
    let prompt = c.workload.prompt_len.max(1);
    let (prefill_algo, pc, pd, pa) = pass(c, &costs, &reports, policy, prompt);
    let ttft = secs(pc + pd + pa + head + step(8.0 * prompt as f64));
    Prediction {
        algo: policy,
        decode_algo,
        prefill_algo,
        ttft,
        token: breakdown.total(),
        breakdown,
        allreduce_once: secs(costs.price(decode_algo, s.hidden, c.calibration.activation_bytes)),
        devices: reports,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::LinkSpec;

    fn cal0() -> Calibration {
        Calibration {
            per_message_overhead: Duration::ZERO,
            per_byte_ns: 0.0,
            ..Calibration::default()
        }
    }

    fn cluster(preset: &str, n: usize, link: &str) -> Cluster {
        Cluster {
            shape: ModelShape::preset(preset).unwrap(),
            devices: vec![Device::default(); n],
            topology: Topology::uniform(link.parse::<LinkSpec>().unwrap()),
            calibration: Calibration::default(),
            workload: Workload::default(),
        }
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1e3
    }

    #[test]
    fn allreduce_hop_counts() {
        let t = Topology::uniform("1ms".parse().unwrap());
        let c = cal0();
        let star = ms(allreduce_time(Algo::Star, &t, &c, 8, 4.0));
        let ring = ms(allreduce_time(Algo::Ring, &t, &c, 8, 4.0));
        let tree = ms(allreduce_time(Algo::Tree, &t, &c, 8, 4.0));
        assert!((star - 2.0).abs() < 1e-9, "{star}");
        assert!((ring - 14.0).abs() < 1e-9, "{ring}");
        assert!((tree - 6.0).abs() < 1e-9, "{tree}");
        // Binary tree (parent (r−1)/2): 3 and 5 ranks are 1 and 2 levels deep.
        assert_eq!(
            allreduce_time(Algo::Tree, &t, &c, 3, 4.0),
            Duration::from_millis(2)
        );
        assert_eq!(
            allreduce_time(Algo::Tree, &t, &c, 5, 4.0),
            Duration::from_millis(4)
        );
        assert_eq!(allreduce_time(Algo::Star, &t, &c, 1, 4.0), Duration::ZERO);
        // Two ranks: the star is a direct exchange, one hop.
        assert_eq!(
            allreduce_time(Algo::Star, &t, &c, 2, 4.0),
            Duration::from_millis(1)
        );
        // With the default 50 µs per message: a worker's send (50 µs), 1 ms, the hub's 7
        // sends one after another (350 µs), 1 ms.
        let star = ms(allreduce_time(
            Algo::Star,
            &t,
            &Calibration::default(),
            8,
            4.0,
        ));
        assert!((star - 2.4).abs() < 1e-3, "{star}");
        let mesh = ms(allreduce_time(Algo::Mesh, &t, &c, 8, 4.0));
        let rsag = ms(allreduce_time(Algo::Rsag, &t, &c, 8, 4.0));
        assert!(
            (mesh - 1.0).abs() < 1e-9 && (rsag - 2.0).abs() < 1e-9,
            "{mesh} {rsag}"
        );
    }

    #[test]
    fn bandwidth_term() {
        // 1.024 MB over 8.192 Mbit/s = 1 s per hop; ring moves 1/N per step (256000 f32
        // split in 4 chunks of whole 32-element blocks).
        let t = Topology::uniform("0ms,8192kbit".parse().unwrap());
        let c = cal0();
        let star = allreduce_time(Algo::Star, &t, &c, 4, 1.024e6).as_secs_f64();
        let ring = allreduce_time(Algo::Ring, &t, &c, 4, 1.024e6).as_secs_f64();
        assert!(
            (star - 2.0).abs() < 1e-9 && (ring - 1.5).abs() < 1e-9,
            "{star} {ring}"
        );
    }

    #[test]
    fn star_wins_more_as_latency_grows() {
        let mut gaps = Vec::new();
        for lat in ["0.1ms", "1ms", "10ms"] {
            let c = cluster("llama2-70b", 8, &format!("{lat},300mbit"));
            let [star, ring, tree, _mesh, _rsag] = Algo::ALL.map(|a| predict(&c, a).token);
            assert!(
                star < tree && star < ring,
                "{lat}: {star:?} {tree:?} {ring:?}"
            );
            // Ring's 14 hops overtake tree's 6 full-payload levels once latency dominates.
            if lat != "0.1ms" {
                assert!(tree < ring, "{lat}: {tree:?} {ring:?}");
            }
            gaps.push(ring.as_secs_f64() - star.as_secs_f64());
        }
        assert!(gaps[0] < gaps[1] && gaps[1] < gaps[2], "{gaps:?}");
        // At 10 ms the ring spends 160 allreduces × 14 hops ≈ 22 s per token.
        let c = cluster("llama2-70b", 8, "10ms,300mbit");
        assert!(predict(&c, Algo::Ring).breakdown.allreduce > Duration::from_secs(22));
    }

    #[test]
    fn auto_is_never_worse_than_any_one_algorithm() {
        for (preset, n, link) in [
            ("llama2-70b", 8, "1ms,300mbit"),
            ("llama2-70b", 8, "5ms,100mbit"),
            ("llama3-8b", 4, "0.2ms,1gbit"),
            ("llama3-8b", 2, "5ms,100mbit"),
        ] {
            let mut c = cluster(preset, n, link);
            c.workload.prompt_len = 64;
            let auto = predict(&c, Policy::Auto);
            for a in Algo::ALL {
                let p = predict(&c, a);
                assert!(
                    auto.token <= p.token && auto.ttft <= p.ttft,
                    "{preset} {n} {link} {a}"
                );
            }
            assert_eq!(auto.algo, Policy::Auto);
            assert_eq!(
                auto.decode_algo,
                auto_choice(&c.topology, &c.calibration, n, c.shape.hidden as f64 * 4.0)
            );
        }
        // A 70B-class decode step on 1 ms links: one hop. Its 64-token prefill on slow
        // links: a quarter of the bytes per link, twice.
        let mut c = cluster("llama2-70b", 8, "5ms,100mbit");
        c.workload.prompt_len = 64;
        let auto = predict(&c, Policy::Auto);
        assert_eq!(
            (auto.decode_algo, auto.prefill_algo),
            (Algo::Mesh, Algo::Rsag)
        );
    }

    #[test]
    fn bandwidth_barely_matters_latency_does() {
        let tok = |link: &str| {
            predict(&cluster("llama2-7b", 8, link), Algo::Star)
                .token
                .as_secs_f64()
        };
        let (slow_bw, gbit, fast_bw) = (tok("1ms,300mbit"), tok("1ms,1gbit"), tok("1ms,10gbit"));
        let (fast_lat, slow_lat) = (tok("1ms,300mbit"), tok("10ms,300mbit"));
        // 33× the bandwidth saves under a third; 10× the latency costs over 4×.
        assert!(slow_bw / fast_bw < 1.33, "{slow_bw} {fast_bw}");
        assert!(gbit / fast_bw < 1.10, "{gbit} {fast_bw}");
        assert!(slow_lat / fast_lat > 4.0, "{slow_lat} {fast_lat}");
    }

    #[test]
    fn memory_and_streaming() {
        let mut c = cluster("llama2-70b", 8, "1ms,300mbit");
        let fits = predict(&c, Algo::Star);
        assert!(fits.breakdown.disk_wait.is_zero());
        let shard = fits.devices[1].shard_bytes;
        assert!(
            (shard - 69e9 * 0.5625 / 8.0).abs() / shard < 0.05,
            "{shard}"
        );
        for d in &mut c.devices {
            d.mem_budget_bytes = 3 << 30;
        }
        let tight = predict(&c, Algo::Star);
        let r = tight.devices[1];
        assert!(r.streamed_bytes_per_token > 0.0);
        assert!(
            r.peak_bytes <= (3u64 << 30) as f64 + 1.0,
            "{}",
            r.peak_bytes
        );
        assert!(tight.breakdown.disk_wait > Duration::ZERO);
        assert!(tight.token > fits.token);
        // Rank 0 holds the embedding and LM head too.
        assert!(fits.devices[0].fixed_bytes > fits.devices[1].fixed_bytes);
    }

    #[test]
    fn faster_devices_get_bigger_shares_and_ttft_exceeds_token() {
        let mut c = cluster("llama3-8b", 2, "1ms,300mbit");
        c.devices[1].compute_gbs = 30.0;
        let p = predict(&c, Algo::Star);
        assert!((p.devices[1].share - 0.75).abs() < 1e-9);
        assert!(p.ttft > p.token);
    }
}
