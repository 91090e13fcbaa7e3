//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), as `lion-pytorch`
//! 0.2.5's `update_fn` computes it with torch operations (there is no torch.optim.Lion):
//!
//! ```text
//! p.mul_(1 - lr * wd)
//! update = exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sgn_()
//! p.add_(update, alpha=-lr)
//! exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
//! ```
//!
//! `maximize` (optirs's addition, as torch.optim's optimizers have it) negates the gradient
//! first. The sign is `torch.sign`'s: 0 for a zero and for NaN, so an element whose
//! interpolation is NaN (a NaN gradient or moment) is not moved by that step, while its moment
//! keeps the NaN, as the reference does.

use super::float::{Float, Storage};
use super::lanes::{stream_param, Arith, Elementwise, ParamOut, StateLanes};

/// Hyperparameters of one Lion param group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LionHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub maximize: bool,
}

impl Default for LionHyper {
    fn default() -> Self {
        LionHyper {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

/// Per-step scalars of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LionScalars<T> {
    pub maximize: bool,
    /// `Some(1 - lr * wd)` unless that is exactly 1 (multiplying by 1 changes no bits).
    pub param_decay: Option<T>,
    pub beta1: T,
    pub one_minus_beta1: T,
    pub beta2: T,
    pub one_minus_beta2: T,
    pub neg_lr: T,
}

impl<T: Float> LionScalars<T> {
    /// Lion keeps no step count.
    #[must_use]
    pub fn new(h: &LionHyper) -> Self {
        let decay = 1.0 - h.lr * h.weight_decay;
        LionScalars {
            maximize: h.maximize,
            param_decay: (decay != 1.0).then(|| T::from_f64(decay)),
            beta1: T::from_f64(h.beta1),
            one_minus_beta1: T::from_f64(1.0 - h.beta1),
            beta2: T::from_f64(h.beta2),
            one_minus_beta2: T::from_f64(1.0 - h.beta2),
            neg_lr: T::from_f64(-h.lr),
        }
    }
}

/// One Lion step over one parameter (or a chunk of it), `L::W` elements at a time.
/// Arithmetic runs in `S::Compute`, rounded to `S` once when stored.
///
/// # Safety
/// The CPU has `L`'s instructions.
#[inline(always)]
pub unsafe fn update<S: Storage, Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(
    k: &LionScalars<S::Compute>,
    param: ParamOut<'_, S>,
    grad: &[S],
    exp_avg: &mut [Q],
) {
    unsafe { stream_param::<S, Q, L, _, 1>(*k, param, grad, [exp_avg]) }
}

/// Buffers `[exp_avg]`.
impl<T: Float> Elementwise<T, 1> for LionScalars<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [m]: [V; 1]) -> (V, [V; 1]) {
        let g = if self.maximize { -g } else { g };
        let p = match self.param_decay {
            Some(d) => p * V::splat(d),
            None => p,
        };
        let update = (m * V::splat(self.beta1) + V::splat(self.one_minus_beta1) * g).sign();
        let p = p + V::splat(self.neg_lr) * update;
        let m = m * V::splat(self.beta2) + V::splat(self.one_minus_beta2) * g;
        (p, [m])
    }
}
