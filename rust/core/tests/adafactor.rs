//! Adafactor: every SIMD path and thread count gives the scalar reference's bits (f32 and bf16
//! parameters, factored and unfactored tensors, momentum, both eps conventions, tensors spread
//! over several cache groups), and the results follow the rule's formula, computed here
//! independently in f64.

use smallbatch_core::driver::Rounding;
use smallbatch_core::rules::adafactor::{adafactor_step, AdafactorBuffers, AdafactorHyper, AdafactorLayout, Beta2};
use smallbatch_core::rules::Params;
use smallbatch_core::{Executor, SegmentTable, SimdPath};

mod common;
use common::Rng;

impl Rng {
    /// Uniform in [-1, 1), scaled by 10^e for e in -3..=0, with exact zeros sprinkled in.
    fn value(&mut self) -> f32 {
        if self.next().is_multiple_of(19) {
            return 0.0;
        }
        let m = (self.next() % 2_000_000) as f32 / 1_000_000.0 - 1.0;
        m * 10f32.powi(-((self.next() % 4) as i32))
    }
}

/// Matrices of odd widths (vector tails on every path), a batched tensor, a vector, an empty
/// tensor and, in `large`, four matrices that fill more than one 8 MiB cache group.
fn shapes(large: bool) -> Vec<[usize; 3]> {
    let mut s = vec![[1, 37, 23], [3, 9, 130], [1, 1, 77], [1, 0, 5], [1, 129, 1], [2, 64, 64]];
    if large {
        s.extend([[1, 700, 700], [1, 650, 701], [1, 699, 640], [1, 512, 513]]);
    }
    s
}

#[derive(Clone)]
struct Run {
    param: Vec<f32>,
    exp_avg: Vec<f32>,
    row: Vec<f32>,
    col: Vec<f32>,
    var: Vec<f32>,
    steps: Vec<f64>,
}

/// Three steps of Adafactor on f32 (or, with `rounding`, bf16) parameters; the parameters come
/// back as f32.
fn run(exec: &Executor, table: &SegmentTable, factored: &[bool], hp: &AdafactorHyper, bf16: Option<Rounding>) -> Run {
    let layout = AdafactorLayout::new(table, factored).unwrap();
    let n = table.total();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let param0: Vec<f32> = (0..n).map(|_| rng.value()).collect();
    let mut out = Run {
        param: param0.clone(),
        exp_avg: vec![0.0; n],
        row: vec![0.0; layout.row_total],
        col: vec![0.0; layout.col_total],
        var: vec![0.0; layout.variance_total],
        steps: vec![0.0; table.len()],
    };
    let to_bf16 = |v: &[f32]| v.iter().map(|x| (x.to_bits() >> 16) as u16).collect::<Vec<u16>>();
    let mut param16 = to_bf16(&param0);
    let stepped = vec![true; table.len()];
    for step in 0..3 {
        let mut grad: Vec<f32> = (0..n).map(|_| rng.value() * (1 + step) as f32).collect();
        zero_some_rows(table, &mut grad);
        let grad16 = to_bf16(&grad);
        let params = match bf16 {
            None => Params::F32 { param: &mut out.param, grad: &grad },
            Some(rounding) => Params::Bf16 { param: &mut param16, grad: &grad16, rounding },
        };
        let bufs = AdafactorBuffers {
            params,
            row_var: &mut out.row,
            col_var: &mut out.col,
            variance: &mut out.var,
            exp_avg: if hp.beta1 > 0.0 { Some(&mut out.exp_avg) } else { None },
        };
        adafactor_step(exec, table, &layout, &stepped, &mut out.steps, bufs, hp).unwrap();
    }
    if bf16.is_some() {
        out.param = param16.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
    }
    out
}

/// Zeroes every fourth row of every matrix (as a token embedding's rows are at batch size 1):
/// factored tensors skip such rows, which must not change a bit.
fn zero_some_rows(table: &SegmentTable, grad: &mut [f32]) {
    for i in 0..table.len() {
        let [batch, rows, cols] = table.matrix(i);
        for row in (1..batch * rows).step_by(4) {
            let start = table.offsets()[i] + row * cols;
            grad[start..start + cols].fill(0.0);
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn hypers() -> Vec<AdafactorHyper> {
    vec![
        // torch's defaults: decay schedule, clamps, relative step, step cap.
        AdafactorHyper::default(),
        // The paper's form with momentum, weight decay and a constant beta2.
        AdafactorHyper {
            lr: 3e-3,
            beta1: 0.9,
            beta2: Beta2::Constant(0.99),
            eps1: Some(1e-30),
            relative_step: false,
            cap_lr_at_inv_sqrt_step: false,
            weight_decay: 0.1,
            ..AdafactorHyper::default()
        },
        AdafactorHyper { maximize: true, clip_threshold: 2.0, ..AdafactorHyper::default() },
    ]
}

#[test]
fn paths_and_threads_agree() {
    let reference = Executor::new(SimdPath::Scalar, 1).unwrap();
    for large in [false, true] {
        let table = SegmentTable::with_matrices(&shapes(large)).unwrap();
        // Factor the tensors whose smaller dim is at least 2 except the first: both kinds mixed.
        let factored: Vec<bool> =
            (0..table.len()).map(|i| i > 0 && table.matrix(i)[1].min(table.matrix(i)[2]) >= 2).collect();
        for hp in hypers() {
            for storage in [None, Some(Rounding::Nearest), Some(Rounding::Stochastic { seed: 7, stream: 3 })] {
                let want = run(&reference, &table, &factored, &hp, storage);
                for path in SimdPath::supported() {
                    for threads in [1, 3] {
                        let exec = Executor::new(path, threads).unwrap();
                        let got = run(&exec, &table, &factored, &hp, storage);
                        let what = format!("{path:?} x{threads}, large {large}, {storage:?}, {hp:?}");
                        assert_eq!(bits(&got.param), bits(&want.param), "param: {what}");
                        assert_eq!(bits(&got.exp_avg), bits(&want.exp_avg), "exp_avg: {what}");
                        assert_eq!(bits(&got.row), bits(&want.row), "row_var: {what}");
                        assert_eq!(bits(&got.col), bits(&want.col), "col_var: {what}");
                        assert_eq!(bits(&got.var), bits(&want.var), "variance: {what}");
                        assert_eq!(got.steps, want.steps);
                    }
                }
            }
        }
    }
}

/// The rule in f64, straight from the module docs (torch's eps handling when `eps1` is None).
fn formula(table: &SegmentTable, factored: &[bool], hp: &AdafactorHyper) -> Vec<f64> {
    let n = table.total();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut param: Vec<f64> = (0..n).map(|_| rng.value() as f64).collect();
    let mut m = vec![0.0f64; n];
    let mut r_ema: Vec<Vec<f64>> = vec![Vec::new(); table.len()];
    let mut c_ema: Vec<Vec<f64>> = vec![Vec::new(); table.len()];
    let mut v_ema: Vec<Vec<f64>> = vec![Vec::new(); table.len()];
    let (add, clamp) = match hp.eps1 {
        Some(e) => (e, 0.0),
        None => (0.0, f32::EPSILON as f64),
    };
    let sign = if hp.maximize { -1.0 } else { 1.0 };
    for step in 0..3u64 {
        let mut grad32: Vec<f32> = (0..n).map(|_| rng.value() * (1 + step) as f32).collect();
        zero_some_rows(table, &mut grad32);
        let grad: Vec<f64> = grad32.iter().map(|&x| x as f64).collect();
        let t = step + 1;
        let w = 1.0 - hp.beta2_at(t);
        for i in 0..table.len() {
            let [batch, rows, cols] = table.matrix(i);
            let off = table.offsets()[i];
            let numel = table.numels()[i];
            if numel == 0 {
                continue;
            }
            let g: Vec<f64> = grad[off..off + numel].iter().map(|x| sign * x).collect();
            let mut u = vec![0.0f64; numel];
            if factored[i] {
                let (re, ce) = (&mut r_ema[i], &mut c_ema[i]);
                re.resize(batch * rows, 0.0);
                ce.resize(batch * cols, 0.0);
                for b in 0..batch {
                    let at = |r: usize, c: usize| b * rows * cols + r * cols + c;
                    for r in 0..rows {
                        let mean = (0..cols).map(|c| g[at(r, c)].powi(2)).sum::<f64>() / cols as f64 + add;
                        re[b * rows + r] += w * (mean - re[b * rows + r]);
                    }
                    for c in 0..cols {
                        let mean = (0..rows).map(|r| g[at(r, c)].powi(2)).sum::<f64>() / rows as f64 + add;
                        ce[b * cols + c] += w * (mean - ce[b * cols + c]);
                    }
                    let row_mean = (re[b * rows..(b + 1) * rows].iter().sum::<f64>() / rows as f64).max(clamp);
                    for r in 0..rows {
                        for c in 0..cols {
                            let v = (re[b * rows + r] * ce[b * cols + c] / row_mean).max(clamp * clamp);
                            u[at(r, c)] = g[at(r, c)] / v.sqrt();
                        }
                    }
                }
            } else {
                let ve = &mut v_ema[i];
                ve.resize(numel, 0.0);
                for k in 0..numel {
                    ve[k] += w * (g[k] * g[k] + add - ve[k]);
                    u[k] = g[k] / ve[k].max(clamp * clamp).sqrt();
                }
            }
            let rms = |x: &[f64]| (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64).sqrt();
            let clip = 1.0f64.max(rms(&u) / hp.clip_threshold);
            let rho = if hp.cap_lr_at_inv_sqrt_step { hp.lr.min(1.0 / (t as f64).sqrt()) } else { hp.lr };
            let alpha = if hp.relative_step { hp.eps2.max(rms(&param[off..off + numel])) * rho } else { rho };
            for k in 0..numel {
                let p = &mut param[off + k];
                let upd = if hp.beta1 > 0.0 {
                    let mk = &mut m[off + k];
                    *mk = hp.beta1 * *mk + (1.0 - hp.beta1) * u[k] / clip;
                    *mk
                } else {
                    u[k] / clip
                };
                *p = *p * (1.0 - hp.lr * hp.weight_decay) - alpha * upd;
            }
        }
    }
    param
}

#[test]
fn follows_the_formula() {
    let table = SegmentTable::with_matrices(&shapes(false)).unwrap();
    let factored: Vec<bool> =
        (0..table.len()).map(|i| i > 0 && table.matrix(i)[1].min(table.matrix(i)[2]) >= 2).collect();
    let exec = Executor::global().unwrap();
    for hp in hypers() {
        let got = run(exec, &table, &factored, &hp, None);
        let want = formula(&table, &factored, &hp);
        for (k, (g, w)) in got.param.iter().zip(&want).enumerate() {
            let tol = 2e-6 + 1e-5 * w.abs();
            assert!((*g as f64 - w).abs() <= tol, "element {k}: {g} vs {w} ({hp:?})");
        }
    }
}
