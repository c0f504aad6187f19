//! # smallbatch-core
//!
//! Optimizer update rules for training at small batch sizes: one call steps a whole parameter
//! group, described by a [`SegmentTable`] (each tensor a range of one index space, which indexes
//! the optimizer's flat state and counts the random bits of stochastic rounding); its parameters
//! and gradients are flat buffers of the tensors back to back, or each tensor at an address of
//! its own (`rules::Params::Tensors`). Pure Rust, no Python: the Python package and the C ABI
//! are thin layers over this crate.
//!
//! - [`halflife`]: EMA coefficients from half-lives in tokens (`beta = 0.5^(B*T / t_half)`).
//! - [`rules`]: SGD, Adam/AdamW, Adafactor and Muon with torch.optim's semantics, on f32 or bf16
//!   parameters (state is always f32).
//! - [`philox`] and [`rounding`]: Philox4x32-10 counter-based random bits and fp32 -> bf16
//!   rounding, stochastic or to nearest.
//! - [`newton_schulz`]: Muon's Newton-Schulz orthogonalisation of a 2-D update, on a native GEMM.
//! - [`simd`] and [`driver`]: run-time SIMD dispatch (scalar, AVX2, AVX-512, NEON) and
//!   fixed-chunk threading; every path and thread count gives bit-identical results.
//!
//! ```
//! use smallbatch_core::rules::{adam::{adam_step, AdamBuffers, AdamHyper}, Params};
//! use smallbatch_core::{Executor, SegmentTable};
//!
//! // Two tensors of 3 and 2 elements in one flat buffer.
//! let table = SegmentTable::packed(&[3, 2]).unwrap();
//! let mut param = vec![1.0f32; 5];
//! let grad = vec![0.5f32; 5];
//! let (mut m, mut v) = (vec![0.0f32; 5], vec![0.0f32; 5]);
//! let mut steps = vec![0.0; 2];
//! let hp = AdamHyper { lr: 0.1, ..AdamHyper::default() };
//! let exec = Executor::global().unwrap();
//! let params = Params::F32 { param: &mut param, grad: &grad };
//! let bufs = AdamBuffers { params, exp_avg: &mut m, exp_avg_sq: &mut v, max_exp_avg_sq: None };
//! adam_step(exec, &table, &[true, true], &mut steps, bufs, &hp).unwrap();
//! // Adam's first step moves every parameter by lr against the gradient's sign.
//! assert!(param.iter().all(|&p| (p - 0.9).abs() < 1e-6));
//! assert_eq!(steps, [1.0, 1.0]);
//! ```

pub mod driver;
pub mod error;
pub mod halflife;
pub mod newton_schulz;
pub mod philox;
pub mod rounding;
pub mod rules;
pub mod segments;
pub mod simd;

pub use driver::Executor;
pub use error::{Error, Result};
pub use segments::{Run, SegmentTable};
pub use simd::SimdPath;

/// The crate's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
