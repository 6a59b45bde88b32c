//! [`DelayLine`]: per-link FIFOs drained by one timing thread.
//!
//! Each link (keyed by a [`SocketAddr`]) is a FIFO with a serialisation clock:
//! a packet departs at `max(now, link_free_at) + size*8/bandwidth` (which then
//! becomes `link_free_at`) and is delivered at `departure + latency + jitter`,
//! clamped to be no earlier than the previous delivery on that link, so packets
//! never reorder. One std thread per delay line sleeps until the earliest due
//! packet (to ~200 µs before it, then yields in a spin) and hands it to its
//! [`Sink`]; tokio timers (1 ms granularity) are never used.

use std::{
    cmp::Ordering as CmpOrdering,
    collections::{BinaryHeap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use crate::link::LinkSpec;

/// Where a delayed packet goes when it is due.
pub trait Sink: Send + Sync + 'static {
    /// Deliver `data` to `dest` now. Returns false when it could not be delivered.
    fn deliver(&self, dest: SocketAddr, data: &[u8]) -> bool;
}

/// Counters shared by a delay line and whoever watches it.
#[derive(Debug, Default)]
struct Counters {
    packets_sent: AtomicU64,
    bytes_sent: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    send_errors: AtomicU64,
}

/// A cheap, clonable handle on a delay line's (or emulated socket's) counters.
#[derive(Clone, Debug, Default)]
pub struct LinkStats(Arc<Counters>);

/// A point-in-time copy of [`LinkStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Datagrams actually handed to the real socket.
    pub packets_sent: u64,
    /// Bytes actually handed to the real socket.
    pub bytes_sent: u64,
    /// Datagrams dropped by the random loss model.
    pub dropped_loss: u64,
    /// Datagrams dropped because the link queue was full (drop-tail).
    pub dropped_queue: u64,
    /// Datagrams the real socket refused when they were due.
    pub send_errors: u64,
}

impl LinkStats {
    /// Copy the counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &self.0;
        StatsSnapshot {
            packets_sent: c.packets_sent.load(Ordering::Relaxed),
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
            dropped_loss: c.dropped_loss.load(Ordering::Relaxed),
            dropped_queue: c.dropped_queue.load(Ordering::Relaxed),
            send_errors: c.send_errors.load(Ordering::Relaxed),
        }
    }
}

/// What happened to a submitted packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Scheduled for delivery at this instant.
    Scheduled(Instant),
    /// Dropped by the loss model (it still used its serialisation time).
    Lost,
    /// Dropped because the link's queue was full.
    QueueFull,
}

struct Packet {
    due: Instant,
    seq: u64,
    dest: SocketAddr,
    data: Vec<u8>,
    sink: Arc<dyn Sink>,
}

impl PartialEq for Packet {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due && self.seq == other.seq
    }
}
impl Eq for Packet {}
impl PartialOrd for Packet {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Packet {
    // Reversed: BinaryHeap is a max-heap, we want the earliest (due, seq) on top.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// One link's serialisation clock: when it is free again, and its last delivery (so
/// jitter never reorders).
struct LinkClock {
    free_at: Instant,
    last_delivery: Instant,
}

impl LinkClock {
    fn new(now: Instant) -> Self {
        LinkClock {
            free_at: now,
            last_delivery: now,
        }
    }

    /// The link model, as a pure function of the submit time `now`: a packet of `len`
    /// bytes departs at `max(now, free_at) + len*8/bandwidth` and is delivered at
    /// `departure + latency ± jitter`, never before the previous delivery; it is dropped
    /// when the backlog would exceed the queue, or with probability `loss` (after using
    /// its serialisation time). `draw` gives uniform numbers in [0, 1): the loss draw,
    /// then the jitter draw.
    fn schedule(
        &mut self,
        now: Instant,
        spec: &LinkSpec,
        len: usize,
        draw: &mut dyn FnMut() -> f64,
    ) -> Verdict {
        let start = self.free_at.max(now);
        if let Some(bps) = spec.bandwidth_bps {
            let backlog = (start - now).as_secs_f64() * bps as f64 / 8.0;
            if backlog + len as f64 > spec.queue_bytes as f64 {
                return Verdict::QueueFull;
            }
        }
        let departure = start + spec.serialisation(len);
        self.free_at = departure;
        if spec.loss > 0.0 && draw() < spec.loss {
            return Verdict::Lost;
        }
        let mut delivery = departure + spec.latency;
        if !spec.jitter.is_zero() {
            let j = (draw() * 2.0 - 1.0) * spec.jitter.as_secs_f64();
            delivery = if j >= 0.0 {
                delivery + Duration::from_secs_f64(j)
            } else {
                delivery
                    .checked_sub(Duration::from_secs_f64(-j))
                    .unwrap_or(departure)
                    .max(departure)
            };
        }
        delivery = delivery.max(self.last_delivery);
        self.last_delivery = delivery;
        Verdict::Scheduled(delivery)
    }
}

struct State {
    heap: BinaryHeap<Packet>,
    links: HashMap<SocketAddr, LinkClock>,
    seq: u64,
    rng: u64,
    shutdown: bool,
    /// Packets the timing thread has taken off the heap and not yet delivered.
    delivering: usize,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    counters: LinkStats,
}

/// Per-link FIFOs with latency, bandwidth, jitter, loss and drop-tail, drained by one thread.
pub struct DelayLine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DelayLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelayLine")
            .field("stats", &self.shared.counters.snapshot())
            .finish()
    }
}

/// How long before a packet is due the timing thread stops sleeping and starts spinning.
const SPIN_WINDOW: Duration = Duration::from_micros(200);

fn seed() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    (t ^ N.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)) | 1
}

/// xorshift64* -> uniform in [0, 1).
fn uniform(rng: &mut u64) -> f64 {
    let mut x = *rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *rng = x;
    (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}

impl DelayLine {
    /// Start a delay line and its timing thread (named `name`).
    pub fn new(name: &str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                links: HashMap::new(),
                seq: 0,
                rng: seed(),
                shutdown: false,
                delivering: 0,
            }),
            cv: Condvar::new(),
            counters: LinkStats::default(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || timing_thread(&s))?;
        Ok(Self { shared })
    }

    /// The counters of this line.
    pub fn stats(&self) -> LinkStats {
        self.shared.counters.clone()
    }

    /// Queue `data` for `dest` on the link `key` with `spec`; `sink` delivers it when due.
    pub fn submit(
        &self,
        key: SocketAddr,
        spec: &LinkSpec,
        dest: SocketAddr,
        data: Vec<u8>,
        sink: &Arc<dyn Sink>,
    ) -> Verdict {
        let now = Instant::now();
        let mut guard = lock(&self.shared.state);
        let st = &mut *guard;
        let clock = st.links.entry(key).or_insert(LinkClock::new(now));
        let rng = &mut st.rng;
        let verdict = clock.schedule(now, spec, data.len(), &mut || uniform(rng));
        let delivery = match verdict {
            Verdict::Scheduled(at) => at,
            Verdict::QueueFull => {
                self.shared
                    .counters
                    .0
                    .dropped_queue
                    .fetch_add(1, Ordering::Relaxed);
                return verdict;
            }
            Verdict::Lost => {
                self.shared
                    .counters
                    .0
                    .dropped_loss
                    .fetch_add(1, Ordering::Relaxed);
                return verdict;
            }
        };
        if delivery <= now && st.heap.is_empty() && st.delivering == 0 {
            // Due now with nothing ahead of it (an ideal link, or an idle unlimited one):
            // deliver from this thread rather than waking the timing thread, which costs
            // a thread hand-off per datagram; nothing queued can be overtaken.
            drop(guard);
            self.shared.count(sink.deliver(dest, &data), data.len());
            return verdict;
        }
        st.seq += 1;
        let was_earliest = st.heap.peek().map_or(true, |p| delivery < p.due);
        st.heap.push(Packet {
            due: delivery,
            seq: st.seq,
            dest,
            data,
            sink: sink.clone(),
        });
        if was_earliest {
            self.shared.cv.notify_one();
        }
        Verdict::Scheduled(delivery)
    }

    /// How long until the link `key` has serialised everything queued on it.
    pub fn backlog(&self, key: SocketAddr) -> Duration {
        let st = lock(&self.shared.state);
        st.links
            .get(&key)
            .map(|c| c.free_at.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        // The thread delivers what is already scheduled, then exits.
        lock(&self.shared.state).shutdown = true;
        self.shared.cv.notify_one();
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn timing_thread(shared: &Shared) {
    let mut due_now: Vec<Packet> = Vec::new();
    let mut st = lock(&shared.state);
    loop {
        let Some(top) = st.heap.peek() else {
            if st.shutdown {
                return;
            }
            st = shared.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let due = top.due;
        let now = Instant::now();
        if due > now {
            let wait = due - now;
            if wait > SPIN_WINDOW {
                st = shared
                    .cv
                    .wait_timeout(st, wait - SPIN_WINDOW)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            } else {
                drop(st);
                while Instant::now() < due {
                    std::thread::yield_now();
                }
                st = lock(&shared.state);
            }
            continue;
        }
        while st.heap.peek().is_some_and(|p| p.due <= now) {
            due_now.push(st.heap.pop().expect("peeked"));
        }
        st.delivering = due_now.len();
        drop(st);
        for p in due_now.drain(..) {
            shared.count(p.sink.deliver(p.dest, &p.data), p.data.len());
        }
        st = lock(&shared.state);
        st.delivering = 0;
    }
}

impl Shared {
    /// Counts one delivery attempt of `len` bytes.
    fn count(&self, delivered: bool, len: usize) {
        let c = &self.counters.0;
        if delivered {
            c.packets_sent.fetch_add(1, Ordering::Relaxed);
            c.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
        } else {
            c.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Chan(Mutex<mpsc::Sender<(Instant, Vec<u8>)>>);
    impl Sink for Chan {
        fn deliver(&self, _dest: SocketAddr, data: &[u8]) -> bool {
            self.0
                .lock()
                .unwrap()
                .send((Instant::now(), data.to_vec()))
                .is_ok()
        }
    }

    /// Submit times on a virtual clock: `t0 + us` microseconds.
    fn at(t0: Instant, us: u64) -> Instant {
        t0 + Duration::from_micros(us)
    }

    fn due(v: Verdict) -> Instant {
        match v {
            Verdict::Scheduled(t) => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn schedule_adds_latency_and_paces_at_the_bandwidth() {
        let t0 = Instant::now();
        let spec: LinkSpec = "2ms,300mbit".parse().unwrap();
        let mut c = LinkClock::new(t0);
        let mut never = || panic!("no loss or jitter: nothing to draw");
        // An idle link: latency plus serialisation (1500 B at 300 Mbit/s = 40 us).
        let d = due(c.schedule(at(t0, 100), &spec, 1500, &mut never));
        assert_eq!(d, at(t0, 100 + 40 + 2000));
        // A burst: departures 40 us apart, so deliveries are too (exactly the bandwidth).
        let ds: Vec<Instant> = (0..100)
            .map(|_| due(c.schedule(at(t0, 200), &spec, 1500, &mut never)))
            .collect();
        assert_eq!(ds[0], at(t0, 200 + 40 + 2000));
        for w in ds.windows(2) {
            assert_eq!(w[1] - w[0], Duration::from_micros(40));
        }
        // After the burst has drained, the link is idle again.
        let d = due(c.schedule(at(t0, 1_000_000), &spec, 64, &mut never));
        let ser = spec.serialisation(64);
        assert_eq!(d, at(t0, 1_000_000) + ser + Duration::from_millis(2));
    }

    #[test]
    fn schedule_drops_the_tail_of_a_full_queue_and_keeps_fifo_under_jitter() {
        let t0 = Instant::now();
        // 1 Mbit/s, 10 kB queue: 1500-byte packets (12 ms each) fit while the backlog
        // plus the packet stays within 10 kB.
        let spec: LinkSpec = "0ms,1mbit,queue=10kb".parse().unwrap();
        let mut c = LinkClock::new(t0);
        let v: Vec<Verdict> = (0..10)
            .map(|_| c.schedule(t0, &spec, 1500, &mut || 0.5))
            .collect();
        let kept = v
            .iter()
            .take_while(|v| matches!(v, Verdict::Scheduled(_)))
            .count();
        assert_eq!(kept, 6, "{v:?}");
        assert!(v[kept..].iter().all(|v| *v == Verdict::QueueFull));
        // Jitter of ±0.9 ms on 1 ms with draws that alternate extremes: never reordered,
        // never before departure.
        let spec: LinkSpec = "1ms,jitter=0.9ms".parse().unwrap();
        let mut c = LinkClock::new(t0);
        let mut k = 0u32;
        let mut draw = || {
            k += 1;
            if k % 2 == 0 {
                0.999
            } else {
                0.0
            }
        };
        let ds: Vec<Instant> = (0..50)
            .map(|i| due(c.schedule(at(t0, 10 * i), &spec, 100, &mut draw)))
            .collect();
        assert!(ds.windows(2).all(|w| w[0] <= w[1]));
        assert!(ds
            .iter()
            .enumerate()
            .all(|(i, d)| *d >= at(t0, 10 * i as u64)));
    }

    #[test]
    fn schedule_loses_packets_at_the_loss_rate() {
        let t0 = Instant::now();
        let spec: LinkSpec = "1ms,loss=10%".parse().unwrap();
        let mut c = LinkClock::new(t0);
        let mut rng = 12345u64;
        let n = 100_000;
        let lost = (0..n)
            .filter(|_| c.schedule(t0, &spec, 100, &mut || uniform(&mut rng)) == Verdict::Lost)
            .count();
        let rate = lost as f64 / n as f64;
        assert!((rate - 0.10).abs() < 0.005, "{rate}");
    }

    #[test]
    fn fifo_under_jitter_and_queue_drop() {
        let line = DelayLine::new("t").unwrap();
        let (tx, rx) = mpsc::channel();
        let sink: Arc<dyn Sink> = Arc::new(Chan(Mutex::new(tx)));
        let key: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let spec: LinkSpec = "1ms,jitter=0.9ms".parse().unwrap();
        for i in 0u32..500 {
            line.submit(key, &spec, key, i.to_le_bytes().to_vec(), &sink);
        }
        for i in 0u32..500 {
            let (_, d) = rx.recv().unwrap();
            assert_eq!(d, i.to_le_bytes().to_vec());
        }
        // A 10 kB queue at 1 Mbit/s takes 6 of 1500-byte packets, then drops.
        let spec: LinkSpec = "0ms,1mbit,queue=10kb".parse().unwrap();
        let key2: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let v: Vec<_> = (0..10)
            .map(|_| line.submit(key2, &spec, key2, vec![0; 1500], &sink))
            .collect();
        let full = v.iter().filter(|v| **v == Verdict::QueueFull).count();
        assert!((3..=5).contains(&full), "{v:?}");
    }
}
