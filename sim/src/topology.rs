//! [`Topology`]: the link between every ordered pair of nodes.
//!
//! A topology file is JSON:
//!
//! ```json
//! {
//!   "name": "home-gateway",
//!   "default": "4ms,300mbit",
//!   "hops": { "access": "1ms,300mbit", "wan": "1ms,300mbit" },
//!   "nodes": [ { "name": "dev0", "path": ["access", "wan"] } ],
//!   "links": [ { "from": "dev0", "to": "dev1", "link": "0.1ms,1gbit", "symmetric": true } ]
//! }
//! ```
//!
//! Each node's `path` lists the hops from the node up to a common core (hop names
//! from `hops`, or literal link specs). The link from `a` to `b` is `a`'s path
//! followed by `b`'s path reversed, composed with [`LinkSpec::then`] (latencies
//! add, bandwidth is the minimum). Entries in `links` override that; pairs with
//! no path (or indices past the node list) use `default`.

use std::{collections::HashMap, path::Path};

use serde::Deserialize;

use crate::link::{LinkSpec, ParseError};

/// Why a topology could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The file could not be read.
    #[error("reading topology {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The JSON was malformed.
    #[error("parsing topology JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A link spec inside the file was malformed.
    #[error("topology field {field}: {source}")]
    Spec {
        /// Where in the file.
        field: String,
        /// The cause.
        source: ParseError,
    },
    /// A link override named an unknown node.
    #[error("topology link names unknown node {0:?}")]
    UnknownNode(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNode {
    name: String,
    #[serde(default)]
    path: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLink {
    from: String,
    to: String,
    link: String,
    #[serde(default)]
    symmetric: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTopology {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    hops: HashMap<String, String>,
    #[serde(default)]
    nodes: Vec<FileNode>,
    #[serde(default)]
    links: Vec<FileLink>,
}

/// Links between every ordered pair of nodes, addressed by index.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    /// A short name (the file's `name`, or "uniform").
    pub name: String,
    names: Vec<String>,
    default: LinkSpec,
    paths: Vec<Vec<LinkSpec>>,
    overrides: HashMap<(usize, usize), LinkSpec>,
}

fn spec(field: &str, s: &str) -> Result<LinkSpec, TopologyError> {
    s.parse().map_err(|source| TopologyError::Spec {
        field: field.to_string(),
        source,
    })
}

impl Topology {
    /// Every pair of distinct nodes joined by the same link.
    pub fn uniform(link: LinkSpec) -> Self {
        Self {
            name: "uniform".into(),
            names: Vec::new(),
            default: link,
            paths: Vec::new(),
            overrides: HashMap::new(),
        }
    }

    /// Load a JSON topology file (format in the module docs).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TopologyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parse a JSON topology (format in the module docs).
    pub fn from_json(text: &str) -> Result<Self, TopologyError> {
        let f: FileTopology = serde_json::from_str(text)?;
        let _ = f.description;
        let default = match &f.default {
            Some(s) => spec("default", s)?,
            None => LinkSpec::ideal(),
        };
        let mut hops = HashMap::new();
        for (k, v) in &f.hops {
            hops.insert(k.clone(), spec(&format!("hops.{k}"), v)?);
        }
        let mut names = Vec::new();
        let mut paths = Vec::new();
        for n in &f.nodes {
            let mut p = Vec::new();
            for h in &n.path {
                p.push(match hops.get(h) {
                    Some(s) => *s,
                    None => spec(&format!("nodes.{}.path", n.name), h)?,
                });
            }
            names.push(n.name.clone());
            paths.push(p);
        }
        let mut t = Topology {
            name: f.name.unwrap_or_else(|| "custom".into()),
            names,
            default,
            paths,
            overrides: HashMap::new(),
        };
        for l in &f.links {
            let a = t
                .node_index(&l.from)
                .ok_or_else(|| TopologyError::UnknownNode(l.from.clone()))?;
            let b = t
                .node_index(&l.to)
                .ok_or_else(|| TopologyError::UnknownNode(l.to.clone()))?;
            let s = spec(&format!("links.{}->{}", l.from, l.to), &l.link)?;
            t.overrides.insert((a, b), s);
            if l.symmetric {
                t.overrides.insert((b, a), s);
            }
        }
        Ok(t)
    }

    /// The number of named nodes (0 for [`Topology::uniform`], which covers any count).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the topology names no nodes.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The node names, in index order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The index of the node called `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The default link used for pairs without a path or override.
    pub fn default_link(&self) -> LinkSpec {
        self.default
    }

    /// The link from node `from` to node `to` (ideal when `from == to`).
    pub fn link(&self, from: usize, to: usize) -> LinkSpec {
        if from == to {
            return LinkSpec::ideal();
        }
        if let Some(s) = self.overrides.get(&(from, to)) {
            return *s;
        }
        match (self.paths.get(from), self.paths.get(to)) {
            (Some(a), Some(b)) if !a.is_empty() || !b.is_empty() => {
                let mut hops = a.iter().chain(b.iter().rev());
                let first = *hops.next().expect("non-empty path");
                hops.fold(first, |acc, h| acc.then(h))
            }
            _ => self.default,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn shipped(name: &str) -> Topology {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/topologies/");
        Topology::load(format!("{p}{name}")).unwrap()
    }

    #[test]
    fn home_gateway_composes_four_hops() {
        let t = shipped("home-gateway.json");
        assert_eq!(t.len(), 8);
        let l = t.link(0, 7);
        assert_eq!(l.latency, Duration::from_millis(4));
        assert_eq!(l.bandwidth_bps, Some(300_000_000));
        assert_eq!(t.link(3, 3), LinkSpec::ideal());
        // Beyond the named nodes the default applies.
        assert_eq!(t.link(0, 20), t.default_link());
    }

    #[test]
    fn flat_switch_is_two_port_hops() {
        let t = shipped("flat-switch.json");
        let l = t.link(1, 2);
        assert_eq!(l.latency, Duration::from_micros(200));
        assert_eq!(l.bandwidth_bps, Some(1_000_000_000));
    }

    #[test]
    fn overrides_and_errors() {
        let t = Topology::from_json(
            r#"{"default":"1ms","nodes":[{"name":"a"},{"name":"b"}],
                "links":[{"from":"a","to":"b","link":"3ms,10mbit"}]}"#,
        )
        .unwrap();
        assert_eq!(t.link(0, 1).latency, Duration::from_millis(3));
        assert_eq!(t.link(1, 0).latency, Duration::from_millis(1));
        let e = Topology::from_json(r#"{"default":"1xs"}"#).unwrap_err();
        assert!(e.to_string().contains("default"), "{e}");
        let e =
            Topology::from_json(r#"{"links":[{"from":"x","to":"y","link":"1ms"}]}"#).unwrap_err();
        assert!(e.to_string().contains("unknown node"), "{e}");
    }
}
