//! Update rules. Each file owns one rule: its hyperparameters (validated), its per-element math as
//! an [`ElementwiseKernel`](crate::driver::ElementwiseKernel), and a safe entry point over flat
//! buffers described by a [`SegmentTable`](crate::SegmentTable).

pub mod adafactor;
pub mod adam;
pub mod sgd;

use crate::driver::{ParamIo, Rounding};
use crate::error::{Error, Result};

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

/// Checks that a flat buffer has the table's total length.
pub(crate) fn check_len(name: &str, len: usize, total: usize) -> Result<()> {
    if len == total {
        Ok(())
    } else {
        Err(Error::Length { name: name.to_string(), expected: total, got: len })
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
}
