//! Node discovery over mDNS.
//!
//! - Two `tpi-node serve` processes are found by `tpi nodes` with the right ids and
//!   addresses. As root with `ip` available, each node runs in its own network namespace
//!   and the browser in a third, joined by veth pairs on a bridge (10.x addresses exist
//!   only inside those namespaces, which are always torn down). Otherwise both nodes
//!   listen on 127.0.0.1 (also forced by TPI_TEST_NO_NETNS=1). The mode that ran is printed.
//! - A duplicate id (one node's `node-id` copied into another's data dir) is reported by
//!   the browser and by the node.
//! - A spoofed advert (pointing at a port where no credentialed node listens) makes
//!   `tpi run --nodes auto` fail quickly with an error naming it.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use tpi_node::net::wire::PROTOCOL_VERSION;
use tpi_testbed::{model_fixture_dirs, tpi_bin, tpi_node_bin, TempDir};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A cluster CA plus one credential per node name.
struct Creds {
    dir: TempDir,
}

impl Creds {
    fn new(names: &[&str]) -> Creds {
        let dir = TempDir::new("disc-cred");
        let ca = dir.join("ca-root");
        run_ok(&[
            "cluster".as_ref(),
            "init".as_ref(),
            "--dir".as_ref(),
            ca.as_os_str(),
        ]);
        for n in names {
            let out = dir.join(n);
            run_ok(&[
                "cluster".as_ref(),
                "issue".as_ref(),
                "--dir".as_ref(),
                ca.as_os_str(),
                "--name".as_ref(),
                n.as_ref(),
                "--out".as_ref(),
                out.as_os_str(),
            ]);
        }
        Creds { dir }
    }
    fn node(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn coordinator(&self) -> PathBuf {
        self.dir.join("ca-root").join("credential")
    }
}

fn run_ok(args: &[&std::ffi::OsStr]) -> Output {
    let o = Command::new(tpi_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run tpi");
    assert!(
        o.status.success(),
        "tpi {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A running node; killed on drop. Stderr is collected in the background.
struct Node {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Node {
    /// Starts `tpi-node serve`, optionally inside network namespace `ns`.
    fn start(ns: Option<&str>, listen: &str, data_dir: &Path, cred: &Path, name: &str) -> Node {
        let node = tpi_node_bin();
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&node);
                c
            }
            None => Command::new(&node),
        };
        cmd.args([
            "serve",
            "--listen",
            listen,
            "--threads",
            "1",
            "--advertise-name",
            name,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--credential")
        .arg(cred)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tpi-node");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).expect("read node stdout");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "node did not announce its address: {line:?}; stderr: {}",
                    stderr.lock().unwrap()
                )
            });
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
        });
        Node {
            child,
            addr,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `data_dir/node-id` (written by the node at startup).
fn wait_node_id(data_dir: &Path) -> String {
    let p = data_dir.join("node-id");
    let t = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(&p) {
            if s.trim().len() == 32 {
                return s.trim().to_string();
            }
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no {}", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tpi nodes --json` (optionally in namespace `ns`), retried until `done` holds.
fn browse_until(ns: Option<&str>, done: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(tpi_bin());
                c
            }
            None => Command::new(tpi_bin()),
        };
        let o = cmd
            .args(["nodes", "--json", "--timeout", "2s"])
            .env_remove("RUST_LOG")
            .output()
            .expect("run tpi nodes");
        assert!(
            o.status.success(),
            "tpi nodes failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&o.stdout).expect("tpi nodes --json output");
        if done(&v) || t.elapsed() > Duration::from_secs(30) {
            return v;
        }
    }
}

fn find<'a>(v: &'a Value, id: &str) -> Vec<&'a Value> {
    v["nodes"]
        .as_array()
        .map(|a| a.iter().filter(|n| n["id"] == id).collect())
        .unwrap_or_default()
}

/// Network namespaces joined by a bridge; deleted on drop (with everything in them).
struct Netns {
    names: Vec<String>,
}

impl Netns {
    fn ip(args: &[&str]) -> Result<(), String> {
        let o = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if o.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
    }

    /// Namespaces `<tag>-a`, `<tag>-b` (nodes, 10.S.T.1 and .2) and `<tag>-c` (browser,
    /// .3, holding the bridge). None when namespaces cannot be made here.
    fn create(subnet: &str) -> Result<Netns, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        if std::env::var_os("TPI_TEST_NO_NETNS").is_some() {
            return Err("TPI_TEST_NO_NETNS is set".into());
        }
        let tag = format!("tpid{}", std::process::id() % 100_000);
        let mut ns = Netns { names: Vec::new() };
        for s in ["a", "b", "c"] {
            let n = format!("{tag}-{s}");
            Self::ip(&["netns", "add", &n])?;
            ns.names.push(n);
        }
        let (a, b, c) = (
            ns.names[0].clone(),
            ns.names[1].clone(),
            ns.names[2].clone(),
        );
        let setup = || -> Result<(), String> {
            for n in [&a, &b, &c] {
                Self::ip(&["-n", n, "link", "set", "lo", "up"])?;
            }
            Self::ip(&["-n", &c, "link", "add", "br0", "type", "bridge"])?;
            Self::ip(&["-n", &c, "link", "set", "br0", "up"])?;
            for (i, n) in [&a, &b].iter().enumerate() {
                let peer = format!("p{i}");
                // Create the pair inside `c`, then move one end into the node's namespace.
                Self::ip(&[
                    "-n", &c, "link", "add", "eth0", "type", "veth", "peer", "name", &peer,
                ])?;
                Self::ip(&["-n", &c, "link", "set", "eth0", "netns", n])?;
                Self::ip(&["-n", &c, "link", "set", &peer, "master", "br0"])?;
                Self::ip(&["-n", &c, "link", "set", &peer, "up"])?;
                let addr = format!("{subnet}.{}/24", i + 1);
                Self::ip(&["-n", n, "addr", "add", &addr, "dev", "eth0"])?;
                Self::ip(&["-n", n, "link", "set", "eth0", "up"])?;
            }
            Self::ip(&[
                "-n",
                &c,
                "addr",
                "add",
                &format!("{subnet}.3/24"),
                "dev",
                "br0",
            ])?;
            Ok(())
        };
        setup()?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            if let Err(e) = Self::ip(&["netns", "del", n]) {
                eprintln!("warning: cannot delete namespace {n}: {e}");
            }
        }
    }
}

#[test]
fn two_nodes_are_found_with_their_addresses() {
    let _g = serial();
    let creds = Creds::new(&["n1", "n2"]);
    let data = TempDir::new("disc-data");
    let (d1, d2) = (data.join("n1"), data.join("n2"));
    let subnet = format!(
        "10.{}.{}",
        200 + std::process::id() % 50,
        std::process::id() % 250
    );
    let netns = match Netns::create(&subnet) {
        Ok(ns) => Some(ns),
        Err(e) => {
            eprintln!("network namespaces unavailable ({e}); using loopback");
            None
        }
    };
    let (ns_a, ns_b, ns_c) = match &netns {
        Some(n) => (
            Some(n.names[0].as_str()),
            Some(n.names[1].as_str()),
            Some(n.names[2].as_str()),
        ),
        None => (None, None, None),
    };
    let mode = if netns.is_some() {
        format!("netns ({subnet}.0/24: nodes in 2 namespaces, browser in a third, bridged)")
    } else {
        "loopback (127.0.0.1)".to_string()
    };
    println!("discovery test mode: {mode}");
    eprintln!("discovery test mode: {mode}");
    // Node a listens on every address (advertises the host's), b on a specific one.
    let (la, lb) = if netns.is_some() {
        ("0.0.0.0:7070".to_string(), format!("{subnet}.2:7071"))
    } else {
        ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string())
    };
    let a = Node::start(ns_a, &la, &d1, &creds.node("n1"), "node-a");
    let b = Node::start(ns_b, &lb, &d2, &creds.node("n2"), "node-b");
    let (id_a, id_b) = (wait_node_id(&d1), wait_node_id(&d2));
    assert_ne!(id_a, id_b);
    let want_a: SocketAddr = if netns.is_some() {
        format!("{subnet}.1:7070").parse().unwrap()
    } else {
        a.addr
    };
    let want_b = b.addr;
    let v = browse_until(ns_c, |v| {
        find(v, &id_a).len() == 1 && find(v, &id_b).len() == 1
    });
    for (id, want, name, node) in [(&id_a, want_a, "node-a", &a), (&id_b, want_b, "node-b", &b)] {
        let f = find(&v, id);
        assert_eq!(
            f.len(),
            1,
            "node {id} ({name}) not found once: {v:#}\nnode stderr:\n{}",
            node.stderr()
        );
        assert_eq!(f[0]["addr"], want.to_string(), "{v:#}");
        assert_eq!(f[0]["name"], name);
        assert_eq!(f[0]["proto"], PROTOCOL_VERSION);
        assert_eq!(f[0]["cores"], 1);
        assert!(f[0]["ram"].as_u64().unwrap() > 0);
        assert!(f[0]["disk_free"].as_u64().unwrap() > 0);
        assert!(f[0]["gemv_gbs"].as_f64().unwrap() > 0.0);
    }
    assert!(
        v["warnings"].as_array().unwrap().iter().all(|w| {
            let w = w.as_str().unwrap();
            !w.contains(&id_a) && !w.contains(&id_b)
        }),
        "{v:#}"
    );
    drop((a, b));
    drop(netns);
}

#[test]
fn duplicate_node_id_is_reported() {
    let _g = serial();
    let creds = Creds::new(&["n1", "n2"]);
    let data = TempDir::new("disc-dup");
    let (d1, d2) = (data.join("n1"), data.join("n2"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let a = Node::start(None, "127.0.0.1:0", &d1, &creds.node("n1"), "dup-a");
    let id = wait_node_id(&d1);
    // The clone: node a's identity copied into b's data dir.
    std::fs::copy(d1.join("node-id"), d2.join("node-id")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let b = Node::start(None, "127.0.0.1:0", &d2, &creds.node("n2"), "dup-b");
    assert_eq!(wait_node_id(&d2), id);
    let dup = |v: &Value| {
        v["warnings"].as_array().is_some_and(|w| {
            w.iter().any(|w| {
                let w = w.as_str().unwrap_or("");
                w.contains(&format!("duplicate node id {id}"))
                    && w.contains(&a.addr.to_string())
                    && w.contains(&b.addr.to_string())
            })
        })
    };
    let v = browse_until(None, dup);
    assert!(
        dup(&v),
        "browser did not report the duplicate id {id} ({} and {}): {v:#}",
        a.addr,
        b.addr
    );
    // The nodes themselves warn too (each browses briefly after announcing).
    let t = Instant::now();
    while !(a.stderr().contains("DUPLICATE NODE ID") || b.stderr().contains("DUPLICATE NODE ID")) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "neither node warned about the duplicate id:\n--- a\n{}\n--- b\n{}",
            a.stderr(),
            b.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A fake advert published from this process; withdrawn on drop.
struct Spoof {
    daemon: mdns_sd::ServiceDaemon,
    fullname: String,
}

impl Spoof {
    fn publish(id: &str, port: u16) -> Spoof {
        let daemon = mdns_sd::ServiceDaemon::new().expect("mdns daemon");
        daemon
            .enable_interface(mdns_sd::IfKind::LoopbackV4)
            .expect("enable loopback");
        let proto = PROTOCOL_VERSION.to_string();
        let props = [
            ("id", id),
            ("proto", proto.as_str()),
            ("cores", "64"),
            ("ram", "68719476736"),
            ("disk_free", "1000000000000"),
            // The fastest node on the network, so `--nodes auto --n 2` picks it.
            ("gemv_gbs", "100000"),
            ("shards", "0"),
            ("name", "spoofed"),
        ];
        let info = mdns_sd::ServiceInfo::new(
            "_tpi._udp.local.",
            id,
            &format!("tpi-{id}.local."),
            "127.0.0.1",
            port,
            &props[..],
        )
        .expect("service info");
        let fullname = info.get_fullname().to_string();
        daemon.register(info).expect("register spoof");
        Spoof { daemon, fullname }
    }
}

impl Drop for Spoof {
    fn drop(&mut self) {
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(Duration::from_secs(2));
        }
    }
}

#[test]
fn spoofed_advert_fails_fast_naming_the_address() {
    let _g = serial();
    let creds = Creds::new(&[]);
    // A UDP port nobody answers on: bound here (so nothing else takes it) and never read.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    let id = "5b00f5b00f5b00f5b00f5b00f5b00f00";
    let _spoof = Spoof::publish(id, port);
    let v = browse_until(None, |v| !find(v, id).is_empty());
    assert!(!find(&v, id).is_empty(), "spoofed advert not seen: {v:#}");
    let model = model_fixture_dirs()[0].clone();
    let t = Instant::now();
    let mut child = Command::new(tpi_bin())
        .args(["run", "--nodes", "auto", "--n", "2", "--threads", "1"])
        .arg("--model")
        .arg(&model)
        .arg("--credential")
        .arg(creds.coordinator())
        .args(["--tokens", "1,2,3", "--max-tokens", "1"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let limit = Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`tpi run --nodes auto` hung on a spoofed advert for {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        !status.success(),
        "run against a spoofed advert succeeded?\n{err}"
    );
    let where_ = format!("127.0.0.1:{port}");
    assert!(
        err.contains(&where_),
        "error does not name the spoofed address {where_}:\n{err}"
    );
    let low = err.to_lowercase();
    assert!(
        [
            "tls",
            "handshake",
            "timed out",
            "timeout",
            "unreachable",
            "connect",
            "refused"
        ]
        .iter()
        .any(|k| low.contains(k)),
        "not a TLS/unreachable error:\n{err}"
    );
    eprintln!(
        "spoofed advert rejected in {:?}: {}",
        t.elapsed(),
        err.trim()
    );
    drop(sock);
}
