//! The full step (`_core.step`): read the hyperparameters, validate every array, hold them,
//! then release the interpreter and let the core update in parallel.
//!
//! Nothing is written until every check has passed, so a step that raises leaves all
//! parameters, gradients and state exactly as they were.
//!
//! # What keeps the pointers valid
//! Each [`Checked`] built here (`check_param`) holds raw addresses, used with the interpreter
//! released, when any other Python thread may run. Each one is the data pointer of an ndarray
//! that this call holds a strong reference to until the work returns: the argument vectors
//! `params`, `grads` and `steps` are owned by the call, and each state array read out of
//! `buffers` (which may be a list that another thread empties) is pushed onto `keep`; a plan
//! holds its arrays itself (see `array_plan` and `torch_plan`). A referenced ndarray's memory
//! cannot go away: NumPy refuses `resize()` on an array referenced elsewhere (unless the caller
//! passes `refcheck=False`, which NumPy documents as unsafe), and `ndarray.data` cannot be
//! assigned. Each array is checked to be of the parameter's dtype and length, C-contiguous and
//! aligned, and the overlap check (`optirs_core::overlap`) makes every written range disjoint
//! from every other range of the step: what `Checked::new` asks of its caller.
//!
//! # A step that fails part-way
//! See `optirs_core::engine`: a panic after the work began surfaces as `RuntimeError` (at the
//! panic boundary) saying the step stopped part-way.

use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyTuple, PyTupleMethods};

use optirs_core::overlap::{check_overlaps_reusing, Role, Span};
use optirs_core::{
    counter_at, Checked, CounterSlot, DType, Hyper, Kind, Locate, Location, Options, RuleMemo,
    MAX_SCALARS,
};

use optirs_core::kernels::sr::SrKey;

use crate::array_plan::{ArrayPlan, Stepped};
use crate::course::run_detached;
use crate::errors::{type_err, value_err, Result};
use crate::hyper;
use crate::ndarray::{
    as_array, check_buffer, check_layout, check_writeable, data_ptr, dtype_str, span, Dtypes,
};

/// Checks a step counter; returns where its new value goes and that value as torch reads it
/// back: `step_t += 1` in the counter's dtype, then `step_t.item()`.
pub(crate) fn check_counter(
    s: &Bound<'_, PyUntypedArray>,
    dtypes: &Dtypes<'_>,
    what: &dyn Fn() -> String,
) -> std::result::Result<(CounterSlot<'static>, f64, DType), optirs_core::CoreError> {
    let counter_dtype = dtypes
        .of(s)
        .filter(|d| matches!(d, DType::F32 | DType::F64));
    let (Some(counter_dtype), 0) = (counter_dtype, s.ndim()) else {
        return type_err!(
            "{} must be a 0-d float32 (or float64) array, got dtype {} with shape {:?}",
            what(),
            dtype_str(s),
            s.shape()
        );
    };
    check_layout(s, what)?;
    check_writeable(s, what)?;
    // SAFETY: a 0-d array of that dtype, aligned (check_layout), holds exactly one element;
    // the overlap check keeps any other array of the step away from it, and the step holds
    // the array (`steps`) until it returns.
    let (slot, old, new) = unsafe { counter_at(data_ptr(s), counter_dtype == DType::F64) };
    // A count below zero makes the bias corrections divide by zero or change sign: every
    // parameter would turn to NaN or garbage.
    if !(old.is_finite() && old >= 0.0) {
        return value_err!("{} must be a finite step count >= 0, got {old}", what());
    }
    Ok((slot, new, counter_dtype))
}

/// Records the memory of `a`, an array of `itemsize`-byte elements of the parameter at `at`,
/// for the overlap check; an empty array has none to record.
pub(crate) fn record(
    spans: &mut Vec<Span>,
    at: Location,
    a: &Bound<'_, PyUntypedArray>,
    itemsize: usize,
    writes: bool,
    role: Role,
) {
    let start = data_ptr(a) as usize;
    let end = start + a.len() * itemsize;
    if end > start {
        spans.push(Span {
            start,
            end,
            writes,
            role,
            at,
        });
    }
}

/// The step counter `state['step']` of the parameter at `at`: there, and as
/// [`check_counter`] checks it; its memory recorded for the overlap check. Returns the array,
/// then what [`check_counter`] returns.
#[allow(clippy::type_complexity)]
pub(crate) fn check_step<'a, 'py>(
    step: &'a Bound<'py, PyAny>,
    dtypes: &Dtypes<'_>,
    at: Location,
    spans: &mut Vec<Span>,
) -> std::result::Result<
    (
        &'a Bound<'py, PyUntypedArray>,
        CounterSlot<'static>,
        f64,
        DType,
    ),
    optirs_core::CoreError,
> {
    let what = || at.state("step");
    if step.is_none() {
        return value_err!("{} is missing", what()).arg("state['step']");
    }
    let s = as_array(step, &what).arg("state['step']")?;
    let (slot, count, counter_dtype) = check_counter(s, dtypes, &what).arg("state['step']")?;
    // A 0-d array: never empty, always recorded.
    record(
        spans,
        at,
        s,
        counter_dtype.size(),
        true,
        Role::State("step"),
    );
    Ok((s, slot, count, counter_dtype))
}

/// A parameter's own array: an ndarray whose dtype `accept` takes (else a TypeError naming
/// the dtypes, `takes`, that the step updates), C-contiguous, aligned and writeable. Every
/// error names the argument `param`.
pub(crate) fn check_param_array<'a, 'py>(
    param: &'a Bound<'py, PyAny>,
    dtypes: &Dtypes<'_>,
    at: Location,
    accept: fn(DType) -> bool,
    takes: &str,
) -> std::result::Result<(&'a Bound<'py, PyUntypedArray>, DType), optirs_core::CoreError> {
    let what = || at.param();
    let param = as_array(param, &what).arg("param")?;
    let Some(dtype) = dtypes.of(param).filter(|d| accept(*d)) else {
        return type_err!("{} has dtype {}; {takes}", what(), dtype_str(param)).arg("param");
    };
    check_layout(param, &what).arg("param")?;
    check_writeable(param, &what).arg("param")?;
    Ok((param, dtype))
}

/// Entry `got` of a parameter's state, which must be there and not None (a ValueError naming
/// `arg` otherwise).
pub(crate) fn required<'py>(
    got: PyResult<Bound<'py, PyAny>>,
    what: &dyn Fn() -> String,
    arg: &str,
) -> std::result::Result<Bound<'py, PyAny>, optirs_core::CoreError> {
    match got {
        Ok(obj) if !obj.is_none() => Ok(obj),
        _ => value_err!("{} is missing", what()).arg(arg),
    }
}

/// Each group's hyperparameters (as `read` reads them from the group's dict and index) and
/// rounding options, and each flat parameter's `(group, index)`, in `param_groups` order.
#[allow(clippy::type_complexity)]
pub(crate) fn read_groups<H>(
    groups: &Bound<'_, PyAny>,
    n: usize,
    mut read: impl FnMut(&Bound<'_, PyAny>, usize) -> std::result::Result<H, optirs_core::CoreError>,
) -> std::result::Result<(Vec<H>, Vec<Rounding>, Vec<(usize, usize)>), optirs_core::CoreError> {
    let Ok(n_groups) = groups.len() else {
        return type_err!("param_groups must be a list of dicts");
    };
    let mut hypers = Vec::with_capacity(n_groups);
    let mut roundings = Vec::with_capacity(n_groups);
    let mut group_of = Vec::with_capacity(n);
    for gi in 0..n_groups {
        let Ok(group) = groups.get_item(gi) else {
            return type_err!("param_groups must be a list of dicts");
        };
        hypers.push(read(&group, gi)?);
        roundings.push(Rounding::read(&group, gi)?);
        let len = hyper::len_params(&group, gi)?;
        group_of.extend((0..len).map(|index| (gi, index)));
    }
    Ok((hypers, roundings, group_of))
}

/// Refuses argument lists that do not hold one entry per parameter of `param_groups` (`n`
/// parameters in the lists, `in_groups` in the groups), for the steps that take a gradient, a
/// state tuple and a step counter per parameter.
pub(crate) fn check_one_each(
    n: usize,
    in_groups: usize,
    lens: [usize; 3],
) -> std::result::Result<(), optirs_core::CoreError> {
    if in_groups != n || lens.iter().any(|&len| len != n) {
        return value_err!(
            "expected one gradient, state tuple and step counter per parameter ({n})"
        );
    }
    Ok(())
}

/// The dtype a parameter of `dtype` keeps its state buffers in: its group's `state_dtype`,
/// else its own.
fn resolve_state_dtype(
    state_dtype: Option<DType>,
    dtype: DType,
    at: Location,
) -> std::result::Result<DType, optirs_core::CoreError> {
    match state_dtype {
        None => Ok(dtype),
        // bfloat16 state is computed in float32: a float64 parameter would lose its own
        // precision through it, so it is refused rather than silently computed in float32.
        Some(q) if dtype == DType::F64 && q != dtype => value_err!(
            "{} is float64, but its group asks for state_dtype={:?}; reduced-precision state \
             is kept for float32, float16 and bfloat16 parameters only (put float64 \
             parameters in a group with state_dtype=None)",
            at.param(),
            q.name()
        ),
        Some(q) => Ok(q),
    }
}

/// A state buffer of the group's `state_dtype` where that differs from the parameter's, named
/// as such (`check_buffer` names the parameter's dtype).
fn check_state_dtype(
    arr: &Bound<'_, PyUntypedArray>,
    dtypes: &Dtypes<'_>,
    dtype: DType,
    state_dtype: DType,
    what: &dyn Fn() -> String,
    at: Location,
) -> std::result::Result<(), optirs_core::CoreError> {
    let got = dtypes.of(arr);
    if state_dtype != dtype && got != Some(state_dtype) {
        return type_err!(
            "{} has dtype {}, expected {} (the state_dtype of param_groups[{}])",
            what(),
            got.map_or_else(|| dtype_str(arr), |d| d.name().to_owned()),
            state_dtype.name(),
            at.group
        );
    }
    Ok(())
}

/// Checks a per-parameter 0-d state scalar (NAdam's `mu_product`, ASGD's `eta`); returns its
/// dtype. torch keeps these float32, or in the parameter's dtype once a state dict is loaded.
fn check_scalar(
    s: &Bound<'_, PyUntypedArray>,
    dtypes: &Dtypes<'_>,
    what: &dyn Fn() -> String,
) -> std::result::Result<DType, optirs_core::CoreError> {
    let (Some(dtype), 0) = (dtypes.of(s), s.ndim()) else {
        return type_err!(
            "{} must be a 0-d floating-point array, got dtype {} with shape {:?}",
            what(),
            dtype_str(s),
            s.shape()
        );
    };
    check_layout(s, what)?;
    check_writeable(s, what)?;
    Ok(dtype)
}

/// The rule's per-parameter 0-d state (`Kind::scalar_names`), which follows the buffers in
/// the parameter's state tuple: each checked, its memory recorded for the overlap check and
/// held (`keep`) until the work returns. Returns each one's address and dtype, and with
/// `hold` the arrays, for a plan.
#[allow(clippy::type_complexity)]
fn check_scalars<'py>(
    kind: Kind,
    at: Location,
    dtypes: &Dtypes<'_>,
    buffers: &Bound<'py, PyAny>,
    spans: &mut Vec<Span>,
    keep: &mut Vec<Bound<'py, PyAny>>,
    hold: bool,
) -> std::result::Result<
    (
        [Option<(*mut u8, DType)>; MAX_SCALARS],
        [Option<(Bound<'py, PyUntypedArray>, DType)>; MAX_SCALARS],
    ),
    optirs_core::CoreError,
> {
    let first = kind.buffer_names().len();
    let mut ptrs = [None; MAX_SCALARS];
    let mut held = [None, None];
    for (j, name) in kind.scalar_names().iter().enumerate() {
        let what = || at.state(name);
        let arg = format!("state['{name}']");
        let obj = required(buffers.get_item(first + j), &what, &arg)?;
        let arr = as_array(&obj, &what).arg(&arg)?.clone();
        let dt = check_scalar(&arr, dtypes, &what).arg(&arg)?;
        // A 0-d array: never empty, always recorded.
        record(spans, at, &arr, dt.size(), true, Role::State(name));
        keep.push(obj);
        ptrs[j] = Some((data_ptr(&arr), dt));
        held[j] = hold.then_some((arr, dt));
    }
    Ok((ptrs, held))
}

/// The parameter's rounding options checked: stochastic rounding's key (bfloat16 parameters;
/// refused for float16, with master weights), and the float32 master copy's address (16-bit
/// parameters under `master_weights`: entry `master_at` of the state tuple, checked, its memory
/// recorded for the overlap check and held in `keep`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_rounding<'py>(
    master_at: usize,
    rounding: Rounding,
    dtype: DType,
    shape: &[usize],
    at: Location,
    dtypes: &Dtypes<'_>,
    buffers: &Bound<'py, PyAny>,
    spans: &mut Vec<Span>,
    keep: &mut Vec<Bound<'py, PyAny>>,
) -> std::result::Result<(Option<SrKey>, Option<*mut u8>), optirs_core::CoreError> {
    let group = at.group;
    let sr_key = match (rounding.stochastic, dtype) {
        (Some(_), _) if rounding.master => {
            return value_err!(
                "param_groups[{group}] asks for both bf16_stochastic_round and master_weights; \
                 a float32 master copy makes stochastic rounding unnecessary: choose one"
            )
            .arg("bf16_stochastic_round");
        }
        (Some(_), DType::F16) => {
            return value_err!(
                "{} is float16, but its group asks for bf16_stochastic_round, which rounds to \
                 bfloat16 only; keep float16 parameters with master_weights=True (or in a group \
                 without stochastic rounding)",
                at.param()
            )
            .arg("bf16_stochastic_round");
        }
        #[allow(clippy::cast_possible_truncation)] // a parameter's index fits 64 bits
        (Some((seed, sr_step)), DType::Bf16) => Some(SrKey::new(seed, sr_step, at.flat as u64)),
        // float32 and float64 parameters keep every bit of their result: nothing to round.
        _ => None,
    };
    // float32 and float64 parameters are their own master copy: the option leaves them alone.
    let master = if rounding.master && matches!(dtype, DType::F16 | DType::Bf16) {
        let what = || at.state(MASTER);
        let arg = format!("state['{MASTER}']");
        let obj = required(buffers.get_item(master_at), &what, &arg)?;
        let arr = as_array(&obj, &what).arg(&arg)?;
        let got = dtypes.of(arr);
        if got != Some(DType::F32) {
            return type_err!(
                "{} has dtype {}, expected float32 (master_weights keeps a float32 copy)",
                what(),
                got.map_or_else(|| dtype_str(arr), |d| d.name().to_owned())
            )
            .arg(&arg);
        }
        check_buffer(arr, dtypes, DType::F32, shape, &what, at).arg(&arg)?;
        check_writeable(arr, &what).arg(&arg)?;
        let (start, end) = span(arr, DType::F32);
        spans.push(Span {
            start,
            end,
            writes: true,
            role: Role::State(MASTER),
            at,
        });
        keep.push(obj.clone());
        Some(data_ptr(arr))
    } else {
        None
    };

    Ok((sr_key, master))
}

/// Validates one parameter that has a gradient: its own array, the gradient, the state buffers
/// its group's options use and its step counter; records their memory for the overlap check.
///
/// With `plan`, also hands over the arrays it checked, for a plan of the steps to come.
#[allow(clippy::too_many_lines)] // one parameter's checks, in the order they apply
pub(crate) fn check_param<'py>(
    kind: Kind,
    hyper: &Hyper,
    state_dtype: Option<DType>,
    rounding: Rounding,
    rules: &mut RuleMemo,
    at: Location,
    dtypes: &Dtypes<'_>,
    objs: [&Bound<'py, PyAny>; 4],
    fresh: bool,
    spans: &mut Vec<Span>,
    keep: &mut Vec<Bound<'py, PyAny>>,
    plan: Option<&mut Vec<Stepped<'py>>>,
) -> std::result::Result<Checked, optirs_core::CoreError> {
    let [param, grad, buffers, step] = objs;
    let group = at.group;
    let (param, dtype) = check_param_array(param, dtypes, at, |_| true, UPDATES)?;
    let shape = param.shape();
    let state_dtype = resolve_state_dtype(state_dtype, dtype, at).arg("state_dtype")?;
    let grad = as_array(grad, &|| at.grad()).arg("grad")?;
    check_buffer(grad, dtypes, dtype, shape, &|| at.grad(), at).arg("grad")?;

    record(spans, at, param, dtype.size(), true, Role::Param);
    record(spans, at, grad, dtype.size(), false, Role::Grad);
    // The state of one parameter usually comes as a tuple: index it directly.
    let tuple = buffers.cast::<PyTuple>().ok();

    let mut bufs = [None, None, None];
    let mut held = [None, None, None];
    for (i, (name, need)) in kind.buffer_names().iter().zip(hyper.needs()).enumerate() {
        if !need {
            continue;
        }
        let what = || at.state(name);
        let arg = format!("state['{name}']");
        let got = tuple.map_or_else(|| buffers.get_item(i), |t| t.get_item(i));
        let obj = required(got, &what, &arg)?;
        let arr = as_array(&obj, &what).arg(&arg)?;
        check_state_dtype(arr, dtypes, dtype, state_dtype, &what, at).arg(&arg)?;
        check_buffer(arr, dtypes, state_dtype, shape, &what, at).arg(&arg)?;
        check_writeable(arr, &what).arg(&arg)?;
        record(spans, at, arr, state_dtype.size(), true, Role::State(name));
        bufs[i] = Some(data_ptr(arr));
        held[i] = plan.is_some().then(|| arr.clone());
        // `buffers` may be a list another thread empties while the GIL is released: the step
        // holds each state array itself.
        keep.push(obj.clone());
    }

    let (step, count, counter_held) = if kind.counts_steps() {
        let (s, slot, count, counter_dtype) = check_step(step, dtypes, at, spans)?;
        let wide = counter_dtype == DType::F64;
        (Some(slot), count, Some((s.clone(), wide)))
    } else {
        (None, 0.0, None)
    };
    // The master copy follows the buffers and the scalars.
    let master_at = kind.buffer_names().len() + kind.scalar_names().len();
    let (sr_key, master) = check_rounding(
        master_at, rounding, dtype, shape, at, dtypes, buffers, spans, keep,
    )?;
    let (scalar_ptrs, scalar_held) =
        check_scalars(kind, at, dtypes, buffers, spans, keep, plan.is_some())?;
    if let Some(plan) = plan {
        plan.push(Stepped {
            flat: at.flat,
            group,
            dtype,
            state_dtype,
            needs: hyper.needs(),
            param: param.clone(),
            bufs: held,
            counter: counter_held,
            scalars: scalar_held,
        });
    }
    // SAFETY: each scalar is a 0-d array of its dtype, aligned (check_scalar), which the
    // overlap check keeps apart from every other array of the step and the caller holds
    // (`keep`) until the work returns.
    let (rule, slots) = unsafe { rules.get_at(group, hyper, dtype, count, fresh, scalar_ptrs)? };
    // SAFETY: the parameter and gradient are ndarrays of `dtype`, the buffers of
    // `state_dtype` (`dtype`, or bfloat16 for a float32, float16 or bfloat16 parameter: checked
    // above), with the parameter's shape (so `len` elements), C-contiguous and aligned
    // (check_layout, check_buffer), the written ones writeable; the caller holds every one of
    // them until the work returns (see the module documentation) and runs the overlap check
    // over `spans` before the work.
    let mut checked = unsafe {
        Checked::new(
            dtype,
            param.len(),
            data_ptr(param),
            data_ptr(grad).cast_const(),
            bufs,
            step,
            rule,
        )
        .with_state_dtype(state_dtype)
        .with_scalars(slots)
    };
    if let Some(key) = sr_key {
        checked = checked.with_stochastic_rounding(key);
    }
    if let Some(m) = master {
        // SAFETY: a float32 ndarray of the parameter's shape (so `len` elements), C-contiguous
        // and aligned (check_buffer), writeable, held (`keep`) until the work returns, its
        // memory in `spans` for the overlap check; a 16-bit parameter (checked above).
        checked = unsafe { checked.with_master(m) };
    }
    Ok(checked)
}

/// What a parameter of the wrong dtype is told the step updates.
pub(crate) const UPDATES: &str = "optirs updates float32, float64, float16 and bfloat16 arrays";

/// The state entry of a 16-bit parameter's float32 master copy (`master_weights`).
pub(crate) const MASTER: &str = "master_param";

/// A group's optirs-only rounding options.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Rounding {
    /// `bf16_stochastic_round`: the seed and the group's step count.
    pub(crate) stochastic: Option<(u64, u64)>,
    /// `master_weights`.
    pub(crate) master: bool,
}

impl Rounding {
    pub(crate) fn read(
        group: &Bound<'_, PyAny>,
        gi: usize,
    ) -> std::result::Result<Rounding, optirs_core::CoreError> {
        Ok(Rounding {
            stochastic: hyper::stochastic(group, gi)?,
            master: hyper::master_weights(group, gi)?,
        })
    }

    /// Whether a plan may step this group: plans know nothing of these options.
    pub(crate) fn is_plain(self) -> bool {
        self.stochastic.is_none() && !self.master
    }
}

/// Runs one step. See `optirs._core.step` in the stubs for the contract. Returns whether the
/// update was applied (false: skipped for a non-finite gradient, nothing written).
///
/// # Errors
/// A [`optirs_core::CoreError`] for any input that does not fit; nothing has been written then.
#[allow(clippy::needless_pass_by_value)] // PyO3 hands the argument lists over by value.
pub(crate) fn run(
    py: Python<'_>,
    kind: &str,
    groups: &Bound<'_, PyAny>,
    params: Vec<Bound<'_, PyAny>>,
    grads: Vec<Bound<'_, PyAny>>,
    buffers: Vec<Bound<'_, PyAny>>,
    steps: Vec<Bound<'_, PyAny>>,
    fresh: Vec<bool>,
    options: &Options,
    plan: bool,
    bf16_bits: bool,
    before: Option<&crate::bindings::Then<'_>>,
) -> Result<Option<(bool, Option<ArrayPlan>)>> {
    let kind = Kind::parse(kind)?;
    let n = params.len();

    // Hyperparameters, and which group each flat parameter index belongs to.
    let (read, roundings, group_of) = read_groups(groups, n, |group, gi| {
        Ok((
            hyper::read(kind, group, gi)?,
            hyper::state_dtype(group, gi)?,
        ))
    })?;
    let (hypers, state_dtypes): (Vec<_>, Vec<_>) = read.into_iter().unzip();
    if group_of.len() != n {
        return Ok(value_err!(
            "param_groups hold {} parameters but {n} arrays were passed",
            group_of.len()
        )?);
    }
    if grads.len() != n {
        return Ok(value_err!(
            "expected {n} gradients (one per parameter, in param_groups order; None for a \
             parameter without a gradient), got {}",
            grads.len()
        )?);
    }
    for (what, len) in [
        ("state buffer tuples", buffers.len()),
        ("step counters", steps.len()),
    ] {
        if len != n {
            return Ok(value_err!("expected {n} {what}, got {len}")?);
        }
    }
    if !(fresh.is_empty() || fresh.len() == n) {
        return Ok(value_err!("expected {n} fresh flags, got {}", fresh.len())?);
    }

    // Validate every array of every parameter that has a gradient; nothing is written yet.
    let dtypes = Dtypes::new(py, bf16_bits);
    let mut rules = RuleMemo::default();
    let mut checked = Vec::with_capacity(n);
    let mut spans = Vec::with_capacity(n * 3);
    let mut stepped = Vec::with_capacity(if plan { n } else { 0 });
    let mut keep = Vec::new();
    for (flat, grad) in grads.iter().enumerate() {
        if grad.is_none() {
            continue;
        }
        let (group, index) = group_of[flat];
        let at = Location { flat, group, index };
        checked.push(
            check_param(
                kind,
                &hypers[group],
                state_dtypes[group],
                roundings[group],
                &mut rules,
                at,
                &dtypes,
                [&params[flat], grad, &buffers[flat], &steps[flat]],
                fresh.get(flat).copied().unwrap_or(false),
                &mut spans,
                &mut keep,
                plan.then_some(&mut stepped),
            )
            .at(at)?,
        );
    }
    check_overlaps_reusing(&spans)?;
    // A plan steps without these options: every step of such a group is a full one.
    let plan = plan && roundings.iter().all(|r| r.is_plain());
    let plan = plan.then(|| {
        let written = spans
            .iter()
            .filter(|s| s.writes)
            .map(|s| (s.start, s.end))
            .collect();
        ArrayPlan::new(kind, n, stepped, written)
    });
    // `params`, `grads` and `steps` (owned lists of references) and `keep` (each state
    // array) hold every array alive until the work is done. Last, with everything validated:
    // the caller's own go-ahead (the flat step's check of its tensors, and its version bumps
    // while those tensors are still in cache).
    let go = || match before {
        Some((call, arg)) => Ok(call.call1((arg,))?.is_truthy()?),
        None => Ok(true),
    };
    let Some(applied) = run_detached(py, checked, options, go)? else {
        return Ok(None);
    };
    drop(keep);
    if applied {
        count_sr_steps(groups, &roundings)?;
    }
    Ok(Some((applied, plan)))
}

/// After an applied step: the next step draws fresh bits, so each group with stochastic
/// rounding counts its steps (`sr_step`).
pub(crate) fn count_sr_steps(groups: &Bound<'_, PyAny>, roundings: &[Rounding]) -> PyResult<()> {
    for (gi, r) in roundings.iter().enumerate() {
        if let Some((_, sr_step)) = r.stochastic {
            groups
                .get_item(gi)?
                .set_item("sr_step", sr_step.wrapping_add(1))?;
        }
    }
    Ok(())
}
