//! Update rules. Each file owns one rule: its hyperparameters (validated), its per-element math as
//! an [`ElementwiseKernel`](crate::driver::ElementwiseKernel), and a safe entry point over flat
//! buffers described by a [`SegmentTable`](crate::SegmentTable).

pub mod adafactor;
pub mod adam;
pub mod sgd;

use crate::error::{Error, Result};

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
    pub(crate) fn read_only(slice: &[T]) -> Self {
        SyncPtr(slice.as_ptr() as *mut T)
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
