//! Adam and AdamW, as torch.optim.Adam / torch.optim.AdamW, with or without amsgrad.
//!
//! For each element, with gradient `g` (negated when maximizing), parameter `p`, first and second
//! moments `m`, `v`, step count `t` of the tensor (1 on its first step):
//!
//! ```text
//! g = g + weight_decay * p            Adam (L2 penalty), when not decoupled
//! p = p * (1 - lr * weight_decay)     AdamW (decoupled weight decay)
//! m = m + (1 - beta1) * (g - m)       torch's lerp; g - (g - m) * beta1 when 1 - beta1 >= 0.5
//! v = beta2 * v + (1 - beta2) * g * g
//! v_max = max(v_max, v)               amsgrad: the largest second moment so far
//! p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)     (v_max with amsgrad)
//! ```
//!
//! eps is added outside the square root, after the bias correction, as torch does. Scalars
//! (bias corrections, step size, decay factor) are computed in f64 per run and rounded once to f32.

use super::{check_addresses, check_len, Params, SyncPtr};
use crate::driver::{kernels_by_step, ElementwiseKernel, Executor};
use crate::error::{check_beta, check_non_negative, Error, Result};
use crate::segments::SegmentTable;
use crate::simd::F32Lanes;

/// Adam/AdamW hyperparameters, with torch.optim's names and meaning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamHyper {
    /// Learning rate.
    pub lr: f64,
    /// EMA coefficient of the first moment, in [0, 1).
    pub beta1: f64,
    /// EMA coefficient of the second moment, in [0, 1).
    pub beta2: f64,
    /// Added to the bias-corrected root of the second moment.
    pub eps: f64,
    /// Weight decay: an L2 penalty (Adam) or decoupled (AdamW).
    pub weight_decay: f64,
    /// `true` for AdamW's decoupled weight decay.
    pub decoupled_weight_decay: bool,
    /// Ascend instead of descend.
    pub maximize: bool,
    /// Divide by the largest second moment seen so far (needs the `max_exp_avg_sq` buffer).
    pub amsgrad: bool,
}

impl Default for AdamHyper {
    fn default() -> Self {
        AdamHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            maximize: false,
            amsgrad: false,
        }
    }
}

impl AdamHyper {
    /// Checks every hyperparameter, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        check_non_negative("lr", self.lr)?;
        check_beta("beta1", self.beta1)?;
        check_beta("beta2", self.beta2)?;
        check_non_negative("eps", self.eps)?;
        check_non_negative("weight_decay", self.weight_decay)
    }
}

/// The buffers Adam reads and writes; the state is flat, `table.total()` elements each.
#[derive(Debug)]
pub struct AdamBuffers<'a> {
    /// Parameters (updated in place) and gradients: flat, or each tensor's own memory.
    pub params: Params<'a>,
    /// First moment (`exp_avg` in torch's state).
    pub exp_avg: &'a mut [f32],
    /// Second moment (`exp_avg_sq` in torch's state).
    pub exp_avg_sq: &'a mut [f32],
    /// The largest second moment so far (`max_exp_avg_sq`), required with amsgrad.
    pub max_exp_avg_sq: Option<&'a mut [f32]>,
}

/// Adam's state buffers as the CPU kernel addresses them (opaque).
#[derive(Clone, Copy)]
pub struct AdamPtrs {
    exp_avg: SyncPtr<f32>,
    exp_avg_sq: SyncPtr<f32>,
    max_exp_avg_sq: SyncPtr<f32>,
}

/// Adam's constants for one run (one step count), in the f32 the arithmetic uses. `#[repr(C)]`:
/// the CUDA kernels (cuda/adam.cu, `AdamConsts`) receive this very struct by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConsts {
    /// `1 - beta1`, the lerp weight.
    pub lerp_weight: f32,
    /// `1 - lerp_weight`, for torch's second lerp branch.
    pub lerp_complement: f32,
    /// `beta2`.
    pub beta2: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// `-lr / (1 - beta1^t)`.
    pub neg_step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f32,
    /// `eps`.
    pub eps: f32,
    /// Weight decay added to the gradient (Adam), or 0.
    pub l2: f32,
    /// `1 - lr * weight_decay` (AdamW), or 1.
    pub decay: f32,
    /// 1 to ascend.
    pub maximize: u32,
    /// 1 with amsgrad.
    pub amsgrad: u32,
}

impl AdamConsts {
    /// The constants of a run whose tensors take their `step`-th step (1 = first).
    pub fn new(hp: &AdamHyper, step: u64) -> AdamConsts {
        let t = step as f64;
        let bias_correction1 = 1.0 - hp.beta1.powf(t);
        let bias_correction2 = 1.0 - hp.beta2.powf(t);
        let lerp_weight = (1.0 - hp.beta1) as f32;
        AdamConsts {
            lerp_weight,
            lerp_complement: 1.0 - lerp_weight,
            beta2: hp.beta2 as f32,
            one_minus_beta2: (1.0 - hp.beta2) as f32,
            neg_step_size: -(hp.lr / bias_correction1) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: hp.eps as f32,
            l2: if hp.decoupled_weight_decay { 0.0 } else { hp.weight_decay as f32 },
            decay: if hp.decoupled_weight_decay { (1.0 - hp.lr * hp.weight_decay) as f32 } else { 1.0 },
            maximize: hp.maximize as u32,
            amsgrad: hp.amsgrad as u32,
        }
    }
}

impl ElementwiseKernel for AdamConsts {
    type Ptrs = AdamPtrs;

    #[inline(always)]
    unsafe fn apply<V: F32Lanes>(&self, ptrs: AdamPtrs, i: usize, p: V, g: V) -> V {
        let (mut p, mut g) = (p, g);
        let m = V::load(ptrs.exp_avg.at(i));
        let v = V::load(ptrs.exp_avg_sq.at(i));
        if self.maximize != 0 {
            g = g.neg();
        }
        if self.l2 != 0.0 {
            g = g.add(p.mul(V::splat(self.l2)));
        }
        if self.decay != 1.0 {
            p = p.mul(V::splat(self.decay));
        }
        // torch's lerp picks the formulation that is exact at its nearer end.
        let m = if self.lerp_weight < 0.5 {
            m.add(V::splat(self.lerp_weight).mul(g.sub(m)))
        } else {
            g.sub(g.sub(m).mul(V::splat(self.lerp_complement)))
        };
        let v = v.mul(V::splat(self.beta2)).add(V::splat(self.one_minus_beta2).mul(g).mul(g));
        let v_denom = if self.amsgrad != 0 {
            let v_max = v.max(V::load(ptrs.max_exp_avg_sq.at(i)));
            v_max.store(ptrs.max_exp_avg_sq.at(i));
            v_max
        } else {
            v
        };
        let denom = v_denom.sqrt().div(V::splat(self.bias_correction2_sqrt)).add(V::splat(self.eps));
        let p = p.add(V::splat(self.neg_step_size).mul(m).div(denom));
        m.store(ptrs.exp_avg.at(i));
        v.store(ptrs.exp_avg_sq.at(i));
        p
    }
}

/// One Adam/AdamW step of a param group.
///
/// Tensors with `stepped[i]` are updated with their own step count `steps[i] + 1` (bias
/// correction is per tensor, as in torch) and their counter advanced; the others are left
/// untouched, like parameters whose `.grad` is `None` in torch.
///
/// f32 parameters are shown in the [crate docs](crate). Here AdamW steps bf16 weights (raw bits)
/// with f32 moments, each new weight rounded back stochastically: the random bits depend only on
/// the seed, step, element and stream, so a run is reproducible bit for bit.
///
/// ```
/// use smallbatch_core::driver::Rounding;
/// use smallbatch_core::rounding::{bf16_to_f32, round_bf16_nearest};
/// use smallbatch_core::rules::adam::{adam_step, AdamBuffers, AdamHyper};
/// use smallbatch_core::rules::Params;
/// use smallbatch_core::{Executor, SegmentTable};
///
/// let table = SegmentTable::packed(&[4]).unwrap();
/// let hp = AdamHyper { lr: 1e-3, weight_decay: 1e-2, decoupled_weight_decay: true, ..AdamHyper::default() };
/// let start = [1.0f32, -2.0, 0.5, 3.0];
/// let run = |seed: u64| {
///     let mut param: Vec<u16> = start.iter().map(|&x| round_bf16_nearest(x)).collect();
///     let grad: Vec<u16> = [0.1f32, -0.3, 0.2, 0.05].iter().map(|&x| round_bf16_nearest(x)).collect();
///     let (mut m, mut v) = (vec![0f32; 4], vec![0f32; 4]);
///     let mut steps = vec![0.0];
///     let rounding = Rounding::Stochastic { seed, stream: 0 };
///     for _ in 0..10 {
///         let params = Params::Bf16 { param: &mut param, grad: &grad, rounding };
///         let bufs = AdamBuffers { params, exp_avg: &mut m, exp_avg_sq: &mut v, max_exp_avg_sq: None };
///         adam_step(Executor::global().unwrap(), &table, &[true], &mut steps, bufs, &hp).unwrap();
///     }
///     param
/// };
/// let param = run(7);
/// assert_eq!(param, run(7));
/// // Ten steps of about lr each against the gradient, give or take a bf16 spacing (2^-7 near 1).
/// for (&p, &x0) in param.iter().zip(&start) {
///     assert!((bf16_to_f32(p) - x0).abs() <= 10.0 * 1e-3 + x0.abs() / 128.0);
/// }
/// ```
pub fn adam_step(
    exec: &Executor,
    table: &SegmentTable,
    stepped: &[bool],
    steps: &mut [f64],
    bufs: AdamBuffers<'_>,
    hp: &AdamHyper,
) -> Result<()> {
    hp.validate()?;
    let total = table.total();
    let mut params = bufs.params;
    let io = params.io(table)?;
    check_addresses(table, stepped, &io)?;
    check_len("exp_avg", bufs.exp_avg.len(), total)?;
    check_len("exp_avg_sq", bufs.exp_avg_sq.len(), total)?;
    let max_exp_avg_sq = match bufs.max_exp_avg_sq {
        Some(m) => {
            check_len("max_exp_avg_sq", m.len(), total)?;
            SyncPtr::new(m)
        }
        None if hp.amsgrad => return Err(Error::invalid("max_exp_avg_sq", "missing", "given with amsgrad")),
        None => SyncPtr(std::ptr::null_mut()),
    };
    let runs = table.plan_step(stepped, steps)?;
    let kernels = kernels_by_step(&runs, |step| AdamConsts::new(hp, step));
    let ptrs =
        AdamPtrs { exp_avg: SyncPtr::new(bufs.exp_avg), exp_avg_sq: SyncPtr::new(bufs.exp_avg_sq), max_exp_avg_sq };
    // SAFETY: the state buffers were checked to hold `total` elements and the parameters to fit
    // the table; runs lie inside their tensors, and the borrows above (or the promise of
    // `TensorAddresses::new`) give us exclusive access for the duration of the call.
    unsafe { exec.run(&kernels, &runs, table, ptrs, io.raw()) };
    Ok(())
}
