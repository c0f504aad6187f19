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
