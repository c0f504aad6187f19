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
