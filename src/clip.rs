//! Gradient norms and clipping (`_core.grad_norm`, `_core.scale_grads`): validate the arrays,
//! hold them, release the interpreter, and run the core's passes (`optirs_core::norm`).
//!
//! # What keeps the pointers valid
//! Each `GradRef` is the data pointer of an ndarray in the call's argument vector (owned by
//! the call until it returns), checked to be of a supported dtype, C-contiguous and aligned.
//! `scale_grads` also checks each writeable and all of them pairwise disjoint, which is what
//! `GradRef::new` asks of a written gradient.

use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

use optirs_core::norm::{self, GradRef, NormType};
use optirs_core::{CoreError, DType, ErrorKind, TorchRaises};

use crate::errors::{type_err, value_err};
use crate::ndarray::{as_array, check_layout, check_writeable, data_ptr, dtype_str, span, Dtypes};

/// A gradient as the core reads it, and the bytes it covers.
type Held = (GradRef, (usize, usize));

/// Checks every gradient; returns them as the core reads them, and their byte spans.
fn check(
    grads: &[Bound<'_, PyAny>],
    dtypes: &Dtypes<'_>,
    writes: bool,
) -> Result<Vec<Held>, CoreError> {
    let mut out = Vec::with_capacity(grads.len());
    for (i, g) in grads.iter().enumerate() {
        let what = || format!("grads[{i}]");
        let a: &Bound<'_, PyUntypedArray> = as_array(g, &what)?;
        let Some(dtype) = dtypes.of(a) else {
            return type_err!(
                "{} has dtype {}; optirs takes float32, float64, float16 and bfloat16 arrays",
                what(),
                dtype_str(a)
            );
        };
        check_layout(a, &what)?;
        if writes {
            check_writeable(a, &what)?;
        }
        // SAFETY: a contiguous, aligned array of `dtype` with `a.len()` elements, held by the
        // caller's argument vector until the pass returns (see the module's documentation;
        // disjointness for writes is checked by the caller).
        let r = unsafe { GradRef::new(dtype, data_ptr(a).cast_const(), a.len()) };
        out.push((r, span(a, dtype)));
    }
    Ok(out)
}

/// The total norm: `(norm, dtype name, clip coefficient or None)`.
pub(crate) fn grad_norm(
    py: Python<'_>,
    grads: &[Bound<'_, PyAny>],
    norm_type: f64,
    max_norm: Option<f64>,
    bf16_bits: bool,
) -> Result<(f64, &'static str, Option<f64>), CoreError> {
    if norm_type.is_nan() {
        return value_err!("norm_type must be a number, got nan");
    }
    let checked = check(grads, &Dtypes::new(py, bf16_bits), false)?;
    let refs: Vec<GradRef> = checked.into_iter().map(|(r, _)| r).collect();
    let p = NormType::of(norm_type);
    // A maximum or minimum of nothing: torch raises (from `_foreach_norm` for inf, from
    // `vector_norm` for -inf, which the foreach path leaves to it).
    if refs.iter().any(GradRef::is_empty) {
        let op = match p {
            NormType::Inf => Some("_foreach_norm cannot compute the infinity norm"),
            NormType::NegInf => Some("linalg.vector_norm cannot compute the -inf norm"),
            _ => None,
        };
        if let Some(op) = op {
            return Err(CoreError::new(
                ErrorKind::Torch(TorchRaises::Runtime),
                format!("{op} on an empty tensor because the operation does not have an identity"),
            ));
        }
    }
    let found = py.detach(|| norm::total_norm(&refs, p));
    // torch returns tensor(0.) (float32) for no gradients.
    let (total, dtype) = found.unwrap_or((0.0, DType::F32));
    let coef = max_norm.map(|m| norm::clip_coef(m, total, dtype));
    Ok((total, dtype.name(), coef))
}

/// Multiplies every gradient by `coef` in place.
pub(crate) fn scale_grads(
    py: Python<'_>,
    grads: &[Bound<'_, PyAny>],
    coef: f64,
    bf16_bits: bool,
) -> Result<(), CoreError> {
    let checked = check(grads, &Dtypes::new(py, bf16_bits), true)?;
    let mut spans: Vec<(usize, usize, usize)> = checked
        .iter()
        .enumerate()
        .filter(|(_, (_, (s, e)))| e > s)
        .map(|(i, (_, (s, e)))| (*s, *e, i))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return value_err!(
                "grads[{}] and grads[{}] share memory: each gradient is scaled once, in place",
                w[0].2.min(w[1].2),
                w[0].2.max(w[1].2)
            );
        }
    }
    let refs: Vec<GradRef> = checked.into_iter().map(|(r, _)| r).collect();
    // SAFETY: every array is held by `grads` until this returns, writeable (checked), and no
    // two overlap (checked above); nothing else of this call reads or writes them.
    py.detach(|| unsafe { norm::scale(&refs, coef) });
    Ok(())
}
