//! Writing a rank's shard (streaming, tensor by tensor) and opening one (memory-mapped).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use sha2::{Digest, Sha256};
use tpi_kernels::{DType, Layout};

use super::manifest::*;
use super::window::{window_for_budget, Window};
use super::StoreError;
use crate::model::forward::{row_parallel_cols, slice_weight, SliceSource};
use crate::model::gguf::{ggml_dtype, ggml_type_id};
use crate::model::weights::Blob;
use crate::model::{BlockOf, Head, ModelConfig, ModelFiles, RankModel, Role, SplitPlan, Weight};
use crate::stamp::{self, FileVersion};

/// Weight type of the matrices in a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    /// Whatever the source model has.
    Keep,
    /// Re-quantise to this dtype.
    To(DType),
}

impl std::str::FromStr for Quant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "keep" => Quant::Keep,
            "q8_0" => Quant::To(DType::Q8_0),
            "q4_0" => Quant::To(DType::Q4_0),
            "q4_1" => Quant::To(DType::Q4_1),
            "f16" => Quant::To(DType::F16),
            "f32" => Quant::To(DType::F32),
            o => {
                return Err(format!(
                    "unknown quantisation `{o}` (keep, q8_0, q4_0, q4_1, f16, f32)"
                ))
            }
        })
    }
}

impl std::fmt::Display for Quant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Quant::Keep => f.write_str("keep"),
            Quant::To(d) => f.write_str(d.name()),
        }
    }
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// The shard layout for a node that computes here: see [`layout_for_isa`].
pub fn default_layout() -> Layout {
    layout_for_isa(tpi_kernels::active_isa().name())
}

/// The shard layout for a node computing on the kernel path named `isa`: packed Q4 for the
/// AVX-512 VNNI kernel (which reads packed rows without permutes), GGML for the others
/// (which would have to unpack every row: half their speed).
pub fn layout_for_isa(isa: &str) -> Layout {
    if isa == tpi_kernels::Isa::Avx512Vnni.name() {
        Layout::Packed
    } else {
        Layout::Ggml
    }
}

/// Streams one tensor into the shard file row by row (converting to `target` if
/// asked, packing Q4 rows if `layout` says so), feeding the block's hash; returns the
/// stored dtype, layout and byte length. With `cols`, only those columns of each row are
/// stored: a re-quantised row-parallel slice that the file's own blocks cannot cut (each
/// row is decoded whole, then cut). Memory: one row, never the tensor.
fn write_tensor(
    out: &mut impl Write,
    hash: &mut Sha256,
    w: &Weight,
    (target, cols): (Option<DType>, Option<std::ops::Range<usize>>),
    layout: Layout,
    what: &str,
) -> Result<(DType, Layout, u64), std::io::Error> {
    let m = w.mat();
    let dtype = target.unwrap_or(w.dtype);
    let layout = if layout.supports(dtype) {
        layout
    } else {
        Layout::Ggml
    };
    let mut written = 0u64;
    let mut packed = Vec::new();
    let mut emit = |bytes: &[u8], out: &mut dyn Write| -> std::io::Result<()> {
        let bytes = if layout == Layout::Packed {
            packed.resize(bytes.len(), 0);
            tpi_kernels::pack_row(dtype, bytes, &mut packed).map_err(std::io::Error::other)?;
            &packed[..]
        } else {
            bytes
        };
        hash.update(bytes);
        written += bytes.len() as u64;
        out.write_all(bytes)
    };
    if dtype == w.dtype && cols.is_none() {
        for r in 0..w.rows {
            emit(m.row(r), out)?;
        }
        return Ok((dtype, layout, written));
    }
    let cols = cols.unwrap_or(0..w.cols);
    let rb = dtype.row_bytes(cols.len()).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "cannot store {what} ({} columns) as {}: not a whole number of {}-element blocks",
                cols.len(),
                dtype.name(),
                dtype.block_len()
            ),
        )
    })?;
    let mut full = vec![0f32; w.cols];
    let mut q = vec![0u8; rb];
    for r in 0..w.rows {
        w.row_f32(r, &mut full);
        let row = &full[cols.clone()];
        if dtype == DType::F32 {
            let b: Vec<u8> = row.iter().flat_map(|x| x.to_le_bytes()).collect();
            emit(&b, out)?;
        } else {
            tpi_kernels::quantize_row(dtype, row, &mut q);
            emit(&q, out)?;
        }
    }
    Ok((dtype, layout, written))
}

/// The roles of one block for `rank` under `plan`, from the family's declaration.
fn block_roles(
    cfg: &ModelConfig,
    plan: &SplitPlan,
    rank: usize,
    kind: BlockKind,
) -> Result<Vec<Role>, StoreError> {
    let block = match kind {
        BlockKind::Attn(_) => BlockOf::Attn,
        BlockKind::Mlp(_) => BlockOf::Mlp,
        BlockKind::Head => BlockOf::Head,
        BlockKind::Embed => BlockOf::Embed,
    };
    Ok(cfg.spec()?.block_roles(cfg, &plan.ranks[rank], block))
}

/// Writes rank `rank`'s shard of `files` under `plan` into `dir`, one block at a time
/// (peak memory: one block), its Q4 matrices in `layout`. The manifest is written last,
/// atomically.
pub fn write_shard(
    files: &ModelFiles,
    plan: &SplitPlan,
    rank: usize,
    quant: Quant,
    layout: Layout,
    dir: &Path,
) -> Result<Manifest, StoreError> {
    let mut w = ShardWriter::create(files, plan, rank, quant, layout, dir)?;
    while let Some(kind) = w.next_block() {
        w.write_block(files, kind)?;
    }
    w.finish(files)
}

/// A rank's shard being written block by block, in stream order (every layer's attention
/// then MLP, then the head's rows if the rank has any, then rank 0's embedding), for a
/// caller that must interleave the ranks: a generator that makes each layer's tensors
/// once and hands them to every rank's writer. [`write_shard`] is the usual driver.
pub struct ShardWriter {
    plan: SplitPlan,
    rank: usize,
    quant: Quant,
    layout: Layout,
    dir: PathBuf,
    tmp: PathBuf,
    out: std::io::BufWriter<File>,
    pos: u64,
    kinds: Vec<BlockKind>,
    blocks: Vec<BlockEntry>,
}

impl ShardWriter {
    /// Starts rank `rank`'s shard of `files` under `plan` in `dir` (its data file is
    /// written aside and renamed by [`ShardWriter::finish`]).
    pub fn create(
        files: &ModelFiles,
        plan: &SplitPlan,
        rank: usize,
        quant: Quant,
        layout: Layout,
        dir: &Path,
    ) -> Result<Self, StoreError> {
        let cfg = &files.config;
        if rank >= plan.world() {
            return Err(StoreError::Invalid(format!(
                "rank {rank} of a plan for {} ranks",
                plan.world()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let tmp = dir.join(format!("{DATA_FILE}.tmp"));
        let f = File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        let mut kinds: Vec<BlockKind> = (0..cfg.n_layers as u32)
            .flat_map(|l| [BlockKind::Attn(l), BlockKind::Mlp(l)])
            .collect();
        if !plan.ranks[rank].vocab.is_empty() {
            kinds.push(BlockKind::Head);
        }
        if rank == 0 {
            kinds.push(BlockKind::Embed);
        }
        kinds.reverse();
        Ok(ShardWriter {
            plan: plan.clone(),
            rank,
            quant,
            layout,
            dir: dir.to_path_buf(),
            tmp,
            out: std::io::BufWriter::with_capacity(1 << 20, f),
            pos: 0,
            kinds,
            blocks: Vec::new(),
        })
    }

    /// The block [`ShardWriter::write_block`] must write next; None when all are written.
    pub fn next_block(&self) -> Option<BlockKind> {
        self.kinds.last().copied()
    }

    /// Writes block `kind`, which must be [`ShardWriter::next_block`], from the tensors of
    /// `files` (the model the writer was created for).
    pub fn write_block(&mut self, files: &ModelFiles, kind: BlockKind) -> Result<(), StoreError> {
        if self.next_block() != Some(kind) {
            return Err(StoreError::Invalid(format!(
                "rank {}'s shard: block {kind:?} out of order (next: {:?})",
                self.rank,
                self.next_block()
            )));
        }
        let cfg = &files.config;
        let (plan, rank, quant, layout) = (&self.plan, self.rank, self.quant, self.layout);
        let tmp = &self.tmp;
        let out = &mut self.out;
        let ioe =
            |e: std::io::Error| StoreError::Invalid(format!("writing {}: {e}", tmp.display()));
        let layer = match kind {
            BlockKind::Attn(l) | BlockKind::Mlp(l) => l as usize,
            _ => 0,
        };
        let offset = align(self.pos, BLOCK_ALIGN);
        out.write_all(&vec![0u8; (offset - self.pos) as usize])
            .map_err(ioe)?;
        let mut hash = Sha256::new();
        let mut len = 0u64;
        let mut tensors = Vec::new();
        let slice = &plan.ranks[rank];
        let tensors_of_block = block_roles(cfg, plan, rank, kind)?
            .into_iter()
            .flat_map(|role| {
                let experts: Vec<Option<usize>> = if role.is_expert() {
                    (0..cfg.n_experts).map(Some).collect()
                } else {
                    vec![None]
                };
                experts.into_iter().map(move |e| (role, e))
            });
        for (role, expert) in tensors_of_block {
            let full = match expert {
                Some(e) => files.store.expert(cfg, role, layer, e)?,
                None if role == Role::LmHead && cfg.tie_word_embeddings => {
                    files.store.role(cfg, Role::Embed, 0)?
                }
                None => files.store.role(cfg, role, layer)?,
            };
            let target = match (!role.is_vector(), quant) {
                (false, _) => Some(DType::F32),
                (true, Quant::Keep) => None,
                (true, Quant::To(t)) => Some(t),
            };
            // A re-quantised row-parallel slice may cut where the file's blocks cannot
            // (the plan followed `target`'s blocks): then whole rows are decoded and cut.
            let (w, cols) = match (slice_weight(cfg, slice, role, &full), target) {
                (Ok(w), _) => (w, None),
                (Err(e), Some(_)) => match row_parallel_cols(cfg, slice, role) {
                    Some(c) => (full.clone(), Some(c)),
                    None => return Err(e.into()),
                },
                (Err(e), None) => return Err(e.into()),
            };
            let pad = align(len, TENSOR_ALIGN) - len;
            let zeros = vec![0u8; pad as usize];
            hash.update(&zeros);
            out.write_all(&zeros).map_err(ioe)?;
            len += pad;
            let what = match expert {
                Some(e) => format!("layer {layer} expert {e} {role:?}"),
                None => format!("layer {layer} {role:?}"),
            };
            // The embedding is read row by row, never by a GEMV: it stays GGML.
            let tl = if role == Role::Embed {
                Layout::Ggml
            } else {
                layout
            };
            let stored_cols = cols.as_ref().map_or(w.cols, |c| c.len());
            let (dtype, tl, n) = write_tensor(out, &mut hash, &w, (target, cols), tl, &what)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::InvalidInput {
                        StoreError::Invalid(e.to_string())
                    } else {
                        ioe(e)
                    }
                })?;
            full.release_pages();
            tensors.push(TensorEntry {
                role,
                layer: layer as u32,
                expert: expert.map(|e| e as u32),
                ggml_type: ggml_type_id(dtype),
                rows: w.rows as u64,
                cols: stored_cols as u64,
                offset: len,
                len: n,
                layout: tl.name().into(),
            });
            len += n;
        }
        self.pos = offset + len;
        self.blocks.push(BlockEntry {
            kind,
            offset,
            len,
            sha256: hex::encode(hash.finalize()),
            tensors,
        });
        self.kinds.pop();
        Ok(())
    }

    /// Completes the shard once every block is written: syncs and renames its data file,
    /// then writes the manifest (last, atomically).
    pub fn finish(self, files: &ModelFiles) -> Result<Manifest, StoreError> {
        if let Some(k) = self.next_block() {
            return Err(StoreError::Invalid(format!(
                "rank {}'s shard is missing block {k:?} and the rest",
                self.rank
            )));
        }
        let tmp = &self.tmp;
        let f = self
            .out
            .into_inner()
            .map_err(|e| StoreError::io(tmp, e.into_error()))?;
        f.set_len(self.pos).map_err(|e| StoreError::io(tmp, e))?;
        f.sync_all().map_err(|e| StoreError::io(tmp, e))?;
        drop(f);
        let data_path = self.dir.join(DATA_FILE);
        std::fs::rename(tmp, &data_path).map_err(|e| StoreError::io(&data_path, e))?;
        let manifest = Manifest {
            format: SHARD_FORMAT,
            model_id: files.identity()?,
            plan_id: self.plan.id(),
            plan: self.plan,
            rank: self.rank as u32,
            config: files.config.clone(),
            quant: self.quant.to_string(),
            layout: self.layout.name().into(),
            blocks: self.blocks,
            file_len: self.pos,
        };
        save_manifest(&self.dir, &manifest)?;
        stamp_verified(&self.dir);
        Ok(manifest)
    }
}

/// sha256 (hex) of `len` bytes of `f` from `offset`, read in 1 MiB pieces.
pub fn hash_range(f: &File, offset: u64, len: u64) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], offset + done)?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

/// Memory a node needs besides weights and KV cache (runtime, buffers, code).
pub const FIXED_OVERHEAD: u64 = 64 << 20;

/// What a token reads of each streamed block, in stream order: all of a dense block; of
/// an MoE block everything but the experts, and `used/experts` of those.
fn streamed_reads(m: &Manifest) -> Vec<u64> {
    let c = &m.config;
    m.stream_order()
        .iter()
        .map(|&i| {
            let b = &m.blocks[i];
            let experts: u64 = b
                .tensors
                .iter()
                .filter(|t| t.expert.is_some())
                .map(|t| t.len)
                .sum();
            if experts == 0 {
                return b.len;
            }
            b.len - experts + experts * c.n_experts_used as u64 / c.n_experts.max(1) as u64
        })
        .collect()
}

/// The least memory a rank can run its shard in: a window of two of its largest streamed
/// blocks (what a token reads of them: the one computing and the next, which the
/// prefetcher loads meanwhile), its KV cache and [`FIXED_OVERHEAD`]. (The embedding is
/// read row by row and never resident.)
pub fn min_budget(m: &Manifest, kv_bytes: u64) -> u64 {
    let largest = streamed_reads(m).into_iter().max().unwrap_or(0);
    FIXED_OVERHEAD + kv_bytes + 2 * largest
}

/// Blocks an MoE shard's window holds at most when a budget sizes it: a few blocks
/// ahead keep the disk busy; the rest of the budget serves better as the expert cache.
pub const MOE_WINDOW_MAX: usize = 4;

/// Picks the sliding window for a shard: `window` if given, else from the budget
/// (None: the whole shard stays resident).
pub fn choose_window(
    m: &Manifest,
    window: Option<usize>,
    mem_budget: Option<u64>,
    kv_bytes: u64,
) -> Option<usize> {
    plan_window(m, window, mem_budget, kv_bytes).0
}

/// The window and the expert cache (bytes) for a shard. Without a budget, or for a
/// dense shard, as [`window_for_budget`] says, and no cache. For an MoE shard that does
/// not fit, a block counts what a token reads of it (everything but the experts, and
/// `used/experts` of those), the window holds at most [`MOE_WINDOW_MAX`] blocks, and
/// what the budget leaves beside it holds recently used experts.
pub fn plan_window(
    m: &Manifest,
    window: Option<usize>,
    mem_budget: Option<u64>,
    kv_bytes: u64,
) -> (Option<usize>, u64) {
    let fixed = FIXED_OVERHEAD + kv_bytes;
    let order = m.stream_order();
    let sizes: Vec<u64> = order.iter().map(|&i| m.blocks[i].len).collect();
    let c = &m.config;
    if let Some(w) = window {
        return (Some(w.max(1)), 0);
    }
    let Some(budget) = mem_budget else {
        return (None, 0);
    };
    let w = window_for_budget(budget, fixed, &sizes);
    if c.n_experts == 0 || w.is_none() {
        return (w, 0);
    }
    let largest = streamed_reads(m).into_iter().max().unwrap_or(0);
    let w = (budget.saturating_sub(fixed) / largest.max(1)) as usize;
    let w = w.clamp(2, MOE_WINDOW_MAX.min(sizes.len()).max(2));
    let cache = budget
        .saturating_sub(fixed)
        .saturating_sub(w as u64 * largest);
    (Some(w), cache)
}

/// Writes `manifest.json` atomically (temp file, fsync, rename).
pub fn save_manifest(dir: &Path, m: &Manifest) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
    let text = serde_json::to_vec_pretty(m).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let mut f = File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
    f.write_all(&text).map_err(|e| StoreError::io(&tmp, e))?;
    f.sync_all().map_err(|e| StoreError::io(&tmp, e))?;
    let dst = dir.join(MANIFEST_FILE);
    std::fs::rename(&tmp, &dst).map_err(|e| StoreError::io(&dst, e))
}

/// Reads and checks a manifest.
pub fn load_manifest(dir: &Path) -> Result<Manifest, StoreError> {
    let p = dir.join(MANIFEST_FILE);
    let text = std::fs::read(&p).map_err(|e| StoreError::io(&p, e))?;
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| StoreError::Invalid(format!("{}: {e}", p.display())))?;
    m.check()
        .map_err(|e| StoreError::Invalid(format!("{}: {e}", p.display())))?;
    Ok(m)
}

/// Name of the stamp a shard directory gets when all its blocks have verified.
pub const STAMP_FILE: &str = "verified.json";

/// The shard as the stamp sees it: its data file's version, and the manifest's hash (any
/// change of the manifest invalidates the stamp too).
fn current_version(dir: &Path, data: &File) -> Option<(FileVersion, String)> {
    let manifest = std::fs::read(dir.join(MANIFEST_FILE)).ok()?;
    Some((
        FileVersion::of(data).ok()?,
        hex::encode(Sha256::digest(&manifest)),
    ))
}

/// Stamps a shard directory whose data file was just written (or received) and hashed
/// block by block, so its first use does not hash it again.
pub(crate) fn stamp_verified(dir: &Path) {
    if let Ok(f) = File::open(dir.join(DATA_FILE)) {
        write_verified(dir, &f);
    }
}

fn write_verified(dir: &Path, data: &File) {
    if let Some((version, manifest)) = current_version(dir, data) {
        if !stamp::write(&dir.join(STAMP_FILE), version, &manifest) {
            tracing::debug!("cannot stamp {} as verified", dir.display());
        }
    }
}

/// An opened, memory-mapped shard.
pub struct Shard {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    map: Arc<Mmap>,
    file: Arc<File>,
    index: HashMap<(Role, u32, Option<u32>), (usize, usize)>,
}

impl Shard {
    /// Opens a shard directory: manifest check, data file length check, map.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let manifest = load_manifest(dir)?;
        let p = dir.join(DATA_FILE);
        let file = File::open(&p).map_err(|e| StoreError::io(&p, e))?;
        let len = file.metadata().map_err(|e| StoreError::io(&p, e))?.len();
        if len != manifest.file_len {
            return Err(StoreError::Invalid(format!(
                "{} is {len} bytes, the manifest says {}",
                p.display(),
                manifest.file_len
            )));
        }
        // SAFETY: read-only map of a file tpi only replaces by rename, never rewrites in place.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| StoreError::io(&p, e))?;
        let mut index = HashMap::new();
        for (bi, b) in manifest.blocks.iter().enumerate() {
            for (ti, t) in b.tensors.iter().enumerate() {
                index.insert((t.role, t.layer, t.expert), (bi, ti));
            }
        }
        Ok(Shard {
            dir: dir.to_path_buf(),
            manifest,
            map: Arc::new(map),
            file: Arc::new(file),
            index,
        })
    }

    /// The map (for the window scheduler).
    pub fn map(&self) -> Arc<Mmap> {
        self.map.clone()
    }

    /// The open data file (for page-cache advice).
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Whether block `i`'s bytes hash to its manifest sha256. Reads through a small
    /// buffer rather than the map, so verifying a shard does not make it resident.
    pub fn verify_block(&self, i: usize) -> bool {
        let b = &self.manifest.blocks[i];
        hash_range(&self.file, b.offset, b.len).is_ok_and(|h| h == b.sha256)
    }

    /// Indices of blocks whose checksum fails. Hashes every block, unless the shard's
    /// stamp (written after its last full verification) still matches the data file's
    /// size, modification time and inode and the manifest: then none.
    pub fn corrupt_blocks(&self) -> Vec<usize> {
        if self.stamp_is_current() {
            return Vec::new();
        }
        let bad: Vec<usize> = (0..self.manifest.blocks.len())
            .filter(|&i| !self.verify_block(i))
            .collect();
        if bad.is_empty() {
            self.write_stamp();
        }
        bad
    }

    /// Opens a shard directory and checks every block's sha256 (see
    /// [`Shard::corrupt_blocks`]): the one check every rank, rank 0 included, runs
    /// before it computes with a shard.
    pub fn open_verified(dir: &Path) -> Result<Self, StoreError> {
        let s = Self::open(dir)?;
        let bad = s.corrupt_blocks();
        if bad.is_empty() {
            Ok(s)
        } else {
            Err(StoreError::Corrupt {
                dir: dir.display().to_string(),
                blocks: bad,
            })
        }
    }

    fn stamp_is_current(&self) -> bool {
        current_version(&self.dir, &self.file).is_some_and(|(version, manifest)| {
            stamp::read::<String>(&self.dir.join(STAMP_FILE), version) == Some(manifest)
        })
    }

    /// Records that every block verified, for the shard as it is now. A directory that
    /// cannot be written (a read-only `--shards` copy) just verifies again next time.
    fn write_stamp(&self) {
        write_verified(&self.dir, &self.file);
    }

    /// A tensor as a zero-copy weight view.
    pub fn weight(&self, role: Role, layer: usize) -> Result<Weight, crate::model::ModelError> {
        self.tensor(role, layer, None)
    }

    /// A tensor, of expert `expert` for an expert role, as a zero-copy weight view.
    fn tensor(
        &self,
        role: Role,
        layer: usize,
        expert: Option<usize>,
    ) -> Result<Weight, crate::model::ModelError> {
        let (bi, ti) = self
            .index
            .get(&(role, layer as u32, expert.map(|e| e as u32)))
            .copied()
            .ok_or_else(|| {
                crate::model::ModelError::MissingTensor(match expert {
                    Some(e) => format!("{role:?} of layer {layer} expert {e} in the shard"),
                    None => format!("{role:?} of layer {layer} in the shard"),
                })
            })?;
        let b = &self.manifest.blocks[bi];
        let t = &b.tensors[ti];
        let dtype =
            ggml_dtype(t.ggml_type).map_err(|d| crate::model::ModelError::UnsupportedDType {
                tensor: format!("{role:?}"),
                dtype: d,
            })?;
        let layout = Layout::from_name(&t.layout).ok_or_else(|| {
            crate::model::ModelError::Input(format!(
                "shard tensor {role:?}/{layer}: unknown layout {}",
                t.layout
            ))
        })?;
        let w = Weight::new(
            dtype,
            t.rows as usize,
            t.cols as usize,
            Blob::Map(self.map.clone()),
            (b.offset + t.offset) as usize,
        )?
        .with_layout(layout)?;
        if w.nbytes() as u64 != t.len {
            return Err(crate::model::ModelError::Input(format!(
                "shard tensor {role:?}/{layer}: {} bytes, manifest says {}",
                w.nbytes(),
                t.len
            )));
        }
        Ok(w)
    }

    /// This rank's slice of every layer, over the map.
    pub fn rank_model(&self) -> Result<RankModel, crate::model::ModelError> {
        let m = &self.manifest;
        RankModel::build(&m.config, &m.plan.ranks[m.rank as usize], self)
    }

    /// The sliding window over this shard's streamed blocks: `window` blocks if given,
    /// else derived from `mem_budget` (with `kv_bytes` of KV cache), else all resident.
    /// With a budget, an MoE shard's window also keeps recently used experts (see
    /// [`plan_window`]).
    pub fn window(
        &self,
        window: Option<usize>,
        mem_budget: Option<u64>,
        kv_bytes: u64,
    ) -> Result<Window, StoreError> {
        let m = &self.manifest;
        if let Some(budget) = mem_budget {
            let min = min_budget(m, kv_bytes);
            if budget < min {
                // Rounded up except the budget, so the minimum shown never reads as fitting.
                let mib = |b: u64| (b as f64 / 1048576.0 * 10.0).ceil() / 10.0;
                return Err(StoreError::BudgetTooSmall {
                    rank: m.rank,
                    budget_mib: (budget as f64 / 1048576.0 * 10.0).floor() / 10.0,
                    min_mib: mib(min),
                    block_mib: mib((min - FIXED_OVERHEAD - kv_bytes) / 2),
                    kv_mib: mib(kv_bytes),
                    fixed_mib: (FIXED_OVERHEAD >> 20) as f64,
                });
            }
        }
        let (w, cache_bytes) = plan_window(m, window, mem_budget, kv_bytes);
        let order = m.stream_order();
        let regions = order
            .iter()
            .map(|&i| m.blocks[i].offset as usize..(m.blocks[i].offset + m.blocks[i].len) as usize)
            .collect();
        // Each MoE block's experts: the byte ranges of each expert's tensors.
        let experts = order
            .iter()
            .map(|&i| {
                let b = &m.blocks[i];
                let mut per: Vec<Vec<std::ops::Range<usize>>> = Vec::new();
                for t in &b.tensors {
                    if let Some(e) = t.expert {
                        let e = e as usize;
                        if per.len() <= e {
                            per.resize(e + 1, Vec::new());
                        }
                        let start = (b.offset + t.offset) as usize;
                        per[e].push(start..start + t.len as usize);
                    }
                }
                per
            })
            .collect();
        Ok(Window::with_expert_cache(
            self.map(),
            self.file(),
            regions,
            experts,
            w,
            cache_bytes,
        ))
    }

    /// This rank's head, over the map: the embedding (rank 0), the final norm and its
    /// LM head rows. None for a rank that computes no logits.
    pub fn head(&self) -> Result<Option<Head>, crate::model::ModelError> {
        let m = &self.manifest;
        let vocab = m.plan.ranks[m.rank as usize].vocab.clone();
        let embed = if m.rank == 0 {
            Some(self.weight(Role::Embed, 0)?)
        } else {
            None
        };
        if vocab.is_empty() {
            if embed.is_some() {
                return Err(crate::model::ModelError::Plan(
                    "rank 0 computes no logits; tpi needs its vocabulary slice".into(),
                ));
            }
            return Ok(None);
        }
        Head::new(
            &m.config,
            embed,
            &self.weight(Role::FinalNorm, 0)?,
            self.weight(Role::LmHead, 0)?,
            vocab,
        )
        .map(Some)
    }
}

impl SliceSource for Shard {
    fn fetch(&self, role: Role, layer: usize) -> Result<Weight, crate::model::ModelError> {
        self.weight(role, layer)
    }
    fn fetch_expert(
        &self,
        role: Role,
        layer: usize,
        e: usize,
    ) -> Result<Weight, crate::model::ModelError> {
        self.tensor(role, layer, Some(e))
    }
}
