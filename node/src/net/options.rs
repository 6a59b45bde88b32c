//! QUIC transport tuning ([`TransportOptions`]) and the quinn configs built from it.

use std::sync::Arc;
use std::time::Duration;

/// QUIC transport tuning. The defaults target a LAN / edge cluster.
#[derive(Clone, Debug)]
pub struct TransportOptions {
    /// Keep-alive PING interval (default 250 ms).
    pub keep_alive: Duration,
    /// Idle timeout: a connection with no packets from the peer for this long fails with
    /// [`NetError::Closed`](super::error::NetError::Closed) (default 1.5 s, so a killed peer surfaces within 2 s). The
    /// effective value is the minimum of both sides'.
    pub idle_timeout: Duration,
    /// Per-stream receive window in bytes (default 16 MiB: bounds what a fast sender can
    /// make a node buffer, e.g. during shard transfers).
    pub stream_window: u64,
    /// Per-connection receive window, also used as the send window (default 32 MiB).
    pub connection_window: u64,
    /// Initial congestion window in bytes (default 2 MiB), so small collectives never
    /// wait on slow start.
    pub initial_window: u64,
    /// Initial RTT estimate before any sample (default 20 ms; quinn's is 333 ms).
    pub initial_rtt: Duration,
    /// Requested UDP socket send/receive buffer size in bytes (default 4 MiB; the kernel
    /// caps it at `net.core.rmem_max` / `wmem_max`). The Linux default (~208 KiB)
    /// overflows when several peers burst into a hub at once, and every dropped datagram
    /// costs a loss-recovery delay.
    pub socket_buffer: usize,
    /// UDP payload size for connections whose peer is a loopback address (default
    /// [`GSO_SAFE_MTU`], at most [`MAX_LOOPBACK_MTU`]). Loopback's MTU is 64 KiB; 5.4 times
    /// fewer packets than the Ethernet-sized default cut per-packet work (syscalls, headers,
    /// ACKs, wake-ups). Other paths start at quinn's 1200 and discover up to 1452. Not used
    /// over emulated links, which model a real network.
    pub loopback_mtu: u16,
}

/// The largest loopback datagram that still goes in GSO batches: quinn batches up to 10
/// datagrams and a batch must fit one 64 KiB UDP send (10 x 6500 + headers < 65535).
/// (With 8 KiB datagrams, batches of 80 KiB were refused and silently dropped, which showed
/// as 55 ms loss-recovery stalls.)
pub const GSO_SAFE_MTU: u16 = 6500;

/// The largest loopback datagram: quinn encodes a packet's length in at most 14 bits.
pub const MAX_LOOPBACK_MTU: u16 = 16000;

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            keep_alive: Duration::from_millis(250),
            idle_timeout: Duration::from_millis(1500),
            stream_window: 16 << 20,
            connection_window: 32 << 20,
            initial_window: 2 << 20,
            initial_rtt: Duration::from_millis(20),
            socket_buffer: 4 << 20,
            loopback_mtu: GSO_SAFE_MTU,
        }
    }
}

impl TransportOptions {
    /// Builds the quinn transport config for connections to a loopback peer: datagrams of
    /// [`TransportOptions::loopback_mtu`] and fewer ACKs.
    pub fn loopback_transport_config(&self) -> quinn::TransportConfig {
        let mut t = self.transport_config();
        let mtu = self.loopback_mtu.clamp(1200, MAX_LOOPBACK_MTU);
        t.initial_mtu(mtu);
        t.min_mtu(mtu);
        t.mtu_discovery_config(None);
        // quinn sends up to 10 datagrams per GSO batch and quinn-udp silently drops a batch
        // the kernel refuses as larger than 64 KiB (EMSGSIZE), which reads as heavy loss:
        // above the GSO-safe size each datagram goes alone.
        if mtu > GSO_SAFE_MTU {
            t.enable_segmentation_offload(false);
        }
        // Ask the peer to ACK every 16 ack-eliciting packets (or after 1 ms) instead of every
        // 2: fewer ACK datagrams to build, send and process (QUIC ACK-frequency extension,
        // which quinn speaks on both ends). N=4 32 KiB star: ~190 → ~165 µs.
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(quinn::VarInt::from_u32(16));
        ack.max_ack_delay(Some(Duration::from_millis(1)));
        t.ack_frequency_config(Some(ack));
        t
    }

    /// The endpoint config: accepts datagrams up to the loopback MTU.
    pub(crate) fn endpoint_config(&self) -> quinn::EndpointConfig {
        let mut c = quinn::EndpointConfig::default();
        let mtu = self.loopback_mtu.clamp(1472, MAX_LOOPBACK_MTU);
        c.max_udp_payload_size(mtu)
            .expect("payload size clamped to quinn's bounds");
        c
    }

    /// Builds the quinn transport config.
    pub fn transport_config(&self) -> quinn::TransportConfig {
        let var = |v: u64| quinn::VarInt::from_u64(v).unwrap_or(quinn::VarInt::MAX);
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive));
        t.max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok());
        t.stream_receive_window(var(self.stream_window));
        t.receive_window(var(self.connection_window));
        t.send_window(self.connection_window);
        t.initial_rtt(self.initial_rtt);
        t.max_concurrent_bidi_streams(var(64));
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window(self.initial_window);
        t.congestion_controller_factory(Arc::new(cubic));
        t
    }
}
