//! Launching the kernels on torch-owned memory and torch's current stream.
//!
//! The caller (the Python layer) passes each tensor's raw device address (`tensor.data_ptr()`),
//! the device ordinal and the raw `cudaStream_t` of `torch.cuda.current_stream()`. Launches are
//! asynchronous on that stream: no copies, no host synchronisation, so a step can be captured in a
//! CUDA graph. The elementwise rules take their tensors as lists of up to [`LIST_TENSORS`] in
//! kernel arguments (cuda/common.cuh `TensorList`), one launch per list; per-list constants are
//! computed on the host by the core (the same `#[repr(C)]` structs the CPU kernels use) and
//! passed by value.
//!
//! Modules are compiled once per device architecture (CUBIN for the exact `sm_XX`) and cached.

use crate::backend::backend;
use crate::compile::{compile_source, CompileTarget, CudaError};
use crate::kernels::{with_header, SOURCES};
use crate::launch::{grid_for, grid_for_tiles, BLOCK};
use cudarc::driver::{result, sys};
use smallbatch_core::driver::Rounding;
use smallbatch_core::rules::adam::{AdamConsts, AdamHyper};
use smallbatch_core::rules::sgd::{SgdConsts, SgdHyper};
use smallbatch_core::{Run, SegmentTable};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Mutex;

/// Blocks per SM the grid-stride kernels are launched with.
const BLOCKS_PER_SM: u32 = 8;

/// Parameter storage on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceDtype {
    /// float32 parameters and gradients.
    F32,
    /// bfloat16 parameters and gradients (raw bits).
    Bf16,
}

impl DeviceDtype {
    pub fn suffix(self) -> &'static str {
        match self {
            DeviceDtype::F32 => "f32",
            DeviceDtype::Bf16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            DeviceDtype::F32 => 4,
            DeviceDtype::Bf16 => 2,
        }
    }
}

/// The rounding arguments every parameter-writing kernel takes: (seed, stream id, mode).
pub fn rounding_args(rounding: Rounding) -> (u64, u32, u32) {
    match rounding {
        Rounding::Nearest => (0, 0, 0),
        Rounding::Stochastic { seed, stream } => (seed, stream, 1),
    }
}

struct Loaded {
    arch: String,
    modules: HashMap<&'static str, sys::CUmodule>,
    sm_count: u32,
}

// SAFETY: CUDA module handles are process-wide and usable from any thread with the context current.
unsafe impl Send for Loaded {}

static MODULES: Mutex<Option<HashMap<i32, Loaded>>> = Mutex::new(None);

pub(crate) fn driver_err(what: &str, e: impl std::fmt::Debug) -> CudaError {
    CudaError::Device(format!("CUDA driver: {what} failed: {e:?}"))
}

/// Makes a context of `ordinal` current (torch's primary context when torch set none).
pub(crate) fn ensure_context(ordinal: i32) -> Result<sys::CUdevice, CudaError> {
    // SAFETY: only probes for the library.
    if !std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false) {
        return Err(CudaError::Device("no NVIDIA driver (libcuda) could be loaded".into()));
    }
    result::init().map_err(|e| driver_err("cuInit", e))?;
    let dev = result::device::get(ordinal).map_err(|e| driver_err("cuDeviceGet", e))?;
    if result::ctx::get_current().map_err(|e| driver_err("cuCtxGetCurrent", e))?.is_none() {
        // SAFETY: retaining the primary context torch itself uses.
        unsafe {
            let ctx = result::primary_ctx::retain(dev).map_err(|e| driver_err("cuDevicePrimaryCtxRetain", e))?;
            result::ctx::set_current(ctx).map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        }
    }
    Ok(dev)
}

/// The function `name` of `file` on device `ordinal`, compiling (for the device's exact
/// architecture) and loading its module on first use.
pub(crate) fn function(ordinal: i32, file: &'static str, name: &str) -> Result<(sys::CUfunction, u32), CudaError> {
    let dev = ensure_context(ordinal)?;
    let mut guard = MODULES.lock().unwrap_or_else(|p| p.into_inner());
    let devices = guard.get_or_insert_with(HashMap::new);
    let loaded = match devices.entry(ordinal) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            // SAFETY: plain attribute queries of a valid device.
            let attr =
                |a| unsafe { result::device::get_attribute(dev, a) }.map_err(|e| driver_err("cuDeviceGetAttribute", e));
            let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            let sm_count = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
            e.insert(Loaded { arch: format!("sm_{major}{minor}"), modules: HashMap::new(), sm_count })
        }
    };
    if !loaded.modules.contains_key(file) {
        let (f, src) = SOURCES
            .iter()
            .find(|(f, _)| *f == file)
            .ok_or_else(|| CudaError::Nvrtc(format!("no kernel file {file}")))?;
        let cubin = compile_source(f, &with_header(src), &loaded.arch, CompileTarget::Cubin)?;
        // SAFETY: a CUBIN NVRTC just produced for this device's architecture.
        let module = unsafe { result::module::load_data(cubin.as_ptr() as *const c_void) }
            .map_err(|e| driver_err("cuModuleLoadData", e))?;
        loaded.modules.insert(f, module);
    }
    let module = loaded.modules[file];
    let cname = CString::new(name).map_err(|_| CudaError::Nvrtc("bad kernel name".into()))?;
    // SAFETY: a live module of this context.
    let func =
        unsafe { result::module::get_function(module, cname) }.map_err(|e| driver_err("cuModuleGetFunction", e))?;
    Ok((func, loaded.sm_count))
}

/// Launches `name` over `n` elements with the grid-stride shape.
///
/// # Safety
/// `args` must match the kernel's parameter list, and every pointer in them must be a live
/// device allocation of `ordinal` large enough for the launch.
unsafe fn launch(
    ordinal: i32,
    stream: usize,
    file: &'static str,
    name: &str,
    n: u64,
    args: &mut [*mut c_void],
) -> Result<(), CudaError> {
    let grid = grid_for(n, sm_count(ordinal)?, BLOCKS_PER_SM);
    launch_grid(ordinal, stream, file, name, (grid, 1, 1), args)
}

/// The device's multiprocessor count (compiling nothing).
pub(crate) fn sm_count(ordinal: i32) -> Result<u32, CudaError> {
    backend().sm_count(ordinal)
}

/// Launches `name` of `file` with an explicit grid of [`BLOCK`]-thread blocks (nothing when a
/// dimension is 0).
///
/// # Safety
/// As for [`launch`].
pub(crate) unsafe fn launch_grid(
    ordinal: i32,
    stream: usize,
    file: &'static str,
    name: &str,
    grid: (u32, u32, u32),
    args: &mut [*mut c_void],
) -> Result<(), CudaError> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    backend().launch(ordinal, stream, file, name, grid, BLOCK, args)
}

/// A kernel's argument list: each value copied into its own 8-byte-aligned slot, so the pointers
/// handed to `cuLaunchKernel` stay valid while the list lives (the driver copies the values at
/// launch).
#[derive(Default)]
pub(crate) struct Args {
    slots: Vec<Box<[u64]>>,
}

impl Args {
    pub(crate) fn new() -> Self {
        Args::default()
    }

    /// Appends a value passed by value (a scalar, a device pointer as `u64`, a `#[repr(C)]` struct).
    pub(crate) fn push<T: Copy>(mut self, value: T) -> Self {
        assert!(std::mem::align_of::<T>() <= 8, "kernel arguments are at most 8-byte aligned");
        let mut slot = vec![0u64; std::mem::size_of::<T>().div_ceil(8).max(1)].into_boxed_slice();
        // SAFETY: the slot holds at least size_of::<T>() bytes at 8-byte alignment.
        unsafe { std::ptr::write(slot.as_mut_ptr() as *mut T, value) };
        self.slots.push(slot);
        self
    }

    /// The pointers `cuLaunchKernel` takes, one per argument in order.
    pub(crate) fn pointers(&mut self) -> Vec<*mut c_void> {
        self.slots.iter_mut().map(|s| s.as_mut_ptr() as *mut c_void).collect()
    }

    /// Number of arguments.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

/// A CUDA param group's tensors: where each tensor's parameters and gradients live, and where
/// its kernels run.
#[derive(Debug, Clone, Copy)]
pub struct DeviceGroup<'a> {
    /// Device ordinal.
    pub ordinal: i32,
    /// Raw `cudaStream_t` (0: the legacy default stream).
    pub stream: usize,
    /// Parameter and gradient storage.
    pub dtype: DeviceDtype,
    /// Device address of each tensor's parameters (element 0), one per tensor of the table (any
    /// value for tensors that are not stepped or have no elements).
    pub params: &'a [u64],
    /// Device address of each tensor's gradients, laid out like its parameters.
    pub grads: &'a [u64],
    /// The index each tensor's element 0 draws its random bits at (`None`: the table's offsets);
    /// a shard of a larger tensor gives its place in the unsharded group.
    pub draws: Option<&'a [u64]>,
}

impl DeviceGroup<'_> {
    /// The draw index of tensor `i`'s element 0.
    pub fn draw(&self, table: &SegmentTable, i: usize) -> u64 {
        match self.draws {
            Some(d) => d[i],
            None => table.offsets()[i] as u64,
        }
    }

    /// Checks the group's addresses against `table` before anything is launched: one of each per
    /// tensor, non-null and aligned to the element type for every tensor the step touches.
    pub fn check(&self, table: &SegmentTable, stepped: &[bool]) -> Result<(), CudaError> {
        if stepped.len() != table.len() {
            return Err(CudaError::invalid(format!("stepped has {} flags for {} tensors", stepped.len(), table.len())));
        }
        if let Some(d) = self.draws {
            if d.len() != table.len() {
                return Err(CudaError::invalid(format!("{} draw offsets for {} tensors", d.len(), table.len())));
            }
        }
        for (what, addrs) in [("parameter", self.params), ("gradient", self.grads)] {
            if addrs.len() != table.len() {
                return Err(CudaError::invalid(format!(
                    "{} {what} addresses for {} tensors",
                    addrs.len(),
                    table.len()
                )));
            }
            let align = self.dtype.bytes() as u64;
            for (i, &addr) in addrs.iter().enumerate() {
                if !stepped[i] || table.numels()[i] == 0 {
                    continue;
                }
                if addr == 0 {
                    return Err(CudaError::invalid(format!("null device address for the {what}s of tensor {i}")));
                }
                if !addr.is_multiple_of(align) {
                    return Err(CudaError::invalid(format!(
                        "device address {addr:#x} of the {what}s of tensor {i} is not aligned to {align} bytes"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Tensors per elementwise launch (cuda/common.cuh `LIST_TENSORS`).
pub const LIST_TENSORS: usize = 84;

/// cuda/common.cuh's `TensorList`: up to [`LIST_TENSORS`] tensors that share a step count,
/// passed to an elementwise kernel by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorList {
    /// Address of each tensor's parameters (element 0).
    pub param: [u64; LIST_TENSORS],
    /// Address of each tensor's gradients (element 0).
    pub grad: [u64; LIST_TENSORS],
    /// The index each tensor's element 0 draws its random bits at (the kernels walk these).
    pub start: [u64; LIST_TENSORS],
    /// Index of each tensor's element 0 in the optimizer's flat state.
    pub state: [u64; LIST_TENSORS],
    /// Elements of each tensor (>= 1).
    pub numel: [u64; LIST_TENSORS],
    /// Warp tiles of the tensors up to and including each.
    pub tile_end: [u32; LIST_TENSORS],
    /// Tensors in the list.
    pub count: u32,
    /// 0.
    pub pad: u32,
}

/// 256-element warp tiles of the index space that meet `start..end` (`start < end`).
pub fn tiles_of(start: u64, end: u64) -> u64 {
    (end - 1) / 256 - start / 256 + 1
}

/// The lists of one step: the runs (one per stepped tensor with elements, in tensor order)
/// grouped by step count in order of first appearance, each group cut into lists of at most
/// [`LIST_TENSORS`] tensors. Returns each list with its step count.
pub fn tensor_lists(
    group: &DeviceGroup<'_>,
    table: &SegmentTable,
    runs: &[Run],
) -> Result<Vec<(TensorList, u64)>, CudaError> {
    Ok(lists_of_runs(group, table, runs, usize::MAX)?.into_iter().map(|(list, step, _)| (list, step)).collect())
}

/// [`tensor_lists`], with each list's tensor indices, and a list also cut where a tensor's index
/// lies `span` or more past the list's first (a counted step's [`ListCounters`] hold 16-bit offsets).
fn lists_of_runs(
    group: &DeviceGroup<'_>,
    table: &SegmentTable,
    runs: &[Run],
    span: usize,
) -> Result<Vec<(TensorList, u64, Vec<usize>)>, CudaError> {
    let mut order: Vec<u64> = Vec::new();
    for run in runs {
        if !order.contains(&run.step) {
            order.push(run.step);
        }
    }
    let empty = TensorList {
        param: [0; LIST_TENSORS],
        grad: [0; LIST_TENSORS],
        start: [0; LIST_TENSORS],
        state: [0; LIST_TENSORS],
        numel: [0; LIST_TENSORS],
        tile_end: [0; LIST_TENSORS],
        count: 0,
        pad: 0,
    };
    let mut lists = Vec::new();
    for step in order {
        let mut list = empty;
        let mut tensors: Vec<usize> = Vec::new();
        let mut tiles = 0u64;
        for run in runs.iter().filter(|r| r.step == step) {
            if list.count as usize == LIST_TENSORS || tensors.first().is_some_and(|&f| run.tensor - f >= span) {
                lists.push((std::mem::replace(&mut list, empty), step, std::mem::take(&mut tensors)));
                tiles = 0;
            }
            let j = list.count as usize;
            let numel = (run.end - run.start) as u64;
            let start = group.draw(table, run.tensor) + (run.start - table.offsets()[run.tensor]) as u64;
            tiles += tiles_of(start, start + numel);
            list.param[j] = group.params[run.tensor];
            list.grad[j] = group.grads[run.tensor];
            list.start[j] = start;
            list.state[j] = run.start as u64;
            list.numel[j] = numel;
            list.tile_end[j] = u32::try_from(tiles).map_err(|_| {
                CudaError::invalid(format!("tensor {} is too large for one launch ({tiles} warp tiles)", run.tensor))
            })?;
            list.count += 1;
            tensors.push(run.tensor);
        }
        if list.count > 0 {
            lists.push((list, step, tensors));
        }
    }
    Ok(lists)
}

/// cuda/common.cuh's `ListCounters`: where the step counts of a list's tensors are in a counted
/// step's device vector of counts (tensor `j` at `base + delta[j]`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ListCounters {
    /// Group index of the list's first tensor.
    pub base: u32,
    /// Entries of `delta` in use.
    pub count: u32,
    /// Each tensor's group index minus `base`.
    pub delta: [u16; LIST_TENSORS],
}

impl ListCounters {
    /// The counters of `tensors` (ascending group indices spanning less than 2^16).
    fn of(tensors: &[usize]) -> Result<ListCounters, CudaError> {
        let base = tensors.first().copied().unwrap_or(0);
        let mut c = ListCounters {
            base: u32::try_from(base).map_err(|_| CudaError::invalid(format!("tensor index {base} exceeds 2^32")))?,
            count: tensors.len() as u32,
            delta: [0; LIST_TENSORS],
        };
        for (j, &t) in tensors.iter().enumerate() {
            c.delta[j] = u16::try_from(t - base).expect("lists are cut before offsets leave 16 bits");
        }
        Ok(c)
    }

    /// The counters of every stepped tensor (with elements or not), in chunks a launch of
    /// `advance_step_counters` takes.
    pub(crate) fn all_stepped(stepped: &[bool]) -> Result<Vec<ListCounters>, CudaError> {
        let mut chunks = Vec::new();
        let mut chunk: Vec<usize> = Vec::new();
        for (i, _) in stepped.iter().enumerate().filter(|(_, &on)| on) {
            if chunk.len() == LIST_TENSORS || chunk.first().is_some_and(|&f| i - f > u16::MAX as usize) {
                chunks.push(ListCounters::of(&std::mem::take(&mut chunk))?);
            }
            chunk.push(i);
        }
        if !chunk.is_empty() {
            chunks.push(ListCounters::of(&chunk)?);
        }
        Ok(chunks)
    }
}

/// cuda/common.cuh's `LrSource`: a counted step's learning rate, a 0-dim tensor on the device
/// (what an LR scheduler updates in place) or a value fixed at the call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSource {
    /// The learning rate when `addr` is 0.
    pub value: f64,
    /// Device address of the learning rate tensor, or 0.
    pub addr: u64,
    /// 1 when the tensor is float64, 0 for float32.
    pub is_f64: u32,
    /// 0.
    pub pad: u32,
}

/// Where a counted step (torch's `capturable=True`) finds what changes from step to step: every
/// tensor's step count in a device vector of f64 (one per tensor of the table, read by the
/// kernels and advanced by the step's last launch) and the learning rate. A counted step's
/// launches have the same arguments at every step, so a CUDA graph can capture and replay it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceCounts {
    /// Device address of the step counts (f64, `table.len()` of them).
    pub counters: u64,
    /// The learning rate (its `value` replaces the hyperparameters' `lr`).
    pub lr: LrSource,
}

impl LrSource {
    /// A learning rate fixed at the call.
    pub fn value(lr: f64) -> LrSource {
        LrSource { value: lr, addr: 0, is_f64: 0, pad: 0 }
    }
}

/// Where a step's counts are: host counters the host advances, or a counted step's (see
/// [`DeviceCounts`]).
#[derive(Debug)]
pub enum StepCounts<'a> {
    /// One f64 per tensor of the table in host memory, read and advanced by the host.
    Host(&'a mut [f64]),
    /// A counted step's counts and learning rate on the device.
    Device(DeviceCounts),
}

/// Adds 1 to the device counts of the tensors with `stepped[i]`, in stream order: the last
/// launch of a counted step.
///
/// # Safety
/// `counters` must be a live device vector of `stepped.len()` f64 on `ordinal`.
pub(crate) unsafe fn advance_counters(
    ordinal: i32,
    stream: usize,
    counters: u64,
    stepped: &[bool],
) -> Result<(), CudaError> {
    for where_ in ListCounters::all_stepped(stepped)? {
        let mut args = Args::new().push(counters).push(where_);
        launch_grid(ordinal, stream, "step_counters.cu", "advance_step_counters", (1, 1, 1), &mut args.pointers())?;
    }
    Ok(())
}

impl DeviceCounts {
    /// A learning rate tensor (`is_f64`: float64, else float32) at device address `addr`, or
    /// `value` when `addr` is 0.
    pub fn new(counters: u64, value: f64, addr: u64, is_f64: bool) -> DeviceCounts {
        DeviceCounts { counters, lr: LrSource { value, addr, is_f64: is_f64 as u32, pad: 0 } }
    }

    pub(crate) fn check(&self, table: &SegmentTable) -> Result<(), CudaError> {
        if table.len() > 0 && (self.counters == 0 || !self.counters.is_multiple_of(8)) {
            return Err(CudaError::invalid(format!(
                "the step counts' device address {:#x} is null or not aligned to 8 bytes",
                self.counters
            )));
        }
        let align = if self.lr.is_f64 != 0 { 8 } else { 4 };
        if self.lr.addr != 0 && !self.lr.addr.is_multiple_of(align) {
            return Err(CudaError::invalid(format!(
                "the learning rate's device address {:#x} is not aligned to {align} bytes",
                self.lr.addr
            )));
        }
        Ok(())
    }
}

/// cuda/sgd.cu's `SgdCountedHyper`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct SgdCountedHyper {
    lr: LrSource,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: u32,
    maximize: u32,
}

/// cuda/adam.cu's `AdamCountedHyper`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AdamCountedHyper {
    lr: LrSource,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    decoupled_weight_decay: u32,
    maximize: u32,
    amsgrad: u32,
    pad: u32,
}

/// A counted step of an elementwise rule: one launch of `{rule}_counted_{f32|bf16}` per list of
/// the stepped tensors with elements (in tensor order, whatever their counts), with the
/// argument list (list, the rule's `state` buffers, `hyper`, counters, [`ListCounters`], seed,
/// stream, rounding); then `advance_step_counters` over every stepped tensor.
///
/// # Safety
/// As for [`launch_lists`], with `H` the kernel's counted-hyperparameter struct and
/// `counts.counters` a live device vector of `table.len()` f64.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_counted_lists<H: Copy>(
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    stepped: &[bool],
    counts: DeviceCounts,
    file: &'static str,
    rule: &str,
    state: &[u64],
    hyper: H,
    rounding: Rounding,
) -> Result<(), CudaError> {
    group.check(table, stepped)?;
    counts.check(table)?;
    let name = format!("{rule}_counted_{}", group.dtype.suffix());
    let cap = sm_count(group.ordinal)?;
    let runs: Vec<Run> = (0..table.len())
        .filter(|&i| stepped[i] && table.numels()[i] > 0)
        .map(|i| {
            let r = table.range(i);
            Run { tensor: i, start: r.start, end: r.end, step: 0 }
        })
        .collect();
    let lists = lists_of_runs(&group, table, &runs, 1 << 16)?;
    let mut launches = Vec::with_capacity(lists.len());
    for (list, _, tensors) in &lists {
        launches.push((list, ListCounters::of(tensors)?));
    }
    let (seed, stream_id, mode) = rounding_args(rounding);
    for (list, where_) in launches {
        let tiles = list.tile_end[list.count as usize - 1] as u64;
        let args = state.iter().fold(Args::new().push(*list), |a, &buf| a.push(buf));
        let mut args = args.push(hyper).push(counts.counters).push(where_).push(seed).push(stream_id).push(mode);
        let grid = grid_for_tiles(tiles, cap, BLOCKS_PER_SM);
        launch_grid(group.ordinal, group.stream, file, &name, (grid, 1, 1), &mut args.pointers())?;
    }
    advance_counters(group.ordinal, group.stream, counts.counters, stepped)
}

/// One launch of `{rule}_{f32|bf16}` of `file` per tensor list (see [`tensor_lists`]), with the
/// elementwise kernels' argument list: the list, the rule's `state` buffers, the list's
/// constants, seed, step, stream, rounding mode.
///
/// # Safety
/// The kernel's parameter list must be exactly that, with `C` its constants struct; every state
/// buffer must be a live device allocation holding the table's elements, and every stepped
/// tensor's addresses live device memory of its elements.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_lists<C: Copy>(
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    stepped: &[bool],
    steps: &mut [f64],
    file: &'static str,
    rule: &str,
    state: &[u64],
    consts: impl Fn(u64) -> C,
    rounding: Rounding,
) -> Result<(), CudaError> {
    group.check(table, stepped)?;
    let name = format!("{rule}_{}", group.dtype.suffix());
    // Everything that can fail is done before the step counts advance.
    let cap = sm_count(group.ordinal)?;
    let mut probe = steps.to_vec();
    let lists = tensor_lists(&group, table, &table.plan_step(stepped, &mut probe)?)?;
    steps.copy_from_slice(&probe);
    for (list, step) in &lists {
        let tiles = list.tile_end[list.count as usize - 1] as u64;
        let mut args = list_args(list, state, consts(*step), rounding, *step);
        let grid = grid_for_tiles(tiles, cap, BLOCKS_PER_SM);
        launch_grid(group.ordinal, group.stream, file, &name, (grid, 1, 1), &mut args.pointers())?;
    }
    Ok(())
}

/// The argument list of one list's launch (see [`launch_lists`]).
fn list_args<C: Copy>(list: &TensorList, state: &[u64], consts: C, rounding: Rounding, step: u64) -> Args {
    let (seed, stream_id, mode) = rounding_args(rounding);
    let args = state.iter().fold(Args::new().push(*list), |a, &buf| a.push(buf));
    args.push(consts).push(seed).push(step).push(stream_id).push(mode)
}

/// What an SGD step checks before anything runs: the hyperparameters and a momentum buffer.
fn check_sgd(hp: &SgdHyper, table: &SegmentTable, momentum_buffer: u64) -> Result<(), CudaError> {
    hp.validate()?;
    if hp.momentum != 0.0 && momentum_buffer == 0 && table.total() > 0 {
        return Err(CudaError::invalid("null device pointer for momentum_buffer"));
    }
    Ok(())
}

/// What an Adam step checks before anything runs: the hyperparameters and the state buffers
/// (`[exp_avg, exp_avg_sq, max_exp_avg_sq]`, the last with amsgrad only).
fn check_adam(hp: &AdamHyper, table: &SegmentTable, state: [u64; 3]) -> Result<(), CudaError> {
    hp.validate()?;
    let [exp_avg, exp_avg_sq, max_exp_avg_sq] = state;
    if table.total() > 0 && (exp_avg == 0 || exp_avg_sq == 0 || (hp.amsgrad && max_exp_avg_sq == 0)) {
        return Err(CudaError::invalid("null device pointer for exp_avg, exp_avg_sq or max_exp_avg_sq"));
    }
    Ok(())
}

/// One SGD step on the device: one launch per list of tensors (see [`tensor_lists`]).
pub fn sgd_step(
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    stepped: &[bool],
    steps: &mut [f64],
    momentum_buffer: u64,
    hp: &SgdHyper,
    rounding: Rounding,
) -> Result<(), CudaError> {
    check_sgd(hp, table, momentum_buffer)?;
    let consts = |step| SgdConsts::new(hp, step);
    // SAFETY: cuda/sgd.cu's sgd_f32/sgd_bf16 take (list, momentum_buffer, SgdConsts, seed, step,
    // stream, rounding); the caller owns the buffers.
    unsafe { launch_lists(group, table, stepped, steps, "sgd.cu", "sgd", &[momentum_buffer], consts, rounding) }
}

/// One Adam/AdamW step on the device, one launch per list of tensors (see [`tensor_lists`]);
/// `max_exp_avg_sq` is used (and required) with amsgrad.
#[allow(clippy::too_many_arguments)]
pub fn adam_step(
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    stepped: &[bool],
    steps: &mut [f64],
    exp_avg: u64,
    exp_avg_sq: u64,
    max_exp_avg_sq: u64,
    hp: &AdamHyper,
    rounding: Rounding,
) -> Result<(), CudaError> {
    check_adam(hp, table, [exp_avg, exp_avg_sq, max_exp_avg_sq])?;
    let consts = |step| AdamConsts::new(hp, step);
    let state = [exp_avg, exp_avg_sq, max_exp_avg_sq];
    // SAFETY: cuda/adam.cu's adam_f32/adam_bf16 take (list, exp_avg, exp_avg_sq, max_exp_avg_sq,
    // AdamConsts, seed, step, stream, rounding); the caller owns the buffers.
    unsafe { launch_lists(group, table, stepped, steps, "adam.cu", "adam", &state, consts, rounding) }
}

/// A counted SGD step (torch's `capturable=True`): as [`sgd_step`], with each tensor's step count
/// and the learning rate read on the device (see [`DeviceCounts`]); `hp.lr` is ignored. The
/// host reads nothing from the device, so the counts are not checked (they are whole numbers
/// below 2^53 when the torch layer wrote them).
pub fn sgd_step_counted(
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    stepped: &[bool],
    counts: DeviceCounts,
    momentum_buffer: u64,
    hp: &SgdHyper,
    rounding: Rounding,
) -> Result<(), CudaError> {
    check_sgd(&SgdHyper { lr: 0.0, ..*hp }, table, momentum_buffer)?;
    let hyper = SgdCountedHyper {
        lr: counts.lr,
        momentum: hp.momentum,
        dampening: hp.dampening,
        weight_decay: hp.weight_decay,
        nesterov: hp.nesterov as u32,
        maximize: hp.maximize as u32,
    };
    // SAFETY: cuda/sgd.cu's sgd_counted_f32/bf16 take (list, momentum_buffer, SgdCountedHyper,
    // counters, ListCounters, seed, stream, rounding); the caller owns the buffers.
    unsafe { launch_counted_lists(group, table, stepped, counts, "sgd.cu", "sgd", &[momentum_buffer], hyper, rounding) }
}

/// A counted Adam/AdamW step (torch's `capturable=True`): as [`adam_step`], with each tensor's
/// step count and the learning rate read on the device and the bias corrections computed there
/// (see [`DeviceCounts`]); `hp.lr` is ignored.
#[allow(clippy::too_many_arguments)]
pub fn adam_step_counted(
    group: DeviceGroup<'_>,
    table: &SegmentTable,
    stepped: &[bool],
    counts: DeviceCounts,
    exp_avg: u64,
    exp_avg_sq: u64,
    max_exp_avg_sq: u64,
    hp: &AdamHyper,
    rounding: Rounding,
) -> Result<(), CudaError> {
    check_adam(&AdamHyper { lr: 0.0, ..*hp }, table, [exp_avg, exp_avg_sq, max_exp_avg_sq])?;
    let hyper = AdamCountedHyper {
        lr: counts.lr,
        beta1: hp.beta1,
        beta2: hp.beta2,
        eps: hp.eps,
        weight_decay: hp.weight_decay,
        decoupled_weight_decay: hp.decoupled_weight_decay as u32,
        maximize: hp.maximize as u32,
        amsgrad: hp.amsgrad as u32,
        pad: 0,
    };
    let state = [exp_avg, exp_avg_sq, max_exp_avg_sq];
    // SAFETY: cuda/adam.cu's adam_counted_f32/bf16 take (list, exp_avg, exp_avg_sq,
    // max_exp_avg_sq, AdamCountedHyper, counters, ListCounters, seed, stream, rounding).
    unsafe { launch_counted_lists(group, table, stepped, counts, "adam.cu", "adam", &state, hyper, rounding) }
}

/// Rounds `n` floats at device address `src` to bf16 at `dst` on the device.
pub fn round_to_bf16(
    ordinal: i32,
    stream: usize,
    src: u64,
    dst: u64,
    n: u64,
    stochastic: Option<(u64, u64, u32)>,
) -> Result<(), CudaError> {
    let args = Args::new().push(src).push(dst).push(n);
    match stochastic {
        Some((seed, step, sid)) => {
            let mut args = args.push(seed).push(step).push(sid);
            // SAFETY: matches cuda/stochastic_round.cu's stochastic_round_f32_to_bf16.
            unsafe {
                launch(ordinal, stream, "stochastic_round.cu", "stochastic_round_f32_to_bf16", n, &mut args.pointers())
            }
        }
        None => {
            let mut args = args;
            // SAFETY: matches round_nearest_f32_to_bf16.
            unsafe {
                launch(ordinal, stream, "stochastic_round.cu", "round_nearest_f32_to_bf16", n, &mut args.pointers())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The structs passed by value must have the layouts the kernels assert (cuda/*.cu static_asserts).
    #[test]
    fn constant_structs_match_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<SgdConsts>(), 32);
        assert_eq!(std::mem::align_of::<SgdConsts>(), 4);
        assert_eq!(std::mem::size_of::<AdamConsts>(), 44);
        assert_eq!(std::mem::align_of::<AdamConsts>(), 4);
        assert_eq!(std::mem::size_of::<TensorList>(), 3704);
        assert_eq!(std::mem::align_of::<TensorList>(), 8);
        assert_eq!(std::mem::offset_of!(TensorList, state), 2016);
        assert_eq!(std::mem::offset_of!(TensorList, tile_end), 3360);
        assert_eq!(std::mem::offset_of!(TensorList, count), 3696);
        assert_eq!((std::mem::size_of::<ListCounters>(), std::mem::align_of::<ListCounters>()), (176, 4));
        assert_eq!((std::mem::size_of::<LrSource>(), std::mem::align_of::<LrSource>()), (24, 8));
        assert_eq!(std::mem::size_of::<SgdCountedHyper>(), 56);
        assert_eq!(std::mem::size_of::<AdamCountedHyper>(), 72);
        assert_eq!(std::mem::offset_of!(AdamCountedHyper, decoupled_weight_decay), 56);
        for (file, src) in SOURCES {
            if *file == "sgd.cu" {
                assert!(src.contains("sizeof(SgdConsts) == 32"));
            }
            if *file == "adam.cu" {
                assert!(src.contains("sizeof(AdamConsts) == 44"));
                assert!(src.contains("sizeof(AdamCountedHyper) == 72"));
            }
            if *file == "sgd.cu" {
                assert!(src.contains("sizeof(SgdCountedHyper) == 56"));
            }
        }
        let common = crate::kernels::COMMON_HEADER;
        assert!(common.contains("sizeof(TensorList) == 3704 && alignof(TensorList) == 8"));
        assert!(common.contains("sizeof(ListCounters) == 176 && alignof(ListCounters) == 4"));
        assert!(common.contains("sizeof(LrSource) == 24 && alignof(LrSource) == 8"));
        assert!(common.contains(&format!("#define LIST_TENSORS {LIST_TENSORS}u")));
    }

    #[test]
    fn argument_slots_hold_each_value_aligned() {
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Twelve {
            a: u32,
            b: f32,
            c: u32,
        }
        let mut args = Args::new().push(7u64).push(1.5f32).push(Twelve { a: 1, b: 2.0, c: 3 }).push(0u32);
        assert_eq!(args.len(), 4);
        let ptrs = args.pointers();
        assert!(ptrs.iter().all(|p| (*p as usize).is_multiple_of(8)));
        // SAFETY: the pointers point at the slots written by push, still owned by `args`.
        unsafe {
            assert_eq!(*(ptrs[0] as *const u64), 7);
            assert_eq!(*(ptrs[1] as *const f32), 1.5);
            let t = *(ptrs[2] as *const Twelve);
            assert_eq!((t.a, t.b, t.c), (1, 2.0, 3));
        }
    }

    fn group<'a>(params: &'a [u64], grads: &'a [u64]) -> DeviceGroup<'a> {
        DeviceGroup { ordinal: 0, stream: 0, dtype: DeviceDtype::Bf16, params, grads, draws: None }
    }

    #[test]
    fn list_arguments_follow_the_elementwise_kernels_parameter_list() {
        let (params, grads) = ([0x1000, 0x5000], [0x2000, 0x6000]);
        let runs = [Run { tensor: 0, start: 0, end: 300, step: 3 }, Run { tensor: 1, start: 300, end: 301, step: 3 }];
        let table = SegmentTable::packed(&[300, 1]).unwrap();
        let lists = tensor_lists(&group(&params, &grads), &table, &runs).unwrap();
        assert_eq!(lists.len(), 1);
        let (list, step) = lists[0];
        assert_eq!(step, 3);
        let consts = SgdConsts::new(&SgdHyper::default(), 3);
        let rounding = Rounding::Stochastic { seed: 9, stream: 4 };
        let mut args = list_args(&list, &[0x3000, 0x4000], consts, rounding, step);
        assert_eq!(args.len(), 8);
        let ptrs = args.pointers();
        // SAFETY: the pointers point at the slots written by push, still owned by `args`.
        unsafe {
            let l = &*(ptrs[0] as *const TensorList);
            assert_eq!(
                (l.count, l.param[..2].to_vec(), l.grad[..2].to_vec()),
                (2, vec![0x1000, 0x5000], vec![0x2000, 0x6000])
            );
            assert_eq!((l.start[..2].to_vec(), l.numel[..2].to_vec()), (vec![0, 300], vec![300, 1]));
            assert_eq!(l.state[..2].to_vec(), vec![0, 300]);
            // Tensor 0 covers tiles 0 and 1, tensor 1 (index 300) tile 1 again.
            assert_eq!(l.tile_end[..2].to_vec(), vec![2, 3]);
            let u64_at = |i: usize| *(ptrs[i] as *const u64);
            assert_eq!([u64_at(1), u64_at(2)], [0x3000, 0x4000]);
            assert_eq!(*(ptrs[3] as *const SgdConsts), consts);
            assert_eq!([u64_at(4), u64_at(5)], [9, 3]);
            assert_eq!([*(ptrs[6] as *const u32), *(ptrs[7] as *const u32)], [4, 1]);
        }
    }

    #[test]
    fn lists_group_by_step_and_hold_at_most_84_tensors() {
        let n = 200;
        let (params, grads): (Vec<u64>, Vec<u64>) = (0..n as u64).map(|i| (0x10000 + 64 * i, 0x90000 + 64 * i)).unzip();
        // Tensor i holds 10 elements; tensors 5 and 150 take their first step, the others their 8th.
        let runs: Vec<Run> = (0..n)
            .map(|i| Run { tensor: i, start: 10 * i, end: 10 * i + 10, step: if i == 5 || i == 150 { 1 } else { 8 } })
            .collect();
        let table = SegmentTable::packed(&[10; 200]).unwrap();
        let lists = tensor_lists(&group(&params, &grads), &table, &runs).unwrap();
        let shape: Vec<(u32, u64)> = lists.iter().map(|(l, s)| (l.count, *s)).collect();
        assert_eq!(shape, vec![(84, 8), (84, 8), (30, 8), (2, 1)]);
        // Every tensor appears once, in order within its step count.
        let firsts: Vec<u64> = lists.iter().flat_map(|(l, _)| l.start[..l.count as usize].to_vec()).collect();
        let mut expected: Vec<u64> = (0..n as u64).filter(|&i| i != 5 && i != 150).map(|i| 10 * i).collect();
        expected.extend([50, 1500]);
        assert_eq!(firsts, expected);
        assert_eq!(lists[3].0.param[..2].to_vec(), vec![0x10000 + 64 * 5, 0x10000 + 64 * 150]);
        assert_eq!(tiles_of(0, 256), 1);
        assert_eq!(tiles_of(255, 257), 2);
        assert_eq!(tiles_of(256, 513), 2);
    }

    #[test]
    fn shards_walk_their_draw_indices_and_index_the_state_by_the_table() {
        // Two shards: 40 elements drawing at 1000.., 7 elements drawing at 5.. (table offsets 0, 40).
        let (params, grads, draws) = ([0x1000, 0x2000], [0x3000, 0x4000], [1000u64, 5]);
        let g = DeviceGroup { draws: Some(&draws), ..group(&params, &grads) };
        let table = SegmentTable::packed(&[40, 7]).unwrap();
        let runs = [Run { tensor: 0, start: 0, end: 40, step: 2 }, Run { tensor: 1, start: 40, end: 47, step: 2 }];
        let (l, _) = tensor_lists(&g, &table, &runs).unwrap()[0];
        assert_eq!((l.start[0], l.state[0], l.numel[0]), (1000, 0, 40));
        assert_eq!((l.start[1], l.state[1], l.numel[1]), (5, 40, 7));
        // 1000..1040 meets tiles 3 and 4 (768..1024, 1024..1280); 5..12 meets tile 0.
        assert_eq!(l.tile_end[..2].to_vec(), vec![2, 3]);
        let err = DeviceGroup { draws: Some(&draws[..1]), ..g }.check(&table, &[true, true]).unwrap_err();
        assert_eq!(err.to_string(), "1 draw offsets for 2 tensors");
    }

    #[test]
    fn device_groups_are_checked_before_anything_runs() {
        let table = SegmentTable::packed(&[4, 0, 3]).unwrap();
        let (params, grads) = ([0x1000, 0, 0x2001], [0x3000, 0, 0]);
        let g = group(&params, &grads);
        // The empty tensor needs no addresses; the unaligned bf16 parameter of tensor 2 is caught.
        let err = g.check(&table, &[true, true, true]).unwrap_err().to_string();
        assert_eq!(err, "device address 0x2001 of the parameters of tensor 2 is not aligned to 2 bytes");
        assert!(g.check(&table, &[true, true, false]).is_ok());
        let (params, grads) = ([0x1000, 0, 0x2000], [0x3000, 0, 0]);
        let err = group(&params, &grads).check(&table, &[true, true, true]).unwrap_err().to_string();
        assert_eq!(err, "null device address for the gradients of tensor 2");
        let err = group(&params[..2], &grads).check(&table, &[true; 3]).unwrap_err().to_string();
        assert_eq!(err, "2 parameter addresses for 3 tensors");
    }

    #[test]
    fn rounding_arguments() {
        assert_eq!(rounding_args(Rounding::Nearest), (0, 0, 0));
        assert_eq!(rounding_args(Rounding::Stochastic { seed: 7, stream: 2 }), (7, 2, 1));
    }
}
