//! # smallbatch-cuda
//!
//! The CUDA side of smallbatch-core's update rules. Kernel sources live in the repository's
//! `cuda/` directory (one file per rule plus `common.cuh`, the shared Philox and rounding code) and
//! are embedded here; NVRTC compiles them at run time for the device's exact architecture.
//!
//! - [`kernels`]: the embedded sources and the kernels each defines.
//! - [`compile`]: NVRTC compilation (machine code for an exact `sm_XX`, or PTX), with errors
//!   that say what is missing instead of panicking.
//! - [`backend`]: what the host side asks of a device (the CUDA driver, or an emulation a test
//!   installs), behind one trait.
//! - [`launch`]: launch shapes, shared by every elementwise kernel.
//! - [`dispatch`]: launches on torch-owned memory and torch's current stream (SGD, Adam/AdamW over
//!   lists of tensors, rounding), with constants computed by the core.
//! - [`adafactor`]: Adafactor's device segment table, scratch and phase launches.
//! - [`muon`]: Muon's momentum, Newton-Schulz with cuBLAS ([`cublas`]) and update.
//! - [`memory`]: device memory the host side owns (tables, scratch, workspaces), kept between
//!   steps so that a step allocates and copies nothing.
//!
//! Everything loads NVIDIA's libraries dynamically: this crate builds, and its host-side logic is
//! tested, on machines without a CUDA toolkit or a GPU.

pub mod adafactor;
pub mod backend;
pub mod compile;
pub mod cublas;
pub mod dispatch;
pub mod kernels;
pub mod launch;
pub mod memory;
pub mod muon;

pub use compile::{compile_all, compile_source, nvrtc_version, CompileTarget, CudaError};
