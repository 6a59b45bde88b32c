//! A UDP/TCP relay that applies a [`LinkSpec`] in each direction, for third-party programs.
//!
//! - UDP: every client address gets its own upstream socket, so the target sees one
//!   peer per client; datagrams cross the link client→target and target→client.
//! - TCP: each accepted connection is joined to a fresh connection to the target;
//!   bytes are read in chunks and cross a paced, delayed FIFO each way. Loss does
//!   not apply to TCP (a dropped chunk would corrupt the stream); a full queue
//!   applies back-pressure instead of dropping.

use std::{collections::HashMap, io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{tcp::OwnedReadHalf, tcp::OwnedWriteHalf, TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    delay::{DelayLine, Sink, Verdict},
    link::LinkSpec,
    socket::UdpSink,
};

/// Which transport a relay forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Datagrams, per client address.
    Udp,
    /// Byte streams, per accepted connection.
    Tcp,
}

/// A running relay: its bound address and the task serving it (abort it to stop).
#[derive(Debug)]
pub struct Relay {
    /// The address clients connect to.
    pub local_addr: SocketAddr,
    /// The serving task.
    pub task: JoinHandle<io::Result<()>>,
}

/// Bind `listen` and relay to `to` over `link` (applied in both directions).
/// Must be called inside a tokio runtime.
pub async fn spawn_relay(
    transport: Transport,
    listen: SocketAddr,
    to: SocketAddr,
    link: LinkSpec,
) -> io::Result<Relay> {
    match transport {
        Transport::Udp => spawn_udp(listen, to, link),
        Transport::Tcp => spawn_tcp(listen, to, link).await,
    }
}

fn tokio_udp(bind: SocketAddr) -> io::Result<(UdpSocket, Arc<dyn Sink>)> {
    let std = std::net::UdpSocket::bind(bind)?;
    std.set_nonblocking(true)?;
    let sink: Arc<dyn Sink> = Arc::new(UdpSink::new(std.try_clone()?)?);
    Ok((UdpSocket::from_std(std)?, sink))
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    }
}

fn spawn_udp(listen: SocketAddr, to: SocketAddr, link: LinkSpec) -> io::Result<Relay> {
    let (sock, listen_sink) = tokio_udp(listen)?;
    let local_addr = sock.local_addr()?;
    let up = Arc::new(DelayLine::new("tpi-sim-relay-up")?);
    let down = Arc::new(DelayLine::new("tpi-sim-relay-down")?);
    let task = tokio::spawn(async move {
        let sock = Arc::new(sock);
        let mut clients: HashMap<SocketAddr, Arc<dyn Sink>> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, client) = sock.recv_from(&mut buf).await?;
            let sink = match clients.get(&client) {
                Some(s) => s.clone(),
                None => {
                    let (upstream, up_sink) = tokio_udp(unspecified_for(to))?;
                    upstream.connect(to).await?;
                    let (down, listen_sink) = (down.clone(), listen_sink.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = upstream.recv(&mut buf).await {
                            down.submit(client, &link, client, buf[..n].to_vec(), &listen_sink);
                        }
                    });
                    clients.insert(client, up_sink.clone());
                    up_sink
                }
            };
            up.submit(client, &link, to, buf[..n].to_vec(), &sink);
        }
    });
    Ok(Relay { local_addr, task })
}

async fn spawn_tcp(listen: SocketAddr, to: SocketAddr, link: LinkSpec) -> io::Result<Relay> {
    let listener = TcpListener::bind(listen).await?;
    let local_addr = listener.local_addr()?;
    let up = Arc::new(DelayLine::new("tpi-sim-relay-up")?);
    let down = Arc::new(DelayLine::new("tpi-sim-relay-down")?);
    let task = tokio::spawn(async move {
        loop {
            let (client, peer) = listener.accept().await?;
            let (up, down) = (up.clone(), down.clone());
            tokio::spawn(async move {
                let Ok(target) = TcpStream::connect(to).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = target.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (tr, tw) = target.into_split();
                tokio::spawn(pump(cr, tw, up, peer, link));
                tokio::spawn(pump(tr, cw, down, peer, link));
            });
        }
    });
    Ok(Relay { local_addr, task })
}

/// Hands delivered chunks to a writer task; an empty chunk means end of stream.
struct ChanSink(mpsc::UnboundedSender<Vec<u8>>);

impl Sink for ChanSink {
    fn deliver(&self, _dest: SocketAddr, data: &[u8]) -> bool {
        self.0.send(data.to_vec()).is_ok()
    }
}

/// How long until a link with `backlog` still to serialise has room for `len` more bytes
/// in its queue (at least 50 µs, so a retry never spins).
fn room_wait(backlog: Duration, len: usize, link: &LinkSpec) -> Duration {
    let floor = Duration::from_micros(50);
    let Some(bps) = link.bandwidth_bps else {
        return floor;
    };
    let room = link.queue_bytes.saturating_sub(len) as f64 * 8.0 / bps as f64;
    backlog
        .saturating_sub(Duration::from_secs_f64(room))
        .max(floor)
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    line: Arc<DelayLine>,
    key: SocketAddr,
    link: LinkSpec,
) {
    let link = LinkSpec { loss: 0.0, ..link };
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let sink: Arc<dyn Sink> = Arc::new(ChanSink(tx));
    let writer = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if chunk.is_empty() {
                break;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    // Reads never exceed the queue, so every chunk fits once the link has drained enough.
    let mut buf = vec![0u8; link.queue_bytes.clamp(1, 16 * 1024)];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        // A full queue is back-pressure: wait for the link to drain and submit again, so
        // no byte is ever lost. The empty end-of-stream marker crosses the line too, in order.
        loop {
            match line.submit(key, &link, key, buf[..n].to_vec(), &sink) {
                Verdict::Scheduled(_) => break,
                // Loss is off for TCP, so only a full queue refuses a chunk.
                Verdict::QueueFull | Verdict::Lost => {
                    let wait = room_wait(line.backlog(key), n, &link);
                    tokio::time::sleep(wait).await;
                }
            }
        }
        if n == 0 {
            break;
        }
    }
    let _ = writer.await;
}
