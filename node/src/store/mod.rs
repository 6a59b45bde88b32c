//! Shard files and the sliding-window scheduler that streams them from disk.
pub mod cache;
pub mod manifest;
pub mod shard;
pub mod window;

pub use cache::{BlockNeed, Receiver, ShardCache};
pub use manifest::{BlockEntry, BlockKind, Manifest};
pub use shard::{
    default_layout, layout_for_isa, load_manifest, write_shard, Quant, Shard, ShardWriter,
};
pub use window::{window_for_budget, Window, WindowStats};

use std::path::Path;

/// Errors of the shard store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File system trouble, with the path.
    #[error("{path}: {err}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        err: std::io::Error,
    },
    /// Blocks whose bytes do not hash to their manifest sha256.
    #[error("shard {dir}: block(s) {blocks:?} fail their sha256 check (the shard file is corrupt; delete the directory, or let tpi write it again)")]
    Corrupt {
        /// The shard directory.
        dir: String,
        /// Indices of the failing blocks.
        blocks: Vec<usize>,
    },
    /// A manifest or shard that does not hold together.
    #[error("invalid shard: {0}")]
    Invalid(String),
    /// Model trouble while sharding.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// A memory budget below what the shard needs at the least.
    #[error(
        "--mem-budget {budget_mib:.1} MiB cannot hold rank {rank}'s minimum of {min_mib:.1} MiB: \
         two of its largest blocks ({block_mib:.1} MiB each, the one computing and the next), \
         its KV cache ({kv_mib:.1} MiB) and {fixed_mib:.0} MiB of runtime; give at least \
         {min_mib:.1} MiB, shorten the context, or spread the model over more ranks"
    )]
    BudgetTooSmall {
        /// The rank.
        rank: u32,
        /// The budget, MiB.
        budget_mib: f64,
        /// The minimum, MiB.
        min_mib: f64,
        /// The largest streamed block, MiB.
        block_mib: f64,
        /// The KV cache, MiB.
        kv_mib: f64,
        /// The fixed overhead, MiB.
        fixed_mib: f64,
    },
}

impl StoreError {
    /// An I/O error at `path`.
    pub fn io(path: &Path, err: std::io::Error) -> Self {
        StoreError::Io {
            path: path.display().to_string(),
            err,
        }
    }
}

/// Parses a byte size such as `1.5GiB`, `512MiB`, `300MB`, `4096` (binary and decimal units).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 1.5GiB, 512MiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024f64.powi(4),
        u => return Err(format!("unknown size unit `{u}` in `{s}`")),
    };
    if !v.is_finite() || v < 0.0 {
        return Err(format!("`{s}` is not a size"));
    }
    Ok((v * mult) as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse() {
        assert_eq!(super::parse_bytes("4096").unwrap(), 4096);
        assert_eq!(super::parse_bytes("1.5GiB").unwrap(), 1610612736);
        assert_eq!(super::parse_bytes("300MB").unwrap(), 300_000_000);
        assert!(super::parse_bytes("lots").is_err());
        assert!(super::parse_bytes("3 parsecs").is_err());
    }
}
