//! The one error type of the bindings, converted to a Python exception at the boundary.

use pyo3::exceptions::{
    PyNotImplementedError, PyOverflowError, PyRuntimeError, PyTypeError, PyValueError,
    PyZeroDivisionError,
};
use pyo3::PyErr;

/// A user's mistake, found before anything was modified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    /// Wrong kind of object or dtype: raised as `TypeError`.
    Type(String),
    /// Right kind of object, wrong value (shape, layout, aliasing, count): `ValueError`.
    Value(String),
    /// Hyperparameters torch.optim's own step fails on: raised as the exception torch raises.
    Torch(TorchRaises, String),
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

impl From<StepError> for PyErr {
    fn from(e: StepError) -> PyErr {
        match e {
            StepError::Type(m) => PyTypeError::new_err(m),
            StepError::Value(m) => PyValueError::new_err(m),
            StepError::Torch(TorchRaises::ZeroDivision, m) => PyZeroDivisionError::new_err(m),
            StepError::Torch(TorchRaises::Overflow, m) => PyOverflowError::new_err(m),
            StepError::Torch(TorchRaises::Runtime, m) => PyRuntimeError::new_err(m),
            StepError::Torch(TorchRaises::NotImplemented, m) => PyNotImplementedError::new_err(m),
        }
    }
}

/// Shorthand for `Err(StepError::Type(format!(...)))`.
macro_rules! type_err {
    ($($arg:tt)*) => { Err($crate::errors::StepError::Type(format!($($arg)*))) };
}

/// Shorthand for `Err(StepError::Value(format!(...)))`.
macro_rules! value_err {
    ($($arg:tt)*) => { Err($crate::errors::StepError::Value(format!($($arg)*))) };
}

pub(crate) use {type_err, value_err};
