//! The one error type of the bindings, converted to a Python exception at the boundary.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::PyErr;

/// A user's mistake, found before anything was modified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    /// Wrong kind of object or dtype: raised as `TypeError`.
    Type(String),
    /// Right kind of object, wrong value (shape, layout, aliasing, count): `ValueError`.
    Value(String),
}

impl From<StepError> for PyErr {
    fn from(e: StepError) -> PyErr {
        match e {
            StepError::Type(m) => PyTypeError::new_err(m),
            StepError::Value(m) => PyValueError::new_err(m),
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
