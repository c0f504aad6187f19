//! The one-lane "vector": the scalar reference path and every SIMD path's tail.

use super::F32Lanes;
use crate::rounding::{bf16_to_f32, round_bf16_nearest, round_bf16_stochastic};

impl F32Lanes for f32 {
    const WIDTH: usize = 1;

    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        ptr.read_unaligned()
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        ptr.write_unaligned(self)
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn add(self, rhs: Self) -> Self {
        self + rhs
    }
    #[inline(always)]
    fn sub(self, rhs: Self) -> Self {
        self - rhs
    }
    #[inline(always)]
    fn mul(self, rhs: Self) -> Self {
        self * rhs
    }
    #[inline(always)]
    fn div(self, rhs: Self) -> Self {
        self / rhs
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn neg(self) -> Self {
        -self
    }
    #[inline(always)]
    unsafe fn load_bf16(ptr: *const u16) -> Self {
        bf16_to_f32(ptr.read_unaligned())
    }
    #[inline(always)]
    unsafe fn store_bf16_stochastic(self, ptr: *mut u16, rand: *const u16) {
        ptr.write_unaligned(round_bf16_stochastic(self, rand.read_unaligned()))
    }
    #[inline(always)]
    unsafe fn store_bf16_nearest(self, ptr: *mut u16) {
        ptr.write_unaligned(round_bf16_nearest(self))
    }
}
