//! Tensors in memory of their own (`Params::Tensors`, how the torch layer passes torch's tensors)
//! give the bits of the same tensors back to back in one flat buffer, for every rule, storage
//! type, SIMD path and thread count: the table's index space alone decides the state each
//! element uses and the random bits it draws.

use smallbatch_core::driver::Rounding;
use smallbatch_core::rounding::round_bf16_nearest;
use smallbatch_core::rules::adafactor::{adafactor_step, AdafactorBuffers, AdafactorHyper, AdafactorLayout, Beta2};
use smallbatch_core::rules::adam::{adam_step, AdamBuffers, AdamHyper};
use smallbatch_core::rules::muon::{muon_step, MuonBuffers, MuonHyper};
use smallbatch_core::rules::sgd::{sgd_step, SgdBuffers, SgdHyper};
use smallbatch_core::rules::{Params, Storage, TensorAddresses};
use smallbatch_core::{Executor, SegmentTable, SimdPath};

mod common;
use common::Rng;

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn value(&mut self) -> f32 {
        if self.below(13) == 0 {
            return 0.0;
        }
        ((self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0) * 10f32.powi(self.below(5) as i32 - 3)
    }
}

/// A rule's step over the parameters and gradients it is given; returns the bits of the state.
type Step<'a> = dyn Fn(&Executor, Params<'_>, &mut [f64]) -> Vec<u32> + 'a;

/// Element type of the parameters: f32, or bf16 bits.
trait Elem: Copy + Default + PartialEq + std::fmt::Debug {
    fn of(x: f32) -> Self;
}
impl Elem for f32 {
    fn of(x: f32) -> Self {
        x
    }
}
impl Elem for u16 {
    fn of(x: f32) -> Self {
        round_bf16_nearest(x)
    }
}

/// Each tensor copied into an allocation of its own, after a random number of padding elements
/// (so tensors start unaligned and far from their neighbours); returns the allocations and the
/// address of each tensor's element 0 (0 for tensors the step must not read).
fn scatter<T: Elem>(rng: &mut Rng, table: &SegmentTable, flat: &[T], used: &[bool]) -> (Vec<Vec<T>>, Vec<usize>) {
    let mut allocs = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..table.len() {
        let pad = rng.below(9);
        let mut v = vec![T::default(); pad + table.numels()[i]];
        v[pad..].copy_from_slice(&flat[table.range(i)]);
        addrs.push(if used[i] { v.as_ptr() as usize + pad * std::mem::size_of::<T>() } else { 0 });
        allocs.push(v);
    }
    (allocs, addrs)
}

fn gather<T: Elem>(table: &SegmentTable, allocs: &[Vec<T>]) -> Vec<T> {
    (0..table.len()).flat_map(|i| allocs[i][allocs[i].len() - table.numels()[i]..].to_vec()).collect()
}

/// Steps the same tensors flat and scattered (twice each, so second steps read the state the
/// first wrote) and asserts equal parameters, state and step counts.
fn assert_same<T: Elem>(
    rng: &mut Rng,
    exec: &Executor,
    table: &SegmentTable,
    stepped: &[bool],
    storage: Storage,
    step: &Step<'_>,
) where
    for<'a> Params<'a>: From<FlatParams<'a, T>>,
{
    let total = table.total();
    let param: Vec<T> = (0..total).map(|_| T::of(rng.value())).collect();
    let grad: Vec<T> = (0..total).map(|_| T::of(rng.value())).collect();

    let (mut flat_p, mut flat_steps) = (param.clone(), vec![0.0; table.len()]);
    let mut flat_state = Vec::new();
    for _ in 0..2 {
        let params = Params::from(FlatParams { param: &mut flat_p, grad: &grad, storage });
        flat_state = step(exec, params, &mut flat_steps);
    }

    // Tensors that are not stepped get null addresses: they must never be read.
    let (p_allocs, p_addrs) = scatter(rng, table, &param, stepped);
    let (g_allocs, g_addrs) = scatter(rng, table, &grad, stepped);
    let mut steps = vec![0.0; table.len()];
    let mut state = Vec::new();
    for _ in 0..2 {
        // SAFETY: the allocations outlive the step, hold each tensor's elements, and nothing else
        // touches them.
        let params = Params::Tensors(unsafe { TensorAddresses::new(storage, p_addrs.clone(), g_addrs.clone()) });
        state = step(exec, params, &mut steps);
    }
    assert_eq!(gather(table, &p_allocs), flat_p, "{exec:?} {storage:?} numels {:?}", table.numels());
    assert_eq!(state, flat_state, "state, {exec:?} {storage:?}");
    assert_eq!(steps, flat_steps);
    drop(g_allocs);
}

/// Flat parameters of either storage type.
struct FlatParams<'a, T> {
    param: &'a mut [T],
    grad: &'a [T],
    storage: Storage,
}

impl<'a> From<FlatParams<'a, f32>> for Params<'a> {
    fn from(f: FlatParams<'a, f32>) -> Params<'a> {
        Params::F32 { param: f.param, grad: f.grad }
    }
}

impl<'a> From<FlatParams<'a, u16>> for Params<'a> {
    fn from(f: FlatParams<'a, u16>) -> Params<'a> {
        let Storage::Bf16(rounding) = f.storage else { panic!("bf16 parameters need bf16 storage") };
        Params::Bf16 { param: f.param, grad: f.grad, rounding }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn executors() -> Vec<Executor> {
    vec![Executor::new(SimdPath::Scalar, 1).unwrap(), Executor::new(SimdPath::best(), 3).unwrap()]
}

/// Shapes as `[batch, rows, cols]`: empty tensors, single elements, odd sizes, many small ones
/// (more tasks than threads) and a few larger ones (split across threads).
fn random_matrices(rng: &mut Rng) -> Vec<[usize; 3]> {
    let count = 1 + rng.below(40);
    (0..count)
        .map(|_| match rng.below(6) {
            0 => [1, 1, rng.below(2)],
            1 => [1, 1, 1 + rng.below(40)],
            2 => [1 + rng.below(3), 1 + rng.below(20), 1 + rng.below(20)],
            3 => [1, 130 + rng.below(60), 129 + rng.below(70)],
            4 => [1, 1, 16 * 1024 + rng.below(3000)],
            _ => [1, 2 + rng.below(60), 2 + rng.below(60)],
        })
        .collect()
}

fn storages() -> [Storage; 3] {
    [Storage::F32, Storage::Bf16(Rounding::Nearest), Storage::Bf16(Rounding::Stochastic { seed: 11, stream: 2 })]
}

/// Runs `check` for random tables and each storage type and executor.
fn for_cases(seed: u64, cases: usize, check: impl Fn(&mut Rng, &Executor, &SegmentTable, &[bool], Storage)) {
    let mut rng = Rng(seed);
    for _ in 0..cases {
        let table = SegmentTable::with_matrices(&random_matrices(&mut rng)).unwrap();
        let stepped: Vec<bool> = (0..table.len()).map(|_| rng.below(5) != 0).collect();
        for storage in storages() {
            for exec in executors() {
                check(&mut rng, &exec, &table, &stepped, storage);
            }
        }
    }
}

fn run<T: Elem>(
    rng: &mut Rng,
    exec: &Executor,
    table: &SegmentTable,
    stepped: &[bool],
    storage: Storage,
    step: &Step<'_>,
) where
    for<'a> Params<'a>: From<FlatParams<'a, T>>,
{
    assert_same::<T>(rng, exec, table, stepped, storage, step)
}

fn dispatch(rng: &mut Rng, exec: &Executor, table: &SegmentTable, stepped: &[bool], storage: Storage, step: &Step<'_>) {
    match storage {
        Storage::F32 => run::<f32>(rng, exec, table, stepped, storage, step),
        Storage::Bf16(_) => run::<u16>(rng, exec, table, stepped, storage, step),
    }
}

#[test]
fn sgd_tensors_equal_flat() {
    for_cases(0x7ab1_0001, 6, |rng, exec, table, stepped, storage| {
        let hp = SgdHyper { lr: 0.1, momentum: 0.9, dampening: 0.1, weight_decay: 0.01, ..SgdHyper::default() };
        let momentum = std::cell::RefCell::new(vec![0f32; table.total()]);
        let step = |exec: &Executor, params: Params<'_>, steps: &mut [f64]| {
            let mut m = momentum.borrow_mut();
            if steps.iter().all(|&s| s == 0.0) {
                m.iter_mut().for_each(|x| *x = 0.0);
            }
            sgd_step(exec, table, stepped, steps, SgdBuffers { params, momentum: Some(&mut m) }, &hp).unwrap();
            bits(&m)
        };
        dispatch(rng, exec, table, stepped, storage, &step);
    });
}

#[test]
fn adam_tensors_equal_flat() {
    for_cases(0x7ab1_0002, 6, |rng, exec, table, stepped, storage| {
        let hp = AdamHyper { lr: 0.01, weight_decay: 0.1, decoupled_weight_decay: true, ..AdamHyper::default() };
        let state = std::cell::RefCell::new((vec![0f32; table.total()], vec![0f32; table.total()]));
        let step = |exec: &Executor, params: Params<'_>, steps: &mut [f64]| {
            let mut st = state.borrow_mut();
            let (m, v) = &mut *st;
            if steps.iter().all(|&s| s == 0.0) {
                m.iter_mut().chain(v.iter_mut()).for_each(|x| *x = 0.0);
            }
            adam_step(
                exec,
                table,
                stepped,
                steps,
                AdamBuffers { params, exp_avg: m, exp_avg_sq: v, max_exp_avg_sq: None },
                &hp,
            )
            .unwrap();
            [bits(m), bits(v)].concat()
        };
        dispatch(rng, exec, table, stepped, storage, &step);
    });
}

#[test]
fn adafactor_tensors_equal_flat() {
    for_cases(0x7ab1_0003, 4, |rng, exec, table, stepped, storage| {
        let factored: Vec<bool> = (0..table.len()).map(|i| table.matrix(i)[1] >= 2 && table.numels()[i] > 0).collect();
        let layout = AdafactorLayout::new(table, &factored).unwrap();
        for hp in [
            AdafactorHyper::default(),
            AdafactorHyper {
                beta1: 0.9,
                beta2: Beta2::Constant(0.999),
                eps1: Some(1e-30),
                weight_decay: 0.1,
                relative_step: false,
                ..AdafactorHyper::default()
            },
        ] {
            let n = (layout.row_total, layout.col_total, layout.variance_total, table.total());
            let zeros = || (vec![0f32; n.0], vec![0f32; n.1], vec![0f32; n.2], vec![0f32; n.3]);
            let state = std::cell::RefCell::new(zeros());
            let step = |exec: &Executor, params: Params<'_>, steps: &mut [f64]| {
                let mut st = state.borrow_mut();
                if steps.iter().all(|&s| s == 0.0) {
                    *st = zeros();
                }
                let (r, c, v, m) = &mut *st;
                let exp_avg = if hp.beta1 != 0.0 { Some(&mut m[..]) } else { None };
                let bufs = AdafactorBuffers { params, row_var: r, col_var: c, variance: v, exp_avg };
                adafactor_step(exec, table, &layout, stepped, steps, bufs, &hp).unwrap();
                [bits(r), bits(c), bits(v), bits(m)].concat()
            };
            dispatch(rng, exec, table, stepped, storage, &step);
        }
    });
}

#[test]
fn muon_tensors_equal_flat() {
    for_cases(0x7ab1_0004, 2, |rng, exec, table, stepped, storage| {
        // Muon steps matrices only; vectors stand for the tensors it is not given.
        let stepped: Vec<bool> = (0..table.len()).map(|i| stepped[i] && table.matrix(i)[1] >= 2).collect();
        let hp = MuonHyper { lr: 0.02, ..MuonHyper::default() };
        let momentum = std::cell::RefCell::new(vec![0f32; table.total()]);
        let step = |exec: &Executor, params: Params<'_>, steps: &mut [f64]| {
            let mut m = momentum.borrow_mut();
            if steps.iter().all(|&s| s == 0.0) {
                m.iter_mut().for_each(|x| *x = 0.0);
            }
            muon_step(exec, table, &stepped, steps, MuonBuffers { params, momentum: &mut m }, &hp).unwrap();
            bits(&m)
        };
        dispatch(rng, exec, table, &stepped, storage, &step);
    });
}

#[test]
fn bad_addresses_are_errors_and_change_nothing() {
    let exec = Executor::new(SimdPath::Scalar, 1).unwrap();
    let table = SegmentTable::packed(&[4, 3]).unwrap();
    let (mut p0, p1, g) = (vec![1f32; 4], vec![1f32; 3], vec![0.5f32; 4]);
    let (mut m, mut v) = (vec![0f32; 7], vec![0f32; 7]);
    let addr = |x: &[f32]| x.as_ptr() as usize;
    let step = |params: Vec<usize>, grads: Vec<usize>, steps: &mut [f64], m: &mut [f32], v: &mut [f32]| {
        // SAFETY: every non-null address below points at a live buffer of its tensor's size.
        let params = Params::Tensors(unsafe { TensorAddresses::new(Storage::F32, params, grads) });
        adam_step(
            &exec,
            &table,
            &[true, true],
            steps,
            AdamBuffers { params, exp_avg: m, exp_avg_sq: v, max_exp_avg_sq: None },
            &AdamHyper::default(),
        )
    };
    let mut steps = vec![0.0; 2];
    let err = step(vec![addr(&p0), addr(&p1)], vec![addr(&g), 0], &mut steps, &mut m, &mut v).unwrap_err();
    assert_eq!(err.to_string(), "invalid gradient address of tensor 1: null (must be non-null)");
    let err = step(vec![addr(&p0) + 2, addr(&p1)], vec![addr(&g); 2], &mut steps, &mut m, &mut v).unwrap_err();
    assert!(err.to_string().starts_with("invalid parameter address of tensor 0: 0x"), "{err}");
    assert!(err.to_string().ends_with("(must be aligned to its element size)"), "{err}");
    let err = step(vec![addr(&p0)], vec![addr(&g)], &mut steps, &mut m, &mut v).unwrap_err();
    assert_eq!(err.to_string(), "param addresses has 1 elements, expected 2");
    assert_eq!(steps, [0.0, 0.0]);
    assert!(p0.iter().chain(&p1).all(|&x| x == 1.0));

    // A tensor that is not stepped needs no addresses at all.
    let params = Params::Tensors(unsafe {
        TensorAddresses::new(Storage::F32, vec![p0.as_mut_ptr() as usize, 0], vec![addr(&g), 0])
    });
    let bufs = AdamBuffers { params, exp_avg: &mut m, exp_avg_sq: &mut v, max_exp_avg_sq: None };
    adam_step(&exec, &table, &[true, false], &mut steps, bufs, &AdamHyper::default()).unwrap();
    assert_eq!(steps, [1.0, 0.0]);
    assert!(p0.iter().all(|&x| x < 1.0) && p1.iter().all(|&x| x == 1.0));
}

/// A shard of each tensor (some rows of it, as FSDP keeps on one rank), stepped alone with the
/// draw offsets of its elements in the whole group, rounds to the bits the whole group's step
/// gives those elements: SGD and Adam, bf16 with stochastic rounding.
#[test]
fn shards_draw_the_bits_of_the_whole_group() {
    let mut rng = Rng(0x7ab1_0005);
    let rounding = Rounding::Stochastic { seed: 77, stream: 5 };
    for exec in executors() {
        let shapes: Vec<[usize; 2]> = (0..12).map(|_| [1 + rng.below(9), 1 + rng.below(300)]).collect();
        let whole = SegmentTable::packed(&shapes.iter().map(|[r, c]| r * c).collect::<Vec<_>>()).unwrap();
        let total = whole.total();
        let param: Vec<u16> = (0..total).map(|_| round_bf16_nearest(rng.value())).collect();
        let grad: Vec<u16> = (0..total).map(|_| round_bf16_nearest(rng.value())).collect();
        // Rows [r0, r1) of each tensor: this rank's shard.
        let rows: Vec<(usize, usize)> = shapes
            .iter()
            .map(|&[r, _]| {
                let r0 = rng.below(r + 1);
                (r0, r0 + rng.below(r - r0 + 1))
            })
            .collect();
        let local: Vec<usize> = shapes.iter().zip(&rows).map(|(&[_, c], &(r0, r1))| (r1 - r0) * c).collect();
        let draws: Vec<usize> =
            whole.offsets().iter().zip(&shapes).zip(&rows).map(|((&o, &[_, c]), &(r0, _))| o + r0 * c).collect();
        let shard = SegmentTable::packed(&local).unwrap();
        for rule in ["sgd", "adam"] {
            let run = |table: &SegmentTable, params: Params<'_>| -> Vec<f64> {
                let mut steps = vec![3.0; table.len()];
                let stepped = vec![true; table.len()];
                let (mut a, mut b) = (vec![0.1f32; table.total()], vec![0.2f32; table.total()]);
                if rule == "sgd" {
                    let hp = SgdHyper { lr: 0.05, momentum: 0.9, ..SgdHyper::default() };
                    sgd_step(&exec, table, &stepped, &mut steps, SgdBuffers { params, momentum: Some(&mut a) }, &hp)
                        .unwrap();
                } else {
                    let hp = AdamHyper { lr: 0.01, ..AdamHyper::default() };
                    let bufs = AdamBuffers { params, exp_avg: &mut a, exp_avg_sq: &mut b, max_exp_avg_sq: None };
                    adam_step(&exec, table, &stepped, &mut steps, bufs, &hp).unwrap();
                }
                steps
            };
            let mut whole_param = param.clone();
            run(&whole, Params::Bf16 { param: &mut whole_param, grad: &grad, rounding });
            // The shard's rows, each tensor in its own allocation.
            let mut shard_param: Vec<Vec<u16>> = Vec::new();
            let mut shard_grad: Vec<Vec<u16>> = Vec::new();
            for (i, &(r0, r1)) in rows.iter().enumerate() {
                let c = shapes[i][1];
                let range = whole.offsets()[i] + r0 * c..whole.offsets()[i] + r1 * c;
                shard_param.push(param[range.clone()].to_vec());
                shard_grad.push(grad[range].to_vec());
            }
            let addrs = |v: &[Vec<u16>]| v.iter().map(|t| t.as_ptr() as usize).collect::<Vec<_>>();
            // SAFETY: the shard allocations outlive the step and hold each tensor's elements.
            let tensors =
                unsafe { TensorAddresses::new(Storage::Bf16(rounding), addrs(&shard_param), addrs(&shard_grad)) };
            run(&shard, Params::Tensors(tensors.with_draw_offsets(draws.clone())));
            for (i, &(r0, r1)) in rows.iter().enumerate() {
                let c = shapes[i][1];
                let expect = &whole_param[whole.offsets()[i] + r0 * c..whole.offsets()[i] + r1 * c];
                assert_eq!(&shard_param[i][..], expect, "{rule} {exec:?} tensor {i} rows {r0}..{r1}");
            }
        }
    }
}
