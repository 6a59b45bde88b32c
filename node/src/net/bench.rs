//! In-process loopback allreduce latency benchmark.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::collective::{establish_links, Algo, Group, WireDType};
use super::error::NetError;
use super::tls::Credential;
use super::transport::Endpoint;

/// Runs `world` ranks in this process, each on its own quinn endpoint on 127.0.0.1 and
/// its own tokio task (call from a multi-thread runtime), and returns rank 0's wall time
/// of each of `iters` allreduces of `elems` f32 values, after `max(iters / 10, 5)`
/// warm-up rounds.
pub async fn allreduce_latency(
    world: usize,
    algo: Algo,
    dtype: WireDType,
    elems: usize,
    iters: usize,
) -> Result<Vec<Duration>, NetError> {
    allreduce_latency_over(world, algo, dtype, elems, iters, None).await
}

/// [`allreduce_latency`] with every rank's egress crossing an emulated `link`
/// (None: plain loopback).
pub async fn allreduce_latency_over(
    world: usize,
    algo: Algo,
    dtype: WireDType,
    elems: usize,
    iters: usize,
    link: Option<tpi_sim::LinkSpec>,
) -> Result<Vec<Duration>, NetError> {
    let (_ca, cred) = Credential::ephemeral_cluster()?;
    let bind = SocketAddr::from(([127, 0, 0, 1], 0));
    let eps = (0..world)
        .map(|_| match link {
            Some(l) => super::emulation::LinkEmulation::uniform(l).endpoint(
                bind,
                true,
                &cred,
                &super::options::TransportOptions::default(),
            ),
            None => Endpoint::server(bind, &cred),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let addrs = eps
        .iter()
        .map(|e| e.local_addr())
        .collect::<Result<Vec<_>, _>>()?;
    let warmup = (iters / 10).max(5);
    let mut tasks = Vec::new();
    for (rank, ep) in eps.into_iter().enumerate() {
        let addrs = addrs.clone();
        tasks.push(tokio::spawn(async move {
            let links =
                establish_links(&ep, rank, world, algo, &addrs, Duration::from_secs(10)).await?;
            let mut g = Group::new(rank, world, algo, dtype, links)?;
            let mut x: Vec<f32> = (0..elems)
                .map(|i| (i % 17) as f32 * 0.25 + rank as f32)
                .collect();
            let mut times = Vec::with_capacity(iters);
            for i in 0..warmup + iters {
                let t = Instant::now();
                g.allreduce(&mut x).await?;
                if i >= warmup {
                    times.push(t.elapsed());
                }
                // Keep values bounded.
                x.iter_mut().for_each(|v| *v *= 1.0 / world as f32);
            }
            // Keep the group and endpoint alive until every rank is done: closing early
            // would discard frames still queued for slower ranks.
            Ok::<_, NetError>((times, g, ep))
        }));
    }
    let mut out = Vec::new();
    let mut keep = Vec::new();
    for (rank, t) in tasks.into_iter().enumerate() {
        let (times, g, ep) = t
            .await
            .map_err(|e| NetError::Protocol(format!("bench rank {rank} panicked: {e}")))??;
        if rank == 0 {
            out = times;
        }
        keep.push((g, ep));
    }
    for (_, ep) in &keep {
        ep.close("bench done");
    }
    Ok(out)
}

/// The median and 99th percentile of `times` (zero for an empty slice).
pub fn median_p99(times: &[Duration]) -> (Duration, Duration) {
    if times.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    let mut t = times.to_vec();
    t.sort_unstable();
    let p99 = ((t.len() as f64 * 0.99).ceil() as usize).clamp(1, t.len()) - 1;
    (t[t.len() / 2], t[p99])
}
