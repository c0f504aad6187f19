//! Muon: momentum, then Newton-Schulz orthogonalisation of each weight matrix, as torch.optim.Muon
//! (with the orthogonalisation in f32, natively).
//!
//! For each matrix `W` (rows x cols) of a tensor with gradient `G` (negated when maximizing) and
//! momentum buffer `B`:
//!
//! ```text
//! B = momentum B + (1 - momentum) G             an EMA (torch's lerp)
//! U = G + momentum (B - G)   if nesterov   else   B
//! O = NewtonSchulz(U)                           the quintic iteration, see crate::newton_schulz
//! W = W (1 - lr weight_decay) - lr s O          decoupled weight decay
//! s = sqrt(max(1, rows / cols))                 "original" (torch's default)
//!   = 0.2 sqrt(max(rows, cols))                 "match_rms_adamw": the update's RMS matches AdamW's
//!   = 1                                          none
//! ```
//!
//! A tensor with more than two dims is a batch of matrices over its last two dims (the paper's
//! per-head orthogonalisation), or one matrix if the caller flattens it: the segment table says.

use super::{check_addresses, check_len, lerp, read_grad, read_param, store_bf16, Params, SyncPtr};
use crate::driver::{Executor, ParamIo, TensorIo};
use crate::error::{check_beta, check_non_negative, Error, Result};
use crate::newton_schulz::{NewtonSchulz, NewtonSchulzWorkspace, SMALL_MATRIX};
use crate::segments::SegmentTable;
use crate::simd::SimdPath;
use rayon::prelude::*;

/// How the learning rate is scaled by each matrix's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrAdjust {
    /// `sqrt(max(1, rows / cols))`, torch.optim.Muon's default.
    Original,
    /// `0.2 sqrt(max(rows, cols))`: the update's RMS matches AdamW's, so AdamW learning rates carry over.
    MatchRmsAdamW,
    /// No scaling.
    None,
}

impl LrAdjust {
    /// The factor that scales the learning rate of a `rows x cols` matrix: `sqrt(max(1, rows /
    /// cols))`, `0.2 sqrt(max(rows, cols))` or 1. The CUDA step takes it from here, so both
    /// devices scale alike.
    ///
    /// ```
    /// use smallbatch_core::rules::muon::LrAdjust;
    /// assert_eq!(LrAdjust::Original.factor(8, 2), 2.0);
    /// assert_eq!(LrAdjust::Original.factor(2, 8), 1.0); // wide matrices are not scaled down
    /// assert_eq!(LrAdjust::MatchRmsAdamW.factor(16, 4), 0.2 * 4.0);
    /// assert_eq!(LrAdjust::None.factor(16, 4), 1.0);
    /// ```
    pub fn factor(self, rows: usize, cols: usize) -> f64 {
        match self {
            LrAdjust::Original => (1f64).max(rows as f64 / cols as f64).sqrt(),
            LrAdjust::MatchRmsAdamW => 0.2 * (rows.max(cols) as f64).sqrt(),
            LrAdjust::None => 1.0,
        }
    }
}

/// Muon hyperparameters, with torch.optim.Muon's names and meaning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MuonHyper {
    /// Learning rate.
    pub lr: f64,
    /// Momentum EMA coefficient in [0, 1).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// The orthogonalisation.
    pub newton_schulz: NewtonSchulz,
    /// Learning-rate scaling by shape.
    pub adjust_lr: LrAdjust,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl Default for MuonHyper {
    /// torch.optim.Muon's defaults.
    fn default() -> Self {
        MuonHyper {
            lr: 1e-3,
            momentum: 0.95,
            nesterov: true,
            weight_decay: 0.1,
            newton_schulz: NewtonSchulz::default(),
            adjust_lr: LrAdjust::Original,
            maximize: false,
        }
    }
}

impl MuonHyper {
    /// Checks every hyperparameter, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        check_non_negative("lr", self.lr)?;
        check_beta("momentum", self.momentum)?;
        check_non_negative("weight_decay", self.weight_decay)?;
        self.newton_schulz.validate()
    }
}

/// The buffers Muon reads and writes.
#[derive(Debug)]
pub struct MuonBuffers<'a> {
    /// Parameters (updated in place) and gradients: flat, or each tensor's own memory (each
    /// tensor's matrices row-major).
    pub params: Params<'a>,
    /// Momentum buffers, flat (`table.total()`).
    pub momentum: &'a mut [f32],
}

#[derive(Clone, Copy)]
struct Ptrs {
    io: ParamIo,
    momentum: SyncPtr<f32>,
}

/// One Muon step of a param group (every tensor is a batch of row-major matrices, as the table
/// describes).
///
/// ```
/// use smallbatch_core::rules::muon::{muon_step, MuonBuffers, MuonHyper};
/// use smallbatch_core::rules::Params;
/// use smallbatch_core::{Executor, SegmentTable};
///
/// // One 2x3 weight matrix whose gradient is twice as large along its second row.
/// let table = SegmentTable::with_matrices(&[[1, 2, 3]]).unwrap();
/// let mut param = vec![0.0f32; 6];
/// let grad = vec![1.0f32, 0.0, 0.0, 0.0, 2.0, 0.0];
/// let mut momentum = vec![0.0f32; 6];
/// let mut steps = vec![0.0];
/// let hp = MuonHyper { lr: 0.1, weight_decay: 0.0, ..MuonHyper::default() };
/// let bufs = MuonBuffers { params: Params::F32 { param: &mut param, grad: &grad }, momentum: &mut momentum };
/// muon_step(Executor::global().unwrap(), &table, &[true], &mut steps, bufs, &hp).unwrap();
/// // Orthogonalisation evens out the directions: both move by about lr (the quintic leaves
/// // singular values in roughly [0.7, 1.2]), not one twice the other.
/// let (a, b) = (-param[0], -param[4]);
/// assert!((0.05..0.15).contains(&a) && (0.05..0.15).contains(&b), "{a} {b}");
/// ```
pub fn muon_step(
    exec: &Executor,
    table: &SegmentTable,
    stepped: &[bool],
    steps: &mut [f64],
    bufs: MuonBuffers<'_>,
    hp: &MuonHyper,
) -> Result<()> {
    hp.validate()?;
    let total = table.total();
    let mut params = bufs.params;
    let io = params.io(table)?;
    check_addresses(table, stepped, &io)?;
    check_len("momentum_buffer", bufs.momentum.len(), total)?;
    for i in 0..table.len() {
        let [_, rows, cols] = table.matrix(i);
        if stepped.get(i) == Some(&true) && table.numels()[i] > 0 && (rows == 0 || cols == 0) {
            return Err(Error::Segments(format!("tensor {i}: not a matrix")));
        }
    }
    table.plan_step(stepped, steps)?;
    let ptrs = Ptrs { io: io.raw(), momentum: SyncPtr::new(bufs.momentum) };
    // (tensor, matrix index) of every matrix to step
    let matrices: Vec<(usize, usize)> = (0..table.len())
        .filter(|&i| stepped[i] && table.numels()[i] > 0)
        .flat_map(|i| (0..table.matrix(i)[0]).map(move |b| (i, b)))
        .collect();
    let (small, large): (Vec<_>, Vec<_>) = matrices.iter().partition(|&&(i, _)| {
        let [_, r, c] = table.matrix(i);
        r * c <= SMALL_MATRIX
    });
    // Each matrix is orthogonalised with a single-threaded GEMM when small (in parallel with the
    // others) and with the executor's threads when large; the Newton-Schulz result does not
    // depend on the thread count, so neither does the step.
    let single = Executor::new(SimdPath::Scalar, 1)?;
    let errors: Vec<Error> = exec.install(|| {
        small
            .par_iter()
            .map_init(NewtonSchulzWorkspace::new, |ws, &(i, b)| unsafe {
                step_matrix(&single, ws, table, steps, ptrs, hp, i, b)
            })
            .filter_map(|r| r.err())
            .collect()
    });
    if let Some(err) = errors.into_iter().next() {
        return Err(err);
    }
    let mut ws = NewtonSchulzWorkspace::new();
    for (i, b) in large {
        // SAFETY: as above, one matrix at a time.
        unsafe { step_matrix(exec, &mut ws, table, steps, ptrs, hp, i, b)? };
    }
    Ok(())
}

/// Momentum, orthogonalisation and update of matrix `b` of tensor `i`.
///
/// # Safety
/// The matrix's elements must be in bounds of every buffer and touched by no other thread.
#[allow(clippy::too_many_arguments)]
unsafe fn step_matrix(
    exec: &Executor,
    ws: &mut NewtonSchulzWorkspace,
    table: &SegmentTable,
    steps: &[f64],
    ptrs: Ptrs,
    hp: &MuonHyper,
    i: usize,
    b: usize,
) -> Result<()> {
    let [_, rows, cols] = table.matrix(i);
    let n = rows * cols;
    let mut update = vec![0f32; n];
    momentum(ptrs, table, hp, i, b * n, &mut update);
    let mut ortho = vec![0f32; n];
    ws.orthogonalize(exec, &update, rows, cols, &hp.newton_schulz, &mut ortho)?;
    apply(ptrs, table, steps, hp, i, b * n, &ortho, (rows, cols));
    Ok(())
}

/// The momentum step of elements `first..first + update.len()` of tensor `i`: updates their
/// momentum buffer and writes the input of the orthogonalisation, `U`, to `update`.
///
/// # Safety
/// The elements must be in bounds of every buffer and touched by no other thread.
unsafe fn momentum(ptrs: Ptrs, table: &SegmentTable, hp: &MuonHyper, i: usize, first: usize, update: &mut [f32]) {
    let n = update.len();
    let g = read_grad(ptrs.io.tensor(i, first), n);
    let buf = std::slice::from_raw_parts_mut(ptrs.momentum.at(table.offsets()[i] + first), n);
    let sign = if hp.maximize { -1.0f32 } else { 1.0 };
    let w = (1.0 - hp.momentum) as f32;
    let mu = hp.momentum as f32;
    for k in 0..n {
        let gk = sign * g[k];
        buf[k] = lerp(buf[k], gk, w);
        update[k] = if hp.nesterov { lerp(gk, buf[k], mu) } else { buf[k] };
    }
}

/// `W = W (1 - lr weight_decay) - lr s O` on elements `first..first + ortho.len()` of tensor `i`,
/// `s` scaling by `shape`, the `(rows, cols)` of the whole matrix.
///
/// # Safety
/// As for [`momentum`].
#[allow(clippy::too_many_arguments)]
unsafe fn apply(
    ptrs: Ptrs,
    table: &SegmentTable,
    steps: &[f64],
    hp: &MuonHyper,
    i: usize,
    first: usize,
    ortho: &[f32],
    (rows, cols): (usize, usize),
) {
    let n = ortho.len();
    let tio = ptrs.io.tensor(i, first);
    let decay = (1.0 - hp.lr * hp.weight_decay) as f32;
    let neg_lr = (-hp.lr * hp.adjust_lr.factor(rows, cols)) as f32;
    match tio {
        TensorIo::F32 { param, .. } => {
            let p = std::slice::from_raw_parts_mut(param, n);
            for (p, &o) in p.iter_mut().zip(ortho) {
                *p = *p * decay + neg_lr * o;
            }
        }
        TensorIo::Bf16 { param, rounding, draw_shift, .. } => {
            let mut p = read_param(tio, n).into_owned();
            for (p, &o) in p.iter_mut().zip(ortho) {
                *p = *p * decay + neg_lr * o;
            }
            let draw = ((table.offsets()[i] + first) as i64).wrapping_add(draw_shift) as usize;
            store_bf16(param, draw, &p, rounding, steps[i] as u64);
        }
    }
}

/// Checks that `whole[i]`, the `(rows, cols)` of tensor `i`'s whole matrices, can hold the
/// shard the table describes, for every stepped tensor.
pub fn check_whole_shapes(table: &SegmentTable, stepped: &[bool], whole: &[(usize, usize)]) -> Result<()> {
    check_len("whole shapes", whole.len(), table.len())?;
    for (i, &(rows, cols)) in whole.iter().enumerate() {
        let [_, r, c] = table.matrix(i);
        if stepped.get(i) == Some(&true)
            && (rows == 0 || cols == 0 || (table.numels()[i] > 0 && (c != cols || r > rows)))
        {
            return Err(Error::Segments(format!(
                "tensor {i}: a shard of {r}x{c} matrices is not part of whole {rows}x{cols} matrices"
            )));
        }
    }
    Ok(())
}

/// One Muon step of the local shards of a group whose matrices are spread over ranks (FSDP2
/// shards them on dim 0): the momentum of this rank's elements, then `orthogonalize`, which gets
/// the `U` of every stepped tensor's local elements (back to back in tensor order, each tensor's
/// row-major) and must replace them with this rank's elements of the orthogonalised whole
/// matrices (the caller gathers each matrix to one rank, orthogonalises it there and scatters
/// it back: see smallbatch_rs's Muon), then the update. `whole[i]` is the `(rows, cols)` of
/// tensor `i`'s whole matrices, which scale its learning rate.
///
/// Every element's update is the unsharded step's; the random bits of stochastic rounding are
/// each element's own (see [`TensorAddresses::with_draw_offsets`](super::TensorAddresses::with_draw_offsets)).
/// When `orthogonalize` fails, its error is returned with the momentum buffers updated and the
/// parameters and step counts not.
#[allow(clippy::too_many_arguments)]
pub fn muon_step_sharded(
    exec: &Executor,
    table: &SegmentTable,
    stepped: &[bool],
    steps: &mut [f64],
    bufs: MuonBuffers<'_>,
    hp: &MuonHyper,
    whole: &[(usize, usize)],
    orthogonalize: &mut dyn FnMut(&mut [f32]) -> Result<()>,
) -> Result<()> {
    hp.validate()?;
    let mut params = bufs.params;
    let io = params.io(table)?;
    check_addresses(table, stepped, &io)?;
    check_len("momentum_buffer", bufs.momentum.len(), table.total())?;
    check_whole_shapes(table, stepped, whole)?;
    let mut new_steps = steps.to_vec();
    table.plan_step(stepped, &mut new_steps)?;
    let ptrs = Ptrs { io: io.raw(), momentum: SyncPtr::new(bufs.momentum) };
    let taking_part: Vec<usize> = (0..table.len()).filter(|&i| stepped[i]).collect();
    let mut starts = Vec::with_capacity(taking_part.len() + 1);
    starts.push(0);
    for &i in &taking_part {
        starts.push(starts.last().copied().unwrap_or(0) + table.numels()[i]);
    }
    let mut updates = vec![0f32; *starts.last().unwrap_or(&0)];
    let out = SyncPtr::new(&mut updates);
    // SAFETY (both passes): each task touches one tensor's elements and its own slice of `updates`.
    exec.install(|| {
        (0..taking_part.len()).into_par_iter().for_each(|k| unsafe {
            let u = std::slice::from_raw_parts_mut(out.at(starts[k]), starts[k + 1] - starts[k]);
            momentum(ptrs, table, hp, taking_part[k], 0, u);
        })
    });
    orthogonalize(&mut updates)?;
    let new_steps = &new_steps;
    exec.install(|| {
        (0..taking_part.len()).into_par_iter().for_each(|k| unsafe {
            let i = taking_part[k];
            apply(ptrs, table, new_steps, hp, i, 0, &updates[starts[k]..starts[k + 1]], whole[i]);
        })
    });
    steps.copy_from_slice(new_steps);
    Ok(())
}
