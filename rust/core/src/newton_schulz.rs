//! Muon's Newton-Schulz orthogonalization of a 2-D update, as torch.optim.Muon's
//! `_zeropower_via_newtonschulz`, but in f32 throughout (torch runs it in bf16).
//!
//! This file owns the iteration and its coefficients ([`NewtonSchulz`], validated), the scratch
//! buffers it reuses between calls ([`NewtonSchulzWorkspace`]), and the crate's use of the `gemm`
//! crate: every matrix product goes through one wrapper that checks the operands' extents and runs
//! on the [`Executor`]'s rayon pool.
//!
//! For a row-major `rows x cols` matrix `G`, with `m = min(rows, cols)` and `n = max(rows, cols)`:
//!
//! ```text
//! X = G, or G^T when rows > cols       X is m x n, so the Gram matrix below is the small side
//! X = X / max(||X||_F, eps)            every singular value is now <= 1
//! repeat `steps` times:
//!     A = X X^T                        m x m, symmetric
//!     B = b A + c A A
//!     X = a X + B X                    each singular value s becomes a s + b s^3 + c s^5
//! out = X, or X^T when rows > cols
//! ```
//!
//! With the default coefficients the quintic pushes every singular value of the normalized input
//! that is at least 0.01 into about [0.68, 1.14] after five steps (it does not converge to 1: the
//! coefficients buy a steep slope at 0 at the price of an oscillating band, as in Muon).
//!
//! How it is computed (per step: three matrix products, no allocation):
//! - `X^T` is never formed: the iterate lives in the layout of `g` and `out` (ping-ponging between
//!   `out` and one workspace buffer) and a transposed view is only a change of strides.
//! - `A = X X^T` and `A A = A A^T` are symmetric: only the blocks on and right of the diagonal are
//!   multiplied, then mirrored (up to half the multiplications of those two products).
//! - `B = b A + c A A` is one GEMM call that scales its destination (a copy of `A`) by `b`.
//! - `a X + B X` is computed as `(B + a I) X`, one product with no copy of `X`; it differs from
//!   torch's `addmm(X, B, X, beta=a)` by rounding only (`B_ii + a` is rounded once to f32).
//!
//! # Determinism
//! `gemm` splits a product over rows and columns of its destination, never over the inner
//! dimension, and its blocking depends on the shapes and the CPU's cache sizes, not the thread
//! count; the one reduction done here (the Frobenius norm) sums fixed chunks in a fixed order.
//! So for a given machine and build the result is bit-identical for every thread count. It can
//! differ across CPUs: `gemm` picks its own kernels at run time (AVX2+FMA or scalar on x86, NEON
//! on aarch64), whatever `SMALLBATCH_SIMD` says, and its block depth follows the cache sizes.
//! (Its AVX-512 kernels need its `x86-v4` feature, left off: no faster on an AVX-512 AMD EPYC.)

use crate::driver::Executor;
use crate::error::{check_len, Error, Result};
use gemm::Parallelism;
use rayon::prelude::*;

/// Elements per task of the norm and scaling passes. Fixed, so the norm's partial sums (and
/// therefore its rounding) do not depend on the thread count.
const CHUNK: usize = 16 * 1024;

/// Rows per block of a symmetric product: the Gram matrix `X X^T` and `A A` are computed one block
/// row at a time, right of the diagonal only, then mirrored. Fixed (not derived from the thread
/// count) so that the products, and their rounding, are the same for every thread count.
const SYM_BLOCK: usize = 64;

/// torch.optim.Muon's limit: `_zeropower_via_newtonschulz` rejects 100 steps or more.
pub const MAX_STEPS: usize = 99;

/// Coefficients of the Newton-Schulz quintic `X <- a X + b (X X^T) X + c (X X^T)^2 X`, with
/// torch.optim.Muon's defaults (from Keller Jordan's Muon).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NewtonSchulz {
    /// Number of iterations, at most [`MAX_STEPS`]; 0 only normalizes.
    pub steps: usize,
    /// Linear coefficient.
    pub a: f32,
    /// Cubic coefficient.
    pub b: f32,
    /// Quintic coefficient.
    pub c: f32,
    /// Floor of the Frobenius norm the input is divided by, so a zero input gives a zero output.
    pub eps: f32,
}

impl Default for NewtonSchulz {
    fn default() -> Self {
        NewtonSchulz { steps: 5, a: 3.4445, b: -4.7750, c: 2.0315, eps: 1e-7 }
    }
}

impl NewtonSchulz {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.steps > MAX_STEPS {
            return Err(Error::invalid("steps", self.steps, "<= 99, as in torch.optim.Muon"));
        }
        for (name, value) in [("a", self.a), ("b", self.b), ("c", self.c)] {
            if !value.is_finite() {
                return Err(Error::invalid(name, value, "finite"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::invalid("eps", self.eps, "finite and > 0"));
        }
        Ok(())
    }
}

/// Scratch buffers of [`orthogonalize`], kept between calls so that a training loop allocates
/// only when a matrix is larger than any before it.
#[derive(Debug, Clone, Default)]
pub struct NewtonSchulzWorkspace {
    /// The iterate's second buffer (`out` is the first): `m * n` elements.
    other: Vec<f32>,
    /// `A = X X^T`, `m * m`.
    gram: Vec<f32>,
    /// `B + a I`, `m * m`.
    poly: Vec<f32>,
}

/// Orthogonalizes the row-major `rows x cols` matrix `g` into `out` with a fresh workspace; see
/// the [module docs](self) for the math, and [`NewtonSchulzWorkspace::orthogonalize`] to reuse
/// scratch buffers across calls.
///
/// ```
/// use smallbatch_core::newton_schulz::{orthogonalize, NewtonSchulz};
/// use smallbatch_core::Executor;
///
/// // A diagonal matrix with singular values 3 and 1: both end up near 1.
/// let g = [3.0f32, 0.0, 0.0, 1.0];
/// let mut out = [0.0f32; 4];
/// let exec = Executor::global().unwrap();
/// orthogonalize(exec, &g, 2, 2, &NewtonSchulz::default(), &mut out).unwrap();
/// assert!(out[0] > 0.68 && out[0] < 1.14 && out[3] > 0.68 && out[3] < 1.14);
/// assert_eq!((out[1], out[2]), (0.0, 0.0));
/// ```
pub fn orthogonalize(
    exec: &Executor,
    g: &[f32],
    rows: usize,
    cols: usize,
    params: &NewtonSchulz,
    out: &mut [f32],
) -> Result<()> {
    NewtonSchulzWorkspace::new().orthogonalize(exec, g, rows, cols, params, out)
}

/// Matrices at most this large are orthogonalised side by side, one per thread (a GEMM this small
/// does not split well); larger ones one at a time with a multi-threaded GEMM.
pub(crate) const SMALL_MATRIX: usize = 256 * 256;

/// Orthogonalizes the row-major matrices stored back to back in `g` (`shapes[k]` is the
/// `(rows, cols)` of the `k`-th) into the same places of `out`: small ones side by side, one per
/// thread, large ones one at a time on all of `exec`'s threads. Each result is that of
/// [`orthogonalize`] on its matrix alone, whatever the thread count.
///
/// ```
/// use smallbatch_core::newton_schulz::{orthogonalize, orthogonalize_many, NewtonSchulz};
/// use smallbatch_core::Executor;
///
/// let exec = Executor::global().unwrap();
/// let g = [3.0f32, 0.0, 0.0, 1.0, /* then a 1x3 */ 1.0, 2.0, 2.0];
/// let mut out = [0.0f32; 7];
/// orthogonalize_many(exec, &g, &[(2, 2), (1, 3)], &NewtonSchulz::default(), &mut out).unwrap();
/// let mut second = [0.0f32; 3];
/// orthogonalize(exec, &g[4..], 1, 3, &NewtonSchulz::default(), &mut second).unwrap();
/// assert_eq!(out[4..], second);
/// ```
pub fn orthogonalize_many(
    exec: &Executor,
    g: &[f32],
    shapes: &[(usize, usize)],
    params: &NewtonSchulz,
    out: &mut [f32],
) -> Result<()> {
    params.validate()?;
    let mut starts = Vec::with_capacity(shapes.len() + 1);
    starts.push(0usize);
    for &(r, c) in shapes {
        let n = r.checked_mul(c).ok_or_else(|| Error::invalid("rows * cols", format!("{r} * {c}"), "representable"))?;
        starts.push(starts[starts.len() - 1] + n);
    }
    let total = starts[shapes.len()];
    check_len("g", g.len(), total)?;
    check_len("out", out.len(), total)?;
    let (small, large): (Vec<usize>, Vec<usize>) =
        (0..shapes.len()).partition(|&k| starts[k + 1] - starts[k] <= SMALL_MATRIX);
    let single = Executor::new(crate::simd::SimdPath::Scalar, 1)?;
    let mut rest = &mut out[..];
    let mut pieces: Vec<&mut [f32]> = Vec::with_capacity(shapes.len());
    for k in 0..shapes.len() {
        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(starts[k + 1] - starts[k]);
        pieces.push(piece);
        rest = tail;
    }
    let mut pieces: Vec<Option<&mut [f32]>> = pieces.into_iter().map(Some).collect();
    let mut small_pieces: Vec<(usize, &mut [f32])> =
        small.iter().map(|&k| (k, pieces[k].take().expect("each matrix once"))).collect();
    let errors: Vec<Error> = exec.install(|| {
        small_pieces
            .par_iter_mut()
            .map_init(NewtonSchulzWorkspace::new, |ws, (k, piece)| {
                let (r, c) = shapes[*k];
                ws.orthogonalize(&single, &g[starts[*k]..starts[*k + 1]], r, c, params, piece)
            })
            .filter_map(|r| r.err())
            .collect()
    });
    if let Some(err) = errors.into_iter().next() {
        return Err(err);
    }
    let mut ws = NewtonSchulzWorkspace::new();
    for k in large {
        let (r, c) = shapes[k];
        let piece = pieces[k].take().expect("each matrix once");
        ws.orthogonalize(exec, &g[starts[k]..starts[k + 1]], r, c, params, piece)?;
    }
    Ok(())
}

impl NewtonSchulzWorkspace {
    /// An empty workspace; buffers grow on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// As [`orthogonalize`], reusing this workspace's buffers.
    ///
    /// Errors (and leaves `out` untouched) when a parameter is invalid, `rows` or `cols` is 0, or
    /// `g` or `out` does not hold `rows * cols` elements. Non-finite entries in `g` are not errors:
    /// they propagate to `out`, as in torch.
    pub fn orthogonalize(
        &mut self,
        exec: &Executor,
        g: &[f32],
        rows: usize,
        cols: usize,
        params: &NewtonSchulz,
        out: &mut [f32],
    ) -> Result<()> {
        params.validate()?;
        if rows == 0 {
            return Err(Error::invalid("rows", rows, ">= 1"));
        }
        if cols == 0 {
            return Err(Error::invalid("cols", cols, ">= 1"));
        }
        let total = rows
            .checked_mul(cols)
            .ok_or_else(|| Error::invalid("rows * cols", format!("{rows} * {cols}"), "representable as usize"))?;
        check_len("g", g.len(), total)?;
        check_len("out", out.len(), total)?;

        let transposed = rows > cols;
        let (m, n) = if transposed { (cols, rows) } else { (rows, cols) };
        // The iterate X (m x n) lives in the layout of `g` and `out`, so working on G^T costs no
        // transpose: only its strides change.
        let x_layout = if transposed { Layout::col_major(m, n) } else { Layout::row_major(m, n) };
        // Without steps the input is only normalized into `out`: no scratch needed.
        let (x_len, m_len) = if params.steps > 0 { (total, m * m) } else { (0, 0) };
        grow(&mut self.other, x_len);
        grow(&mut self.gram, m_len);
        grow(&mut self.poly, m_len);
        let threads = exec.threads();
        let par = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
        let ws = self;
        exec.install(move || {
            let other = &mut ws.other[..x_len];
            // Ping-pong between `out` and `other`, starting where the last step lands in `out`.
            let (mut x, mut y): (&mut [f32], &mut [f32]) =
                if params.steps % 2 == 1 { (other, out) } else { (out, other) };
            let norm = frobenius_norm(g, threads > 1) as f32;
            // torch clamps with `clamp(min=eps)`, which keeps a NaN norm NaN (f32::max would not).
            let norm = if norm < params.eps { params.eps } else { norm };
            divide_into(x, g, norm, threads > 1);
            let gram = &mut ws.gram[..m_len];
            let poly = &mut ws.poly[..m_len];
            for _ in 0..params.steps {
                step(par, params, x, y, x_layout, gram, poly);
                std::mem::swap(&mut x, &mut y);
            }
        });
        Ok(())
    }
}

/// One iteration: `y = a x + (b A + c A A) x` with `A = x x^T`.
fn step(par: Parallelism, p: &NewtonSchulz, x: &[f32], y: &mut [f32], xl: Layout, gram: &mut [f32], poly: &mut [f32]) {
    let m = xl.rows;
    let sym = Layout::row_major(m, m);
    // A = X X^T
    sym_product(par, gram, false, 0.0, 1.0, x, xl);
    // B = b A + c A A, where A A = A A^T because A is symmetric.
    poly.copy_from_slice(gram);
    sym_product(par, poly, true, p.b, p.c, gram, sym);
    // a X + B X = (B + a I) X: one product, and no copy of X.
    for i in 0..m {
        poly[i * m + i] += p.a;
    }
    matmul(par, y, xl, false, 0.0, 1.0, poly, sym, x, xl);
}

/// `dst = alpha * dst + beta * L L^T` for an `m x k` matrix `L`, into the row-major `m x m`
/// `dst`; `dst` is read only when `read_dst`, and must be symmetric then.
///
/// The result is symmetric, so only the blocks on and right of the diagonal are computed, one
/// block row of [`SYM_BLOCK`] rows per product, and the rest is mirrored: this saves up to half
/// the multiplications of `X X^T` and `A A`. Block rows are independent, so with several threads
/// they run in parallel (each product may split further), which balances their unequal widths.
fn sym_product(par: Parallelism, dst: &mut [f32], read_dst: bool, alpha: f32, beta: f32, lhs: &[f32], l: Layout) {
    let m = l.rows;
    // Rows r0..r1 of L times (rows r0..m of L)^T into dst[r0..r1, r0..m]; `rows` is dst[r0..r1, ..].
    let block_row = |(b, rows): (usize, &mut [f32])| {
        let r0 = b * SYM_BLOCK;
        let r1 = (r0 + SYM_BLOCK).min(m);
        let dst_block = Layout { rows: r1 - r0, cols: m - r0, rs: m as isize, cs: 1 };
        let src = &lhs[l.offset(r0, 0)..];
        let (block_lhs, block_rhs) = (l.sub_rows(r0, r1), l.sub_rows(r0, m).t());
        matmul(par, &mut rows[r0..], dst_block, read_dst, alpha, beta, src, block_lhs, src, block_rhs);
    };
    match par {
        Parallelism::None => dst.chunks_mut(SYM_BLOCK * m).enumerate().for_each(block_row),
        _ => dst.par_chunks_mut(SYM_BLOCK * m).enumerate().for_each(block_row),
    }
    mirror_upper(dst, m);
}

/// Copies the strict upper triangle of the row-major `m x m` `a` onto its lower one, in tiles so
/// that the column-wise reads stay in cache.
fn mirror_upper(a: &mut [f32], m: usize) {
    const TILE: usize = 32;
    for i0 in (0..m).step_by(TILE) {
        for j0 in (0..=i0).step_by(TILE) {
            for i in i0..(i0 + TILE).min(m) {
                for j in j0..(j0 + TILE).min(i) {
                    a[i * m + j] = a[j * m + i];
                }
            }
        }
    }
}

/// A strided view's shape: element `(i, j)` is at `i * rs + j * cs`.
#[derive(Debug, Clone, Copy)]
struct Layout {
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

impl Layout {
    fn row_major(rows: usize, cols: usize) -> Layout {
        Layout { rows, cols, rs: cols as isize, cs: 1 }
    }

    fn col_major(rows: usize, cols: usize) -> Layout {
        Layout { rows, cols, rs: 1, cs: rows as isize }
    }

    /// The transposed view of the same elements.
    fn t(self) -> Layout {
        Layout { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    /// Rows `r0..r1`, as a view starting at element `offset(r0, 0)`.
    fn sub_rows(self, r0: usize, r1: usize) -> Layout {
        Layout { rows: r1 - r0, ..self }
    }

    /// Offset of element `(i, j)`; strides here are never negative.
    fn offset(self, i: usize, j: usize) -> usize {
        i * self.rs as usize + j * self.cs as usize
    }

    /// Elements a buffer needs to hold every element of the view (`rows, cols >= 1`).
    fn extent(self) -> usize {
        self.offset(self.rows - 1, self.cols - 1) + 1
    }
}

/// `dst = alpha * dst + beta * lhs rhs` through `gemm` (`dst` read only when `read_dst`).
///
/// Panics if a view does not fit its buffer or the shapes disagree: the callers above derive both
/// from validated dimensions, so that would be a bug here, never bad input.
#[allow(clippy::too_many_arguments)]
fn matmul(
    par: Parallelism,
    dst: &mut [f32],
    d: Layout,
    read_dst: bool,
    alpha: f32,
    beta: f32,
    lhs: &[f32],
    l: Layout,
    rhs: &[f32],
    r: Layout,
) {
    assert!(l.rows == d.rows && r.cols == d.cols && l.cols == r.rows);
    assert!(d.rows > 0 && d.cols > 0 && l.cols > 0);
    assert!(d.extent() <= dst.len() && l.extent() <= lhs.len() && r.extent() <= rhs.len());
    // SAFETY: the asserts keep every element gemm reads or writes inside its slice; `dst` is a
    // unique borrow, so it overlaps neither operand.
    unsafe {
        gemm::gemm(
            d.rows,
            d.cols,
            l.cols,
            dst.as_mut_ptr(),
            d.cs,
            d.rs,
            read_dst,
            lhs.as_ptr(),
            l.cs,
            l.rs,
            rhs.as_ptr(),
            r.cs,
            r.rs,
            alpha,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// `||g||_F` summed in f64 per fixed chunk, chunks added in order.
fn frobenius_norm(g: &[f32], parallel: bool) -> f64 {
    let partials: Vec<f64> = if parallel && g.len() > CHUNK {
        g.par_chunks(CHUNK).map(sum_squares).collect()
    } else {
        g.chunks(CHUNK).map(sum_squares).collect()
    };
    partials.iter().sum::<f64>().sqrt()
}

/// Sum of squares in f64, in eight independent lanes so the loop vectorizes.
fn sum_squares(v: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut whole = v.chunks_exact(8);
    for c in &mut whole {
        for (acc, &x) in lanes.iter_mut().zip(c) {
            *acc += f64::from(x) * f64::from(x);
        }
    }
    let tail: f64 = whole.remainder().iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    lanes.iter().sum::<f64>() + tail
}

/// `dst = src / norm`, dividing as torch's `div_` does (not multiplying by a reciprocal).
fn divide_into(dst: &mut [f32], src: &[f32], norm: f32, parallel: bool) {
    let f = |(d, s): (&mut [f32], &[f32])| {
        for (d, &s) in d.iter_mut().zip(s) {
            *d = s / norm;
        }
    };
    if parallel && src.len() > CHUNK {
        dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(f);
    } else {
        dst.chunks_mut(CHUNK).zip(src.chunks(CHUNK)).for_each(f);
    }
}

fn grow(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
}
