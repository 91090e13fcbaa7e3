//! The Adafactor step (`_core.step_adafactor`): every parameter, gradient, state array and step
//! counter checked, and every written range apart from every other, before anything is
//! written; then `optirs_core::adafactor`'s passes with the interpreter released.

use numpy::PyUntypedArrayMethods;
use pyo3::prelude::*;

use optirs_core::adafactor::{self, Factoring, Hyper, Param};
use optirs_core::overlap::{check_overlaps_reusing, Role, Span};
use optirs_core::{CoreError, Locate, Location, Options};

use crate::errors::Result;
use crate::hyper;
use crate::ndarray::{as_array, check_buffer, check_writeable, data_ptr, Dtypes};
use crate::step::{
    check_one_each, check_param_array, check_step, read_groups, record, required, UPDATES,
};

/// The state entries, in the order a state tuple holds them (torch's `_init_group` order).
pub(crate) const NAMES: [&str; 3] = ["row_var", "col_var", "variance"];

/// Validates one parameter and records its memory for the overlap check.
#[allow(clippy::too_many_lines)] // one pass, each check by its array
#[allow(clippy::too_many_arguments)]
fn check<'py>(
    hyper: Hyper,
    rounding: crate::step::Rounding,
    at: Location,
    dtypes: &Dtypes<'_>,
    objs: [&Bound<'py, PyAny>; 4],
    spans: &mut Vec<Span>,
    keep: &mut Vec<Bound<'py, PyAny>>,
) -> std::result::Result<Param, CoreError> {
    let [param, grad, state, step] = objs;
    let (param, dtype) = check_param_array(param, dtypes, at, |_| true, UPDATES)?;
    let shape = param.shape().to_vec();
    let len = param.len();
    let grad = as_array(grad, &|| at.grad()).arg("grad")?;
    check_buffer(grad, dtypes, dtype, &shape, &|| at.grad(), at).arg("grad")?;
    record(spans, at, param, dtype.size(), true, Role::Param);
    record(spans, at, grad, dtype.size(), false, Role::Grad);

    // As torch's `_init_group`: factored over the last two dimensions when the gradient has
    // more than one.
    let n = shape.len();
    let (factoring, wanted): (Factoring, Vec<(usize, Vec<usize>)>) = if n > 1 {
        let mut row = shape.clone();
        row[n - 1] = 1;
        let mut col = shape.clone();
        col[n - 2] = 1;
        (
            Factoring::Matrix {
                batch: shape[..n - 2].iter().product(),
                rows: shape[n - 2],
                cols: shape[n - 1],
            },
            vec![(0, row), (1, col)],
        )
    } else {
        (Factoring::Vector, vec![(2, shape.clone())])
    };
    let mut ptrs = [std::ptr::null_mut(); 2];
    for (k, (i, want)) in wanted.into_iter().enumerate() {
        let name = NAMES[i];
        let what = || at.state(name);
        let arg = format!("state['{name}']");
        let obj = required(state.get_item(i), &what, &arg)?;
        let arr = as_array(&obj, &what).arg(&arg)?;
        check_buffer(arr, dtypes, dtype, &want, &what, at).arg(&arg)?;
        check_writeable(arr, &what).arg(&arg)?;
        ptrs[k] = data_ptr(arr);
        record(spans, at, arr, dtype.size(), true, Role::State(name));
        keep.push(obj.clone());
    }
    let (_, slot, count, _) = check_step(step, dtypes, at, spans)?;
    // The master copy follows the three state entries.
    let (sr_key, master) = crate::step::check_rounding(
        NAMES.len(),
        rounding,
        dtype,
        &shape,
        at,
        dtypes,
        state,
        spans,
        keep,
    )?;
    // SAFETY: the parameter, gradient and state are ndarrays of `dtype` of the shapes checked
    // above (the state of `factoring`'s sizes), C-contiguous and aligned, the written ones
    // writeable; the caller holds every one (`keep`, and its own argument lists) until the
    // work returns, and runs the overlap check over `spans` before it.
    let mut checked = unsafe {
        Param::new(
            dtype,
            len,
            data_ptr(param),
            data_ptr(grad).cast_const(),
            factoring,
            ptrs,
            Some(slot),
            count,
            hyper,
        )
    };
    if let Some(key) = sr_key {
        checked = checked.with_stochastic_rounding(key);
    }
    if let Some(m) = master {
        // SAFETY: a float32 ndarray of the parameter's shape (so `len` elements in its element
        // order), C-contiguous and aligned (check_rounding's check_buffer), writeable, held
        // (`keep`) until the work returns, its memory in `spans` for the overlap check; a
        // 16-bit parameter (checked there).
        checked = unsafe { checked.with_master(m) };
    }
    Ok(checked)
}

/// One Adafactor step; see `_core.step_adafactor` in the stubs. Each state tuple is
/// `(row_var, col_var, variance)`, the entries a parameter does not use None or ignored.
///
/// # Errors
/// A [`CoreError`] for any input that does not fit, or where torch's step raises; nothing has
/// been written then.
#[allow(clippy::needless_pass_by_value)]
pub(crate) fn run(
    py: Python<'_>,
    groups: &Bound<'_, PyAny>,
    params: Vec<Bound<'_, PyAny>>,
    grads: Vec<Bound<'_, PyAny>>,
    states: Vec<Bound<'_, PyAny>>,
    steps: Vec<Bound<'_, PyAny>>,
    options: &Options,
    bf16_bits: bool,
) -> Result<bool> {
    let n = params.len();
    let (hypers, roundings, group_of) = read_groups(groups, n, hyper::adafactor)?;
    check_one_each(n, group_of.len(), [grads.len(), states.len(), steps.len()])?;
    let dtypes = Dtypes::new(py, bf16_bits);
    let mut checked = Vec::new();
    let mut located = Vec::new();
    let mut spans = Vec::with_capacity(n * 5);
    let mut keep = Vec::new();
    for (flat, grad) in grads.iter().enumerate() {
        if grad.is_none() {
            continue;
        }
        let (group, index) = group_of[flat];
        let at = Location { flat, group, index };
        let objs = [&params[flat], grad, &states[flat], &steps[flat]];
        checked.push(
            check(
                hypers[group],
                roundings[group],
                at,
                &dtypes,
                objs,
                &mut spans,
                &mut keep,
            )
            .at(at)?,
        );
        located.push(at);
    }
    check_overlaps_reusing(&spans)?;
    let locate = |(i, e): (Option<usize>, CoreError)| match i {
        Some(i) => {
            let at = located[i];
            let message = e.message.replace(adafactor::PARAM, &at.param());
            CoreError { message, ..e }.at(at)
        }
        None => e,
    };
    let work = adafactor::prepare(checked, options).map_err(locate)?;
    // `params`, `grads`, `steps` and `keep` hold every array alive until the work is done.
    let applied = py.detach(move || work.run()).map_err(locate)?;
    drop(keep);
    if applied {
        crate::step::count_sr_steps(groups, &roundings)?;
    }
    Ok(applied)
}
