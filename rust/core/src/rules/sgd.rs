//! SGD with momentum, dampening, Nesterov momentum and L2 weight decay, as torch.optim.SGD.
//!
//! For each element, with gradient `g` (negated when maximizing), parameter `p`, momentum buffer `b`:
//!
//! ```text
//! d = g + weight_decay * p
//! if momentum != 0:
//!     b = d                                        on a tensor's first step
//!     b = momentum * b + (1 - dampening) * d       afterwards
//!     d = d + momentum * b   if nesterov   else   b
//! p = p - lr * d
//! ```
//!
//! With `momentum == 0` the rule keeps no state at all.

use super::{check_addresses, check_len, Params, SyncPtr};
use crate::driver::{kernels_by_step, ElementwiseKernel, Executor};
use crate::error::{check_non_negative, Error, Result};
use crate::segments::SegmentTable;
use crate::simd::F32Lanes;

/// SGD hyperparameters, with torch.optim.SGD's names and meaning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdHyper {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor; 0 disables momentum and its buffer.
    pub momentum: f64,
    /// Dampening of the gradient's contribution to the momentum buffer.
    pub dampening: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum (needs `momentum > 0` and `dampening == 0`).
    pub nesterov: bool,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl Default for SgdHyper {
    fn default() -> Self {
        SgdHyper { lr: 1e-3, momentum: 0.0, dampening: 0.0, weight_decay: 0.0, nesterov: false, maximize: false }
    }
}

impl SgdHyper {
    /// Checks every hyperparameter, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        check_non_negative("lr", self.lr)?;
        check_non_negative("momentum", self.momentum)?;
        check_non_negative("dampening", self.dampening)?;
        check_non_negative("weight_decay", self.weight_decay)?;
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::invalid(
                "nesterov",
                format!("true with momentum={} and dampening={}", self.momentum, self.dampening),
                "used with momentum > 0 and dampening == 0",
            ));
        }
        Ok(())
    }
}

/// The buffers SGD reads and writes.
#[derive(Debug)]
pub struct SgdBuffers<'a> {
    /// Parameters (updated in place) and gradients: flat, or each tensor's own memory.
    pub params: Params<'a>,
    /// Momentum buffers, flat (`table.total()` elements); required when `momentum != 0`,
    /// ignored otherwise.
    pub momentum: Option<&'a mut [f32]>,
}

/// SGD's state buffer as the CPU kernel addresses it (opaque).
#[derive(Clone, Copy)]
pub struct SgdPtrs {
    momentum: SyncPtr<f32>,
}

/// SGD's constants for one run, in the f32 the arithmetic uses. `#[repr(C)]`: the CUDA kernels
/// (cuda/sgd.cu, `SgdConsts`) receive this very struct by value, so both compute from the same bits.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConsts {
    /// `-lr`.
    pub neg_lr: f32,
    /// L2 penalty.
    pub weight_decay: f32,
    /// Momentum factor.
    pub momentum: f32,
    /// `1 - dampening`.
    pub one_minus_dampening: f32,
    /// 1 when momentum is on.
    pub use_momentum: u32,
    /// 1 on a tensor's first step (the buffer starts as the gradient).
    pub first_step: u32,
    /// 1 for Nesterov momentum.
    pub nesterov: u32,
    /// 1 to ascend.
    pub maximize: u32,
}

impl SgdConsts {
    /// The constants of a run whose tensors take their `step`-th step (1 = first).
    pub fn new(hp: &SgdHyper, step: u64) -> SgdConsts {
        SgdConsts {
            neg_lr: -hp.lr as f32,
            weight_decay: hp.weight_decay as f32,
            momentum: hp.momentum as f32,
            one_minus_dampening: (1.0 - hp.dampening) as f32,
            use_momentum: (hp.momentum != 0.0) as u32,
            first_step: (step == 1) as u32,
            nesterov: hp.nesterov as u32,
            maximize: hp.maximize as u32,
        }
    }
}

impl ElementwiseKernel for SgdConsts {
    type Ptrs = SgdPtrs;

    #[inline(always)]
    unsafe fn apply<V: F32Lanes>(&self, ptrs: SgdPtrs, i: usize, p: V, g: V) -> V {
        let mut d = g;
        if self.maximize != 0 {
            d = d.neg();
        }
        if self.weight_decay != 0.0 {
            d = d.add(p.mul(V::splat(self.weight_decay)));
        }
        if self.use_momentum != 0 {
            let b = if self.first_step != 0 {
                d
            } else {
                let b = V::load(ptrs.momentum.at(i));
                b.mul(V::splat(self.momentum)).add(d.mul(V::splat(self.one_minus_dampening)))
            };
            b.store(ptrs.momentum.at(i));
            d = if self.nesterov != 0 { d.add(b.mul(V::splat(self.momentum))) } else { b };
        }
        p.add(d.mul(V::splat(self.neg_lr)))
    }
}

/// One SGD step of a param group.
///
/// Tensors with `stepped[i]` are updated and their `steps[i]` advanced (a tensor whose counter is
/// 0 takes its first step: its momentum buffer is initialised to the gradient, as torch does);
/// the others are left untouched, like parameters whose `.grad` is `None` in torch.
///
/// ```
/// use smallbatch_core::rules::sgd::{sgd_step, SgdBuffers, SgdHyper};
/// use smallbatch_core::rules::Params;
/// use smallbatch_core::{Executor, SegmentTable};
///
/// // A weight of 2 elements and a bias of 1, back to back in one flat buffer.
/// let table = SegmentTable::packed(&[2, 1]).unwrap();
/// let mut param = vec![1.0f32, -1.0, 0.0];
/// let grad = vec![1.0f32, -1.0, 1.0];
/// let mut momentum = vec![0.0f32; 3];
/// let mut steps = vec![0.0; 2];
/// let hp = SgdHyper { lr: 0.5, momentum: 0.5, ..SgdHyper::default() };
/// let exec = Executor::global().unwrap();
///
/// // First step: the momentum buffer starts as the gradient, p -= 0.5 * g.
/// let bufs = SgdBuffers { params: Params::F32 { param: &mut param, grad: &grad }, momentum: Some(&mut momentum) };
/// sgd_step(exec, &table, &[true, true], &mut steps, bufs, &hp).unwrap();
/// assert_eq!(param, [0.5, -0.5, -0.5]);
///
/// // Second step with the bias left out (no gradient): b = 0.5 b + g = 1.5 g for the weight only.
/// let bufs = SgdBuffers { params: Params::F32 { param: &mut param, grad: &grad }, momentum: Some(&mut momentum) };
/// sgd_step(exec, &table, &[true, false], &mut steps, bufs, &hp).unwrap();
/// assert_eq!(param, [-0.25, 0.25, -0.5]);
/// assert_eq!(steps, [2.0, 1.0]);
/// ```
pub fn sgd_step(
    exec: &Executor,
    table: &SegmentTable,
    stepped: &[bool],
    steps: &mut [f64],
    bufs: SgdBuffers<'_>,
    hp: &SgdHyper,
) -> Result<()> {
    hp.validate()?;
    let total = table.total();
    let mut params = bufs.params;
    let io = params.io(table)?;
    check_addresses(table, stepped, &io)?;
    let use_momentum = hp.momentum != 0.0;
    let momentum = match bufs.momentum {
        Some(m) => {
            check_len("momentum_buffer", m.len(), total)?;
            SyncPtr::new(m)
        }
        None if use_momentum => return Err(Error::invalid("momentum_buffer", "missing", "given when momentum != 0")),
        None => SyncPtr(std::ptr::null_mut()),
    };
    let runs = table.plan_step(stepped, steps)?;
    let kernels = kernels_by_step(&runs, |step| SgdConsts::new(hp, step));
    // SAFETY: the state buffer was checked to hold `total` elements and the parameters to fit
    // the table; runs lie inside their tensors, and the borrows above (or the promise of
    // `TensorAddresses::new`) give us exclusive access for the duration of the call.
    unsafe { exec.run(&kernels, &runs, table, SgdPtrs { momentum }, io.raw()) };
    Ok(())
}
