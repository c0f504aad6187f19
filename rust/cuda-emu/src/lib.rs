//! # smallbatch-cuda-emu
//!
//! The CUDA kernels of `cuda/*.cu`, compiled as C++ for the CPU against a shim of CUDA's built-ins
//! (`shim/cuda_shim.h`) and run by a deterministic scheduler of fibers, so that tests without a GPU
//! can check the kernels against the Rust core. See the crate's README for what is emulated.
//!
//! "Device pointers" are plain host pointers: pass a buffer's address where a kernel takes a
//! pointer. Launches are synchronous and run on the calling thread; several threads may launch at
//! once (each has its own fibers and shared memory).
//!
//! ```
//! use smallbatch_cuda_emu::Args;
//!
//! let src = [1.0f32, 1.0 + 2f32.powi(-8), -0.0];
//! let mut dst = [0u16; 3];
//! let mut args = Args::new().ptr(src.as_ptr()).ptr(dst.as_mut_ptr()).push(src.len() as u64);
//! // SAFETY: the pointers are live buffers of the lengths the kernel reads and writes.
//! unsafe { args.launch("round_nearest_f32_to_bf16", (1, 1, 1), (256, 1, 1)) }.unwrap();
//! assert_eq!(dst, [0x3F80, 0x3F80, 0x8000]);
//! ```
//!
//! [`Emulator`] runs `smallbatch-cuda`'s own steps (its real host code) on these kernels: after
//! [`install`], `smallbatch_cuda::dispatch::sgd_step` and the others launch here instead of on a
//! GPU.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};

pub mod backend;
pub use backend::{install, Emulator, Stats};

extern "C" {
    fn smallbatch_emu_launch(
        kernel: *const c_char,
        gx: c_uint,
        gy: c_uint,
        gz: c_uint,
        bx: c_uint,
        by: c_uint,
        bz: c_uint,
        args: *const *mut c_void,
        arg_count: usize,
        arg_sizes: *const usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn smallbatch_emu_kernel_count() -> usize;
    fn smallbatch_emu_kernel_name(index: usize) -> *const c_char;
}

/// Launches `kernel` over `grid` blocks of `block` threads and waits for it to finish.
///
/// `args[i]` points at the value of the kernel's parameter `i`, as for `cuLaunchKernel`; the number
/// of arguments is checked, their sizes are not (see [`Args::launch`], which checks both).
///
/// # Errors
/// An unknown kernel, a wrong argument count, a launch shape outside CUDA's limits, or a block
/// that cannot finish (threads waiting at a barrier or shuffle that some other thread of the
/// block or warp exited before, or waits at elsewhere); the message names the kernel and block.
///
/// # Safety
/// Every `args[i]` must point at a value of the type of parameter `i`, and every pointer the
/// kernel dereferences must be valid for the accesses the launch makes.
pub unsafe fn launch(
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    args: &mut [*mut c_void],
) -> Result<(), String> {
    launch_checked(kernel, grid, block, args, None)
}

unsafe fn launch_checked(
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    args: &mut [*mut c_void],
    sizes: Option<&[usize]>,
) -> Result<(), String> {
    let name = CString::new(kernel).map_err(|_| format!("kernel name {kernel:?} contains a NUL byte"))?;
    let mut err = vec![0u8; 1024];
    let rc = smallbatch_emu_launch(
        name.as_ptr(),
        grid.0,
        grid.1,
        grid.2,
        block.0,
        block.1,
        block.2,
        args.as_ptr(),
        args.len(),
        sizes.map_or(std::ptr::null(), <[usize]>::as_ptr),
        err.as_mut_ptr() as *mut c_char,
        err.len(),
    );
    if rc == 0 {
        return Ok(());
    }
    let message = CStr::from_bytes_until_nul(&err).map(|m| m.to_string_lossy().into_owned());
    Err(message.unwrap_or_else(|_| format!("launching `{kernel}` failed")))
}

/// The names of every emulated kernel: those of `cuda/*.cu`, and the crate's own test kernels
/// (`emu_test_*`).
pub fn kernel_names() -> Vec<String> {
    // SAFETY: the registry is static; names are NUL-terminated literals for indices below the count.
    unsafe {
        (0..smallbatch_emu_kernel_count())
            .map(|i| CStr::from_ptr(smallbatch_emu_kernel_name(i)).to_string_lossy().into_owned())
            .collect()
    }
}

/// Kernel arguments, each value copied into its own 8-byte-aligned slot, as `rust/cuda`'s
/// dispatch passes them to `cuLaunchKernel`: scalars, pointers (as `u64`) and `#[repr(C)]`
/// structs by value.
#[derive(Debug, Default)]
pub struct Args {
    slots: Vec<Box<[u64]>>,
    sizes: Vec<usize>,
}

impl Args {
    /// No arguments yet.
    pub fn new() -> Self {
        Args::default()
    }

    /// Appends a value passed by value (a scalar, a pointer as `u64`, a `#[repr(C)]` struct).
    pub fn push<T: Copy>(mut self, value: T) -> Self {
        assert!(std::mem::align_of::<T>() <= 8, "kernel arguments are at most 8-byte aligned");
        let mut slot = vec![0u64; std::mem::size_of::<T>().div_ceil(8).max(1)].into_boxed_slice();
        // SAFETY: the slot holds at least size_of::<T>() bytes at 8-byte alignment.
        unsafe { std::ptr::write(slot.as_mut_ptr() as *mut T, value) };
        self.slots.push(slot);
        self.sizes.push(std::mem::size_of::<T>());
        self
    }

    /// Appends a pointer parameter: in emulation a device pointer is the host address.
    pub fn ptr<T>(self, pointer: *const T) -> Self {
        self.push(pointer as u64)
    }

    /// The pointers [`launch`] takes, one per argument in order.
    pub fn pointers(&mut self) -> Vec<*mut c_void> {
        self.slots.iter_mut().map(|s| s.as_mut_ptr() as *mut c_void).collect()
    }

    /// Number of arguments.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no argument was pushed.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Launches `kernel` with these arguments, as [`launch`], and also checks that each argument
    /// has the byte size of its parameter (a `u32` pushed for a `u64` parameter is an error).
    ///
    /// # Errors
    /// As [`launch`], and a size mismatch.
    ///
    /// # Safety
    /// As [`launch`]: the values must have the parameters' types, and the pointers among them
    /// must be valid for the launch's accesses.
    pub unsafe fn launch(&mut self, kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32)) -> Result<(), String> {
        let mut pointers = self.pointers();
        launch_checked(kernel, grid, block, &mut pointers, Some(&self.sizes))
    }
}
