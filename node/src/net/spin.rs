//! Drive one latency-critical future (an allreduce) on the calling thread while another
//! thread runs the network, polling it in a yield loop for a short while before parking.
//! This is how [`super::driven::Driven::attach`] waits on a multi-threaded runtime; tpi's
//! own processes use [`super::driven::Driven::new`], where the waiting thread drives the
//! network itself, which is several times faster on small machines.
//!
//! `Handle::block_on` parks the caller on a futex as soon as the future is pending, so every
//! allreduce pays two thread wake-ups (network thread → compute thread) on top of the packet
//! path; on small VMs and edge boards waking a parked thread costs tens of µs. Spinning with
//! `yield_now` keeps the compute thread hot while still giving the core to the runtime's
//! network thread whenever it has work, and the park fallback bounds the CPU burnt when a
//! peer is slow.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long the caller polls in a yield loop before parking.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(300);

/// The default budget when `TPI_SPIN_US` is unset, in µs; `u64::MAX` = [`DEFAULT_SPIN`].
static DEFAULT_US: AtomicU64 = AtomicU64::new(u64::MAX);

/// Sets this process's spin budget for when `TPI_SPIN_US` is unset (a coordinator whose
/// local ranks outnumber the cores parks at once: see `park_waiting` in its backend choice).
pub fn set_default_spin(d: Duration) {
    DEFAULT_US.store(
        d.as_micros().min(u64::MAX as u128 - 1) as u64,
        Ordering::Relaxed,
    );
}

/// The spin budget: `TPI_SPIN_US` if set (0 parks at once), else the one
/// [`set_default_spin`] set, else [`DEFAULT_SPIN`].
pub fn spin_time() -> Duration {
    match std::env::var("TPI_SPIN_US") {
        Err(_) => match DEFAULT_US.load(Ordering::Relaxed) {
            u64::MAX => DEFAULT_SPIN,
            us => Duration::from_micros(us),
        },
        Ok(v) => match v.trim().parse() {
            Ok(us) => Duration::from_micros(us),
            Err(_) => {
                tracing::warn!(
                    "TPI_SPIN_US={v:?} is not a number of microseconds; using {DEFAULT_SPIN:?}"
                );
                DEFAULT_SPIN
            }
        },
    }
}

struct Flag {
    woken: AtomicBool,
    thread: Thread,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// Runs `fut` to completion on this thread inside `handle`'s context: polls, yield-spins up
/// to `spin` waiting for a wake-up, then parks until woken.
pub fn block_on<F: Future>(handle: &tokio::runtime::Handle, spin: Duration, fut: F) -> F::Output {
    let _ctx = handle.enter();
    let flag = Arc::new(Flag {
        woken: AtomicBool::new(false),
        thread: thread::current(),
    });
    let waker = Waker::from(Arc::clone(&flag));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        flag.woken.store(false, Ordering::Relaxed);
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        let t = Instant::now();
        while !flag.woken.swap(false, Ordering::Acquire) {
            if t.elapsed() < spin {
                thread::yield_now();
            } else {
                thread::park();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_futures_woken_from_other_threads() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        for spin in [Duration::ZERO, DEFAULT_SPIN] {
            let (tx, rx) = tokio::sync::oneshot::channel();
            rt.spawn(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                tx.send(7u32).unwrap();
            });
            assert_eq!(block_on(rt.handle(), spin, rx).unwrap(), 7);
        }
        // Timers need the runtime context, which block_on enters.
        let v = block_on(rt.handle(), DEFAULT_SPIN, async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            3
        });
        assert_eq!(v, 3);
    }
}
