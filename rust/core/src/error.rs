//! The core's one error type. Every fallible entry point returns [`Result`]; nothing in the core
//! panics on bad input, so the bindings can turn each error into a Python exception or a C status.

use std::fmt;

/// What went wrong, with the culprit named so the message can be shown to a user as is.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A hyperparameter or argument outside its valid range.
    InvalidValue {
        /// The argument's name, e.g. `"lr"` or `"halflife_tokens"`.
        name: String,
        /// The offending value, formatted.
        value: String,
        /// What the value must satisfy, e.g. `"finite and >= 0"`.
        requirement: &'static str,
    },
    /// A buffer or table whose length does not fit the others.
    Length {
        /// The buffer's name, e.g. `"grad"`.
        name: String,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        got: usize,
    },
    /// A segment table that is not a valid layout of a flat buffer.
    Segments(String),
    /// A SIMD path that was asked for but cannot run on this CPU or build.
    SimdUnavailable {
        /// The requested path.
        requested: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A sum across ranks (the caller's collective, in a sharded step) that failed.
    Collective(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidValue`].
    pub fn invalid(name: impl Into<String>, value: impl fmt::Display, requirement: &'static str) -> Self {
        Error::InvalidValue { name: name.into(), value: value.to_string(), requirement }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidValue { name, value, requirement } => {
                write!(f, "invalid {name}: {value} (must be {requirement})")
            }
            Error::Length { name, expected, got } => {
                write!(f, "{name} has {got} elements, expected {expected}")
            }
            Error::Segments(msg) => write!(f, "invalid segment table: {msg}"),
            Error::SimdUnavailable { requested, reason } => {
                write!(f, "SIMD path '{requested}' is unavailable: {reason}")
            }
            Error::Collective(msg) => write!(f, "the sum across ranks failed: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

/// The core's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// The message of a caught panic (the payload `std::panic::catch_unwind` returns), for the layers
/// that embed the core and turn a panic into an error rather than unwind into foreign frames.
///
/// ```
/// let payload = std::panic::catch_unwind(|| panic!("bad {}", 7)).unwrap_err();
/// assert_eq!(smallbatch_core::error::panic_message(&*payload), "bad 7");
/// ```
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Checks that a buffer has the length it must have.
pub(crate) fn check_len(name: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::Length { name: name.to_string(), expected, got: len })
    }
}

/// Checks that `value` is finite and `>= 0`.
pub(crate) fn check_non_negative(name: &str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(name, value, "finite and >= 0"))
    }
}

/// Checks that `value` lies in `[0, 1)`, the range of an EMA coefficient torch.optim accepts.
pub(crate) fn check_beta(name: &str, value: f64) -> Result<()> {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(Error::invalid(name, value, "in [0, 1)"))
    }
}
