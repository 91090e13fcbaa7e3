//! Adadelta, following `torch.optim.adadelta._single_tensor_adadelta`.

use super::float::{Float, Storage};
use super::lanes::{stream_param, Arith, Elementwise, ParamOut, StateLanes};

/// Hyperparameters of one Adadelta param group, as torch stores them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdadeltaHyper {
    pub lr: f64,
    pub rho: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub maximize: bool,
}

impl Default for AdadeltaHyper {
    fn default() -> Self {
        AdadeltaHyper {
            lr: 1.0,
            rho: 0.9,
            eps: 1e-6,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

/// Per-step scalars of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdadeltaScalars<T> {
    pub maximize: bool,
    pub weight_decay: Option<T>,
    pub rho: T,
    /// `1 - rho`, computed in `f64` as torch's Python does, then rounded.
    pub one_minus_rho: T,
    pub eps: T,
    pub neg_lr: T,
}

impl<T: Float> AdadeltaScalars<T> {
    /// Adadelta's update does not depend on the step count.
    #[must_use]
    pub fn new(h: &AdadeltaHyper) -> Self {
        AdadeltaScalars {
            maximize: h.maximize,
            weight_decay: (h.weight_decay != 0.0).then(|| T::from_f64(h.weight_decay)),
            rho: T::from_f64(h.rho),
            one_minus_rho: T::from_f64(1.0 - h.rho),
            eps: T::from_f64(h.eps),
            neg_lr: T::from_f64(-h.lr),
        }
    }
}

/// One Adadelta step over one parameter (or a chunk of it), `L::W` elements at a time.
/// Arithmetic runs in `S::Compute`, rounded to `S` once when stored.
///
/// # Safety
/// The CPU has `L`'s instructions.
#[inline(always)]
pub unsafe fn update<S: Storage, Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(
    k: &AdadeltaScalars<S::Compute>,
    param: ParamOut<'_, S>,
    grad: &[S],
    square_avg: &mut [Q],
    acc_delta: &mut [Q],
) {
    unsafe { stream_param::<S, Q, L, _, 2>(*k, param, grad, [square_avg, acc_delta]) }
}

/// Buffers `[square_avg, acc_delta]`.
impl<T: Float> Elementwise<T, 2> for AdadeltaScalars<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [sq, acc]: [V; 2]) -> (V, [V; 2]) {
        let g = if self.maximize { -g } else { g };
        let g = match self.weight_decay {
            Some(wd) => g + V::splat(wd) * p,
            None => g,
        };
        let (rho, w) = (V::splat(self.rho), V::splat(self.one_minus_rho));
        // mul_(rho).addcmul_(g, g, value=1 - rho)
        let sq = sq * rho + w * g * g;
        let std = (sq + V::splat(self.eps)).sqrt();
        // acc_delta.add(eps).sqrt_().div_(std).mul_(g)
        let delta = (acc + V::splat(self.eps)).sqrt() / std * g;
        let acc = acc * rho + w * delta * delta;
        (p + V::splat(self.neg_lr) * delta, [sq, acc])
    }
}
