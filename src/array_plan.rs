//! The NumPy API's fast step: what a full step validated, kept for the steps after it.
//!
//! A full step (`_core.step(..., plan=True)`) checks every array of every parameter with a
//! gradient, steps them, and returns an [`ArrayPlan`] holding those arrays and what it found:
//! data pointers, dtype descriptors, shapes, and every byte range the step writes. Each later
//! step goes through the plan: it re-reads each held array's header (same memory, dtype,
//! shape, still contiguous, aligned and writeable: `ndarray.resize()` or a dtype or shape
//! assignment changes them), checks each new gradient (an ndarray of the parameter's dtype
//! and shape, contiguous, aligned, not overlapping anything written) and each step counter,
//! then updates through the pointers. The checks read struct fields, with no Python calls.
//!
//! Anything unexpected makes the plan return `None` having written nothing; the NumPy API then
//! runs the full step, which words the precise error or builds a new plan. What the plan does
//! not see itself (parameters moved between groups, state entries replaced) the NumPy API
//! checks before asking it (`optirs._Plan.fits`); the plan re-checks every pointer it uses
//! either way, so a stale plan can fall back but never write where it should not.
//!
//! Every pointer the plan's step uses belongs to an array it holds a reference to for the
//! whole step: the parameters, state buffers and counters in its entries (the plan object is
//! itself held by the Python call that runs its method), and each gradient, which `check`
//! takes out of the caller's list as a new reference: the list is the user's, and another
//! thread may empty it while the GIL is released.

use numpy::npyffi::{
    PyArrayObject, NPY_ARRAY_ALIGNED, NPY_ARRAY_C_CONTIGUOUS, NPY_ARRAY_WRITEABLE,
};
use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyList;

use optirs_core::overlap::touches;
use optirs_core::{counter_at, Checked, DType, Kind, RuleMemo, MAX_SCALARS};

use crate::boundary;
use crate::course::{self, Plan};
use crate::hyper;
use crate::ndarray::Dtypes;

/// Flags every array the step writes must keep.
const WRITABLE: i32 = NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_WRITEABLE;
/// Flags a gradient must have.
const READABLE: i32 = NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED;

/// The dimensions of `a`, as its header holds them.
fn dims(a: &Bound<'_, PyUntypedArray>) -> Vec<isize> {
    // SAFETY: `a` is a live ndarray; its dimensions array holds `nd` entries.
    unsafe {
        let r = &(*a.as_array_ptr()).fields;
        match usize::try_from(r.nd) {
            Ok(nd) if nd > 0 => std::slice::from_raw_parts(r.dimensions, nd).to_vec(),
            _ => Vec::new(),
        }
    }
}

/// The header of the ndarray at `raw`, as (data pointer, flags), when it has the shape `dims`.
///
/// # Safety
/// `raw` points to a live ndarray.
unsafe fn shaped(raw: *mut pyo3::ffi::PyObject, dims: &[isize]) -> Option<(usize, usize, i32)> {
    unsafe {
        let r = &(*raw.cast::<PyArrayObject>()).fields;
        // Element by element: a slice comparison calls memcmp, which costs more than the
        // one or two dimensions most parameters have.
        let same = usize::try_from(r.nd).is_ok_and(|nd| nd == dims.len())
            && dims
                .iter()
                .enumerate()
                .all(|(i, &d)| *r.dimensions.add(i) == d);
        same.then_some((r.data as usize, r.descr as usize, r.flags))
    }
}

/// An array the plan writes through, with its data pointer and dtype descriptor when the full
/// step checked it.
struct Held {
    array: Py<PyUntypedArray>,
    data: usize,
    descr: usize,
}

impl Held {
    fn new(a: &Bound<'_, PyUntypedArray>) -> Held {
        // SAFETY: `a` is a live ndarray; plain field reads.
        let (data, descr) = unsafe {
            let r = &(*a.as_array_ptr()).fields;
            (r.data as usize, r.descr as usize)
        };
        Held {
            array: a.clone().unbind(),
            data,
            descr,
        }
    }

    /// True when the array still has its memory, dtype and the shape `dims`, and is still
    /// contiguous, aligned and writeable. Field reads only.
    fn unchanged(&self, dims: &[isize]) -> bool {
        // SAFETY: the plan holds a reference to the array, so it is alive.
        unsafe { shaped(self.array.as_ptr(), dims) }.is_some_and(|(data, descr, flags)| {
            data == self.data && descr == self.descr && flags & WRITABLE == WRITABLE
        })
    }
}

/// One parameter as the full step checked it.
struct Entry {
    group: usize,
    dtype: DType,
    /// The state buffers' dtype (the parameter's, or bfloat16 under `state_dtype`).
    state_dtype: DType,
    len: usize,
    dims: Vec<isize>,
    /// Which of the kind's buffers the group's options used.
    needs: [bool; 3],
    param: Held,
    bufs: [Option<Held>; 3],
    /// The step counter, and whether it is float64.
    counter: Option<(Held, bool)>,
    /// The rule's per-parameter 0-d state scalars, with their dtypes.
    scalars: [Option<(Held, DType)>; MAX_SCALARS],
}

/// The NumPy API's cached step; see the module documentation.
#[pyclass(module = "optirs._core", frozen)]
pub struct ArrayPlan {
    kind: Kind,
    /// Per parameter, in param_groups order: what the full step checked, or None for a
    /// parameter it did not step (no gradient then): a gradient for it sends the step back.
    entries: Vec<Option<Entry>>,
    /// Every byte range the step writes, sorted by start and disjoint.
    written: Vec<(usize, usize)>,
}

/// What the full step hands over to build a plan, per parameter it stepped: its flat index,
/// group, dtype, the group's buffer needs, and the arrays it checked (the buffers the needs
/// name, and the step counter with whether it is float64).
pub(crate) struct Stepped<'py> {
    pub(crate) flat: usize,
    pub(crate) group: usize,
    pub(crate) dtype: DType,
    pub(crate) state_dtype: DType,
    pub(crate) needs: [bool; 3],
    pub(crate) param: Bound<'py, PyUntypedArray>,
    pub(crate) bufs: [Option<Bound<'py, PyUntypedArray>>; 3],
    pub(crate) counter: Option<(Bound<'py, PyUntypedArray>, bool)>,
    pub(crate) scalars: [Option<(Bound<'py, PyUntypedArray>, DType)>; MAX_SCALARS],
}

impl ArrayPlan {
    /// A plan of `n` parameters from what a full step validated, and the byte ranges it
    /// writes (disjoint: the step's overlap check passed).
    pub(crate) fn new(
        kind: Kind,
        n: usize,
        stepped: Vec<Stepped<'_>>,
        mut written: Vec<(usize, usize)>,
    ) -> ArrayPlan {
        let mut entries: Vec<Option<Entry>> = (0..n).map(|_| None).collect();
        for s in stepped {
            entries[s.flat] = Some(Entry {
                group: s.group,
                dtype: s.dtype,
                state_dtype: s.state_dtype,
                len: s.param.len(),
                dims: dims(&s.param),
                needs: s.needs,
                param: Held::new(&s.param),
                bufs: s.bufs.map(|b| b.as_ref().map(Held::new)),
                counter: s.counter.map(|(c, wide)| (Held::new(&c), wide)),
                scalars: s.scalars.map(|x| x.map(|(a, dt)| (Held::new(&a), dt))),
            });
        }
        written.sort_unstable();
        ArrayPlan {
            kind,
            entries,
            written,
        }
    }

    /// The gradient's data pointer when `g` may be stepped with entry `e`: an ndarray of the
    /// parameter's dtype and shape, contiguous and aligned, apart from all memory written.
    fn grad_ptr(&self, e: &Entry, g: &Bound<'_, PyAny>, dtypes: &Dtypes<'_>) -> Option<usize> {
        let g = g.cast::<PyUntypedArray>().ok()?;
        // SAFETY: `g` is a live ndarray.
        let (data, _, flags) = unsafe { shaped(g.as_ptr(), &e.dims) }?;
        if flags & READABLE != READABLE || dtypes.of(g) != Some(e.dtype) {
            return None;
        }
        let bytes = e.len * e.dtype.size();
        if bytes > 0 && touches(&self.written, data, data + bytes) {
            return None;
        }
        Some(data)
    }
}

impl Plan for ArrayPlan {
    /// The gradients it reads.
    type Keep<'py> = Vec<Bound<'py, PyAny>>;

    /// Checks everything; the work and the gradients it reads, or None when the full step must
    /// look.
    fn check<'py>(
        &self,
        groups: &Bound<'py, PyAny>,
        grads: &Bound<'py, PyAny>,
    ) -> Option<(Vec<Checked>, Vec<Bound<'py, PyAny>>)> {
        let py = groups.py();
        let grads = grads.cast::<PyList>().ok()?;
        if grads.len() != self.entries.len() {
            return None;
        }
        let n_groups = groups.len().ok()?;
        let mut hypers = Vec::with_capacity(n_groups);
        let mut state_dtypes = Vec::with_capacity(n_groups);
        for gi in 0..n_groups {
            let group = groups.get_item(gi).ok()?;
            hypers.push(hyper::read(self.kind, &group, gi).ok()?);
            state_dtypes.push(hyper::state_dtype(&group, gi).ok()?);
            if !crate::step::Rounding::read(&group, gi).ok()?.is_plain() {
                return None;
            }
        }
        let dtypes = Dtypes::new(py, false);
        let mut rules = RuleMemo::default();
        let mut checked = Vec::with_capacity(self.entries.len());
        let mut held = Vec::with_capacity(self.entries.len());
        for (e, g) in self.entries.iter().zip(grads.iter()) {
            if g.is_none() {
                continue;
            }
            let e = e.as_ref()?;
            let hyper = hypers.get(e.group)?;
            let state_dtype = state_dtypes.get(e.group)?.unwrap_or(e.dtype);
            if hyper.needs() != e.needs
                || state_dtype != e.state_dtype
                || !e.param.unchanged(&e.dims)
            {
                return None;
            }
            let mut bufs = [None; 3];
            for (slot, b) in bufs.iter_mut().zip(&e.bufs) {
                if let Some(b) = b {
                    if !b.unchanged(&e.dims) {
                        return None;
                    }
                    *slot = Some(b.data as *mut u8);
                }
            }
            let grad = self.grad_ptr(e, &g, &dtypes)?;
            let (counter, count) = match &e.counter {
                Some((c, wide)) => {
                    if !c.unchanged(&[]) {
                        return None;
                    }
                    // SAFETY: the full step checked this counter (0-d, aligned, of this dtype,
                    // apart from every other array written); its header is unchanged and the
                    // plan holds the array.
                    let (slot, old, new) = unsafe { counter_at(c.data as *mut u8, *wide) };
                    if !(old.is_finite() && old >= 0.0) {
                        return None;
                    }
                    (Some(slot), new)
                }
                None => (None, 0.0),
            };
            let mut scalars = [None; MAX_SCALARS];
            for (ptr, s) in scalars.iter_mut().zip(&e.scalars) {
                if let Some((h, dt)) = s {
                    if !h.unchanged(&[]) {
                        return None;
                    }
                    *ptr = Some((h.data as *mut u8, *dt));
                }
            }
            // SAFETY: the full step checked each scalar (0-d, aligned, of its dtype, apart
            // from every other array written); its header is unchanged and the plan holds it.
            let (rule, slots) =
                unsafe { rules.get_at(e.group, hyper, e.dtype, count, false, scalars) }.ok()?;
            // SAFETY: the full step checked the parameter and its buffers (C-contiguous,
            // aligned, writeable, `e.len` elements of `e.dtype` and `e.state_dtype`, every written range disjoint
            // from every other: `written`); their headers are unchanged (same memory, dtype,
            // shape and flags) and the plan holds the arrays. The gradient is an aligned
            // contiguous ndarray of that dtype and shape, apart from everything written
            // (`grad_ptr`), held by `held` until the work returns.
            checked.push(unsafe {
                Checked::new(
                    e.dtype,
                    e.len,
                    e.param.data as *mut u8,
                    grad as *const u8,
                    bufs,
                    counter,
                    rule,
                )
                .with_state_dtype(e.state_dtype)
                .with_scalars(slots)
            });
            held.push(g);
        }
        Some((checked, held))
    }
}

#[pymethods]
impl ArrayPlan {
    /// Steps every parameter whose gradient in `grads` is not None; returns whether the update
    /// was applied, or None (nothing written) when the full step must run instead.
    #[pyo3(signature = (
        groups, grads, *, skip_nonfinite = false, flush_denormals = false,
        grad_unscale = None, grad_coef = None,
        _panic_for_tests = None
    ))]
    #[allow(clippy::used_underscore_binding)]
    fn step(
        &self,
        groups: &Bound<'_, PyAny>,
        grads: &Bound<'_, PyList>,
        skip_nonfinite: bool,
        flush_denormals: bool,
        grad_unscale: Option<f64>,
        grad_coef: Option<f64>,
        _panic_for_tests: Option<String>,
    ) -> PyResult<Option<bool>> {
        let options = course::options(
            skip_nonfinite,
            flush_denormals,
            grad_unscale,
            grad_coef,
            _panic_for_tests,
        );
        // The plan holds every array it writes, and `check` a reference to every gradient it
        // reads: `grads` is the caller's list, which another thread may empty while the GIL
        // is released.
        course::plan_step(self, groups, grads.as_any(), &options)
    }

    /// How many parameters the plan covers (for tests).
    fn __len__(&self) -> PyResult<usize> {
        boundary::entry(|| Ok(self.entries.iter().filter(|e| e.is_some()).count()))
    }
}
