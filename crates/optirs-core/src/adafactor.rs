//! Adafactor (`torch.optim.Adafactor`): not element-wise, so not a row of the rule table. Each
//! parameter's update needs reductions first (its own norm; for a tensor of two or more
//! dimensions the mean square of each row and column of its gradient over the last two; the
//! norm of the whole update), so a step runs in passes, each parallel over fixed pieces of every
//! parameter on the pool:
//!
//! 1. read: each piece's sum of `p^2` and, for a factored parameter, each of its rows' sum of
//!    `g^2` and its partial column sums of `g^2`;
//! 2. (serial, per parameter) `alpha`, the new `row_var`/`col_var` (written) and the per-matrix
//!    mean of `row_var`;
//! 3. read: each piece's sum of `u^2`, `u` the unclipped update;
//! 4. (serial) each parameter's clipping denominator;
//! 5. write: `p = p * (1 - lr * weight_decay) - alpha / denom * u`, with `u` computed again
//!    (the same bits: the same operations on the same inputs), and a vector's `variance`.
//!
//! A 16-bit parameter with a float32 master copy (`master_weights`) is read from the copy
//! (pass 1's sum of squares too), the copy updated and the parameter written from it rounded
//! to nearest; with stochastic rounding (`bf16_stochastic_round`) pass 5 rounds each new value
//! with the random bits of its index within the parameter (`kernels::sr`), the piece's start
//! plus its place in the piece, so that neither depends on the pieces or the threads.
//!
//! # What is computed
//! torch's for-loop `_single_tensor_adafactor`, operation by operation, in the parameter's
//! compute type (`f64` for float64, `f32` otherwise: bfloat16 and float16 are computed in
//! float32 and rounded once when stored, as optirs's other rules do) for what torch computes in
//! tensors, and in `f64` for what it computes in Python floats (`step ** beta2_decay`, `rho`,
//! `alpha`, the denominator, the Python `max`/`min` that keep the first argument on NaN). The
//! sums behind torch's norms and means are accumulated in `f64` and rounded to the compute type
//! where torch's float32 reductions accumulate in float32 (see `norm`): the same value or
//! closer to the exact one, so parity with torch is within its float32 tolerance.
//!
//! # Why the bits never depend on threads or SIMD
//! The pieces are cut by element counts alone (never by the thread count): a vector's pieces
//! are [`PIECE`] elements, a matrix's are whole rows of one matrix, `max(1, PIECE / cols)` rows
//! at a time. Within a piece, a sum over a row or a run of elements adds element `i` into
//! accumulator `i % LANES`, the accumulators then added in index order; column sums add the
//! piece's rows in order. Pieces' partial results are combined in piece order on the calling
//! thread. Every other operation is a correctly rounded IEEE operation, never fused (no
//! `mul_add`, no approximate reciprocal square root), so the compiler may hold accumulators in
//! vectors of any width and every level gives the same bits.
//!
//! # What keeps the pointers valid
//! A [`Param`] holds raw addresses, vouched for by whoever builds one ([`Param::new`]): alive,
//! unmoved, aligned, of the dtype and length given, and nothing written through one of them is
//! read or written through any other address of the step. Work items borrow only their own
//! piece of a parameter and its vector state (disjoint ranges); the row and column state are
//! written on the calling thread between the parallel passes.

use std::panic::AssertUnwindSafe;

use crate::dtype::DType;
use crate::engine::{CounterSlot, Options, WriteMode, CHUNK_ELEMS};
use crate::error::{panic_message, CoreError, ErrorKind, TorchRaises};
use crate::fpenv::FlushGuard;
use crate::kernels::float::{lerp, LerpWeight};
use crate::kernels::sr::{self, SrKey};
use crate::kernels::{simd, simd::SimdLevel, Float, Storage};
use crate::pool;

/// Stands for the parameter in the core's messages; the bindings put its name in its place.
pub const PARAM: &str = "{param}";

/// The most elements of one piece (a matrix's piece is whole rows: at least one row). Smaller
/// under Miri, so that its tests cross piece boundaries on a few hundred elements.
pub const PIECE: usize = if cfg!(miri) { 64 } else { CHUNK_ELEMS };

/// Independent accumulators of a sum (as `norm`'s).
const LANES: usize = 32;

/// One param group's hyperparameters, as torch.optim.Adafactor takes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyper {
    pub lr: f64,
    pub beta2_decay: f64,
    /// `eps[0]`; None: the parameter dtype's machine epsilon (`torch.finfo(dtype).eps`).
    pub eps1: Option<f64>,
    pub eps2: f64,
    pub d: f64,
    pub weight_decay: f64,
    pub maximize: bool,
}

/// How a parameter's second moment is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Factoring {
    /// One `variance` element per parameter element (tensors of fewer than two dimensions).
    Vector,
    /// `row_var` (`batch * rows` elements) and `col_var` (`batch * cols`): a tensor of two or
    /// more dimensions seen as `batch` matrices of `rows x cols` (its last two dimensions).
    Matrix {
        batch: usize,
        rows: usize,
        cols: usize,
    },
}

/// A parameter that passed every check.
#[allow(clippy::struct_field_names)] // `param` is the parameter's memory, as in `Checked`
pub struct Param {
    dtype: DType,
    len: usize,
    param: *mut u8,
    grad: *const u8,
    factoring: Factoring,
    /// `variance`, or `row_var` and `col_var`.
    state: [*mut u8; 2],
    step: Option<CounterSlot<'static>>,
    /// The step count once this step is applied (torch's `step_t.item()` after `+= 1`).
    count: f64,
    hyper: Hyper,
    /// How the new values are written: rounded to nearest, stochastically, or from a master copy.
    write: WriteMode<u8>,
}

// SAFETY: the addresses are used as `Param::new`'s contract allows, each range by one thread at
// a time (see the module's documentation).
unsafe impl Send for Param {}
// SAFETY: as above; shared references only read.
unsafe impl Sync for Param {}

impl Param {
    /// A parameter of `len` elements of `dtype` at `param`, its gradient at `grad`, its state
    /// (`variance` at `state[0]` for [`Factoring::Vector`], else `row_var` at `state[0]` and
    /// `col_var` at `state[1]`, all of `dtype`), its step counter with the count once this step
    /// is applied, and its group's hyperparameters.
    ///
    /// # Safety
    /// Until the step that runs it returns: `param` and the state point to initialised,
    /// aligned elements of `dtype` (`len` for the parameter and `variance`, `batch * rows` and
    /// `batch * cols` for `row_var` and `col_var`), alive and unmoved, which nothing else of
    /// the step reads or writes; `grad` points to `len` such elements that nothing of the step
    /// writes.
    ///
    /// # Panics
    /// When a matrix's `batch * rows * cols` is not `len`.
    #[allow(clippy::too_many_arguments)]
    #[must_use]
    pub unsafe fn new(
        dtype: DType,
        len: usize,
        param: *mut u8,
        grad: *const u8,
        factoring: Factoring,
        state: [*mut u8; 2],
        step: Option<CounterSlot<'static>>,
        count: f64,
        hyper: Hyper,
    ) -> Param {
        if let Factoring::Matrix { batch, rows, cols } = factoring {
            assert_eq!(
                batch * rows * cols,
                len,
                "a matrix's shape covers its elements"
            );
        }
        Param {
            dtype,
            len,
            param,
            grad,
            factoring,
            state,
            step,
            count,
            hyper,
            write: WriteMode::Nearest,
        }
    }

    /// The same parameter written with stochastic rounding drawn from `key` (its offset 0: each
    /// piece's key is offset by where the piece begins).
    ///
    /// # Panics
    /// For a parameter that is not bfloat16, or one with a master copy: the bindings refuse
    /// those.
    #[must_use]
    pub fn with_stochastic_rounding(mut self, key: SrKey) -> Param {
        self.write = self.write.stochastic(self.dtype, key);
        self
    }

    /// The same parameter with a float32 master copy at `master`: the step reads the
    /// parameter's value from it (its norm too), updates it, and writes the parameter from it
    /// rounded to nearest.
    ///
    /// # Safety
    /// As [`Param::new`]: `master` points to `len` aligned float32 elements in the
    /// parameter's element order, alive and unmoved until the step returns, which nothing else
    /// of the step reads or writes.
    ///
    /// # Panics
    /// For a parameter that is not float16 or bfloat16, or one with stochastic rounding.
    #[must_use]
    pub unsafe fn with_master(mut self, master: *mut u8) -> Param {
        self.write = self.write.master(self.dtype, master);
        self
    }
}

/// `torch.finfo(dtype).eps`.
#[must_use]
pub fn finfo_eps(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f64::from(f32::EPSILON),
        DType::F64 => f64::EPSILON,
        DType::F16 => 0.000_976_562_5,
        DType::Bf16 => 0.007_812_5,
    }
}

/// Python's `max(a, b)`: `b` only when `b > a` (so `a` on NaN).
fn py_max(a: f64, b: f64) -> f64 {
    if b > a {
        b
    } else {
        a
    }
}

/// Python's `min(a, b)`: `b` only when `b < a`.
fn py_min(a: f64, b: f64) -> f64 {
    if b < a {
        b
    } else {
        a
    }
}

/// Python's `a / b` for floats: ZeroDivisionError on zero, as torch's step raises (`why`
/// completes torch's message).
fn py_div(a: f64, b: f64, why: impl FnOnce() -> String) -> Result<f64, CoreError> {
    if b == 0.0 {
        Err(CoreError::torch(
            TorchRaises::ZeroDivision,
            format!("float division by zero: {}", why()),
        ))
    } else {
        Ok(a / b)
    }
}

/// Python's `a ** b` for a positive `a`: OverflowError where the result leaves the range.
fn py_pow(a: f64, b: f64) -> Result<f64, CoreError> {
    let r = a.powf(b);
    if r.is_infinite() && a.is_finite() && b.is_finite() {
        Err(CoreError::torch(
            TorchRaises::Overflow,
            format!(
                "(34, 'Numerical result out of range'): step ** beta2_decay = {a:?} ** {b:?} \
                 for {PARAM}"
            ),
        ))
    } else {
        Ok(r)
    }
}

/// `x` rounded to the compute type of `dtype` (float32 for the 16-bit types), back in `f64`.
fn to_compute(x: f64, dtype: DType) -> f64 {
    if dtype == DType::F64 {
        x
    } else {
        f64::from(x as f32)
    }
}

/// A Python float as a float32 tensor operation takes it: torch's RuntimeError where it does
/// not fit (`value cannot be converted to type float without overflow`).
fn fits(x: f64, dtype: DType, what: &str) -> Result<(), CoreError> {
    if dtype != DType::F64 && x.is_finite() && (x as f32).is_infinite() {
        return Err(CoreError::torch(
            TorchRaises::Runtime,
            format!(
                "value cannot be converted to type float without overflow: {what} = {x:?} for \
                 {PARAM}, and {PARAM} is computed in float32"
            ),
        ));
    }
    Ok(())
}

/// What a parameter's passes need besides its arrays: per-step scalars as `f64`s holding
/// values of its compute type where torch's are tensor values.
#[derive(Clone, Debug)]
struct Scalars {
    /// `one_minus_beta2_t`, the lerp weight.
    weight: f64,
    rho: f64,
    /// `1 - lr * weight_decay`, or None without weight decay.
    decay: Option<f64>,
    eps1: f64,
    eps1_sq: f64,
    /// `numel ** 0.5`.
    sqrt_n: f64,
}

/// How the step reads each gradient: GradScaler's unscale and a clip coefficient, each rounded
/// to the gradient's dtype (as `norm::apply_factor`), then negated under `maximize`.
#[derive(Clone, Copy, Debug)]
struct GradRead<T> {
    unscale: Option<T>,
    coef: Option<T>,
    neg: bool,
}

impl<T: Float> GradRead<T> {
    #[inline(always)]
    fn read<S: Storage<Compute = T>>(&self, g: S) -> T {
        let mut x = g;
        if let Some(u) = self.unscale {
            x = S::store(x.load() / u);
        }
        if let Some(c) = self.coef {
            x = S::store(x.load() * c);
        }
        if self.neg {
            -x.load()
        } else {
            x.load()
        }
    }
}

/// `torch.clamp(x, min=lo)`: NaN in either gives NaN.
#[inline(always)]
fn clamp_min<T: Float>(x: T, lo: T) -> T {
    if x < lo || lo.is_nan() {
        lo
    } else {
        x
    }
}

/// `sum f(x)^2` over `xs`, element `i` into accumulator `i % LANES`, in `f64`.
#[inline(always)]
fn sum_sq<S: Copy>(xs: &[S], f: impl Fn(S) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            let v = f(c[j]);
            acc[j] += v * v;
        }
    }
    for (j, &x) in chunks.remainder().iter().enumerate() {
        let v = f(x);
        acc[j] += v * v;
    }
    acc.into_iter().fold(0.0, |a, b| a + b)
}

/// Generates `$name::<S>(level, args)`, which runs `$inline::<S>(args)` compiled for the
/// level's target features (the same operations, so the same bits at every level).
macro_rules! per_level {
    ($name:ident, $inline:ident, $avx512:ident, $avx2:ident, ($($arg:ident : $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        fn $avx512<S: Storage>($($arg: $ty),*) -> $ret {
            $inline::<S>($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $avx2<S: Storage>($($arg: $ty),*) -> $ret {
            $inline::<S>($($arg),*)
        }

        #[allow(clippy::too_many_arguments)]
        fn $name<S: Storage>(level: SimdLevel, $($arg: $ty),*) -> $ret {
            match level.clamped() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has the level's features (`detect`, clamped above).
                SimdLevel::Avx512 => unsafe { $avx512::<S>($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                SimdLevel::Avx2 => unsafe { $avx2::<S>($($arg),*) },
                _ => $inline::<S>($($arg),*),
            }
        }
    };
}

/// Binds `$r` to a closure reading a gradient element as the step reads it, and runs `$body`
/// once per kind of reading, each with its own closure type: the plain and negated readings
/// (no unscale, no clip) compile to loops without branches, which the compiler vectorises.
macro_rules! with_reader {
    ($read:expr, $s:ty, $r:ident => $body:expr) => {{
        let read = $read;
        if read.unscale.is_none() && read.coef.is_none() {
            if read.neg {
                let $r = |x: $s| -x.load();
                $body
            } else {
                let $r = |x: $s| x.load();
                $body
            }
        } else {
            let $r = move |x: $s| read.read(x);
            $body
        }
    }};
}

/// The lanes of a sum, added in index order.
#[inline(always)]
fn total(acc: [f64; LANES]) -> f64 {
    acc.into_iter().fold(0.0, |a, b| a + b)
}

/// Pass 1 over one piece: the sum of `p^2`; for a matrix piece (`cols > 0`), each row's sum of
/// `g^2` into `rows_out` and the piece's column sums of `g^2` into `cols_out`.
#[inline(always)]
fn reduce_inline<S: Storage>(
    p: &[S],
    master: Option<&[S::Compute]>,
    g: &[S],
    cols: usize,
    read: GradRead<S::Compute>,
    rows_out: &mut [f64],
    cols_out: &mut [f64],
) -> f64 {
    // A master copy holds the parameter's value.
    let psum = match master {
        Some(m) => sum_sq(m, |x: S::Compute| x.to_f64()),
        None => sum_sq(p, |x: S| x.load().to_f64()),
    };
    if cols > 0 {
        // One read of each row for both sums; each accumulator adds in the order `sum_sq`
        // would.
        with_reader!(read, S, rd => {
            for (row, out) in g.chunks_exact(cols).zip(rows_out.iter_mut()) {
                let mut acc = [0.0f64; LANES];
                let mut gs = row.chunks_exact(LANES);
                let mut cs = cols_out.chunks_exact_mut(LANES);
                for (gc, cc) in (&mut gs).zip(&mut cs) {
                    for j in 0..LANES {
                        let v = rd(gc[j]).to_f64();
                        let v = v * v;
                        acc[j] += v;
                        cc[j] += v;
                    }
                }
                for (j, (&x, c)) in gs.remainder().iter().zip(cs.into_remainder()).enumerate() {
                    let v = rd(x).to_f64();
                    let v = v * v;
                    acc[j] += v;
                    *c += v;
                }
                *out = total(acc);
            }
        });
    }
    psum
}

per_level!(reduce, reduce_inline, reduce_avx512, reduce_avx2,
    (p: &[S], master: Option<&[S::Compute]>, g: &[S], cols: usize, read: GradRead<S::Compute>, rows_out: &mut [f64], cols_out: &mut [f64]) -> f64);

/// A matrix piece's factors: its rows' `row_var` and its matrix's `col_var` and clamped mean
/// of `row_var`, as compute-type values.
#[derive(Clone, Copy)]
struct Factors<'a> {
    rows: &'a [f64],
    cols: &'a [f64],
    mean: f64,
}

/// The update `u` of a matrix element: `(clamp(r * c / mean, eps1^2))^-1/2 * g`.
#[inline(always)]
fn matrix_u<T: Float>(r: T, c: T, mean: T, eps1_sq: T, g: T) -> T {
    let v = clamp_min(r * c / mean, eps1_sq);
    (T::ONE / v.sqrt()) * g
}

/// The new `variance` of a vector element and its update `u`.
#[inline(always)]
fn vector_u<T: Float>(v: T, g: T, w: &LerpWeight<T>, eps1_sq: T) -> (T, T) {
    let v = lerp(v, g * g, w);
    (v, (T::ONE / clamp_min(v, eps1_sq).sqrt()) * g)
}

/// Pass 3 over one piece: the sum of `u^2` (`var`: the vector's `variance` piece, or None for
/// a matrix piece with its `factors`). Element `i` of a vector piece, or of a matrix row, goes
/// to accumulator `i % LANES`; a matrix piece's rows are added in order.
#[inline(always)]
fn update_norm_inline<S: Storage>(
    g: &[S],
    var: Option<&[S]>,
    factors: Factors<'_>,
    read: GradRead<S::Compute>,
    weight: f64,
    eps1_sq: f64,
) -> f64 {
    let eps1_sq = S::Compute::from_f64(eps1_sq);
    if let Some(var) = var {
        let w = LerpWeight::<S::Compute>::new(weight);
        return with_reader!(read, S, rd => {
            let mut acc = [0.0f64; LANES];
            let mut gs = g.chunks_exact(LANES);
            let mut vs = var.chunks_exact(LANES);
            for (gc, vc) in (&mut gs).zip(&mut vs) {
                for j in 0..LANES {
                    let u = vector_u(vc[j].load(), rd(gc[j]), &w, eps1_sq).1.to_f64();
                    acc[j] += u * u;
                }
            }
            for (j, (&x, &v)) in gs.remainder().iter().zip(vs.remainder()).enumerate() {
                let u = vector_u(v.load(), rd(x), &w, eps1_sq).1.to_f64();
                acc[j] += u * u;
            }
            total(acc)
        });
    }
    let cols = factors.cols.len();
    let mean = S::Compute::from_f64(factors.mean);
    with_reader!(read, S, rd => {
        let mut sum = 0.0f64;
        for (row, &r) in g.chunks_exact(cols).zip(factors.rows) {
            let r = S::Compute::from_f64(r);
            let mut acc = [0.0f64; LANES];
            let mut gs = row.chunks_exact(LANES);
            let mut cs = factors.cols.chunks_exact(LANES);
            for (gc, cc) in (&mut gs).zip(&mut cs) {
                for j in 0..LANES {
                    let c = S::Compute::from_f64(cc[j]);
                    let u = matrix_u(r, c, mean, eps1_sq, rd(gc[j])).to_f64();
                    acc[j] += u * u;
                }
            }
            for (j, (&x, &c)) in gs.remainder().iter().zip(cs.remainder()).enumerate() {
                let u = matrix_u(r, S::Compute::from_f64(c), mean, eps1_sq, rd(x)).to_f64();
                acc[j] += u * u;
            }
            sum += total(acc);
        }
        sum
    })
}

per_level!(update_norm, update_norm_inline, update_norm_avx512, update_norm_avx2,
    (g: &[S], var: Option<&[S]>, factors: Factors<'_>, read: GradRead<S::Compute>, weight: f64, eps1_sq: f64) -> f64);

/// What pass 5 applies to one piece.
#[derive(Clone, Copy)]
struct Apply {
    decay: Option<f64>,
    /// `-alpha / denom`, a compute-type value.
    step: f64,
    weight: f64,
    eps1_sq: f64,
}

/// Pass 5 over one piece: `p = p * decay + step * u`, and a vector's new `variance`. Without
/// weight decay the factor is 1, which changes no value (`x * 1 == x`, NaN and -0 included).
#[inline(always)]
fn apply_inline<S: Storage>(
    p: &mut [S],
    out: Out<'_, S::Compute>,
    g: &[S],
    var: Option<&mut [S]>,
    factors: Factors<'_>,
    read: GradRead<S::Compute>,
    a: Apply,
) {
    let eps1_sq = S::Compute::from_f64(a.eps1_sq);
    let step = S::Compute::from_f64(a.step);
    let decay = a.decay.map_or(S::Compute::ONE, S::Compute::from_f64);
    if !matches!(out, Out::Nearest) {
        apply_rounded(
            p,
            out,
            g,
            var,
            &factors,
            read,
            (decay, step, a.weight, eps1_sq),
        );
        return;
    }
    if let Some(var) = var {
        let w = LerpWeight::<S::Compute>::new(a.weight);
        with_reader!(read, S, rd => {
            for ((pv, &x), v) in p.iter_mut().zip(g).zip(var) {
                let (nv, u) = vector_u(v.load(), rd(x), &w, eps1_sq);
                *v = S::store(nv);
                *pv = S::store(pv.load() * decay + step * u);
            }
        });
        return;
    }
    let cols = factors.cols.len();
    let mean = S::Compute::from_f64(factors.mean);
    with_reader!(read, S, rd => {
        for ((prow, grow), &r) in p
            .chunks_exact_mut(cols)
            .zip(g.chunks_exact(cols))
            .zip(factors.rows)
        {
            let r = S::Compute::from_f64(r);
            for ((pv, &x), &c) in prow.iter_mut().zip(grow).zip(factors.cols) {
                let u = matrix_u(r, S::Compute::from_f64(c), mean, eps1_sq, rd(x));
                *pv = S::store(pv.load() * decay + step * u);
            }
        }
    });
}

/// How pass 5 writes a piece of the parameter.
enum Out<'a, C> {
    /// Rounded to nearest, from the parameter's own value.
    Nearest,
    /// Rounded stochastically with the random bits of this key (its offset: the piece's first
    /// element's index within the parameter).
    Stochastic(SrKey),
    /// From and to the piece of the master copy; the parameter rounded to nearest from it.
    Master(&'a mut [C]),
}

/// [`apply_inline`] for a piece with stochastic rounding or a master copy: the same operations
/// on each element (so the same float32 result), then written as `out` says. One element at a
/// time, by index: each element's random bits are keyed by its index.
#[inline(always)]
fn apply_rounded<S: Storage>(
    p: &mut [S],
    mut out: Out<'_, S::Compute>,
    g: &[S],
    mut var: Option<&mut [S]>,
    factors: &Factors<'_>,
    read: GradRead<S::Compute>,
    (decay, step, weight, eps1_sq): (S::Compute, S::Compute, f64, S::Compute),
) {
    let w = LerpWeight::<S::Compute>::new(weight);
    let cols = factors.cols.len();
    let mean = S::Compute::from_f64(factors.mean);
    with_reader!(read, S, rd => {
        for i in 0..p.len() {
            let u = if let Some(var) = var.as_deref_mut() {
                let (nv, u) = vector_u(var[i].load(), rd(g[i]), &w, eps1_sq);
                var[i] = S::store(nv);
                u
            } else {
                let r = S::Compute::from_f64(factors.rows[i / cols]);
                let c = S::Compute::from_f64(factors.cols[i % cols]);
                matrix_u(r, c, mean, eps1_sq, rd(g[i]))
            };
            match &mut out {
                Out::Master(m) => {
                    let x = m[i] * decay + step * u;
                    m[i] = x;
                    p[i] = S::store(x);
                }
                Out::Stochastic(key) => {
                    p[i] = S::store_sr(p[i].load() * decay + step * u, sr::bits(*key, i));
                }
                Out::Nearest => p[i] = S::store(p[i].load() * decay + step * u),
            }
        }
    });
}

per_level!(apply, apply_inline, apply_avx512, apply_avx2,
    (p: &mut [S], out: Out<'_, S::Compute>, g: &[S], var: Option<&mut [S]>, factors: Factors<'_>, read: GradRead<S::Compute>, a: Apply) -> ());

/// One piece of one parameter: elements `start..start + len`; for a matrix, rows
/// `row0..row0 + len / cols` of the flattened `batch * rows` (all of matrix `batch_index`).
#[derive(Clone, Copy, Debug)]
struct Piece {
    param: usize,
    start: usize,
    len: usize,
    row0: usize,
    matrix: usize,
}

/// Every parameter's pieces, in order.
fn pieces(params: &[Param]) -> Vec<Piece> {
    let mut out = Vec::new();
    for (i, p) in params.iter().enumerate() {
        match p.factoring {
            Factoring::Vector => {
                let mut at = 0;
                while at < p.len {
                    let n = PIECE.min(p.len - at);
                    out.push(Piece {
                        param: i,
                        start: at,
                        len: n,
                        row0: 0,
                        matrix: 0,
                    });
                    at += n;
                }
            }
            Factoring::Matrix { batch, rows, cols } => {
                let per = (PIECE / cols.max(1)).max(1);
                for b in 0..batch {
                    let mut r = 0;
                    while r < rows {
                        let k = per.min(rows - r);
                        out.push(Piece {
                            param: i,
                            start: (b * rows + r) * cols,
                            len: k * cols,
                            row0: b * rows + r,
                            matrix: b,
                        });
                        r += k;
                    }
                }
            }
        }
    }
    out
}

/// `len` elements of `S` at element `at` of `base`.
///
/// # Safety
/// `base` points to at least `at + len` initialised, aligned elements of `S`, alive for `'a`,
/// none written meanwhile.
unsafe fn part<'a, S>(base: *const u8, at: usize, len: usize) -> &'a [S] {
    if len == 0 {
        &[]
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(base.cast::<S>().add(at), len) }
    }
}

/// As [`part`], to write: no other borrow of the range is alive for `'a`.
///
/// # Safety
/// As [`part`], and nothing else reads or writes the range meanwhile.
unsafe fn part_mut<'a, S>(base: *mut u8, at: usize, len: usize) -> &'a mut [S] {
    if len == 0 {
        &mut []
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(base.cast::<S>().add(at), len) }
    }
}

/// Runs `$body` with `S` bound to the storage type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $s:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $s = f32;
                $body
            }
            DType::F64 => {
                type $s = f64;
                $body
            }
            DType::F16 => {
                type $s = half::f16;
                $body
            }
            DType::Bf16 => {
                type $s = half::bf16;
                $body
            }
        }
    };
}

fn grad_read<T: Float>(options: &Options, maximize: bool) -> GradRead<T> {
    GradRead {
        unscale: options.grad_factor.unscale.map(T::from_f64),
        coef: options.grad_factor.coef.map(T::from_f64),
        neg: maximize,
    }
}

/// What pass 2 made of one parameter.
#[derive(Default)]
struct Mid {
    alpha: f64,
    /// The new `row_var` and `col_var` (compute-type values), and each matrix's clamped mean.
    rows: Vec<f64>,
    cols: Vec<f64>,
    means: Vec<f64>,
}

impl Mid {
    fn factors(&self, piece: &Piece, p: &Param) -> Factors<'_> {
        match p.factoring {
            Factoring::Vector => Factors {
                rows: &[],
                cols: &[],
                mean: 0.0,
            },
            Factoring::Matrix { cols, .. } => Factors {
                rows: &self.rows[piece.row0..piece.row0 + piece.len / cols],
                cols: &self.cols[piece.matrix * cols..(piece.matrix + 1) * cols],
                mean: self.means[piece.matrix],
            },
        }
    }
}

/// A step ready to run: every parameter checked, every per-step scalar that can fail computed.
pub struct Work {
    params: Vec<Param>,
    scalars: Vec<Scalars>,
    options: Options,
    level: SimdLevel,
}

/// Computes the per-step scalars that do not depend on the arrays' values, refusing (with the
/// exception torch's step raises) what torch's step fails on; the last point where a step can
/// fail, before anything is written.
///
/// # Errors
/// ZeroDivisionError for an empty parameter or `d` of 0 (torch divides by `numel ** 0.5` and
/// by `numel ** 0.5 * d`), OverflowError where `step ** beta2_decay` overflows, RuntimeError
/// where a float32 operation gets a scalar out of float32's range, ValueError for
/// `flush_denormals` where it is not available. The error names no parameter: the caller
/// locates it by the index in its `Err` (`(index, error)`, the index None for options).
pub fn prepare(params: Vec<Param>, options: &Options) -> Result<Work, (Option<usize>, CoreError)> {
    let mut scalars = Vec::with_capacity(params.len());
    for (i, p) in params.iter().enumerate() {
        scalars.push(scalars_of(p).map_err(|e| (Some(i), e))?);
    }
    if options.flush_denormals && !FlushGuard::supported() {
        return Err((
            None,
            CoreError::new(
                ErrorKind::Value,
                "flush_denormals is only available on x86-64 and aarch64".to_owned(),
            )
            .arg("flush_denormals"),
        ));
    }
    Ok(Work {
        params,
        scalars,
        options: options.clone(),
        level: simd::active(),
    })
}

fn scalars_of(p: &Param) -> Result<Scalars, CoreError> {
    let h = &p.hyper;
    let step = p.count;
    let weight = py_pow(step, h.beta2_decay).map_err(|e| e.arg("beta2_decay"))?;
    // The count is at least 1 here (the bindings refuse a negative one).
    let rho = py_min(h.lr, 1.0 / step.powf(0.5));
    let sqrt_n = (p.len as f64).powf(0.5);
    // torch divides the parameter's norm by `numel ** 0.5` and the update's by that times d.
    py_div(0.0, sqrt_n, || {
        format!("{PARAM} has no elements, and torch.optim.Adafactor divides by numel ** 0.5")
    })?;
    py_div(0.0, sqrt_n * h.d, || {
        format!(
            "d = {:?} for {PARAM}, and torch.optim.Adafactor divides by numel ** 0.5 * d",
            h.d
        )
    })
    .map_err(|e| e.arg("d"))?;
    let eps1 = h.eps1.unwrap_or_else(|| finfo_eps(p.dtype));
    let eps1_sq = eps1 * eps1;
    // A factored parameter's mean is clamped to eps1 itself; every update to eps1 ** 2.
    if matches!(p.factoring, Factoring::Matrix { .. }) {
        fits(eps1, p.dtype, "eps[0]").map_err(|e| e.arg("eps"))?;
    }
    fits(eps1_sq, p.dtype, "eps[0] ** 2").map_err(|e| e.arg("eps"))?;
    fits(weight, p.dtype, "step ** beta2_decay").map_err(|e| e.arg("beta2_decay"))?;
    // torch multiplies by it (`param.mul_`), which takes any float: inf where it overflows.
    let decay = (h.weight_decay != 0.0).then_some(1.0 - h.lr * h.weight_decay);
    Ok(Scalars {
        weight,
        rho,
        decay,
        eps1,
        eps1_sq,
        sqrt_n,
    })
}

/// Whether every element of a parameter's gradient is finite.
fn grad_is_finite(p: &Param) -> bool {
    // SAFETY: `Param::new`'s contract: `len` elements of the dtype, not written by the step.
    unsafe {
        by_dtype!(p.dtype, S => part::<S>(p.grad, 0, p.len).iter().all(|x| x.load().is_finite()))
    }
}

impl Work {
    /// Updates every parameter and its state; returns whether the update was applied (false:
    /// skipped for a non-finite gradient under `skip_nonfinite`, nothing written).
    ///
    /// # Errors
    /// RuntimeError, with nothing written, where torch's step raises on a value only the
    /// arrays' contents decide: a float32 (or 16-bit) parameter's step size `-alpha / denom`
    /// out of float32's range (`param.add_(update, alpha=...)`; `eps[1]` of 1e300 makes it).
    /// As [`prepare`]'s, with the parameter's index.
    ///
    /// # Panics
    /// When a work item panicked (an internal error): re-raised once the pass has run, saying
    /// the step stopped part-way; the step counters are not advanced then.
    pub fn run(self) -> Result<bool, (Option<usize>, CoreError)> {
        let Work {
            mut params,
            scalars,
            options,
            level,
        } = self;
        let total: usize = params.iter().map(|p| p.len).sum();
        if options.skip_nonfinite && !pool::all(&params, total, grad_is_finite) {
            return Ok(false);
        }
        let flush = options.flush_denormals;
        let work = pieces(&params);
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let reduced = reduce_pass(&params, &work, &options, level, flush);
            let mids = factor_pass(&params, &scalars, &work, &reduced);
            let norms = update_norm_pass(&params, &scalars, &work, &mids, &options, level, flush);
            let mut sums = vec![0.0f64; params.len()];
            for (piece, s) in work.iter().zip(&norms) {
                sums[piece.param] += *s;
            }
            let mut applies = Vec::with_capacity(params.len());
            for (i, ((p, k), m)) in params.iter().zip(&scalars).zip(&mids).enumerate() {
                let unorm = to_compute(sums[i].sqrt(), p.dtype);
                let denom = py_max(1.0, unorm / (k.sqrt_n * p.hyper.d));
                let step = -m.alpha / denom;
                fits(step, p.dtype, "-alpha / denom, the step size,")
                    .map_err(|e| (Some(i), e.arg("eps")))?;
                applies.push(Apply {
                    decay: k.decay,
                    step: to_compute(step, p.dtype),
                    weight: k.weight,
                    eps1_sq: k.eps1_sq,
                });
            }
            // Nothing has been written before this point.
            store_factors(&params, &mids);
            apply_pass(&params, &work, &mids, &applies, &options, level, flush);
            Ok(())
        }));
        match ran {
            Err(payload) => std::panic::resume_unwind(Box::new(format!(
                "{}; the Adafactor step stopped part-way: parameters and state of this step \
                 may be partly updated while their step counts are not (restore them from a \
                 checkpoint)",
                panic_message(payload.as_ref())
            ))),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(())) => {}
        }
        for p in &mut params {
            if let Some(slot) = p.step.take() {
                slot.write();
            }
        }
        Ok(true)
    }
}

/// Pass 1's result for one piece.
struct Reduced {
    psum: f64,
    rows: Vec<f64>,
    cols: Vec<f64>,
}

fn reduce_pass(
    params: &[Param],
    work: &[Piece],
    options: &Options,
    level: SimdLevel,
    flush: bool,
) -> Vec<Reduced> {
    let total: usize = params.iter().map(|p| p.len).sum();
    let mut out: Vec<Reduced> = work
        .iter()
        .map(|piece| {
            let (nr, nc) = match params[piece.param].factoring {
                Factoring::Vector => (0, 0),
                Factoring::Matrix { cols, .. } => (piece.len / cols, cols),
            };
            Reduced {
                psum: 0.0,
                rows: vec![0.0; nr],
                cols: vec![0.0; nc],
            }
        })
        .collect();
    let items: Vec<_> = work.iter().zip(out.iter_mut()).collect();
    pool::for_each(items, total, |(piece, r)| {
        let _flush = FlushGuard::new(flush);
        let p = &params[piece.param];
        let cols = r.cols.len();
        // SAFETY: `Param::new`'s contract (and `with_master`'s for the master copy, `len`
        // float32s); the piece lies within the parameter, and pass 1 only reads.
        r.psum = unsafe {
            by_dtype!(p.dtype, S => reduce::<S>(
                level,
                part::<S>(p.param, piece.start, piece.len),
                p.write
                    .master_copy()
                    .map(|m| part::<<S as Storage>::Compute>(m, piece.start, piece.len)),
                part::<S>(p.grad, piece.start, piece.len),
                cols,
                grad_read(options, p.hyper.maximize),
                &mut r.rows,
                &mut r.cols,
            ))
        };
    });
    out
}

/// Pass 2: per parameter, `alpha` and the new row and column factors (written to the state).
fn factor_pass(
    params: &[Param],
    scalars: &[Scalars],
    work: &[Piece],
    reduced: &[Reduced],
) -> Vec<Mid> {
    let mut mids: Vec<Mid> = params.iter().map(|_| Mid::default()).collect();
    let mut psums = vec![0.0f64; params.len()];
    for (i, p) in params.iter().enumerate() {
        if let Factoring::Matrix { batch, rows, cols } = p.factoring {
            mids[i].rows = vec![0.0; batch * rows];
            mids[i].cols = vec![0.0; batch * cols];
        }
    }
    // In piece order, whatever thread reduced each piece.
    for (piece, r) in work.iter().zip(reduced) {
        psums[piece.param] += r.psum;
        let m = &mut mids[piece.param];
        if let Factoring::Matrix { cols, .. } = params[piece.param].factoring {
            m.rows[piece.row0..piece.row0 + r.rows.len()].copy_from_slice(&r.rows);
            for (acc, s) in m.cols[piece.matrix * cols..(piece.matrix + 1) * cols]
                .iter_mut()
                .zip(&r.cols)
            {
                *acc += *s;
            }
        }
    }
    for (i, p) in params.iter().enumerate() {
        let k = &scalars[i];
        let pnorm = to_compute(psums[i].sqrt(), p.dtype);
        let m = &mut mids[i];
        m.alpha = py_max(p.hyper.eps2, pnorm / k.sqrt_n) * k.rho;
        if let Factoring::Matrix { batch, rows, cols } = p.factoring {
            // SAFETY: `Param::new`'s contract: `row_var` and `col_var` hold `batch * rows` and
            // `batch * cols` elements that nothing of the step writes before `store_factors`.
            unsafe {
                by_dtype!(p.dtype, S => factor_matrix::<S>(
                    p, k, m, batch, rows, cols,
                    part::<S>(p.state[0], 0, batch * rows),
                    part::<S>(p.state[1], 0, batch * cols),
                ));
            }
        }
    }
    mids
}

/// The new `row_var`, `col_var` (kept in `m`, stored by [`store_factors`]) and clamped means
/// of one factored parameter from its sums of squares (in `m.rows`, `m.cols` on entry), as
/// torch computes them:
/// `row_var.lerp_(vector_norm(g, dim=-1).square_().div_(cols), w)`, the same over columns,
/// then `row_var.mean(dim=-2).clamp_(min=eps1)`.
#[allow(clippy::too_many_arguments)]
fn factor_matrix<S: Storage>(
    p: &Param,
    k: &Scalars,
    m: &mut Mid,
    batch: usize,
    rows: usize,
    cols: usize,
    row_var: &[S],
    col_var: &[S],
) {
    type C<S> = <S as Storage>::Compute;
    let w = LerpWeight::<C<S>>::new(k.weight);
    let mean_sq = |sum: f64, n: usize| {
        // vector_norm in the tensor's type, squared, divided by the count, each rounded.
        let norm = C::<S>::from_f64(to_compute(sum.sqrt(), p.dtype));
        norm * norm / C::<S>::from_f64(n as f64)
    };
    for (sum, v) in m.rows.iter_mut().zip(row_var) {
        *sum = lerp(v.load(), mean_sq(*sum, cols), &w).to_f64();
    }
    for (sum, v) in m.cols.iter_mut().zip(col_var) {
        *sum = lerp(v.load(), mean_sq(*sum, rows), &w).to_f64();
    }
    let eps1 = C::<S>::from_f64(k.eps1);
    m.means = (0..batch)
        .map(|b| {
            // torch's CPU mean: the sum in the tensor's type, then divided by the count.
            let sum: f64 = m.rows[b * rows..(b + 1) * rows].iter().sum();
            let mean = C::<S>::from_f64(to_compute(sum, p.dtype)) / C::<S>::from_f64(rows as f64);
            clamp_min(mean, eps1).to_f64()
        })
        .collect();
}

/// Writes every factored parameter's new `row_var` and `col_var` (their compute-type values,
/// rounded to the storage type).
fn store_factors(params: &[Param], mids: &[Mid]) {
    for (p, m) in params.iter().zip(mids) {
        if let Factoring::Matrix { batch, rows, cols } = p.factoring {
            // SAFETY: `Param::new`'s contract: `row_var` and `col_var` hold `batch * rows` and
            // `batch * cols` elements that nothing else of the step touches; no work item is
            // running.
            unsafe {
                by_dtype!(p.dtype, S => {
                    let store = |dst: &mut [S], src: &[f64]| {
                        for (d, &x) in dst.iter_mut().zip(src) {
                            *d = S::store(<S as Storage>::Compute::from_f64(x));
                        }
                    };
                    store(part_mut::<S>(p.state[0], 0, batch * rows), &m.rows);
                    store(part_mut::<S>(p.state[1], 0, batch * cols), &m.cols);
                });
            }
        }
    }
}

fn update_norm_pass(
    params: &[Param],
    scalars: &[Scalars],
    work: &[Piece],
    mids: &[Mid],
    options: &Options,
    level: SimdLevel,
    flush: bool,
) -> Vec<f64> {
    let total: usize = params.iter().map(|p| p.len).sum();
    let mut out = vec![0.0f64; work.len()];
    let items: Vec<_> = work.iter().zip(out.iter_mut()).collect();
    pool::for_each(items, total, |(piece, sum)| {
        let _flush = FlushGuard::new(flush);
        let p = &params[piece.param];
        let k = &scalars[piece.param];
        let factors = mids[piece.param].factors(piece, p);
        // SAFETY: `Param::new`'s contract; the piece lies within the parameter; this pass only
        // reads.
        *sum = unsafe {
            by_dtype!(p.dtype, S => update_norm::<S>(
                level,
                part::<S>(p.grad, piece.start, piece.len),
                match p.factoring {
                    Factoring::Vector => Some(part::<S>(p.state[0], piece.start, piece.len)),
                    Factoring::Matrix { .. } => None,
                },
                factors,
                grad_read(options, p.hyper.maximize),
                k.weight,
                k.eps1_sq,
            ))
        };
    });
    out
}

fn apply_pass(
    params: &[Param],
    work: &[Piece],
    mids: &[Mid],
    applies: &[Apply],
    options: &Options,
    level: SimdLevel,
    flush: bool,
) {
    let total: usize = params.iter().map(|p| p.len).sum();
    pool::for_each(work.to_vec(), total, |piece| {
        let _flush = FlushGuard::new(flush);
        let p = &params[piece.param];
        let factors = mids[piece.param].factors(&piece, p);
        // SAFETY: `Param::new`'s contract (and `with_master`'s); the pieces of one step never
        // overlap, so each range of the parameter, of its `variance` and of its master copy is
        // borrowed by this work item alone.
        unsafe {
            by_dtype!(p.dtype, S => apply::<S>(
                level,
                part_mut::<S>(p.param, piece.start, piece.len),
                match p.write {
                    WriteMode::Stochastic(key) => Out::Stochastic(key.advanced(piece.start)),
                    WriteMode::Master(m) => Out::Master(part_mut::<<S as Storage>::Compute>(
                        m,
                        piece.start,
                        piece.len,
                    )),
                    WriteMode::Nearest => Out::Nearest,
                },
                part::<S>(p.grad, piece.start, piece.len),
                match p.factoring {
                    Factoring::Vector => Some(part_mut::<S>(p.state[0], piece.start, piece.len)),
                    Factoring::Matrix { .. } => None,
                },
                factors,
                grad_read(options, p.hyper.maximize),
                applies[piece.param],
            ));
        }
    });
}

#[cfg(test)]
mod tests;
