//! The UDP and TCP relays add the configured latency each way, and the TCP relay never
//! loses a byte, however full its queue.

use std::time::Instant;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};
use tpi_sim::{spawn_relay, LinkSpec, Transport};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_and_tcp_relays_add_latency_each_way() {
    let link: LinkSpec = "5ms,100mbit".parse().unwrap();

    // UDP echo target.
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let relay = spawn_relay(
        Transport::Udp,
        "127.0.0.1:0".parse().unwrap(),
        echo_addr,
        link,
    )
    .await
    .unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(relay.local_addr).await.unwrap();
    let mut rtts = Vec::new();
    let mut buf = [0u8; 2048];
    for i in 0..15u8 {
        let t = Instant::now();
        client.send(&[i; 100]).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &[i; 100]);
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let udp = median(rtts);
    eprintln!("UDP relay round trip at 5 ms each way: median {udp:.3} ms");
    // Two 5 ms one-way trips at the least; load can only add.
    assert!(udp >= 10.0, "{udp}");

    // TCP echo target.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let relay = spawn_relay(Transport::Tcp, "127.0.0.1:0".parse().unwrap(), target, link)
        .await
        .unwrap();
    let mut s = TcpStream::connect(relay.local_addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut rtts = Vec::new();
    for i in 0..15u8 {
        let t = Instant::now();
        s.write_all(&[i; 10]).await.unwrap();
        let mut got = [0u8; 10];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [i; 10]);
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let tcp = median(rtts);
    eprintln!("TCP relay round trip at 5 ms each way: median {tcp:.3} ms");
    assert!(tcp >= 10.0, "{tcp}");

    // A bulk transfer is paced at the link rate: 1 MB at 100 Mbit/s ≈ 84 ms + 10 ms.
    let t = Instant::now();
    let data = vec![3u8; 1 << 20];
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move { w.write_all(&data).await.unwrap() });
    let mut got = vec![0u8; 1 << 20];
    r.read_exact(&mut got).await.unwrap();
    writer.await.unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!("TCP relay 1 MiB echo at 100 Mbit/s: {ms:.1} ms");
    assert!(ms > 80.0, "{ms}");
}

/// 100 MB through a TCP relay whose link is slower than loopback and whose queue is small:
/// a full queue must hold the sender back, never drop a chunk. Every byte is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_relay_delivers_every_byte_through_a_full_queue() {
    const TOTAL: usize = 100 << 20;
    let link: LinkSpec = "0.2ms,4gbit,queue=32kb".parse().unwrap();
    let pattern = |i: usize| (i.wrapping_mul(2654435761) >> 13) as u8;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let sink = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut at = 0usize;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, pattern(at + k), "byte {} differs", at + k);
            }
            at += n;
        }
        at
    });
    let relay = spawn_relay(Transport::Tcp, "127.0.0.1:0".parse().unwrap(), target, link)
        .await
        .unwrap();
    let mut s = TcpStream::connect(relay.local_addr).await.unwrap();
    let mut sent = 0;
    while sent < TOTAL {
        let part: Vec<u8> = (sent..sent + (1 << 20)).map(pattern).collect();
        s.write_all(&part).await.unwrap();
        sent += part.len();
    }
    s.shutdown().await.unwrap();
    let got = sink.await.unwrap();
    assert_eq!(got, TOTAL, "the relay delivered {got} of {TOTAL} bytes");
}
