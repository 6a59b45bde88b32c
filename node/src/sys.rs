//! What the operating system says about this process and machine: memory, storage
//! reads, free disk. Linux's /proc files and statvfs; `None` where they cannot be read.

use std::path::Path;

/// Total memory in bytes (MemTotal of /proc/meminfo).
pub fn total_ram() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_total(&text)
}

fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut it = line["MemTotal:".len()..].split_whitespace();
    let v: u64 = it.next()?.parse().ok()?;
    let mult = match it.next().map(|u| u.to_ascii_lowercase()) {
        Some(u) if u == "kb" => 1024,
        Some(u) if u == "mb" => 1 << 20,
        None => 1,
        Some(_) => 1024,
    };
    Some(v * mult)
}

/// Bytes available to unprivileged users in the file system holding `path`.
pub fn disk_free(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Peak resident set size of this process (VmHWM), bytes.
pub fn peak_rss() -> Option<u64> {
    proc_status_kb("VmHWM:").map(|k| k * 1024)
}

/// Resets the peak RSS counter (VmHWM) to the current RSS, so a session's peak is its
/// own, not that of start-up work such as a benchmark (Linux: /proc/self/clear_refs 5).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn proc_status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Bytes this process has caused to be read from storage (/proc/self/io read_bytes).
pub fn disk_read_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/io").ok()?;
    s.lines()
        .find(|l| l.starts_with("read_bytes:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses() {
        let t = "MemTotal:       24684084 kB\nMemFree:        16951824 kB\n";
        assert_eq!(parse_meminfo_total(t), Some(24684084 * 1024));
        assert!(total_ram().unwrap_or(1) > 0);
    }

    #[test]
    fn this_process_has_a_peak_rss() {
        assert!(peak_rss().unwrap_or(1) > 0);
    }
}
