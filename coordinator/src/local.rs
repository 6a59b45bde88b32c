//! `--local-cluster N`: spawns N−1 `tpi-node` processes on 127.0.0.1 with an ephemeral
//! cluster credential, and always cleans them up: on drop, on error, and when this
//! process dies (the children get SIGKILL from the kernel via PR_SET_PDEATHSIG).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tpi_node::net::{CaBundle, Credential, Role};

use crate::error::{Error, Result};

/// Spawned local nodes; killed and reaped on drop.
pub struct LocalCluster {
    children: Vec<Child>,
    /// The nodes' listen addresses, in rank order (rank 1 first).
    pub addrs: Vec<SocketAddr>,
    /// The credential the coordinator uses to reach them.
    pub credential: Credential,
    dir: PathBuf,
}

/// The `tpi-node` binary: $TPI_NODE_BIN, else beside the running executable, else on PATH.
pub fn node_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TPI_NODE_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let cand = dir.join("tpi-node");
            if cand.exists() {
                return cand;
            }
            // Test binaries live in target/<profile>/deps.
            if let Some(up) = dir.parent() {
                let cand = up.join("tpi-node");
                if cand.exists() {
                    return cand;
                }
            }
        }
    }
    PathBuf::from("tpi-node")
}

fn unique_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("tpi-local-{}-{nanos}", std::process::id()))
}

/// Makes the child started by `cmd` get SIGKILL when this process dies, however it
/// dies (Linux PR_SET_PDEATHSIG; elsewhere a no-op), so no node outlives its parent.
pub fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; the closure touches no allocator or locks.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Waits up to `timeout` for a `tpi-node serve` child (stdout and stderr piped) to print
/// its first line, `listening on ADDR`, and returns ADDR. Until then its stderr is held
/// back, so a node that fails to start is reported with what it said; afterwards both
/// streams are drained in the background (stderr passed on to ours), so the child never
/// blocks on a full pipe.
pub fn wait_for_listen(child: &mut Child, timeout: Duration) -> Result<SocketAddr> {
    let out = child.stdout.take();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        if let Some(out) = out {
            let mut r = BufReader::new(out);
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            let mut sink = String::new();
            while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        } else {
            let _ = tx.send(line);
        }
    });
    let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let err_reader = child.stderr.take().map(|err| {
        let (said, started) = (said.clone(), started.clone());
        std::thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if started.load(std::sync::atomic::Ordering::Acquire) {
                    eprint!("{line}");
                } else if let Ok(mut s) = said.lock() {
                    if s.len() < 4096 {
                        s.push_str(&line);
                    }
                }
                line.clear();
            }
        })
    });
    let line = rx.recv_timeout(timeout).ok();
    let addr = line.as_deref().and_then(|l| {
        l.trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse::<SocketAddr>().ok())
    });
    if let Some(addr) = addr {
        if let Ok(s) = said.lock() {
            eprint!("{s}");
        }
        started.store(true, std::sync::atomic::Ordering::Release);
        return Ok(addr);
    }
    // Failed: let it finish saying why (it exits, closing stderr), then report that.
    let _ = child.kill();
    let _ = child.wait();
    if let Some(h) = err_reader {
        let _ = h.join();
    }
    let said = said
        .lock()
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let said = if said.is_empty() {
        line.as_deref()
            .map(|l| l.trim().to_string())
            .unwrap_or_default()
    } else {
        said.lines().collect::<Vec<_>>().join(" / ")
    };
    Err(Error::Cluster(match line {
        None => format!("a tpi-node did not start within {timeout:?} (it said {said:?})"),
        Some(_) => format!("a tpi-node failed to start: {said}"),
    }))
}

fn spawn_node(
    bin: &Path,
    cred_dir: &Path,
    threads: usize,
    extra: &[String],
    env: &[(String, String)],
) -> Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--credential")
        .arg(cred_dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    die_with_parent(&mut cmd);
    // A process group of its own: Ctrl-C at the terminal reaches rank 0 only, which decides
    // what it means (`tpi chat` stops the reply and keeps its cluster); the nodes still die
    // with rank 0 (above).
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    cmd.spawn().map_err(|e| {
        Error::Io(format!(
            "cannot start {}: {e} (set TPI_NODE_BIN or put tpi-node on PATH)",
            bin.display()
        ))
    })
}

impl LocalCluster {
    /// Starts `nodes` node processes with `threads` threads each (and `env` added to their
    /// environment) and waits for each to listen. Node i (rank i+1) also gets
    /// `per_node[i]`'s arguments, if there are any.
    pub fn spawn(
        nodes: usize,
        threads: usize,
        extra_args: &[String],
        per_node: &[Vec<String>],
        env: &[(String, String)],
    ) -> Result<Self> {
        let dir = unique_dir();
        let io = |e: std::io::Error| Error::Io(format!("local cluster: {e}"));
        std::fs::create_dir_all(&dir).map_err(io)?;
        let ca = CaBundle::generate()?;
        let node_cred = ca.issue("tpi-node", Role::Node)?;
        let mut me = LocalCluster {
            children: Vec::new(),
            addrs: Vec::new(),
            credential: ca.issue("tpi-coordinator", Role::Coordinator)?,
            dir: dir.clone(),
        };
        let cred_dir = dir.join("node");
        node_cred.save(&cred_dir)?;
        let bin = node_binary();
        for i in 0..nodes {
            let mut args = extra_args.to_vec();
            args.extend(per_node.get(i).into_iter().flatten().cloned());
            let mut child = spawn_node(&bin, &cred_dir, threads, &args, env)?;
            let addr = wait_for_listen(&mut child, Duration::from_secs(20));
            me.children.push(child);
            let addr = addr?;
            me.addrs.push(addr);
        }
        Ok(me)
    }

    /// Process ids of the nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
