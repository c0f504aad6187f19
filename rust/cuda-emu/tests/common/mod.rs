//! Helpers shared by the integration tests: a seeded generator and a launch that panics with the
//! emulator's message.

#![allow(dead_code)] // each test file uses a different subset

use smallbatch_cuda_emu::Args;

/// SplitMix64: reproducible inputs without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// Uniform in [0, bound).
    pub fn below(&mut self, bound: u32) -> u32 {
        ((self.next_u32() as u64 * bound as u64) >> 32) as u32
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u32() >> 8) as f32 / (1u32 << 24) as f32)
    }
}

/// Launches and panics with the emulator's message on failure.
///
/// # Safety
/// As `Args::launch`.
pub unsafe fn launch_ok(kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), mut args: Args) {
    if let Err(e) = args.launch(kernel, grid, block) {
        panic!("launching {kernel} over grid {grid:?}, block {block:?}: {e}");
    }
}
