//! Reading NumPy arrays: their dtype as the core's [`DType`], their header fields, and the
//! checks every array of a step must pass (layout, dtype and shape against its parameter).

use numpy::npyffi::{NPY_ARRAY_ALIGNED, NPY_ARRAY_WRITEABLE};
use numpy::{dtype, PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use optirs_core::{CoreError, DType, Location};

use crate::errors::{type_err, value_err};

pub(crate) fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .name()
        .map_or_else(|_| "object".to_owned(), |n| n.to_string())
}

pub(crate) fn as_array<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    what: &dyn Fn() -> String,
) -> Result<&'a Bound<'py, PyUntypedArray>, CoreError> {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => Ok(a),
        Err(_) => type_err!("{} must be a numpy.ndarray, got {}", what(), type_name(obj)),
    }
}

/// The descriptors of the dtypes the core takes, fetched once per step: most arrays share
/// NumPy's builtin descriptors, so a pointer comparison settles their dtype.
///
/// NumPy has no bfloat16 of its own. The NumPy API takes `ml_dtypes.bfloat16` (the dtype JAX
/// and TensorFlow hand to NumPy), once the user's program has imported `ml_dtypes`; the torch
/// bridge hands bfloat16 tensors over as their uint16 bit patterns (`bf16_bits`). Integer
/// arrays are refused everywhere else: a uint16 array in the NumPy API is integer data.
pub(crate) struct Dtypes<'py> {
    known: Vec<(Bound<'py, PyArrayDescr>, DType)>,
}

/// `numpy.dtype(ml_dtypes.bfloat16)`, once `ml_dtypes` has been imported by someone.
static ML_BFLOAT16: PyOnceLock<Py<PyArrayDescr>> = PyOnceLock::new();

fn ml_bfloat16(py: Python<'_>) -> Option<Bound<'_, PyArrayDescr>> {
    if let Some(d) = ML_BFLOAT16.get(py) {
        return Some(d.bind(py).clone());
    }
    // Only a module already imported: importing ml_dtypes here would cost every program that
    // never uses it.
    let modules = PyModule::import(py, "sys").ok()?.getattr("modules").ok()?;
    let ml = modules.get_item("ml_dtypes").ok()?;
    let descr = PyArrayDescr::new(py, &ml.getattr("bfloat16").ok()?).ok()?;
    if descr.itemsize() != 2 {
        return None;
    }
    Some(
        ML_BFLOAT16
            .get_or_init(py, || descr.unbind())
            .bind(py)
            .clone(),
    )
}

impl<'py> Dtypes<'py> {
    pub(crate) fn new(py: Python<'py>, bf16_bits: bool) -> Self {
        let mut known = vec![
            (dtype::<f32>(py), DType::F32),
            (dtype::<f64>(py), DType::F64),
            (dtype::<half::f16>(py), DType::F16),
        ];
        if bf16_bits {
            known.push((dtype::<u16>(py), DType::Bf16));
        } else if let Some(bf16) = ml_bfloat16(py) {
            known.push((bf16, DType::Bf16));
        }
        Dtypes { known }
    }

    pub(crate) fn of(&self, a: &Bound<'_, PyUntypedArray>) -> Option<DType> {
        // SAFETY: `a` is a live ndarray; reading its descriptor pointer has no side effects.
        let descr = unsafe { (*a.as_array_ptr()).fields.descr };
        if let Some((_, dt)) = self.known.iter().find(|(d, _)| d.as_ptr().cast() == descr) {
            return Some(*dt);
        }
        // Equal but distinct descriptors (e.g. made by np.dtype('<f4')).
        let d = a.dtype();
        self.known
            .iter()
            .find(|(k, _)| d.is_equiv_to(k))
            .map(|(_, dt)| *dt)
    }
}

pub(crate) fn dtype_str(a: &Bound<'_, PyUntypedArray>) -> String {
    a.dtype().to_string()
}

fn flags(a: &Bound<'_, PyUntypedArray>) -> i32 {
    // SAFETY: `a` is a live ndarray; reading its flags field has no side effects.
    unsafe { (*a.as_array_ptr()).fields.flags }
}

pub(crate) fn is_writeable(a: &Bound<'_, PyUntypedArray>) -> bool {
    flags(a) & NPY_ARRAY_WRITEABLE != 0
}

/// Refuses an array the step writes that NumPy marks read-only.
pub(crate) fn check_writeable(
    a: &Bound<'_, PyUntypedArray>,
    what: &dyn Fn() -> String,
) -> Result<(), CoreError> {
    if is_writeable(a) {
        Ok(())
    } else {
        value_err!("{} is read-only (its writeable flag is False)", what())
    }
}

pub(crate) fn data_ptr(a: &Bound<'_, PyUntypedArray>) -> *mut u8 {
    // SAFETY: as above, a plain field read.
    unsafe { (*a.as_array_ptr()).fields.data.cast() }
}

/// Contiguous and aligned to its dtype: what a Rust slice over its memory needs.
pub(crate) fn check_layout(
    a: &Bound<'_, PyUntypedArray>,
    what: &dyn Fn() -> String,
) -> Result<(), CoreError> {
    if !a.is_c_contiguous() {
        return value_err!("{} must be C-contiguous", what());
    }
    if flags(a) & NPY_ARRAY_ALIGNED == 0 {
        return value_err!(
            "{} is not aligned to its dtype (its address is not a multiple of {} bytes); \
             pass an aligned copy, e.g. np.require(x, requirements='CA')",
            what(),
            a.dtype().itemsize()
        );
    }
    Ok(())
}

/// The bytes an array of `dtype` covers: `[start, end)`. Only meaningful for contiguous arrays.
pub(crate) fn span(a: &Bound<'_, PyUntypedArray>, dtype: DType) -> (usize, usize) {
    let start = data_ptr(a) as usize;
    (start, start + a.len() * dtype.size())
}

/// Checks a gradient or state buffer against its parameter's dtype and shape, and its layout.
pub(crate) fn check_buffer(
    a: &Bound<'_, PyUntypedArray>,
    dtypes: &Dtypes<'_>,
    want: DType,
    shape: &[usize],
    what: &dyn Fn() -> String,
    at: Location,
) -> Result<(), CoreError> {
    let got = dtypes.of(a);
    if got != Some(want) {
        return type_err!(
            "{} has dtype {}, expected {} (the dtype of {})",
            what(),
            // The torch bridge hands bfloat16 over as its uint16 bits: named as torch names it.
            got.map_or_else(|| dtype_str(a), |d| d.name().to_owned()),
            want.name(),
            at.param()
        );
    }
    if a.shape() != shape {
        return value_err!(
            "{} has shape {:?}, expected {:?} (the shape of {})",
            what(),
            a.shape(),
            shape,
            at.param()
        );
    }
    check_layout(a, what)
}
