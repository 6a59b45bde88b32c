//! Text tables for `tpi-sim predict`.

use std::{fmt::Write, time::Duration};

use crate::predict::Prediction;

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1e3;
    if v >= 100.0 {
        format!("{v:.0}ms")
    } else {
        format!("{v:.2}ms")
    }
}

/// Bytes as GiB/MiB with one decimal.
pub fn bytes(b: f64) -> String {
    if b >= (1u64 << 30) as f64 {
        format!("{:.2}GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1}MiB", b / (1u64 << 20) as f64)
    }
}

/// The time table (one row per algorithm) and the memory table (per rank).
pub fn table(preds: &[Prediction]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "algo", "TTFT", "token", "compute", "disk wait", "allreduce", "overhead", "AR once"
    );
    for p in preds {
        let b = &p.breakdown;
        let _ = writeln!(
            s,
            "{:<5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            p.algo.to_string(),
            ms(p.ttft),
            ms(p.token),
            ms(b.compute),
            ms(b.disk_wait),
            ms(b.allreduce),
            ms(b.overhead),
            ms(p.allreduce_once)
        );
    }
    if let Some(p) = preds.first() {
        let _ = writeln!(s, "\nmemory per device (the same for every algorithm):");
        let _ = writeln!(
            s,
            "{:<4} {:>6} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}",
            "rank", "share", "shard", "resident", "disk/token", "kv cache", "fixed", "peak"
        );
        for (i, d) in p.devices.iter().enumerate() {
            let _ = writeln!(
                s,
                "{:<4} {:>5.1}% {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}",
                i,
                d.share * 100.0,
                bytes(d.shard_bytes),
                bytes(d.resident_weight_bytes),
                bytes(d.streamed_bytes_per_token),
                bytes(d.kv_bytes),
                bytes(d.fixed_bytes),
                bytes(d.peak_bytes)
            );
        }
    }
    s
}
