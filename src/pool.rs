//! The thread pool steps run on.
//!
//! A rayon pool does not survive `fork()`: the child inherits the pool's bookkeeping but none of
//! its threads, and the first parallel call would wait forever. The pool therefore remembers the
//! process that built it, and a forked child builds its own on first use.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rayon::prelude::*;
use rayon::ThreadPool;

/// Steps smaller than this many elements stay on the calling thread: waking the pool would
/// cost more than the work.
pub const PARALLEL_MIN_ELEMS: usize = 1 << 16;

struct Pool {
    pid: u32,
    threads: usize,
    workers: Arc<ThreadPool>,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);
static REQUESTED: Mutex<Option<usize>> = Mutex::new(None);

/// The thread count steps use: `set_num_threads`, else `OPTIRS_NUM_THREADS` (read once, like
/// `OMP_NUM_THREADS`), else the CPUs this process may run on.
fn wanted_threads() -> usize {
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    if let Some(n) = *REQUESTED.lock().unwrap_or_else(PoisonError::into_inner) {
        return n;
    }
    *DEFAULT.get_or_init(|| {
        std::env::var("OPTIRS_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
    })
}

fn current() -> Option<Arc<ThreadPool>> {
    let pid = std::process::id();
    let mut guard = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    let threads = wanted_threads();
    if let Some(p) = guard.as_ref() {
        if p.pid == pid && p.threads == threads {
            return Some(Arc::clone(&p.workers));
        }
    }
    if let Some(old) = guard.take() {
        if old.pid != pid {
            // Inherited through fork: its threads do not exist here, and dropping it would
            // signal them. Leak it.
            std::mem::forget(old);
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("optirs-{i}"))
        .build()
        .ok()?;
    let pool = Arc::new(pool);
    *guard = Some(Pool {
        pid,
        threads,
        workers: Arc::clone(&pool),
    });
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

fn parallel(n_items: usize, total_elems: usize) -> Option<Arc<ThreadPool>> {
    if n_items > 1 && total_elems >= PARALLEL_MIN_ELEMS && wanted_threads() > 1 {
        current()
    } else {
        None
    }
}

/// Runs `f` on every item, spread over the pool when the work is large enough.
pub fn for_each<I: Send>(items: Vec<I>, total_elems: usize, f: impl Fn(I) + Send + Sync) {
    match parallel(items.len(), total_elems) {
        Some(pool) => pool.install(|| items.into_par_iter().for_each(f)),
        None => items.into_iter().for_each(f),
    }
}

/// True when `f` holds for every item (all items are looked at; the answer does not depend on
/// the order or the number of threads).
pub fn all<I: Sync>(items: &[I], total_elems: usize, f: impl Fn(&I) -> bool + Send + Sync) -> bool {
    match parallel(items.len(), total_elems) {
        Some(pool) => pool.install(|| items.par_iter().all(f)),
        None => items.iter().all(f),
    }
}
