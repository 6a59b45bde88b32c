//! Persistent spinning-then-parking worker pool used to split kernel work across threads.
//!
//! Tasks are claimed from a generation-tagged atomic counter, so the caller never waits for a
//! worker that has not started: if workers are descheduled (e.g. a busy machine), the caller
//! simply runs the remaining tasks itself and only waits for tasks already in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Type-erased borrowed task closure; only called after claiming a task of its own generation.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync + 'static),
    n_tasks: usize,
    gen: u32,
}
// SAFETY: the pointee is `Sync`; validity is guaranteed by the claim protocol (see `run`).
unsafe impl Send for Job {}

struct Shared {
    /// Bumped once per `run`; workers wake on change.
    generation: AtomicUsize,
    /// `(gen << 32) | next_task_index`.
    next: AtomicU64,
    /// Tasks of the current generation that have finished.
    done: AtomicUsize,
    /// Workers currently parked (or about to park).
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    job: Mutex<Option<Job>>,
    lock: Mutex<()>,
    cv: Condvar,
}

/// How long an idle worker spins before parking.
const SPIN_TIME: Duration = Duration::from_millis(2);

/// Persistent worker pool; `run` splits tasks across workers and the calling thread.
/// With `n_threads == 1` everything runs inline on the caller.
pub struct ThreadPool {
    n_threads: usize,
    shared: Arc<Shared>,
    run_lock: Mutex<u32>,
    handles: Vec<JoinHandle<()>>,
}

/// The most threads a pool may be asked for: 4 per core of this machine (at least 4).
/// More only adds contention, and a mistyped count must not spawn threads until the
/// OS refuses.
pub fn max_threads() -> usize {
    4 * std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Checks a thread count given by a user (`what` names the flag): 1 ..= [`max_threads`].
pub fn check_threads(what: &str, n: usize) -> Result<usize, String> {
    check_threads_on(what, n, max_threads() / 4)
}

/// [`check_threads`] for a machine with `cores` cores: 1 ..= 4 per core.
pub fn check_threads_on(what: &str, n: usize, cores: usize) -> Result<usize, String> {
    let max = 4 * cores.max(1);
    if n == 0 {
        return Err(format!("{what} must be at least 1"));
    }
    if n > max {
        return Err(format!(
            "{what} {n} is more than 4 threads per core of this machine ({} cores): at most {max}",
            max / 4
        ));
    }
    Ok(n)
}

impl ThreadPool {
    /// Create a pool using `n_threads` threads in total (the caller counts as one; 0 is treated as 1).
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            next: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            job: Mutex::new(None),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        let handles = (1..n_threads)
            .map(|i| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("tpi-kernel-{i}"))
                    .spawn(move || worker(s))
                    .expect("failed to spawn kernel worker thread")
            })
            .collect();
        ThreadPool {
            n_threads,
            shared,
            run_lock: Mutex::new(0),
            handles,
        }
    }

    /// Total threads used by `run` (workers + caller).
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Run `f(i)` for every `i in 0..n_tasks` across the pool and the caller; returns when all are done.
    /// Nested or concurrent calls run inline on the calling thread.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.n_threads == 1 || n_tasks == 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        let mut guard = match self.run_lock.try_lock() {
            Ok(g) => g,
            Err(_) => {
                (0..n_tasks).for_each(f);
                return;
            }
        };
        *guard = guard.wrapping_add(1);
        let gen = *guard;
        let s = &*self.shared;
        // SAFETY: lifetime erased; a worker only calls it after claiming an index < n_tasks of
        // this generation, and we return only after all n_tasks have completed.
        let fp = unsafe {
            std::mem::transmute::<&(dyn Fn(usize) + Sync), *const (dyn Fn(usize) + Sync + 'static)>(
                f,
            )
        };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(Job {
            f: fp,
            n_tasks,
            gen,
        });
        s.done.store(0, Ordering::SeqCst);
        s.next.store((gen as u64) << 32, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.cv.notify_all();
        }
        // Waits for in-flight tasks even if `f` panics here, so the borrow stays valid.
        let _wait = WaitGuard { s, n_tasks };
        while let Some(i) = claim(s, gen, n_tasks) {
            f(i);
            s.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// Claim the next task index of generation `gen`, or `None` when that job is exhausted/stale.
fn claim(s: &Shared, gen: u32, n_tasks: usize) -> Option<usize> {
    let mut cur = s.next.load(Ordering::Acquire);
    loop {
        let idx = (cur & 0xffff_ffff) as usize;
        if (cur >> 32) as u32 != gen || idx >= n_tasks {
            return None;
        }
        match s
            .next
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Some(idx),
            Err(v) => cur = v,
        }
    }
}

struct WaitGuard<'a> {
    s: &'a Shared,
    n_tasks: usize,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let s = self.s;
        if std::thread::panicking() {
            // Stop workers from claiming more, then wait for the ones in flight.
            let claimed = loop {
                let cur = s.next.load(Ordering::Acquire);
                let idx = ((cur & 0xffff_ffff) as usize).min(self.n_tasks);
                let stop = (cur & !0xffff_ffff) | self.n_tasks as u64;
                if s.next
                    .compare_exchange(cur, stop, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    break idx;
                }
            };
            // The task that panicked on this thread never completes.
            while s.done.load(Ordering::Acquire) + 1 < claimed {
                std::thread::yield_now();
            }
        } else {
            let mut spins = 0u32;
            while s.done.load(Ordering::Acquire) < self.n_tasks {
                spins += 1;
                if spins > 2000 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn worker(s: Arc<Shared>) {
    let mut seen = 0usize;
    loop {
        // Wait for a new generation: spin first, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        seen = loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                break g;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN_TIME {
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                let mut l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                while s.generation.load(Ordering::SeqCst) == seen {
                    l = s.cv.wait(l).unwrap_or_else(|e| e.into_inner());
                }
                drop(l);
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
            } else {
                std::hint::spin_loop();
            }
        };
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            while let Some(i) = claim(&s, job.gen, job.n_tasks) {
                // SAFETY: we claimed an unfinished task of `job.gen`, so its `run` is still waiting.
                unsafe { (*job.f)(i) };
                s.done.fetch_add(1, Ordering::Release);
            }
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.cv.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads)
            .finish()
    }
}
