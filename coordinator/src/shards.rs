//! Where rank shards come from: a directory made by `tpi shard`, or the coordinator's
//! cache, filled on demand (streaming, one block at a time).

use std::path::{Path, PathBuf};

use tpi_kernels::Layout;
use tpi_node::model::{ModelFiles, SplitPlan};
use tpi_node::store::{load_manifest, write_shard, Manifest, Quant, Shard};

use crate::error::{Error, Result};

/// The tpi cache directory: $TPI_CACHE, else ~/.cache/tpi.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("TPI_CACHE") {
        return PathBuf::from(p);
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/tpi"))
        .unwrap_or_else(|| std::env::temp_dir().join("tpi-cache"))
}

/// The weight type of the shards in a `tpi shard --out` directory, as rank 0's manifest
/// records it (`keep`: the model's own types).
pub fn shards_quant(out: &Path) -> Result<Quant> {
    let dir = rank_dir(out, 0);
    let m = load_manifest(&dir).map_err(|e| {
        Error::Input(format!(
            "cannot read the shard manifest in {}: {e}",
            dir.display()
        ))
    })?;
    m.quant.parse().map_err(|e| {
        Error::Input(format!(
            "the shard manifest in {} has an unknown weight type: {e}",
            dir.display()
        ))
    })
}

/// Directory of rank `r`'s shard inside a `tpi shard --out` directory.
pub fn rank_dir(out: &Path, r: usize) -> PathBuf {
    out.join(format!("rank-{r}"))
}

/// The manifest in `dir`, if there is one, after checking that it is rank `r`'s shard of
/// this very model and plan: its identity, its config and its plan, not just their ids.
fn usable(
    dir: &Path,
    files: &ModelFiles,
    model_id: &str,
    plan: &SplitPlan,
    r: usize,
) -> Result<Option<Manifest>> {
    if !dir.join(tpi_node::store::manifest::MANIFEST_FILE).exists() {
        return Ok(None);
    }
    let m = load_manifest(dir).map_err(|e| Error::Input(e.to_string()))?;
    m.is_for(model_id, &plan.id(), r as u32)
        .map_err(|e| Error::Input(format!("the shard in {} {e}", dir.display())))?;
    if m.config != files.config || m.plan != *plan {
        return Err(Error::Input(format!(
            "the shard manifest in {} claims model {model_id} and plan {}, but its {} differs from that model's: it was edited or damaged",
            dir.display(),
            m.plan_id,
            if m.config != files.config { "config" } else { "plan" }
        )));
    }
    Ok(Some(m))
}

/// Rank `r`'s shard in `dir` if it is complete, this model's and plan's, and every
/// block verifies; `Ok(None)` when there is none there, or (with `repairable`) when the
/// one there is stale or corrupt and should be written again.
fn verified(
    dir: &Path,
    files: &ModelFiles,
    model_id: &str,
    plan: &SplitPlan,
    r: usize,
    repairable: bool,
) -> Result<Option<Shard>> {
    let found = match usable(dir, files, model_id, plan, r) {
        Ok(found) => found,
        Err(e) if repairable => {
            tracing::warn!("{e}: writing it again");
            None
        }
        Err(e) => return Err(e),
    };
    if found.is_none() {
        return Ok(None);
    }
    match Shard::open_verified(dir) {
        Ok(s) => Ok(Some(s)),
        Err(e) if repairable => {
            tracing::warn!("rank {r}'s cached shard is unusable ({e}): writing it again");
            Ok(None)
        }
        Err(e) => Err(Error::Input(format!("rank {r}'s shard: {e}"))),
    }
}

/// Every rank's shard, in rank order, opened and verified (each block's sha256, on
/// first use and after any change of the data file). From `given` (a `tpi shard --out`
/// directory, which must match the model and plan, whatever its layout: a corrupt one
/// is an error), else from the cache, writing any missing, stale or corrupt shard there
/// first with rank r's Q4 matrices in `layouts[r]`.
pub fn ensure_shards(
    files: &ModelFiles,
    plan: &SplitPlan,
    quant: Quant,
    layouts: &[Layout],
    given: Option<&Path>,
) -> Result<Vec<Shard>> {
    let model_id = files.identity()?;
    if given.is_none() {
        check_cache_room(files, plan, quant, layouts, &model_id)?;
    }
    let mut shards = Vec::with_capacity(plan.world());
    for r in 0..plan.world() {
        let shard = match given {
            Some(g) => {
                let d = rank_dir(g, r);
                verified(&d, files, &model_id, plan, r, false)?.ok_or_else(|| {
                    Error::Input(format!("no shard for rank {r} in {}", g.display()))
                })?
            }
            None => {
                let layout = layouts.get(r).copied().unwrap_or_default();
                let d = cache_dir(&model_id, plan, r, quant, layouts);
                match verified(&d, files, &model_id, plan, r, true)? {
                    Some(s) => s,
                    None => {
                        write_cached(files, plan, r, quant, layout, &d)?;
                        verified(&d, files, &model_id, plan, r, false)?.ok_or_else(|| {
                            Error::Io(format!("cannot install shard {}", d.display()))
                        })?
                    }
                }
            }
        };
        shards.push(shard);
    }
    Ok(shards)
}

/// The cache directory of rank `r`'s shard.
fn cache_dir(
    model_id: &str,
    plan: &SplitPlan,
    r: usize,
    quant: Quant,
    layouts: &[Layout],
) -> PathBuf {
    let layout = layouts.get(r).copied().unwrap_or_default();
    let key = Manifest::key(model_id, &plan.id(), r, &quant.to_string(), layout.name());
    cache_root().join("shards").join(key)
}

/// Refuses, before anything is written, to fill the cache with shards that will not fit:
/// the ranks whose shard is not there yet need about their share of the model's bytes
/// (at the shards' weight type), and the cache's file system must have that and 1 GiB
/// spare.
fn check_cache_room(
    files: &ModelFiles,
    plan: &SplitPlan,
    quant: Quant,
    layouts: &[Layout],
    model_id: &str,
) -> Result<()> {
    let cfg = &files.config;
    let missing: Vec<usize> = (0..plan.world())
        .filter(|&r| {
            let d = cache_dir(model_id, plan, r, quant, layouts);
            !d.join(tpi_node::store::manifest::MANIFEST_FILE).exists()
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let embed = files
        .store
        .role_shape(cfg, tpi_node::model::Role::Embed, 0)?
        .nbytes() as f64;
    let head = files.lm_head_bytes()? as f64;
    let total = files.store.total_bytes() as f64;
    let layers = (total - embed - if cfg.tie_word_embeddings { 0.0 } else { head }).max(0.0);
    let scale = crate::backend::bytes_per_weight(files, quant)?
        / crate::backend::bytes_per_weight(files, Quant::Keep)?.max(1e-9);
    let need: f64 = missing
        .iter()
        .map(|&r| {
            let s = &plan.ranks[r];
            let share = s.ffn.len() as f64 / cfg.intermediate_size.max(1) as f64;
            let vocab = s.vocab.len() as f64 / cfg.vocab_size.max(1) as f64;
            (layers * share + head * vocab) * scale + if r == 0 { embed } else { 0.0 }
        })
        .sum();
    let root = cache_root();
    let _ = std::fs::create_dir_all(&root);
    let Some(free) = tpi_node::sys::disk_free(&root) else {
        return Ok(());
    };
    if need + (1u64 << 30) as f64 > free as f64 {
        return Err(Error::Input(format!(
            "the shards of {} for ranks {missing:?} need about {:.1} GB in {} (+1 GiB spare), but it has {:.1} GB free: free some space, set TPI_CACHE to a larger disk, or shard elsewhere with `tpi shard --out DIR` and run with --shards DIR",
            files.path.display(),
            need / 1e9,
            root.display(),
            free as f64 / 1e9
        )));
    }
    Ok(())
}

/// Writes rank `r`'s shard aside, then renames it into `d`: concurrent runs never see a
/// half shard, and one that installed an intact shard first wins.
fn write_cached(
    files: &ModelFiles,
    plan: &SplitPlan,
    r: usize,
    quant: Quant,
    layout: Layout,
    d: &Path,
) -> Result<()> {
    tracing::info!("writing rank {r}'s shard to {}", d.display());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let tmp = d.with_extension(format!("tmp-{}-{nanos}", std::process::id()));
    write_shard(files, plan, r, quant, layout, &tmp).map_err(|e| Error::Io(e.to_string()))?;
    let model_id = files.identity()?;
    let installed = usable(d, files, &model_id, plan, r)
        .ok()
        .flatten()
        .is_some()
        && Shard::open_verified(d).is_ok();
    if installed {
        let _ = std::fs::remove_dir_all(&tmp);
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(d);
    if std::fs::rename(&tmp, d).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(())
}
