//! Each fused kernel against a reference written the way torch's for-loop runs it: one
//! whole-array operation at a time, in torch's order. Products are rounded on both sides, except
//! the one correctly rounded fused multiply-add both use (centered RMSprop's addcmul), so they
//! must agree bit for bit, at every SIMD level and whatever the chunking.

use super::adadelta::{AdadeltaHyper, AdadeltaScalars};
use super::adagrad::{AdagradHyper, AdagradScalars};
use super::adam::{AdamHyper, AdamScalars};
use super::adamax::{AdamaxHyper, AdamaxScalars};
use super::asgd::{AsgdHyper, AsgdScalars};
use super::lion::{LionHyper, LionScalars};
use super::nadam::{NAdamHyper, NAdamScalars};
use super::radam::{RAdamHyper, RAdamScalars};
use super::rmsprop::{RmsPropHyper, RmsPropScalars};
use super::rprop::{RpropHyper, RpropScalars};
use super::sgd::{SgdHyper, SgdScalars};
use super::simd::{apply, Element, SimdLevel};
use super::{Float, Rule, Slices, Storage};

#[cfg(not(miri))]
const LENGTHS: &[usize] = &[0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 65, 1000, 4099];
/// Under Miri (`make miri`), which interprets every element: empty, shorter than any vector,
/// and one more than whole vectors of every width (4 to 32), which `CHUNKS` cuts into 17 + 16.
#[cfg(miri)]
const LENGTHS: &[usize] = &[0, 1, 9, 33];

/// The chunkings each case runs with (one chunk per element, awkward ones, one per array).
const CHUNKS: &[usize] = if cfg!(miri) {
    &[17, 1 << 14]
} else {
    &[1, 5, 16, 1 << 14]
};

/// The cases of `cases()` Miri runs: every rule, with 0 to 3 state buffers (SGD without and
/// with momentum, Adam with amsgrad and without, RMSprop centered with momentum and plain with
/// momentum, Adagrad, Adadelta, RAdam across its switch to the rectified update, Lion, Rprop,
/// Adamax, NAdam, ASGD). The others differ from these in their arithmetic only.
const MIRI_CASES: [usize; 15] = [0, 6, 14, 15, 21, 23, 29, 30, 34, 36, 38, 41, 43, 47, 49];

/// Gradients (steps) per case.
const STEPS: usize = if cfg!(miri) { 2 } else { 4 };

/// xorshift64*: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        bits as f64 / (1u64 << 53) as f64
    }

    /// Roughly normal values, with a few NaN, ±inf, ±0 and tiny ones mixed in.
    fn values<T: Float>(&mut self, n: usize, specials: bool) -> Vec<T> {
        (0..n)
            .map(|_| {
                let u = self.next_f64();
                if specials && u < 0.02 {
                    let pick = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -0.0, 1e-39];
                    return T::from_f64(pick[(u * 300.0) as usize % pick.len()]);
                }
                let x = (0..4).map(|_| self.next_f64()).sum::<f64>() - 2.0;
                T::from_f64(x * 1.7)
            })
            .collect()
    }
}

// ---- whole-array operations, as torch's ops -------------------------------------------------

fn neg<T: Float>(a: &[T]) -> Vec<T> {
    a.iter().map(|&x| -x).collect()
}
/// `a.add(b, alpha=s)`
fn add_alpha<T: Float>(a: &[T], b: &[T], s: T) -> Vec<T> {
    a.iter().zip(b).map(|(&x, &y)| x + s * y).collect()
}
fn mul_scalar<T: Float>(a: &[T], s: T) -> Vec<T> {
    a.iter().map(|&x| x * s).collect()
}
fn div_scalar<T: Float>(a: &[T], s: T) -> Vec<T> {
    a.iter().map(|&x| x / s).collect()
}
fn add_scalar<T: Float>(a: &[T], s: T) -> Vec<T> {
    a.iter().map(|&x| x + s).collect()
}
fn sqrt<T: Float>(a: &[T]) -> Vec<T> {
    a.iter().map(|&x| x.sqrt()).collect()
}
/// `a.addcmul(b, c, value=s)`: a + (s * b) * c
fn addcmul<T: Float>(a: &[T], b: &[T], c: &[T], s: T) -> Vec<T> {
    a.iter()
        .zip(b)
        .zip(c)
        .map(|((&x, &y), &z)| x + s * y * z)
        .collect()
}
/// `a.addcmul(b, c, value=s)` as torch's CPU kernel computes it: (s * b) * c + a, rounded once.
fn addcmul_fused<T: Float>(a: &[T], b: &[T], c: &[T], s: T) -> Vec<T> {
    a.iter()
        .zip(b)
        .zip(c)
        .map(|((&x, &y), &z)| (s * y).mul_add(z, x))
        .collect()
}
/// `a.addcdiv(b, c, value=s)`: a + (s * b) / c
fn addcdiv<T: Float>(a: &[T], b: &[T], c: &[T], s: T) -> Vec<T> {
    a.iter()
        .zip(b)
        .zip(c)
        .map(|((&x, &y), &z)| x + s * y / z)
        .collect()
}
/// `a.lerp(b, w)` with the weight given as a Python float.
fn lerp<T: Float>(a: &[T], b: &[T], w: f64) -> Vec<T> {
    let w = T::from_f64(w);
    let small = w.to_f64().abs() < 0.5;
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            if small {
                x + w * (y - x)
            } else {
                y - (y - x) * (T::ONE - w)
            }
        })
        .collect()
}
fn maximum<T: Float>(a: &[T], b: &[T]) -> Vec<T> {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            if x.is_nan() || y.is_nan() {
                if x.is_nan() {
                    x
                } else {
                    y
                }
            } else if y > x {
                y
            } else {
                x
            }
        })
        .collect()
}
fn t<T: Float>(x: f64) -> T {
    T::from_f64(x)
}
fn mul<T: Float>(a: &[T], b: &[T]) -> Vec<T> {
    a.iter().zip(b).map(|(&x, &y)| x * y).collect()
}
fn div<T: Float>(a: &[T], b: &[T]) -> Vec<T> {
    a.iter().zip(b).map(|(&x, &y)| x / y).collect()
}
fn reciprocal<T: Float>(a: &[T]) -> Vec<T> {
    a.iter().map(|&x| T::ONE / x).collect()
}
/// `torch.sign`: ATen's `(0 < x) - (x < 0)`, so NaN and both zeros give 0.
fn sign<T: Float>(a: &[T]) -> Vec<T> {
    a.iter()
        .map(|&x| {
            let pos = if T::ZERO < x { T::ONE } else { T::ZERO };
            let neg = if x < T::ZERO { T::ONE } else { T::ZERO };
            pos - neg
        })
        .collect()
}
/// `a.clamp(lo, hi)` as ATen's scalar loop: `std::min(std::max(a, lo), hi)`.
fn clamp<T: Float>(a: &[T], lo: T, hi: T) -> Vec<T> {
    a.iter()
        .map(|&x| {
            let m = if x < lo { lo } else { x };
            if hi < m {
                hi
            } else {
                m
            }
        })
        .collect()
}

// ---- references, transcribed from torch.optim's _single_tensor_* ----------------------------

struct State<T> {
    p: Vec<T>,
    bufs: [Option<Vec<T>>; 3],
    step: f32,
}

fn ref_sgd<T: Float>(h: &SgdHyper, s: &mut State<T>, grad: &[T]) {
    let mut g = if h.maximize { neg(grad) } else { grad.to_vec() };
    if h.weight_decay != 0.0 {
        g = add_alpha(&g, &s.p, t(h.weight_decay));
    }
    if h.momentum != 0.0 {
        let buf = match s.bufs[0].take() {
            None => g.clone(),
            Some(b) => add_alpha(&mul_scalar(&b, t(h.momentum)), &g, t(1.0 - h.dampening)),
        };
        g = if h.nesterov {
            add_alpha(&g, &buf, t(h.momentum))
        } else {
            buf.clone()
        };
        s.bufs[0] = Some(buf);
    }
    s.p = add_alpha(&s.p, &g, t(-h.lr));
}

fn ref_adam<T: Float>(h: &AdamHyper, s: &mut State<T>, grad: &[T]) {
    let mut g = if h.maximize { neg(grad) } else { grad.to_vec() };
    s.step += 1.0;
    if h.weight_decay != 0.0 {
        if h.decoupled {
            s.p = mul_scalar(&s.p, t(1.0 - h.lr * h.weight_decay));
        } else {
            g = add_alpha(&g, &s.p, t(h.weight_decay));
        }
    }
    let [m, v, vmax] = &mut s.bufs;
    let m = m.as_mut().unwrap();
    let v = v.as_mut().unwrap();
    *m = lerp(m, &g, 1.0 - h.beta1);
    *v = addcmul(&mul_scalar(v, t(h.beta2)), &g, &g, t(1.0 - h.beta2));
    let step = f64::from(s.step);
    let bc1 = 1.0 - h.beta1.powf(step);
    let bc2 = 1.0 - h.beta2.powf(step);
    let step_size = h.lr / bc1;
    let bc2_sqrt = bc2.powf(0.5);
    let second = if h.amsgrad {
        let vm = vmax.as_mut().unwrap();
        *vm = maximum(vm, v);
        vm.clone()
    } else {
        v.clone()
    };
    let denom = add_scalar(&div_scalar(&sqrt(&second), t(bc2_sqrt)), t(h.eps));
    s.p = addcdiv(&s.p, m, &denom, t(-step_size));
}

fn ref_rmsprop<T: Float>(h: &RmsPropHyper, s: &mut State<T>, grad: &[T]) {
    let mut g = if h.maximize { neg(grad) } else { grad.to_vec() };
    s.step += 1.0;
    if h.weight_decay != 0.0 {
        g = add_alpha(&g, &s.p, t(h.weight_decay));
    }
    let [sq, buf, ga] = &mut s.bufs;
    let sq = sq.as_mut().unwrap();
    *sq = addcmul(&mul_scalar(sq, t(h.alpha)), &g, &g, t(1.0 - h.alpha));
    let avg = if h.centered {
        let ga = ga.as_mut().unwrap();
        *ga = lerp(ga, &g, 1.0 - h.alpha);
        sqrt(&addcmul_fused(sq, ga, ga, t(-1.0)))
    } else {
        sqrt(sq)
    };
    let avg = add_scalar(&avg, t(h.eps));
    if h.momentum > 0.0 {
        let buf = buf.as_mut().unwrap();
        *buf = addcdiv(&mul_scalar(buf, t(h.momentum)), &g, &avg, T::ONE);
        s.p = add_alpha(&s.p, buf, t(-h.lr));
    } else {
        s.p = addcdiv(&s.p, &g, &avg, t(-h.lr));
    }
}

fn ref_adagrad<T: Float>(h: &AdagradHyper, s: &mut State<T>, grad: &[T]) {
    s.step += 1.0;
    let step = f64::from(s.step);
    let mut g = if h.maximize { neg(grad) } else { grad.to_vec() };
    if h.weight_decay != 0.0 {
        g = add_alpha(&g, &s.p, t(h.weight_decay));
    }
    let clr = h.lr / (1.0 + (step - 1.0) * h.lr_decay);
    let sum = s.bufs[0].as_mut().unwrap();
    *sum = addcmul(sum, &g, &g, T::ONE);
    let std = add_scalar(&sqrt(sum), t(h.eps));
    s.p = addcdiv(&s.p, &g, &std, t(-clr));
}

fn ref_adadelta<T: Float>(h: &AdadeltaHyper, s: &mut State<T>, grad: &[T]) {
    s.step += 1.0;
    let mut g = if h.maximize { neg(grad) } else { grad.to_vec() };
    if h.weight_decay != 0.0 {
        g = add_alpha(&g, &s.p, t(h.weight_decay));
    }
    let [sq, acc, _] = &mut s.bufs;
    let sq = sq.as_mut().unwrap();
    let acc = acc.as_mut().unwrap();
    *sq = addcmul(&mul_scalar(sq, t(h.rho)), &g, &g, t(1.0 - h.rho));
    let std = sqrt(&add_scalar(sq, t(h.eps)));
    let delta = sqrt(&add_scalar(acc, t(h.eps)));
    let delta = mul(&div(&delta, &std), &g);
    *acc = addcmul(&mul_scalar(acc, t(h.rho)), &delta, &delta, t(1.0 - h.rho));
    s.p = add_alpha(&s.p, &delta, t(-h.lr));
}

fn ref_radam<T: Float>(h: &RAdamHyper, s: &mut State<T>, grad: &[T]) {
    let mut g = if h.maximize { neg(grad) } else { grad.to_vec() };
    s.step += 1.0;
    let step = f64::from(s.step);
    if h.weight_decay != 0.0 {
        if h.decoupled {
            s.p = mul_scalar(&s.p, t(1.0 - h.lr * h.weight_decay));
        } else {
            g = add_alpha(&g, &s.p, t(h.weight_decay));
        }
    }
    let [m, v, _] = &mut s.bufs;
    let m = m.as_mut().unwrap();
    let v = v.as_mut().unwrap();
    *m = lerp(m, &g, 1.0 - h.beta1);
    *v = addcmul(&mul_scalar(v, t(h.beta2)), &g, &g, t(1.0 - h.beta2));
    let bc1 = 1.0 - h.beta1.powf(step);
    let bc2 = 1.0 - h.beta2.powf(step);
    let corrected = div_scalar(m, t(bc1));
    let rho_inf = 2.0 / (1.0 - h.beta2) - 1.0;
    let rho_t = rho_inf - 2.0 * step * h.beta2.powf(step) / bc2;
    let update = if rho_t > 5.0 {
        let rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
            / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
            .powf(0.5);
        // `bc2 ** 0.5 / tensor` is `tensor.reciprocal() * (bc2 ** 0.5)`
        let adaptive = mul_scalar(
            &reciprocal(&add_scalar(&sqrt(v), t(h.eps))),
            t(bc2.powf(0.5)),
        );
        mul_scalar(&mul(&mul_scalar(&corrected, t(h.lr)), &adaptive), t(rect))
    } else {
        mul_scalar(&corrected, t(h.lr))
    };
    s.p = add_alpha(&s.p, &update, t(-1.0));
}

fn ref_lion<T: Float>(h: &LionHyper, s: &mut State<T>, grad: &[T]) {
    let g = if h.maximize { neg(grad) } else { grad.to_vec() };
    s.p = mul_scalar(&s.p, t(1.0 - h.lr * h.weight_decay));
    let m = s.bufs[0].as_mut().unwrap();
    let update = sign(&add_alpha(&mul_scalar(m, t(h.beta1)), &g, t(1.0 - h.beta1)));
    s.p = add_alpha(&s.p, &update, t(-h.lr));
    *m = add_alpha(&mul_scalar(m, t(h.beta2)), &g, t(1.0 - h.beta2));
}

fn ref_rprop<T: Float>(h: &RpropHyper, s: &mut State<T>, grad: &[T]) {
    s.step += 1.0;
    let g = if h.maximize { neg(grad) } else { grad.to_vec() };
    let [prev, ss, _] = &mut s.bufs;
    let prev = prev.as_mut().unwrap();
    let ss = ss.as_mut().unwrap();
    let (plus, minus): (T, T) = (t(h.etaplus), t(h.etaminus));
    let mut sg = sign(&mul(&g, prev));
    for x in &mut sg {
        if *x > T::ZERO {
            *x = plus;
        }
    }
    for x in &mut sg {
        if *x < T::ZERO {
            *x = minus;
        }
    }
    for x in &mut sg {
        if *x == T::ZERO {
            *x = T::ONE;
        }
    }
    *ss = clamp(&mul(ss, &sg), t(h.step_size_min), t(h.step_size_max));
    let g: Vec<T> = g
        .iter()
        .zip(&sg)
        .map(|(&x, &f)| if f == minus { T::ZERO } else { x })
        .collect();
    s.p = addcmul(&s.p, &sign(&g), ss, t(-1.0));
    *prev = g;
}

fn ref_adamax<T: Float>(h: &AdamaxHyper, s: &mut State<T>, grad: &[T]) {
    let mut g = if h.maximize { neg(grad) } else { grad.to_vec() };
    s.step += 1.0;
    if h.weight_decay != 0.0 {
        g = add_alpha(&g, &s.p, t(h.weight_decay));
    }
    let [m, u, _] = &mut s.bufs;
    let (m, u) = (m.as_mut().unwrap(), u.as_mut().unwrap());
    *m = lerp(m, &g, 1.0 - h.beta1);
    let abs: Vec<T> = g
        .iter()
        .map(|&x| {
            if x.is_nan() {
                x
            } else if x < T::ZERO {
                -x
            } else {
                x + T::ZERO
            }
        })
        .collect();
    *u = maximum(&mul_scalar(u, t(h.beta2)), &add_scalar(&abs, t(h.eps)));
    let clr = h.lr / (1.0 - h.beta1.powf(f64::from(s.step)));
    s.p = addcdiv(&s.p, m, u, t(-clr));
}

/// NAdam's float32 `mu_product` after `steps` steps (the parity tests check it against torch).
fn nadam_mu_product(h: &NAdamHyper, steps: f32) -> f64 {
    let mut product = 1.0;
    for s in 1..=steps as u32 {
        product = h.mu_product_after(f64::from(s), product, false);
    }
    product
}

fn ref_nadam<T: Float>(h: &NAdamHyper, s: &mut State<T>, grad: &[T]) {
    let mut g = if h.maximize { neg(grad) } else { grad.to_vec() };
    s.step += 1.0;
    let step = f64::from(s.step);
    let bias_correction2 = 1.0 - h.beta2.powf(step);
    if h.weight_decay != 0.0 {
        if h.decoupled {
            s.p = mul_scalar(&s.p, t(1.0 - h.lr * h.weight_decay));
        } else {
            g = add_alpha(&g, &s.p, t(h.weight_decay));
        }
    }
    let mu = h.mu(step);
    let mu_next = h.mu(step + 1.0);
    let mu_product = nadam_mu_product(h, s.step);
    let [m, v, _] = &mut s.bufs;
    let (m, v) = (m.as_mut().unwrap(), v.as_mut().unwrap());
    *m = lerp(m, &g, 1.0 - h.beta1);
    *v = addcmul(&mul_scalar(v, t(h.beta2)), &g, &g, t(1.0 - h.beta2));
    let denom = add_scalar(&sqrt(&div_scalar(v, t(bias_correction2))), t(h.eps));
    let value = -h.lr * (1.0 - mu) / (1.0 - mu_product);
    s.p = addcdiv(&s.p, &g, &denom, t(value));
    let value = (-h.lr * mu_next) / (1.0 - mu_product * mu_next);
    s.p = addcdiv(&s.p, m, &denom, t(value));
}

/// ASGD's float32 `eta` and `mu` before step `step` (1 on the first): the values the steps
/// before it stored (the parity tests check them against torch).
#[allow(clippy::cast_possible_truncation)]
fn asgd_eta_mu(h: &AsgdHyper, step: f32) -> (f64, f64) {
    if step <= 1.0 {
        (f64::from(h.lr as f32), 1.0)
    } else {
        let before = f64::from(step) - 1.0;
        (h.eta_after(before), h.mu_after(before))
    }
}

fn ref_asgd<T: Float>(h: &AsgdHyper, s: &mut State<T>, grad: &[T]) {
    let mut g = if h.maximize { neg(grad) } else { grad.to_vec() };
    s.step += 1.0;
    let (eta, mu) = asgd_eta_mu(h, s.step);
    if h.weight_decay != 0.0 {
        g = add_alpha(&g, &s.p, t(h.weight_decay));
    }
    s.p = mul_scalar(&s.p, t(1.0 - h.lambd * eta));
    s.p = add_alpha(&s.p, &g, t(-eta));
    let ax = s.bufs[0].as_mut().unwrap();
    if mu == 1.0 {
        ax.clone_from(&s.p);
    } else {
        let diff: Vec<T> = s.p.iter().zip(ax.iter()).map(|(&p, &a)| p - a).collect();
        *ax = add_alpha(ax, &mul_scalar(&diff, t(mu)), T::ONE);
    }
}

// ---- the harness ------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Case {
    Sgd(SgdHyper),
    Adam(AdamHyper),
    RmsProp(RmsPropHyper),
    Adagrad(AdagradHyper),
    Adadelta(AdadeltaHyper),
    /// With the step count it starts from (as a loaded state's): RAdam is rectified from
    /// step 6 on, past `STEPS` from a fresh state.
    RAdam(RAdamHyper, f32),
    Lion(LionHyper),
    Rprop(RpropHyper),
    Adamax(AdamaxHyper),
    NAdam(NAdamHyper),
    Asgd(AsgdHyper),
}

impl Case {
    fn needs(&self) -> [bool; 3] {
        match self {
            Case::Sgd(h) => [h.momentum != 0.0, false, false],
            Case::Adam(h) => [true, true, h.amsgrad],
            Case::RmsProp(h) => [true, h.momentum > 0.0, h.centered],
            Case::Adagrad(_) | Case::Lion(_) | Case::Asgd(_) => [true, false, false],
            Case::Adadelta(_)
            | Case::RAdam(..)
            | Case::Rprop(_)
            | Case::Adamax(_)
            | Case::NAdam(_) => [true, true, false],
        }
    }

    /// The step count a case's state starts from.
    fn first_step(&self) -> f32 {
        match self {
            Case::RAdam(_, step) => *step,
            _ => 0.0,
        }
    }

    /// The per-step scalars of this case's next step, counting it in `step` where the rule
    /// counts steps.
    fn rule<T: Float>(&self, step: &mut f32, fresh: bool) -> Rule<T> {
        let mut count = || {
            *step += 1.0;
            f64::from(*step)
        };
        match self {
            Case::Sgd(h) => Rule::Sgd(SgdScalars::new(h, fresh)),
            Case::Adam(h) => Rule::Adam(AdamScalars::new(h, count())),
            Case::RmsProp(h) => {
                count();
                Rule::RmsProp(RmsPropScalars::new(h))
            }
            Case::Adagrad(h) => Rule::Adagrad(AdagradScalars::new(h, count())),
            Case::Adadelta(h) => {
                count();
                Rule::Adadelta(AdadeltaScalars::new(h))
            }
            Case::RAdam(h, _) => Rule::RAdam(RAdamScalars::new(h, count())),
            Case::Lion(h) => Rule::Lion(LionScalars::new(h)),
            Case::Rprop(h) => {
                count();
                Rule::Rprop(RpropScalars::new(h))
            }
            Case::Adamax(h) => Rule::Adamax(AdamaxScalars::new(h, count())),
            Case::NAdam(h) => {
                let now = count();
                let mu_product = nadam_mu_product(h, *step);
                Rule::NAdam(NAdamScalars::new(h, now, mu_product))
            }
            Case::Asgd(h) => {
                count();
                let (eta, mu) = asgd_eta_mu(h, *step);
                Rule::Asgd(AsgdScalars::new(h, eta, mu))
            }
        }
    }

    /// What buffer `i` starts as (Rprop's `step_size`: the learning rate).
    fn fill(&self, i: usize) -> f64 {
        match self {
            Case::Rprop(h) if i == 1 => h.lr,
            _ => 0.0,
        }
    }

    /// One reference step on stored values: load into the compute type, run torch's op
    /// sequence there, round once when storing (how fused reduced-precision steps work).
    fn reference<S: Storage>(&self, s: &mut State<S>, grad: &[S]) {
        let load = |v: &[S]| v.iter().map(|x| x.load()).collect::<Vec<_>>();
        let store = |v: &[S::Compute]| v.iter().map(|&x| S::store(x)).collect::<Vec<_>>();
        let mut c = State {
            p: load(&s.p),
            bufs: [0, 1, 2].map(|i| s.bufs[i].as_deref().map(load)),
            step: s.step,
        };
        self.reference_compute(&mut c, &load(grad));
        s.p = store(&c.p);
        s.bufs = [0, 1, 2].map(|i| c.bufs[i].as_deref().map(store));
        s.step = c.step;
    }

    fn reference_compute<T: Float>(&self, s: &mut State<T>, grad: &[T]) {
        match self {
            Case::Sgd(h) => ref_sgd(h, s, grad),
            Case::Adam(h) => ref_adam(h, s, grad),
            Case::RmsProp(h) => ref_rmsprop(h, s, grad),
            Case::Adagrad(h) => ref_adagrad(h, s, grad),
            Case::Adadelta(h) => ref_adadelta(h, s, grad),
            Case::RAdam(h, _) => ref_radam(h, s, grad),
            Case::Lion(h) => ref_lion(h, s, grad),
            Case::Rprop(h) => ref_rprop(h, s, grad),
            Case::Adamax(h) => ref_adamax(h, s, grad),
            Case::NAdam(h) => ref_nadam(h, s, grad),
            Case::Asgd(h) => ref_asgd(h, s, grad),
        }
    }

    /// The fused kernel, at `level`, cut into `chunk`-element pieces.
    fn fused<S: Element>(&self, s: &mut State<S>, grad: &[S], level: SimdLevel, chunk: usize) {
        self.fused_rounded(s, grad, level, chunk, super::lanes::Rounding::Nearest);
    }

    /// [`Case::fused`] with the parameter written as `rounding` says.
    fn fused_rounded<S: Element>(
        &self,
        s: &mut State<S>,
        grad: &[S],
        level: SimdLevel,
        chunk: usize,
        rounding: super::lanes::Rounding<'_, S::Compute>,
    ) {
        let fresh = s.bufs[0].is_none();
        let n = s.p.len();
        let needs = self.needs();
        for (i, (b, need)) in s.bufs.iter_mut().zip(needs).enumerate() {
            if need && b.is_none() {
                *b = Some(vec![S::store(t(self.fill(i))); n]);
            }
        }
        let rule = self.rule(&mut s.step, fresh);
        let [b0, b1, b2] = &mut s.bufs;
        let slices = Slices {
            param: &mut s.p,
            grad,
            bufs: [b0.as_deref_mut(), b1.as_deref_mut(), b2.as_deref_mut()],
            rounding,
        };
        for piece in slices.chunks(chunk) {
            apply(level, &rule, piece);
        }
    }
}

#[allow(clippy::too_many_lines)] // one flat table reads better than several
fn cases() -> Vec<Case> {
    let sgd = SgdHyper::default();
    let adam = AdamHyper::default();
    let rms = RmsPropHyper::default();
    let ada = AdagradHyper::default();
    let delta = AdadeltaHyper::default();
    let radam = RAdamHyper::default();
    let lion = LionHyper::default();
    let rprop = RpropHyper::default();
    vec![
        Case::Sgd(sgd),
        Case::Sgd(SgdHyper {
            lr: 1e-2,
            weight_decay: 0.5,
            ..sgd
        }),
        Case::Sgd(SgdHyper {
            momentum: 0.9,
            ..sgd
        }),
        Case::Sgd(SgdHyper {
            weight_decay: 0.1,
            maximize: true,
            ..sgd
        }),
        Case::Sgd(SgdHyper {
            momentum: 0.9,
            dampening: 0.5,
            ..sgd
        }),
        Case::Sgd(SgdHyper {
            momentum: 0.9,
            weight_decay: 0.1,
            ..sgd
        }),
        Case::Sgd(SgdHyper {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.1,
            ..sgd
        }),
        Case::Sgd(SgdHyper {
            momentum: 0.9,
            nesterov: true,
            maximize: true,
            ..sgd
        }),
        Case::Adam(adam),
        Case::Adam(AdamHyper { lr: 0.01, ..adam }),
        Case::Adam(AdamHyper {
            weight_decay: 0.1,
            ..adam
        }),
        Case::Adam(AdamHyper {
            weight_decay: 0.1,
            maximize: true,
            ..adam
        }),
        Case::Adam(AdamHyper {
            weight_decay: 0.1,
            amsgrad: true,
            ..adam
        }),
        Case::Adam(AdamHyper {
            weight_decay: 0.1,
            decoupled: true,
            ..adam
        }),
        Case::Adam(AdamHyper {
            weight_decay: 0.1,
            decoupled: true,
            amsgrad: true,
            maximize: true,
            ..adam
        }),
        // beta1 > 0.5 makes lerp's weight 1 - beta1 small; beta1 < 0.5 takes the other branch
        Case::Adam(AdamHyper {
            beta1: 0.3,
            beta2: 0.5,
            ..adam
        }),
        Case::RmsProp(rms),
        Case::RmsProp(RmsPropHyper { lr: 1e-3, ..rms }),
        Case::RmsProp(RmsPropHyper {
            weight_decay: 0.1,
            ..rms
        }),
        Case::RmsProp(RmsPropHyper {
            maximize: true,
            weight_decay: 0.1,
            ..rms
        }),
        Case::RmsProp(RmsPropHyper {
            weight_decay: 0.1,
            centered: true,
            ..rms
        }),
        Case::RmsProp(RmsPropHyper {
            weight_decay: 0.1,
            centered: true,
            momentum: 0.1,
            ..rms
        }),
        Case::RmsProp(RmsPropHyper {
            weight_decay: 0.1,
            centered: true,
            momentum: 0.1,
            maximize: true,
            ..rms
        }),
        Case::RmsProp(RmsPropHyper {
            momentum: 0.9,
            ..rms
        }),
        Case::RmsProp(RmsPropHyper {
            alpha: 0.0,
            centered: true,
            ..rms
        }),
        Case::Adagrad(ada),
        Case::Adagrad(AdagradHyper {
            weight_decay: 0.1,
            ..ada
        }),
        Case::Adagrad(AdagradHyper {
            weight_decay: 0.1,
            maximize: true,
            ..ada
        }),
        Case::Adagrad(AdagradHyper { lr: 0.1, ..ada }),
        Case::Adagrad(AdagradHyper {
            lr: 0.1,
            lr_decay: 0.5,
            weight_decay: 0.1,
            ..ada
        }),
        // 30..
        Case::Adadelta(delta),
        Case::Adadelta(AdadeltaHyper {
            weight_decay: 0.1,
            maximize: true,
            ..delta
        }),
        Case::Adadelta(AdadeltaHyper {
            rho: 0.95,
            weight_decay: 0.9,
            lr: 0.01,
            ..delta
        }),
        // 33.. RAdam: default betas are rectified from step 6 on (rho_t > 5): from a fresh
        // state the plain branch only; from a count of 3 or 4, both (Miri's two steps from 4:
        // step 5 plain, step 6 rectified)
        Case::RAdam(radam, 0.0),
        Case::RAdam(
            RAdamHyper {
                weight_decay: 0.1,
                maximize: true,
                ..radam
            },
            4.0,
        ),
        // beta1 < 0.5 takes lerp's other branch
        Case::RAdam(
            RAdamHyper {
                beta1: 0.3,
                beta2: 0.9,
                weight_decay: 0.1,
                decoupled: true,
                ..radam
            },
            3.0,
        ),
        // 36.. Lion
        Case::Lion(lion),
        Case::Lion(LionHyper {
            weight_decay: 0.5,
            maximize: true,
            beta1: 0.5,
            lr: 0.1,
            ..lion
        }),
        // 38.. Rprop
        Case::Rprop(rprop),
        Case::Rprop(RpropHyper {
            maximize: true,
            etaminus: 0.3,
            etaplus: 1.5,
            ..rprop
        }),
        // the clamp bites at both ends
        Case::Rprop(RpropHyper {
            lr: 0.1,
            etaminus: 0.2,
            etaplus: 3.0,
            step_size_min: 0.05,
            step_size_max: 0.5,
            ..rprop
        }),
        // etas a scheduler may set: etaplus < 0 (torch's next assignment turns it into
        // etaminus), etaminus = 1 (the zero class's 1 then zeroes the gradient too)
        Case::Rprop(RpropHyper {
            etaminus: 1.0,
            etaplus: -2.0,
            ..rprop
        }),
        // 42.. Adamax, 45.. NAdam, 48.. ASGD
        Case::Adamax(AdamaxHyper::default()),
        Case::Adamax(AdamaxHyper {
            weight_decay: 0.1,
            maximize: true,
            ..AdamaxHyper::default()
        }),
        Case::Adamax(AdamaxHyper {
            beta1: 0.3,
            beta2: 0.5,
            eps: 0.0,
            ..AdamaxHyper::default()
        }),
        Case::NAdam(NAdamHyper::default()),
        Case::NAdam(NAdamHyper {
            weight_decay: 0.1,
            maximize: true,
            ..NAdamHyper::default()
        }),
        Case::NAdam(NAdamHyper {
            lr: 0.01,
            weight_decay: 0.1,
            decoupled: true,
            momentum_decay: 0.1,
            beta1: 0.3,
            beta2: 0.5,
            ..NAdamHyper::default()
        }),
        Case::Asgd(AsgdHyper::default()),
        Case::Asgd(AsgdHyper {
            lr: 0.05,
            t0: 1.0,
            weight_decay: 0.1,
            maximize: true,
            ..AsgdHyper::default()
        }),
        Case::Asgd(AsgdHyper {
            lr: 0.1,
            lambd: 0.5,
            alpha: 0.5,
            t0: 0.0,
            ..AsgdHyper::default()
        }),
    ]
}

fn bits<S: Storage>(v: &[S]) -> Vec<u64> {
    // NaN payloads may differ between a negation and a multiply; compare NaN as one value.
    v.iter()
        .map(|x| x.load())
        .map(|x| {
            if x.is_nan() {
                u64::MAX
            } else {
                x.to_f64().to_bits()
            }
        })
        .collect()
}

fn stored<S: Storage>(v: Vec<S::Compute>) -> Vec<S> {
    v.into_iter().map(S::store).collect()
}

/// Miri cannot run F16C's float32 to float16 conversion (`llvm.x86.vcvtps2ph`), the store of
/// float16's vector lanes: under Miri, float16 runs at the baseline level only.
pub(crate) fn miri_can_run<S: 'static>(level: SimdLevel) -> bool {
    !cfg!(miri)
        || level == SimdLevel::Baseline
        || std::any::TypeId::of::<S>() != std::any::TypeId::of::<half::f16>()
}

fn check<S: Element + 'static>(specials: bool) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let cases = cases().into_iter().enumerate();
    for (_, case) in cases.filter(|(i, _)| !cfg!(miri) || MIRI_CASES.contains(i)) {
        for &n in LENGTHS {
            let init: Vec<S> = stored(rng.values(n, false));
            let grads: Vec<Vec<S>> = (0..STEPS)
                .map(|_| stored(rng.values(n, specials)))
                .collect();
            let mut want = State {
                p: init.clone(),
                bufs: [None, None, None],
                step: case.first_step(),
            };
            for (i, need) in case.needs().into_iter().enumerate() {
                // SGD's buffer starts absent (first step copies the gradient); others at zero.
                if need && !matches!(case, Case::Sgd(_)) {
                    want.bufs[i] = Some(vec![S::store(t(case.fill(i))); n]);
                }
            }
            for g in &grads {
                case.reference(&mut want, g);
            }
            let levels = SimdLevel::ALL.into_iter().filter(|l| l.supported());
            for level in levels.filter(|&l| miri_can_run::<S>(l)) {
                for &chunk in CHUNKS {
                    let mut got = State {
                        p: init.clone(),
                        bufs: [None, None, None],
                        step: case.first_step(),
                    };
                    for g in &grads {
                        case.fused(&mut got, g, level, chunk);
                    }
                    let ctx = format!("{case:?} n={n} level={level:?} chunk={chunk}");
                    assert_eq!(bits(&got.p), bits(&want.p), "param differs: {ctx}");
                    for (a, b) in got.bufs.iter().zip(&want.bufs) {
                        assert_eq!(
                            a.as_deref().map(bits),
                            b.as_deref().map(bits),
                            "state differs: {ctx}"
                        );
                    }
                    assert_eq!(got.step, want.step, "{ctx}");
                }
            }
        }
    }
}

#[test]
fn kernels_match_reference_f32() {
    check::<f32>(false);
}

#[test]
fn kernels_match_reference_f64() {
    check::<f64>(false);
}

#[test]
#[cfg_attr(
    miri,
    ignore = "the f32 loops again, with other values (the 16-bit ones run these)"
)]
fn non_finite_gradients_propagate_as_reference_f32() {
    check::<f32>(true);
}

#[test]
#[cfg_attr(miri, ignore = "the f64 loops again, with other values")]
fn non_finite_gradients_propagate_as_reference_f64() {
    check::<f64>(true);
}

/// Every rule over denormal parameters and gradients (scaled by `tiny`) with flush-to-zero on
/// (`crate::fpenv`, FTZ and DAZ on x86-64, FPCR.FZ on aarch64): the same bits at every level,
/// since the flushing acts alike on scalar and vector instructions. Returns whether any case's
/// bits differ from the same steps without flushing (they must, somewhere, or nothing was
/// flushed).
fn flushed_steps_agree<S: Element + 'static>(tiny: f64) -> bool {
    let mut rng = Rng(0x5DEE_CE66);
    let n = 67; // whole vectors of every width, and a tail
    let scaled = |rng: &mut Rng| -> Vec<S> {
        let v: Vec<S::Compute> = rng.values(n, false);
        stored(v.into_iter().map(|x| x * t(tiny)).collect())
    };
    let mut any_flushed = false;
    for case in cases() {
        let init = scaled(&mut rng);
        let grads: Vec<Vec<S>> = (0..STEPS).map(|_| scaled(&mut rng)).collect();
        let run = |level: SimdLevel, flush: bool| {
            let mut s = State {
                p: init.clone(),
                bufs: [None, None, None],
                step: case.first_step(),
            };
            let _guard = crate::fpenv::FlushGuard::new(flush);
            for g in &grads {
                case.fused(&mut s, g, level, 1 << 14);
            }
            let mut all = bits(&s.p);
            for b in s.bufs.iter().flatten() {
                all.extend(bits(b));
            }
            all
        };
        let want = run(SimdLevel::Baseline, true);
        for level in SimdLevel::ALL.into_iter().filter(|l| l.supported()) {
            assert_eq!(run(level, true), want, "{case:?} level={level:?}");
        }
        any_flushed |= run(SimdLevel::Baseline, false) != want;
    }
    any_flushed
}

#[test]
#[cfg_attr(miri, ignore = "Miri cannot run the guard's inline assembly")]
fn flushed_steps_agree_at_every_level() {
    if !crate::fpenv::FlushGuard::supported() {
        return; // the option is refused on this platform (see `FlushGuard::supported`)
    }
    assert!(flushed_steps_agree::<f32>(1e-39));
    assert!(flushed_steps_agree::<f64>(1e-309));
    assert!(flushed_steps_agree::<half::bf16>(1e-39));
    // float16 values are never float32 denormals, but their steps' intermediates can be.
    flushed_steps_agree::<half::f16>(1e-7);
}

/// Centered RMSprop's first step on a gradient whose `grad_avg` squared overflows (3e38 in
/// float32, 1e300 in float64), at every level and length: torch's fused addcmul keeps
/// `square_avg`'s infinity (`inf - 9e72` is `inf`), `sqrt(inf)` makes the step `g / inf = 0`,
/// and torch.optim.RMSprop(centered=True) gives the parameter back unchanged, with and without
/// momentum (measured, torch 2.15). A rounded product gives `inf - inf`, NaN.
fn centered_huge_gradient<T: Element<Compute = T> + Float>(huge: f64) {
    let start = [1.0, -0.5, 0.0, 3.0];
    for momentum in [0.0, 0.9] {
        let case = Case::RmsProp(RmsPropHyper {
            centered: true,
            momentum,
            ..RmsPropHyper::default()
        });
        for &n in LENGTHS {
            let p0: Vec<T> = (0..n).map(|i| t(start[i % start.len()])).collect();
            let grad = vec![t::<T>(huge); n];
            let mut want = State {
                p: p0.clone(),
                bufs: [Some(vec![T::ZERO; n]), None, Some(vec![T::ZERO; n])],
                step: 0.0,
            };
            if momentum > 0.0 {
                want.bufs[1] = Some(vec![T::ZERO; n]);
            }
            case.reference(&mut want, &grad);
            assert_eq!(bits(&want.p), bits(&p0), "reference: {case:?} n={n}");
            for level in SimdLevel::ALL.into_iter().filter(|l| l.supported()) {
                let ctx = format!("{case:?} n={n} level={level:?}");
                let mut got = State {
                    p: p0.clone(),
                    bufs: [None, None, None],
                    step: 0.0,
                };
                case.fused(&mut got, &grad, level, 1 << 14);
                assert_eq!(bits(&got.p), bits(&p0), "parameter changed: {ctx}");
                let [sq, buf, ga] = &got.bufs;
                assert!(sq
                    .as_ref()
                    .unwrap()
                    .iter()
                    .all(|x| x.to_f64() == f64::INFINITY));
                assert!(ga.as_ref().unwrap().iter().all(|x| x.is_finite()), "{ctx}");
                if let Some(buf) = buf {
                    assert!(buf.iter().all(|x| x.to_f64() == 0.0), "{ctx}");
                }
                for (a, b) in got.bufs.iter().zip(&want.bufs) {
                    assert_eq!(a.as_deref().map(bits), b.as_deref().map(bits), "{ctx}");
                }
            }
        }
    }
}

#[test]
fn centered_rmsprop_huge_gradient_leaves_param_as_torch_f32() {
    centered_huge_gradient::<f32>(3e38);
}

#[test]
fn centered_rmsprop_huge_gradient_leaves_param_as_torch_f64() {
    centered_huge_gradient::<f64>(1e300);
}

#[test]
fn kernels_match_reference_bf16() {
    if !cfg!(miri) {
        check::<half::bf16>(false);
    }
    check::<half::bf16>(true);
}

#[test]
fn kernels_match_reference_f16() {
    if !cfg!(miri) {
        check::<half::f16>(false);
    }
    check::<half::f16>(true);
}

/// The high 16 bits of the float32 inputs the conversion tests try: all of them, or under Miri
/// the telling ones (zeros, subnormals, the largest finite bfloat16 and float16
/// neighbourhoods, infinities, NaNs, both signs) and then every 251st.
fn high_halves() -> Vec<u32> {
    if cfg!(miri) {
        let telling = [
            0x0000, 0x0001, 0x0080, 0x3380, 0x3880, 0x3F80, 0x477F, 0x4780, 0x7F7F, 0x7F80, 0x7FC0,
            0x7FFF, 0x8000, 0x8001, 0xBF80, 0xFF80, 0xFFC0, 0xFFFF,
        ];
        telling
            .into_iter()
            .chain((0..=u32::from(u16::MAX)).step_by(251))
            .collect()
    } else {
        (0..=u32::from(u16::MAX)).collect()
    }
}

#[test]
fn bfloat16_conversion_matches_half_on_every_bit_pattern_class() {
    // Every float32 whose low 16 bits take a few telling values, across all high halves:
    // ties, just above and below ties, NaN payloads, infinities, subnormals, overflow.
    for high in high_halves() {
        for low in [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
            let x = f32::from_bits((high << 16) | low);
            let ours = <half::bf16 as Storage>::store(x);
            let theirs = half::bf16::from_f32(x);
            assert_eq!(
                ours.to_bits(),
                theirs.to_bits(),
                "{x:e} ({:#010x})",
                x.to_bits()
            );
            assert_eq!(
                <half::bf16 as Storage>::load(ours).to_bits(),
                ours.to_f32().to_bits()
            );
        }
    }
}

#[test]
#[cfg_attr(
    miri,
    ignore = "2^32 conversions in safe scalar code; Miri runs the vector ones"
)]
fn float16_conversions_match_half_on_every_bit_pattern() {
    use rayon::prelude::*;
    // All 2^32 float32 values (split over threads by their high half), and all 2^16 float16.
    (0..=u32::from(u16::MAX)).into_par_iter().for_each(|high| {
        for low in 0..=u32::from(u16::MAX) {
            let x = f32::from_bits((high << 16) | low);
            let ours = <half::f16 as Storage>::store(x).to_bits();
            let theirs = half::f16::from_f32(x).to_bits();
            assert_eq!(ours, theirs, "{x:e} ({:#010x})", x.to_bits());
        }
    });
    for bits in 0..=u16::MAX {
        let h = half::f16::from_bits(bits);
        assert_eq!(
            <half::f16 as Storage>::load(h).to_bits(),
            h.to_f32().to_bits(),
            "{bits:#06x}"
        );
    }
}

/// Loads `src` as `A` and stores it into `out` as `B`, `W` elements at a time, with `L`'s vector
/// conversions (`A` and `B` share `L`'s vector type); the lengths are multiples of `W`.
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
#[inline(always)]
unsafe fn through_lanes<A, B, L>(src: &[A], out: &mut [B])
where
    A: Storage,
    B: Storage,
    L: super::lanes::Lanes<A> + super::lanes::Lanes<B, V = <L as super::lanes::Lanes<A>>::V>,
{
    let w = <L as super::lanes::Lanes<A>>::W;
    for (x, o) in src.chunks_exact(w).zip(out.chunks_exact_mut(w)) {
        unsafe {
            let v = <L as super::lanes::Lanes<A>>::load(x.as_ptr());
            <L as super::lanes::Lanes<B>>::store(o.as_mut_ptr(), v);
        }
    }
}

/// A vector type's 16-bit conversions against the scalar ones, on every input.
///
/// # Safety
/// The caller is compiled with `L`'s instructions enabled and the CPU has them.
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
#[inline(always)]
unsafe fn conversions_agree<S: Storage<Compute = f32>, L>()
where
    L: super::lanes::Lanes<S> + super::lanes::Lanes<f32, V = <L as super::lanes::Lanes<S>>::V>,
{
    use rayon::prelude::*;
    let bits16 = |s: S| -> u16 {
        // SAFETY: both storage types are 16-bit patterns.
        unsafe { std::mem::transmute_copy(&s) }
    };
    // Narrowing: all 2^32 float32 values, in blocks of 2^16 (split over threads). Under Miri,
    // 64 low halves (a multiple of every W): float16's and bfloat16's ties and their
    // neighbours, then a spread.
    let lows: Vec<u32> = if cfg!(miri) {
        let telling = [
            0, 1, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001,
        ];
        let spread = (1..).map(|k| k * 1193 % 0x1_0000);
        telling.into_iter().chain(spread).take(64).collect()
    } else {
        (0..=u32::from(u16::MAX)).collect()
    };
    let narrow = |high: u32| {
        let xs: Vec<f32> = lows
            .iter()
            .map(|&low| f32::from_bits((high << 16) | low))
            .collect();
        let mut got = vec![S::store(0.0); xs.len()];
        // SAFETY: the caller checked that the CPU has L's instructions.
        unsafe { through_lanes::<f32, S, L>(&xs, &mut got) };
        for (x, g) in xs.iter().zip(&got) {
            assert_eq!(
                bits16(*g),
                bits16(S::store(*x)),
                "narrowing {x:e} ({:#010x})",
                x.to_bits()
            );
        }
    };
    if cfg!(miri) {
        // No thread pool under Miri: rayon's threads outlive the test.
        high_halves().into_iter().for_each(narrow);
    } else {
        high_halves().into_par_iter().for_each(narrow);
    }
    // Widening: all 2^16 patterns (under Miri the patterns of `high_halves`, cut to a multiple of
    // 64).
    let mut patterns = high_halves();
    patterns.truncate(patterns.len() / 64 * 64);
    // SAFETY: S is a 16-bit pattern type (bf16 or f16).
    let hs: Vec<S> = patterns
        .into_iter()
        .map(|b| unsafe { std::mem::transmute_copy(&(b as u16)) })
        .collect();
    let mut got = vec![0.0f32; hs.len()];
    // SAFETY: as above.
    unsafe { through_lanes::<S, f32, L>(&hs, &mut got) };
    for (h, g) in hs.iter().zip(&got) {
        assert_eq!(
            g.to_bits(),
            h.load().to_bits(),
            "widening {:#06x}",
            bits16(*h)
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn avx2_conversions_agree() {
    unsafe {
        if !cfg!(miri) {
            // See `miri_can_run`.
            conversions_agree::<half::f16, super::x86::Avx2>();
        }
        conversions_agree::<half::bf16, super::x86::Avx2Pairs>();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,f16c")]
unsafe fn avx512_conversions_agree() {
    unsafe {
        if !cfg!(miri) {
            conversions_agree::<half::f16, super::x86::Avx512>();
        }
        conversions_agree::<half::bf16, super::x86::Avx512Pairs>();
    }
}

#[test]
fn vector_16_bit_conversions_match_the_scalar_ones_on_every_input() {
    #[cfg(target_arch = "x86_64")]
    {
        if SimdLevel::Avx2.supported() {
            // SAFETY: AVX2 and F16C are there (the AVX2 level asks for both).
            unsafe { avx2_conversions_agree() };
        }
        if SimdLevel::Avx512.supported() {
            // SAFETY: AVX-512F, AVX2 and F16C are there (the AVX-512 level asks for them).
            unsafe { avx512_conversions_agree() };
        }
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    // SAFETY: NEON is baseline on aarch64 (float16 through `fcvtl`/`fcvtn`, bfloat16 through
    // integer rounding).
    unsafe {
        conversions_agree::<half::f16, super::neon::Neon>();
        conversions_agree::<half::bf16, super::neon::Neon>();
    }
}

#[test]
fn reduced_precision_rounds_to_nearest_even() {
    use half::{bf16, f16};
    // 1 + 2^-8 lies halfway between two bfloat16 values: ties go to the even one (1.0).
    assert_eq!(bf16::store(1.0 + 2f32.powi(-8)).to_bits(), 0x3F80);
    assert_eq!(bf16::store(1.0 + 3.0 * 2f32.powi(-8)).to_bits(), 0x3F82);
    assert!(bf16::store(f32::NAN).load().is_nan());
    assert_eq!(f16::store(65520.0).load(), f32::INFINITY);
    assert_eq!(f16::store(2f32.powi(-24)).to_bits(), 1); // smallest subnormal
    assert_eq!(f16::store(2f32.powi(-25)).to_bits(), 0); // halfway to zero: even
}

#[test]
fn baseline_and_best_level_agree_on_a_long_array() {
    // 1_000_003 elements: every vector width with a remainder (under Miri 259, in chunks of 64
    // rather than of CHUNK_ELEMS).
    let (n, chunk) = if cfg!(miri) {
        (259, 64)
    } else {
        (1_000_003, crate::engine::CHUNK_ELEMS)
    };
    let mut rng = Rng(7);
    let init: Vec<f32> = rng.values(n, false);
    let grad: Vec<f32> = rng.values(n, true);
    let case = Case::Adam(AdamHyper {
        weight_decay: 0.1,
        amsgrad: true,
        ..AdamHyper::default()
    });
    let run = |level| {
        let mut s = State {
            p: init.clone(),
            bufs: [None, None, None],
            step: 0.0,
        };
        for _ in 0..3 {
            case.fused(&mut s, &grad, level, chunk);
        }
        bits(&s.p)
    };
    assert_eq!(run(SimdLevel::Baseline), run(SimdLevel::detect()));
}

#[test]
fn simd_level_names_round_trip() {
    for level in SimdLevel::ALL {
        assert_eq!(SimdLevel::parse(level.name()), Some(level));
    }
    assert_eq!(SimdLevel::parse("AVX2"), Some(SimdLevel::Avx2));
    assert_eq!(SimdLevel::parse("Neon"), Some(SimdLevel::Neon));
    assert_eq!(SimdLevel::parse("scalar"), Some(SimdLevel::Baseline));
    assert_eq!(SimdLevel::parse("sse4"), None);
}

#[test]
fn levels_of_another_architecture_clamp_to_this_ones_best() {
    let best = SimdLevel::detect();
    assert!(best.supported() && SimdLevel::Baseline.supported());
    for level in [
        SimdLevel::Baseline,
        SimdLevel::Avx2,
        SimdLevel::Avx512,
        SimdLevel::Neon,
    ] {
        let ours = SimdLevel::ALL.contains(&level);
        assert_eq!(level.supported(), ours && level <= best, "{level:?}");
        assert_eq!(
            level.clamped(),
            if level.supported() { level } else { best }
        );
        assert!(level.clamped().supported(), "{level:?}");
    }
    if cfg!(all(target_arch = "aarch64", target_feature = "neon")) {
        assert_eq!(best, SimdLevel::Neon);
        assert_eq!(SimdLevel::Avx512.clamped(), SimdLevel::Neon);
        assert_eq!(SimdLevel::Baseline.name(), "scalar");
    } else {
        assert!(!SimdLevel::Neon.supported());
    }
    if cfg!(target_arch = "x86_64") {
        assert_eq!(SimdLevel::Neon.clamped(), best);
        assert_eq!(SimdLevel::Baseline.name(), "sse2");
    }
}

#[test]
fn split_and_chunks_cover_every_element_once() {
    let mut p = vec![0.0f32; 10];
    let g = vec![0.0f32; 10];
    let mut b = vec![0.0f32; 10];
    let s = Slices {
        param: &mut p,
        grad: &g,
        bufs: [Some(&mut b), None, None],
        rounding: super::lanes::Rounding::Nearest,
    };
    let out: Vec<_> = s.chunks(4).collect();
    assert_eq!(
        out.iter().map(Slices::len).collect::<Vec<_>>(),
        vec![4, 4, 2]
    );
    assert!(out.iter().all(Slices::lengths_match));
}

// ---- bfloat16 state (`state_dtype`) -----------------------------------------------------------

/// A parameter stored as `S` with its state stored as bfloat16.
struct Mixed<S> {
    p: Vec<S>,
    bufs: [Option<Vec<half::bf16>>; 3],
    step: f32,
}

impl Case {
    /// One reference step with bfloat16 state: the parameter, gradient and state loaded into
    /// float32, torch's op sequence there, then the parameter rounded to `S` and the state to
    /// bfloat16, once each.
    fn reference_mixed<S: Storage<Compute = f32>>(&self, s: &mut Mixed<S>, grad: &[S]) {
        let load = |v: &[S]| v.iter().map(|x| x.load()).collect::<Vec<f32>>();
        let load_q = |v: &[half::bf16]| v.iter().map(|x| x.load()).collect::<Vec<f32>>();
        let mut c = State {
            p: load(&s.p),
            bufs: [0, 1, 2].map(|i| s.bufs[i].as_deref().map(load_q)),
            step: s.step,
        };
        self.reference_compute(&mut c, &load(grad));
        s.p = c.p.iter().map(|&x| S::store(x)).collect();
        s.bufs = [0, 1, 2].map(|i| {
            c.bufs[i]
                .as_deref()
                .map(|v| v.iter().map(|&x| half::bf16::store(x)).collect())
        });
        s.step = c.step;
    }

    /// The fused kernel over bfloat16 state, at `level`, cut into `chunk`-element pieces.
    fn fused_mixed<S>(&self, s: &mut Mixed<S>, grad: &[S], level: SimdLevel, chunk: usize)
    where
        S: Element<half::bf16> + Storage<Compute = f32>,
    {
        let fresh = s.bufs[0].is_none();
        let n = s.p.len();
        for (i, (b, need)) in s.bufs.iter_mut().zip(self.needs()).enumerate() {
            if need && b.is_none() {
                *b = Some(vec![half::bf16::store(f32::from_f64(self.fill(i))); n]);
            }
        }
        let rule = self.rule(&mut s.step, fresh);
        let [b0, b1, b2] = &mut s.bufs;
        let slices: Slices<'_, S, half::bf16> = Slices {
            param: &mut s.p,
            grad,
            bufs: [b0.as_deref_mut(), b1.as_deref_mut(), b2.as_deref_mut()],
            rounding: super::lanes::Rounding::Nearest,
        };
        for piece in slices.chunks(chunk) {
            apply(level, &rule, piece);
        }
    }
}

/// Every rule with bfloat16 state over parameters of `S`, at every level and chunking, against
/// the reference that computes in float32 and rounds the stored state to bfloat16 once.
fn check_bf16_state<S>(specials: bool)
where
    S: Element<half::bf16> + Storage<Compute = f32> + 'static,
{
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let cases = cases().into_iter().enumerate();
    for (_, case) in cases.filter(|(i, _)| !cfg!(miri) || MIRI_CASES.contains(i)) {
        for &n in LENGTHS {
            let init: Vec<S> = rng
                .values::<f32>(n, false)
                .into_iter()
                .map(S::store)
                .collect();
            let grads: Vec<Vec<S>> = (0..STEPS)
                .map(|_| {
                    rng.values::<f32>(n, specials)
                        .into_iter()
                        .map(S::store)
                        .collect()
                })
                .collect();
            let fresh = || Mixed {
                p: init.clone(),
                bufs: [None, None, None],
                step: 0.0,
            };
            let mut want = fresh();
            for (i, need) in case.needs().into_iter().enumerate() {
                if need && !matches!(case, Case::Sgd(_)) {
                    let fill = half::bf16::store(f32::from_f64(case.fill(i)));
                    want.bufs[i] = Some(vec![fill; n]);
                }
            }
            for g in &grads {
                case.reference_mixed(&mut want, g);
            }
            let levels = SimdLevel::ALL.into_iter().filter(|l| l.supported());
            for level in levels.filter(|&l| miri_can_run::<S>(l)) {
                for &chunk in CHUNKS {
                    let mut got = fresh();
                    for g in &grads {
                        case.fused_mixed(&mut got, g, level, chunk);
                    }
                    let ctx = format!("{case:?} n={n} level={level:?} chunk={chunk}");
                    assert_eq!(bits(&got.p), bits(&want.p), "param differs: {ctx}");
                    for (a, b) in got.bufs.iter().zip(&want.bufs) {
                        assert_eq!(
                            a.as_deref().map(bits),
                            b.as_deref().map(bits),
                            "state differs: {ctx}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bf16_state_matches_reference_f32_params() {
    check_bf16_state::<f32>(false);
    check_bf16_state::<f32>(true);
}

#[test]
fn bf16_state_matches_reference_f16_params() {
    check_bf16_state::<half::f16>(false);
    check_bf16_state::<half::f16>(true);
}

// ---- stochastic rounding and master weights ---------------------------------------------------

/// The stochastic rounding of `x` to bfloat16 with random bits `r`, written from its
/// definition: the neighbour below (toward zero) and above in magnitude, the upper one taken when
/// the 16 random bits are at least 2^16 minus the dropped bits (probability dropped / 2^16).
fn sr_reference(x: f32, r: u32) -> half::bf16 {
    if x.is_nan() {
        return half::bf16::from_bits(((x.to_bits() >> 16) | 0x40) as u16);
    }
    let below = x.to_bits() >> 16;
    let dropped = x.to_bits() & 0xFFFF;
    let up = (r >> 16) >= 0x1_0000 - dropped && dropped != 0;
    half::bf16::from_bits((if up { below + 1 } else { below }) as u16)
}

#[test]
fn bf16_stochastic_store_matches_its_definition() {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let mut specials: Vec<f32> = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        1.0,
        -1.0,
    ];
    let n = if cfg!(miri) { 200 } else { 100_000 };
    specials.extend((0..n).map(|_| f32::from_bits((rng.next_f64() * f64::from(u32::MAX)) as u32)));
    for (i, &x) in specials.iter().enumerate() {
        for r in [
            0,
            u32::MAX,
            0x8000_0000,
            super::sr::bits(super::sr::SrKey::new(7, 1, 0), i),
        ] {
            let got = half::bf16::store_sr(x, r);
            let want = sr_reference(x, r);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "x={x:e} ({:#x}) r={r:#x}",
                x.to_bits()
            );
            // Either neighbour: the truncation, or one bfloat16 step further from zero.
            let trunc = x.to_bits() >> 16;
            if !x.is_nan() {
                assert!(
                    u32::from(got.to_bits()) == trunc || u32::from(got.to_bits()) == trunc + 1,
                    "x={x:e}"
                );
            }
        }
    }
    // Infinity stays, an exact bfloat16 stays, the largest float32 may round to infinity.
    assert_eq!(
        half::bf16::store_sr(f32::INFINITY, u32::MAX).to_bits(),
        0x7F80
    );
    assert_eq!(half::bf16::store_sr(1.5, u32::MAX).to_bits(), 0x3FC0);
    assert_eq!(half::bf16::store_sr(f32::MAX, u32::MAX).to_bits(), 0x7F80);
    assert_eq!(half::bf16::store_sr(f32::MAX, 0).to_bits(), 0x7F7F);
}

#[test]
fn stochastic_rounding_goes_up_as_often_as_the_distance_says() {
    // 1 + k/8 of a bfloat16 step above 1.0: rounded up with probability k/8.
    let n = if cfg!(miri) { 512 } else { 1 << 16 };
    let ulp = f32::from_bits(0x3F81_0000) - 1.0;
    for k in 1..8u32 {
        let x = 1.0 + ulp * (k as f32) / 8.0;
        let key = super::sr::SrKey::new(42, u64::from(k), 3);
        let ups = (0..n)
            .filter(|&i| half::bf16::store_sr(x, super::sr::bits(key, i)).to_bits() == 0x3F81)
            .count();
        let p = f64::from(k) / 8.0;
        let mean = p * n as f64;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        // Five standard deviations: a fixed seed, so this either always passes or never does.
        assert!(
            (ups as f64 - mean).abs() < 5.0 * sd,
            "k={k}: {ups} of {n} rounded up, expected about {mean}"
        );
    }
}

#[test]
fn random_bits_depend_on_seed_step_parameter_and_index_only() {
    use super::sr::{bits, SrKey};
    let k = SrKey::new(1, 2, 3);
    // A slice starting 10 elements in sees the same bits as the whole parameter there.
    for i in 0..20 {
        assert_eq!(bits(k.advanced(10), i), bits(k, i + 10));
    }
    // Across 2^32, where the index's high half carries (the vector store counts in halves).
    let near = k.advanced((1usize << 32) - 40);
    let mut p = vec![half::bf16::from_f32(1.0); 80];
    let g = vec![half::bf16::from_f32(1e-3); 80];
    for level in SimdLevel::ALL.into_iter().filter(|l| l.supported()) {
        let want: Vec<u16> = (0..80)
            .map(|i| {
                let x = 1.0f32 - 0.1f32 * half::bf16::from_f32(1e-3).to_f32();
                sr_reference(x, bits(near, i)).to_bits()
            })
            .collect();
        p.fill(half::bf16::from_f32(1.0));
        let rule = Rule::Sgd(SgdScalars::new(
            &SgdHyper {
                lr: 0.1,
                ..SgdHyper::default()
            },
            false,
        ));
        let s = Slices {
            param: &mut p,
            grad: &g,
            bufs: [None, None, None],
            rounding: super::lanes::Rounding::Stochastic(near),
        };
        apply(level, &rule, s);
        assert_eq!(
            p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want,
            "{level:?}"
        );
    }
    let n = if cfg!(miri) { 64 } else { 4096 };
    let distinct = |k: SrKey| {
        let mut v: Vec<u32> = (0..n).map(|i| bits(k, i)).collect();
        v.sort_unstable();
        v.dedup();
        v.len()
    };
    assert_eq!(
        distinct(k),
        n,
        "an index's bits are a bijection for one key"
    );
    for other in [
        SrKey::new(0, 2, 3),
        SrKey::new(1, 3, 3),
        SrKey::new(1, 2, 4),
    ] {
        let same = (0..n).filter(|&i| bits(k, i) == bits(other, i)).count();
        assert!(same <= 2, "{other:?}: {same} of {n} equal");
    }
}

/// Every rule over bfloat16 parameters with stochastic rounding, at every level and chunking,
/// against the reference: the float32 step of the loaded values, its state rounded to nearest,
/// the parameter rounded by [`sr_reference`] with element i's bits.
#[test]
fn stochastic_rounding_kernels_match_reference_bf16() {
    type S = half::bf16;
    let mut rng = Rng(0x0051_7A7E);
    let cases = cases().into_iter().enumerate();
    for (_, case) in cases.filter(|(i, _)| !cfg!(miri) || MIRI_CASES.contains(i)) {
        for &n in LENGTHS {
            let init: Vec<S> = stored(rng.values(n, false));
            let grads: Vec<Vec<S>> = (0..STEPS).map(|_| stored(rng.values(n, true))).collect();
            let fresh = || State {
                p: init.clone(),
                bufs: [None, None, None],
                step: case.first_step(),
            };
            let key = |step: usize| super::sr::SrKey::new(0x00C0_FFEE, step as u64, 5);
            let mut want = fresh();
            for (i, need) in case.needs().into_iter().enumerate() {
                if need && !matches!(case, Case::Sgd(_)) {
                    want.bufs[i] = Some(vec![S::store(t(case.fill(i))); n]);
                }
            }
            for (step, g) in grads.iter().enumerate() {
                let load = |v: &[S]| v.iter().map(|x| x.load()).collect::<Vec<f32>>();
                let mut c = State {
                    p: load(&want.p),
                    bufs: [0, 1, 2].map(|i| want.bufs[i].as_deref().map(load)),
                    step: want.step,
                };
                case.reference_compute(&mut c, &load(g));
                want.p =
                    c.p.iter()
                        .enumerate()
                        .map(|(i, &x)| sr_reference(x, super::sr::bits(key(step), i)))
                        .collect();
                want.bufs =
                    [0, 1, 2].map(|i| c.bufs[i].as_deref().map(|v| stored::<S>(v.to_vec())));
                want.step = c.step;
            }
            let levels = SimdLevel::ALL.into_iter().filter(|l| l.supported());
            for level in levels {
                for &chunk in CHUNKS {
                    let mut got = fresh();
                    for (step, g) in grads.iter().enumerate() {
                        let r = super::lanes::Rounding::Stochastic(key(step));
                        case.fused_rounded(&mut got, g, level, chunk, r);
                    }
                    let ctx = format!("{case:?} n={n} level={level:?} chunk={chunk}");
                    assert_eq!(bits(&got.p), bits(&want.p), "param differs: {ctx}");
                    for (a, b) in got.bufs.iter().zip(&want.bufs) {
                        assert_eq!(
                            a.as_deref().map(bits),
                            b.as_deref().map(bits),
                            "state: {ctx}"
                        );
                    }
                }
            }
        }
    }
}

/// Every rule over 16-bit parameters with a float32 master copy, at every level and chunking,
/// against the reference: the float32 step of the master copy (state rounded to the
/// parameter's type), the parameter the master rounded to nearest.
fn check_master<S: Element + Storage<Compute = f32> + 'static>() {
    let mut rng = Rng(0x003A_57E2);
    let cases = cases().into_iter().enumerate();
    for (_, case) in cases.filter(|(i, _)| !cfg!(miri) || MIRI_CASES.contains(i)) {
        for &n in LENGTHS {
            let master0: Vec<f32> = rng.values(n, false);
            let grads: Vec<Vec<S>> = (0..STEPS).map(|_| stored(rng.values(n, true))).collect();
            let fresh = || State {
                p: stored::<S>(master0.clone()),
                bufs: [None, None, None],
                step: case.first_step(),
            };
            let mut want = fresh();
            let mut want_master = master0.clone();
            for (i, need) in case.needs().into_iter().enumerate() {
                if need && !matches!(case, Case::Sgd(_)) {
                    want.bufs[i] = Some(vec![S::store(t(case.fill(i))); n]);
                }
            }
            for g in &grads {
                let load = |v: &[S]| v.iter().map(|x| x.load()).collect::<Vec<f32>>();
                let mut c = State {
                    p: want_master.clone(),
                    bufs: [0, 1, 2].map(|i| want.bufs[i].as_deref().map(load)),
                    step: want.step,
                };
                case.reference_compute(&mut c, &load(g));
                want.p = stored(c.p.clone());
                want_master = c.p;
                want.bufs =
                    [0, 1, 2].map(|i| c.bufs[i].as_deref().map(|v| stored::<S>(v.to_vec())));
                want.step = c.step;
            }
            let levels = SimdLevel::ALL.into_iter().filter(|l| l.supported());
            for level in levels.filter(|&l| miri_can_run::<S>(l)) {
                for &chunk in CHUNKS {
                    let mut got = fresh();
                    let mut master = master0.clone();
                    for g in &grads {
                        let r = super::lanes::Rounding::Master(&mut master);
                        case.fused_rounded(&mut got, g, level, chunk, r);
                    }
                    let ctx = format!("{case:?} n={n} level={level:?} chunk={chunk}");
                    assert_eq!(bits(&master), bits(&want_master), "master differs: {ctx}");
                    assert_eq!(bits(&got.p), bits(&want.p), "param differs: {ctx}");
                    for (a, b) in got.bufs.iter().zip(&want.bufs) {
                        assert_eq!(
                            a.as_deref().map(bits),
                            b.as_deref().map(bits),
                            "state: {ctx}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn master_weights_kernels_match_reference_bf16() {
    check_master::<half::bf16>();
}

#[test]
fn master_weights_kernels_match_reference_f16() {
    check_master::<half::f16>();
}
