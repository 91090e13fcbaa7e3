//! Adam and AdamW, following `torch.optim.adam._single_tensor_adam` (non-capturable path).

use super::float::{lerp, maximum, Float, LerpWeight, Storage};

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
/// `exp_avg_sq` and, with amsgrad, `max_exp_avg_sq` in a single pass. Arithmetic runs in
/// `S::Compute`; every value is rounded to `S` once, when stored.
#[inline(always)]
pub fn update<S: Storage>(
    k: &AdamScalars<S::Compute>,
    param: &mut [S],
    grad: &[S],
    exp_avg: &mut [S],
    exp_avg_sq: &mut [S],
    max_exp_avg_sq: Option<&mut [S]>,
) {
    // The slices are zipped, so nothing is indexed out of bounds whatever the lengths; the
    // bindings guarantee they are equal.
    match max_exp_avg_sq {
        Some(vmax) if k.amsgrad => {
            for ((((p, &g), m), v), vm) in param
                .iter_mut()
                .zip(grad)
                .zip(exp_avg.iter_mut())
                .zip(exp_avg_sq.iter_mut())
                .zip(vmax)
            {
                elem(k, p, g, m, v, Some(vm));
            }
        }
        _ => {
            for (((p, &g), m), v) in param
                .iter_mut()
                .zip(grad)
                .zip(exp_avg.iter_mut())
                .zip(exp_avg_sq.iter_mut())
            {
                elem(k, p, g, m, v, None);
            }
        }
    }
}

/// One element of [`update`]. A function, not a closure, so that it can be inlined by force:
/// LLVM left a closure this size as a call per element for float16, and nothing vectorised.
#[inline(always)]
fn elem<S: Storage>(
    k: &AdamScalars<S::Compute>,
    p: &mut S,
    g: S,
    m: &mut S,
    v: &mut S,
    vmax: Option<&mut S>,
) {
    let g = g.load();
    let mut g = if k.maximize { -g } else { g };
    let mut pv = p.load();
    if let Some(decay) = k.param_decay {
        pv = pv * decay;
    }
    if let Some(wd) = k.grad_decay {
        g = g + wd * pv;
    }
    let w = &k.beta1;
    let m_new = lerp(m.load(), g, w.weight, w.one_minus, w.small);
    *m = S::store(m_new);
    // addcmul: v * beta2 + ((1 - beta2) * g) * g
    let v_new = v.load() * k.beta2 + k.one_minus_beta2 * g * g;
    *v = S::store(v_new);
    let second = match vmax {
        Some(vmax) => {
            let x = maximum(vmax.load(), v_new);
            *vmax = S::store(x);
            x
        }
        None => v_new,
    };
    let denom = second.sqrt() / k.bias_correction2_sqrt + k.eps;
    // addcdiv: p + (value * m) / denom
    *p = S::store(pv + k.neg_step_size * m_new / denom);
}
