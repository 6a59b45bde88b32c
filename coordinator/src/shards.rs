//! Where rank shards come from: a directory made by `tpi shard`, or the coordinator's
//! cache, filled on demand (streaming, one block at a time).

use std::path::{Path, PathBuf};

use tpi_kernels::Layout;
use tpi_node::model::{ModelFiles, SplitPlan};
use tpi_node::store::{load_manifest, write_shard, Manifest, Quant};

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

/// Directory of rank `r`'s shard inside a `tpi shard --out` directory.
pub fn rank_dir(out: &Path, r: usize) -> PathBuf {
    out.join(format!("rank-{r}"))
}

fn usable(dir: &Path, model_id: &str, plan: &SplitPlan, r: usize) -> Result<Option<Manifest>> {
    if !dir.join(tpi_node::store::manifest::MANIFEST_FILE).exists() {
        return Ok(None);
    }
    let m = load_manifest(dir).map_err(|e| Error::Input(e.to_string()))?;
    if m.model_id != model_id {
        return Err(Error::Input(format!(
            "the shard in {} is for model {}, not this model ({model_id})",
            dir.display(),
            m.model_id
        )));
    }
    if m.plan_id != plan.id() || m.rank as usize != r {
        return Err(Error::Input(format!(
            "the shard in {} is for plan {} rank {}, the run needs plan {} rank {r}",
            dir.display(),
            m.plan_id,
            m.rank,
            plan.id()
        )));
    }
    Ok(Some(m))
}

/// The shard directory of every rank, in rank order. From `given` (a `tpi shard --out`
/// directory, which must match the model and plan, whatever its layout), else from the
/// cache, writing any missing shard there first with rank r's Q4 matrices in `layouts[r]`.
pub fn ensure_shards(
    files: &ModelFiles,
    plan: &SplitPlan,
    quant: Quant,
    layouts: &[Layout],
    given: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    let model_id = files.identity();
    let mut dirs = Vec::with_capacity(plan.world());
    for r in 0..plan.world() {
        let dir = match given {
            Some(g) => {
                let d = rank_dir(g, r);
                if usable(&d, &model_id, plan, r)?.is_none() {
                    return Err(Error::Input(format!(
                        "no shard for rank {r} in {}",
                        g.display()
                    )));
                }
                d
            }
            None => {
                let layout = layouts.get(r).copied().unwrap_or_default();
                let key =
                    Manifest::key(&model_id, &plan.id(), r, &quant.to_string(), layout.name());
                let d = cache_root().join("shards").join(key);
                if usable(&d, &model_id, plan, r).ok().flatten().is_none() {
                    tracing::info!("writing rank {r}'s shard to {}", d.display());
                    // Write aside, then rename into place: concurrent runs never see a half shard.
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|t| t.subsec_nanos())
                        .unwrap_or(0);
                    let tmp = d.with_extension(format!("tmp-{}-{nanos}", std::process::id()));
                    write_shard(files, plan, r, quant, layout, &tmp)
                        .map_err(|e| Error::Io(e.to_string()))?;
                    if usable(&d, &model_id, plan, r).ok().flatten().is_some() {
                        let _ = std::fs::remove_dir_all(&tmp);
                    } else {
                        let _ = std::fs::remove_dir_all(&d);
                        if std::fs::rename(&tmp, &d).is_err() {
                            let _ = std::fs::remove_dir_all(&tmp);
                            if usable(&d, &model_id, plan, r)?.is_none() {
                                return Err(Error::Io(format!(
                                    "cannot install shard {}",
                                    d.display()
                                )));
                            }
                        }
                    }
                }
                d
            }
        };
        dirs.push(dir);
    }
    Ok(dirs)
}
