//! x86-64 vector types. Their methods are only ever inlined into functions compiled with the
//! matching `#[target_feature]` (see `driver`), after the CPU was checked for the feature.

use super::F32Lanes;
use std::arch::x86_64::*;

/// Eight `f32` lanes in an AVX2 register.
#[derive(Clone, Copy)]
pub struct Avx2(__m256);

/// Sixteen `f32` lanes in an AVX-512 register.
#[derive(Clone, Copy)]
pub struct Avx512(__m512);

impl F32Lanes for Avx2 {
    const WIDTH: usize = 8;

    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        Avx2(_mm256_loadu_ps(ptr))
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        _mm256_storeu_ps(ptr, self.0)
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Avx2(unsafe { _mm256_set1_ps(x) })
    }
    #[inline(always)]
    fn add(self, rhs: Self) -> Self {
        Avx2(unsafe { _mm256_add_ps(self.0, rhs.0) })
    }
    #[inline(always)]
    fn sub(self, rhs: Self) -> Self {
        Avx2(unsafe { _mm256_sub_ps(self.0, rhs.0) })
    }
    #[inline(always)]
    fn mul(self, rhs: Self) -> Self {
        Avx2(unsafe { _mm256_mul_ps(self.0, rhs.0) })
    }
    #[inline(always)]
    fn div(self, rhs: Self) -> Self {
        Avx2(unsafe { _mm256_div_ps(self.0, rhs.0) })
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        Avx2(unsafe { _mm256_sqrt_ps(self.0) })
    }
    #[inline(always)]
    fn neg(self) -> Self {
        Avx2(unsafe { _mm256_xor_ps(self.0, _mm256_set1_ps(-0.0)) })
    }
    #[inline(always)]
    unsafe fn load_bf16(ptr: *const u16) -> Self {
        Avx2(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
            ptr as *const __m128i,
        )))))
    }
    #[inline(always)]
    unsafe fn store_bf16_stochastic(self, ptr: *mut u16, rand: *const u16) {
        let r = _mm256_cvtepu16_epi32(_mm_loadu_si128(rand as *const __m128i));
        store_avx2_u16(ptr, bf16_bits_avx2(self.0, r));
    }
    #[inline(always)]
    unsafe fn store_bf16_nearest(self, ptr: *mut u16) {
        let bits = _mm256_castps_si256(self.0);
        // round to nearest even: add 0x7FFF plus the lowest kept bit
        let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
        store_avx2_u16(ptr, bf16_bits_avx2(self.0, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))));
    }
    #[inline(always)]
    fn max(self, rhs: Self) -> Self {
        // MAXPS returns its second operand when either is NaN: `rhs`, as `f32::max` does for a
        // NaN `self`.
        Avx2(unsafe { _mm256_max_ps(self.0, rhs.0) })
    }

    #[inline(always)]
    fn min(self, rhs: Self) -> Self {
        // MINPS returns its second operand when either is NaN, like MAXPS.
        Avx2(unsafe { _mm256_min_ps(self.0, rhs.0) })
    }

    /// Lanes 0..4 and 4..8.
    type Acc8 = (__m256d, __m256d);
    #[inline(always)]
    fn acc8_zero() -> Self::Acc8 {
        unsafe { (_mm256_setzero_pd(), _mm256_setzero_pd()) }
    }
    #[inline(always)]
    fn acc8_add_sq(acc: Self::Acc8, x: Self, lane0: usize) -> Self::Acc8 {
        debug_assert_eq!(lane0, 0);
        unsafe {
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x.0));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x.0));
            (_mm256_add_pd(acc.0, _mm256_mul_pd(lo, lo)), _mm256_add_pd(acc.1, _mm256_mul_pd(hi, hi)))
        }
    }
    #[inline(always)]
    fn acc8_to_array(acc: Self::Acc8) -> [f64; 8] {
        let mut out = [0.0; 8];
        unsafe {
            _mm256_storeu_pd(out.as_mut_ptr(), acc.0);
            _mm256_storeu_pd(out.as_mut_ptr().add(4), acc.1);
        }
        out
    }
    #[inline(always)]
    fn acc8_from_array(lanes: [f64; 8]) -> Self::Acc8 {
        unsafe { (_mm256_loadu_pd(lanes.as_ptr()), _mm256_loadu_pd(lanes.as_ptr().add(4))) }
    }
    #[inline(always)]
    unsafe fn add_sq_to_f64(self, ptr: *mut f64) {
        let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(self.0));
        let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(self.0));
        _mm256_storeu_pd(ptr, _mm256_add_pd(_mm256_loadu_pd(ptr), _mm256_mul_pd(lo, lo)));
        _mm256_storeu_pd(ptr.add(4), _mm256_add_pd(_mm256_loadu_pd(ptr.add(4)), _mm256_mul_pd(hi, hi)));
    }
}

/// `(bits + r) >> 16`, except NaN which keeps its top bits with the quiet bit set.
#[inline(always)]
unsafe fn bf16_bits_avx2(x: __m256, r: __m256i) -> __m256i {
    let bits = _mm256_castps_si256(x);
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, r));
    let abs = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFF_FFFF));
    // abs < 2^31, so the signed compare is an unsigned one
    let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F80_0000));
    let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x0040));
    _mm256_blendv_epi8(rounded, quiet, nan)
}

/// Stores eight u32 lanes holding values below 2^16 as eight u16.
#[inline(always)]
unsafe fn store_avx2_u16(ptr: *mut u16, v: __m256i) {
    let packed = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    _mm_storeu_si128(ptr as *mut __m128i, packed);
}

impl F32Lanes for Avx512 {
    const WIDTH: usize = 16;

    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        Avx512(_mm512_loadu_ps(ptr))
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        _mm512_storeu_ps(ptr, self.0)
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Avx512(unsafe { _mm512_set1_ps(x) })
    }
    #[inline(always)]
    fn add(self, rhs: Self) -> Self {
        Avx512(unsafe { _mm512_add_ps(self.0, rhs.0) })
    }
    #[inline(always)]
    fn sub(self, rhs: Self) -> Self {
        Avx512(unsafe { _mm512_sub_ps(self.0, rhs.0) })
    }
    #[inline(always)]
    fn mul(self, rhs: Self) -> Self {
        Avx512(unsafe { _mm512_mul_ps(self.0, rhs.0) })
    }
    #[inline(always)]
    fn div(self, rhs: Self) -> Self {
        Avx512(unsafe { _mm512_div_ps(self.0, rhs.0) })
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        Avx512(unsafe { _mm512_sqrt_ps(self.0) })
    }
    #[inline(always)]
    fn neg(self) -> Self {
        // AVX-512F has no float xor (that is AVX-512DQ): flip the sign bit through the integer view.
        Avx512(unsafe {
            _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(self.0), _mm512_set1_epi32(i32::MIN)))
        })
    }
    #[inline(always)]
    unsafe fn load_bf16(ptr: *const u16) -> Self {
        Avx512(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
            ptr as *const __m256i,
        )))))
    }
    #[inline(always)]
    unsafe fn store_bf16_stochastic(self, ptr: *mut u16, rand: *const u16) {
        let r = _mm512_cvtepu16_epi32(_mm256_loadu_si256(rand as *const __m256i));
        _mm256_storeu_si256(ptr as *mut __m256i, _mm512_cvtepi32_epi16(bf16_bits_avx512(self.0, r)));
    }
    #[inline(always)]
    unsafe fn store_bf16_nearest(self, ptr: *mut u16) {
        let bits = _mm512_castps_si512(self.0);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let r = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
        _mm256_storeu_si256(ptr as *mut __m256i, _mm512_cvtepi32_epi16(bf16_bits_avx512(self.0, r)));
    }
    #[inline(always)]
    fn max(self, rhs: Self) -> Self {
        // VMAXPS returns its second operand when either is NaN (see Avx2::max).
        Avx512(unsafe { _mm512_max_ps(self.0, rhs.0) })
    }

    #[inline(always)]
    fn min(self, rhs: Self) -> Self {
        // VMINPS returns its second operand when either is NaN (see Avx2::max).
        Avx512(unsafe { _mm512_min_ps(self.0, rhs.0) })
    }

    /// All eight lanes in one register: lanes 0..8 of the vector, then lanes 8..16, go to it.
    type Acc8 = __m512d;
    #[inline(always)]
    fn acc8_zero() -> __m512d {
        unsafe { _mm512_setzero_pd() }
    }
    #[inline(always)]
    fn acc8_add_sq(acc: __m512d, x: Self, lane0: usize) -> __m512d {
        debug_assert_eq!(lane0, 0);
        unsafe {
            let (lo, hi) = halves_pd(x.0);
            _mm512_add_pd(_mm512_add_pd(acc, _mm512_mul_pd(lo, lo)), _mm512_mul_pd(hi, hi))
        }
    }
    #[inline(always)]
    fn acc8_to_array(acc: __m512d) -> [f64; 8] {
        let mut out = [0.0; 8];
        unsafe { _mm512_storeu_pd(out.as_mut_ptr(), acc) };
        out
    }
    #[inline(always)]
    fn acc8_from_array(lanes: [f64; 8]) -> __m512d {
        unsafe { _mm512_loadu_pd(lanes.as_ptr()) }
    }
    #[inline(always)]
    unsafe fn add_sq_to_f64(self, ptr: *mut f64) {
        let (lo, hi) = halves_pd(self.0);
        _mm512_storeu_pd(ptr, _mm512_add_pd(_mm512_loadu_pd(ptr), _mm512_mul_pd(lo, lo)));
        _mm512_storeu_pd(ptr.add(8), _mm512_add_pd(_mm512_loadu_pd(ptr.add(8)), _mm512_mul_pd(hi, hi)));
    }
}

/// Lanes 0..8 and 8..16 widened to f64 (exact). AVX-512F only: the upper half is taken through
/// the f64 view (`vextractf32x8` is AVX-512DQ).
#[inline(always)]
unsafe fn halves_pd(x: __m512) -> (__m512d, __m512d) {
    let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x))));
    (lo, hi)
}

/// `(bits + r) >> 16`, except NaN which keeps its top bits with the quiet bit set.
#[inline(always)]
unsafe fn bf16_bits_avx512(x: __m512, r: __m512i) -> __m512i {
    let bits = _mm512_castps_si512(x);
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, r));
    let abs = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFF_FFFF));
    let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7F80_0000));
    let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x0040));
    _mm512_mask_blend_epi32(nan, rounded, quiet)
}
