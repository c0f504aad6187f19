//! Stepping on torch's OpenMP threads.
//!
//! torch's CPU kernels run on an OpenMP team whose workers spin for a while after every parallel
//! region. A step of ours that starts right after a backward pass would put a second pool of
//! threads on cores those workers still occupy (measured: a 4M-parameter AdamW step in 1000
//! tensors took 6-7 ms after a torch step with our own pool, 3.6-4 ms with torch's workers told
//! not to spin). Running our parallel-for as an OpenMP parallel region of the same runtime hands
//! the work to the workers that are already awake instead.

use std::ffi::{c_uint, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// libgomp's entry point for `#pragma omp parallel`: runs `f(data)` on a team of threads
/// (`num_threads` 0: the runtime's default, which torch sets to its own thread count).
type GompParallel =
    unsafe extern "C" fn(f: extern "C" fn(*mut c_void), data: *mut c_void, num_threads: c_uint, flags: c_uint);

struct Job<'a> {
    next: AtomicUsize,
    tasks: usize,
    body: &'a (dyn Fn(usize) + Sync),
    panicked: AtomicBool,
}

/// Each thread of the team takes task indices until none are left.
extern "C" fn run_tasks(data: *mut c_void) {
    // SAFETY: `data` is the `Job` that `parallel_for` keeps alive until the region has ended.
    let job = unsafe { &*(data as *const Job<'_>) };
    // A panic must not unwind into the OpenMP runtime's C frames: note it and stop taking tasks.
    let outcome = catch_unwind(AssertUnwindSafe(|| loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.tasks || job.panicked.load(Ordering::Relaxed) {
            break;
        }
        (job.body)(i);
    }));
    if outcome.is_err() {
        job.panicked.store(true, Ordering::Relaxed);
    }
}

/// Opens the OpenMP runtime at `path` if this process has already loaded it (it is never loaded
/// here) and makes the core run its elementwise steps on that runtime's threads. Returns whether
/// it did.
#[cfg(unix)]
pub fn use_loaded_runtime(path: &str) -> bool {
    use libloading::os::unix::{Library, RTLD_NOW};
    const RTLD_NOLOAD: std::os::raw::c_int = 0x4; // glibc and musl; a library not yet loaded is refused
    if smallbatch_core::driver::uses_host_threads() {
        return true;
    }
    // SAFETY: RTLD_NOLOAD runs no initialisers: it only returns a handle to a loaded library.
    let Ok(lib) = (unsafe { Library::open(Some(path), RTLD_NOW | RTLD_NOLOAD) }) else {
        return false;
    };
    // SAFETY: the symbol has libgomp's documented signature.
    let Ok(symbol) = (unsafe { lib.get::<GompParallel>(b"GOMP_parallel\0") }) else {
        return false;
    };
    let gomp_parallel: GompParallel = *symbol;
    // The runtime stays loaded for the life of the process (torch holds it); so does our handle.
    std::mem::forget(lib);
    smallbatch_core::driver::set_host_parallel_for(Box::new(move |tasks, body| {
        let job = Job { next: AtomicUsize::new(0), tasks, body, panicked: AtomicBool::new(false) };
        // SAFETY: `job` outlives the parallel region, which ends before GOMP_parallel returns.
        unsafe { gomp_parallel(run_tasks, &job as *const Job<'_> as *mut c_void, 0, 0) };
        if job.panicked.load(Ordering::Relaxed) {
            panic!("a step panicked on an OpenMP thread");
        }
    }))
}

#[cfg(not(unix))]
pub fn use_loaded_runtime(_path: &str) -> bool {
    false
}
