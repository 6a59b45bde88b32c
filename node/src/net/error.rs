//! [`NetError`], the networking layer's one error type, and the mapping of quinn's errors
//! (and of the `std::io::Error`s that wrap them) onto it.

use std::net::SocketAddr;
use std::time::Duration;

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

pub(crate) fn map_read_error(e: quinn::ReadError) -> NetError {
    match e {
        quinn::ReadError::ConnectionLost(c) => map_connection_error(UNKNOWN_PEER, c),
        other => NetError::Closed {
            peer: UNKNOWN_PEER.into(),
            reason: format!("stream read failed: {other}"),
        },
    }
}

/// Maps an I/O error from a stream read or write: quinn's stream errors come wrapped in
/// `std::io::Error` through the `AsyncRead`/`AsyncWrite` impls and are unwrapped here; a
/// stream that ends inside a frame is [`NetError::Closed`].
pub(crate) fn map_io_error(e: std::io::Error) -> NetError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return NetError::Closed {
            peer: UNKNOWN_PEER.into(),
            reason: "stream ended by the peer inside a frame".into(),
        };
    }
    if e.get_ref().is_some_and(|i| i.is::<quinn::ReadError>()) {
        let inner = e.into_inner().expect("checked above");
        return map_read_error(*inner.downcast::<quinn::ReadError>().expect("checked above"));
    }
    if e.get_ref().is_some_and(|i| i.is::<quinn::WriteError>()) {
        let inner = e.into_inner().expect("checked above");
        return map_write_error(
            *inner
                .downcast::<quinn::WriteError>()
                .expect("checked above"),
        );
    }
    NetError::Closed {
        peer: UNKNOWN_PEER.into(),
        reason: format!("stream I/O failed: {e}"),
    }
}
