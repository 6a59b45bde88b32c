//! Allreduce latency with every rank in its own process (as `tpi-node`s are), each waiting
//! the way a compute thread does: `driven` (the compute thread drives a single-threaded
//! QUIC runtime, as tpi does) or `thread` (a network thread runs QUIC and the compute
//! thread yield-spins on the result). Between allreduces each rank busy-computes for
//! `compute_us`, as a decode step does between its two allreduces per layer.
//!
//! `cargo run --release -p tpi-node --example xproc_allreduce [N] [bytes,...] [star|ring|tree|mesh|rsag] [compute_us]`
//! prints rank 0's median and p99 per allreduce and the wall time per iteration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tpi_node::net::bench::median_p99;
use tpi_node::net::collective::establish_links;
use tpi_node::net::driven::{Driven, DEFAULT_SPIN};
use tpi_node::net::{Algo, Credential, Endpoint, Group, WireDType};

const ITERS: usize = 2000;
const BASE_PORT: u16 = 47300;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.get(1).map(String::as_str) == Some("--rank") {
        return rank_main(&a[2..]);
    }
    let world: usize = a.get(1).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let sizes = a.get(2).cloned().unwrap_or("2304,32768".into());
    let algo = a.get(3).cloned().unwrap_or("star".into());
    let compute = a.get(4).cloned().unwrap_or("60".into());
    let dir = std::env::temp_dir().join(format!("tpi-xproc-{}", std::process::id()));
    let (_ca, cred) = Credential::ephemeral_cluster()?;
    cred.save(&dir)?;
    println!("N={world} {algo}, {compute} µs compute between allreduces, {ITERS} iterations");
    for bytes in sizes.split(',') {
        for mode in ["driven", "thread"] {
            let kids = (0..world)
                .map(|r| {
                    Command::new(&a[0])
                        .args(["--rank", &r.to_string(), &world.to_string(), bytes, &algo])
                        .args([mode, &compute, dir.to_str().unwrap()])
                        .spawn()
                })
                .collect::<Result<Vec<_>, _>>()?;
            for mut k in kids {
                k.wait()?;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn rank_main(a: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let rank: usize = a[0].parse()?;
    let world: usize = a[1].parse()?;
    let bytes: usize = a[2].parse()?;
    let algo: Algo = a[3].parse()?;
    let mode = a[4].as_str();
    let compute = Duration::from_micros(a[5].parse()?);
    let cred = Credential::load(&PathBuf::from(&a[6]))?;
    let addrs: Vec<SocketAddr> = (0..world)
        .map(|r| SocketAddr::from(([127, 0, 0, 1], BASE_PORT + r as u16)))
        .collect();
    // `thread` mode: a multi-threaded runtime with one worker as the network thread.
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let net = Arc::new(match mode {
        "driven" => Driven::new()?,
        _ => Driven::attach(mt.handle().clone()),
    });
    let ep = {
        let _g = net.handle().enter();
        Endpoint::server(addrs[rank], &cred)?
    };
    let links = net.block_on(establish_links(
        &ep,
        rank,
        world,
        algo,
        &addrs,
        Duration::from_secs(10),
    ))?;
    let mut g = Group::new(rank, world, algo, WireDType::F32, links)?;
    let mut x = vec![1.0f32; bytes / 4];
    let mut times = Vec::with_capacity(ITERS);
    let start = Instant::now();
    for i in 0..ITERS + 100 {
        let t = Instant::now();
        while t.elapsed() < compute {
            std::hint::spin_loop();
        }
        let t = Instant::now();
        net.block_on_spin(DEFAULT_SPIN, g.allreduce(&mut x))?;
        if i >= 100 {
            times.push(t.elapsed());
        }
        x.iter_mut().for_each(|v| *v *= 1.0 / world as f32);
    }
    let wall = start.elapsed();
    if rank == 0 {
        let (med, p99) = median_p99(&times);
        println!(
            "{bytes:>6} B {mode:>6}: median {:6.1} µs  p99 {:7.1} µs  {:6.1} µs per iteration",
            med.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            wall.as_secs_f64() * 1e6 / (ITERS + 100) as f64
        );
    }
    // Stay up until the peers are done with us.
    net.block_on(async { tokio::time::sleep(Duration::from_millis(300)).await });
    Ok(())
}
