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
            _mm512_castsi512_ps(_mm512_xor_si512(
                _mm512_castps_si512(self.0),
                _mm512_set1_epi32(i32::MIN),
            ))
        })
    }
}
