//! `smallbatch_rs._core`: the PyO3 face of smallbatch-step. No logic lives here: each function
//! converts Python arguments (addresses from torch tensors, strings, numbers) into the step
//! crate's types, releases the GIL and forwards; the step crate checks the addresses, picks the
//! CPU core or the CUDA kernels, and turns panics into errors. The torch layer
//! (python/smallbatch_rs) owns the tensors and guarantees the addresses are live.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict};
use smallbatch_core::driver::Rounding;
use smallbatch_core::newton_schulz::NewtonSchulz;
use smallbatch_core::rules::adafactor::{AdafactorHyper, AdafactorLayout as CoreAdafactorLayout, Beta2, Shards, Split};
use smallbatch_core::rules::adam::AdamHyper;
use smallbatch_core::rules::muon::{LrAdjust, MuonHyper};
use smallbatch_core::rules::sgd::SgdHyper;
use smallbatch_core::rules::Storage;
use smallbatch_core::{halflife, Error, Executor, SimdPath};
use smallbatch_cuda::cublas::Inputs;
use smallbatch_step::{
    AdafactorStateBuffers, AdamState, Buffer, Counts, Device, LrSource, OrthogonalizeAcrossRanks, StepError,
    SumAcrossRanks, Tensors,
};

fn to_py_err(err: StepError) -> PyErr {
    match err {
        StepError::Invalid(m) => PyValueError::new_err(m),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

fn core_err(err: Error) -> PyErr {
    to_py_err(err.into())
}

/// The step counts of an elementwise step: host counters at `steps`, or with `capturable` the
/// group's counters on its device and the learning rate from `lr_tensor` (address and dtype of a
/// 0-dim float32/float64 tensor there) or, without one, the value `lr`.
fn counts(steps: u64, capturable: bool, lr: f64, lr_tensor: Option<(u64, &str)>) -> PyResult<Counts> {
    let counters = Buffer::new("steps", steps);
    if !capturable {
        if lr_tensor.is_some() {
            return Err(PyValueError::new_err("lr_tensor is read only by capturable steps"));
        }
        return Ok(Counts::Host(counters));
    }
    let lr = match lr_tensor {
        None => LrSource { value: lr, addr: 0, is_f64: 0, pad: 0 },
        Some((addr, dtype)) => {
            let is_f64 = match dtype {
                "float32" => 0,
                "float64" => 1,
                other => {
                    return Err(PyValueError::new_err(format!("lr_tensor must be float32 or float64, got {other}")))
                }
            };
            if addr == 0 {
                return Err(PyValueError::new_err("lr_tensor: null address"));
            }
            LrSource { value: f64::NAN, addr, is_f64, pad: 0 }
        }
    };
    Ok(Counts::OnDevice { counters, lr })
}

/// Layout of a param group's tensors: each a range of one index space (the optimizer's flat state
/// and the random bits of stochastic rounding follow it).
#[pyclass(module = "smallbatch_rs._core", frozen)]
struct SegmentTable {
    inner: smallbatch_core::SegmentTable,
}

#[pymethods]
impl SegmentTable {
    #[new]
    #[pyo3(signature = (numels, matrices=None))]
    fn new(numels: Vec<usize>, matrices: Option<Vec<[usize; 3]>>) -> PyResult<Self> {
        let inner = match matrices {
            None => smallbatch_core::SegmentTable::packed(&numels),
            Some(m) => {
                let table = smallbatch_core::SegmentTable::with_matrices(&m).map_err(core_err)?;
                if table.numels() != numels.as_slice() {
                    return Err(PyValueError::new_err("matrices do not match numels"));
                }
                Ok(table)
            }
        };
        inner.map(|inner| SegmentTable { inner }).map_err(core_err)
    }

    /// Total elements of the index space.
    #[getter]
    fn total(&self) -> usize {
        self.inner.total()
    }

    /// Index of each tensor's element 0.
    #[getter]
    fn offsets(&self) -> Vec<usize> {
        self.inner.offsets().to_vec()
    }

    /// Element count of each tensor.
    #[getter]
    fn numels(&self) -> Vec<usize> {
        self.inner.numels().to_vec()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __repr__(&self) -> String {
        format!("SegmentTable(tensors={}, total={})", self.inner.len(), self.inner.total())
    }
}

/// Where Adafactor keeps each tensor's second moments (factored rows/columns, or full).
#[pyclass(module = "smallbatch_rs._core", frozen)]
struct AdafactorLayout {
    inner: CoreAdafactorLayout,
}

#[pymethods]
impl AdafactorLayout {
    #[new]
    fn new(table: &SegmentTable, factored: Vec<bool>) -> PyResult<Self> {
        CoreAdafactorLayout::new(&table.inner, &factored).map(|inner| AdafactorLayout { inner }).map_err(core_err)
    }
    #[getter]
    fn factored(&self) -> Vec<bool> {
        self.inner.factored.clone()
    }
    #[getter]
    fn row_offsets(&self) -> Vec<usize> {
        self.inner.row_offsets.clone()
    }
    #[getter]
    fn col_offsets(&self) -> Vec<usize> {
        self.inner.col_offsets.clone()
    }
    #[getter]
    fn variance_offsets(&self) -> Vec<usize> {
        self.inner.variance_offsets.clone()
    }
    #[getter]
    fn row_total(&self) -> usize {
        self.inner.row_total
    }
    #[getter]
    fn col_total(&self) -> usize {
        self.inner.col_total
    }
    #[getter]
    fn variance_total(&self) -> usize {
        self.inner.variance_total
    }
}

/// Device memory a CUDA param group keeps from step to step (see `smallbatch_step::Workspace`).
#[pyclass(module = "smallbatch_rs._core", frozen)]
struct CudaWorkspace {
    inner: smallbatch_step::Workspace,
}

#[pymethods]
impl CudaWorkspace {
    #[new]
    fn new(ordinal: i32) -> PyResult<Self> {
        smallbatch_step::Workspace::new(ordinal).map(|inner| CudaWorkspace { inner }).map_err(to_py_err)
    }

    /// The device the workspace's memory is on.
    #[getter]
    fn ordinal(&self) -> i32 {
        self.inner.ordinal()
    }

    fn __repr__(&self) -> String {
        format!("CudaWorkspace(ordinal={})", self.inner.ordinal())
    }
}

/// `device`: None for the CPU, `(ordinal, cuda_stream)` for a CUDA device.
fn device_of(device: Option<(i32, usize)>) -> Device {
    match device {
        None => Device::Cpu,
        Some((ordinal, stream)) => Device::Cuda { ordinal, stream },
    }
}

/// The parameters' storage from the torch layer's names.
fn storage_of(param_dtype: &str, rounding: &str, seed: u64, stream: u32) -> PyResult<Storage> {
    let rounding = match rounding {
        "nearest" => Rounding::Nearest,
        "stochastic" => Rounding::Stochastic { seed, stream },
        other => {
            return Err(PyValueError::new_err(format!("rounding must be 'nearest' or 'stochastic', not {other:?}")))
        }
    };
    match param_dtype {
        "float32" => Ok(Storage::F32),
        "bfloat16" => Ok(Storage::Bf16(rounding)),
        other => Err(PyValueError::new_err(format!("param_dtype must be 'float32' or 'bfloat16', not {other:?}"))),
    }
}

/// Addresses as the step takes them. They arrive as Python ints read as i64: CPython converts
/// an int to a C long without the generic multi-digit path it takes for unsigned long long,
/// which for a thousand tensors a step is a measurable share of the call.
fn addresses(what: &str, addrs: Vec<i64>) -> PyResult<Vec<u64>> {
    match addrs.iter().position(|&a| a < 0) {
        Some(i) => Err(PyValueError::new_err(format!("{what}[{i}] is a negative address: {}", addrs[i]))),
        None => Ok(addrs.into_iter().map(|a| a as u64).collect()),
    }
}

fn flags(stepped: &[u8]) -> Vec<bool> {
    stepped.iter().map(|&b| b != 0).collect()
}

/// Plain numbers a Python callback edits in place as the bytes of a `bytearray`.
trait InPlace: Copy {
    const BYTES: usize;
    fn to_bytes(self, out: &mut Vec<u8>);
    fn from_bytes(b: &[u8]) -> Self;
}

impl InPlace for f32 {
    const BYTES: usize = 4;
    fn to_bytes(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_ne_bytes());
    }
    fn from_bytes(b: &[u8]) -> Self {
        f32::from_ne_bytes(b.try_into().expect("4 bytes"))
    }
}

impl InPlace for f64 {
    const BYTES: usize = 8;
    fn to_bytes(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_ne_bytes());
    }
    fn from_bytes(b: &[u8]) -> Self {
        f64::from_ne_bytes(b.try_into().expect("8 bytes"))
    }
}

/// The first Python exception a callback of a native step raised: re-raised as it is when the
/// step fails because of it.
struct Raised(std::sync::Mutex<Option<PyErr>>);

impl Raised {
    fn new() -> Self {
        Raised(std::sync::Mutex::new(None))
    }

    /// Keeps `e` (raised by callback `name`) and returns the step's message for it.
    fn keep(&self, name: &str, e: PyErr) -> String {
        let msg = format!("{name} raised {e}");
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        msg
    }

    /// `callback(first, count)`, or `callback()` without a range; its exception kept.
    fn call(&self, callback: &Py<PyAny>, name: &str, range: Option<(usize, usize)>) -> Result<(), String> {
        Python::attach(|py| {
            let out = match range {
                Some(r) => callback.call1(py, r),
                None => callback.call0(py),
            };
            out.map(|_| ()).map_err(|e| self.keep(name, e))
        })
    }

    /// Calls `callback(buf)` with the GIL held, `buf` a bytearray of `values` (native byte
    /// order), and copies back what it left there; its exception kept.
    fn in_place<T: InPlace>(&self, callback: &Py<PyAny>, name: &str, values: &mut [T]) -> Result<(), String> {
        Python::attach(|py| {
            let mut bytes = Vec::with_capacity(values.len() * T::BYTES);
            values.iter().for_each(|v| v.to_bytes(&mut bytes));
            let buf = PyByteArray::new(py, &bytes);
            callback.call1(py, (buf.clone(),)).map_err(|e| self.keep(name, e))?;
            let out = buf.to_vec();
            if out.len() != bytes.len() {
                return Err(format!("{name} resized its buffer from {} to {} bytes", bytes.len(), out.len()));
            }
            for (v, b) in values.iter_mut().zip(out.chunks_exact(T::BYTES)) {
                *v = T::from_bytes(b);
            }
            Ok(())
        })
    }

    /// The step's result: the kept exception when it failed after one.
    fn result(self, result: Result<(), StepError>) -> PyResult<()> {
        match (result, self.0.into_inner().unwrap_or_else(|p| p.into_inner())) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(to_py_err(e)),
        }
    }
}

/// The arguments every step takes, converted.
struct Group {
    device: Device,
    stepped: Vec<bool>,
    storage: Storage,
    params: Vec<u64>,
    grads: Vec<u64>,
    draws: Option<Vec<u64>>,
}

impl Group {
    #[allow(clippy::too_many_arguments)]
    fn new(
        stepped: &[u8],
        params: Vec<i64>,
        grads: Vec<i64>,
        device: Option<(i32, usize)>,
        draws: Option<Vec<i64>>,
        param_dtype: &str,
        rounding: &str,
        seed: u64,
        stream: u32,
    ) -> PyResult<Group> {
        let storage = storage_of(param_dtype, rounding, seed, stream)?;
        let (params, grads) = (addresses("params", params)?, addresses("grads", grads)?);
        let draws = draws.map(|d| addresses("draws", d)).transpose()?;
        Ok(Group { device: device_of(device), stepped: flags(stepped), storage, params, grads, draws })
    }

    fn tensors<'a>(&'a self, table: &'a SegmentTable) -> Tensors<'a> {
        Tensors {
            table: &table.inner,
            stepped: &self.stepped,
            storage: self.storage,
            params: &self.params,
            grads: &self.grads,
            draws: self.draws.as_deref(),
        }
    }
}

/// One SGD step of a param group (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (table, stepped, steps, params, grads, momentum_buffer, *, lr, momentum, dampening, weight_decay, nesterov, maximize, param_dtype="float32", rounding="nearest", seed=0, stream=0, device=None, draws=None, capturable=false, lr_tensor=None))]
#[allow(clippy::too_many_arguments)]
fn sgd_step(
    py: Python<'_>,
    table: &SegmentTable,
    stepped: &[u8],
    steps: u64,
    params: Vec<i64>,
    grads: Vec<i64>,
    momentum_buffer: u64,
    lr: f64,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: bool,
    maximize: bool,
    param_dtype: &str,
    rounding: &str,
    seed: u64,
    stream: u32,
    device: Option<(i32, usize)>,
    draws: Option<Vec<i64>>,
    capturable: bool,
    lr_tensor: Option<(u64, String)>,
) -> PyResult<()> {
    let g = Group::new(stepped, params, grads, device, draws, param_dtype, rounding, seed, stream)?;
    let hp = SgdHyper { lr, momentum, dampening, weight_decay, nesterov, maximize };
    let steps = counts(steps, capturable, lr, lr_tensor.as_ref().map(|(a, d)| (*a, d.as_str())))?;
    let buf = Buffer::new("momentum_buffer", momentum_buffer);
    // SAFETY: the torch layer passes live tensors of the group's device that it owns.
    py.detach(|| unsafe { smallbatch_step::sgd(g.device, g.tensors(table), steps, buf, &hp) }).map_err(to_py_err)
}

/// One Adam/AdamW step of a param group (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (table, stepped, steps, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq=0, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, amsgrad=false, param_dtype="float32", rounding="nearest", seed=0, stream=0, device=None, draws=None, capturable=false, lr_tensor=None))]
#[allow(clippy::too_many_arguments)]
fn adam_step(
    py: Python<'_>,
    table: &SegmentTable,
    stepped: &[u8],
    steps: u64,
    params: Vec<i64>,
    grads: Vec<i64>,
    exp_avg: u64,
    exp_avg_sq: u64,
    max_exp_avg_sq: u64,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    decoupled_weight_decay: bool,
    maximize: bool,
    amsgrad: bool,
    param_dtype: &str,
    rounding: &str,
    seed: u64,
    stream: u32,
    device: Option<(i32, usize)>,
    draws: Option<Vec<i64>>,
    capturable: bool,
    lr_tensor: Option<(u64, String)>,
) -> PyResult<()> {
    let g = Group::new(stepped, params, grads, device, draws, param_dtype, rounding, seed, stream)?;
    let hp = AdamHyper { lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, amsgrad };
    let state = AdamState {
        exp_avg: Buffer::new("exp_avg", exp_avg),
        exp_avg_sq: Buffer::new("exp_avg_sq", exp_avg_sq),
        max_exp_avg_sq: Buffer::new("max_exp_avg_sq", max_exp_avg_sq),
    };
    let steps = counts(steps, capturable, lr, lr_tensor.as_ref().map(|(a, d)| (*a, d.as_str())))?;
    // SAFETY: as in sgd_step.
    py.detach(|| unsafe { smallbatch_step::adam(g.device, g.tensors(table), steps, state, &hp) }).map_err(to_py_err)
}

/// One Adafactor step of a param group (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (table, layout, stepped, steps, params, grads, row_var, col_var, variance, exp_avg, *, lr, beta1, beta2, beta2_decay, eps1, eps2, clip_threshold, relative_step, cap_lr_at_inv_sqrt_step, weight_decay, maximize, param_dtype="float32", rounding="nearest", seed=0, stream=0, device=None, draws=None, workspace=None, shards=None, sum_across_ranks=None, exchange=None, capturable=false, lr_tensor=None))]
#[allow(clippy::too_many_arguments)]
fn adafactor_step(
    py: Python<'_>,
    table: &SegmentTable,
    layout: &AdafactorLayout,
    stepped: &[u8],
    steps: u64,
    params: Vec<i64>,
    grads: Vec<i64>,
    row_var: u64,
    col_var: u64,
    variance: u64,
    exp_avg: u64,
    lr: f64,
    beta1: f64,
    beta2: Option<f64>,
    beta2_decay: f64,
    eps1: Option<f64>,
    eps2: f64,
    clip_threshold: f64,
    relative_step: bool,
    cap_lr_at_inv_sqrt_step: bool,
    weight_decay: f64,
    maximize: bool,
    param_dtype: &str,
    rounding: &str,
    seed: u64,
    stream: u32,
    device: Option<(i32, usize)>,
    draws: Option<Vec<i64>>,
    workspace: Option<&CudaWorkspace>,
    shards: Option<(Vec<u8>, Vec<usize>, Vec<usize>)>,
    sum_across_ranks: Option<Py<PyAny>>,
    exchange: Option<(u64, usize)>,
    capturable: bool,
    lr_tensor: Option<(u64, String)>,
) -> PyResult<()> {
    let g = Group::new(stepped, params, grads, device, draws, param_dtype, rounding, seed, stream)?;
    if capturable && shards.is_some() {
        return Err(PyValueError::new_err("capturable steps of sharded groups are not supported"));
    }
    let counted = counts(steps, capturable, lr, lr_tensor.as_ref().map(|(a, d)| (*a, d.as_str())))?;
    let beta2 = match beta2 {
        Some(b) => Beta2::Constant(b),
        None => Beta2::Decay(beta2_decay),
    };
    let hp = AdafactorHyper {
        lr,
        beta1,
        beta2,
        eps1,
        eps2,
        clip_threshold,
        relative_step,
        cap_lr_at_inv_sqrt_step,
        weight_decay,
        maximize,
    };
    let state = AdafactorStateBuffers {
        row_var: Buffer::new("row_var", row_var),
        col_var: Buffer::new("col_var", col_var),
        variance: Buffer::new("variance", variance),
        exp_avg: Buffer::new("exp_avg", exp_avg),
    };
    let (steps, ws) = (Buffer::new("steps", steps), workspace.map(|w| &w.inner));
    let Some((split, numels, rows)) = shards else {
        // SAFETY: as in sgd_step.
        return py
            .detach(|| unsafe {
                smallbatch_step::adafactor(g.device, ws, g.tensors(table), &layout.inner, counted, state, &hp)
            })
            .map_err(to_py_err);
    };
    let split = split
        .iter()
        .enumerate()
        .map(|(i, &code)| match code {
            0 => Ok(Split::Whole),
            1 => Ok(Split::Elements),
            2 => Ok(Split::Rows),
            other => Err(PyValueError::new_err(format!("shards: split[{i}] is {other}, not 0, 1 or 2"))),
        })
        .collect::<PyResult<Vec<Split>>>()?;
    let sum_across_ranks =
        sum_across_ranks.ok_or_else(|| PyValueError::new_err("shards needs sum_across_ranks, a sum over the ranks"))?;
    // A Python exception raised by the collective is re-raised as it is.
    let raised = Raised::new();
    let mut host_sum = |values: &mut [f64]| raised.in_place(&sum_across_ranks, "sum_across_ranks", values);
    let mut device_sum =
        |first: usize, count: usize| raised.call(&sum_across_ranks, "sum_across_ranks", Some((first, count)));
    if let (Device::Cuda { .. }, None) = (g.device, exchange) {
        return Err(PyValueError::new_err(
            "shards on a CUDA device need exchange=(address, length), a float64 vector on the device",
        ));
    }
    let shards = Shards { split: &split, numels: &numels, rows: &rows };
    // SAFETY: as in sgd_step; the torch layer passes a live float64 tensor as the exchange.
    let result = py.detach(|| unsafe {
        let sum = match exchange {
            Some((exchange, capacity)) if g.device != Device::Cpu => {
                SumAcrossRanks::Device { exchange, capacity, sum: &mut device_sum }
            }
            _ => SumAcrossRanks::Host(&mut host_sum),
        };
        smallbatch_step::adafactor_sharded(
            g.device,
            ws,
            g.tensors(table),
            &layout.inner,
            steps,
            state,
            &hp,
            shards,
            sum,
        )
    });
    raised.result(result)
}

/// The Newton-Schulz products' input precision by name.
fn inputs_of(ns_precision: &str) -> PyResult<Inputs> {
    match ns_precision {
        "float32" => Ok(Inputs::F32),
        "bfloat16" => Ok(Inputs::Bf16),
        other => Err(PyValueError::new_err(format!("ns_precision must be 'float32' or 'bfloat16', not {other:?}"))),
    }
}

/// Muon's `adjust_lr_fn` by name.
fn lr_adjust_of(adjust_lr_fn: Option<&str>) -> PyResult<LrAdjust> {
    match adjust_lr_fn {
        None | Some("original") => Ok(LrAdjust::Original),
        Some("match_rms_adamw") => Ok(LrAdjust::MatchRmsAdamW),
        Some("none") => Ok(LrAdjust::None),
        Some(other) => Err(PyValueError::new_err(format!(
            "invalid adjust_lr_fn: {other:?} (must be None, 'original', 'match_rms_adamw' or 'none')"
        ))),
    }
}

/// One Muon step of a param group (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (table, stepped, steps, params, grads, momentum_buffer, *, lr, momentum, nesterov, weight_decay, ns_coefficients, ns_steps, eps, adjust_lr_fn, maximize, ns_precision="float32", param_dtype="float32", rounding="nearest", seed=0, stream=0, device=None, draws=None, workspace=None, whole=None, orthogonalize=None, updates=None, capturable=false, lr_tensor=None))]
#[allow(clippy::too_many_arguments)]
fn muon_step(
    py: Python<'_>,
    table: &SegmentTable,
    stepped: &[u8],
    steps: u64,
    params: Vec<i64>,
    grads: Vec<i64>,
    momentum_buffer: u64,
    lr: f64,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    ns_coefficients: (f32, f32, f32),
    ns_steps: usize,
    eps: f32,
    adjust_lr_fn: Option<&str>,
    maximize: bool,
    ns_precision: &str,
    param_dtype: &str,
    rounding: &str,
    seed: u64,
    stream: u32,
    device: Option<(i32, usize)>,
    draws: Option<Vec<i64>>,
    workspace: Option<&CudaWorkspace>,
    whole: Option<Vec<(usize, usize)>>,
    orthogonalize: Option<Py<PyAny>>,
    updates: Option<(u64, usize)>,
    capturable: bool,
    lr_tensor: Option<(u64, String)>,
) -> PyResult<()> {
    let g = Group::new(stepped, params, grads, device, draws, param_dtype, rounding, seed, stream)?;
    if capturable && whole.is_some() {
        return Err(PyValueError::new_err("capturable steps of sharded groups are not supported"));
    }
    let counted = counts(steps, capturable, lr, lr_tensor.as_ref().map(|(a, d)| (*a, d.as_str())))?;
    let inputs = inputs_of(ns_precision)?;
    let (a, b, c) = ns_coefficients;
    let hp = MuonHyper {
        lr,
        momentum,
        nesterov,
        weight_decay,
        newton_schulz: NewtonSchulz { steps: ns_steps, a, b, c, eps },
        adjust_lr: lr_adjust_of(adjust_lr_fn)?,
        maximize,
    };
    let (steps, buf) = (Buffer::new("steps", steps), Buffer::new("momentum_buffer", momentum_buffer));
    let ws = workspace.map(|w| &w.inner);
    let Some(whole) = whole else {
        // SAFETY: as in sgd_step.
        return py
            .detach(|| unsafe { smallbatch_step::muon(g.device, ws, g.tensors(table), counted, buf, &hp, inputs) })
            .map_err(to_py_err);
    };
    let orthogonalize = orthogonalize
        .ok_or_else(|| PyValueError::new_err("whole needs orthogonalize, the exchange of the matrices"))?;
    if g.device == Device::Cpu && inputs != Inputs::F32 {
        return Err(PyValueError::new_err("bf16 Newton-Schulz products run on CUDA only"));
    }
    if let (Device::Cuda { .. }, None) = (g.device, updates) {
        return Err(PyValueError::new_err(
            "whole on a CUDA device needs updates=(address, length), a float32 vector on the device",
        ));
    }
    let raised = Raised::new();
    let mut on_host = |values: &mut [f32]| raised.in_place(&orthogonalize, "orthogonalize", values);
    let mut on_device = || raised.call(&orthogonalize, "orthogonalize", None);
    // SAFETY: as in sgd_step; the torch layer passes a live float32 tensor as the updates.
    let result = py.detach(|| unsafe {
        let ortho = match updates {
            Some((updates, capacity)) if g.device != Device::Cpu => {
                OrthogonalizeAcrossRanks::Device { updates, capacity, orthogonalize: &mut on_device }
            }
            _ => OrthogonalizeAcrossRanks::Host(&mut on_host),
        };
        smallbatch_step::muon_sharded(g.device, g.tensors(table), steps, buf, &hp, &whole, ortho)
    });
    raised.result(result)
}

/// Orthogonalizes matrices back to back at `src` into `dst` (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (src, dst, shapes, *, ns_coefficients, ns_steps, eps, ns_precision="float32", device=None, workspace=None))]
#[allow(clippy::too_many_arguments)]
fn orthogonalize(
    py: Python<'_>,
    src: u64,
    dst: u64,
    shapes: Vec<(usize, usize)>,
    ns_coefficients: (f32, f32, f32),
    ns_steps: usize,
    eps: f32,
    ns_precision: &str,
    device: Option<(i32, usize)>,
    workspace: Option<&CudaWorkspace>,
) -> PyResult<()> {
    let (a, b, c) = ns_coefficients;
    let params = NewtonSchulz { steps: ns_steps, a, b, c, eps };
    let inputs = inputs_of(ns_precision)?;
    let device = device.map_or(Device::Cpu, |(ordinal, stream)| Device::Cuda { ordinal, stream });
    let (src, dst) = (Buffer::new("src", src), Buffer::new("dst", dst));
    let ws = workspace.map(|w| &w.inner);
    // SAFETY: the torch layer passes two live float32 tensors of `device` holding the matrices.
    py.detach(|| unsafe { smallbatch_step::orthogonalize(device, ws, src, dst, &shapes, &params, inputs) })
        .map_err(to_py_err)
}

/// Rounds `n` f32 values at `src` to bf16 bits at `dst` (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (src, dst, n, *, stochastic, seed=0, step=0, stream=0, device=None))]
#[allow(clippy::too_many_arguments)]
fn round_to_bf16(
    py: Python<'_>,
    src: u64,
    dst: u64,
    n: usize,
    stochastic: bool,
    seed: u64,
    step: u64,
    stream: u32,
    device: Option<(i32, usize)>,
) -> PyResult<()> {
    let sr = if stochastic { Some((seed, step, stream)) } else { None };
    let (src, dst) = (Buffer::new("src", src), Buffer::new("dst", dst));
    // SAFETY: the torch layer passes two live tensors of `n` elements it owns.
    py.detach(|| unsafe { smallbatch_step::round_to_bf16(device_of(device), src, dst, n, sr) }).map_err(to_py_err)
}

/// Compiles every CUDA kernel for `arch` (e.g. "sm_90") with NVRTC and returns their names.
#[pyfunction]
fn cuda_compile_all(py: Python<'_>, arch: &str) -> PyResult<Vec<String>> {
    let arch = arch.to_string();
    py.detach(move || {
        smallbatch_step::guarded("compiling the CUDA kernels", || Ok(smallbatch_cuda::compile_all(&arch)?))
    })
    .map_err(to_py_err)
}

/// NVRTC's (major, minor) version, or a RuntimeError saying it is missing.
#[pyfunction]
fn cuda_nvrtc_version() -> PyResult<(i32, i32)> {
    smallbatch_cuda::nvrtc_version().map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// `0.5 ** (tokens_per_step / halflife_tokens)`.
#[pyfunction]
fn beta_from_halflife(halflife_tokens: f64, tokens_per_step: f64) -> PyResult<f64> {
    halflife::beta_from_halflife(halflife_tokens, tokens_per_step).map_err(core_err)
}

/// `tokens_per_step * ln(0.5) / ln(beta)`.
#[pyfunction]
fn halflife_from_beta(beta: f64, tokens_per_step: f64) -> PyResult<f64> {
    halflife::halflife_from_beta(beta, tokens_per_step).map_err(core_err)
}

/// `beta ** (to_tokens_per_step / from_tokens_per_step)`.
#[pyfunction]
fn scale_beta(beta: f64, from_tokens_per_step: f64, to_tokens_per_step: f64) -> PyResult<f64> {
    halflife::scale_beta(beta, from_tokens_per_step, to_tokens_per_step).map_err(core_err)
}

/// Runs elementwise steps on the threads of the OpenMP runtime at `path`, which this process must
/// already have loaded (torch's); returns whether it does.
#[pyfunction]
fn use_openmp_threads(path: &str) -> bool {
    smallbatch_step::use_loaded_runtime(path)
}

/// The core's version, SIMD path, supported paths, thread count and chunk size.
#[pyfunction]
fn backend_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let exec = Executor::global().map_err(core_err)?;
    let info = PyDict::new(py);
    info.set_item("version", smallbatch_core::VERSION)?;
    info.set_item("simd", exec.path().name())?;
    info.set_item("simd_supported", SimdPath::supported().iter().map(|p| p.name()).collect::<Vec<_>>())?;
    info.set_item("threads", exec.threads())?;
    let host = smallbatch_core::driver::uses_host_threads() && exec.threads() > 1;
    info.set_item("thread_pool", if host { "openmp" } else { "own" })?;
    info.set_item("chunk_elements", smallbatch_core::driver::CHUNK)?;
    Ok(info)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", smallbatch_core::VERSION)?;
    m.add_class::<SegmentTable>()?;
    m.add_class::<AdafactorLayout>()?;
    m.add_class::<CudaWorkspace>()?;
    m.add_function(wrap_pyfunction!(sgd_step, m)?)?;
    m.add_function(wrap_pyfunction!(adam_step, m)?)?;
    m.add_function(wrap_pyfunction!(adafactor_step, m)?)?;
    m.add_function(wrap_pyfunction!(muon_step, m)?)?;
    m.add_function(wrap_pyfunction!(orthogonalize, m)?)?;
    m.add_function(wrap_pyfunction!(round_to_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile_all, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_nvrtc_version, m)?)?;
    m.add_function(wrap_pyfunction!(beta_from_halflife, m)?)?;
    m.add_function(wrap_pyfunction!(halflife_from_beta, m)?)?;
    m.add_function(wrap_pyfunction!(scale_beta, m)?)?;
    m.add_function(wrap_pyfunction!(backend_info, m)?)?;
    m.add_function(wrap_pyfunction!(use_openmp_threads, m)?)?;
    Ok(())
}
