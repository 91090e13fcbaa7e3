//! optirs: torch.optim's update rules as fused, SIMD, multi-threaded Rust kernels.
//!
//! [`kernels`] is the pure math; the other modules are the Python bindings.

pub mod kernels;

mod array_plan;
mod bindings;
mod dlpack;
mod errors;
mod fpenv;
mod omp;
mod pool;
mod probe;
mod step;
mod torch_plan;
mod torch_raises;

pub use bindings::_core;
