//! One optimizer step over every parameter of every group: read the hyperparameters, validate
//! every array, borrow them, then release the GIL and update in parallel.
//!
//! Nothing is written until every check has passed, so a step that raises leaves all
//! parameters, gradients and state exactly as they were.
//!
//! # What keeps the pointers valid
//! A [`Checked`] holds raw addresses, used with the GIL released, when any other Python thread
//! may run. Each one is the data pointer of an ndarray that this call holds a strong reference
//! to until [`execute`] returns: the argument vectors `params`, `grads` and `steps` are owned
//! by the call, and each state array read out of `buffers` (which may be a list that another
//! thread empties) is pushed onto `keep`; a plan holds its arrays itself (see `array_plan` and
//! `torch_plan`). A referenced ndarray's memory cannot go away: NumPy refuses `resize()` on an
//! array referenced elsewhere (unless the caller passes `refcheck=False`, which NumPy documents
//! as unsafe), and `ndarray.data` cannot be assigned. The overlap check makes every written
//! range disjoint from every other range of the step, so the slices built from the addresses
//! never alias. A thread may still change what an array *contains* during a step (writing
//! into a gradient or parameter by hand): that is a data race on plain floats, which can give
//! meaningless numbers for those elements but cannot touch memory outside the arrays.
//!
//! # A step that fails part-way
//! Validation errors come before any write. A panic after the work began (an internal error)
//! surfaces as `RuntimeError` saying the step stopped part-way: every work item but the one
//! that panicked has run, and the step counters have not been advanced, so those parameters
//! and their state may be partly updated. The process and the pool stay usable.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use numpy::npyffi::{NPY_ARRAY_ALIGNED, NPY_ARRAY_WRITEABLE};
use numpy::{dtype, PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyAnyMethods, PyComplex, PyFloat, PyInt, PyTuple, PyTupleMethods};

use crate::array_plan::{ArrayPlan, Stepped};
use crate::errors::{type_err, value_err, StepError, TorchRaises};
use crate::fpenv::FlushGuard;
use crate::kernels::adagrad::{AdagradHyper, AdagradScalars};
use crate::kernels::adam::{AdamHyper, AdamScalars};
use crate::kernels::rmsprop::{RmsPropHyper, RmsPropScalars};
use crate::kernels::sgd::{SgdHyper, SgdScalars};
use crate::kernels::{simd, Float, Rule, Slices, Storage};
use crate::pool;
use crate::torch_raises::{self, PyNumbers};

/// Which update rule a step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sgd,
    Adam,
    RmsProp,
    Adagrad,
}

impl Kind {
    pub(crate) fn parse(s: &str) -> Result<Kind, StepError> {
        match s {
            "sgd" => Ok(Kind::Sgd),
            "adam" => Ok(Kind::Adam),
            "rmsprop" => Ok(Kind::RmsProp),
            "adagrad" => Ok(Kind::Adagrad),
            _ => value_err!("unknown optimizer kind {s:?}"),
        }
    }

    /// The state buffers, in the order the kernels take them.
    pub(crate) fn buffer_names(self) -> &'static [&'static str] {
        match self {
            Kind::Sgd => &["momentum_buffer"],
            Kind::Adam => &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
            Kind::RmsProp => &["square_avg", "momentum_buffer", "grad_avg"],
            Kind::Adagrad => &["sum"],
        }
    }

    /// SGD keeps no step counter; the others keep a 0-d float32 `step`.
    pub(crate) fn counts_steps(self) -> bool {
        self != Kind::Sgd
    }
}

/// The hyperparameters of one param group.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Hyper {
    Sgd(SgdHyper),
    Adam(AdamHyper, PyNumbers),
    RmsProp(RmsPropHyper),
    Adagrad(AdagradHyper, PyNumbers),
}

impl Hyper {
    pub(crate) fn read(
        kind: Kind,
        group: &Bound<'_, PyAny>,
        gi: usize,
    ) -> Result<Hyper, StepError> {
        let g = GroupReader { group, gi };
        Ok(match kind {
            Kind::Sgd => {
                let momentum = g.real("momentum")?;
                Hyper::Sgd(SgdHyper {
                    lr: g.real("lr")?,
                    momentum,
                    // As torch.optim.SGD: without momentum, dampening is never looked at.
                    dampening: if momentum == 0.0 {
                        0.0
                    } else {
                        g.real("dampening")?
                    },
                    weight_decay: g.real("weight_decay")?,
                    nesterov: g.flag("nesterov", None)?,
                    maximize: g.flag("maximize", Some(false))?,
                })
            }
            Kind::Adam => {
                let [(beta1, py_beta1), (beta2, py_beta2)] = g.pair("betas")?;
                let (lr, py_lr) = g.number("lr")?;
                Hyper::Adam(
                    AdamHyper {
                        lr,
                        beta1,
                        beta2,
                        eps: g.real("eps")?,
                        weight_decay: g.real("weight_decay")?,
                        amsgrad: g.flag("amsgrad", Some(false))?,
                        maximize: g.flag("maximize", Some(false))?,
                        decoupled: g.flag("decoupled_weight_decay", Some(false))?,
                    },
                    PyNumbers {
                        lr: py_lr,
                        betas: [py_beta1, py_beta2],
                        lr_decay: false,
                    },
                )
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
            Kind::Adagrad => {
                let (lr, py_lr) = g.number("lr")?;
                let (lr_decay, py_lr_decay) = g.number("lr_decay")?;
                Hyper::Adagrad(
                    AdagradHyper {
                        lr,
                        lr_decay,
                        weight_decay: g.real("weight_decay")?,
                        eps: g.real("eps")?,
                        maximize: g.flag("maximize", Some(false))?,
                    },
                    PyNumbers {
                        lr: py_lr,
                        lr_decay: py_lr_decay,
                        ..PyNumbers::default()
                    },
                )
            }
        })
    }

    /// Which of the kind's buffers this group's options use.
    pub(crate) fn needs(&self) -> [bool; 3] {
        match self {
            Hyper::Sgd(h) => [h.momentum != 0.0, false, false],
            Hyper::Adam(h, _) => [true, true, h.amsgrad],
            Hyper::RmsProp(h) => [true, h.momentum > 0.0, h.centered],
            Hyper::Adagrad(..) => [true, false, false],
        }
    }

    fn rule<T: Float>(&self, step: f64, fresh: bool) -> Rule<T> {
        match self {
            Hyper::Sgd(h) => Rule::Sgd(SgdScalars::new(h, fresh)),
            Hyper::Adam(h, _) => Rule::Adam(AdamScalars::new(h, step)),
            Hyper::RmsProp(h) => Rule::RmsProp(RmsPropScalars::new(h)),
            Hyper::Adagrad(h, _) => Rule::Adagrad(AdagradScalars::new(h, step)),
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
            Err(_) if v.is_instance_of::<PyInt>() => value_err!(
                "param_groups[{}]['{key}'] is an int too large for a float",
                self.gi
            ),
            // torch.optim's step fails on a complex hyperparameter in a tensor operation
            // ("For non-complex input tensors, argument alpha must not be a complex number.",
            // "value cannot be converted to type float without overflow", ...): RuntimeError.
            Err(_) if v.is_instance_of::<PyComplex>() => Err(StepError::Torch(
                TorchRaises::Runtime,
                format!(
                    "param_groups[{}]['{key}'] must be a real number, got complex {}",
                    self.gi,
                    v.repr().map_or_else(|_| String::new(), |r| r.to_string())
                ),
            )),
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

    /// A real value, and whether it is a Python number (see [`PyNumbers`]).
    fn number(&self, key: &str) -> Result<(f64, bool), StepError> {
        let v = self.item(key)?;
        Ok((self.to_real(key, &v)?, is_py_number(&v)))
    }

    /// Two real values, each with whether it is a Python number.
    fn pair(&self, key: &str) -> Result<[(f64, bool); 2], StepError> {
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
        Ok([
            (self.to_real(key, &a)?, is_py_number(&a)),
            (self.to_real(key, &b)?, is_py_number(&b)),
        ])
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

/// A `float` (not a subclass: NumPy's float64 is one, with NumPy's arithmetic) or an `int`
/// (`bool` included), whose arithmetic in torch.optim's step is Python's.
fn is_py_number(v: &Bound<'_, PyAny>) -> bool {
    v.is_exact_instance_of::<PyFloat>() || v.is_instance_of::<PyInt>()
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
pub(crate) enum DType {
    F32,
    F64,
    F16,
    Bf16,
}

impl DType {
    pub(crate) fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    /// The name torch gives it (`torch.<name>`).
    pub(crate) fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::Bf16 => "bfloat16",
        }
    }

    fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::Bf16 => "bfloat16",
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

fn data_ptr(a: &Bound<'_, PyUntypedArray>) -> *mut u8 {
    // SAFETY: as above, a plain field read.
    unsafe { (*a.as_array_ptr()).fields.data.cast() }
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

/// The bytes an array of `dtype` covers: `[start, end)`. Only meaningful for contiguous arrays.
fn span(a: &Bound<'_, PyUntypedArray>, dtype: DType) -> (usize, usize) {
    let start = data_ptr(a) as usize;
    (start, start + a.len() * dtype.size())
}

/// Checks a gradient or state buffer against its parameter's dtype and shape, and its layout.
fn check_buffer(
    a: &Bound<'_, PyUntypedArray>,
    dtypes: &Dtypes<'_>,
    want: DType,
    shape: &[usize],
    what: &dyn Fn() -> String,
    at: Where,
) -> Result<(), StepError> {
    if dtypes.of(a) != Some(want) {
        return type_err!(
            "{} has dtype {}, expected {} (the dtype of {})",
            what(),
            dtype_str(a),
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
fn check_overlaps(spans: &[Span]) -> Result<(), StepError> {
    // Sorting (start, index) pairs moves far less memory than sorting the spans themselves.
    let mut order: Vec<(usize, u32)> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| (s.start, i as u32))
        .collect();
    order.sort_unstable();
    let mut furthest_any: Option<&Span> = None;
    let mut furthest_written: Option<&Span> = None;
    for &(_, i) in &order {
        let s = &spans[i as usize];
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
            furthest_any = Some(s);
        }
        if s.writes && furthest_written.is_none_or(|o| s.end > o.end) {
            furthest_written = Some(s);
        }
    }
    Ok(())
}

/// What the last step that passed [`check_overlaps`] wrote: its written spans in the order it
/// listed them, and sorted by start.
struct Written {
    listed: Vec<(usize, usize)>,
    sorted: Vec<(usize, usize)>,
}

static LAST_WRITTEN: Mutex<Option<Written>> = Mutex::new(None);

/// Whether `[start, end)` overlaps any of `sorted`: byte ranges sorted by start and disjoint.
pub(crate) fn touches(sorted: &[(usize, usize)], start: usize, end: usize) -> bool {
    // Disjoint ranges sorted by start have their ends sorted too: the first one ending after
    // `start` is the only one that can overlap.
    let i = sorted.partition_point(|&(_, e)| e <= start);
    sorted.get(i).is_some_and(|&(s, _)| s < end)
}

/// [`check_overlaps`], sped up for the usual step: the same parameters and state as the step
/// before (so their spans are already known to be disjoint) and new gradients, each looked up
/// among the sorted written spans. Any other case, and any overlap found, goes through the
/// full check, which also words the error.
fn check_overlaps_reusing(spans: &[Span]) -> Result<(), StepError> {
    let listed: Vec<(usize, usize)> = spans
        .iter()
        .filter(|s| s.writes)
        .map(|s| (s.start, s.end))
        .collect();
    let mut last = LAST_WRITTEN.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(w) = last.as_ref().filter(|w| w.listed == listed) {
        let clear = spans
            .iter()
            .filter(|s| !s.writes)
            .all(|s| !touches(&w.sorted, s.start, s.end));
        if clear {
            return Ok(());
        }
    }
    check_overlaps(spans)?;
    let mut sorted = listed.clone();
    sorted.sort_unstable();
    *last = Some(Written { listed, sorted });
    Ok(())
}

/// A parameter that passed every check: where its arrays' elements are, and what to do.
///
/// Addresses, not borrows: the overlap check over every array of the step is stricter than
/// rust-numpy's borrow tracking, and skipping five tracked borrows per parameter is most of
/// the per-parameter cost of a step over many small tensors.
pub(crate) struct Checked {
    pub(crate) dtype: DType,
    pub(crate) len: usize,
    pub(crate) param: *mut u8,
    pub(crate) grad: *const u8,
    pub(crate) bufs: [Option<*mut u8>; 3],
    /// The step counter and its value once this step is applied. `'static` stands for "this
    /// step": the counter's array is held alive by the caller's lists until `run` returns.
    pub(crate) step: Option<CounterSlot<'static>>,
    pub(crate) rule: RuleOf,
}

/// The per-step scalars, in the compute type of the parameter's dtype.
#[derive(Clone, Copy)]
pub(crate) enum RuleOf {
    F32(Rule<f32>),
    F64(Rule<f64>),
}

/// The last per-step scalars computed: the parameters of one group usually share their step
/// count, so their bias corrections (three `pow` calls for Adam) are computed, and checked
/// against what torch.optim's step would raise (`torch_raises`), once.
#[derive(Default)]
pub(crate) struct RuleMemo {
    last: Option<(usize, DType, u64, bool, RuleOf)>,
}

impl RuleMemo {
    pub(crate) fn get(
        &mut self,
        group: usize,
        hyper: &Hyper,
        dtype: DType,
        count: f64,
        fresh: bool,
    ) -> Result<RuleOf, StepError> {
        // Keyed by dtype, not only by compute type: the range checks of `torch_raises` differ
        // between float16, bfloat16 and float32.
        let key = (group, dtype, count.to_bits(), fresh);
        if let Some((g, d, c, f, rule)) = self.last {
            if (g, d, c, f) == key {
                return Ok(rule);
            }
        }
        torch_raises::check(hyper, group, count, dtype, fresh)?;
        let rule = if dtype == DType::F64 {
            RuleOf::F64(hyper.rule(count, fresh))
        } else {
            RuleOf::F32(hyper.rule(count, fresh))
        };
        self.last = Some((key.0, key.1, key.2, key.3, rule));
        Ok(rule)
    }
}

/// Where a counter's new value goes once every check has passed.
pub(crate) enum CounterSlot<'a> {
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

/// Validates one parameter that has a gradient: its own array, the gradient, the state buffers
/// its group's options use and its step counter; records their memory for the overlap check.
///
/// With `plan`, also hands over the arrays it checked, for a plan of the steps to come.
fn check_param<'py>(
    kind: Kind,
    hyper: &Hyper,
    rules: &mut RuleMemo,
    at: Where,
    dtypes: &Dtypes<'_>,
    objs: [&Bound<'py, PyAny>; 4],
    fresh: bool,
    spans: &mut Vec<Span>,
    keep: &mut Vec<Bound<'py, PyAny>>,
    plan: Option<&mut Vec<Stepped<'py>>>,
) -> Result<Checked, StepError> {
    let [param, grad, buffers, step] = objs;
    let group = at.group;
    let param = as_array(param, &|| at.param())?;
    let Some(dtype) = dtypes.of(param) else {
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
    let grad = as_array(grad, &|| at.grad())?;
    check_buffer(grad, dtypes, dtype, shape, &|| at.grad(), at)?;

    let mut add = |a: &Bound<'_, PyUntypedArray>, dt: DType, writes: bool, role: Role| {
        let (start, end) = span(a, dt);
        if end > start {
            spans.push(Span {
                start,
                end,
                writes,
                role,
                at,
            });
        }
    };
    add(param, dtype, true, Role::Param);
    add(grad, dtype, false, Role::Grad);
    // The state of one parameter usually comes as a tuple: index it directly.
    let tuple = buffers.cast::<PyTuple>().ok();

    let mut bufs = [None, None, None];
    let mut held = [None, None, None];
    for (i, (name, need)) in kind.buffer_names().iter().zip(hyper.needs()).enumerate() {
        if !need {
            continue;
        }
        let what = || at.state(name);
        let obj = match tuple.map_or_else(|| buffers.get_item(i), |t| t.get_item(i)) {
            Ok(obj) if !obj.is_none() => obj,
            _ => return value_err!("{} is missing", what()),
        };
        let arr = as_array(&obj, &what)?;
        check_buffer(arr, dtypes, dtype, shape, &what, at)?;
        if !is_writeable(arr) {
            return value_err!("{} is read-only (its writeable flag is False)", what());
        }
        add(arr, dtype, true, Role::State(name));
        bufs[i] = Some(data_ptr(arr));
        held[i] = plan.is_some().then(|| arr.clone());
        // `buffers` may be a list another thread empties while the GIL is released: the step
        // holds each state array itself.
        keep.push(obj.clone());
    }

    let (step, count, counter_held) = if kind.counts_steps() {
        let what = || at.state("step");
        if step.is_none() {
            return value_err!("{} is missing", what());
        }
        let s = as_array(step, &what)?;
        let counter = check_counter(s, dtypes, &what)?;
        add(s, counter.2, true, Role::State("step"));
        let wide = counter.2 == DType::F64;
        (Some(counter.0), counter.1, Some((s.clone(), wide)))
    } else {
        (None, 0.0, None)
    };
    if let Some(plan) = plan {
        plan.push(Stepped {
            flat: at.flat,
            group,
            dtype,
            needs: hyper.needs(),
            param: param.clone(),
            bufs: held,
            counter: counter_held,
        });
    }
    let rule = rules.get(group, hyper, dtype, count, fresh)?;
    Ok(Checked {
        dtype,
        len: param.len(),
        param: data_ptr(param),
        grad: data_ptr(grad).cast_const(),
        bufs,
        step,
        rule,
    })
}

/// Checks a step counter; returns where its new value goes and that value as torch reads it
/// back: `step_t += 1` in the counter's dtype, then `step_t.item()`.
fn check_counter(
    s: &Bound<'_, PyUntypedArray>,
    dtypes: &Dtypes<'_>,
    what: &dyn Fn() -> String,
) -> Result<(CounterSlot<'static>, f64, DType), StepError> {
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
    if !is_writeable(s) {
        return value_err!("{} is read-only (its writeable flag is False)", what());
    }
    // SAFETY: a 0-d array of that dtype, aligned (check_layout), holds exactly one element;
    // the overlap check keeps any other array of the step away from it.
    let (slot, old, new) = unsafe { counter_at(data_ptr(s), counter_dtype == DType::F64) };
    // A count below zero makes the bias corrections divide by zero or change sign: every
    // parameter would turn to NaN or garbage.
    if !(old.is_finite() && old >= 0.0) {
        return value_err!("{} must be a finite step count >= 0, got {old}", what());
    }
    Ok((slot, new, counter_dtype))
}

/// The step counter at `p` (float64 when `wide`, else float32): where its new value goes, its
/// value now, and its value once this step is applied (`step_t += 1` in the counter's dtype,
/// read back as torch's `step_t.item()` does).
///
/// # Safety
/// `p` points to one aligned, initialised element of that dtype, which nothing else of the
/// step reads or writes and which stays alive until the step returns.
pub(crate) unsafe fn counter_at(p: *mut u8, wide: bool) -> (CounterSlot<'static>, f64, f64) {
    #[allow(clippy::cast_ptr_alignment)] // the caller guarantees the alignment
    unsafe {
        if wide {
            let p = p.cast::<f64>();
            // Read before the `&mut` is made: a read through `p` after it would invalidate it
            // (Stacked Borrows; found by Miri).
            let old = *p;
            let new = old + 1.0;
            (CounterSlot::F64(&mut *p, new), old, new)
        } else {
            let p = p.cast::<f32>();
            let old = *p;
            let new = old + 1.0;
            (
                CounterSlot::F32(&mut *p, new),
                f64::from(old),
                f64::from(new),
            )
        }
    }
}

/// One piece of work for a thread: a chunk of one parameter and its rule.
enum Item<'a> {
    F32(Rule<f32>, Slices<'a, f32>),
    F64(Rule<f64>, Slices<'a, f64>),
    F16(Rule<f32>, Slices<'a, half::f16>),
    Bf16(Rule<f32>, Slices<'a, half::bf16>),
}

impl Item<'_> {
    fn grad_is_finite(&self) -> bool {
        match self {
            Item::F32(_, s) => s.grad_is_finite(),
            Item::F64(_, s) => s.grad_is_finite(),
            Item::F16(_, s) => s.grad_is_finite(),
            Item::Bf16(_, s) => s.grad_is_finite(),
        }
    }

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

/// Elements per work item: a chunk's parameter, gradient and state stay within L2 together.
pub const CHUNK_ELEMS: usize = 1 << 14;

/// The slices of one checked parameter, as storage type `S`.
///
/// # Safety
/// `c` must come from `check_param` in this step, with its arrays still alive and the overlap
/// check passed, so that the memory is valid, aligned, of dtype `S`, and written through no
/// other slice.
unsafe fn slices<'a, S>(c: &Checked) -> Slices<'a, S> {
    #[allow(clippy::cast_ptr_alignment)] // check_layout verified the alignment
    unsafe fn mk<'a, S>(p: *mut u8, len: usize) -> &'a mut [S] {
        if len == 0 {
            // NumPy may give an empty array any address; a slice needs an aligned one.
            &mut []
        } else {
            unsafe { std::slice::from_raw_parts_mut(p.cast::<S>(), len) }
        }
    }
    unsafe {
        Slices {
            param: mk(c.param, c.len),
            // Shared, never `&mut`: two parameters may read one gradient.
            grad: if c.len == 0 {
                &[]
            } else {
                std::slice::from_raw_parts(c.grad.cast(), c.len)
            },
            bufs: c.bufs.map(|b| b.map(|p| mk(p, c.len))),
        }
    }
}

/// Cuts every checked parameter into work items.
fn make_items(checked: &[Checked], items: &mut Vec<Item<'_>>) {
    fn push<'a, S: Storage>(
        s: Slices<'a, S>,
        rule: Rule<S::Compute>,
        wrap: fn(Rule<S::Compute>, Slices<'a, S>) -> Item<'a>,
        items: &mut Vec<Item<'a>>,
    ) {
        items.extend(s.chunks(CHUNK_ELEMS).map(|piece| wrap(rule, piece)));
    }
    for c in checked {
        // SAFETY: every entry of `checked` passed check_param and the overlap check, and the
        // Python objects holding its arrays outlive the step (see `run`).
        unsafe {
            match (c.dtype, c.rule) {
                (DType::F32, RuleOf::F32(r)) => push(slices::<f32>(c), r, Item::F32, items),
                (DType::F16, RuleOf::F32(r)) => push(slices::<half::f16>(c), r, Item::F16, items),
                (DType::Bf16, RuleOf::F32(r)) => {
                    push(slices::<half::bf16>(c), r, Item::Bf16, items);
                }
                (DType::F64, RuleOf::F64(r)) => push(slices::<f64>(c), r, Item::F64, items),
                _ => unreachable!("check_param pairs each dtype with its compute type"),
            }
        }
    }
}

/// Opt-in behaviours of a step.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Skip the whole step, changing nothing, when any gradient holds NaN or infinity.
    pub skip_nonfinite: bool,
    /// Flush denormals to zero on every thread of the step, for its duration.
    pub flush_denormals: bool,
    /// Test-only: panic at "validation" (before anything is written), in a "worker" (before
    /// its item writes), or "after_write" (once half the items have been written).
    pub panic_for_tests: Option<String>,
}

/// Runs one step. See `optirs._core.step` in the stubs for the contract. Returns whether the
/// update was applied (false: skipped for a non-finite gradient, nothing written).
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
    options: &Options,
    plan: bool,
    bf16_bits: bool,
) -> Result<(bool, Option<ArrayPlan>), StepError> {
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
        let at = Where { flat, group, index };
        checked.push(check_param(
            kind,
            &hypers[group],
            &mut rules,
            at,
            &dtypes,
            [&params[flat], grad, &buffers[flat], &steps[flat]],
            fresh.get(flat).copied().unwrap_or(false),
            &mut spans,
            &mut keep,
            plan.then_some(&mut stepped),
        )?);
    }
    check_overlaps_reusing(&spans)?;
    let plan = plan.then(|| {
        let written = spans
            .iter()
            .filter(|s| s.writes)
            .map(|s| (s.start, s.end))
            .collect();
        ArrayPlan::new(kind, n, stepped, written)
    });
    // `params`, `grads` and `steps` (owned lists of references) and `keep` (each state
    // array) hold every array alive until the work is done.
    let applied = execute(py, checked, options)?;
    drop(keep);
    Ok((applied, plan))
}

/// A cached plan's step (the NumPy API's and the bridge's): `check` gives the work and what
/// must stay alive while it runs, or None when the full step must run instead (nothing
/// written then); the work then runs as [`execute`] does. Panics in either surface as
/// `RuntimeError`.
pub(crate) fn planned<T>(
    py: Python<'_>,
    options: &Options,
    check: impl FnOnce() -> Option<(Vec<Checked>, T)>,
) -> PyResult<Option<(bool, T)>> {
    let Some((checked, keep)) = crate::bindings::catch_panics(|| Ok(check()))? else {
        return Ok(None);
    };
    let applied =
        crate::bindings::catch_panics(|| execute(py, checked, options).map_err(PyErr::from))?;
    Ok(Some((applied, keep)))
}

/// Updates every checked parameter with the GIL released; returns whether the update was
/// applied (false: skipped for a non-finite gradient, nothing written).
///
/// The caller has validated everything `checked` points to (dtypes, lengths, alignment, no
/// overlap between written memory and any other) and keeps that memory alive until this
/// returns.
pub(crate) fn execute(
    py: Python<'_>,
    mut checked: Vec<Checked>,
    options: &Options,
) -> Result<bool, StepError> {
    let mut items = Vec::with_capacity(checked.len());
    make_items(&checked, &mut items);
    let counters: Vec<CounterSlot<'_>> = checked.iter_mut().filter_map(|c| c.step.take()).collect();

    // Every check passed: from here on nothing can fail.
    if options.flush_denormals && !FlushGuard::supported() {
        return value_err!("flush_denormals is only available on x86-64");
    }
    let panic_at = options.panic_for_tests.as_deref();
    assert!(
        panic_at != Some("validation"),
        "test-only panic after validation"
    );
    let level = simd::active();
    let flush = options.flush_denormals;
    let applied = py.detach(|| {
        let total: usize = items.iter().map(Item::len).sum();
        if options.skip_nonfinite && !pool::all(&items, total, Item::grad_is_finite) {
            return false;
        }
        let half = items.len().div_ceil(2);
        let ran = AtomicUsize::new(0);
        let wrote = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pool::for_each(items, total, |it| {
                let _flush = FlushGuard::new(flush);
                assert!(panic_at != Some("worker"), "test-only panic in a worker");
                it.run(level);
                let done = ran.fetch_add(1, Ordering::Relaxed) + 1;
                assert!(
                    !(panic_at == Some("after_write") && done == half),
                    "test-only panic in a worker after it wrote"
                );
            });
        }));
        if let Err(payload) = wrote {
            // Every other item still ran (see `pool`); the counters were not advanced.
            std::panic::resume_unwind(Box::new(format!(
                "{}; the step stopped part-way: parameters and state of this step may be \
                 partly updated while their step counts are not (restore them from a \
                 checkpoint)",
                crate::bindings::panic_message(payload.as_ref())
            )));
        }
        for slot in counters {
            slot.write();
        }
        true
    });
    Ok(applied)
}

#[cfg(test)]
mod tests;
