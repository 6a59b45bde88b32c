//! `synth --shards-out DIR --nodes N`: the per-rank shards of a generated model, written
//! without the model file in between. A Llama-3-70B-shape model is 42.5 GB as GGUF and
//! as much again as 8 ranks' shards; on a machine with less disk than both, the shards
//! alone must do.
//!
//! The directory gets what `tpi shard --out DIR --nodes N` makes of the same model
//! (`rank-0` … `rank-N-1`, with the same blocks, manifests and sha256 sums) and, beside
//! them, `model.gguf`: the model's header (config, vocabulary, chat template, tensor
//! directory) over a data section that is a hole in the file (no disk used). The header
//! says the weights are in the shards, so tpi reads the file for everything but weights
//! and refuses to take weights from it. The shards' model identity is that file's.
//!
//! Each layer's tensors are drawn once, into memory (about 0.5 GB for a 70B layer), and
//! every rank's writer takes its slices of them before the next layer is drawn.

use std::io::Write;
use std::path::{Path, PathBuf};

use tpi_kernels::Layout;
use tpi_node::model::weights::layer_of;
use tpi_node::model::{HeadSplit, ModelFiles, SplitPlan};
use tpi_node::store::{BlockKind, Manifest, Quant, ShardWriter};

use super::gguf_model::{check_room, header, tensor_data, Shape, SynthQuant};

/// The stand-in model file inside a `--shards-out` directory.
pub const MODEL_FILE: &str = "model.gguf";

/// What [`write_shards`] made.
pub struct ShardsWritten {
    /// The model file (header only) the shards belong to.
    pub model: PathBuf,
    /// Every rank's manifest, rank 0 first.
    pub manifests: Vec<Manifest>,
}

/// Writes the `ranks` ranks' shards (even split, `--lm-head auto`, the model's own
/// types, Q4 rows in `layout`) of the model `s`/`quant`/`seed` into `dir`, with its
/// header-only model file. `progress(done, total)` counts tensors.
pub fn write_shards(
    s: &Shape,
    quant: SynthQuant,
    seed: u64,
    ranks: usize,
    layout: Layout,
    dir: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<ShardsWritten, String> {
    if ranks == 0 {
        return Err("--nodes must be at least 1".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let at = format!(
        "the shards beside it in {} (tpi-testbed synth --shards-out; run with --shards {})",
        dir.display(),
        dir.display()
    );
    let (h, tensors) = header(s, quant, seed, Some(&at));
    // The ranks' shards hold every weight once, plus the head's norm on each of them.
    let weights: u64 = h.tensors().iter().map(|t| t.bytes).sum();
    check_room(
        dir,
        weights,
        &format!("the shards of {} for {ranks} ranks", s.name),
    )?;

    let model = dir.join(MODEL_FILE);
    write_header_only(&h.encode(), h.file_len(), &model)?;
    let mut files = ModelFiles::open(&model).map_err(|e| format!("{}: {e}", model.display()))?;
    files.validate().map_err(|e| e.to_string())?;
    let plan = SplitPlan::for_model(&files, &vec![1.0; ranks], HeadSplit::Auto)
        .map_err(|e| e.to_string())?;
    let mut writers = (0..ranks)
        .map(|r| {
            let d = dir.join(format!("rank-{r}"));
            ShardWriter::create(&files, &plan, r, Quant::Keep, layout, &d)
                .map_err(|e| format!("{}: {e}", d.display()))
        })
        .collect::<Result<Vec<_>, String>>()?;

    // Tensors by layer, then the global ones, in the order the shards' blocks need them.
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); s.layers + 1];
    for (i, t) in tensors.iter().enumerate() {
        groups[layer_of(&t.name).unwrap_or(s.layers)].push(i);
    }
    let total = tensors.len();
    let mut done = 0;
    let mut buf = Vec::new();
    for (g, members) in groups.iter().enumerate() {
        let layer = (g < s.layers).then_some(g);
        for &i in members {
            let mut bytes = Vec::with_capacity(h.tensors()[i].bytes as usize);
            tensor_data(&tensors[i], seed, i, &mut buf, &mut bytes as &mut dyn Write)
                .map_err(|e| e.to_string())?;
            files
                .store
                .set_data(&tensors[i].name, bytes)
                .map_err(|e| e.to_string())?;
            done += 1;
            progress(done, total);
        }
        for w in &mut writers {
            while let Some(kind) = w.next_block() {
                let of_this_group = match kind {
                    BlockKind::Attn(l) | BlockKind::Mlp(l) => layer == Some(l as usize),
                    _ => layer.is_none(),
                };
                if !of_this_group {
                    break;
                }
                w.write_block(&files, kind).map_err(|e| e.to_string())?;
            }
        }
        for &i in members {
            files.store.clear_data(&tensors[i].name);
        }
    }
    let manifests = writers
        .into_iter()
        .map(|w| w.finish(&files).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(ShardsWritten { model, manifests })
}

/// Writes `header` and extends the file to `len` bytes without writing the rest: the data
/// section is a hole, which takes no disk (through `.tmp`, renamed when complete).
fn write_header_only(header: &[u8], len: u64, out: &Path) -> Result<(), String> {
    let tmp = out.with_extension("gguf.tmp");
    let err = |e: std::io::Error| format!("{}: {e}", tmp.display());
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(header).map_err(err)?;
    f.set_len(len).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))
}
