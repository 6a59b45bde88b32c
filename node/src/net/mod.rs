//! QUIC transport, wire messages and collectives.
//!
//! Layering, bottom to top (each module uses only those above it in this list):
//! - [`error`]: [`NetError`] and the mapping of quinn's errors onto it.
//! - [`options`]: [`TransportOptions`] and the quinn configs built from them.
//! - [`frame`]: `[u32 LE payload length][u8 kind][payload]` frames over any
//!   `AsyncRead` / `AsyncWrite`, with the length checked against a caller-given maximum
//!   before any allocation.
//! - [`wire`]: bincode control messages ([`wire::encode`] / [`wire::decode`], one size
//!   limit [`wire::MAX_CONTROL`]) and the raw little-endian f32 / f16 tensor payloads.
//! - [`tls`]: the cluster CA and per-process mutual-TLS credentials.
//! - [`transport`]: the quinn endpoint / connection / stream wrappers.
//! - [`collective`]: allreduce (star / ring / tree) over per-peer [`collective::DataLink`]s.
//! - [`spin`], [`driven`]: drive an allreduce on the compute thread, spinning before
//!   parking.
//! - [`emulation`]: the link emulator (from tpi-sim) under a process's endpoint.
//! - [`bench`](mod@bench): an in-process loopback allreduce latency benchmark.

pub mod bench;
pub mod collective;
pub mod driven;
pub mod emulation;
pub mod error;
pub mod frame;
pub mod options;
pub mod spin;
pub mod tls;
pub mod transport;
pub mod wire;

pub use collective::{Algo, AllreduceStats, Costs, DataLink, Group, LinkCost, Policy, WireDType};
pub use error::NetError;
pub use options::TransportOptions;
pub use tls::{certificate_role, CaBundle, Credential, Role};
pub use transport::{Connection, Endpoint, Stream};
