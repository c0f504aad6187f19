//! Adafactor (Shazeer & Stern, 2018) over a param group's flat buffers, with the options of both
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
//! U = G / sqrt(V)                          update
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
//! Whether a tensor is factored is the caller's choice (`factored[i]`): the paper factors when
//! the smaller of the last two dims is at least 128, torch every tensor with two or more dims.
//! Reductions accumulate in f64 over a fixed partition of each tensor, so results do not depend
//! on the thread count.

use super::{check_len, lerp, read_grad, read_param, store_bf16, Params, SyncPtr};
use crate::driver::{Executor, ParamIo, CHUNK};
use crate::error::{check_beta, check_non_negative, Error, Result};
use crate::segments::SegmentTable;
use rayon::prelude::*;

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

    fn beta2_at(&self, step: u64) -> f64 {
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
    /// Lays out the state of `table`'s tensors; `factored[i]` needs `rows, cols >= 1`.
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
                if r == 0 || c == 0 {
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

/// The flat buffers Adafactor reads and writes.
#[derive(Debug)]
pub struct AdafactorBuffers<'a> {
    /// Parameters (updated in place) and gradients, `table.total()` each, f32 or bf16 (AdafactorSR:
    /// the update is computed in f32 and stochastically rounded back).
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

/// Sum of squares in f64 with eight independent lanes (vectorisable without reassociation) and a
/// fixed final fold, so the result depends only on the data.
#[inline]
fn sum_sq(x: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            let v = c[k] as f64;
            lanes[k] += v * v;
        }
    }
    for (k, &v) in chunks.remainder().iter().enumerate() {
        lanes[k] += (v as f64) * (v as f64);
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

/// Runs `f` over `items` on the executor (in parallel when there is enough work), collecting
/// results in item order.
fn map_items<T: Send>(exec: &Executor, items: &[Item], work: usize, f: impl Fn(&Item) -> T + Sync + Send) -> Vec<T> {
    if exec.threads() > 1 && work > CHUNK {
        exec.install(|| items.par_iter().map(&f).collect())
    } else {
        items.iter().map(f).collect()
    }
}

/// One Adafactor step over a param group's flat buffers.
///
/// Tensors with `stepped[i]` are updated with their own step count and their counter advanced;
/// the others are left untouched.
pub fn adafactor_step(
    exec: &Executor,
    table: &SegmentTable,
    layout: &AdafactorLayout,
    stepped: &[bool],
    steps: &mut [f64],
    bufs: AdafactorBuffers<'_>,
    hp: &AdafactorHyper,
) -> Result<()> {
    hp.validate()?;
    let total = table.total();
    check_len("factored", layout.factored.len(), table.len())?;
    let mut params = bufs.params;
    params.check(total)?;
    check_len("row_var", bufs.row_var.len(), layout.row_total)?;
    check_len("col_var", bufs.col_var.len(), layout.col_total)?;
    check_len("variance", bufs.variance.len(), layout.variance_total)?;
    let momentum = hp.beta1 != 0.0;
    let exp_avg = match bufs.exp_avg {
        Some(m) => {
            check_len("exp_avg", m.len(), total)?;
            SyncPtr::new(m)
        }
        None if momentum => return Err(Error::invalid("exp_avg", "missing", "given when beta1 > 0")),
        None => SyncPtr(std::ptr::null_mut()),
    };
    if *layout != AdafactorLayout::new(table, &layout.factored)? {
        return Err(Error::Segments("the Adafactor layout does not belong to this table".into()));
    }
    table.plan_step(stepped, steps)?;
    let ptrs = Ptrs {
        io: params.io(),
        row_var: SyncPtr::new(bufs.row_var),
        col_var: SyncPtr::new(bufs.col_var),
        variance: SyncPtr::new(bufs.variance),
        exp_avg,
    };
    let active: Vec<usize> = (0..table.len()).filter(|&i| stepped[i] && table.numels()[i] > 0).collect();
    let mut plans = vec![TensorPlan::default(); table.len()];
    for &i in &active {
        let step = steps[i] as u64;
        plans[i].step = step;
        plans[i].weight2 = (1.0 - hp.beta2_at(step)) as f32;
    }
    let items: Vec<Item> = active.iter().flat_map(|&i| items_for(table, &layout.factored, i)).collect();
    let work: usize = active.iter().map(|&i| table.numels()[i]).sum();
    let sign = if hp.maximize { -1.0f32 } else { 1.0 };
    let add_eps = hp.eps1.unwrap_or(0.0) as f32;
    let clamp_eps = if hp.eps1.is_none() { f32::EPSILON } else { 0.0 };

    // Phase 1: sums of P^2; factored: row sums and column partial sums of G^2; unfactored: the
    // second moment's update and the sum of U^2.
    // SAFETY (all phases): items are disjoint pieces of stepped tensors; each writes only its own
    // rows / elements of the param, variance and momentum buffers; row and column EMAs are
    // written only in the sequential phase 2.
    let phase1 = map_items(exec, &items, work, |it| unsafe {
        phase1(table, layout, &plans, ptrs, it, sign, add_eps, clamp_eps)
    });

    // Phase 2: per tensor, combine partials and update the row and column EMAs.
    let mut row_mean_of: Vec<Vec<f32>> = vec![Vec::new(); table.len()];
    for (it, part) in items.iter().zip(&phase1) {
        plans[it.tensor].param_sq += part.param_sq;
        plans[it.tensor].update_sq += part.update_sq;
    }
    let mut col_sums: Vec<Vec<f64>> = vec![Vec::new(); table.len()];
    let mut row_sums: Vec<Vec<f64>> = vec![Vec::new(); table.len()];
    for (it, part) in items.iter().zip(phase1) {
        if !layout.factored[it.tensor] {
            continue;
        }
        let [batch, rows, cols] = table.matrix(it.tensor);
        let cs = &mut col_sums[it.tensor];
        let rs = &mut row_sums[it.tensor];
        if cs.is_empty() {
            cs.resize(batch * cols, 0.0);
            rs.resize(batch * rows, 0.0);
        }
        for (acc, v) in cs[it.batch * cols..(it.batch + 1) * cols].iter_mut().zip(&part.col_sums) {
            *acc += v;
        }
        rs[it.batch * rows + it.row0..it.batch * rows + it.row1].copy_from_slice(&part.row_sums);
    }
    for &i in &active {
        if !layout.factored[i] {
            continue;
        }
        let [batch, rows, cols] = table.matrix(i);
        let w = plans[i].weight2;
        // SAFETY: this tensor's row and column EMAs, written by this thread only.
        let row_var = unsafe { std::slice::from_raw_parts_mut(ptrs.row_var.at(layout.row_offsets[i]), batch * rows) };
        let col_var = unsafe { std::slice::from_raw_parts_mut(ptrs.col_var.at(layout.col_offsets[i]), batch * cols) };
        for (v, s) in row_var.iter_mut().zip(&row_sums[i]) {
            *v = lerp(*v, (*s as f32) / cols as f32 + add_eps, w);
        }
        for (v, s) in col_var.iter_mut().zip(&col_sums[i]) {
            *v = lerp(*v, (*s as f32) / rows as f32 + add_eps, w);
        }
        row_mean_of[i] = row_var
            .chunks(rows)
            .map(|r| {
                let mean = (r.iter().map(|&x| x as f64).sum::<f64>() / rows as f64) as f32;
                mean.max(clamp_eps)
            })
            .collect();
    }

    // Phase 3 (factored tensors): the sum of U^2 now that V is known.
    let factored_items: Vec<Item> = items.iter().copied().filter(|it| layout.factored[it.tensor]).collect();
    let sums = map_items(exec, &factored_items, work, |it| unsafe {
        phase3(table, layout, ptrs, it, &row_mean_of[it.tensor], sign, clamp_eps)
    });
    for (it, s) in factored_items.iter().zip(sums) {
        plans[it.tensor].update_sq += s;
    }

    // Phase 4: per-tensor step sizes.
    for &i in &active {
        let plan = &mut plans[i];
        let n = table.numels()[i] as f64;
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

    // Phase 5: apply.
    let beta1 = hp.beta1 as f32;
    map_items(exec, &items, work, |it| unsafe {
        phase5(table, layout, &plans, ptrs, it, &row_mean_of[it.tensor], sign, clamp_eps, momentum, beta1)
    });
    Ok(())
}

struct Phase1 {
    param_sq: f64,
    update_sq: f64,
    row_sums: Vec<f64>,
    col_sums: Vec<f64>,
}

/// The elements of an item and, for factored tensors, its first row and column count.
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

#[allow(clippy::too_many_arguments)]
unsafe fn phase1(
    table: &SegmentTable,
    layout: &AdafactorLayout,
    plans: &[TensorPlan],
    ptrs: Ptrs,
    it: &Item,
    sign: f32,
    add_eps: f32,
    clamp_eps: f32,
) -> Phase1 {
    let (start, end) = item_span(table, layout, it);
    let p = read_param(ptrs.io, start, end);
    let g = read_grad(ptrs.io, start, end);
    let g = &g[..];
    let param_sq = sum_sq(&p);
    if layout.factored[it.tensor] {
        let cols = table.matrix(it.tensor)[2];
        let mut col_sums = vec![0f64; cols];
        let mut row_sums = Vec::with_capacity(it.row1 - it.row0);
        for row in g.chunks_exact(cols) {
            row_sums.push(sum_sq(row));
            for (acc, &x) in col_sums.iter_mut().zip(row) {
                *acc += (x as f64) * (x as f64);
            }
        }
        Phase1 { param_sq, update_sq: 0.0, row_sums, col_sums }
    } else {
        let voff = layout.variance_offsets[it.tensor] + it.row0;
        let v = std::slice::from_raw_parts_mut(ptrs.variance.at(voff), end - start);
        let w = plans[it.tensor].weight2;
        let mut lanes = [0f64; 8];
        for (k, (vk, &gk)) in v.iter_mut().zip(g).enumerate() {
            let gk = sign * gk;
            *vk = lerp(*vk, gk * gk + add_eps, w);
            let u = gk * (1.0 / vk.max(clamp_eps * clamp_eps).sqrt());
            lanes[k % 8] += (u as f64) * (u as f64);
        }
        let update_sq =
            ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        Phase1 { param_sq, update_sq, row_sums: Vec::new(), col_sums: Vec::new() }
    }
}

/// The factored update `U = G / sqrt(max(r c / mean(r), eps^2))` for one row.
#[inline(always)]
fn factored_update(g: f32, r: f32, c: f32, row_mean: f32, sign: f32, clamp_eps: f32) -> f32 {
    let v = (r * c) / row_mean;
    (1.0 / v.max(clamp_eps * clamp_eps).sqrt()) * (sign * g)
}

unsafe fn phase3(
    table: &SegmentTable,
    layout: &AdafactorLayout,
    ptrs: Ptrs,
    it: &Item,
    row_means: &[f32],
    sign: f32,
    clamp_eps: f32,
) -> f64 {
    let (start, end) = item_span(table, layout, it);
    let [_, rows, cols] = table.matrix(it.tensor);
    let g = read_grad(ptrs.io, start, end);
    let rv = ptrs.row_var.at(layout.row_offsets[it.tensor] + it.batch * rows);
    let cv = std::slice::from_raw_parts(ptrs.col_var.at(layout.col_offsets[it.tensor] + it.batch * cols), cols);
    let mean = row_means[it.batch];
    let mut lanes = [0f64; 8];
    for (ri, row) in g.chunks_exact(cols).enumerate() {
        let r = *rv.add(it.row0 + ri);
        for (k, (&gk, &c)) in row.iter().zip(cv).enumerate() {
            let u = factored_update(gk, r, c, mean, sign, clamp_eps);
            lanes[k % 8] += (u as f64) * (u as f64);
        }
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

#[allow(clippy::too_many_arguments)]
unsafe fn phase5(
    table: &SegmentTable,
    layout: &AdafactorLayout,
    plans: &[TensorPlan],
    ptrs: Ptrs,
    it: &Item,
    row_means: &[f32],
    sign: f32,
    clamp_eps: f32,
    momentum: bool,
    beta1: f32,
) {
    let plan = plans[it.tensor];
    let (start, end) = item_span(table, layout, it);
    // f32 parameters are updated in place; bf16 ones in an f32 copy rounded back at the end.
    let mut widened: Vec<f32>;
    let p: &mut [f32] = match ptrs.io {
        ParamIo::F32 { param, .. } => std::slice::from_raw_parts_mut(param.add(start), end - start),
        ParamIo::Bf16 { .. } => {
            widened = read_param(ptrs.io, start, end).into_owned();
            &mut widened
        }
    };
    let g = read_grad(ptrs.io, start, end);
    let m = if momentum { Some(std::slice::from_raw_parts_mut(ptrs.exp_avg.at(start), end - start)) } else { None };
    let apply = |p: &mut f32, u: f32, m: Option<&mut f32>| {
        let decayed = if plan.decay != 1.0 { *p * plan.decay } else { *p };
        *p = match m {
            None => decayed + plan.scale * u,
            Some(m) => {
                *m = lerp(*m, u * plan.scale, 1.0 - beta1);
                decayed + plan.neg_alpha * *m
            }
        };
    };
    if layout.factored[it.tensor] {
        let [_, rows, cols] = table.matrix(it.tensor);
        let rv = ptrs.row_var.at(layout.row_offsets[it.tensor] + it.batch * rows);
        let cv = std::slice::from_raw_parts(ptrs.col_var.at(layout.col_offsets[it.tensor] + it.batch * cols), cols);
        let mean = row_means[it.batch];
        let mut m = m;
        for (ri, (prow, grow)) in p.chunks_exact_mut(cols).zip(g.chunks_exact(cols)).enumerate() {
            let r = *rv.add(it.row0 + ri);
            let mut mrow = m.as_deref_mut().map(|m| &mut m[ri * cols..(ri + 1) * cols]);
            for k in 0..cols {
                let u = factored_update(grow[k], r, cv[k], mean, sign, clamp_eps);
                apply(&mut prow[k], u, mrow.as_deref_mut().map(|m| &mut m[k]));
            }
        }
    } else {
        let voff = layout.variance_offsets[it.tensor] + it.row0;
        let v = std::slice::from_raw_parts(ptrs.variance.at(voff), end - start);
        let mut m = m;
        for k in 0..p.len() {
            let u = (1.0 / v[k].max(clamp_eps * clamp_eps).sqrt()) * (sign * g[k]);
            apply(&mut p[k], u, m.as_deref_mut().map(|m| &mut m[k]));
        }
    }
    if let ParamIo::Bf16 { param, rounding, .. } = ptrs.io {
        store_bf16(param, start, p, rounding, plan.step);
    }
}
