//! `adafactor_step_sharded` on the shards of a group spread over two ranks (threads joined by an
//! all-reduce) against `adafactor_step` on the whole tensors: rows split (a 2-D weight sharded on
//! dim 0, also a rank holding no rows), whole matrices of a batch split, unfactored tensors split,
//! replicated tensors; momentum, weight decay, both epsilon conventions, f32 and bf16 with
//! stochastic rounding.

use smallbatch_core::driver::Rounding;
use smallbatch_core::rounding::round_bf16_nearest;
use smallbatch_core::rules::adafactor::{
    adafactor_step, adafactor_step_sharded, AdafactorBuffers, AdafactorHyper, AdafactorLayout, Beta2, Shards, Split,
};
use smallbatch_core::rules::{Params, Storage, TensorAddresses};
use smallbatch_core::{Error, Executor, SegmentTable, SimdPath};

mod common;
use common::ranks::Ranks;
use common::Rng;

impl Rng {
    fn value(&mut self) -> f32 {
        if self.next().is_multiple_of(11) {
            return 0.0;
        }
        ((self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0) * 10f32.powi((self.next() % 3) as i32 - 2)
    }
}

/// A tensor of the group: its whole shape as `[batch, rows, cols]`, how it is spread, factored.
#[derive(Clone, Copy)]
struct Tensor {
    shape: [usize; 3],
    split: Split,
    factored: bool,
}

const TENSORS: [Tensor; 8] = [
    Tensor { shape: [1, 37, 23], split: Split::Rows, factored: true },
    Tensor { shape: [1, 1, 5], split: Split::Rows, factored: true }, // rank 1 holds no row
    Tensor { shape: [1, 1, 77], split: Split::Elements, factored: false },
    Tensor { shape: [3, 9, 130], split: Split::Elements, factored: true },
    Tensor { shape: [1, 7, 6], split: Split::Whole, factored: true },
    Tensor { shape: [1, 13, 5], split: Split::Elements, factored: false },
    Tensor { shape: [1, 300, 260], split: Split::Rows, factored: true },
    Tensor { shape: [1, 3, 1], split: Split::Rows, factored: true },
];

/// Rank `rank`'s part of dim 0 of a whole tensor (torch.chunk's split, as FSDP2 shards): the
/// rows of a `Rows` tensor, the matrices of a batch, the elements of a vector.
fn chunk(n: usize, rank: usize, world: usize) -> (usize, usize) {
    let size = n.div_ceil(world);
    ((rank * size).min(n), ((rank + 1) * size).min(n))
}

/// Tensor `t`'s local shape on `rank` and the range of its whole tensor's elements it holds.
fn shard_of(t: &Tensor, rank: usize, world: usize) -> ([usize; 3], std::ops::Range<usize>) {
    let [b, r, c] = t.shape;
    match t.split {
        Split::Whole => (t.shape, 0..b * r * c),
        Split::Rows => {
            let (r0, r1) = chunk(r, rank, world);
            ([1, r1 - r0, c], r0 * c..r1 * c)
        }
        Split::Elements if b > 1 => {
            let (b0, b1) = chunk(b, rank, world);
            ([b1 - b0, r, c], b0 * r * c..b1 * r * c)
        }
        Split::Elements => {
            // A vector or unfactored matrix: rows of the tensor (one element per row for a vector).
            let (dim0, row) = if r == 1 { (c, 1) } else { (r, c) };
            let (e0, e1) = chunk(dim0, rank, world);
            let shape = if r == 1 { [1, 1, e1 - e0] } else { [1, e1 - e0, c] };
            (shape, e0 * row..e1 * row)
        }
    }
}

/// Parameters, gradients and state of a group, flat; `param` holds f32 or bf16 bits (as u32).
struct Group {
    table: SegmentTable,
    layout: AdafactorLayout,
    param_f32: Vec<f32>,
    param_bf16: Vec<u16>,
    grads: Vec<Vec<f32>>,
    row_var: Vec<f32>,
    col_var: Vec<f32>,
    variance: Vec<f32>,
    exp_avg: Vec<f32>,
    steps: Vec<f64>,
}

impl Group {
    fn new(shapes: &[[usize; 3]], factored: &[bool], param: &[f32], grads: Vec<Vec<f32>>) -> Group {
        let table = SegmentTable::with_matrices(shapes).unwrap();
        let layout = AdafactorLayout::new(&table, factored).unwrap();
        let total = table.total();
        Group {
            row_var: vec![0.0; layout.row_total],
            col_var: vec![0.0; layout.col_total],
            variance: vec![0.0; layout.variance_total],
            exp_avg: vec![0.0; total],
            steps: vec![0.0; table.len()],
            param_f32: param.to_vec(),
            param_bf16: param.iter().map(|&x| round_bf16_nearest(x)).collect(),
            grads,
            table,
            layout,
        }
    }

    /// Step `s`'s parameters and gradients as the rule reads them.
    fn params(&mut self, s: usize, storage: Storage, draws: Option<Vec<usize>>) -> (Params<'static>, Vec<u16>) {
        let grad = &self.grads[s];
        let grad_bf16: Vec<u16> = grad.iter().map(|&x| round_bf16_nearest(x)).collect();
        let (p, g) = match storage {
            Storage::F32 => (self.param_f32.as_mut_ptr() as usize, grad.as_ptr() as usize),
            Storage::Bf16(_) => (self.param_bf16.as_mut_ptr() as usize, grad_bf16.as_ptr() as usize),
        };
        let esize = if storage == Storage::F32 { 4 } else { 2 };
        let addrs = |base: usize| self.table.offsets().iter().map(|&o| base + o * esize).collect::<Vec<_>>();
        // SAFETY: the group's buffers (and `grad_bf16`, returned to the caller) outlive the step.
        let t = unsafe { TensorAddresses::new(storage, addrs(p), addrs(g)) };
        (
            Params::Tensors(match draws {
                Some(d) => t.with_draw_offsets(d),
                None => t,
            }),
            grad_bf16,
        )
    }

    fn param_bits(&self, storage: Storage, range: std::ops::Range<usize>) -> Vec<f32> {
        match storage {
            Storage::F32 => self.param_f32[range].to_vec(),
            Storage::Bf16(_) => self.param_bf16[range].iter().map(|&b| f32::from_bits((b as u32) << 16)).collect(),
        }
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

const STEPS: usize = 3;

/// Runs the whole group and its two shards for `STEPS` steps; returns the largest difference of
/// any parameter relative to the largest update of its tensor, and of any state value relative
/// to its tensor's largest.
fn compare(exec: &Executor, hp: &AdafactorHyper, storage: Storage) -> (f64, f64) {
    let mut rng = Rng(0x5a4d_0001);
    let world = 2;
    let shapes: Vec<[usize; 3]> = TENSORS.iter().map(|t| t.shape).collect();
    let factored: Vec<bool> = TENSORS.iter().map(|t| t.factored).collect();
    let whole_table = SegmentTable::with_matrices(&shapes).unwrap();
    let total = whole_table.total();
    let param: Vec<f32> = (0..total).map(|_| rng.value()).collect();
    // Every step has gradients for all tensors but the replicated one on step 1.
    let stepped: Vec<Vec<bool>> =
        (0..STEPS).map(|s| (0..TENSORS.len()).map(|i| !(s == 1 && i == 4)).collect()).collect();
    let grads: Vec<Vec<f32>> = (0..STEPS).map(|_| (0..total).map(|_| rng.value()).collect()).collect();

    let mut whole = Group::new(&shapes, &factored, &param, grads.clone());
    for (s, stepped) in stepped.iter().enumerate() {
        let (params, _keep) = whole.params(s, storage, None);
        let bufs = AdafactorBuffers {
            params,
            row_var: &mut whole.row_var,
            col_var: &mut whole.col_var,
            variance: &mut whole.variance,
            exp_avg: Some(&mut whole.exp_avg),
        };
        adafactor_step(exec, &whole.table, &whole.layout, stepped, &mut whole.steps, bufs, hp).unwrap();
    }

    let reduce = Ranks::new(world);
    let shards: Vec<Group> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (reduce, grads, param, stepped, whole_table, factored) =
                    (&reduce, &grads, &param, &stepped, &whole_table, &factored);
                scope.spawn(move || {
                    let local: Vec<([usize; 3], std::ops::Range<usize>)> =
                        TENSORS.iter().map(|t| shard_of(t, rank, world)).collect();
                    let pick = |flat: &[f32]| -> Vec<f32> {
                        local
                            .iter()
                            .enumerate()
                            .flat_map(|(i, (_, r))| {
                                let o = whole_table.offsets()[i];
                                flat[o + r.start..o + r.end].to_vec()
                            })
                            .collect()
                    };
                    let shard_shapes: Vec<[usize; 3]> = local.iter().map(|(s, _)| *s).collect();
                    let mut g =
                        Group::new(&shard_shapes, factored, &pick(param), grads.iter().map(|x| pick(x)).collect());
                    let draws: Vec<usize> =
                        local.iter().enumerate().map(|(i, (_, r))| whole_table.offsets()[i] + r.start).collect();
                    let split: Vec<Split> = TENSORS.iter().map(|t| t.split).collect();
                    let numels: Vec<usize> = TENSORS.iter().map(|t| t.shape.iter().product()).collect();
                    let rows: Vec<usize> = TENSORS.iter().map(|t| t.shape[1]).collect();
                    for (s, stepped) in stepped.iter().enumerate() {
                        let (params, _keep) = g.params(s, storage, Some(draws.clone()));
                        let bufs = AdafactorBuffers {
                            params,
                            row_var: &mut g.row_var,
                            col_var: &mut g.col_var,
                            variance: &mut g.variance,
                            exp_avg: Some(&mut g.exp_avg),
                        };
                        let shards = Shards { split: &split, numels: &numels, rows: &rows };
                        let mut sum = |v: &mut [f64]| {
                            reduce.all_reduce(rank, v);
                            Ok(())
                        };
                        adafactor_step_sharded(
                            exec,
                            &g.table,
                            &g.layout,
                            stepped,
                            &mut g.steps,
                            bufs,
                            hp,
                            shards,
                            &mut sum,
                        )
                        .unwrap();
                    }
                    g
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let (mut worst_param, mut worst_state) = (0f64, 0f64);
    let rel = |a: &[f32], b: &[f32], scale: f64| -> f64 {
        a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs() / scale.max(1e-30)).fold(0.0, f64::max)
    };
    let largest = |v: &[f32]| v.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
    for (rank, g) in shards.iter().enumerate() {
        assert_eq!(g.steps, whole.steps, "rank {rank}: step counts");
        for (i, t) in TENSORS.iter().enumerate() {
            let (_, range) = shard_of(t, rank, world);
            let o = whole.table.offsets()[i];
            let expect = whole.param_bits(storage, o + range.start..o + range.end);
            let got = g.param_bits(storage, g.table.range(i));
            let moved: Vec<f32> = whole.param_bits(storage, whole.table.range(i));
            let update =
                moved.iter().zip(&param[whole.table.range(i)]).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
            worst_param = worst_param.max(rel(&got, &expect, update));
            let exp_avg = &whole.exp_avg[o + range.start..o + range.end];
            worst_state = worst_state.max(rel(&g.exp_avg[g.table.range(i)], exp_avg, largest(exp_avg)));
            let [b, r, c] = t.shape;
            let [_, lr, _] = g.table.matrix(i);
            if t.factored {
                let (wr, wc) = (whole.layout.row_offsets[i], whole.layout.col_offsets[i]);
                let (gr, gc) = (g.layout.row_offsets[i], g.layout.col_offsets[i]);
                let (rows_whole, cols_whole) = (&whole.row_var[wr..wr + b * r], &whole.col_var[wc..wc + b * c]);
                let (row_part, col_part) = match t.split {
                    Split::Rows => (range.start / c..range.end / c, 0..c),
                    Split::Elements => (range.start / c..range.end / c, range.start / r..range.end / r),
                    Split::Whole => (0..b * r, 0..b * c),
                };
                let gb = g.table.matrix(i)[0];
                worst_state =
                    worst_state.max(rel(&g.row_var[gr..gr + gb * lr], &rows_whole[row_part], largest(rows_whole)));
                worst_state =
                    worst_state.max(rel(&g.col_var[gc..gc + gb * c], &cols_whole[col_part], largest(cols_whole)));
            } else {
                let (wv, gv) = (whole.layout.variance_offsets[i], g.layout.variance_offsets[i]);
                let v = &whole.variance[wv + range.start..wv + range.end];
                worst_state = worst_state.max(rel(&g.variance[gv..gv + range.len()], v, largest(v)));
            }
        }
    }
    (worst_param, worst_state)
}

#[test]
fn two_shards_step_as_the_whole_tensors() {
    for exec in [Executor::new(SimdPath::Scalar, 1).unwrap(), Executor::new(SimdPath::best(), 3).unwrap()] {
        for (h, hp) in hypers().iter().enumerate() {
            for storage in [Storage::F32, Storage::Bf16(Rounding::Stochastic { seed: 9, stream: 2 })] {
                let (param, state) = compare(&exec, hp, storage);
                eprintln!(
                    "{exec:?} hyper {h} {storage:?}: parameters {param:e} of the largest update, state {state:e}"
                );
                // The sums add the ranks' partials in another order: f64 sums that round to the
                // same f32 almost always. bf16 stores round the same f32 values with the same bits.
                assert!(param <= 1e-6, "{exec:?} hyper {h} {storage:?}: parameters differ by {param:e}");
                assert!(state <= 1e-6, "{exec:?} hyper {h} {storage:?}: state differs by {state:e}");
            }
        }
    }
}

#[test]
fn one_rank_of_whole_tensors_is_the_unsharded_step_bit_for_bit() {
    let exec = Executor::new(SimdPath::best(), 2).unwrap();
    let shapes: Vec<[usize; 3]> = TENSORS.iter().map(|t| t.shape).collect();
    let factored: Vec<bool> = TENSORS.iter().map(|t| t.factored).collect();
    let mut rng = Rng(0x5a4d_0002);
    let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let param: Vec<f32> = (0..total).map(|_| rng.value()).collect();
    let grads: Vec<Vec<f32>> = (0..2).map(|_| (0..total).map(|_| rng.value()).collect()).collect();
    let stepped = vec![true; TENSORS.len()];
    let storage = Storage::Bf16(Rounding::Stochastic { seed: 1, stream: 0 });
    for hp in hypers() {
        let (mut a, mut b) = (
            Group::new(&shapes, &factored, &param, grads.clone()),
            Group::new(&shapes, &factored, &param, grads.clone()),
        );
        for s in 0..2 {
            for (g, sharded) in [(&mut a, false), (&mut b, true)] {
                let (params, _keep) = g.params(s, storage, None);
                let bufs = AdafactorBuffers {
                    params,
                    row_var: &mut g.row_var,
                    col_var: &mut g.col_var,
                    variance: &mut g.variance,
                    exp_avg: Some(&mut g.exp_avg),
                };
                if sharded {
                    let split = vec![Split::Whole; TENSORS.len()];
                    let numels: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
                    let rows: Vec<usize> = shapes.iter().map(|s| s[1]).collect();
                    let shards = Shards { split: &split, numels: &numels, rows: &rows };
                    let mut sum = |v: &mut [f64]| {
                        assert!(v.is_empty(), "whole tensors sum nothing across ranks");
                        Ok(())
                    };
                    adafactor_step_sharded(
                        &exec,
                        &g.table,
                        &g.layout,
                        &stepped,
                        &mut g.steps,
                        bufs,
                        &hp,
                        shards,
                        &mut sum,
                    )
                    .unwrap();
                } else {
                    adafactor_step(&exec, &g.table, &g.layout, &stepped, &mut g.steps, bufs, &hp).unwrap();
                }
            }
        }
        assert_eq!(a.param_bf16, b.param_bf16);
        for (x, y) in
            [(&a.row_var, &b.row_var), (&a.col_var, &b.col_var), (&a.variance, &b.variance), (&a.exp_avg, &b.exp_avg)]
        {
            assert_eq!(
                x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn a_failed_sum_is_returned_and_the_step_counts_do_not_move() {
    let exec = Executor::new(SimdPath::Scalar, 1).unwrap();
    let shapes = [[1, 4, 3]];
    let mut g = Group::new(&shapes, &[true], &[0.5; 12], vec![vec![0.25; 12]]);
    let (params, _keep) = g.params(0, Storage::F32, None);
    let bufs = AdafactorBuffers {
        params,
        row_var: &mut g.row_var,
        col_var: &mut g.col_var,
        variance: &mut g.variance,
        exp_avg: None,
    };
    let shards = Shards { split: &[Split::Rows], numels: &[24], rows: &[8] };
    let mut sum = |_: &mut [f64]| Err(Error::Collective("gloo timeout".into()));
    let err = adafactor_step_sharded(
        &exec,
        &g.table,
        &g.layout,
        &[true],
        &mut g.steps,
        bufs,
        &AdafactorHyper::default(),
        shards,
        &mut sum,
    )
    .unwrap_err();
    assert!(err.to_string().contains("gloo timeout"), "{err}");
    assert_eq!(g.steps, [0.0]);
    assert_eq!(g.param_f32, [0.5; 12]);
    // A shard cannot be larger than its whole tensor.
    let (params, _keep) = g.params(0, Storage::F32, None);
    let bufs = AdafactorBuffers {
        params,
        row_var: &mut g.row_var,
        col_var: &mut g.col_var,
        variance: &mut g.variance,
        exp_avg: None,
    };
    let shards = Shards { split: &[Split::Rows], numels: &[6], rows: &[2] };
    let err = adafactor_step_sharded(
        &exec,
        &g.table,
        &g.layout,
        &[true],
        &mut g.steps,
        bufs,
        &AdafactorHyper::default(),
        shards,
        &mut |_| Ok(()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("fewer than its shard's 12"), "{err}");
}
