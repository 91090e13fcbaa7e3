//! A gradient read through GradScaler's scale and a clip coefficient (`crate::norm::GradFactor`):
//! `g / unscale`, rounded to the gradient's dtype, then `* coef`, rounded again, written into a
//! scratch piece that the step then reads in the gradient's place (`crate::engine`).
//!
//! Each pass is an element rule over [`stream`], so it runs with the same explicit vectors as
//! the update rules at every level (the plain loop it replaces was left scalar by the compiler
//! for the 16-bit types, and cost the clipped step about a third of a step at 2 threads).
//! Division and multiplication are single IEEE operations in every lane, and every value is
//! rounded to its storage type when stored, so every level writes the same bits.

use super::float::{Float, Storage};
use super::lanes::{stream, Arith, Elementwise, StateLanes};

/// The gradient divided by the scale.
#[derive(Clone, Copy)]
struct Divide<T>(T);

impl<T: Float> Elementwise<T, 0> for Divide<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, _p: V, g: V, b: [V; 0]) -> (V, [V; 0]) {
        (g / V::splat(self.0), b)
    }
}

/// The gradient times the coefficient.
#[derive(Clone, Copy)]
struct Multiply<T>(T);

impl<T: Float> Elementwise<T, 0> for Multiply<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, _p: V, g: V, b: [V; 0]) -> (V, [V; 0]) {
        (g * V::splat(self.0), b)
    }
}

/// What the destination already holds times the coefficient: the second pass when both apply,
/// reading the unscaled gradient as the first pass stored (rounded) it.
#[derive(Clone, Copy)]
struct MultiplyInPlace<T>(T);

impl<T: Float> Elementwise<T, 0> for MultiplyInPlace<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, _g: V, b: [V; 0]) -> (V, [V; 0]) {
        (p * V::splat(self.0), b)
    }
}

/// Writes `src / unscale * coef` into `dst`, each factor that is given applied and rounded to
/// `S` in that order.
///
/// # Safety
/// The CPU has `L`'s instructions (the caller is compiled with them enabled).
///
/// # Panics
/// When the lengths differ.
#[inline(always)]
pub(crate) unsafe fn apply<S, L>(src: &[S], dst: &mut [S], unscale: Option<f64>, coef: Option<f64>)
where
    S: Storage,
    L: StateLanes<S, S>,
{
    let unscale = unscale.map(S::Compute::from_f64);
    let coef = coef.map(S::Compute::from_f64);
    // SAFETY (every call): the caller's.
    unsafe {
        match (unscale, coef) {
            (Some(u), Some(c)) => {
                stream::<S, S, L, _, 0>(Divide(u), dst, src, []);
                stream::<S, S, L, _, 0>(MultiplyInPlace(c), dst, src, []);
            }
            (Some(u), None) => stream::<S, S, L, _, 0>(Divide(u), dst, src, []),
            (None, Some(c)) => stream::<S, S, L, _, 0>(Multiply(c), dst, src, []),
            (None, None) => dst.copy_from_slice(src),
        }
    }
}
