//! The session protocol between the coordinator (rank 0) and a node, on the control
//! stream of their QUIC connection. Messages are bincode (via [`crate::net::wire`]);
//! tensors (weights, hidden states) follow their header message as raw frames.
//!
//! A session: `Hello` → `Welcome` | `Refused`; `Setup` (with the rank's shard
//! manifest) → `NeedBlocks` (what the node's cache lacks or holds corrupt) →
//! `BlockData` chunks (+ raw frames) → `BlocksDone` → `ShardReady`; once every node has
//! said so, `Links` → data links → `Ready`; then
//! `Step` (+ hidden-state frame) → `StepDone`, repeated, with `Reset` between
//! generations; `End` closes it.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::net::{Policy, WireDType};
use crate::store::{BlockNeed, Manifest};

/// Stream tag of a session's control stream.
pub const CONTROL_STREAM_TAG: u8 = 0xC0;

/// Coordinator → node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToNode {
    /// Opens a session.
    Hello {
        /// The coordinator's protocol version.
        version: u32,
    },
    /// The node's part in the session.
    Setup(Box<Setup>),
    /// A chunk of shard block `index` starting at byte `offset` follows as one raw frame.
    BlockData {
        /// Block index in the manifest.
        index: u32,
        /// Byte offset inside the block.
        offset: u64,
    },
    /// Every needed block has been sent.
    BlocksDone,
    /// Run layers on `n` tokens at positions `start..start+n`; the residual stream
    /// `[n][hidden]` follows as one raw f32 frame.
    Step {
        /// First position.
        start: u32,
        /// Tokens in the step.
        n: u32,
    },
    /// Drop the KV cache and make room for `capacity` positions.
    Reset {
        /// Positions to hold.
        capacity: u32,
    },
    /// Close the session.
    End,
    /// Every rank holds its shard: build the data links now. (Sent once all nodes said
    /// `ShardReady`, so a node whose peers are still receiving their shards does not give
    /// up on links they cannot open yet.)
    Links,
}

/// The node's assignment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Setup {
    /// This node's rank.
    pub rank: u32,
    /// Ranks in the session.
    pub world: u32,
    /// Identity of the model.
    pub model_id: String,
    /// Identity of the split plan.
    pub plan_id: String,
    /// The manifest of this rank's shard (plan and config inside).
    pub manifest: Manifest,
    /// Allreduce policy: one algorithm, or `auto`.
    pub algo: Policy,
    /// Allreduce payload type.
    pub dtype: WireDType,
    /// Listen addresses of every rank (rank 0's unused), for worker-to-worker links.
    pub addrs: Vec<Option<SocketAddr>>,
    /// Initial KV cache capacity.
    pub capacity: u32,
    /// Element type of the KV cache.
    pub kv_dtype: crate::model::forward::KvDType,
}

/// Node → coordinator.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FromNode {
    /// Session accepted.
    Welcome {
        /// The node's protocol version.
        version: u32,
        /// The node's compute threads.
        threads: u32,
        /// The kernel path the node computes with (`tpi_kernels::Isa::name`), which picks
        /// the layout of the shard made for it.
        isa: String,
    },
    /// Session refused; the reason says what differs.
    Refused {
        /// Human-readable reason.
        reason: String,
    },
    /// Blocks of the shard the node must receive (empty: its cache has them all, intact).
    NeedBlocks(Vec<BlockNeed>),
    /// Shard ready and links up.
    Ready {
        /// Blocks kept resident by the node's window (0: the whole shard).
        window: u32,
    },
    /// A step finished; its timings at this node.
    StepDone(RankStep),
    /// The session failed at the node.
    Error {
        /// What went wrong.
        msg: String,
    },
    /// The shard is here, verified and loaded; waiting for `Links`.
    ShardReady,
}

/// Where one step's time went at one rank: what a node reports after each step, and
/// what rank 0 measures of itself (`tpi run --json`'s `steps[].ranks[]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankStep {
    /// Rank index.
    pub rank: usize,
    /// Milliseconds computing.
    pub compute_ms: f64,
    /// Milliseconds blocked in allreduce waiting for peers.
    pub allreduce_wait_ms: f64,
    /// Milliseconds of allreduce spent transferring and summing.
    pub allreduce_transfer_ms: f64,
    /// Milliseconds idle between the previous step's end and this step's start.
    pub idle_ms: f64,
    /// Milliseconds waiting for the sliding window to bring a block in from disk.
    pub disk_wait_ms: f64,
    /// Milliseconds the prefetch thread spent loading blocks (overlapped with compute;
    /// compare with `disk_wait_ms`).
    pub disk_load_ms: f64,
    /// Bytes read from storage during the step.
    pub disk_read_bytes: u64,
    /// Bytes of MoE experts the sliding window read on demand during the step (the
    /// routed experts of streamed blocks; 0 when the shard is resident).
    #[serde(default)]
    pub expert_read_bytes: u64,
    /// Experts the step asked for that the window's expert cache still held.
    #[serde(default)]
    pub expert_cache_hits: u64,
    /// Peak resident set size of the rank's process so far (VmHWM).
    pub peak_rss_bytes: u64,
}
