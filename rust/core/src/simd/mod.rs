//! SIMD paths and the vector type rules are written against.
//!
//! A rule writes its per-element math once, generically over [`F32Lanes`]; the driver
//! ([`crate::driver`]) instantiates it for every path this CPU supports and picks one at run time.
//!
//! Rules never fuse a multiply and an add (no FMA) and use only correctly rounded operations
//! (`+ - * /` and `sqrt`). That makes every path — scalar, AVX2, AVX-512, NEON, and a SIMD body
//! against its scalar tail — produce bit-identical results, so thread count and alignment can
//! never change a weight. The elementwise rules are memory-bound, so fusing would buy no speed.

#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "aarch64")]
pub use neon::Neon;
#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// Environment variable that forces a SIMD path (`scalar`, `avx2`, `avx512`, `neon`).
pub const SIMD_ENV: &str = "SMALLBATCH_SIMD";

/// A vector of `f32` lanes with the correctly rounded operations rules may use.
///
/// Implemented by `f32` itself (one lane: the scalar reference and every path's tail) and by one
/// type per SIMD instruction set. Methods are `#[inline(always)]` so that, once inlined into a
/// function compiled with the matching `#[target_feature]`, they become single instructions.
pub trait F32Lanes: Copy {
    /// Number of `f32` lanes.
    const WIDTH: usize;
    /// Loads `WIDTH` values from `ptr` (no alignment required).
    ///
    /// # Safety
    /// `ptr..ptr+WIDTH` must be readable, and the CPU must support this type's instruction set.
    unsafe fn load(ptr: *const f32) -> Self;
    /// Stores `WIDTH` values to `ptr` (no alignment required).
    ///
    /// # Safety
    /// `ptr..ptr+WIDTH` must be writable, and the CPU must support this type's instruction set.
    unsafe fn store(self, ptr: *mut f32);
    /// All lanes set to `x`.
    fn splat(x: f32) -> Self;
    /// Lane-wise `self + rhs`.
    fn add(self, rhs: Self) -> Self;
    /// Lane-wise `self - rhs`.
    fn sub(self, rhs: Self) -> Self;
    /// Lane-wise `self * rhs`.
    fn mul(self, rhs: Self) -> Self;
    /// Lane-wise `self / rhs`.
    fn div(self, rhs: Self) -> Self;
    /// Lane-wise square root.
    fn sqrt(self) -> Self;
    /// Lane-wise negation (flips the sign bit, so `-0.0` and NaN payloads behave as in scalar code).
    fn neg(self) -> Self;
    /// Loads `WIDTH` bf16 values (raw bits) and widens them to f32 exactly.
    ///
    /// # Safety
    /// `ptr..ptr+WIDTH` must be readable, and the CPU must support this type's instruction set.
    unsafe fn load_bf16(ptr: *const u16) -> Self;
    /// Rounds each lane to bf16 stochastically with the 16-bit draws at `rand` (see
    /// [`crate::rounding::round_bf16_stochastic`]) and stores the raw bits.
    ///
    /// # Safety
    /// `ptr..ptr+WIDTH` must be writable and `rand..rand+WIDTH` readable.
    unsafe fn store_bf16_stochastic(self, ptr: *mut u16, rand: *const u16);
    /// Rounds each lane to the nearest bf16 (ties to even; see
    /// [`crate::rounding::round_bf16_nearest`]) and stores the raw bits.
    ///
    /// # Safety
    /// `ptr..ptr+WIDTH` must be writable.
    unsafe fn store_bf16_nearest(self, ptr: *mut u16);
    /// Lane-wise `f32::max(self, rhs)`. `rhs` must not be NaN (a NaN in `self` gives `rhs`, as
    /// `f32::max` does; a NaN `rhs` is where the instruction sets disagree).
    fn max(self, rhs: Self) -> Self;
    /// Lane-wise `f32::min(self, rhs)`, with [`F32Lanes::max`]'s contract: `rhs` must not be NaN.
    fn min(self, rhs: Self) -> Self;

    /// Eight `f64` accumulators: the fixed lane structure of the rules' f64 reductions, the same
    /// on every path (lane `k % 8` receives element `k` of a span, in order), so sums do not
    /// depend on the vector width.
    type Acc8: Copy;
    /// Eight zeroed accumulators.
    fn acc8_zero() -> Self::Acc8;
    /// Adds `(x[i] as f64)^2` to accumulator `lane0 + i` for `i < WIDTH` when `WIDTH < 8`, or to
    /// accumulator `i % 8` (lower `i` first) when `WIDTH` is a multiple of 8 (then `lane0 == 0`).
    /// `lane0` is a multiple of `WIDTH` below 8.
    fn acc8_add_sq(acc: Self::Acc8, x: Self, lane0: usize) -> Self::Acc8;
    /// The eight accumulators.
    fn acc8_to_array(acc: Self::Acc8) -> [f64; 8];
    /// Accumulators holding `lanes`.
    fn acc8_from_array(lanes: [f64; 8]) -> Self::Acc8;
    /// `ptr[i] += (self[i] as f64)^2` for every lane `i`.
    ///
    /// # Safety
    /// `ptr..ptr+WIDTH` must be readable and writable.
    unsafe fn add_sq_to_f64(self, ptr: *mut f64);
}

/// An instruction-set path for the elementwise kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimdPath {
    /// Portable one-lane code: the reference every other path must equal.
    Scalar,
    /// x86-64 AVX2 (8 lanes).
    Avx2,
    /// x86-64 AVX-512F (16 lanes).
    Avx512,
    /// AArch64 NEON (4 lanes).
    Neon,
}

impl SimdPath {
    /// Every path, fastest first.
    pub const ALL: [SimdPath; 4] = [SimdPath::Avx512, SimdPath::Avx2, SimdPath::Neon, SimdPath::Scalar];

    /// The path's name as used by [`SIMD_ENV`] and `backend_info()`.
    pub fn name(self) -> &'static str {
        match self {
            SimdPath::Scalar => "scalar",
            SimdPath::Avx2 => "avx2",
            SimdPath::Avx512 => "avx512",
            SimdPath::Neon => "neon",
        }
    }

    /// Whether this build and this CPU can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            SimdPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "aarch64")]
            SimdPath::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The paths this CPU supports, fastest first (always ends with `Scalar`).
    pub fn supported() -> Vec<SimdPath> {
        Self::ALL.into_iter().filter(|p| p.is_supported()).collect()
    }

    /// The fastest supported path.
    pub fn best() -> SimdPath {
        Self::supported()[0]
    }

    /// `Ok(self)` if supported, else an error saying why not.
    pub fn require(self) -> Result<SimdPath> {
        if self.is_supported() {
            Ok(self)
        } else {
            Err(Error::SimdUnavailable {
                requested: self.name().to_string(),
                reason: format!(
                    "this CPU or build does not support it (supported: {})",
                    Self::supported().iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
                ),
            })
        }
    }

    /// The path selected for this process: [`SIMD_ENV`] if set, else the fastest supported one.
    /// Read once; an invalid or unsupported request is an error on every call.
    pub fn selected() -> Result<SimdPath> {
        static SELECTED: OnceLock<Result<SimdPath>> = OnceLock::new();
        SELECTED
            .get_or_init(|| match std::env::var(SIMD_ENV) {
                Ok(name) if !name.trim().is_empty() => name.parse::<SimdPath>()?.require(),
                _ => Ok(SimdPath::best()),
            })
            .clone()
    }
}

impl fmt::Display for SimdPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SimdPath {
    type Err = Error;

    fn from_str(s: &str) -> Result<SimdPath> {
        let wanted = s.trim().to_ascii_lowercase();
        Self::ALL.into_iter().find(|p| p.name() == wanted).ok_or_else(|| Error::SimdUnavailable {
            requested: s.to_string(),
            reason: "unknown path (expected one of: scalar, avx2, avx512, neon)".to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in SimdPath::ALL {
            assert_eq!(p.name().parse::<SimdPath>().unwrap(), p);
        }
        let err = "sse9".parse::<SimdPath>().unwrap_err();
        assert!(err.to_string().contains("unknown path"), "{err}");
    }

    #[test]
    fn scalar_always_supported() {
        assert!(SimdPath::Scalar.is_supported());
        assert_eq!(*SimdPath::supported().last().unwrap(), SimdPath::Scalar);
    }
}
