//! Weight-streaming benchmark (not a test): a random-weight F32 model of ≈ 490 MB on one
//! device, `tpi run --window 2` vs fully resident, 8 decode tokens.
//!
//! Prints: the shard file's cold sequential read bandwidth (page cache dropped with
//! posix_fadvise, read with 8 MiB reads), token latency streamed vs resident vs the
//! disk-read limit (streamed bytes per token ÷ bandwidth), their ratio (target ≤ 1.3×),
//! time waiting on blocks vs step time, bytes read from disk per token, and the peak
//! RSS of `tpi shard` against the model size.
//!
//! Run: `cargo build --workspace --release --bins &&
//!       cargo run --release -p tpi-testbed --example stream_bench`

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use tpi_testbed::synth::{BIG_HIDDEN, BIG_INTER, BIG_LAYERS};

use serde_json::Value;
use tpi_testbed::{tpi_bin, TempDir};

const DECODE: usize = 8;

fn tpi(args: &[&str], cache: &Path) -> (String, String) {
    let out = Command::new(tpi_bin())
        .args(args)
        .env("TPI_CACHE", cache)
        .env_remove("RUST_LOG")
        .output()
        .expect("run tpi");
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(
        out.status.success(),
        "tpi {args:?} failed ({}):\n{o}\n{e}",
        out.status
    );
    (o, e)
}

/// How the cold read is issued.
#[derive(Clone, Copy)]
enum ReadMode {
    /// Plain read() calls of `chunk` bytes.
    Plain,
    /// POSIX_FADV_SEQUENTIAL (larger kernel readahead), then read() calls.
    Sequential,
    /// posix_fadvise WILLNEED on the next chunk before reading the current one
    /// (asynchronous readahead in flight, as the window's prefetcher does with madvise).
    WillNeedAhead,
}

/// Drops the file's pages from the page cache, then reads it all with `chunk`-byte
/// reads: bytes/s.
fn cold_read_bandwidth(p: &Path, chunk: usize, mode: ReadMode) -> (f64, u64) {
    use std::os::fd::AsRawFd;
    let mut f = std::fs::File::open(p).unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: plain syscalls on a valid fd; advisory only.
    let r = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise failed");
    let len = f.metadata().unwrap().len();
    let mut buf = vec![0u8; chunk];
    let t0 = Instant::now();
    match mode {
        ReadMode::Plain => {}
        ReadMode::Sequential => unsafe {
            libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        },
        ReadMode::WillNeedAhead => unsafe {
            libc::posix_fadvise(fd, 0, chunk as libc::off_t, libc::POSIX_FADV_WILLNEED);
        },
    }
    let mut n = 0u64;
    loop {
        if let ReadMode::WillNeedAhead = mode {
            let next = n + chunk as u64;
            if next < len {
                // SAFETY: as above.
                unsafe {
                    libc::posix_fadvise(
                        fd,
                        next as libc::off_t,
                        chunk as libc::off_t,
                        libc::POSIX_FADV_WILLNEED,
                    )
                };
            }
        }
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    let s = t0.elapsed().as_secs_f64();
    // Leave the page cache cold for the runs.
    // SAFETY: as above.
    unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
    (n as f64 / s, n)
}

struct RunStats {
    ids: Vec<u64>,
    decode_ms: f64,
    wait_ms: f64,
    read_bytes: f64,
    peak_rss: u64,
    windows: Value,
}

fn run(model: &Path, cache: &Path, max_tokens: usize, extra: &[&str]) -> RunStats {
    let m = model.display().to_string();
    let n = max_tokens.to_string();
    let mut args = vec![
        "run",
        "--model",
        &m,
        "--tokens",
        "1,2,3",
        "--max-tokens",
        &n,
        "--ignore-eos",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (out, _) = tpi(&args, cache);
    let j: Value = serde_json::from_str(out.trim()).expect("json");
    let steps = j["steps"].as_array().unwrap();
    let dec = &steps[1..];
    let k = dec.len().max(1) as f64;
    let f = |key: &str| {
        dec.iter()
            .map(|s| s["ranks"][0][key].as_f64().unwrap_or(0.0))
            .sum::<f64>()
            / k
    };
    RunStats {
        ids: j["generated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect(),
        decode_ms: dec
            .iter()
            .map(|s| s["wall_ms"].as_f64().unwrap())
            .sum::<f64>()
            / k,
        wait_ms: f("disk_wait_ms"),
        read_bytes: f("disk_read_bytes"),
        peak_rss: steps.last().unwrap()["ranks"][0]["peak_rss_bytes"]
            .as_u64()
            .unwrap_or(0),
        windows: j["backend"]["windows"].clone(),
    }
}

fn main() {
    let mib = |x: f64| x / (1 << 20) as f64;
    let model = TempDir::new("stream-bench-model");
    let cache = TempDir::new("stream-bench-cache");
    let t0 = Instant::now();
    let model_bytes = tpi_testbed::synth::write_big_model(model.path());
    println!(
        "model: {:.1} MiB f32 ({BIG_LAYERS} layers, hidden {BIG_HIDDEN}, ffn {BIG_INTER}) written in {:.1} s; tpi = {}",
        mib(model_bytes as f64),
        t0.elapsed().as_secs_f64(),
        tpi_bin().display()
    );

    // `tpi shard`: peak RSS vs model size (its own report line, and /usr/bin/time -v if present).
    let out_dir = TempDir::new("stream-bench-shard");
    let m = model.path().display().to_string();
    let o = out_dir.path().display().to_string();
    let shard_args = ["shard", "--model", &m, "--nodes", "1", "--out", &o];
    let (so, _) = tpi(&shard_args, cache.path());
    let shard_line = so
        .lines()
        .find(|l| l.contains("peak RSS"))
        .unwrap_or("(no peak RSS line)")
        .trim()
        .to_string();
    let time_v = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(tpi_bin())
        .args([
            "shard",
            "--model",
            &m,
            "--nodes",
            "1",
            "--out",
            &format!("{o}-2"),
        ])
        .env("TPI_CACHE", cache.path())
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .find(|l| l.contains("Maximum resident set size"))
                .and_then(|l| l.rsplit(':').next())
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
    let _ = std::fs::remove_dir_all(format!("{o}-2"));

    // Make the one-device shard (the cache), then measure the cold read bandwidth of it.
    let resident_warm = run(model.path(), cache.path(), 1, &["--window", "2"]);
    drop(resident_warm);
    let shard_dir = std::fs::read_dir(cache.path().join("shards"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("manifest.json").is_file())
        .expect("cached shard");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(shard_dir.join("manifest.json")).unwrap()).unwrap();
    let streamed_bytes: u64 = manifest["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] != Value::String("Embed".into()))
        .map(|b| b["len"].as_u64().unwrap())
        .sum();
    let shard_bin = shard_dir.join("shard.bin");
    let file_len = std::fs::metadata(&shard_bin).unwrap().len();
    let modes = [
        ("read() 8 MiB", 8usize << 20, ReadMode::Plain),
        (
            "read() 64 MiB + FADV_SEQUENTIAL",
            64 << 20,
            ReadMode::Sequential,
        ),
        (
            "read() 48 MiB + WILLNEED next 48 MiB",
            48 << 20,
            ReadMode::WillNeedAhead,
        ),
    ];
    let before: Vec<f64> = modes
        .iter()
        .map(|&(_, c, m)| cold_read_bandwidth(&shard_bin, c, m).0)
        .collect();
    let streamed = run(model.path(), cache.path(), DECODE, &["--window", "2"]);
    let resident = run(model.path(), cache.path(), DECODE, &[]);
    let after: Vec<f64> = modes
        .iter()
        .map(|&(_, c, m)| cold_read_bandwidth(&shard_bin, c, m).0)
        .collect();
    let bw_mean = (before[0] + after[0]) / 2.0;
    let limit_ms = streamed_bytes as f64 / bw_mean * 1e3;
    let best = before.iter().chain(&after).cloned().fold(0.0, f64::max);
    let best_limit_ms = streamed_bytes as f64 / best * 1e3;

    println!();
    println!("| quantity | value |");
    println!("|---|---|");
    println!(
        "| shard file | {:.1} MiB; streamed blocks {:.1} MiB/token |",
        mib(file_len as f64),
        mib(streamed_bytes as f64)
    );
    for (i, (name, _, _)) in modes.iter().enumerate() {
        println!(
            "| cold sequential read, {name}, before / after runs | {:.0} / {:.0} MiB/s |",
            mib(before[i]),
            mib(after[i])
        );
    }
    println!(
        "| disk-read limit per token (bytes ÷ mean 8 MiB-read bandwidth) | {limit_ms:.1} ms |"
    );
    println!(
        "| disk-read limit per token (bytes ÷ best bandwidth above) | {best_limit_ms:.1} ms |"
    );
    println!(
        "| decode latency, --window 2 (windows {}) | {:.1} ms/token |",
        streamed.windows, streamed.decode_ms
    );
    println!(
        "| decode latency, resident (windows {}) | {:.1} ms/token |",
        resident.windows, resident.decode_ms
    );
    println!(
        "| streamed ÷ disk limit, 8 MiB reads / best (target ≤ 1.3) | {:.2}× / {:.2}× |",
        streamed.decode_ms / limit_ms,
        streamed.decode_ms / best_limit_ms
    );
    println!(
        "| streamed ÷ resident | {:.2}× |",
        streamed.decode_ms / resident.decode_ms
    );
    println!(
        "| waiting on blocks (disk_wait_ms) / step time, streamed | {:.1} / {:.1} ms ({:.0}%) |",
        streamed.wait_ms,
        streamed.decode_ms,
        100.0 * streamed.wait_ms / streamed.decode_ms
    );
    println!(
        "| disk read per token, streamed / resident | {:.1} / {:.1} MiB |",
        mib(streamed.read_bytes),
        mib(resident.read_bytes)
    );
    println!(
        "| peak RSS, streamed / resident | {:.1} / {:.1} MiB |",
        mib(streamed.peak_rss as f64),
        mib(resident.peak_rss as f64)
    );
    println!("| tpi shard (own report) | {shard_line} |");
    match time_v {
        Some(kb) => println!(
            "| tpi shard max RSS (/usr/bin/time -v) vs model | {:.1} MiB vs {:.1} MiB ({:.0}%) |",
            kb as f64 / 1024.0,
            mib(model_bytes as f64),
            100.0 * (kb as f64 * 1024.0) / model_bytes as f64
        ),
        None => println!("| tpi shard max RSS (/usr/bin/time -v) | unavailable |"),
    }
    println!(
        "| ids streamed == resident | {} |",
        if streamed.ids == resident.ids {
            "yes"
        } else {
            "NO"
        }
    );
    if streamed.ids != resident.ids {
        println!("streamed {:?}\nresident {:?}", streamed.ids, resident.ids);
    }
}
