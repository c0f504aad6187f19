//! fp32 -> bf16 rounding: round to nearest even, stochastic rounding with the counter-based bits
//! of [`crate::philox`], the exact widening back, and their slice versions on an [`Executor`].
//!
//! bf16 is the upper half of an f32 (sign, 8 exponent bits, 7 mantissa bits); values are passed
//! around as their raw `u16` bits, so nothing here needs a half-precision type.
//!
//! # Stochastic rounding
//!
//! With `bits` the f32's bit pattern and `r16` a draw uniform in `[0, 2^16)`:
//!
//! ```text
//! bf16 = (bits + r16) >> 16            (u32 arithmetic)
//! ```
//!
//! The low 16 bits `f` are the distance above the bf16 value `bits >> 16` (truncation toward zero)
//! in units of 2^-16 of its gap to the next one away from zero. Adding `r16` carries into bit 16
//! exactly when `r16 >= 2^16 - f`, which has probability `f / 2^16`, so the expected result is `x`
//! itself: rounding is unbiased, in magnitude and hence for either sign, for normal and subnormal
//! values alike, and across binade boundaries (the carry turns an all-ones mantissa into the next
//! exponent, which is the next bf16 value). Consequences, each pinned by a test:
//!
//! - values that already are bf16 (`f == 0`), including +-0, are returned unchanged for every draw;
//! - +-Inf stay +-Inf (their low bits are zero);
//! - finite values above the largest bf16, `(2 - 2^-7) * 2^127`, round up to +-Inf with
//!   probability `f / 2^16`: that is what stochastic rounding means there, and the expectation is
//!   then no longer `x`;
//! - NaN would not survive the add (a NaN whose payload sits in the low bits could carry into the
//!   exponent and become Inf or a different class), so it is tested for and returned as
//!   `(bits >> 16) | 0x0040`: sign and high payload kept, quiet bit set.
//!
//! The slice functions draw `r16` for element `i` as `philox::random_u16(seed, step, stream, i)`
//! (see [`crate::philox`]), so the output depends only on the inputs and never on the SIMD path,
//! the thread count or the chunking — and equals what the CUDA kernels compute.

use crate::driver::Executor;
use crate::error::{Error, Result};
use crate::philox::fill_random_u16;
use crate::rules::SyncPtr;
use crate::simd::SimdPath;

/// bf16 bits of the sign-and-payload-preserving quiet NaN for an f32 NaN: the top bit of bf16's
/// mantissa, as in IEEE 754's recommended quiet-NaN encoding.
const BF16_QUIET_BIT: u16 = 0x0040;

/// Random draws generated per batch inside a chunk: 1 KiB of `u16`, produced and consumed while
/// it sits in L1, so the bits never travel to memory.
const DRAWS_PER_BATCH: usize = 512;

/// Widens bf16 bits to the f32 with the same value (exact; NaN payloads are kept).
///
/// ```
/// use smallbatch_core::rounding::bf16_to_f32;
/// assert_eq!(bf16_to_f32(0x3F80), 1.0);
/// assert_eq!(bf16_to_f32(0xC040), -3.0);
/// ```
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Whether f32 bits are a NaN: exponent all ones and a non-zero mantissa.
#[inline(always)]
fn is_nan_bits(bits: u32) -> bool {
    bits & 0x7FFF_FFFF > 0x7F80_0000
}

/// The quiet bf16 NaN for a NaN's f32 bits: `(bits >> 16) | 0x0040`.
#[inline(always)]
fn quiet_nan(bits: u32) -> u16 {
    ((bits >> 16) as u16) | BF16_QUIET_BIT
}

/// Rounds `x` to bf16 stochastically with the 16 random bits `r16`: `(bits + r16) >> 16` (see the
/// [module docs](self) for why this is unbiased and what happens at the edges).
///
/// ```
/// use smallbatch_core::rounding::{bf16_to_f32, round_bf16_stochastic};
/// // 1 + 2^-9 lies a quarter of the way from 1.0 to the next bf16, 1 + 2^-7: it rounds up
/// // for the quarter of the draws that are >= 0xC000.
/// let x = 1.0 + 2f32.powi(-9);
/// assert_eq!(bf16_to_f32(round_bf16_stochastic(x, 0xBFFF)), 1.0);
/// assert_eq!(bf16_to_f32(round_bf16_stochastic(x, 0xC000)), 1.0 + 2f32.powi(-7));
/// ```
#[inline(always)]
pub fn round_bf16_stochastic(x: f32, r16: u16) -> u16 {
    let bits = x.to_bits();
    if is_nan_bits(bits) {
        quiet_nan(bits)
    } else {
        // Cannot wrap: the largest non-NaN pattern is -Inf, 0xFF80_0000, and r16 < 2^16.
        (bits.wrapping_add(u32::from(r16)) >> 16) as u16
    }
}

/// Rounds `x` to the nearest bf16, ties to even (IEEE 754's default, and what torch's
/// `.to(torch.bfloat16)` does). Finite values at or beyond the midpoint between the largest bf16
/// and 2^128 become +-Inf; NaN is quieted as in [`round_bf16_stochastic`].
///
/// ```text
/// bf16 = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
/// ```
///
/// Below a tie the low half is at most 0x7FFF and nothing carries; above it, it carries; at a tie
/// (low half exactly 0x8000) it carries only when the kept half is odd, rounding to the even one.
#[inline(always)]
pub fn round_bf16_nearest(x: f32) -> u16 {
    let bits = x.to_bits();
    if is_nan_bits(bits) {
        quiet_nan(bits)
    } else {
        let odd = (bits >> 16) & 1;
        (bits.wrapping_add(0x7FFF + odd) >> 16) as u16
    }
}

/// Stochastically rounds `src` to bf16 bits in `dst`, element `i` with the draw
/// `random_u16(seed, step, stream, i)` of [`crate::philox`].
///
/// Work is split with [`Executor::for_each_chunk`]; since every element's bits come from its own
/// index, the output is the same for every thread count and SIMD path. Use a different `stream`
/// for each buffer rounded at the same `step` with the same `seed`.
///
/// ```
/// use smallbatch_core::{philox::random_u16, rounding::*, Executor};
/// let src = [1.0f32, 0.1, -3.3, f32::INFINITY];
/// let mut dst = [0u16; 4];
/// stochastic_round_slice(Executor::global().unwrap(), &src, &mut dst, 7, 1, 0).unwrap();
/// for i in 0..4 {
///     assert_eq!(dst[i], round_bf16_stochastic(src[i], random_u16(7, 1, 0, i as u64)));
/// }
/// ```
///
/// # Errors
/// [`Error::Length`] if `dst` and `src` differ in length.
pub fn stochastic_round_slice(
    exec: &Executor,
    src: &[f32],
    dst: &mut [u16],
    seed: u64,
    step: u64,
    stream: u32,
) -> Result<()> {
    check_same_len(src, dst)?;
    let path = exec.path();
    let out = SyncPtr::new(dst);
    exec.for_each_chunk(src.len(), |start, end| {
        // SAFETY: `for_each_chunk` hands out disjoint ranges inside `0..src.len()`, which is
        // `dst.len()`, and `dst` stays mutably borrowed by this call until every chunk is done.
        let dst = unsafe { out.range(start, end) };
        let src = &src[start..end];
        let first = start as u64;
        match path {
            // SAFETY: an executor's path was checked to be supported by this CPU when it was built.
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512 => unsafe { sr_avx512(src, dst, seed, step, stream, first) },
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 => unsafe { sr_avx2(src, dst, seed, step, stream, first) },
            _ => sr_lanes(src, dst, seed, step, stream, first),
        }
    });
    Ok(())
}

/// Rounds `src` to the nearest bf16 (ties to even) into `dst`, as [`round_bf16_nearest`] does
/// per element, split over the executor's threads like [`stochastic_round_slice`].
///
/// ```
/// use smallbatch_core::{rounding::round_nearest_slice, Executor};
/// // 1 + 2^-8 is halfway between the bf16 values 1 and 1 + 2^-7: the tie goes to the even one, 1.
/// let src = [1.0f32, 1.0 + 2f32.powi(-8), -0.0];
/// let mut dst = [0u16; 3];
/// round_nearest_slice(Executor::global().unwrap(), &src, &mut dst).unwrap();
/// assert_eq!(dst, [0x3F80, 0x3F80, 0x8000]);
/// ```
///
/// # Errors
/// [`Error::Length`] if `dst` and `src` differ in length.
pub fn round_nearest_slice(exec: &Executor, src: &[f32], dst: &mut [u16]) -> Result<()> {
    check_same_len(src, dst)?;
    let path = exec.path();
    let out = SyncPtr::new(dst);
    exec.for_each_chunk(src.len(), |start, end| {
        // SAFETY: as in `stochastic_round_slice`: disjoint in-bounds ranges of a borrowed `dst`.
        let dst = unsafe { out.range(start, end) };
        let src = &src[start..end];
        match path {
            // SAFETY: an executor's path was checked to be supported by this CPU when it was built.
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512 => unsafe { rn_avx512(src, dst) },
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 => unsafe { rn_avx2(src, dst) },
            _ => rn_lanes(src, dst),
        }
    });
    Ok(())
}

fn check_same_len(src: &[f32], dst: &[u16]) -> Result<()> {
    if src.len() == dst.len() {
        Ok(())
    } else {
        Err(Error::Length { name: "dst".to_string(), expected: src.len(), got: dst.len() })
    }
}

/// Stochastic rounding of one chunk whose first element has global index `first`: draws for a
/// batch of elements into an L1-resident stack buffer, then rounds the batch. Inlined into each
/// per-path wrapper so both the generator and the rounding loop use that path's vector width.
#[inline(always)]
fn sr_lanes(src: &[f32], dst: &mut [u16], seed: u64, step: u64, stream: u32, first: u64) {
    let mut draws = [0u16; DRAWS_PER_BATCH];
    let batches = src.chunks(DRAWS_PER_BATCH).zip(dst.chunks_mut(DRAWS_PER_BATCH));
    for (k, (src, dst)) in batches.enumerate() {
        let draws = &mut draws[..src.len()];
        let index = first.wrapping_add((k * DRAWS_PER_BATCH) as u64);
        fill_random_u16(seed, step, stream, index, draws);
        for ((d, &x), &r) in dst.iter_mut().zip(src).zip(draws.iter()) {
            *d = round_bf16_stochastic(x, r);
        }
    }
}

/// Round-to-nearest of one chunk.
#[inline(always)]
fn rn_lanes(src: &[f32], dst: &mut [u16]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = round_bf16_nearest(x);
    }
}

/// [`sr_lanes`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sr_avx2(src: &[f32], dst: &mut [u16], seed: u64, step: u64, stream: u32, first: u64) {
    sr_lanes(src, dst, seed, step, stream, first)
}

/// [`sr_lanes`] compiled for AVX-512F.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sr_avx512(src: &[f32], dst: &mut [u16], seed: u64, step: u64, stream: u32, first: u64) {
    sr_lanes(src, dst, seed, step, stream, first)
}

/// [`rn_lanes`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rn_avx2(src: &[f32], dst: &mut [u16]) {
    rn_lanes(src, dst)
}

/// [`rn_lanes`] compiled for AVX-512F.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rn_avx512(src: &[f32], dst: &mut [u16]) {
    rn_lanes(src, dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stochastic_formula_at_the_edges() {
        // +-0 and +-Inf for the extreme draws.
        for r in [0u16, 1, 0x8000, 0xFFFF] {
            assert_eq!(round_bf16_stochastic(0.0, r), 0x0000);
            assert_eq!(round_bf16_stochastic(-0.0, r), 0x8000);
            assert_eq!(round_bf16_stochastic(f32::INFINITY, r), 0x7F80);
            assert_eq!(round_bf16_stochastic(f32::NEG_INFINITY, r), 0xFF80);
        }
        // The largest finite f32 rounds to the largest bf16 or overflows to Inf.
        assert_eq!(round_bf16_stochastic(f32::MAX, 0), 0x7F7F);
        assert_eq!(round_bf16_stochastic(f32::MAX, 1), 0x7F80);
        assert_eq!(round_bf16_stochastic(-f32::MAX, 1), 0xFF80);
        // The smallest subnormal rounds to 0 or to the smallest bf16 subnormal.
        let tiny = f32::from_bits(1);
        assert_eq!(round_bf16_stochastic(tiny, 0xFFFE), 0x0000);
        assert_eq!(round_bf16_stochastic(tiny, 0xFFFF), 0x0001);
        // A NaN whose payload sits only in the low half would carry into Inf without the check.
        assert_eq!(round_bf16_stochastic(f32::from_bits(0x7F80_FFFF), 1), 0x7FC0);
    }

    #[test]
    fn nearest_formula_at_the_edges() {
        let one_ulp = 2f32.powi(-7);
        assert_eq!(round_bf16_nearest(1.0 + one_ulp / 2.0), 0x3F80); // tie, down to even
        assert_eq!(round_bf16_nearest(1.0 + 1.5 * one_ulp), 0x3F82); // tie, up to even
        assert_eq!(round_bf16_nearest(f32::MAX), 0x7F80); // past the overflow midpoint
        assert_eq!(round_bf16_nearest(-0.0), 0x8000);
        assert_eq!(round_bf16_nearest(f32::from_bits(0xFF80_0001)), 0xFFC0);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let exec = Executor::new(SimdPath::Scalar, 1).unwrap();
        let err = stochastic_round_slice(&exec, &[1.0; 3], &mut [0; 2], 0, 0, 0).unwrap_err();
        assert_eq!(err, Error::Length { name: "dst".into(), expected: 3, got: 2 });
        let err = round_nearest_slice(&exec, &[1.0; 3], &mut [0; 4]).unwrap_err();
        assert_eq!(err.to_string(), "dst has 4 elements, expected 3");
    }
}
