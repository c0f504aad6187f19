//! The one place that owns threads and SIMD dispatch for elementwise rules.
//!
//! A rule supplies an [`ElementwiseKernel`]: its per-element math for one vector of lanes at a
//! given element index. The driver splits each [`Run`] into fixed chunks aligned to multiples of
//! [`CHUNK`] in the flat buffer (so the split never depends on the thread count), runs the chunks
//! on a thread pool, and inside each chunk calls the kernel for the selected SIMD path, finishing
//! the tail with the one-lane version of the same math.

use crate::error::{Error, Result};
use crate::segments::Run;
use crate::simd::{F32Lanes, SimdPath};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// Elements per work item: 64 KiB per f32 stream, small enough to balance, large enough that the
/// pool's per-task cost (about a microsecond) is noise.
pub const CHUNK: usize = 16 * 1024;

/// Environment variable that sets the core's thread count (default: the available parallelism).
pub const THREADS_ENV: &str = "SMALLBATCH_NUM_THREADS";

/// A rule's per-element math.
///
/// # Safety contract
/// `apply` may be called with any `index` inside a run the driver was given, from several threads
/// at once on disjoint indices. Implementors read and write only element `index..index+V::WIDTH`
/// of each buffer in `Ptrs`; the caller of [`Executor::run`] guarantees those are valid.
pub trait ElementwiseKernel: Sync {
    /// The rule's buffers, as raw pointers to element 0 of each flat buffer.
    type Ptrs: Copy + Send + Sync;

    /// Updates elements `index..index + V::WIDTH`.
    ///
    /// # Safety
    /// The elements must be in bounds of every buffer, and no other thread may touch them.
    unsafe fn apply<V: F32Lanes>(&self, ptrs: Self::Ptrs, index: usize);
}

/// Where and how elementwise work runs: a SIMD path and a thread pool.
#[derive(Clone)]
pub struct Executor {
    path: SimdPath,
    pool: Option<Arc<rayon::ThreadPool>>,
    threads: usize,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").field("path", &self.path).field("threads", &self.threads).finish()
    }
}

impl Executor {
    /// An executor with its own pool of `threads` threads (1 runs everything on the caller).
    pub fn new(path: SimdPath, threads: usize) -> Result<Executor> {
        let path = path.require()?;
        if threads == 0 {
            return Err(Error::invalid("threads", 0, ">= 1"));
        }
        let pool = if threads > 1 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("smallbatch-{i}"))
                .build()
                .map_err(|e| {
                    Error::invalid("threads", format!("{threads} ({e})"), "a thread count the OS can start")
                })?;
            Some(Arc::new(pool))
        } else {
            None
        };
        Ok(Executor { path, pool, threads })
    }

    /// The process-wide executor: the path from `SMALLBATCH_SIMD` (or the fastest), and
    /// `SMALLBATCH_NUM_THREADS` threads (or the available parallelism). Built once.
    pub fn global() -> Result<&'static Executor> {
        static GLOBAL: OnceLock<Result<Executor>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                let path = SimdPath::selected()?;
                let threads = match std::env::var(THREADS_ENV) {
                    Ok(s) if !s.trim().is_empty() => match s.trim().parse::<usize>() {
                        Ok(n) if n >= 1 => n,
                        _ => return Err(Error::invalid(THREADS_ENV, s, "an integer >= 1")),
                    },
                    _ => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                };
                Executor::new(path, threads)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The SIMD path in use.
    pub fn path(&self) -> SimdPath {
        self.path
    }

    /// The number of threads work is spread over.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on the executor's pool (or the caller's thread when it has one thread), so that
    /// rayon-based work inside `f` (parallel iterators, a GEMM) uses this executor's threads.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }

    /// Calls `f(start, end)` for `0..total` split at multiples of [`CHUNK`], in parallel when the
    /// work is large enough. The split never depends on the thread count.
    pub fn for_each_chunk(&self, total: usize, f: impl Fn(usize, usize) + Sync) {
        let run = [Run { start: 0, end: total, step: 0 }];
        match &self.pool {
            Some(pool) if total > CHUNK => {
                let tasks = chunk_tasks(&run);
                pool.install(|| tasks.par_iter().for_each(|&(_, start, end)| f(start, end)));
            }
            _ => {
                for (_, start, end) in chunk_tasks(&run) {
                    f(start, end)
                }
            }
        }
    }

    /// Runs `kernels[i]` over `runs[i]` for every `i`.
    ///
    /// # Safety
    /// Every element of every run must be in bounds of every buffer behind `ptrs`, the buffers
    /// must not be accessed by anyone else for the duration of the call, and the runs must not
    /// overlap.
    pub unsafe fn run<K: ElementwiseKernel>(&self, kernels: &[K], runs: &[Run], ptrs: K::Ptrs) {
        debug_assert_eq!(kernels.len(), runs.len());
        let total: usize = runs.iter().map(Run::len).sum();
        let path = self.path;
        match &self.pool {
            Some(pool) if total > CHUNK => {
                let tasks = chunk_tasks(runs);
                pool.install(|| {
                    tasks.par_iter().for_each(|&(k, start, end)| {
                        // SAFETY: chunks are disjoint sub-ranges of the caller's runs.
                        unsafe { dispatch(path, &kernels[k], ptrs, start, end) }
                    })
                });
            }
            _ => {
                for (kernel, run) in kernels.iter().zip(runs) {
                    dispatch(path, kernel, ptrs, run.start, run.end);
                }
            }
        }
    }
}

/// Splits runs at multiples of [`CHUNK`]: (kernel index, start, end) per task.
fn chunk_tasks(runs: &[Run]) -> Vec<(usize, usize, usize)> {
    let mut tasks = Vec::new();
    for (k, run) in runs.iter().enumerate() {
        let mut start = run.start;
        while start < run.end {
            let end = ((start / CHUNK + 1) * CHUNK).min(run.end);
            tasks.push((k, start, end));
            start = end;
        }
    }
    tasks
}

/// Runs `kernel` over `start..end` on `path`.
///
/// # Safety
/// As for [`Executor::run`]; `path` must be supported by this CPU (checked when the executor
/// was built).
unsafe fn dispatch<K: ElementwiseKernel>(path: SimdPath, kernel: &K, ptrs: K::Ptrs, start: usize, end: usize) {
    match path {
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => range_avx512(kernel, ptrs, start, end),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => range_avx2(kernel, ptrs, start, end),
        #[cfg(target_arch = "aarch64")]
        SimdPath::Neon => range_neon(kernel, ptrs, start, end),
        _ => range_lanes::<K, f32>(kernel, ptrs, start, end),
    }
}

/// The loop every path shares: whole vectors, then the tail one lane at a time with the same math.
#[inline(always)]
unsafe fn range_lanes<K: ElementwiseKernel, V: F32Lanes>(kernel: &K, ptrs: K::Ptrs, start: usize, end: usize) {
    let mut i = start;
    while i + V::WIDTH <= end {
        kernel.apply::<V>(ptrs, i);
        i += V::WIDTH;
    }
    while i < end {
        kernel.apply::<f32>(ptrs, i);
        i += 1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn range_avx2<K: ElementwiseKernel>(kernel: &K, ptrs: K::Ptrs, start: usize, end: usize) {
    range_lanes::<K, crate::simd::Avx2>(kernel, ptrs, start, end)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn range_avx512<K: ElementwiseKernel>(kernel: &K, ptrs: K::Ptrs, start: usize, end: usize) {
    range_lanes::<K, crate::simd::Avx512>(kernel, ptrs, start, end)
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn range_neon<K: ElementwiseKernel>(kernel: &K, ptrs: K::Ptrs, start: usize, end: usize) {
    range_lanes::<K, crate::simd::Neon>(kernel, ptrs, start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_align_to_global_multiples() {
        let runs =
            [Run { start: 10, end: CHUNK + 5, step: 1 }, Run { start: 2 * CHUNK - 3, end: 2 * CHUNK + 2, step: 2 }];
        let tasks = chunk_tasks(&runs);
        assert_eq!(
            tasks,
            vec![(0, 10, CHUNK), (0, CHUNK, CHUNK + 5), (1, 2 * CHUNK - 3, 2 * CHUNK), (1, 2 * CHUNK, 2 * CHUNK + 2)]
        );
    }

    #[test]
    fn zero_threads_rejected() {
        let err = Executor::new(SimdPath::Scalar, 0).unwrap_err();
        assert_eq!(err.to_string(), "invalid threads: 0 (must be >= 1)");
    }
}
