//! Status codes, the thread-local last-error message, and the guard every entry point runs in.

use smallbatch_core::Error;
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a call returned. Every function that can fail returns one; on anything but
/// `SMALLBATCH_STATUS_OK`, `smallbatch_last_error()` says what went wrong, naming the culprit.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmallbatchStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullPointer = 1,
    /// A hyperparameter or argument outside its valid range (NaN, negative lr, beta outside
    /// [0, 1), unknown enum value, misaligned or overlapping buffers).
    InvalidValue = 2,
    /// A buffer whose length does not match the optimizer's tensors.
    Length = 3,
    /// A tensor shape or table the rule cannot use (overflow, too many dims, Muon on a vector).
    Shape = 4,
    /// A float step on a bf16 optimizer or the other way round.
    Dtype = 5,
    /// State bytes that are corrupted, of another format version, or of another optimizer.
    State = 6,
    /// The caller's buffer is too small (see `smallbatch_optimizer_state_size`).
    BufferTooSmall = 7,
    /// Not available on this machine (for example a SIMD path forced by SMALLBATCH_SIMD).
    Unsupported = 8,
    /// A bug in the library, caught before it crossed into the caller.
    Internal = 9,
}

impl SmallbatchStatus {
    pub(crate) const ALL: [SmallbatchStatus; 10] = [
        SmallbatchStatus::Ok,
        SmallbatchStatus::NullPointer,
        SmallbatchStatus::InvalidValue,
        SmallbatchStatus::Length,
        SmallbatchStatus::Shape,
        SmallbatchStatus::Dtype,
        SmallbatchStatus::State,
        SmallbatchStatus::BufferTooSmall,
        SmallbatchStatus::Unsupported,
        SmallbatchStatus::Internal,
    ];

    /// The constant's name, NUL-terminated.
    pub(crate) fn name(self) -> &'static [u8] {
        match self {
            SmallbatchStatus::Ok => b"SMALLBATCH_STATUS_OK\0",
            SmallbatchStatus::NullPointer => b"SMALLBATCH_STATUS_NULL_POINTER\0",
            SmallbatchStatus::InvalidValue => b"SMALLBATCH_STATUS_INVALID_VALUE\0",
            SmallbatchStatus::Length => b"SMALLBATCH_STATUS_LENGTH\0",
            SmallbatchStatus::Shape => b"SMALLBATCH_STATUS_SHAPE\0",
            SmallbatchStatus::Dtype => b"SMALLBATCH_STATUS_DTYPE\0",
            SmallbatchStatus::State => b"SMALLBATCH_STATUS_STATE\0",
            SmallbatchStatus::BufferTooSmall => b"SMALLBATCH_STATUS_BUFFER_TOO_SMALL\0",
            SmallbatchStatus::Unsupported => b"SMALLBATCH_STATUS_UNSUPPORTED\0",
            SmallbatchStatus::Internal => b"SMALLBATCH_STATUS_INTERNAL\0",
        }
    }
}

/// A failure on its way to the caller: a status and the message `smallbatch_last_error` returns.
#[derive(Debug)]
pub(crate) struct CError {
    pub status: SmallbatchStatus,
    pub message: String,
}

impl CError {
    pub fn new(status: SmallbatchStatus, message: impl Into<String>) -> CError {
        CError { status, message: message.into() }
    }

    pub fn null(name: &str) -> CError {
        CError::new(SmallbatchStatus::NullPointer, format!("{name} is NULL"))
    }

    /// A bug in this library (a broken invariant or a caught panic), not a bad call.
    pub fn internal(what: &str) -> CError {
        CError::new(SmallbatchStatus::Internal, format!("internal error: {what}"))
    }
}

impl From<Error> for CError {
    fn from(err: Error) -> CError {
        let status = match err {
            Error::InvalidValue { .. } => SmallbatchStatus::InvalidValue,
            Error::Length { .. } => SmallbatchStatus::Length,
            Error::Segments(_) => SmallbatchStatus::Shape,
            Error::SimdUnavailable { .. } => SmallbatchStatus::Unsupported,
            // The C API steps no sharded groups: no collective runs under it.
            Error::Collective(_) => SmallbatchStatus::Internal,
        };
        CError::new(status, err.to_string())
    }
}

/// Renames the culprit of a core error: the core names its own arguments (`halflife_tokens`),
/// the C caller knows the config field (`t2`).
pub(crate) fn renamed(err: Error, from: &str, to: &str) -> Error {
    match err {
        Error::InvalidValue { name, value, requirement } if name == from => {
            Error::InvalidValue { name: to.to_string(), value, requirement }
        }
        other => other,
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: String) {
    // Our messages never hold NUL, but a CString must not fail here.
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = message);
}

/// The thread's last error message; valid until the next failing call on this thread.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|last| last.borrow().as_ptr())
}

/// Runs the body of entry point `func`: a returned error or a panic becomes a status, and its
/// message (prefixed with `func`) the thread's last error. No panic unwinds into C, which would be
/// undefined behaviour.
pub(crate) fn guard(func: &str, body: impl FnOnce() -> Result<(), CError>) -> SmallbatchStatus {
    let err = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return SmallbatchStatus::Ok,
        Ok(Err(err)) => err,
        Err(payload) => CError::internal(&smallbatch_core::error::panic_message(&*payload)),
    };
    set_last_error(format!("{func}: {}", err.message));
    err.status
}
