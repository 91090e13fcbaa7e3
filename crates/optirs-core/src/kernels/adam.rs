//! Adam and AdamW, following `torch.optim.adam._single_tensor_adam` (non-capturable path).

use super::float::{lerp, Float, LerpWeight, Storage};
use super::lanes::{stream_param, Arith, Elementwise, ParamOut, StateLanes};

/// Hyperparameters of one Adam/AdamW param group, as torch stores them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
    pub maximize: bool,
    /// AdamW: decay the parameter (`p *= 1 - lr * weight_decay`) instead of adding to the grad.
    pub decoupled: bool,
}

impl Default for AdamHyper {
    fn default() -> Self {
        AdamHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            maximize: false,
            decoupled: false,
        }
    }
}

/// Everything the element loop needs, computed once per parameter and step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamScalars<T> {
    pub maximize: bool,
    pub amsgrad: bool,
    /// `Some(wd)`: L2 penalty added to the gradient (Adam with weight_decay != 0).
    pub grad_decay: Option<T>,
    /// `Some(1 - lr * wd)`: decoupled decay of the parameter (AdamW with weight_decay != 0).
    pub param_decay: Option<T>,
    pub beta1: LerpWeight<T>,
    pub beta2: T,
    pub one_minus_beta2: T,
    pub bias_correction2_sqrt: T,
    pub eps: T,
    pub neg_step_size: T,
}

impl<T: Float> AdamScalars<T> {
    /// `step` is the step count after this step's increment (1 on the first step), read back
    /// from its float32 counter as torch's `_get_value(step_t)` does. The bias corrections are
    /// computed in `f64` with the same expressions as torch's Python code (`**` is C `pow`).
    #[must_use]
    pub fn new(h: &AdamHyper, step: f64) -> Self {
        let bias_correction1 = 1.0 - h.beta1.powf(step);
        let bias_correction2 = 1.0 - h.beta2.powf(step);
        let step_size = h.lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.powf(0.5);
        let has_decay = h.weight_decay != 0.0;
        AdamScalars {
            maximize: h.maximize,
            amsgrad: h.amsgrad,
            grad_decay: (has_decay && !h.decoupled).then(|| T::from_f64(h.weight_decay)),
            param_decay: (has_decay && h.decoupled)
                .then(|| T::from_f64(1.0 - h.lr * h.weight_decay)),
            beta1: LerpWeight::new(1.0 - h.beta1),
            beta2: T::from_f64(h.beta2),
            one_minus_beta2: T::from_f64(1.0 - h.beta2),
            bias_correction2_sqrt: T::from_f64(bias_correction2_sqrt),
            eps: T::from_f64(h.eps),
            neg_step_size: T::from_f64(-step_size),
        }
    }
}

/// One Adam step over one parameter (or a chunk of it): updates `param`, `exp_avg`,
/// `exp_avg_sq` and, with amsgrad, `max_exp_avg_sq` in a single pass, `L::W` elements at a
/// time. Arithmetic runs in `S::Compute`; every value is rounded to `S` once, when stored.
///
/// # Safety
/// The CPU has `L`'s instructions.
#[inline(always)]
pub unsafe fn update<S: Storage, Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(
    k: &AdamScalars<S::Compute>,
    param: ParamOut<'_, S>,
    grad: &[S],
    exp_avg: &mut [Q],
    exp_avg_sq: &mut [Q],
    max_exp_avg_sq: Option<&mut [Q]>,
) {
    unsafe {
        match max_exp_avg_sq {
            Some(vmax) if k.amsgrad => {
                stream_param::<S, Q, L, _, 3>(*k, param, grad, [exp_avg, exp_avg_sq, vmax]);
            }
            _ => stream_param::<S, Q, L, _, 2>(*k, param, grad, [exp_avg, exp_avg_sq]),
        }
    }
}

impl<T: Float> AdamScalars<T> {
    /// The gradient after maximize and L2 decay, and the parameter after decoupled decay.
    #[inline(always)]
    fn prepare<V: Arith<T>>(&self, p: V, g: V) -> (V, V) {
        let mut g = if self.maximize { -g } else { g };
        let mut p = p;
        if let Some(decay) = self.param_decay {
            p = p * V::splat(decay);
        }
        if let Some(wd) = self.grad_decay {
            g = g + V::splat(wd) * p;
        }
        (p, g)
    }

    /// The new first and second moments.
    #[inline(always)]
    fn moments<V: Arith<T>>(&self, g: V, m: V, v: V) -> (V, V) {
        let m = lerp(m, g, &self.beta1);
        // addcmul: v * beta2 + ((1 - beta2) * g) * g
        let v = v * V::splat(self.beta2) + V::splat(self.one_minus_beta2) * g * g;
        (m, v)
    }

    /// The new parameter from the first moment and the second moment in use.
    #[inline(always)]
    fn descend<V: Arith<T>>(&self, p: V, m: V, second: V) -> V {
        let denom = second.sqrt() / V::splat(self.bias_correction2_sqrt) + V::splat(self.eps);
        // addcdiv: p + (value * m) / denom
        p + V::splat(self.neg_step_size) * m / denom
    }
}

/// Without amsgrad; buffers `[exp_avg, exp_avg_sq]`.
impl<T: Float> Elementwise<T, 2> for AdamScalars<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [m, v]: [V; 2]) -> (V, [V; 2]) {
        let (p, g) = self.prepare(p, g);
        let (m, v) = self.moments(g, m, v);
        (self.descend(p, m, v), [m, v])
    }
}

/// With amsgrad; buffers `[exp_avg, exp_avg_sq, max_exp_avg_sq]`.
impl<T: Float> Elementwise<T, 3> for AdamScalars<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [m, v, vmax]: [V; 3]) -> (V, [V; 3]) {
        let (p, g) = self.prepare(p, g);
        let (m, v) = self.moments(g, m, v);
        let vmax = vmax.maximum(v);
        (self.descend(p, m, vmax), [m, v, vmax])
    }
}
