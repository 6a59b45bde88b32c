//! Link setup: the data-stream hello (protocol version, rank, world, allreduce policy) and
//! [`establish_links`], which dials lower ranks and accepts higher ones.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures::future::try_join_all;

use super::link::DataLink;
use super::Policy;
use crate::net::error::NetError;
use crate::net::transport::{Connection, Endpoint, Stream};
use crate::net::wire::PROTOCOL_VERSION;

/// The stream tag of a collective data stream (see [`Connection::open_stream`]).
pub const DATA_STREAM_TAG: u8 = 0xDA;

#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct LinkHello {
    version: u32,
    rank: u32,
    world: u32,
    algo: Policy,
}

impl LinkHello {
    /// The hello this rank sends.
    fn ours(rank: usize, world: usize, algo: Policy) -> LinkHello {
        LinkHello {
            version: PROTOCOL_VERSION,
            rank: rank as u32,
            world: world as u32,
            algo,
        }
    }
}

const HELLO_MAX: usize = 1024;

fn check_hello(h: &LinkHello, world: usize, algo: Policy) -> Result<(), NetError> {
    if h.version != PROTOCOL_VERSION {
        return Err(NetError::Protocol(format!(
            "protocol version {} (we speak {PROTOCOL_VERSION})",
            h.version
        )));
    }
    if h.world as usize != world || h.algo != algo {
        return Err(NetError::Protocol(format!(
            "peer is in a world of {} with {} (we: {world}, {algo})",
            h.world, h.algo
        )));
    }
    Ok(())
}

/// Opens the data stream to `peer` over `conn`: sends a hello (protocol version, our
/// rank, world size, algorithm) and checks the peer's answer.
pub async fn open_data_link(
    conn: &Connection,
    rank: usize,
    world: usize,
    algo: impl Into<Policy>,
    peer: usize,
) -> Result<DataLink, NetError> {
    let algo: Policy = algo.into();
    let conn = conn
        .clone()
        .with_peer_name(&format!("rank {peer} ({})", conn.remote_addr()));
    let mut s = conn.open_stream(DATA_STREAM_TAG).await?;
    s.send_msg(&LinkHello::ours(rank, world, algo)).await?;
    let h: LinkHello = s.recv_msg(HELLO_MAX).await?;
    check_hello(&h, world, algo).map_err(|e| e.with_peer(conn.peer_name()))?;
    if h.rank as usize != peer {
        return Err(NetError::Protocol(format!(
            "expected rank {peer}, the node says it is rank {}",
            h.rank
        ))
        .with_peer(&conn.remote_addr().to_string()));
    }
    Ok(DataLink::quic(peer, s, Some(conn)))
}

/// Accepts a data stream opened by [`open_data_link`] on `conn`, answers the hello and
/// returns the link (its peer rank comes from the hello).
pub async fn accept_data_link(
    conn: &Connection,
    rank: usize,
    world: usize,
    algo: impl Into<Policy>,
) -> Result<DataLink, NetError> {
    let algo: Policy = algo.into();
    let s = conn.accept_stream().await?;
    accept_data_stream(conn, s, rank, world, algo).await
}

/// Completes [`accept_data_link`] on a stream already accepted (and tagged
/// [`DATA_STREAM_TAG`]), for servers that dispatch incoming streams by tag.
pub async fn accept_data_stream(
    conn: &Connection,
    mut s: Stream,
    rank: usize,
    world: usize,
    algo: impl Into<Policy>,
) -> Result<DataLink, NetError> {
    let algo: Policy = algo.into();
    if s.tag != DATA_STREAM_TAG {
        return Err(NetError::Protocol(format!(
            "expected a data stream, got stream tag {:#x}",
            s.tag
        ))
        .with_peer(conn.peer_name()));
    }
    let h: LinkHello = s.recv_msg(HELLO_MAX).await?;
    check_hello(&h, world, algo).map_err(|e| e.with_peer(conn.peer_name()))?;
    s.send_msg(&LinkHello::ours(rank, world, algo)).await?;
    let peer = h.rank as usize;
    let conn = conn
        .clone()
        .with_peer_name(&format!("rank {peer} ({})", conn.remote_addr()));
    Ok(DataLink::quic(peer, s, Some(conn)))
}

/// Builds all of `rank`'s data links for `algo` (every other rank under `auto`): dials
/// every lower-ranked peer at `addrs[peer]` and accepts one connection from every
/// higher-ranked peer on `ep` (which must be a server endpoint if any higher-ranked peer
/// exists). Consumes the incoming connections it accepts; a connection from an unexpected
/// rank is an error. Everything must complete within `timeout`.
pub async fn establish_links(
    ep: &Endpoint,
    rank: usize,
    world: usize,
    algo: impl Into<Policy>,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<BTreeMap<usize, DataLink>, NetError> {
    let algo: Policy = algo.into();
    if addrs.len() < world {
        return Err(NetError::Protocol(format!(
            "{} addresses for a world of {world}",
            addrs.len()
        )));
    }
    let peers = algo.peers(rank, world);
    let lower: Vec<usize> = peers.iter().copied().filter(|&p| p < rank).collect();
    let higher: Vec<usize> = peers.iter().copied().filter(|&p| p > rank).collect();
    let work = async {
        let dial = try_join_all(lower.iter().map(|&p| async move {
            let conn = ep.connect(addrs[p], timeout).await?;
            open_data_link(&conn, rank, world, algo, p).await
        }));
        let accept = async {
            let mut got = Vec::new();
            while got.len() < higher.len() {
                let conn = match ep.accept().await {
                    None => {
                        return Err(NetError::Protocol(
                            "endpoint closed while accepting links".into(),
                        ))
                    }
                    Some(c) => c?,
                };
                let link = accept_data_link(&conn, rank, world, algo).await?;
                if !higher.contains(&link.peer())
                    || got.iter().any(|l: &DataLink| l.peer() == link.peer())
                {
                    return Err(NetError::Protocol(format!(
                        "unexpected data link from rank {} (expecting {higher:?})",
                        link.peer()
                    )));
                }
                got.push(link);
            }
            Ok(got)
        };
        let (a, b) = futures::try_join!(dial, accept)?;
        Ok::<_, NetError>(a.into_iter().chain(b).map(|l| (l.peer(), l)).collect())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| NetError::Timeout {
            what: format!("rank {rank} establishing {algo} links with {peers:?}"),
            after: timeout,
        })?
}
