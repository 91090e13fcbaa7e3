//! What the torch bridge's flat step (`optirs.torch.flatten_parameters`) re-checks each step
//! before it steps a few flat buffers in place of many parameters: that every parameter still
//! lies where the flat buffer put it, that its gradient is still the view of the flat gradient
//! buffer that autograd accumulates into, and that the optimizer's state entries still hold the
//! views of the flat state buffers. One call in Rust instead of a few Python attribute reads per
//! parameter (1000 parameters: those reads cost more than the step itself).
//!
//! The watch writes nothing and reads no memory through pointers: it compares object identities
//! and the layouts torch reports. When anything differs the bridge steps through its per-tensor
//! path instead, which is correct for any tensors.
//!
//! Its `unsafe` blocks:
//! - [`all_items`] walks the state dicts with borrowed references (no reference counting, 4000
//!   items a step for 1000 Adam parameters): sound because the GIL is held for the whole walk
//!   and the code run per item compares pointers and reads dict sizes and types only, so no
//!   Python code runs that could change a dict or drop what it holds.
//! - [`prefetch`] issues the CPU's prefetch instruction (x86-64's PREFETCHT0, aarch64's PRFM),
//!   a hint that cannot fault for any address: the addresses ([`Hints`]) are never
//!   dereferenced.

use std::collections::HashMap;
use std::sync::OnceLock;

use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::boundary;
use crate::dlpack::{Exchange, Layout};
use crate::errors::Result;

/// Where a tensor's data was and how it was laid out, as far as the way it is read can say.
enum Place {
    /// DLPack's exchange API: pointer, element type, shape and strides.
    Layout(Layout),
    /// Without it: `data_ptr()` and `shape`.
    Ptr(usize, Py<PyAny>),
}

/// The parameters, gradients and state entries of one flat step; see the module documentation.
#[pyclass(module = "optirs._core", frozen)]
pub struct FlatWatch {
    params: Vec<Py<PyAny>>,
    grads: Vec<Py<PyAny>>,
    /// Per parameter, then per gradient (None for a gradient that must stay None).
    places: Vec<Option<Place>>,
    /// Per parameter: its state entry (the dict) and the values it held, in order.
    entries: Vec<Py<PyAny>>,
    values: Vec<Vec<Py<PyAny>>>,
    /// `id(p)` -> its index.
    index: HashMap<usize, usize>,
    /// How many parameters have an entry (not None).
    present: usize,
    /// The indices of the parameters in the order the state mapping held them when first
    /// checked: later walks compare each key with the one expected there, and look a key up in
    /// `index` only where it differs (hashing 1000 keys cost about a third of the walk).
    order: OnceLock<Vec<usize>>,
    exchange: Option<Exchange>,
    /// Per parameter: where the check's reads will go, prefetched a few parameters ahead.
    hints: Vec<Hints>,
    /// `(callable, argument)`: the version counter increments `admit` makes once the check
    /// has passed.
    bump: Option<(Py<PyAny>, Py<PyAny>)>,
}

/// How many parameters ahead the check prefetches.
const AHEAD: usize = 8;

/// The addresses of a parameter's and its gradient's Python objects and of the C++ tensors
/// (`TensorImpl`, several cache lines each, as `Tensor._cdata` gives them) behind them, taken
/// when the watch is made; 0 where unknown. Hints only: never dereferenced, so an address
/// that has gone stale (a tensor re-pointed since, which the check then finds) costs a wasted
/// prefetch and nothing else.
struct Hints {
    objects: [usize; 2],
    tensors: [usize; 2],
}

impl Hints {
    /// Lines of a `TensorImpl` prefetched, from its start (of 1, 3, 4 and 6 measured, 4 and
    /// 6 did best).
    const TENSOR_LINES: usize = 4;

    fn prefetch(&self) {
        for &a in &self.objects {
            prefetch(a);
        }
        for &a in &self.tensors {
            for l in 0..Self::TENSOR_LINES {
                prefetch(a.wrapping_add(64 * l));
            }
        }
    }
}

/// Asks the CPU to start loading the cache line at `addr` (x86-64 and aarch64; nothing
/// elsewhere).
#[inline(always)]
fn prefetch(addr: usize) {
    if addr == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults, whatever the address, and reads nothing
    // into the program; the address is not dereferenced anywhere else.
    unsafe {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(addr as *const i8);
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: PRFM is a hint: the architecture makes a prefetch of any address, mapped or
    // not, raise no fault; it writes no register and no memory, and reads nothing into the
    // program.
    unsafe {
        core::arch::asm!(
            "prfm pldl1keep, [{0}]",
            in(reg) addr,
            options(nostack, readonly, preserves_flags)
        );
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = addr;
}

fn same(a: &Place, b: &Place, py: Python<'_>) -> Result<bool> {
    Ok(match (a, b) {
        (Place::Layout(a), Place::Layout(b)) => a == b,
        (Place::Ptr(a, sa), Place::Ptr(b, sb)) => a == b && sa.bind(py).eq(sb.bind(py))?,
        _ => false,
    })
}

/// Calls `f` with each key and value of `d`, borrowed (no reference counts touched, no check of
/// the dict's size between items), until it returns false; whether it never did.
///
/// # Safety
/// `f` runs no Python code (no call, no attribute read, no drop of a Python reference): the
/// GIL is held throughout, so nothing else can change `d` while it is walked, and `d` keeps
/// each borrowed key and value alive.
unsafe fn all_items<'py>(
    d: &Bound<'py, PyDict>,
    mut f: impl FnMut(Borrowed<'_, 'py, PyAny>, Borrowed<'_, 'py, PyAny>) -> bool,
) -> bool {
    let py = d.py();
    let mut pos: ffi::Py_ssize_t = 0;
    let mut key = std::ptr::null_mut();
    let mut value = std::ptr::null_mut();
    // SAFETY: `d` is a dict, alive (borrowed from the caller) and, as the caller promises, not
    // changed during the walk; PyDict_Next writes borrowed references to live objects.
    while unsafe { ffi::PyDict_Next(d.as_ptr(), &raw mut pos, &raw mut key, &raw mut value) } != 0 {
        // SAFETY: both are non-null borrowed references the dict keeps alive for this item.
        let (k, v) = unsafe { (Borrowed::from_ptr(py, key), Borrowed::from_ptr(py, value)) };
        if !f(k, v) {
            return false;
        }
    }
    true
}

impl FlatWatch {
    fn place(&self, t: &Bound<'_, PyAny>) -> Result<Option<Place>> {
        let py = t.py();
        if let Some(ex) = &self.exchange {
            #[allow(clippy::redundant_closure_for_method_calls)] // the closure fixes the lifetime
            return Ok(ex.describe(t, |v| v.to_owned()).map(Place::Layout));
        }
        let ptr: usize = t.call_method0(intern!(py, "data_ptr"))?.extract()?;
        let shape = t.getattr(intern!(py, "shape"))?.unbind();
        Ok(Some(Place::Ptr(ptr, shape)))
    }

    fn build(
        params: &Bound<'_, PyList>,
        grads: &Bound<'_, PyList>,
        entries: &Bound<'_, PyList>,
        exchange_api: Option<&Bound<'_, PyAny>>,
        bump: Option<crate::bindings::Then<'_>>,
    ) -> Result<FlatWatch> {
        let n = params.len();
        if grads.len() != n || entries.len() != n {
            return Err(optirs_core::CoreError::value_error(
                "FlatWatch: params, grads and entries must have the same length".to_string(),
            )
            .into());
        }
        let mut watch = FlatWatch {
            params: params.iter().map(Bound::unbind).collect(),
            grads: grads.iter().map(Bound::unbind).collect(),
            places: Vec::with_capacity(2 * n),
            entries: Vec::with_capacity(n),
            values: Vec::with_capacity(n),
            index: HashMap::with_capacity(n),
            present: 0,
            order: OnceLock::new(),
            exchange: exchange_api.and_then(Exchange::from_capsule),
            hints: Vec::with_capacity(n),
            bump: bump.map(|(c, a)| (c.unbind(), a.unbind())),
        };
        // A tensor's object, and the address of the C++ tensor behind it (`_cdata`); 0 for
        // None (a frozen parameter's gradient) and where torch gives no address.
        let hint = |t: &Bound<'_, PyAny>| -> (usize, usize) {
            if t.is_none() {
                return (0, 0);
            }
            let cdata = t.getattr(intern!(t.py(), "_cdata"));
            (
                t.as_ptr() as usize,
                cdata.and_then(|v| v.extract()).unwrap_or(0),
            )
        };
        for (p, g) in params.iter().zip(grads.iter()) {
            let ((po, pt), (go, gt)) = (hint(&p), hint(&g));
            watch.hints.push(Hints {
                objects: [po, go],
                tensors: [pt, gt],
            });
        }
        for t in params.iter().chain(grads.iter()) {
            if t.is_none() {
                // A parameter that must stay without a gradient.
                watch.places.push(None);
                continue;
            }
            let Some(place) = watch.place(&t)? else {
                return Err(optirs_core::CoreError::value_error(
                    "FlatWatch: a tensor not in CPU memory".to_string(),
                )
                .into());
            };
            watch.places.push(Some(place));
        }
        for (k, (p, e)) in params.iter().zip(entries.iter()).enumerate() {
            if e.is_none() {
                watch.values.push(Vec::new());
            } else {
                let Ok(d) = e.cast::<PyDict>() else {
                    return Err(optirs_core::CoreError::value_error(
                        "FlatWatch: state entries must be dicts or None".to_string(),
                    )
                    .into());
                };
                watch
                    .values
                    .push(d.values().iter().map(Bound::unbind).collect());
                watch.present += 1;
            }
            watch.entries.push(e.unbind());
            if watch.index.insert(p.as_ptr() as usize, k).is_some() {
                return Err(optirs_core::CoreError::value_error(
                    "FlatWatch: a parameter listed twice".to_string(),
                )
                .into());
            }
        }
        Ok(watch)
    }

    fn check(&self, state: &Bound<'_, PyAny>) -> Result<bool> {
        let py = state.py();
        let Ok(state) = state.cast::<PyDict>() else {
            return Ok(false);
        };
        // One walk over the state dict: looking a tensor up calls its Python-level __hash__.
        if self.walk_state(state) != Some(self.present) {
            return Ok(false);
        }
        // One pass over the parameters (each one's objects are read together): its gradient is
        // its view, and it and the view lie where they did.
        let n = self.params.len();
        let grad = intern!(py, "grad");
        // The reads below chase pointers from each parameter's object into torch's C++ tensor
        // and on to its gradient's: started a few parameters ahead, those loads overlap (after
        // the update streamed through the caches, 1000 parameters' check took 560 us without
        // and 340 us with).
        for h in self.hints.iter().take(AHEAD) {
            h.prefetch();
        }
        for (k, (p, g)) in self.params.iter().zip(&self.grads).enumerate() {
            if let Some(h) = self.hints.get(k + AHEAD) {
                h.prefetch();
            }
            let p = p.bind(py);
            let g = g.bind(py);
            if !p.getattr(grad)?.is(g) {
                return Ok(false);
            }
            if !self.unmoved(p, self.places[k].as_ref(), py)?
                || !self.unmoved(g, self.places[n + k].as_ref(), py)?
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// How many of the parameters' state entries `state` holds, or None when one of them is
    /// not the dict it was or does not hold the same values in the same order (or a parameter
    /// that had no state has a non-empty entry).
    fn walk_state(&self, state: &Bound<'_, PyDict>) -> Option<usize> {
        let py = state.py();
        let order = self.order.get();
        let mut walked = Vec::new();
        let mut seen = 0usize;
        let mut i = 0usize;
        let same = |key: Borrowed<'_, '_, PyAny>, value: Borrowed<'_, '_, PyAny>| -> bool {
            let ptr = key.as_ptr() as usize;
            let at = i;
            i += 1;
            let found = order
                .and_then(|o| o.get(at))
                .filter(|&&k| {
                    self.params
                        .get(k)
                        .is_some_and(|p| p.as_ptr() as usize == ptr)
                })
                .or_else(|| self.index.get(&ptr))
                .copied();
            if order.is_none() {
                // usize::MAX (no parameter) for a key that is none of them.
                walked.push(found.unwrap_or(usize::MAX));
            }
            let Some(k) = found else {
                return true;
            };
            let expected = self.entries[k].bind(py);
            if expected.is_none() {
                // A parameter without state (plain SGD): an empty entry may have appeared.
                return value.cast::<PyDict>().is_ok_and(|d| d.is_empty());
            }
            if !value.is(expected) {
                return false;
            }
            let Ok(d) = value.cast::<PyDict>() else {
                return false;
            };
            let kept = &self.values[k];
            if d.len() != kept.len() {
                return false;
            }
            let mut next = kept.iter();
            // SAFETY: the closure compares pointers only and runs no Python code.
            let values_same = unsafe {
                all_items(&d, |_, v| {
                    next.next().is_some_and(|w| v.as_ptr() == w.as_ptr())
                })
            };
            seen += usize::from(values_same);
            values_same
        };
        // SAFETY: `same` runs no Python code: it compares pointers, reads dict sizes and types,
        // and looks up Rust maps.
        if !unsafe { all_items(state, same) } {
            return None;
        }
        if order.is_none() && seen == self.present {
            // Another thread may have set it first: either order is a hint only.
            let _ = self.order.set(walked);
        }
        Some(seen)
    }

    /// Whether `t` still lies where it did (`kept`; None: nothing to compare, a None gradient).
    fn unmoved(&self, t: &Bound<'_, PyAny>, kept: Option<&Place>, py: Python<'_>) -> Result<bool> {
        let Some(kept) = kept else {
            return Ok(true);
        };
        Ok(match (&self.exchange, kept) {
            // Compared in place, without copying the layout: 2000 tensors a step.
            (Some(ex), Place::Layout(l)) => {
                ex.describe(t, |v| v.ptr == l.ptr && v.same_kind(l)) == Some(true)
            }
            _ => match self.place(t)? {
                Some(now) => same(&now, kept, py)?,
                None => false,
            },
        })
    }

    fn stray(&self, py: Python<'_>) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        for (k, (p, g)) in self.params.iter().zip(&self.grads).enumerate() {
            if !p.bind(py).getattr(intern!(py, "grad"))?.is(g.bind(py)) {
                out.push(k);
            }
        }
        Ok(out)
    }
}

#[pymethods]
impl FlatWatch {
    /// `FlatWatch(params, grads, entries, exchange_api=None, bump=None)`: the parameters, the
    /// gradient views each must keep as `p.grad` (None: must stay None), and each parameter's
    /// state dict (its values are kept as they are now), or None for a parameter without state
    /// (it may gain an empty one). `exchange_api` is torch's DLPack exchange API capsule,
    /// through which the tensors' layouts are read when given (else `data_ptr()` and `shape`).
    /// `bump` is `(callable, argument)`, called by `admit`.
    #[new]
    #[pyo3(signature = (params, grads, entries, exchange_api = None, bump = None))]
    fn new(
        params: &Bound<'_, PyList>,
        grads: &Bound<'_, PyList>,
        entries: &Bound<'_, PyList>,
        exchange_api: Option<&Bound<'_, PyAny>>,
        bump: Option<crate::bindings::Then<'_>>,
    ) -> PyResult<FlatWatch> {
        boundary::entry(|| FlatWatch::build(params, grads, entries, exchange_api, bump))
    }

    /// Whether everything is as it was: `state` (the optimizer's state mapping) holds each
    /// parameter's entry with the same values in the same order, each `p.grad` is its view,
    /// and every parameter and gradient has its layout and data pointer.
    fn current(&self, state: &Bound<'_, PyAny>) -> PyResult<bool> {
        boundary::entry(|| self.check(state))
    }

    /// `current(state)`, and when it holds, `bump[0](bump[1])` right away, while the tensors
    /// the check has just read are still in cache (the version bumps torch's in-place ops
    /// would make; 1000 parameters' bumps took 118 us here against 284 us after the update
    /// has streamed through the caches). The flat step hands this to `step(before=...)`, which
    /// calls it once the step is validated, right before the update.
    fn admit(&self, state: &Bound<'_, PyAny>) -> PyResult<bool> {
        boundary::entry(|| {
            if !self.check(state)? {
                return Ok(false);
            }
            if let Some((call, arg)) = &self.bump {
                let py = state.py();
                call.bind(py).call1((arg.bind(py),))?;
            }
            Ok(true)
        })
    }

    /// The indices of the parameters whose `p.grad` is not their gradient view (None or
    /// another tensor).
    fn stray_grads(&self, py: Python<'_>) -> PyResult<Vec<usize>> {
        boundary::entry(|| self.stray(py))
    }

    fn __len__(&self) -> PyResult<usize> {
        boundary::entry(|| Ok(self.params.len()))
    }
}
