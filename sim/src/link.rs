//! [`LinkSpec`]: one directed emulated link, and its textual form.
//!
//! The text form is `LATENCY[,BANDWIDTH][,jitter=DUR][,loss=PCT][,queue=SIZE]`,
//! for example `2ms,300mbit,jitter=0.2ms,loss=0.1%,queue=256kb`.
//! Durations take `ns`, `us`, `ms` or `s`; bandwidths `bit`, `kbit`, `mbit`,
//! `gbit` (decimal; also `bps`, `kbps`, `mbps`, `gbps`) or `unlimited`;
//! loss is a percentage (`1%`) or a fraction (`0.01`); sizes take `b`, `kb`,
//! `mb` (decimal) or `kib`, `mib` (binary).

use std::{fmt, str::FromStr, time::Duration};

/// Default drop-tail queue per link, in bytes (1 MiB).
pub const DEFAULT_QUEUE_BYTES: usize = 1 << 20;

/// One directed link: what a packet experiences on its way from one node to another.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSpec {
    /// One-way propagation latency.
    pub latency: Duration,
    /// Serialisation rate in bits per second; `None` is unlimited.
    pub bandwidth_bps: Option<u64>,
    /// Jitter amplitude: each packet gets an extra delay drawn uniformly from
    /// `[-jitter, +jitter]` (never reordering packets on the link).
    pub jitter: Duration,
    /// Independent drop probability per packet, in `0..=1`.
    pub loss: f64,
    /// Drop-tail limit on bytes waiting for serialisation.
    pub queue_bytes: usize,
}

impl Default for LinkSpec {
    fn default() -> Self {
        Self::ideal()
    }
}

impl LinkSpec {
    /// A link with no latency, no bandwidth limit, no jitter and no loss.
    pub const fn ideal() -> Self {
        Self {
            latency: Duration::ZERO,
            bandwidth_bps: None,
            jitter: Duration::ZERO,
            loss: 0.0,
            queue_bytes: DEFAULT_QUEUE_BYTES,
        }
    }

    /// A link with the given one-way latency and bandwidth (bits/s), no jitter or loss.
    pub fn new(latency: Duration, bandwidth_bps: Option<u64>) -> Self {
        Self {
            latency,
            bandwidth_bps,
            ..Self::ideal()
        }
    }

    /// Time to serialise `bytes` onto this link (zero when unlimited).
    pub fn serialisation(&self, bytes: usize) -> Duration {
        match self.bandwidth_bps {
            Some(bps) if bps > 0 => Duration::from_secs_f64(bytes as f64 * 8.0 / bps as f64),
            _ => Duration::ZERO,
        }
    }

    /// One-way time for a message of `bytes`: latency plus serialisation.
    pub fn transfer(&self, bytes: usize) -> Duration {
        self.latency + self.serialisation(bytes)
    }

    /// The link made of `self` followed by `next`: latencies and jitters add,
    /// bandwidth is the minimum, losses compound, the queue is the smaller one.
    pub fn then(&self, next: &LinkSpec) -> LinkSpec {
        let bandwidth_bps = match (self.bandwidth_bps, next.bandwidth_bps) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, None) => a,
            (None, b) => b,
        };
        LinkSpec {
            latency: self.latency + next.latency,
            bandwidth_bps,
            jitter: self.jitter + next.jitter,
            loss: 1.0 - (1.0 - self.loss) * (1.0 - next.loss),
            queue_bytes: self.queue_bytes.min(next.queue_bytes),
        }
    }
}

/// Why a link, duration, rate or size string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The string was empty.
    #[error("empty link spec (expected e.g. \"2ms,300mbit\")")]
    Empty,
    /// A duration was malformed.
    #[error("bad duration {0:?} (expected a number with us, ms, s or ns, e.g. \"1.5ms\")")]
    Duration(String),
    /// A bandwidth was malformed.
    #[error(
        "bad bandwidth {0:?} (expected a number with bit, kbit, mbit or gbit, e.g. \"300mbit\")"
    )]
    Bandwidth(String),
    /// A loss rate was malformed or out of range.
    #[error("bad loss {0:?} (expected a percentage like \"0.5%\" or a fraction in 0..1)")]
    Loss(String),
    /// A byte size was malformed.
    #[error("bad size {0:?} (expected a number with b, kb, mb, kib or mib, e.g. \"256kb\")")]
    Size(String),
    /// A `key=value` field had an unknown key.
    #[error("unknown link field {0:?} (known: jitter, loss, queue, latency, bw)")]
    UnknownField(String),
    /// A positional field appeared more than twice, or out of place.
    #[error("unexpected field {0:?}: positional fields are LATENCY then BANDWIDTH")]
    Unexpected(String),
}

fn split_num(s: &str) -> (&str, String) {
    let s = s.trim();
    let idx = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == 'e'))
        .unwrap_or(s.len());
    // "1e3ms" style exponents are allowed, but an 'e' that starts a unit is not a digit.
    (&s[..idx], s[idx..].trim().to_ascii_lowercase())
}

/// Parse a duration such as `1.5ms`, `200us`, `2s` (a bare number means milliseconds).
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    let err = || ParseError::Duration(s.to_string());
    let (num, unit) = split_num(s);
    let v: f64 = num.parse().map_err(|_| err())?;
    let scale = match unit.as_str() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" | "" => 1e-3,
        "s" => 1.0,
        _ => return Err(err()),
    };
    if !v.is_finite() || v < 0.0 {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// Parse a bandwidth such as `300mbit` or `1gbit` into bits per second;
/// `unlimited`/`inf`/`0` mean no limit (`None`).
pub fn parse_bandwidth(s: &str) -> Result<Option<u64>, ParseError> {
    let err = || ParseError::Bandwidth(s.to_string());
    let t = s.trim().to_ascii_lowercase();
    if matches!(t.as_str(), "unlimited" | "inf" | "none") {
        return Ok(None);
    }
    let (num, unit) = split_num(&t);
    let v: f64 = num.parse().map_err(|_| err())?;
    let scale = match unit.as_str() {
        "bit" | "bps" | "b/s" => 1.0,
        "kbit" | "kbps" | "kb/s" => 1e3,
        "mbit" | "mbps" | "mb/s" => 1e6,
        "gbit" | "gbps" | "gb/s" => 1e9,
        _ => return Err(err()),
    };
    if !v.is_finite() || v < 0.0 {
        return Err(err());
    }
    let bps = (v * scale).round() as u64;
    Ok(if bps == 0 { None } else { Some(bps) })
}

/// Parse a loss rate: `0.5%` or a fraction `0.005`.
pub fn parse_loss(s: &str) -> Result<f64, ParseError> {
    let err = || ParseError::Loss(s.to_string());
    let t = s.trim();
    let v = if let Some(p) = t.strip_suffix('%') {
        p.trim().parse::<f64>().map_err(|_| err())? / 100.0
    } else {
        t.parse::<f64>().map_err(|_| err())?
    };
    if !(0.0..=1.0).contains(&v) {
        return Err(err());
    }
    Ok(v)
}

/// Parse a byte size: `256kb`, `1mib`, `1500` (bytes), `3GiB`.
pub fn parse_size(s: &str) -> Result<u64, ParseError> {
    let err = || ParseError::Size(s.to_string());
    let (num, unit) = split_num(s);
    let v: f64 = num.parse().map_err(|_| err())?;
    let scale = match unit.as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(err()),
    };
    if !v.is_finite() || v < 0.0 {
        return Err(err());
    }
    Ok((v * scale).round() as u64)
}

impl FromStr for LinkSpec {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(ParseError::Empty);
        }
        let mut spec = LinkSpec::ideal();
        let mut positional = 0;
        for field in s.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            if let Some((k, v)) = field.split_once('=') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "jitter" => spec.jitter = parse_duration(v)?,
                    "loss" => spec.loss = parse_loss(v)?,
                    "queue" => spec.queue_bytes = parse_size(v)? as usize,
                    "latency" | "delay" => spec.latency = parse_duration(v)?,
                    "bw" | "bandwidth" | "rate" => spec.bandwidth_bps = parse_bandwidth(v)?,
                    _ => return Err(ParseError::UnknownField(field.to_string())),
                }
                continue;
            }
            match positional {
                0 => spec.latency = parse_duration(field)?,
                1 => spec.bandwidth_bps = parse_bandwidth(field)?,
                _ => return Err(ParseError::Unexpected(field.to_string())),
            }
            positional += 1;
        }
        Ok(spec)
    }
}

/// Format a duration compactly (`1ms`, `0.2ms`, `150us`, `2s`).
pub fn fmt_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us == 0.0 {
        "0ms".into()
    } else if us >= 1e6 && (us / 1e6).fract() == 0.0 {
        format!("{}s", us / 1e6)
    } else if us >= 100.0 {
        format!("{}ms", trim_float(us / 1e3))
    } else {
        format!("{}us", trim_float(us))
    }
}

/// Format bits per second compactly (`300mbit`, `1gbit`, `unlimited`).
pub fn fmt_bandwidth(bps: Option<u64>) -> String {
    match bps {
        None => "unlimited".into(),
        Some(b) if b >= 1_000_000_000 => format!("{}gbit", trim_float(b as f64 / 1e9)),
        Some(b) if b >= 1_000_000 => format!("{}mbit", trim_float(b as f64 / 1e6)),
        Some(b) if b >= 1_000 => format!("{}kbit", trim_float(b as f64 / 1e3)),
        Some(b) => format!("{b}bit"),
    }
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{},{}",
            fmt_duration(self.latency),
            fmt_bandwidth(self.bandwidth_bps)
        )?;
        if !self.jitter.is_zero() {
            write!(f, ",jitter={}", fmt_duration(self.jitter))?;
        }
        if self.loss > 0.0 {
            write!(f, ",loss={}%", trim_float(self.loss * 100.0))?;
        }
        if self.queue_bytes != DEFAULT_QUEUE_BYTES {
            write!(f, ",queue={}b", self.queue_bytes)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_spec() {
        let l: LinkSpec = "2ms,300mbit,jitter=0.2ms,loss=0.1%,queue=256kb"
            .parse()
            .unwrap();
        assert_eq!(l.latency, Duration::from_millis(2));
        assert_eq!(l.bandwidth_bps, Some(300_000_000));
        assert_eq!(l.jitter, Duration::from_micros(200));
        assert!((l.loss - 0.001).abs() < 1e-12);
        assert_eq!(l.queue_bytes, 256_000);
    }

    #[test]
    fn parses_units_and_fractions() {
        let l: LinkSpec = "500us,1gbit,loss=0.05".parse().unwrap();
        assert_eq!(l.latency, Duration::from_micros(500));
        assert_eq!(l.bandwidth_bps, Some(1_000_000_000));
        assert!((l.loss - 0.05).abs() < 1e-12);
        let l: LinkSpec = "1s".parse().unwrap();
        assert_eq!(l.latency, Duration::from_secs(1));
        assert_eq!(l.bandwidth_bps, None);
        assert_eq!(parse_size("3GiB").unwrap(), 3 << 30);
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "2ms,300mbit",
            "0.2ms,1gbit,jitter=50us,loss=1%",
            "1ms,unlimited,queue=1000b",
        ] {
            let l: LinkSpec = s.parse().unwrap();
            assert_eq!(l.to_string(), s);
            assert_eq!(l.to_string().parse::<LinkSpec>().unwrap(), l);
        }
    }

    #[test]
    fn clear_errors() {
        let e = "2xs".parse::<LinkSpec>().unwrap_err();
        assert!(e.to_string().contains("bad duration"), "{e}");
        let e = "2ms,300mbits".parse::<LinkSpec>().unwrap_err();
        assert!(e.to_string().contains("bad bandwidth"), "{e}");
        let e = "2ms,loss=150%".parse::<LinkSpec>().unwrap_err();
        assert!(e.to_string().contains("bad loss"), "{e}");
        let e = "2ms,foo=1".parse::<LinkSpec>().unwrap_err();
        assert!(e.to_string().contains("unknown link field"), "{e}");
        assert_eq!("".parse::<LinkSpec>().unwrap_err(), ParseError::Empty);
    }

    #[test]
    fn composition_adds_latency_and_takes_min_bandwidth() {
        let a: LinkSpec = "1ms,300mbit".parse().unwrap();
        let b: LinkSpec = "1ms,1gbit".parse().unwrap();
        let c = a.then(&b).then(&a);
        assert_eq!(c.latency, Duration::from_millis(3));
        assert_eq!(c.bandwidth_bps, Some(300_000_000));
    }
}
