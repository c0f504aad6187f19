//! Launching the kernels on torch-owned memory and torch's current stream.
//!
//! The caller (the Python layer) passes raw device pointers (`tensor.data_ptr()`), the device
//! ordinal and the raw `cudaStream_t` of `torch.cuda.current_stream()`. Launches are
//! asynchronous on that stream: no copies, no host synchronisation, so a step can be captured in a
//! CUDA graph. Per-run constants are computed on the host by the core (the same `#[repr(C)]`
//! structs the CPU kernels use) and passed by value.
//!
//! Modules are compiled once per device architecture (CUBIN for the exact `sm_XX`) and cached.

use crate::compile::{compile_source, CompileTarget, CudaError};
use crate::kernels::{with_header, SOURCES};
use crate::launch::{grid_for, BLOCK};
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
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            DeviceDtype::F32 => "f32",
            DeviceDtype::Bf16 => "bf16",
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
    let (func, sm_count) = function(ordinal, file, name)?;
    let grid = grid_for(n, sm_count, BLOCKS_PER_SM);
    if grid == 0 {
        return Ok(());
    }
    result::launch_kernel(func, (grid, 1, 1), (BLOCK, 1, 1), 0, stream as sys::CUstream, args)
        .map_err(|e| driver_err(&format!("launching {name}"), e))
}

/// The device's multiprocessor count (compiling nothing).
pub(crate) fn sm_count(ordinal: i32) -> Result<u32, CudaError> {
    let dev = ensure_context(ordinal)?;
    // SAFETY: a plain attribute query of a valid device.
    let n = unsafe {
        result::device::get_attribute(dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
    }
    .map_err(|e| driver_err("cuDeviceGetAttribute", e))?;
    Ok(n.max(1) as u32)
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
    let (func, _) = function(ordinal, file, name)?;
    result::launch_kernel(func, grid, (BLOCK, 1, 1), 0, stream as sys::CUstream, args)
        .map_err(|e| driver_err(&format!("launching {name}"), e))
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

/// Device pointers of a param group's flat buffers.
#[derive(Debug, Clone, Copy)]
pub struct DeviceGroup {
    /// Device ordinal.
    pub ordinal: i32,
    /// Raw `cudaStream_t` (0: the legacy default stream).
    pub stream: usize,
    /// Parameter and gradient storage.
    pub dtype: DeviceDtype,
    /// Parameters.
    pub param: u64,
    /// Gradients.
    pub grad: u64,
}

/// One launch of `{rule}_{f32|bf16}` of `file` per run of tensors sharing a step count (`steps`
/// live on the host), with the elementwise kernels' argument list: param, grad, the rule's
/// `state` buffers, start, end, the run's constants, seed, step, stream, rounding mode.
///
/// # Safety
/// The kernel's parameter list must be exactly that, with `C` its constants struct, and every
/// buffer must be a live device allocation holding the table's elements.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_per_run<C: Copy>(
    group: DeviceGroup,
    table: &SegmentTable,
    stepped: &[bool],
    steps: &mut [f64],
    file: &'static str,
    rule: &str,
    state: &[u64],
    consts: impl Fn(u64) -> C,
    rounding: Rounding,
) -> Result<(), CudaError> {
    let runs = table.plan_step(stepped, steps)?;
    let name = format!("{rule}_{}", group.dtype.suffix());
    for run in runs {
        let mut args = run_args(&group, &run, state, consts(run.step), rounding);
        launch(group.ordinal, group.stream, file, &name, run.len() as u64, &mut args.pointers())?;
    }
    Ok(())
}

/// The argument list of one run's launch (see [`launch_per_run`]).
fn run_args<C: Copy>(group: &DeviceGroup, run: &Run, state: &[u64], consts: C, rounding: Rounding) -> Args {
    let (seed, stream_id, mode) = rounding_args(rounding);
    let args = state.iter().fold(Args::new().push(group.param).push(group.grad), |a, &buf| a.push(buf));
    let args = args.push(run.start as u64).push(run.end as u64).push(consts);
    args.push(seed).push(run.step).push(stream_id).push(mode)
}

/// One SGD step on the device (see [`launch_per_run`]).
pub fn sgd_step(
    group: DeviceGroup,
    table: &SegmentTable,
    stepped: &[bool],
    steps: &mut [f64],
    momentum_buffer: u64,
    hp: &SgdHyper,
    rounding: Rounding,
) -> Result<(), CudaError> {
    hp.validate()?;
    let consts = |step| SgdConsts::new(hp, step);
    // SAFETY: cuda/sgd.cu's sgd_f32/sgd_bf16 take (param, grad, momentum_buffer, start, end,
    // SgdConsts, seed, step, stream, rounding); the caller owns the buffers.
    unsafe { launch_per_run(group, table, stepped, steps, "sgd.cu", "sgd", &[momentum_buffer], consts, rounding) }
}

/// One Adam/AdamW step on the device (see [`launch_per_run`]).
#[allow(clippy::too_many_arguments)]
pub fn adam_step(
    group: DeviceGroup,
    table: &SegmentTable,
    stepped: &[bool],
    steps: &mut [f64],
    exp_avg: u64,
    exp_avg_sq: u64,
    hp: &AdamHyper,
    rounding: Rounding,
) -> Result<(), CudaError> {
    hp.validate()?;
    let consts = |step| AdamConsts::new(hp, step);
    // SAFETY: cuda/adam.cu's adam_f32/adam_bf16 take (param, grad, exp_avg, exp_avg_sq, start, end,
    // AdamConsts, seed, step, stream, rounding); the caller owns the buffers.
    unsafe { launch_per_run(group, table, stepped, steps, "adam.cu", "adam", &[exp_avg, exp_avg_sq], consts, rounding) }
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
        assert_eq!(std::mem::size_of::<AdamConsts>(), 40);
        assert_eq!(std::mem::align_of::<AdamConsts>(), 4);
        for (file, src) in SOURCES {
            if *file == "sgd.cu" {
                assert!(src.contains("sizeof(SgdConsts) == 32"));
            }
            if *file == "adam.cu" {
                assert!(src.contains("sizeof(AdamConsts) == 40"));
            }
        }
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

    #[test]
    fn run_arguments_follow_the_elementwise_kernels_parameter_list() {
        let group = DeviceGroup { ordinal: 0, stream: 0, param: 0x1000, grad: 0x2000, dtype: DeviceDtype::Bf16 };
        let run = Run { start: 256, end: 1000, step: 3 };
        let consts = SgdConsts::new(&SgdHyper::default(), 3);
        let rounding = Rounding::Stochastic { seed: 9, stream: 4 };
        let mut args = run_args(&group, &run, &[0x3000, 0x4000], consts, rounding);
        assert_eq!(args.len(), 11);
        let ptrs = args.pointers();
        // SAFETY: the pointers point at the slots written by push, still owned by `args`.
        unsafe {
            let u64_at = |i: usize| *(ptrs[i] as *const u64);
            assert_eq!([u64_at(0), u64_at(1), u64_at(2), u64_at(3)], [0x1000, 0x2000, 0x3000, 0x4000]);
            assert_eq!([u64_at(4), u64_at(5)], [256, 1000]);
            assert_eq!(*(ptrs[6] as *const SgdConsts), consts);
            assert_eq!([u64_at(7), u64_at(8)], [9, 3]);
            assert_eq!([*(ptrs[9] as *const u32), *(ptrs[10] as *const u32)], [4, 1]);
        }
    }

    #[test]
    fn rounding_arguments() {
        assert_eq!(rounding_args(Rounding::Nearest), (0, 0, 0));
        assert_eq!(rounding_args(Rounding::Stochastic { seed: 7, stream: 2 }), (7, 2, 1));
    }
}
