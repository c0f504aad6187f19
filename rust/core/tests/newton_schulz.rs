//! Newton-Schulz orthogonalization against a naive f64 reference, on shapes that cover both
//! orientations, vectors, a scalar and the symmetric products' block boundaries; what the
//! iteration does to singular values; edge cases; argument checks; thread-count determinism.

use smallbatch_core::newton_schulz::{orthogonalize, NewtonSchulz, NewtonSchulzWorkspace, MAX_STEPS};
use smallbatch_core::{Error, Executor, SimdPath};

mod common;
use common::Rng;

impl Rng {
    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    fn matrix(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }
}

fn exec(threads: usize) -> Executor {
    Executor::new(SimdPath::Scalar, threads).unwrap()
}

fn run(exec: &Executor, g: &[f32], rows: usize, cols: usize, p: &NewtonSchulz) -> Vec<f32> {
    let mut out = vec![f32::NAN; rows * cols];
    orthogonalize(exec, g, rows, cols, p, &mut out).unwrap();
    out
}

/// Row-major f64 matrix product of `a` (m x k) and `b` (k x n).
fn mul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..k {
            let aip = a[i * k + p];
            for j in 0..n {
                c[i * n + j] += aip * b[p * n + j];
            }
        }
    }
    c
}

fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

/// The iteration as written in torch's `_zeropower_via_newtonschulz`, in f64, nothing clever.
fn reference(g: &[f32], rows: usize, cols: usize, p: &NewtonSchulz) -> Vec<f64> {
    let g: Vec<f64> = g.iter().map(|&v| f64::from(v)).collect();
    let transposed = rows > cols;
    let (m, n) = if transposed { (cols, rows) } else { (rows, cols) };
    let mut x = if transposed { transpose(&g, rows, cols) } else { g };
    let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let norm = norm.max(f64::from(p.eps));
    x.iter_mut().for_each(|v| *v /= norm);
    let (a, b, c) = (f64::from(p.a), f64::from(p.b), f64::from(p.c));
    for _ in 0..p.steps {
        let gram = mul(&x, &transpose(&x, m, n), m, n, m);
        let gram2 = mul(&gram, &gram, m, m, m);
        let poly: Vec<f64> = gram.iter().zip(&gram2).map(|(g, g2)| b * g + c * g2).collect();
        let px = mul(&poly, &x, m, m, n);
        x = x.iter().zip(&px).map(|(x, px)| a * x + px).collect();
    }
    if transposed {
        transpose(&x, m, n)
    } else {
        x
    }
}

/// Largest elementwise error relative to the reference's largest magnitude.
fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |s, v| s.max(v.abs()));
    got.iter().zip(want).map(|(&g, &w)| (f64::from(g) - w).abs() / scale).fold(0.0, f64::max)
}

/// Eigenvalues of a symmetric f64 matrix by cyclic Jacobi rotations.
fn sym_eigenvalues(mut a: Vec<f64>, n: usize) -> Vec<f64> {
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
            }
        }
    }
    (0..n).map(|i| a[i * n + i]).collect()
}

/// Singular values of a row-major f32 matrix, from the eigenvalues of its small Gram matrix.
fn singular_values(x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let x: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let (small, gram) = if rows <= cols {
        (rows, mul(&x, &transpose(&x, rows, cols), rows, cols, rows))
    } else {
        (cols, mul(&transpose(&x, rows, cols), &x, cols, rows, cols))
    };
    let mut s: Vec<f64> = sym_eigenvalues(gram, small).into_iter().map(|l| l.max(0.0).sqrt()).collect();
    s.sort_by(f64::total_cmp);
    s
}

const SHAPES: [(usize, usize); 14] = [
    (1, 1),
    (1, 7),
    (7, 1),
    (3, 5),
    (5, 3),
    (17, 17),
    (64, 64),
    (65, 130),
    (130, 65),
    (96, 200),
    (200, 96),
    (300, 40),
    (40, 300),
    (129, 129),
];

#[test]
fn matches_f64_reference_on_many_shapes() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let p = NewtonSchulz::default();
    for threads in [1, 2] {
        let exec = exec(threads);
        for &(rows, cols) in &SHAPES {
            let g = rng.matrix(rows * cols, 0.02);
            let got = run(&exec, &g, rows, cols, &p);
            let want = reference(&g, rows, cols, &p);
            let err = max_rel_err(&got, &want);
            assert!(err < 1e-4, "{rows}x{cols}, {threads} threads: max relative error {err:e}");
        }
    }
}

#[test]
fn matches_reference_for_other_coefficients_and_step_counts() {
    let mut rng = Rng(7);
    let exec = exec(2);
    let (rows, cols) = (33, 70);
    let g = rng.matrix(rows * cols, 3.0);
    for p in [
        NewtonSchulz { steps: 0, ..NewtonSchulz::default() },
        NewtonSchulz { steps: 1, ..NewtonSchulz::default() },
        // The classic cubic Newton-Schulz (a, b, c) = (1.5, -0.5, 0), which converges to 1.
        NewtonSchulz { steps: 12, a: 1.5, b: -0.5, c: 0.0, eps: 1e-7 },
    ] {
        let err = max_rel_err(&run(&exec, &g, rows, cols, &p), &reference(&g, rows, cols, &p));
        assert!(err < 1e-4, "{p:?}: max relative error {err:e}");
    }
}

#[test]
fn singular_values_land_in_the_quintic_band() {
    // Gaussian matrices with aspect ratio 4 are well conditioned: every singular value of the
    // normalized input is >= 0.05, and five steps of the quintic map [0.01, 1] into
    // [0.6818, 1.1344] (checked on the scalar map; see the module docs).
    let mut rng = Rng(42);
    let exec = exec(2);
    for (rows, cols) in [(48, 192), (192, 48)] {
        let g = rng.matrix(rows * cols, 1.0);
        let input = singular_values(&g, rows, cols);
        let fro = input.iter().map(|s| s * s).sum::<f64>().sqrt();
        assert!(input[0] / fro > 0.01, "test input is not well conditioned");
        let s = singular_values(&run(&exec, &g, rows, cols, &NewtonSchulz::default()), rows, cols);
        assert_eq!(s.len(), 48);
        assert!(s[0] > 0.68 && s[47] < 1.135, "{rows}x{cols}: singular values in [{}, {}]", s[0], s[47]);
    }
}

#[test]
fn converges_to_the_orthogonal_factor_with_the_cubic() {
    // With the cubic (1.5, -0.5, 0) the iteration converges to U V^T: X X^T -> I.
    let mut rng = Rng(3);
    let exec = exec(2);
    let (rows, cols) = (24, 80);
    let g = rng.matrix(rows * cols, 1.0);
    let p = NewtonSchulz { steps: 40, a: 1.5, b: -0.5, c: 0.0, eps: 1e-7 };
    let x: Vec<f64> = run(&exec, &g, rows, cols, &p).iter().map(|&v| f64::from(v)).collect();
    let xxt = mul(&x, &transpose(&x, rows, cols), rows, cols, rows);
    for i in 0..rows {
        for j in 0..rows {
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((xxt[i * rows + j] - want).abs() < 1e-5, "(X X^T)[{i}][{j}] = {}", xxt[i * rows + j]);
        }
    }
}

#[test]
fn zero_matrix_gives_zero_without_nan() {
    for threads in [1, 2] {
        let exec = exec(threads);
        for &(rows, cols) in &SHAPES {
            let out = run(&exec, &vec![0.0; rows * cols], rows, cols, &NewtonSchulz::default());
            assert!(out.iter().all(|&v| v == 0.0), "{rows}x{cols}");
        }
    }
}

#[test]
fn tiny_input_is_divided_by_eps() {
    // A norm below eps is clamped to eps, as torch's clamp(min=eps).
    let exec = exec(1);
    let p = NewtonSchulz { steps: 0, ..NewtonSchulz::default() };
    let out = run(&exec, &[1e-9, 0.0], 1, 2, &p);
    assert_eq!(out, [1e-9f32 / 1e-7f32, 0.0]);
}

#[test]
fn nan_input_propagates() {
    let exec = exec(1);
    let mut g = vec![0.5f32; 12];
    g[5] = f32::NAN;
    let out = run(&exec, &g, 3, 4, &NewtonSchulz::default());
    assert!(out.iter().all(|v| v.is_nan()));
}

fn err_of(rows: usize, cols: usize, g_len: usize, out_len: usize, p: &NewtonSchulz) -> Error {
    let g = vec![1.0f32; g_len];
    let mut out = vec![-1.0f32; out_len];
    let err = orthogonalize(&exec(1), &g, rows, cols, p, &mut out).unwrap_err();
    assert!(out.iter().all(|&v| v == -1.0), "out written on error");
    err
}

#[test]
fn rejects_bad_shapes_and_lengths() {
    let p = NewtonSchulz::default();
    let cases = [
        (0, 3, 0, 0, "invalid rows: 0 (must be >= 1)"),
        (3, 0, 0, 0, "invalid cols: 0 (must be >= 1)"),
        (2, 3, 5, 6, "g has 5 elements, expected 6"),
        (2, 3, 6, 7, "out has 7 elements, expected 6"),
        (usize::MAX, 2, 1, 1, "invalid rows * cols: 18446744073709551615 * 2 (must be representable as usize)"),
    ];
    for (rows, cols, g_len, out_len, message) in cases {
        if message.contains("18446744073709551615") && usize::BITS != 64 {
            continue;
        }
        assert_eq!(err_of(rows, cols, g_len, out_len, &p).to_string(), message);
    }
}

#[test]
fn rejects_bad_params() {
    let d = NewtonSchulz::default();
    let cases = [
        (NewtonSchulz { steps: 100, ..d }, "invalid steps: 100 (must be <= 99, as in torch.optim.Muon)"),
        (NewtonSchulz { a: f32::NAN, ..d }, "invalid a: NaN (must be finite)"),
        (NewtonSchulz { b: f32::INFINITY, ..d }, "invalid b: inf (must be finite)"),
        (NewtonSchulz { c: f32::NEG_INFINITY, ..d }, "invalid c: -inf (must be finite)"),
        (NewtonSchulz { eps: 0.0, ..d }, "invalid eps: 0 (must be finite and > 0)"),
        (NewtonSchulz { eps: -1.0, ..d }, "invalid eps: -1 (must be finite and > 0)"),
        (NewtonSchulz { eps: f32::NAN, ..d }, "invalid eps: NaN (must be finite and > 0)"),
    ];
    for (p, message) in cases {
        assert_eq!(p.validate().unwrap_err().to_string(), message);
        assert_eq!(err_of(2, 3, 6, 6, &p).to_string(), message);
    }
    let max = NewtonSchulz { steps: MAX_STEPS, ..d };
    assert!(max.validate().is_ok());
}

#[test]
fn thread_counts_agree_bitwise() {
    // Large enough for gemm to split each product over threads (its threshold is 48*48*256
    // multiply-adds), in both orientations and across the symmetric products' block boundaries.
    let mut rng = Rng(11);
    let execs: Vec<Executor> = [1, 2, 3, 4].into_iter().map(exec).collect();
    for (rows, cols) in [(7, 5), (64, 64), (200, 330), (330, 200), (257, 257)] {
        let g = rng.matrix(rows * cols, 0.1);
        let base = run(&execs[0], &g, rows, cols, &NewtonSchulz::default());
        for e in &execs[1..] {
            let out = run(e, &g, rows, cols, &NewtonSchulz::default());
            let same = base.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{rows}x{cols}: {} threads differ from 1", e.threads());
        }
    }
}

#[test]
fn workspace_reuse_matches_fresh_calls() {
    // Growing, shrinking and changing orientation between calls must not leak stale scratch.
    let mut rng = Rng(5);
    let exec = exec(2);
    let mut ws = NewtonSchulzWorkspace::new();
    for (rows, cols) in [(40, 90), (3, 5), (90, 40), (130, 65), (1, 1), (40, 90)] {
        let g = rng.matrix(rows * cols, 1.0);
        let fresh = run(&exec, &g, rows, cols, &NewtonSchulz::default());
        let mut out = vec![0.0; rows * cols];
        ws.orthogonalize(&exec, &g, rows, cols, &NewtonSchulz::default(), &mut out).unwrap();
        assert_eq!(
            fresh.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{rows}x{cols}"
        );
    }
}
