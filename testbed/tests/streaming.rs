//! Weight streaming and shard distribution, end to end: streamed output equals resident
//! output, a node's peak memory stays within its window, shards are cached, corrupt
//! blocks are caught and fetched again, foreign manifests are refused, a full disk
//! fails cleanly, and an interrupted transfer resumes.
//!
//! Every `tpi` process gets a private `TPI_CACHE` (one per test), so tests never share
//! shard caches; testbed nodes get a private `--data-dir`. Tests in this file run one
//! at a time (a process-wide lock): the big-model tests move ~0.5 GB each and the
//! machines running the suite may have 2 cores.
//!
//! The SmolLM2 tests need the model: run `scripts/fetch-model.sh` first (or set
//! `TPI_SMOLLM2_GGUF`). They fail, never skip, when it is missing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use tpi_testbed::harness::{ClusterSpec, Testbed};
use tpi_testbed::synth::{
    write_big_model, BIG_CTX, BIG_HEADS, BIG_HIDDEN, BIG_KV_HEADS, BIG_LAYERS,
};
use tpi_testbed::{
    cmdline, finish, ids, max_abs_diff, model_fixture_dirs, read_json, read_npy, run_with_limit,
    smollm2_gguf, tokens_arg, tpi_bin, TempDir,
};

/// Longest any single `tpi` command may take here.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Max |Δ logit| between a streamed and a resident run (the same kernels on the same
/// bytes: expected bitwise equal).
const STREAM_TOL: f32 = 1e-6;
/// A node's fixed memory besides weights and KV cache (tpi_node::worker::FIXED_OVERHEAD).
const FIXED_OVERHEAD: u64 = 64 << 20;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `cmd` with a wall-clock limit; returns (status, stdout, stderr). Kills it and
/// panics on timeout.
fn run_limited(cmd: Command, what: &str) -> (ExitStatus, String, String) {
    run_with_limit(cmd, RUN_TIMEOUT, what)
}

/// A `tpi` command with a private shard cache.
fn tpi_cmd(args: &[String], cache: &Path) -> Command {
    let mut c = Command::new(tpi_bin());
    c.args(args).env("TPI_CACHE", cache).env_remove("RUST_LOG");
    c
}

/// Runs `tpi` (private cache), requires success and parses its `--json` object.
fn tpi_json(args: &[String], cache: &Path) -> Value {
    let what = format!("`{}`", cmdline(args));
    let (st, out, err) = run_limited(tpi_cmd(args, cache), &what);
    assert!(
        st.success(),
        "{what} failed ({st}):\nstdout:\n{out}\nstderr:\n{err}"
    );
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("{what} printed no JSON object ({e}):\n{out}\nstderr:\n{err}"))
}

/// Runs `tpi run` against a testbed (private cache); returns (status, stdout, stderr).
fn tb_run(tb: &Testbed, model: &Path, args: &[&str], cache: &Path) -> (ExitStatus, String, String) {
    let mut cmd = tb.run_command(model, args);
    cmd.env("TPI_CACHE", cache);
    run_limited(
        cmd,
        &format!("tpi run --model {} {}", model.display(), args.join(" ")),
    )
}

/// Like [`tb_run`] but requires success and parses `--json`.
fn tb_json(tb: &Testbed, model: &Path, args: &[&str], cache: &Path) -> Value {
    let (st, out, err) = tb_run(tb, model, args, cache);
    assert!(
        st.success(),
        "tpi run {} failed ({st}):\nstdout:\n{out}\nstderr:\n{err}",
        args.join(" ")
    );
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("tpi run printed no JSON object ({e}):\n{out}\nstderr:\n{err}"))
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of integers, got {v}"))
        .iter()
        .map(|x| {
            x.as_u64()
                .unwrap_or_else(|| panic!("expected an integer, got {x}"))
        })
        .collect()
}

/// One generation's ids, logits and JSON.
struct Gen {
    ids: Vec<u32>,
    shape: (usize, usize),
    logits: Vec<f32>,
    json: Value,
}

fn gen(args: &[String], npy: &Path, cache: &Path) -> Gen {
    let mut a = args.to_vec();
    a.extend([
        "--json".into(),
        "--logits-out".into(),
        npy.display().to_string(),
    ]);
    let json = tpi_json(&a, cache);
    let (shape, logits) = read_npy(npy);
    Gen {
        ids: ids(&json["generated_ids"]),
        shape,
        logits,
        json,
    }
}

/// Streamed vs resident: same ids, logits within [`STREAM_TOL`], windows as expected.
fn compare_stream(
    label: &str,
    resident: &Gen,
    streamed: &Gen,
    world: usize,
    fails: &mut Vec<String>,
) {
    if resident.ids != streamed.ids {
        fails.push(format!(
            "{label}: ids differ\n  resident {:?}\n  streamed {:?}",
            resident.ids, streamed.ids
        ));
    }
    if resident.shape != streamed.shape {
        fails.push(format!(
            "{label}: logits shape {:?} vs {:?}",
            resident.shape, streamed.shape
        ));
    } else {
        let d = max_abs_diff(&resident.logits, &streamed.logits);
        eprintln!("{label}: logits max |Δ| streamed vs resident = {d:.3e}");
        if d > STREAM_TOL {
            fails.push(format!("{label}: logits max |Δ| {d:e} > {STREAM_TOL:e}"));
        }
    }
    let wr = u64s(&resident.json["backend"]["windows"]);
    let ws = u64s(&streamed.json["backend"]["windows"]);
    if wr != vec![0; world] {
        fails.push(format!(
            "{label}: resident run reports windows {wr:?}, expected {:?}",
            vec![0; world]
        ));
    }
    if ws != vec![2; world] {
        fails.push(format!(
            "{label}: streamed run reports windows {ws:?}, expected {:?}",
            vec![2; world]
        ));
    }
}

#[test]
fn streaming_matches_resident_for_every_fixture() {
    let _g = serial();
    let cache = TempDir::new("stream-fix-cache");
    let tmp = TempDir::new("stream-fix");
    let mut fails = Vec::new();
    for dir in model_fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let reference = read_json(&dir.join("reference.json"));
        let n_new = reference["n_new_tokens"].as_u64().expect("n_new_tokens");
        let prompt = ids(&reference["prompts"][0]["prompt_ids"]);
        let base: Vec<String> = vec![
            "run".into(),
            "--model".into(),
            dir.display().to_string(),
            "--tokens".into(),
            tokens_arg(&prompt),
            "--max-tokens".into(),
            n_new.to_string(),
            "--ignore-eos".into(),
            "--threads".into(),
            "1".into(),
        ];
        let resident = gen(&base, &tmp.join(format!("{name}_res.npy")), cache.path());
        let mut sargs = base.clone();
        sargs.extend(["--window".into(), "2".into()]);
        let streamed = gen(&sargs, &tmp.join(format!("{name}_win.npy")), cache.path());
        compare_stream(&name, &resident, &streamed, 1, &mut fails);
    }
    finish("streamed vs resident (fixtures)", fails);
}

#[test]
fn streaming_matches_resident_smollm2_on_1_2_3_nodes() {
    let _g = serial();
    let model = smollm2_gguf();
    let cache = TempDir::new("stream-smol-cache");
    let tmp = TempDir::new("stream-smol");
    let mut fails = Vec::new();
    for n in 1..=3usize {
        let base: Vec<String> = vec![
            "run".into(),
            "--model".into(),
            model.display().to_string(),
            "--tokens".into(),
            "1,504,3458,282,253,1345,314,260".into(),
            "--max-tokens".into(),
            "16".into(),
            "--ignore-eos".into(),
            "--threads".into(),
            "1".into(),
            "--node-threads".into(),
            "1".into(),
            "--local-cluster".into(),
            n.to_string(),
        ];
        let resident = gen(&base, &tmp.join(format!("n{n}_res.npy")), cache.path());
        let mut sargs = base.clone();
        sargs.extend(["--window".into(), "2".into()]);
        let streamed = gen(&sargs, &tmp.join(format!("n{n}_win.npy")), cache.path());
        compare_stream(
            &format!("SmolLM2 on {n} node(s)"),
            &resident,
            &streamed,
            n,
            &mut fails,
        );
    }
    finish("streamed vs resident (SmolLM2)", fails);
}

/// The complete (non-partial) shard directories under a node's data dir.
fn node_shard_dirs(data_dir: &Path) -> Vec<PathBuf> {
    let root = data_dir.join("shards");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("manifest.json").is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// (offset, len, is_embedding) of every block of a manifest.
fn blocks(manifest: &Value) -> Vec<(u64, u64, bool)> {
    manifest["blocks"]
        .as_array()
        .expect("manifest blocks")
        .iter()
        .map(|b| {
            (
                b["offset"].as_u64().unwrap(),
                b["len"].as_u64().unwrap(),
                b["kind"] == Value::String("Embed".into()),
            )
        })
        .collect()
}

/// Byte-compares two files; returns the first differing offset, if any.
fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let mut fa = std::fs::File::open(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let mut fb = std::fs::File::open(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    let (mut ba, mut bb) = (vec![0u8; 1 << 22], vec![0u8; 1 << 22]);
    let mut pos = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            let i = ba[..na.min(nb)]
                .iter()
                .zip(&bb[..na.min(nb)])
                .position(|(x, y)| x != y)
                .unwrap_or(na.min(nb));
            return Some(pos + i as u64);
        }
        if na == 0 {
            return None;
        }
        pos += na as u64;
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).expect("read") {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// The coordinator's copy of the shard cached under `key` in `cache`.
fn coordinator_shard(cache: &Path, key: &Path) -> PathBuf {
    cache
        .join("shards")
        .join(key.file_name().expect("shard dir name"))
        .join("shard.bin")
}

const BIG_RUN: [&str; 12] = [
    "--coordinator-share",
    "0",
    "--window",
    "2",
    "--tokens",
    "1,2,3",
    "--max-tokens",
    "4",
    "--ignore-eos",
    "--threads",
    "1",
    "--json",
];

fn node_spec(extra: &[&str]) -> ClusterSpec {
    ClusterSpec {
        ranks: 2,
        node_threads: 1,
        node_args: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn big_model_node_peak_memory_caching_and_corrupt_block_repair() {
    let _g = serial();
    let model = TempDir::new("stream-big-model");
    let bytes = write_big_model(model.path());
    eprintln!("big model: {:.1} MB of f32 tensors", bytes as f64 / 1e6);
    let cache = TempDir::new("stream-big-cache");
    let tb = Testbed::start(node_spec(&["--window", "2"])).expect("testbed");
    let mut fails = Vec::new();

    // 2. Peak memory of the node (rank 1 holds every layer).
    let j1 = tb_json(&tb, model.path(), &BIG_RUN, cache.path());
    let dirs = node_shard_dirs(&tb.nodes[0].data_dir);
    assert_eq!(
        dirs.len(),
        1,
        "node shard dirs after the first run: {dirs:?}"
    );
    let shard_dir = dirs[0].clone();
    let manifest = read_json(&shard_dir.join("manifest.json"));
    let bl = blocks(&manifest);
    let file_len = manifest["file_len"].as_u64().unwrap();
    let payload: u64 = bl.iter().map(|b| b.1).sum();
    let max_block = bl.iter().filter(|b| !b.2).map(|b| b.1).max().unwrap();
    let hd = BIG_HIDDEN / BIG_HEADS;
    let kv_bytes = (BIG_LAYERS * 2 * BIG_KV_HEADS * hd * BIG_CTX * 4) as u64;
    let bound = 2 * max_block + kv_bytes + FIXED_OVERHEAD;
    let steps = j1["steps"].as_array().expect("steps");
    let rss = steps.last().unwrap()["ranks"][1]["peak_rss_bytes"]
        .as_u64()
        .unwrap();
    let mb = |x: u64| x as f64 / (1 << 20) as f64;
    eprintln!(
        "node: shard {:.1} MiB ({} blocks), largest block {:.1} MiB, KV {:.1} MiB, \
         bound 2×block+KV+64 MiB = {:.1} MiB, 40% of shard = {:.1} MiB, peak RSS {:.1} MiB",
        mb(file_len),
        bl.len(),
        mb(max_block),
        mb(kv_bytes),
        mb(bound),
        mb(file_len * 2 / 5),
        mb(rss)
    );
    assert!(file_len >= 400_000_000, "node shard only {file_len} bytes");
    if rss == 0 || rss >= bound {
        fails.push(format!(
            "node peak RSS {:.1} MiB not within (0, {:.1} MiB)",
            mb(rss),
            mb(bound)
        ));
    }
    if rss as f64 >= 0.4 * file_len as f64 {
        fails.push(format!(
            "node peak RSS {:.1} MiB not below 40% of its {:.1} MiB shard",
            mb(rss),
            mb(file_len)
        ));
    }
    let w1 = u64s(&j1["backend"]["windows"]);
    if w1 != vec![2, 2] {
        fails.push(format!("windows {w1:?}, expected [2, 2]"));
    }
    let sent1 = u64s(&j1["backend"]["shard_bytes_sent"]);
    eprintln!("first run: shard_bytes_sent {sent1:?} (block payload {payload})");
    if sent1 != vec![payload] {
        fails.push(format!(
            "first run sent {sent1:?}, expected the whole shard payload [{payload}]"
        ));
    }
    let ids1 = ids(&j1["generated_ids"]);

    // 3. Caching: the same nodes, again: nothing is sent.
    let j2 = tb_json(&tb, model.path(), &BIG_RUN, cache.path());
    let sent2 = u64s(&j2["backend"]["shard_bytes_sent"]);
    eprintln!("second run: shard_bytes_sent {sent2:?}");
    if sent2 != vec![0] {
        fails.push(format!("second run (cached) sent {sent2:?}, expected [0]"));
    }
    if ids(&j2["generated_ids"]) != ids1 {
        fails.push(format!(
            "second run ids {:?} != first {ids1:?}",
            ids(&j2["generated_ids"])
        ));
    }

    // 4. Corrupt block 1 on the node's disk: caught by checksum, fetched again.
    let data = shard_dir.join("shard.bin");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data)
            .unwrap();
        let at = bl[1].0 + bl[1].1 / 2;
        let mut b = [0u8; 16];
        f.read_exact_at(&mut b, at).unwrap();
        for x in &mut b {
            *x ^= 0xA5;
        }
        f.write_all_at(&b, at).unwrap();
        f.sync_all().unwrap();
        eprintln!(
            "flipped 16 bytes at {at} (block 1: offset {}, len {})",
            bl[1].0, bl[1].1
        );
    }
    let (st, out, err) = tb_run(&tb, model.path(), &BIG_RUN, cache.path());
    if !st.success() {
        fails.push(format!(
            "run after corrupting block 1 failed ({st}):\n{err}"
        ));
    } else {
        let j3: Value = serde_json::from_str(out.trim()).expect("json");
        let sent3 = u64s(&j3["backend"]["shard_bytes_sent"]);
        eprintln!(
            "after corruption: shard_bytes_sent {sent3:?} (block 1 is {} bytes)",
            bl[1].1
        );
        if sent3 != vec![bl[1].1] || bl[1].1 == 0 || bl[1].1 >= payload {
            fails.push(format!(
                "after corrupting block 1: sent {sent3:?}, expected exactly block 1's {} bytes",
                bl[1].1
            ));
        }
        if ids(&j3["generated_ids"]) != ids1 {
            fails.push(format!(
                "ids after repair {:?} != {ids1:?}",
                ids(&j3["generated_ids"])
            ));
        }
        let reference = coordinator_shard(cache.path(), &shard_dir);
        let repaired = node_shard_dirs(&tb.nodes[0].data_dir);
        if repaired != vec![shard_dir.clone()] {
            fails.push(format!("node shard dirs after repair: {repaired:?}"));
        } else if let Some(at) = first_difference(&data, &reference) {
            fails.push(format!(
                "repaired {} differs from the coordinator's {} at byte {at}",
                data.display(),
                reference.display()
            ));
        }
    }
    drop(tb);
    finish("big model on a node", fails);
}

#[test]
fn foreign_manifest_is_refused() {
    let _g = serial();
    let cache = TempDir::new("stream-foreign-cache");
    let tmp = TempDir::new("stream-foreign");
    let fixtures = model_fixture_dirs();
    let model = fixtures
        .iter()
        .find(|d| d.ends_with("gqa_f32_tied"))
        .expect("gqa_f32_tied fixture")
        .clone();
    let other = fixtures
        .iter()
        .find(|d| d.ends_with("mha_f32_untied"))
        .expect("mha_f32_untied fixture")
        .clone();
    let mut fails = Vec::new();
    // (label, shard source, tpi shard split args, what the message must name)
    let cases: [(&str, &Path, [&str; 2], &str); 2] = [
        (
            "another plan (--ratios 3,1)",
            &model,
            ["--ratios", "3,1"],
            "plan",
        ),
        ("another model", &other, ["--nodes", "2"], "model"),
    ];
    for (i, (label, src, split, word)) in cases.iter().enumerate() {
        let out = tmp.join(format!("shards{i}"));
        let args: Vec<String> = ["shard", "--model", &src.display().to_string()]
            .iter()
            .map(|s| s.to_string())
            .chain(split.iter().map(|s| s.to_string()))
            .chain(["--out".to_string(), out.display().to_string()])
            .collect();
        let (st, o, e) = run_limited(tpi_cmd(&args, cache.path()), &cmdline(&args));
        assert!(st.success(), "`{}` failed: {o}\n{e}", cmdline(&args));
        let m = read_json(&out.join("rank-1").join("manifest.json"));
        let foreign_id = m[if *word == "plan" {
            "plan_id"
        } else {
            "model_id"
        }]
        .as_str()
        .unwrap()
        .to_string();
        let shard_arg = out.join("rank-1").display().to_string();
        let tb = Testbed::start(node_spec(&["--shard", &shard_arg])).expect("testbed");
        let (st, _out, err) = tb_run(
            &tb,
            &model,
            &[
                "--tokens",
                "1,2",
                "--max-tokens",
                "2",
                "--threads",
                "1",
                "--json",
            ],
            cache.path(),
        );
        eprintln!("{label}: exit {st}; stderr: {}", err.trim());
        if st.success() {
            fails.push(format!("{label}: tpi run succeeded with a foreign --shard"));
        } else if !err.contains(word) || !err.contains(&foreign_id) {
            fails.push(format!(
                "{label}: the error does not name the {word} mismatch (foreign {word} id {foreign_id}):\n{err}"
            ));
        }
    }
    finish("foreign manifests", fails);
}

/// Unmounts a tmpfs on drop (lazily if still busy).
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn find_files(dir: &Path, name: &str, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                find_files(&p, name, out);
            } else if p.file_name().is_some_and(|n| n == name) {
                out.push(p);
            }
        }
    }
}

#[test]
fn full_disk_fails_cleanly_without_a_partial_shard() {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test needs root to mount a small tmpfs (CI runs as root)"
    );
    let _g = serial();
    let model = smollm2_gguf();
    let cache = TempDir::new("stream-full-cache");
    let tb = Testbed::start(node_spec(&[])).expect("testbed");
    // The node keeps every shard under DATA_DIR/shards: make that an 8 MiB tmpfs.
    let shards = tb.nodes[0].data_dir.join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&shards)
        .status()
        .expect("mount");
    assert!(
        st.success(),
        "mount -t tmpfs on {} failed: {st}",
        shards.display()
    );
    let mount = Mount(shards.clone());
    let (st, out, err) = tb_run(
        &tb,
        &model,
        &[
            "--tokens",
            "1,2,3",
            "--max-tokens",
            "2",
            "--threads",
            "1",
            "--json",
        ],
        cache.path(),
    );
    eprintln!("full disk: exit {st}; stderr: {}", err.trim());
    let mut manifests = Vec::new();
    find_files(&shards, "manifest.json", &mut manifests);
    let mut fails = Vec::new();
    if st.success() {
        fails.push(format!("tpi run succeeded with an 8 MiB node disk:\n{out}"));
    }
    let lower = err.to_lowercase();
    if !(lower.contains("disk space") || lower.contains("no space")) {
        fails.push(format!("the error does not name disk space:\n{err}"));
    }
    if !manifests.is_empty() {
        fails.push(format!(
            "manifest(s) written for a partial shard: {manifests:?}"
        ));
    }
    drop(tb);
    drop(mount);
    finish("full disk", fails);
}

#[test]
fn interrupted_transfer_resumes() {
    let _g = serial();
    let model = TempDir::new("stream-resume-model");
    write_big_model(model.path());
    let cache = TempDir::new("stream-resume-cache");
    let tb = Testbed::start(node_spec(&["--window", "2"])).expect("testbed");
    let partial_root = tb.nodes[0].data_dir.join("shards");
    let mut child = {
        let mut c = tb.run_command(model.path(), &BIG_RUN);
        c.env("TPI_CACHE", cache.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c.spawn().expect("spawn tpi run")
    };
    // Kill the coordinator once the node has recorded progress (a whole block).
    let t0 = Instant::now();
    let progress = loop {
        let found = std::fs::read_dir(&partial_root).ok().and_then(|rd| {
            rd.flatten().map(|e| e.path()).find(|p| {
                p.to_string_lossy().ends_with(".partial") && p.join("progress.json").is_file()
            })
        });
        if let Some(p) = found {
            break p.join("progress.json");
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("tpi run ended ({st}) before the node recorded any transfer progress");
        }
        assert!(
            t0.elapsed() < RUN_TIMEOUT,
            "no transfer progress within {RUN_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = child.kill();
    let _ = child.wait();
    let killed_at = t0.elapsed();
    // Give the node time to notice (QUIC idle timeout 1.5 s) and checkpoint its progress.
    std::thread::sleep(Duration::from_secs(3));
    let prog = std::fs::read_to_string(&progress).unwrap_or_default();
    eprintln!("killed tpi run after {killed_at:?}; node progress: {prog}");
    let have: u64 = serde_json::from_str::<Value>(&prog)
        .ok()
        .and_then(|p| {
            p["have"]
                .as_object()
                .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        })
        .unwrap_or(0);
    assert!(
        node_shard_dirs(&tb.nodes[0].data_dir).is_empty(),
        "the transfer completed before the kill: the test could not interrupt it"
    );

    // Run again (the node may still be winding down the killed session: retry while busy).
    let t1 = Instant::now();
    let j = loop {
        let (st, out, err) = tb_run(&tb, model.path(), &BIG_RUN, cache.path());
        if st.success() {
            break serde_json::from_str::<Value>(out.trim()).expect("json");
        }
        if err.contains("busy") && t1.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        panic!("the resumed run failed ({st}):\n{err}");
    };
    let dirs = node_shard_dirs(&tb.nodes[0].data_dir);
    assert_eq!(
        dirs.len(),
        1,
        "node shard dirs after the resumed run: {dirs:?}"
    );
    let manifest = read_json(&dirs[0].join("manifest.json"));
    let payload: u64 = blocks(&manifest).iter().map(|b| b.1).sum();
    let sent = u64s(&j["backend"]["shard_bytes_sent"]);
    eprintln!("resumed run: shard_bytes_sent {sent:?} of a {payload}-byte shard payload");
    let mut fails = Vec::new();
    if sent.len() != 1 || sent[0] == 0 || sent[0] >= payload {
        fails.push(format!(
            "resumed run sent {sent:?}: expected more than 0 and less than the {payload}-byte shard"
        ));
    } else if sent[0] > payload - have {
        fails.push(format!(
            "resumed run sent {} bytes, more than the {} the node still lacked ({have} recorded in progress.json)",
            sent[0],
            payload - have
        ));
    }
    let reference = coordinator_shard(cache.path(), &dirs[0]);
    if let Some(at) = first_difference(&dirs[0].join("shard.bin"), &reference) {
        fails.push(format!(
            "resumed shard differs from the coordinator's at byte {at}"
        ));
    }
    // Output: the same as this model on one device, fully resident.
    let single: Vec<String> = [
        "run",
        "--model",
        &model.path().display().to_string(),
        "--tokens",
        "1,2,3",
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--threads",
        "1",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let one = tpi_json(&single, cache.path());
    let (got, want) = (ids(&j["generated_ids"]), ids(&one["generated_ids"]));
    eprintln!("resumed ids {got:?}, one-device ids {want:?}");
    if got != want {
        fails.push(format!(
            "resumed run ids {got:?} != one-device ids {want:?}"
        ));
    }
    drop(tb);
    finish("resumed transfer", fails);
}

/// `tpi run` of SmolLM2 (`model`) on `tokens`, greedy, `max` tokens, one compute thread,
/// then `extra` flags.
fn smol_run(model: &Path, tokens: &str, max: &str, extra: &[&str]) -> Vec<String> {
    let model = model.display().to_string();
    let base = [
        "run",
        "--model",
        &model,
        "--tokens",
        tokens,
        "--max-tokens",
        max,
        "--ignore-eos",
        "--threads",
        "1",
    ];
    base.iter().chain(extra).map(|s| s.to_string()).collect()
}

/// Whether `tpi` here computes with the AVX-512 VNNI kernel (this CPU has it and no
/// `TPI_ISA` pins another path), so one-device and cluster runs pack their Q4 shards.
fn runs_vnni_kernel() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains("avx512_vnni"))
        && std::env::var("TPI_ISA").is_err()
}

#[test]
fn packed_and_ggml_shards_give_identical_logits() {
    // The packed Q4 layout regroups bytes, never arithmetic: SmolLM2 (Q4_1, and re-quantised
    // to Q4_0, whose rows use octets) on 2 nodes gives bitwise the same logits from packed
    // shards as from GGML ones, on whatever path this CPU takes (the VNNI kernel reads packed
    // rows, the others unpack them).
    let _g = serial();
    let model = smollm2_gguf();
    let cache = TempDir::new("packed-cache");
    let tmp = TempDir::new("packed");
    let mut fails = Vec::new();
    for quant in ["keep", "q4_0"] {
        let mut runs = Vec::new();
        for layout in ["ggml", "packed"] {
            let out = tmp.join(format!("{quant}-{layout}"));
            let args: Vec<String> = [
                "shard",
                "--model",
                &model.display().to_string(),
                "--nodes",
                "2",
                "--quant",
                quant,
                "--layout",
                layout,
                "--out",
                &out.display().to_string(),
            ]
            .map(String::from)
            .to_vec();
            let what = format!("`{}`", cmdline(&args));
            let (st, so, se) = run_limited(tpi_cmd(&args, cache.path()), &what);
            assert!(st.success(), "{what} failed ({st}):\n{so}\n{se}");
            for r in 0..2 {
                let m = read_json(&out.join(format!("rank-{r}/manifest.json")));
                assert_eq!(m["layout"], layout, "{quant} rank {r} manifest");
                let tensors = m["blocks"]
                    .as_array()
                    .expect("blocks")
                    .iter()
                    .flat_map(|b| b["tensors"].as_array().expect("tensors").clone());
                let packed = tensors.filter(|t| t["layout"] == "packed").count();
                assert_eq!(packed > 0, layout == "packed", "{quant} {layout} rank {r}");
            }
            let shards = out.display().to_string();
            let run = smol_run(
                &model,
                "1,504,3458,282,253,1345,314,260",
                "8",
                &[
                    "--node-threads",
                    "1",
                    "--local-cluster",
                    "2",
                    "--shards",
                    &shards,
                ],
            );
            runs.push(gen(
                &run,
                &tmp.join(format!("{quant}-{layout}.npy")),
                cache.path(),
            ));
        }
        let (g, p) = (&runs[0], &runs[1]);
        let d = max_abs_diff(&g.logits, &p.logits);
        eprintln!("{quant}: logits max |Δ| packed vs ggml = {d:e}");
        if g.ids != p.ids || g.shape != p.shape || d != 0.0 {
            fails.push(format!(
                "{quant}: packed shards differ from ggml ones: ids {:?} vs {:?}, max |Δ| {d:e}",
                g.ids, p.ids
            ));
        }
    }
    finish("packed vs ggml shards", fails);
}

#[test]
fn one_device_q4_run_reads_a_packed_shard_or_falls_back_to_the_file() {
    // On a machine running the VNNI kernel, a plain one-device run of a Q4 model writes a
    // packed one-rank shard into the cache and reads that; if the cache cannot be written it
    // warns and reads the model file in place. The output is the same either way.
    let _g = serial();
    let model = smollm2_gguf();
    let tmp = TempDir::new("packed-1dev");
    let vnni = runs_vnni_kernel();
    let args = smol_run(&model, "1,504,3458,282,253,1345,314,260", "8", &["--json"]);
    let cache = tmp.join("cache");
    let good = tpi_json(&args, &cache);
    let written = std::fs::read_dir(cache.join("shards")).map_or(0, |d| d.count());
    assert_eq!(
        written > 0,
        vnni,
        "packed shard written: {written} entries, vnni: {vnni}"
    );
    // A cache path under a regular file cannot be created.
    let blocker = tmp.join("file");
    std::fs::write(&blocker, b"x").expect("write blocker");
    let what = "tpi run with an unwritable cache";
    let (st, out, err) = run_limited(tpi_cmd(&args, &blocker.join("cache")), what);
    assert!(st.success(), "{what} failed ({st}):\n{out}\n{err}");
    assert_eq!(
        err.contains("reading the model file in place"),
        vnni,
        "{err}"
    );
    let v: Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(ids(&v["generated_ids"]), ids(&good["generated_ids"]));
}

#[test]
fn each_rank_shard_is_laid_out_for_the_kernels_its_node_reports() {
    // Nodes say which kernel path they compute with; the coordinator packs a rank's Q4
    // shard only for the AVX-512 VNNI kernel. Pinning every process to AVX2 gives GGML
    // shards; the machine's own path gives packed ones where it has VNNI.
    let _g = serial();
    let model = smollm2_gguf();
    let tmp = TempDir::new("layout-per-rank");
    let vnni = runs_vnni_kernel();
    let args = smol_run(
        &model,
        "1,504,3458",
        "2",
        &["--node-threads", "1", "--local-cluster", "2", "--json"],
    );
    for (pin, want_packed) in [(Some("avx2"), false), (None, vnni)] {
        let cache = tmp.join(format!("cache-{}", pin.unwrap_or("own")));
        let mut cmd = tpi_cmd(&args, &cache);
        if let Some(isa) = pin {
            cmd.env("TPI_ISA", isa);
        }
        let what = format!("tpi run --local-cluster 2 (TPI_ISA={pin:?})");
        let (st, out, err) = run_limited(cmd, &what);
        assert!(st.success(), "{what} failed ({st}):\n{out}\n{err}");
        let names: Vec<String> = std::fs::read_dir(cache.join("shards"))
            .expect("shard cache")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        // One shard per rank, in the coordinator's cache.
        assert_eq!(names.len(), 2, "{names:?}");
        for n in &names {
            assert_eq!(n.contains("-packed-"), want_packed, "{what}: {names:?}");
        }
    }
}

/// `tpi plan --shards DIR` sizes the plan by the shards' weight type, not the model's:
/// SmolLM2 (Q4_1, 0.625 bytes a weight) sharded to Q8_0 (34 bytes per 32 weights).
#[test]
fn plan_reads_the_weight_type_of_the_given_shards() {
    let _g = serial();
    let model = smollm2_gguf();
    let cache = TempDir::new("plan-shards-cache");
    let tmp = TempDir::new("plan-shards");
    let out = tmp.join("q8");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let m = model.display().to_string();
    let o = out.display().to_string();
    let shard = s(&[
        "shard", "--model", &m, "--nodes", "2", "--quant", "q8_0", "--out", &o,
    ]);
    let what = format!("`{}`", cmdline(&shard));
    let (st, so, se) = run_limited(tpi_cmd(&shard, cache.path()), &what);
    assert!(st.success(), "{what} failed ({st}):\n{so}\n{se}");
    let plan = s(&["plan", "--model", &m, "--shards", &o, "--ratios", "1,1"]);
    let what = format!("`{}`", cmdline(&plan));
    let (st, so, se) = run_limited(tpi_cmd(&plan, cache.path()), &what);
    assert!(st.success(), "{what} failed ({st}):\n{so}\n{se}");
    assert!(
        so.contains("1.06") && so.contains("bytes/weight"),
        "{what} should size Q8_0 shards at 1.0625 bytes a weight:\n{so}"
    );
    // Without --shards the same command sizes the model file's own Q4_1.
    let plain = s(&["plan", "--model", &m, "--ratios", "1,1"]);
    let (st, so, se) = run_limited(tpi_cmd(&plain, cache.path()), "`tpi plan`");
    assert!(st.success(), "tpi plan failed ({st}):\n{so}\n{se}");
    assert!(so.contains("0.625 bytes/weight"), "{so}");
}

#[test]
fn a_shard_cache_too_small_is_refused_before_writing() {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test needs root to mount a small tmpfs (CI runs as root)"
    );
    let _g = serial();
    let cache = TempDir::new("stream-small-cache");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(cache.path())
        .status()
        .expect("mount");
    assert!(
        st.success(),
        "mount -t tmpfs on {} failed: {st}",
        cache.path().display()
    );
    let _mount = Mount(cache.path().to_path_buf());
    let out = Command::new(tpi_bin())
        .args(["run", "--model"])
        .arg(smollm2_gguf())
        .args([
            "--tokens",
            "1,2,3",
            "--max-tokens",
            "1",
            "--local-cluster",
            "2",
            "--threads",
            "1",
        ])
        .env("TPI_CACHE", cache.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("tpi runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "tpi run succeeded with an 8 MiB cache"
    );
    assert!(
        err.contains("GB free") && err.contains("need about") && !err.contains("panicked"),
        "the error should say what the shards need and what is free:\n{err}"
    );
    let mut written = Vec::new();
    find_files(cache.path(), "shard.bin", &mut written);
    find_files(cache.path(), "shard.bin.tmp", &mut written);
    assert!(
        written.is_empty(),
        "shard files were written before the refusal: {written:?}"
    );
}
