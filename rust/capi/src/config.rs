//! The C configuration struct and tensor descriptions, and their translation into the core's
//! hyperparameters and segment table. Range checks are the core's (`*Hyper::validate`,
//! `halflife`); this module adds only what the C struct itself introduces: enum values given as
//! integers, half-lives given as 0 for "unused", and fields that a rule cannot use.

use crate::error::{renamed, CError, SmallbatchStatus};
use smallbatch_core::driver::Rounding;
use smallbatch_core::halflife::beta_from_halflife;
use smallbatch_core::newton_schulz::NewtonSchulz;
use smallbatch_core::rules::adafactor::{AdafactorHyper, Beta2};
use smallbatch_core::rules::adam::AdamHyper;
use smallbatch_core::rules::muon::{LrAdjust, MuonHyper};
use smallbatch_core::rules::sgd::SgdHyper;
use smallbatch_core::{Error, SegmentTable};

/// The most dims a `SmallbatchTensor` describes; merge leading dims of larger tensors (only the
/// product of all dims but the last two matters).
pub const SMALLBATCH_MAX_DIMS: usize = 8;

/// Version of the byte format of `smallbatch_optimizer_export_state`; importing state of another
/// version fails with `SMALLBATCH_STATUS_STATE`.
pub const SMALLBATCH_STATE_FORMAT_VERSION: u32 = 1;

/// Update rules (values of `SmallbatchConfig.rule`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmallbatchRule {
    /// SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD).
    Sgd = 0,
    /// Adam with an L2 penalty (torch.optim.Adam).
    Adam = 1,
    /// Adam with decoupled weight decay (torch.optim.AdamW).
    Adamw = 2,
    /// Adafactor: factored second moments (smallbatch_rs.Adafactor).
    Adafactor = 3,
    /// Muon: momentum and Newton-Schulz orthogonalisation of matrices (torch.optim.Muon).
    Muon = 4,
}

impl SmallbatchRule {
    pub(crate) fn from_u32(value: u32) -> Result<SmallbatchRule, Error> {
        Ok(match value {
            0 => SmallbatchRule::Sgd,
            1 => SmallbatchRule::Adam,
            2 => SmallbatchRule::Adamw,
            3 => SmallbatchRule::Adafactor,
            4 => SmallbatchRule::Muon,
            _ => return Err(Error::invalid("rule", value, "one of SMALLBATCH_RULE_*")),
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            SmallbatchRule::Sgd => "SGD",
            SmallbatchRule::Adam => "Adam",
            SmallbatchRule::Adamw => "AdamW",
            SmallbatchRule::Adafactor => "Adafactor",
            SmallbatchRule::Muon => "Muon",
        }
    }
}

/// Storage types of parameters and gradients (values of `SmallbatchConfig.param_dtype`).
/// Optimizer state is float32 either way.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmallbatchDtype {
    /// `float`.
    F32 = 0,
    /// bfloat16 as raw `uint16_t` bits: updates are computed in float32 and rounded back.
    Bf16 = 1,
}

/// How bf16 parameters are rounded after an update (values of `SmallbatchConfig.rounding`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmallbatchRounding {
    /// To nearest, ties to even.
    Nearest = 0,
    /// Stochastically (unbiased), with random bits keyed by `seed` and counted by (step,
    /// element, `stream`): deterministic, and a resumed run continues bit for bit.
    Stochastic = 1,
}

/// How Muon scales the learning rate by each matrix's shape (values of `SmallbatchConfig.adjust_lr`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmallbatchLrAdjust {
    /// `sqrt(max(1, rows / cols))`, torch.optim.Muon's default.
    Original = 0,
    /// `0.2 sqrt(max(rows, cols))`: the update's RMS matches AdamW's.
    MatchRmsAdamw = 1,
    /// No scaling.
    None = 2,
}

/// Everything an optimizer is made of. Fill it with `smallbatch_config_default(rule, &config)`
/// (the defaults of the Python package's optimizer of that rule), then change what you need.
/// Fields a rule does not use are ignored, except `t2` (must be 0 for SGD and Muon).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmallbatchConfig {
    /// A `SmallbatchRule`.
    pub rule: u32,
    /// A `SmallbatchDtype`: the type of the parameter and gradient buffers.
    pub param_dtype: u32,
    /// A `SmallbatchRounding`, for bf16 parameters (ignored for float).
    pub rounding: u32,
    /// Separates the random bits of optimizers that share a seed (the Python package uses the
    /// param group's index).
    pub stream: u32,
    /// Seed of stochastic rounding's random bits.
    pub seed: u64,
    /// Learning rate (finite, >= 0).
    pub lr: f64,
    /// SGD: momentum factor (>= 0; 0 keeps no momentum buffer). Muon: momentum in [0, 1).
    pub momentum: f64,
    /// SGD: dampening of the momentum.
    pub dampening: f64,
    /// Adam, AdamW, Adafactor: first-moment coefficient in [0, 1) (Adafactor: 0 = no momentum).
    pub beta1: f64,
    /// Adam, AdamW: second-moment coefficient in [0, 1). Adafactor: a constant beta2, used when
    /// `t2` and `beta2_decay` are 0.
    pub beta2: f64,
    /// Adafactor: torch's schedule `beta2_t = 1 - t^beta2_decay` when < 0 and `t2` is 0;
    /// 0 selects the constant `beta2`.
    pub beta2_decay: f64,
    /// Half-life in tokens that sets `momentum` (SGD, Muon) or `beta1` (Adam, AdamW,
    /// Adafactor) to `0.5^(tokens_per_step / t1)`; 0 = not used.
    pub t1: f64,
    /// Half-life in tokens that sets `beta2` (Adam, AdamW, Adafactor); 0 = not used.
    pub t2: f64,
    /// Tokens per step (batch size x sequence length), needed with `t1` or `t2`.
    pub tokens_per_step: f64,
    /// Adam, AdamW: added to the denominator. Muon: floor of the Newton-Schulz input's norm.
    pub eps: f64,
    /// Adafactor: added to the squared gradient (the paper's 1e-30); 0 selects torch's
    /// handling instead (no addition, clamps at float32's epsilon).
    pub eps1: f64,
    /// Adafactor: floor of the parameter RMS in the relative step size.
    pub eps2: f64,
    /// Adafactor: clipping threshold on the update's RMS (>= 1).
    pub clip_threshold: f64,
    /// Weight decay: L2 penalty (SGD, Adam) or decoupled (AdamW, Adafactor, Muon).
    pub weight_decay: f64,
    /// Adafactor: factor tensors of 2 or more dims whose smaller last-two dim is at least this.
    pub min_dim_size_to_factor: usize,
    /// Muon: coefficients (a, b, c) of the Newton-Schulz quintic.
    pub ns_coefficients: [f32; 3],
    /// Muon: Newton-Schulz iterations (<= 99).
    pub ns_steps: u32,
    /// Muon: a `SmallbatchLrAdjust`.
    pub adjust_lr: u32,
    /// SGD, Muon: Nesterov momentum (nonzero = on).
    pub nesterov: u8,
    /// Ascend instead of descend (nonzero = on).
    pub maximize: u8,
    /// Adafactor: scale the step by `max(eps2, RMS(param))` (nonzero = on).
    pub relative_step: u8,
    /// Adafactor: cap the step size at `1/sqrt(t)`, as torch.optim.Adafactor does (nonzero = on).
    pub step_size_cap: u8,
}

/// One tensor of the flat buffer, by its shape. Tensors lie back to back in the buffer, in
/// table order; each is row-major. Adafactor factors and Muon orthogonalises over the last two
/// dims (a tensor of more dims is a batch of matrices); SGD and Adam need only the sizes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmallbatchTensor {
    /// Number of dims, at most `SMALLBATCH_MAX_DIMS` (0 for a scalar).
    pub ndim: u32,
    /// Dims, outermost first; entries from `ndim` on are ignored.
    pub shape: [usize; SMALLBATCH_MAX_DIMS],
}

/// The defaults of the Python package's optimizer for `rule`, float parameters, seed 0.
pub(crate) fn default_config(rule: u32) -> Result<SmallbatchConfig, Error> {
    let rule = SmallbatchRule::from_u32(rule)?;
    let mut c = SmallbatchConfig {
        rule: rule as u32,
        param_dtype: SmallbatchDtype::F32 as u32,
        rounding: SmallbatchRounding::Nearest as u32,
        stream: 0,
        seed: 0,
        lr: 1e-3,
        momentum: 0.0,
        dampening: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        beta2_decay: 0.0,
        t1: 0.0,
        t2: 0.0,
        tokens_per_step: 0.0,
        eps: 1e-8,
        eps1: 1e-30,
        eps2: 1e-3,
        clip_threshold: 1.0,
        weight_decay: 0.0,
        min_dim_size_to_factor: 128,
        ns_coefficients: [3.4445, -4.775, 2.0315],
        ns_steps: 5,
        adjust_lr: SmallbatchLrAdjust::Original as u32,
        nesterov: 0,
        maximize: 0,
        relative_step: 1,
        step_size_cap: 0,
    };
    match rule {
        SmallbatchRule::Sgd | SmallbatchRule::Adam => {}
        SmallbatchRule::Adamw => c.weight_decay = 1e-2,
        SmallbatchRule::Adafactor => {
            c.lr = 1e-2;
            c.beta1 = 0.0;
            c.beta2_decay = -0.8;
        }
        SmallbatchRule::Muon => {
            c.momentum = 0.95;
            c.nesterov = 1;
            c.weight_decay = 0.1;
            c.eps = 1e-7;
        }
    }
    Ok(c)
}

/// A rule's hyperparameters, in the core's types.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Hyper {
    Sgd(SgdHyper),
    Adam(AdamHyper),
    Adafactor(AdafactorHyper),
    Muon(MuonHyper),
}

impl Hyper {
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            Hyper::Sgd(hp) => hp.validate(),
            Hyper::Adam(hp) => hp.validate(),
            Hyper::Adafactor(hp) => hp.validate(),
            Hyper::Muon(hp) => hp.validate().map_err(|e| {
                // The core's Newton-Schulz fields carry its own names.
                let e = renamed(e, "steps", "ns_steps");
                let e = renamed(e, "a", "ns_coefficients[0]");
                let e = renamed(e, "b", "ns_coefficients[1]");
                renamed(e, "c", "ns_coefficients[2]")
            }),
        }
    }
}

/// How parameters are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    F32,
    Bf16(Rounding),
}

/// A config checked and translated: the rule, its hyperparameters with betas taken from the
/// half-lives, and the storage.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resolved {
    pub rule: SmallbatchRule,
    pub hyper: Hyper,
    pub storage: Storage,
    /// The config with the betas in use written into `momentum`, `beta1` and `beta2`.
    pub config: SmallbatchConfig,
}

/// The beta a half-life gives, or `None` when the half-life is 0 (unused).
fn halflife_beta(field: &str, t: f64, tokens_per_step: f64) -> Result<Option<f64>, Error> {
    if t == 0.0 {
        return Ok(None);
    }
    beta_from_halflife(t, tokens_per_step).map(Some).map_err(|e| renamed(e, "halflife_tokens", field))
}

/// Checks `config` and translates it for the core.
pub(crate) fn resolve(config: &SmallbatchConfig) -> Result<Resolved, Error> {
    let rule = SmallbatchRule::from_u32(config.rule)?;
    let storage = match config.param_dtype {
        0 => Storage::F32,
        1 => Storage::Bf16(match config.rounding {
            0 => Rounding::Nearest,
            1 => Rounding::Stochastic { seed: config.seed, stream: config.stream },
            other => return Err(Error::invalid("rounding", other, "one of SMALLBATCH_ROUNDING_*")),
        }),
        other => return Err(Error::invalid("param_dtype", other, "one of SMALLBATCH_DTYPE_*")),
    };
    let mut c = *config;
    if matches!(rule, SmallbatchRule::Sgd | SmallbatchRule::Muon) && c.t2 != 0.0 {
        return Err(Error::invalid("t2", c.t2, "0 for SGD and Muon, which keep no second moment"));
    }
    let beta1 = halflife_beta("t1", c.t1, c.tokens_per_step)?;
    let beta2 = halflife_beta("t2", c.t2, c.tokens_per_step)?;
    let on = |flag: u8| flag != 0;
    let hyper = match rule {
        SmallbatchRule::Sgd => {
            c.momentum = beta1.unwrap_or(c.momentum);
            Hyper::Sgd(SgdHyper {
                lr: c.lr,
                momentum: c.momentum,
                dampening: c.dampening,
                weight_decay: c.weight_decay,
                nesterov: on(c.nesterov),
                maximize: on(c.maximize),
            })
        }
        SmallbatchRule::Adam | SmallbatchRule::Adamw => {
            c.beta1 = beta1.unwrap_or(c.beta1);
            c.beta2 = beta2.unwrap_or(c.beta2);
            Hyper::Adam(AdamHyper {
                lr: c.lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: c.weight_decay,
                decoupled_weight_decay: rule == SmallbatchRule::Adamw,
                maximize: on(c.maximize),
                // The C API keeps two moments per element; amsgrad's third is Python-only.
                amsgrad: false,
            })
        }
        SmallbatchRule::Adafactor => {
            c.beta1 = beta1.unwrap_or(c.beta1);
            let beta2 = match beta2 {
                Some(b) => {
                    c.beta2 = b;
                    Beta2::Constant(b)
                }
                None if c.beta2_decay != 0.0 => Beta2::Decay(c.beta2_decay),
                None => Beta2::Constant(c.beta2),
            };
            Hyper::Adafactor(AdafactorHyper {
                lr: c.lr,
                beta1: c.beta1,
                beta2,
                eps1: if c.eps1 == 0.0 { None } else { Some(c.eps1) },
                eps2: c.eps2,
                clip_threshold: c.clip_threshold,
                relative_step: on(c.relative_step),
                cap_lr_at_inv_sqrt_step: on(c.step_size_cap),
                weight_decay: c.weight_decay,
                maximize: on(c.maximize),
            })
        }
        SmallbatchRule::Muon => {
            c.momentum = beta1.unwrap_or(c.momentum);
            let adjust_lr = match c.adjust_lr {
                0 => LrAdjust::Original,
                1 => LrAdjust::MatchRmsAdamW,
                2 => LrAdjust::None,
                other => return Err(Error::invalid("adjust_lr", other, "one of SMALLBATCH_LR_ADJUST_*")),
            };
            let [a, b, cc] = c.ns_coefficients;
            Hyper::Muon(MuonHyper {
                lr: c.lr,
                momentum: c.momentum,
                nesterov: on(c.nesterov),
                weight_decay: c.weight_decay,
                newton_schulz: NewtonSchulz { steps: c.ns_steps as usize, a, b, c: cc, eps: c.eps as f32 },
                adjust_lr,
                maximize: on(c.maximize),
            })
        }
    };
    hyper.validate()?;
    Ok(Resolved { rule, hyper, storage, config: c })
}

/// A tensor as `[batch, rows, cols]` (vectors and scalars are `[1, 1, n]`), as the Python
/// package describes its parameters to the core.
fn matrix_of(i: usize, t: &SmallbatchTensor) -> Result<[usize; 3], CError> {
    let ndim = t.ndim as usize;
    if ndim > SMALLBATCH_MAX_DIMS {
        return Err(CError::new(
            SmallbatchStatus::Shape,
            format!("tensors[{i}].ndim is {ndim}, at most {SMALLBATCH_MAX_DIMS} (merge leading dims)"),
        ));
    }
    let dims = &t.shape[..ndim];
    let overflow = || CError::new(SmallbatchStatus::Shape, format!("tensors[{i}]: shape {dims:?} overflows"));
    Ok(match ndim {
        0 => [1, 1, 1],
        1 => [1, 1, dims[0]],
        _ => {
            let batch = dims[..ndim - 2].iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(overflow)?;
            [batch, dims[ndim - 2], dims[ndim - 1]]
        }
    })
}

/// The segment table of `tensors`, and which are matrices (2 or more dims).
pub(crate) fn table_of(tensors: &[SmallbatchTensor]) -> Result<(SegmentTable, Vec<bool>), CError> {
    let matrices = tensors.iter().enumerate().map(|(i, t)| matrix_of(i, t)).collect::<Result<Vec<_>, _>>()?;
    let table = SegmentTable::with_matrices(&matrices)?;
    Ok((table, tensors.iter().map(|t| t.ndim >= 2).collect()))
}
