//! The bindings' error: the core's typed error, or a Python exception raised while reading
//! Python objects. Rendered into a Python exception in one place, [`From<Error> for PyErr`],
//! which only the panic boundary (`boundary::entry`) uses.

use pyo3::exceptions::{
    PyNotImplementedError, PyOverflowError, PyRuntimeError, PyTypeError, PyValueError,
    PyZeroDivisionError,
};
use pyo3::PyErr;

use optirs_core::{CoreError, ErrorKind, TorchRaises};

pub(crate) use optirs_core::{type_err, value_err};

/// What an entry point of the extension fails with.
#[derive(Debug)]
pub(crate) enum Error {
    /// A user's mistake found by the core or by the bindings' validation; nothing written.
    Core(CoreError),
    /// An exception raised by Python code the bindings called, passed on as it is.
    Py(PyErr),
}

impl From<CoreError> for Error {
    fn from(e: CoreError) -> Error {
        Error::Core(e)
    }
}

impl From<PyErr> for Error {
    fn from(e: PyErr) -> Error {
        Error::Py(e)
    }
}

impl From<pyo3::CastError<'_, '_>> for Error {
    fn from(e: pyo3::CastError<'_, '_>) -> Error {
        Error::Py(e.into())
    }
}

impl From<pyo3::CastIntoError<'_>> for Error {
    fn from(e: pyo3::CastIntoError<'_>) -> Error {
        Error::Py(e.into())
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Py(e) => e,
            Error::Core(e) => {
                let m = e.message;
                match e.kind {
                    ErrorKind::Type => PyTypeError::new_err(m),
                    ErrorKind::Value => PyValueError::new_err(m),
                    ErrorKind::Torch(TorchRaises::ZeroDivision) => PyZeroDivisionError::new_err(m),
                    ErrorKind::Torch(TorchRaises::Overflow) => PyOverflowError::new_err(m),
                    ErrorKind::Torch(TorchRaises::Runtime) => PyRuntimeError::new_err(m),
                    ErrorKind::Torch(TorchRaises::NotImplemented) => {
                        PyNotImplementedError::new_err(m)
                    }
                }
            }
        }
    }
}

/// What the bindings' functions return.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;
