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
//! Memory safety does not hang on those checks, nor on anything the caller says: the plan is
//! built from the NumPy views over each parameter's and state tensor's memory that the full step
//! just stepped through, and every pointer, element count and dtype it writes with is read from
//! those views (C-contiguous, aligned, writeable, of the parameter's size, all disjoint) and
//! checked against the tensors. The plan holds the views, and through them the tensors'
//! storage, so the memory it points to stays allocated even if a tensor is re-pointed
//! (`p.data = ...`), and a matching data pointer can only mean the same memory. A gradient's
//! pointer is read each step from the gradient itself, a tensor of torch's own `Tensor` type
//! (found by importing torch, not taken from the caller) whose layout must be the parameter's
//! and whose element count must be the view's; the step holds a reference to it until it
//! returns.
//!
//! torch's tensor methods release the GIL, so another thread may change a tensor between any
//! two of them: what is compared is read in one go where it can be (DLPack's exchange API
//! describes pointer, shape and strides at once; without it the gradient is read from a
//! detached alias no other thread holds), and what the plan keeps about a parameter is read
//! once and checked against the view's length.
//!
//! What no reference can prevent: `resize_()` to more elements of a storage the step is using,
//! from another thread while the step runs, reallocates that storage in place. torch offers no
//! way to pin a storage; README says not to do that.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use numpy::npyffi::{NPY_ARRAY_ALIGNED, NPY_ARRAY_C_CONTIGUOUS, NPY_ARRAY_WRITEABLE};
use numpy::{PyUntypedArray, PyUntypedArrayMethods};

use optirs_core::overlap::touches;
use optirs_core::{counter_at, Checked, CoreError, DType, Kind, RuleMemo, MAX_SCALARS};

use crate::boundary;
use crate::course::{self, Plan};
use crate::dlpack::{same_dims, DlDataType, Exchange, Layout};
use crate::errors::Result;
use crate::hyper;
use crate::ndarray::Dtypes;

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

/// A tensor the plan writes through, and what it looked like when the plan was built.
struct Tracked {
    tensor: Py<PyAny>,
    /// Where its first element was: the data pointer of the NumPy view the plan holds.
    ptr: usize,
    /// Its whole layout, with DLPack's exchange API.
    layout: Option<Layout>,
    /// Without it: `t.shape`, `t.stride()` and `t.dtype` as the plan saw them.
    methods: Option<[Py<PyAny>; 3]>,
}

impl Tracked {
    /// Whether the layout kept for later comparisons has this shape (read separately: another
    /// thread may have re-pointed the tensor in between).
    fn has_shape(&self, shape_obj: &Bound<'_, PyAny>, shape: &[i64]) -> Result<bool> {
        Ok(match (&self.layout, &self.methods) {
            (Some(l), _) => same_dims(&l.shape, shape),
            (None, Some([kept, _, _])) => kept.bind(shape_obj.py()).eq(shape_obj)?,
            (None, None) => false,
        })
    }
}

/// One parameter as the full step last saw it.
struct Entry {
    group: usize,
    dtype: DType,
    /// The state buffers' dtype: the parameter's, or bfloat16 under `state_dtype`.
    state_dtype: DType,
    len: usize,
    /// `p.dtype` and `p.shape`: a new gradient must have the same.
    dtype_obj: Py<PyAny>,
    shape: Py<PyAny>,
    /// `p.stride()` for a parameter that is dense but not contiguous; None when contiguous.
    strides: Option<Py<PyAny>>,
    /// The parameter, then the state entries the step uses (checked by identity in the state
    /// dict each step, under `keys`).
    param: Tracked,
    keys: Vec<Py<PyString>>,
    items: Vec<Tracked>,
    /// The kernels' state buffers (in the rule table's order) and the step counter.
    bufs: [Option<usize>; 3],
    counter: Option<(usize, bool)>,
    /// The rule's per-parameter 0-d state scalars (`Kind::scalar_names`), with their dtypes.
    scalars: [Option<(usize, DType)>; MAX_SCALARS],
    /// The NumPy views the pointers above were read from: they hold the tensors' memory.
    _views: Vec<Py<PyAny>>,
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

/// The number of elements of a shape, or None if a dimension is negative or it overflows.
fn numel_of(shape: &[i64]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
}

fn data_ptr(t: &Bound<'_, PyAny>) -> Result<usize> {
    Ok(t.call_method0(intern!(t.py(), "data_ptr"))?.extract()?)
}

fn refuse<T>(what: &str) -> Result<T> {
    Err(CoreError::value_error(format!("TorchPlan: {what}")).into())
}

/// True when a tensor of this shape and these strides (in elements) covers one block of memory
/// of exactly as many elements, in some order of its dimensions: then a tensor of the same
/// shape and strides at another address is read as that many contiguous elements.
fn is_dense(shape: &[i64], strides: &[i64]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut dims: Vec<(i64, i64)> = strides
        .iter()
        .zip(shape)
        .filter(|&(_, &n)| n != 1)
        .map(|(&st, &n)| (st, n))
        .collect();
    dims.sort_unstable();
    let mut expected = 1i64;
    for (stride, n) in dims {
        if stride != expected {
            return false;
        }
        let Some(next) = expected.checked_mul(n) else {
            return false;
        };
        expected = next;
    }
    true
}

/// One NumPy view of a tensor's memory, as the bridge's full step made it: its data pointer,
/// element count and dtype, when it is C-contiguous, aligned and writeable.
fn view_of(v: &Bound<'_, PyAny>, dtypes: &Dtypes<'_>) -> Result<(usize, usize, DType)> {
    let Ok(a) = v.cast::<PyUntypedArray>() else {
        return refuse("views must be numpy.ndarrays");
    };
    // SAFETY: a live ndarray; plain field reads.
    let (ptr, flags) = unsafe {
        let r = &(*a.as_array_ptr()).fields;
        (r.data as usize, r.flags)
    };
    let Some(dtype) = dtypes.of(a) else {
        return refuse("a view of an unsupported dtype");
    };
    let need = NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_WRITEABLE;
    if flags & need != need {
        return refuse("views must be C-contiguous, aligned and writeable");
    }
    Ok((ptr, a.len(), dtype))
}

/// Whether a state buffer of `dt` may belong to a parameter of `dtype` whose other buffers are
/// of `seen`: the parameter's dtype, or bfloat16 state for a float32 or float16 one, one dtype
/// for all of a parameter's buffers.
fn state_fits(dtype: DType, seen: Option<DType>, dt: DType) -> bool {
    let kernel = dt == dtype || (dt == DType::Bf16 && matches!(dtype, DType::F32 | DType::F16));
    kernel && seen.is_none_or(|q| q == dt)
}

impl TorchPlan {
    /// What `tensor` looks like now, to compare with later; refused unless it starts at `ptr`.
    fn track(
        tensor: &Bound<'_, PyAny>,
        ptr: usize,
        exchange: Option<&Exchange>,
    ) -> Result<Tracked> {
        let py = tensor.py();
        #[allow(clippy::redundant_closure_for_method_calls)] // the closure fixes the lifetime
        let (layout, methods) = if let Some(ex) = exchange {
            {
                let Some(layout) = ex.describe(tensor, |v| v.to_owned()) else {
                    return refuse("a tensor DLPack cannot describe");
                };
                if layout.ptr != ptr {
                    return refuse("a tensor and its view differ");
                }
                (Some(layout), None)
            }
        } else {
            {
                if data_ptr(tensor)? != ptr {
                    return refuse("a tensor and its view differ");
                }
                let shape = tensor.getattr(intern!(py, "shape"))?.unbind();
                let stride = tensor.call_method0(intern!(py, "stride"))?.unbind();
                let dtype = tensor.getattr(intern!(py, "dtype"))?.unbind();
                (None, Some([shape, stride, dtype]))
            }
        };
        Ok(Tracked {
            tensor: tensor.clone().unbind(),
            ptr,
            layout,
            methods,
        })
    }

    /// Whether the exchange API speaks for every tensor of an entry tuple: the parameter's type
    /// publishes this very capsule (a subclass inherits it unless it brings its own), and each
    /// tensor's description starts where its view does.
    fn exchange_agrees(ex: &Exchange, t: &Bound<'_, PyTuple>) -> bool {
        let py = t.py();
        let (Ok(p), Ok(p_view), Ok(items), Ok(views)) =
            (t.get_item(1), t.get_item(2), t.get_item(4), t.get_item(5))
        else {
            return false;
        };
        let own = p
            .get_type()
            .getattr(intern!(py, "__dlpack_c_exchange_api__"))
            .is_ok_and(|c| c.is(ex.capsule(py)));
        let start = |v: &Bound<'_, PyAny>| {
            v.cast::<PyUntypedArray>()
                // SAFETY: a live ndarray; a plain field read.
                .map(|a| unsafe { (*a.as_array_ptr()).fields.data as usize })
                .ok()
        };
        let agrees = |tensor: &Bound<'_, PyAny>, view: &Bound<'_, PyAny>| {
            let Some(at) = start(view) else { return false };
            ex.describe(tensor, |v| v.ptr == at) == Some(true)
        };
        // The parameter's element type as DLPack names it, against its view's.
        let dtypes = Dtypes::new(py, true);
        let same_type = p_view
            .cast::<PyUntypedArray>()
            .ok()
            .and_then(|a| dtypes.of(a))
            .is_some_and(|dt| ex.describe(&p, |v| v.dtype == DlDataType::of(dt)) == Some(true));
        own && same_type
            && agrees(&p, &p_view)
            && items
                .try_iter()
                .ok()
                .zip(views.try_iter().ok())
                .is_some_and(|(is, vs)| {
                    is.zip(vs).all(|(i, v)| match (i, v) {
                        (Ok(i), Ok(v)) => agrees(&i, &v),
                        _ => false,
                    })
                })
    }

    /// Sorts an entry's state views by key: the kernels' buffers (in the rule table's order),
    /// the step counter and the rule's 0-d scalars, each checked against the parameter's
    /// `(dtype, len)` and recorded in `spans` and `views`; returns them and each view's
    /// pointer, in `keys` order.
    #[allow(clippy::type_complexity)]
    fn place(
        kind: Kind,
        keys: &[String],
        item_views: &Bound<'_, PyTuple>,
        dtypes: &Dtypes<'_>,
        (dtype, len): (DType, usize),
        spans: &mut Vec<(usize, usize)>,
        views: &mut Vec<Py<PyAny>>,
    ) -> Result<(
        [Option<usize>; 3],
        Option<DType>,
        Option<(usize, bool)>,
        [Option<(usize, DType)>; MAX_SCALARS],
        Vec<usize>,
    )> {
        let names = kind.buffer_names();
        let mut bufs = [None; 3];
        let mut state_dtype = None;
        let mut counter = None;
        let mut scalars = [None; MAX_SCALARS];
        let mut item_ptrs = Vec::with_capacity(keys.len());
        for (key, view) in keys.iter().zip(item_views.iter()) {
            let (ptr, n, dt) = view_of(&view, dtypes)?;
            if key == "step" {
                let wide = match dt {
                    DType::F64 => true,
                    DType::F32 => false,
                    _ => return refuse("a step counter must be float32 or float64"),
                };
                let is_0d = view.cast::<PyUntypedArray>()?.ndim() == 0;
                if !is_0d || counter.is_some() || !kind.counts_steps() {
                    return refuse("one 0-d step counter, for a kind that counts steps");
                }
                counter = Some((ptr, wide));
                spans.push((ptr, ptr + dt.size()));
            } else if let Some(j) = kind.scalar_names().iter().position(|s| s == key) {
                let is_0d = view.cast::<PyUntypedArray>()?.ndim() == 0;
                if !is_0d || scalars[j].replace((ptr, dt)).is_some() {
                    return refuse("one 0-d array per state scalar");
                }
                spans.push((ptr, ptr + dt.size()));
            } else {
                let Some(slot) = names.iter().position(|b| b == key) else {
                    return refuse("an unknown state key");
                };
                if bufs[slot].is_some() || !state_fits(dtype, state_dtype, dt) || n != len {
                    return refuse("state buffers must be distinct and match their parameter");
                }
                state_dtype = Some(dt);
                bufs[slot] = Some(ptr);
                spans.push((ptr, ptr + len * dt.size()));
            }
            views.push(view.unbind());
            item_ptrs.push(ptr);
        }
        if kind.counts_steps() && counter.is_none() {
            return refuse("a step counter is missing");
        }
        if scalars
            .iter()
            .take(kind.scalar_names().len())
            .any(Option::is_none)
        {
            return refuse("a state scalar is missing");
        }
        Ok((bufs, state_dtype, counter, scalars, item_ptrs))
    }

    /// Reads one entry tuple, `(group, p, p_view, keys, items, item_views)`: `items` are the
    /// state tensors the step uses, under the names in `keys` (buffers and "step"), and the
    /// views are the NumPy arrays the full step just stepped them through. Everything the
    /// plan will write through is read from those views and checked here, so that no argument
    /// can make it write outside memory it holds.
    #[allow(clippy::too_many_lines)] // one pass over the tuple, each check beside its reading
    fn entry(
        kind: Kind,
        t: &Bound<'_, PyTuple>,
        tensor_type: &Bound<'_, PyAny>,
        spans: &mut Vec<(usize, usize)>,
        exchange: Option<&Exchange>,
    ) -> Result<Entry> {
        let py = t.py();
        if t.len() != 6 {
            return refuse("entries are (group, p, p_view, keys, items, item_views)");
        }
        let group: usize = t.get_item(0)?.extract()?;
        let p = t.get_item(1)?;
        let p_view = t.get_item(2)?;
        let keys: Vec<String> = t.get_item(3)?.extract()?;
        let items = t.get_item(4)?.cast_into::<PyTuple>()?;
        let item_views = t.get_item(5)?.cast_into::<PyTuple>()?;
        if items.len() != keys.len() || item_views.len() != keys.len() {
            return refuse("one item and one view per key");
        }
        if !p.is_instance(tensor_type)?
            || !items
                .iter()
                .all(|i| i.is_instance(tensor_type).unwrap_or(false))
        {
            return refuse("parameters and state must be torch.Tensors");
        }
        let dtypes = Dtypes::new(py, true);
        let (param_ptr, len, dtype) = view_of(&p_view, &dtypes)?;
        let torch_dtype = p.getattr(intern!(py, "dtype"))?;
        if torch_dtype.str()?.to_cow()? != format!("torch.{}", dtype.torch_name()) {
            return refuse("a parameter and its view differ");
        }
        let bytes = len * dtype.size();
        spans.push((param_ptr, param_ptr + bytes));

        let mut views = vec![p_view.clone().unbind()];
        let mut tracked_items = Vec::with_capacity(items.len());
        let (bufs, state_dtype, counter, scalars, item_ptrs) = TorchPlan::place(
            kind,
            &keys,
            &item_views,
            &dtypes,
            (dtype, len),
            spans,
            &mut views,
        )?;

        // torch's methods release the GIL, so another thread may re-point `p` (`p.data =
        // p.data[:k]` keeps the pointer) between any two of these reads: everything kept
        // about the parameter's shape is read once here and checked against the view's
        // length, and the layout `track` reads below is checked against it again. A shape
        // kept from a later reading than the length would let a shorter gradient pass as the
        // parameter's, and the kernels read `len` elements of it.
        let strides_obj = p.call_method0(intern!(py, "stride"))?;
        let shape_obj = p.getattr(intern!(py, "shape"))?;
        let shape_vec: Vec<i64> = shape_obj.extract()?;
        let strides_vec: Vec<i64> = strides_obj.extract()?;
        let contiguous = p.call_method0(intern!(py, "is_contiguous"))?.is_truthy()?;
        if !contiguous && !is_dense(&shape_vec, &strides_vec) {
            return refuse("a parameter must be dense in memory");
        }

        let param = TorchPlan::track(&p, param_ptr, exchange)?;
        if numel_of(&shape_vec) != Some(len) || !param.has_shape(&shape_obj, &shape_vec)? {
            return refuse("a parameter and its view differ");
        }
        for (item, &ptr) in items.iter().zip(&item_ptrs) {
            tracked_items.push(TorchPlan::track(&item, ptr, exchange)?);
        }
        Ok(Entry {
            group,
            dtype,
            state_dtype: state_dtype.unwrap_or(dtype),
            len,
            dtype_obj: torch_dtype.unbind(),
            shape: shape_obj.unbind(),
            strides: if contiguous {
                None
            } else {
                Some(strides_obj.unbind())
            },
            param,
            keys: keys
                .iter()
                .map(|k| PyString::intern(py, k).unbind())
                .collect(),
            items: tracked_items,
            bufs,
            counter,
            scalars,
            _views: views,
        })
    }

    /// Whether a gradient may be stepped with entry `e`'s parameter: exactly a dense CPU
    /// `torch.Tensor` of the parameter's dtype, shape and strides, without a pending negation,
    /// over aligned memory the step does not write. Returns its data pointer.
    fn grad_ptr(&self, e: &Entry, g: &Bound<'_, PyAny>) -> Result<Option<usize>> {
        let py = g.py();
        // Neither the layout nor the negation bit is in a DLTensor.
        let ok = g.get_type().is(self.tensor_type.bind(py))
            && g.getattr(intern!(py, "layout"))?.is(self.strided.bind(py))
            && !g.call_method0(intern!(py, "is_neg"))?.is_truthy()?;
        if !ok {
            return Ok(None);
        }
        let ptr = if let (Some(ex), Some(p)) = (&self.exchange, &e.param.layout) {
            // A contiguous parameter takes any contiguous gradient (size-1 dimensions may have
            // any stride); a dense non-contiguous one needs its own strides.
            let fits = ex.describe(g, |v| {
                let like = match e.strides {
                    None => v.dtype == p.dtype && same_dims(v.shape, &p.shape) && v.is_contiguous(),
                    Some(_) => v.same_kind(p),
                };
                // The plan's shape was checked against `e.len` when it was built; checked
                // again here, as the kernels read `e.len` elements of the gradient.
                (like && numel_of(v.shape) == Some(e.len)).then_some(v.ptr)
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
        if touches(&self.written, ptr, ptr + bytes) {
            return Ok(None);
        }
        Ok(Some(ptr))
    }

    /// Whether a tracked tensor still has the memory and whole layout the full step saw.
    fn unmoved(&self, t: &Tracked, py: Python<'_>) -> Result<bool> {
        let tensor = t.tensor.bind(py);
        Ok(match (&self.exchange, &t.layout, &t.methods) {
            (Some(ex), Some(was), _) => {
                ex.describe(tensor, |v| v.ptr == was.ptr && v.same_kind(was)) == Some(true)
            }
            (_, _, Some([shape, stride, dtype])) => {
                data_ptr(tensor)? == t.ptr
                    && tensor.getattr(intern!(py, "dtype"))?.is(dtype.bind(py))
                    && tensor.getattr(intern!(py, "shape"))?.eq(shape.bind(py))?
                    && tensor
                        .call_method0(intern!(py, "stride"))?
                        .eq(stride.bind(py))?
            }
            _ => false,
        })
    }

    /// Whether entry `e`'s parameter is unmoved and its state entry (`entry`, the value the
    /// state dict holds for it) still holds the same tensors, unmoved.
    fn current(&self, e: &Entry, entry: Option<&Bound<'_, PyAny>>, py: Python<'_>) -> Result<bool> {
        if !self.unmoved(&e.param, py)? {
            return Ok(false);
        }
        let entry = entry.and_then(|v| v.cast::<PyDict>().ok());
        if entry.is_none() && !e.keys.is_empty() {
            return Ok(false);
        }
        for (key, item) in e.keys.iter().zip(&e.items) {
            let Some(entry) = entry else {
                return Ok(false);
            };
            match entry.get_item(key.bind(py))? {
                Some(v) if v.is(item.tensor.bind(py)) => {}
                _ => return Ok(false),
            }
            if !self.unmoved(item, py)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Checks everything and returns the work, or None when the full path must look.
    #[allow(clippy::type_complexity)]
    fn check_all<'py>(
        &self,
        groups: &Bound<'py, PyAny>,
        state: &Bound<'py, PyAny>,
    ) -> Result<Option<(Vec<Checked>, Vec<usize>, Vec<Bound<'py, PyAny>>)>> {
        let py = groups.py();
        let n_groups = groups.len()?;
        let mut hypers = Vec::with_capacity(n_groups);
        let mut state_dtypes = Vec::with_capacity(n_groups);
        for gi in 0..n_groups {
            let group = groups.get_item(gi)?;
            hypers.push(hyper::read(self.kind, &group, gi)?);
            state_dtypes.push(hyper::state_dtype(&group, gi)?);
            if !crate::step::Rounding::read(&group, gi).is_ok_and(crate::step::Rounding::is_plain) {
                return Ok(None);
            }
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
            let g = e.param.tensor.bind(py).getattr(intern!(py, "grad"))?;
            if g.is_none() {
                continue;
            }
            // Without the exchange API the gradient's layout and pointer take several calls,
            // and torch's methods release the GIL: another thread could re-point the gradient
            // (`g.data = ...`) between them. They are read from a detached alias instead,
            // which no other thread holds, and which the step holds until it returns.
            let g = if self.exchange.is_none() {
                g.call_method0(intern!(py, "detach"))?
            } else {
                g
            };
            if !self.current(e, entry_of[k].as_ref(), py)? {
                return Ok(None);
            }
            let Some(grad) = self.grad_ptr(e, &g)? else {
                return Ok(None);
            };
            let (counter, count) = match e.counter {
                Some((ptr, wide)) => {
                    // SAFETY: the full step checked this counter (a 0-d, aligned float32 or
                    // float64 array, apart from every other array it wrote), its storage is
                    // held by the plan, and its data pointer is unchanged.
                    let (slot, old, new) = unsafe { counter_at(ptr as *mut u8, wide) };
                    if !(old.is_finite() && old >= 0.0) {
                        return Ok(None);
                    }
                    (Some(slot), new)
                }
                None => (None, 0.0),
            };
            // The group's options must use exactly the buffers the plan has.
            let Some(hyper) = hypers
                .get(e.group)
                .filter(|h| h.needs() == e.bufs.map(|b| b.is_some()))
            else {
                return Ok(None);
            };
            // ... kept in the dtype the group asks for now (a parameter without buffers has
            // nothing to keep).
            let wanted = state_dtypes.get(e.group).copied().flatten();
            if e.bufs.iter().any(Option::is_some) && wanted.unwrap_or(e.dtype) != e.state_dtype {
                return Ok(None);
            }
            let scalars = e.scalars.map(|s| s.map(|(ptr, dt)| (ptr as *mut u8, dt)));
            // SAFETY: the full step checked each scalar (a 0-d, aligned array of its dtype,
            // apart from every other array it wrote), its storage is held by the plan, and
            // the state entry is still that tensor, unmoved.
            let (rule, slots) =
                unsafe { rules.get_at(e.group, hyper, e.dtype, count, false, scalars)? };
            // SAFETY: every pointer of the entry was read from a NumPy view the plan holds
            // (C-contiguous, aligned, writeable, `e.len` elements of `e.dtype`, the buffers
            // of `e.state_dtype` (checked in `entry` to be one the kernels take), all disjoint:
            // `written`), and the tensors still start there (`unmoved`). The gradient is a
            // dense CPU tensor of the parameter's dtype with `e.len` elements, aligned, apart
            // from everything written (`grad_ptr`), held by `grads` until the work returns.
            checked.push(unsafe {
                Checked::new(
                    e.dtype,
                    e.len,
                    e.param.ptr as *mut u8,
                    grad as *const u8,
                    e.bufs.map(|b| b.map(|ptr| ptr as *mut u8)),
                    counter,
                    rule,
                )
                .with_state_dtype(e.state_dtype)
                .with_scalars(slots)
            });
            stepped.push(k);
            grads.push(g);
        }
        Ok(Some((checked, stepped, grads)))
    }

    /// `TorchPlan(kind, entries, exchange_api)`; see the constructor's documentation.
    fn build(
        kind: &str,
        entries: &Bound<'_, PyList>,
        exchange_api: Option<&Bound<'_, PyAny>>,
    ) -> Result<TorchPlan> {
        let py = entries.py();
        let kind = Kind::parse(kind)?;
        // torch's own objects, never taken from the caller: what a gradient must be.
        let torch = py.import(intern!(py, "torch"))?;
        let tensor_type = torch.getattr(intern!(py, "Tensor"))?;
        let strided = torch.getattr(intern!(py, "strided"))?;
        let increment_version = py
            .import(intern!(py, "torch.autograd.graph"))?
            .getattr(intern!(py, "increment_version"))?;
        let mut exchange = exchange_api.and_then(Exchange::from_capsule);
        if let Some(ex) = &exchange {
            let all_agree = entries.iter().all(|item| {
                item.cast::<PyTuple>()
                    .map_or(true, |t| TorchPlan::exchange_agrees(ex, t))
            });
            if !all_agree {
                // Not the API this code was written against: every step of this plan asks
                // torch's Python methods instead.
                exchange = None;
            }
        }
        let mut spans = Vec::new();
        let mut list = Vec::with_capacity(entries.len());
        let mut index = HashMap::default();
        for (k, item) in entries.iter().enumerate() {
            match item.cast::<PyTuple>() {
                Ok(t) => {
                    let e = TorchPlan::entry(kind, t, &tensor_type, &mut spans, exchange.as_ref())?;
                    index.insert(e.param.tensor.as_ptr() as usize, k);
                    list.push(Ok(e));
                }
                Err(_) => list.push(Err(item.unbind())),
            }
        }
        spans.retain(|(s, e)| e > s);
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return refuse("the tensors it would write overlap");
        }
        let all_written = PyList::empty(py);
        for e in list.iter().filter_map(|e| e.as_ref().ok()) {
            all_written.append(e.param.tensor.bind(py))?;
            for t in &e.items {
                all_written.append(t.tensor.bind(py))?;
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
}

impl Plan for TorchPlan {
    /// The indices of the entries stepped, and their gradients.
    type Keep<'py> = (Vec<usize>, Vec<Bound<'py, PyAny>>);

    fn check<'py>(
        &self,
        groups: &Bound<'py, PyAny>,
        state: &Bound<'py, PyAny>,
    ) -> Option<(Vec<Checked>, Self::Keep<'py>)> {
        // An error while checking (a tensor that refuses `data_ptr()`, a group with a bad
        // value) is the full path's to report, with its own words: fall back to it.
        let (checked, stepped, grads) = self.check_all(groups, state).ok()??;
        Some((checked, (stepped, grads)))
    }

    fn after(&self, py: Python<'_>, applied: bool, keep: Self::Keep<'_>) -> Result<()> {
        let (stepped, grads) = keep;
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
                    written.append(e.param.tensor.bind(py))?;
                    for t in &e.items {
                        written.append(t.tensor.bind(py))?;
                    }
                }
                bump.call1((written,))?;
            }
        }
        Ok(())
    }
}

#[pymethods]
impl TorchPlan {
    /// Builds a plan from what the bridge's full step just checked and stepped.
    ///
    /// `entries` holds, per parameter in `param_groups` order, the parameter itself when that
    /// full step did not step it, else `(group, p, p_view, keys, items, item_views)`: `items`
    /// are the state tensors the step uses, under the names in `keys` (buffers and "step"),
    /// and the views are the NumPy arrays over their memory that the full step stepped. Every
    /// pointer, size and dtype is read from those views and checked against the tensors, and
    /// the plan holds the views, so no argument can make it write where it should not.
    /// `exchange_api` is `torch.Tensor.__dlpack_c_exchange_api__` where torch has it: the plan
    /// then reads each tensor's layout in one C call.
    #[new]
    #[pyo3(signature = (kind, entries, exchange_api = None))]
    fn new(
        kind: &str,
        entries: &Bound<'_, PyList>,
        exchange_api: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<TorchPlan> {
        boundary::entry(|| TorchPlan::build(kind, entries, exchange_api))
    }

    /// Steps every parameter that has a gradient; returns whether the update was applied, or
    /// None (nothing written) when something changed and the full path must run instead.
    #[pyo3(signature = (
        groups, state, *, skip_nonfinite = false, flush_denormals = false,
        grad_unscale = None, grad_coef = None,
        _panic_for_tests = None
    ))]
    #[allow(clippy::used_underscore_binding)]
    fn step(
        &self,
        groups: &Bound<'_, PyAny>,
        state: &Bound<'_, PyAny>,
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
        // The plan's entries (and storages) and the gradients `check` keeps hold every tensor
        // stepped alive.
        course::plan_step(self, groups, state, &options)
    }

    /// Whether each step reads the tensors' layouts through torch's DLPack exchange API (else
    /// through their Python methods).
    #[getter]
    fn uses_exchange_api(&self) -> PyResult<bool> {
        boundary::entry(|| Ok(self.exchange.is_some()))
    }

    /// How many parameters the plan covers (for tests).
    fn __len__(&self) -> PyResult<usize> {
        boundary::entry(|| Ok(self.covered))
    }
}
