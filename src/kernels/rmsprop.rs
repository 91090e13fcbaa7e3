//! RMSprop (plain, centered, with momentum), following
//! `torch.optim.rmsprop._single_tensor_rmsprop`.

use super::float::{lerp, Float, LerpWeight, Storage};

/// Hyperparameters of one RMSprop param group, as torch stores them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsPropHyper {
    pub lr: f64,
    pub alpha: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub centered: bool,
    pub maximize: bool,
}

impl Default for RmsPropHyper {
    fn default() -> Self {
        RmsPropHyper {
            lr: 1e-2,
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            centered: false,
            maximize: false,
        }
    }
}

/// Per-step scalars of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsPropScalars<T> {
    pub maximize: bool,
    pub weight_decay: Option<T>,
    pub alpha: T,
    pub one_minus_alpha: T,
    /// `Some` when centered: the lerp weight `1 - alpha` of `grad_avg`.
    pub centered: Option<LerpWeight<T>>,
    pub eps: T,
    /// `Some` when momentum > 0.
    pub momentum: Option<T>,
    pub neg_lr: T,
}

impl<T: Float> RmsPropScalars<T> {
    /// RMSprop's update does not depend on the step count.
    #[must_use]
    pub fn new(h: &RmsPropHyper) -> Self {
        RmsPropScalars {
            maximize: h.maximize,
            weight_decay: (h.weight_decay != 0.0).then(|| T::from_f64(h.weight_decay)),
            alpha: T::from_f64(h.alpha),
            one_minus_alpha: T::from_f64(1.0 - h.alpha),
            centered: h.centered.then(|| LerpWeight::new(1.0 - h.alpha)),
            eps: T::from_f64(h.eps),
            momentum: (h.momentum > 0.0).then(|| T::from_f64(h.momentum)),
            neg_lr: T::from_f64(-h.lr),
        }
    }
}

/// One RMSprop step. `momentum_buffer` must be `Some` when `k.momentum` is, `grad_avg` when
/// `k.centered` is. Arithmetic runs in `S::Compute`, rounded to `S` once when stored.
#[inline(always)]
pub fn update<S: Storage>(
    k: &RmsPropScalars<S::Compute>,
    param: &mut [S],
    grad: &[S],
    square_avg: &mut [S],
    momentum_buffer: Option<&mut [S]>,
    grad_avg: Option<&mut [S]>,
) {
    let with_mom = k.momentum.is_some();
    let centered = k.centered.is_some();
    match (momentum_buffer, grad_avg) {
        (Some(bufs), Some(gas)) if with_mom && centered => {
            for ((((p, &g), sq), buf), ga) in param
                .iter_mut()
                .zip(grad)
                .zip(square_avg.iter_mut())
                .zip(bufs.iter_mut())
                .zip(gas.iter_mut())
            {
                let pv = p.load();
                let (g, avg) = core(k, pv, g, sq, Some(ga));
                finish(k, p, pv, g, avg, Some(buf));
            }
        }
        (Some(bufs), _) if with_mom => {
            for (((p, &g), sq), buf) in param
                .iter_mut()
                .zip(grad)
                .zip(square_avg.iter_mut())
                .zip(bufs.iter_mut())
            {
                let pv = p.load();
                let (g, avg) = core(k, pv, g, sq, None);
                finish(k, p, pv, g, avg, Some(buf));
            }
        }
        (_, Some(gas)) if centered => {
            for (((p, &g), sq), ga) in param
                .iter_mut()
                .zip(grad)
                .zip(square_avg.iter_mut())
                .zip(gas.iter_mut())
            {
                let pv = p.load();
                let (g, avg) = core(k, pv, g, sq, Some(ga));
                finish(k, p, pv, g, avg, None);
            }
        }
        _ => {
            for ((p, &g), sq) in param.iter_mut().zip(grad).zip(square_avg.iter_mut()) {
                let pv = p.load();
                let (g, avg) = core(k, pv, g, sq, None);
                finish(k, p, pv, g, avg, None);
            }
        }
    }
}

/// The preconditioned gradient's parts of one element: (g, avg) with avg = sqrt(..) + eps.
/// Functions, not closures, so that they can be inlined by force: LLVM left closures this
/// size as a call per element for float16, and nothing vectorised.
#[inline(always)]
fn core<S: Storage>(
    k: &RmsPropScalars<S::Compute>,
    p: S::Compute,
    g: S,
    sq: &mut S,
    ga: Option<&mut S>,
) -> (S::Compute, S::Compute) {
    let g = g.load();
    let g = if k.maximize { -g } else { g };
    let g = match k.weight_decay {
        Some(wd) => g + wd * p,
        None => g,
    };
    let sq_new = sq.load() * k.alpha + k.one_minus_alpha * g * g;
    *sq = S::store(sq_new);
    let avg = match (ga, &k.centered) {
        (Some(ga), Some(w)) => {
            let ga_new = lerp(ga.load(), g, w.weight, w.one_minus, w.small);
            *ga = S::store(ga_new);
            // addcmul(ga, ga, value=-1): sq + (-ga) * ga, which is exactly sq - ga * ga
            (sq_new - ga_new * ga_new).sqrt()
        }
        _ => sq_new.sqrt(),
    };
    (g, avg + k.eps)
}

/// The parameter's (and momentum buffer's) update of one element.
#[inline(always)]
fn finish<S: Storage>(
    k: &RmsPropScalars<S::Compute>,
    p: &mut S,
    pv: S::Compute,
    g: S::Compute,
    avg: S::Compute,
    buf: Option<&mut S>,
) {
    match (buf, k.momentum) {
        (Some(buf), Some(mu)) => {
            // addcdiv(g, avg) with value 1, then add(buf, alpha=-lr)
            let b = buf.load() * mu + g / avg;
            *buf = S::store(b);
            *p = S::store(pv + k.neg_lr * b);
        }
        _ => *p = S::store(pv + k.neg_lr * g / avg),
    }
}
