//! Rprop, following `torch.optim.rprop._single_tensor_rprop` (non-capturable path).
//!
//! torch's per-element branches (masked assignments on the sign of `grad * prev`) become
//! lane selects: the sign falls in one of three classes (positive, negative, zero, NaN
//! counting as zero as `torch.sign` makes it), and what torch's three successive assignments
//! make of each class is computed once per step from `etas`, so that any hyperparameters a
//! scheduler sets (an `etaplus` below zero, an `etaminus` of 1) give torch's result.

use super::float::{Float, Storage};
use super::lanes::{stream_param, Arith, Elementwise, ParamOut, StateLanes};

/// Hyperparameters of one Rprop param group, as torch stores them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RpropHyper {
    pub lr: f64,
    pub etaminus: f64,
    pub etaplus: f64,
    pub step_size_min: f64,
    pub step_size_max: f64,
    pub maximize: bool,
}

impl Default for RpropHyper {
    fn default() -> Self {
        RpropHyper {
            lr: 1e-2,
            etaminus: 0.5,
            etaplus: 1.2,
            step_size_min: 1e-6,
            step_size_max: 50.0,
            maximize: false,
        }
    }
}

/// What one class of `sign(grad * prev)` becomes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SignClass<T> {
    /// The factor applied to the step size.
    pub factor: T,
    /// Whether the gradient is zeroed (torch: `grad[sign.eq(etaminus)] = 0`).
    pub zero_grad: bool,
}

/// Per-step scalars of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RpropScalars<T> {
    pub maximize: bool,
    pub positive: SignClass<T>,
    pub negative: SignClass<T>,
    pub zero: SignClass<T>,
    pub step_size_min: T,
    pub step_size_max: T,
}

impl<T: Float> RpropScalars<T> {
    /// Rprop's update does not depend on the step count. The etas and the bounds are rounded
    /// to the compute type, as torch's tensor operations take them.
    #[must_use]
    pub fn new(h: &RpropHyper) -> Self {
        let (plus, minus) = (T::from_f64(h.etaplus), T::from_f64(h.etaminus));
        // torch: sign[sign.gt(0)] = etaplus; sign[sign.lt(0)] = etaminus; sign[sign.eq(0)] = 1,
        // each assignment seeing the previous ones' results.
        let class = |s: T| {
            let s = if s > T::ZERO { plus } else { s };
            let s = if s < T::ZERO { minus } else { s };
            let s = if s == T::ZERO { T::ONE } else { s };
            SignClass {
                factor: s,
                zero_grad: s == minus,
            }
        };
        RpropScalars {
            maximize: h.maximize,
            positive: class(T::ONE),
            negative: class(-T::ONE),
            zero: class(T::ZERO),
            step_size_min: T::from_f64(h.step_size_min),
            step_size_max: T::from_f64(h.step_size_max),
        }
    }
}

/// One Rprop step over one parameter (or a chunk of it), `L::W` elements at a time.
/// Arithmetic runs in `S::Compute`, rounded to `S` once when stored.
///
/// # Safety
/// The CPU has `L`'s instructions.
#[inline(always)]
pub unsafe fn update<S: Storage, Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(
    k: &RpropScalars<S::Compute>,
    param: ParamOut<'_, S>,
    grad: &[S],
    prev: &mut [Q],
    step_size: &mut [Q],
) {
    unsafe { stream_param::<S, Q, L, _, 2>(*k, param, grad, [prev, step_size]) }
}

/// `g`, or 0 where the class zeroes the gradient.
#[inline(always)]
fn kept<T: Float, V: Arith<T>>(c: &SignClass<T>, g: V) -> V {
    if c.zero_grad {
        V::splat(T::ZERO)
    } else {
        g
    }
}

/// Buffers `[prev, step_size]`.
impl<T: Float> Elementwise<T, 2> for RpropScalars<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [prev, ss]: [V; 2]) -> (V, [V; 2]) {
        let g = if self.maximize { -g } else { g };
        let x = g * prev;
        let zero = V::splat(T::ZERO);
        // x > 0, x < 0, else (zeros and NaN: torch.sign gives 0 for both)
        let pick = |pos: V, neg: V, other: V| x.select_gt(zero, pos, zero.select_gt(x, neg, other));
        let (c1, c2, c0) = (&self.positive, &self.negative, &self.zero);
        let factor = pick(
            V::splat(c1.factor),
            V::splat(c2.factor),
            V::splat(c0.factor),
        );
        // step_size.mul_(sign).clamp_(min, max)
        let ss = (ss * factor)
            .maximum(V::splat(self.step_size_min))
            .minimum(V::splat(self.step_size_max));
        let g = pick(kept(c1, g), kept(c2, g), kept(c0, g));
        // addcmul_(grad.sign(), step_size, value=-1)
        let p = p + -g.sign() * ss;
        (p, [g, ss])
    }
}
