//! optirs's core: torch.optim's update rules as fused, SIMD, multi-threaded kernels, and the
//! engine that runs a step over them. It knows nothing of Python (no pyo3, no numpy): the
//! `optirs` crate's bindings read Python objects, validate them, hold references, release the
//! interpreter and call in here.
//!
//! - [`kernels`]: the pure math, one element function per rule, SIMD dispatch.
//! - [`rules`]: the rule table (state buffers per rule, in order), hyperparameters, per-step
//!   scalars; [`torch_raises`]: where torch.optim's own step raises for them.
//! - [`dtype`]: the element types. [`engine`]: work items, chunking, counters, the step.
//! - [`norm`]: gradient norms and clipping (`clip_grad_norm_`), and how a step reads each
//!   gradient through a clip coefficient or GradScaler's scale.
//! - [`adafactor`]: Adafactor, which needs row, column and whole-tensor reductions: its own
//!   passes over the pool rather than a rule.
//! - [`overlap`]: the aliasing check and its cache. [`pool`]: the thread pool, and [`omp`]:
//!   the OpenMP team it hands large steps to when the process has one. [`fpenv`]: flush-to-zero. [`error`]: the typed error with its location.

pub mod adafactor;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod fpenv;
pub mod kernels;
pub mod norm;
pub mod omp;
pub mod overlap;
pub mod pool;
pub mod rules;
pub mod torch_raises;

pub use dtype::DType;
pub use engine::{
    counter_at, execute, prepare, prepare_with_q8, scalar_read, scalar_slot, Checked, CheckedQ8,
    CounterSlot, Options, Work, CHUNK_ELEMS,
};
pub use error::{panic_message, CoreError, ErrorKind, Locate, Location, TorchRaises};
pub use rules::{Hyper, Kind, RuleMemo, RuleOf, RuleSpec, MAX_SCALARS, RULES};

#[cfg(test)]
mod tests {
    /// The layering the crate split exists for: the core must never depend on Python.
    #[test]
    fn the_core_has_no_python_dependency() {
        let manifest = include_str!("../Cargo.toml");
        let deps = manifest
            .lines()
            .skip_while(|l| l.trim() != "[dependencies]")
            .skip(1)
            .take_while(|l| !l.trim_start().starts_with('['))
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(deps.contains("half"), "[dependencies] not found:\n{deps}");
        for banned in ["pyo3", "numpy"] {
            assert!(
                !manifest
                    .lines()
                    .filter(|l| !l.trim_start().starts_with('#'))
                    .any(|l| l.contains(banned)),
                "optirs-core's Cargo.toml names {banned}"
            );
        }
    }
}
