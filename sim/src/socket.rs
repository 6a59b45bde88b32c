//! [`EmulatedSocket`]: a `quinn::AsyncUdpSocket` whose egress crosses emulated links.
//!
//! Receiving is the real socket's. Every outgoing datagram is queued on the
//! [`DelayLine`] FIFO of its destination address and sent on the real socket by
//! the line's timing thread when due. `try_send` never blocks: a full queue
//! drops the datagram (drop-tail), as a router would, and QUIC's congestion
//! control reacts to it.

use std::{
    collections::HashMap,
    fmt,
    io::{self, IoSliceMut},
    net::{SocketAddr, UdpSocket},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use quinn::{
    udp::{RecvMeta, Transmit},
    AsyncUdpSocket, Runtime, UdpPoller,
};

use crate::{
    delay::{DelayLine, LinkStats, Sink},
    link::LinkSpec,
    topology::Topology,
};

/// Decides the link a datagram to a destination address crosses. Called once per datagram.
pub type LinkFor = Arc<dyn Fn(SocketAddr) -> LinkSpec + Send + Sync>;

/// A [`LinkFor`] that gives every destination the same link.
pub fn uniform_link(spec: LinkSpec) -> LinkFor {
    Arc::new(move |_| spec)
}

/// A [`LinkFor`] for node `me` of `topology`: a destination found in `peers`
/// (address → node index) gets `topology.link(me, index)`; any other address
/// gets the topology's default link.
pub fn topology_link(
    topology: Arc<Topology>,
    me: usize,
    peers: HashMap<SocketAddr, usize>,
) -> LinkFor {
    Arc::new(move |addr| match peers.get(&addr) {
        Some(&to) => topology.link(me, to),
        None => topology.default_link(),
    })
}

/// Sends due datagrams on a (non-blocking) clone of the real socket.
pub(crate) struct UdpSink {
    sock: UdpSocket,
    v6: bool,
}

impl UdpSink {
    /// Send through `sock` (a clone of the socket whose address the peer sees).
    pub(crate) fn new(sock: UdpSocket) -> io::Result<Self> {
        let v6 = sock.local_addr()?.is_ipv6();
        Ok(Self { sock, v6 })
    }
}

impl Sink for UdpSink {
    fn deliver(&self, dest: SocketAddr, data: &[u8]) -> bool {
        let dest = match dest {
            SocketAddr::V4(a) if self.v6 => {
                SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port())
            }
            d => d,
        };
        // The socket is non-blocking (quinn set it so); retry briefly when the kernel buffer is full.
        for attempt in 0..2000 {
            match self.sock.send_to(data, dest) {
                Ok(_) => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if attempt < 100 {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(Duration::from_micros(10));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        false
    }
}

/// A UDP socket for quinn whose outgoing datagrams cross emulated links.
pub struct EmulatedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    line: DelayLine,
    sink: Arc<dyn Sink>,
    link_for: LinkFor,
}

impl fmt::Debug for EmulatedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatedSocket")
            .field("inner", &self.inner)
            .field("line", &self.line)
            .finish()
    }
}

impl EmulatedSocket {
    /// Wrap an already-bound std socket. Must be called inside a tokio runtime.
    pub fn from_std(socket: UdpSocket, link_for: LinkFor) -> io::Result<Self> {
        let v6 = socket.local_addr()?.is_ipv6();
        let clone = socket.try_clone()?;
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        // quinn made the shared file description non-blocking; keep the clone consistent.
        clone.set_nonblocking(true)?;
        let name = format!("tpi-sim-link {}", inner.local_addr()?);
        Ok(Self {
            inner,
            line: DelayLine::new(&name)?,
            sink: Arc::new(UdpSink { sock: clone, v6 }),
            link_for,
        })
    }

    /// The counters of this socket's egress.
    pub fn stats(&self) -> LinkStats {
        self.line.stats()
    }
}

/// Bind `bind` and wrap it in an [`EmulatedSocket`]; pass the result to
/// `quinn::Endpoint::new_with_abstract_socket`. Must be called inside a tokio runtime.
pub fn emulated_socket(bind: SocketAddr, link_for: LinkFor) -> io::Result<Arc<dyn AsyncUdpSocket>> {
    Ok(emulated_socket_with_stats(bind, link_for)?.0)
}

/// Like [`emulated_socket`], and also return a handle on its counters.
pub fn emulated_socket_with_stats(
    bind: SocketAddr,
    link_for: LinkFor,
) -> io::Result<(Arc<dyn AsyncUdpSocket>, LinkStats)> {
    let sock = EmulatedSocket::from_std(UdpSocket::bind(bind)?, link_for)?;
    let stats = sock.stats();
    Ok((Arc::new(sock), stats))
}

/// The emulated socket never reports back-pressure: a full link queue drops instead.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for EmulatedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let dest = transmit.destination;
        let spec = (self.link_for)(dest);
        let seg = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for chunk in transmit.contents.chunks(seg) {
            self.line
                .submit(dest, &spec, dest, chunk.to_vec(), &self.sink);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
