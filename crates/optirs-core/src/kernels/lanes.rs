//! The element loop every update rule runs in, over lanes of any width.
//!
//! An update rule is written once, as a function of one element's values ([`Elementwise`]),
//! generic over the arithmetic type [`Arith`]: a plain `f32`/`f64`, or a SIMD vector of them
//! (`super::x86`, `super::neon`). [`stream`] walks the arrays a vector of [`Lanes::W`] elements
//! at a time, converting each array's storage type to the arithmetic type on the way in and back
//! on the way out. With [`One`] (one element at a time, the baseline) the compiler vectorises the
//! loop itself; the x86 and NEON lanes spell the vectors out, so that conversions the compiler
//! cannot write (float16 through F16C or `fcvtl`/`fcvtn`) are one instruction, and nothing
//! depends on the auto-vectoriser.
//!
//! Every operation is a correctly rounded IEEE operation, so a lane computes exactly what the
//! scalar code computes, whatever the width. Products and sums are rounded one by one: the
//! compiler never fuses them, and nothing here asks it to, with one exception,
//! [`Arith::mul_add`] (see there). Per-element branches are lane selects
//! ([`Arith::select_gt`], [`Arith::select_eq`]: an ordered compare and a blend, exact at every
//! width), so a rule that branches on values (Rprop's sign logic) is written once too.

use std::ops::{Add, Div, Mul, Neg, Sub};

use super::float::{Float, Storage};
use super::sr::{self, SrKey};

/// What an update rule computes with: `T` itself, or a vector of `T`s operated on lane by lane.
pub trait Arith<T: Float>:
    Copy
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    /// `x` in every lane.
    fn splat(x: T) -> Self;
    /// Correctly rounded square root.
    #[must_use]
    fn sqrt(self) -> Self;
    /// `torch.maximum`: the larger value, NaN where either is NaN.
    #[must_use]
    fn maximum(self, other: Self) -> Self;
    /// `self * a + b` with one rounding: a correctly rounded fused multiply-add.
    ///
    /// The kernels otherwise round every product, because a fused operation on one path and an
    /// unfused one on another (what a compiler's contraction does) give different bits. This
    /// operation is fused at every level: vector FMA instructions at AVX2 and AVX-512, the
    /// scalar FMA instruction in their tails, libm's `fma` at the baseline. A correctly rounded
    /// result is unique, so all of them give the same bits. It is used only where torch's own
    /// CPU kernel fuses and the difference is more than a last bit: centered RMSprop's
    /// `square_avg.addcmul(grad_avg, grad_avg, value=-1)`, where the rounded product can
    /// overflow to infinity and turn `inf - inf` into NaN while the fused result stays
    /// infinite (see `rmsprop::centered`).
    #[must_use]
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// `then` where `self > other`, else `otherwise`, lane by lane (`otherwise` where either
    /// is NaN): an ordered compare and a blend, so every level selects alike.
    #[must_use]
    fn select_gt(self, other: Self, then: Self, otherwise: Self) -> Self;
    /// `then` where `self == other` (ordered: -0 equals +0, NaN equals nothing), else
    /// `otherwise`, lane by lane.
    #[must_use]
    fn select_eq(self, other: Self, then: Self, otherwise: Self) -> Self;

    /// `torch.minimum`: the smaller value, NaN where either is NaN (the mirror of
    /// [`Arith::maximum`]: `other` where `other < self` or `other` is NaN).
    #[must_use]
    #[inline(always)]
    fn minimum(self, other: Self) -> Self {
        let other_or_self = other.select_eq(other, self, other); // NaN `other` stays
        self.select_gt(other, other, other_or_self)
    }

    /// `torch.sign`: 1, -1, or 0 for zeros of either sign and for NaN (ATen's
    /// `(0 < x) - (x < 0)`, which compares NaN false both ways).
    #[must_use]
    #[inline(always)]
    fn sign(self) -> Self {
        let zero = Self::splat(T::ZERO);
        let neg = zero.select_gt(self, Self::splat(-T::ONE), zero);
        self.select_gt(zero, Self::splat(T::ONE), neg)
    }
}

impl<T: Float> Arith<T> for T {
    #[inline(always)]
    fn splat(x: T) -> T {
        x
    }
    #[inline(always)]
    fn sqrt(self) -> T {
        Float::sqrt(self)
    }
    #[inline(always)]
    fn maximum(self, other: T) -> T {
        if other > self || other.is_nan() {
            other
        } else {
            self
        }
    }
    #[inline(always)]
    fn mul_add(self, a: T, b: T) -> T {
        Float::mul_add(self, a, b)
    }
    #[inline(always)]
    fn select_gt(self, other: T, then: T, otherwise: T) -> T {
        if self > other {
            then
        } else {
            otherwise
        }
    }
    #[inline(always)]
    fn select_eq(self, other: T, then: T, otherwise: T) -> T {
        if self == other {
            then
        } else {
            otherwise
        }
    }
}

/// Two values operated on side by side: twice the lanes per step of the loop, in two
/// independent dependency chains.
#[derive(Clone, Copy)]
pub struct Pair<V>(pub V, pub V);

macro_rules! pair_op {
    ($($tr:ident $f:ident),*) => {$(
        impl<V: $tr<Output = V>> $tr for Pair<V> {
            type Output = Self;
            #[inline(always)]
            fn $f(self, o: Self) -> Self {
                Pair(self.0.$f(o.0), self.1.$f(o.1))
            }
        }
    )*};
}
pair_op!(Add add, Sub sub, Mul mul, Div div);

impl<V: Neg<Output = V>> Neg for Pair<V> {
    type Output = Self;
    #[inline(always)]
    fn neg(self) -> Self {
        Pair(-self.0, -self.1)
    }
}

impl<T: Float, V: Arith<T>> Arith<T> for Pair<V> {
    #[inline(always)]
    fn splat(x: T) -> Self {
        Pair(V::splat(x), V::splat(x))
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        Pair(self.0.sqrt(), self.1.sqrt())
    }
    #[inline(always)]
    fn maximum(self, other: Self) -> Self {
        Pair(self.0.maximum(other.0), self.1.maximum(other.1))
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        Pair(self.0.mul_add(a.0, b.0), self.1.mul_add(a.1, b.1))
    }
    #[inline(always)]
    fn select_gt(self, other: Self, then: Self, otherwise: Self) -> Self {
        Pair(
            self.0.select_gt(other.0, then.0, otherwise.0),
            self.1.select_gt(other.1, then.1, otherwise.1),
        )
    }
    #[inline(always)]
    fn select_eq(self, other: Self, then: Self, otherwise: Self) -> Self {
        Pair(
            self.0.select_eq(other.0, then.0, otherwise.0),
            self.1.select_eq(other.1, then.1, otherwise.1),
        )
    }
}

/// Eight elements of a storage type read as `f64` lanes, for the gradient norms
/// (`crate::norm`), which accumulate in `f64`, at the levels with vectors (`super::x86`,
/// `super::neon`). Every conversion is exact (float32 and both
/// 16-bit types widen without rounding), so a lane holds what `Storage::load` then
/// `Float::to_f64` gives for its element.
pub trait Wide8<S> {
    /// Eight `f64` lanes.
    type V: Arith<f64>;
    /// Reads eight elements.
    ///
    /// # Safety
    /// `src` points to 8 readable elements, and the CPU has this type's instructions.
    unsafe fn load8(src: *const S) -> Self::V;
    /// Writes the eight lanes.
    ///
    /// # Safety
    /// `dst` points to 8 writable `f64`s, and the CPU has this type's instructions.
    unsafe fn store8(dst: *mut f64, v: Self::V);
}

/// One update rule at one element position, with `B` state buffers: takes the parameter, the
/// gradient and the buffers' values there, returns the new parameter and buffer values.
pub trait Elementwise<T: Float, const B: usize> {
    fn elem<V: Arith<T>>(&self, p: V, g: V, bufs: [V; B]) -> (V, [V; B]);
}

/// How `W` consecutive elements stored as `S` become one arithmetic value and back.
pub trait Lanes<S: Storage> {
    type V: Arith<S::Compute>;
    /// Elements per value.
    const W: usize;
    /// Reads `W` elements.
    ///
    /// # Safety
    /// `src` points to `W` readable elements, and the CPU has this type's instructions.
    unsafe fn load(src: *const S) -> Self::V;
    /// Writes `W` elements.
    ///
    /// # Safety
    /// `dst` points to `W` writable elements, and the CPU has this type's instructions.
    unsafe fn store(dst: *mut S, v: Self::V);
}

/// One element at a time, in `S::Compute`.
pub struct One;

impl<S: Storage> Lanes<S> for One {
    type V = S::Compute;
    const W: usize = 1;
    #[inline(always)]
    unsafe fn load(src: *const S) -> S::Compute {
        unsafe { (*src).load() }
    }
    #[inline(always)]
    unsafe fn store(dst: *mut S, v: S::Compute) {
        unsafe { *dst = S::store(v) }
    }
}

/// Lanes that read and write both the parameter's storage type `S` and the state's `Q` as the
/// same arithmetic values, `W` elements at a time: what [`stream`] walks a step with. Every
/// `L: Lanes<S>` is `StateLanes<S, S>`; a lanes type with impls for two storage types (the
/// bfloat16 pairs also read float32 and float16) can step a parameter of one with state of
/// the other.
pub trait StateLanes<S: Storage, Q: Storage<Compute = S::Compute>>: Lanes<S> {
    /// Reads `W` state elements.
    ///
    /// # Safety
    /// As [`Lanes::load`].
    unsafe fn load_state(src: *const Q) -> Self::V;
    /// Writes `W` state elements, rounded to `Q`.
    ///
    /// # Safety
    /// As [`Lanes::store`].
    unsafe fn store_state(dst: *mut Q, v: Self::V);
    /// Reads `W` elements of the compute type (a float32 master copy), in element order.
    ///
    /// # Safety
    /// As [`Lanes::load`].
    unsafe fn load_compute(src: *const S::Compute) -> Self::V;
    /// Writes `W` elements of the compute type, unrounded, in element order.
    ///
    /// # Safety
    /// As [`Lanes::store`].
    unsafe fn store_compute(dst: *mut S::Compute, v: Self::V);
}

impl<S, Q, L> StateLanes<S, Q> for L
where
    S: Storage,
    Q: Storage<Compute = S::Compute>,
    L: Lanes<S> + Lanes<Q, V = <L as Lanes<S>>::V> + Lanes<S::Compute, V = <L as Lanes<S>>::V>,
{
    #[inline(always)]
    unsafe fn load_compute(src: *const S::Compute) -> Self::V {
        debug_assert_eq!(<L as Lanes<S>>::W, <L as Lanes<S::Compute>>::W);
        unsafe { <L as Lanes<S::Compute>>::load(src) }
    }
    #[inline(always)]
    unsafe fn store_compute(dst: *mut S::Compute, v: Self::V) {
        unsafe { <L as Lanes<S::Compute>>::store(dst, v) }
    }
    #[inline(always)]
    unsafe fn load_state(src: *const Q) -> Self::V {
        // The two impls step alike: `W` is one constant of the lanes type.
        debug_assert_eq!(<L as Lanes<S>>::W, <L as Lanes<Q>>::W);
        unsafe { <L as Lanes<Q>>::load(src) }
    }
    #[inline(always)]
    unsafe fn store_state(dst: *mut Q, v: Self::V) {
        unsafe { <L as Lanes<Q>>::store(dst, v) }
    }
}

/// Runs `e` over every element of `param`, `grad` (stored as `S`) and `bufs` (the state,
/// stored as `Q`: `S` itself, or bfloat16 under `state_dtype`), all of one length: `L::W` at a
/// time, then the rest one at a time. Every value is computed in `S::Compute`; each is rounded
/// to its own storage type once, when stored.
///
/// `e` comes by value: a local copy of the scalars cannot be written through the arrays'
/// pointers, so the compiler keeps them in registers and takes the rule's option branches out
/// of the loop (through a reference it reloaded and re-tested them every iteration).
///
/// # Safety
/// The CPU has `L`'s instructions (the caller is compiled with them enabled).
///
/// # Panics
/// When the lengths differ.
#[inline(always)]
pub unsafe fn stream<S, Q, L, E, const B: usize>(
    e: E,
    param: &mut [S],
    grad: &[S],
    mut bufs: [&mut [Q]; B],
) where
    S: Storage,
    Q: Storage<Compute = S::Compute>,
    L: StateLanes<S, Q>,
    E: Elementwise<S::Compute, B> + Copy,
{
    let n = param.len();
    assert!(grad.len() == n && bufs.iter().all(|b| b.len() == n));
    if L::W == 1 {
        // Indexing the slices (their lengths checked above) rather than stepping raw pointers:
        // the form the compiler vectorises, where with pointers it kept some rules scalar.
        for i in 0..n {
            // SAFETY: one element of each array, at an index below every length.
            unsafe {
                let b = std::array::from_fn(|k| L::load_state(&raw const bufs[k][i]));
                let (p_new, b_new) =
                    e.elem(L::load(&raw const param[i]), L::load(&raw const grad[i]), b);
                L::store(&raw mut param[i], p_new);
                for k in 0..B {
                    L::store_state(&raw mut bufs[k][i], b_new[k]);
                }
            }
        }
        return;
    }
    let full = n - n % L::W;
    let p_ptr = param.as_mut_ptr();
    let g_ptr = grad.as_ptr();
    let b_ptrs: [*mut Q; B] = std::array::from_fn(|k| bufs[k].as_mut_ptr());
    let mut i = 0;
    while i < full {
        // SAFETY: i + W <= full <= n, the length of every array; distinct `&mut` slices do not
        // overlap, and the gradient is only read.
        unsafe {
            step::<S, Q, L, E, B>(&e, p_ptr.add(i), g_ptr.add(i), b_ptrs.map(|b| b.add(i)));
        }
        i += L::W;
    }
    if full < n {
        // The last n - full (< W) elements, one at a time: the same operations, so the same
        // bits, as the vectors.
        let tails: [&mut [Q]; B] = bufs.map(|b| &mut b[full..]);
        // SAFETY: plain code.
        unsafe { stream::<S, Q, One, E, B>(e, &mut param[full..], &grad[full..], tails) };
    }
}

/// One value's worth of elements.
///
/// # Safety
/// Each pointer has `W` elements behind it, and the CPU has `L`'s instructions.
#[inline(always)]
unsafe fn step<S, Q, L, E, const B: usize>(e: &E, p: *mut S, g: *const S, b: [*mut Q; B])
where
    S: Storage,
    Q: Storage<Compute = S::Compute>,
    L: StateLanes<S, Q>,
    E: Elementwise<S::Compute, B>,
{
    unsafe {
        let (p_new, b_new) = e.elem(L::load(p), L::load(g), b.map(|x| L::load_state(x)));
        L::store(p, p_new);
        for k in 0..B {
            L::store_state(b[k], b_new[k]);
        }
    }
}

/// How a step writes a parameter's new values.
#[derive(Debug)]
pub enum Rounding<'a, C> {
    /// Rounded to nearest even (what torch's fused CPU optimizers do).
    Nearest,
    /// Rounded stochastically ([`Storage::store_sr`]) with the random bits of `SrKey`, whose
    /// offset is the index of the slice's first element within its parameter.
    Stochastic(SrKey),
    /// A master copy in the compute type (float32 for 16-bit parameters): the step reads and
    /// writes it, and writes the parameter from it rounded to nearest.
    Master(&'a mut [C]),
}

impl<C> Rounding<'_, C> {
    /// The rounding of the first `n` elements and of the rest.
    #[must_use]
    pub fn split_at(self, n: usize) -> (Self, Self) {
        match self {
            Rounding::Nearest => (Rounding::Nearest, Rounding::Nearest),
            Rounding::Stochastic(k) => {
                (Rounding::Stochastic(k), Rounding::Stochastic(k.advanced(n)))
            }
            Rounding::Master(m) => {
                let (a, b) = m.split_at_mut(n);
                (Rounding::Master(a), Rounding::Master(b))
            }
        }
    }

    /// False when a master copy is not `n` elements long.
    #[must_use]
    pub fn len_matches(&self, n: usize) -> bool {
        match self {
            Rounding::Master(m) => m.len() == n,
            _ => true,
        }
    }
}

/// A parameter's values and how its new values are written: what a rule's `update` takes.
#[derive(Debug)]
pub struct ParamOut<'a, S: Storage> {
    pub values: &'a mut [S],
    pub rounding: Rounding<'a, S::Compute>,
}

impl<'a, S: Storage> From<&'a mut [S]> for ParamOut<'a, S> {
    fn from(values: &'a mut [S]) -> Self {
        ParamOut {
            values,
            rounding: Rounding::Nearest,
        }
    }
}

/// [`stream`] with the parameter written as `param.rounding` says. Round to nearest is
/// [`stream`] itself; the other two run the same element function through [`stream_io`], in the
/// same single pass over memory.
///
/// # Safety
/// As [`stream`].
///
/// # Panics
/// When the lengths differ.
#[inline(always)]
pub unsafe fn stream_param<S, Q, L, E, const B: usize>(
    e: E,
    param: ParamOut<'_, S>,
    grad: &[S],
    bufs: [&mut [Q]; B],
) where
    S: Storage,
    Q: Storage<Compute = S::Compute>,
    L: StateLanes<S, Q>,
    E: Elementwise<S::Compute, B> + Copy,
{
    let ParamOut { values, rounding } = param;
    let n = values.len();
    assert!(grad.len() == n && bufs.iter().all(|b| b.len() == n) && rounding.len_matches(n));
    let p = values.as_mut_ptr();
    // SAFETY (all three): every array has n elements (checked above), the `&mut` ones distinct
    // and so not overlapping; the caller vouches for the instructions.
    unsafe {
        match rounding {
            Rounding::Nearest => stream::<S, Q, L, E, B>(e, values, grad, bufs),
            Rounding::Stochastic(key) => {
                stream_io::<S, Q, L, E, B, _>(e, Stochastic { p, key }, n, grad, bufs);
            }
            Rounding::Master(m) => {
                let m = m.as_mut_ptr();
                stream_io::<S, Q, L, E, B, _>(e, Master { p, m }, n, grad, bufs);
            }
        }
    }
}

/// Where the element function reads the parameter from and how its result is written.
trait ParamIo<S: Storage>: Copy {
    /// Reads `L::W` parameter values from element `i`.
    ///
    /// # Safety
    /// Elements `i..i + L::W` exist; the CPU has `L`'s instructions.
    unsafe fn load<Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(self, i: usize) -> L::V;
    /// Writes `L::W` new parameter values from element `i`.
    ///
    /// # Safety
    /// As `load`.
    unsafe fn store<Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(self, i: usize, v: L::V);
}

/// The widest lanes type's elements per value (bfloat16 pairs of 16 float32 lanes).
const MAX_W: usize = 32;

#[derive(Clone, Copy)]
struct Stochastic<S> {
    p: *mut S,
    key: SrKey,
}

impl<S: Storage> ParamIo<S> for Stochastic<S> {
    #[inline(always)]
    unsafe fn load<Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(self, i: usize) -> L::V {
        unsafe { L::load(self.p.add(i)) }
    }
    #[inline(always)]
    unsafe fn store<Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(
        self,
        i: usize,
        v: L::V,
    ) {
        // The values in element order (the bfloat16 pairs hold even and odd elements apart),
        // each rounded with its own element's bits: integer arithmetic, exact at any width, so
        // every level writes the same bits whatever the compiler makes of this loop.
        let mut buf = [<S::Compute as Float>::ZERO; MAX_W];
        debug_assert!(L::W <= MAX_W);
        // Element i + j's index within the parameter, in two u32 halves (`sr::bits`, computed
        // without 64-bit lanes: the low half counts up from the block's, the high half takes
        // its carry).
        #[allow(clippy::cast_possible_truncation)]
        let (lo0, hi0) = {
            let base = self.key.offset.wrapping_add(i as u64);
            (base as u32, (base >> 32) as u32)
        };
        unsafe {
            L::store_compute(buf.as_mut_ptr(), v);
            for (j, &x) in buf.iter().enumerate().take(L::W) {
                #[allow(clippy::cast_possible_truncation)] // j < W <= 32
                let lo = lo0.wrapping_add(j as u32);
                let hi = hi0.wrapping_add(u32::from(lo < lo0));
                *self.p.add(i + j) = S::store_sr(x, sr::mix(self.key, lo, hi));
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Master<S: Storage> {
    p: *mut S,
    m: *mut S::Compute,
}

impl<S: Storage> ParamIo<S> for Master<S> {
    #[inline(always)]
    unsafe fn load<Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(self, i: usize) -> L::V {
        unsafe { L::load_compute(self.m.add(i)) }
    }
    #[inline(always)]
    unsafe fn store<Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>>(
        self,
        i: usize,
        v: L::V,
    ) {
        unsafe {
            L::store_compute(self.m.add(i), v);
            L::store(self.p.add(i), v);
        }
    }
}

/// [`stream`] with the parameter read and written through `io`, over `n` elements.
///
/// # Safety
/// As [`stream`]; `io` addresses `n` elements, not overlapping the other arrays.
#[inline(always)]
unsafe fn stream_io<S, Q, L, E, const B: usize, P>(
    e: E,
    io: P,
    n: usize,
    grad: &[S],
    mut bufs: [&mut [Q]; B],
) where
    S: Storage,
    Q: Storage<Compute = S::Compute>,
    L: StateLanes<S, Q>,
    E: Elementwise<S::Compute, B> + Copy,
    P: ParamIo<S>,
{
    let full = n - n % L::W;
    let g_ptr = grad.as_ptr();
    let b_ptrs: [*mut Q; B] = std::array::from_fn(|k| bufs[k].as_mut_ptr());
    let mut i = 0;
    while i < full {
        // SAFETY: i + W <= full <= n, the length of every array (the caller's promise for
        // `io`); the gradient is only read.
        unsafe {
            let b = b_ptrs.map(|b| L::load_state(b.add(i)));
            let (p_new, b_new) = e.elem(io.load::<Q, L>(i), L::load(g_ptr.add(i)), b);
            io.store::<Q, L>(i, p_new);
            for k in 0..B {
                L::store_state(b_ptrs[k].add(i), b_new[k]);
            }
        }
        i += L::W;
    }
    while i < n {
        // SAFETY: i < n; one element at a time, in plain code (the same operations, so the same
        // bits, as the vectors).
        unsafe {
            let b = b_ptrs.map(|b| <One as StateLanes<S, Q>>::load_state(b.add(i)));
            let (p_new, b_new) = e.elem(
                io.load::<Q, One>(i),
                <One as Lanes<S>>::load(g_ptr.add(i)),
                b,
            );
            io.store::<Q, One>(i, p_new);
            for k in 0..B {
                <One as StateLanes<S, Q>>::store_state(b_ptrs[k].add(i), b_new[k]);
            }
        }
        i += 1;
    }
}
