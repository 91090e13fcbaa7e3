//! One optimizer step over every parameter of every group: read the hyperparameters, validate
//! every array, borrow them, then release the GIL and update in parallel.
//!
//! Nothing is written until every check has passed, so a step that raises leaves all
//! parameters, gradients and state exactly as they were.

use numpy::npyffi::{NPY_ARRAY_ALIGNED, NPY_ARRAY_WRITEABLE};
use numpy::{
    dtype, Element, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyAnyMethods;

use crate::errors::{type_err, value_err, StepError};
use crate::kernels::adagrad::{AdagradHyper, AdagradScalars};
use crate::kernels::adam::{AdamHyper, AdamScalars};
use crate::kernels::rmsprop::{RmsPropHyper, RmsPropScalars};
use crate::kernels::sgd::{SgdHyper, SgdScalars};
use half::slice::HalfBitsSliceExt;

use crate::kernels::{simd, Float, Rule, Slices, Storage};
use crate::pool;

/// Which update rule a step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sgd,
    Adam,
    RmsProp,
    Adagrad,
}

impl Kind {
    fn parse(s: &str) -> Result<Kind, StepError> {
        match s {
            "sgd" => Ok(Kind::Sgd),
            "adam" => Ok(Kind::Adam),
            "rmsprop" => Ok(Kind::RmsProp),
            "adagrad" => Ok(Kind::Adagrad),
            _ => value_err!("unknown optimizer kind {s:?}"),
        }
    }

    /// The state buffers, in the order the kernels take them.
    fn buffer_names(self) -> &'static [&'static str] {
        match self {
            Kind::Sgd => &["momentum_buffer"],
            Kind::Adam => &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
            Kind::RmsProp => &["square_avg", "momentum_buffer", "grad_avg"],
            Kind::Adagrad => &["sum"],
        }
    }

    /// SGD keeps no step counter; the others keep a 0-d float32 `step`.
    fn counts_steps(self) -> bool {
        self != Kind::Sgd
    }
}

/// The hyperparameters of one param group.
#[derive(Clone, Copy, Debug)]
enum Hyper {
    Sgd(SgdHyper),
    Adam(AdamHyper),
    RmsProp(RmsPropHyper),
    Adagrad(AdagradHyper),
}

impl Hyper {
    fn read(kind: Kind, group: &Bound<'_, PyAny>, gi: usize) -> Result<Hyper, StepError> {
        let g = GroupReader { group, gi };
        Ok(match kind {
            Kind::Sgd => Hyper::Sgd(SgdHyper {
                lr: g.real("lr")?,
                momentum: g.real("momentum")?,
                dampening: g.real("dampening")?,
                weight_decay: g.real("weight_decay")?,
                nesterov: g.flag("nesterov", None)?,
                maximize: g.flag("maximize", Some(false))?,
            }),
            Kind::Adam => {
                let (beta1, beta2) = g.pair("betas")?;
                Hyper::Adam(AdamHyper {
                    lr: g.real("lr")?,
                    beta1,
                    beta2,
                    eps: g.real("eps")?,
                    weight_decay: g.real("weight_decay")?,
                    amsgrad: g.flag("amsgrad", Some(false))?,
                    maximize: g.flag("maximize", Some(false))?,
                    decoupled: g.flag("decoupled_weight_decay", Some(false))?,
                })
            }
            Kind::RmsProp => Hyper::RmsProp(RmsPropHyper {
                lr: g.real("lr")?,
                alpha: g.real("alpha")?,
                eps: g.real("eps")?,
                weight_decay: g.real("weight_decay")?,
                momentum: g.real("momentum")?,
                centered: g.flag("centered", Some(false))?,
                maximize: g.flag("maximize", Some(false))?,
            }),
            Kind::Adagrad => Hyper::Adagrad(AdagradHyper {
                lr: g.real("lr")?,
                lr_decay: g.real("lr_decay")?,
                weight_decay: g.real("weight_decay")?,
                eps: g.real("eps")?,
                maximize: g.flag("maximize", Some(false))?,
            }),
        })
    }

    /// Which of the kind's buffers this group's options use.
    fn needs(&self) -> [bool; 3] {
        match self {
            Hyper::Sgd(h) => [h.momentum != 0.0, false, false],
            Hyper::Adam(h) => [true, true, h.amsgrad],
            Hyper::RmsProp(h) => [true, h.momentum > 0.0, h.centered],
            Hyper::Adagrad(_) => [true, false, false],
        }
    }

    fn rule<T: Float>(&self, step: f64, fresh: bool) -> Rule<T> {
        match self {
            Hyper::Sgd(h) => Rule::Sgd(SgdScalars::new(h, fresh)),
            Hyper::Adam(h) => Rule::Adam(AdamScalars::new(h, step)),
            Hyper::RmsProp(h) => Rule::RmsProp(RmsPropScalars::new(h)),
            Hyper::Adagrad(h) => Rule::Adagrad(AdagradScalars::new(h, step)),
        }
    }
}

/// Reads typed values out of one param-group mapping, naming the key in every error.
struct GroupReader<'a, 'py> {
    group: &'a Bound<'py, PyAny>,
    gi: usize,
}

impl<'py> GroupReader<'_, 'py> {
    fn item(&self, key: &str) -> Result<Bound<'py, PyAny>, StepError> {
        match self.group.get_item(key) {
            Ok(v) => Ok(v),
            Err(_) => value_err!("param_groups[{}] has no '{key}' entry", self.gi),
        }
    }

    fn to_real(&self, key: &str, v: &Bound<'py, PyAny>) -> Result<f64, StepError> {
        // Python bools are ints; torch accepts them as numbers too.
        match v.extract::<f64>() {
            Ok(x) => Ok(x),
            Err(_) => type_err!(
                "param_groups[{}]['{key}'] must be a real number, got {}",
                self.gi,
                type_name(v)
            ),
        }
    }

    fn real(&self, key: &str) -> Result<f64, StepError> {
        let v = self.item(key)?;
        self.to_real(key, &v)
    }

    fn pair(&self, key: &str) -> Result<(f64, f64), StepError> {
        let v = self.item(key)?;
        let bad = || {
            type_err!(
                "param_groups[{}]['{key}'] must be a pair of floats",
                self.gi
            )
        };
        if v.len().ok() != Some(2) {
            return bad();
        }
        let (Ok(a), Ok(b)) = (v.get_item(0), v.get_item(1)) else {
            return bad();
        };
        Ok((self.to_real(key, &a)?, self.to_real(key, &b)?))
    }

    /// A truthy option; `default` is used when the key is absent (older state dicts).
    fn flag(&self, key: &str, default: Option<bool>) -> Result<bool, StepError> {
        match (self.group.get_item(key), default) {
            (Ok(v), _) => match v.is_truthy() {
                Ok(b) => Ok(b),
                Err(_) => type_err!("param_groups[{}]['{key}'] must be a bool", self.gi),
            },
            (Err(_), Some(d)) => Ok(d),
            (Err(_), None) => value_err!("param_groups[{}] has no '{key}' entry", self.gi),
        }
    }

    fn len_params(&self) -> Result<usize, StepError> {
        match self.item("params")?.len() {
            Ok(n) => Ok(n),
            Err(_) => type_err!("param_groups[{}]['params'] must be a list", self.gi),
        }
    }
}

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .name()
        .map_or_else(|_| "object".to_owned(), |n| n.to_string())
}

/// Where a parameter sits, for error messages.
#[derive(Clone, Copy, Debug)]
struct Where {
    flat: usize,
    group: usize,
    index: usize,
}

impl Where {
    fn param(self) -> String {
        format!("param_groups[{}]['params'][{}]", self.group, self.index)
    }
    fn grad(self) -> String {
        format!("grads[{}] (the gradient of {})", self.flat, self.param())
    }
    fn state(self, key: &str) -> String {
        format!("state['{key}'] of {}", self.param())
    }
}

/// The element types the core updates. NumPy has no bfloat16: such arrays arrive as their
/// uint16 bit patterns (the torch bridge passes `tensor.view(torch.uint16)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DType {
    F32,
    F64,
    F16,
    Bf16,
}

impl DType {
    fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::Bf16 => "uint16 (bfloat16 bits)",
        }
    }
}

fn as_array<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    what: &dyn Fn() -> String,
) -> Result<&'a Bound<'py, PyUntypedArray>, StepError> {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => Ok(a),
        Err(_) => type_err!("{} must be a numpy.ndarray, got {}", what(), type_name(obj)),
    }
}

fn float_dtype(a: &Bound<'_, PyUntypedArray>) -> Option<DType> {
    let py = a.py();
    let d = a.dtype();
    if d.is_equiv_to(&dtype::<f32>(py)) {
        Some(DType::F32)
    } else if d.is_equiv_to(&dtype::<f64>(py)) {
        Some(DType::F64)
    } else if d.is_equiv_to(&dtype::<half::f16>(py)) {
        Some(DType::F16)
    } else if d.is_equiv_to(&dtype::<u16>(py)) {
        Some(DType::Bf16)
    } else {
        None
    }
}

fn dtype_str(a: &Bound<'_, PyUntypedArray>) -> String {
    a.dtype().to_string()
}

fn flags(a: &Bound<'_, PyUntypedArray>) -> i32 {
    // SAFETY: `a` is a live ndarray; reading its flags field has no side effects.
    unsafe { (*a.as_array_ptr()).fields.flags }
}

fn is_writeable(a: &Bound<'_, PyUntypedArray>) -> bool {
    flags(a) & NPY_ARRAY_WRITEABLE != 0
}

/// Contiguous and aligned to its dtype: what a Rust slice over its memory needs.
fn check_layout(a: &Bound<'_, PyUntypedArray>, what: &dyn Fn() -> String) -> Result<(), StepError> {
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

/// The bytes an array covers: `[start, end)`. Only meaningful for contiguous arrays.
fn span(a: &Bound<'_, PyUntypedArray>) -> (usize, usize) {
    // SAFETY: as above, a plain field read.
    let start = unsafe { (*a.as_array_ptr()).fields.data } as usize;
    let bytes = a.len() * a.dtype().itemsize();
    (start, start + bytes)
}

/// Checks one state buffer (or the parameter itself) against the parameter's dtype and shape.
fn check_buffer(
    a: &Bound<'_, PyUntypedArray>,
    want: DType,
    shape: &[usize],
    what: &dyn Fn() -> String,
    of_param: &str,
) -> Result<(), StepError> {
    if float_dtype(a) != Some(want) {
        return type_err!(
            "{} has dtype {}, expected {} (the dtype of {of_param})",
            what(),
            dtype_str(a),
            want.name()
        );
    }
    if a.shape() != shape {
        return value_err!(
            "{} has shape {:?}, expected {:?} (the shape of {of_param})",
            what(),
            a.shape(),
            shape
        );
    }
    check_layout(a, what)
}

#[derive(Clone, Copy, Debug)]
enum Role {
    Param,
    Grad,
    State(&'static str),
}

/// One array's bytes, for the overlap check.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    end: usize,
    writes: bool,
    role: Role,
    at: Where,
}

impl Span {
    fn label(&self) -> String {
        match self.role {
            Role::Param => self.at.param(),
            Role::Grad => self.at.grad(),
            Role::State(k) => self.at.state(k),
        }
    }
}

/// Refuses any overlap between an array the step writes and any other array it touches.
/// Gradients may share memory with each other: they are only read.
fn check_overlaps(spans: &mut [Span]) -> Result<(), StepError> {
    spans.sort_unstable_by_key(|s| s.start);
    let mut furthest_any: Option<Span> = None;
    let mut furthest_written: Option<Span> = None;
    for s in spans.iter() {
        let clash = if s.writes {
            furthest_any
        } else {
            furthest_written
        };
        if let Some(other) = clash.filter(|o| o.end > s.start) {
            return value_err!(
                "{} and {} share memory (aliasing); every parameter and state buffer must \
                 be a separate array, and a gradient must not alias any of them",
                other.label(),
                s.label()
            );
        }
        if furthest_any.is_none_or(|o| s.end > o.end) {
            furthest_any = Some(*s);
        }
        if s.writes && furthest_written.is_none_or(|o| s.end > o.end) {
            furthest_written = Some(*s);
        }
    }
    Ok(())
}

/// A validated parameter awaiting its borrow.
struct Checked<'a, 'py> {
    dtype: DType,
    param: &'a Bound<'py, PyUntypedArray>,
    grad: &'a Bound<'py, PyUntypedArray>,
    bufs: [Option<Bound<'py, PyUntypedArray>>; 3],
    step: Option<&'a Bound<'py, PyUntypedArray>>,
    hyper: Hyper,
    fresh: bool,
    at: Where,
}

/// Validates one parameter that has a gradient: its own array, the gradient, the state buffers
/// its group's options use and its step counter.
fn check_param<'a, 'py>(
    kind: Kind,
    hyper: Hyper,
    at: Where,
    param: &'a Bound<'py, PyAny>,
    grad: &'a Bound<'py, PyAny>,
    buffers: &'a Bound<'py, PyAny>,
    step: &'a Bound<'py, PyAny>,
    fresh: bool,
) -> Result<Checked<'a, 'py>, StepError> {
    let param = as_array(param, &|| at.param())?;
    let Some(dtype) = float_dtype(param) else {
        return type_err!(
            "{} has dtype {}; optirs updates float32, float64, float16 and bfloat16 arrays",
            at.param(),
            dtype_str(param)
        );
    };
    check_layout(param, &|| at.param())?;
    if !is_writeable(param) {
        return value_err!("{} is read-only (its writeable flag is False)", at.param());
    }
    let shape = param.shape();
    let pname = at.param();
    let grad = as_array(grad, &|| at.grad())?;
    check_buffer(grad, dtype, shape, &|| at.grad(), &pname)?;

    let mut bufs = [None, None, None];
    for (i, (name, need)) in kind.buffer_names().iter().zip(hyper.needs()).enumerate() {
        if !need {
            continue;
        }
        let what = || at.state(name);
        let obj = match buffers.get_item(i) {
            Ok(obj) if !obj.is_none() => obj,
            _ => return value_err!("{} is missing", what()),
        };
        let arr = as_array(&obj, &what)?.clone();
        check_buffer(&arr, dtype, shape, &what, &pname)?;
        if !is_writeable(&arr) {
            return value_err!("{} is read-only (its writeable flag is False)", what());
        }
        bufs[i] = Some(arr);
    }

    let step = if kind.counts_steps() {
        let what = || at.state("step");
        if step.is_none() {
            return value_err!("{} is missing", what());
        }
        let s = as_array(step, &what)?;
        if !matches!(float_dtype(s), Some(DType::F32 | DType::F64)) || s.ndim() != 0 {
            return type_err!(
                "{} must be a 0-d float32 (or float64) array, got dtype {} with shape {:?}",
                what(),
                dtype_str(s),
                s.shape()
            );
        }
        check_layout(s, &what)?;
        if !is_writeable(s) {
            return value_err!("{} is read-only (its writeable flag is False)", what());
        }
        Some(s)
    } else {
        None
    };
    Ok(Checked {
        dtype,
        param,
        grad,
        bufs,
        step,
        hyper,
        fresh,
        at,
    })
}

impl Checked<'_, '_> {
    /// The memory this parameter's update reads and writes, for the overlap check.
    fn spans(&self, names: &[&'static str], out: &mut Vec<Span>) {
        let at = self.at;
        let mut add = |a: &Bound<'_, PyUntypedArray>, writes: bool, role: Role| {
            let (start, end) = span(a);
            if end > start {
                out.push(Span {
                    start,
                    end,
                    writes,
                    role,
                    at,
                });
            }
        };
        add(self.param, true, Role::Param);
        add(self.grad, false, Role::Grad);
        for (b, name) in self.bufs.iter().zip(names) {
            if let Some(b) = b {
                add(b, true, Role::State(name));
            }
        }
        if let Some(s) = self.step {
            add(s, true, Role::State("step"));
        }
    }
}

/// A borrowed step counter and the value it takes once the step is applied. torch keeps it in
/// float32, or in float64 when the default dtype is float64.
enum Counter<'py> {
    F32(PyReadwriteArrayDyn<'py, f32>, f32),
    F64(PyReadwriteArrayDyn<'py, f64>, f64),
}

/// Where a counter's new value goes once every check has passed.
enum CounterSlot<'a> {
    F32(&'a mut f32, f32),
    F64(&'a mut f64, f64),
}

impl CounterSlot<'_> {
    fn write(self) {
        match self {
            CounterSlot::F32(slot, v) => *slot = v,
            CounterSlot::F64(slot, v) => *slot = v,
        }
    }
}

/// Borrows a counter and computes torch's `step_t += 1` in the counter's own dtype; returns it
/// with the new count as torch reads it back (`step_t.item()`).
fn borrow_counter<'py>(
    s: &Bound<'py, PyUntypedArray>,
    what: &dyn Fn() -> String,
) -> Result<(Counter<'py>, f64), StepError> {
    fn first<T: Element + Copy>(
        rw: &PyReadwriteArrayDyn<'_, T>,
        what: &dyn Fn() -> String,
    ) -> Result<T, StepError> {
        match rw.as_slice().ok().and_then(|s| s.first()) {
            Some(&v) => Ok(v),
            None => value_err!("{} must hold one value", what()),
        }
    }
    if float_dtype(s) == Some(DType::F64) {
        let rw = borrow_rw::<f64>(s, what)?;
        let new = first(&rw, what)? + 1.0;
        Ok((Counter::F64(rw, new), new))
    } else {
        let rw = borrow_rw::<f32>(s, what)?;
        let new = first(&rw, what)? + 1.0;
        Ok((Counter::F32(rw, new), f64::from(new)))
    }
}

/// A borrowed parameter with its per-step scalars: elements of type `E` as NumPy holds
/// them, arithmetic in `C`.
struct Borrowed<'py, E: Element, C> {
    param: PyReadwriteArrayDyn<'py, E>,
    grad: PyReadonlyArrayDyn<'py, E>,
    bufs: [Option<PyReadwriteArrayDyn<'py, E>>; 3],
    step: Option<Counter<'py>>,
    rule: Rule<C>,
}

fn borrow_rw<'py, T: Element>(
    a: &Bound<'py, PyUntypedArray>,
    what: &dyn Fn() -> String,
) -> Result<PyReadwriteArrayDyn<'py, T>, StepError> {
    let Ok(typed) = a.cast::<PyArrayDyn<T>>() else {
        return type_err!("{} has an unexpected dtype", what());
    };
    match typed.try_readwrite() {
        Ok(b) => Ok(b),
        Err(e) => value_err!("{} cannot be written: {e}", what()),
    }
}

fn borrow<'py, T: Element, C: Float>(
    c: &Checked<'_, 'py>,
    names: &[&'static str],
) -> Result<Borrowed<'py, T, C>, StepError> {
    let at = c.at;
    let Ok(grad) = c.grad.cast::<PyArrayDyn<T>>() else {
        return type_err!("{} has an unexpected dtype", at.grad());
    };
    let grad = match grad.try_readonly() {
        Ok(g) => g,
        Err(e) => return value_err!("{} cannot be read: {e}", at.grad()),
    };
    let mut bufs: [Option<PyReadwriteArrayDyn<'py, T>>; 3] = [None, None, None];
    for (slot, (b, name)) in bufs.iter_mut().zip(c.bufs.iter().zip(names)) {
        if let Some(b) = b {
            *slot = Some(borrow_rw::<T>(b, &|| at.state(name))?);
        }
    }
    let (step, step_value) = match c.step {
        Some(s) => {
            let (counter, value) = borrow_counter(s, &|| at.state("step"))?;
            (Some(counter), value)
        }
        None => (None, 0.0),
    };
    Ok(Borrowed {
        param: borrow_rw::<T>(c.param, &|| at.param())?,
        grad,
        bufs,
        step,
        rule: c.hyper.rule::<C>(step_value, c.fresh),
    })
}

/// One piece of work for a thread: a chunk of one parameter and its rule.
enum Item<'a> {
    F32(Rule<f32>, Slices<'a, f32>),
    F64(Rule<f64>, Slices<'a, f64>),
    F16(Rule<f32>, Slices<'a, half::f16>),
    Bf16(Rule<f32>, Slices<'a, half::bf16>),
}

impl Item<'_> {
    fn len(&self) -> usize {
        match self {
            Item::F32(_, s) => s.len(),
            Item::F64(_, s) => s.len(),
            Item::F16(_, s) => s.len(),
            Item::Bf16(_, s) => s.len(),
        }
    }

    fn run(self, level: simd::SimdLevel) {
        match self {
            Item::F32(r, s) => simd::apply(level, &r, s),
            Item::F64(r, s) => simd::apply(level, &r, s),
            Item::F16(r, s) => simd::apply(level, &r, s),
            Item::Bf16(r, s) => simd::apply(level, &r, s),
        }
    }
}

/// How a borrowed NumPy element slice becomes the storage type a kernel runs over.
trait AsStorage<S>: Element {
    fn cast(s: &[Self]) -> &[S];
    fn cast_mut(s: &mut [Self]) -> &mut [S];
}

impl<T: Element + Storage> AsStorage<T> for T {
    fn cast(s: &[T]) -> &[T] {
        s
    }
    fn cast_mut(s: &mut [T]) -> &mut [T] {
        s
    }
}

impl AsStorage<half::bf16> for u16 {
    fn cast(s: &[u16]) -> &[half::bf16] {
        s.reinterpret_cast()
    }
    fn cast_mut(s: &mut [u16]) -> &mut [half::bf16] {
        s.reinterpret_cast_mut()
    }
}

/// Elements per work item: a chunk's parameter, gradient and state stay within L2 together.
pub const CHUNK_ELEMS: usize = 1 << 14;

fn push_items<'a, E: AsStorage<S>, S: Storage>(
    entries: &'a mut [Borrowed<'_, E, S::Compute>],
    wrap: fn(Rule<S::Compute>, Slices<'a, S>) -> Item<'a>,
    items: &mut Vec<Item<'a>>,
    steps: &mut Vec<CounterSlot<'a>>,
) -> Result<(), StepError> {
    let mut pieces = Vec::new();
    for e in entries {
        let Borrowed {
            param,
            grad,
            bufs,
            step,
            rule,
        } = e;
        let (Ok(param), Ok(grad)) = (param.as_slice_mut(), grad.as_slice()) else {
            return value_err!("a parameter or gradient is not contiguous");
        };
        let (param, grad) = (E::cast_mut(param), E::cast(grad));
        let mut b: [Option<&mut [S]>; 3] = [None, None, None];
        for (slot, buf) in b.iter_mut().zip(bufs.iter_mut()) {
            if let Some(buf) = buf {
                match buf.as_slice_mut() {
                    Ok(s) => *slot = Some(E::cast_mut(s)),
                    Err(_) => return value_err!("a state buffer is not contiguous"),
                }
            }
        }
        let slices = Slices {
            param,
            grad,
            bufs: b,
        };
        if !slices.lengths_match() {
            return value_err!("a gradient or state buffer does not match its parameter");
        }
        let has_counter = step.is_some();
        let slot = match step {
            Some(Counter::F32(rw, new)) => rw
                .as_slice_mut()
                .ok()
                .and_then(|s| s.first_mut())
                .map(|v| CounterSlot::F32(v, *new)),
            Some(Counter::F64(rw, new)) => rw
                .as_slice_mut()
                .ok()
                .and_then(|s| s.first_mut())
                .map(|v| CounterSlot::F64(v, *new)),
            None => None,
        };
        match slot {
            Some(slot) => steps.push(slot),
            None if has_counter => return value_err!("a step counter holds no value"),
            None => {}
        }
        slices.chunks(CHUNK_ELEMS, &mut pieces);
        items.extend(pieces.drain(..).map(|s| wrap(*rule, s)));
    }
    Ok(())
}

/// Runs one step. See `optirs._core.step` in the stubs for the contract.
///
/// # Errors
/// A [`StepError`] for any input that does not fit; nothing has been written then.
#[allow(clippy::needless_pass_by_value)] // PyO3 hands the argument lists over by value.
pub fn run(
    py: Python<'_>,
    kind: &str,
    groups: &Bound<'_, PyAny>,
    params: Vec<Bound<'_, PyAny>>,
    grads: Vec<Bound<'_, PyAny>>,
    buffers: Vec<Bound<'_, PyAny>>,
    steps: Vec<Bound<'_, PyAny>>,
    fresh: Vec<bool>,
) -> Result<(), StepError> {
    let kind = Kind::parse(kind)?;
    let n = params.len();

    // Hyperparameters, and which group each flat parameter index belongs to.
    let Ok(n_groups) = groups.len() else {
        return type_err!("param_groups must be a list of dicts");
    };
    let mut hypers = Vec::with_capacity(n_groups);
    let mut group_of = Vec::with_capacity(n);
    for gi in 0..n_groups {
        let Ok(group) = groups.get_item(gi) else {
            return type_err!("param_groups must be a list of dicts");
        };
        hypers.push(Hyper::read(kind, &group, gi)?);
        let len = GroupReader { group: &group, gi }.len_params()?;
        group_of.extend((0..len).map(|index| (gi, index)));
    }
    if group_of.len() != n {
        return value_err!(
            "param_groups hold {} parameters but {n} arrays were passed",
            group_of.len()
        );
    }
    if grads.len() != n {
        return value_err!(
            "expected {n} gradients (one per parameter, in param_groups order; None for a \
             parameter without a gradient), got {}",
            grads.len()
        );
    }
    for (what, len) in [
        ("state buffer tuples", buffers.len()),
        ("step counters", steps.len()),
    ] {
        if len != n {
            return value_err!("expected {n} {what}, got {len}");
        }
    }
    if !(fresh.is_empty() || fresh.len() == n) {
        return value_err!("expected {n} fresh flags, got {}", fresh.len());
    }

    // Validate every array of every parameter that has a gradient.
    let names = kind.buffer_names();
    let mut checked = Vec::with_capacity(n);
    let mut spans = Vec::with_capacity(n * 3);
    for (flat, grad) in grads.iter().enumerate() {
        if grad.is_none() {
            continue;
        }
        let (group, index) = group_of[flat];
        let at = Where { flat, group, index };
        let c = check_param(
            kind,
            hypers[group],
            at,
            &params[flat],
            grad,
            &buffers[flat],
            &steps[flat],
            fresh.get(flat).copied().unwrap_or(false),
        )?;
        c.spans(names, &mut spans);
        checked.push(c);
    }
    check_overlaps(&mut spans)?;

    // Borrow (rust-numpy's borrow checker double-checks the aliasing rules) and compute the
    // per-parameter scalars. Still nothing written.
    let mut f32s: Vec<Borrowed<'_, f32, f32>> = Vec::new();
    let mut f64s: Vec<Borrowed<'_, f64, f64>> = Vec::new();
    let mut f16s: Vec<Borrowed<'_, half::f16, f32>> = Vec::new();
    let mut bf16s: Vec<Borrowed<'_, u16, f32>> = Vec::new();
    for c in &checked {
        match c.dtype {
            DType::F32 => f32s.push(borrow(c, names)?),
            DType::F64 => f64s.push(borrow(c, names)?),
            DType::F16 => f16s.push(borrow(c, names)?),
            DType::Bf16 => bf16s.push(borrow(c, names)?),
        }
    }
    let mut items = Vec::new();
    let mut counters = Vec::new();
    push_items(&mut f32s, Item::F32, &mut items, &mut counters)?;
    push_items(&mut f64s, Item::F64, &mut items, &mut counters)?;
    push_items(&mut f16s, Item::F16, &mut items, &mut counters)?;
    push_items(&mut bf16s, Item::Bf16, &mut items, &mut counters)?;

    // Every check passed: from here on nothing can fail.
    let level = simd::active();
    py.detach(|| {
        let total: usize = items.iter().map(Item::len).sum();
        pool::for_each(items, total, |it| it.run(level));
        for slot in counters {
            slot.write();
        }
    });
    Ok(())
}
