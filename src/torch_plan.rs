//! The torch bridge's fast step: one call per `optimizer.step()` that re-checks in Rust what may
//! have changed since the bridge last looked at every tensor, then steps through raw pointers.
//!
//! The bridge's full path (Python, `optirs.torch`) validates every tensor, makes missing state
//! and steps through NumPy views; after a successful full step it builds a [`TorchPlan`] of what
//! it saw. Each later step asks the plan first. The plan re-reads, per parameter with a
//! gradient: the parameter's data pointer (`p.data = ...` moves it), its state entries (by
//! identity) and their data pointers, and the gradient (usually a new tensor every step: its
//! type, device, layout, dtype, shape, strides, sign bit and memory are all checked, and it
//! must not overlap memory the step writes). Anything unexpected makes the step return `None`
//! having written nothing, and the bridge falls back to its full path, which raises the precise
//! error or builds a new plan.
//!
//! Memory safety does not hang on those checks alone: the plan holds every parameter's and state
//! tensor's storage (the bridge passes `untyped_storage()` objects), so the memory it points to
//! stays allocated even if a tensor is re-pointed, and a matching data pointer can only mean the
//! same memory.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};
use pyo3::{intern, BoundObject};

use crate::dlpack::{same_dims, DlDataType, Exchange, Layout};
use crate::step::{self, Checked, DType, Hyper, Kind, Options, RuleMemo};

/// Hashes a pointer-sized key by one multiplication: the keys are object addresses.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

/// One parameter as the full step last saw it.
struct Entry {
    group: usize,
    p: Py<PyAny>,
    dtype: DType,
    len: usize,
    /// `p.dtype` and `p.shape`: a new gradient must have the same.
    dtype_obj: Py<PyAny>,
    shape: Py<PyAny>,
    /// `p.stride()` for a parameter that is dense but not contiguous; None when contiguous.
    strides: Option<Py<PyAny>>,
    param_ptr: usize,
    /// The state entries the step uses, their tensors (checked by identity) and data pointers.
    keys: Vec<Py<PyString>>,
    items: Vec<Py<PyAny>>,
    item_ptrs: Vec<usize>,
    /// With DLPack's exchange API: the parameter's and the items' full layouts, which each
    /// step compares whole (one C call per tensor) instead of calling `data_ptr()`.
    layouts: Vec<Layout>,
    /// The kernels' state buffers (in `Kind::buffer_names` order) and the step counter.
    bufs: [Option<usize>; 3],
    counter: Option<(usize, bool)>,
    /// Holds the memory behind every pointer above.
    _storages: Py<PyAny>,
}

/// A cached step of the torch bridge; see the module documentation.
#[pyclass(module = "optirs._core", frozen)]
pub struct TorchPlan {
    kind: Kind,
    /// Per parameter: what the full step saw, or (`Err`) just the parameter, which was not
    /// stepped then: if it has a gradient now, the full step must look at it.
    entries: Vec<Result<Entry, Py<PyAny>>>,
    /// `id(p)` -> its index in `entries`.
    index: HashMap<usize, usize, BuildHasherDefault<AddressHasher>>,
    /// Every byte range the step writes, sorted by start and disjoint.
    written: Vec<(usize, usize)>,
    tensor_type: Py<PyAny>,
    strided: Py<PyAny>,
    increment_version: Py<PyAny>,
    /// Every parameter and state tensor of `entries`, for `increment_version` after a step
    /// that stepped them all (the usual case), instead of a new list each step.
    all_written: Py<PyList>,
    /// How many entries are `Ok`.
    covered: usize,
    /// torch's DLPack exchange API, when it has one (torch 2.10 and later) and it agreed with
    /// `data_ptr()` on every tensor of the plan when the plan was built.
    exchange: Option<Exchange>,
}

fn data_ptr(t: &Bound<'_, PyAny>) -> PyResult<usize> {
    t.call_method0(intern!(t.py(), "data_ptr"))?.extract()
}

fn parse_dtype(name: &str) -> PyResult<DType> {
    Ok(match name {
        "float32" => DType::F32,
        "float64" => DType::F64,
        "float16" => DType::F16,
        "bfloat16" => DType::Bf16,
        _ => return Err(PyValueError::new_err(format!("unknown dtype {name:?}"))),
    })
}

impl TorchPlan {
    /// Reads one entry tuple: `(group, p, dtype, numel, strides, keys, items, counter_is_f64,
    /// storages)`. The kernels' buffers and the step counter are the items under their names.
    fn entry(
        kind: Kind,
        t: &Bound<'_, PyTuple>,
        spans: &mut Vec<(usize, usize)>,
        exchange: &mut Option<Exchange>,
    ) -> PyResult<Entry> {
        let py = t.py();
        let p = t.get_item(1)?;
        let dtype = parse_dtype(&t.get_item(2)?.extract::<String>()?)?;
        let len: usize = t.get_item(3)?.extract()?;
        let strides = t.get_item(4)?;
        let keys: Vec<String> = t.get_item(5)?.extract()?;
        let items = t.get_item(6)?.cast_into::<PyTuple>()?;
        let wide: bool = t.get_item(7)?.extract()?;
        if items.len() != keys.len() {
            return Err(PyValueError::new_err("TorchPlan: one item per key"));
        }
        let bytes = len * dtype.size();

        let param_ptr = data_ptr(&p)?;
        spans.push((param_ptr, param_ptr + bytes));
        let mut item_ptrs = Vec::with_capacity(items.len());
        for (key, item) in keys.iter().zip(items.iter()) {
            let ptr = data_ptr(&item)?;
            let size = if key == "step" {
                if wide {
                    8
                } else {
                    4
                }
            } else {
                bytes
            };
            spans.push((ptr, ptr + size));
            item_ptrs.push(ptr);
        }
        let ptr_of = |name: &str| keys.iter().position(|k| k == name).map(|i| item_ptrs[i]);
        let mut bufs = [None; 3];
        for (slot, name) in bufs.iter_mut().zip(kind.buffer_names()) {
            *slot = ptr_of(name);
        }
        let counter = ptr_of("step").map(|ptr| (ptr, wide));
        let layouts = match exchange {
            Some(ex) => {
                let want = DlDataType::of(dtype);
                let mut layouts = Vec::with_capacity(1 + items.len());
                let agree = std::iter::once((p.clone(), param_ptr))
                    .chain(items.iter().zip(item_ptrs.iter().copied()))
                    .all(|(tensor, ptr)| {
                        ex.describe(&tensor, |v| {
                            layouts.push(v.to_owned());
                            v.ptr == ptr
                        }) == Some(true)
                    });
                // The protocol speaks for instances of the type the capsule came from; a
                // subclass (nn.Parameter) inherits the capsule unless it brings its own.
                let own = p
                    .get_type()
                    .getattr(intern!(py, "__dlpack_c_exchange_api__"))
                    .is_ok_and(|c| c.is(ex.capsule(py)));
                if own && agree && layouts[0].dtype == want {
                    layouts
                } else {
                    // Not the API this code was written against: every step of this plan
                    // asks torch's Python methods instead.
                    *exchange = None;
                    Vec::new()
                }
            }
            None => Vec::new(),
        };
        Ok(Entry {
            group: t.get_item(0)?.extract()?,
            dtype,
            len,
            dtype_obj: p.getattr(intern!(py, "dtype"))?.unbind(),
            shape: p.getattr(intern!(py, "shape"))?.unbind(),
            strides: if strides.is_none() {
                None
            } else {
                Some(strides.unbind())
            },
            param_ptr,
            keys: keys
                .iter()
                .map(|k| PyString::intern(py, k).unbind())
                .collect(),
            items: items.iter().map(BoundObject::unbind).collect(),
            item_ptrs,
            layouts,
            bufs,
            counter,
            _storages: t.get_item(8)?.unbind(),
            p: p.unbind(),
        })
    }

    /// Whether a gradient may be stepped with entry `e`'s parameter: exactly a dense CPU
    /// `torch.Tensor` of the parameter's dtype, shape and strides, without a pending negation,
    /// over aligned memory the step does not write. Returns its data pointer.
    fn grad_ptr(&self, e: &Entry, g: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
        let py = g.py();
        // Neither the layout nor the negation bit is in a DLTensor.
        let ok = g.get_type().is(self.tensor_type.bind(py))
            && g.getattr(intern!(py, "layout"))?.is(self.strided.bind(py))
            && !g.call_method0(intern!(py, "is_neg"))?.is_truthy()?;
        if !ok {
            return Ok(None);
        }
        let ptr = if let Some(ex) = &self.exchange {
            let p = &e.layouts[0];
            // A contiguous parameter takes any contiguous gradient (size-1 dimensions may have
            // any stride); a dense non-contiguous one needs its own strides.
            let fits = ex.describe(g, |v| {
                let like = match e.strides {
                    None => v.dtype == p.dtype && same_dims(v.shape, &p.shape) && v.is_contiguous(),
                    Some(_) => v.same_kind(p),
                };
                like.then_some(v.ptr)
            });
            let Some(ptr) = fits.flatten() else {
                return Ok(None);
            };
            ptr
        } else {
            let ok = g.getattr(intern!(py, "is_cpu"))?.is_truthy()?
                && g.getattr(intern!(py, "dtype"))?.is(e.dtype_obj.bind(py))
                && g.getattr(intern!(py, "shape"))?.eq(e.shape.bind(py))?
                && match &e.strides {
                    None => g.call_method0(intern!(py, "is_contiguous"))?.is_truthy()?,
                    Some(s) => g.call_method0(intern!(py, "stride"))?.eq(s.bind(py))?,
                };
            if !ok {
                return Ok(None);
            }
            data_ptr(g)?
        };
        let bytes = e.len * e.dtype.size();
        if bytes == 0 {
            return Ok(Some(ptr));
        }
        if ptr == 0 || ptr % e.dtype.size() != 0 {
            return Ok(None);
        }
        if step::touches(&self.written, ptr, ptr + bytes) {
            return Ok(None);
        }
        Ok(Some(ptr))
    }

    /// Whether `t` still points where the full step saw it (`layout`: as it was then, whole,
    /// when the exchange API is in use).
    fn unmoved(&self, t: &Bound<'_, PyAny>, ptr: usize, layout: Option<&Layout>) -> PyResult<bool> {
        Ok(match (&self.exchange, layout) {
            (Some(ex), Some(was)) => {
                ex.describe(t, |v| v.ptr == was.ptr && v.same_kind(was)) == Some(true)
            }
            _ => data_ptr(t)? == ptr,
        })
    }

    /// Checks everything and returns the work, or None when the full path must look.
    #[allow(clippy::type_complexity)]
    fn check<'py>(
        &self,
        groups: &Bound<'py, PyAny>,
        state: &Bound<'py, PyAny>,
    ) -> Result<Option<(Vec<Checked>, Vec<usize>, Vec<Bound<'py, PyAny>>)>, PyErr> {
        let py = groups.py();
        let n_groups = groups.len()?;
        let mut hypers = Vec::with_capacity(n_groups);
        for gi in 0..n_groups {
            hypers.push(Hyper::read(self.kind, &groups.get_item(gi)?, gi)?);
        }
        let Ok(state) = state.cast::<PyDict>() else {
            return Ok(None);
        };
        // One walk over the state dict instead of a lookup per parameter: looking a tensor up
        // calls its Python-level __hash__.
        let mut entry_of: Vec<Option<Bound<'py, PyAny>>> = vec![None; self.entries.len()];
        for (key, value) in state.iter() {
            if let Some(&k) = self.index.get(&(key.as_ptr() as usize)) {
                entry_of[k] = Some(value);
            }
        }

        let mut rules = RuleMemo::default();
        let mut checked = Vec::with_capacity(self.entries.len());
        let mut stepped = Vec::with_capacity(self.entries.len());
        let mut grads = Vec::with_capacity(self.entries.len());
        for (k, e) in self.entries.iter().enumerate() {
            let e = match e {
                Ok(e) => e,
                Err(p) => {
                    if p.bind(py).getattr(intern!(py, "grad"))?.is_none() {
                        continue;
                    }
                    return Ok(None);
                }
            };
            let p = e.p.bind(py);
            let g = p.getattr(intern!(py, "grad"))?;
            if g.is_none() {
                continue;
            }
            if !self.unmoved(p, e.param_ptr, e.layouts.first())? {
                return Ok(None);
            }
            let entry = entry_of[k].as_ref().and_then(|v| v.cast::<PyDict>().ok());
            if entry.is_none() && !e.keys.is_empty() {
                return Ok(None);
            }
            for (i, ((key, item), &ptr)) in
                e.keys.iter().zip(&e.items).zip(&e.item_ptrs).enumerate()
            {
                let Some(entry) = entry else {
                    return Ok(None);
                };
                let item = item.bind(py);
                match entry.get_item(key.bind(py))? {
                    Some(v) if v.is(item) => {}
                    _ => return Ok(None),
                }
                if !self.unmoved(item, ptr, e.layouts.get(i + 1))? {
                    return Ok(None);
                }
            }
            let Some(grad) = self.grad_ptr(e, &g)? else {
                return Ok(None);
            };
            let (counter, count) = match e.counter {
                Some((ptr, wide)) => {
                    // SAFETY: the full step checked this counter (a 0-d, aligned float32 or
                    // float64 array, apart from every other array it wrote), its storage is
                    // held by the plan, and its data pointer is unchanged.
                    let (slot, old, new) = unsafe { step::counter_at(ptr as *mut u8, wide) };
                    if !(old.is_finite() && old >= 0.0) {
                        return Ok(None);
                    }
                    (Some(slot), new)
                }
                None => (None, 0.0),
            };
            let Some(hyper) = hypers.get(e.group) else {
                return Ok(None);
            };
            checked.push(Checked {
                dtype: e.dtype,
                len: e.len,
                param: e.param_ptr as *mut u8,
                grad: grad as *const u8,
                bufs: e.bufs.map(|b| b.map(|ptr| ptr as *mut u8)),
                step: counter,
                rule: rules.get(e.group, hyper, e.dtype, count, false)?,
            });
            stepped.push(k);
            grads.push(g);
        }
        Ok(Some((checked, stepped, grads)))
    }
}

#[pymethods]
impl TorchPlan {
    /// Builds a plan from what the bridge's full step just checked and stepped.
    ///
    /// `entries` holds, per parameter in `param_groups` order, the parameter itself when that
    /// full step did not step it, else `(group, p, dtype_name, numel, strides_or_None, keys,
    /// items, counter_is_f64, storages)`: `items` are the state tensors the step uses, under
    /// the names in `keys` (buffers and "step"). `tensor_type` is `torch.Tensor`, `strided` is
    /// `torch.strided`, and `increment_version` is autograd's. `exchange_api` is
    /// `torch.Tensor.__dlpack_c_exchange_api__` where torch has it: the plan then reads each
    /// tensor's layout in one C call.
    #[new]
    #[pyo3(signature = (kind, entries, tensor_type, strided, increment_version, exchange_api = None))]
    fn new(
        kind: &str,
        entries: &Bound<'_, PyList>,
        tensor_type: Bound<'_, PyAny>,
        strided: Bound<'_, PyAny>,
        increment_version: Bound<'_, PyAny>,
        exchange_api: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<TorchPlan> {
        let kind = Kind::parse(kind)?;
        let mut exchange = exchange_api.and_then(Exchange::from_capsule);
        let mut spans = Vec::new();
        let mut list = Vec::with_capacity(entries.len());
        let mut index = HashMap::default();
        for (k, item) in entries.iter().enumerate() {
            match item.cast::<PyTuple>() {
                Ok(t) => {
                    let e = TorchPlan::entry(kind, t, &mut spans, &mut exchange)?;
                    index.insert(e.p.as_ptr() as usize, k);
                    list.push(Ok(e));
                }
                Err(_) => list.push(Err(item.unbind())),
            }
        }
        spans.retain(|(s, e)| e > s);
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(PyValueError::new_err(
                "TorchPlan: the tensors it would write overlap",
            ));
        }
        let all_written = PyList::empty(entries.py());
        for e in list.iter().filter_map(|e| e.as_ref().ok()) {
            all_written.append(e.p.bind(entries.py()))?;
            for t in &e.items {
                all_written.append(t.bind(entries.py()))?;
            }
        }
        Ok(TorchPlan {
            kind,
            all_written: all_written.unbind(),
            covered: list.iter().filter(|e| e.is_ok()).count(),
            entries: list,
            index,
            written: spans,
            tensor_type: tensor_type.unbind(),
            strided: strided.unbind(),
            increment_version: increment_version.unbind(),
            exchange,
        })
    }

    /// Steps every parameter that has a gradient; returns whether the update was applied, or
    /// None (nothing written) when something changed and the full path must run instead.
    #[pyo3(signature = (
        groups, state, *, skip_nonfinite = false, flush_denormals = false,
        _panic_for_tests = None
    ))]
    #[allow(clippy::used_underscore_binding)]
    fn step(
        &self,
        groups: &Bound<'_, PyAny>,
        state: &Bound<'_, PyAny>,
        skip_nonfinite: bool,
        flush_denormals: bool,
        _panic_for_tests: Option<String>,
    ) -> PyResult<Option<bool>> {
        let py = groups.py();
        let options = Options {
            skip_nonfinite,
            flush_denormals,
            panic_for_tests: _panic_for_tests,
        };
        // An error while checking (a tensor that refuses `data_ptr()`, a group with a bad
        // value) is the full path's to report, with its own words: fall back to it.
        // The plan's entries (and storages) and `grads` hold every tensor stepped alive.
        let done = step::planned(py, &options, || {
            let (checked, stepped, grads) = self.check(groups, state).ok()??;
            Some((checked, (stepped, grads)))
        })?;
        let Some((applied, (stepped, grads))) = done else {
            return Ok(None);
        };
        drop(grads);
        if applied && !stepped.is_empty() {
            // The core wrote behind autograd's back: bump the version counters as torch's
            // in-place ops would, so a graph that saved an old value refuses to use it.
            let bump = self.increment_version.bind(py);
            if stepped.len() == self.covered {
                bump.call1((self.all_written.bind(py),))?;
            } else {
                let written = PyList::empty(py);
                for e in stepped
                    .iter()
                    .filter_map(|&k| self.entries[k].as_ref().ok())
                {
                    written.append(e.p.bind(py))?;
                    for t in &e.items {
                        written.append(t.bind(py))?;
                    }
                }
                bump.call1((written,))?;
            }
        }
        Ok(Some(applied))
    }

    /// Whether each step reads the tensors' layouts through torch's DLPack exchange API (else
    /// through their Python methods).
    #[getter]
    fn uses_exchange_api(&self) -> bool {
        self.exchange.is_some()
    }

    /// How many parameters the plan covers (for tests).
    fn __len__(&self) -> usize {
        self.covered
    }
}
