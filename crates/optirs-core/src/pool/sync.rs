//! What the pool synchronises with: std's atomics, locks and threads, or loom's under
//! `--cfg loom` (`make loom`), so that the model checks in `loom_model.rs` run the pool's own
//! code. The two ways of waiting below are the only code that differs between the two builds:
//! loom explores every interleaving of the operations it sees, and a wait measured in time (or
//! a loop that polls 64 times before looking at the clock) is neither deterministic nor finite
//! to it.

#[cfg(loom)]
pub(super) use loom::{
    sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering},
    sync::{Arc, Mutex},
    thread::{self, Thread},
};
#[cfg(not(loom))]
pub(super) use std::{
    sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering},
    sync::{Arc, Mutex},
    thread::{self, Thread},
};

#[cfg(not(loom))]
use std::time::{Duration, Instant};

/// How often a spinning thread yields its CPU.
#[cfg(not(loom))]
const YIELD_EVERY: Duration = Duration::from_micros(20);

/// A thread's busy wait for another's progress: spins, and every [`YIELD_EVERY`] yields its
/// CPU, in case the thread it waits for (or another process) waits for that CPU. Not more
/// often: each yield is a system call, and progress made during one is seen late.
#[cfg(not(loom))]
pub(super) struct Backoff {
    yielded: Instant,
}

#[cfg(not(loom))]
impl Backoff {
    pub(super) fn new() -> Backoff {
        Backoff {
            yielded: Instant::now(),
        }
    }

    /// One round of the wait, between two looks at what is awaited.
    pub(super) fn snooze(&mut self) {
        std::hint::spin_loop();
        let now = Instant::now();
        if now - self.yielded >= YIELD_EVERY {
            thread::yield_now();
            self.yielded = now;
        }
    }
}

/// Calls `poll` until it returns something or `spin` has passed (then `None`), yielding the
/// CPU as [`Backoff`] does. `poll` is called 64 times between looks at the clock.
#[cfg(not(loom))]
pub(super) fn spin<T>(spin: Duration, mut poll: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    let mut yielded = start;
    loop {
        for _ in 0..64 {
            if let Some(found) = poll() {
                return Some(found);
            }
            std::hint::spin_loop();
        }
        let now = Instant::now();
        if now - start >= spin {
            return None;
        }
        if now - yielded >= YIELD_EVERY {
            thread::yield_now();
            yielded = now;
        }
    }
}

/// Under loom: every round of a busy wait is a yield, which tells loom that this thread waits
/// for another's progress (loom then runs the others rather than exploring the spin).
#[cfg(loom)]
pub(super) struct Backoff;

#[cfg(loom)]
impl Backoff {
    pub(super) fn new() -> Backoff {
        Backoff
    }

    #[allow(clippy::unused_self)] // the std build's signature
    pub(super) fn snooze(&mut self) {
        thread::yield_now();
    }
}

/// Under loom: one poll, as if the spin time ran out right after it. Whether a step is seen
/// while spinning or only after parking is thereby still explored both ways (the step may be
/// published before or after this poll).
#[cfg(loom)]
pub(super) fn spin<T>(
    _spin: std::time::Duration,
    mut poll: impl FnMut() -> Option<T>,
) -> Option<T> {
    poll()
}
