//! What the host side asks of a CUDA device, behind one trait: the driver API in production, or
//! another implementation installed by a test (the CPU emulation of the kernels in
//! `rust/cuda-emu` runs every step of this crate without a GPU).
//!
//! Everything that launches, allocates, copies or multiplies goes through [`backend()`], so the
//! host logic (tensor lists, segment tables, launch shapes, workspaces) is the same code whoever
//! executes the kernels.

use crate::compile::CudaError;
use crate::cublas::{Cublas, Gemm, Inputs};
use crate::dispatch::{driver_err, ensure_context, function};
use cudarc::driver::{result, sys};
use std::ffi::c_void;
use std::sync::OnceLock;

/// A device that runs this crate's kernels.
pub trait Backend: Send + Sync {
    /// Multiprocessors of device `ordinal` (launch shapes are capped by it).
    fn sm_count(&self, ordinal: i32) -> Result<u32, CudaError>;

    /// Launches kernel `name` of kernel file `file` on `stream` with `grid` blocks of `block`
    /// threads.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list, and every address in them must be memory
    /// of this device large enough for the launch.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch(
        &self,
        ordinal: i32,
        stream: usize,
        file: &'static str,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError>;

    /// Whether work queued on `stream` is being captured into a CUDA graph (no allocation or
    /// copy from the host may happen then).
    fn is_capturing(&self, stream: usize) -> Result<bool, CudaError>;

    /// `bytes` (at least 1) of device memory of device `ordinal`.
    fn alloc(&self, ordinal: i32, bytes: usize) -> Result<u64, CudaError>;

    /// Frees allocations once the device has finished the work queued on them; when it cannot be
    /// waited for (say, a capture is in progress) the memory is leaked rather than freed under
    /// running kernels.
    ///
    /// # Safety
    /// Each address must come from [`alloc`](Self::alloc) of the same device and be freed once.
    unsafe fn free_when_idle(&self, ordinal: i32, ptrs: &[u64]);

    /// Copies `src` from the host to device address `dst`, ordered on `stream`; `src` may be
    /// dropped when this returns.
    ///
    /// # Safety
    /// `dst` must hold `src.len()` bytes.
    unsafe fn upload(&self, stream: usize, dst: u64, src: &[u8]) -> Result<(), CudaError>;

    /// Copies `bytes` from device address `src` to `dst`, ordered on `stream`.
    ///
    /// # Safety
    /// Both ranges must be live device memory of `bytes` bytes, not overlapping.
    unsafe fn copy(&self, stream: usize, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError>;

    /// Gets the products of a step ready before the step changes anything: on a GPU, creates the
    /// cuBLAS handle `handle` keeps between steps.
    fn prepare_gemm(&self, _ordinal: i32, _stream: usize, _handle: &mut Option<Cublas>) -> Result<(), CudaError> {
        Ok(())
    }

    /// Runs the product `g` on `stream` (cuBLAS on a GPU, with the handle from
    /// [`prepare_gemm`](Self::prepare_gemm)), operands `a` and `b` of type `inputs`, `c` f32.
    ///
    /// # Safety
    /// Every element the product reads and writes must be live device memory of `ordinal`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        &self,
        ordinal: i32,
        stream: usize,
        handle: &mut Option<Cublas>,
        g: &Gemm,
        inputs: Inputs,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<(), CudaError>;
}

static INSTALLED: OnceLock<&'static dyn Backend> = OnceLock::new();

/// Makes `backend` run every later step of this process instead of the driver. Can be set once
/// (tests install an emulation); returns false if a backend was already installed.
pub fn install(backend: &'static dyn Backend) -> bool {
    INSTALLED.set(backend).is_ok()
}

/// The backend in use: the one installed, else the CUDA driver.
pub fn backend() -> &'static dyn Backend {
    match INSTALLED.get() {
        Some(b) => *b,
        None => &Driver,
    }
}

/// The CUDA driver API (loaded dynamically), NVRTC-compiled modules and cuBLAS.
pub struct Driver;

impl Backend for Driver {
    fn sm_count(&self, ordinal: i32) -> Result<u32, CudaError> {
        let dev = ensure_context(ordinal)?;
        // SAFETY: a plain attribute query of a valid device.
        let n = unsafe {
            result::device::get_attribute(dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        }
        .map_err(|e| driver_err("cuDeviceGetAttribute", e))?;
        Ok(n.max(1) as u32)
    }

    unsafe fn launch(
        &self,
        ordinal: i32,
        stream: usize,
        file: &'static str,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        let (func, _) = function(ordinal, file, name)?;
        result::launch_kernel(func, grid, (block, 1, 1), 0, stream as sys::CUstream, args)
            .map_err(|e| driver_err(&format!("launching {name}"), e))
    }

    fn is_capturing(&self, stream: usize) -> Result<bool, CudaError> {
        // SAFETY: the caller's stream is a live stream of the current context.
        let status = unsafe { result::stream::is_capturing(stream as sys::CUstream) }
            .map_err(|e| driver_err("cuStreamIsCapturing", e))?;
        Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    fn alloc(&self, ordinal: i32, bytes: usize) -> Result<u64, CudaError> {
        ensure_context(ordinal)?;
        // SAFETY: a plain allocation of at least one byte.
        unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| driver_err(&format!("cuMemAlloc of {bytes} bytes"), e))
    }

    unsafe fn free_when_idle(&self, ordinal: i32, ptrs: &[u64]) {
        if ptrs.is_empty() || ensure_context(ordinal).is_err() || result::ctx::synchronize().is_err() {
            return;
        }
        for &ptr in ptrs {
            let _ = result::free_sync(ptr);
        }
    }

    unsafe fn upload(&self, stream: usize, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        result::memcpy_htod_async(dst, src, stream as sys::CUstream).map_err(|e| driver_err("cuMemcpyHtoDAsync", e))
    }

    unsafe fn copy(&self, stream: usize, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        result::memcpy_dtod_async(dst, src, bytes, stream as sys::CUstream)
            .map_err(|e| driver_err("cuMemcpyDtoDAsync", e))
    }

    fn prepare_gemm(&self, ordinal: i32, stream: usize, handle: &mut Option<Cublas>) -> Result<(), CudaError> {
        if handle.is_none() {
            *handle = Some(Cublas::new(ordinal, stream)?);
        }
        Ok(())
    }

    unsafe fn gemm(
        &self,
        ordinal: i32,
        stream: usize,
        handle: &mut Option<Cublas>,
        g: &Gemm,
        inputs: Inputs,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<(), CudaError> {
        self.prepare_gemm(ordinal, stream, handle)?;
        handle.as_mut().expect("created above").gemm(stream, g, inputs, a, b, c)
    }
}
