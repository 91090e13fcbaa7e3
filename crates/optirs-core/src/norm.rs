//! Gradient norms and gradient clipping: the passes `torch.nn.utils.clip_grad_norm_` makes
//! around a step, as one parallel pass for the norm and one for the scaling.
//!
//! # What is computed
//! As torch's `_get_total_norm`: each tensor's `vector_norm` (torch's `_foreach_norm`, whose
//! result has the tensor's dtype), then the `vector_norm` of those norms stacked (in their
//! promoted dtype), then `_clip_grads_with_norm_`'s coefficient
//! `clamp(max_norm / (total + 1e-6), max=1)`, in that dtype with torch's roundings
//! ([`clip_coef`]).
//!
//! Each tensor's sum (of squares, of absolute values, of `|x|^p`) is accumulated in `f64`
//! where torch accumulates float32 (and 16-bit) tensors in float32: at least as accurate (a
//! float32 square is exact in `f64`, and each addition rounds 29 bits further down), so the
//! result is torch's or closer to the exact norm (tests/test_clip.py checks both against a
//! float64 reference), then rounded to the tensor's dtype as torch's is. Maxima and minima are
//! exact in any type.
//!
//! # What keeps the pointers valid
//! A [`GradRef`] is an address, a dtype and a length; whoever makes one vouches
//! ([`GradRef::new`]) that the memory stays alive and unmoved for the call, and for [`scale`]
//! that no other reference reads or writes it and no two overlap. Each work item borrows only
//! its own piece ([`GradRef::piece`], [`GradRef::piece_mut`]), so the pieces that threads
//! write at the same time are disjoint slices.
//!
//! # Why the bits never depend on threads or SIMD
//! A tensor is cut into pieces of [`CHUNK_ELEMS`] elements whatever the thread count. Within a
//! piece, element `i` goes to accumulator `i % LANES`, and the accumulators are added in one
//! fixed order: the compiler may hold them in vectors of any width (it cannot reorder float
//! additions), so every SIMD level gives the same bits. The pieces' partial sums are then
//! added in piece order on the calling thread.

use crate::dtype::DType;
use crate::engine::CHUNK_ELEMS;
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
use crate::kernels::lanes::{Arith, Wide8};
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
use crate::kernels::neon::Neon;
#[cfg(target_arch = "x86_64")]
use crate::kernels::x86::{Avx2, Avx512};
use crate::kernels::{
    simd::{FactorElement, SimdLevel},
    Float, Storage,
};
use crate::pool;

/// Independent accumulators per piece: enough dependency chains to keep vector adders busy at
/// every level (AVX-512 holds them in 4 vectors of 8 `f64`).
const LANES: usize = 32;

/// The `ord` of `torch.linalg.vector_norm`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormType {
    /// `sqrt(sum x^2)`.
    Two,
    /// `sum |x|`.
    One,
    /// `max |x|`.
    Inf,
    /// `min |x|`.
    NegInf,
    /// The number of non-zero elements.
    Zero,
    /// `(sum |x|^p)^(1/p)`.
    P(f64),
}

impl NormType {
    /// The norm of order `p` (any float; NaN is refused by the caller).
    #[must_use]
    pub fn of(p: f64) -> NormType {
        match p {
            2.0 => NormType::Two,
            1.0 => NormType::One,
            0.0 => NormType::Zero,
            f64::INFINITY => NormType::Inf,
            f64::NEG_INFINITY => NormType::NegInf,
            p => NormType::P(p),
        }
    }

    /// The accumulator's starting value.
    fn identity(self) -> f64 {
        match self {
            NormType::NegInf => f64::INFINITY,
            _ => 0.0,
        }
    }

    /// Combines two partial results (sums add, extremes compare).
    #[inline(always)]
    fn combine(self, a: f64, b: f64) -> f64 {
        match self {
            NormType::Inf => max_nan(a, b),
            NormType::NegInf => min_nan(a, b),
            _ => a + b,
        }
    }

    /// The norm from the combined accumulator.
    fn finish(self, acc: f64) -> f64 {
        match self {
            NormType::Two => acc.sqrt(),
            NormType::P(p) => acc.powf(1.0 / p),
            _ => acc,
        }
    }
}

/// `torch.max`'s rule: NaN wins.
#[inline(always)]
fn max_nan(a: f64, b: f64) -> f64 {
    if b > a || b.is_nan() {
        b
    } else {
        a
    }
}

#[inline(always)]
fn min_nan(a: f64, b: f64) -> f64 {
    if b < a || b.is_nan() {
        b
    } else {
        a
    }
}

/// One gradient the norm reads: its dtype, where its elements are and how many.
#[derive(Clone, Copy, Debug)]
pub struct GradRef {
    dtype: DType,
    ptr: *const u8,
    len: usize,
}

// SAFETY: a `GradRef` is only read through (shared slices), by contract of `GradRef::new`.
unsafe impl Send for GradRef {}
// SAFETY: as above.
unsafe impl Sync for GradRef {}

impl GradRef {
    /// `len` elements of `dtype` at `ptr`.
    ///
    /// # Safety
    /// Until the call that reads it returns, `ptr` points to `len` initialised, aligned
    /// elements of `dtype` that are alive and unmoved (nothing is required when `len` is 0).
    /// For [`scale`], they are also written: nothing else may read or write them meanwhile,
    /// and no two `GradRef`s of one call may overlap.
    #[must_use]
    pub unsafe fn new(dtype: DType, ptr: *const u8, len: usize) -> GradRef {
        GradRef { dtype, ptr, len }
    }

    /// The dtype.
    #[must_use]
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// True when it has no elements.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `at..at + n` (within its length) as `S`.
    ///
    /// # Safety
    /// The contract of [`GradRef::new`], with `S` its dtype.
    unsafe fn piece<'a, S>(&self, at: usize, n: usize) -> &'a [S] {
        assert!(at + n <= self.len);
        if n == 0 {
            &[]
        } else {
            // SAFETY: the caller's contract; the range lies within the gradient.
            unsafe { std::slice::from_raw_parts(self.ptr.cast::<S>().add(at), n) }
        }
    }

    /// Elements `at..at + n` as `S`, to write. Only the piece is borrowed: other threads
    /// borrow the other pieces of the same gradient at the same time.
    ///
    /// # Safety
    /// As [`GradRef::piece`], the elements may be written ([`scale`]'s contract), and no
    /// other borrow of this range is alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn piece_mut<'a, S>(&self, at: usize, n: usize) -> &'a mut [S] {
        assert!(at + n <= self.len);
        if n == 0 {
            &mut []
        } else {
            // SAFETY: the caller's contract; the range lies within the gradient.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<S>().cast_mut().add(at), n) }
        }
    }
}

/// The accumulation over one piece at the baseline level (and for norm types the vector
/// loop does not cover), one element at a time.
#[inline(always)]
fn piece_inline<S: Storage>(xs: &[S], p: NormType) -> f64 {
    // One loop per norm type, each with its operation known: a loop that matched the type
    // per element was not vectorised.
    let acc = match p {
        NormType::Two => lanes(xs, p, |a, x| a + x * x),
        NormType::One => lanes(xs, p, |a, x| a + x.abs()),
        NormType::Zero => lanes(xs, p, |a, x| a + if x == 0.0 { 0.0 } else { 1.0 }),
        NormType::Inf => lanes(xs, p, |a, x| max_nan(a, x.abs())),
        NormType::NegInf => lanes(xs, p, |a, x| min_nan(a, x.abs())),
        NormType::P(e) => lanes(xs, p, |a, x| a + x.abs().powf(e)),
    };
    reduce(acc, p)
}

/// The accumulators combined in their fixed order.
#[inline(always)]
fn reduce(acc: [f64; LANES], p: NormType) -> f64 {
    acc.into_iter()
        .reduce(|a, b| p.combine(a, b))
        .unwrap_or(p.identity())
}

/// Element `i` of `xs` added into accumulator `i % LANES` by `add`.
#[inline(always)]
fn lanes<S: Storage>(xs: &[S], p: NormType, add: impl Fn(f64, f64) -> f64) -> [f64; LANES] {
    let mut acc = [p.identity(); LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] = add(acc[j], c[j].load().to_f64());
        }
    }
    for (j, x) in chunks.remainder().iter().enumerate() {
        acc[j] = add(acc[j], x.load().to_f64());
    }
    acc
}

/// [`piece_inline`] with `L`'s `f64` vectors, spelled out: the compiler left the scalar loop
/// (32 `f64` chains fed by conversions) scalar, about 1 element a cycle, a third of the
/// memory's speed at 2 threads. Four vectors of 8 lanes are the 32 accumulators (lane `j` of
/// vector `k` is accumulator `8k + j`, as in [`lanes`]), each lane's operation the scalar
/// one's IEEE operation, so the bits are the baseline's; the tail runs the scalar operations.
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
#[inline(always)]
fn piece_wide<S: Storage, L: Wide8<S>>(xs: &[S], p: NormType) -> f64 {
    let zero = L::V::splat(0.0);
    let one = L::V::splat(1.0);
    // |x| as `0 - x` where `x > 0` fails: +0 for either zero, as `f64::abs` gives (negation
    // would give -0 for +0, which `min` would keep); NaN stays NaN.
    let abs = |x: L::V| x.select_gt(zero, x, zero - x);
    let acc = match p {
        NormType::Two => wide::<S, L>(xs, p, |a, x| a + x * x, |a, x| a + x * x),
        NormType::One => wide::<S, L>(xs, p, |a, x| a + abs(x), |a, x| a + x.abs()),
        NormType::Zero => wide::<S, L>(
            xs,
            p,
            |a, x| a + x.select_eq(zero, zero, one),
            |a, x| a + if x == 0.0 { 0.0 } else { 1.0 },
        ),
        NormType::Inf => wide::<S, L>(xs, p, |a, x| a.maximum(abs(x)), |a, x| max_nan(a, x.abs())),
        NormType::NegInf => {
            wide::<S, L>(xs, p, |a, x| a.minimum(abs(x)), |a, x| min_nan(a, x.abs()))
        }
        NormType::P(_) => return piece_inline(xs, p),
    };
    reduce(acc, p)
}

/// The vector loop of [`piece_wide`]: `add` over whole groups of [`LANES`] elements, `add1`
/// (the same operation on one lane) over the tail.
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
#[inline(always)]
fn wide<S: Storage, L: Wide8<S>>(
    xs: &[S],
    p: NormType,
    add: impl Fn(L::V, L::V) -> L::V,
    add1: impl Fn(f64, f64) -> f64,
) -> [f64; LANES] {
    let mut acc = [L::V::splat(p.identity()); LANES / 8];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` holds LANES = 8 * acc.len() elements; the caller runs with `L`'s
            // instructions (the `target_feature` functions below; NEON is baseline on aarch64).
            *a = add(*a, unsafe { L::load8(c.as_ptr().add(8 * k)) });
        }
    }
    let mut out = [0.0; LANES];
    for (k, a) in acc.into_iter().enumerate() {
        // SAFETY: `out` has room for 8 lanes at 8 * k < LANES; instructions as above.
        unsafe { L::store8(out.as_mut_ptr().add(8 * k), a) };
    }
    for (j, x) in chunks.remainder().iter().enumerate() {
        out[j] = add1(out[j], x.load().to_f64());
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn piece_avx512<S: Storage>(xs: &[S], p: NormType) -> f64
where
    Avx512: Wide8<S>,
{
    piece_wide::<S, Avx512>(xs, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn piece_avx2<S: Storage>(xs: &[S], p: NormType) -> f64
where
    Avx2: Wide8<S>,
{
    piece_wide::<S, Avx2>(xs, p)
}

#[cfg(target_arch = "x86_64")]
fn piece<S: Storage>(level: SimdLevel, xs: &[S], p: NormType) -> f64
where
    Avx512: Wide8<S>,
    Avx2: Wide8<S>,
{
    match level.clamped() {
        // SAFETY: the CPU has the level's features (`detect`, clamped above).
        SimdLevel::Avx512 => unsafe { piece_avx512(xs, p) },
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { piece_avx2(xs, p) },
        _ => piece_inline(xs, p),
    }
}

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
fn piece<S: Storage>(level: SimdLevel, xs: &[S], p: NormType) -> f64
where
    Neon: Wide8<S>,
{
    match level.clamped() {
        SimdLevel::Neon => piece_wide::<S, Neon>(xs, p),
        _ => piece_inline(xs, p),
    }
}

#[cfg(not(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
)))]
fn piece<S: Storage>(_level: SimdLevel, xs: &[S], p: NormType) -> f64 {
    piece_inline(xs, p)
}

/// `g = g * c` rounded to the storage type, written once and compiled per level.
#[inline(always)]
fn scale_inline<S: Storage>(xs: &mut [S], c: S::Compute) {
    for x in xs {
        *x = S::store(x.load() * c);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn scale_avx512<S: Storage>(xs: &mut [S], c: S::Compute) {
    scale_inline(xs, c);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale_avx2<S: Storage>(xs: &mut [S], c: S::Compute) {
    scale_inline(xs, c);
}

fn scale_piece<S: Storage>(level: SimdLevel, xs: &mut [S], c: S::Compute) {
    match level.clamped() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the level's features (`detect`, clamped above).
        SimdLevel::Avx512 => unsafe { scale_avx512(xs, c) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { scale_avx2(xs, c) },
        _ => scale_inline(xs, c),
    }
}

/// The most elements one piece of a norm or a scale covers: a step's chunk, smaller under Miri
/// so that its tests cross piece boundaries on a few hundred elements (the pieces' partial
/// results combine in a fixed order whatever their size, so only Miri's own runs see another
/// rounding).
const PIECE: usize = if cfg!(miri) { 64 } else { CHUNK_ELEMS };

/// The pieces of every gradient: (gradient index, first element, element count).
fn pieces(grads: &[GradRef]) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for (i, g) in grads.iter().enumerate() {
        let mut at = 0;
        while at < g.len {
            let n = PIECE.min(g.len - at);
            out.push((i, at, n));
            at += n;
        }
    }
    out
}

/// Rounds `x` to `dtype` as torch's cast of a float32 (or float64) result does.
#[must_use]
pub fn round_to(x: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F64 => x,
        DType::F32 => f64::from(x as f32),
        DType::Bf16 => f64::from(half::bf16::store(x as f32).load()),
        DType::F16 => f64::from(half::f16::store(x as f32).load()),
    }
}

/// The dtype torch's type promotion gives a stack of norms of these dtypes (None: no dtype).
#[must_use]
pub fn promoted(dtypes: impl IntoIterator<Item = DType>) -> Option<DType> {
    dtypes.into_iter().reduce(|a, b| match (a, b) {
        (a, b) if a == b => a,
        (DType::F64, _) | (_, DType::F64) => DType::F64,
        // float32 with anything narrower, and float16 with bfloat16, meet in float32.
        _ => DType::F32,
    })
}

/// Each gradient's norm (in `f64`, before rounding to its dtype): one parallel pass.
#[must_use]
pub fn norms(grads: &[GradRef], p: NormType) -> Vec<f64> {
    let level = crate::kernels::simd::active();
    let work = pieces(grads);
    let total: usize = grads.iter().map(|g| g.len).sum();
    let mut partial = vec![0.0f64; work.len()];
    let items: Vec<_> = work.iter().zip(partial.iter_mut()).collect();
    pool::for_each(items, total, |(&(i, at, n), out)| {
        let g = &grads[i];
        // SAFETY: `GradRef::new`'s contract; the piece lies within the gradient.
        *out = unsafe {
            match g.dtype {
                DType::F32 => piece(level, g.piece::<f32>(at, n), p),
                DType::F64 => piece(level, g.piece::<f64>(at, n), p),
                DType::F16 => piece(level, g.piece::<half::f16>(at, n), p),
                DType::Bf16 => piece(level, g.piece::<half::bf16>(at, n), p),
            }
        };
    });
    let mut acc = vec![p.identity(); grads.len()];
    // In piece order, whatever thread computed each piece.
    for (&(i, _, _), part) in work.iter().zip(&partial) {
        acc[i] = p.combine(acc[i], *part);
    }
    // One NaN for every level: a lane's NaN may carry another sign than the baseline's `abs`.
    acc.into_iter()
        .map(|a| match p.finish(a) {
            n if n.is_nan() => f64::NAN,
            n => n,
        })
        .collect()
}

/// The total norm as torch's `_get_total_norm` gives it: each gradient's norm rounded to its
/// dtype, then the norm of those, rounded to their promoted dtype. None when `grads` is empty.
#[must_use]
pub fn total_norm(grads: &[GradRef], p: NormType) -> Option<(f64, DType)> {
    let dtype = promoted(grads.iter().map(GradRef::dtype))?;
    let each = norms(grads, p);
    let mut acc = p.identity();
    for (n, g) in each.iter().zip(grads) {
        let n = round_to(*n, g.dtype);
        // The stack is cast to the promoted dtype before its norm is taken.
        let n = round_to(n, dtype);
        let one = match p {
            NormType::Two => n * n,
            NormType::One | NormType::Inf | NormType::NegInf => n.abs(),
            NormType::Zero => f64::from(u8::from(n != 0.0)),
            NormType::P(e) => n.abs().powf(e),
        };
        acc = p.combine(acc, one);
    }
    // torch accumulates that (short) norm in its dtype's accumulator; `f64` here.
    Some((round_to(p.finish(acc), dtype), dtype))
}

/// `_clip_grads_with_norm_`'s coefficient: `clamp(max_norm / (total + 1e-6), max=1.0)` with
/// the arithmetic of a 0-d tensor of `dtype` (16-bit ones compute in float32 and round).
/// A Python float divided by a tensor is `tensor.reciprocal() * float` in torch
/// (`Tensor.__rtruediv__`): two roundings, kept here. NaN stays NaN, as `torch.clamp` keeps it.
#[must_use]
pub fn clip_coef(max_norm: f64, total: f64, dtype: DType) -> f64 {
    let coef = if dtype == DType::F64 {
        (1.0 / (total + 1e-6)) * max_norm
    } else {
        // Python scalars meet a float32 (or 16-bit) tensor as float32 values.
        let t = round_to(f64::from((total as f32) + (1e-6f64 as f32)), dtype) as f32;
        let r = round_to(f64::from(1.0f32 / t), dtype) as f32;
        round_to(f64::from(r * (max_norm as f32)), dtype)
    };
    if coef > 1.0 {
        1.0
    } else {
        coef
    }
}

/// Multiplies every gradient by `coef` in place (`g.mul_(coef)`: `coef` as the gradient's
/// compute type, the product rounded to its dtype): one parallel pass.
///
/// # Safety
/// Every `GradRef` meets [`GradRef::new`]'s contract for writing.
pub unsafe fn scale(grads: &[GradRef], coef: f64) {
    let level = crate::kernels::simd::active();
    let work = pieces(grads);
    let total: usize = grads.iter().map(|g| g.len).sum();
    pool::for_each(work, total, |(i, at, n)| {
        let g = &grads[i];
        // SAFETY: the caller's contract; the pieces of one call never overlap, and each is
        // borrowed by one thread only.
        unsafe {
            match g.dtype {
                DType::F32 => scale_piece(level, g.piece_mut::<f32>(at, n), coef as f32),
                DType::F64 => scale_piece(level, g.piece_mut::<f64>(at, n), coef),
                DType::F16 => scale_piece(level, g.piece_mut::<half::f16>(at, n), coef as f32),
                DType::Bf16 => scale_piece(level, g.piece_mut::<half::bf16>(at, n), coef as f32),
            }
        }
    });
}

/// How a step reads each gradient: `g / unscale` (GradScaler's scale, as torch's fused step
/// divides), then `* coef` (a clip coefficient), each result rounded to the gradient's dtype
/// as torch's in-place passes before the step would store it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GradFactor {
    pub unscale: Option<f64>,
    pub coef: Option<f64>,
}

impl GradFactor {
    /// True when the gradient is read as it is.
    #[must_use]
    pub fn is_identity(&self) -> bool {
        self.unscale.is_none() && self.coef.is_none()
    }
}

/// Writes `src` read through `f` into `dst` (one work item's gradient, into a scratch buffer
/// the item's update then reads in its place).
///
/// # Panics
/// When the lengths differ.
pub fn apply_factor<S: FactorElement>(level: SimdLevel, src: &[S], dst: &mut [S], f: GradFactor) {
    assert_eq!(src.len(), dst.len());
    S::factor(level, src, dst, f.unscale, f.coef);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd;

    fn refs<S>(xs: &[Vec<S>], dtype: DType) -> Vec<GradRef> {
        xs.iter()
            // SAFETY: the vectors outlive the call and are only read.
            .map(|v| unsafe { GradRef::new(dtype, v.as_ptr().cast(), v.len()) })
            .collect()
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn norms_match_a_plain_loop_at_awkward_lengths() {
        for n in [0, 1, 7, 31, 32, 33, 1000, PIECE + 17] {
            let xs = [data(n, n as u32)];
            let x = &xs[0];
            let g = refs(&xs, DType::F32);
            let exact2: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
            let got = norms(&g, NormType::Two)[0];
            assert!((got - exact2.sqrt()).abs() <= 1e-12 * exact2.sqrt().max(1.0));
            let max = x.iter().fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
            assert_eq!(norms(&g, NormType::Inf)[0], max);
            let nz = x.iter().filter(|&&v| v != 0.0).count() as f64;
            assert_eq!(norms(&g, NormType::Zero)[0], nz);
        }
    }

    #[test]
    fn nan_and_infinity_propagate() {
        let x = [vec![1.0f32, f32::NAN, 2.0]];
        let g = refs(&x, DType::F32);
        assert!(norms(&g, NormType::Two)[0].is_nan());
        assert!(norms(&g, NormType::Inf)[0].is_nan());
        let y = [vec![1.0f32, f32::INFINITY]];
        let g = refs(&y, DType::F32);
        assert_eq!(norms(&g, NormType::Two)[0], f64::INFINITY);
        assert_eq!(norms(&g, NormType::NegInf)[0], 1.0);
    }

    /// Every norm type at every level and thread count, over each dtype: one set of bits.
    fn same_bits_everywhere<S: Storage + Copy>(dtype: DType, from: impl Fn(f32) -> S) {
        // Past the pool's threshold natively; under Miri a few pieces each, on one thread (the
        // pool's own tests run there with threads). Lengths leave tails of every size; zeros of
        // both signs (the vector |x| must give +0 for both, as `abs`), an infinity in one.
        let xs: Vec<Vec<S>> = (0..5)
            .map(|i| {
                let mut x = data(3 * PIECE + 5 * i, i as u32);
                x[3] = -0.0;
                x[40] = 0.0;
                if i == 4 {
                    x[7] = f32::INFINITY;
                }
                x.into_iter().map(&from).collect()
            })
            .collect();
        let g = refs(&xs, dtype);
        let before = simd::active();
        let mut seen = Vec::new();
        for level in SimdLevel::ALL.into_iter().filter(|l| l.supported()) {
            simd::set_active(level);
            for threads in [1, 2, 3] {
                pool::set_num_threads(threads);
                for p in [
                    NormType::Two,
                    NormType::One,
                    NormType::Zero,
                    NormType::Inf,
                    NormType::NegInf,
                    NormType::P(3.5),
                ] {
                    seen.push((level, threads, p, norms(&g, p)));
                }
            }
        }
        simd::set_active(before);
        for (level, threads, p, n) in &seen {
            let first = &seen.iter().find(|(_, _, q, _)| q == p).unwrap().3;
            assert_eq!(
                n.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                first.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{dtype:?} {p:?} at {level:?} x {threads}"
            );
        }
        // The smallest magnitude is a zero: +0, whichever sign it had.
        let neg_inf = &seen
            .iter()
            .find(|(_, _, q, _)| *q == NormType::NegInf)
            .unwrap()
            .3;
        assert!(neg_inf.iter().all(|x| x.to_bits() == 0));
    }

    #[test]
    fn every_simd_level_and_thread_count_gives_the_same_bits() {
        same_bits_everywhere(DType::F32, |x| x);
        same_bits_everywhere(DType::F64, f64::from);
        same_bits_everywhere(DType::Bf16, half::bf16::from_f32);
        // The software conversion: Miri has no F16C to run `from_f32` with.
        same_bits_everywhere(DType::F16, half::f16::from_f32_const);
    }

    #[test]
    fn a_nan_norm_has_one_bit_pattern_at_every_level() {
        let xs = [vec![1.0f32; 40], vec![-1.0f32; 40]];
        let mut xs = xs.to_vec();
        xs[0][33] = f32::NAN;
        xs[1][5] = -f32::NAN;
        let g = refs(&xs, DType::F32);
        let before = simd::active();
        for level in SimdLevel::ALL.into_iter().filter(|l| l.supported()) {
            simd::set_active(level);
            for p in [
                NormType::Two,
                NormType::One,
                NormType::Inf,
                NormType::NegInf,
            ] {
                for n in norms(&g, p) {
                    assert_eq!(n.to_bits(), f64::NAN.to_bits(), "{p:?} at {level:?}");
                }
            }
        }
        simd::set_active(before);
    }

    #[test]
    fn the_coefficient_is_clamped_and_keeps_nan() {
        assert_eq!(clip_coef(1.0, 0.5, DType::F32), 1.0);
        assert_eq!(clip_coef(1.0, 4.0, DType::F64), (1.0 / (4.0 + 1e-6)) * 1.0);
        assert!(clip_coef(1.0, f64::NAN, DType::F32).is_nan());
        assert_eq!(clip_coef(1.0, f64::INFINITY, DType::F32), 0.0);
    }

    #[test]
    fn promotion_follows_torch() {
        assert_eq!(promoted([DType::Bf16, DType::F16]), Some(DType::F32));
        assert_eq!(promoted([DType::Bf16, DType::Bf16]), Some(DType::Bf16));
        assert_eq!(promoted([DType::F32, DType::F64]), Some(DType::F64));
        assert_eq!(promoted([]), None);
    }
}
