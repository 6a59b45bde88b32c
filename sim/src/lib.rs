//! tpi-sim: user-space link emulation and the cluster simulator.
//!
//! - [`link`], [`topology`]: what a link is, and which link joins each pair of nodes.
//! - [`delay`], [`socket`], [`relay`]: the emulator — per-link FIFOs drained by a
//!   timing thread, a `quinn::AsyncUdpSocket` wrapper, and a UDP/TCP relay.
//! - [`model`], [`predict`], [`plot`]: the cluster simulator over plain numbers.

pub mod delay;
pub mod link;
pub mod model;
#[cfg(feature = "plot")]
pub mod plot;
pub mod predict;
pub mod relay;
pub mod report;
pub mod socket;
pub mod topology;

pub use delay::{DelayLine, LinkStats, StatsSnapshot};
pub use link::LinkSpec;
pub use model::{quant_bytes_per_weight, Calibration, Device, ModelShape, Workload, PRESETS};
pub use predict::{
    allreduce_time, auto_choice, link_costs, predict, tree_children, tree_parent, Algo, Breakdown,
    Cluster, Costs, DeviceReport, LinkCost, Policy, Prediction,
};
pub use relay::{spawn_relay, Relay, Transport};
pub use socket::{
    emulated_socket, emulated_socket_with_stats, topology_link, uniform_link, EmulatedSocket,
    LinkFor,
};
pub use topology::{Topology, TopologyError};
