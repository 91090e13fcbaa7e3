//! The core's one error type: what went wrong (which Python exception it becomes) and where, with
//! no Python in it. The bindings turn it into an exception in one place (`src/errors.rs` of the
//! `optirs` crate).

use std::fmt;

/// A user's mistake, found before anything was modified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreError {
    pub kind: ErrorKind,
    /// The parameter (or group) it concerns, when there is one.
    pub at: Option<Location>,
    /// The argument it concerns: `"grad"`, `"state['exp_avg']"`, a hyperparameter's key, ...
    pub arg: Option<String>,
    /// The whole message, the location named in it.
    pub message: String,
}

/// Which exception an error is raised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Wrong kind of object or dtype: `TypeError`.
    Type,
    /// Right kind of object, wrong value (shape, layout, aliasing, count): `ValueError`.
    Value,
    /// Hyperparameters torch.optim's own step fails on: the exception torch raises.
    Torch(TorchRaises),
}

/// The Python exception torch.optim's step raises where its scalar arithmetic fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchRaises {
    /// A Python float divided by zero.
    ZeroDivision,
    /// A Python float power out of range.
    Overflow,
    /// A complex Python number reached a real tensor.
    Runtime,
    /// As `Runtime`, for float16/bfloat16 tensors (torch has no complex division for them).
    NotImplemented,
}

/// Where a parameter sits: its flat index among all parameters, its group and its index in the
/// group. `param`, `grad` and `state` word it for messages. An error about a whole group (a
/// hyperparameter) has `flat` and `index` set to `usize::MAX` ([`CoreError::in_group`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub flat: usize,
    pub group: usize,
    pub index: usize,
}

impl Location {
    #[must_use]
    pub fn param(self) -> String {
        format!("param_groups[{}]['params'][{}]", self.group, self.index)
    }
    #[must_use]
    pub fn grad(self) -> String {
        format!("grads[{}] (the gradient of {})", self.flat, self.param())
    }
    #[must_use]
    pub fn state(self, key: &str) -> String {
        format!("state['{key}'] of {}", self.param())
    }
}

impl CoreError {
    #[must_use]
    pub fn new(kind: ErrorKind, message: String) -> CoreError {
        CoreError {
            kind,
            at: None,
            arg: None,
            message,
        }
    }

    /// `TypeError`.
    #[must_use]
    pub fn type_error(message: String) -> CoreError {
        CoreError::new(ErrorKind::Type, message)
    }

    /// `ValueError`.
    #[must_use]
    pub fn value_error(message: String) -> CoreError {
        CoreError::new(ErrorKind::Value, message)
    }

    /// What torch.optim's step raises.
    #[must_use]
    pub fn torch(raises: TorchRaises, message: String) -> CoreError {
        CoreError::new(ErrorKind::Torch(raises), message)
    }

    /// The same error, said to concern parameter `at` (kept if already set).
    #[must_use]
    pub fn at(mut self, at: Location) -> CoreError {
        self.at.get_or_insert(at);
        self
    }

    /// The same error, said to concern group `group` (when no parameter was named).
    #[must_use]
    pub fn in_group(mut self, group: usize) -> CoreError {
        self.at.get_or_insert(Location {
            flat: usize::MAX,
            group,
            index: usize::MAX,
        });
        self
    }

    /// The same error, said to concern argument `arg` (kept if already set).
    #[must_use]
    pub fn arg(mut self, arg: &str) -> CoreError {
        self.arg.get_or_insert_with(|| arg.to_owned());
        self
    }
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CoreError {}

/// Locating the error of a `Result`.
pub trait Locate {
    /// See [`CoreError::at`].
    #[must_use]
    fn at(self, at: Location) -> Self;
    /// See [`CoreError::arg`].
    #[must_use]
    fn arg(self, arg: &str) -> Self;
}

impl<T> Locate for Result<T, CoreError> {
    fn at(self, at: Location) -> Self {
        self.map_err(|e| e.at(at))
    }
    fn arg(self, arg: &str) -> Self {
        self.map_err(|e| e.arg(arg))
    }
}

/// The text a panic was raised with.
#[must_use]
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// Shorthand for `Err(CoreError::type_error(format!(...)))`.
#[macro_export]
macro_rules! type_err {
    ($($arg:tt)*) => { Err($crate::CoreError::type_error(format!($($arg)*))) };
}

/// Shorthand for `Err(CoreError::value_error(format!(...)))`.
#[macro_export]
macro_rules! value_err {
    ($($arg:tt)*) => { Err($crate::CoreError::value_error(format!($($arg)*))) };
}
