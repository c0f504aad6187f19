//! AArch64 NEON vector type.

use super::F32Lanes;
use std::arch::aarch64::*;

/// Four `f32` lanes in a NEON register.
#[derive(Clone, Copy)]
pub struct Neon(float32x4_t);

impl F32Lanes for Neon {
    const WIDTH: usize = 4;

    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        Neon(vld1q_f32(ptr))
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        vst1q_f32(ptr, self.0)
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Neon(unsafe { vdupq_n_f32(x) })
    }
    #[inline(always)]
    fn add(self, rhs: Self) -> Self {
        Neon(unsafe { vaddq_f32(self.0, rhs.0) })
    }
    #[inline(always)]
    fn sub(self, rhs: Self) -> Self {
        Neon(unsafe { vsubq_f32(self.0, rhs.0) })
    }
    #[inline(always)]
    fn mul(self, rhs: Self) -> Self {
        Neon(unsafe { vmulq_f32(self.0, rhs.0) })
    }
    #[inline(always)]
    fn div(self, rhs: Self) -> Self {
        Neon(unsafe { vdivq_f32(self.0, rhs.0) })
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        Neon(unsafe { vsqrtq_f32(self.0) })
    }
    #[inline(always)]
    fn neg(self) -> Self {
        Neon(unsafe { vnegq_f32(self.0) })
    }
    #[inline(always)]
    unsafe fn load_bf16(ptr: *const u16) -> Self {
        Neon(vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(ptr))))
    }
    #[inline(always)]
    unsafe fn store_bf16_stochastic(self, ptr: *mut u16, rand: *const u16) {
        vst1_u16(ptr, vmovn_u32(bf16_bits_neon(self.0, vmovl_u16(vld1_u16(rand)))));
    }
    #[inline(always)]
    unsafe fn store_bf16_nearest(self, ptr: *mut u16) {
        let bits = vreinterpretq_u32_f32(self.0);
        let odd = vandq_u32(vshrq_n_u32::<16>(bits), vdupq_n_u32(1));
        vst1_u16(ptr, vmovn_u32(bf16_bits_neon(self.0, vaddq_u32(odd, vdupq_n_u32(0x7FFF)))));
    }
    #[inline(always)]
    fn max(self, rhs: Self) -> Self {
        // FMAXNM returns the number when one operand is NaN: `rhs` for a NaN `self`, as `f32::max`.
        Neon(unsafe { vmaxnmq_f32(self.0, rhs.0) })
    }

    #[inline(always)]
    fn min(self, rhs: Self) -> Self {
        // FMINNM returns the number when one operand is NaN, as `f32::min`.
        Neon(unsafe { vminnmq_f32(self.0, rhs.0) })
    }

    /// Lanes (0, 1), (2, 3), (4, 5), (6, 7).
    type Acc8 = [float64x2_t; 4];
    #[inline(always)]
    fn acc8_zero() -> Self::Acc8 {
        unsafe { [vdupq_n_f64(0.0); 4] }
    }
    #[inline(always)]
    fn acc8_add_sq(mut acc: Self::Acc8, x: Self, lane0: usize) -> Self::Acc8 {
        debug_assert!(lane0 == 0 || lane0 == 4);
        let k = lane0 / 2;
        unsafe {
            let lo = vcvt_f64_f32(vget_low_f32(x.0));
            let hi = vcvt_high_f64_f32(x.0);
            acc[k] = vaddq_f64(acc[k], vmulq_f64(lo, lo));
            acc[k + 1] = vaddq_f64(acc[k + 1], vmulq_f64(hi, hi));
        }
        acc
    }
    #[inline(always)]
    fn acc8_to_array(acc: Self::Acc8) -> [f64; 8] {
        let mut out = [0.0; 8];
        for (k, a) in acc.iter().enumerate() {
            unsafe { vst1q_f64(out.as_mut_ptr().add(2 * k), *a) };
        }
        out
    }
    #[inline(always)]
    fn acc8_from_array(lanes: [f64; 8]) -> Self::Acc8 {
        unsafe { [0, 2, 4, 6].map(|k| vld1q_f64(lanes.as_ptr().add(k))) }
    }
    #[inline(always)]
    unsafe fn add_sq_to_f64(self, ptr: *mut f64) {
        let lo = vcvt_f64_f32(vget_low_f32(self.0));
        let hi = vcvt_high_f64_f32(self.0);
        vst1q_f64(ptr, vaddq_f64(vld1q_f64(ptr), vmulq_f64(lo, lo)));
        vst1q_f64(ptr.add(2), vaddq_f64(vld1q_f64(ptr.add(2)), vmulq_f64(hi, hi)));
    }
}

/// `(bits + r) >> 16`, except NaN which keeps its top bits with the quiet bit set.
#[inline(always)]
unsafe fn bf16_bits_neon(x: float32x4_t, r: uint32x4_t) -> uint32x4_t {
    let bits = vreinterpretq_u32_f32(x);
    let rounded = vshrq_n_u32::<16>(vaddq_u32(bits, r));
    let abs = vandq_u32(bits, vdupq_n_u32(0x7FFF_FFFF));
    let nan = vcgtq_u32(abs, vdupq_n_u32(0x7F80_0000));
    let quiet = vorrq_u32(vshrq_n_u32::<16>(bits), vdupq_n_u32(0x0040));
    vbslq_u32(nan, quiet, rounded)
}
