//! Adagrad (dense gradients), following `torch.optim.adagrad._single_tensor_adagrad`.

use super::float::{Float, Storage};
use super::lanes::{stream_param, Arith, Elementwise, ParamOut, StateLanes};

/// Hyperparameters of one Adagrad param group, as torch stores them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdagradHyper {
    pub lr: f64,
    pub lr_decay: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub maximize: bool,
}

impl Default for AdagradHyper {
    fn default() -> Self {
        AdagradHyper {
            lr: 1e-2,
            lr_decay: 0.0,
            weight_decay: 0.0,
            eps: 1e-10,
            maximize: false,
        }
    }
}

/// Per-step scalars of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdagradScalars<T> {
    pub maximize: bool,
    pub weight_decay: Option<T>,
    pub eps: T,
    /// `-clr` with `clr = lr / (1 + (step - 1) * lr_decay)`.
    pub neg_clr: T,
}

impl<T: Float> AdagradScalars<T> {
    /// `step` is the count after this step's increment, as torch reads it back.
    #[must_use]
    pub fn new(h: &AdagradHyper, step: f64) -> Self {
        let clr = h.lr / (1.0 + (step - 1.0) * h.lr_decay);
        AdagradScalars {
            maximize: h.maximize,
            weight_decay: (h.weight_decay != 0.0).then(|| T::from_f64(h.weight_decay)),
            eps: T::from_f64(h.eps),
            neg_clr: T::from_f64(-clr),
        }
    }
}

/// One Adagrad step over one parameter (or a chunk of it), `L::W` elements at a time.
/// Arithmetic runs in `S::Compute`, rounded to `S` once when stored.
///
/// # Safety
/// The CPU has `L`'s instructions.
#[inline(always)]
pub unsafe fn update<S: Storage, Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(
    k: &AdagradScalars<S::Compute>,
    param: ParamOut<'_, S>,
    grad: &[S],
    sum: &mut [Q],
) {
    unsafe { stream_param::<S, Q, L, _, 1>(*k, param, grad, [sum]) }
}

/// Buffers `[sum]`.
impl<T: Float> Elementwise<T, 1> for AdagradScalars<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [sum]: [V; 1]) -> (V, [V; 1]) {
        let g = if self.maximize { -g } else { g };
        let g = match self.weight_decay {
            Some(wd) => g + V::splat(wd) * p,
            None => g,
        };
        // addcmul(g, g, value=1): (1 * g) * g is exactly g * g
        let sum = sum + g * g;
        let std = sum.sqrt() + V::splat(self.eps);
        (p + V::splat(self.neg_clr) * g / std, [sum])
    }
}
