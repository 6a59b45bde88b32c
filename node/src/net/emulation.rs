//! User-space link emulation for a process's QUIC endpoint (this kernel has no netem):
//! every datagram leaving the endpoint crosses an emulated link chosen by its
//! destination, with latency, bandwidth, jitter and loss (see tpi-sim).
//!
//! With a topology, link indices are session ranks: the coordinator is 0 and node
//! addresses map to their ranks once a session tells them (`set_ranks`). An address
//! not (yet) known is treated as rank 0, the coordinator, which has no listed address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use tpi_sim::{LinkFor, LinkSpec, Topology};

use super::error::NetError;
use super::options::TransportOptions;
use super::tls::Credential;
use super::transport::Endpoint;

#[derive(Default)]
struct Ranks {
    me: usize,
    by_addr: HashMap<SocketAddr, usize>,
}

/// How this process's outgoing datagrams are delayed.
#[derive(Clone)]
pub struct LinkEmulation {
    default: LinkSpec,
    topology: Option<Arc<Topology>>,
    ranks: Arc<RwLock<Ranks>>,
}

impl std::fmt::Debug for LinkEmulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LinkEmulation({}, topology: {})",
            self.default,
            self.topology.is_some()
        )
    }
}

impl LinkEmulation {
    /// The same link to every destination.
    pub fn uniform(spec: LinkSpec) -> Self {
        LinkEmulation {
            default: spec,
            topology: None,
            ranks: Arc::default(),
        }
    }

    /// Links from a topology file, by session rank.
    pub fn with_topology(topology: Topology) -> Self {
        LinkEmulation {
            default: topology.default_link(),
            topology: Some(Arc::new(topology)),
            ranks: Arc::default(),
        }
    }

    /// Tells the emulator this process's rank and every rank's address.
    pub fn set_ranks(&self, me: usize, addrs: &[Option<SocketAddr>]) {
        let mut r = self.ranks.write().unwrap();
        r.me = me;
        r.by_addr = addrs
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.map(|a| (a, i)))
            .collect();
    }

    /// The per-datagram link decision.
    pub fn link_for(&self) -> LinkFor {
        let me = self.clone();
        Arc::new(move |addr| match &me.topology {
            None => me.default,
            Some(t) => {
                let r = me.ranks.read().unwrap();
                let to = r.by_addr.get(&addr).copied().unwrap_or(0);
                if to == r.me {
                    me.default
                } else {
                    t.link(r.me, to)
                }
            }
        })
    }

    /// A QUIC endpoint bound at `bind` whose egress crosses the emulated links.
    /// Must be called inside a tokio runtime.
    pub fn endpoint(
        &self,
        bind: SocketAddr,
        server: bool,
        cred: &Credential,
        opts: &TransportOptions,
    ) -> Result<Endpoint, NetError> {
        let socket = tpi_sim::emulated_socket(bind, self.link_for())
            .map_err(|source| NetError::Bind { addr: bind, source })?;
        Endpoint::from_socket_with(socket, server, cred, opts)
    }
}
