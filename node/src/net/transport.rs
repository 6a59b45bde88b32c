//! QUIC endpoints, connections and streams (quinn): the top of the transport stack.
//!
//! All constructors that create a quinn endpoint must run inside a tokio runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::error::{map_connection_error, NetError};
use super::frame::{read_frame_of, write_frame, FrameKind};
use super::options::TransportOptions;
use super::tls::{client_config_with, server_config_with, Credential, SERVER_NAME};

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
    /// Client config for loopback peers (large datagrams).
    loopback_client: Option<quinn::ClientConfig>,
    /// Server config for loopback peers; `None` for dial-only endpoints.
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

/// A copy of `server` with the loopback transport tuning, for incoming loopback peers.
fn loopback_server_config(
    server: &quinn::ServerConfig,
    opts: &TransportOptions,
) -> Arc<quinn::ServerConfig> {
    let mut lo = server.clone();
    lo.transport_config(Arc::new(opts.loopback_transport_config()));
    Arc::new(lo)
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
        let loopback_server = loopback_server_config(&server, opts);
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
            loopback_server: Some(loopback_server),
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
        // The same per-peer tuning as a real socket's endpoint: loopback peers (all of an
        // emulated cluster's, bar network namespaces) get the large datagrams and sparse
        // ACKs, so `--link 0ms` costs what loopback does and the emulator adds only its links.
        let server_cfg = if server {
            Some(server_config_with(cred, opts)?)
        } else {
            None
        };
        let loopback_server = server_cfg.as_ref().map(|c| loopback_server_config(c, opts));
        let mut ep = quinn::Endpoint::new_with_abstract_socket(
            opts.endpoint_config(),
            server_cfg,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let (client, loopback_client) = client_configs(cred, opts)?;
        ep.set_default_client_config(client);
        Ok(Endpoint {
            inner: ep,
            loopback_client: Some(loopback_client),
            loopback_server,
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
