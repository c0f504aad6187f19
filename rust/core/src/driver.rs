//! The one place that owns threads and SIMD dispatch for elementwise rules.
//!
//! A rule supplies an [`ElementwiseKernel`]: its per-element math for one vector of lanes at a
//! given element index. The driver splits each [`Run`] (one tensor) into chunks aligned to
//! multiples of [`CHUNK`] of the index space (so the split never depends on the thread count), runs the chunks
//! on a thread pool, and inside each chunk calls the kernel for the selected SIMD path, finishing
//! the tail with the one-lane version of the same math.

use crate::error::{Error, Result};
use crate::rules::Storage;
use crate::segments::{Run, SegmentTable};
use crate::simd::{F32Lanes, SimdPath};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// Elements per work item: 64 KiB per f32 stream, small enough to balance, large enough that the
/// pool's per-task cost (about a microsecond) is noise.
pub const CHUNK: usize = 16 * 1024;

/// Environment variable that sets the core's thread count (default: the available parallelism).
pub const THREADS_ENV: &str = "SMALLBATCH_NUM_THREADS";

/// A parallel-for owned by the program that embeds the core: calls `body(i)` once for every `i` in
/// `0..tasks`, on threads of its choosing, and returns when all calls have returned.
pub type HostParallelFor = dyn Fn(usize, &(dyn Fn(usize) + Sync)) + Send + Sync;

static HOST_PARALLEL_FOR: OnceLock<Box<HostParallelFor>> = OnceLock::new();

/// Runs elementwise steps on the host program's threads instead of the core's own pool.
///
/// A host whose threads spin-wait between its parallel regions (an OpenMP runtime, as in
/// PyTorch) leaves fewer cores to a second pool started right after it: stepping on the host's
/// own threads, which are already awake, avoids that contention. Results are unchanged, since the
/// work split never depends on who runs it. Applies to executors with more than one thread, when
/// called from outside the core's own pool. Can be set once; returns false if it already was.
pub fn set_host_parallel_for(parallel_for: Box<HostParallelFor>) -> bool {
    HOST_PARALLEL_FOR.set(parallel_for).is_ok()
}

/// Whether elementwise steps run on the host's threads (see [`set_host_parallel_for`]).
pub fn uses_host_threads() -> bool {
    HOST_PARALLEL_FOR.get().is_some()
}

/// A rule's per-element math.
///
/// The driver loads the parameter and gradient lanes (from f32 or bf16 storage, see [`ParamIo`]),
/// the kernel returns the new parameter value and updates its own state through `Ptrs`, and the
/// driver stores the result (rounding to bf16 when the parameters are bf16).
///
/// # Safety contract
/// `apply` may be called with any `index` inside a run the driver was given, from several threads
/// at once on disjoint indices. Implementors read and write only elements `index..index+V::WIDTH`
/// of each buffer in `Ptrs`; the caller of [`Executor::run`] guarantees those are valid.
pub trait ElementwiseKernel: Sync {
    /// The rule's state buffers, as raw pointers to element 0 of each flat buffer.
    type Ptrs: Copy + Send + Sync;

    /// Computes the new parameter for elements `index..index + V::WIDTH` from the parameter `p`
    /// and gradient `g`, updating the rule's state.
    ///
    /// # Safety
    /// The elements must be in bounds of every buffer, and no other thread may touch them.
    unsafe fn apply<V: F32Lanes>(&self, ptrs: Self::Ptrs, index: usize, p: V, g: V) -> V;
}

/// How parameters are rounded when stored as bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Round to nearest, ties to even.
    Nearest,
    /// Stochastic rounding with random bits from Philox keyed by `seed`, counted by the tensor's
    /// step, the element's index in the table's index space and `stream` (see [`crate::philox`]).
    Stochastic {
        /// The run's seed.
        seed: u64,
        /// Separates independent uses of the same seed (for example, param groups).
        stream: u32,
    },
}

/// How the kernels reach a group's parameters and gradients: for each tensor, the address of
/// its parameters' and its gradients' element 0 (see [`crate::rules::TensorAddresses`]), and how
/// they are stored.
#[derive(Clone, Copy)]
pub struct ParamIo {
    storage: Storage,
    params: *const usize,
    grads: *const usize,
    /// Per tensor, its random-bit index minus its table index (null: all 0).
    draw_shifts: *const i64,
}
// SAFETY: the tables are only read, and the driver hands disjoint element ranges to each thread.
unsafe impl Send for ParamIo {}
unsafe impl Sync for ParamIo {}

impl ParamIo {
    /// The view of per-tensor address tables `params` and `grads` (one entry per tensor), and of
    /// each tensor's shift from its table index to the index its random bits are drawn at (null:
    /// the table index itself).
    pub(crate) fn new(storage: Storage, params: *const usize, grads: *const usize, draw_shifts: *const i64) -> ParamIo {
        ParamIo { storage, params, grads, draw_shifts }
    }

    /// How the parameters are stored.
    pub fn storage(self) -> Storage {
        self.storage
    }

    /// Tensor `i`'s parameters and gradients from its element `at` (counted within the tensor).
    ///
    /// # Safety
    /// `i` must index the tables, and the tensor must hold at least `at` elements.
    #[inline(always)]
    pub unsafe fn tensor(self, i: usize, at: usize) -> TensorIo {
        let (p, g) = (*self.params.add(i), *self.grads.add(i));
        match self.storage {
            Storage::F32 => TensorIo::F32 { param: (p as *mut f32).add(at), grad: (g as *const f32).add(at) },
            Storage::Bf16(rounding) => TensorIo::Bf16 {
                param: (p as *mut u16).add(at),
                grad: (g as *const u16).add(at),
                rounding,
                draw_shift: if self.draw_shifts.is_null() { 0 } else { *self.draw_shifts.add(i) },
            },
        }
    }
}

/// One tensor's parameters and gradients from some element on, in their storage type.
#[derive(Clone, Copy)]
pub enum TensorIo {
    /// f32 parameters and gradients.
    F32 {
        /// Parameters.
        param: *mut f32,
        /// Gradients.
        grad: *const f32,
    },
    /// bf16 parameters and gradients (raw bits); math in f32, rounded back on store.
    Bf16 {
        /// Parameters.
        param: *mut u16,
        /// Gradients.
        grad: *const u16,
        /// How the new parameters are rounded.
        rounding: Rounding,
        /// The element of table index `i` draws the random bits of index `i + draw_shift` (0,
        /// unless the tensor is a shard of a larger one whose bits it must draw).
        draw_shift: i64,
    },
}
// SAFETY: as for `ParamIo`.
unsafe impl Send for TensorIo {}
unsafe impl Sync for TensorIo {}

/// Elements per stochastic-rounding tile: random bits are drawn a tile at a time into a stack buffer.
const TILE: usize = 256;

/// Where and how elementwise work runs: a SIMD path and a thread pool.
///
/// ```
/// use smallbatch_core::{Executor, SimdPath};
///
/// // The process-wide executor: SMALLBATCH_SIMD's path (or the fastest) and
/// // SMALLBATCH_NUM_THREADS threads (or the available cores)...
/// let exec = Executor::global().unwrap();
/// assert!(exec.path().is_supported() && exec.threads() >= 1);
/// // ...or one of your own, here the scalar reference on the caller's thread. Every path and
/// // thread count computes the same bits.
/// let scalar = Executor::new(SimdPath::Scalar, 1).unwrap();
/// assert_eq!((scalar.path(), scalar.threads()), (SimdPath::Scalar, 1));
/// assert!(Executor::new(SimdPath::Scalar, 0).is_err());
/// ```
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
        let pieces: Vec<(usize, usize)> = (0..total).step_by(CHUNK).map(|s| (s, (s + CHUNK).min(total))).collect();
        match &self.pool {
            Some(pool) if total > CHUNK => pool.install(|| pieces.par_iter().for_each(|&(s, e)| f(s, e))),
            _ => pieces.into_iter().for_each(|(s, e)| f(s, e)),
        }
    }

    /// Calls `f(i)` for every `i` in `0..tasks` and returns the results in order: on the host's
    /// threads when a host parallel-for is set (see [`set_host_parallel_for`]) and this is called
    /// from outside the core's pool, else on the executor's pool, or on the caller's thread when
    /// the executor has one thread.
    ///
    /// ```
    /// use smallbatch_core::{Executor, SimdPath};
    /// let exec = Executor::new(SimdPath::Scalar, 2).unwrap();
    /// assert_eq!(exec.map_tasks(4, |i| i * i), vec![0, 1, 4, 9]);
    /// ```
    pub fn map_tasks<T: Send>(&self, tasks: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
        match &self.pool {
            Some(pool) if tasks > 1 => {
                match HOST_PARALLEL_FOR.get().filter(|_| rayon::current_thread_index().is_none()) {
                    Some(host) => {
                        let slots: Vec<std::sync::Mutex<Option<T>>> = (0..tasks).map(|_| Default::default()).collect();
                        host(tasks, &|i| {
                            let out = f(i);
                            *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
                        });
                        slots
                            .into_iter()
                            .map(|s| {
                                s.into_inner().unwrap_or_else(|e| e.into_inner()).expect("the host ran every task")
                            })
                            .collect()
                    }
                    None => pool.install(|| (0..tasks).into_par_iter().map(&f).collect()),
                }
            }
            _ => (0..tasks).map(f).collect(),
        }
    }

    /// Runs `kernels[i]` over `runs[i]` for every `i`, reading each run's tensor through `io`
    /// (run `r` covers elements `r.start..r.end` of the table's index space, which lie in tensor
    /// `r.tensor`, starting at `table.offsets()[r.tensor]`).
    ///
    /// # Safety
    /// Every run must lie inside its tensor, every element of every run must be in bounds of the
    /// state buffers behind `ptrs` and of its tensor's memory behind `io`, that memory must not be
    /// accessed by anyone else for the duration of the call, and the runs must not overlap.
    pub unsafe fn run<K: ElementwiseKernel>(
        &self,
        kernels: &[K],
        runs: &[Run],
        table: &SegmentTable,
        ptrs: K::Ptrs,
        io: ParamIo,
    ) {
        debug_assert_eq!(kernels.len(), runs.len());
        let total: usize = runs.iter().map(Run::len).sum();
        let path = self.path;
        let offsets = table.offsets();
        // SAFETY (both arms): each piece lies inside one run, hence inside its tensor.
        let piece = |k: usize, start: usize, end: usize| unsafe {
            let run = &runs[k];
            let tio = io.tensor(run.tensor, start - offsets[run.tensor]);
            dispatch(path, &kernels[k], ptrs, tio, run.step, start, end)
        };
        match &self.pool {
            Some(pool) if total > CHUNK => {
                // Elementwise results do not depend on the split (random bits follow the index in
                // the table), so each thread gets a few long stretches of the index space: within
                // a tensor, streaming through memory is what the hardware prefetchers reward; many
                // small tensors share a task instead of costing a task each.
                let per_task = total.div_ceil(2 * self.threads).div_ceil(CHUNK).max(1) * CHUNK;
                let tasks = tasks_of(&split_runs(runs, per_task), per_task);
                let run_task = |t: usize| {
                    for &(k, start, end) in &tasks[t] {
                        piece(k, start, end);
                    }
                };
                match HOST_PARALLEL_FOR.get().filter(|_| rayon::current_thread_index().is_none()) {
                    Some(host) => host(tasks.len(), &run_task),
                    None => pool.install(|| (0..tasks.len()).into_par_iter().for_each(run_task)),
                }
            }
            _ => {
                for (k, run) in runs.iter().enumerate() {
                    piece(k, run.start, run.end);
                }
            }
        }
    }
}

/// The kernel of each run, one per distinct step count (`make(step)` is called once for each):
/// the constants of a step (bias corrections, ...) cost a few `powf`s, and a group of many
/// small tensors has one run per tensor but usually one step count.
pub fn kernels_by_step<K: Copy>(runs: &[Run], make: impl Fn(u64) -> K) -> Vec<K> {
    let mut made: Vec<(u64, K)> = Vec::new();
    runs.iter()
        .map(|run| match made.iter().find(|(s, _)| *s == run.step) {
            Some(&(_, k)) => k,
            None => {
                let k = make(run.step);
                made.push((run.step, k));
                k
            }
        })
        .collect()
}

/// Splits runs at multiples of `piece` of the index space: (run index, start, end) per piece.
fn split_runs(runs: &[Run], piece: usize) -> Vec<(usize, usize, usize)> {
    let mut pieces = Vec::new();
    for (k, run) in runs.iter().enumerate() {
        let mut start = run.start;
        while start < run.end {
            let end = ((start / piece + 1) * piece).min(run.end);
            pieces.push((k, start, end));
            start = end;
        }
    }
    pieces
}

/// Groups consecutive pieces that lie in the same `piece`-sized window of the index space into
/// one task (runs come in index order, so a window's pieces are consecutive).
fn tasks_of(pieces: &[(usize, usize, usize)], piece: usize) -> Vec<Vec<(usize, usize, usize)>> {
    let mut tasks: Vec<Vec<(usize, usize, usize)>> = Vec::new();
    let mut window = usize::MAX;
    for &p in pieces {
        let w = p.1 / piece;
        match tasks.last_mut() {
            Some(task) if w == window => task.push(p),
            _ => tasks.push(vec![p]),
        }
        window = w;
    }
    tasks
}

/// Runs `kernel` over elements `start..end` of the table, `io` at element `start`, on `path`.
///
/// # Safety
/// As for [`Executor::run`]; `path` must be supported by this CPU (checked when the executor
/// was built).
unsafe fn dispatch<K: ElementwiseKernel>(
    path: SimdPath,
    kernel: &K,
    ptrs: K::Ptrs,
    io: TensorIo,
    step: u64,
    start: usize,
    end: usize,
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => range_avx512(kernel, ptrs, io, step, start, end),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => range_avx2(kernel, ptrs, io, step, start, end),
        #[cfg(target_arch = "aarch64")]
        SimdPath::Neon => range_neon(kernel, ptrs, io, step, start, end),
        _ => range_io::<K, f32>(kernel, ptrs, io, step, start, end),
    }
}

/// One vector (or, with `V = f32`, one element) at table index `i`, whose parameter and gradient
/// are `local` elements past `io`: load, apply, store.
#[inline(always)]
unsafe fn step_at<K: ElementwiseKernel, V: F32Lanes>(
    kernel: &K,
    ptrs: K::Ptrs,
    io: TensorIo,
    i: usize,
    local: usize,
    rand: *const u16,
) {
    match io {
        TensorIo::F32 { param, grad } => {
            let p = V::load(param.add(local));
            let g = V::load(grad.add(local));
            kernel.apply::<V>(ptrs, i, p, g).store(param.add(local));
        }
        TensorIo::Bf16 { param, grad, rounding, .. } => {
            let p = V::load_bf16(param.add(local));
            let g = V::load_bf16(grad.add(local));
            let new = kernel.apply::<V>(ptrs, i, p, g);
            match rounding {
                Rounding::Nearest => new.store_bf16_nearest(param.add(local)),
                Rounding::Stochastic { .. } => new.store_bf16_stochastic(param.add(local), rand),
            }
        }
    }
}

/// The loop every path shares: whole vectors, then the tail one lane at a time with the same
/// math; with stochastic rounding, in tiles whose random bits are drawn first.
#[inline(always)]
unsafe fn range_io<K: ElementwiseKernel, V: F32Lanes>(
    kernel: &K,
    ptrs: K::Ptrs,
    io: TensorIo,
    step: u64,
    start: usize,
    end: usize,
) {
    let stochastic = match io {
        TensorIo::Bf16 { rounding: Rounding::Stochastic { seed, stream }, draw_shift, .. } => {
            Some((seed, stream, draw_shift))
        }
        _ => None,
    };
    let Some((seed, stream, draw_shift)) = stochastic else {
        span::<K, V>(kernel, ptrs, io, start, start, end, std::ptr::null());
        return;
    };
    let mut rand = [0u16; TILE];
    let mut tile = start;
    while tile < end {
        let tile_end = (tile + TILE).min(end);
        let first = (tile as i64).wrapping_add(draw_shift) as u64;
        crate::philox::fill_random_u16(seed, step, stream, first, &mut rand[..tile_end - tile]);
        span::<K, V>(kernel, ptrs, io, start, tile, tile_end, rand.as_ptr());
        tile = tile_end;
    }
}

/// Whole vectors over table indices `from..end`, then the tail one lane at a time; `io` is at
/// index `base`, and `rand` (or null) holds the random bits of index `from` onwards.
#[inline(always)]
unsafe fn span<K: ElementwiseKernel, V: F32Lanes>(
    kernel: &K,
    ptrs: K::Ptrs,
    io: TensorIo,
    base: usize,
    from: usize,
    end: usize,
    rand: *const u16,
) {
    let bits = |i: usize| if rand.is_null() { rand } else { rand.add(i - from) };
    let mut i = from;
    while i + V::WIDTH <= end {
        step_at::<K, V>(kernel, ptrs, io, i, i - base, bits(i));
        i += V::WIDTH;
    }
    while i < end {
        step_at::<K, f32>(kernel, ptrs, io, i, i - base, bits(i));
        i += 1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn range_avx2<K: ElementwiseKernel>(
    kernel: &K,
    ptrs: K::Ptrs,
    io: TensorIo,
    step: u64,
    start: usize,
    end: usize,
) {
    range_io::<K, crate::simd::Avx2>(kernel, ptrs, io, step, start, end)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn range_avx512<K: ElementwiseKernel>(
    kernel: &K,
    ptrs: K::Ptrs,
    io: TensorIo,
    step: u64,
    start: usize,
    end: usize,
) {
    range_io::<K, crate::simd::Avx512>(kernel, ptrs, io, step, start, end)
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn range_neon<K: ElementwiseKernel>(
    kernel: &K,
    ptrs: K::Ptrs,
    io: TensorIo,
    step: u64,
    start: usize,
    end: usize,
) {
    range_io::<K, crate::simd::Neon>(kernel, ptrs, io, step, start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tensor: usize, start: usize, end: usize, step: u64) -> Run {
        Run { tensor, start, end, step }
    }

    #[test]
    fn pieces_align_to_global_multiples() {
        let runs = [run(0, 10, CHUNK + 5, 1), run(1, CHUNK + 5, CHUNK + 7, 1), run(2, 2 * CHUNK - 3, 2 * CHUNK + 2, 2)];
        let pieces = split_runs(&runs, CHUNK);
        assert_eq!(
            pieces,
            vec![
                (0, 10, CHUNK),
                (0, CHUNK, CHUNK + 5),
                (1, CHUNK + 5, CHUNK + 7),
                (2, 2 * CHUNK - 3, 2 * CHUNK),
                (2, 2 * CHUNK, 2 * CHUNK + 2)
            ]
        );
        // Pieces of one window share a task, whichever tensor they belong to.
        let tasks = tasks_of(&pieces, CHUNK);
        assert_eq!(tasks, vec![vec![pieces[0]], vec![pieces[1], pieces[2], pieces[3]], vec![pieces[4]]]);
    }

    #[test]
    fn one_kernel_per_step_count() {
        use std::cell::Cell;
        let made = Cell::new(0);
        let runs = [run(0, 0, 1, 3), run(1, 1, 2, 3), run(2, 2, 3, 1), run(3, 3, 4, 3)];
        let kernels = kernels_by_step(&runs, |step| {
            made.set(made.get() + 1);
            step * 10
        });
        assert_eq!(kernels, vec![30, 30, 10, 30]);
        assert_eq!(made.get(), 2);
    }

    #[test]
    fn zero_threads_rejected() {
        let err = Executor::new(SimdPath::Scalar, 0).unwrap_err();
        assert_eq!(err.to_string(), "invalid threads: 0 (must be >= 1)");
    }
}
