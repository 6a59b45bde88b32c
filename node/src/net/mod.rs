//! QUIC transport, wire messages and collectives.
//!
//! Layering, bottom to top:
//! - [`frame`]: `[u32 LE payload length][u8 kind][payload]` frames over QUIC streams,
//!   with the length checked against a caller-given maximum before any allocation.
//! - [`wire`]: bincode control messages ([`wire::encode`] / [`wire::decode`]) and the
//!   raw little-endian f32 / f16 tensor payload helpers.
//! - [`tls`]: the cluster CA and per-process mutual-TLS credentials.
//! - [`transport`]: the quinn endpoint / connection / stream wrappers, transport tuning
//!   and [`NetError`].
//! - [`collective`]: allreduce (star / ring / tree) over per-peer [`collective::DataLink`]s.
//! - [`spin`]: drives an allreduce on the compute thread, yield-spinning before parking.
//! - [`bench`]: an in-process loopback allreduce latency benchmark.

pub mod bench;
pub mod collective;
pub mod driven;
pub mod emulation;
pub mod frame;
pub mod spin;
pub mod tls;
pub mod transport;
pub mod wire;

pub use collective::{Algo, AllreduceStats, DataLink, Group, WireDType};
pub use tls::{certificate_role, CaBundle, Credential, Role};
pub use transport::{Connection, Endpoint, NetError, Stream, TransportOptions};
