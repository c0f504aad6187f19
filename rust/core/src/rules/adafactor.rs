//! Adafactor (Shazeer & Stern, 2018) over a param group, with the options of both
//! torch.optim.Adafactor and the paper's optax chain (Marek et al., 2025).
//!
//! For a tensor seen as `batch` matrices of `R x C` (its last two dims) with gradient `G`
//! (negated when maximizing), parameter `P`, and its own step count `t`:
//!
//! ```text
//! beta2_t = beta2                          constant EMA (a half-life in tokens: the paper's rule)
//!         = 1 - t^decay                    or torch's decay schedule (decay <= 0, torch: -0.8)
//! factored (per matrix):
//!     r = beta2_t r + (1 - beta2_t) mean_cols(G^2 + eps1)        row EMA, R values
//!     c = beta2_t c + (1 - beta2_t) mean_rows(G^2 + eps1)        column EMA, C values
//!     V = r c^T / mean(r)
//! unfactored:
//!     V = beta2_t V + (1 - beta2_t) (G^2 + eps1)
//! U = G / sqrt(V)                          update; factored, as G * min(a_i b_j, 1/eps) with
//!                                          a = 1/sqrt(r), b = 1/sqrt(c / mean(r)) (below)
//! U = U / max(1, RMS(U) / d)               clipping by the update's RMS over the whole tensor
//! M = beta1 M + (1 - beta1) U; U = M       optional momentum (beta1 > 0)
//! rho = lr, or min(lr, 1/sqrt(t))          torch caps the step size at 1/sqrt(t)
//! alpha = rho * max(eps2, RMS(P))          relative step (switchable: alpha = rho)
//! P = P (1 - lr weight_decay) - alpha U    decoupled weight decay, RMS(P) taken before it
//! ```
//!
//! `eps1 = Some(e)` adds `e` to `G^2` (the paper's code: 1e-30). `eps1 = None` is torch's
//! handling instead: no addition, but `mean(r)` is clamped below at `f32::EPSILON` and `V` at
//! `f32::EPSILON^2`.
//!
//! A factored `1/sqrt(V_ij)` is the product of a row factor `a_i = 1/sqrt(r_i)` and a column
//! factor `b_j = 1/sqrt(c_j / mean(r))`, each computed once per row and column, and the floor of
//! `V` becomes a ceiling: `1/sqrt(max(V, eps^2)) = min(a_i b_j, 1/eps)`. Each element then costs
//! two multiplications and a minimum instead of two divisions and a square root (the same value
//! up to rounding in the last bits; the CUDA kernels compute the same factors with the same
//! correctly rounded operations, so the devices agree bit for bit).
//!
//! Whether a tensor is factored is the caller's choice (`factored[i]`): the paper factors when
//! the smaller of the last two dims is at least 128, torch every tensor with two or more dims.
//! Reductions accumulate in f64 over a fixed partition of each tensor, each in eight lanes
//! (element `k` of a span in lane `k % 8`, the same on every SIMD path) with a fixed fold, so
//! results depend neither on the thread count nor on the SIMD path.
//!
//! The per-item loops are written once over [`F32Lanes`] and compiled per path (as the
//! elementwise driver does); bf16 parameters and gradients are widened in registers. A small
//! tensor goes through all phases on one thread, in that core's cache; larger tensors are
//! stepped a cache-sized group at a time, groups pipelined. Rows of a factored tensor whose
//! gradient is all zeros have a zero update and are skipped where that changes no bit (see
//! `Factors::zero_row`): at batch size 1 that is most of a token embedding.

mod sharded;

pub use sharded::{adafactor_step_sharded, Shards, Split};

use super::{check_addresses, check_len, lerp, Params, SyncPtr};
use crate::driver::{Executor, ParamIo, Rounding, TensorIo, CHUNK};
use crate::error::{check_beta, check_non_negative, Error, Result};
use crate::philox::fill_random_u16;
use crate::segments::SegmentTable;
use crate::simd::{F32Lanes, SimdPath};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Where beta2 comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Beta2 {
    /// A constant EMA coefficient in [0, 1) (from a half-life in tokens, or given).
    Constant(f64),
    /// torch.optim.Adafactor's schedule `beta2_t = 1 - t^decay`, `decay <= 0`.
    Decay(f64),
}

/// Adafactor hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdafactorHyper {
    /// Learning rate.
    pub lr: f64,
    /// Momentum coefficient; 0 disables momentum and its buffer.
    pub beta1: f64,
    /// Second-moment coefficient.
    pub beta2: Beta2,
    /// Added to `G^2` (`Some`, the paper's 1e-30), or torch's clamps (`None`).
    pub eps1: Option<f64>,
    /// Floor of the parameter RMS in the relative step size.
    pub eps2: f64,
    /// Update clipping threshold `d` (>= 1) on the update's RMS.
    pub clip_threshold: f64,
    /// Scale the step by `max(eps2, RMS(P))`.
    pub relative_step: bool,
    /// Cap the step size at `1/sqrt(t)` (torch.optim.Adafactor does).
    pub cap_lr_at_inv_sqrt_step: bool,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl Default for AdafactorHyper {
    /// torch.optim.Adafactor's defaults.
    fn default() -> Self {
        AdafactorHyper {
            lr: 1e-2,
            beta1: 0.0,
            beta2: Beta2::Decay(-0.8),
            eps1: None,
            eps2: 1e-3,
            clip_threshold: 1.0,
            relative_step: true,
            cap_lr_at_inv_sqrt_step: true,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

impl AdafactorHyper {
    /// Checks every hyperparameter, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        check_non_negative("lr", self.lr)?;
        check_beta("beta1", self.beta1)?;
        match self.beta2 {
            Beta2::Constant(b) => check_beta("beta2", b)?,
            Beta2::Decay(d) => {
                if !(d.is_finite() && d <= 0.0) {
                    return Err(Error::invalid("beta2_decay", d, "finite and <= 0"));
                }
            }
        }
        if let Some(e) = self.eps1 {
            check_non_negative("eps1", e)?;
        }
        check_non_negative("eps2", self.eps2)?;
        if !(self.clip_threshold.is_finite() && self.clip_threshold >= 1.0) {
            return Err(Error::invalid("clip_threshold", self.clip_threshold, "finite and >= 1"));
        }
        check_non_negative("weight_decay", self.weight_decay)
    }

    /// The second-moment coefficient `beta2_t` at a tensor's step `step` (counted from 1):
    /// the constant, or torch's schedule `1 - step^decay`. The second moments move by
    /// `1 - beta2_t` per step; the CUDA kernels take that weight from here, so both devices
    /// follow the same schedule.
    ///
    /// ```
    /// use smallbatch_core::rules::adafactor::{AdafactorHyper, Beta2};
    /// let constant = AdafactorHyper { beta2: Beta2::Constant(0.999), ..AdafactorHyper::default() };
    /// assert_eq!(constant.beta2_at(7), 0.999);
    /// // torch's default decay -0.8: the first step replaces the moments outright.
    /// let decay = AdafactorHyper::default();
    /// assert_eq!(decay.beta2_at(1), 0.0);
    /// assert_eq!(decay.beta2_at(10), 1.0 - 10f64.powf(-0.8));
    /// ```
    pub fn beta2_at(&self, step: u64) -> f64 {
        match self.beta2 {
            Beta2::Constant(b) => b,
            Beta2::Decay(d) => 1.0 - (step as f64).powf(d),
        }
    }
}

/// Where each tensor's second-moment state lives: factored tensors have `batch * rows` row and
/// `batch * cols` column values, unfactored ones a full-size `variance`, each packed in tensor
/// order in its own flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdafactorLayout {
    /// Whether tensor `i` is factored.
    pub factored: Vec<bool>,
    /// Offset of tensor `i`'s row EMA in the `row_var` buffer (factored tensors).
    pub row_offsets: Vec<usize>,
    /// Offset of tensor `i`'s column EMA in the `col_var` buffer (factored tensors).
    pub col_offsets: Vec<usize>,
    /// Offset of tensor `i`'s second moment in the `variance` buffer (unfactored tensors).
    pub variance_offsets: Vec<usize>,
    /// Length of the `row_var` buffer.
    pub row_total: usize,
    /// Length of the `col_var` buffer.
    pub col_total: usize,
    /// Length of the `variance` buffer.
    pub variance_total: usize,
}

impl AdafactorLayout {
    /// Lays out the state of `table`'s tensors; `factored[i]` needs `cols >= 1` and, unless
    /// the tensor is a shard holding none of a larger tensor's rows (which keeps its copy of the
    /// column EMAs: see [`adafactor_step_sharded`]), `rows >= 1`.
    pub fn new(table: &SegmentTable, factored: &[bool]) -> Result<AdafactorLayout> {
        check_len("factored", factored.len(), table.len())?;
        let (mut rows, mut cols, mut var) = (0, 0, 0);
        let mut layout = AdafactorLayout {
            factored: factored.to_vec(),
            row_offsets: Vec::with_capacity(table.len()),
            col_offsets: Vec::with_capacity(table.len()),
            variance_offsets: Vec::with_capacity(table.len()),
            row_total: 0,
            col_total: 0,
            variance_total: 0,
        };
        for (i, &f) in factored.iter().enumerate() {
            let [b, r, c] = table.matrix(i);
            layout.row_offsets.push(rows);
            layout.col_offsets.push(cols);
            layout.variance_offsets.push(var);
            if f {
                if c == 0 {
                    return Err(Error::Segments(format!("tensor {i}: cannot factor a {b}x{r}x{c} tensor")));
                }
                rows += b * r;
                cols += b * c;
            } else {
                var += table.numels()[i];
            }
        }
        layout.row_total = rows;
        layout.col_total = cols;
        layout.variance_total = var;
        Ok(layout)
    }
}

/// The buffers Adafactor reads and writes; the state is flat, laid out by the table and layout.
#[derive(Debug)]
pub struct AdafactorBuffers<'a> {
    /// Parameters (updated in place) and gradients, flat or each tensor's own memory (its
    /// matrices row-major), f32 or bf16 (AdafactorSR: the update is computed in f32 and
    /// stochastically rounded back).
    pub params: Params<'a>,
    /// Row EMAs (`layout.row_total`).
    pub row_var: &'a mut [f32],
    /// Column EMAs (`layout.col_total`).
    pub col_var: &'a mut [f32],
    /// Unfactored second moments (`layout.variance_total`).
    pub variance: &'a mut [f32],
    /// Momentum (`table.total()`), required when `beta1 > 0`.
    pub exp_avg: Option<&'a mut [f32]>,
}

#[derive(Clone, Copy)]
struct Ptrs {
    io: ParamIo,
    row_var: SyncPtr<f32>,
    col_var: SyncPtr<f32>,
    variance: SyncPtr<f32>,
    exp_avg: SyncPtr<f32>,
}

/// A piece of one tensor: rows `row0..row1` of matrix `batch` (factored), or elements
/// `row0..row1` of the whole tensor (unfactored). The partition depends only on the shape.
#[derive(Clone, Copy, Debug)]
struct Item {
    tensor: usize,
    batch: usize,
    row0: usize,
    row1: usize,
}

/// Per-tensor values of one step.
#[derive(Clone, Copy, Debug, Default)]
struct TensorPlan {
    step: u64,
    /// `1 - beta2_t`, the lerp weight of the second moments.
    weight2: f32,
    /// Sum of `P^2` (f64).
    param_sq: f64,
    /// Sum of `U^2` before clipping (f64).
    update_sq: f64,
    /// `-alpha / max(1, RMS(U)/d)` or, with momentum, the clipping factor `1/max(..)`.
    scale: f32,
    /// `-alpha` (momentum path).
    neg_alpha: f32,
    /// `1 - lr * weight_decay`.
    decay: f32,
}

fn items_for(table: &SegmentTable, factored: &[bool], i: usize) -> Vec<Item> {
    let [batch, rows, _] = table.matrix(i);
    let numel = table.numels()[i];
    if numel == 0 {
        return Vec::new();
    }
    if factored[i] {
        // Blocks of whole rows of about CHUNK elements, at most 64 per matrix to bound the
        // per-block column partials.
        let blocks = numel.div_ceil(batch).div_ceil(CHUNK).clamp(1, 64);
        let rows_per_block = rows.div_ceil(blocks).max(1);
        (0..batch)
            .flat_map(|b| {
                (0..rows).step_by(rows_per_block).map(move |r0| Item {
                    tensor: i,
                    batch: b,
                    row0: r0,
                    row1: (r0 + rows_per_block).min(rows),
                })
            })
            .collect()
    } else {
        (0..numel)
            .step_by(CHUNK)
            .map(|e0| Item { tensor: i, batch: 0, row0: e0, row1: (e0 + CHUNK).min(numel) })
            .collect()
    }
}

thread_local! {
    /// The caller thread's buffer of row and column factors (`row_total + col_total`), reused from
    /// step to step: a fresh one would cost its page faults every step.
    static FACTORS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// Likewise, which rows of factored tensors have an all-zero gradient (`row_total`).
    static ZERO_ROWS: std::cell::Cell<Vec<bool>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Where phase 2 leaves a factored tensor's per-row and per-column values for phases 3 and 5.
#[derive(Clone, Copy)]
struct Factors {
    /// Row factors `1/sqrt(r_i)`, `batch * rows`.
    row: *mut f32,
    /// Column factors `1/sqrt(c_j / mean(r))`, `batch * cols`.
    col: *mut f32,
    /// Rows whose gradient is all zeros (sum of squares 0), `batch * rows`: their update is
    /// zero, so phase 3 skips them (they add nothing), and so does phase 5 when the step has
    /// neither weight decay nor momentum (the parameters stay as they are). At batch size 1 most
    /// rows of a token embedding are such rows.
    zero_row: *mut bool,
}

/// Bytes of parameters, gradients and per-element state a group of tensors may touch: well
/// inside the last-level cache of small machines, so that the group's data survives from one
/// phase to the next.
const GROUP_BYTES: usize = 8 << 20;

/// Bytes of tensor `i`'s parameters, gradients and per-element state (momentum, and an
/// unfactored tensor's second moment): what a step streams through the cache for it.
fn tensor_bytes(table: &SegmentTable, layout: &AdafactorLayout, io: &ParamIo, momentum: bool, i: usize) -> usize {
    let params_and_grads = 2 * io.storage().element_bytes();
    let state = if momentum { 4 } else { 0 } + if layout.factored[i] { 0 } else { 4 };
    table.numels()[i] * (params_and_grads + state)
}

/// Tensors of at most this many bytes (parameters, gradients, per-element state) go through all
/// phases at once on one thread ([`WholeTensor`]): their data stays in that core's own cache from
/// the first read to the last write.
const SMALL_TENSOR_BYTES: usize = 256 << 10;

/// Splits `active` into runs of consecutive tensors of at most [`GROUP_BYTES`] each (a larger
/// tensor is a group of its own). Depends only on the shapes and the storage.
fn groups<'a>(
    table: &SegmentTable,
    layout: &AdafactorLayout,
    active: &'a [usize],
    io: &ParamIo,
    momentum: bool,
) -> Vec<&'a [usize]> {
    let mut out = Vec::new();
    let (mut first, mut bytes) = (0, 0);
    for (k, &i) in active.iter().enumerate() {
        let b = tensor_bytes(table, layout, io, momentum, i);
        if k > first && bytes + b > GROUP_BYTES {
            out.push(&active[first..k]);
            (first, bytes) = (k, 0);
        }
        bytes += b;
    }
    if first < active.len() {
        out.push(&active[first..]);
    }
    out
}

/// One Adafactor step of a param group.
///
/// Tensors with `stepped[i]` are updated with their own step count and their counter advanced;
/// the others are left untouched.
///
/// ```
/// use smallbatch_core::rules::adafactor::{adafactor_step, AdafactorBuffers, AdafactorHyper, AdafactorLayout, Beta2};
/// use smallbatch_core::rules::Params;
/// use smallbatch_core::{halflife, Executor, SegmentTable};
///
/// // A 4x3 weight matrix, factored (4 row and 3 column statistics instead of 12), and a bias of
/// // 3 with a full second moment.
/// let table = SegmentTable::with_matrices(&[[1, 4, 3], [1, 1, 3]]).unwrap();
/// let layout = AdafactorLayout::new(&table, &[true, false]).unwrap();
/// assert_eq!((layout.row_total, layout.col_total, layout.variance_total), (4, 3, 3));
///
/// let mut param = vec![0.1f32; 15];
/// let grad: Vec<f32> = (0..15).map(|i| (i as f32 - 7.0) / 8.0).collect();
/// let (mut row_var, mut col_var, mut variance) = (vec![0f32; 4], vec![0f32; 3], vec![0f32; 3]);
/// let mut steps = vec![0.0; 2];
/// // The paper's setup: beta2 from a half-life in tokens, eps1 = 1e-30 added to G^2, no step cap.
/// let hp = AdafactorHyper {
///     lr: 1e-2,
///     beta2: Beta2::Constant(halflife::beta_from_halflife(10e6, 512.0).unwrap()),
///     eps1: Some(1e-30),
///     cap_lr_at_inv_sqrt_step: false,
///     ..AdafactorHyper::default()
/// };
/// let bufs = AdafactorBuffers {
///     params: Params::F32 { param: &mut param, grad: &grad },
///     row_var: &mut row_var,
///     col_var: &mut col_var,
///     variance: &mut variance,
///     exp_avg: None,
/// };
/// adafactor_step(Executor::global().unwrap(), &table, &layout, &[true, true], &mut steps, bufs, &hp).unwrap();
/// // Every parameter moved against its gradient (the one with a zero gradient stayed).
/// assert!(param.iter().zip(&grad).all(|(p, g)| (0.1 - p) * g >= 0.0));
/// assert_eq!(param[7], 0.1);
/// ```
pub fn adafactor_step(
    exec: &Executor,
    table: &SegmentTable,
    layout: &AdafactorLayout,
    stepped: &[bool],
    steps: &mut [f64],
    bufs: AdafactorBuffers<'_>,
    hp: &AdafactorHyper,
) -> Result<()> {
    step_with(exec, table, layout, stepped, steps, bufs, hp, SMALL_TENSOR_BYTES)
}

/// [`adafactor_step`] with tensors of at most `small_tensor_bytes` stepped whole on one thread
/// (tests compare the two schedules bit for bit).
#[allow(clippy::too_many_arguments)]
fn step_with(
    exec: &Executor,
    table: &SegmentTable,
    layout: &AdafactorLayout,
    stepped: &[bool],
    steps: &mut [f64],
    bufs: AdafactorBuffers<'_>,
    hp: &AdafactorHyper,
    small_tensor_bytes: usize,
) -> Result<()> {
    hp.validate()?;
    check_len("factored", layout.factored.len(), table.len())?;
    let mut params = bufs.params;
    let io = params.io(table)?;
    check_addresses(table, stepped, &io)?;
    let ptrs = state_ptrs(table, layout, hp, io.raw(), bufs.row_var, bufs.col_var, bufs.variance, bufs.exp_avg)?;
    table.plan_step(stepped, steps)?;
    let momentum = hp.beta1 != 0.0;
    let active: Vec<usize> = (0..table.len()).filter(|&i| stepped[i] && table.numels()[i] > 0).collect();
    let mut plans = plans_for(table, hp, steps, &active);
    let k = Consts::new(hp);
    let path = exec.path();
    let consts2 = Phase2Consts::new(hp, path);
    let beta1 = hp.beta1 as f32;
    // Row factors at `row_offsets[i]`, column factors at `row_total + col_offsets[i]`: written by
    // phase 2 of a tensor's group, read by its phases 3 and 5.
    let mut factors = FACTORS.take();
    factors.resize(layout.row_total + layout.col_total, 0.0);
    let factors_ptr = SyncPtr::new(&mut factors);
    let mut zero_rows = ZERO_ROWS.take();
    zero_rows.resize(layout.row_total, false);
    let zero_rows_ptr = SyncPtr::new(&mut zero_rows);
    // SAFETY: the offsets are the layout's: in bounds of `factors` and `zero_rows`, or one past
    // their end for an unfactored tensor, which never reads through them.
    let factors_of = |i: usize| unsafe {
        Factors {
            row: factors_ptr.at(layout.row_offsets[i]),
            col: factors_ptr.at(layout.row_total + layout.col_offsets[i]),
            zero_row: zero_rows_ptr.at(layout.row_offsets[i]),
        }
    };

    // Small tensors (many at batch size 1: norms, biases, heads of small models) each go through
    // all five phases on one thread, back to back: their parameters and gradients come from
    // memory once and stay in that core's own cache until the update is written. Consecutive
    // small tensors are batched into tasks of about CHUNK elements.
    let (small, large): (Vec<usize>, Vec<usize>) =
        active.iter().partition(|&&i| tensor_bytes(table, layout, &ptrs.io, momentum, i) <= small_tensor_bytes);
    if !small.is_empty() {
        let (mut bounds, mut elems, mut total) = (vec![0], 0, 0);
        for (k, &i) in small.iter().enumerate() {
            elems += table.numels()[i];
            if elems >= CHUNK || k + 1 == small.len() {
                bounds.push(k + 1);
                total += elems;
                elems = 0;
            }
        }
        let whole = WholeTensor {
            table,
            layout,
            hp,
            plans: &plans,
            ptrs,
            k,
            consts2,
            momentum,
            beta1,
            factors_of: &factors_of,
        };
        let run = |t: usize| {
            for &i in &small[bounds[t]..bounds[t + 1]] {
                // SAFETY: each tensor is stepped by one task, which alone touches its data.
                unsafe { whole.step(i) };
            }
        };
        if total > CHUNK {
            exec.map_tasks(bounds.len() - 1, run);
        } else {
            (0..bounds.len() - 1).for_each(run);
        }
    }

    // Larger tensors go through the phases a group at a time, each group small enough that its
    // parameters and gradients stay in the last-level cache from one phase to the next: memory
    // then sees about one read of them and one write, not three reads. Groups are pipelined: one
    // parallel region runs phase 5 of group s-2, phase 3 of group s-1 and phase 1 of group s,
    // so that the compute of phases 3 and 5 overlaps the memory-bound phase 1. Each tensor's
    // results depend only on its own items, so neither the grouping, the schedule (like the
    // thread count) nor the small-tensor path changes a bit.
    let active = large;
    let groups: Vec<Group> =
        groups(table, layout, &active, &ptrs.io, momentum).into_iter().map(|a| Group::new(table, layout, a)).collect();

    for s in 0..groups.len() + 2 {
        // SAFETY (all phases): items are disjoint pieces of stepped tensors; each writes only its
        // own rows / elements of the param, variance and momentum buffers. A tensor's row and
        // column EMAs and factors are written by its phase 2, which runs once, after all of its
        // phase-1 items (on the thread that finished the last of them), and read only in later
        // rounds.
        let none: &[Item] = &[];
        let p5 = if s >= 2 { &groups[s - 2].items[..] } else { none };
        let p3 = if s >= 1 && s <= groups.len() { &groups[s - 1].items[..] } else { none };
        let g1 = groups.get(s);
        let p1 = g1.map_or(none, |g| &g.items[..]);
        let p3 = p3.iter().filter(|it| layout.factored[it.tensor]);
        // Interleaved, so that each thread's share mixes the phases; phase-1 tasks carry their
        // item's index in the group.
        let mut tasks: Vec<(Phase, &Item, usize)> = Vec::new();
        let (mut a, mut b, mut c) = (p5.iter().peekable(), p3.peekable(), p1.iter().enumerate().peekable());
        while a.peek().is_some() || b.peek().is_some() || c.peek().is_some() {
            tasks.extend(b.next().map(|it| (Phase::P3, it, 0)));
            tasks.extend(c.next().map(|(j, it)| (Phase::P1, it, j)));
            tasks.extend(a.next().map(|it| (Phase::P5, it, 0)));
        }
        let work: usize = tasks.iter().map(|(_, it, _)| item_span(table, layout, it)).map(|(s, e)| e - s).sum();
        let phase1 = g1.map(Phase1Round::new);
        let run = |t: usize| unsafe {
            let (phase, it, j) = tasks[t];
            match phase {
                Phase::P1 => {
                    let out = on_path(path, Phase1Kernel { table, layout, plans: &plans, ptrs, it, k });
                    let (g1, round) = (g1.expect("phase-1 tasks have a group"), phase1.as_ref().expect("and a round"));
                    if let Some((pos, parts)) = round.finish_item(g1, j, out) {
                        let i = g1.active[pos];
                        let items = &g1.items[g1.first_item[pos]..g1.first_item[pos + 1]];
                        let sums = phase2(table, layout, ptrs, i, items, parts, plans[i].weight2, &factors_of, consts2);
                        round.set_sums(pos, sums);
                    }
                    None
                }
                Phase::P3 => Some(on_path(path, Phase3Kernel { table, ptrs, it, f: factors_of(it.tensor), k })),
                Phase::P5 => {
                    let (f, plan) = (factors_of(it.tensor), plans[it.tensor]);
                    on_path(path, Phase5Kernel { table, layout, plan, ptrs, it, f, k, momentum, beta1 });
                    None
                }
            }
        };
        let outs: Vec<Option<f64>> =
            if work > CHUNK { exec.map_tasks(tasks.len(), run) } else { (0..tasks.len()).map(run).collect() };

        // Phase-3 sums in item order, whatever the interleaving.
        for ((_, it, _), out) in tasks.iter().zip(outs) {
            if let Some(sum) = out {
                plans[it.tensor].update_sq += sum;
            }
        }
        if let (Some(g1), Some(round)) = (g1, phase1) {
            for (&i, (param_sq, update_sq)) in g1.active.iter().zip(round.into_sums()) {
                plans[i].param_sq += param_sq;
                plans[i].update_sq += update_sq;
            }
        }
        if s >= 1 && s <= groups.len() {
            phase4(table, hp, momentum, groups[s - 1].active, &mut plans);
        }
    }
    FACTORS.set(factors);
    ZERO_ROWS.set(zero_rows);
    Ok(())
}

/// Checks the state buffers against the table and layout (`exp_avg` is needed with momentum
/// only), and gives them with the parameters' `io` as the raw pointers the phases work on.
#[allow(clippy::too_many_arguments)]
fn state_ptrs(
    table: &SegmentTable,
    layout: &AdafactorLayout,
    hp: &AdafactorHyper,
    io: ParamIo,
    row_var: &mut [f32],
    col_var: &mut [f32],
    variance: &mut [f32],
    exp_avg: Option<&mut [f32]>,
) -> Result<Ptrs> {
    check_len("row_var", row_var.len(), layout.row_total)?;
    check_len("col_var", col_var.len(), layout.col_total)?;
    check_len("variance", variance.len(), layout.variance_total)?;
    let exp_avg = match exp_avg {
        Some(m) => {
            check_len("exp_avg", m.len(), table.total())?;
            SyncPtr::new(m)
        }
        None if hp.beta1 != 0.0 => return Err(Error::invalid("exp_avg", "missing", "given when beta1 > 0")),
        None => SyncPtr(std::ptr::null_mut()),
    };
    if *layout != AdafactorLayout::new(table, &layout.factored)? {
        return Err(Error::Segments("the Adafactor layout does not belong to this table".into()));
    }
    Ok(Ptrs {
        io,
        row_var: SyncPtr::new(row_var),
        col_var: SyncPtr::new(col_var),
        variance: SyncPtr::new(variance),
        exp_avg,
    })
}

/// Per-tensor plans of the tensors `which` at their (advanced) step counts `steps`: the step and
/// the second moments' weight `1 - beta2_t`.
fn plans_for(table: &SegmentTable, hp: &AdafactorHyper, steps: &[f64], which: &[usize]) -> Vec<TensorPlan> {
    let mut plans = vec![TensorPlan::default(); table.len()];
    for &i in which {
        let step = steps[i] as u64;
        plans[i].step = step;
        plans[i].weight2 = (1.0 - hp.beta2_at(step)) as f32;
    }
    plans
}

/// A group of tensors stepped together, with its items (each tensor's consecutive).
struct Group<'a> {
    active: &'a [usize],
    items: Vec<Item>,
    /// Position in `active` of each item's tensor.
    owner: Vec<usize>,
    /// The items of `active[k]` are `first_item[k]..first_item[k + 1]`.
    first_item: Vec<usize>,
}

impl<'a> Group<'a> {
    fn new(table: &SegmentTable, layout: &AdafactorLayout, active: &'a [usize]) -> Group<'a> {
        let (mut items, mut owner, mut first_item) = (Vec::new(), Vec::new(), vec![0]);
        for (pos, &i) in active.iter().enumerate() {
            let mine = items_for(table, &layout.factored, i);
            owner.extend(std::iter::repeat_n(pos, mine.len()));
            items.extend(mine);
            first_item.push(items.len());
        }
        Group { active, items, owner, first_item }
    }
}

/// Phase 1 of one group in a round: each item's partial sums, and how many items of each tensor
/// are still running, so that the thread finishing a tensor's last item runs its phase 2.
struct Phase1Round {
    parts: Vec<Mutex<Option<Phase1>>>,
    left: Vec<AtomicUsize>,
    /// Per tensor: the sums of `P^2` and (unfactored) `U^2` phase 2 combined.
    sums: Vec<Mutex<(f64, f64)>>,
}

impl Phase1Round {
    fn new(g: &Group<'_>) -> Phase1Round {
        Phase1Round {
            parts: (0..g.items.len()).map(|_| Mutex::new(None)).collect(),
            left: g.first_item.windows(2).map(|w| AtomicUsize::new(w[1] - w[0])).collect(),
            sums: (0..g.active.len()).map(|_| Mutex::new((0.0, 0.0))).collect(),
        }
    }

    /// Records item `j`'s partials; when it was its tensor's last, returns the tensor's position
    /// in the group and all of its items' partials, in item order.
    fn finish_item(&self, g: &Group<'_>, j: usize, out: Phase1) -> Option<(usize, Vec<Phase1>)> {
        *lock(&self.parts[j]) = Some(out);
        let pos = g.owner[j];
        if self.left[pos].fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        let range = g.first_item[pos]..g.first_item[pos + 1];
        Some((pos, range.map(|j| lock(&self.parts[j]).take().expect("every item of the tensor finished")).collect()))
    }

    fn set_sums(&self, pos: usize, sums: (f64, f64)) {
        *lock(&self.sums[pos]) = sums;
    }

    fn into_sums(self) -> impl Iterator<Item = (f64, f64)> {
        self.sums.into_iter().map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Locks a mutex that no panic can have poisoned mid-update (each holds a plain value).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone, Copy)]
enum Phase {
    P1,
    P3,
    P5,
}

/// Constants of phase 2.
#[derive(Clone, Copy)]
struct Phase2Consts {
    add_eps: f32,
    clamp_eps: f32,
    path: SimdPath,
}

impl Phase2Consts {
    fn new(hp: &AdafactorHyper, path: SimdPath) -> Phase2Consts {
        let clamp_eps = if hp.eps1.is_none() { f32::EPSILON } else { 0.0 };
        Phase2Consts { add_eps: hp.eps1.unwrap_or(0.0) as f32, clamp_eps, path }
    }
}

/// Phase 2 of tensor `i`: combines its items' phase-1 partials (in item order) into the sums of
/// `P^2` and (unfactored) `U^2`, which it returns; factored, it also updates the row and column
/// EMAs and computes the row factors `1/sqrt(r_i)` and column factors `1/sqrt(c_j / mean(r))` of
/// each matrix (`mean(r)` clamped below at `clamp_eps`).
///
/// # Safety
/// The caller has the only access to tensor `i`'s EMAs and factors.
#[allow(clippy::too_many_arguments)]
unsafe fn phase2(
    table: &SegmentTable,
    layout: &AdafactorLayout,
    ptrs: Ptrs,
    i: usize,
    items: &[Item],
    parts: Vec<Phase1>,
    weight2: f32,
    factors_of: &dyn Fn(usize) -> Factors,
    k: Phase2Consts,
) -> (f64, f64) {
    let sums = TensorSums::combine(table, layout, i, items, &parts);
    if layout.factored[i] {
        let f = factors_of(i);
        let row_var_sums = update_rows(table, layout, ptrs, i, &sums.row_sums, weight2, f, k);
        let rows = table.matrix(i)[1];
        update_cols(table, layout, ptrs, i, &sums.col_sums, rows, weight2, k);
        for (b, &r_sum) in row_var_sums.iter().enumerate() {
            matrix_factors(table, layout, ptrs, i, b, mean_of(r_sum, rows, k), f, k);
        }
    }
    (sums.param_sq, sums.update_sq)
}

/// A tensor's phase-1 sums, its items' partials combined in item order.
struct TensorSums {
    param_sq: f64,
    /// Unfactored: the sum of `U^2`.
    update_sq: f64,
    /// Factored: the sums of `G^2` of each column (`batch * cols`) and row (`batch * rows`).
    col_sums: Vec<f64>,
    row_sums: Vec<f64>,
}

impl TensorSums {
    fn combine(
        table: &SegmentTable,
        layout: &AdafactorLayout,
        i: usize,
        items: &[Item],
        parts: &[Phase1],
    ) -> TensorSums {
        let (mut param_sq, mut update_sq) = (0.0, 0.0);
        for part in parts {
            param_sq += part.param_sq;
            update_sq += part.update_sq;
        }
        let (mut col_sums, mut row_sums) = (Vec::new(), Vec::new());
        if layout.factored[i] {
            let [batch, rows, cols] = table.matrix(i);
            col_sums = vec![0f64; batch * cols];
            row_sums = vec![0f64; batch * rows];
            for (it, part) in items.iter().zip(parts) {
                for (acc, v) in col_sums[it.batch * cols..(it.batch + 1) * cols].iter_mut().zip(&part.col_sums) {
                    *acc += v;
                }
                row_sums[it.batch * rows + it.row0..it.batch * rows + it.row1].copy_from_slice(&part.row_sums);
            }
        }
        TensorSums { param_sq, update_sq, col_sums, row_sums }
    }
}

/// Updates factored tensor `i`'s row EMAs from the row sums of `G^2`, flags its all-zero rows,
/// and returns each matrix's sum of the new row EMAs (f64, in row order).
///
/// # Safety
/// As for [`phase2`].
#[allow(clippy::too_many_arguments)]
unsafe fn update_rows(
    table: &SegmentTable,
    layout: &AdafactorLayout,
    ptrs: Ptrs,
    i: usize,
    row_sums: &[f64],
    weight2: f32,
    f: Factors,
    k: Phase2Consts,
) -> Vec<f64> {
    let [batch, rows, cols] = table.matrix(i);
    let row_var = std::slice::from_raw_parts_mut(ptrs.row_var.at(layout.row_offsets[i]), batch * rows);
    for (v, s) in row_var.iter_mut().zip(row_sums) {
        *v = lerp(*v, (*s as f32) / cols as f32 + k.add_eps, weight2);
    }
    for (r, s) in row_sums.iter().enumerate() {
        *f.zero_row.add(r) = *s == 0.0;
    }
    (0..batch).map(|b| row_var[b * rows..(b + 1) * rows].iter().map(|&x| x as f64).sum::<f64>()).collect()
}

/// Updates factored tensor `i`'s column EMAs from the column sums of `G^2` over `rows` rows.
///
/// # Safety
/// As for [`phase2`].
#[allow(clippy::too_many_arguments)]
unsafe fn update_cols(
    table: &SegmentTable,
    layout: &AdafactorLayout,
    ptrs: Ptrs,
    i: usize,
    col_sums: &[f64],
    rows: usize,
    weight2: f32,
    k: Phase2Consts,
) {
    let [batch, _, cols] = table.matrix(i);
    let col_var = std::slice::from_raw_parts_mut(ptrs.col_var.at(layout.col_offsets[i]), batch * cols);
    for (v, s) in col_var.iter_mut().zip(col_sums) {
        *v = lerp(*v, (*s as f32) / rows as f32 + k.add_eps, weight2);
    }
}

/// `mean(r)` of a matrix of `rows` rows whose row EMAs sum to `r_sum`, clamped below.
fn mean_of(r_sum: f64, rows: usize, k: Phase2Consts) -> f32 {
    ((r_sum / rows as f64) as f32).max(k.clamp_eps)
}

/// Row factors `1/sqrt(r_i)` and column factors `1/sqrt(c_j / mean)` of matrix `b` of factored
/// tensor `i`, from its (updated) EMAs.
///
/// # Safety
/// As for [`phase2`].
#[allow(clippy::too_many_arguments)]
unsafe fn matrix_factors(
    table: &SegmentTable,
    layout: &AdafactorLayout,
    ptrs: Ptrs,
    i: usize,
    b: usize,
    mean: f32,
    f: Factors,
    k: Phase2Consts,
) {
    let [_, rows, cols] = table.matrix(i);
    let src = ptrs.row_var.at(layout.row_offsets[i] + b * rows);
    on_path(k.path, InvRootRatio { src, dst: f.row.add(b * rows), n: rows, denom: 1.0 });
    let src = ptrs.col_var.at(layout.col_offsets[i] + b * cols);
    on_path(k.path, InvRootRatio { src, dst: f.col.add(b * cols), n: cols, denom: mean });
}

/// `dst[i] = 1 / sqrt(src[i] / denom)` for `i < n`: the row factors (`denom` 1, which divides
/// exactly) and column factors of a matrix.
#[derive(Clone, Copy)]
struct InvRootRatio {
    src: *const f32,
    dst: *mut f32,
    n: usize,
    denom: f32,
}

impl PathKernel for InvRootRatio {
    type Out = ();
    #[inline(always)]
    unsafe fn run<V: F32Lanes>(self) {
        let InvRootRatio { src, dst, n, denom } = self;
        let mut i = 0;
        while i + V::WIDTH <= n {
            inv_root_ratio(V::load(src.add(i)), V::splat(denom)).store(dst.add(i));
            i += V::WIDTH;
        }
        while i < n {
            *dst.add(i) = inv_root_ratio(*src.add(i), denom);
            i += 1;
        }
    }
}

/// `1 / sqrt(x / denom)`, correctly rounded operation by operation (as the CUDA kernels do it).
#[inline(always)]
fn inv_root_ratio<V: F32Lanes>(x: V, denom: V) -> V {
    V::splat(1.0).div(x.div(denom).sqrt())
}

/// Phase 4 for a group: per-tensor step sizes.
fn phase4(table: &SegmentTable, hp: &AdafactorHyper, momentum: bool, active: &[usize], plans: &mut [TensorPlan]) {
    for &i in active {
        step_size(table.numels()[i], hp, momentum, &mut plans[i]);
    }
}

/// A tensor's step size and clipping factor from its sums of `P^2` and `U^2` over its `numel`
/// elements.
fn step_size(numel: usize, hp: &AdafactorHyper, momentum: bool, plan: &mut TensorPlan) {
    let n = numel as f64;
    let rho = if hp.cap_lr_at_inv_sqrt_step { hp.lr.min(1.0 / (plan.step as f64).sqrt()) } else { hp.lr };
    let param_rms = (plan.param_sq / n).sqrt() as f32 as f64;
    let alpha = if hp.relative_step { hp.eps2.max(param_rms) * rho } else { rho };
    let update_rms = (plan.update_sq / n).sqrt() as f32 as f64;
    let clip = 1.0f64.max(update_rms / hp.clip_threshold);
    if momentum {
        plan.scale = (1.0 / clip) as f32;
        plan.neg_alpha = -alpha as f32;
    } else {
        plan.scale = (-alpha / clip) as f32;
    }
    plan.decay = (1.0 - hp.lr * hp.weight_decay) as f32;
}

/// Everything one step of a small tensor needs: its five phases run back to back on one thread,
/// the same kernels over the same items in the same order as the group pipeline, so the bits are
/// those of the pipeline.
struct WholeTensor<'a> {
    table: &'a SegmentTable,
    layout: &'a AdafactorLayout,
    hp: &'a AdafactorHyper,
    plans: &'a [TensorPlan],
    ptrs: Ptrs,
    k: Consts,
    consts2: Phase2Consts,
    momentum: bool,
    beta1: f32,
    factors_of: &'a (dyn Fn(usize) -> Factors + Sync),
}

impl WholeTensor<'_> {
    /// # Safety
    /// The caller has the only access to tensor `i`'s parameters, state and factors.
    unsafe fn step(&self, i: usize) {
        let WholeTensor { table, layout, hp, plans, ptrs, k, consts2, momentum, beta1, factors_of } = *self;
        let path = consts2.path;
        let mut plan = plans[i];
        let items = items_for(table, &layout.factored, i);
        let parts: Vec<Phase1> =
            items.iter().map(|it| on_path(path, Phase1Kernel { table, layout, plans, ptrs, it, k })).collect();
        let (param_sq, update_sq) = phase2(table, layout, ptrs, i, &items, parts, plan.weight2, factors_of, consts2);
        plan.param_sq += param_sq;
        plan.update_sq += update_sq;
        if layout.factored[i] {
            for it in &items {
                plan.update_sq += on_path(path, Phase3Kernel { table, ptrs, it, f: factors_of(i), k });
            }
        }
        step_size(table.numels()[i], hp, momentum, &mut plan);
        for it in &items {
            on_path(path, Phase5Kernel { table, layout, plan, ptrs, it, f: factors_of(i), k, momentum, beta1 });
        }
    }
}

/// Elements per stochastic-rounding tile: random bits are drawn a tile at a time.
const TILE: usize = 1024;

/// A phase's per-item work, compiled once per SIMD path: `run::<V>` is inlined into a
/// `#[target_feature]` wrapper for each path (as the elementwise driver does).
trait PathKernel {
    type Out;
    /// # Safety
    /// The CPU must support `V`'s instruction set, and the kernel's own contract must hold.
    unsafe fn run<V: F32Lanes>(self) -> Self::Out;
}

/// Runs `k` on `path` (supported by this CPU: checked when the executor was built).
unsafe fn on_path<K: PathKernel>(path: SimdPath, k: K) -> K::Out {
    match path {
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => run_avx512(k),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => run_avx2(k),
        #[cfg(target_arch = "aarch64")]
        SimdPath::Neon => run_neon(k),
        _ => k.run::<f32>(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_avx512<K: PathKernel>(k: K) -> K::Out {
    k.run::<crate::simd::Avx512>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2<K: PathKernel>(k: K) -> K::Out {
    k.run::<crate::simd::Avx2>()
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn run_neon<K: PathKernel>(k: K) -> K::Out {
    k.run::<crate::simd::Neon>()
}

/// How parameters and gradients are stored: f32, or bf16 bits widened in registers.
trait Elem: Copy {
    /// Loads `V::WIDTH` values as f32.
    unsafe fn load<V: F32Lanes>(ptr: *const Self) -> V;
    /// Stores `V::WIDTH` new parameters (bf16: rounded as `rounding` says, with the draws at
    /// `rand` when stochastic).
    unsafe fn store<V: F32Lanes>(v: V, ptr: *mut Self, rounding: Rounding, rand: *const u16);
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn load<V: F32Lanes>(ptr: *const f32) -> V {
        V::load(ptr)
    }
    #[inline(always)]
    unsafe fn store<V: F32Lanes>(v: V, ptr: *mut f32, _: Rounding, _: *const u16) {
        v.store(ptr)
    }
}

impl Elem for u16 {
    #[inline(always)]
    unsafe fn load<V: F32Lanes>(ptr: *const u16) -> V {
        V::load_bf16(ptr)
    }
    #[inline(always)]
    unsafe fn store<V: F32Lanes>(v: V, ptr: *mut u16, rounding: Rounding, rand: *const u16) {
        match rounding {
            Rounding::Nearest => v.store_bf16_nearest(ptr),
            Rounding::Stochastic { .. } => v.store_bf16_stochastic(ptr, rand),
        }
    }
}

/// Elements per block of the f64 reductions: whole vectors covering whole sets of the eight
/// accumulator lanes, so that lane `k % 8` receives element `k` on every path.
#[inline(always)]
const fn block<V: F32Lanes>() -> usize {
    if V::WIDTH >= 8 {
        V::WIDTH
    } else {
        8
    }
}

/// The fixed fold of the eight lanes.
#[inline(always)]
fn fold8(l: [f64; 8]) -> f64 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

/// torch's lerp (see [`lerp`]) lane-wise, with a uniform weight.
#[inline(always)]
fn lerp_v<V: F32Lanes>(a: V, b: V, w: f32) -> V {
    if w < 0.5 {
        a.add(V::splat(w).mul(b.sub(a)))
    } else {
        b.sub(b.sub(a).mul(V::splat(1.0 - w)))
    }
}

/// Sum of squares of `n` values at `x` in f64, element `k` in lane `k % 8`.
#[inline(always)]
unsafe fn sum_sq<V: F32Lanes, T: Elem>(x: *const T, n: usize) -> [f64; 8] {
    let b = block::<V>();
    let mut acc = V::acc8_zero();
    let mut i = 0;
    while i + b <= n {
        let mut j = 0;
        while j < b {
            acc = V::acc8_add_sq(acc, T::load::<V>(x.add(i + j)), j % 8);
            j += V::WIDTH;
        }
        i += b;
    }
    let mut lanes = V::acc8_to_array(acc);
    while i < n {
        let v = T::load::<f32>(x.add(i)) as f64;
        lanes[i % 8] += v * v;
        i += 1;
    }
    lanes
}

/// One row of `n` gradients: returns its sum of squares (lane `k % 8` for column `k`, folded)
/// and adds each square to the column sums `cols[k]`.
#[inline(always)]
unsafe fn row_sq<V: F32Lanes, T: Elem>(g: *const T, n: usize, cols: *mut f64) -> f64 {
    let b = block::<V>();
    let mut acc = V::acc8_zero();
    let mut i = 0;
    while i + b <= n {
        let mut j = 0;
        while j < b {
            let x = T::load::<V>(g.add(i + j));
            acc = V::acc8_add_sq(acc, x, j % 8);
            x.add_sq_to_f64(cols.add(i + j));
            j += V::WIDTH;
        }
        i += b;
    }
    let mut lanes = V::acc8_to_array(acc);
    while i < n {
        let v = T::load::<f32>(g.add(i)) as f64;
        lanes[i % 8] += v * v;
        *cols.add(i) += v * v;
        i += 1;
    }
    fold8(lanes)
}

/// `1 / sqrt(max(v, clamp2))`, the inverse root of the second moment.
#[inline(always)]
fn inv_root<V: F32Lanes>(v: V, clamp2: f32) -> V {
    V::splat(1.0).div(v.max(V::splat(clamp2)).sqrt())
}

/// Constants of a step that every element of a tensor shares.
#[derive(Clone, Copy)]
struct Consts {
    sign: f32,
    add_eps: f32,
    /// `clamp_eps^2`, the floor of an unfactored `V`.
    clamp2: f32,
    /// `1 / clamp_eps` (infinite without the clamp), the ceiling of a factored `1/sqrt(V)`.
    inv_clamp: f32,
    /// Whether the step size needs `RMS(P)` (relative step): without it phase 1 reads no
    /// parameters.
    param_rms: bool,
}

impl Consts {
    /// `eps1 = Some(e)` adds `e` to `G^2`; `None` is torch's clamping at `f32::EPSILON`.
    fn new(hp: &AdafactorHyper) -> Consts {
        let clamp_eps = if hp.eps1.is_none() { f32::EPSILON } else { 0.0 };
        Consts {
            sign: if hp.maximize { -1.0 } else { 1.0 },
            add_eps: hp.eps1.unwrap_or(0.0) as f32,
            clamp2: clamp_eps * clamp_eps,
            inv_clamp: if clamp_eps > 0.0 { 1.0 / clamp_eps } else { f32::INFINITY },
            param_rms: hp.relative_step,
        }
    }
}

struct Phase1 {
    param_sq: f64,
    update_sq: f64,
    row_sums: Vec<f64>,
    col_sums: Vec<f64>,
}

/// Phase 1 on one item: sum of `P^2`; factored: the row sums and column partial sums of `G^2`;
/// unfactored: the second moment's update and the sum of `U^2`.
#[derive(Clone, Copy)]
struct Phase1Kernel<'a> {
    table: &'a SegmentTable,
    layout: &'a AdafactorLayout,
    plans: &'a [TensorPlan],
    ptrs: Ptrs,
    it: &'a Item,
    k: Consts,
}

impl PathKernel for Phase1Kernel<'_> {
    type Out = Phase1;
    #[inline(always)]
    unsafe fn run<V: F32Lanes>(self) -> Phase1 {
        let (start, _) = item_span(self.table, self.layout, self.it);
        match self.ptrs.io.tensor(self.it.tensor, start - self.table.offsets()[self.it.tensor]) {
            TensorIo::F32 { param, grad } => self.body::<V, f32>(param, grad),
            TensorIo::Bf16 { param, grad, .. } => self.body::<V, u16>(param, grad),
        }
    }
}

impl Phase1Kernel<'_> {
    /// `p` and `g` are at the item's first element.
    #[inline(always)]
    unsafe fn body<V: F32Lanes, T: Elem>(self, p: *const T, g: *const T) -> Phase1 {
        let Phase1Kernel { table, layout, plans, ptrs, it, k } = self;
        let (start, end) = item_span(table, layout, it);
        let n = end - start;
        let param_sq = if k.param_rms { fold8(sum_sq::<V, T>(p, n)) } else { 0.0 };
        if layout.factored[it.tensor] {
            let cols = table.matrix(it.tensor)[2];
            let mut col_sums = vec![0f64; cols];
            let mut row_sums = Vec::with_capacity(it.row1 - it.row0);
            for r in 0..it.row1 - it.row0 {
                row_sums.push(row_sq::<V, T>(g.add(r * cols), cols, col_sums.as_mut_ptr()));
            }
            return Phase1 { param_sq, update_sq: 0.0, row_sums, col_sums };
        }
        let var = ptrs.variance.at(layout.variance_offsets[it.tensor] + it.row0);
        let w = plans[it.tensor].weight2;
        let b = block::<V>();
        let mut acc = V::acc8_zero();
        let mut i = 0;
        while i + b <= n {
            let mut j = 0;
            while j < b {
                let u = unfactored_moment::<V, T>(g.add(i + j), var.add(i + j), w, k);
                acc = V::acc8_add_sq(acc, u, j % 8);
                j += V::WIDTH;
            }
            i += b;
        }
        let mut lanes = V::acc8_to_array(acc);
        while i < n {
            let u = unfactored_moment::<f32, T>(g.add(i), var.add(i), w, k) as f64;
            lanes[i % 8] += u * u;
            i += 1;
        }
        Phase1 { param_sq, update_sq: fold8(lanes), row_sums: Vec::new(), col_sums: Vec::new() }
    }
}

/// Unfactored: `V = lerp(V, G^2 + eps1, w)` stored, and `U = G / sqrt(V)` returned.
#[inline(always)]
unsafe fn unfactored_moment<V: F32Lanes, T: Elem>(g: *const T, var: *mut f32, w: f32, k: Consts) -> V {
    let g = V::splat(k.sign).mul(T::load::<V>(g));
    let v = lerp_v(V::load(var), g.mul(g).add(V::splat(k.add_eps)), w);
    v.store(var);
    g.mul(inv_root(v, k.clamp2))
}

/// The factored update `U = min(a b, 1/eps) * (sign G)`, from the row factor `a` and column
/// factor `b` (see the module docs).
#[inline(always)]
fn factored_update<V: F32Lanes>(g: V, row_factor: V, col_factor: V, k: Consts) -> V {
    row_factor.mul(col_factor).min(V::splat(k.inv_clamp)).mul(V::splat(k.sign).mul(g))
}

/// Phase 3 on one item of a factored tensor: the sum of `U^2`, column `k` in lane `k % 8`.
#[derive(Clone, Copy)]
struct Phase3Kernel<'a> {
    table: &'a SegmentTable,
    ptrs: Ptrs,
    it: &'a Item,
    f: Factors,
    k: Consts,
}

impl PathKernel for Phase3Kernel<'_> {
    type Out = f64;
    #[inline(always)]
    unsafe fn run<V: F32Lanes>(self) -> f64 {
        match self.ptrs.io.tensor(self.it.tensor, 0) {
            TensorIo::F32 { grad, .. } => self.body::<V, f32>(grad),
            TensorIo::Bf16 { grad, .. } => self.body::<V, u16>(grad),
        }
    }
}

impl Phase3Kernel<'_> {
    /// `g` is at the tensor's first element.
    #[inline(always)]
    unsafe fn body<V: F32Lanes, T: Elem>(self, g: *const T) -> f64 {
        let Phase3Kernel { table, it, f, k, .. } = self;
        let [_, rows, cols] = table.matrix(it.tensor);
        let base = it.batch * rows * cols;
        let cf = f.col.add(it.batch * cols);
        let b = block::<V>();
        let mut acc = V::acc8_zero();
        for ri in it.row0..it.row1 {
            if *f.zero_row.add(it.batch * rows + ri) {
                continue;
            }
            let g = g.add(base + ri * cols);
            let a_s = *f.row.add(it.batch * rows + ri);
            let a = V::splat(a_s);
            let mut i = 0;
            while i + b <= cols {
                let mut j = 0;
                while j < b {
                    let u = factored_update(T::load::<V>(g.add(i + j)), a, V::load(cf.add(i + j)), k);
                    acc = V::acc8_add_sq(acc, u, j % 8);
                    j += V::WIDTH;
                }
                i += b;
            }
            if i < cols {
                let mut lanes = V::acc8_to_array(acc);
                while i < cols {
                    let u = factored_update(T::load::<f32>(g.add(i)), a_s, *cf.add(i), k) as f64;
                    lanes[i % 8] += u * u;
                    i += 1;
                }
                acc = V::acc8_from_array(lanes);
            }
        }
        fold8(V::acc8_to_array(acc))
    }
}

/// Phase 5 on one item: the new parameters (and momentum).
#[derive(Clone, Copy)]
struct Phase5Kernel<'a> {
    table: &'a SegmentTable,
    layout: &'a AdafactorLayout,
    plan: TensorPlan,
    ptrs: Ptrs,
    it: &'a Item,
    /// The tensor's factors (factored tensors).
    f: Factors,
    k: Consts,
    momentum: bool,
    beta1: f32,
}

/// How phase 5 gets `U`: from the factored or the unfactored second moment.
const FACTORED: u8 = 0;
const UNFACTORED: u8 = 1;

impl PathKernel for Phase5Kernel<'_> {
    type Out = ();
    #[inline(always)]
    unsafe fn run<V: F32Lanes>(self) {
        let (start, _) = item_span(self.table, self.layout, self.it);
        match self.ptrs.io.tensor(self.it.tensor, start - self.table.offsets()[self.it.tensor]) {
            TensorIo::F32 { param, grad } => self.body::<V, f32>(param, grad, Rounding::Nearest, 0),
            TensorIo::Bf16 { param, grad, rounding, draw_shift } => {
                self.body::<V, u16>(param, grad, rounding, draw_shift)
            }
        }
    }
}

impl Phase5Kernel<'_> {
    /// `p` and `g` are at the item's first element.
    #[inline(always)]
    unsafe fn body<V: F32Lanes, T: Elem>(self, p: *mut T, g: *const T, rounding: Rounding, draw_shift: i64) {
        let (start, end) = item_span(self.table, self.layout, self.it);
        let it = self.it;
        let m = if self.momentum { self.ptrs.exp_avg.0 } else { std::ptr::null_mut() };
        // One buffer of draws per item, not per row: short rows would pay for clearing it.
        let mut rand = [0u16; TILE + 16];
        if self.layout.factored[it.tensor] {
            let [_, rows, cols] = self.table.matrix(it.tensor);
            let cf = self.f.col.add(it.batch * cols);
            let skip_zero_rows = self.plan.decay == 1.0 && !self.momentum;
            for ri in it.row0..it.row1 {
                if skip_zero_rows && *self.f.zero_row.add(it.batch * rows + ri) {
                    continue;
                }
                let s = start + (ri - it.row0) * cols;
                let a = *self.f.row.add(it.batch * rows + ri);
                let (p, g) = (p.add(s - start), g.add(s - start));
                self.segment::<V, T, FACTORED>(p, g, m, (rounding, draw_shift), s, cols, cf, a, &mut rand);
            }
        } else {
            let var = self.ptrs.variance.at(self.layout.variance_offsets[it.tensor] + it.row0);
            let rounding = (rounding, draw_shift);
            self.segment::<V, T, UNFACTORED>(p, g, m, rounding, start, end - start, var, 0.0, &mut rand);
        }
    }

    /// Elements `s..s + n` of the table's index space, whose parameters and gradients start at
    /// `p` and `g`; `den` holds their column factors (factored, with row factor `a`) or second
    /// moments (unfactored), indexed from 0. `(rounding, draw_shift)`: how bf16 stores round, and
    /// the shift from an element's table index to the index it draws its random bits at.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn segment<V: F32Lanes, T: Elem, const MODE: u8>(
        &self,
        p: *mut T,
        g: *const T,
        m: *mut f32,
        (rounding, draw_shift): (Rounding, i64),
        s: usize,
        n: usize,
        den: *const f32,
        a: f32,
        rand: &mut [u16; TILE + 16],
    ) {
        // Random draws for a tile cover it rounded out to whole Philox blocks (the draws depend
        // only on the element's draw index), so no tile pays for a partial block.
        let d = (s as i64).wrapping_add(draw_shift) as usize;
        let mut tile = 0;
        while tile < n {
            let tile_end = (tile + TILE).min(n);
            let first = (d + tile) & !7;
            if let Rounding::Stochastic { seed, stream } = rounding {
                let len = ((d + tile_end + 7) & !7) - first;
                fill_random_u16(seed, self.plan.step, stream, first as u64, &mut rand[..len]);
            }
            let rand = rand.as_ptr().wrapping_add(d.wrapping_sub(first));
            let mut i = tile;
            while i + V::WIDTH <= tile_end {
                self.apply::<V, T, MODE>(p.add(i), g.add(i), m, rounding, s + i, den.add(i), a, rand.wrapping_add(i));
                i += V::WIDTH;
            }
            while i < tile_end {
                self.apply::<f32, T, MODE>(p.add(i), g.add(i), m, rounding, s + i, den.add(i), a, rand.wrapping_add(i));
                i += 1;
            }
            tile = tile_end;
        }
    }

    /// One vector at table index `e`, whose parameters and gradients are at `p` and `g`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn apply<V: F32Lanes, T: Elem, const MODE: u8>(
        &self,
        p: *mut T,
        g: *const T,
        m: *mut f32,
        rounding: Rounding,
        e: usize,
        den: *const f32,
        a: f32,
        rand: *const u16,
    ) {
        let plan = &self.plan;
        let k = self.k;
        let gv = T::load::<V>(g);
        let u = match MODE {
            FACTORED => factored_update(gv, V::splat(a), V::load(den), k),
            _ => inv_root(V::load(den), k.clamp2).mul(V::splat(k.sign).mul(gv)),
        };
        let pv = T::load::<V>(p);
        let decayed = if plan.decay != 1.0 { pv.mul(V::splat(plan.decay)) } else { pv };
        let new = if m.is_null() {
            decayed.add(V::splat(plan.scale).mul(u))
        } else {
            let mv = lerp_v(V::load(m.add(e)), u.mul(V::splat(plan.scale)), 1.0 - self.beta1);
            mv.store(m.add(e));
            decayed.add(V::splat(plan.neg_alpha).mul(mv))
        };
        T::store(new, p, rounding, rand);
    }
}

/// The elements of an item: `start..end` of the table's index space.
#[inline(always)]
fn item_span(table: &SegmentTable, layout: &AdafactorLayout, it: &Item) -> (usize, usize) {
    let off = table.offsets()[it.tensor];
    if layout.factored[it.tensor] {
        let [_, rows, cols] = table.matrix(it.tensor);
        let base = off + it.batch * rows * cols;
        (base + it.row0 * cols, base + it.row1 * cols)
    } else {
        (off + it.row0, off + it.row1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::SimdPath;

    /// Three steps with tensors of at most `small` bytes stepped whole; returns the bits of the
    /// parameters and of every state buffer.
    fn three_steps(exec: &Executor, hp: &AdafactorHyper, bf16: Option<Rounding>, small: usize) -> Vec<Vec<u32>> {
        let shapes = [[1, 37, 23], [3, 9, 130], [2, 64, 64], [1, 1, 77], [1, 300, 260], [1, 64, 64], [1, 129, 1]];
        let table = SegmentTable::with_matrices(&shapes).unwrap();
        let factored: Vec<bool> = (0..table.len()).map(|i| i != 3 && table.matrix(i)[2] > 1).collect();
        let layout = AdafactorLayout::new(&table, &factored).unwrap();
        let n = table.total();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut value = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Every ninth value zero: whole zero rows appear in the narrow matrices.
            if seed.is_multiple_of(9) {
                0.0
            } else {
                (seed % 2001) as f32 / 1000.0 - 1.0
            }
        };
        let mut param: Vec<f32> = (0..n).map(|_| value()).collect();
        let mut param16: Vec<u16> = param.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
        let (mut row, mut col) = (vec![0.0; layout.row_total], vec![0.0; layout.col_total]);
        let (mut var, mut exp_avg) = (vec![0.0; layout.variance_total], vec![0.0; n]);
        let mut steps = vec![0.0; table.len()];
        for _ in 0..3 {
            let mut grad: Vec<f32> = (0..n).map(|_| value()).collect();
            // The first row of every tensor zero: factored tensors skip it in phases 3 and 5.
            for i in 0..table.len() {
                let [_, _, cols] = table.matrix(i);
                let start = table.offsets()[i];
                grad[start..start + cols.min(table.numels()[i])].fill(0.0);
            }
            let grad16: Vec<u16> = grad.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
            let params = match bf16 {
                None => Params::F32 { param: &mut param, grad: &grad },
                Some(rounding) => Params::Bf16 { param: &mut param16, grad: &grad16, rounding },
            };
            let exp_avg = if hp.beta1 > 0.0 { Some(&mut exp_avg[..]) } else { None };
            let bufs = AdafactorBuffers { params, row_var: &mut row, col_var: &mut col, variance: &mut var, exp_avg };
            step_with(exec, &table, &layout, &vec![true; table.len()], &mut steps, bufs, hp, small).unwrap();
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let p = if bf16.is_some() { param16.iter().map(|&b| (b as u32) << 16).collect() } else { bits(&param) };
        vec![p, bits(&row), bits(&col), bits(&var), bits(&exp_avg)]
    }

    #[test]
    fn small_tensors_stepped_whole_give_the_pipelines_bits() {
        let momentum = AdafactorHyper {
            beta1: 0.9,
            beta2: Beta2::Constant(0.99),
            eps1: Some(1e-30),
            relative_step: false,
            weight_decay: 0.1,
            ..AdafactorHyper::default()
        };
        for hp in [AdafactorHyper::default(), momentum] {
            for bf16 in [None, Some(Rounding::Stochastic { seed: 5, stream: 1 })] {
                for threads in [1, 3] {
                    let exec = Executor::new(SimdPath::best(), threads).unwrap();
                    let pipeline = three_steps(&exec, &hp, bf16, 0);
                    for small in [SMALL_TENSOR_BYTES, usize::MAX] {
                        let got = three_steps(&exec, &hp, bf16, small);
                        assert_eq!(got, pipeline, "x{threads}, {bf16:?}, small {small}, {hp:?}");
                    }
                }
            }
        }
    }
}
