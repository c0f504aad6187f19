//! `cargo bench`: update throughput of each rule per SIMD path, as bytes per second of the rule's
//! minimal memory traffic (every buffer it must read, plus every buffer it must write, once).
//!
//! Compare the numbers with the machine's copy bandwidth: the elementwise rules are memory-bound,
//! so a path is as fast as it can be when its bytes/s approach a plain copy's.
//!
//!     cargo bench                          # all rules, paths and sizes
//!     cargo bench -- adamw/avx512          # a filter
//!     SMALLBATCH_BENCH_THREADS=1 cargo bench

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;
use smallbatch_core::driver::CHUNK;
use smallbatch_core::rules::adam::{adam_step, AdamBuffers, AdamHyper};
use smallbatch_core::rules::sgd::{sgd_step, SgdBuffers, SgdHyper};
use smallbatch_core::rules::Params;
use smallbatch_core::{Executor, SegmentTable, SimdPath};
use std::hint::black_box;
use std::time::Duration;

const SIZES: [usize; 4] = [4 << 10, 256 << 10, 4 << 20, 16 << 20];

fn threads() -> usize {
    std::env::var("SMALLBATCH_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn filled(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 * 1e-3 - 0.5).collect()
}

/// Copy bandwidth of this machine in the same run, as the yardstick (read + write bytes).
fn copy(c: &mut Criterion) {
    let mut group = c.benchmark_group("copy");
    for &n in &SIZES {
        let src = filled(n, 1);
        let mut dst = vec![0f32; n];
        group.throughput(Throughput::Bytes((8 * n) as u64));
        // Split over the same number of threads as the rules, in the same chunk size.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads()).build().unwrap();
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                pool.install(|| {
                    dst.par_chunks_mut(CHUNK)
                        .zip(black_box(&src).par_chunks(CHUNK))
                        .for_each(|(d, s)| d.copy_from_slice(s))
                })
            })
        });
    }
    group.finish();
}

fn adamw(c: &mut Criterion) {
    let mut group = c.benchmark_group("adamw");
    let hp = AdamHyper { weight_decay: 0.01, decoupled_weight_decay: true, ..AdamHyper::default() };
    for path in SimdPath::supported() {
        let exec = Executor::new(path, threads()).unwrap();
        for &n in &SIZES {
            let table = SegmentTable::packed(&[n]).unwrap();
            let (mut p, g, mut m, mut v) = (filled(n, 1), filled(n, 2), vec![0f32; n], vec![0f32; n]);
            // reads param, grad, exp_avg, exp_avg_sq; writes param, exp_avg, exp_avg_sq
            group.throughput(Throughput::Bytes((28 * n) as u64));
            group.bench_function(BenchmarkId::new(path.name(), n), |b| {
                b.iter(|| {
                    let mut steps = [1.0];
                    let params = Params::F32 { param: &mut p, grad: &g };
                    let bufs = AdamBuffers { params, exp_avg: &mut m, exp_avg_sq: &mut v };
                    adam_step(&exec, &table, &[true], &mut steps, bufs, &hp).unwrap();
                })
            });
        }
    }
    group.finish();
}

fn sgd(c: &mut Criterion) {
    for (label, hp, bytes_per_elem) in [
        ("sgd", SgdHyper { lr: 0.01, ..SgdHyper::default() }, 12),
        ("sgd_momentum", SgdHyper { lr: 0.01, momentum: 0.9, ..SgdHyper::default() }, 20),
    ] {
        let mut group = c.benchmark_group(label);
        for path in SimdPath::supported() {
            let exec = Executor::new(path, threads()).unwrap();
            for &n in &SIZES {
                let table = SegmentTable::packed(&[n]).unwrap();
                let (mut p, g, mut buf) = (filled(n, 1), filled(n, 2), vec![0f32; n]);
                group.throughput(Throughput::Bytes((bytes_per_elem * n) as u64));
                group.bench_function(BenchmarkId::new(path.name(), n), |b| {
                    b.iter(|| {
                        let mut steps = [1.0];
                        let momentum = if hp.momentum != 0.0 { Some(&mut buf[..]) } else { None };
                        let bufs = SgdBuffers { params: Params::F32 { param: &mut p, grad: &g }, momentum };
                        sgd_step(&exec, &table, &[true], &mut steps, bufs, &hp).unwrap();
                    })
                });
            }
        }
        group.finish();
    }
}

/// Muon's orthogonalisation: FLOP-bound, so reported per call (compare with torch's fp32 matmuls).
fn newton_schulz(c: &mut Criterion) {
    use smallbatch_core::newton_schulz::{NewtonSchulz, NewtonSchulzWorkspace};
    let mut group = c.benchmark_group("newton_schulz");
    let exec = Executor::new(SimdPath::Scalar, threads()).unwrap();
    let p = NewtonSchulz::default();
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
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    targets = copy, adamw, sgd, newton_schulz
}
criterion_main!(benches);
