//! The one panic boundary: every `#[pyfunction]`, `#[pymethods]` method and the module's
//! initialisation run their body through [`entry`], which turns a panic (a bug, never a user's
//! mistake) into `RuntimeError` instead of letting it unwind into Python, and the bindings'
//! errors into Python exceptions (`errors`).

use pyo3::exceptions::PyRuntimeError;
use pyo3::{PyErr, PyResult};

use optirs_core::panic_message;

use crate::errors::Result;

/// Runs the body of an entry point.
pub(crate) fn entry<T>(f: impl FnOnce() -> Result<T>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(PyErr::from),
        Err(payload) => Err(PyRuntimeError::new_err(format!(
            "optirs internal error (please report it): {}",
            panic_message(payload.as_ref())
        ))),
    }
}
