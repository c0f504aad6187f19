//! Update rules. Each file owns one rule: its hyperparameters (validated), its per-element math as
//! an [`ElementwiseKernel`](crate::driver::ElementwiseKernel), and a safe entry point over a param
//! group described by a [`SegmentTable`].
//!
//! A group's parameters and gradients are read where their owner keeps them: either one flat
//! buffer with the tensors back to back ([`Params::F32`], [`Params::Bf16`]), or each tensor in
//! memory of its own, given by address ([`Params::Tensors`], how the torch layer passes torch's
//! tensors). Either way the table's offsets index the optimizer's own flat state buffers and
//! count the random bits of stochastic rounding, so both give the same bits.

pub mod adafactor;
pub mod adam;
pub mod muon;
pub mod sgd;

use crate::driver::{ParamIo, Rounding, TensorIo};
pub(crate) use crate::error::check_len;
use crate::error::{Error, Result};
use crate::rounding::{bf16_to_f32, round_bf16_nearest, round_bf16_stochastic};
use crate::segments::SegmentTable;
use std::borrow::Cow;

/// How a group's parameters and gradients are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// f32 parameters and gradients.
    F32,
    /// bf16 parameters and gradients (raw bits): the update is computed in f32 and rounded back.
    Bf16(Rounding),
}

impl Storage {
    /// Bytes per element of a parameter or gradient.
    pub fn element_bytes(self) -> usize {
        match self {
            Storage::F32 => 4,
            Storage::Bf16(_) => 2,
        }
    }
}

/// Each tensor's parameters and gradients at addresses of their own: `params[i]` and `grads[i]`
/// point at element 0 of tensor `i` of the segment table, whose elements are laid out the same
/// way in both (element `k` of the parameter is element `k` of its gradient, whatever the
/// tensor's strides). The table's offsets still index the optimizer's state and the random bits.
#[derive(Debug, Clone)]
pub struct TensorAddresses {
    storage: Storage,
    params: Vec<usize>,
    grads: Vec<usize>,
    draws: Option<Vec<usize>>,
}

impl TensorAddresses {
    /// The tensors at these addresses (one of each per tensor of the table they are stepped with;
    /// addresses of tensors that are not stepped, or have no elements, are never read).
    ///
    /// # Safety
    /// For every tensor a step is asked to update: `params[i]` points at `numel(i)` live,
    /// writable elements of the storage type, suitably aligned, and `grads[i]` at as many
    /// readable ones, laid out alike; nothing else reads or writes them during the step, and no
    /// parameter overlaps another parameter, any gradient or the rule's state buffers.
    pub unsafe fn new(storage: Storage, params: Vec<usize>, grads: Vec<usize>) -> TensorAddresses {
        TensorAddresses { storage, params, grads, draws: None }
    }

    /// The same tensors drawing the random bits of stochastic rounding at other indices: element
    /// `k` of tensor `i` draws index `draws[i] + k` instead of `offsets[i] + k`. A shard of a
    /// larger tensor (FSDP) passes where its element 0 lies in the unsharded group, and rounds
    /// exactly as the unsharded step would.
    pub fn with_draw_offsets(mut self, draws: Vec<usize>) -> TensorAddresses {
        self.draws = Some(draws);
        self
    }

    /// How the tensors are stored.
    pub fn storage(&self) -> Storage {
        self.storage
    }
}

/// A param group's parameters and gradients, in their storage type.
#[derive(Debug)]
pub enum Params<'a> {
    /// f32 parameters and gradients, the tensors back to back in one flat buffer each.
    F32 {
        /// Parameters, updated in place.
        param: &'a mut [f32],
        /// Gradients.
        grad: &'a [f32],
    },
    /// bf16 parameters and gradients (raw bits), flat: the update is computed in f32 and
    /// rounded back.
    Bf16 {
        /// Parameters, updated in place.
        param: &'a mut [u16],
        /// Gradients.
        grad: &'a [u16],
        /// How new parameters are rounded to bf16.
        rounding: Rounding,
    },
    /// Each tensor in memory of its own.
    Tensors(TensorAddresses),
}

/// The per-tensor addresses a step reads and writes, owned for the duration of the step.
pub(crate) struct GroupIo<'a> {
    storage: Storage,
    params: Cow<'a, [usize]>,
    grads: Cow<'a, [usize]>,
    /// Per tensor, its draw index minus its table index; empty when they are the same.
    draw_shifts: Vec<i64>,
}

impl GroupIo<'_> {
    /// The raw view the kernels work on.
    pub(crate) fn raw(&self) -> ParamIo {
        let shifts = if self.draw_shifts.is_empty() { std::ptr::null() } else { self.draw_shifts.as_ptr() };
        ParamIo::new(self.storage, self.params.as_ptr(), self.grads.as_ptr(), shifts)
    }
}

impl Params<'_> {
    /// Checks the buffers fit `table` and returns each tensor's addresses.
    pub(crate) fn io(&mut self, table: &SegmentTable) -> Result<GroupIo<'_>> {
        let total = table.total();
        fn flat<T>(table: &SegmentTable, base: *const T) -> Vec<usize> {
            let size = std::mem::size_of::<T>();
            table.offsets().iter().map(|&o| base as usize + o * size).collect()
        }
        match self {
            Params::F32 { param, grad } => {
                check_len("param", param.len(), total)?;
                check_len("grad", grad.len(), total)?;
                Ok(GroupIo {
                    storage: Storage::F32,
                    params: Cow::Owned(flat(table, param.as_mut_ptr())),
                    grads: Cow::Owned(flat(table, grad.as_ptr())),
                    draw_shifts: Vec::new(),
                })
            }
            Params::Bf16 { param, grad, rounding } => {
                check_len("param", param.len(), total)?;
                check_len("grad", grad.len(), total)?;
                Ok(GroupIo {
                    storage: Storage::Bf16(*rounding),
                    params: Cow::Owned(flat(table, param.as_mut_ptr())),
                    grads: Cow::Owned(flat(table, grad.as_ptr())),
                    draw_shifts: Vec::new(),
                })
            }
            Params::Tensors(t) => {
                check_len("param addresses", t.params.len(), table.len())?;
                check_len("grad addresses", t.grads.len(), table.len())?;
                let draw_shifts = match &t.draws {
                    None => Vec::new(),
                    Some(draws) => {
                        check_len("draw offsets", draws.len(), table.len())?;
                        draws.iter().zip(table.offsets()).map(|(&d, &o)| d as i64 - o as i64).collect()
                    }
                };
                Ok(GroupIo {
                    storage: t.storage,
                    params: Cow::Borrowed(&t.params),
                    grads: Cow::Borrowed(&t.grads),
                    draw_shifts,
                })
            }
        }
    }
}

/// Checks that every tensor a step will touch (`stepped` and non-empty) has non-null, aligned
/// addresses: what a caller of [`TensorAddresses::new`] can still get wrong by accident.
pub(crate) fn check_addresses(table: &SegmentTable, stepped: &[bool], io: &GroupIo<'_>) -> Result<()> {
    check_len("stepped", stepped.len(), table.len())?;
    if matches!(io.params, Cow::Owned(_)) {
        return Ok(()); // flat buffers, checked by their slices
    }
    let align = io.storage.element_bytes();
    for (i, &on) in stepped.iter().enumerate() {
        if !on || table.numels()[i] == 0 {
            continue;
        }
        for (what, addr) in [("parameter", io.params[i]), ("gradient", io.grads[i])] {
            if addr == 0 {
                return Err(Error::invalid(format!("{what} address of tensor {i}"), "null", "non-null"));
            }
            if !addr.is_multiple_of(align) {
                return Err(Error::invalid(
                    format!("{what} address of tensor {i}"),
                    format!("{addr:#x}"),
                    "aligned to its element size",
                ));
            }
        }
    }
    Ok(())
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

/// `n` parameters from `io`'s position, as f32 (borrowed when they are f32).
pub(crate) unsafe fn read_param<'a>(io: TensorIo, n: usize) -> Cow<'a, [f32]> {
    match io {
        TensorIo::F32 { param, .. } => Cow::Borrowed(std::slice::from_raw_parts(param, n)),
        TensorIo::Bf16 { param, .. } => {
            Cow::Owned(std::slice::from_raw_parts(param, n).iter().map(|&b| bf16_to_f32(b)).collect())
        }
    }
}

/// `n` gradients from `io`'s position, as f32 (borrowed when they are f32).
pub(crate) unsafe fn read_grad<'a>(io: TensorIo, n: usize) -> Cow<'a, [f32]> {
    match io {
        TensorIo::F32 { grad, .. } => Cow::Borrowed(std::slice::from_raw_parts(grad, n)),
        TensorIo::Bf16 { grad, .. } => {
            Cow::Owned(std::slice::from_raw_parts(grad, n).iter().map(|&b| bf16_to_f32(b)).collect())
        }
    }
}

/// Rounds `values` to bf16 into `out`, the parameters of draw indices `start..`; stochastic bits
/// as in the elementwise driver: Philox at (seed, the tensor's step, element draw index, stream).
pub(crate) unsafe fn store_bf16(out: *mut u16, start: usize, values: &[f32], rounding: Rounding, step: u64) {
    let out = std::slice::from_raw_parts_mut(out, values.len());
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
