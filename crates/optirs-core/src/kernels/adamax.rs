//! Adamax, following `torch.optim.adamax._single_tensor_adamax` (non-capturable path).

use super::float::{lerp, Float, LerpWeight, Storage};
use super::lanes::{stream_param, Arith, Elementwise, ParamOut, StateLanes};

/// Hyperparameters of one Adamax param group, as torch stores them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamaxHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub maximize: bool,
}

impl Default for AdamaxHyper {
    fn default() -> Self {
        AdamaxHyper {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

/// Per-step scalars of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamaxScalars<T> {
    pub maximize: bool,
    pub weight_decay: Option<T>,
    pub beta1: LerpWeight<T>,
    pub beta2: T,
    pub eps: T,
    /// `-clr` with `clr = lr / (1 - beta1 ** step)`.
    pub neg_clr: T,
}

impl<T: Float> AdamaxScalars<T> {
    /// `step` is the count after this step's increment, as torch reads it back; the bias
    /// correction is torch's Python expression in `f64`.
    #[must_use]
    pub fn new(h: &AdamaxHyper, step: f64) -> Self {
        let clr = h.lr / (1.0 - h.beta1.powf(step));
        AdamaxScalars {
            maximize: h.maximize,
            weight_decay: (h.weight_decay != 0.0).then(|| T::from_f64(h.weight_decay)),
            beta1: LerpWeight::new(1.0 - h.beta1),
            beta2: T::from_f64(h.beta2),
            eps: T::from_f64(h.eps),
            neg_clr: T::from_f64(-clr),
        }
    }
}

/// One Adamax step over one parameter (or a chunk of it), `L::W` elements at a time.
/// Arithmetic runs in `S::Compute`, rounded to `S` once when stored.
///
/// # Safety
/// The CPU has `L`'s instructions.
#[inline(always)]
pub unsafe fn update<S: Storage, Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(
    k: &AdamaxScalars<S::Compute>,
    param: ParamOut<'_, S>,
    grad: &[S],
    exp_avg: &mut [Q],
    exp_inf: &mut [Q],
) {
    unsafe { stream_param::<S, Q, L, _, 2>(*k, param, grad, [exp_avg, exp_inf]) }
}

/// Buffers `[exp_avg, exp_inf]`.
impl<T: Float> Elementwise<T, 2> for AdamaxScalars<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [m, u]: [V; 2]) -> (V, [V; 2]) {
        let g = if self.maximize { -g } else { g };
        let g = match self.weight_decay {
            Some(wd) => g + V::splat(wd) * p,
            None => g,
        };
        let m = lerp(m, g, &self.beta1);
        // |g| as max(g, -g), NaN kept; adding +0 turns the -0 it gives for -0 into abs's +0
        // (x + 0 is x for every other x, NaN included).
        let abs = g.maximum(-g) + V::splat(T::ZERO);
        // torch.maximum(exp_inf * beta2, |g| + eps): NaN where either is NaN, as torch's
        // (and the differentiable path's amax).
        let u = (u * V::splat(self.beta2)).maximum(abs + V::splat(self.eps));
        // addcdiv(m, u, value=-clr): p + (-clr * m) / u
        (p + V::splat(self.neg_clr) * m / u, [m, u])
    }
}
