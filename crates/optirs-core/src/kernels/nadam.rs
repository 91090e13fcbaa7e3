//! NAdam, following `torch.optim.nadam._single_tensor_nadam` (non-capturable path).

use super::float::{lerp, Float, LerpWeight, Storage};
use super::lanes::{stream_param, Arith, Elementwise, ParamOut, StateLanes};

/// Hyperparameters of one NAdam param group, as torch stores them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NAdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum_decay: f64,
    /// Decay the parameter (`p *= 1 - lr * weight_decay`) instead of adding to the gradient.
    pub decoupled: bool,
    pub maximize: bool,
}

impl Default for NAdamHyper {
    fn default() -> Self {
        NAdamHyper {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum_decay: 4e-3,
            decoupled: false,
            maximize: false,
        }
    }
}

impl NAdamHyper {
    /// The momentum cache `mu` at step `step`: torch's Python expression, in `f64`.
    #[must_use]
    pub fn mu(&self, step: f64) -> f64 {
        self.beta1 * (1.0 - 0.5 * 0.96f64.powf(step * self.momentum_decay))
    }

    /// `mu_product` once this step's `mu_product *= mu` has run on the stored value `old`:
    /// a tensor multiplication by a Python float, in the tensor's type (float32 arithmetic
    /// for float32, float16 and bfloat16 tensors).
    #[must_use]
    #[allow(clippy::cast_possible_truncation)]
    pub fn mu_product_after(&self, step: f64, old: f64, wide: bool) -> f64 {
        let mu = self.mu(step);
        if wide {
            old * mu
        } else {
            f64::from((old as f32) * (mu as f32))
        }
    }
}

/// Per-step scalars of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NAdamScalars<T> {
    pub maximize: bool,
    /// `Some(wd)`: L2 penalty added to the gradient.
    pub grad_decay: Option<T>,
    /// `Some(1 - lr * wd)`: decoupled decay of the parameter.
    pub param_decay: Option<T>,
    pub beta1: LerpWeight<T>,
    pub beta2: T,
    pub one_minus_beta2: T,
    pub bias_correction2: T,
    pub eps: T,
    /// `-lr * (1 - mu) / (1 - mu_product)`: the gradient's weight.
    pub grad_value: T,
    /// `-lr * mu_next / (1 - mu_product * mu_next)`: the first moment's weight.
    pub avg_value: T,
}

impl<T: Float> NAdamScalars<T> {
    /// `step` is the count after this step's increment and `mu_product` the product after
    /// this step's factor, both as torch reads them back (`_get_value`). The scalars are
    /// torch's Python expressions in `f64`.
    #[must_use]
    pub fn new(h: &NAdamHyper, step: f64, mu_product: f64) -> Self {
        let bias_correction2 = 1.0 - h.beta2.powf(step);
        let mu = h.mu(step);
        let mu_next = h.mu(step + 1.0);
        let mu_product_next = mu_product * mu_next;
        let has_decay = h.weight_decay != 0.0;
        NAdamScalars {
            maximize: h.maximize,
            grad_decay: (has_decay && !h.decoupled).then(|| T::from_f64(h.weight_decay)),
            param_decay: (has_decay && h.decoupled)
                .then(|| T::from_f64(1.0 - h.lr * h.weight_decay)),
            beta1: LerpWeight::new(1.0 - h.beta1),
            beta2: T::from_f64(h.beta2),
            one_minus_beta2: T::from_f64(1.0 - h.beta2),
            bias_correction2: T::from_f64(bias_correction2),
            eps: T::from_f64(h.eps),
            grad_value: T::from_f64(-h.lr * (1.0 - mu) / (1.0 - mu_product)),
            avg_value: T::from_f64((-h.lr * mu_next) / (1.0 - mu_product_next)),
        }
    }
}

/// One NAdam step over one parameter (or a chunk of it), `L::W` elements at a time.
/// Arithmetic runs in `S::Compute`, rounded to `S` once when stored.
///
/// # Safety
/// The CPU has `L`'s instructions.
#[inline(always)]
pub unsafe fn update<S: Storage, Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(
    k: &NAdamScalars<S::Compute>,
    param: ParamOut<'_, S>,
    grad: &[S],
    exp_avg: &mut [Q],
    exp_avg_sq: &mut [Q],
) {
    unsafe { stream_param::<S, Q, L, _, 2>(*k, param, grad, [exp_avg, exp_avg_sq]) }
}

/// Buffers `[exp_avg, exp_avg_sq]`.
impl<T: Float> Elementwise<T, 2> for NAdamScalars<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [m, v]: [V; 2]) -> (V, [V; 2]) {
        let g = if self.maximize { -g } else { g };
        let mut p = p;
        if let Some(decay) = self.param_decay {
            p = p * V::splat(decay);
        }
        let g = match self.grad_decay {
            Some(wd) => g + V::splat(wd) * p,
            None => g,
        };
        let m = lerp(m, g, &self.beta1);
        // addcmul: v * beta2 + ((1 - beta2) * g) * g
        let v = v * V::splat(self.beta2) + V::splat(self.one_minus_beta2) * g * g;
        let denom = (v / V::splat(self.bias_correction2)).sqrt() + V::splat(self.eps);
        // Two addcdiv calls, each rounded into the parameter: p + (value * x) / denom
        let p = p + V::splat(self.grad_value) * g / denom;
        let p = p + V::splat(self.avg_value) * m / denom;
        (p, [m, v])
    }
}
