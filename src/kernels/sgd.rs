//! SGD with momentum, dampening, Nesterov and weight decay, following
//! `torch.optim.sgd._single_tensor_sgd`.

use super::float::{Float, Storage};

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

/// One SGD step over one parameter (or a chunk of it). `momentum_buffer` must be `Some` when
/// `k.momentum` is. Arithmetic runs in `S::Compute`, rounded to `S` once when stored.
#[inline(always)]
pub fn update<S: Storage>(
    k: &SgdScalars<S::Compute>,
    param: &mut [S],
    grad: &[S],
    momentum_buffer: Option<&mut [S]>,
) {
    let prep = |p: S::Compute, g: S| {
        let g = g.load();
        let g = if k.maximize { -g } else { g };
        match k.weight_decay {
            Some(wd) => g + wd * p,
            None => g,
        }
    };
    match (k.momentum, momentum_buffer) {
        (Some(mu), Some(bufs)) => {
            for ((p, &g), buf) in param.iter_mut().zip(grad).zip(bufs.iter_mut()) {
                let pv = p.load();
                let g = prep(pv, g);
                let b = if k.first_step {
                    g
                } else {
                    buf.load() * mu + k.one_minus_dampening * g
                };
                *buf = S::store(b);
                let d = if k.nesterov { g + mu * b } else { b };
                *p = S::store(pv + k.neg_lr * d);
            }
        }
        _ => {
            for (p, &g) in param.iter_mut().zip(grad) {
                let pv = p.load();
                let g = prep(pv, g);
                *p = S::store(pv + k.neg_lr * g);
            }
        }
    }
}
