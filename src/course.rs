//! The course every step takes once its arrays are checked, and the one the two cached plans
//! (`ArrayPlan`, `TorchPlan`) share: their keyword options, the check that gives the work or
//! sends the caller back to the full step, the update with the interpreter released, and what
//! follows it.

use pyo3::prelude::*;

use optirs_core::{Checked, Options};

use crate::boundary;
use crate::errors::Result;

/// The keyword options of every step (`skip_nonfinite`, `flush_denormals`, `grad_unscale`,
/// `grad_coef`, and the test-only `_panic_for_tests`), as the core takes them.
pub(crate) fn options(
    skip_nonfinite: bool,
    flush_denormals: bool,
    grad_unscale: Option<f64>,
    grad_coef: Option<f64>,
    panic_for_tests: Option<String>,
) -> Options {
    Options {
        skip_nonfinite,
        flush_denormals,
        grad_factor: optirs_core::norm::GradFactor {
            unscale: grad_unscale,
            coef: grad_coef,
        },
        panic_for_tests,
    }
}

/// Runs checked work with the interpreter released; returns whether the update was applied,
/// or None when `go`, asked once the work is prepared (the last thing that can refuse it),
/// said no: nothing is written then.
///
/// The caller holds, until this returns, every Python object whose memory `checked` points to
/// (see `Checked::new`'s contract, which the caller met when it built each entry). `go` may
/// run Python code, and so may any other thread while the update runs: the references the
/// caller holds are what keep the memory valid, in both cases.
pub(crate) fn run_detached(
    py: Python<'_>,
    checked: Vec<Checked>,
    options: &Options,
    go: impl FnOnce() -> Result<bool>,
) -> Result<Option<bool>> {
    let work = optirs_core::prepare(checked, options)?;
    if !go()? {
        return Ok(None);
    }
    Ok(Some(py.detach(move || work.run())))
}

/// A cached plan of the steps after a full one.
pub(crate) trait Plan {
    /// What must stay alive while the work runs (the gradients the plan does not hold), and
    /// what `after` needs.
    type Keep<'py>;

    /// Checks everything: the work, or None when the full step must run instead (nothing
    /// written then). `second` is the step's second argument (the gradients, or the state).
    fn check<'py>(
        &self,
        groups: &Bound<'py, PyAny>,
        second: &Bound<'py, PyAny>,
    ) -> Option<(Vec<Checked>, Self::Keep<'py>)>;

    /// What follows a step that ran (`applied`: whether the update was applied).
    ///
    /// # Errors
    /// An exception of the Python code it calls.
    fn after(&self, py: Python<'_>, applied: bool, keep: Self::Keep<'_>) -> Result<()> {
        let _ = (py, applied);
        drop(keep);
        Ok(())
    }
}

/// A plan's `step(groups, second, *, skip_nonfinite, flush_denormals, _panic_for_tests)`:
/// whether the update was applied, or None (nothing written) when the full step must run.
pub(crate) fn plan_step<P: Plan>(
    plan: &P,
    groups: &Bound<'_, PyAny>,
    second: &Bound<'_, PyAny>,
    options: &Options,
) -> PyResult<Option<bool>> {
    boundary::entry(|| {
        let py = groups.py();
        let Some((checked, keep)) = plan.check(groups, second) else {
            return Ok(None);
        };
        // `keep` and the plan hold every array stepped until the work is done.
        let Some(applied) = run_detached(py, checked, options, || Ok(true))? else {
            return Ok(None);
        };
        plan.after(py, applied, keep)?;
        Ok(Some(applied))
    })
}
