//! The `optirs._core` extension module: thin wrappers, each run through the one panic boundary
//! (`boundary::entry`), that hand over to the full step (`step`), the plans, the probe or the
//! core's runtime controls.

use pyo3::prelude::*;

/// `(mapping, key, value)`: one entry of a step's bookkeeping.
pub(crate) type Commit<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>);
/// `(callable, argument)`: the last of it.
pub(crate) type Then<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>);

/// The bookkeeping of a step that was applied: `mapping[key] = value` for each triple of
/// `commit`, then `call(arg)`, done whatever happens on the way.
///
/// A signal that arrived during the step (Ctrl-C, SIGALRM) runs its Python handler at the first
/// Python code executed afterwards, and that may be inside one of these calls (a `__setitem__`
/// or `__hash__` written in Python): its exception then aborts that call. Returning it there
/// would leave the parameters updated and their new state thrown away, so each call is
/// retried (the handler has run by then; each call is idempotent) and the first exception is
/// raised once everything is done.
pub(crate) fn finish(commit: &[Commit<'_>], then: Option<&Then<'_>>) -> PyResult<()> {
    const TRIES: usize = 4;
    let mut first: Option<PyErr> = None;
    let mut attempt = |op: &dyn Fn() -> PyResult<()>| {
        for _ in 0..TRIES {
            match op() {
                Ok(()) => return,
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
    };
    for (mapping, key, value) in commit {
        attempt(&|| mapping.set_item(key, value));
    }
    if let Some((call, arg)) = then {
        attempt(&|| call.call1((arg,)).map(drop));
    }
    first.map_or(Ok(()), Err)
}

// Not declared free-threading-safe (PyO3's default would): no free-threaded (cp313t/cp314t)
// build is made or tested yet, so a free-threaded interpreter that loads a source build turns the
// GIL back on, with its warning, rather than trust an unchecked claim.
#[pymodule(gil_used = true)]
pub mod _core {
    #[pymodule_export]
    use crate::array_plan::ArrayPlan;
    #[pymodule_export]
    use crate::flat_watch::FlatWatch;
    #[pymodule_export]
    use crate::torch_plan::TorchPlan;

    use pyo3::prelude::*;
    use pyo3::types::{PyBool, PyDict, PyList};

    use optirs_core::kernels::simd::{self, SimdLevel};
    use optirs_core::{pool, CoreError, RULES};

    use crate::boundary::entry;
    use crate::step as stepper;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        entry(|| Ok(init_module(m)?))
    }

    fn init_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        // Environment values that cannot be used are said once, here, and otherwise ignored.
        let py = m.py();
        let warnings = pool::init().into_iter().chain(simd::init());
        for w in warnings {
            let msg = std::ffi::CString::new(w).unwrap_or_default();
            PyErr::warn(
                py,
                &py.get_type::<pyo3::exceptions::PyRuntimeWarning>(),
                &msg,
                1,
            )?;
        }
        m.add("CHUNK_ELEMS", optirs_core::CHUNK_ELEMS)?;
        // The rule table: each rule's state buffers, in the order the kernels take them
        // (checked against optirs._spec by tests/test_rules.py).
        let rules = pyo3::types::PyDict::new(py);
        for r in &RULES {
            rules.set_item(r.name, pyo3::types::PyTuple::new(py, r.buffers)?)?;
        }
        m.add("RULES", rules)?;
        // Each rule's per-parameter 0-d state besides `step`, handed over after its buffers.
        let scalars = pyo3::types::PyDict::new(py);
        for r in &RULES {
            scalars.set_item(r.name, pyo3::types::PyTuple::new(py, r.scalars)?)?;
        }
        m.add("RULE_SCALARS", scalars)?;
        Ok(())
    }

    /// Runs one optimizer step over every parameter of every group; returns whether it was
    /// applied, and with `plan` the plan of the steps after it: `(applied, ArrayPlan)`. Once
    /// the update is applied, and before returning, `mapping[key] = value` for each triple of
    /// `commit` (the state the step created) and then `then[0](then[1])`, so that an
    /// interrupt (Ctrl-C) cannot come between the update and its bookkeeping. `before`, the
    /// caller's go-ahead, is called as `before[0](before[1])` once everything is validated,
    /// right before the update: a false result makes the step return None, nothing written.
    /// With `bf16_bits` (the torch bridge), uint16 arrays are bfloat16 bit patterns; otherwise
    /// integer arrays are refused and bfloat16 is `ml_dtypes.bfloat16`. A panic (a bug, never
    /// a user's mistake) surfaces as `RuntimeError`.
    #[pyfunction]
    #[pyo3(signature = (
        kind, groups, params, grads, buffers, steps, fresh, *,
        skip_nonfinite = false, flush_denormals = false,
        grad_unscale = None, grad_coef = None, plan = false, bf16_bits = false,
        commit = None, then = None, before = None, _panic_for_tests = None
    ))]
    // The leading underscore keeps the test-only keyword out of sight in Python.
    #[allow(
        clippy::too_many_arguments,
        clippy::needless_pass_by_value,
        clippy::used_underscore_binding,
        clippy::fn_params_excessive_bools
    )]
    fn step(
        py: Python<'_>,
        kind: &str,
        groups: &Bound<'_, PyAny>,
        params: Vec<Bound<'_, PyAny>>,
        grads: Vec<Bound<'_, PyAny>>,
        buffers: Vec<Bound<'_, PyAny>>,
        steps: Vec<Bound<'_, PyAny>>,
        fresh: Vec<bool>,
        skip_nonfinite: bool,
        flush_denormals: bool,
        grad_unscale: Option<f64>,
        grad_coef: Option<f64>,
        plan: bool,
        bf16_bits: bool,
        commit: Option<Vec<crate::bindings::Commit<'_>>>,
        then: Option<crate::bindings::Then<'_>>,
        before: Option<crate::bindings::Then<'_>>,
        _panic_for_tests: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let options = crate::course::options(
            skip_nonfinite,
            flush_denormals,
            grad_unscale,
            grad_coef,
            _panic_for_tests,
        );
        entry(|| {
            let Some((applied, made)) = stepper::run(
                py,
                kind,
                groups,
                params,
                grads,
                buffers,
                steps,
                fresh,
                &options,
                plan,
                bf16_bits,
                before.as_ref(),
            )?
            else {
                // `before` declined: nothing was written.
                return Ok(py.None());
            };
            if applied {
                crate::bindings::finish(&commit.unwrap_or_default(), then.as_ref())?;
            }
            Ok(match made {
                Some(p) => (applied, p).into_pyobject(py)?.into_any().unbind(),
                // A plan asked for but not made (a group with optirs's rounding options):
                // (applied, None), so that the caller's unpacking holds.
                None if plan => (applied, py.None()).into_pyobject(py)?.into_any().unbind(),
                None => PyBool::new(py, applied).to_owned().into_any().unbind(),
            })
        })
    }

    /// The total norm of `grads` (NumPy arrays, each C-contiguous) as
    /// `torch.nn.utils.get_total_norm` computes it: `(norm, dtype, coef)`, where `dtype` is the
    /// norm's dtype (the gradients' promoted dtype; float32 for none) and `coef` the clip
    /// coefficient `min(max_norm / (norm + 1e-6), 1)` in that dtype (None without `max_norm`).
    /// One parallel pass; bitwise the same at every thread count and SIMD level.
    #[pyfunction]
    #[pyo3(signature = (grads, norm_type = 2.0, max_norm = None, *, bf16_bits = false))]
    #[allow(clippy::needless_pass_by_value)]
    fn grad_norm(
        py: Python<'_>,
        grads: Vec<Bound<'_, PyAny>>,
        norm_type: f64,
        max_norm: Option<f64>,
        bf16_bits: bool,
    ) -> PyResult<(f64, &'static str, Option<f64>)> {
        entry(|| {
            Ok(crate::clip::grad_norm(
                py, &grads, norm_type, max_norm, bf16_bits,
            )?)
        })
    }

    /// Multiplies every array of `grads` by `coef` in place (`g.mul_(coef)`: the product in the
    /// gradient's compute type, rounded to its dtype). One parallel pass.
    #[pyfunction]
    #[pyo3(signature = (grads, coef, *, bf16_bits = false))]
    #[allow(clippy::needless_pass_by_value)]
    fn scale_grads(
        py: Python<'_>,
        grads: Vec<Bound<'_, PyAny>>,
        coef: f64,
        bf16_bits: bool,
    ) -> PyResult<()> {
        entry(|| Ok(crate::clip::scale_grads(py, &grads, coef, bf16_bits)?))
    }

    /// One 8-bit Adam/AdamW step; see the stubs.
    #[pyfunction]
    #[pyo3(signature = (
        groups, params, grads, states, steps, *, block_size, skip_nonfinite = false,
        flush_denormals = false, grad_unscale = None, grad_coef = None, bf16_bits = false,
        commit = None, then = None
    ))]
    #[allow(
        clippy::too_many_arguments,
        clippy::needless_pass_by_value,
        clippy::fn_params_excessive_bools
    )]
    fn step_adam8bit(
        py: Python<'_>,
        groups: &Bound<'_, PyAny>,
        params: Vec<Bound<'_, PyAny>>,
        grads: Vec<Bound<'_, PyAny>>,
        states: Vec<Bound<'_, PyAny>>,
        steps: Vec<Bound<'_, PyAny>>,
        block_size: usize,
        skip_nonfinite: bool,
        flush_denormals: bool,
        grad_unscale: Option<f64>,
        grad_coef: Option<f64>,
        bf16_bits: bool,
        commit: Option<Vec<crate::bindings::Commit<'_>>>,
        then: Option<crate::bindings::Then<'_>>,
    ) -> PyResult<bool> {
        let options = crate::course::options(
            skip_nonfinite,
            flush_denormals,
            grad_unscale,
            grad_coef,
            None,
        );
        step_and_finish(commit, then.as_ref(), || {
            crate::q8::run(
                py, groups, params, grads, states, steps, block_size, &options, bf16_bits,
            )
        })
    }

    /// One Adafactor step; see the stubs.
    #[pyfunction]
    #[pyo3(signature = (
        groups, params, grads, states, steps, *, skip_nonfinite = false,
        flush_denormals = false, grad_unscale = None, grad_coef = None, bf16_bits = false,
        commit = None, then = None
    ))]
    #[allow(
        clippy::too_many_arguments,
        clippy::needless_pass_by_value,
        clippy::fn_params_excessive_bools
    )]
    fn step_adafactor(
        py: Python<'_>,
        groups: &Bound<'_, PyAny>,
        params: Vec<Bound<'_, PyAny>>,
        grads: Vec<Bound<'_, PyAny>>,
        states: Vec<Bound<'_, PyAny>>,
        steps: Vec<Bound<'_, PyAny>>,
        skip_nonfinite: bool,
        flush_denormals: bool,
        grad_unscale: Option<f64>,
        grad_coef: Option<f64>,
        bf16_bits: bool,
        commit: Option<Vec<crate::bindings::Commit<'_>>>,
        then: Option<crate::bindings::Then<'_>>,
    ) -> PyResult<bool> {
        let options = crate::course::options(
            skip_nonfinite,
            flush_denormals,
            grad_unscale,
            grad_coef,
            None,
        );
        step_and_finish(commit, then.as_ref(), || {
            crate::adafactor::run(
                py, groups, params, grads, states, steps, &options, bf16_bits,
            )
        })
    }

    /// Runs a step that makes no plan through the panic boundary, then its bookkeeping
    /// (`finish`) once it is applied.
    fn step_and_finish(
        commit: Option<Vec<crate::bindings::Commit<'_>>>,
        then: Option<&crate::bindings::Then<'_>>,
        step: impl FnOnce() -> crate::errors::Result<bool>,
    ) -> PyResult<bool> {
        entry(|| {
            let applied = step()?;
            if applied {
                crate::bindings::finish(&commit.unwrap_or_default(), then)?;
            }
            Ok(applied)
        })
    }

    /// The 256 values of the dynamic code map, ascending: signed (`exp_avg`) or unsigned
    /// (`exp_avg_sq`).
    #[pyfunction]
    fn code_map(signed: bool) -> PyResult<Vec<f32>> {
        entry(|| Ok(code(signed).values.to_vec()))
    }

    fn code(signed: bool) -> &'static optirs_core::kernels::adam8bit::CodeMap {
        if signed {
            optirs_core::kernels::adam8bit::signed_map()
        } else {
            optirs_core::kernels::adam8bit::unsigned_map()
        }
    }

    /// Quantizes float32 values block by block as a step stores a moment: (codes, absmaxes).
    #[pyfunction]
    #[allow(clippy::type_complexity, clippy::needless_pass_by_value)] // PyO3 hands arrays over
    fn quantize_8bit<'py>(
        py: Python<'py>,
        x: numpy::PyReadonlyArray1<'py, f32>,
        signed: bool,
        block_size: usize,
    ) -> PyResult<(
        Bound<'py, numpy::PyArray1<u8>>,
        Bound<'py, numpy::PyArray1<f32>>,
    )> {
        entry(|| {
            if !(1..=optirs_core::kernels::adam8bit::MAX_BLOCK).contains(&block_size) {
                return Ok(crate::errors::value_err!("block_size out of range")?);
            }
            let x = x.as_slice().map_err(PyErr::from)?;
            let mut q = vec![0u8; x.len()];
            let mut a = vec![0f32; x.len().div_ceil(block_size)];
            optirs_core::kernels::adam8bit::quantize(code(signed), x, block_size, &mut q, &mut a);
            Ok((
                numpy::PyArray1::from_vec(py, q),
                numpy::PyArray1::from_vec(py, a),
            ))
        })
    }

    /// The float32 values 8-bit codes and their block absmaxes stand for.
    #[pyfunction]
    #[allow(clippy::needless_pass_by_value)] // PyO3 hands the arrays over by value
    fn dequantize_8bit<'py>(
        py: Python<'py>,
        codes: numpy::PyReadonlyArray1<'py, u8>,
        absmax: numpy::PyReadonlyArray1<'py, f32>,
        signed: bool,
        block_size: usize,
    ) -> PyResult<Bound<'py, numpy::PyArray1<f32>>> {
        entry(|| {
            let q = codes.as_slice().map_err(PyErr::from)?;
            let a = absmax.as_slice().map_err(PyErr::from)?;
            if block_size == 0 || a.len() != q.len().div_ceil(block_size) {
                return Ok(crate::errors::value_err!(
                    "expected one absmax per block of {block_size} codes"
                )?);
            }
            let mut out = vec![0f32; q.len()];
            optirs_core::kernels::adam8bit::dequantize(code(signed), q, a, block_size, &mut out);
            Ok(numpy::PyArray1::from_vec(py, out))
        })
    }

    /// The memory-traffic ceiling probe: `read_write[k] ^= xor of read_only`, byte by byte,
    /// over the same pool and chunking as a step (used by `python -m optirs bench`).
    #[pyfunction]
    #[allow(clippy::needless_pass_by_value)]
    fn traffic(
        py: Python<'_>,
        read_only: Vec<Bound<'_, numpy::PyUntypedArray>>,
        read_write: Vec<Bound<'_, numpy::PyUntypedArray>>,
    ) -> PyResult<()> {
        entry(|| Ok(crate::probe::traffic(py, &read_only, &read_write)?))
    }

    /// The SIMD level in use: "avx512", "avx2", "neon" or the baseline ("sse2" on x86-64,
    /// "scalar" elsewhere).
    #[pyfunction]
    fn simd_level() -> PyResult<&'static str> {
        entry(|| Ok(simd::active().name()))
    }

    /// The levels this CPU can run, lowest first.
    #[pyfunction]
    fn simd_levels() -> PyResult<Vec<&'static str>> {
        entry(|| {
            Ok(SimdLevel::ALL
                .iter()
                .filter(|l| l.supported())
                .map(|l| l.name())
                .collect())
        })
    }

    /// Forces a SIMD level (clamped to what the CPU has); returns the level now in use.
    /// Every level gives the same bits; lower ones are slower (``OPTIRS_SIMD`` sets it at
    /// import).
    ///
    /// Args:
    ///     level: ``"avx512"``, ``"avx2"`` or ``"baseline"`` (ValueError otherwise).
    #[pyfunction]
    fn set_simd_level(level: &str) -> PyResult<&'static str> {
        entry(|| match SimdLevel::parse(level) {
            Some(l) => Ok(simd::set_active(l).name()),
            None => Err(CoreError::value_error(format!(
                "unknown SIMD level {level:?}; expected one of {}",
                simd::LEVEL_NAMES
            ))
            .arg("level")
            .into()),
        })
    }

    /// How this extension was built, for bug reports (`python -m optirs info`).
    #[pyfunction]
    fn build_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
        entry(|| Ok(build_info_dict(py)?))
    }

    fn build_info_dict(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("version", env!("CARGO_PKG_VERSION"))?;
        d.set_item(
            "profile",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        )?;
        d.set_item("target_arch", std::env::consts::ARCH)?;
        d.set_item("target_os", std::env::consts::OS)?;
        // What the build itself assumed of the CPU (baseline for wheels); the SIMD level in use
        // is chosen at run time on top of it.
        let static_features: Vec<&str> = [
            ("sse2", cfg!(target_feature = "sse2")),
            ("avx2", cfg!(target_feature = "avx2")),
            ("fma", cfg!(target_feature = "fma")),
            ("avx512f", cfg!(target_feature = "avx512f")),
            ("neon", cfg!(target_feature = "neon")),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
        d.set_item("compiled_target_features", static_features)?;
        d.set_item(
            "simd_levels_compiled",
            SimdLevel::ALL.map(SimdLevel::name).to_vec(),
        )?;
        Ok(d)
    }

    /// Whether the lists of `lists`, one after another, hold the objects of `items` and
    /// nothing else, in the same order, compared by identity (never `==`, which a tensor
    /// answers elementwise): what a cached plan checks of the groups' parameters each step,
    /// 1000 of them in a few microseconds.
    ///
    /// Args:
    ///     lists: a list of lists (TypeError for anything else).
    ///     items: a list.
    #[pyfunction]
    fn same_items(lists: &Bound<'_, PyList>, items: &Bound<'_, PyList>) -> PyResult<bool> {
        entry(|| {
            let mut want = items.iter();
            for (i, list) in lists.iter().enumerate() {
                let Ok(list) = list.cast::<PyList>() else {
                    return Err(CoreError::type_error(format!(
                        "same_items: lists[{i}] must be a list, got {}",
                        list.get_type().name()?
                    ))
                    .arg("lists")
                    .into());
                };
                for x in list.iter() {
                    if !want.next().is_some_and(|w| w.is(&x)) {
                        return Ok(false);
                    }
                }
            }
            Ok(want.next().is_none())
        })
    }

    /// The number of threads a step uses.
    #[pyfunction]
    fn get_num_threads() -> PyResult<usize> {
        entry(|| Ok(pool::num_threads()))
    }

    /// What a large step started now on this thread runs on: "openmp", "pool" or "serial".
    #[pyfunction]
    fn executor() -> PyResult<&'static str> {
        entry(|| Ok(pool::executor_name()))
    }

    /// Whether large steps may run on a loaded OpenMP runtime's team (`OPTIRS_OPENMP` sets it
    /// at import); for tests, which run both executors in one process.
    #[pyfunction]
    fn _set_openmp(on: bool) -> PyResult<()> {
        entry(|| {
            optirs_core::omp::set_enabled(on);
            Ok(())
        })
    }

    /// Sets the number of threads steps use, the calling thread included (default: the CPUs
    /// this process may use, or ``OPTIRS_NUM_THREADS``). Results do not depend on it.
    ///
    /// Args:
    ///     n: the thread count, at least 1 (ValueError otherwise).
    #[pyfunction]
    fn set_num_threads(n: usize) -> PyResult<()> {
        entry(|| {
            if n == 0 {
                return Err(CoreError::value_error(
                    "set_num_threads: n must be at least 1".to_owned(),
                )
                .arg("n")
                .into());
            }
            pool::set_num_threads(n);
            Ok(())
        })
    }
}
