//! SGD with momentum, dampening, Nesterov and weight decay, following
//! `torch.optim.sgd._single_tensor_sgd`.

use super::float::{Float, Storage};
use super::lanes::{stream_param, Arith, Elementwise, ParamOut, StateLanes};

/// Hyperparameters of one SGD param group, as torch stores them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdHyper {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub maximize: bool,
}

impl Default for SgdHyper {
    fn default() -> Self {
        SgdHyper {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
        }
    }
}

/// Per-step scalars of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdScalars<T> {
    pub maximize: bool,
    pub weight_decay: Option<T>,
    /// `None` when momentum is 0: no buffer is read or written.
    pub momentum: Option<T>,
    pub one_minus_dampening: T,
    pub nesterov: bool,
    /// The momentum buffer was just created: it becomes a copy of the gradient, undamped.
    pub first_step: bool,
    pub neg_lr: T,
}

impl<T: Float> SgdScalars<T> {
    /// `first_step`: the parameter has no momentum buffer yet (torch's `buf is None`).
    #[must_use]
    pub fn new(h: &SgdHyper, first_step: bool) -> Self {
        SgdScalars {
            maximize: h.maximize,
            weight_decay: (h.weight_decay != 0.0).then(|| T::from_f64(h.weight_decay)),
            momentum: (h.momentum != 0.0).then(|| T::from_f64(h.momentum)),
            one_minus_dampening: T::from_f64(1.0 - h.dampening),
            nesterov: h.nesterov,
            first_step,
            neg_lr: T::from_f64(-h.lr),
        }
    }
}

/// One SGD step over one parameter (or a chunk of it), `L::W` elements at a time.
/// `momentum_buffer` must be `Some` when `k.momentum` is. Arithmetic runs in `S::Compute`,
/// rounded to `S` once when stored.
///
/// # Safety
/// The CPU has `L`'s instructions.
#[inline(always)]
pub unsafe fn update<S: Storage, Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(
    k: &SgdScalars<S::Compute>,
    param: ParamOut<'_, S>,
    grad: &[S],
    momentum_buffer: Option<&mut [Q]>,
) {
    unsafe {
        match (k.momentum, momentum_buffer) {
            (Some(mu), Some(buf)) => {
                stream_param::<S, Q, L, _, 1>(WithMomentum(*k, mu), param, grad, [buf]);
            }
            _ => stream_param::<S, Q, L, _, 0>(*k, param, grad, []),
        }
    }
}

impl<T: Float> SgdScalars<T> {
    /// The gradient after maximize and weight decay.
    #[inline(always)]
    fn prepare<V: Arith<T>>(&self, p: V, g: V) -> V {
        let g = if self.maximize { -g } else { g };
        match self.weight_decay {
            Some(wd) => g + V::splat(wd) * p,
            None => g,
        }
    }
}

/// Without momentum: no buffer.
impl<T: Float> Elementwise<T, 0> for SgdScalars<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, []: [V; 0]) -> (V, [V; 0]) {
        let g = self.prepare(p, g);
        (p + V::splat(self.neg_lr) * g, [])
    }
}

/// SGD's scalars with the momentum factor, for the loop over `momentum_buffer`.
#[derive(Clone, Copy)]
struct WithMomentum<T: Float>(SgdScalars<T>, T);

impl<T: Float> Elementwise<T, 1> for WithMomentum<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [buf]: [V; 1]) -> (V, [V; 1]) {
        let WithMomentum(ref k, mu) = *self;
        let mu = V::splat(mu);
        let g = k.prepare(p, g);
        let b = if k.first_step {
            g
        } else {
            buf * mu + V::splat(k.one_minus_dampening) * g
        };
        let d = if k.nesterov { g + mu * b } else { b };
        (p + V::splat(k.neg_lr) * d, [b])
    }
}
