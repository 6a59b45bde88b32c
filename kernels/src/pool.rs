//! Persistent spinning-then-parking worker pool used to split kernel work across threads.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Type-erased borrowed task closure; only dereferenced while `run` is blocked.
type JobPtr = *const (dyn Fn(usize) + Sync + 'static);

struct Shared {
    /// Bumped once per `run`; workers wake on change.
    generation: AtomicUsize,
    /// Next task index to claim.
    next: AtomicUsize,
    /// Number of tasks in the current job.
    n_tasks: AtomicUsize,
    /// Workers that have not yet finished the current generation.
    pending: AtomicUsize,
    /// Workers currently parked (or about to park).
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    job: UnsafeCell<Option<JobPtr>>,
    lock: Mutex<()>,
    cv: Condvar,
}

// SAFETY: `job` is written only by the thread holding `run_lock` before the generation bump
// (Release) and read by workers after observing it (Acquire); `run` waits for all workers.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// How long an idle worker spins before parking.
const SPIN_TIME: Duration = Duration::from_millis(2);

/// Persistent worker pool; `run` splits tasks across workers and the calling thread.
/// With `n_threads == 1` everything runs inline on the caller.
pub struct ThreadPool {
    n_threads: usize,
    shared: Arc<Shared>,
    run_lock: Mutex<()>,
    handles: Vec<JoinHandle<()>>,
}

impl ThreadPool {
    /// Create a pool using `n_threads` threads in total (the caller counts as one; 0 is treated as 1).
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            n_tasks: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            job: UnsafeCell::new(None),
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
        ThreadPool { n_threads, shared, run_lock: Mutex::new(()), handles }
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
        let _guard = match self.run_lock.try_lock() {
            Ok(g) => g,
            Err(_) => {
                (0..n_tasks).for_each(f);
                return;
            }
        };
        let s = &*self.shared;
        // SAFETY: lifetime erased; the pointer is only used until `pending` reaches zero below.
        let ptr: JobPtr = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), JobPtr>(f) };
        unsafe { *s.job.get() = Some(ptr) };
        s.n_tasks.store(n_tasks, Ordering::Relaxed);
        s.next.store(0, Ordering::Relaxed);
        s.pending.store(self.n_threads - 1, Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.cv.notify_all();
        }
        // Waits for the workers even if `f` panics on this thread, so the borrow stays valid.
        let _wait = WaitGuard(s);
        // The caller works too.
        loop {
            let i = s.next.fetch_add(1, Ordering::Relaxed);
            if i >= n_tasks {
                break;
            }
            f(i);
        }
    }
}

struct WaitGuard<'a>(&'a Shared);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let s = self.0;
        while s.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        // SAFETY: all workers are done with the job.
        unsafe { *s.job.get() = None };
    }
}

fn worker(s: Arc<Shared>) {
    let mut seen = 0usize;
    loop {
        // Wait for a new generation: spin first, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        let gen = loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                break g;
            }
            spins += 1;
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
        seen = gen;
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: published before the generation bump; valid until we decrement `pending`.
        let job = unsafe { *s.job.get() };
        if let Some(ptr) = job {
            let f = unsafe { &*ptr };
            let n = s.n_tasks.load(Ordering::Relaxed);
            loop {
                let i = s.next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                f(i);
            }
        }
        s.pending.fetch_sub(1, Ordering::Release);
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
        f.debug_struct("ThreadPool").field("n_threads", &self.n_threads).finish()
    }
}
