//! The thread pool steps run on: the calling thread and `n - 1` workers share one step's work
//! items, claimed in shrinking shares from one shared counter (see [`Shared::work`]).
//!
//! A step is a few microseconds to milliseconds of work, often repeated back to back. On a
//! virtual machine, waking a sleeping thread costs tens of microseconds and varies widely, so
//! the workers spin for a while after each step before they park (as OpenMP's workers do,
//! `OPTIRS_SPIN_US` sets how long; unlike them, they yield the CPU every 20 us, so that a
//! thread waiting for that CPU is not held up), and the caller works rather than sleeping
//! while they do.
//! The caller waits only for items other threads have claimed, never for a worker to wake up.
//! (Measured with rayon's pool, whose workers sleep within microseconds and whose caller blocks
//! until the job is done: Adam on 10^6 float32 elements took a median 184-233 us a step at
//! 2 threads, against 196 at 1; with this pool, see CHANGELOG.)
//!
//! Which thread runs which item does not change any result: items are independent slices.
//!
//! # Protocol
//!
//! What follows is the whole of what the threads agree on; `make loom` checks it with the code
//! below (`pool/loom_model.rs`), and `make miri` / `make tsan` run the stress tests.
//!
//! ## State
//!
//! Per pool, in [`Shared`]: `claims` (the step number in the high 32 bits, the unclaimed items
//! in the low 32), `job` (a pointer to the running step's [`Job`], on its caller's stack),
//! `done` (items of the step that have finished), `panic` (the step's first panic), `parked[w]`
//! (worker `w` is parked, or about to be), `stop`. Per [`Pool`]: `busy`, a `Mutex` holding the
//! last step number, locked by whoever runs a step.
//!
//! ## A step, in four states
//!
//! 1. **Closed.** `claims` is `(k, 0)`; no thread may dereference `job`.
//! 2. **Open** (by the caller, in [`Pool::run`], holding `busy`): `done.store(0, Relaxed)`,
//!    `job.store(&job, Relaxed)`, then `claims.store((k+1, n), Release)` publishes the step.
//!    Each of these is ordered before the workers' use of it by that Release store alone: a
//!    thread claims with `compare_exchange_weak(word, word - take, Acquire, Relaxed)`, and a
//!    claim that succeeds read the caller's store or a later claim of the same step (claims
//!    are read-modify-writes, which continue the store's release sequence). So the store
//!    synchronizes-with every successful claim: the job, `done = 0` and whatever the caller
//!    wrote before the step (the items `for_each` moves out) happen-before the claimant reads
//!    them. The claimant then reads `job` (Relaxed): it cannot see an older pointer (the store
//!    happened-before), nor a newer one (the caller stores `job` again only after counting
//!    this claim, below).
//! 3. **Claimed:** `claims` is `(k+1, 0)`. The caller claims alongside the workers (a claim
//!    takes a share of what is left) until nothing is left, then waits, spinning with
//!    [`sync::Backoff`], for `done.load(Acquire) == n`.
//! 4. **Counted, closed again.** Every claimant runs its items (each under `catch_unwind`),
//!    then `done.fetch_add(take, Release)`. The add that reaches `n` is the last in `done`'s
//!    modification order; every add before it is a read-modify-write, so each claimant's add
//!    heads a release sequence that the caller's Acquire load reads from: every item's writes
//!    happen-before the caller continues. It then stores `job = null` (Relaxed: hygiene, no
//!    reader), takes the panic (under its `Mutex`), unlocks `busy` (whose release orders this
//!    step's `done` and `job` accesses before the next step's, whichever thread runs it) and
//!    returns or re-raises.
//!
//! The guesses a claimant makes before its claim (`claims.load(Relaxed)`) order nothing: the
//! compare-and-swap checks the whole word. A thread holding the word of an older step (a
//! stale worker, descheduled in `work` while its step closed and the next opened) fails on the
//! step number. Should it sleep through exactly 2^32 steps and succeed, its claim is a genuine
//! claim of the current step: the swap compared the whole current word, and `job` is read after
//! it.
//!
//! ## Invariants that make the `unsafe` sound
//!
//! - A thread dereferences `job` only between a successful claim of step `k` and its
//!   `done.fetch_add` for that claim, and touches the step's items only in between.
//! - Claims partition `0..n`: each succeeds on the current word and lowers it by what it takes,
//!   so each item is claimed once (and `for_each` moves each item out once).
//! - `done` reaches `n` only when every item is claimed and every claim counted, and no claim
//!   of step `k` can succeed once `claims` is `(k, 0)` or holds a later step. So when the caller
//!   returns (its stack frame, the job and the items freed), no worker is between a claim and
//!   its count, and none can start one: **no worker touches a job after its caller returns**.
//!   After its count, a worker touches only [`Shared`], which its `Arc` keeps alive.
//! - The caller must not unwind between opening the step and seeing `done == n` (the workers
//!   read the job on its stack): [`AbortOnUnwind`] turns any unwinding there into an abort,
//!   and [`Shared::work`] never unwinds (items run under `catch_unwind`, a poisoned lock is
//!   taken anyway, a payload past the first is leaked, since its drop could panic).
//! - Progress never depends on a worker: the caller claims whatever is unclaimed itself, and
//!   waits only for claimed items, which their claimants are running. A worker that is slow to
//!   wake, descheduled, or missing altogether (were a pool inherited through `fork()` ever
//!   used) costs time, never a hang. So a lost wake-up would make a step slow, not stuck; the
//!   loom model of wake-ups runs a step that needs the worker, where one shows as a hang.
//!
//! ## Waiting for a step: spinning, then parking
//!
//! A worker that finished step `seen` polls `claims` (Relaxed: only the step number is used;
//! the claim acquires) and `stop` for `OPTIRS_SPIN_US`, yielding its CPU every 20 us
//! ([`sync::spin`]), then parks:
//!
//! ```text
//! worker w                                  caller, opening step k
//! loop {                                    claims.store((k, n), Release)
//!     parked[w].store(true, Relaxed)        fence(SeqCst)                     (F_c)
//!     fence(SeqCst)               (F_w)     for w: if parked[w].load(Relaxed)
//!     if claims's step != seen || stop {            unpark(w)
//!         parked[w].store(false, Relaxed)
//!         return                            Pool::drop:
//!     }                                     stop.store(true, Relaxed)
//!     park()                                for w: unpark(w)        (unconditionally)
//!     parked[w].store(false, Relaxed)
//! }
//! ```
//!
//! No wake-up is lost (Dekker's pattern; rayon-core's sleep module closes the same race between
//! posting work and falling asleep with its jobs event counter). SeqCst fences are totally ordered.
//! If `F_c` precedes `F_w`, the worker's load of `claims` after `F_w` sees the caller's store (or a
//! later one) and it does not park. If `F_w` precedes `F_c`, the caller's load of `parked[w]` sees
//! the worker's `true` or a later value; a later `false` is stored only by a worker that did not
//! park or has woken since, and its next round makes the same argument. Then the caller unparks it;
//! an `unpark` before the `park` leaves a token and `park` returns at once. A token left by an
//! unneeded unpark (a flag read just before the worker cleared it), like a spurious return from
//! `park`, only makes the loop look again. (SeqCst loads and stores instead of the fences were
//! correct too, but loom models SeqCst accesses as AcqRel and would report this lost wake-up that
//! cannot happen.)
//!
//! ## Stopping, and changes of the thread count
//!
//! A pool's thread count is fixed. [`set_num_threads`] records the count; the next step that
//! finds the process-wide pool ([`POOL`]) of another size builds a new one and drops the old
//! one's reference there; steps still running on the old one hold it by their `Arc` (a second
//! caller meanwhile finds `busy` locked and runs its items alone). When the last reference
//! goes, [`Pool`]'s drop stores `stop` and unparks every worker, parked or not: the token
//! means that no unpark is lost, and `unpark` synchronizes-with the `park` it ends, so a woken
//! worker sees `stop` (no data rides on `stop`, hence Relaxed). A spinning worker sees it in
//! its polls. The workers return, dropping their `Arc<Shared>`. If a worker cannot be
//! spawned, [`Pool::new`] stops the ones started the same way, and steps run on the caller
//! alone.
//!
//! ## `fork()`
//!
//! A pool does not survive `fork()`: the child inherits its bookkeeping but none of its
//! threads. The pool therefore remembers the process that built it, and a forked child builds
//! its own (and leaks the inherited one: its `busy` may be held by a thread the child lacks).
//! The process-wide locks ([`POOL`], [`REQUESTED`]) are taken with the GIL released, so another
//! thread may hold one when some thread forks; a child that inherited it held would wait
//! forever. [`init`] registers `pthread_atfork` handlers that take both before `fork()` and
//! release them after it, in parent and child, so a child always inherits them free. Neither
//! is held for long (no step runs under them, only a pool's construction), so the fork waits
//! at most that long. What the environment says (`OPTIRS_NUM_THREADS`, `OPTIRS_SPIN_US`) is
//! read once, by [`init`], at import: a `OnceLock` left half-initialised by a fork would hang
//! the child too.
//!
//! ## Panics
//!
//! A panic in an item (a bug: the kernels cannot fail) is caught on the thread that ran it and
//! kept in `panic` if it is the step's first (the `Mutex`'s unlock, before the claimant's
//! `done` add, orders it before the caller takes it); every other item still runs, and the
//! caller re-raises the first panic once all are counted, after unlocking `busy`.
//!
//! ## Under loom
//!
//! `make loom` (`tools/loom.sh`) builds with `--cfg loom`: [`sync`] then hands out loom's
//! atomics, `fence`, `Mutex`, `Arc` and threads, and the models drive [`Pool::new`],
//! [`Pool::run`] and the workers unchanged, with these differences:
//! - the busy waits ([`sync::Backoff`], the caller's wait for `done`, and [`sync::spin`], a
//!   worker's spin before parking) take no time: the first yields to loom every round, the
//!   second polls once and gives up, so that parking comes right after (or before) a step is
//!   published, both explored;
//! - outside the models: the process-wide [`POOL`] and [`REQUESTED`] (std's `Mutex`, in both
//!   builds), `pthread_atfork` and its thread-local, the environment read by [`init`] (a
//!   model's pool reads its spin time, unused under loom, from the `OnceLock`), and `fork()`;
//! - loom does not model spurious returns from `park` (the loop above tolerates them) and
//!   bounds its search (`LOOM_MAX_PREEMPTIONS`: 3 in `make loom`, 2 for the model with
//!   three threads).

mod sync;

#[cfg(all(test, loom))]
mod loom_model;

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{OnceLock, PoisonError};
use std::time::Duration;
use sync::{fence, thread, Arc, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Backoff, Mutex};
use sync::{Ordering, Thread};

/// Steps smaller than this many elements stay on the calling thread: sharing them would cost
/// more than the work.
pub const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// How long a worker spins for the next step before it parks, unless `OPTIRS_SPIN_US` says.
const DEFAULT_SPIN_US: u64 = 200;

/// Aborts the process if dropped while unwinding: guards a window in which unwinding would free
/// memory other threads still read (as rayon-core's `AbortIfPanic`). Forgotten on the normal
/// path.
struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "optirs: unwinding out of a step whose job other threads still read; aborting"
            );
            std::process::abort();
        }
    }
}

/// One step's items, as the workers see them: `run(i)` runs item `i`.
struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
}

/// What the caller and the workers share.
struct Shared {
    /// The current step's number (high 32 bits) and how many of its items are unclaimed (low
    /// 32 bits); items are claimed from the top down, so a claim is one compare-and-swap and
    /// needs nothing but this word. A stale worker's swap fails on the step number.
    claims: AtomicU64,
    /// The current step's items; only read through a successful claim of that step.
    job: AtomicPtr<Job<'static>>,
    /// Items of the current step that have finished (or panicked).
    done: AtomicUsize,
    /// The first panic of the current step's items, re-raised on the calling thread.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Each worker's "parked, or about to be": the caller unparks those at the next step.
    parked: Vec<AtomicBool>,
    stop: AtomicBool,
    spin: Duration,
}

impl Shared {
    /// Claims and runs the items of step `epoch` until none are left. Never unwinds.
    ///
    /// Claims are guided, as OpenMP's `schedule(guided)`: a claim takes a share of what is
    /// left (an eighth at 4 threads, a quarter at 2), so that each thread streams through long
    /// runs of neighbouring items, and the last claims, one item each, even out the finish.
    fn work(&self, epoch: u32) {
        let share = 2 * (self.parked.len() as u32 + 1);
        // A guess at the word, which the compare-and-swap checks; only a claim acquires.
        let mut word = self.claims.load(Ordering::Relaxed);
        loop {
            let (e, left) = ((word >> 32) as u32, word as u32);
            if e != epoch || left == 0 {
                return;
            }
            let take = (left / share).max(1);
            let claimed = (u64::from(epoch) << 32) | u64::from(left - take);
            match self.claims.compare_exchange_weak(
                word,
                claimed,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    // SAFETY: the claim succeeded for `epoch`, so its caller is still waiting
                    // for these items (it returns only once `done` counts every item) and the
                    // job it published before the step's claims is alive (and visible: the
                    // claim read the step's word, released after the job's store).
                    let job = unsafe { &*self.job.load(Ordering::Relaxed) };
                    for item in (left - take) as usize..left as usize {
                        if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| (job.run)(item))) {
                            let mut slot =
                                self.panic.lock().unwrap_or_else(PoisonError::into_inner);
                            if slot.is_none() {
                                *slot = Some(p);
                            } else {
                                // Not dropped: a payload's drop may panic, and unwinding from
                                // here would leave these items uncounted (or abort the caller).
                                std::mem::forget(p);
                            }
                        }
                    }
                    self.done.fetch_add(take as usize, Ordering::Release);
                    word = self.claims.load(Ordering::Relaxed);
                }
                Err(now) => word = now,
            }
        }
    }
}

struct Pool {
    pid: u32,
    shared: Arc<Shared>,
    workers: Vec<Thread>,
    /// Held by the thread whose step is running; another thread's step runs on its own.
    busy: Mutex<u32>,
}

impl Pool {
    fn new(threads: usize) -> Option<Pool> {
        let shared = Arc::new(Shared {
            claims: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
            parked: (1..threads).map(|_| AtomicBool::new(false)).collect(),
            stop: AtomicBool::new(false),
            spin: spin_time(),
        });
        let mut workers = Vec::with_capacity(threads - 1);
        for w in 0..threads - 1 {
            let s = Arc::clone(&shared);
            let spawned = thread::Builder::new()
                .name(format!("optirs-{w}"))
                .spawn(move || worker(&s, w));
            let Ok(handle) = spawned else {
                // Steps run on the calling thread alone; the workers started exit.
                shared.stop.store(true, Ordering::Relaxed);
                workers.iter().for_each(Thread::unpark);
                return None;
            };
            workers.push(handle.thread().clone());
        }
        Some(Pool {
            pid: std::process::id(),
            shared,
            workers,
            busy: Mutex::new(0),
        })
    }

    /// Runs `run(i)` for every `i < n` on the caller and the workers; returns once all are
    /// done, re-raising the first panic of any.
    fn run(&self, n: usize, run: &(dyn Fn(usize) + Sync)) {
        let Ok(count) = u32::try_from(n) else {
            return (0..n).for_each(run);
        };
        let Ok(mut epoch) = self.busy.try_lock() else {
            return (0..n).for_each(run);
        };
        *epoch = epoch.wrapping_add(1);
        let s = &*self.shared;
        let job = Job { run };
        let guard = AbortOnUnwind;
        s.done.store(0, Ordering::Relaxed);
        // The workers dereference `job` only through a claim of this step, and every claim is
        // counted in `done` before this function returns: the borrow outlives every use.
        let ptr = std::ptr::from_ref(&job).cast_mut().cast::<Job<'static>>();
        s.job.store(ptr, Ordering::Relaxed);
        // Publishes the step: a claim that reads this (Acquire) sees `job` and `done` above,
        // and everything the caller wrote before the step.
        s.claims.store(
            (u64::from(*epoch) << 32) | u64::from(count),
            Ordering::Release,
        );
        // Paired with the fence between a worker's store of its flag and its re-read of
        // `claims`: either it sees this step's claims or this sees its flag.
        fence(Ordering::SeqCst);
        for (flag, t) in s.parked.iter().zip(&self.workers) {
            if flag.load(Ordering::Relaxed) {
                t.unpark();
            }
        }
        s.work(*epoch);
        // Every item is claimed; the ones still running are on workers, a share's time at
        // most.
        let mut backoff = Backoff::new();
        while s.done.load(Ordering::Acquire) < n {
            backoff.snooze();
        }
        s.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        std::mem::forget(guard);
        let panicked = s
            .panic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(epoch);
        if let Some(p) = panicked {
            panic::resume_unwind(p);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // No data rides on `stop`: the unpark that follows wakes each worker, and a worker
        // that returns from `park` sees what preceded the unpark.
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in &self.workers {
            t.unpark();
        }
    }
}

fn worker(s: &Shared, w: usize) {
    let mut seen = 0u32;
    loop {
        let epoch = wait(s, w, seen);
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        s.work(epoch);
        seen = epoch;
    }
}

/// The next step's number after `seen` (or `seen`, once the pool stops): spins for `s.spin`,
/// then parks until woken.
fn wait(s: &Shared, w: usize, seen: u32) -> u32 {
    // Only the number: the step's data is acquired by the claim, in `work`.
    let current = || (s.claims.load(Ordering::Relaxed) >> 32) as u32;
    let news = || {
        let e = current();
        (e != seen || s.stop.load(Ordering::Relaxed)).then_some(e)
    };
    // Spinning on a shared CPU only delays the thread it waits for: `spin` yields it now and
    // then (to the caller itself, if the scheduler put both here, or to another process).
    if let Some(e) = sync::spin(s.spin, news) {
        return e;
    }
    loop {
        s.parked[w].store(true, Ordering::Relaxed);
        // Paired with the caller's fence between publishing a step and reading the flags.
        fence(Ordering::SeqCst);
        if let Some(e) = news() {
            s.parked[w].store(false, Ordering::Relaxed);
            return e;
        }
        thread::park();
        s.parked[w].store(false, Ordering::Relaxed);
    }
}

/// What the environment asked of the pool, read once by [`init`].
struct Config {
    /// `OPTIRS_SPIN_US`: how long a worker spins after a step (0: park at once).
    spin: Duration,
    /// `OPTIRS_NUM_THREADS`, else the CPUs this process may run on.
    threads: usize,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// Reads a variable that must parse as a number (`min` or more); a value that does not gives
/// `default` and a warning naming the variable and what is used instead.
#[allow(clippy::unnecessary_debug_formatting)] // quoted, with escapes: the value may be anything
fn env_number(name: &str, min: u64, default: u64, warnings: &mut Vec<String>) -> u64 {
    let Some(raw) = std::env::var_os(name) else {
        return default;
    };
    match raw.to_str().and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(n) if n >= min => n,
        _ => {
            warnings.push(format!(
                "{name}={raw:?} is not a whole number >= {min}; using {default}"
            ));
            default
        }
    }
}

fn read_config(warnings: &mut Vec<String>) -> Config {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let spin = env_number("OPTIRS_SPIN_US", 0, DEFAULT_SPIN_US, warnings);
    let threads = env_number("OPTIRS_NUM_THREADS", 1, cpus as u64, warnings);
    Config {
        spin: Duration::from_micros(spin),
        threads: usize::try_from(threads).unwrap_or(cpus),
    }
}

fn config() -> &'static Config {
    // `init` sets it at import; this is for Rust tests and benches, which skip the import.
    CONFIG.get_or_init(|| read_config(&mut Vec::new()))
}

/// Reads the pool's environment variables and makes `fork()` safe for the pool's locks (see
/// the module documentation). Called once, at import, with the GIL held; returns a warning
/// for each variable whose value could not be used.
pub fn init() -> Vec<String> {
    let mut warnings = Vec::new();
    let cfg = read_config(&mut warnings);
    if CONFIG.set(cfg).is_err() {
        return Vec::new();
    }
    warnings.extend(crate::omp::init());
    #[cfg(unix)]
    {
        // SAFETY: the handlers are plain functions that only lock and unlock this module's
        // mutexes; registration has no other effect.
        let rc = unsafe {
            libc::pthread_atfork(Some(fork_prepare), Some(fork_release), Some(fork_release))
        };
        if rc != 0 {
            warnings.push(format!(
                "pthread_atfork failed ({rc}): a child forked while another thread starts \
                 optirs's thread pool may hang"
            ));
        }
    }
    warnings
}

/// Spin duration of new pools.
fn spin_time() -> Duration {
    config().spin
}

// std's locks under loom too: the process-wide state is outside the models.
static POOL: std::sync::Mutex<Option<Arc<Pool>>> = std::sync::Mutex::new(None);
static REQUESTED: std::sync::Mutex<Option<usize>> = std::sync::Mutex::new(None);

#[cfg(unix)]
thread_local! {
    /// The locks `fork_prepare` took, released by `fork_release` on the same thread (in the
    /// child, the only thread).
    static FORK_HELD: std::cell::RefCell<Vec<Box<dyn std::any::Any>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Before `fork()`: take every process-wide lock of the pool (always in this order; no other
/// code holds both at once), so that none is inherited held by a thread the child lacks.
#[cfg(unix)]
extern "C" fn fork_prepare() {
    let requested = REQUESTED.lock().unwrap_or_else(PoisonError::into_inner);
    let pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    FORK_HELD.with(|h| {
        let mut h = h.borrow_mut();
        h.push(Box::new(requested));
        h.push(Box::new(pool));
    });
}

/// After `fork()`, in the parent and in the child: release what `fork_prepare` took.
#[cfg(unix)]
extern "C" fn fork_release() {
    FORK_HELD.with(|h| {
        // Reverse order of taking.
        while h.borrow_mut().pop().is_some() {}
    });
}

/// The thread count steps use: `set_num_threads`, else `OPTIRS_NUM_THREADS` (read once, like
/// `OMP_NUM_THREADS`), else the CPUs this process may run on.
fn wanted_threads() -> usize {
    if let Some(n) = *REQUESTED.lock().unwrap_or_else(PoisonError::into_inner) {
        return n;
    }
    config().threads
}

fn current(threads: usize) -> Option<Arc<Pool>> {
    let pid = std::process::id();
    let mut guard = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(p) = guard.as_ref() {
        // The caller is one of the threads.
        if p.pid == pid && p.workers.len() + 1 == threads {
            return Some(Arc::clone(p));
        }
    }
    if let Some(old) = guard.take() {
        if old.pid != pid {
            // Inherited through fork: its threads do not exist here, and its mutexes may be
            // held by threads that do not either. Leak it.
            std::mem::forget(old);
        }
    }
    let pool = Arc::new(Pool::new(threads)?);
    *guard = Some(Arc::clone(&pool));
    Some(pool)
}

/// Sets the number of threads steps use from now on (at least 1).
pub fn set_num_threads(n: usize) {
    *REQUESTED.lock().unwrap_or_else(PoisonError::into_inner) = Some(n.max(1));
}

/// The number of threads steps use.
#[must_use]
pub fn num_threads() -> usize {
    wanted_threads()
}

/// Where a parallel step runs: the calling thread's OpenMP team ([`crate::omp`]) when the
/// process has an OpenMP runtime loaded, else this module's pool.
enum Executor {
    OpenMp(crate::omp::GompParallel, usize),
    Own(Arc<Pool>),
}

/// Runs `run(i)` for every `i < n`, on several threads; returns once all are done, re-raising
/// the first panic of any.
trait Runner {
    fn run(&self, n: usize, run: &(dyn Fn(usize) + Sync));
}

impl Runner for Pool {
    fn run(&self, n: usize, run: &(dyn Fn(usize) + Sync)) {
        Pool::run(self, n, run);
    }
}

impl Runner for Executor {
    fn run(&self, n: usize, run: &(dyn Fn(usize) + Sync)) {
        match self {
            Executor::OpenMp(parallel, threads) => crate::omp::run(*parallel, *threads, n, run),
            Executor::Own(pool) => pool.run(n, run),
        }
    }
}

fn executor(threads: usize) -> Option<Executor> {
    if let Some(parallel) = crate::omp::team() {
        return Some(Executor::OpenMp(parallel, threads));
    }
    current(threads).map(Executor::Own)
}

fn parallel(n_items: usize, total_elems: usize) -> Option<Executor> {
    let threads = wanted_threads();
    if n_items > 1 && total_elems >= PARALLEL_MIN_ELEMS && threads > 1 {
        executor(threads)
    } else {
        None
    }
}

/// What a large step started now on this thread runs on: `"openmp"` (the thread's team of an
/// OpenMP runtime the process loaded), `"pool"` (this module's threads) or `"serial"` (one
/// thread).
#[must_use]
pub fn executor_name() -> &'static str {
    // A query: it neither builds nor replaces a pool.
    if wanted_threads() <= 1 {
        "serial"
    } else if crate::omp::team().is_some() {
        "openmp"
    } else {
        "pool"
    }
}

/// Runs `f` on every item, spread over the pool when the work is large enough.
pub fn for_each<I: Send>(items: Vec<I>, total_elems: usize, f: impl Fn(I) + Send + Sync) {
    match parallel(items.len(), total_elems) {
        Some(pool) => for_each_on(&pool, items, f),
        None => items.into_iter().for_each(f),
    }
}

fn for_each_on<I: Send>(pool: &impl Runner, items: Vec<I>, f: impl Fn(I) + Send + Sync) {
    let mut items = std::mem::ManuallyDrop::new(items);
    let (base, n) = (SendPtr(items.as_mut_ptr()), items.len());
    let run = move |i: usize| {
        // SAFETY: the pool runs each index below `n` exactly once, so each item is moved out
        // once; the vector's buffer is freed below without dropping them again.
        let item = unsafe { base.get().add(i).read() };
        f(item);
    };
    let free = Free(&mut items);
    pool.run(n, &run);
    drop(free);
}

/// True when `f` holds for every item (the answer does not depend on the order or the number
/// of threads).
pub fn all<I: Sync>(items: &[I], total_elems: usize, f: impl Fn(&I) -> bool + Send + Sync) -> bool {
    let Some(pool) = parallel(items.len(), total_elems) else {
        return items.iter().all(f);
    };
    let ok = AtomicBool::new(true);
    pool.run(items.len(), &|i| {
        if !f(&items[i]) {
            ok.store(false, Ordering::Relaxed);
        }
    });
    ok.into_inner()
}

/// A pointer the pool's threads may share; each index behind it is used by one thread.
struct SendPtr<I>(*mut I);
impl<I> Clone for SendPtr<I> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I> Copy for SendPtr<I> {}
// SAFETY: `for_each` moves each item out once, on one thread; `I: Send`.
unsafe impl<I: Send> Send for SendPtr<I> {}
// SAFETY: as above.
unsafe impl<I: Send> Sync for SendPtr<I> {}
impl<I> SendPtr<I> {
    fn get(self) -> *mut I {
        self.0
    }
}

/// Frees a vector's buffer whose items have all been moved out (also when unwinding).
struct Free<'a, I>(&'a mut std::mem::ManuallyDrop<Vec<I>>);
impl<I> Drop for Free<'_, I> {
    fn drop(&mut self) {
        // SAFETY: `Pool::run` returns (or unwinds) only after every item has been moved out.
        unsafe { self.0.set_len(0) };
        // SAFETY: the vector is not used again.
        unsafe { std::mem::ManuallyDrop::drop(self.0) };
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Miri (`make miri`) interprets every instruction: it gets fewer and smaller steps. Its
    /// scheduler preempts threads at random points, and the seeds it runs with vary them.
    const MIRI: bool = cfg!(miri);

    /// Counts its drops, so that a test sees every item consumed exactly once.
    struct Counted<'a>(usize, &'a [AtomicUsize]);
    impl Drop for Counted<'_> {
        fn drop(&mut self) {
            self.1[self.0].fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn every_item_runs_once_at_every_thread_count() {
        let sizes: &[usize] = if MIRI {
            &[0, 1, 2, 3, 7, 33]
        } else {
            &[0, 1, 2, 3, 7, 64, 1000]
        };
        for threads in 2..=4 {
            let pool = Pool::new(threads).unwrap();
            for &n in sizes {
                // Several steps on one pool: the workers go from spinning to the next step.
                for _ in 0..if MIRI { 2 } else { 3 } {
                    let ran: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    let dropped: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    let items: Vec<Counted<'_>> = (0..n).map(|i| Counted(i, &dropped)).collect();
                    for_each_on(&pool, items, |it| {
                        ran[it.0].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(
                        ran.iter().all(|r| r.load(Ordering::Relaxed) == 1),
                        "{threads} {n}"
                    );
                    assert!(dropped.iter().all(|d| d.load(Ordering::Relaxed) == 1));
                }
            }
        }
    }

    #[test]
    fn workers_that_parked_are_woken() {
        let pool = Pool::new(3).unwrap();
        let ran = AtomicUsize::new(0);
        let n = if MIRI { 24 } else { 256 };
        for _ in 0..3 {
            // Longer than any spin: the workers are parked when the step starts.
            thread::sleep(pool.shared.spin + Duration::from_millis(5));
            let on = Mutex::new(std::collections::HashSet::new());
            pool.run(n, &|_| {
                ran.fetch_add(1, Ordering::Relaxed);
                on.lock().unwrap().insert(thread::current().id());
                thread::sleep(Duration::from_micros(200));
            });
            let threads = on.into_inner().unwrap().len();
            assert!(threads > 1, "only the calling thread ran the items");
        }
        assert_eq!(ran.load(Ordering::Relaxed), 3 * n);
    }

    #[test]
    fn a_panicking_item_surfaces_on_the_caller_after_every_item_ran() {
        let pool = Pool::new(2).unwrap();
        let n = if MIRI { 40 } else { 200 };
        let ran: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let caught = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(n, &|i| {
                ran[i].fetch_add(1, Ordering::Relaxed);
                assert!(i != n * 3 / 4 && i != 3, "item {i} fails");
            });
        }));
        let message = caught.unwrap_err();
        let message = message.downcast_ref::<String>().unwrap();
        assert!(message.starts_with("item "), "{message}");
        assert!(ran.iter().all(|r| r.load(Ordering::Relaxed) == 1));
        // The pool still works.
        let count = AtomicUsize::new(0);
        pool.run(n, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), n);
    }

    /// A panic payload whose drop panics.
    struct Boom;
    impl Drop for Boom {
        fn drop(&mut self) {
            panic!("a panic payload was dropped");
        }
    }

    /// Every item panics with a payload whose drop panics. The pool keeps the first and must
    /// not drop the others: a panic while dropping one on a worker would unwind out of its
    /// `work`, its items never counted (the caller would wait forever); on the caller, it
    /// would abort.
    #[test]
    fn panic_payloads_that_panic_when_dropped_are_not_dropped() {
        let pool = Pool::new(3).unwrap();
        let n = if MIRI { 12 } else { 64 };
        for _ in 0..3 {
            let caught = panic::catch_unwind(AssertUnwindSafe(|| {
                pool.run(n, &|_| panic::panic_any(Boom));
            }));
            std::mem::forget(caught.unwrap_err().downcast::<Boom>().unwrap());
        }
    }

    #[test]
    fn steps_from_several_threads_at_once_all_complete() {
        let pool = Pool::new(2).unwrap();
        let total = AtomicUsize::new(0);
        let (callers, steps, n) = if MIRI { (3, 4, 17) } else { (4, 50, 97) };
        thread::scope(|s| {
            for _ in 0..callers {
                s.spawn(|| {
                    for _ in 0..steps {
                        pool.run(n, &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), callers * steps * n);
    }

    #[test]
    fn a_dropped_pool_stops_its_workers() {
        let pool = Pool::new(3).unwrap();
        pool.run(10, &|_| {});
        let shared = Arc::clone(&pool.shared);
        drop(pool);
        let start = Instant::now();
        while Arc::strong_count(&shared) > 1 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "workers still running"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// The process-wide pool as steps use it: several threads step at once (one of them on
    /// the pool, the others on their own, see `Pool::run`) while two of them change the thread
    /// count, which replaces the pool under the others. Each step writes disjoint chunks of its
    /// caller's array on whichever threads claim them, then reads them all back through `all`
    /// on the pool and on the caller. The race detectors (`make miri`, `make tsan`) check that
    /// every such write is ordered before the reads.
    #[test]
    fn concurrent_steps_on_the_global_pool_while_the_thread_count_changes() {
        let (callers, steps, len, chunk) = if MIRI {
            (3, 4, 24, 5)
        } else {
            (4, 300, 4096, 97)
        };
        thread::scope(|s| {
            for c in 0..callers {
                s.spawn(move || {
                    let mut data = vec![0u32; len];
                    for step in 0..steps {
                        if c < 2 {
                            set_num_threads(1 + (step + 2 * c) % 4);
                        }
                        let pieces: Vec<&mut [u32]> = data.chunks_mut(chunk).collect();
                        for_each(pieces, PARALLEL_MIN_ELEMS, |piece| {
                            for x in piece.iter_mut() {
                                *x += 1;
                            }
                        });
                        let rows: Vec<&[u32]> = data.chunks(chunk).collect();
                        let want = u32::try_from(step).unwrap() + 1;
                        assert!(all(&rows, PARALLEL_MIN_ELEMS, |r| r
                            .iter()
                            .all(|&x| x == want)));
                    }
                    assert!(num_threads() >= 1);
                });
            }
        });
    }
}
