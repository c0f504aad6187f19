//! smallbatch-cuda's sharded Adafactor step (`adafactor::adafactor_step_sharded`: the real host
//! code, the exchange packed by `adafactor_pack_sums` and summed between launches) on two ranks
//! as threads, against the core's `adafactor_step_sharded` on the same shards: rows split (also
//! a rank holding no rows), whole matrices of a batch split, unfactored tensors split, replicated
//! tensors; f32 and bf16 with stochastic rounding drawing each element's own bits.

mod common;
#[path = "../../core/tests/common/ranks.rs"]
mod ranks;
mod support;

use common::Rng;
use ranks::Ranks;
use smallbatch_core::rules::adafactor::{
    adafactor_step_sharded as core_sharded, AdafactorBuffers, AdafactorHyper, AdafactorLayout, Beta2, Shards, Split,
};
use smallbatch_core::rules::{Params, TensorAddresses};
use smallbatch_core::{Executor, SegmentTable};
use smallbatch_cuda::adafactor::{adafactor_step_sharded, AdafactorState, AdafactorWorkspace, Exchange};
use smallbatch_cuda::dispatch::DeviceGroup;
use smallbatch_cuda::CudaError;
use support::{emu, exec, value, Dtype};

const WORLD: usize = 2;
const STEPS: usize = 3;

/// A whole tensor as `[batch, rows, cols]`, how it is spread, and whether it is factored.
const TENSORS: [([usize; 3], Split, bool); 8] = [
    ([1, 37, 23], Split::Rows, true),
    ([1, 1, 5], Split::Rows, true), // rank 1 holds no row
    ([1, 1, 77], Split::Elements, false),
    ([3, 9, 130], Split::Elements, true),
    ([1, 7, 6], Split::Whole, true),
    ([1, 13, 5], Split::Elements, false),
    ([1, 300, 260], Split::Rows, true),
    ([1, 3, 1], Split::Rows, true),
];

/// torch.chunk's part of `n` for `rank`, as FSDP2 shards dim 0.
fn chunk(n: usize, rank: usize) -> (usize, usize) {
    let size = n.div_ceil(WORLD);
    ((rank * size).min(n), ((rank + 1) * size).min(n))
}

/// Rank `rank`'s shape of a whole tensor, and the index of its first element in the whole tensor.
fn shard_of(shape: [usize; 3], split: Split, rank: usize) -> ([usize; 3], usize) {
    let [b, r, c] = shape;
    match split {
        Split::Whole => (shape, 0),
        Split::Rows => {
            let (r0, r1) = chunk(r, rank);
            ([1, r1 - r0, c], r0 * c)
        }
        Split::Elements if b > 1 => {
            let (b0, b1) = chunk(b, rank);
            ([b1 - b0, r, c], b0 * r * c)
        }
        Split::Elements if r == 1 => {
            let (e0, e1) = chunk(c, rank);
            ([1, 1, e1 - e0], e0)
        }
        Split::Elements => {
            let (r0, r1) = chunk(r, rank);
            ([1, r1 - r0, c], r0 * c)
        }
    }
}

/// One rank's copy of its shards: parameters (in the case's storage) and the four state buffers.
struct Copy {
    params: Vec<u8>,
    state: [Vec<f32>; 4],
    steps: Vec<f64>,
}

impl Copy {
    fn new(params: Vec<u8>, layout: &AdafactorLayout, total: usize, n: usize) -> Copy {
        let state = [
            vec![0.0; layout.row_total],
            vec![0.0; layout.col_total],
            vec![0.0; layout.variance_total],
            vec![0.0; total],
        ];
        Copy { params, state, steps: vec![0.0; n] }
    }
}

fn hypers() -> [AdafactorHyper; 3] {
    [
        AdafactorHyper::default(),
        AdafactorHyper {
            lr: 3e-3,
            beta1: 0.9,
            beta2: Beta2::Constant(0.99),
            eps1: Some(1e-30),
            cap_lr_at_inv_sqrt_step: false,
            weight_decay: 0.1,
            clip_threshold: 1.0,
            ..AdafactorHyper::default()
        },
        AdafactorHyper {
            lr: 1e-2,
            relative_step: false,
            maximize: true,
            clip_threshold: 2.0,
            ..AdafactorHyper::default()
        },
    ]
}

/// Rank `rank`'s run of `STEPS` steps on the core and on the device; returns the largest
/// difference of a parameter relative to the largest update of its tensor, and of a state value
/// relative to the largest value of its buffer.
fn rank_run(rank: usize, ranks: &Ranks<f64>, exec: &Executor, hp: &AdafactorHyper, dtype: Dtype) -> (f64, f64) {
    let ordinal = 310 + rank as i32;
    emu().set_sm_count(ordinal, 2);
    let mut rng = Rng::new(0xADAF_5A4D + rank as u64);
    let local: Vec<([usize; 3], usize)> = TENSORS.iter().map(|&(s, split, _)| shard_of(s, split, rank)).collect();
    let shapes: Vec<[usize; 3]> = local.iter().map(|l| l.0).collect();
    let factored: Vec<bool> = TENSORS.iter().map(|t| t.2).collect();
    let table = SegmentTable::with_matrices(&shapes).unwrap();
    let layout = AdafactorLayout::new(&table, &factored).unwrap();
    let split: Vec<Split> = TENSORS.iter().map(|t| t.1).collect();
    let numels: Vec<usize> = TENSORS.iter().map(|t| t.0.iter().product()).collect();
    let rows: Vec<usize> = TENSORS.iter().map(|t| t.0[1]).collect();
    let shards = Shards { split: &split, numels: &numels, rows: &rows };
    // Each element draws its bits at its index in the unsharded group.
    let mut whole_offset = 0;
    let draws: Vec<usize> = (0..TENSORS.len())
        .map(|i| {
            let d = whole_offset + local[i].1;
            whole_offset += numels[i];
            d
        })
        .collect();
    let draws_u64: Vec<u64> = draws.iter().map(|&d| d as u64).collect();
    let total = table.total();
    let start: Vec<f32> = (0..total).map(|_| value(&mut rng)).collect();
    let params = dtype.encode(&start);
    let (mut core, mut dev) =
        (Copy::new(params.clone(), &layout, total, table.len()), Copy::new(params, &layout, total, table.len()));
    let mut ws = AdafactorWorkspace::new(ordinal);
    let mut exchange = vec![f64::NAN; 4096];
    let esize = dtype.size();
    let addrs = |base: usize| -> Vec<usize> { table.offsets().iter().map(|&o| base + o * esize).collect() };
    for s in 0..STEPS {
        // The replicated matrix gets no gradient on step 1.
        let stepped: Vec<bool> = (0..TENSORS.len()).map(|i| !(s == 1 && i == 4)).collect();
        let grads = dtype.encode(&(0..total).map(|_| value(&mut rng)).collect::<Vec<_>>());
        let g = grads.as_ptr() as usize;

        let p = core.params.as_mut_ptr() as usize;
        // SAFETY: the parameters and gradients outlive the step.
        let t = unsafe { TensorAddresses::new(dtype.storage(), addrs(p), addrs(g)) }.with_draw_offsets(draws.clone());
        let [r, c, v, m] = &mut core.state;
        let bufs =
            AdafactorBuffers { params: Params::Tensors(t), row_var: r, col_var: c, variance: v, exp_avg: Some(m) };
        let mut sum = |values: &mut [f64]| {
            ranks.all_reduce(rank, values);
            Ok(())
        };
        core_sharded(exec, &table, &layout, &stepped, &mut core.steps, bufs, hp, shards, &mut sum).unwrap();

        let p = dev.params.as_mut_ptr() as usize;
        let to_u64 = |v: Vec<usize>| v.into_iter().map(|a| a as u64).collect::<Vec<u64>>();
        let (pa, ga) = (to_u64(addrs(p)), to_u64(addrs(g)));
        let group = DeviceGroup {
            ordinal,
            stream: 3100 + rank,
            dtype: dtype.device(),
            params: &pa,
            grads: &ga,
            draws: Some(&draws_u64),
        };
        let st = &mut dev.state;
        let state = AdafactorState {
            row_var: st[0].as_mut_ptr() as u64,
            col_var: st[1].as_mut_ptr() as u64,
            variance: st[2].as_mut_ptr() as u64,
            exp_avg: st[3].as_mut_ptr() as u64,
        };
        let ex_addr = exchange.as_mut_ptr();
        let mut sum = |first: usize, count: usize| -> Result<(), String> {
            // SAFETY: the step asks for a range inside the capacity it was given; the emulator's
            // kernels have finished writing it (launches are synchronous).
            let values = unsafe { std::slice::from_raw_parts_mut(ex_addr.add(first), count) };
            ranks.all_reduce(rank, values);
            Ok(())
        };
        let ex = Exchange { addr: ex_addr as u64, capacity: exchange.len(), sum: &mut sum };
        let rounding = dtype.rounding();
        adafactor_step_sharded(
            &mut ws,
            group,
            &table,
            &layout,
            &stepped,
            &mut dev.steps,
            state,
            hp,
            rounding,
            &shards,
            ex,
        )
        .unwrap_or_else(|e| panic!("rank {rank} step {s}: {e}"));
        assert_eq!(dev.steps, core.steps, "rank {rank} step {s}: step counts");
    }

    let largest = |v: &[f32]| v.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
    let rel = |a: &[f32], b: &[f32], scale: f64| {
        a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs() / scale.max(1e-30)).fold(0.0, f64::max)
    };
    let (got, want) = (dtype.decode(&dev.params), dtype.decode(&core.params));
    let mut worst_param = 0f64;
    for i in 0..table.len() {
        let range = table.range(i);
        let update = want[range.clone()].iter().zip(&start[range.clone()]).map(|(a, b)| (a - b).abs() as f64);
        worst_param = worst_param.max(rel(&got[range.clone()], &want[range], update.fold(0.0, f64::max)));
    }
    let worst_state = dev.state.iter().zip(&core.state).map(|(d, c)| rel(d, c, largest(c))).fold(0.0, f64::max);
    (worst_param, worst_state)
}

#[test]
fn sharded_device_step_equals_the_sharded_core_step() {
    let exec = exec();
    for (h, hp) in hypers().iter().enumerate() {
        for dtype in [Dtype::F32, Dtype::all()[2]] {
            let ranks = Ranks::new(WORLD);
            let worst: Vec<(f64, f64)> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..WORLD)
                    .map(|rank| {
                        let (ranks, exec) = (&ranks, &exec);
                        scope.spawn(move || rank_run(rank, ranks, exec, hp, dtype))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (rank, (param, state)) in worst.into_iter().enumerate() {
                eprintln!(
                    "hyper {h} {dtype:?} rank {rank}: parameters {param:e} of the largest update, state {state:e}"
                );
                // The device adds partial sums in another order than the core: f64 sums that
                // round to the same f32 almost always.
                assert!(param <= 1e-6, "hyper {h} {dtype:?} rank {rank}: parameters differ by {param:e}");
                assert!(state <= 1e-6, "hyper {h} {dtype:?} rank {rank}: state differs by {state:e}");
            }
        }
    }
}

#[test]
fn a_small_exchange_is_refused_before_anything_runs() {
    let ordinal = 320;
    emu();
    let table = SegmentTable::with_matrices(&[[1, 4, 3]]).unwrap();
    let layout = AdafactorLayout::new(&table, &[true]).unwrap();
    let (split, numels, rows) = ([Split::Rows], [24], [8]);
    let shards = Shards { split: &split, numels: &numels, rows: &rows };
    let mut params = vec![1.0f32; 12];
    let grads = [0.5f32; 12];
    let mut state = [vec![0f32; 4], vec![0f32; 3]];
    let before = (params.clone(), state.clone());
    let (pa, ga) = ([params.as_mut_ptr() as u64], [grads.as_ptr() as u64]);
    let group = DeviceGroup { ordinal, stream: 3200, dtype: Dtype::F32.device(), params: &pa, grads: &ga, draws: None };
    let st = AdafactorState {
        row_var: state[0].as_mut_ptr() as u64,
        col_var: state[1].as_mut_ptr() as u64,
        variance: 0,
        exp_avg: 0,
    };
    let mut exchange = [0f64; 4];
    let mut called = false;
    let mut sum = |_: usize, _: usize| -> Result<(), String> {
        called = true;
        Ok(())
    };
    let ex = Exchange { addr: exchange.as_mut_ptr() as u64, capacity: exchange.len(), sum: &mut sum };
    let mut steps = vec![0.0];
    let hp = AdafactorHyper::default();
    let mut ws = AdafactorWorkspace::new(ordinal);
    let err = adafactor_step_sharded(
        &mut ws,
        group,
        &table,
        &layout,
        &[true],
        &mut steps,
        st,
        &hp,
        Dtype::F32.rounding(),
        &shards,
        ex,
    )
    .unwrap_err();
    // One row-split matrix of 3 columns: its sum of P^2, row EMAs and 3 column sums, then U^2.
    assert_eq!(
        err,
        CudaError::Invalid(format!(
            "the exchange vector holds 4 f64 at {:#x}; this step exchanges 6",
            exchange.as_ptr() as u64
        ))
    );
    assert!(!called);
    assert_eq!((params, state, steps), (before.0, before.1, vec![0.0]));
}
