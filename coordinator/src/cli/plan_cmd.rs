//! `tpi plan`: print the split plan the planner chooses for a cluster, and the
//! simulator's prediction for it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tpi_coordinator::backend::{bytes_per_weight, local_gemv, resolve_nodes};
use tpi_coordinator::discovery;
use tpi_coordinator::planner::{self, RankCaps};
use tpi_node::model::{ModelConfig, ModelFiles};

use super::{is_auto, ClusterArgs, ModelArgs};

/// `tpi plan` flags.
#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Memory budget per rank, rank 0 first (e.g. 8GiB,2GiB); default: discovered RAM.
    #[arg(long, value_delimiter = ',', value_parser = super::parse_size)]
    pub budgets: Option<Vec<u64>>,
    /// Prompt length for the predicted TTFT.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
}

struct Rank {
    label: String,
    gemv: f64,
    ram: u64,
}

/// Runs `tpi plan`.
pub fn plan(a: PlanArgs) -> anyhow::Result<()> {
    let (m, c) = (&a.model, &a.cluster);
    let mut files = ModelFiles::open(&m.model)
        .with_context(|| format!("cannot load model {}", m.model.display()))?;
    // With --shards the run uses those shards' weight type, whatever --quant says.
    let quant = match &c.shards {
        Some(dir) => tpi_coordinator::shards::shards_quant(dir)?,
        None => c.quant,
    };
    if let tpi_node::store::shard::Quant::To(dt) = quant {
        files.requantise_to(dt);
    }
    let cfg = &files.config;
    let bpw = bytes_per_weight(&files, quant)?;
    let cores = std::thread::available_parallelism()
        .map(|x| x.get())
        .unwrap_or(1);
    let ram0 = tpi_node::sys::total_ram().unwrap_or(0);
    // Who the ranks are and what they can do.
    let mut ranks: Vec<Rank> = Vec::new();
    match (&c.local_cluster, &c.nodes) {
        (Some(0), _) => bail!("--local-cluster needs N >= 1"),
        (Some(n), _) => {
            let t = c.node_threads.unwrap_or((cores / n).max(1));
            let g = local_gemv(m.threads.unwrap_or(t));
            for i in 0..*n {
                ranks.push(Rank {
                    label: if i == 0 {
                        "this machine".into()
                    } else {
                        format!("local node {i}")
                    },
                    gemv: g,
                    ram: ram0 / *n as u64,
                });
            }
        }
        (None, Some(list)) if is_auto(list) => {
            let nodes = discovery::discover(c.n)?;
            ranks.push(Rank {
                label: "this machine".into(),
                gemv: local_gemv(m.threads()),
                ram: ram0,
            });
            ranks.extend(nodes.iter().map(|d| Rank {
                label: format!("{} {}", d.name, d.addr),
                gemv: d.gemv_gbs,
                ram: d.ram,
            }));
        }
        (None, Some(list)) => {
            let addrs = resolve_nodes(list)?;
            if addrs.is_empty() {
                bail!("--nodes lists no address");
            }
            // Use what the nodes announce when they can be heard; else assume rank 0's rate.
            let heard = discovery::browse(Duration::from_secs(1))
                .map(|b| b.nodes)
                .unwrap_or_default();
            let g0 = local_gemv(m.threads());
            ranks.push(Rank {
                label: "this machine".into(),
                gemv: g0,
                ram: ram0,
            });
            for addr in addrs {
                let d = heard.iter().find(|d| same_node(d.addr, addr));
                ranks.push(match d {
                    Some(d) => Rank {
                        label: format!("{} {}", d.name, addr),
                        gemv: d.gemv_gbs,
                        ram: d.ram,
                    },
                    None => Rank {
                        label: format!("{addr} (not heard; assumed like rank 0)"),
                        gemv: g0,
                        ram: 0,
                    },
                });
            }
        }
        (None, None) => {
            let Some(r) = &c.ratios else {
                bail!("say where the ranks are: --nodes auto, --nodes host:port,…, --local-cluster N, or --ratios r0,r1,…");
            };
            let g0 = local_gemv(m.threads());
            for i in 0..r.len() {
                ranks.push(Rank {
                    label: if i == 0 {
                        "this machine".into()
                    } else {
                        format!("rank {i}")
                    },
                    gemv: g0,
                    ram: 0,
                });
            }
        }
    }
    let n = ranks.len();
    if let Some(r) = &c.ratios {
        if r.len() != n {
            bail!("--ratios has {} numbers but there are {n} ranks", r.len());
        }
    }
    if let Some(b) = &a.budgets {
        if b.len() != n {
            bail!("--budgets has {} sizes but there are {n} ranks", b.len());
        }
    }
    let extra0 = planner::rank0_extra_bytes(cfg, bpw);
    let caps: Vec<RankCaps> = ranks
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut k = RankCaps::from_ram(r.gemv.max(1e-3), r.ram);
            if let Some(b) = &a.budgets {
                k.mem_budget = Some(b[i]);
            }
            if i == 0 {
                k.gemv_gbs *= c.coordinator_share.max(0.0);
                k.extra_bytes = extra0;
            }
            k
        })
        .collect();
    let planned = match &c.ratios {
        Some(r) => {
            let plan = tpi_node::model::SplitPlan::new(cfg, r)?;
            let bytes = plan
                .ranks
                .iter()
                .map(|s| planner::slice_bytes(cfg, s, bpw))
                .collect();
            let s: f64 = r.iter().sum();
            planner::Planned {
                weights: r.iter().map(|x| x / s).collect(),
                plan,
                bytes,
                capped: vec![false; n],
            }
        }
        None => planner::choose_ratios_with_share(
            cfg,
            bpw,
            &caps,
            m.window.is_some() || m.mem_budget.is_some(),
            c.coordinator_share,
        )?,
    };
    print!("{}", render(&files, bpw, &ranks, &caps, &planned));
    // The links for the prediction: --topology, else --link (default 1ms,1gbit).
    let (topology, link_desc) = match (&c.link, &c.topology) {
        (Some(l), _) => (tpi_sim::Topology::uniform(*l), format!("link {l}")),
        (None, Some(t)) => (
            tpi_sim::Topology::load(t)
                .with_context(|| format!("cannot load topology {}", t.display()))?,
            format!("topology {}", t.display()),
        ),
        (None, None) => {
            let l: tpi_sim::LinkSpec = "1ms,1gbit".parse().map_err(anyhow::Error::msg)?;
            (
                tpi_sim::Topology::uniform(l),
                format!("link {l} (default; set --link)"),
            )
        }
    };
    // The simulator's prediction for this split.
    let (pred, cluster) = predict(cfg, bpw, &ranks, &caps, &planned, topology, c, a.prompt_len);
    println!(
        "predicted ({} allreduce: {} for decode, {} for the prompt; {}): TTFT {:.1} ms for a \
         {}-token prompt, {:.2} ms/token (compute {:.2}, allreduce {:.2}, disk wait {:.2}, \
         overhead {:.2})",
        pred.algo,
        pred.decode_algo,
        pred.prefill_algo,
        link_desc,
        ms(pred.ttft),
        a.prompt_len,
        ms(pred.token),
        ms(pred.breakdown.compute),
        ms(pred.breakdown.allreduce),
        ms(pred.breakdown.disk_wait),
        ms(pred.breakdown.overhead)
    );
    if ranks.len() > 1 {
        // The cost model the cluster's `auto` uses, over these links (a session measures
        // its own at start: run with --profile).
        let costs = tpi_sim::link_costs(&cluster.topology, &cluster.calibration, ranks.len());
        let report = tpi_coordinator::links::LinkReport::new(
            format!("as the simulator prices them ({link_desc})"),
            &costs,
            c.allreduce,
            c.allreduce_dtype,
            cfg.hidden_size,
        );
        print!("{report}");
    }
    Ok(())
}

fn same_node(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || b.ip().is_unspecified())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn render(
    files: &ModelFiles,
    bpw: f64,
    ranks: &[Rank],
    caps: &[RankCaps],
    p: &planner::Planned,
) -> String {
    use std::fmt::Write;
    let cfg = &files.config;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model {}: {} layers, {} heads / {} KV heads, MLP {}, {:.3} bytes/weight, layer stack {}",
        files.path.display(),
        cfg.n_layers,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.ffn_dim(),
        bpw,
        discovery::fmt_bytes(planner::stack_bytes(cfg, bpw))
    );
    let _ = writeln!(s, "plan {} over {} ranks:", p.plan.id(), p.plan.world());
    let _ = writeln!(
        s,
        "  {:>4}  {:>6}  {:>9}  {:>9}  {:>11}  {:>10}  {:>9}  {:>10}  where",
        "rank", "ratio", "heads", "kv heads", "mlp cols", "weights", "gemv", "budget"
    );
    for (i, r) in p.plan.ranks.iter().enumerate() {
        let budget = caps[i]
            .weight_budget()
            .map(discovery::fmt_bytes)
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "  {:>4}  {:>6.3}  {:>9}  {:>9}  {:>11}  {:>10}  {:>5.2}GB/s  {:>10}  {}{}",
            i,
            p.weights[i],
            format!("{}..{}", r.heads.start, r.heads.end),
            format!("{}..{}", r.kv_heads.start, r.kv_heads.end),
            format!("{}..{}", r.ffn.start, r.ffn.end),
            discovery::fmt_bytes(p.bytes[i]),
            ranks[i].gemv,
            budget,
            ranks[i].label,
            if p.capped[i] {
                " (capped by memory)"
            } else {
                ""
            }
        );
    }
    s
}

#[allow(clippy::too_many_arguments)]
fn predict(
    cfg: &ModelConfig,
    bpw: f64,
    ranks: &[Rank],
    caps: &[RankCaps],
    p: &planner::Planned,
    topology: tpi_sim::Topology,
    c: &ClusterArgs,
    prompt_len: usize,
) -> (tpi_sim::Prediction, tpi_sim::Cluster) {
    let shape = tpi_sim::ModelShape {
        hidden: cfg.hidden_size,
        layers: cfg.n_layers,
        heads: cfg.n_heads,
        kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        // Per token an MoE layer reads only its routed experts.
        ffn: cfg.ffn_dim() * cfg.n_experts_used.max(1),
        vocab: cfg.vocab_size,
        bytes_per_weight: bpw,
        tied_embeddings: cfg.tie_word_embeddings,
    };
    // The simulator splits work in proportion to compute rates. Give every rank the
    // rate at which the plan's slowest rank gets through its share, times its share:
    // the simulator then reproduces this plan's split and its critical path.
    let share: Vec<f64> = p.weights.clone();
    let pace = (0..ranks.len())
        .filter(|&i| share[i] > 0.0)
        .map(|i| ranks[i].gemv.max(1e-3) / share[i])
        .fold(f64::INFINITY, f64::min);
    let devices = (0..ranks.len())
        .map(|i| tpi_sim::Device {
            compute_gbs: (share[i] * pace).max(pace * 1e-6),
            mem_budget_bytes: caps[i].mem_budget.unwrap_or(8 << 30),
            ..tpi_sim::Device::default()
        })
        .collect();
    let calibration = tpi_sim::Calibration {
        activation_bytes: c.allreduce_dtype.elem_bytes(),
        ..tpi_sim::Calibration::default()
    };
    let algo = c.allreduce;
    let cluster = tpi_sim::Cluster {
        shape,
        devices,
        topology,
        calibration,
        workload: tpi_sim::Workload {
            prompt_len: prompt_len.max(1),
            gen_tokens: 128,
        },
    };
    (tpi_sim::predict(&cluster, algo), cluster)
}
