//! Loopback allreduce latency: median / p99 at rank 0 for N = 2..8 ranks ×
//! star / ring / tree × 2 KiB / 32 KiB f32 payloads, each rank on its own QUIC endpoint.
//!
//! `cargo run --release -p tpi-node --example allreduce_bench [iters] [N,N,...] [algo,...] [bytes,...]`

use tpi_node::net::bench::{allreduce_latency, median_p99};
use tpi_node::net::{Algo, WireDType};

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iters: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(300);
    let worlds: Vec<usize> = match std::env::args().nth(2) {
        Some(list) => list
            .split(',')
            .map(|n| n.parse())
            .collect::<Result<_, _>>()?,
        None => (2..=8).collect(),
    };
    let algos: Vec<Algo> = match std::env::args().nth(3) {
        Some(list) => list
            .split(',')
            .map(|a| a.parse())
            .collect::<Result<_, _>>()?,
        None => Algo::ALL.to_vec(),
    };
    let sizes: Vec<usize> = match std::env::args().nth(4) {
        Some(list) => list
            .split(',')
            .map(|n| n.parse())
            .collect::<Result<_, _>>()?,
        None => vec![2048, 32768],
    };
    println!(
        "{:>2} {:>5} {:>7} {:>10} {:>10}",
        "N", "algo", "payload", "median_us", "p99_us"
    );
    for world in worlds {
        for &algo in &algos {
            for &bytes in &sizes {
                let times =
                    allreduce_latency(world, algo, WireDType::F32, bytes / 4, iters).await?;
                let (med, p99) = median_p99(&times);
                println!(
                    "{world:>2} {algo:>5} {:>6}K {:>10.1} {:>10.1}",
                    bytes / 1024,
                    med.as_secs_f64() * 1e6,
                    p99.as_secs_f64() * 1e6
                );
            }
        }
    }
    Ok(())
}
