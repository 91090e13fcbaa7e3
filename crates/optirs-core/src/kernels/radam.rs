//! RAdam (rectified Adam), following `torch.optim.radam._single_tensor_radam` (non-capturable
//! path): the rectified update where the SMA length `rho_t` exceeds 5, else the unadapted one.

use super::float::{lerp, Float, LerpWeight, Storage};
use super::lanes::{stream_param, Arith, Elementwise, ParamOut, StateLanes};

/// Hyperparameters of one RAdam param group, as torch stores them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RAdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decoupled: bool,
    pub maximize: bool,
}

impl Default for RAdamHyper {
    fn default() -> Self {
        RAdamHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
            maximize: false,
        }
    }
}

/// Per-step scalars of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RAdamScalars<T> {
    pub maximize: bool,
    /// `Some(wd)`: L2 penalty added to the gradient.
    pub grad_decay: Option<T>,
    /// `Some(1 - lr * wd)`: decoupled decay of the parameter.
    pub param_decay: Option<T>,
    pub beta1: LerpWeight<T>,
    pub beta2: T,
    pub one_minus_beta2: T,
    pub bias_correction1: T,
    pub lr: T,
    /// `Some((sqrt(bias_correction2), rect))` when `rho_t > 5`: the rectified update.
    pub rectified: Option<(T, T)>,
    pub eps: T,
}

impl<T: Float> RAdamScalars<T> {
    /// `step` is the count after this step's increment, as torch reads it back (`.item()` of
    /// its float32 counter). `rho_inf`, `rho_t` and the rectification are computed in `f64`
    /// with torch's expressions, in its order (`**` is C `pow`).
    #[must_use]
    pub fn new(h: &RAdamHyper, step: f64) -> Self {
        let has_decay = h.weight_decay != 0.0;
        let bias_correction1 = 1.0 - h.beta1.powf(step);
        let bias_correction2 = 1.0 - h.beta2.powf(step);
        let rho_inf = 2.0 / (1.0 - h.beta2) - 1.0;
        let rho_t = rho_inf - 2.0 * step * h.beta2.powf(step) / bias_correction2;
        let rectified = (rho_t > 5.0).then(|| {
            let rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                .powf(0.5);
            (T::from_f64(bias_correction2.powf(0.5)), T::from_f64(rect))
        });
        RAdamScalars {
            maximize: h.maximize,
            grad_decay: (has_decay && !h.decoupled).then(|| T::from_f64(h.weight_decay)),
            param_decay: (has_decay && h.decoupled)
                .then(|| T::from_f64(1.0 - h.lr * h.weight_decay)),
            beta1: LerpWeight::new(1.0 - h.beta1),
            beta2: T::from_f64(h.beta2),
            one_minus_beta2: T::from_f64(1.0 - h.beta2),
            bias_correction1: T::from_f64(bias_correction1),
            lr: T::from_f64(h.lr),
            rectified,
            eps: T::from_f64(h.eps),
        }
    }
}

/// One RAdam step over one parameter (or a chunk of it), `L::W` elements at a time.
/// Arithmetic runs in `S::Compute`, rounded to `S` once when stored.
///
/// # Safety
/// The CPU has `L`'s instructions.
#[inline(always)]
pub unsafe fn update<S: Storage, Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(
    k: &RAdamScalars<S::Compute>,
    param: ParamOut<'_, S>,
    grad: &[S],
    exp_avg: &mut [Q],
    exp_avg_sq: &mut [Q],
) {
    unsafe { stream_param::<S, Q, L, _, 2>(*k, param, grad, [exp_avg, exp_avg_sq]) }
}

/// Buffers `[exp_avg, exp_avg_sq]`.
impl<T: Float> Elementwise<T, 2> for RAdamScalars<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [m, v]: [V; 2]) -> (V, [V; 2]) {
        let mut g = if self.maximize { -g } else { g };
        let mut p = p;
        if let Some(decay) = self.param_decay {
            p = p * V::splat(decay);
        }
        if let Some(wd) = self.grad_decay {
            g = g + V::splat(wd) * p;
        }
        let m = lerp(m, g, &self.beta1);
        let v = v * V::splat(self.beta2) + V::splat(self.one_minus_beta2) * g * g;
        // exp_avg / bias_correction1, then `* lr`
        let step = m / V::splat(self.bias_correction1) * V::splat(self.lr);
        let step = match self.rectified {
            Some((bc2_sqrt, rect)) => {
                // `bias_correction2 ** 0.5 / (sqrt(v) + eps)`: a float over a tensor is
                // torch's `Tensor.__rtruediv__`, `reciprocal() * bc2_sqrt`.
                let adaptive =
                    V::splat(T::ONE) / (v.sqrt() + V::splat(self.eps)) * V::splat(bc2_sqrt);
                step * adaptive * V::splat(rect)
            }
            None => step,
        };
        // add_(step, alpha=-1)
        (p - step, [m, v])
    }
}
