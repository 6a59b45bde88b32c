//! Real-socket tests of the tpi networking layer over loopback QUIC.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use tpi_node::net::collective::{establish_links, star_reference, tree_reference};
use tpi_node::net::frame::{read_frame, FrameKind};
use tpi_node::net::{Algo, Credential, Endpoint, Group, NetError, WireDType};

/// Guards waits that must end on their own (timeouts, errors): far longer than any of them
/// takes, so a busy machine cannot fail a test, and a hang still does.
const HANG: Duration = Duration::from_secs(30);

const LOOPBACK: ([u8; 4], u16) = ([127, 0, 0, 1], 0);
const T: Duration = Duration::from_secs(5);

fn parts(world: usize, n: usize) -> Vec<Vec<f32>> {
    (0..world)
        .map(|r| {
            (0..n)
                .map(|i| 0.5 + ((i * 7 + r * 13) % 29) as f32 * 0.37 + r as f32 * 1e-3)
                .collect()
        })
        .collect()
}

async fn run_cluster(
    world: usize,
    algo: Algo,
    dtype: WireDType,
    inputs: &[Vec<f32>],
) -> Vec<Vec<f32>> {
    let (_ca, cred) = Credential::ephemeral_cluster().unwrap();
    let eps: Vec<Endpoint> = (0..world)
        .map(|_| Endpoint::server(LOOPBACK.into(), &cred).unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = eps.iter().map(|e| e.local_addr().unwrap()).collect();
    let mut tasks = Vec::new();
    for (rank, ep) in eps.into_iter().enumerate() {
        let addrs = addrs.clone();
        let mut x = inputs[rank].clone();
        tasks.push(tokio::spawn(async move {
            let links = establish_links(&ep, rank, world, algo, &addrs, T)
                .await
                .unwrap();
            let mut g = Group::new(rank, world, algo, dtype, links).unwrap();
            let mut y = x.clone();
            g.allreduce(&mut y).await.unwrap();
            let st = g.allreduce(&mut x).await.unwrap();
            assert_eq!(x, y);
            assert!(st.bytes_sent > 0 && st.bytes_recv > 0 && st.wait <= st.total);
            (x, g, ep)
        }));
    }
    let mut out = Vec::new();
    let mut keep = Vec::new();
    for t in tasks {
        let (x, g, ep) = t.await.unwrap();
        out.push(x);
        keep.push((g, ep));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allreduce_over_quic_all_algos() {
    for world in 2..=5 {
        for algo in Algo::ALL {
            // 9001 and 20001 elements span several datagrams, so elements straddle chunks.
            for (dtype, n) in [
                (WireDType::F32, 1000),
                (WireDType::F16, 37),
                (WireDType::F32, 3),
                (WireDType::F32, 9001),
                (WireDType::F16, 20001),
            ] {
                let inputs = parts(world, n);
                let res = run_cluster(world, algo, dtype, &inputs).await;
                for r in 1..world {
                    assert_eq!(res[r], res[0], "{algo} {dtype} w={world} rank {r} differs");
                    let (a, b): (Vec<u32>, Vec<u32>) = res[r]
                        .iter()
                        .zip(&res[0])
                        .map(|(a, b)| (a.to_bits(), b.to_bits()))
                        .unzip();
                    assert_eq!(a, b);
                }
                let reference = match algo {
                    Algo::Star => star_reference(&inputs, dtype),
                    Algo::Tree => tree_reference(&inputs, dtype),
                    Algo::Ring => star_reference(&inputs, WireDType::F32),
                    Algo::Mesh | Algo::Rsag => star_reference(&inputs, dtype),
                };
                let tol = match (algo, dtype) {
                    (Algo::Ring, WireDType::F32) => 1e-6,
                    (Algo::Ring, WireDType::F16) => 4e-3,
                    _ => 0.0,
                };
                for (a, b) in res[0].iter().zip(&reference) {
                    assert!(
                        (a - b).abs() <= tol * b.abs(),
                        "{algo} {dtype} w={world}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn foreign_ca_is_refused() {
    let (_ca, cred) = Credential::ephemeral_cluster().unwrap();
    let (_other_ca, stranger) = Credential::ephemeral_cluster().unwrap();
    let server = Endpoint::server(LOOPBACK.into(), &cred).unwrap();
    let addr = server.local_addr().unwrap();

    // A client whose certificate comes from another CA: the server refuses it.
    let accept = tokio::spawn({
        let server = server.clone();
        async move { server.accept().await }
    });
    let client = Endpoint::client(&stranger).unwrap();
    // The client also distrusts the server (other CA), so the dial itself fails.
    let err = client.connect(addr, T).await.unwrap_err();
    assert!(matches!(err, NetError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    let server_side = tokio::time::timeout(T, accept)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(server_side.is_err());

    // A client that trusts our CA but presents a foreign certificate: the server's
    // verifier refuses it; the client learns on its first stream operation.
    let half = Credential {
        ca_pem: cred.ca_pem.clone(),
        ..stranger.clone()
    };
    let client = Endpoint::client(&half).unwrap();
    let accept = tokio::spawn({
        let server = server.clone();
        async move { server.accept().await }
    });
    let res = async {
        let conn = client.connect(addr, T).await?;
        let mut s = conn.open_stream(1).await?;
        let mut buf = Vec::new();
        read_frame(&mut s.recv, &mut buf, 16)
            .await
            .map_err(|e| e.with_peer(conn.peer_name()))?;
        Ok::<_, NetError>(())
    }
    .await;
    let err = res.unwrap_err();
    assert!(matches!(err.root(), NetError::Handshake { .. }), "{err}");
    let server_err = tokio::time::timeout(T, accept)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(server_err, NetError::Handshake { .. }),
        "{server_err}"
    );
    eprintln!("client saw: {err}\nserver saw: {server_err}");
}

#[tokio::test]
async fn unreachable_node_is_named() {
    let (_ca, cred) = Credential::ephemeral_cluster().unwrap();
    // A bound but silent UDP socket: nobody answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let client = Endpoint::client(&cred).unwrap();
    // The 500 ms connect timeout ends the attempt; the guard only catches a hang.
    let err = tokio::time::timeout(HANG, client.connect(addr, Duration::from_millis(500)))
        .await
        .expect("connect to a silent address hung")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&addr.to_string()) && msg.contains("unreachable"),
        "{msg}"
    );
}

#[tokio::test]
async fn oversized_and_garbage_frames_are_refused() {
    let (_ca, cred) = Credential::ephemeral_cluster().unwrap();
    let server = Endpoint::server(LOOPBACK.into(), &cred).unwrap();
    let addr = server.local_addr().unwrap();
    let client = Endpoint::client(&cred).unwrap();
    // quinn servers only handshake connections that are being accepted: run both sides.
    let (conn, sconn) = tokio::join!(client.connect(addr, T), server.accept());
    let (conn, sconn) = (conn.unwrap(), sconn.unwrap().unwrap());

    // Raw stream: a tag frame, then a frame claiming 2 GiB, then garbage.
    let (mut send, _recv) = conn.quinn().open_bi().await.unwrap();
    send.write_all(&[1, 0, 0, 0, FrameKind::Tag as u8, 7])
        .await
        .unwrap();
    send.write_all(&[0xff, 0xff, 0xff, 0x7f, FrameKind::Tensor as u8, 1, 2, 3])
        .await
        .unwrap();
    let mut s = sconn.accept_stream().await.unwrap();
    assert_eq!(s.tag, 7);
    let mut buf = Vec::new();
    let err = read_frame(&mut s.recv, &mut buf, 1 << 20)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            NetError::FrameTooLarge {
                len: 0x7fff_ffff,
                max: 1_048_576
            }
        ),
        "{err}"
    );
    assert_eq!(
        buf.capacity(),
        0,
        "nothing may be allocated for a refused frame"
    );

    // An unknown frame kind.
    let (mut send, _recv) = conn.quinn().open_bi().await.unwrap();
    send.write_all(&[1, 0, 0, 0, 0x99, 0]).await.unwrap();
    let err = sconn.accept_stream().await.unwrap_err();
    assert!(matches!(err.root(), NetError::Protocol(_)), "{err}");

    // A stream tag frame longer than 1 byte.
    let (mut send, _recv) = conn.quinn().open_bi().await.unwrap();
    send.write_all(&[200, 0, 0, 0, FrameKind::Tag as u8])
        .await
        .unwrap();
    let err = sconn.accept_stream().await.unwrap_err();
    assert!(
        matches!(err.root(), NetError::FrameTooLarge { len: 200, max: 1 }),
        "{err}"
    );
}

#[tokio::test]
async fn control_messages_roundtrip_over_a_stream() {
    let (_ca, cred) = Credential::ephemeral_cluster().unwrap();
    let server = Endpoint::server(LOOPBACK.into(), &cred).unwrap();
    let client = Endpoint::client(&cred).unwrap();
    let (conn, sconn) = tokio::join!(
        client.connect(server.local_addr().unwrap(), T),
        server.accept()
    );
    let (conn, sconn) = (conn.unwrap(), sconn.unwrap().unwrap());
    let mut a = conn.open_stream(3).await.unwrap();
    let mut b = sconn.accept_stream().await.unwrap();
    assert_eq!(b.tag, 3);
    a.send_msg(&(42u32, "hello".to_string(), vec![1.5f32; 3]))
        .await
        .unwrap();
    let got: (u32, String, Vec<f32>) = b.recv_msg(1024).await.unwrap();
    assert_eq!(got, (42, "hello".into(), vec![1.5; 3]));
    b.send_msg(&7u64).await.unwrap();
    assert_eq!(a.recv_msg::<u64>(16).await.unwrap(), 7);
    // A message over the reader's limit is refused.
    a.send_msg(&vec![0u8; 100]).await.unwrap();
    let err = b.recv_msg::<Vec<u8>>(50).await.unwrap_err();
    assert!(
        matches!(err.root(), NetError::FrameTooLarge { .. }),
        "{err}"
    );
}

/// Builds a 3-rank star whose rank 2 runs on `sock2`; returns the hub's group, rank 1's
/// group task handle and rank 2's group + endpoint.
async fn star3(
    cred: &Credential,
    sock2: Option<Arc<dyn AsyncUdpSocket>>,
) -> (Group, tokio::task::JoinHandle<()>, Group, Endpoint) {
    let ep0 = Endpoint::server(LOOPBACK.into(), cred).unwrap();
    let ep1 = Endpoint::server(LOOPBACK.into(), cred).unwrap();
    let ep2 = match sock2 {
        Some(s) => Endpoint::from_socket(s, true, cred).unwrap(),
        None => Endpoint::server(LOOPBACK.into(), cred).unwrap(),
    };
    let addrs: Vec<SocketAddr> = [&ep0, &ep1, &ep2]
        .iter()
        .map(|e| e.local_addr().unwrap())
        .collect();
    let (l0, l1, l2) = tokio::join!(
        establish_links(&ep0, 0, 3, Algo::Star, &addrs, T),
        establish_links(&ep1, 1, 3, Algo::Star, &addrs, T),
        establish_links(&ep2, 2, 3, Algo::Star, &addrs, T),
    );
    let mut g0 = Group::new(0, 3, Algo::Star, WireDType::F32, l0.unwrap()).unwrap();
    let mut g1 = Group::new(1, 3, Algo::Star, WireDType::F32, l1.unwrap()).unwrap();
    let mut g2 = Group::new(2, 3, Algo::Star, WireDType::F32, l2.unwrap()).unwrap();
    // One healthy round.
    let (mut x0, mut x1, mut x2) = ([1.0f32; 8], [2.0f32; 8], [3.0f32; 8]);
    let (a, b, c) = tokio::join!(
        g0.allreduce(&mut x0),
        g1.allreduce(&mut x1),
        g2.allreduce(&mut x2)
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
    // Rank 1 keeps participating (its result is irrelevant) and keeps its endpoint alive.
    let h1 = tokio::spawn(async move {
        let _ = g1.allreduce(&mut [2.0; 8]).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(ep1);
    });
    (g0, h1, g2, ep2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_peer_is_reported_quickly() {
    let (_ca, cred) = Credential::ephemeral_cluster().unwrap();
    let (mut g0, h1, g2, ep2) = star3(&cred, None).await;
    let rank2_addr = ep2.local_addr().unwrap();
    // Rank 2 "dies": its group and endpoint go away mid-allreduce.
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(g2);
        drop(ep2);
    });
    let t = Instant::now();
    let err = tokio::time::timeout(HANG, g0.allreduce(&mut [1.0; 8]))
        .await
        .expect("the allreduce hung on a dead peer")
        .unwrap_err();
    let took = t.elapsed();
    let msg = err.to_string();
    eprintln!("hub saw after {took:?}: {msg}");
    assert!(
        msg.contains("rank 2") && msg.contains(&rank2_addr.port().to_string()),
        "{msg}"
    );
    killer.await.unwrap();
    h1.abort();
}

/// A UDP socket that can be switched to silently drop everything (a peer that vanished
/// without closing: power loss, cable pulled, `kill -9` of a whole machine).
#[derive(Debug)]
struct Blackhole {
    inner: Arc<dyn AsyncUdpSocket>,
    dead: Arc<AtomicBool>,
}

impl AsyncUdpSocket for Blackhole {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }
    fn try_send(&self, transmit: &Transmit) -> std::io::Result<()> {
        if self.dead.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.inner.try_send(transmit)
    }
    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(_)) if self.dead.load(Ordering::Relaxed) => continue,
                other => return other,
            }
        }
    }
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }
    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }
    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_times_out_within_two_seconds() {
    let (_ca, cred) = Credential::ephemeral_cluster().unwrap();
    let dead = Arc::new(AtomicBool::new(false));
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let inner = quinn::TokioRuntime.wrap_udp_socket(udp).unwrap();
    let sock: Arc<dyn AsyncUdpSocket> = Arc::new(Blackhole {
        inner,
        dead: dead.clone(),
    });
    let (mut g0, h1, g2, ep2) = star3(&cred, Some(sock)).await;
    dead.store(true, Ordering::Relaxed);
    let t = Instant::now();
    let err = tokio::time::timeout(HANG, g0.allreduce(&mut [1.0; 8]))
        .await
        .expect("the allreduce hung on a silent peer")
        .unwrap_err();
    let took = t.elapsed();
    let msg = err.to_string();
    // The idle timeout (named in the message) ends it, not the guard.
    eprintln!("hub saw after {took:?}: {msg}");
    assert!(
        msg.contains("rank 2") && msg.contains("idle timeout"),
        "{msg}"
    );
    drop((g2, ep2));
    h1.abort();
}

/// With [`Driven`] runtimes, nothing drives QUIC between waits except the keeper thread:
/// a connection left alone for twice the idle timeout (1.5 s) must still be up, because the
/// keepers kept sending keep-alives, and a send after the pause must arrive.
#[test]
fn driven_connections_survive_long_pauses() {
    use tpi_node::net::driven::Driven;
    let (_ca, cred) = Credential::ephemeral_cluster().unwrap();
    let (a, b) = (Driven::new().unwrap(), Driven::new().unwrap());
    let server = {
        let _g = a.handle().enter();
        Endpoint::server(LOOPBACK.into(), &cred).unwrap()
    };
    let client = {
        let _g = b.handle().enter();
        Endpoint::client(&cred).unwrap()
    };
    let addr = server.local_addr().unwrap();
    // The server accepts in a task, driven by `a`'s keeper while this thread dials.
    let accepted = a.handle().spawn(async move {
        let c = server.accept().await.unwrap().unwrap();
        let s = c.accept_stream().await.unwrap();
        (c, s)
    });
    let (conn_b, mut s_b) = b.block_on(async {
        let c = client.connect(addr, T).await.unwrap();
        let mut s = c.open_stream(7).await.unwrap();
        s.send_msg(&1u32).await.unwrap();
        (c, s)
    });
    let (conn_a, mut s_a) = a.block_on(accepted).unwrap();
    assert_eq!(a.block_on(s_a.recv_msg::<u32>(64)).unwrap(), 1);
    // Like a long prefill: no thread waits on either runtime for 3 s.
    std::thread::sleep(Duration::from_secs(3));
    b.block_on(s_b.send_msg(&42u32)).unwrap();
    let got: u32 = a.block_on(s_a.recv_msg(64)).unwrap();
    assert_eq!(got, 42);
    drop((conn_a, conn_b));
}
