//! Steps on the OpenMP team of the process's OpenMP runtime, when one is already loaded.
//!
//! In a training loop, torch's intra-op work (forward, backward) runs on an OpenMP team, whose
//! workers keep spinning for a while after each parallel region (libgomp's default wait
//! policy). A step that starts right after backward and hands work to optirs's own workers
//! finds the CPUs held by those spinning threads: a share a worker claimed can finish late,
//! and the step waits for it. torch's fused optimizers run on the same warm team instead. So
//! does optirs, where it can: when an OpenMP runtime is loaded in the process (torch's libgomp;
//! Intel's libiomp5 and LLVM's libomp export the same `GOMP_parallel` entry point), a step's
//! items are run by `GOMP_parallel` on the calling thread's team, each team thread claiming
//! items from one shared counter exactly as the own pool's threads do. Which thread runs
//! which item changes no result (items are independent slices), so steps are bitwise the
//! same on either executor.
//!
//! What is never done:
//! - Loading a runtime: only one the process already has is used (`RTLD_NOLOAD`); a process
//!   without torch (or another OpenMP user) runs on the own pool. Libraries loaded later are
//!   noticed through the loader's count of loads (`dlpi_adds`), one cheap call per step.
//! - Using it in a forked child: GNU libgomp is not fork-safe (a child of a process that ran a
//!   parallel region hangs in its next one, GCC bug 60035). The runtime is used only in the
//!   process that imported optirs ([`init`] records its id; a child has another), so a
//!   DataLoader worker or a multiprocessing child steps on the own pool, as after any fork.
//! - Using a team the runtime keeps to one thread (`omp_get_max_threads() == 1` on the calling
//!   thread: `torch.set_num_threads(1)`, which DataLoader workers call): there is no warm team
//!   to borrow, and a child forked before optirs was imported (whose id [`init`] cannot tell
//!   from a parent's) is safe only this way, as torch's own operations are.
//! - Unwinding through C: a panic in an item is caught on the thread that ran it, every other
//!   item still runs, and the first panic is re-raised on the caller after `GOMP_parallel`
//!   returned, as the own pool does.
//!
//! `OPTIRS_OPENMP=0` turns this off (steps always use the own pool).
//!
//! # Soundness
//! - The `GOMP_parallel` pointer comes from `dlsym` on a handle `dlopen` returned for a
//!   library already loaded; that handle is never closed, so the library, and the function,
//!   stay mapped for the life of the process.
//! - `GOMP_parallel(f, data, n, 0)` runs `f(data)` on `n` threads of a team, the caller among
//!   them, and returns only after every one of them has returned from `f` (the implicit
//!   barrier at the end of a parallel region). `data` points to a [`Team`] on the caller's
//!   stack, which therefore outlives every use; the team threads only read it, apart from its
//!   atomics and its mutex.
//! - [`microtask`] never unwinds: each item runs under `catch_unwind`.

use std::any::Any;
use std::ffi::{c_int, c_uint, c_void, CStr};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

type Microtask = unsafe extern "C" fn(*mut c_void);
pub type GompParallel = unsafe extern "C" fn(Microtask, *mut c_void, c_uint, c_uint);
type MaxThreads = unsafe extern "C" fn() -> c_int;

/// Whether steps may use a loaded OpenMP runtime (`OPTIRS_OPENMP`, read by [`init`]).
static ENABLED: AtomicU32 = AtomicU32::new(0);
/// The process that imported optirs; a forked child has another id and never uses OpenMP.
static PID: AtomicU32 = AtomicU32::new(0);
/// `GOMP_parallel`, once found (0 until then).
static PARALLEL: AtomicUsize = AtomicUsize::new(0);
/// The same runtime's `omp_get_max_threads`, stored before `PARALLEL`.
static MAX_THREADS: AtomicUsize = AtomicUsize::new(0);
/// The loader's count of loaded objects when the last search found no runtime.
static SEARCHED_AT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Records the process and `OPTIRS_OPENMP` (`0`: off; `1` or unset: on). Called once, at
/// import; returns a warning when the variable's value cannot be used.
pub fn init() -> Option<String> {
    PID.store(std::process::id(), Ordering::Relaxed);
    let (on, warning) = match std::env::var_os("OPTIRS_OPENMP") {
        None => (true, None),
        Some(v) => match v.to_str().map(str::trim) {
            Some("0") => (false, None),
            Some("1") => (true, None),
            _ => (
                true,
                Some(format!(
                    "OPTIRS_OPENMP={} is neither 0 nor 1; using 1",
                    v.to_string_lossy()
                )),
            ),
        },
    };
    ENABLED.store(u32::from(on), Ordering::Relaxed);
    warning
}

/// `GOMP_parallel` of a loaded OpenMP runtime, if steps on this process may use one now.
pub fn team() -> Option<GompParallel> {
    if ENABLED.load(Ordering::Relaxed) == 0 || PID.load(Ordering::Relaxed) != std::process::id() {
        return None;
    }
    let f = PARALLEL.load(Ordering::Acquire);
    let parallel = if f == 0 {
        find()?
    } else {
        // SAFETY: only a `GOMP_parallel` pointer found by `find` is ever stored (module doc).
        unsafe { std::mem::transmute::<usize, GompParallel>(f) }
    };
    // SAFETY: `find` stored `omp_get_max_threads` of the same runtime before `GOMP_parallel`
    // (release/acquire on PARALLEL), and it takes no argument.
    let max_threads =
        unsafe { std::mem::transmute::<usize, MaxThreads>(MAX_THREADS.load(Ordering::Relaxed)) };
    // SAFETY: a plain query of the calling thread's OpenMP settings.
    (unsafe { max_threads() } > 1).then_some(parallel)
}

#[cfg(target_os = "linux")]
fn find() -> Option<GompParallel> {
    struct Search {
        adds: u64,
        first_only: bool,
        path: Option<std::ffi::CString>,
    }
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `dl_iterate_phdr` passes a valid `info` and our `data` (a `Search`).
        let (info, search) = unsafe { (&*info, &mut *data.cast::<Search>()) };
        search.adds = info.dlpi_adds;
        if search.first_only {
            return 1;
        }
        if info.dlpi_name.is_null() {
            return 0;
        }
        // SAFETY: a non-null `dlpi_name` is a NUL-terminated string owned by the loader.
        let name = unsafe { CStr::from_ptr(info.dlpi_name) };
        let file = name
            .to_bytes()
            .rsplit(|&b| b == b'/')
            .next()
            .unwrap_or_default();
        if [&b"libgomp"[..], b"libiomp5", b"libomp"]
            .iter()
            .any(|p| file.starts_with(p))
        {
            search.path = Some(name.to_owned());
            return 1;
        }
        0
    }
    let mut search = Search {
        adds: 0,
        first_only: true,
        path: None,
    };
    // SAFETY: `visit` matches the callback type and only reads what it is given.
    unsafe { libc::dl_iterate_phdr(Some(visit), std::ptr::from_mut(&mut search).cast()) };
    if search.adds == SEARCHED_AT.load(Ordering::Relaxed) {
        return None; // nothing was loaded since the last search found no runtime
    }
    let adds = search.adds;
    search.first_only = false;
    // SAFETY: as above.
    unsafe { libc::dl_iterate_phdr(Some(visit), std::ptr::from_mut(&mut search).cast()) };
    let found = search.path.and_then(|path| {
        // SAFETY: `path` names a loaded object; RTLD_NOLOAD only returns a handle to it (never
        // loads anything), and the handle is never closed (module doc).
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        if handle.is_null() {
            return None;
        }
        // SAFETY: a valid handle and NUL-terminated symbol names.
        let (sym, max) = unsafe {
            (
                libc::dlsym(handle, c"GOMP_parallel".as_ptr()),
                libc::dlsym(handle, c"omp_get_max_threads".as_ptr()),
            )
        };
        (!sym.is_null() && !max.is_null()).then_some((sym as usize, max as usize))
    });
    if let Some((f, max)) = found {
        MAX_THREADS.store(max, Ordering::Relaxed);
        PARALLEL.store(f, Ordering::Release);
        // SAFETY: `f` is `GOMP_parallel`, whose C signature `GompParallel` spells.
        Some(unsafe { std::mem::transmute::<usize, GompParallel>(f) })
    } else {
        SEARCHED_AT.store(adds, Ordering::Relaxed);
        None
    }
}

#[cfg(not(target_os = "linux"))]
fn find() -> Option<GompParallel> {
    None
}

/// Turns the use of a loaded OpenMP runtime on or off for the steps that follow (tests run
/// both executors in one process this way; `OPTIRS_OPENMP` sets it at import).
pub fn set_enabled(on: bool) {
    ENABLED.store(u32::from(on), Ordering::Relaxed);
}

/// One step's items as the team threads see them.
struct Team<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    /// Items not yet claimed; claimed from the top down.
    left: AtomicUsize,
    /// Team threads that have left [`microtask`]: each one's last touch of the `Team`.
    exits: AtomicUsize,
    /// A claim takes `left / share` items (at least one), as the own pool's guided claims.
    share: usize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Team<'_> {
    fn work(&self) {
        let mut left = self.left.load(Ordering::Acquire);
        while left > 0 {
            let take = (left / self.share).max(1);
            match self.left.compare_exchange_weak(
                left,
                left - take,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    for item in left - take..left {
                        if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| (self.run)(item))) {
                            let mut slot =
                                self.panic.lock().unwrap_or_else(PoisonError::into_inner);
                            slot.get_or_insert(p);
                        }
                    }
                    left = self.left.load(Ordering::Acquire);
                }
                Err(now) => left = now,
            }
        }
    }
}

unsafe extern "C" fn microtask(data: *mut c_void) {
    // SAFETY: `data` is the `Team` that `run` passed to `GOMP_parallel`, alive until it
    // returns, which is after this function returned on every thread (module doc).
    let team = unsafe { &*data.cast::<Team<'_>>() };
    team.work();
    // Last: released to the caller's acquire after the region (see `run`).
    team.exits.fetch_add(1, Ordering::Release);
}

/// Runs `run(i)` for every `i < n` on `threads` threads of the calling thread's OpenMP team
/// (the caller among them); returns once all are done, re-raising the first panic of any.
pub fn run(parallel: GompParallel, threads: usize, n: usize, run: &(dyn Fn(usize) + Sync)) {
    let team = Team {
        run,
        left: AtomicUsize::new(0),
        exits: AtomicUsize::new(0),
        share: 2 * threads,
        panic: Mutex::new(None),
    };
    // The runtime's barriers at the start and end of the region already order what the
    // caller wrote before the items, and everything the team threads did (their items, their
    // reads of `team`) before the caller goes on and reuses this stack. These edges say so in
    // atomics too, where a race detector that cannot see inside the runtime finds them: the
    // release store of `left`, read by each claim; each thread's release of `exits` as it
    // leaves, read below (one release sequence, so the last value read orders them all).
    team.left.store(n, Ordering::Release);
    let threads = c_uint::try_from(threads).unwrap_or(c_uint::MAX);
    // SAFETY: see the module doc: `team` outlives the call, which returns after every team
    // thread returned from `microtask`; `microtask` never unwinds.
    let data = std::ptr::from_ref(&team).cast_mut().cast();
    unsafe { parallel(microtask, data, threads, 0) };
    team.exits.load(Ordering::Acquire);
    if let Some(p) = team
        .panic
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        panic::resume_unwind(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `GOMP_parallel` promises, without a runtime: `f(data)` on `n` threads, the caller
    /// among them, returning once all have returned.
    unsafe extern "C" fn fake_parallel(f: Microtask, data: *mut c_void, n: c_uint, _flags: c_uint) {
        /// The region's data as the team threads share it (a pointer, keeping its provenance).
        struct Data(*mut c_void);
        // SAFETY: `run` hands a `Team`, which is Sync, and keeps it alive for the region.
        unsafe impl Sync for Data {}
        impl Data {
            fn get(&self) -> *mut c_void {
                self.0
            }
        }
        let data = Data(data);
        let data = &data;
        std::thread::scope(|s| {
            for _ in 1..n {
                // SAFETY: as `GOMP_parallel`'s callers require: `data` outlives this scope.
                s.spawn(move || unsafe { f(data.get()) });
            }
            // SAFETY: as above.
            unsafe { f(data.get()) };
        });
    }

    #[test]
    fn every_item_runs_once_on_any_team_size() {
        for threads in 1..=4 {
            for n in [0, 1, 2, 7, 64, if cfg!(miri) { 100 } else { 1000 }] {
                let ran: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                run(fake_parallel, threads, n, &|i| {
                    ran[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    ran.iter().all(|r| r.load(Ordering::Relaxed) == 1),
                    "{threads} {n}"
                );
            }
        }
    }

    #[test]
    fn a_panic_is_raised_after_every_other_item_ran() {
        let n = 50;
        let ran: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            run(fake_parallel, 3, n, &|i| {
                ran[i].fetch_add(1, Ordering::Relaxed);
                assert!(i != 17, "item 17");
            });
        }));
        let payload = result.expect_err("the panic is re-raised");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"item 17"));
        assert!(ran.iter().all(|r| r.load(Ordering::Relaxed) == 1));
    }

    #[test]
    #[cfg_attr(miri, ignore = "dl_iterate_phdr is a foreign function")]
    fn no_runtime_in_a_process_that_loaded_none() {
        // The Rust test binary links no OpenMP runtime.
        PID.store(std::process::id(), Ordering::Relaxed);
        set_enabled(true);
        assert!(team().is_none());
        set_enabled(false);
        assert!(team().is_none());
    }
}
