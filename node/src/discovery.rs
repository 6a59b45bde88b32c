//! The mDNS advert: a node announces itself as `_tpi._udp.local.` so coordinators on
//! the same link can find it (`tpi nodes`, `--nodes auto`).
//!
//! mDNS is trusted for addresses only. Whoever connects still has to pass the QUIC/TLS
//! handshake with the cluster credential, so a spoofed advert gains nothing.
//!
//! - [`node_id`]: a random 128-bit id, created once and kept in `DATA_DIR/node-id`.
//! - [`Advert`]: what the TXT record says (id, protocol, cores, RAM, free disk, GEMV
//!   rate, cached shards, host name).
//! - [`Advertiser`]: registers the advert and withdraws it on drop.
//! - [`browse_with`]/[`browse`]: resolve every advert seen within a timeout (used by
//!   the node's duplicate-id check and by the coordinator's browser).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};

/// The DNS-SD service type every node advertises.
pub const SERVICE_TYPE: &str = "_tpi._udp.local.";

/// Name of the identity file inside the data dir.
pub const NODE_ID_FILE: &str = "node-id";

/// Errors of the discovery layer.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The mDNS daemon failed.
    #[error("mDNS: {0}")]
    Mdns(#[from] mdns_sd::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn random_hex16() -> String {
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        // No /dev/urandom: hash what differs between machines and moments.
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(format!("{:?}", std::time::SystemTime::now()));
        h.update(std::process::id().to_le_bytes());
        h.update(hostname().as_bytes());
        h.update(format!("{:p}", &b));
        b.copy_from_slice(&h.finalize()[..16]);
    }
    hex::encode(b)
}

fn valid_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

/// The node's identity: read from `data_dir/node-id`, or created (random, 128 bits,
/// hex) and written there on first use.
pub fn node_id(data_dir: &Path) -> Result<String, DiscoveryError> {
    let path = data_dir.join(NODE_ID_FILE);
    let io = |source| DiscoveryError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if valid_id(s.trim()) => return Ok(s.trim().to_ascii_lowercase()),
        Ok(s) => tracing::warn!(
            "{} holds {:?}, not a 128-bit hex id; making a new one",
            path.display(),
            s.trim()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let id = random_hex16();
    let tmp = data_dir.join(format!("{NODE_ID_FILE}.tmp{}", std::process::id()));
    std::fs::write(&tmp, format!("{id}\n")).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(id)
}

/// Complete shards cached under `data_dir/shards` (partial downloads not counted).
pub fn cached_shards(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("shards"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .filter(|e| !e.file_name().to_string_lossy().ends_with(".partial"))
                .count()
        })
        .unwrap_or(0)
}

/// The host's name (gethostname), or "unknown".
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let s = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    if s.is_empty() {
        "unknown".into()
    } else {
        s
    }
}

/// This machine's Q4_0 GEMV rate in GB/s of weight bytes (the planner's capability
/// number; the coordinator measures rank 0 the same way). Bounded to about a second: a
/// short probe runs first, and the full 4096x4096 measurement only when the probe says
/// it will be quick (a slow device, or an unoptimised build, keeps the probe's number).
pub fn measure_gemv_gbs(threads: usize) -> f64 {
    use tpi_kernels::{bench::gemv_gbs, DType, ThreadPool};
    let pool = ThreadPool::new(threads.max(1));
    let t = Instant::now();
    let probe = gemv_gbs(&pool, DType::Q4_0, 256, 4096, 1);
    // The full run quantises 16x the rows and streams ~3.5x the bytes, 3 times.
    if t.elapsed() < Duration::from_millis(60) {
        gemv_gbs(&pool, DType::Q4_0, 4096, 4096, 3)
    } else {
        probe
    }
}

/// What a node announces (the TXT record, plus where it listens).
#[derive(Clone, Debug, PartialEq)]
pub struct Advert {
    /// The node id (128-bit hex); also the mDNS instance name.
    pub id: String,
    /// Human-readable name (host name unless `--advertise-name`).
    pub name: String,
    /// Wire protocol version.
    pub proto: u32,
    /// Compute threads / cores.
    pub cores: usize,
    /// Total RAM, bytes.
    pub ram: u64,
    /// Free bytes in the data dir.
    pub disk_free: u64,
    /// Measured Q4_0 GEMV rate, GB/s.
    pub gemv_gbs: f64,
    /// Cached shards.
    pub shards: usize,
    /// QUIC port.
    pub port: u16,
    /// The specific listen address, or None to advertise every address of the host.
    pub ip: Option<IpAddr>,
}

impl Advert {
    /// The TXT properties.
    pub fn properties(&self) -> Vec<(String, String)> {
        vec![
            ("id".into(), self.id.clone()),
            ("proto".into(), self.proto.to_string()),
            ("cores".into(), self.cores.to_string()),
            ("ram".into(), self.ram.to_string()),
            ("disk_free".into(), self.disk_free.to_string()),
            ("gemv_gbs".into(), format!("{:.4}", self.gemv_gbs)),
            ("shards".into(), self.shards.to_string()),
            ("name".into(), self.name.clone()),
        ]
    }

    /// The mDNS host name used for this advert: per node id, so nodes sharing a host
    /// name (containers, namespaces, cloned images) never merge their addresses.
    pub fn mdns_host(&self) -> String {
        format!("tpi-{}.local.", self.id)
    }

    /// The service record to register.
    pub fn service_info(&self) -> Result<ServiceInfo, DiscoveryError> {
        let props: HashMap<String, String> = self.properties().into_iter().collect();
        let info = match self.ip {
            Some(ip) => ServiceInfo::new(
                SERVICE_TYPE,
                &self.id,
                &self.mdns_host(),
                ip,
                self.port,
                props,
            )?,
            None => ServiceInfo::new(
                SERVICE_TYPE,
                &self.id,
                &self.mdns_host(),
                "",
                self.port,
                props,
            )?
            .enable_addr_auto(),
        };
        Ok(info)
    }
}

/// Whether `ip` needs the loopback interfaces enabled to be announced or heard.
fn is_loopback(ip: Option<IpAddr>) -> bool {
    ip.map(|i| i.is_loopback()).unwrap_or(false)
}

/// Creates an mDNS daemon; with `loopback` it also uses the loopback interfaces
/// (needed for nodes listening on 127.0.0.1, and for finding them).
pub fn daemon(loopback: bool) -> Result<ServiceDaemon, DiscoveryError> {
    let d = ServiceDaemon::new()?;
    if loopback {
        d.enable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6])?;
    }
    Ok(d)
}

/// Shuts a daemon down and waits (briefly) for its thread to finish.
pub fn shutdown(d: &ServiceDaemon) {
    if let Ok(rx) = d.shutdown() {
        let _ = rx.recv_timeout(Duration::from_secs(2));
    }
}

/// A registered advert; withdrawn (goodbye packets) and the daemon stopped on drop.
pub struct Advertiser {
    daemon: ServiceDaemon,
    fullname: String,
    advert: Advert,
}

impl Advertiser {
    /// Registers `advert`.
    pub fn start(advert: Advert) -> Result<Self, DiscoveryError> {
        let daemon = daemon(is_loopback(advert.ip))?;
        let info = advert.service_info()?;
        let fullname = info.get_fullname().to_string();
        daemon.register(info)?;
        Ok(Self {
            daemon,
            fullname,
            advert,
        })
    }

    /// The advert's full DNS-SD name.
    pub fn fullname(&self) -> &str {
        &self.fullname
    }

    /// What is announced.
    pub fn advert(&self) -> &Advert {
        &self.advert
    }

    /// Browses for `timeout` and returns the adverts that carry this node's id but are
    /// not this node (another address, port or instance): a cloned identity.
    pub fn find_duplicates(&self, timeout: Duration) -> Vec<Resolved> {
        let found = match browse_with(&self.daemon, timeout) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("duplicate-id browse failed: {e}");
                return Vec::new();
            }
        };
        found
            .into_iter()
            .filter(|r| r.props.get("id").map(String::as_str) == Some(self.advert.id.as_str()))
            .filter(|r| !self.is_self(r))
            .collect()
    }

    fn is_self(&self, r: &Resolved) -> bool {
        if r.fullname != self.fullname || r.port != self.advert.port {
            return false;
        }
        match self.advert.ip {
            Some(ip) => r.addrs.iter().all(|a| *a == ip),
            // Every address of the host: ours unless another host answered too, which
            // the browse cannot tell apart from our own answers; instance renames
            // (mDNS conflict resolution) and port differences are still caught above.
            None => true,
        }
    }
}

impl Drop for Advertiser {
    fn drop(&mut self) {
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
        shutdown(&self.daemon);
    }
}

/// Settings of the background advert started by `tpi-node serve`.
#[derive(Clone, Debug)]
pub struct AdvertOptions {
    /// The node's data dir (identity, shard cache, free disk).
    pub data_dir: std::path::PathBuf,
    /// The bound QUIC address.
    pub listen: SocketAddr,
    /// Compute threads (announced as `cores`, used for the GEMV measurement).
    pub threads: usize,
    /// Name to announce (default: the host name).
    pub name: Option<String>,
    /// How long to browse for clones of this node's id after registering.
    pub duplicate_check: Duration,
}

/// The running advert; dropping it withdraws the advert and stops the daemon.
pub struct AdvertHandle {
    id: String,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdvertHandle {
    /// The node id being announced.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for AdvertHandle {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads (or creates) the node id, then in a background thread measures the GEMV
/// rate, registers the advert and browses briefly for another node announcing the same
/// id from elsewhere (a copied data dir), warning loudly when one does. Advert failures
/// are logged, never fatal: the node stays reachable with `--nodes host:port`.
pub fn spawn_advert(o: AdvertOptions) -> Result<AdvertHandle, DiscoveryError> {
    let id = node_id(&o.data_dir)?;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let tid = id.clone();
    let thread = std::thread::Builder::new()
        .name("tpi-mdns".into())
        .spawn(move || {
            let t = Instant::now();
            let gemv_gbs = measure_gemv_gbs(o.threads);
            tracing::debug!("GEMV {gemv_gbs:.2} GB/s measured in {:?}", t.elapsed());
            let ip = o.listen.ip();
            let advert = Advert {
                id: tid,
                name: o.name.clone().unwrap_or_else(hostname),
                proto: crate::net::wire::PROTOCOL_VERSION,
                cores: o.threads,
                ram: crate::sys::total_ram().unwrap_or(0),
                disk_free: crate::sys::disk_free(&o.data_dir).unwrap_or(0),
                gemv_gbs,
                shards: cached_shards(&o.data_dir),
                port: o.listen.port(),
                ip: (!ip.is_unspecified()).then_some(ip),
            };
            let adv = match Advertiser::start(advert) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(
                        "cannot advertise over mDNS ({e}); coordinators must name this node with --nodes host:port"
                    );
                    return;
                }
            };
            tracing::info!(
                "advertising {} (id {}, {:.1} GB/s GEMV)",
                SERVICE_TYPE,
                adv.advert().id,
                gemv_gbs
            );
            if !o.duplicate_check.is_zero() {
                for d in adv.find_duplicates(o.duplicate_check) {
                    let msg = format!(
                        "DUPLICATE NODE ID {}: another node announces it from {:?} (instance {}). \
                         Was DATA_DIR/{NODE_ID_FILE} copied from this node? Delete it on one of \
                         them and restart that node.",
                        adv.advert().id,
                        d.socket_addrs(),
                        d.fullname
                    );
                    tracing::warn!("{msg}");
                    eprintln!("WARNING: {msg}");
                }
            }
            // Hold the advert until the handle is dropped.
            let _ = rx.recv();
            drop(adv);
        })
        .map_err(|source| DiscoveryError::Io {
            path: "tpi-mdns thread".into(),
            source,
        })?;
    Ok(AdvertHandle {
        id,
        stop: Some(tx),
        thread: Some(thread),
    })
}

/// One resolved advert.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// The DNS-SD instance name (`<id>._tpi._udp.local.`, possibly renamed by
    /// conflict resolution).
    pub fullname: String,
    /// The SRV port.
    pub port: u16,
    /// Every address seen for it, sorted.
    pub addrs: Vec<IpAddr>,
    /// The TXT properties.
    pub props: BTreeMap<String, String>,
}

impl Resolved {
    /// The socket addresses, best first: IPv4 before IPv6, link-local IPv6 last.
    pub fn socket_addrs(&self) -> Vec<SocketAddr> {
        let mut v: Vec<IpAddr> = self.addrs.clone();
        v.sort_by_key(|ip| match ip {
            IpAddr::V4(a) => (0u8, a.is_loopback() as u8, *ip),
            IpAddr::V6(a) => (1 + ((a.segments()[0] & 0xffc0) == 0xfe80) as u8, 0, *ip),
        });
        v.into_iter()
            .map(|ip| SocketAddr::new(ip, self.port))
            .collect()
    }
}

/// Resolves every `_tpi._udp` advert seen on `daemon` within `timeout`.
pub fn browse_with(
    daemon: &ServiceDaemon,
    timeout: Duration,
) -> Result<Vec<Resolved>, DiscoveryError> {
    let rx = daemon.browse(SERVICE_TYPE)?;
    let deadline = Instant::now() + timeout;
    type Seen = (u16, BTreeSet<IpAddr>, BTreeMap<String, String>);
    let mut found: HashMap<String, Seen> = HashMap::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match rx.recv_timeout(left) {
            Ok(ServiceEvent::ServiceResolved(info)) => {
                let props: BTreeMap<String, String> = info
                    .get_properties()
                    .iter()
                    .map(|p| (p.key().to_string(), p.val_str().to_string()))
                    .collect();
                let e = found
                    .entry(info.get_fullname().to_string())
                    .or_insert_with(|| (info.get_port(), BTreeSet::new(), BTreeMap::new()));
                e.0 = info.get_port();
                e.1.extend(info.get_addresses().iter().copied());
                if !props.is_empty() {
                    e.2 = props;
                }
            }
            Ok(ServiceEvent::ServiceRemoved(_, fullname)) => {
                found.remove(&fullname);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = daemon.stop_browse(SERVICE_TYPE);
    let mut v: Vec<Resolved> = found
        .into_iter()
        .filter(|(_, (_, addrs, _))| !addrs.is_empty())
        .map(|(fullname, (port, addrs, props))| Resolved {
            fullname,
            port,
            addrs: addrs.into_iter().collect(),
            props,
        })
        .collect();
    v.sort_by(|a, b| a.fullname.cmp(&b.fullname).then(a.addrs.cmp(&b.addrs)));
    Ok(v)
}

/// Browses with a fresh daemon (loopback interfaces included) and shuts it down.
pub fn browse(timeout: Duration) -> Result<Vec<Resolved>, DiscoveryError> {
    let d = daemon(true)?;
    let r = browse_with(&d, timeout);
    shutdown(&d);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_created_once_and_persisted() {
        let dir = std::env::temp_dir().join(format!("tpi-node-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = node_id(&dir).unwrap();
        assert!(valid_id(&a), "{a}");
        assert_eq!(node_id(&dir).unwrap(), a);
        let other = std::env::temp_dir().join(format!("tpi-node-id2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&other);
        assert_ne!(node_id(&other).unwrap(), a);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
    }

    #[test]
    fn properties_round_trip_into_service_info() {
        let a = Advert {
            id: "0123456789abcdef0123456789abcdef".into(),
            name: "pi5".into(),
            proto: 1,
            cores: 4,
            ram: 8 << 30,
            disk_free: 1 << 30,
            gemv_gbs: 9.5,
            shards: 2,
            port: 7070,
            ip: Some("127.0.0.1".parse().unwrap()),
        };
        let info = a.service_info().unwrap();
        assert_eq!(info.get_property_val_str("gemv_gbs"), Some("9.5000"));
        assert_eq!(info.get_property_val_str("id"), Some(a.id.as_str()));
        assert_eq!(info.get_port(), 7070);
        assert!(info.get_fullname().starts_with(&a.id));
    }
}
