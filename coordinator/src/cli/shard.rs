//! `tpi shard`: pre-splits a model into per-rank shard directories, streaming tensor
//! by tensor (peak memory: one block, not the model).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use tpi_coordinator::shards::rank_dir;
use tpi_kernels::Layout;
use tpi_node::model::{ModelFiles, SplitPlan};
use tpi_node::store::{default_layout, write_shard, Quant};

/// `tpi shard` flags.
#[derive(Args, Debug)]
pub struct ShardArgs {
    /// A .gguf file or HF model directory.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Number of ranks (even split), rank 0 included.
    #[arg(long, conflicts_with = "ratios")]
    pub nodes: Option<usize>,
    /// Work ratio per rank, rank 0 first (e.g. 2,1,1).
    #[arg(long, value_delimiter = ',')]
    pub ratios: Option<Vec<f64>>,
    /// Output directory (gets rank-0, rank-1, …).
    #[arg(long)]
    pub out: PathBuf,
    /// Weight type of the matrices: keep, q8_0, q4_0, q4_1, f16, f32.
    #[arg(long, default_value = "keep")]
    pub quant: Quant,
    /// Row layout of Q4 matrices: packed (for nodes that run the AVX-512 VNNI kernel) or
    /// ggml. Default: packed if this machine runs that kernel, else ggml.
    #[arg(long, value_parser = super::parse_layout)]
    pub layout: Option<Layout>,
    /// Where the LM head's rows go: auto, rank0 or split (as `tpi run --lm-head`; the
    /// run must ask for the same, or its plan will not match these shards).
    #[arg(long, default_value = "auto")]
    pub lm_head: tpi_node::model::HeadSplit,
}

/// Runs `tpi shard`.
pub fn shard(a: ShardArgs) -> anyhow::Result<()> {
    let mut files = ModelFiles::open(&a.model)
        .with_context(|| format!("cannot load model {}", a.model.display()))?;
    files.validate()?;
    if let tpi_node::store::shard::Quant::To(dt) = a.quant {
        files.requantise_to(dt);
    }
    let weights = match (&a.nodes, &a.ratios) {
        (Some(0), _) => bail!("--nodes must be at least 1"),
        (Some(n), _) => vec![1.0; *n],
        (None, Some(r)) => r.clone(),
        (None, None) => bail!("give --nodes N or --ratios a,b,…"),
    };
    let plan = SplitPlan::for_model(&files, &weights, a.lm_head)?;
    println!("plan {} for {} ranks:", plan.id(), plan.world());
    let layout = a.layout.unwrap_or_else(default_layout);
    println!("q4 layout: {}", layout.name());
    let t0 = std::time::Instant::now();
    for r in 0..plan.world() {
        let dir = rank_dir(&a.out, r);
        let m = write_shard(&files, &plan, r, a.quant, layout, &dir)
            .with_context(|| format!("writing rank {r}'s shard to {}", dir.display()))?;
        let s = &plan.ranks[r];
        println!(
            "  rank {r}: heads {:?}, kv heads {:?}, mlp {:?}, vocab {:?}: {} blocks, {:.1} MB -> {}",
            s.heads,
            s.kv_heads,
            s.ffn,
            s.vocab,
            m.blocks.len(),
            m.file_len as f64 / 1e6,
            dir.display()
        );
    }
    let peak = tpi_node::sys::peak_rss().unwrap_or(0);
    println!(
        "done in {:.1} s; peak RSS {:.1} MB for a {:.1} MB model",
        t0.elapsed().as_secs_f64(),
        peak as f64 / 1e6,
        files.store.total_bytes() as f64 / 1e6
    );
    Ok(())
}
