//! cuda/muon.cu's deterministic Frobenius norm (muon_sumsq_partial + muon_sumsq_final) and the
//! normalisation that consumes it (muon_normalize).

mod common;

use common::{launch_ok, Rng};
use smallbatch_cuda_emu::Args;

/// Elements per pass-1 block (muon.cu NORM_CHUNK).
const CHUNK: usize = 16384;

/// Neumaier's compensated sum: an f64 reference far more accurate than either kernel pass, so
/// that the kernels' own rounding dominates the comparison.
fn accurate_sum(values: impl Iterator<Item = f64>) -> f64 {
    let (mut sum, mut compensation) = (0.0f64, 0.0f64);
    for v in values {
        let t = sum + v;
        compensation += if sum.abs() >= v.abs() { (sum - t) + v } else { (v - t) + sum };
        sum = t;
    }
    sum + compensation
}

fn sum_of_squares(x: &[f32]) -> f64 {
    accurate_sum(x.iter().map(|&v| v as f64 * v as f64))
}

fn assert_close(got: f64, expected: f64, what: &str) {
    let rel = ((got - expected) / expected).abs();
    assert!(rel <= 1e-12 || got == expected, "{what}: {got:e} vs {expected:e} (relative {rel:e})");
}

/// (partials, sums) of `count` matrices of `n` elements, launched as muon.cu documents.
fn sumsq(x: &[f32], n: usize, count: usize) -> (Vec<f64>, Vec<f64>) {
    let parts = n.div_ceil(CHUNK);
    let mut partials = vec![f64::NAN; count * parts];
    let mut sums = vec![f64::NAN; count];
    let args = Args::new().ptr(x.as_ptr()).push(n as u64).ptr(partials.as_mut_ptr());
    // SAFETY: x holds count * n floats, partials count * parts doubles.
    unsafe { launch_ok("muon_sumsq_partial", (parts as u32, count as u32, 1), (256, 1, 1), args) };
    let args = Args::new().ptr(partials.as_ptr()).push(parts as u64).ptr(sums.as_mut_ptr());
    // SAFETY: count * parts partials in, count sums out.
    unsafe { launch_ok("muon_sumsq_final", (count as u32, 1, 1), (256, 1, 1), args) };
    (partials, sums)
}

fn matrices(n: usize, count: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n * count)
        .map(|_| match rng.below(64) {
            0 => rng.uniform(-1.0, 1.0) * 1e18, // large, so that small terms round away in a plain sum
            1 => rng.uniform(-1.0, 1.0) * 1e-20,
            2 => 0.0,
            _ => rng.uniform(-4.0, 4.0),
        })
        .collect()
}

#[test]
fn sums_of_squares_match_an_independent_f64_sum_and_repeat_exactly() {
    let mut rng = Rng::new(11);
    for (n, count) in [(1, 1), (100, 3), (255, 2), (CHUNK, 2), (CHUNK + 1, 1), (50_000, 2), (3 * CHUNK, 1)] {
        let x = matrices(n, count, &mut rng);
        let (partials, sums) = sumsq(&x, n, count);
        let parts = n.div_ceil(CHUNK);
        for m in 0..count {
            let mat = &x[m * n..(m + 1) * n];
            for c in 0..parts {
                let chunk = &mat[c * CHUNK..((c + 1) * CHUNK).min(n)];
                assert_close(partials[m * parts + c], sum_of_squares(chunk), &format!("n {n}, matrix {m}, chunk {c}"));
            }
            assert_close(sums[m], sum_of_squares(mat), &format!("n {n}, matrix {m}"));
        }
        for _ in 0..2 {
            let (again_partials, again_sums) = sumsq(&x, n, count);
            let bits = |v: &[f64]| v.iter().map(|d| d.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&again_partials), bits(&partials), "n {n}: partials differ between launches");
            assert_eq!(bits(&again_sums), bits(&sums), "n {n}: sums differ between launches");
        }
    }
}

#[test]
fn sums_of_squares_propagate_infinity_and_nan() {
    let n = CHUNK + 10;
    let mut x = vec![0.5f32; 3 * n];
    x[5] = f32::INFINITY;
    x[n + CHUNK + 3] = f32::NAN;
    x[2 * n + 7] = f32::MAX; // its square overflows f32 but not f64
    let (_, sums) = sumsq(&x, n, 3);
    assert_eq!(sums[0], f64::INFINITY);
    assert!(sums[1].is_nan());
    assert_close(sums[2], sum_of_squares(&x[2 * n..]), "f32::MAX");
}

#[test]
fn normalize_divides_by_the_clamped_norm_for_any_grid_width() {
    let mut rng = Rng::new(12);
    let (n, count) = (3000, 3);
    let mut x = matrices(n, count, &mut rng);
    x[2 * n..].iter_mut().for_each(|v| *v *= 1e-30); // a norm below eps: clamped
    let (_, sums) = sumsq(&x, n, count);
    let eps = 1e-7f32;
    let expected: Vec<f32> = x
        .chunks(n)
        .zip(&sums)
        .flat_map(|(mat, &s)| {
            let norm = s.sqrt() as f32;
            let norm = if norm < eps { eps } else { norm };
            mat.iter().map(move |&v| v / norm)
        })
        .collect();
    assert!(sums[2].sqrt() < eps as f64);
    for width in [1u32, 2, 7, n.div_ceil(256) as u32, 40] {
        let mut dst = vec![f32::NAN; n * count];
        let args = Args::new().ptr(x.as_ptr()).ptr(dst.as_mut_ptr()).push(n as u64).ptr(sums.as_ptr()).push(eps);
        // SAFETY: count matrices of n floats in and out, count sums.
        unsafe { launch_ok("muon_normalize", (width, count as u32, 1), (256, 1, 1), args) };
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&dst), bits(&expected), "grid width {width}");
    }
}
