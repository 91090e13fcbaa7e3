//! Pure-Rust optimizer math over flat slices. Nothing in here knows about Python.
//!
//! Each update rule is written once, as the arithmetic of one element over a type that is either
//! a scalar or a SIMD vector (see [`lanes`] and the optimizer modules). [`simd`] runs it with
//! the vectors of the best instruction set the CPU has, picked at run time. The arithmetic uses
//! no approximate reciprocals and rounds every product, except for one correctly rounded fused
//! multiply-add that every level computes alike (`lanes::Arith::mul_add`, where torch fuses
//! too), so every SIMD level and every chunking of the work produces bitwise identical results.

pub mod adadelta;
pub mod adagrad;
pub mod adam;
pub mod adam8bit;
pub mod adamax;
pub mod asgd;
pub(crate) mod factor;
pub mod float;
pub mod lanes;
pub mod lion;
pub mod nadam;
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
pub(crate) mod neon;
pub mod radam;
pub mod rmsprop;
pub mod rprop;
pub mod sgd;
pub mod simd;
pub mod sr;
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
mod vector;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

pub use float::{Float, Storage};
use lanes::{ParamOut, Rounding, StateLanes};
pub use simd::SimdLevel;

/// The per-step scalars of one parameter: everything a kernel needs besides the slices.
#[derive(Clone, Copy, Debug)]
pub enum Rule<T> {
    Sgd(sgd::SgdScalars<T>),
    Adam(adam::AdamScalars<T>),
    RmsProp(rmsprop::RmsPropScalars<T>),
    Adagrad(adagrad::AdagradScalars<T>),
    Adadelta(adadelta::AdadeltaScalars<T>),
    RAdam(radam::RAdamScalars<T>),
    Lion(lion::LionScalars<T>),
    Rprop(rprop::RpropScalars<T>),
    Adamax(adamax::AdamaxScalars<T>),
    NAdam(nadam::NAdamScalars<T>),
    Asgd(asgd::AsgdScalars<T>),
}

/// The memory one parameter's update touches. `bufs` holds the state buffers in the order the
/// rule documents; buffers a rule does not use are `None`. The state is stored as `Q`: the
/// parameter's own type unless the group asks for another (`state_dtype`, bfloat16).
#[derive(Debug)]
pub struct Slices<'a, T: Storage, Q = T> {
    pub param: &'a mut [T],
    pub grad: &'a [T],
    pub bufs: [Option<&'a mut [Q]>; 3],
    /// How the parameter's new values are written (round to nearest, stochastically, or from
    /// a float32 master copy).
    pub rounding: Rounding<'a, T::Compute>,
}

impl<'a, T: Storage, Q> Slices<'a, T, Q> {
    /// The slices of one parameter, rounded to nearest.
    #[must_use]
    pub fn new(param: &'a mut [T], grad: &'a [T], bufs: [Option<&'a mut [Q]>; 3]) -> Self {
        Slices {
            param,
            grad,
            bufs,
            rounding: Rounding::Nearest,
        }
    }
}

impl<T: Storage, Q> Slices<'_, T, Q> {
    /// Number of elements of the parameter.
    #[must_use]
    pub fn len(&self) -> usize {
        self.param.len()
    }

    /// True when the parameter has no elements.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.param.is_empty()
    }

    /// Splits off the first `n` elements (of the parameter, gradient and every buffer).
    ///
    /// # Panics
    /// When `n` exceeds the length or a buffer is shorter than the parameter.
    #[must_use]
    pub fn split_at(self, n: usize) -> (Self, Self) {
        let (p0, p1) = self.param.split_at_mut(n);
        let (g0, g1) = self.grad.split_at(n);
        let [b0, b1, b2] = self.bufs.map(|b| b.map(|s| s.split_at_mut(n)));
        let (b0a, b0b) = unzip(b0);
        let (b1a, b1b) = unzip(b1);
        let (b2a, b2b) = unzip(b2);
        let (r0, r1) = self.rounding.split_at(n);
        (
            Slices {
                param: p0,
                grad: g0,
                bufs: [b0a, b1a, b2a],
                rounding: r0,
            },
            Slices {
                param: p1,
                grad: g1,
                bufs: [b0b, b1b, b2b],
                rounding: r1,
            },
        )
    }

    /// Cuts the update into pieces of at most `chunk` elements (the last may be shorter).
    /// Elementwise rules give the same bits whatever the cut.
    ///
    /// # Panics
    /// When `chunk` is 0.
    pub fn chunks(self, chunk: usize) -> impl Iterator<Item = Self> {
        assert!(chunk > 0, "chunk size must be positive");
        let mut rest = Some(self);
        std::iter::from_fn(move || {
            let s = rest.take()?;
            if s.len() > chunk {
                let (head, tail) = s.split_at(chunk);
                rest = Some(tail);
                Some(head)
            } else {
                Some(s)
            }
        })
    }

    /// True when every gradient element is finite (no NaN, no infinity).
    #[must_use]
    pub fn grad_is_finite(&self) -> bool {
        // A running AND the compiler vectorises, rather than an early exit it cannot.
        self.grad
            .iter()
            .fold(true, |ok, g| ok & g.load().is_finite())
    }

    /// Checks that the gradient and every buffer have the parameter's length.
    #[must_use]
    pub fn lengths_match(&self) -> bool {
        let n = self.param.len();
        self.grad.len() == n
            && self.bufs.iter().flatten().all(|b| b.len() == n)
            && self.rounding.len_matches(n)
    }
}

fn unzip<A, B>(x: Option<(A, B)>) -> (Option<A>, Option<B>) {
    match x {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    }
}

/// Applies `rule` to the slices, `L::W` elements at a time.
///
/// This is the body that [`simd::apply`] compiles once per instruction set; call that instead.
///
/// # Safety
/// The CPU has `L`'s instructions.
#[inline(always)]
pub(crate) unsafe fn apply_inline<S, Q, L>(rule: &Rule<S::Compute>, s: Slices<'_, S, Q>)
where
    S: Storage,
    Q: Storage<Compute = S::Compute>,
    L: StateLanes<S, Q>,
{
    debug_assert!(s.lengths_match());
    let Slices {
        param,
        grad,
        bufs: [b0, b1, b2],
        rounding,
    } = s;
    let param = ParamOut {
        values: param,
        rounding,
    };
    unsafe {
        match rule {
            Rule::Sgd(k) => sgd::update::<S, Q, L>(k, param, grad, b0),
            Rule::Adam(k) => {
                if let (Some(m), Some(v)) = (b0, b1) {
                    adam::update::<S, Q, L>(k, param, grad, m, v, b2);
                }
            }
            Rule::RmsProp(k) => {
                if let Some(sq) = b0 {
                    rmsprop::update::<S, Q, L>(k, param, grad, sq, b1, b2);
                }
            }
            Rule::Adagrad(k) => {
                if let Some(sum) = b0 {
                    adagrad::update::<S, Q, L>(k, param, grad, sum);
                }
            }
            Rule::Adadelta(k) => {
                if let (Some(sq), Some(acc)) = (b0, b1) {
                    adadelta::update::<S, Q, L>(k, param, grad, sq, acc);
                }
            }
            Rule::RAdam(k) => {
                if let (Some(m), Some(v)) = (b0, b1) {
                    radam::update::<S, Q, L>(k, param, grad, m, v);
                }
            }
            Rule::Lion(k) => {
                if let Some(m) = b0 {
                    lion::update::<S, Q, L>(k, param, grad, m);
                }
            }
            Rule::Rprop(k) => {
                if let (Some(prev), Some(ss)) = (b0, b1) {
                    rprop::update::<S, Q, L>(k, param, grad, prev, ss);
                }
            }
            Rule::Adamax(k) => {
                if let (Some(m), Some(u)) = (b0, b1) {
                    adamax::update::<S, Q, L>(k, param, grad, m, u);
                }
            }
            Rule::NAdam(k) => {
                if let (Some(m), Some(v)) = (b0, b1) {
                    nadam::update::<S, Q, L>(k, param, grad, m, v);
                }
            }
            Rule::Asgd(k) => {
                if let Some(ax) = b0 {
                    asgd::update::<S, Q, L>(k, param, grad, ax);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
