//! RMSprop (plain, centered, with momentum), following
//! `torch.optim.rmsprop._single_tensor_rmsprop`.

use super::float::{lerp, Float, LerpWeight, Storage};
use super::lanes::{stream_param, Arith, Elementwise, ParamOut, StateLanes};

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

/// One RMSprop step, `L::W` elements at a time. `momentum_buffer` must be `Some` when
/// `k.momentum` is, `grad_avg` when `k.centered` is. Arithmetic runs in `S::Compute`, rounded
/// to `S` once when stored.
///
/// # Safety
/// The CPU has `L`'s instructions.
#[inline(always)]
pub unsafe fn update<S: Storage, Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(
    k: &RmsPropScalars<S::Compute>,
    param: ParamOut<'_, S>,
    grad: &[S],
    square_avg: &mut [Q],
    momentum_buffer: Option<&mut [Q]>,
    grad_avg: Option<&mut [Q]>,
) {
    unsafe {
        match (k.momentum, k.centered, momentum_buffer, grad_avg) {
            (Some(mu), Some(w), Some(buf), Some(ga)) => {
                let e = Rms { k: *k, mu, w };
                stream_param::<S, Q, L, _, 3>(e, param, grad, [square_avg, buf, ga]);
            }
            (Some(mu), _, Some(buf), _) => {
                let e = Rms { k: *k, mu, w: () };
                stream_param::<S, Q, L, _, 2>(e, param, grad, [square_avg, buf]);
            }
            (_, Some(w), _, Some(ga)) => {
                let e = Rms { k: *k, mu: (), w };
                stream_param::<S, Q, L, _, 2>(e, param, grad, [square_avg, ga]);
            }
            _ => {
                let e = Rms {
                    k: *k,
                    mu: (),
                    w: (),
                };
                stream_param::<S, Q, L, _, 1>(e, param, grad, [square_avg]);
            }
        }
    }
}

/// RMSprop's scalars with the momentum factor (`M = T`, else `()`) and the centered lerp
/// weight (`C = LerpWeight<T>`, else `()`): one element loop per combination.
#[derive(Clone, Copy)]
struct Rms<T: Float, M, C> {
    k: RmsPropScalars<T>,
    mu: M,
    w: C,
}

impl<T: Float> RmsPropScalars<T> {
    /// The gradient after maximize and weight decay, and the new square average.
    #[inline(always)]
    fn square<V: Arith<T>>(&self, p: V, g: V, sq: V) -> (V, V) {
        let g = if self.maximize { -g } else { g };
        let g = match self.weight_decay {
            Some(wd) => g + V::splat(wd) * p,
            None => g,
        };
        (
            g,
            sq * V::splat(self.alpha) + V::splat(self.one_minus_alpha) * g * g,
        )
    }

    /// The new parameter without momentum.
    #[inline(always)]
    fn descend<V: Arith<T>>(&self, p: V, g: V, avg: V) -> V {
        p + V::splat(self.neg_lr) * g / avg
    }

    /// The new momentum buffer and parameter.
    #[inline(always)]
    fn descend_momentum<V: Arith<T>>(&self, mu: T, p: V, g: V, avg: V, buf: V) -> (V, V) {
        // addcdiv(g, avg) with value 1, then add(buf, alpha=-lr)
        let b = buf * V::splat(mu) + g / avg;
        (p + V::splat(self.neg_lr) * b, b)
    }
}

/// `sqrt(square_avg - grad_avg^2) + eps` and the new grad_avg, for centered RMSprop.
#[inline(always)]
fn centered<T: Float, V: Arith<T>>(
    k: &RmsPropScalars<T>,
    w: &LerpWeight<T>,
    g: V,
    sq: V,
    ga: V,
) -> (V, V) {
    let ga = lerp(ga, g, w);
    // addcmul(ga, ga, value=-1): sq + (-ga) * ga, rounded once, as torch's CPU kernel computes
    // it (measured, torch 2.15 at its AVX2 and AVX-512 levels: bit for bit fma(-ga, ga, sq)).
    // A rounded product would overflow for |ga| above sqrt(MAX) and make `inf - inf` NaN where
    // torch keeps sq's infinity, and so the parameter (its step g / inf is 0).
    ((-ga).mul_add(ga, sq).sqrt() + V::splat(k.eps), ga)
}

/// Plain; buffers `[square_avg]`.
impl<T: Float> Elementwise<T, 1> for Rms<T, (), ()> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [sq]: [V; 1]) -> (V, [V; 1]) {
        let (g, sq) = self.k.square(p, g, sq);
        let avg = sq.sqrt() + V::splat(self.k.eps);
        (self.k.descend(p, g, avg), [sq])
    }
}

/// With momentum; buffers `[square_avg, momentum_buffer]`.
#[allow(clippy::mismatching_type_param_order)] // `M` is the momentum's type: T itself
impl<T: Float> Elementwise<T, 2> for Rms<T, T, ()> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [sq, buf]: [V; 2]) -> (V, [V; 2]) {
        let (g, sq) = self.k.square(p, g, sq);
        let avg = sq.sqrt() + V::splat(self.k.eps);
        let (p, buf) = self.k.descend_momentum(self.mu, p, g, avg, buf);
        (p, [sq, buf])
    }
}

/// Centered; buffers `[square_avg, grad_avg]`.
impl<T: Float> Elementwise<T, 2> for Rms<T, (), LerpWeight<T>> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [sq, ga]: [V; 2]) -> (V, [V; 2]) {
        let (g, sq) = self.k.square(p, g, sq);
        let (avg, ga) = centered(&self.k, &self.w, g, sq, ga);
        (self.k.descend(p, g, avg), [sq, ga])
    }
}

/// Centered with momentum; buffers `[square_avg, momentum_buffer, grad_avg]`.
#[allow(clippy::mismatching_type_param_order)] // as above
impl<T: Float> Elementwise<T, 3> for Rms<T, T, LerpWeight<T>> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [sq, buf, ga]: [V; 3]) -> (V, [V; 3]) {
        let (g, sq) = self.k.square(p, g, sq);
        let (avg, ga) = centered(&self.k, &self.w, g, sq, ga);
        let (p, buf) = self.k.descend_momentum(self.mu, p, g, avg, buf);
        (p, [sq, buf, ga])
    }
}
