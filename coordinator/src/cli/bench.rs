//! `tpi bench`: kernel and model throughput, reported beside this machine's measured
//! memory bandwidth so the ratios stay meaningful on a noisy shared machine.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use tpi_coordinator::engine::{Backend, LocalBackend};
use tpi_coordinator::loader::LoadedModel;
use tpi_kernels::{bench as kb, parse_isa, DType, Isa, Layout, ThreadPool};

/// `tpi bench` subcommands.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// What to measure.
#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// GEMV throughput per dtype vs memory bandwidth.
    Kernels {
        /// Thread counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        /// Matrix rows (cols = 4096 / 2 for big-matrix streaming).
        #[arg(long, default_value_t = 8192)]
        rows: usize,
        /// Kernel paths to compare side by side (e.g. avx512,avx512vnni); default: the best.
        #[arg(long, value_delimiter = ',', value_parser = parse_isa)]
        isa: Vec<Isa>,
        /// Rounds: each measures the bandwidth, then every GEMV; the best of each is reported.
        #[arg(long, default_value_t = 10)]
        reps: usize,
    },
    /// Allreduce latency for N ranks in this process (each on its own QUIC endpoint),
    /// star vs ring vs tree, optionally over emulated links, beside the simulator's prediction.
    Allreduce {
        /// Rank counts.
        #[arg(long, value_delimiter = ',', default_value = "2,3,4,5,6,7,8")]
        ranks: Vec<usize>,
        /// Payload in f32 elements (default: SmolLM2's hidden size).
        #[arg(long, default_value_t = 576)]
        elems: usize,
        /// Emulated link on every rank's egress (e.g. 1ms,300mbit); none = loopback.
        #[arg(long)]
        link: Option<tpi_sim::LinkSpec>,
        /// Timed iterations per case.
        #[arg(long, default_value_t = 200)]
        iters: usize,
    },
    /// Prefill and decode speed of a model on this device.
    Model {
        /// A .gguf file or HF directory.
        #[arg(long, short = 'm')]
        model: PathBuf,
        /// Thread counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        /// Prompt length for the prefill measurement.
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        /// Tokens to decode.
        #[arg(long, default_value_t = 64)]
        decode: usize,
        /// Repetitions (median reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Row layout of Q4 weights, as for `tpi run`: packed runs from a one-rank packed
        /// shard in the cache, ggml from the model file. Default: as `tpi run` would.
        #[arg(long, value_parser = super::parse_layout)]
        layout: Option<Layout>,
    },
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `tpi bench`.
pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    println!(
        "isa: {:?} (available: {:?})",
        tpi_kernels::active_isa(),
        tpi_kernels::available_isas()
    );
    match a.what {
        BenchWhat::Kernels {
            threads,
            rows,
            reps,
            isa,
        } => {
            let before = tpi_kernels::active_isa();
            let isas = if isa.is_empty() { vec![before] } else { isa };
            let probe = kb::BandwidthProbe::new(512 << 20);
            // Every dtype in GGML layout, then the Q4 types packed (what shards hold for
            // nodes that run the VNNI kernel).
            let kinds: Vec<(DType, Layout)> = DType::ALL
                .into_iter()
                .map(|d| (d, Layout::Ggml))
                .chain(
                    DType::ALL
                        .into_iter()
                        .filter(|&d| Layout::Packed.supports(d))
                        .map(|d| (d, Layout::Packed)),
                )
                .collect();
            let mut gemvs: Vec<_> = kinds
                .iter()
                .map(|&(d, l)| kb::GemvProbe::with_layout(d, l, rows, 4096))
                .collect();
            println!(
                "best of {reps} rounds; each round measures the bandwidth, then every GEMV, \
                 so a drifting machine moves both sides of each ratio alike"
            );
            for &t in &threads {
                let pool = ThreadPool::new(t);
                let (mut one, mut far) = (0.0f64, 0.0f64);
                let mut best = vec![vec![0.0f64; gemvs.len()]; isas.len()];
                for _ in 0..reps.max(1) {
                    let (o, f) = probe.measure_each(&pool, 2);
                    (one, far) = (one.max(o), far.max(f));
                    for (i, &isa) in isas.iter().enumerate() {
                        tpi_kernels::set_isa(isa)?;
                        for (g, b) in gemvs.iter_mut().zip(&mut best[i]) {
                            *b = b.max(g.measure(&pool, 1));
                        }
                    }
                }
                tpi_kernels::set_isa(before)?;
                let bw = one.max(far);
                println!(
                    "threads={t}: memory read bandwidth {bw:.1} GB/s (one stream {one:.1}, \
                     four far streams {far:.1})"
                );
                for (i, isa) in isas.iter().enumerate() {
                    for ((d, l), g) in kinds.iter().zip(&best[i]) {
                        let name = match l {
                            Layout::Ggml => d.name().to_string(),
                            _ => format!("{} {}", d.name(), l.name()),
                        };
                        println!(
                            "  gemv {name:<12} {rows}x4096 {:<10}: {g:6.1} GB/s = {:5.1}% of bandwidth",
                            isa.name(),
                            100.0 * g / bw
                        );
                    }
                }
            }
        }
        BenchWhat::Allreduce {
            ranks,
            elems,
            link,
            iters,
        } => {
            use tpi_node::net::bench::{allreduce_latency_over, median_p99};
            use tpi_node::net::{Algo, WireDType};
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let topo = tpi_sim::Topology::uniform(link.unwrap_or_else(tpi_sim::LinkSpec::ideal));
            println!(
                "allreduce of {elems} f32 ({} B) over {}",
                elems * 4,
                link.map(|l| l.to_string())
                    .unwrap_or_else(|| "loopback".into())
            );
            println!(" N  algo   median_us      p99_us  predicted_us");
            for &n in &ranks {
                for algo in Algo::ALL {
                    let times = rt.block_on(allreduce_latency_over(
                        n,
                        algo,
                        WireDType::F32,
                        elems,
                        iters,
                        link,
                    ))?;
                    let (med, p99) = median_p99(&times);
                    let pred = tpi_sim::allreduce_time(
                        algo,
                        &topo,
                        &tpi_sim::Calibration::default(),
                        n,
                        (elems * 4) as f64,
                    );
                    println!(
                        "{n:>2}  {algo:<5} {:>10.1} {:>11.1} {:>13.1}",
                        med.as_secs_f64() * 1e6,
                        p99.as_secs_f64() * 1e6,
                        pred.as_secs_f64() * 1e6
                    );
                }
            }
        }
        BenchWhat::Model {
            model,
            threads,
            prompt,
            decode,
            reps,
            layout,
        } => {
            let loaded = LoadedModel::open(&model)?;
            let layout = layout.unwrap_or_else(tpi_node::store::default_layout);
            let shard = if layout == Layout::Packed
                && tpi_coordinator::backend::has_q4_matrices(&loaded.files)
            {
                let plan = tpi_node::model::SplitPlan::even(&loaded.files.config, 1)?;
                let mut shards = tpi_coordinator::shards::ensure_shards(
                    &loaded.files,
                    &plan,
                    tpi_node::store::Quant::Keep,
                    &[layout],
                    None,
                )?;
                Some(shards.remove(0))
            } else {
                None
            };
            let cfg = loaded.files.config.clone();
            let wbytes: usize = loaded.files.store.total_bytes();
            println!(
                "model: {} ({} layers, dim {}, {:.1} MB of weights)",
                model.display(),
                cfg.n_layers,
                cfg.hidden_size,
                wbytes as f64 / 1e6
            );
            let tokens: Vec<u32> = (0..prompt as u32)
                .map(|i| (i * 7919 + 13) % cfg.vocab_size as u32)
                .collect();
            println!(
                "weights: {}",
                match &shard {
                    Some(_) => "a packed one-rank shard in the cache",
                    None => "the model file, GGML layout",
                }
            );
            for &t in &threads {
                let mut be = match &shard {
                    Some(s) => LocalBackend::from_shard(s, t, None, None, 0, Default::default())?,
                    None => LocalBackend::new(&loaded.files, t, Default::default())?,
                };
                let bw = kb::memory_bandwidth_gbs(&ThreadPool::new(t), 512 << 20, 5);
                let mut pre = Vec::new();
                let mut dec = Vec::new();
                for _ in 0..reps.max(1) {
                    be.reset(prompt + decode + 1)?;
                    let t0 = Instant::now();
                    let mut logits = be.forward(&tokens, 0)?;
                    pre.push(prompt as f64 / t0.elapsed().as_secs_f64());
                    let t1 = Instant::now();
                    for i in 0..decode {
                        let id = tpi_coordinator::sampler::argmax(&logits).unwrap_or(0) as u32;
                        logits = be.forward(&[id], prompt + i)?;
                    }
                    dec.push(decode as f64 / t1.elapsed().as_secs_f64());
                }
                let d = median(dec);
                // Bytes streamed per decode token: every weight once (the tied head counts once more).
                let per_tok = wbytes as f64
                    + if cfg.tie_word_embeddings {
                        loaded
                            .files
                            .store
                            .role(&cfg, tpi_node::model::Role::Embed, 0)?
                            .nbytes() as f64
                    } else {
                        0.0
                    };
                println!(
                    "threads={t}: prefill {prompt} tokens: {:.1} tok/s; decode: {d:.1} tok/s ({:.2} ms/token; {:.1} GB/s of weights = {:.0}% of the {bw:.1} GB/s measured)",
                    median(pre),
                    1e3 / d,
                    per_tok * d / 1e9,
                    100.0 * per_tok * d / 1e9 / bw
                );
            }
        }
    }
    Ok(())
}
