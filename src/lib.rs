//! optirs's Python bindings, the extension module `optirs._core`: they read Python objects and
//! hyperparameters, validate arrays, hold references, release the interpreter and call the
//! core (`optirs_core`, which knows nothing of Python). Every entry point goes through one panic
//! boundary (`boundary`), where errors become Python exceptions (`errors`).
//!
//! Modules, each depending only on those listed after it: `bindings` (the pymodule) →
//! `step` (the full step), `clip` (gradient norms and clipping) → `array_plan`, `torch_plan` (the cached steps) → `course` (what
//! both share) → `hyper`, `ndarray`, `dlpack`, `probe` → `boundary` → `errors` → the core;
//! `flat_watch` (the torch bridge's flat-step check) depends on `dlpack` and `boundary`.

mod adafactor;
mod array_plan;
mod bindings;
mod boundary;
mod clip;
mod course;
mod dlpack;
mod errors;
mod flat_watch;
mod hyper;
mod ndarray;
mod probe;
mod q8;
mod step;
mod torch_plan;

pub use bindings::_core;
