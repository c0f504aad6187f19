//! What a `SmallbatchOptimizer` handle owns: the resolved config, the segment table, step
//! counters and state buffers, and the step, checkpoint and update calls on them.

use crate::config::{resolve, table_of, Hyper, Resolved, SmallbatchConfig, SmallbatchRule, SmallbatchTensor, Storage};
use crate::error::{CError, SmallbatchStatus};
use crate::state;
use smallbatch_core::rules::adafactor::{adafactor_step, AdafactorBuffers, AdafactorLayout};
use smallbatch_core::rules::adam::{adam_step, AdamBuffers};
use smallbatch_core::rules::muon::{muon_step, MuonBuffers};
use smallbatch_core::rules::sgd::{sgd_step, SgdBuffers};
use smallbatch_core::rules::Params;
use smallbatch_core::{Executor, SegmentTable};

/// A named flat f32 state buffer (`exp_avg`, `row_var`, ...), named as in torch's state dicts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Buffer {
    pub name: &'static str,
    pub data: Vec<f32>,
}

fn buffer(name: &'static str, len: usize) -> Buffer {
    Buffer { name, data: vec![0.0; len] }
}

#[derive(Debug)]
pub(crate) struct Optimizer {
    pub resolved: Resolved,
    pub table: SegmentTable,
    /// Adafactor's state layout (which tensors are factored, where their moments live).
    pub layout: Option<AdafactorLayout>,
    /// Per-tensor step counters, as the core keeps them.
    pub steps: Vec<f64>,
    /// The rule's state buffers, in a fixed order per rule.
    pub buffers: Vec<Buffer>,
    /// Every tensor is stepped on every call.
    stepped: Vec<bool>,
}

impl Optimizer {
    pub fn new(config: &SmallbatchConfig, tensors: &[SmallbatchTensor]) -> Result<Optimizer, CError> {
        let resolved = resolve(config)?;
        // Surfaces a bad SMALLBATCH_SIMD or SMALLBATCH_NUM_THREADS now rather than at the first step.
        Executor::global()?;
        let (table, is_matrix) = table_of(tensors)?;
        let total = table.total();
        let mut layout = None;
        let buffers = match resolved.hyper {
            Hyper::Sgd(_) if keeps_momentum(&resolved.hyper) => vec![buffer("momentum_buffer", total)],
            Hyper::Sgd(_) => Vec::new(),
            Hyper::Adam(_) => vec![buffer("exp_avg", total), buffer("exp_avg_sq", total)],
            Hyper::Adafactor(_) => {
                // The Python package's rule: matrices whose smaller last-two dim reaches the threshold.
                let min_dim = resolved.config.min_dim_size_to_factor;
                let factored: Vec<bool> = (0..table.len())
                    .map(|i| {
                        let [_, rows, cols] = table.matrix(i);
                        is_matrix[i] && table.numels()[i] > 0 && rows.min(cols) >= min_dim
                    })
                    .collect();
                let lay = AdafactorLayout::new(&table, &factored)?;
                let mut b = vec![
                    buffer("row_var", lay.row_total),
                    buffer("col_var", lay.col_total),
                    buffer("variance", lay.variance_total),
                ];
                if keeps_momentum(&resolved.hyper) {
                    b.push(buffer("exp_avg", total));
                }
                layout = Some(lay);
                b
            }
            Hyper::Muon(_) => {
                if let Some(i) = is_matrix.iter().position(|&m| !m) {
                    return Err(CError::new(
                        SmallbatchStatus::Shape,
                        format!(
                            "tensors[{i}] has {} dims; Muon steps matrices (2 or more dims): step vectors and \
                             scalars with an AdamW optimizer",
                            tensors[i].ndim
                        ),
                    ));
                }
                vec![buffer("momentum_buffer", total)]
            }
        };
        Ok(Optimizer {
            resolved,
            steps: vec![0.0; table.len()],
            stepped: vec![true; table.len()],
            table,
            layout,
            buffers,
        })
    }

    pub fn rule(&self) -> SmallbatchRule {
        self.resolved.rule
    }

    /// Replaces the config after a change of lr or tokens per step. The state buffers chosen at
    /// creation must stay (checkpoints keep their layout), so a change that would turn momentum
    /// on or off (a half-life's beta underflows to 0 when the tokens per step exceed it about a
    /// thousandfold) is refused.
    pub fn reconfigure(&mut self, config: &SmallbatchConfig) -> Result<(), CError> {
        let resolved = resolve(config)?;
        if keeps_momentum(&resolved.hyper) != keeps_momentum(&self.resolved.hyper) {
            return Err(CError::new(
                SmallbatchStatus::InvalidValue,
                format!(
                    "tokens_per_step {} would turn momentum {}; make a new optimizer",
                    config.tokens_per_step,
                    if keeps_momentum(&resolved.hyper) { "on" } else { "off" }
                ),
            ));
        }
        self.resolved = resolved;
        Ok(())
    }

    /// One step of every tensor. `params` holds the caller's buffers, already checked to be
    /// valid memory of the length they claim; the core checks the lengths against the table.
    pub fn step(&mut self, params: Params<'_>) -> Result<(), CError> {
        let is_bf16 = matches!(params, Params::Bf16 { .. });
        match (self.resolved.storage, is_bf16) {
            (Storage::F32, false) | (Storage::Bf16(_), true) => {}
            (Storage::F32, true) => {
                return Err(CError::new(
                    SmallbatchStatus::Dtype,
                    "this optimizer steps float parameters: call smallbatch_optimizer_step_f32",
                ))
            }
            (Storage::Bf16(_), false) => {
                return Err(CError::new(
                    SmallbatchStatus::Dtype,
                    "this optimizer steps bf16 parameters: call smallbatch_optimizer_step_bf16",
                ))
            }
        }
        let exec = Executor::global()?;
        let (table, stepped, steps) = (&self.table, &self.stepped[..], &mut self.steps[..]);
        let result = match (&self.resolved.hyper, &mut self.buffers[..]) {
            (Hyper::Sgd(hp), []) => sgd_step(exec, table, stepped, steps, SgdBuffers { params, momentum: None }, hp),
            (Hyper::Sgd(hp), [m]) => {
                sgd_step(exec, table, stepped, steps, SgdBuffers { params, momentum: Some(&mut m.data) }, hp)
            }
            (Hyper::Adam(hp), [m, v]) => {
                let bufs = AdamBuffers { params, exp_avg: &mut m.data, exp_avg_sq: &mut v.data, max_exp_avg_sq: None };
                adam_step(exec, table, stepped, steps, bufs, hp)
            }
            (Hyper::Adafactor(hp), [r, c, v, rest @ ..]) => {
                let layout = self.layout.as_ref().ok_or_else(|| CError::internal("Adafactor without a layout"))?;
                let bufs = AdafactorBuffers {
                    params,
                    row_var: &mut r.data,
                    col_var: &mut c.data,
                    variance: &mut v.data,
                    exp_avg: rest.first_mut().map(|m| &mut m.data[..]),
                };
                adafactor_step(exec, table, layout, stepped, steps, bufs, hp)
            }
            (Hyper::Muon(hp), [m]) => {
                muon_step(exec, table, stepped, steps, MuonBuffers { params, momentum: &mut m.data }, hp)
            }
            _ => return Err(CError::internal("state buffers do not match the rule")),
        };
        result.map_err(CError::from)
    }

    pub fn state_size(&self) -> usize {
        state::size(self)
    }

    pub fn export_state(&self, out: &mut [u8]) -> Result<usize, CError> {
        state::write(self, out)
    }

    /// Replaces steps and buffers with those in `bytes`, or changes nothing.
    pub fn import_state(&mut self, bytes: &[u8]) -> Result<(), CError> {
        let parsed = state::read(self, bytes)?;
        self.steps = parsed.steps;
        for (dst, src) in self.buffers.iter_mut().zip(parsed.buffers) {
            state::decode_f32(src, &mut dst.data);
        }
        Ok(())
    }
}

/// Whether the rule keeps a momentum buffer (SGD and Adafactor only with a nonzero momentum;
/// Muon always, Adam has its moments).
fn keeps_momentum(hyper: &Hyper) -> bool {
    match hyper {
        Hyper::Sgd(hp) => hp.momentum != 0.0,
        Hyper::Adafactor(hp) => hp.beta1 != 0.0,
        Hyper::Adam(_) | Hyper::Muon(_) => true,
    }
}
