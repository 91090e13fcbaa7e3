//! ASGD (averaged SGD), following `torch.optim.asgd._single_tensor_asgd` (non-capturable path).
//!
//! Besides the averaged parameter `ax` (a buffer) it keeps two per-parameter 0-d values,
//! `eta` (the step size) and `mu` (the averaging weight), which this step reads and replaces
//! with values computed in Python from the step count ([`AsgdHyper::eta_after`],
//! [`AsgdHyper::mu_after`]).

use super::float::{Float, Storage};
use super::lanes::{stream_param, Arith, Elementwise, ParamOut, StateLanes};

/// Hyperparameters of one ASGD param group, as torch stores them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AsgdHyper {
    pub lr: f64,
    pub lambd: f64,
    pub alpha: f64,
    pub t0: f64,
    pub weight_decay: f64,
    pub maximize: bool,
    /// `lr` is a float32 tensor: torch's Python expression for the new `eta` then runs in
    /// float32 tensor arithmetic.
    pub lr_f32: bool,
}

impl Default for AsgdHyper {
    fn default() -> Self {
        AsgdHyper {
            lr: 1e-2,
            lambd: 1e-4,
            alpha: 0.75,
            t0: 1e6,
            weight_decay: 0.0,
            maximize: false,
            lr_f32: false,
        }
    }
}

/// What Python's `base ** alpha` gives for `eta`'s base.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EtaPower {
    Real(f64),
    /// A negative base and a fractional exponent: Python's complex power, `(real, imag)`.
    Complex(f64, f64),
}

impl AsgdHyper {
    /// `1 + lambd * lr * step`, the base of `eta`'s power.
    #[must_use]
    pub fn eta_base(&self, step: f64) -> f64 {
        1.0 + self.lambd * self.lr * step
    }

    /// `(1 + lambd * lr * step) ** alpha` as Python computes it (`_Py_c_pow` where the base
    /// is negative and the exponent fractional: its modulus `|base| ** alpha` and its phase
    /// `atan2(0, base) * alpha`, which is `pi * alpha`).
    #[must_use]
    pub fn eta_power(&self, step: f64) -> EtaPower {
        let base = self.eta_base(step);
        if base < 0.0 && base.is_finite() && self.alpha.is_finite() && self.alpha.fract() != 0.0 {
            let len = (-base).powf(self.alpha);
            let phase = std::f64::consts::PI * self.alpha;
            EtaPower::Complex(len * phase.cos(), len * phase.sin())
        } else {
            EtaPower::Real(base.powf(self.alpha))
        }
    }

    /// The new `eta`: `lr / ((1 + lambd * lr * step) ** alpha)` in Python, made a float32
    /// tensor (`torch.as_tensor`; of a complex value, its real part, which `copy_` keeps).
    #[must_use]
    #[allow(clippy::cast_possible_truncation)]
    pub fn eta_after(&self, step: f64) -> f64 {
        if self.lr_f32 {
            return f64::from(self.eta_after_f32(step));
        }
        let eta = match self.eta_power(step) {
            EtaPower::Real(x) => self.lr / x,
            EtaPower::Complex(re, im) => complex_quotient_real(self.lr, re, im),
        };
        f64::from(eta as f32)
    }

    /// The new `eta` with a float32 tensor `lr`: `lambd * lr * step`, `1 + ...`, `** alpha`
    /// and `lr / ...` each a float32 tensor operation (the Python scalars converted to float32;
    /// torch's `pow` special-cases these exponents).
    #[allow(clippy::cast_possible_truncation, clippy::float_cmp)]
    fn eta_after_f32(&self, step: f64) -> f32 {
        let lr = self.lr as f32;
        let x = 1.0 + lr * (self.lambd as f32) * (step as f32);
        let alpha = self.alpha as f32;
        let power = if alpha == 2.0 {
            x * x
        } else if alpha == 3.0 {
            x * x * x
        } else if alpha == 0.5 {
            x.sqrt()
        } else if alpha == -0.5 {
            1.0 / x.sqrt()
        } else if alpha == -1.0 {
            1.0 / x
        } else if alpha == -2.0 {
            1.0 / (x * x)
        } else {
            x.powf(alpha)
        };
        lr / power
    }

    /// The new `mu`: `1 / max(1, step - t0)` in Python (NaN is not above 1), made a float32
    /// tensor.
    #[must_use]
    #[allow(clippy::cast_possible_truncation)]
    pub fn mu_after(&self, step: f64) -> f64 {
        let d = step - self.t0;
        let m = if d > 1.0 { d } else { 1.0 };
        f64::from((1.0 / m) as f32)
    }
}

/// The real part of `complex(a, 0) / complex(re, im)` as CPython's `_Py_c_quot` computes it
/// (NaN where it divides by zero, which Python refuses).
fn complex_quotient_real(a: f64, re: f64, im: f64) -> f64 {
    if re.abs() >= im.abs() {
        if re == 0.0 {
            return f64::NAN;
        }
        let ratio = im / re;
        let denom = re + im * ratio;
        (a + 0.0 * ratio) / denom
    } else if im.abs() >= re.abs() {
        let ratio = re / im;
        let denom = re * ratio + im;
        (a * ratio + 0.0) / denom
    } else {
        f64::NAN
    }
}

/// Per-step scalars of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AsgdScalars<T> {
    pub maximize: bool,
    pub weight_decay: Option<T>,
    /// `1 - lambd * eta`: the parameter's decay.
    pub decay: T,
    /// `-eta`: the gradient's weight.
    pub neg_eta: T,
    /// `Some(mu)` when `mu != 1`: `ax += (p - ax) * mu`; `None`: `ax = p`.
    pub mu: Option<T>,
}

impl<T: Float> AsgdScalars<T> {
    /// `eta` and `mu`: the stored values before this step, as `.item()` reads them.
    #[must_use]
    pub fn new(h: &AsgdHyper, eta: f64, mu: f64) -> Self {
        AsgdScalars {
            maximize: h.maximize,
            weight_decay: (h.weight_decay != 0.0).then(|| T::from_f64(h.weight_decay)),
            decay: T::from_f64(1.0 - h.lambd * eta),
            neg_eta: T::from_f64(-eta),
            mu: (mu != 1.0).then(|| T::from_f64(mu)),
        }
    }
}

/// One ASGD step over one parameter (or a chunk of it), `L::W` elements at a time.
/// Arithmetic runs in `S::Compute`, rounded to `S` once when stored.
///
/// # Safety
/// The CPU has `L`'s instructions.
#[inline(always)]
pub unsafe fn update<S: Storage, Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(
    k: &AsgdScalars<S::Compute>,
    param: ParamOut<'_, S>,
    grad: &[S],
    ax: &mut [Q],
) {
    unsafe { stream_param::<S, Q, L, _, 1>(*k, param, grad, [ax]) }
}

/// Buffers `[ax]`.
impl<T: Float> Elementwise<T, 1> for AsgdScalars<T> {
    #[inline(always)]
    fn elem<V: Arith<T>>(&self, p: V, g: V, [ax]: [V; 1]) -> (V, [V; 1]) {
        let g = if self.maximize { -g } else { g };
        let g = match self.weight_decay {
            Some(wd) => g + V::splat(wd) * p,
            None => g,
        };
        let p = p * V::splat(self.decay);
        // add_(grad, alpha=-eta)
        let p = p + V::splat(self.neg_eta) * g;
        let ax = match self.mu {
            Some(mu) => ax + (p - ax) * V::splat(mu),
            None => p,
        };
        (p, [ax])
    }
}
