//! Model checks of the pool's protocol (see "Protocol" in the pool's documentation), run by
//! `make loom` (tools/loom.sh): loom runs each model under every interleaving of the pool's
//! atomic operations, locks, parks and unparks (up to its preemption bound), with every value
//! each load may see under the C++ memory model, and fails on a data race on an item's slot,
//! on a deadlock (a lost wake-up: nothing left to run), on a thread spinning without end, or on
//! a failed assertion.
//!
//! The models drive [`Pool::new`], [`Pool::run`] and the workers themselves; what differs under
//! loom is listed in `sync.rs`. Each ends by dropping the pool, and loom requires every
//! worker to have exited by then (and the shared state to be freed): shutdown is checked too.
//!
//! A failure that loom detects while a step is open (a deadlock while the caller waits, say)
//! is a panic on the caller inside the step's window, which [`super::AbortOnUnwind`] turns
//! into an abort: loom's message is printed first, provided the output is not captured
//! (`tools/loom.sh` passes `--nocapture`).

use super::sync::{thread, AtomicBool, Ordering};
use super::Pool;
use loom::cell::UnsafeCell;
use std::panic::{self, AssertUnwindSafe};

/// One slot per item. The caller writes them all before a step and reads them after it; the
/// item writes its own during the step. loom reports any two of these accesses that are not
/// ordered by happens-before: an item that does not see the caller's writes (the step was
/// not published), or a caller that returns before an item's write is visible (or while an
/// item still runs).
struct Slots(Vec<UnsafeCell<u32>>);

// SAFETY: each slot is written by one item at a time, the accesses checked by loom.
unsafe impl Sync for Slots {}

impl Slots {
    fn new(n: usize) -> Slots {
        Slots((0..n).map(|_| UnsafeCell::new(0)).collect())
    }

    /// Before step `k`: every slot says `10 * k`.
    fn prepare(&self, k: u32) {
        for slot in &self.0 {
            // SAFETY: no step runs.
            slot.with_mut(|p| unsafe { *p = 10 * k });
        }
    }

    /// Item `i` of step `k`: sees the caller's write, adds one.
    fn item(&self, i: usize, k: u32) {
        // SAFETY: loom checks that no other access to this slot is concurrent with this one.
        self.0[i].with_mut(|p| unsafe {
            assert_eq!(
                *p,
                10 * k,
                "item {i} of step {k} does not see the caller's write"
            );
            *p += 1;
        });
    }

    /// After step `k`: every item ran once, and its write is visible.
    fn check(&self, k: u32) {
        for (i, slot) in self.0.iter().enumerate() {
            // SAFETY: the step returned; loom checks that every item's write happened before.
            let v = slot.with(|p| unsafe { *p });
            assert_eq!(v, 10 * k + 1, "item {i} of step {k}");
        }
    }
}

/// One step of `n` items on `pool`, checked.
fn step(pool: &Pool, slots: &Slots, k: u32) {
    slots.prepare(k);
    pool.run(slots.0.len(), &|i| slots.item(i, k));
    slots.check(k);
}

/// Two steps back to back on the caller and one worker. The worker may still be inside the
/// first step's `work` (holding a stale copy of its claim word) when the second is published:
/// its compare-and-swap must fail, and it must not run anything of the first step once the
/// caller has returned from it.
#[test]
fn two_steps_with_a_stale_worker() {
    loom::model(|| {
        let pool = Pool::new(2).unwrap();
        let slots = Slots::new(2);
        step(&pool, &slots, 1);
        step(&pool, &slots, 2);
    });
}

/// The caller and two workers share one step's three items, one claim each at most. Three
/// threads multiply the interleavings: at most 2 preemptions here (under a minute on the
/// 2-core dev machine; 3 would take many minutes).
#[test]
fn three_threads_share_a_step() {
    model_preempting_at_most(2, || {
        let pool = Pool::new(3).unwrap();
        let slots = Slots::new(3);
        step(&pool, &slots, 1);
    });
}

/// A step that only finishes if the worker takes part: whichever thread claims item 1 waits
/// until another has run item 0. The worker starts by spinning (one poll under loom) and then
/// parks; whether it parked before the step was published or not, the caller must wake it. A
/// lost wake-up leaves the caller spinning in item 1 with the worker parked: loom reports it.
/// The second step needs the worker again, after it went back to waiting.
#[test]
fn a_parked_worker_is_woken() {
    loom::model(|| {
        let pool = Pool::new(2).unwrap();
        for _ in 0..2 {
            let ran = AtomicBool::new(false);
            pool.run(2, &|i| {
                if i == 0 {
                    ran.store(true, Ordering::Release);
                } else {
                    while !ran.load(Ordering::Acquire) {
                        thread::yield_now();
                    }
                }
            });
        }
    });
}

/// `loom::model`, with `LOOM_MAX_PREEMPTIONS` capped at `bound`.
fn model_preempting_at_most(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(builder.preemption_bound.map_or(bound, |b| b.min(bound)));
    builder.check(f);
}

/// A panic payload that panics when dropped: the pool must not drop the payloads it does not
/// re-raise (a panic there would unwind out of `work`, leaving its items uncounted).
struct Boom(usize);

impl Drop for Boom {
    fn drop(&mut self) {
        panic!("a panic payload was dropped");
    }
}

/// Both items panic (with payloads whose drop panics); each still runs once, one of the two
/// panics surfaces on the caller after both are done, and the pool then runs a step normally.
#[test]
fn a_panicking_item_surfaces_on_the_caller() {
    quiet_booms();
    loom::model(|| {
        let pool = Pool::new(2).unwrap();
        let slots = Slots::new(2);
        slots.prepare(1);
        let caught = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(2, &|i| {
                slots.item(i, 1);
                panic::panic_any(Boom(i));
            });
        }));
        slots.check(1);
        let payload = caught.unwrap_err();
        let boom = payload.downcast::<Boom>().unwrap();
        assert!(boom.0 < 2);
        std::mem::forget(boom);
        step(&pool, &slots, 2);
    });
}

/// Leaves the panic messages of [`Boom`] payloads out of the test output (loom runs the model
/// many times); any other panic is reported as usual.
fn quiet_booms() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let report = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<Boom>() {
                report(info);
            }
        }));
    });
}
