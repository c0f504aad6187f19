//! Every SIMD path equals the scalar reference bit for bit, and the thread count never changes a
//! result: on random lengths (0, 1, odd tails), unaligned starts, mixed step counts and every
//! branch of each rule.

use smallbatch_core::driver::Rounding;
use smallbatch_core::rounding::round_bf16_nearest;
use smallbatch_core::rules::adam::{adam_step, AdamBuffers, AdamHyper};
use smallbatch_core::rules::sgd::{sgd_step, SgdBuffers, SgdHyper};
use smallbatch_core::rules::Params;
use smallbatch_core::{Executor, SegmentTable, SimdPath};

mod common;
use common::Rng;

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Normal-ish values spanning several orders of magnitude, with exact zeros sprinkled in.
    fn value(&mut self) -> f32 {
        if self.below(17) == 0 {
            return 0.0;
        }
        let mantissa = (self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0;
        let exponent = self.below(7) as i32 - 4;
        mantissa * 10f32.powi(exponent)
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }
}

/// Segment sizes that exercise empty tensors, single elements and tails of every width.
fn random_numels(rng: &mut Rng) -> Vec<usize> {
    let count = 1 + rng.below(6);
    (0..count)
        .map(|_| match rng.below(5) {
            0 => 0,
            1 => 1,
            2 => 1 + rng.below(40),
            3 => 16 * 1024 + rng.below(100),
            _ => rng.below(5000),
        })
        .collect()
}

fn executors() -> Vec<Executor> {
    let mut out = Vec::new();
    for path in SimdPath::supported() {
        out.push(Executor::new(path, 1).unwrap());
        out.push(Executor::new(path, 3).unwrap());
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[derive(Clone)]
struct Case {
    numels: Vec<usize>,
    /// Elements of padding before the buffers' first element, to start them unaligned.
    skew: usize,
    stepped: Vec<bool>,
    steps: Vec<f64>,
    param: Vec<f32>,
    grad: Vec<f32>,
    state_a: Vec<f32>,
    state_b: Vec<f32>,
}

impl Case {
    fn random(rng: &mut Rng) -> Case {
        let numels = random_numels(rng);
        let total: usize = numels.iter().sum();
        let skew = rng.below(16);
        let n = numels.len();
        Case {
            stepped: (0..n).map(|_| rng.below(4) != 0).collect(),
            steps: (0..n).map(|_| [0.0, 0.0, 1.0, 7.0][rng.below(4)]).collect(),
            param: rng.vec(total + skew),
            grad: rng.vec(total + skew),
            // second moments must be non-negative
            state_a: rng.vec(total + skew),
            state_b: rng.vec(total + skew).iter().map(|x| x.abs()).collect(),
            numels,
            skew,
        }
    }
}

/// The bits of the parameters, first and second moments and amsgrad's maximum, and the step counts.
type AdamOutcome = (Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>, Vec<f64>);

fn run_adam(exec: &Executor, case: &Case, hp: &AdamHyper) -> AdamOutcome {
    let mut c = case.clone();
    let table = SegmentTable::packed(&c.numels).unwrap();
    let s = c.skew;
    // amsgrad's running maximum: some above the second moment, some below.
    let mut v_max: Vec<f32> =
        c.state_b.iter().enumerate().map(|(i, x)| if i % 3 == 0 { x * 2.0 } else { x * 0.5 }).collect();
    let bufs = AdamBuffers {
        params: Params::F32 { param: &mut c.param[s..], grad: &c.grad[s..] },
        exp_avg: &mut c.state_a[s..],
        exp_avg_sq: &mut c.state_b[s..],
        max_exp_avg_sq: if hp.amsgrad { Some(&mut v_max[s..]) } else { None },
    };
    adam_step(exec, &table, &c.stepped, &mut c.steps, bufs, hp).unwrap();
    (bits(&c.param), bits(&c.state_a), bits(&c.state_b), bits(&v_max), c.steps)
}

fn run_sgd(exec: &Executor, case: &Case, hp: &SgdHyper) -> (Vec<u32>, Vec<u32>, Vec<f64>) {
    let mut c = case.clone();
    let table = SegmentTable::packed(&c.numels).unwrap();
    let s = c.skew;
    let bufs = SgdBuffers {
        params: Params::F32 { param: &mut c.param[s..], grad: &c.grad[s..] },
        momentum: if hp.momentum != 0.0 { Some(&mut c.state_a[s..]) } else { None },
    };
    sgd_step(exec, &table, &c.stepped, &mut c.steps, bufs, hp).unwrap();
    (bits(&c.param), bits(&c.state_a), c.steps)
}

#[test]
fn adam_paths_and_threads_agree() {
    let scalar = Executor::new(SimdPath::Scalar, 1).unwrap();
    let mut rng = Rng(0x5eed_0001);
    let hypers = [
        AdamHyper::default(),
        AdamHyper { lr: 0.01, weight_decay: 0.1, decoupled_weight_decay: true, ..AdamHyper::default() },
        AdamHyper { weight_decay: 0.05, maximize: true, ..AdamHyper::default() },
        // 1 - beta1 >= 0.5 takes torch's other lerp formulation.
        AdamHyper { beta1: 0.3, beta2: 0.5, eps: 0.0, ..AdamHyper::default() },
        AdamHyper { lr: 0.01, weight_decay: 0.1, decoupled_weight_decay: true, amsgrad: true, ..AdamHyper::default() },
    ];
    for _ in 0..40 {
        let case = Case::random(&mut rng);
        for hp in &hypers {
            let reference = run_adam(&scalar, &case, hp);
            for exec in executors() {
                assert_eq!(run_adam(&exec, &case, hp), reference, "{exec:?} {hp:?} numels {:?}", case.numels);
            }
        }
    }
}

#[test]
fn sgd_paths_and_threads_agree() {
    let scalar = Executor::new(SimdPath::Scalar, 1).unwrap();
    let mut rng = Rng(0x5eed_0002);
    let hypers = [
        SgdHyper { lr: 0.1, ..SgdHyper::default() },
        SgdHyper { lr: 0.1, momentum: 0.9, dampening: 0.1, weight_decay: 0.01, ..SgdHyper::default() },
        SgdHyper { lr: 0.05, momentum: 0.9, nesterov: true, maximize: true, ..SgdHyper::default() },
    ];
    for _ in 0..40 {
        let case = Case::random(&mut rng);
        for hp in &hypers {
            let reference = run_sgd(&scalar, &case, hp);
            for exec in executors() {
                assert_eq!(run_sgd(&exec, &case, hp), reference, "{exec:?} {hp:?} numels {:?}", case.numels);
            }
        }
    }
}

/// The scalar reference against the rule's formulas written out independently in f64.
#[test]
fn adam_matches_formula() {
    let exec = Executor::new(SimdPath::Scalar, 1).unwrap();
    let hp = AdamHyper { lr: 0.01, beta1: 0.8, beta2: 0.95, eps: 1e-6, weight_decay: 0.1, ..AdamHyper::default() };
    let table = SegmentTable::packed(&[3]).unwrap();
    let (mut p, g) = (vec![0.5f32, -1.0, 2.0], vec![0.1f32, -0.2, 0.0]);
    let (mut m, mut v) = (vec![0.01f32, 0.0, -0.3], vec![0.02f32, 0.0, 0.1]);
    let mut steps = vec![2.0];
    let (p0, m0, v0) = (p.clone(), m.clone(), v.clone());
    let bufs = AdamBuffers {
        params: Params::F32 { param: &mut p, grad: &g },
        exp_avg: &mut m,
        exp_avg_sq: &mut v,
        max_exp_avg_sq: None,
    };
    adam_step(&exec, &table, &[true], &mut steps, bufs, &hp).unwrap();
    for i in 0..3 {
        let (pi, gi) = (p0[i] as f64, g[i] as f64 + hp.weight_decay * p0[i] as f64);
        let mi = 0.8 * m0[i] as f64 + 0.2 * gi;
        let vi = 0.95 * v0[i] as f64 + 0.05 * gi * gi;
        let (bc1, bc2) = (1.0 - 0.8f64.powi(3), 1.0 - 0.95f64.powi(3));
        let expect = pi - hp.lr / bc1 * mi / ((vi / bc2).sqrt() + hp.eps);
        assert!((p[i] as f64 - expect).abs() < 1e-6 * expect.abs().max(1.0), "{i}: {} vs {expect}", p[i]);
        assert!((m[i] as f64 - mi).abs() < 1e-6 && (v[i] as f64 - vi).abs() < 1e-6);
    }
    assert_eq!(steps, [3.0]);
}

/// amsgrad divides by the running maximum of the second moment, which it keeps.
#[test]
fn adam_amsgrad_matches_formula() {
    let exec = Executor::new(SimdPath::best(), 1).unwrap();
    let hp = AdamHyper { lr: 0.01, beta1: 0.8, beta2: 0.95, eps: 1e-6, amsgrad: true, ..AdamHyper::default() };
    let table = SegmentTable::packed(&[2]).unwrap();
    let (mut p, g) = (vec![0.5f32, -1.0], vec![0.1f32, -0.2]);
    let (mut m, mut v, mut v_max) = (vec![0.0f32; 2], vec![0.02f32, 0.5], vec![0.5f32, 0.01]);
    let mut steps = vec![2.0];
    let p0 = p.clone();
    let bufs = AdamBuffers {
        params: Params::F32 { param: &mut p, grad: &g },
        exp_avg: &mut m,
        exp_avg_sq: &mut v,
        max_exp_avg_sq: Some(&mut v_max),
    };
    adam_step(&exec, &table, &[true], &mut steps, bufs, &hp).unwrap();
    let (bc1, bc2) = (1.0 - 0.8f64.powi(3), 1.0 - 0.95f64.powi(3));
    for i in 0..2 {
        let vi: f64 = [0.95 * 0.02 + 0.05 * 0.01, 0.95 * 0.5 + 0.05 * 0.04][i];
        let v_max_i = vi.max([0.5, 0.01][i]);
        assert!((v_max[i] as f64 - v_max_i).abs() < 1e-7, "{i}: {} vs {v_max_i}", v_max[i]);
        let mi = 0.2 * g[i] as f64;
        let expect = p0[i] as f64 - hp.lr / bc1 * mi / ((v_max_i / bc2).sqrt() + hp.eps);
        assert!((p[i] as f64 - expect).abs() < 1e-6, "{i}: {} vs {expect}", p[i]);
    }
    let bufs = AdamBuffers {
        params: Params::F32 { param: &mut p, grad: &g },
        exp_avg: &mut m,
        exp_avg_sq: &mut v,
        max_exp_avg_sq: None,
    };
    let err = adam_step(&exec, &table, &[true], &mut steps, bufs, &hp).unwrap_err();
    assert_eq!(err.to_string(), "invalid max_exp_avg_sq: missing (must be given with amsgrad)");
}

#[test]
fn sgd_without_momentum_needs_no_state_and_first_step_copies_gradient() {
    let exec = Executor::new(SimdPath::best(), 1).unwrap();
    let table = SegmentTable::packed(&[2]).unwrap();
    let mut p = vec![1.0f32, 2.0];
    let g = vec![0.5f32, -0.5];
    let mut steps = vec![0.0];
    let hp = SgdHyper { lr: 0.1, ..SgdHyper::default() };
    let bufs = SgdBuffers { params: Params::F32 { param: &mut p, grad: &g }, momentum: None };
    sgd_step(&exec, &table, &[true], &mut steps, bufs, &hp).unwrap();
    assert_eq!(p, [1.0 - 0.1 * 0.5, 2.0 + 0.1 * 0.5]);

    let mut buf = vec![123.0f32; 2];
    let hp = SgdHyper { lr: 0.1, momentum: 0.9, dampening: 0.5, ..SgdHyper::default() };
    let mut steps = vec![0.0];
    let bufs = SgdBuffers { params: Params::F32 { param: &mut p, grad: &g }, momentum: Some(&mut buf) };
    sgd_step(&exec, &table, &[true], &mut steps, bufs, &hp).unwrap();
    assert_eq!(buf, g, "first step: buffer = gradient, no dampening");
}

#[test]
fn bad_buffers_and_hyperparameters_are_errors() {
    let exec = Executor::new(SimdPath::Scalar, 1).unwrap();
    let table = SegmentTable::packed(&[4]).unwrap();
    let (mut p, g, mut m, mut v) = (vec![0f32; 4], vec![0f32; 3], vec![0f32; 4], vec![0f32; 4]);
    let bufs = AdamBuffers {
        params: Params::F32 { param: &mut p, grad: &g },
        exp_avg: &mut m,
        exp_avg_sq: &mut v,
        max_exp_avg_sq: None,
    };
    let err = adam_step(&exec, &table, &[true], &mut [0.0], bufs, &AdamHyper::default()).unwrap_err();
    assert_eq!(err.to_string(), "grad has 3 elements, expected 4");

    let g = vec![0f32; 4];
    for (hp, msg) in [
        (AdamHyper { lr: -1.0, ..AdamHyper::default() }, "invalid lr: -1 (must be finite and >= 0)"),
        (AdamHyper { beta1: 1.0, ..AdamHyper::default() }, "invalid beta1: 1 (must be in [0, 1))"),
        (AdamHyper { beta2: f64::NAN, ..AdamHyper::default() }, "invalid beta2: NaN (must be in [0, 1))"),
        (AdamHyper { eps: -1e-8, ..AdamHyper::default() }, "invalid eps: -0.00000001 (must be finite and >= 0)"),
    ] {
        let bufs = AdamBuffers {
            params: Params::F32 { param: &mut p, grad: &g },
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            max_exp_avg_sq: None,
        };
        assert_eq!(adam_step(&exec, &table, &[true], &mut [0.0], bufs, &hp).unwrap_err().to_string(), msg);
    }
    let hp = SgdHyper { momentum: 0.9, ..SgdHyper::default() };
    let bufs = SgdBuffers { params: Params::F32 { param: &mut p, grad: &g }, momentum: None };
    let err = sgd_step(&exec, &table, &[true], &mut [0.0], bufs, &hp).unwrap_err();
    assert_eq!(err.to_string(), "invalid momentum_buffer: missing (must be given when momentum != 0)");
    let hp = SgdHyper { nesterov: true, ..SgdHyper::default() };
    let bufs = SgdBuffers { params: Params::F32 { param: &mut p, grad: &g }, momentum: None };
    let err = sgd_step(&exec, &table, &[true], &mut [0.0], bufs, &hp).unwrap_err();
    assert!(err.to_string().starts_with("invalid nesterov"), "{err}");
}

fn run_adam_bf16(exec: &Executor, case: &Case, hp: &AdamHyper, rounding: Rounding) -> (Vec<u16>, Vec<u32>, Vec<u32>) {
    let mut c = case.clone();
    let table = SegmentTable::packed(&c.numels).unwrap();
    let s = c.skew;
    let mut param: Vec<u16> = c.param.iter().map(|&x| round_bf16_nearest(x)).collect();
    let grad: Vec<u16> = c.grad.iter().map(|&x| round_bf16_nearest(x)).collect();
    let bufs = AdamBuffers {
        params: Params::Bf16 { param: &mut param[s..], grad: &grad[s..], rounding },
        exp_avg: &mut c.state_a[s..],
        exp_avg_sq: &mut c.state_b[s..],
        max_exp_avg_sq: None,
    };
    adam_step(exec, &table, &c.stepped, &mut c.steps, bufs, hp).unwrap();
    (param, bits(&c.state_a), bits(&c.state_b))
}

#[test]
fn bf16_params_paths_and_threads_agree() {
    let scalar = Executor::new(SimdPath::Scalar, 1).unwrap();
    let mut rng = Rng(0x5eed_0003);
    let hp = AdamHyper { lr: 0.01, weight_decay: 0.1, decoupled_weight_decay: true, ..AdamHyper::default() };
    for _ in 0..30 {
        let case = Case::random(&mut rng);
        for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 42, stream: 3 }] {
            let reference = run_adam_bf16(&scalar, &case, &hp, rounding);
            for exec in executors() {
                assert_eq!(run_adam_bf16(&exec, &case, &hp, rounding), reference, "{exec:?} {rounding:?}");
            }
        }
    }
}
