//! Stamps: a small JSON file that remembers a fact about a data file (that every block
//! verified, or its digest) for as long as that file is unchanged, so expensive checks run
//! once per version of a file rather than on every use.

use std::fs::File;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A file's version as the file system sees it: any write changes its modification time,
/// and replacing it changes its inode (or size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileVersion {
    len: u64,
    mtime_ns: i128,
    inode: u64,
}

impl FileVersion {
    /// The version of the open file `f`.
    pub fn of(f: &File) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let md = f.metadata()?;
        Ok(FileVersion {
            len: md.len(),
            mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
            inode: md.ino(),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Stamp<T> {
    version: FileVersion,
    fact: T,
}

/// The fact the stamp at `path` records, if it was written for a file at `version`.
pub fn read<T: DeserializeOwned>(path: &Path, version: FileVersion) -> Option<T> {
    let s: Stamp<T> = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (s.version == version).then_some(s.fact)
}

/// Records `fact` for a file at `version` in the stamp at `path` (temporary file, then
/// rename, so readers never see half a stamp). Returns false when it cannot be written
/// (a read-only directory): that only costs redoing the work next time.
pub fn write<T: Serialize>(path: &Path, version: FileVersion, fact: &T) -> bool {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let ok = path
        .parent()
        .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
        && serde_json::to_vec(&Stamp { version, fact })
            .ok()
            .is_some_and(|b| std::fs::write(&tmp, b).is_ok())
        && std::fs::rename(&tmp, path).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_holds_until_the_file_changes() {
        let dir = std::env::temp_dir().join(format!("tpi-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (data, stamp) = (dir.join("data"), dir.join("data.stamp"));
        std::fs::write(&data, b"one").unwrap();
        let v = FileVersion::of(&File::open(&data).unwrap()).unwrap();
        assert!(write(&stamp, v, &"fact".to_string()));
        assert_eq!(read::<String>(&stamp, v).as_deref(), Some("fact"));
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&data, b"two").unwrap();
        let v2 = FileVersion::of(&File::open(&data).unwrap()).unwrap();
        assert_ne!(v, v2);
        assert_eq!(read::<String>(&stamp, v2), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
