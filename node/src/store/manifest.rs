//! The shard manifest: which blocks a rank's shard file holds, where, and their sha256.
//!
//! Layout of a shard directory (one per rank):
//! - `shard.bin`: the blocks back to back, each starting on a 4096-byte boundary.
//!   Blocks, in compute order: for each layer an attention block (attn norm, Q/K/V
//!   row slices and biases, O column slice) and an MLP block (MLP norm, gate/up row
//!   slices, down column slice); rank 0 also has a head block (final norm, LM head)
//!   and an embedding block. Inside a block, tensors are dense row-major and each
//!   starts on a 64-byte boundary. Norms and biases are f32.
//! - `manifest.json`: this file's schema, written last (atomically), so a directory
//!   without it is never used.

use serde::{Deserialize, Serialize};

use crate::model::{ModelConfig, Role, SplitPlan};

/// Version of the shard layout.
pub const SHARD_FORMAT: u32 = 2;
/// Blocks start on this boundary in `shard.bin`.
pub const BLOCK_ALIGN: u64 = 4096;
/// Tensors start on this boundary inside a block.
pub const TENSOR_ALIGN: u64 = 64;
/// Name of the data file.
pub const DATA_FILE: &str = "shard.bin";
/// Name of the manifest.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What a block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlockKind {
    /// A layer's attention slice.
    Attn(u32),
    /// A layer's MLP slice.
    Mlp(u32),
    /// Final norm and LM head (rank 0).
    Head,
    /// Token embedding (rank 0; touched row by row, never streamed).
    Embed,
}

/// One tensor inside a block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Role.
    pub role: Role,
    /// Layer (0 for global tensors).
    pub layer: u32,
    /// The expert, for an expert role (manifests from before experts have none). Always
    /// written, even as null: the manifest also travels as bincode, which cannot skip.
    #[serde(default)]
    pub expert: Option<u32>,
    /// GGML type id.
    pub ggml_type: u32,
    /// Rows.
    pub rows: u64,
    /// Columns.
    pub cols: u64,
    /// Byte offset from the block's start.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// Row layout, "ggml" or "packed" (Q4 matrices packed for the VNNI kernel; see
    /// `tpi_kernels::layout`). Manifests from before packing have none: GGML.
    #[serde(default = "ggml")]
    pub layout: String,
}

fn ggml() -> String {
    "ggml".into()
}

/// One block of the shard file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockEntry {
    /// What it holds.
    pub kind: BlockKind,
    /// Byte offset in `shard.bin` (a multiple of [`BLOCK_ALIGN`]).
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// sha256 of the block's bytes, hex.
    pub sha256: String,
    /// Its tensors.
    pub tensors: Vec<TensorEntry>,
}

/// Everything a node needs to know about its shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`SHARD_FORMAT`].
    pub format: u32,
    /// Identity of the source model.
    pub model_id: String,
    /// Identity of the split plan.
    pub plan_id: String,
    /// The split plan.
    pub plan: SplitPlan,
    /// The rank this shard is for.
    pub rank: u32,
    /// Model hyper-parameters.
    pub config: ModelConfig,
    /// Weight type of the matrices ("keep" or a dtype name).
    pub quant: String,
    /// Layout asked for the Q4 matrices ("ggml" or "packed"); part of the cache key.
    #[serde(default = "ggml")]
    pub layout: String,
    /// Blocks in compute order (embedding last).
    pub blocks: Vec<BlockEntry>,
    /// Length of `shard.bin`.
    pub file_len: u64,
}

impl Manifest {
    /// The cache key of a shard: model, plan, weight type, layout and rank.
    pub fn key(model_id: &str, plan_id: &str, rank: usize, quant: &str, layout: &str) -> String {
        if layout == "ggml" {
            format!("{model_id}-{plan_id}-{quant}-r{rank}")
        } else {
            format!("{model_id}-{plan_id}-{quant}-{layout}-r{rank}")
        }
    }

    /// This manifest's cache key.
    pub fn cache_key(&self) -> String {
        Self::key(
            &self.model_id,
            &self.plan_id,
            self.rank as usize,
            &self.quant,
            &self.layout,
        )
    }

    /// Checks that this is rank `rank`'s shard of model `model_id` split by plan
    /// `plan_id`. The error completes a sentence about the shard ("the shard in D has …").
    pub fn is_for(&self, model_id: &str, plan_id: &str, rank: u32) -> Result<(), String> {
        if self.model_id != model_id {
            return Err(format!(
                "has model identity {}, not {model_id}",
                self.model_id
            ));
        }
        if self.plan_id != plan_id || self.rank != rank {
            return Err(format!(
                "has plan identity {} (rank {}), not {plan_id} (rank {rank})",
                self.plan_id, self.rank
            ));
        }
        Ok(())
    }

    /// Checks internal consistency (bounds, alignment, order) of a manifest read from disk or the network.
    pub fn check(&self) -> Result<(), String> {
        if self.format != SHARD_FORMAT {
            return Err(format!(
                "shard format {} (this build reads {SHARD_FORMAT})",
                self.format
            ));
        }
        self.plan.check().map_err(|e| e.to_string())?;
        self.config.validate().map_err(|e| e.to_string())?;
        let c = &self.config;
        if (
            self.plan.n_heads,
            self.plan.n_kv_heads,
            self.plan.intermediate_size,
        ) != (c.n_heads, c.n_kv_heads, c.ffn_dim())
        {
            return Err(format!(
                "the plan splits {} heads / {} KV heads / {} MLP columns, the config has {} / {} / {}",
                self.plan.n_heads,
                self.plan.n_kv_heads,
                self.plan.intermediate_size,
                c.n_heads,
                c.n_kv_heads,
                c.ffn_dim()
            ));
        }
        if self.plan.vocab_size != c.vocab_size {
            return Err(format!(
                "the plan splits a vocabulary of {}, the config has {}",
                self.plan.vocab_size, c.vocab_size
            ));
        }
        if self.plan.id() != self.plan_id {
            return Err("the manifest's plan does not hash to its plan id".into());
        }
        if self.rank as usize >= self.plan.world() {
            return Err(format!(
                "rank {} outside a plan of {}",
                self.rank,
                self.plan.world()
            ));
        }
        if tpi_kernels::Layout::from_name(&self.layout).is_none() {
            return Err(format!("unknown shard layout `{}`", self.layout));
        }
        let mut end = 0u64;
        for (i, b) in self.blocks.iter().enumerate() {
            if b.offset % BLOCK_ALIGN != 0 || b.offset < end {
                return Err(format!("block {i} misaligned or overlapping"));
            }
            end = b.offset.checked_add(b.len).ok_or("block too long")?;
            if end > self.file_len {
                return Err(format!("block {i} runs past the data file"));
            }
            if b.sha256.len() != 64 {
                return Err(format!("block {i} has no sha256"));
            }
            for t in &b.tensors {
                if tpi_kernels::Layout::from_name(&t.layout).is_none() {
                    return Err(format!(
                        "a tensor of block {i} has unknown layout `{}`",
                        t.layout
                    ));
                }
                let tend = t.offset.checked_add(t.len).ok_or("tensor too long")?;
                if tend > b.len {
                    return Err(format!("a tensor of block {i} runs past the block"));
                }
            }
        }
        Ok(())
    }

    /// Streamed blocks in compute order (attention and MLP per layer, then the head).
    pub fn stream_order(&self) -> Vec<usize> {
        (0..self.blocks.len())
            .filter(|&i| self.blocks[i].kind != BlockKind::Embed)
            .collect()
    }

    /// Bytes of the largest streamed block.
    pub fn max_block(&self) -> u64 {
        self.stream_order()
            .iter()
            .map(|&i| self.blocks[i].len)
            .max()
            .unwrap_or(0)
    }
}
