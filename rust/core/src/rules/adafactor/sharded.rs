//! Adafactor over the local shards of tensors spread over several ranks (FSDP2 shards every
//! parameter on dim 0): the update of [`adafactor_step`](super::adafactor_step) on the whole
//! tensors, with the statistics that span ranks combined by a sum across ranks that the caller
//! provides (an all-reduce).
//!
//! What a rank computes from its shard alone, and what it sums with the other ranks:
//!
//! ```text
//! Split::Rows      the rows of each matrix are spread (a 2-D weight sharded on dim 0)
//!     r_i = lerp(r_i, mean_j(G_ij^2) + eps1, w)      local: a rank holds whole rows
//!     s_j = sum_i G_ij^2                              summed  -> c_j = lerp(c_j, s_j / R + eps1, w)
//!     sum_i r_i                                       summed  -> mean(r) = sum / R
//! Split::Elements  whole matrices, or the elements of an unfactored tensor, are spread
//!     per-matrix statistics and V                     local
//! both:
//!     sum P^2, sum U^2                                summed  -> RMS(P), RMS(U) of the whole tensor
//! Split::Whole     every rank holds the whole tensor: nothing is summed
//! ```
//!
//! Two sums per step: after phase 1 (column sums, row-EMA sums, sums of `P^2`) and after phase 3
//! (sums of `U^2`). Every rank passes the same tensors, splits and stepped flags, so their
//! vectors line up; a rank holding none of a tensor's elements adds zeros, and with `Rows` still
//! updates its copy of the column EMAs (every rank keeps all `C` of them). The sums add the
//! ranks' partials in another order than one process adds the whole tensor's, so results equal
//! the unsharded step's to rounding, not bit for bit; the random bits of stochastic rounding are
//! each element's own (see [`TensorAddresses::with_draw_offsets`](crate::rules::TensorAddresses::with_draw_offsets)).

use super::{
    check_addresses, check_len, items_for, matrix_factors, mean_of, on_path, plans_for, state_ptrs, step_size,
    update_cols, update_rows, AdafactorBuffers, AdafactorHyper, AdafactorLayout, Consts, Factors, Item, Phase1,
    Phase1Kernel, Phase2Consts, Phase3Kernel, Phase5Kernel, SyncPtr, TensorSums, FACTORS, ZERO_ROWS,
};
use crate::driver::{Executor, CHUNK};
use crate::error::{Error, Result};
use crate::segments::SegmentTable;

/// How a tensor of the group is spread over ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds the whole tensor (replicated): its statistics are local.
    Whole,
    /// Ranks hold different elements: whole matrices of a batch, or part of an unfactored
    /// tensor. The RMS of the update and of the parameters are summed across ranks.
    Elements,
    /// Ranks hold different rows of the tensor's one matrix: the column statistics and the mean
    /// of the row EMAs are summed across ranks too.
    Rows,
}

/// The whole tensors behind a group of shards.
#[derive(Debug, Clone, Copy)]
pub struct Shards<'a> {
    /// How each tensor is spread.
    pub split: &'a [Split],
    /// Elements of each whole tensor (what its RMS averages over).
    pub numels: &'a [usize],
    /// Rows of each whole tensor's matrix (`Rows`: what column means and `mean(r)` divide by;
    /// ignored for the other splits).
    pub rows: &'a [usize],
}

impl Shards<'_> {
    /// Checks that the shards of `table` (factored as `layout` says) can be parts of the whole
    /// tensors described: one entry per tensor, whole tensors at least as large as their shards,
    /// and a rows split only of one matrix with at most the whole matrix's rows.
    pub fn check(&self, table: &SegmentTable, layout: &AdafactorLayout) -> Result<()> {
        let n = table.len();
        check_len("factored", layout.factored.len(), n)?;
        check_len("split", self.split.len(), n)?;
        check_len("whole numels", self.numels.len(), n)?;
        check_len("whole rows", self.rows.len(), n)?;
        for i in 0..n {
            let [batch, rows, _] = table.matrix(i);
            if self.numels[i] < table.numels()[i] {
                return Err(Error::Segments(format!(
                    "tensor {i}: the whole tensor has {} elements, fewer than its shard's {}",
                    self.numels[i],
                    table.numels()[i]
                )));
            }
            if self.split[i] == Split::Rows && layout.factored[i] && (batch > 1 || self.rows[i] < rows) {
                return Err(Error::Segments(format!(
                    "tensor {i}: rows split over ranks need one matrix of at most the whole tensor's {} rows, not {batch} of {rows}",
                    self.rows[i]
                )));
            }
        }
        Ok(())
    }
}

/// One Adafactor step of the local shards of a group (see the module docs).
/// `sum_across_ranks` replaces each value of its argument with the sum of that value over the
/// ranks (on each rank, with the same length); an error from it is returned as is.
///
/// A failure of `sum_across_ranks` leaves the step half done (state updated up to that point,
/// parameters and step counts not), as a failed collective inside any distributed step would.
#[allow(clippy::too_many_arguments)]
pub fn adafactor_step_sharded(
    exec: &Executor,
    table: &SegmentTable,
    layout: &AdafactorLayout,
    stepped: &[bool],
    steps: &mut [f64],
    bufs: AdafactorBuffers<'_>,
    hp: &AdafactorHyper,
    shards: Shards<'_>,
    sum_across_ranks: &mut dyn FnMut(&mut [f64]) -> Result<()>,
) -> Result<()> {
    hp.validate()?;
    let n = table.len();
    shards.check(table, layout)?;
    let mut params = bufs.params;
    let io = params.io(table)?;
    check_addresses(table, stepped, &io)?;
    let ptrs = state_ptrs(table, layout, hp, io.raw(), bufs.row_var, bufs.col_var, bufs.variance, bufs.exp_avg)?;
    let momentum = hp.beta1 != 0.0;
    // The counters advance only when the step completes.
    let mut new_steps = steps.to_vec();
    table.plan_step(stepped, &mut new_steps)?;
    let taking_part: Vec<usize> = (0..n).filter(|&i| stepped[i]).collect();
    let mut plans = plans_for(table, hp, &new_steps, &taking_part);
    let k = Consts::new(hp);
    let k2 = Phase2Consts::new(hp, exec.path());
    // The caller thread's factor buffers, as the unsharded step reuses them.
    let mut factors = FACTORS.take();
    factors.resize(layout.row_total + layout.col_total, 0.0);
    let mut zero_rows = ZERO_ROWS.take();
    zero_rows.resize(layout.row_total, false);
    let (fp, zp) = (SyncPtr::new(&mut factors), SyncPtr::new(&mut zero_rows));
    // SAFETY: the layout's offsets are in bounds of both buffers (or one past the end for an
    // unfactored tensor, which never reads through them).
    let factors_of = |i: usize| unsafe {
        Factors {
            row: fp.at(layout.row_offsets[i]),
            col: fp.at(layout.row_total + layout.col_offsets[i]),
            zero_row: zp.at(layout.row_offsets[i]),
        }
    };

    // Phase 1 on every item of the shards this rank holds.
    let items: Vec<Item> = taking_part.iter().flat_map(|&i| items_for(table, &layout.factored, i)).collect();
    let parallel = table.total() > CHUNK;
    // SAFETY (phases 1, 3, 5): items are disjoint pieces of stepped tensors; each writes only its
    // own rows / elements of the parameters, second moments and momentum.
    let parts: Vec<Phase1> = run_all(exec, parallel, items.len(), |j| unsafe {
        on_path(k2.path, Phase1Kernel { table, layout, plans: &plans, ptrs, it: &items[j], k })
    });
    let mut sums: Vec<Option<TensorSums>> = (0..n).map(|_| None).collect();
    let mut first = 0;
    for &i in &taking_part {
        let count = items[first..].iter().take_while(|it| it.tensor == i).count();
        sums[i] =
            Some(TensorSums::combine(table, layout, i, &items[first..first + count], &parts[first..first + count]));
        first += count;
    }

    // The local part of the statistics; what spans ranks goes into the first sum.
    let mut row_var_sums: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut across = Vec::new();
    for &i in &taking_part {
        let s = sums[i].as_ref().expect("combined above");
        if layout.factored[i] {
            // SAFETY: this thread alone touches the group's EMAs and factors here.
            row_var_sums[i] =
                unsafe { update_rows(table, layout, ptrs, i, &s.row_sums, plans[i].weight2, factors_of(i), k2) };
        }
        if shards.split[i] != Split::Whole && k.param_rms {
            across.push(s.param_sq);
        }
        if shards.split[i] == Split::Rows && layout.factored[i] {
            across.extend_from_slice(&s.col_sums);
            across.push(row_var_sums[i].first().copied().unwrap_or(0.0));
        }
    }
    sum_across_ranks(&mut across)?;
    let mut at = 0;
    let mut take = |len: usize| {
        at += len;
        &across[at - len..at]
    };
    for &i in &taking_part {
        let s = sums[i].as_mut().expect("combined above");
        if shards.split[i] != Split::Whole && k.param_rms {
            s.param_sq = take(1)[0];
        }
        if !layout.factored[i] {
            continue;
        }
        let rows = table.matrix(i)[1];
        let f = factors_of(i);
        // SAFETY: as above.
        unsafe {
            if shards.split[i] == Split::Rows {
                let cols = table.matrix(i)[2];
                let col_sums = take(cols).to_vec();
                let r_sum = take(1)[0];
                update_cols(table, layout, ptrs, i, &col_sums, shards.rows[i], plans[i].weight2, k2);
                matrix_factors(table, layout, ptrs, i, 0, mean_of(r_sum, shards.rows[i], k2), f, k2);
            } else {
                update_cols(table, layout, ptrs, i, &s.col_sums, rows, plans[i].weight2, k2);
                for (b, &r_sum) in row_var_sums[i].iter().enumerate() {
                    matrix_factors(table, layout, ptrs, i, b, mean_of(r_sum, rows, k2), f, k2);
                }
            }
        }
    }

    // Phase 3 (factored: the sums of U^2), and the second sum.
    let factored_items: Vec<&Item> = items.iter().filter(|it| layout.factored[it.tensor]).collect();
    let phase3 = |j: usize| {
        let it = factored_items[j];
        // SAFETY: reads only; the factors were written above.
        unsafe { on_path(k2.path, Phase3Kernel { table, ptrs, it, f: factors_of(it.tensor), k }) }
    };
    let update_sq = run_all(exec, parallel, factored_items.len(), phase3);
    for (it, u) in factored_items.iter().zip(update_sq) {
        sums[it.tensor].as_mut().expect("combined above").update_sq += u;
    }
    let mut across: Vec<f64> = taking_part
        .iter()
        .filter(|&&i| shards.split[i] != Split::Whole)
        .map(|&i| sums[i].as_ref().expect("combined above").update_sq)
        .collect();
    sum_across_ranks(&mut across)?;
    let mut reduced = across.into_iter();
    for &i in &taking_part {
        let s = sums[i].as_mut().expect("combined above");
        if shards.split[i] != Split::Whole {
            s.update_sq = reduced.next().expect("one sum per split tensor");
        }
        plans[i].param_sq = s.param_sq;
        plans[i].update_sq = s.update_sq;
        step_size(shards.numels[i], hp, momentum, &mut plans[i]);
    }

    // Phase 5: the new parameters.
    let beta1 = hp.beta1 as f32;
    let phase5 = |j: usize| {
        let it = &items[j];
        let (f, plan) = (factors_of(it.tensor), plans[it.tensor]);
        // SAFETY: as for phase 1.
        unsafe { on_path(k2.path, Phase5Kernel { table, layout, plan, ptrs, it, f, k, momentum, beta1 }) };
    };
    run_all(exec, parallel, items.len(), phase5);
    steps.copy_from_slice(&new_steps);
    FACTORS.set(factors);
    ZERO_ROWS.set(zero_rows);
    Ok(())
}

/// `f(0..count)`, on the executor's threads when `parallel`.
fn run_all<T: Send>(exec: &Executor, parallel: bool, count: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    if parallel && count > 1 {
        exec.map_tasks(count, f)
    } else {
        (0..count).map(f).collect()
    }
}
