//! The emulated testbed: N−1 `tpi-node` processes plus the coordinator on one machine,
//! each with user-space emulated links, on loopback or (as root) each node in its own
//! network namespace on a private bridge. Everything is torn down on drop, and the
//! node processes die with the harness (PR_SET_PDEATHSIG) if it is killed.
//!
//! Only loopback and the addresses of the namespaces this harness creates are ever
//! addressed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use tpi_coordinator::local::{die_with_parent, wait_for_listen};

use crate::{tpi_bin, tpi_node_bin, TempDir};

/// How to lay out the emulated cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterSpec {
    /// Ranks in total (the coordinator is rank 0).
    pub ranks: usize,
    /// Link spec applied to every process's egress, e.g. `2ms,300mbit`.
    pub link: Option<String>,
    /// A topology file instead of a uniform link.
    pub topology: Option<PathBuf>,
    /// Put each node in its own network namespace (needs root).
    pub netns: bool,
    /// Compute threads per node.
    pub node_threads: usize,
    /// Extra `tpi-node serve` arguments (e.g. `--window 2`).
    pub node_args: Vec<String>,
}

/// One node process.
pub struct NodeProc {
    /// The process.
    pub child: Child,
    /// Its listen address.
    pub addr: SocketAddr,
    /// Its namespace, in netns mode.
    pub netns: Option<String>,
    /// Its data directory.
    pub data_dir: PathBuf,
}

/// A running emulated cluster.
pub struct Testbed {
    /// The node processes (rank 1 first).
    pub nodes: Vec<NodeProc>,
    /// The coordinator's credential directory.
    pub credential: PathBuf,
    spec: ClusterSpec,
    net: Option<Netns>,
    _dir: TempDir,
}

/// What one `tpi run` on the testbed reported.
#[derive(Debug)]
pub struct RunReport {
    /// The `--json` object.
    pub json: serde_json::Value,
    /// Generated ids.
    pub ids: Vec<u32>,
    /// Mean decode ms/token at rank 0 (steps after the first).
    pub decode_ms: f64,
    /// Peak RSS per rank (bytes), from the last step.
    pub peak_rss: Vec<u64>,
    /// Mean per-rank decode (compute, allreduce wait, allreduce transfer) ms/token.
    pub breakdown: Vec<(f64, f64, f64)>,
}

struct Netns {
    names: Vec<String>,
    bridge: String,
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether this process can make network namespaces (root and `ip` present).
pub fn netns_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("ip")
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

impl Netns {
    /// Creates a bridge in the root namespace (10.77.<k>.1/24) and one namespace per
    /// node joined to it by a veth pair (10.77.<k>.<10+i>).
    fn create(n: usize) -> anyhow::Result<(Netns, Vec<String>)> {
        let tag = std::process::id() % 10000;
        let k = (std::process::id() % 200) + 20;
        let bridge = format!("tpib{tag}");
        let mut me = Netns {
            names: Vec::new(),
            bridge: bridge.clone(),
        };
        sh(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.77.{k}.1/24"),
            "dev",
            &bridge,
        ])?;
        sh(&["ip", "link", "set", &bridge, "up"])?;
        let mut ips = Vec::new();
        for i in 0..n {
            let ns = format!("tpins{tag}-{i}");
            let host = format!("tpiv{tag}h{i}");
            let peer = format!("tpiv{tag}p{i}");
            sh(&["ip", "netns", "add", &ns])?;
            me.names.push(ns.clone());
            sh(&[
                "ip", "link", "add", &host, "type", "veth", "peer", "name", &peer,
            ])?;
            sh(&["ip", "link", "set", &host, "master", &bridge])?;
            sh(&["ip", "link", "set", &host, "up"])?;
            sh(&["ip", "link", "set", &peer, "netns", &ns])?;
            let ip = format!("10.77.{k}.{}", 10 + i);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                &peer,
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", &peer, "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            ips.push(ip);
        }
        Ok((me, ips))
    }

    fn host_veth(&self, i: usize) -> String {
        format!("tpiv{}h{i}", std::process::id() % 10000)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        let _ = sh(&["ip", "link", "del", &self.bridge]);
    }
}

/// Starts `tpi-node serve --listen 127.0.0.1:0 --threads 1 --credential CRED [EXTRA…]` by
/// hand, as a user would on a device (no testbed around it), logging to `log`, and reads the
/// address it announces. The child is returned either way, so the caller decides how to
/// clean up.
pub fn spawn_static_node(
    cred: &Path,
    log: &Path,
    extra: &[&str],
) -> (Child, anyhow::Result<SocketAddr>) {
    let bin = tpi_node_bin();
    let logf = std::fs::File::create(log).expect("node log file");
    let mut child = Command::new(&bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--credential",
        ])
        .arg(cred)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(logf))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let addr = read_listen_line(&mut child);
    (child, addr)
}

/// Waits (up to 20 s) for a `tpi-node serve` child's first stdout line, `listening on
/// ADDR`, and returns ADDR (the coordinator's own reader, so both parse it one way).
pub fn read_listen_line(child: &mut Child) -> anyhow::Result<SocketAddr> {
    Ok(wait_for_listen(child, Duration::from_secs(20))?)
}

impl Testbed {
    /// Starts the nodes (ranks 1..N) with their links and waits until each listens.
    pub fn start(spec: ClusterSpec) -> anyhow::Result<Testbed> {
        if spec.ranks < 2 {
            bail!("a testbed needs at least 2 ranks");
        }
        let dir = TempDir::new("cluster");
        let tpi = tpi_bin();
        let node_bin = tpi_node_bin();
        let status = Command::new(&tpi)
            .args(["cluster", "init", "--dir"])
            .arg(dir.path())
            .output()?;
        if !status.status.success() {
            bail!(
                "tpi cluster init failed: {}",
                String::from_utf8_lossy(&status.stderr)
            );
        }
        let n = spec.ranks - 1;
        let (net, ips) = if spec.netns {
            if !netns_available() {
                bail!("netns mode needs root and iproute2");
            }
            let (ns, ips) = Netns::create(n)?;
            (Some(ns), ips)
        } else {
            (None, vec!["127.0.0.1".to_string(); n])
        };
        let mut tb = Testbed {
            nodes: Vec::new(),
            credential: dir.join("credential"),
            spec: spec.clone(),
            net,
            _dir: dir,
        };
        for (i, ip) in ips.iter().enumerate() {
            let cred = tb._dir.join(format!("node{}", i + 1));
            let st = Command::new(&tpi)
                .args(["cluster", "issue", "--dir"])
                .arg(tb._dir.path())
                .args(["--name", &format!("node{}", i + 1), "--out"])
                .arg(&cred)
                .output()?;
            if !st.status.success() {
                bail!(
                    "tpi cluster issue failed: {}",
                    String::from_utf8_lossy(&st.stderr)
                );
            }
            let data_dir = tb._dir.join(format!("data{}", i + 1));
            let mut cmd = match &tb.net {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", &ns.names[i]]).arg(&node_bin);
                    c
                }
                None => Command::new(&node_bin),
            };
            cmd.arg("serve")
                .args(["--listen", &format!("{ip}:0")])
                .args(["--threads", &spec.node_threads.max(1).to_string()])
                .arg("--credential")
                .arg(&cred)
                .arg("--data-dir")
                .arg(&data_dir)
                // Testbed nodes are private: they are addressed directly, never announced.
                .arg("--no-mdns")
                .args(&spec.node_args)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            if let Some(l) = &spec.link {
                cmd.args(["--link", l]);
            }
            if let Some(t) = &spec.topology {
                cmd.arg("--topology").arg(t);
            }
            die_with_parent(&mut cmd);
            let mut child = cmd.spawn().context("cannot start tpi-node")?;
            let addr = read_listen_line(&mut child);
            let addr = match addr {
                Ok(a) => a,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
            };
            tb.nodes.push(NodeProc {
                child,
                addr,
                netns: tb.net.as_ref().map(|n| n.names[i].clone()),
                data_dir,
            });
        }
        Ok(tb)
    }

    /// `--nodes` value for the coordinator.
    pub fn nodes_arg(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `tpi run` command for this cluster with `args` appended (not yet run).
    pub fn run_command(&self, model: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(tpi_bin());
        cmd.args(["run", "--model"])
            .arg(model)
            .args(["--nodes", &self.nodes_arg(), "--credential"])
            .arg(&self.credential)
            .args(args)
            .env_remove("RUST_LOG");
        if let Some(l) = &self.spec.link {
            cmd.args(["--link", l]);
        }
        if let Some(t) = &self.spec.topology {
            cmd.arg("--topology").arg(t);
        }
        die_with_parent(&mut cmd);
        cmd
    }

    /// Runs a generation (`--json` added) and parses its report.
    pub fn run(&self, model: &Path, args: &[&str]) -> anyhow::Result<RunReport> {
        let mut a: Vec<&str> = args.to_vec();
        a.push("--json");
        let out = self.run_command(model, &a).output()?;
        if !out.status.success() {
            bail!(
                "tpi run failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("bad JSON: {}", String::from_utf8_lossy(&out.stdout)))?;
        Ok(RunReport::from_json(json))
    }

    /// Kills node `i` (0-based: rank i+1) with SIGKILL.
    pub fn kill_node(&mut self, i: usize) {
        let _ = self.nodes[i].child.kill();
        let _ = self.nodes[i].child.wait();
    }

    /// Takes node `i`'s link down (netns mode only): the node becomes unreachable.
    pub fn cut_link(&self, i: usize) -> anyhow::Result<()> {
        let ns = self
            .net
            .as_ref()
            .context("cutting a link needs netns mode")?;
        sh(&["ip", "link", "set", &ns.host_veth(i), "down"])
    }

    /// Process ids of the nodes still running.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.child.id()).collect()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.child.kill();
        }
        for n in &mut self.nodes {
            let _ = n.child.wait();
        }
        self.net.take();
    }
}

impl RunReport {
    /// Extracts ids, decode latency, peak RSS and per-rank breakdown from `--json` output.
    pub fn from_json(json: serde_json::Value) -> RunReport {
        let ids = json["generated_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as u32))
                    .collect()
            })
            .unwrap_or_default();
        let steps = json["steps"].as_array().cloned().unwrap_or_default();
        let dec: Vec<&serde_json::Value> = steps.iter().skip(1).collect();
        let n = dec.len().max(1) as f64;
        let decode_ms = dec
            .iter()
            .map(|s| s["wall_ms"].as_f64().unwrap_or(0.0))
            .sum::<f64>()
            / n;
        let ranks = steps
            .last()
            .and_then(|s| s["ranks"].as_array())
            .map(|r| r.len())
            .unwrap_or(0);
        let peak_rss = (0..ranks)
            .map(|r| {
                steps
                    .last()
                    .map(|s| s["ranks"][r]["peak_rss_bytes"].as_u64().unwrap_or(0))
                    .unwrap_or(0)
            })
            .collect();
        let breakdown = (0..ranks)
            .map(|r| {
                let f = |k: &str| {
                    dec.iter()
                        .map(|s| s["ranks"][r][k].as_f64().unwrap_or(0.0))
                        .sum::<f64>()
                        / n
                };
                (
                    f("compute_ms"),
                    f("allreduce_wait_ms"),
                    f("allreduce_transfer_ms"),
                )
            })
            .collect();
        RunReport {
            json,
            ids,
            decode_ms,
            peak_rss,
            breakdown,
        }
    }
}
