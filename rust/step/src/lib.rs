//! # smallbatch-step
//!
//! One entry point per update rule over a param group whose tensors live where their owner keeps
//! them, given by address: the step runs in the core ([`smallbatch_core`]) for CPU tensors and in
//! the CUDA kernels ([`smallbatch_cuda`]) for tensors on a GPU. This is what the Python bindings
//! call (with torch's `data_ptr()`s), and what any host program that owns its tensors can call.
//!
//! Every entry point checks what raw addresses can get wrong (null, misaligned, overlapping
//! memory, buffers of the wrong size) before anything is modified, and turns a panic (a bug)
//! into an error: nothing unwinds into the caller.

mod buffers;
mod openmp;

pub use buffers::Buffer;
pub use openmp::use_loaded_runtime;

use buffers::check_disjoint;
use smallbatch_core::driver::Rounding;
use smallbatch_core::newton_schulz::{orthogonalize_many, NewtonSchulz};
use smallbatch_core::rules::adafactor::{
    adafactor_step, adafactor_step_sharded, AdafactorBuffers, AdafactorHyper, AdafactorLayout, Shards,
};
use smallbatch_core::rules::adam::{adam_step, AdamBuffers, AdamHyper};
use smallbatch_core::rules::muon::{muon_step, muon_step_sharded, MuonBuffers, MuonHyper};
use smallbatch_core::rules::sgd::{sgd_step, SgdBuffers, SgdHyper};
use smallbatch_core::rules::{Params, Storage, TensorAddresses};
use smallbatch_core::{rounding, Executor, SegmentTable};
use smallbatch_cuda::adafactor::{AdafactorState, AdafactorWorkspace};
use smallbatch_cuda::cublas::Inputs;
pub use smallbatch_cuda::dispatch::LrSource;
use smallbatch_cuda::dispatch::{adam_step_counted, sgd_step_counted, DeviceCounts, DeviceDtype, DeviceGroup};
use smallbatch_cuda::muon::MuonWorkspace;
use smallbatch_cuda::CudaError;
use std::fmt;
use std::sync::{Mutex, MutexGuard};

/// Where a group's tensors (and the optimizer's state) live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// Host memory: stepped by the core, on its SIMD path and threads.
    Cpu,
    /// A CUDA device: kernels launched on `stream` (a raw `cudaStream_t`, 0 for the legacy
    /// default stream), asynchronously.
    Cuda {
        /// Device ordinal.
        ordinal: i32,
        /// Raw `cudaStream_t`.
        stream: usize,
    },
}

/// What went wrong, by who can act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    /// An argument the step cannot take (bad hyperparameters, addresses or sizes).
    Invalid(String),
    /// Something this machine lacks (a SIMD path, NVRTC, a GPU driver) or a device failure.
    Unavailable(String),
    /// A bug: a panic caught before it could unwind into the caller.
    Internal(String),
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepError::Invalid(m) | StepError::Unavailable(m) => write!(f, "{m}"),
            StepError::Internal(m) => write!(f, "smallbatch_rs internal error: {m}"),
        }
    }
}

impl std::error::Error for StepError {}

impl From<smallbatch_core::Error> for StepError {
    fn from(e: smallbatch_core::Error) -> StepError {
        match e {
            smallbatch_core::Error::SimdUnavailable { .. } | smallbatch_core::Error::Collective(_) => {
                StepError::Unavailable(e.to_string())
            }
            _ => StepError::Invalid(e.to_string()),
        }
    }
}

impl From<CudaError> for StepError {
    fn from(e: CudaError) -> StepError {
        match e {
            CudaError::Invalid(m) => StepError::Invalid(m),
            other => StepError::Unavailable(other.to_string()),
        }
    }
}

/// Runs `f`, turning a panic into [`StepError::Internal`] with the panic's message.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, StepError>) -> Result<T, StepError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            Err(StepError::Internal(format!("{what}: {}", smallbatch_core::error::panic_message(&*payload))))
        }
    }
}

/// A param group's tensors: the table (offsets index the optimizer's state and count the random
/// bits), which tensors this step updates, how they are stored, and where each tensor's
/// parameters and gradients are (element 0; the same layout in both; ignored for tensors that
/// are not stepped or have no elements).
#[derive(Debug, Clone, Copy)]
pub struct Tensors<'a> {
    /// The group's layout.
    pub table: &'a SegmentTable,
    /// Which tensors take a step.
    pub stepped: &'a [bool],
    /// Storage type and rounding of the parameters.
    pub storage: Storage,
    /// Each tensor's parameter address.
    pub params: &'a [u64],
    /// Each tensor's gradient address.
    pub grads: &'a [u64],
    /// The index each tensor's element 0 draws its stochastic-rounding bits at (`None`: its
    /// offset in the table). A shard of a larger tensor passes its place in the unsharded
    /// group, so that the shards of one step round exactly as the unsharded step would.
    pub draws: Option<&'a [u64]>,
}

impl Tensors<'_> {
    /// Checks the per-tensor tables against the table.
    fn check_lengths(&self) -> Result<(), StepError> {
        let n = self.table.len();
        for (what, len) in [("stepped flags", self.stepped.len()), ("parameter addresses", self.params.len())] {
            if len != n {
                return Err(StepError::Invalid(format!("{len} {what} for {n} tensors")));
            }
        }
        if self.grads.len() != n {
            return Err(StepError::Invalid(format!("{} gradient addresses for {n} tensors", self.grads.len())));
        }
        if let Some(d) = self.draws {
            if d.len() != n {
                return Err(StepError::Invalid(format!("{} draw offsets for {n} tensors", d.len())));
            }
        }
        Ok(())
    }

    /// The core's view of the tensors.
    ///
    /// # Safety
    /// As for [`TensorAddresses::new`].
    unsafe fn core_params(&self) -> Params<'static> {
        let addrs = |a: &[u64]| a.iter().map(|&x| x as usize).collect();
        let tensors = TensorAddresses::new(self.storage, addrs(self.params), addrs(self.grads));
        Params::Tensors(match self.draws {
            Some(d) => tensors.with_draw_offsets(addrs(d)),
            None => tensors,
        })
    }

    /// The CUDA crate's view of the tensors on device `ordinal`.
    fn device_group(&self, ordinal: i32, stream: usize) -> (DeviceGroup<'_>, Rounding) {
        let (dtype, rounding) = match self.storage {
            Storage::F32 => (DeviceDtype::F32, Rounding::Nearest),
            Storage::Bf16(r) => (DeviceDtype::Bf16, r),
        };
        (DeviceGroup { ordinal, stream, dtype, params: self.params, grads: self.grads, draws: self.draws }, rounding)
    }
}

/// The step counters: a host f64 per tensor (torch keeps `state["step"]` as a float tensor).
fn step_counters<'a>(table: &SegmentTable, steps: Buffer) -> Result<&'a mut [f64], StepError> {
    let steps = steps.expect::<f64>(table.len())?;
    // SAFETY: checked to hold one live f64 per tensor (the caller's promise for the address).
    Ok(unsafe { steps.slice_mut() })
}

/// Where a step finds its step counts (f64, one per tensor of the table) and learning rate.
#[derive(Debug, Clone, Copy)]
pub enum Counts {
    /// Counts in host memory, read and advanced by the host; the learning rate is the
    /// hyperparameters'.
    Host(Buffer),
    /// torch's `capturable=True`: counts in the group's device memory (host memory for a CPU
    /// group), and the learning rate from `lr` (a 0-dim tensor there, or a value). On CUDA the
    /// kernels read both and the host reads neither, so the launches are the same at every step
    /// and a CUDA graph can replay them; on the CPU the host reads them where they are.
    OnDevice {
        /// The counts.
        counters: Buffer,
        /// The learning rate.
        lr: LrSource,
    },
}

impl Counts {
    /// The counters' buffer.
    fn buffer(&self) -> Buffer {
        match *self {
            Counts::Host(b) | Counts::OnDevice { counters: b, .. } => b,
        }
    }

    /// For a step on the CPU: the learning rate to use in place of `lr` (read from the tensor
    /// where a counted step has one).
    ///
    /// # Safety
    /// A counted step's learning rate address must be a live host f32 or f64 as it says.
    unsafe fn host_lr(&self, lr: f64) -> Result<f64, StepError> {
        match *self {
            Counts::Host(_) => Ok(lr),
            Counts::OnDevice { lr: src, .. } if src.addr == 0 => Ok(src.value),
            Counts::OnDevice { lr: src, .. } => {
                let align = if src.is_f64 != 0 { 8 } else { 4 };
                if !src.addr.is_multiple_of(align) {
                    return Err(StepError::Invalid(format!(
                        "the learning rate's address {:#x} is not aligned to {align} bytes",
                        src.addr
                    )));
                }
                // SAFETY: the caller's promise; alignment checked above.
                Ok(unsafe {
                    if src.is_f64 != 0 {
                        *(src.addr as *const f64)
                    } else {
                        *(src.addr as *const f32) as f64
                    }
                })
            }
        }
    }
}

/// One SGD step of a group (see `smallbatch_core::rules::sgd`); `momentum_buffer` (f32, one per
/// element of the table, on the group's device) is needed when `hp.momentum != 0`.
///
/// # Safety
/// Every address must be live memory of the group's device (host memory for host counts)
/// holding what its name says, for every tensor the step touches, and nothing else may touch it
/// during the call (on CUDA: until the launched work has run).
pub unsafe fn sgd(
    device: Device,
    tensors: Tensors<'_>,
    counts: Counts,
    momentum_buffer: Buffer,
    hp: &SgdHyper,
) -> Result<(), StepError> {
    guarded("the SGD step", || {
        tensors.check_lengths()?;
        let total = tensors.table.total();
        let momentum = momentum_buffer.expect::<f32>(if hp.momentum != 0.0 { total } else { 0 })?;
        let steps_buf = counts.buffer().expect::<f64>(tensors.table.len())?;
        match (device, counts) {
            (Device::Cpu, _) => {
                let hp = SgdHyper { lr: counts.host_lr(hp.lr)?, ..*hp };
                hp.validate()?;
                check_disjoint(&tensors, &[&steps_buf, &momentum])?;
                let bufs = SgdBuffers {
                    params: tensors.core_params(),
                    momentum: if hp.momentum != 0.0 { Some(momentum.slice_mut()) } else { None },
                };
                let steps = step_counters(tensors.table, counts.buffer())?;
                Ok(sgd_step(Executor::global()?, tensors.table, tensors.stepped, steps, bufs, &hp)?)
            }
            (Device::Cuda { ordinal, stream }, Counts::Host(steps)) => {
                hp.validate()?;
                let (group, rounding) = tensors.device_group(ordinal, stream);
                let steps = step_counters(tensors.table, steps)?;
                let stepped = tensors.stepped;
                Ok(smallbatch_cuda::dispatch::sgd_step(
                    group,
                    tensors.table,
                    stepped,
                    steps,
                    momentum.addr,
                    hp,
                    rounding,
                )?)
            }
            (Device::Cuda { ordinal, stream }, Counts::OnDevice { counters, lr }) => {
                let (group, rounding) = tensors.device_group(ordinal, stream);
                let counts = DeviceCounts { counters: counters.addr, lr };
                let (table, stepped) = (tensors.table, tensors.stepped);
                Ok(sgd_step_counted(group, table, stepped, counts, momentum.addr, hp, rounding)?)
            }
        }
    })
}

/// The state of an Adam/AdamW group: f32, one per element of the table each, on the group's
/// device (`max_exp_avg_sq` with amsgrad only).
#[derive(Debug, Clone, Copy)]
pub struct AdamState {
    /// First moments.
    pub exp_avg: Buffer,
    /// Second moments.
    pub exp_avg_sq: Buffer,
    /// Running maxima of the second moments (amsgrad).
    pub max_exp_avg_sq: Buffer,
}

/// One Adam/AdamW step of a group (see `smallbatch_core::rules::adam`).
///
/// # Safety
/// As for [`sgd`].
pub unsafe fn adam(
    device: Device,
    tensors: Tensors<'_>,
    counts: Counts,
    state: AdamState,
    hp: &AdamHyper,
) -> Result<(), StepError> {
    guarded("the Adam step", || {
        tensors.check_lengths()?;
        let total = tensors.table.total();
        let m = state.exp_avg.expect::<f32>(total)?;
        let v = state.exp_avg_sq.expect::<f32>(total)?;
        let v_max = state.max_exp_avg_sq.expect::<f32>(if hp.amsgrad { total } else { 0 })?;
        let steps_buf = counts.buffer().expect::<f64>(tensors.table.len())?;
        match (device, counts) {
            (Device::Cpu, _) => {
                let hp = &AdamHyper { lr: counts.host_lr(hp.lr)?, ..*hp };
                hp.validate()?;
                check_disjoint(&tensors, &[&steps_buf, &m, &v, &v_max])?;
                let bufs = AdamBuffers {
                    params: tensors.core_params(),
                    exp_avg: m.slice_mut(),
                    exp_avg_sq: v.slice_mut(),
                    max_exp_avg_sq: if hp.amsgrad { Some(v_max.slice_mut()) } else { None },
                };
                let steps = step_counters(tensors.table, counts.buffer())?;
                Ok(adam_step(Executor::global()?, tensors.table, tensors.stepped, steps, bufs, hp)?)
            }
            (Device::Cuda { ordinal, stream }, Counts::OnDevice { counters, lr }) => {
                let (group, rounding) = tensors.device_group(ordinal, stream);
                let counts = DeviceCounts { counters: counters.addr, lr };
                let (table, stepped) = (tensors.table, tensors.stepped);
                Ok(adam_step_counted(group, table, stepped, counts, m.addr, v.addr, v_max.addr, hp, rounding)?)
            }
            (Device::Cuda { ordinal, stream }, Counts::Host(steps)) => {
                hp.validate()?;
                let (group, rounding) = tensors.device_group(ordinal, stream);
                let steps = step_counters(tensors.table, steps)?;
                Ok(smallbatch_cuda::dispatch::adam_step(
                    group,
                    tensors.table,
                    tensors.stepped,
                    steps,
                    m.addr,
                    v.addr,
                    v_max.addr,
                    hp,
                    rounding,
                )?)
            }
        }
    })
}

/// Device memory a CUDA param group keeps from step to step (Adafactor's segment table and
/// scratch, Muon's Newton-Schulz workspace and cuBLAS handle), allocated at its first step and
/// freed when dropped.
#[derive(Debug)]
pub struct Workspace {
    ordinal: i32,
    adafactor: Mutex<Option<AdafactorWorkspace>>,
    muon: Mutex<Option<MuonWorkspace>>,
}

impl Workspace {
    /// An empty workspace for device `ordinal`.
    pub fn new(ordinal: i32) -> Result<Workspace, StepError> {
        if ordinal < 0 {
            return Err(StepError::Invalid(format!("invalid CUDA device ordinal {ordinal}")));
        }
        Ok(Workspace { ordinal, adafactor: Mutex::new(None), muon: Mutex::new(None) })
    }

    /// The device its memory is on.
    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    fn check_device(&self, ordinal: i32) -> Result<(), StepError> {
        if ordinal != self.ordinal {
            return Err(StepError::Invalid(format!(
                "the CUDA workspace belongs to device {}, not device {ordinal}",
                self.ordinal
            )));
        }
        Ok(())
    }
}

/// Locks a workspace slot; a panic inside an earlier step cannot have left it half-updated
/// (the slot holds a value the CUDA crate updates whole).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The workspace a CUDA step needs, or an error saying it is missing.
fn workspace_for(workspace: Option<&Workspace>, ordinal: i32) -> Result<&Workspace, StepError> {
    let ws = workspace.ok_or_else(|| StepError::Invalid("a CUDA step of this rule needs a workspace".into()))?;
    ws.check_device(ordinal)?;
    Ok(ws)
}

/// The state of an Adafactor group, f32 on the group's device, sized by the layout (`exp_avg`,
/// one per element of the table, with momentum only).
#[derive(Debug, Clone, Copy)]
pub struct AdafactorStateBuffers {
    /// Row EMAs.
    pub row_var: Buffer,
    /// Column EMAs.
    pub col_var: Buffer,
    /// Unfactored second moments.
    pub variance: Buffer,
    /// Momentum.
    pub exp_avg: Buffer,
}

/// One Adafactor step of a group (see `smallbatch_core::rules::adafactor`); tensors' matrices
/// are row-major. A CUDA group needs its `workspace`.
///
/// # Safety
/// As for [`sgd`].
pub unsafe fn adafactor(
    device: Device,
    workspace: Option<&Workspace>,
    tensors: Tensors<'_>,
    layout: &AdafactorLayout,
    counts: Counts,
    state: AdafactorStateBuffers,
    hp: &AdafactorHyper,
) -> Result<(), StepError> {
    guarded("the Adafactor step", || adafactor_on(device, workspace, tensors, layout, counts, state, hp, None))
}

/// How a sharded step has the ranks sum the statistics that span them (an all-reduce).
pub enum SumAcrossRanks<'a> {
    /// For a CPU group: replaces each host value with its sum over the ranks.
    Host(&'a mut dyn FnMut(&mut [f64]) -> Result<(), String>),
    /// For a CUDA group: the step's kernels pack the sums into the device vector at `exchange`
    /// (`capacity` f64), and `sum(first, count)` replaces elements `first .. first + count` of it
    /// with their sums over the ranks, in stream order on the step's stream.
    Device {
        /// Device address of the vector.
        exchange: u64,
        /// Its length in f64.
        capacity: usize,
        /// The all-reduce of a range of it.
        sum: &'a mut dyn FnMut(usize, usize) -> Result<(), String>,
    },
}

/// One Adafactor step of the local shards of a group whose tensors are spread over several ranks
/// (see `smallbatch_core::rules::adafactor::adafactor_step_sharded`, and on CUDA
/// `smallbatch_cuda::adafactor::adafactor_step_sharded`): `shards` describes the whole tensors,
/// and `sum` has the ranks sum what spans them (called twice per step, on the calling thread,
/// with nothing of the step running on the host meanwhile). A CUDA group needs its `workspace`
/// and a [`SumAcrossRanks::Device`], a CPU group a [`SumAcrossRanks::Host`].
///
/// # Safety
/// As for [`sgd`]; a device `exchange` must hold `capacity` f64 on the group's device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn adafactor_sharded(
    device: Device,
    workspace: Option<&Workspace>,
    tensors: Tensors<'_>,
    layout: &AdafactorLayout,
    steps: Buffer,
    state: AdafactorStateBuffers,
    hp: &AdafactorHyper,
    shards: Shards<'_>,
    sum: SumAcrossRanks<'_>,
) -> Result<(), StepError> {
    guarded("the sharded Adafactor step", || {
        adafactor_on(device, workspace, tensors, layout, Counts::Host(steps), state, hp, Some((shards, sum)))
    })
}

/// [`adafactor`] and [`adafactor_sharded`] (with `sharded`).
#[allow(clippy::too_many_arguments)]
unsafe fn adafactor_on(
    device: Device,
    workspace: Option<&Workspace>,
    tensors: Tensors<'_>,
    layout: &AdafactorLayout,
    counts: Counts,
    state: AdafactorStateBuffers,
    hp: &AdafactorHyper,
    sharded: Option<(Shards<'_>, SumAcrossRanks<'_>)>,
) -> Result<(), StepError> {
    let hp = &match device {
        Device::Cpu => AdafactorHyper { lr: counts.host_lr(hp.lr)?, ..*hp },
        Device::Cuda { .. } => *hp,
    };
    hp.validate()?;
    tensors.check_lengths()?;
    let steps = counts.buffer();
    let momentum = hp.beta1 != 0.0;
    let row_var = state.row_var.expect::<f32>(layout.row_total)?;
    let col_var = state.col_var.expect::<f32>(layout.col_total)?;
    let variance = state.variance.expect::<f32>(layout.variance_total)?;
    let exp_avg = state.exp_avg.expect::<f32>(if momentum { tensors.table.total() } else { 0 })?;
    let steps_buf = steps.expect::<f64>(tensors.table.len())?;
    match device {
        Device::Cpu => {
            check_disjoint(&tensors, &[&steps_buf, &row_var, &col_var, &variance, &exp_avg])?;
            let bufs = AdafactorBuffers {
                params: tensors.core_params(),
                row_var: row_var.slice_mut(),
                col_var: col_var.slice_mut(),
                variance: variance.slice_mut(),
                exp_avg: if momentum { Some(exp_avg.slice_mut()) } else { None },
            };
            let (table, stepped, exec) = (tensors.table, tensors.stepped, Executor::global()?);
            match sharded {
                None => {
                    let steps = step_counters(table, steps)?;
                    Ok(adafactor_step(exec, table, layout, stepped, steps, bufs, hp)?)
                }
                Some((shards, SumAcrossRanks::Host(sum_across_ranks))) => {
                    let steps = step_counters(table, steps)?;
                    let mut sum = |v: &mut [f64]| sum_across_ranks(v).map_err(smallbatch_core::Error::Collective);
                    Ok(adafactor_step_sharded(exec, table, layout, stepped, steps, bufs, hp, shards, &mut sum)?)
                }
                Some((_, SumAcrossRanks::Device { .. })) => {
                    Err(StepError::Invalid("a CPU group sums host values across ranks, not a device exchange".into()))
                }
            }
        }
        Device::Cuda { ordinal, stream } => {
            let ws = workspace_for(workspace, ordinal)?;
            let (group, rounding) = tensors.device_group(ordinal, stream);
            let state = AdafactorState {
                row_var: row_var.addr,
                col_var: col_var.addr,
                variance: variance.addr,
                exp_avg: exp_avg.addr,
            };
            let (table, stepped) = (tensors.table, tensors.stepped);
            let mut slot = lock(&ws.adafactor);
            let aws = slot.get_or_insert_with(|| AdafactorWorkspace::new(ordinal));
            match (sharded, counts) {
                (None, Counts::OnDevice { counters, lr }) => {
                    let counts = DeviceCounts { counters: counters.addr, lr };
                    let step = smallbatch_cuda::adafactor::adafactor_step_counted;
                    Ok(step(aws, group, table, layout, stepped, counts, state, hp, rounding)?)
                }
                (None, _) => {
                    let steps = step_counters(table, steps)?;
                    let step = smallbatch_cuda::adafactor::adafactor_step;
                    Ok(step(aws, group, table, layout, stepped, steps, state, hp, rounding)?)
                }
                (Some((shards, SumAcrossRanks::Device { exchange, capacity, sum })), _) => {
                    let steps = step_counters(table, steps)?;
                    let exchange = smallbatch_cuda::adafactor::Exchange { addr: exchange, capacity, sum };
                    let step = smallbatch_cuda::adafactor::adafactor_step_sharded;
                    Ok(step(aws, group, table, layout, stepped, steps, state, hp, rounding, &shards, exchange)?)
                }
                (Some((_, SumAcrossRanks::Host(_))), _) => Err(StepError::Invalid(
                    "a CUDA group sums a device exchange vector across ranks (exchange= and its length)".into(),
                )),
            }
        }
    }
}

/// One Muon step of a group (see `smallbatch_core::rules::muon`); tensors' matrices are
/// row-major, `momentum_buffer` holds one f32 per element of the table. `inputs` is the
/// precision of the Newton-Schulz products' operands on CUDA (the CPU computes in f32). A CUDA
/// group needs its `workspace`.
///
/// # Safety
/// As for [`sgd`].
pub unsafe fn muon(
    device: Device,
    workspace: Option<&Workspace>,
    tensors: Tensors<'_>,
    counts: Counts,
    momentum_buffer: Buffer,
    hp: &MuonHyper,
    inputs: Inputs,
) -> Result<(), StepError> {
    guarded("the Muon step", || muon_on(device, workspace, tensors, counts, momentum_buffer, hp, inputs, None))
}

/// How a sharded Muon step has its momentum outputs orthogonalised across ranks.
pub enum OrthogonalizeAcrossRanks<'a> {
    /// For a CPU group: replaces the host `U` of this rank's elements with its part of the
    /// orthogonalised whole matrices.
    Host(&'a mut dyn FnMut(&mut [f32]) -> Result<(), String>),
    /// For a CUDA group: the momentum kernels write `U` to the device vector at `updates`
    /// (`capacity` f32), and `orthogonalize()` replaces it there, in stream order on the step's
    /// stream.
    Device {
        /// Device address of the vector.
        updates: u64,
        /// Its length in f32.
        capacity: usize,
        /// The exchange.
        orthogonalize: &'a mut dyn FnMut() -> Result<(), String>,
    },
}

/// One Muon step of the local shards of a group whose matrices are spread over several ranks
/// (see `smallbatch_core::rules::muon::muon_step_sharded`, and on CUDA
/// `smallbatch_cuda::muon::muon_step_sharded`): `whole[i]` is the `(rows, cols)` of tensor
/// `i`'s whole matrices, and `ortho` turns the momentum outputs of this rank's elements into
/// their part of the orthogonalised whole matrices (called once per step, on the calling
/// thread). A CPU group takes an [`OrthogonalizeAcrossRanks::Host`], a CUDA group an
/// [`OrthogonalizeAcrossRanks::Device`].
///
/// # Safety
/// As for [`sgd`]; a device `updates` vector must hold `capacity` f32 on the group's device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn muon_sharded(
    device: Device,
    tensors: Tensors<'_>,
    steps: Buffer,
    momentum_buffer: Buffer,
    hp: &MuonHyper,
    whole: &[(usize, usize)],
    ortho: OrthogonalizeAcrossRanks<'_>,
) -> Result<(), StepError> {
    guarded("the sharded Muon step", || {
        // The products run in the caller's exchange (orthogonalize), so F32 stands for any.
        muon_on(device, None, tensors, Counts::Host(steps), momentum_buffer, hp, Inputs::F32, Some((whole, ortho)))
    })
}

/// [`muon`] and [`muon_sharded`] (with `sharded`).
#[allow(clippy::too_many_arguments)]
unsafe fn muon_on(
    device: Device,
    workspace: Option<&Workspace>,
    tensors: Tensors<'_>,
    counts: Counts,
    momentum_buffer: Buffer,
    hp: &MuonHyper,
    inputs: Inputs,
    sharded: Option<(&[(usize, usize)], OrthogonalizeAcrossRanks<'_>)>,
) -> Result<(), StepError> {
    let hp = &match device {
        Device::Cpu => MuonHyper { lr: counts.host_lr(hp.lr)?, ..*hp },
        Device::Cuda { .. } => *hp,
    };
    hp.validate()?;
    tensors.check_lengths()?;
    let steps = counts.buffer();
    let momentum = momentum_buffer.expect::<f32>(tensors.table.total())?;
    let steps_buf = steps.expect::<f64>(tensors.table.len())?;
    let (table, stepped) = (tensors.table, tensors.stepped);
    match device {
        Device::Cpu => {
            if inputs != Inputs::F32 {
                return Err(StepError::Invalid("bf16 Newton-Schulz products run on CUDA only".into()));
            }
            check_disjoint(&tensors, &[&steps_buf, &momentum])?;
            let bufs = MuonBuffers { params: tensors.core_params(), momentum: momentum.slice_mut() };
            let exec = Executor::global()?;
            match sharded {
                None => {
                    let steps = step_counters(table, steps)?;
                    Ok(muon_step(exec, table, stepped, steps, bufs, hp)?)
                }
                Some((whole, OrthogonalizeAcrossRanks::Host(orthogonalize))) => {
                    let steps = step_counters(table, steps)?;
                    let mut ortho = |u: &mut [f32]| orthogonalize(u).map_err(smallbatch_core::Error::Collective);
                    Ok(muon_step_sharded(exec, table, stepped, steps, bufs, hp, whole, &mut ortho)?)
                }
                Some((_, OrthogonalizeAcrossRanks::Device { .. })) => Err(StepError::Invalid(
                    "a CPU group orthogonalises host values across ranks, not a device vector".into(),
                )),
            }
        }
        Device::Cuda { ordinal, stream } => {
            let (group, rounding) = tensors.device_group(ordinal, stream);
            match sharded {
                None => {
                    let ws = workspace_for(workspace, ordinal)?;
                    let mut slot = lock(&ws.muon);
                    let mws = slot.get_or_insert_with(|| MuonWorkspace::new(ordinal));
                    match counts {
                        Counts::OnDevice { counters, lr } => {
                            let counts = DeviceCounts { counters: counters.addr, lr };
                            let step = smallbatch_cuda::muon::muon_step_counted;
                            Ok(step(mws, group, table, stepped, counts, momentum.addr, hp, inputs, rounding)?)
                        }
                        Counts::Host(steps) => {
                            let steps = step_counters(table, steps)?;
                            let step = smallbatch_cuda::muon::muon_step;
                            Ok(step(mws, group, table, stepped, steps, momentum.addr, hp, inputs, rounding)?)
                        }
                    }
                }
                Some((whole, OrthogonalizeAcrossRanks::Device { updates, capacity, orthogonalize })) => {
                    // No workspace: the exchange's orthogonalize takes the group's, and locks it.
                    let steps = step_counters(table, steps)?;
                    let updates = smallbatch_cuda::muon::ShardedUpdates { addr: updates, capacity, orthogonalize };
                    let step = smallbatch_cuda::muon::muon_step_sharded;
                    Ok(step(group, table, stepped, steps, momentum.addr, hp, rounding, whole, updates)?)
                }
                Some((_, OrthogonalizeAcrossRanks::Host(_))) => Err(StepError::Invalid(
                    "a CUDA group orthogonalises a device vector across ranks (updates= and its length)".into(),
                )),
            }
        }
    }
}

/// Orthogonalizes f32 row-major matrices stored back to back at `src` into the same places at
/// `dst`: host memory (see `smallbatch_core::newton_schulz::orthogonalize_many`; `inputs` must
/// be f32), or on CUDA device memory with the `workspace` of a Muon group of that device (see
/// `smallbatch_cuda::muon::orthogonalize_many`), on its stream.
///
/// # Safety
/// `src` and `dst` must be live memory of the device holding the matrices' elements.
pub unsafe fn orthogonalize(
    device: Device,
    workspace: Option<&Workspace>,
    src: Buffer,
    dst: Buffer,
    shapes: &[(usize, usize)],
    params: &NewtonSchulz,
    inputs: Inputs,
) -> Result<(), StepError> {
    guarded("the Newton-Schulz iteration", || {
        let mut total = 0usize;
        for &(r, c) in shapes {
            total = r
                .checked_mul(c)
                .and_then(|n| total.checked_add(n))
                .ok_or_else(|| StepError::Invalid(format!("matrices of {shapes:?} overflow")))?;
        }
        let src = src.expect::<f32>(total)?;
        let dst = dst.expect::<f32>(total)?;
        match device {
            Device::Cpu => {
                if inputs != Inputs::F32 {
                    return Err(StepError::Invalid("bf16 Newton-Schulz products run on CUDA only".into()));
                }
                buffers::check_buffers_disjoint(&[&src, &dst])?;
                let (g, out) = (src.slice_mut(), dst.slice_mut());
                Ok(orthogonalize_many(Executor::global()?, g, shapes, params, out)?)
            }
            Device::Cuda { ordinal, stream } => {
                let ws = workspace_for(workspace, ordinal)?;
                let mut slot = lock(&ws.muon);
                let mws = slot.get_or_insert_with(|| MuonWorkspace::new(ordinal));
                Ok(smallbatch_cuda::muon::orthogonalize_many(mws, stream, src.addr, dst.addr, shapes, params, inputs)?)
            }
        }
    })
}

/// Rounds `n` f32 values at `src` to bf16 bits at `dst`: stochastically with the draws of
/// `(seed, step, stream)` (element `i` draws index `i`), or to nearest.
///
/// # Safety
/// `src` and `dst` must be live memory of the device holding `n` elements each.
pub unsafe fn round_to_bf16(
    device: Device,
    src: Buffer,
    dst: Buffer,
    n: usize,
    stochastic: Option<(u64, u64, u32)>,
) -> Result<(), StepError> {
    guarded("rounding to bf16", || {
        let src = src.expect::<f32>(n)?;
        let dst = dst.expect::<u16>(n)?;
        match device {
            Device::Cpu => {
                buffers::check_buffers_disjoint(&[&src, &dst])?;
                let exec = Executor::global()?;
                let (s, d) = (src.slice_mut(), dst.slice_mut());
                match stochastic {
                    Some((seed, step, stream)) => rounding::stochastic_round_slice(exec, s, d, seed, step, stream)?,
                    None => rounding::round_nearest_slice(exec, s, d)?,
                }
                Ok(())
            }
            Device::Cuda { ordinal, stream } => {
                Ok(smallbatch_cuda::dispatch::round_to_bf16(ordinal, stream, src.addr, dst.addr, n as u64, stochastic)?)
            }
        }
    })
}
