//! The sliding-window scheduler: keeps the next `w` blocks of a memory-mapped shard
//! resident while the current one computes, and releases each block when done, so a
//! node's resident weights stay within `w` blocks. The window wraps across tokens.
//!
//! A prefetch thread makes blocks resident (madvise WILLNEED, then touching every
//! page). A finished block is released (madvise DONTNEED, and its page-cache pages are
//! dropped with posix_fadvise so the next token really reads it again from disk, as on
//! a device whose RAM cannot hold the model). When every block fits, all are loaded
//! once and nothing is ever released: small models never pay for streaming.
//!
//! A mixture-of-experts block is streamed by expert: the prefetcher loads everything of
//! it but the experts (norm, router), and the forward pass asks for the experts its
//! router chose (`BlockHooks::experts`), which are read then; experts no token routes to
//! are never read. Memory the budget leaves beside the window holds recently used experts
//! (least recently used out first), which later tokens then need not read again.

use std::fs::File;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memmap2::Mmap;

use crate::model::forward::BlockHooks;

const PAGE: usize = 4096;

/// Which stream positions the prefetcher should hold when position `current` computes:
/// `current` and the `w − 1` after it, wrapping over `n` positions. Pure; the policy.
pub fn window_targets(current: usize, w: usize, n: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    (0..w.min(n)).map(|k| (current + k) % n).collect()
}

/// Picks the window size for a memory budget: blocks that fit after the fixed costs,
/// at least 2 (one computing, one loading); `None` means everything fits (no streaming).
pub fn window_for_budget(budget: u64, fixed: u64, block_sizes: &[u64]) -> Option<usize> {
    let total: u64 = block_sizes.iter().sum();
    if fixed + total <= budget {
        return None;
    }
    let max = block_sizes.iter().copied().max().unwrap_or(1).max(1);
    let w = (budget.saturating_sub(fixed) / max) as usize;
    Some(w.clamp(2, block_sizes.len().max(2)))
}

#[derive(Default)]
struct State {
    loaded: Vec<bool>,
    /// Per block, per expert: resident (MoE blocks only).
    experts_loaded: Vec<Vec<bool>>,
    /// Experts kept resident after their block is left, least recently used first:
    /// (block, expert, bytes).
    cache: std::collections::VecDeque<(usize, usize, u64)>,
    cache_used: u64,
    current: usize,
    stop: bool,
}

/// Counters of the window since it was created.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct WindowStats {
    /// Seconds the compute thread waited for a block to become resident.
    pub wait_s: f64,
    /// Seconds the prefetch thread spent loading blocks.
    pub load_s: f64,
    /// Bytes made resident by the prefetch thread.
    pub loaded_bytes: u64,
    /// Block loads.
    pub loads: u64,
    /// Of `loaded_bytes`, the bytes of experts read on demand.
    pub expert_bytes: u64,
    /// Experts read on demand.
    pub expert_loads: u64,
    /// Experts asked for that the expert cache still held (not read again).
    pub expert_hits: u64,
}

struct Inner {
    map: Arc<Mmap>,
    file: Arc<File>,
    regions: Vec<Range<usize>>,
    /// Per block, per expert, the byte ranges of its tensors (empty for dense blocks).
    experts: Vec<Vec<Vec<Range<usize>>>>,
    /// Bytes of experts kept resident beyond the window (0: none kept).
    cache_cap: u64,
    w: usize,
    streaming: bool,
    state: Mutex<State>,
    cv: Condvar,
    stats: Mutex<WindowStats>,
    /// Set once every block is resident in non-streaming mode: `enter` then costs one
    /// atomic load (no lock, no wake-up of the prefetch thread).
    all_resident: AtomicBool,
}

/// A sliding window over the blocks of one shard, in stream order.
pub struct Window {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Inner {
    /// Makes `r` resident (WILLNEED, then a read of every page); returns its length.
    fn touch(&self, r: &Range<usize>) -> u64 {
        let _ = self
            .map
            .advise_range(memmap2::Advice::WillNeed, r.start, r.len());
        let bytes = &self.map[r.clone()];
        let mut acc = 0u8;
        let mut p = 0;
        while p < bytes.len() {
            // SAFETY: p < len; a volatile read forces the page in.
            acc ^= unsafe { std::ptr::read_volatile(bytes.as_ptr().add(p)) };
            p += PAGE;
        }
        std::hint::black_box(acc);
        r.len() as u64
    }

    /// The parts of block `i` the prefetcher loads: all of it, or for a streamed MoE
    /// block all but its experts.
    fn prefetched_parts(&self, i: usize) -> Vec<Range<usize>> {
        let whole = self.regions[i].clone();
        if !self.streaming || self.experts[i].is_empty() {
            return vec![whole];
        }
        let mut holes: Vec<Range<usize>> = self.experts[i].iter().flatten().cloned().collect();
        holes.sort_by_key(|r| r.start);
        let mut out = Vec::new();
        let mut at = whole.start;
        for h in holes {
            if h.start > at {
                out.push(at..h.start);
            }
            at = at.max(h.end);
        }
        if at < whole.end {
            out.push(at..whole.end);
        }
        out
    }

    fn load(&self, i: usize) {
        let t0 = Instant::now();
        let bytes: u64 = self.prefetched_parts(i).iter().map(|r| self.touch(r)).sum();
        let mut s = self.stats.lock().unwrap();
        s.load_s += t0.elapsed().as_secs_f64();
        s.loaded_bytes += bytes;
        s.loads += 1;
    }

    /// Releases block `i`: all of it, or, while the expert cache holds some of its experts,
    /// all but those (`cached`: whether expert `e` of block `i` is kept).
    fn release(&self, i: usize, cached: &dyn Fn(usize) -> bool) {
        if self.experts[i].iter().enumerate().any(|(e, _)| cached(e)) {
            for r in self.prefetched_parts(i) {
                self.release_range(&r);
            }
            for (e, ranges) in self.experts[i].iter().enumerate() {
                if !cached(e) {
                    ranges.iter().for_each(|r| self.release_range(r));
                }
            }
        } else {
            self.release_range(&self.regions[i].clone());
        }
    }

    fn release_range(&self, r: &Range<usize>) {
        // SAFETY: the map is read-only and file-backed: DONTNEED only drops our page
        // mappings; later reads fault the data back in from the file.
        let _ = unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, r.start, r.len())
        };
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: plain syscall on a valid fd; advisory only.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    r.start as libc::off_t,
                    r.len() as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
    }

    fn prefetch_loop(&self) {
        let n = self.regions.len();
        loop {
            let next = {
                let mut st = self.state.lock().unwrap();
                loop {
                    if st.stop {
                        return;
                    }
                    let want = if self.streaming {
                        window_targets(st.current, self.w, n)
                    } else {
                        (0..n).collect()
                    };
                    if let Some(&i) = want.iter().find(|&&i| !st.loaded[i]) {
                        break i;
                    }
                    if !self.streaming {
                        self.all_resident.store(true, Ordering::Release);
                        return;
                    }
                    st = self.cv.wait(st).unwrap();
                }
            };
            self.load(next);
            let mut st = self.state.lock().unwrap();
            st.loaded[next] = true;
            self.cv.notify_all();
        }
    }
}

impl Window {
    /// Starts the prefetcher over `regions` (byte ranges of `map`, in compute order).
    /// `w`: blocks to keep resident; `None` loads everything once and never releases.
    pub fn new(
        map: Arc<Mmap>,
        file: Arc<File>,
        regions: Vec<Range<usize>>,
        w: Option<usize>,
    ) -> Self {
        let n = regions.len();
        Self::with_experts(map, file, regions, vec![Vec::new(); n], w)
    }

    /// As [`Window::new`], with each block's experts (per expert, its tensors' byte
    /// ranges; empty for a dense block), which a streaming window reads only on demand.
    pub fn with_experts(
        map: Arc<Mmap>,
        file: Arc<File>,
        regions: Vec<Range<usize>>,
        experts: Vec<Vec<Vec<Range<usize>>>>,
        w: Option<usize>,
    ) -> Self {
        Self::with_expert_cache(map, file, regions, experts, w, 0)
    }

    /// As [`Window::with_experts`], keeping up to `cache_bytes` of recently used experts
    /// resident after their block is left (least recently used released first).
    pub fn with_expert_cache(
        map: Arc<Mmap>,
        file: Arc<File>,
        regions: Vec<Range<usize>>,
        experts: Vec<Vec<Vec<Range<usize>>>>,
        w: Option<usize>,
        cache_bytes: u64,
    ) -> Self {
        let n = regions.len();
        assert_eq!(experts.len(), n, "one expert list per block");
        let streaming = matches!(w, Some(w) if w < n);
        let inner = Arc::new(Inner {
            map,
            file,
            w: w.unwrap_or(n).max(1),
            streaming,
            state: Mutex::new(State {
                loaded: vec![false; n],
                experts_loaded: experts.iter().map(|e| vec![false; e.len()]).collect(),
                cache: Default::default(),
                cache_used: 0,
                current: 0,
                stop: false,
            }),
            experts,
            cache_cap: cache_bytes,
            cv: Condvar::new(),
            stats: Mutex::new(WindowStats::default()),
            all_resident: AtomicBool::new(n == 0),
            regions,
        });
        let t = inner.clone();
        let thread = std::thread::Builder::new()
            .name("tpi-prefetch".into())
            .spawn(move || t.prefetch_loop())
            .ok();
        Window { inner, thread }
    }

    /// Whether blocks are released after use (the shard does not fit the budget).
    pub fn is_streaming(&self) -> bool {
        self.inner.streaming
    }

    /// Blocks kept resident.
    pub fn size(&self) -> usize {
        self.inner.w
    }

    /// Counters so far.
    pub fn stats(&self) -> WindowStats {
        *self.inner.stats.lock().unwrap()
    }

    /// Blocks until stream position `i` is resident; returns the time waited.
    pub fn enter(&self, i: usize) -> Duration {
        if self.inner.all_resident.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        let t0 = Instant::now();
        let mut st = self.inner.state.lock().unwrap();
        st.current = i;
        self.inner.cv.notify_all();
        while !st.loaded[i] {
            st = self.inner.cv.wait(st).unwrap();
        }
        drop(st);
        let waited = t0.elapsed();
        self.inner.stats.lock().unwrap().wait_s += waited.as_secs_f64();
        waited
    }

    /// Makes the experts `wanted` of stream position `i` resident (position `i` itself
    /// must be entered): those of a streamed MoE block not read yet are read now, on the
    /// computing thread (the router has just chosen them). Returns the time it took.
    pub fn enter_experts(&self, i: usize, wanted: &[usize]) -> Duration {
        if !self.inner.streaming || self.inner.experts.get(i).is_none_or(|e| e.is_empty()) {
            return Duration::ZERO;
        }
        let t0 = Instant::now();
        let mut hits = 0;
        let todo: Vec<usize> = {
            let mut st = self.inner.state.lock().unwrap();
            let mut todo = Vec::new();
            for &e in wanted {
                if e >= st.experts_loaded[i].len() || st.experts_loaded[i][e] {
                    continue;
                }
                st.experts_loaded[i][e] = true;
                match st.cache.iter().position(|&(b, x, _)| (b, x) == (i, e)) {
                    Some(p) => {
                        let c = st.cache.remove(p).expect("position is in range");
                        st.cache.push_back(c);
                        hits += 1;
                    }
                    None => todo.push(e),
                }
            }
            todo
        };
        let mut bytes = 0;
        let mut read = Vec::with_capacity(todo.len());
        for &e in &todo {
            let b: u64 = self.inner.experts[i][e]
                .iter()
                .map(|r| self.inner.touch(r))
                .sum();
            bytes += b;
            read.push((e, b));
        }
        // Keep what was just read, releasing the least recently used experts not in use.
        let mut evicted = Vec::new();
        if self.inner.cache_cap > 0 {
            let mut st = self.inner.state.lock().unwrap();
            for (e, b) in read {
                if b > self.inner.cache_cap {
                    continue;
                }
                st.cache.push_back((i, e, b));
                st.cache_used += b;
                while st.cache_used > self.inner.cache_cap {
                    let Some((ob, oe, ob_bytes)) = st.cache.pop_front() else {
                        break;
                    };
                    st.cache_used -= ob_bytes;
                    if !st.experts_loaded[ob][oe] {
                        evicted.push((ob, oe));
                    }
                }
            }
        }
        for (b, e) in evicted {
            self.inner.experts[b][e]
                .iter()
                .for_each(|r| self.inner.release_range(r));
        }
        let waited = t0.elapsed();
        let mut s = self.inner.stats.lock().unwrap();
        s.wait_s += waited.as_secs_f64();
        s.load_s += waited.as_secs_f64();
        s.loaded_bytes += bytes;
        s.expert_bytes += bytes;
        s.expert_loads += todo.len() as u64;
        s.expert_hits += hits;
        waited
    }

    /// Marks position `i` done: releases it when streaming and lets the window move on.
    pub fn leave(&self, i: usize) {
        if !self.inner.streaming {
            return;
        }
        let mut st = self.inner.state.lock().unwrap();
        // Keep it if the window (wrapping) still wants it.
        let n = self.inner.regions.len();
        let next = (i + 1) % n;
        if window_targets(next, self.inner.w, n).contains(&i) {
            return;
        }
        st.loaded[i] = false;
        st.experts_loaded[i].iter_mut().for_each(|x| *x = false);
        st.current = next;
        let kept: Vec<usize> = st.cache.iter().filter(|c| c.0 == i).map(|c| c.1).collect();
        drop(st);
        self.inner.release(i, &|e| kept.contains(&e));
        self.inner.cv.notify_all();
    }
}

impl BlockHooks for Window {
    fn before(&self, pos: usize) {
        if pos < self.inner.regions.len() {
            self.enter(pos);
        }
    }
    fn after(&self, pos: usize) {
        if pos < self.inner.regions.len() {
            self.leave(pos);
        }
    }
    fn experts(&self, pos: usize, experts: &[usize]) -> Duration {
        if pos < self.inner.regions.len() {
            self.enter_experts(pos, experts)
        } else {
            Duration::ZERO
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        self.inner.state.lock().unwrap().stop = true;
        self.inner.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_wrap() {
        assert_eq!(window_targets(0, 2, 5), vec![0, 1]);
        assert_eq!(window_targets(4, 2, 5), vec![4, 0]);
        assert_eq!(window_targets(3, 9, 4), vec![3, 0, 1, 2]);
        assert!(window_targets(0, 2, 0).is_empty());
    }

    #[test]
    fn budget_picks_window() {
        let blocks = [100u64, 200, 100, 200, 200];
        // Everything fits: no streaming.
        assert_eq!(window_for_budget(900, 100, &blocks), None);
        // Otherwise as many of the largest block as fit after the fixed cost, at least 2.
        assert_eq!(window_for_budget(500, 100, &blocks), Some(2));
        assert_eq!(window_for_budget(700, 100, &blocks), Some(3));
        assert_eq!(window_for_budget(899, 100, &blocks), Some(3));
        assert_eq!(window_for_budget(10, 100, &blocks), Some(2));
    }

    #[test]
    fn a_streamed_moe_block_reads_only_the_experts_asked_for() {
        let dir = std::env::temp_dir().join(format!("tpi-window-moe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.bin");
        std::fs::write(&p, vec![7u8; 13 * PAGE]).unwrap();
        let f = File::open(&p).unwrap();
        let map = Arc::new(unsafe { Mmap::map(&f).unwrap() });
        // Block 0: dense, 2 pages. Block 1: 1 page of router, then 4 experts of 2 pages,
        // then 1 page. Block 2: dense, 1 page.
        let regions = vec![0..2 * PAGE, 2 * PAGE..12 * PAGE, 12 * PAGE..13 * PAGE];
        let experts = vec![
            vec![],
            (0..4)
                .map(|e| std::iter::once((3 + 2 * e) * PAGE..(5 + 2 * e) * PAGE).collect())
                .collect(),
            vec![],
        ];
        let w = Window::with_experts(map, Arc::new(f), regions, experts, Some(2));
        for _token in 0..2 {
            for i in 0..3 {
                w.enter(i);
                if i == 1 {
                    w.enter_experts(1, &[2, 0]);
                    w.enter_experts(1, &[0]); // already resident: no read
                }
                w.leave(i);
            }
        }
        let s = w.stats();
        // Per token 2 experts of 2 pages are read on demand, and 2 + (1 + 1) + 1 pages
        // prefetched; the prefetcher may already have moved on to the next token's first
        // two blocks (at most 2 + 2 pages more), never to an expert.
        assert_eq!(s.expert_loads, 4, "{s:?}");
        assert_eq!(s.expert_bytes, 2 * 4 * PAGE as u64, "{s:?}");
        let prefetched = (s.loaded_bytes - s.expert_bytes) / PAGE as u64;
        assert!((10..=14).contains(&prefetched), "{prefetched} pages: {s:?}");
        drop(w);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_expert_cache_keeps_recent_experts_and_releases_the_oldest() {
        let dir = std::env::temp_dir().join(format!("tpi-window-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.bin");
        std::fs::write(&p, vec![7u8; 11 * PAGE]).unwrap();
        let f = File::open(&p).unwrap();
        let map = Arc::new(unsafe { Mmap::map(&f).unwrap() });
        // Block 0: dense, 2 pages. Block 1: a router page, then 4 experts of 2 pages.
        let regions = vec![0..2 * PAGE, 2 * PAGE..11 * PAGE];
        let experts = vec![
            vec![],
            (0..4)
                .map(|e| std::iter::once((3 + 2 * e) * PAGE..(5 + 2 * e) * PAGE).collect())
                .collect(),
        ];
        // Room for two experts.
        let cap = 4 * PAGE as u64;
        let w = Window::with_expert_cache(map, Arc::new(f), regions, experts, Some(1), cap);
        let token = |wanted: &[usize]| {
            w.enter(0);
            w.leave(0);
            w.enter(1);
            w.enter_experts(1, wanted);
            w.leave(1);
            w.stats()
        };
        let s = token(&[2, 0]);
        assert_eq!((s.expert_loads, s.expert_hits), (2, 0), "{s:?}");
        // 0 is still held; 3 is read and pushes out 2, the least recently used.
        let s = token(&[0, 3]);
        assert_eq!((s.expert_loads, s.expert_hits), (3, 1), "{s:?}");
        let s = token(&[2]);
        assert_eq!((s.expert_loads, s.expert_hits), (4, 1), "{s:?}");
        let s = token(&[3, 2]);
        assert_eq!((s.expert_loads, s.expert_hits), (4, 3), "{s:?}");
        drop(w);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn window_streams_a_file() {
        let dir = std::env::temp_dir().join(format!("tpi-window-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.bin");
        let data: Vec<u8> = (0..8 * PAGE).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let map = Arc::new(unsafe { Mmap::map(&f).unwrap() });
        let regions: Vec<Range<usize>> = (0..4).map(|i| i * 2 * PAGE..(i + 1) * 2 * PAGE).collect();
        let w = Window::new(map.clone(), Arc::new(f), regions, Some(2));
        assert!(w.is_streaming());
        for _token in 0..3 {
            for i in 0..4 {
                w.enter(i);
                assert_eq!(map[i * 2 * PAGE + 5], ((i * 2 * PAGE + 5) % 251) as u8);
                w.leave(i);
            }
        }
        let s = w.stats();
        assert!(s.loads >= 12, "{s:?}");
        drop(w);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
