//! QUIC endpoints, connections and streams (quinn), transport tuning and [`NetError`].
//!
//! All constructors that create a quinn endpoint must run inside a tokio runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::frame::{read_frame_of, write_frame, FrameKind};
use super::tls::{client_config_with, server_config_with, Credential, SERVER_NAME};

/// Everything that can go wrong in the networking layer. Messages name the peer (rank
/// and/or address) wherever it is known.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Could not bind a local UDP socket.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address we tried to bind.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Could not reach a node (no answer, bad address, ...).
    #[error("node {addr} unreachable: {reason}")]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed: one side refused the other's certificate (wrong cluster
    /// CA, no client certificate, wrong server name) or the TLS negotiation failed.
    #[error("TLS handshake with {peer} refused: {reason}")]
    Handshake {
        /// The peer, e.g. `"127.0.0.1:7001"` or `"rank 2 (127.0.0.1:7001)"`.
        peer: String,
        /// The TLS / QUIC error.
        reason: String,
    },
    /// An established connection or stream is gone (peer closed it, died, or went silent
    /// past the idle timeout).
    #[error("connection to {peer} lost: {reason}")]
    Closed {
        /// The peer (`"peer"` when the layer that saw the error did not know it).
        peer: String,
        /// Why.
        reason: String,
    },
    /// An operation did not complete in time.
    #[error("{what}: timed out after {after:?}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// The limit.
        after: Duration,
    },
    /// A frame's length field exceeds what the reader allows (garbage or a hostile peer);
    /// nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// The announced payload length.
        len: u64,
        /// The reader's maximum.
        max: usize,
    },
    /// The peer broke the protocol (unexpected frame, wrong sizes, version mismatch, ...).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A control message failed to encode or decode.
    #[error("codec error: {0}")]
    Codec(String),
    /// A credential could not be generated, parsed or turned into a TLS config.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// A local I/O error (files, sockets).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// An error on the link with a specific peer (wraps any of the above).
    #[error("{peer}: {source}")]
    Link {
        /// The peer, e.g. `"rank 2 (127.0.0.1:7001)"`.
        peer: String,
        /// The underlying error.
        #[source]
        source: Box<NetError>,
    },
}

impl NetError {
    /// Attributes this error to `peer`: fills in the peer of a [`NetError::Closed`] /
    /// [`NetError::Handshake`] whose peer was unknown, and wraps anything else in
    /// [`NetError::Link`] (errors already naming a peer are returned unchanged).
    pub fn with_peer(self, peer: &str) -> NetError {
        match self {
            NetError::Closed { peer: p, reason } if p == UNKNOWN_PEER => NetError::Closed {
                peer: peer.to_string(),
                reason,
            },
            NetError::Handshake { peer: p, reason } if p == UNKNOWN_PEER => NetError::Handshake {
                peer: peer.to_string(),
                reason,
            },
            e @ (NetError::Closed { .. } | NetError::Handshake { .. } | NetError::Link { .. }) => e,
            e => NetError::Link {
                peer: peer.to_string(),
                source: Box::new(e),
            },
        }
    }

    /// The innermost error (looks through [`NetError::Link`]).
    pub fn root(&self) -> &NetError {
        match self {
            NetError::Link { source, .. } => source.root(),
            e => e,
        }
    }
}

pub(crate) const UNKNOWN_PEER: &str = "peer";

fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// Maps a quinn connection error to a [`NetError`] naming `peer`.
pub(crate) fn map_connection_error(peer: &str, e: quinn::ConnectionError) -> NetError {
    use quinn::ConnectionError as E;
    let peer = peer.to_string();
    let hint = |r: String| {
        if r.contains("invalid peer certificate") {
            format!("{r} (certificate missing or not issued by this cluster's CA)")
        } else {
            r
        }
    };
    match e {
        E::TransportError(te) if is_crypto(te.code) => NetError::Handshake {
            peer,
            reason: hint(te.to_string()),
        },
        E::ConnectionClosed(c) if is_crypto(c.error_code) => NetError::Handshake {
            peer,
            reason: hint(format!("the peer rejected the handshake: {c}")),
        },
        E::TimedOut => NetError::Closed {
            peer,
            reason: "no response within the idle timeout (peer dead or unreachable)".into(),
        },
        E::ApplicationClosed(c) => NetError::Closed {
            peer,
            reason: format!(
                "closed by the peer (code {}): {}",
                c.error_code,
                String::from_utf8_lossy(&c.reason)
            ),
        },
        E::LocallyClosed => NetError::Closed {
            peer,
            reason: "closed locally".into(),
        },
        other => NetError::Closed {
            peer,
            reason: other.to_string(),
        },
    }
}

pub(crate) fn map_write_error(e: quinn::WriteError) -> NetError {
    match e {
        quinn::WriteError::ConnectionLost(c) => map_connection_error(UNKNOWN_PEER, c),
        other => NetError::Closed {
            peer: UNKNOWN_PEER.into(),
            reason: format!("stream write failed: {other}"),
        },
    }
}

pub(crate) fn map_read_exact_error(e: quinn::ReadExactError) -> NetError {
    match e {
        quinn::ReadExactError::ReadError(e) => map_read_error(e),
        quinn::ReadExactError::FinishedEarly(n) => NetError::Closed {
            peer: UNKNOWN_PEER.into(),
            reason: format!("stream ended by the peer ({n} bytes into a frame)"),
        },
    }
}

pub(crate) fn map_read_error(e: quinn::ReadError) -> NetError {
    match e {
        quinn::ReadError::ConnectionLost(c) => map_connection_error(UNKNOWN_PEER, c),
        other => NetError::Closed {
            peer: UNKNOWN_PEER.into(),
            reason: format!("stream read failed: {other}"),
        },
    }
}

/// QUIC transport tuning. The defaults target a LAN / edge cluster.
#[derive(Clone, Debug)]
pub struct TransportOptions {
    /// Keep-alive PING interval (default 250 ms).
    pub keep_alive: Duration,
    /// Idle timeout: a connection with no packets from the peer for this long fails with
    /// [`NetError::Closed`] (default 1.5 s, so a killed peer surfaces within 2 s). The
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
    fn endpoint_config(&self) -> quinn::EndpointConfig {
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

/// Binds a UDP socket and requests `opts.socket_buffer`-byte kernel buffers (best effort).
fn bind_udp(bind: SocketAddr, opts: &TransportOptions) -> Result<std::net::UdpSocket, NetError> {
    let socket =
        std::net::UdpSocket::bind(bind).map_err(|source| NetError::Bind { addr: bind, source })?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let size = opts.socket_buffer.min(i32::MAX as usize) as libc::c_int;
        for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            // SAFETY: a valid socket fd and a pointer to a c_int of the stated length.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    &size as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                tracing::debug!(
                    "setsockopt({opt}) failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = opts;
    Ok(socket)
}

/// A QUIC endpoint: accepts connections (when made as a server) and dials out.
#[derive(Clone, Debug)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    /// Client config for loopback peers (large datagrams); `None` over emulated links.
    loopback_client: Option<quinn::ClientConfig>,
    /// Server config for loopback peers; `None` for dial-only or emulated endpoints.
    loopback_server: Option<Arc<quinn::ServerConfig>>,
}

/// The client config for other peers and a copy of it with the loopback transport tuning
/// (the credential is parsed once).
fn client_configs(
    cred: &Credential,
    opts: &TransportOptions,
) -> Result<(quinn::ClientConfig, quinn::ClientConfig), NetError> {
    let cfg = client_config_with(cred, opts)?;
    let mut lo = cfg.clone();
    lo.transport_config(Arc::new(opts.loopback_transport_config()));
    Ok((cfg, lo))
}

impl Endpoint {
    /// A server endpoint bound to `bind` (use port 0 for an ephemeral port). It can also
    /// dial out (worker-to-worker links) with the same credential.
    pub fn server(bind: SocketAddr, cred: &Credential) -> Result<Self, NetError> {
        Self::server_with(bind, cred, &TransportOptions::default())
    }

    /// [`Endpoint::server`] with explicit transport options.
    pub fn server_with(
        bind: SocketAddr,
        cred: &Credential,
        opts: &TransportOptions,
    ) -> Result<Self, NetError> {
        let socket = bind_udp(bind, opts)?;
        let server = server_config_with(cred, opts)?;
        let mut loopback_server = server.clone();
        loopback_server.transport_config(Arc::new(opts.loopback_transport_config()));
        let mut ep = quinn::Endpoint::new(
            opts.endpoint_config(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| NetError::Bind { addr: bind, source })?;
        let (client, loopback_client) = client_configs(cred, opts)?;
        ep.set_default_client_config(client);
        Ok(Endpoint {
            inner: ep,
            loopback_client: Some(loopback_client),
            loopback_server: Some(Arc::new(loopback_server)),
        })
    }

    /// A dial-only endpoint bound to `0.0.0.0:0` (IPv4; use [`Endpoint::client_bind`] with
    /// `[::]:0` for IPv6 targets).
    pub fn client(cred: &Credential) -> Result<Self, NetError> {
        Self::client_bind(
            SocketAddr::from(([0, 0, 0, 0], 0)),
            cred,
            &TransportOptions::default(),
        )
    }

    /// A dial-only endpoint bound to `bind`.
    pub fn client_bind(
        bind: SocketAddr,
        cred: &Credential,
        opts: &TransportOptions,
    ) -> Result<Self, NetError> {
        let socket = bind_udp(bind, opts)?;
        let mut ep = quinn::Endpoint::new(
            opts.endpoint_config(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| NetError::Bind { addr: bind, source })?;
        let (client, loopback_client) = client_configs(cred, opts)?;
        ep.set_default_client_config(client);
        Ok(Endpoint {
            inner: ep,
            loopback_client: Some(loopback_client),
            loopback_server: None,
        })
    }

    /// An endpoint over a caller-provided socket (e.g. a user-space link emulator that
    /// wraps a UDP socket). `server` decides whether it accepts connections; it can dial
    /// out either way.
    pub fn from_socket(
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        server: bool,
        cred: &Credential,
    ) -> Result<Self, NetError> {
        Self::from_socket_with(socket, server, cred, &TransportOptions::default())
    }

    /// [`Endpoint::from_socket`] with explicit transport options.
    pub fn from_socket_with(
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        server: bool,
        cred: &Credential,
        opts: &TransportOptions,
    ) -> Result<Self, NetError> {
        let server_cfg = if server {
            Some(server_config_with(cred, opts)?)
        } else {
            None
        };
        let mut ep = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            server_cfg,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        ep.set_default_client_config(client_config_with(cred, opts)?);
        Ok(Endpoint {
            inner: ep,
            loopback_client: None,
            loopback_server: None,
        })
    }

    /// The local socket address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        Ok(self.inner.local_addr()?)
    }

    /// Dials `addr` and completes the QUIC/TLS handshake within `timeout`.
    ///
    /// Errors: [`NetError::Connect`] ("node 127.0.0.1:7001 unreachable: timed out after
    /// 5s") when nothing answers, [`NetError::Handshake`] when the server's certificate is
    /// not from our cluster CA. Note: in TLS 1.3 the *client* finishes its handshake
    /// before the server has checked the client certificate, so a server refusing *our*
    /// certificate surfaces on the first stream operation (as [`NetError::Handshake`]).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Connection, NetError> {
        let connecting = match &self.loopback_client {
            Some(cfg) if addr.ip().is_loopback() => {
                self.inner.connect_with(cfg.clone(), addr, SERVER_NAME)
            }
            _ => self.inner.connect(addr, SERVER_NAME),
        }
        .map_err(|e| NetError::Connect {
            addr,
            reason: e.to_string(),
        })?;
        match tokio::time::timeout(timeout, connecting).await {
            Err(_) => Err(NetError::Connect {
                addr,
                reason: format!("timed out after {timeout:?}"),
            }),
            Ok(Err(quinn::ConnectionError::TimedOut)) => Err(NetError::Connect {
                addr,
                reason: "no answer within the idle timeout".into(),
            }),
            Ok(Err(e)) => Err(map_connection_error(&addr.to_string(), e)),
            Ok(Ok(c)) => Ok(Connection::new(c)),
        }
    }

    /// Waits for the next incoming connection and completes its handshake. `None` once
    /// the endpoint is closed. A client without a certificate from our cluster CA yields
    /// `Some(Err(NetError::Handshake { .. }))`; keep accepting after that.
    pub async fn accept(&self) -> Option<Result<Connection, NetError>> {
        let incoming = self.inner.accept().await?;
        let remote = incoming.remote_address();
        let connecting = match &self.loopback_server {
            Some(cfg) if remote.ip().is_loopback() => incoming.accept_with(Arc::clone(cfg)),
            _ => incoming.accept(),
        };
        Some(match async { connecting?.await }.await {
            Ok(c) => Ok(Connection::new(c)),
            Err(e) => Err(map_connection_error(&remote.to_string(), e)),
        })
    }

    /// Closes every connection immediately (peers see [`NetError::Closed`] with `reason`)
    /// and stops accepting.
    pub fn close(&self, reason: &str) {
        self.inner
            .close(quinn::VarInt::from_u32(0), reason.as_bytes());
    }

    /// Waits until all connections are closed and their close frames have been sent.
    pub async fn wait_idle(&self) {
        self.inner.wait_idle().await
    }

    /// The underlying quinn endpoint.
    pub fn quinn(&self) -> &quinn::Endpoint {
        &self.inner
    }
}

/// An established QUIC connection. Cheap to clone (all clones share the connection).
#[derive(Clone, Debug)]
pub struct Connection {
    inner: quinn::Connection,
    peer: Arc<str>,
}

impl Connection {
    fn new(inner: quinn::Connection) -> Self {
        let peer: Arc<str> = inner.remote_address().to_string().into();
        Connection { inner, peer }
    }

    /// Names the peer in this handle's errors, e.g. `"rank 2 (127.0.0.1:7001)"` (the
    /// default is the remote address).
    pub fn with_peer_name(mut self, name: &str) -> Self {
        self.peer = name.into();
        self
    }

    /// The name errors use for the peer.
    pub fn peer_name(&self) -> &str {
        &self.peer
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// The role in the peer's certificate (verified against the cluster CA during the
    /// handshake): None when its certificate predates roles.
    pub fn peer_role(&self) -> Result<Option<super::tls::Role>, NetError> {
        let certs = self
            .inner
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .ok_or_else(|| NetError::Tls(format!("{} presented no certificate", self.peer)))?;
        let leaf = certs
            .first()
            .ok_or_else(|| NetError::Tls(format!("{} presented no certificate", self.peer)))?;
        super::tls::certificate_role(leaf)
    }

    /// Current RTT estimate.
    pub fn rtt(&self) -> Duration {
        self.inner.rtt()
    }

    /// Opens a bidirectional stream and writes a [`FrameKind::Tag`] frame holding `tag`.
    ///
    /// quinn makes a stream visible to the peer only once the opener writes to it; the
    /// tag frame is that first write, so the peer's [`Connection::accept_stream`] returns
    /// right away (and learns what the stream is for). Open one stream per purpose and
    /// keep it: opening a stream per message costs latency.
    pub async fn open_stream(&self, tag: u8) -> Result<Stream, NetError> {
        let (mut send, recv) = self
            .inner
            .open_bi()
            .await
            .map_err(|e| map_connection_error(&self.peer, e))?;
        write_frame(&mut send, FrameKind::Tag, &[tag])
            .await
            .map_err(|e| e.with_peer(&self.peer))?;
        Ok(Stream {
            send,
            recv,
            tag,
            peer: self.peer.clone(),
        })
    }

    /// Accepts the next bidirectional stream the peer opened with
    /// [`Connection::open_stream`] and reads its tag.
    pub async fn accept_stream(&self) -> Result<Stream, NetError> {
        let (send, mut recv) = self
            .inner
            .accept_bi()
            .await
            .map_err(|e| map_connection_error(&self.peer, e))?;
        let mut buf = Vec::with_capacity(1);
        read_frame_of(&mut recv, FrameKind::Tag, &mut buf, 1)
            .await
            .map_err(|e| e.with_peer(&self.peer))?;
        let tag = *buf
            .first()
            .ok_or_else(|| NetError::Protocol("empty stream tag".into()).with_peer(&self.peer))?;
        Ok(Stream {
            send,
            recv,
            tag,
            peer: self.peer.clone(),
        })
    }

    /// Closes the connection; the peer sees [`NetError::Closed`] with `reason`.
    pub fn close(&self, reason: &str) {
        self.inner
            .close(quinn::VarInt::from_u32(0), reason.as_bytes());
    }

    /// Resolves when the connection is gone, with the reason.
    pub async fn closed(&self) -> NetError {
        map_connection_error(&self.peer, self.inner.closed().await)
    }

    /// The underlying quinn connection.
    pub fn quinn(&self) -> &quinn::Connection {
        &self.inner
    }
}

/// One bidirectional QUIC stream (send and receive halves), with the tag it was opened
/// with. The halves are public so they can be driven concurrently.
#[derive(Debug)]
pub struct Stream {
    /// Sending half.
    pub send: quinn::SendStream,
    /// Receiving half.
    pub recv: quinn::RecvStream,
    /// The tag given to [`Connection::open_stream`].
    pub tag: u8,
    /// The peer name used in errors.
    pub peer: Arc<str>,
}

impl Stream {
    /// Sends a control message (see [`super::wire::send_msg`]); errors name the peer.
    pub async fn send_msg<T: serde::Serialize>(&mut self, msg: &T) -> Result<(), NetError> {
        super::wire::send_msg(&mut self.send, msg)
            .await
            .map_err(|e| e.with_peer(&self.peer))
    }

    /// Receives a control message of at most `max` bytes; errors name the peer.
    pub async fn recv_msg<T: serde::de::DeserializeOwned>(
        &mut self,
        max: usize,
    ) -> Result<T, NetError> {
        super::wire::recv_msg(&mut self.recv, max)
            .await
            .map_err(|e| e.with_peer(&self.peer))
    }
}
