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
    #[inline(always)]
    fn max(self, rhs: Self) -> Self {
        f32::max(self, rhs)
    }

    #[inline(always)]
    fn min(self, rhs: Self) -> Self {
        f32::min(self, rhs)
    }

    type Acc8 = [f64; 8];
    #[inline(always)]
    fn acc8_zero() -> [f64; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    fn acc8_add_sq(mut acc: [f64; 8], x: Self, lane0: usize) -> [f64; 8] {
        acc[lane0] += (x as f64) * (x as f64);
        acc
    }
    #[inline(always)]
    fn acc8_to_array(acc: [f64; 8]) -> [f64; 8] {
        acc
    }
    #[inline(always)]
    fn acc8_from_array(lanes: [f64; 8]) -> [f64; 8] {
        lanes
    }
    #[inline(always)]
    unsafe fn add_sq_to_f64(self, ptr: *mut f64) {
        *ptr += (self as f64) * (self as f64);
    }
}
