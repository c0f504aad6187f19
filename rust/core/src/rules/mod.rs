//! Update rules. Each file owns one rule: its hyperparameters (validated), its per-element math as
//! an [`ElementwiseKernel`](crate::driver::ElementwiseKernel), and a safe entry point over flat
//! buffers described by a [`SegmentTable`](crate::SegmentTable).

pub mod adafactor;
pub mod adam;
pub mod muon;
pub mod sgd;

use crate::driver::{ParamIo, Rounding};
pub(crate) use crate::error::check_len;
use crate::error::Result;
use crate::rounding::{bf16_to_f32, round_bf16_nearest, round_bf16_stochastic};
use std::borrow::Cow;

/// A param group's flat parameters and gradients, in their storage type.
#[derive(Debug)]
pub enum Params<'a> {
    /// f32 parameters and gradients.
    F32 {
        /// Parameters, updated in place.
        param: &'a mut [f32],
        /// Gradients.
        grad: &'a [f32],
    },
    /// bf16 parameters and gradients (raw bits): the update is computed in f32 and rounded back.
    Bf16 {
        /// Parameters, updated in place.
        param: &'a mut [u16],
        /// Gradients.
        grad: &'a [u16],
        /// How new parameters are rounded to bf16.
        rounding: Rounding,
    },
}

impl Params<'_> {
    /// Checks both buffers hold `total` elements.
    pub(crate) fn check(&self, total: usize) -> Result<()> {
        let (p, g) = match self {
            Params::F32 { param, grad } => (param.len(), grad.len()),
            Params::Bf16 { param, grad, .. } => (param.len(), grad.len()),
        };
        check_len("param", p, total)?;
        check_len("grad", g, total)
    }

    /// The raw view the driver works on.
    pub(crate) fn io(&mut self) -> ParamIo {
        match self {
            Params::F32 { param, grad } => ParamIo::F32 { param: param.as_mut_ptr(), grad: grad.as_ptr() },
            Params::Bf16 { param, grad, rounding } => {
                ParamIo::Bf16 { param: param.as_mut_ptr(), grad: grad.as_ptr(), rounding: *rounding }
            }
        }
    }
}

/// torch's lerp on f32, which picks the formulation that is exact at its nearer end:
/// `a + w (b - a)` for `w < 0.5`, else `b - (b - a)(1 - w)`.
#[inline(always)]
pub(crate) fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

/// A raw pointer that may cross threads: the driver hands disjoint element ranges to each thread.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub *mut T);
// SAFETY: see `ElementwiseKernel`'s contract — each element is touched by exactly one thread.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    pub(crate) fn new(slice: &mut [T]) -> Self {
        SyncPtr(slice.as_mut_ptr())
    }
    /// Pointer to element `i`.
    ///
    /// # Safety
    /// `i` must be in bounds of the buffer.
    #[inline(always)]
    pub(crate) unsafe fn at(self, i: usize) -> *mut T {
        self.0.add(i)
    }

    /// Elements `start..end` as a slice. (A method, not a field access, so closures capture the
    /// whole `Sync` wrapper rather than the raw pointer inside it.)
    ///
    /// # Safety
    /// `start <= end`, the range must be in bounds, and no other reference to any of its elements
    /// may be alive while the slice is.
    #[inline(always)]
    pub(crate) unsafe fn range<'a>(self, start: usize, end: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), end - start)
    }
}

// Per-tensor rules (Adafactor, Muon) read and write parameters a slice at a time through these.

/// Elements `start..end` of the parameters as f32 (borrowed when they are f32).
pub(crate) unsafe fn read_param<'a>(io: ParamIo, start: usize, end: usize) -> Cow<'a, [f32]> {
    match io {
        ParamIo::F32 { param, .. } => Cow::Borrowed(std::slice::from_raw_parts(param.add(start), end - start)),
        ParamIo::Bf16 { param, .. } => Cow::Owned(
            std::slice::from_raw_parts(param.add(start), end - start).iter().map(|&b| bf16_to_f32(b)).collect(),
        ),
    }
}

/// Elements `start..end` of the gradients as f32 (borrowed when they are f32).
pub(crate) unsafe fn read_grad<'a>(io: ParamIo, start: usize, end: usize) -> Cow<'a, [f32]> {
    match io {
        ParamIo::F32 { grad, .. } => Cow::Borrowed(std::slice::from_raw_parts(grad.add(start), end - start)),
        ParamIo::Bf16 { grad, .. } => Cow::Owned(
            std::slice::from_raw_parts(grad.add(start), end - start).iter().map(|&b| bf16_to_f32(b)).collect(),
        ),
    }
}

/// Rounds `values` to bf16 into parameters `start..`; stochastic bits as in the elementwise
/// driver: Philox at (seed, the tensor's step, element index in the flat buffer, stream).
pub(crate) unsafe fn store_bf16(param: *mut u16, start: usize, values: &[f32], rounding: Rounding, step: u64) {
    let out = std::slice::from_raw_parts_mut(param.add(start), values.len());
    match rounding {
        Rounding::Nearest => {
            for (o, &v) in out.iter_mut().zip(values) {
                *o = round_bf16_nearest(v);
            }
        }
        Rounding::Stochastic { seed, stream } => {
            let mut rand = [0u16; 256];
            for (k, (o, v)) in out.chunks_mut(256).zip(values.chunks(256)).enumerate() {
                let first = (start + k * 256) as u64;
                crate::philox::fill_random_u16(seed, step, stream, first, &mut rand[..v.len()]);
                for ((o, &v), &r) in o.iter_mut().zip(v).zip(&rand) {
                    *o = round_bf16_stochastic(v, r);
                }
            }
        }
    }
}
