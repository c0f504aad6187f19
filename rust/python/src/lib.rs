//! `smallbatch_rs._core`: the PyO3 face of smallbatch-core. No logic lives here: each function
//! checks what only the boundary can check (raw addresses from torch tensors), converts, releases
//! the GIL and calls the core (or, for CUDA groups, smallbatch-cuda). The torch layer
//! (python/smallbatch_rs) owns the tensors and passes their `data_ptr()`s; it guarantees they are
//! live, contiguous, on the device the call is for, and of the right dtype.

mod openmp;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use smallbatch_core::driver::Rounding;
use smallbatch_core::newton_schulz::NewtonSchulz;
use smallbatch_core::rules::adafactor::{
    adafactor_step as core_adafactor_step, AdafactorBuffers, AdafactorHyper, AdafactorLayout as CoreAdafactorLayout,
    Beta2,
};
use smallbatch_core::rules::adam::{adam_step as core_adam_step, AdamBuffers, AdamHyper};
use smallbatch_core::rules::muon::{muon_step as core_muon_step, LrAdjust, MuonBuffers, MuonHyper};
use smallbatch_core::rules::sgd::{sgd_step as core_sgd_step, SgdBuffers, SgdHyper};
use smallbatch_core::rules::Params;
use smallbatch_core::{halflife, rounding, Error, Executor, SimdPath};
use smallbatch_cuda::adafactor::{AdafactorState, AdafactorWorkspace};
use smallbatch_cuda::muon::MuonWorkspace;
use std::sync::Mutex;

fn to_py_err(err: Error) -> PyErr {
    match err {
        Error::SimdUnavailable { .. } => PyRuntimeError::new_err(err.to_string()),
        _ => PyValueError::new_err(err.to_string()),
    }
}

/// Runs `f`, turning its error into a Python exception with `to_err` and a Rust panic (a bug) into
/// a RuntimeError (`internal error{context}: message`) instead of letting it unwind into Python.
/// The buffers are plain memory owned by torch, so no invariant can be left broken by unwinding.
fn guard_panics<T, E>(context: &str, f: impl FnOnce() -> Result<T, E>, to_err: impl FnOnce(E) -> PyErr) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(to_err),
        Err(payload) => Err(PyRuntimeError::new_err(format!(
            "smallbatch_rs internal error{context}: {}",
            smallbatch_core::error::panic_message(&*payload)
        ))),
    }
}

/// A CPU step or conversion of the core, guarded (see [`guard_panics`]).
fn guarded<T>(f: impl FnOnce() -> Result<T, Error>) -> PyResult<T> {
    guard_panics("", f, to_py_err)
}

/// Work of the CUDA crate (`what`: "the CUDA SGD step", ...), guarded (see [`guard_panics`]).
fn cuda_guarded<T>(what: &str, f: impl FnOnce() -> Result<T, smallbatch_cuda::CudaError>) -> PyResult<T> {
    guard_panics(&format!(" in {what}"), f, cuda_err)
}

/// Layout of a param group's tensors, packed back to back in one flat buffer.
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
                let table = smallbatch_core::SegmentTable::with_matrices(&m).map_err(to_py_err)?;
                if table.numels() != numels.as_slice() {
                    return Err(PyValueError::new_err("matrices do not match numels"));
                }
                Ok(table)
            }
        };
        inner.map(|inner| SegmentTable { inner }).map_err(to_py_err)
    }

    /// Total elements of the flat buffer.
    #[getter]
    fn total(&self) -> usize {
        self.inner.total()
    }

    /// Element offset of each tensor.
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
        CoreAdafactorLayout::new(&table.inner, &factored).map(|inner| AdafactorLayout { inner }).map_err(to_py_err)
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

/// A buffer handed over as a raw address, checked before it becomes a slice.
struct RawBuffer {
    name: &'static str,
    addr: usize,
    bytes: usize,
}

impl RawBuffer {
    fn new<T>(name: &'static str, addr: usize, len: usize) -> PyResult<RawBuffer> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| PyValueError::new_err(format!("{name}: {len} elements overflow the address space")))?;
        if len > 0 && addr == 0 {
            return Err(PyValueError::new_err(format!("{name}: null data pointer for {len} elements")));
        }
        if !addr.is_multiple_of(std::mem::align_of::<T>()) {
            return Err(PyValueError::new_err(format!(
                "{name}: data pointer {addr:#x} is not aligned to {} bytes",
                std::mem::align_of::<T>()
            )));
        }
        Ok(RawBuffer { name, addr, bytes })
    }

    /// # Safety
    /// The caller (the torch layer) guarantees `addr` points at `len` live elements of `T`.
    unsafe fn slice_mut<'a, T>(&self) -> &'a mut [T] {
        let len = self.bytes / std::mem::size_of::<T>();
        if len == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.addr as *mut T, len)
    }
}

/// Rejects buffers that overlap: the core's `&mut` slices must be disjoint.
fn check_disjoint(buffers: &[&RawBuffer]) -> PyResult<()> {
    for (i, a) in buffers.iter().enumerate() {
        for b in &buffers[i + 1..] {
            let overlap = a.bytes > 0 && b.bytes > 0 && a.addr < b.addr + b.bytes && b.addr < a.addr + a.bytes;
            if overlap {
                return Err(PyValueError::new_err(format!("buffers {} and {} overlap in memory", a.name, b.name)));
            }
        }
    }
    Ok(())
}

/// The parameter and gradient buffers of a group in their storage type.
struct ParamBuffers {
    param: RawBuffer,
    grad: RawBuffer,
    bf16: Option<Rounding>,
}

impl ParamBuffers {
    fn new(
        dtype: &str,
        param: usize,
        grad: usize,
        total: usize,
        rounding: &str,
        seed: u64,
        stream: u32,
    ) -> PyResult<Self> {
        match dtype {
            "float32" => Ok(ParamBuffers {
                param: RawBuffer::new::<f32>("param", param, total)?,
                grad: RawBuffer::new::<f32>("grad", grad, total)?,
                bf16: None,
            }),
            "bfloat16" => Ok(ParamBuffers {
                param: RawBuffer::new::<u16>("param", param, total)?,
                grad: RawBuffer::new::<u16>("grad", grad, total)?,
                bf16: Some(match rounding {
                    "nearest" => Rounding::Nearest,
                    "stochastic" => Rounding::Stochastic { seed, stream },
                    other => {
                        return Err(PyValueError::new_err(format!(
                            "rounding must be 'nearest' or 'stochastic', not {other:?}"
                        )))
                    }
                }),
            }),
            other => Err(PyValueError::new_err(format!("param_dtype must be 'float32' or 'bfloat16', not {other:?}"))),
        }
    }

    /// # Safety
    /// As for [`RawBuffer::slice_mut`].
    unsafe fn params<'a>(&self) -> Params<'a> {
        match self.bf16 {
            None => Params::F32 { param: self.param.slice_mut(), grad: self.grad.slice_mut() },
            Some(rounding) => Params::Bf16 { param: self.param.slice_mut(), grad: self.grad.slice_mut(), rounding },
        }
    }
}

fn stepped_flags(table: &SegmentTable, stepped: &[u8]) -> PyResult<Vec<bool>> {
    if stepped.len() != table.inner.len() {
        return Err(PyValueError::new_err(format!(
            "stepped has {} flags for {} tensors",
            stepped.len(),
            table.inner.len()
        )));
    }
    Ok(stepped.iter().map(|&b| b != 0).collect())
}

/// One SGD step of a param group over flat buffers given by address (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (table, stepped, steps, param, grad, momentum_buffer, *, lr, momentum, dampening, weight_decay, nesterov, maximize, param_dtype="float32", rounding="nearest", seed=0, stream=0))]
#[allow(clippy::too_many_arguments)]
fn sgd_step(
    py: Python<'_>,
    table: &SegmentTable,
    stepped: &[u8],
    steps: usize,
    param: usize,
    grad: usize,
    momentum_buffer: usize,
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
) -> PyResult<()> {
    let total = table.inner.total();
    let flags = stepped_flags(table, stepped)?;
    let steps = RawBuffer::new::<f64>("steps", steps, table.inner.len())?;
    let pg = ParamBuffers::new(param_dtype, param, grad, total, rounding, seed, stream)?;
    let use_momentum = momentum != 0.0;
    let mbuf = RawBuffer::new::<f32>("momentum_buffer", momentum_buffer, if use_momentum { total } else { 0 })?;
    check_disjoint(&[&steps, &pg.param, &pg.grad, &mbuf])?;
    let hp = SgdHyper { lr, momentum, dampening, weight_decay, nesterov, maximize };
    let exec = Executor::global().map_err(to_py_err)?;
    let inner = &table.inner;
    py.detach(|| {
        guarded(|| {
            // SAFETY: addresses checked above; the torch layer keeps the tensors alive and unshared.
            let bufs = unsafe {
                SgdBuffers { params: pg.params(), momentum: if use_momentum { Some(mbuf.slice_mut()) } else { None } }
            };
            core_sgd_step(exec, inner, &flags, unsafe { steps.slice_mut() }, bufs, &hp)
        })
    })
}

/// One Adam/AdamW step of a param group over flat buffers given by address (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (table, stepped, steps, param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, param_dtype="float32", rounding="nearest", seed=0, stream=0))]
#[allow(clippy::too_many_arguments)]
fn adam_step(
    py: Python<'_>,
    table: &SegmentTable,
    stepped: &[u8],
    steps: usize,
    param: usize,
    grad: usize,
    exp_avg: usize,
    exp_avg_sq: usize,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    decoupled_weight_decay: bool,
    maximize: bool,
    param_dtype: &str,
    rounding: &str,
    seed: u64,
    stream: u32,
) -> PyResult<()> {
    let total = table.inner.total();
    let flags = stepped_flags(table, stepped)?;
    let steps = RawBuffer::new::<f64>("steps", steps, table.inner.len())?;
    let pg = ParamBuffers::new(param_dtype, param, grad, total, rounding, seed, stream)?;
    let exp_avg = RawBuffer::new::<f32>("exp_avg", exp_avg, total)?;
    let exp_avg_sq = RawBuffer::new::<f32>("exp_avg_sq", exp_avg_sq, total)?;
    check_disjoint(&[&steps, &pg.param, &pg.grad, &exp_avg, &exp_avg_sq])?;
    let hp = AdamHyper { lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize };
    let exec = Executor::global().map_err(to_py_err)?;
    let inner = &table.inner;
    py.detach(|| {
        guarded(|| {
            // SAFETY: addresses checked above; the torch layer keeps the tensors alive and unshared.
            let bufs = unsafe {
                AdamBuffers { params: pg.params(), exp_avg: exp_avg.slice_mut(), exp_avg_sq: exp_avg_sq.slice_mut() }
            };
            core_adam_step(exec, inner, &flags, unsafe { steps.slice_mut() }, bufs, &hp)
        })
    })
}

/// A constant beta2, or torch's schedule when none is given.
fn beta2_of(beta2: Option<f64>, beta2_decay: f64) -> Beta2 {
    match beta2 {
        Some(b) => Beta2::Constant(b),
        None => Beta2::Decay(beta2_decay),
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

/// One Adafactor step of a param group over flat buffers given by address (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (table, layout, stepped, steps, param, grad, row_var, col_var, variance, exp_avg, *, lr, beta1, beta2, beta2_decay, eps1, eps2, clip_threshold, relative_step, cap_lr_at_inv_sqrt_step, weight_decay, maximize, param_dtype="float32", rounding="nearest", seed=0, stream=0))]
#[allow(clippy::too_many_arguments)]
fn adafactor_step(
    py: Python<'_>,
    table: &SegmentTable,
    layout: &AdafactorLayout,
    stepped: &[u8],
    steps: usize,
    param: usize,
    grad: usize,
    row_var: usize,
    col_var: usize,
    variance: usize,
    exp_avg: usize,
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
) -> PyResult<()> {
    let total = table.inner.total();
    let lay = &layout.inner;
    let flags = stepped_flags(table, stepped)?;
    let steps = RawBuffer::new::<f64>("steps", steps, table.inner.len())?;
    let pg = ParamBuffers::new(param_dtype, param, grad, total, rounding, seed, stream)?;
    let row_var = RawBuffer::new::<f32>("row_var", row_var, lay.row_total)?;
    let col_var = RawBuffer::new::<f32>("col_var", col_var, lay.col_total)?;
    let variance = RawBuffer::new::<f32>("variance", variance, lay.variance_total)?;
    let momentum = beta1 != 0.0;
    let exp_avg = RawBuffer::new::<f32>("exp_avg", exp_avg, if momentum { total } else { 0 })?;
    check_disjoint(&[&steps, &pg.param, &pg.grad, &row_var, &col_var, &variance, &exp_avg])?;
    let hp = AdafactorHyper {
        lr,
        beta1,
        beta2: beta2_of(beta2, beta2_decay),
        eps1,
        eps2,
        clip_threshold,
        relative_step,
        cap_lr_at_inv_sqrt_step,
        weight_decay,
        maximize,
    };
    let exec = Executor::global().map_err(to_py_err)?;
    let inner = &table.inner;
    py.detach(|| {
        guarded(|| {
            // SAFETY: addresses checked above; the torch layer keeps the tensors alive and unshared.
            let bufs = unsafe {
                AdafactorBuffers {
                    params: pg.params(),
                    row_var: row_var.slice_mut(),
                    col_var: col_var.slice_mut(),
                    variance: variance.slice_mut(),
                    exp_avg: if momentum { Some(exp_avg.slice_mut()) } else { None },
                }
            };
            core_adafactor_step(exec, inner, lay, &flags, unsafe { steps.slice_mut() }, bufs, &hp)
        })
    })
}

/// One Muon step of a param group over flat buffers given by address (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (table, stepped, steps, param, grad, momentum_buffer, *, lr, momentum, nesterov, weight_decay, ns_coefficients, ns_steps, eps, adjust_lr_fn, maximize, param_dtype="float32", rounding="nearest", seed=0, stream=0))]
#[allow(clippy::too_many_arguments)]
fn muon_step(
    py: Python<'_>,
    table: &SegmentTable,
    stepped: &[u8],
    steps: usize,
    param: usize,
    grad: usize,
    momentum_buffer: usize,
    lr: f64,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    ns_coefficients: (f32, f32, f32),
    ns_steps: usize,
    eps: f32,
    adjust_lr_fn: Option<&str>,
    maximize: bool,
    param_dtype: &str,
    rounding: &str,
    seed: u64,
    stream: u32,
) -> PyResult<()> {
    let total = table.inner.total();
    let flags = stepped_flags(table, stepped)?;
    let steps = RawBuffer::new::<f64>("steps", steps, table.inner.len())?;
    let pg = ParamBuffers::new(param_dtype, param, grad, total, rounding, seed, stream)?;
    let mbuf = RawBuffer::new::<f32>("momentum_buffer", momentum_buffer, total)?;
    check_disjoint(&[&steps, &pg.param, &pg.grad, &mbuf])?;
    let adjust_lr = lr_adjust_of(adjust_lr_fn)?;
    let (a, b, c) = ns_coefficients;
    let hp = MuonHyper {
        lr,
        momentum,
        nesterov,
        weight_decay,
        newton_schulz: NewtonSchulz { steps: ns_steps, a, b, c, eps },
        adjust_lr,
        maximize,
    };
    let exec = Executor::global().map_err(to_py_err)?;
    let inner = &table.inner;
    py.detach(|| {
        guarded(|| {
            // SAFETY: addresses checked above; the torch layer keeps the tensors alive and unshared.
            let bufs = unsafe { MuonBuffers { params: pg.params(), momentum: mbuf.slice_mut() } };
            core_muon_step(exec, inner, &flags, unsafe { steps.slice_mut() }, bufs, &hp)
        })
    })
}

/// Rounds `n` f32 values at `src` to bf16 bits at `dst`, stochastically (`seed`, `step`,
/// `stream`) or to nearest.
#[pyfunction]
#[pyo3(signature = (src, dst, n, *, stochastic, seed=0, step=0, stream=0))]
#[allow(clippy::too_many_arguments)]
fn round_to_bf16(
    py: Python<'_>,
    src: usize,
    dst: usize,
    n: usize,
    stochastic: bool,
    seed: u64,
    step: u64,
    stream: u32,
) -> PyResult<()> {
    let src = RawBuffer::new::<f32>("src", src, n)?;
    let dst = RawBuffer::new::<u16>("dst", dst, n)?;
    check_disjoint(&[&src, &dst])?;
    let exec = Executor::global().map_err(to_py_err)?;
    py.detach(|| {
        guarded(|| {
            // SAFETY: addresses checked above; the torch layer owns both tensors.
            let (s, d) = unsafe { (src.slice_mut::<f32>(), dst.slice_mut::<u16>()) };
            if stochastic {
                rounding::stochastic_round_slice(exec, s, d, seed, step, stream)
            } else {
                rounding::round_nearest_slice(exec, s, d)
            }
        })
    })
}

/// Compiles every CUDA kernel for `arch` (e.g. "sm_90") with NVRTC and returns their names.
#[pyfunction]
fn cuda_compile_all(py: Python<'_>, arch: &str) -> PyResult<Vec<String>> {
    let arch = arch.to_string();
    py.detach(move || cuda_guarded("compiling the CUDA kernels", || smallbatch_cuda::compile_all(&arch)))
}

fn cuda_err(e: smallbatch_cuda::CudaError) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

fn device_group(
    ordinal: i32,
    stream: usize,
    param_dtype: &str,
    param: usize,
    grad: usize,
) -> PyResult<smallbatch_cuda::dispatch::DeviceGroup> {
    use smallbatch_cuda::dispatch::{DeviceDtype, DeviceGroup};
    let dtype = match param_dtype {
        "float32" => DeviceDtype::F32,
        "bfloat16" => DeviceDtype::Bf16,
        other => {
            return Err(PyValueError::new_err(format!("param_dtype must be 'float32' or 'bfloat16', not {other:?}")))
        }
    };
    if param == 0 || grad == 0 {
        return Err(PyValueError::new_err("null device pointer for param or grad"));
    }
    Ok(DeviceGroup { ordinal, stream, dtype, param: param as u64, grad: grad as u64 })
}

fn rounding_of(rounding: &str, seed: u64, stream: u32) -> PyResult<Rounding> {
    match rounding {
        "nearest" => Ok(Rounding::Nearest),
        "stochastic" => Ok(Rounding::Stochastic { seed, stream }),
        other => Err(PyValueError::new_err(format!("rounding must be 'nearest' or 'stochastic', not {other:?}"))),
    }
}

/// One SGD step of a CUDA param group, launched on `cuda_stream` (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (table, stepped, steps, ordinal, cuda_stream, param, grad, momentum_buffer, *, lr, momentum, dampening, weight_decay, nesterov, maximize, param_dtype="float32", rounding="nearest", seed=0, stream=0))]
#[allow(clippy::too_many_arguments)]
fn cuda_sgd_step(
    py: Python<'_>,
    table: &SegmentTable,
    stepped: &[u8],
    steps: usize,
    ordinal: i32,
    cuda_stream: usize,
    param: usize,
    grad: usize,
    momentum_buffer: usize,
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
) -> PyResult<()> {
    let flags = stepped_flags(table, stepped)?;
    let steps = RawBuffer::new::<f64>("steps", steps, table.inner.len())?;
    let group = device_group(ordinal, cuda_stream, param_dtype, param, grad)?;
    let rounding = rounding_of(rounding, seed, stream)?;
    let hp = SgdHyper { lr, momentum, dampening, weight_decay, nesterov, maximize };
    hp.validate().map_err(to_py_err)?;
    let inner = &table.inner;
    py.detach(|| {
        // SAFETY: the host step counters are a live float64 tensor owned by the torch layer.
        let steps = unsafe { steps.slice_mut::<f64>() };
        cuda_guarded("the CUDA SGD step", || {
            smallbatch_cuda::dispatch::sgd_step(group, inner, &flags, steps, momentum_buffer as u64, &hp, rounding)
        })
    })
}

/// One Adam/AdamW step of a CUDA param group, launched on `cuda_stream` (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (table, stepped, steps, ordinal, cuda_stream, param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, param_dtype="float32", rounding="nearest", seed=0, stream=0))]
#[allow(clippy::too_many_arguments)]
fn cuda_adam_step(
    py: Python<'_>,
    table: &SegmentTable,
    stepped: &[u8],
    steps: usize,
    ordinal: i32,
    cuda_stream: usize,
    param: usize,
    grad: usize,
    exp_avg: usize,
    exp_avg_sq: usize,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    decoupled_weight_decay: bool,
    maximize: bool,
    param_dtype: &str,
    rounding: &str,
    seed: u64,
    stream: u32,
) -> PyResult<()> {
    let flags = stepped_flags(table, stepped)?;
    let steps = RawBuffer::new::<f64>("steps", steps, table.inner.len())?;
    let group = device_group(ordinal, cuda_stream, param_dtype, param, grad)?;
    if exp_avg == 0 || exp_avg_sq == 0 {
        return Err(PyValueError::new_err("null device pointer for exp_avg or exp_avg_sq"));
    }
    let rounding = rounding_of(rounding, seed, stream)?;
    let hp = AdamHyper { lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize };
    hp.validate().map_err(to_py_err)?;
    let inner = &table.inner;
    py.detach(|| {
        // SAFETY: as in cuda_sgd_step.
        let steps = unsafe { steps.slice_mut::<f64>() };
        cuda_guarded("the CUDA Adam step", || {
            smallbatch_cuda::dispatch::adam_step(
                group,
                inner,
                &flags,
                steps,
                exp_avg as u64,
                exp_avg_sq as u64,
                &hp,
                rounding,
            )
        })
    })
}

/// Device memory a CUDA param group keeps from step to step: Adafactor's segment table and
/// scratch, Muon's Newton-Schulz workspace and cuBLAS handle. Freed when dropped.
#[pyclass(module = "smallbatch_rs._core", frozen)]
struct CudaWorkspace {
    ordinal: i32,
    adafactor: Mutex<Option<AdafactorWorkspace>>,
    muon: Mutex<Option<MuonWorkspace>>,
}

#[pymethods]
impl CudaWorkspace {
    #[new]
    fn new(ordinal: i32) -> PyResult<Self> {
        if ordinal < 0 {
            return Err(PyValueError::new_err(format!("invalid CUDA device ordinal {ordinal}")));
        }
        Ok(CudaWorkspace { ordinal, adafactor: Mutex::new(None), muon: Mutex::new(None) })
    }

    /// The device the workspace's memory is on.
    #[getter]
    fn ordinal(&self) -> i32 {
        self.ordinal
    }

    fn __repr__(&self) -> String {
        format!("CudaWorkspace(ordinal={})", self.ordinal)
    }
}

impl CudaWorkspace {
    fn check_device(&self, ordinal: i32) -> PyResult<()> {
        if ordinal != self.ordinal {
            return Err(PyValueError::new_err(format!(
                "the CUDA workspace belongs to device {}, not device {ordinal}",
                self.ordinal
            )));
        }
        Ok(())
    }
}

/// One Adafactor step of a CUDA param group, launched on `cuda_stream` (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (workspace, table, layout, stepped, steps, ordinal, cuda_stream, param, grad, row_var, col_var, variance, exp_avg, *, lr, beta1, beta2, beta2_decay, eps1, eps2, clip_threshold, relative_step, cap_lr_at_inv_sqrt_step, weight_decay, maximize, param_dtype="float32", rounding="nearest", seed=0, stream=0))]
#[allow(clippy::too_many_arguments)]
fn cuda_adafactor_step(
    py: Python<'_>,
    workspace: &CudaWorkspace,
    table: &SegmentTable,
    layout: &AdafactorLayout,
    stepped: &[u8],
    steps: usize,
    ordinal: i32,
    cuda_stream: usize,
    param: usize,
    grad: usize,
    row_var: usize,
    col_var: usize,
    variance: usize,
    exp_avg: usize,
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
) -> PyResult<()> {
    workspace.check_device(ordinal)?;
    let flags = stepped_flags(table, stepped)?;
    let steps = RawBuffer::new::<f64>("steps", steps, table.inner.len())?;
    let group = device_group(ordinal, cuda_stream, param_dtype, param, grad)?;
    let lay = &layout.inner;
    for (name, addr, len) in [
        ("row_var", row_var, lay.row_total),
        ("col_var", col_var, lay.col_total),
        ("variance", variance, lay.variance_total),
    ] {
        if len > 0 && addr == 0 {
            return Err(PyValueError::new_err(format!("null device pointer for {name}")));
        }
    }
    let rounding = rounding_of(rounding, seed, stream)?;
    let hp = AdafactorHyper {
        lr,
        beta1,
        beta2: beta2_of(beta2, beta2_decay),
        eps1,
        eps2,
        clip_threshold,
        relative_step,
        cap_lr_at_inv_sqrt_step,
        weight_decay,
        maximize,
    };
    hp.validate().map_err(to_py_err)?;
    let state = AdafactorState {
        row_var: row_var as u64,
        col_var: col_var as u64,
        variance: variance as u64,
        exp_avg: exp_avg as u64,
    };
    let inner = &table.inner;
    py.detach(|| {
        // SAFETY: the host step counters are a live float64 tensor owned by the torch layer.
        let steps = unsafe { steps.slice_mut::<f64>() };
        let mut ws = workspace.adafactor.lock().unwrap_or_else(|p| p.into_inner());
        let ws = ws.get_or_insert_with(|| AdafactorWorkspace::new(ordinal));
        cuda_guarded("the CUDA Adafactor step", || {
            smallbatch_cuda::adafactor::adafactor_step(ws, group, inner, lay, &flags, steps, state, &hp, rounding)
        })
    })
}

/// One Muon step of a CUDA param group, launched on `cuda_stream` (see the `.pyi`).
#[pyfunction]
#[pyo3(signature = (workspace, table, stepped, steps, ordinal, cuda_stream, param, grad, momentum_buffer, *, lr, momentum, nesterov, weight_decay, ns_coefficients, ns_steps, eps, adjust_lr_fn, maximize, ns_precision="float32", param_dtype="float32", rounding="nearest", seed=0, stream=0))]
#[allow(clippy::too_many_arguments)]
fn cuda_muon_step(
    py: Python<'_>,
    workspace: &CudaWorkspace,
    table: &SegmentTable,
    stepped: &[u8],
    steps: usize,
    ordinal: i32,
    cuda_stream: usize,
    param: usize,
    grad: usize,
    momentum_buffer: usize,
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
) -> PyResult<()> {
    use smallbatch_cuda::cublas::Inputs;
    workspace.check_device(ordinal)?;
    let flags = stepped_flags(table, stepped)?;
    let steps = RawBuffer::new::<f64>("steps", steps, table.inner.len())?;
    let group = device_group(ordinal, cuda_stream, param_dtype, param, grad)?;
    let inputs = match ns_precision {
        "float32" => Inputs::F32,
        "bfloat16" => Inputs::Bf16,
        other => {
            return Err(PyValueError::new_err(format!("ns_precision must be 'float32' or 'bfloat16', not {other:?}")))
        }
    };
    let rounding = rounding_of(rounding, seed, stream)?;
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
    hp.validate().map_err(to_py_err)?;
    let inner = &table.inner;
    py.detach(|| {
        // SAFETY: as in cuda_adafactor_step.
        let steps = unsafe { steps.slice_mut::<f64>() };
        let mut ws = workspace.muon.lock().unwrap_or_else(|p| p.into_inner());
        let ws = ws.get_or_insert_with(|| MuonWorkspace::new(ordinal));
        cuda_guarded("the CUDA Muon step", || {
            smallbatch_cuda::muon::muon_step(
                ws,
                group,
                inner,
                &flags,
                steps,
                momentum_buffer as u64,
                &hp,
                inputs,
                rounding,
            )
        })
    })
}

/// Rounds `n` floats at device address `src` to bf16 at `dst` on `cuda_stream`.
#[pyfunction]
#[pyo3(signature = (ordinal, cuda_stream, src, dst, n, *, stochastic, seed=0, step=0, stream=0))]
#[allow(clippy::too_many_arguments)]
fn cuda_round_to_bf16(
    py: Python<'_>,
    ordinal: i32,
    cuda_stream: usize,
    src: usize,
    dst: usize,
    n: u64,
    stochastic: bool,
    seed: u64,
    step: u64,
    stream: u32,
) -> PyResult<()> {
    if n > 0 && (src == 0 || dst == 0) {
        return Err(PyValueError::new_err("null device pointer"));
    }
    let sr = if stochastic { Some((seed, step, stream)) } else { None };
    py.detach(|| {
        cuda_guarded("CUDA rounding", || {
            smallbatch_cuda::dispatch::round_to_bf16(ordinal, cuda_stream, src as u64, dst as u64, n, sr)
        })
    })
}

/// NVRTC's (major, minor) version, or a RuntimeError saying it is missing.
#[pyfunction]
fn cuda_nvrtc_version() -> PyResult<(i32, i32)> {
    smallbatch_cuda::nvrtc_version().map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// `0.5 ** (tokens_per_step / halflife_tokens)`.
#[pyfunction]
fn beta_from_halflife(halflife_tokens: f64, tokens_per_step: f64) -> PyResult<f64> {
    halflife::beta_from_halflife(halflife_tokens, tokens_per_step).map_err(to_py_err)
}

/// `tokens_per_step * ln(0.5) / ln(beta)`.
#[pyfunction]
fn halflife_from_beta(beta: f64, tokens_per_step: f64) -> PyResult<f64> {
    halflife::halflife_from_beta(beta, tokens_per_step).map_err(to_py_err)
}

/// `beta ** (to_tokens_per_step / from_tokens_per_step)`.
#[pyfunction]
fn scale_beta(beta: f64, from_tokens_per_step: f64, to_tokens_per_step: f64) -> PyResult<f64> {
    halflife::scale_beta(beta, from_tokens_per_step, to_tokens_per_step).map_err(to_py_err)
}

/// Runs elementwise steps on the threads of the OpenMP runtime at `path`, which this process must
/// already have loaded (torch's); returns whether it does.
#[pyfunction]
fn use_openmp_threads(path: &str) -> bool {
    openmp::use_loaded_runtime(path)
}

/// The core's version, SIMD path, supported paths, thread count and chunk size.
#[pyfunction]
fn backend_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let exec = Executor::global().map_err(to_py_err)?;
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
    m.add_function(wrap_pyfunction!(adafactor_step, m)?)?;
    m.add_function(wrap_pyfunction!(round_to_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(muon_step, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile_all, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_nvrtc_version, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_sgd_step, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_adam_step, m)?)?;
    m.add_class::<CudaWorkspace>()?;
    m.add_function(wrap_pyfunction!(cuda_adafactor_step, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_muon_step, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_round_to_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(sgd_step, m)?)?;
    m.add_function(wrap_pyfunction!(adam_step, m)?)?;
    m.add_function(wrap_pyfunction!(beta_from_halflife, m)?)?;
    m.add_function(wrap_pyfunction!(halflife_from_beta, m)?)?;
    m.add_function(wrap_pyfunction!(scale_beta, m)?)?;
    m.add_function(wrap_pyfunction!(backend_info, m)?)?;
    m.add_function(wrap_pyfunction!(use_openmp_threads, m)?)?;
    Ok(())
}
