//! # smallbatch-capi
//!
//! The C ABI of [`smallbatch_core`], for training loops outside Python: C and C++ programs, and
//! other languages through their C FFI. Built as a shared and a static library; the header,
//! `include/smallbatch.h`, is generated from this crate by cbindgen and checked by a test.
//!
//! - An optimizer is an opaque `SmallbatchOptimizer` handle made from a [`SmallbatchConfig`]
//!   (rule, hyperparameters, betas given directly or as half-lives in tokens, seed, parameter
//!   type, rounding) and a table of tensor shapes ([`SmallbatchTensor`]). It owns its state;
//!   the parameters and gradients stay the caller's, one flat buffer each, stepped in place.
//! - State leaves and enters as bytes for checkpoints: size query, export into the caller's
//!   buffer, import with a format, version, checksum and shape check.
//! - Every function that can fail returns a [`SmallbatchStatus`]; `smallbatch_last_error()`
//!   then names the culprit. NULL pointers, wrong lengths, misaligned or overlapping buffers and
//!   out-of-range hyperparameters are refused; no panic crosses into the caller.
//! - A handle may be used from any thread; calls on one handle are serialised.
//!
//! ```c
//! SmallbatchConfig cfg;
//! smallbatch_config_default(SMALLBATCH_RULE_ADAMW, &cfg);
//! cfg.lr = 3e-3;
//! cfg.t2 = 10e6;                 /* beta2 from a half-life of 10M tokens */
//! cfg.tokens_per_step = 512;     /* batch size 1 x 512 tokens */
//! SmallbatchTensor tensors[2] = {{2, {256, 128}}, {1, {128}}};
//! SmallbatchOptimizer *opt;
//! if (smallbatch_optimizer_new(&cfg, tensors, 2, &opt) != SMALLBATCH_STATUS_OK)
//!     fprintf(stderr, "%s\n", smallbatch_last_error());
//! smallbatch_optimizer_step_f32(opt, params, grads, 256 * 128 + 128);
//! smallbatch_optimizer_free(opt);
//! ```

mod config;
mod error;
mod optimizer;
mod state;

pub use config::{
    SmallbatchConfig, SmallbatchDtype, SmallbatchLrAdjust, SmallbatchRounding, SmallbatchRule, SmallbatchTensor,
    SMALLBATCH_MAX_DIMS, SMALLBATCH_STATE_FORMAT_VERSION,
};
pub use error::SmallbatchStatus;

use error::{guard, CError};
use optimizer::Optimizer;
use smallbatch_core::driver::Rounding;
use smallbatch_core::rules::Params;
use smallbatch_core::{halflife, rounding, Error, Executor};
use std::ffi::c_char;
use std::sync::{Mutex, MutexGuard};

/// An optimizer: its rule and hyperparameters, tensor table, step counters and state. Made by
/// `smallbatch_optimizer_new`, released by `smallbatch_optimizer_free`.
pub struct SmallbatchOptimizer {
    inner: Mutex<Optimizer>,
}

impl SmallbatchOptimizer {
    fn lock(&self) -> Result<MutexGuard<'_, Optimizer>, CError> {
        self.inner.lock().map_err(|_| {
            CError::new(
                SmallbatchStatus::Internal,
                "the optimizer is unusable after an internal error in an earlier call",
            )
        })
    }
}

// --- the checks that turn caller pointers into references -----------------------------------

fn check_aligned<T>(name: &str, ptr: *const T) -> Result<(), CError> {
    if (ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
        Ok(())
    } else {
        Err(Error::invalid(name, format!("{ptr:p}"), "a pointer aligned to its element type").into())
    }
}

fn check_extent<T>(name: &str, len: usize) -> Result<(), CError> {
    match len.checked_mul(std::mem::size_of::<T>()) {
        Some(bytes) if bytes <= isize::MAX as usize => Ok(()),
        _ => Err(Error::invalid(format!("{name} length"), len, "a size that fits in memory").into()),
    }
}

/// `len` elements at `ptr`, refused when `ptr` is NULL (with elements) or misaligned.
///
/// # Safety
/// A non-NULL `ptr` must point at `len` readable elements that nothing writes during the call.
unsafe fn slice<'a, T>(name: &str, ptr: *const T, len: usize) -> Result<&'a [T], CError> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(CError::null(name));
    }
    check_aligned(name, ptr)?;
    check_extent::<T>(name, len)?;
    // SAFETY: checked non-NULL, aligned and of a valid extent; the caller vouches for the memory.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// As [`slice`], writable.
///
/// # Safety
/// A non-NULL `ptr` must point at `len` writable elements that nothing else accesses during the call.
unsafe fn slice_mut<'a, T>(name: &str, ptr: *mut T, len: usize) -> Result<&'a mut [T], CError> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(CError::null(name));
    }
    check_aligned(name, ptr)?;
    check_extent::<T>(name, len)?;
    // SAFETY: as in `slice`.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// Refuses a writable buffer that overlaps another one: Rust's `&mut` must be exclusive.
fn check_disjoint<A, B>(a_name: &str, a: &[A], b_name: &str, b: &[B]) -> Result<(), CError> {
    let (a0, a1) = (a.as_ptr() as usize, a.as_ptr() as usize + std::mem::size_of_val(a));
    let (b0, b1) = (b.as_ptr() as usize, b.as_ptr() as usize + std::mem::size_of_val(b));
    if a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1 {
        return Err(Error::invalid(a_name, format!("overlapping {b_name}"), "a buffer of its own").into());
    }
    Ok(())
}

/// The object behind a non-NULL, aligned `ptr`.
///
/// # Safety
/// A non-NULL `ptr` must point at a valid `T`.
unsafe fn object<'a, T>(name: &str, ptr: *const T) -> Result<&'a T, CError> {
    if ptr.is_null() {
        return Err(CError::null(name));
    }
    check_aligned(name, ptr)?;
    // SAFETY: checked non-NULL and aligned; the caller vouches for the object.
    Ok(unsafe { &*ptr })
}

/// Where to write a result.
///
/// # Safety
/// A non-NULL `ptr` must point at writable memory for a `T`.
unsafe fn out_ptr<'a, T>(name: &str, ptr: *mut T) -> Result<&'a mut T, CError> {
    if ptr.is_null() {
        return Err(CError::null(name));
    }
    check_aligned(name, ptr)?;
    // SAFETY: as in `object`; `T` is plain data here, so the old contents need not be valid.
    Ok(unsafe { &mut *ptr })
}

// --- library ---------------------------------------------------------------------------------

/// The library's version, e.g. "0.1.0" (a static string).
#[no_mangle]
pub extern "C" fn smallbatch_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed call on this thread, naming the function and the culprit;
/// "" if none has failed. Valid until the next failing call on this thread.
#[no_mangle]
pub extern "C" fn smallbatch_last_error() -> *const c_char {
    error::last_error_ptr()
}

/// The name of a status code, e.g. "SMALLBATCH_STATUS_LENGTH" (a static string; "unknown status"
/// for values that are none).
#[no_mangle]
pub extern "C" fn smallbatch_status_name(status: i32) -> *const c_char {
    let name =
        SmallbatchStatus::ALL.iter().find(|s| **s as i32 == status).map_or(&b"unknown status\0"[..], |s| s.name());
    name.as_ptr().cast()
}

/// `sizeof(SmallbatchConfig)` as this library sees it, for bindings that declare the struct
/// themselves to check their layout.
#[no_mangle]
pub extern "C" fn smallbatch_config_size() -> usize {
    std::mem::size_of::<SmallbatchConfig>()
}

/// Fills `out` with the defaults of the Python package's optimizer for `rule` (a
/// `SmallbatchRule`): float parameters, round-to-nearest, seed 0, no half-lives.
///
/// # Safety
/// `out` must be NULL or point at writable memory for a `SmallbatchConfig`.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_config_default(rule: u32, out: *mut SmallbatchConfig) -> SmallbatchStatus {
    guard("smallbatch_config_default", || {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr("out", out)? };
        *out = config::default_config(rule)?;
        Ok(())
    })
}

// --- optimizers ------------------------------------------------------------------------------

/// Makes an optimizer for `n_tensors` tensors laid back to back, in table order, in one flat
/// parameter buffer (and likewise one gradient buffer). Every hyperparameter is checked here.
/// On success `*out` is the new handle; on failure it is set to NULL.
///
/// # Safety
/// `config` must be NULL or point at a `SmallbatchConfig`; `tensors` NULL or at `n_tensors`
/// `SmallbatchTensor`s; `out` NULL or at writable memory for a pointer.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_optimizer_new(
    config: *const SmallbatchConfig,
    tensors: *const SmallbatchTensor,
    n_tensors: usize,
    out: *mut *mut SmallbatchOptimizer,
) -> SmallbatchStatus {
    guard("smallbatch_optimizer_new", || {
        // SAFETY (all three): the caller's contract.
        let out = unsafe { out_ptr("out", out)? };
        *out = std::ptr::null_mut();
        let config = unsafe { object("config", config)? };
        let tensors = unsafe { slice("tensors", tensors, n_tensors)? };
        let opt = Optimizer::new(config, tensors)?;
        *out = Box::into_raw(Box::new(SmallbatchOptimizer { inner: Mutex::new(opt) }));
        Ok(())
    })
}

/// Releases an optimizer; NULL is ignored.
///
/// # Safety
/// `opt` must be NULL or a handle from `smallbatch_optimizer_new` not yet freed, and no other
/// call may be using it.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_optimizer_free(opt: *mut SmallbatchOptimizer) {
    if !opt.is_null() {
        // A panic while dropping plain buffers is not expected; should one happen, it is
        // contained here, as everywhere else.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: the caller's contract: the handle came from Box::into_raw and is freed once.
            drop(unsafe { Box::from_raw(opt) })
        }));
    }
}

/// Writes the number of elements of the flat parameter buffer (the sum of the tensors' sizes)
/// to `*out`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_optimizer_num_elements(
    opt: *const SmallbatchOptimizer,
    out: *mut usize,
) -> SmallbatchStatus {
    guard("smallbatch_optimizer_num_elements", || {
        // SAFETY: the caller's contract.
        let (opt, out) = unsafe { (object("opt", opt)?, out_ptr("out", out)?) };
        *out = opt.lock()?.table.total();
        Ok(())
    })
}

/// Writes the optimizer's config to `*out`, with the betas in use: `momentum`, `beta1` and
/// `beta2` as computed from `t1`, `t2` and `tokens_per_step` where those are set.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_optimizer_get_config(
    opt: *const SmallbatchOptimizer,
    out: *mut SmallbatchConfig,
) -> SmallbatchStatus {
    guard("smallbatch_optimizer_get_config", || {
        // SAFETY: the caller's contract.
        let (opt, out) = unsafe { (object("opt", opt)?, out_ptr("out", out)?) };
        *out = opt.lock()?.resolved.config;
        Ok(())
    })
}

/// Changes the learning rate from the next step on (for schedules). Refused, changing nothing,
/// unless finite and >= 0.
///
/// # Safety
/// `opt` must be NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_optimizer_set_lr(opt: *mut SmallbatchOptimizer, lr: f64) -> SmallbatchStatus {
    guard("smallbatch_optimizer_set_lr", || {
        // SAFETY: the caller's contract.
        let mut opt = unsafe { object("opt", opt)? }.lock()?;
        let config = SmallbatchConfig { lr, ..opt.resolved.config };
        opt.reconfigure(&config)
    })
}

/// Changes the tokens per step (when the batch size changes): betas set by half-lives are
/// recomputed so that the half-lives in tokens stay the same. Refused, changing nothing, unless
/// finite and > 0, and when a momentum would turn on or off (state buffers are fixed at creation).
///
/// # Safety
/// `opt` must be NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_optimizer_set_tokens_per_step(
    opt: *mut SmallbatchOptimizer,
    tokens_per_step: f64,
) -> SmallbatchStatus {
    guard("smallbatch_optimizer_set_tokens_per_step", || {
        // SAFETY: the caller's contract.
        let mut opt = unsafe { object("opt", opt)? }.lock()?;
        if !(tokens_per_step.is_finite() && tokens_per_step > 0.0) {
            return Err(Error::invalid("tokens_per_step", tokens_per_step, "finite and > 0").into());
        }
        let config = SmallbatchConfig { tokens_per_step, ..opt.resolved.config };
        opt.reconfigure(&config)
    })
}

/// One optimizer step of an optimizer made for float parameters: `param` (updated in place)
/// and `grad` each hold `len` floats, the optimizer's tensors back to back.
///
/// # Safety
/// `opt` must be NULL or a live handle; `param` NULL or `len` writable floats, `grad` NULL or
/// `len` readable floats, neither touched by anyone else during the call.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_optimizer_step_f32(
    opt: *mut SmallbatchOptimizer,
    param: *mut f32,
    grad: *const f32,
    len: usize,
) -> SmallbatchStatus {
    guard("smallbatch_optimizer_step_f32", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { object("opt", opt)? };
        let (param, grad) = unsafe { (slice_mut("param", param, len)?, slice("grad", grad, len)?) };
        check_disjoint("param", param, "grad", grad)?;
        opt.lock()?.step(Params::F32 { param, grad })
    })
}

/// One optimizer step of an optimizer made for bf16 parameters (raw bits): as
/// `smallbatch_optimizer_step_f32`, with the update computed in float32 and rounded back as the
/// config's `rounding` says.
///
/// # Safety
/// As for `smallbatch_optimizer_step_f32`, with `uint16_t` elements.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_optimizer_step_bf16(
    opt: *mut SmallbatchOptimizer,
    param: *mut u16,
    grad: *const u16,
    len: usize,
) -> SmallbatchStatus {
    guard("smallbatch_optimizer_step_bf16", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { object("opt", opt)? };
        let (param, grad) = unsafe { (slice_mut("param", param, len)?, slice("grad", grad, len)?) };
        check_disjoint("param", param, "grad", grad)?;
        let mut opt = opt.lock()?;
        // The dtype check in `step` answers a float optimizer; this one only needs the rounding.
        let rounding = match opt.resolved.storage {
            config::Storage::Bf16(r) => r,
            config::Storage::F32 => Rounding::Nearest,
        };
        opt.step(Params::Bf16 { param, grad, rounding })
    })
}

/// Writes the bytes `smallbatch_optimizer_export_state` needs to `*out`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_optimizer_state_size(
    opt: *const SmallbatchOptimizer,
    out: *mut usize,
) -> SmallbatchStatus {
    guard("smallbatch_optimizer_state_size", || {
        // SAFETY: the caller's contract.
        let (opt, out) = unsafe { (object("opt", opt)?, out_ptr("out", out)?) };
        *out = opt.lock()?.state_size();
        Ok(())
    })
}

/// Writes the optimizer's state (step counters and state buffers, with a description of its
/// rule and tensors, a format version and a checksum) to `buf`, which holds `len` bytes, and the
/// byte count to `*written` (which may be NULL). Fails with SMALLBATCH_STATUS_BUFFER_TOO_SMALL,
/// writing nothing, when `len` is less than `smallbatch_optimizer_state_size` says.
///
/// # Safety
/// `opt` must be NULL or a live handle; `buf` NULL or `len` writable bytes; `written` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_optimizer_export_state(
    opt: *const SmallbatchOptimizer,
    buf: *mut u8,
    len: usize,
    written: *mut usize,
) -> SmallbatchStatus {
    guard("smallbatch_optimizer_export_state", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { object("opt", opt)? };
        let buf = unsafe { slice_mut("buf", buf, len)? };
        let written = if written.is_null() { None } else { Some(unsafe { out_ptr("written", written)? }) };
        let n = opt.lock()?.export_state(buf)?;
        if let Some(w) = written {
            *w = n;
        }
        Ok(())
    })
}

/// Replaces the optimizer's step counters and state with those exported by
/// `smallbatch_optimizer_export_state` from an optimizer of the same rule, tensors and state
/// buffers; hyperparameters stay this optimizer's. Bytes that are not such state (another
/// format version, a checksum mismatch, another optimizer) fail with SMALLBATCH_STATUS_STATE
/// and change nothing.
///
/// # Safety
/// `opt` must be NULL or a live handle; `buf` NULL or `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_optimizer_import_state(
    opt: *mut SmallbatchOptimizer,
    buf: *const u8,
    len: usize,
) -> SmallbatchStatus {
    guard("smallbatch_optimizer_import_state", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { object("opt", opt)? };
        let buf = unsafe { slice("buf", buf, len)? };
        opt.lock()?.import_state(buf)
    })
}

// --- half-lives ------------------------------------------------------------------------------

/// `*out = 0.5^(tokens_per_step / halflife_tokens)`: the EMA coefficient with a half-life of
/// `halflife_tokens` tokens when each step consumes `tokens_per_step` (both finite and > 0).
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_beta_from_halflife(
    halflife_tokens: f64,
    tokens_per_step: f64,
    out: *mut f64,
) -> SmallbatchStatus {
    guard("smallbatch_beta_from_halflife", || {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr("out", out)? };
        *out = halflife::beta_from_halflife(halflife_tokens, tokens_per_step)?;
        Ok(())
    })
}

/// `*out = tokens_per_step * ln(0.5) / ln(beta)`: the half-life in tokens of an EMA with
/// coefficient `beta` in (0, 1).
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_halflife_from_beta(
    beta: f64,
    tokens_per_step: f64,
    out: *mut f64,
) -> SmallbatchStatus {
    guard("smallbatch_halflife_from_beta", || {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr("out", out)? };
        *out = halflife::halflife_from_beta(beta, tokens_per_step)?;
        Ok(())
    })
}

/// `*out = beta^(to_tokens_per_step / from_tokens_per_step)`: the coefficient with the same
/// half-life in tokens after the tokens per step change.
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_scale_beta(
    beta: f64,
    from_tokens_per_step: f64,
    to_tokens_per_step: f64,
    out: *mut f64,
) -> SmallbatchStatus {
    guard("smallbatch_scale_beta", || {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr("out", out)? };
        *out = halflife::scale_beta(beta, from_tokens_per_step, to_tokens_per_step)?;
        Ok(())
    })
}

// --- rounding --------------------------------------------------------------------------------

/// Rounds `n` floats at `src` to bf16 bits at `dst` stochastically (unbiased): element `i`
/// with random bits from Philox4x32-10 keyed by `seed` and counted by (`step`, `i`, `stream`),
/// the same bits the optimizers use, on every SIMD path and thread count. NaN stays NaN, +-Inf
/// stays +-Inf.
///
/// # Safety
/// `src` must be NULL or `n` readable floats; `dst` NULL or `n` writable `uint16_t`s, not
/// overlapping `src`.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_stochastic_round(
    src: *const f32,
    dst: *mut u16,
    n: usize,
    seed: u64,
    step: u64,
    stream: u32,
) -> SmallbatchStatus {
    guard("smallbatch_stochastic_round", || {
        // SAFETY: the caller's contract.
        let (src, dst) = unsafe { (slice("src", src, n)?, slice_mut("dst", dst, n)?) };
        check_disjoint("dst", dst, "src", src)?;
        rounding::stochastic_round_slice(Executor::global()?, src, dst, seed, step, stream)?;
        Ok(())
    })
}

/// Rounds `n` floats at `src` to the nearest bf16 (ties to even) at `dst`.
///
/// # Safety
/// As for `smallbatch_stochastic_round`.
#[no_mangle]
pub unsafe extern "C" fn smallbatch_round_nearest(src: *const f32, dst: *mut u16, n: usize) -> SmallbatchStatus {
    guard("smallbatch_round_nearest", || {
        // SAFETY: the caller's contract.
        let (src, dst) = unsafe { (slice("src", src, n)?, slice_mut("dst", dst, n)?) };
        check_disjoint("dst", dst, "src", src)?;
        rounding::round_nearest_slice(Executor::global()?, src, dst)?;
        Ok(())
    })
}
