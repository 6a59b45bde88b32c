//! Finding nodes over mDNS (`tpi nodes`, `--nodes auto`).
//!
//! mDNS is trusted for addresses only: a discovered node still has to pass the TLS
//! handshake with the cluster credential, so a spoofed advert pointing elsewhere gets
//! a connection error naming it, never a session.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tpi_node::discovery::Resolved;

/// A node seen on the network.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DiscoveredNode {
    /// Node id (128-bit hex).
    pub id: String,
    /// Announced name (host name by default).
    pub name: String,
    /// Where it listens (best address: IPv4 first).
    pub addr: SocketAddr,
    /// Wire protocol version.
    pub proto: u32,
    /// Compute threads.
    pub cores: usize,
    /// Total RAM, bytes.
    pub ram: u64,
    /// Free disk in its data dir, bytes.
    pub disk_free: u64,
    /// Measured Q4_0 GEMV rate, GB/s.
    pub gemv_gbs: f64,
    /// Cached shards.
    pub shards: usize,
}

/// What a browse found.
#[derive(Clone, Debug, Default)]
pub struct Browse {
    /// Nodes, fastest GEMV first.
    pub nodes: Vec<DiscoveredNode>,
    /// Problems worth telling the user (duplicate ids, unreadable adverts).
    pub warnings: Vec<String>,
}

fn num<T: std::str::FromStr>(p: &BTreeMap<String, String>, k: &str) -> Option<T> {
    p.get(k).and_then(|v| v.trim().parse().ok())
}

/// Turns resolved adverts into nodes, fastest first, with warnings for adverts that
/// cannot be used and for ids announced from more than one place. Pure.
pub fn from_resolved(found: &[Resolved]) -> Browse {
    let mut b = Browse::default();
    for r in found {
        let Some(addr) = r.socket_addrs().into_iter().next() else {
            continue;
        };
        let id = match r.props.get("id") {
            Some(id) if !id.is_empty() => id.clone(),
            _ => {
                b.warnings.push(format!(
                    "ignoring advert {} at {addr}: no node id",
                    r.fullname
                ));
                continue;
            }
        };
        b.nodes.push(DiscoveredNode {
            name: r.props.get("name").cloned().unwrap_or_default(),
            addr,
            proto: num(&r.props, "proto").unwrap_or(0),
            cores: num(&r.props, "cores").unwrap_or(0),
            ram: num(&r.props, "ram").unwrap_or(0),
            disk_free: num(&r.props, "disk_free").unwrap_or(0),
            gemv_gbs: num::<f64>(&r.props, "gemv_gbs")
                .filter(|g| g.is_finite() && *g >= 0.0)
                .unwrap_or(0.0),
            shards: num(&r.props, "shards").unwrap_or(0),
            id,
        });
    }
    sort_fastest_first(&mut b.nodes);
    let mut by_id: BTreeMap<&str, Vec<SocketAddr>> = BTreeMap::new();
    for n in &b.nodes {
        by_id.entry(n.id.as_str()).or_default().push(n.addr);
    }
    for (id, addrs) in by_id {
        if addrs.len() > 1 {
            let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            b.warnings.push(format!(
                "duplicate node id {id} announced from {}: a data dir (node-id) was probably \
                 copied; delete DATA_DIR/node-id on all but one and restart them",
                list.join(", ")
            ));
        }
    }
    b
}

/// Sorts fastest GEMV first (ties: by address, so the order is stable).
pub fn sort_fastest_first(nodes: &mut [DiscoveredNode]) {
    nodes.sort_by(|a, b| {
        b.gemv_gbs
            .partial_cmp(&a.gemv_gbs)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.addr.cmp(&b.addr))
    });
}

/// Browses the local network for `timeout`.
pub fn browse(timeout: Duration) -> anyhow::Result<Browse> {
    let found = tpi_node::discovery::browse(timeout)
        .map_err(|e| anyhow::anyhow!("cannot browse for nodes over mDNS: {e}"))?;
    Ok(from_resolved(&found))
}

/// The message for a browse that found nothing.
pub fn nothing_found(timeout: Duration) -> String {
    format!(
        "no tpi nodes found over mDNS ({} `{}` within {:.1}s). Multicast is often blocked between \
         machines, Wi-Fi client isolation and VLANs; check the nodes run `tpi-node serve` without \
         --no-mdns, or name them: --nodes host:port,host:port",
        "_tpi._udp.local.",
        "tpi-node serve",
        timeout.as_secs_f64()
    )
}

/// How long `--nodes auto` listens for adverts.
pub const AUTO_TIMEOUT: Duration = Duration::from_secs(2);

/// Browses for [`AUTO_TIMEOUT`] and picks the nodes for `n` ranks ([`pick`]), printing
/// warnings (duplicate ids) to stderr. Errors when none is found.
pub fn discover(n: Option<usize>) -> anyhow::Result<Vec<DiscoveredNode>> {
    let b = browse(AUTO_TIMEOUT)?;
    for w in &b.warnings {
        eprintln!("warning: {w}");
    }
    if b.nodes.is_empty() {
        anyhow::bail!("{}", nothing_found(AUTO_TIMEOUT));
    }
    let picked = pick(&b, n, tpi_node::net::wire::PROTOCOL_VERSION)?;
    for (i, d) in picked.iter().enumerate() {
        tracing::info!(
            "rank {}: {} ({}) at {}, {:.1} GB/s GEMV",
            i + 1,
            d.name,
            d.id,
            d.addr,
            d.gemv_gbs
        );
    }
    Ok(picked)
}

/// Picks the nodes for a cluster of `n` ranks (rank 0 is this process): usable nodes
/// (same protocol, unique id), fastest first, `n - 1` of them; all when `n` is None.
/// Errors when fewer are usable than asked for. Pure.
pub fn pick(b: &Browse, n: Option<usize>, proto: u32) -> anyhow::Result<Vec<DiscoveredNode>> {
    let mut seen = std::collections::HashSet::new();
    let usable: Vec<DiscoveredNode> = b
        .nodes
        .iter()
        .filter(|d| d.proto == proto)
        .filter(|d| seen.insert(d.addr))
        .cloned()
        .collect();
    let skipped = b.nodes.len() - usable.len();
    let want = match n {
        Some(0) => anyhow::bail!("--n counts rank 0 too, so it must be at least 1"),
        Some(n) => n - 1,
        None => usable.len(),
    };
    if usable.len() < want {
        anyhow::bail!(
            "--n {} needs {want} nodes but mDNS found {} usable{}",
            want + 1,
            usable.len(),
            if skipped > 0 {
                format!(" ({skipped} more speak another protocol version)")
            } else {
                String::new()
            }
        );
    }
    Ok(usable.into_iter().take(want).collect())
}

/// Human-readable bytes (GiB, MiB, KiB or B).
pub fn fmt_bytes(b: u64) -> String {
    let f = b as f64;
    if b >= 1 << 30 {
        format!("{:.1}GiB", f / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1}MiB", f / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.1}KiB", f / 1024.0)
    } else {
        format!("{b}B")
    }
}

/// The `tpi nodes` table.
pub fn table(nodes: &[DiscoveredNode]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<32}  {:<16}  {:<22}  {:>5}  {:>5}  {:>8}  {:>9}  {:>8}  {:>6}",
        "ID", "NAME", "ADDRESS", "PROTO", "CORES", "RAM", "DISK FREE", "GEMV", "SHARDS"
    );
    for n in nodes {
        let _ = writeln!(
            s,
            "{:<32}  {:<16}  {:<22}  {:>5}  {:>5}  {:>8}  {:>9}  {:>6.2}GB/s  {:>6}",
            n.id,
            n.name,
            n.addr.to_string(),
            n.proto,
            n.cores,
            fmt_bytes(n.ram),
            fmt_bytes(n.disk_free),
            n.gemv_gbs,
            n.shards
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(id: &str, ip: &str, port: u16, gemv: &str) -> Resolved {
        let mut props = BTreeMap::new();
        props.insert("id".to_string(), id.to_string());
        props.insert("proto".to_string(), "1".to_string());
        props.insert("gemv_gbs".to_string(), gemv.to_string());
        props.insert("ram".to_string(), (8u64 << 30).to_string());
        Resolved {
            fullname: format!("{id}._tpi._udp.local."),
            port,
            addrs: vec![ip.parse().unwrap()],
            props,
        }
    }

    #[test]
    fn fastest_first_and_duplicates_warned() {
        let b = from_resolved(&[
            res("aa", "10.0.0.1", 7070, "5"),
            res("bb", "10.0.0.2", 7070, "20"),
            res("aa", "10.0.0.3", 7070, "6"),
        ]);
        assert_eq!(b.nodes[0].id, "bb");
        assert_eq!(b.nodes[0].ram, 8 << 30);
        assert_eq!(b.warnings.len(), 1, "{:?}", b.warnings);
        assert!(b.warnings[0].contains("duplicate node id aa"));
        assert!(b.warnings[0].contains("10.0.0.1:7070") && b.warnings[0].contains("10.0.0.3:7070"));
    }

    #[test]
    fn pick_takes_n_minus_one_fastest() {
        let b = from_resolved(&[
            res("aa", "10.0.0.1", 7070, "5"),
            res("bb", "10.0.0.2", 7070, "20"),
            res("cc", "10.0.0.3", 7070, "10"),
        ]);
        let p = pick(&b, Some(3), 1).unwrap();
        assert_eq!(
            p.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["bb", "cc"]
        );
        assert_eq!(pick(&b, None, 1).unwrap().len(), 3);
        assert!(pick(&b, Some(5), 1).is_err());
        assert!(
            pick(&b, Some(2), 2).is_err(),
            "other protocol versions are not usable"
        );
    }

    #[test]
    fn empty_message_mentions_multicast_and_nodes_flag() {
        let m = nothing_found(Duration::from_secs(2));
        assert!(m.contains("Multicast") && m.contains("--nodes host:port"));
    }
}
