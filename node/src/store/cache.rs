//! A node's shard cache: which blocks of a wanted shard it already holds intact, and
//! a resumable, checksum-verified receiver for the rest.
//!
//! Shards live in `ROOT/<model>-<plan>-<quant>-r<rank>/`. Transfers go into a sibling
//! `….partial/` directory with a `progress.json` (bytes received per block), so an
//! interrupted transfer resumes where it stopped. Only when every block verifies is
//! the manifest written and the directory renamed into place: a partial shard is
//! never used.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::manifest::{Manifest, DATA_FILE, MANIFEST_FILE};
use super::shard::{hash_range, load_manifest, save_manifest, Shard};
use super::StoreError;

/// A block the node lacks: its index and how many of its bytes are already on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockNeed {
    /// Block index in the manifest.
    pub index: u32,
    /// Bytes already received (the transfer resumes there).
    pub have: u64,
}

/// The shard cache under a node's data directory.
#[derive(Clone)]
pub struct ShardCache {
    root: PathBuf,
}

const PROGRESS: &str = "progress.json";

#[derive(Default, Serialize, Deserialize)]
struct Progress {
    key: String,
    have: BTreeMap<u32, u64>,
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::io(p, e)
}

impl ShardCache {
    /// The cache rooted at `root` (created on demand).
    pub fn new(root: &Path) -> Self {
        ShardCache {
            root: root.to_path_buf(),
        }
    }

    /// Where the complete shard for `m` lives.
    pub fn dir_for(&self, m: &Manifest) -> PathBuf {
        self.root.join(m.cache_key())
    }

    fn partial_for(&self, m: &Manifest) -> PathBuf {
        self.root.join(format!("{}.partial", m.cache_key()))
    }

    /// Opens the cached shard if it is complete, matches `m` and every block verifies.
    pub fn open_verified(&self, m: &Manifest) -> Option<Shard> {
        let dir = self.dir_for(m);
        let have = load_manifest(&dir).ok()?;
        if &have != m {
            return None;
        }
        let s = Shard::open(&dir).ok()?;
        s.corrupt_blocks().is_empty().then_some(s)
    }

    /// Blocks still needed for `m`: none when the cached shard is intact; the corrupt
    /// ones when some fail their checksum (the shard moves back to a partial transfer);
    /// otherwise whatever a previous interrupted transfer did not finish.
    pub fn needs(&self, m: &Manifest) -> Result<Vec<BlockNeed>, StoreError> {
        std::fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        let dir = self.dir_for(m);
        let partial = self.partial_for(m);
        if load_manifest(&dir).ok().as_ref() == Some(m) {
            let s = Shard::open(&dir)?;
            let bad = s.corrupt_blocks();
            if bad.is_empty() {
                return Ok(Vec::new());
            }
            tracing::warn!(
                "cached shard {} has {} corrupt block(s) {:?}: fetching them again",
                dir.display(),
                bad.len(),
                bad
            );
            drop(s);
            let _ = std::fs::remove_dir_all(&partial);
            std::fs::rename(&dir, &partial).map_err(io(&dir))?;
            let _ = std::fs::remove_file(partial.join(MANIFEST_FILE));
            let mut p = Progress {
                key: m.cache_key(),
                have: BTreeMap::new(),
            };
            for (i, b) in m.blocks.iter().enumerate() {
                p.have
                    .insert(i as u32, if bad.contains(&i) { 0 } else { b.len });
            }
            write_progress(&partial, &p)?;
        } else if dir.exists() {
            // A stale or foreign shard under this key: start over.
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        let p = read_progress(&partial).filter(|p| p.key == m.cache_key());
        Ok(m.blocks
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let have = p
                    .as_ref()
                    .and_then(|p| p.have.get(&(i as u32)).copied())
                    .unwrap_or(0)
                    .min(b.len);
                (have < b.len).then_some(BlockNeed {
                    index: i as u32,
                    have,
                })
            })
            .collect())
    }

    /// Starts (or resumes) receiving the shard for `m`.
    pub fn receiver(&self, m: &Manifest) -> Result<Receiver, StoreError> {
        let partial = self.partial_for(m);
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        let mut progress = read_progress(&partial)
            .filter(|p| p.key == m.cache_key())
            .unwrap_or_default();
        progress.key = m.cache_key();
        let data = partial.join(DATA_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data)
            .map_err(io(&data))?;
        let len = file.metadata().map_err(io(&data))?.len();
        if len < m.file_len {
            reserve(&file, m.file_len).map_err(|e| {
                StoreError::Invalid(format!(
                    "not enough disk space for a {}-byte shard in {}: {e}",
                    m.file_len,
                    self.root.display()
                ))
            })?;
        }
        Ok(Receiver {
            manifest: m.clone(),
            dir: partial,
            final_dir: self.dir_for(m),
            file,
            progress,
        })
    }
}

#[cfg(target_os = "linux")]
fn reserve(f: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len as libc::off_t) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn reserve(f: &File, len: u64) -> std::io::Result<()> {
    f.set_len(len)
}

fn read_progress(dir: &Path) -> Option<Progress> {
    serde_json::from_slice(&std::fs::read(dir.join(PROGRESS)).ok()?).ok()
}

fn write_progress(dir: &Path, p: &Progress) -> Result<(), StoreError> {
    let path = dir.join(PROGRESS);
    let tmp = dir.join("progress.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(p).unwrap_or_default()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// Writes incoming block bytes into a partial shard, then verifies and installs it.
pub struct Receiver {
    manifest: Manifest,
    dir: PathBuf,
    final_dir: PathBuf,
    file: File,
    progress: Progress,
}

impl Receiver {
    /// Writes `data` at byte `offset` of block `index`; chunks of a block must arrive in order.
    pub fn write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let b =
            self.manifest.blocks.get(index as usize).ok_or_else(|| {
                StoreError::Invalid(format!("block {index} is not in the manifest"))
            })?;
        let have = self.progress.have.get(&index).copied().unwrap_or(0);
        if offset != have {
            return Err(StoreError::Invalid(format!(
                "block {index}: chunk at {offset}, expected {have}"
            )));
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= b.len)
            .ok_or_else(|| {
                StoreError::Invalid(format!("block {index}: chunk runs past the block"))
            })?;
        let path = self.dir.join(DATA_FILE);
        self.file
            .seek(SeekFrom::Start(b.offset + offset))
            .map_err(io(&path))?;
        self.file.write_all(data).map_err(|e| {
            StoreError::Invalid(format!(
                "writing shard block {index} to {}: {e}",
                path.display()
            ))
        })?;
        self.progress.have.insert(index, end);
        if end == b.len {
            write_progress(&self.dir, &self.progress)?;
        }
        Ok(())
    }

    /// Records progress (call when a transfer pauses, so it can resume).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        write_progress(&self.dir, &self.progress)
    }

    /// Verifies every block, writes the manifest, and moves the shard into place.
    pub fn finish(self) -> Result<Shard, StoreError> {
        let path = self.dir.join(DATA_FILE);
        self.file
            .set_len(self.manifest.file_len)
            .map_err(io(&path))?;
        self.file.sync_all().map_err(io(&path))?;
        for (i, b) in self.manifest.blocks.iter().enumerate() {
            if hash_range(&self.file, b.offset, b.len).map_err(io(&path))? != b.sha256 {
                let mut p = self.progress;
                p.have.insert(i as u32, 0);
                let _ = write_progress(&self.dir, &p);
                return Err(StoreError::Invalid(format!(
                    "block {i} failed its sha256 check after transfer"
                )));
            }
        }
        save_manifest(&self.dir, &self.manifest)?;
        let _ = std::fs::remove_file(self.dir.join(PROGRESS));
        if self.final_dir.exists() {
            std::fs::remove_dir_all(&self.final_dir).map_err(io(&self.final_dir))?;
        }
        std::fs::rename(&self.dir, &self.final_dir).map_err(io(&self.final_dir))?;
        super::shard::stamp_verified(&self.final_dir);
        Shard::open(&self.final_dir)
    }
}
