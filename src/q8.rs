//! The 8-bit Adam step (`_core.step_adam8bit`): Adam/AdamW hyperparameters, each parameter's
//! state either 8-bit (codes and per-block absmaxes, `optirs_core::kernels::adam8bit`) or, for
//! small tensors, float32 Adam state in the parameter's dtype, validated as `step` validates
//! (every array checked and held, every written range apart from every other) before anything
//! is written; then one parallel step over both.

use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use optirs_core::kernels::Rule;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use optirs_core::overlap::{check_overlaps_reusing, Role, Span};
use optirs_core::{
    CheckedQ8, CoreError, DType, Hyper, Kind, Locate, Location, Options, RuleMemo, RuleOf,
};

use crate::errors::{type_err, value_err, Result};
use crate::hyper;
use crate::ndarray::{
    as_array, check_buffer, check_layout, check_writeable, data_ptr, dtype_str, Dtypes,
};
use crate::step::{
    check_one_each, check_param, check_param_array, check_step, read_groups, record, required,
};

/// The 8-bit state entries, in the order a state tuple holds them.
pub(crate) const Q8_NAMES: [&str; 4] = [
    "exp_avg",
    "exp_avg_sq",
    "exp_avg_absmax",
    "exp_avg_sq_absmax",
];

fn is_u8(a: &Bound<'_, PyUntypedArray>) -> bool {
    a.dtype().is_equiv_to(&numpy::dtype::<u8>(a.py()))
}

/// Validates one 8-bit parameter and records its memory for the overlap check.
#[allow(clippy::too_many_arguments, clippy::too_many_lines)] // one pass, each check by its array
fn check_q8<'py>(
    hyper: &Hyper,
    rounding: crate::step::Rounding,
    rules: &mut RuleMemo,
    at: Location,
    dtypes: &Dtypes<'_>,
    objs: [&Bound<'py, PyAny>; 4],
    block: usize,
    spans: &mut Vec<Span>,
    keep: &mut Vec<Bound<'py, PyAny>>,
) -> std::result::Result<CheckedQ8, CoreError> {
    let [param, grad, state, step] = objs;
    let (param, dtype) = check_param_array(
        param,
        dtypes,
        at,
        |d| d != DType::F64,
        "8-bit Adam updates float32, float16 and bfloat16 arrays",
    )?;
    let shape = param.shape();
    let len = param.len();
    let blocks = len.div_ceil(block);
    let grad = as_array(grad, &|| at.grad()).arg("grad")?;
    check_buffer(grad, dtypes, dtype, shape, &|| at.grad(), at).arg("grad")?;
    record(spans, at, param, dtype.size(), true, Role::Param);
    record(spans, at, grad, dtype.size(), false, Role::Grad);

    let mut codes = [std::ptr::null_mut(); 2];
    let mut absmax = [std::ptr::null_mut(); 2];
    for (i, name) in Q8_NAMES.iter().enumerate() {
        let what = || at.state(name);
        let arg = format!("state['{name}']");
        let obj = required(state.get_item(i), &what, &arg)?;
        let arr = as_array(&obj, &what).arg(&arg)?;
        if i < 2 {
            if !is_u8(arr) {
                return type_err!("{} has dtype {}, expected uint8", what(), dtype_str(arr))
                    .arg(&arg);
            }
            if arr.shape() != shape {
                return value_err!(
                    "{} has shape {:?}, expected {:?} (the shape of {})",
                    what(),
                    arr.shape(),
                    shape,
                    at.param()
                )
                .arg(&arg);
            }
        } else {
            if dtypes.of(arr) != Some(DType::F32) {
                return type_err!("{} has dtype {}, expected float32", what(), dtype_str(arr))
                    .arg(&arg);
            }
            if arr.shape() != [blocks] {
                return value_err!(
                    "{} has shape {:?}, expected ({blocks},): one absmax per block of {block} \
                     elements",
                    what(),
                    arr.shape()
                )
                .arg(&arg);
            }
        }
        check_layout(arr, &what).arg(&arg)?;
        check_writeable(arr, &what).arg(&arg)?;
        let ptr = data_ptr(arr);
        if i < 2 {
            // `len` codes (the parameter's shape, checked above).
            record(spans, at, arr, 1, true, Role::State(name));
            codes[i] = ptr;
        } else {
            // `blocks` float32s (checked above).
            record(spans, at, arr, 4, true, Role::State(name));
            // A float32 array checked aligned (check_layout): its data is 4-byte aligned.
            #[allow(clippy::cast_ptr_alignment)]
            let f = ptr.cast::<f32>();
            absmax[i - 2] = f;
        }
        keep.push(obj.clone());
    }
    let (_, slot, count, _) = check_step(step, dtypes, at, spans)?;
    let RuleOf::F32(Rule::Adam(k)) = rules.get(at.group, hyper, dtype, count, false)? else {
        unreachable!("Adam hyperparameters give Adam's float32 scalars for a 16/32-bit dtype")
    };
    // The master copy follows the four 8-bit entries.
    let (sr_key, master) = crate::step::check_rounding(
        Q8_NAMES.len(),
        rounding,
        dtype,
        shape,
        at,
        dtypes,
        state,
        spans,
        keep,
    )?;
    // SAFETY: the parameter and gradient are ndarrays of `dtype` with `len` elements, the codes
    // uint8 arrays of the parameter's shape, the absmaxes float32 arrays of `blocks` elements,
    // all C-contiguous and aligned, the written ones writeable; the caller holds every one
    // (`keep`, and its own argument lists) until the work returns, and runs the overlap check
    // over `spans` before it.
    let mut checked = unsafe {
        CheckedQ8::new(
            dtype,
            len,
            block,
            data_ptr(param),
            data_ptr(grad).cast_const(),
            codes,
            absmax,
            Some(slot),
            k,
        )
    };
    if let Some(key) = sr_key {
        checked = checked.with_stochastic_rounding(key);
    }
    if let Some(m) = master {
        // SAFETY: a float32 ndarray of the parameter's shape (so `len` elements), C-contiguous
        // and aligned (check_rounding's check_buffer), writeable, held (`keep`) until the work
        // returns, its memory in `spans` for the overlap check; a 16-bit parameter (checked
        // there). Its data is 4-byte aligned, as a float32 array checked aligned.
        #[allow(clippy::cast_ptr_alignment)]
        let m = m.cast::<f32>();
        checked = unsafe { checked.with_master(m) };
    }
    Ok(checked)
}

/// One 8-bit Adam step; see `_core.step_adam8bit` in the stubs. A state tuple of four entries
/// is 8-bit state, of two float Adam state in the parameter's dtype.
///
/// # Errors
/// A [`CoreError`] for any input that does not fit; nothing has been written then.
#[allow(clippy::needless_pass_by_value, clippy::too_many_arguments)]
pub(crate) fn run(
    py: Python<'_>,
    groups: &Bound<'_, PyAny>,
    params: Vec<Bound<'_, PyAny>>,
    grads: Vec<Bound<'_, PyAny>>,
    states: Vec<Bound<'_, PyAny>>,
    steps: Vec<Bound<'_, PyAny>>,
    block: usize,
    options: &Options,
    bf16_bits: bool,
) -> Result<bool> {
    if !(1..=optirs_core::kernels::adam8bit::MAX_BLOCK).contains(&block) {
        return Ok(value_err!(
            "block_size must be between 1 and {}, got {block}",
            optirs_core::kernels::adam8bit::MAX_BLOCK
        )?);
    }
    let n = params.len();
    let (hypers, roundings, group_of) = read_groups(groups, n, |group, gi| {
        let h = hyper::read(Kind::Adam, group, gi)?;
        if let Hyper::Adam(a, _) = &h {
            if a.amsgrad {
                return value_err!("8-bit Adam does not support amsgrad=True")
                    .map_err(|e: CoreError| e.in_group(gi).arg("amsgrad"));
            }
        }
        Ok(h)
    })?;
    check_one_each(n, group_of.len(), [grads.len(), states.len(), steps.len()])?;
    let dtypes = Dtypes::new(py, bf16_bits);
    let mut rules = RuleMemo::default();
    let mut checked = Vec::new();
    let mut q8 = Vec::new();
    let mut spans = Vec::with_capacity(n * 6);
    let mut keep = Vec::new();
    for (flat, grad) in grads.iter().enumerate() {
        if grad.is_none() {
            continue;
        }
        let (group, index) = group_of[flat];
        let at = Location { flat, group, index };
        let objs = [&params[flat], grad, &states[flat], &steps[flat]];
        // 8-bit state has its `exp_avg_absmax` third; float Adam state has nothing there (its
        // `max_exp_avg_sq`, and amsgrad is refused), before a master copy fourth.
        let eight = states[flat].cast::<PyTuple>().is_ok_and(|t| {
            (Q8_NAMES.len()..=Q8_NAMES.len() + 1).contains(&t.len())
                && t.get_item(2).is_ok_and(|x| !x.is_none())
        });
        if eight {
            q8.push(
                check_q8(
                    &hypers[group],
                    roundings[group],
                    &mut rules,
                    at,
                    &dtypes,
                    objs,
                    block,
                    &mut spans,
                    &mut keep,
                )
                .at(at)?,
            );
        } else {
            checked.push(
                check_param(
                    Kind::Adam,
                    &hypers[group],
                    None,
                    roundings[group],
                    &mut rules,
                    at,
                    &dtypes,
                    objs,
                    false,
                    &mut spans,
                    &mut keep,
                    None,
                )
                .at(at)?,
            );
        }
    }
    check_overlaps_reusing(&spans)?;
    let work = optirs_core::prepare_with_q8(checked, q8, options)?;
    // `params`, `grads`, `steps` and `keep` hold every array alive until the work is done.
    let applied = py.detach(move || work.run());
    drop(keep);
    if applied {
        crate::step::count_sr_steps(groups, &roundings)?;
    }
    Ok(applied)
}
