//! `cargo bench`: update throughput of each rule per SIMD path, as bytes per second of the rule's
//! minimal memory traffic (see [`traffic`]), in decimal GB/s like `smallbatch-rs bench`.
//!
//! Compare the numbers with the `copy` group of the same run: the elementwise rules and rounding
//! are memory-bound, so a path is as fast as it can be when its bytes/s approach a plain copy's.
//! Muon is bound by its Newton-Schulz products instead: its bytes/s are far below the copy's and
//! say only how it compares between shapes and runs.
//!
//! Benchmark names are `rule/path/elements` (Muon: `muon/path/BATCHxROWSxCOLS`), so criterion's
//! filter (a regular expression) picks any slice of them:
//!
//! ```text
//! cargo bench                                  # everything (a few minutes on 2 cores)
//! cargo bench -- adamw                         # AdamW and its bf16 form
//! cargo bench -- '^adamw/avx512/'              # one rule on one path
//! cargo bench -- '/(4096|262144)$'             # the small sizes only
//! SMALLBATCH_BENCH_THREADS=1 cargo bench -- sgd
//! cargo bench -- --test                        # each benchmark once: does it run? (no timing)
//! ```
//!
//! The fp32 rules run on fp32 parameters and gradients; the `_bf16_sr` forms on bf16 parameters
//! and gradients, rounded back stochastically (the state stays fp32). Buffers are allocated only
//! when a benchmark of their size passes the filter, and once for all paths of that size.

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};
use rayon::prelude::*;
use smallbatch_core::driver::{Rounding, CHUNK};
use smallbatch_core::rounding::{round_bf16_nearest, stochastic_round_slice};
use smallbatch_core::rules::adafactor::{adafactor_step, AdafactorBuffers, AdafactorHyper, AdafactorLayout};
use smallbatch_core::rules::adam::{adam_step, AdamBuffers, AdamHyper};
use smallbatch_core::rules::muon::{muon_step, MuonBuffers, MuonHyper};
use smallbatch_core::rules::sgd::{sgd_step, SgdBuffers, SgdHyper};
use smallbatch_core::rules::Params;
use smallbatch_core::{Executor, SegmentTable, SimdPath};
use std::hint::black_box;
use std::time::Duration;

/// Minimal memory traffic of one update, in bytes per parameter: every buffer the rule must read,
/// once, plus every buffer it must write, once (fp32: 4 bytes, bf16: 2). Caches can make a step
/// move less than this (small sizes), never a correct implementation more than this by need.
///
/// The Python benchmark (python/smallbatch_rs/bench.py, `TRAFFIC`) divides by the same numbers;
/// tests/test_bench_smoke.py checks that the two tables agree.
mod traffic {
    /// Read `src`, write `dst`: the yardstick.
    pub const COPY_F32: u64 = 8;
    /// Read p, g; write p.
    pub const SGD_F32: u64 = 12;
    /// Read p, g, momentum; write p, momentum.
    pub const SGD_MOMENTUM_F32: u64 = 20;
    /// Read p, g, exp_avg, exp_avg_sq; write p, exp_avg, exp_avg_sq.
    pub const ADAMW_F32: u64 = 28;
    /// Read p, g; write p. The factored second moments (rows + cols values per matrix) are
    /// negligible next to the matrix.
    pub const ADAFACTOR_F32: u64 = 12;
    /// Read p, g, momentum; write p, momentum. The Newton-Schulz iterates are not counted: they
    /// are the rule's work, not its inputs or outputs.
    pub const MUON_F32: u64 = 20;
    /// bf16 p, g (2 + 2 read, 2 written).
    pub const SGD_BF16: u64 = 6;
    /// bf16 p, g and an fp32 momentum (read and written).
    pub const SGD_MOMENTUM_BF16: u64 = 14;
    /// bf16 p, g and the two fp32 moments.
    pub const ADAMW_BF16: u64 = 22;
    /// bf16 p, g; factored state negligible.
    pub const ADAFACTOR_BF16: u64 = 6;
    /// bf16 p, g and an fp32 momentum.
    pub const MUON_BF16: u64 = 14;
    /// Stochastic rounding alone: read fp32, write bf16.
    pub const ROUND_F32_TO_BF16: u64 = 6;
}

/// Elementwise rules and rounding: 4K (in L1/L2) to 64M elements (256 MiB per fp32 buffer, far
/// beyond any cache).
const SIZES: [usize; 5] = [4 << 10, 256 << 10, 4 << 20, 16 << 20, 64 << 20];

/// Adafactor's square matrices, 4K to 16M elements: per-tensor reductions make it slower than
/// the elementwise rules, and 16M already streams from memory.
const ADAFACTOR_SIDES: [usize; 4] = [64, 512, 2048, 4096];

/// Muon's tensors as `[batch, rows, cols]`: many small matrices (one per thread, single-threaded
/// products), and a square and a tall matrix of the `lm30m` preset (dim 384, MLP 4x).
const MUON_SHAPES: [[usize; 3]; 3] = [[256, 64, 64], [1, 384, 384], [1, 1536, 384]];

const SEED: u64 = 0x5eed;

fn threads() -> usize {
    std::env::var("SMALLBATCH_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// One executor per SIMD path this CPU supports, fastest first.
fn executors() -> Vec<Executor> {
    SimdPath::supported().into_iter().map(|path| Executor::new(path, threads()).unwrap()).collect()
}

/// Deterministic values in [-0.5, 0.5): no denormals, no zeros to short-cut anything.
fn filled(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 * 1e-3 - 0.5).collect()
}

fn bf16(values: &[f32]) -> Vec<u16> {
    values.iter().map(|&v| round_bf16_nearest(v)).collect()
}

const STOCHASTIC: Rounding = Rounding::Stochastic { seed: SEED, stream: 0 };

/// Elements from which an elementwise step takes milliseconds.
const HEAVY: usize = 4 << 20;

/// Large sizes take a step of tens of milliseconds: criterion's default linear sampling would run
/// 55 of them per sample set, the flat mode runs 10. Small ones get more samples, which cost
/// little and tame the noise of a shared machine.
fn sample_for(group: &mut BenchmarkGroup<'_, WallTime>, heavy: bool) {
    if heavy {
        group.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(1));
    } else {
        group.sampling_mode(SamplingMode::Auto).sample_size(30).measurement_time(Duration::from_millis(700));
    }
}

/// One size of a benchmark: `key` goes to the buffers' constructor, `label` into the name.
struct Size {
    key: usize,
    label: String,
    elements: usize,
    /// Tens of milliseconds per step or more: sampled flat.
    heavy: bool,
}

/// Benchmarks `step` in group `name` for every size and SIMD path: `make(key)` builds the buffers
/// (lazily, once per size) and `bytes` is the traffic per parameter.
fn per_path<D>(
    c: &mut Criterion,
    name: &str,
    bytes: u64,
    sizes: &[Size],
    make: impl Fn(usize) -> D,
    step: impl Fn(&Executor, &mut D),
) {
    let execs = executors();
    let mut group = c.benchmark_group(name);
    for size in sizes {
        // Built on first use (the filter may skip every path of this size) and freed before the
        // next size's: two sizes of 64M fp32 AdamW would hold 2 GB.
        let mut data: Option<D> = None;
        group.throughput(Throughput::BytesDecimal(bytes * size.elements as u64));
        sample_for(&mut group, size.heavy);
        for exec in &execs {
            group.bench_function(BenchmarkId::new(exec.path().name(), &size.label), |b| {
                let d = data.get_or_insert_with(|| make(size.key));
                b.iter(|| step(exec, d))
            });
        }
    }
    group.finish();
}

/// Elementwise rules are keyed by their element count.
fn elementwise<D>(
    c: &mut Criterion,
    name: &str,
    bytes: u64,
    make: impl Fn(usize) -> D,
    step: impl Fn(&Executor, &mut D),
) {
    let sizes: Vec<Size> =
        SIZES.iter().map(|&n| Size { key: n, label: n.to_string(), elements: n, heavy: n >= HEAVY }).collect();
    per_path(c, name, bytes, &sizes, make, step)
}

/// Copy bandwidth of this machine in the same run, as the yardstick: split as the elementwise
/// driver splits a step (on the caller's thread up to one chunk, else a few long contiguous
/// pieces per thread), so that the two differ only in what is done to each element.
fn copy(c: &mut Criterion) {
    let mut group = c.benchmark_group("copy");
    let threads = threads();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    for &n in &SIZES {
        let mut data: Option<(Vec<f32>, Vec<f32>)> = None;
        group.throughput(Throughput::BytesDecimal(traffic::COPY_F32 * n as u64));
        sample_for(&mut group, n >= HEAVY);
        let piece = n.div_ceil(2 * threads).div_ceil(CHUNK).max(1) * CHUNK;
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            let (src, dst) = data.get_or_insert_with(|| (filled(n, 1), vec![0f32; n]));
            b.iter(|| {
                if threads == 1 || n <= CHUNK {
                    dst.copy_from_slice(black_box(src));
                } else {
                    pool.install(|| {
                        dst.par_chunks_mut(piece)
                            .zip(black_box(&*src).par_chunks(piece))
                            .for_each(|(d, s)| d.copy_from_slice(s))
                    })
                }
            })
        });
    }
    group.finish();
}

fn sgd(c: &mut Criterion) {
    let plain = SgdHyper { lr: 0.01, ..SgdHyper::default() };
    let momentum = SgdHyper { lr: 0.01, momentum: 0.9, ..SgdHyper::default() };
    let step = |exec: &Executor, hp: &SgdHyper, params: Params<'_>, buf: &mut Vec<f32>| {
        let table = SegmentTable::packed(&[params_len(&params)]).unwrap();
        let momentum = if hp.momentum != 0.0 { Some(&mut buf[..]) } else { None };
        sgd_step(exec, &table, &[true], &mut [1.0], SgdBuffers { params, momentum }, hp).unwrap();
    };
    for (name, hp, bytes) in [("sgd", plain, traffic::SGD_F32), ("sgd_momentum", momentum, traffic::SGD_MOMENTUM_F32)] {
        let buffer = hp.momentum != 0.0;
        elementwise(
            c,
            name,
            bytes,
            |n| (filled(n, 1), filled(n, 2), if buffer { vec![0f32; n] } else { Vec::new() }),
            |exec, (p, g, m)| step(exec, &hp, Params::F32 { param: p, grad: g }, m),
        );
    }
    for (name, hp, bytes) in
        [("sgd_bf16_sr", plain, traffic::SGD_BF16), ("sgd_momentum_bf16_sr", momentum, traffic::SGD_MOMENTUM_BF16)]
    {
        let buffer = hp.momentum != 0.0;
        elementwise(
            c,
            name,
            bytes,
            |n| (bf16(&filled(n, 1)), bf16(&filled(n, 2)), if buffer { vec![0f32; n] } else { Vec::new() }),
            |exec, (p, g, m)| step(exec, &hp, Params::Bf16 { param: p, grad: g, rounding: STOCHASTIC }, m),
        );
    }
}

fn params_len(params: &Params<'_>) -> usize {
    match params {
        Params::F32 { param, .. } => param.len(),
        Params::Bf16 { param, .. } => param.len(),
        Params::Tensors(_) => unreachable!("the benches step flat buffers"),
    }
}

fn adamw(c: &mut Criterion) {
    let hp = AdamHyper { weight_decay: 0.01, decoupled_weight_decay: true, ..AdamHyper::default() };
    let step = |exec: &Executor, params: Params<'_>, m: &mut [f32], v: &mut [f32]| {
        let table = SegmentTable::packed(&[m.len()]).unwrap();
        let bufs = AdamBuffers { params, exp_avg: m, exp_avg_sq: v, max_exp_avg_sq: None };
        adam_step(exec, &table, &[true], &mut [1.0], bufs, &hp).unwrap();
    };
    elementwise(
        c,
        "adamw",
        traffic::ADAMW_F32,
        |n| (filled(n, 1), filled(n, 2), vec![0f32; n], vec![0f32; n]),
        |exec, (p, g, m, v)| step(exec, Params::F32 { param: p, grad: g }, m, v),
    );
    elementwise(
        c,
        "adamw_bf16_sr",
        traffic::ADAMW_BF16,
        |n| (bf16(&filled(n, 1)), bf16(&filled(n, 2)), vec![0f32; n], vec![0f32; n]),
        |exec, (p, g, m, v)| step(exec, Params::Bf16 { param: p, grad: g, rounding: STOCHASTIC }, m, v),
    );
}

/// Stochastic rounding alone (fp32 to bf16), as the bf16 rules' stores and the optimizers'
/// master-weight copies use it.
fn stochastic_round(c: &mut Criterion) {
    elementwise(
        c,
        "stochastic_round",
        traffic::ROUND_F32_TO_BF16,
        |n| (filled(n, 1), vec![0u16; n]),
        |exec, (src, dst)| stochastic_round_slice(exec, src, dst, SEED, 1, 0).unwrap(),
    );
}

/// Adafactor with torch.optim.Adafactor's defaults on one factored square matrix.
fn adafactor(c: &mut Criterion) {
    struct State<P> {
        p: Vec<P>,
        g: Vec<P>,
        table: SegmentTable,
        layout: AdafactorLayout,
        rows: Vec<f32>,
        cols: Vec<f32>,
    }
    fn state<P>(side: usize, convert: impl Fn(&[f32]) -> Vec<P>) -> State<P> {
        let table = SegmentTable::with_matrices(&[[1, side, side]]).unwrap();
        let layout = AdafactorLayout::new(&table, &[true]).unwrap();
        let n = side * side;
        let (rows, cols) = (vec![0f32; layout.row_total], vec![0f32; layout.col_total]);
        State { p: convert(&filled(n, 1)), g: convert(&filled(n, 2)), table, layout, rows, cols }
    }
    fn step(
        exec: &Executor,
        params: Params<'_>,
        table: &SegmentTable,
        layout: &AdafactorLayout,
        r: &mut [f32],
        c: &mut [f32],
    ) {
        let hp = AdafactorHyper::default();
        let bufs = AdafactorBuffers { params, row_var: r, col_var: c, variance: &mut [], exp_avg: None };
        adafactor_step(exec, table, layout, &[true], &mut [1.0], bufs, &hp).unwrap();
    }
    let sizes: Vec<Size> = ADAFACTOR_SIDES
        .iter()
        .map(|&s| Size { key: s, label: (s * s).to_string(), elements: s * s, heavy: s * s >= HEAVY })
        .collect();
    per_path(
        c,
        "adafactor",
        traffic::ADAFACTOR_F32,
        &sizes,
        |side| state(side, |v| v.to_vec()),
        |exec, s| {
            step(exec, Params::F32 { param: &mut s.p, grad: &s.g }, &s.table, &s.layout, &mut s.rows, &mut s.cols)
        },
    );
    per_path(
        c,
        "adafactor_bf16_sr",
        traffic::ADAFACTOR_BF16,
        &sizes,
        |side| state(side, bf16),
        |exec, s| {
            let params = Params::Bf16 { param: &mut s.p, grad: &s.g, rounding: STOCHASTIC };
            step(exec, params, &s.table, &s.layout, &mut s.rows, &mut s.cols)
        },
    );
}

/// Muon with torch.optim.Muon's defaults, fp32 and bf16 with stochastic rounding. Its products
/// use the GEMM library's own dispatch, so the SIMD path should not change its time; it is
/// measured per path to show that it stays so.
fn muon(c: &mut Criterion) {
    let hp = MuonHyper { lr: 0.02, ..MuonHyper::default() };
    let sizes: Vec<Size> = (0..MUON_SHAPES.len())
        .map(|k| Size {
            key: k,
            label: MUON_SHAPES[k].map(|d| d.to_string()).join("x"),
            elements: MUON_SHAPES[k].iter().product(),
            heavy: true,
        })
        .collect();
    fn state<P>(k: usize, convert: impl Fn(&[f32]) -> Vec<P>) -> (SegmentTable, Vec<P>, Vec<P>, Vec<f32>) {
        let table = SegmentTable::with_matrices(&[MUON_SHAPES[k]]).unwrap();
        let n = table.total();
        (table, convert(&filled(n, 1)), convert(&filled(n, 2)), vec![0f32; n])
    }
    let step = |exec: &Executor, table: &SegmentTable, params: Params<'_>, m: &mut [f32]| {
        muon_step(exec, table, &[true], &mut [1.0], MuonBuffers { params, momentum: m }, &hp).unwrap();
    };
    per_path(
        c,
        "muon",
        traffic::MUON_F32,
        &sizes,
        |k| state(k, |v| v.to_vec()),
        |exec, (table, p, g, m)| step(exec, table, Params::F32 { param: p, grad: g }, m),
    );
    per_path(
        c,
        "muon_bf16_sr",
        traffic::MUON_BF16,
        &sizes,
        |k| state(k, bf16),
        |exec, (table, p, g, m)| step(exec, table, Params::Bf16 { param: p, grad: g, rounding: STOCHASTIC }, m),
    );
}

/// Muon's orthogonalisation alone, per call: it is FLOP-bound (compare with a float32 matmul).
fn newton_schulz(c: &mut Criterion) {
    use smallbatch_core::newton_schulz::{NewtonSchulz, NewtonSchulzWorkspace};
    let mut group = c.benchmark_group("newton_schulz");
    let exec = Executor::new(SimdPath::Scalar, threads()).unwrap();
    let p = NewtonSchulz::default();
    sample_for(&mut group, true);
    for (rows, cols) in [(384, 384), (384, 1536), (1536, 384)] {
        let g = filled(rows * cols, 1);
        let mut out = vec![0f32; rows * cols];
        let mut ws = NewtonSchulzWorkspace::new();
        group.bench_function(BenchmarkId::from_parameter(format!("{rows}x{cols}")), |b| {
            b.iter(|| ws.orthogonalize(&exec, black_box(&g), rows, cols, &p, &mut out).unwrap())
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Few resamples: the confidence intervals of 10-30 samples do not need 100k bootstraps, and
    // the analysis would otherwise take a noticeable share of the run.
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).nresamples(10_000);
    targets = copy, stochastic_round, sgd, adamw, adafactor, muon, newton_schulz
}
criterion_main!(benches);
