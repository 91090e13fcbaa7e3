//! The step engine: parameters that passed every check ([`Checked`]) cut into work items of
//! [`CHUNK_ELEMS`] elements, run over the pool, then the step counters advanced.
//!
//! Nothing here knows of Python. The bindings validate every array, build each [`Checked`]
//! (an `unsafe` constructor: they vouch for its memory), pass the overlap check
//! ([`crate::overlap`]), [`prepare`] the work while they still hold the interpreter, and
//! [`Work::run`] it with the interpreter released (`py.detach(|| work.run())`). [`execute`]
//! does both, for callers without an interpreter to release (tests).
//!
//! # What keeps the pointers valid
//! A [`Checked`] holds raw addresses. Whoever builds one promises (see [`Checked::new`]) that
//! each points to the memory of an array that stays alive, unmoved, until the step returns,
//! of the dtype and length given, aligned, and that no byte written through one is read or
//! written through any other address of the step (the overlap check). The work items are
//! slices made from those addresses ([`slices`]), so they never alias. Another thread may
//! still change what an array *contains* during a step (writing into a gradient or parameter
//! by hand): that is a data race on plain floats, which can give meaningless numbers for those
//! elements but cannot touch memory outside the arrays.
//!
//! # A step that fails part-way
//! Validation errors come before any write. A panic after the work began (an internal error)
//! is re-raised saying the step stopped part-way: every work item but the one that panicked
//! has run, and the step counters have not been advanced, so those parameters and their state
//! may be partly updated. The process and the pool stay usable.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::dtype::DType;
use crate::error::{panic_message, CoreError};
use crate::fpenv::FlushGuard;
use crate::kernels::adam::AdamScalars;
use crate::kernels::adam8bit::{self, Q8Slices};
use crate::kernels::lanes::Rounding;
use crate::kernels::sr::SrKey;
use crate::kernels::{simd, Rule, Slices, Storage};
use crate::norm::{self, GradFactor};
use crate::pool;
use crate::rules::{RuleOf, MAX_SCALARS};
use crate::value_err;

/// Elements per work item: a chunk's parameter, gradient and state stay within L2 together.
pub const CHUNK_ELEMS: usize = 1 << 14;

/// A parameter that passed every check: where its arrays' elements are, and what to do.
///
/// Addresses, not borrows: the overlap check over every array of the step is stricter than
/// rust-numpy's borrow tracking, and skipping five tracked borrows per parameter is most of
/// the per-parameter cost of a step over many small tensors.
pub struct Checked {
    dtype: DType,
    /// The state buffers' dtype: `dtype`, or bfloat16 under `state_dtype`.
    state_dtype: DType,
    len: usize,
    param: *mut u8,
    grad: *const u8,
    bufs: [Option<*mut u8>; 3],
    /// The step counter and its value once this step is applied. `'static` stands for "this
    /// step": the counter's array is held alive by the caller until the step returns.
    step: Option<CounterSlot<'static>>,
    /// Where the rule's per-parameter scalar state (`RuleSpec::scalars`) gets its new values.
    scalars: [Option<CounterSlot<'static>>; MAX_SCALARS],
    rule: RuleOf,
    /// How the new values are written: rounded to nearest, stochastically, or from a master copy.
    write: WriteMode<u8>,
}

impl Checked {
    /// A parameter of `len` elements of `dtype` at `param`, its gradient at `grad`, the state
    /// buffers its rule takes (in the rule table's order) at `bufs`, its step counter, and the
    /// per-step scalars `rule` (float64 scalars for float64, float32 ones otherwise).
    ///
    /// # Safety
    /// Until the step that runs it returns: `param` and every `Some` of `bufs` point to `len`
    /// initialised, aligned elements of `dtype`, alive and unmoved, which nothing else of the
    /// step reads or writes (nor another thread writes through a Rust reference); `grad` points
    /// to `len` such elements that nothing of the step writes. Nothing is required of the
    /// addresses when `len` is 0.
    #[must_use]
    pub unsafe fn new(
        dtype: DType,
        len: usize,
        param: *mut u8,
        grad: *const u8,
        bufs: [Option<*mut u8>; 3],
        step: Option<CounterSlot<'static>>,
        rule: RuleOf,
    ) -> Checked {
        Checked {
            dtype,
            state_dtype: dtype,
            len,
            param,
            grad,
            bufs,
            step,
            scalars: [None, None],
            rule,
            write: WriteMode::Nearest,
        }
    }

    /// The same, with the slots ([`scalar_slot`]) where the rule's per-parameter scalar state
    /// gets its new values once the step has run, as the step counter does.
    #[must_use]
    pub fn with_scalars(mut self, scalars: [Option<CounterSlot<'static>>; MAX_SCALARS]) -> Checked {
        self.scalars = scalars;
        self
    }
}

impl Checked {
    /// The same parameter with its state buffers of `state_dtype` (bfloat16 for a float32,
    /// float16 or bfloat16 parameter; the parameter's own dtype for any).
    ///
    /// # Safety
    /// As [`Checked::new`], with every `Some` of `bufs` pointing to `len` elements of
    /// `state_dtype` rather than of the parameter's dtype.
    ///
    /// # Panics
    /// For a pair of dtypes the kernels are not compiled for (a float64 parameter with
    /// bfloat16 state): the bindings refuse those.
    #[must_use]
    pub unsafe fn with_state_dtype(mut self, state_dtype: DType) -> Checked {
        assert!(
            state_dtype == self.dtype
                || (state_dtype == DType::Bf16 && matches!(self.dtype, DType::F32 | DType::F16)),
            "no kernel for {} parameters with {} state",
            self.dtype.name(),
            state_dtype.name()
        );
        self.state_dtype = state_dtype;
        self
    }

    /// The same parameter written with stochastic rounding drawn from `key` (its offset 0: the
    /// work items' keys are offset by where they begin).
    ///
    /// # Panics
    /// For a parameter that is not bfloat16, or one with a master copy: the bindings refuse
    /// those.
    #[must_use]
    pub fn with_stochastic_rounding(mut self, key: SrKey) -> Checked {
        self.write = self.write.stochastic(self.dtype, key);
        self
    }

    /// The same parameter with a float32 master copy at `master`: the step reads and writes
    /// it, and writes the parameter from it rounded to nearest.
    ///
    /// # Safety
    /// As [`Checked::new`]: `master` points to `len` aligned float32 elements, alive and
    /// unmoved until the step returns, which nothing else of the step reads or writes.
    ///
    /// # Panics
    /// For a parameter that is not float16 or bfloat16, or one with stochastic rounding.
    #[must_use]
    pub unsafe fn with_master(mut self, master: *mut u8) -> Checked {
        self.write = self.write.master(self.dtype, master);
        self
    }
}

/// How a parameter's new values are written, shared by [`Checked`], [`CheckedQ8`] and
/// Adafactor's `Param`: rounded to nearest, with stochastic rounding drawn from a key
/// (bfloat16 only), or through a float32 master copy of `M`s at the address given (float16
/// and bfloat16 only). The address is only held here: the `with_master` constructor that
/// takes it is `unsafe` and states what it must point to.
#[derive(Clone, Copy)]
pub(crate) enum WriteMode<M> {
    Nearest,
    Stochastic(SrKey),
    Master(*mut M),
}

impl<M> WriteMode<M> {
    /// Stochastic rounding drawn from `key`, for a parameter of `dtype`.
    ///
    /// # Panics
    /// For a parameter that is not bfloat16, or one with a master copy: the bindings refuse
    /// those.
    pub(crate) fn stochastic(self, dtype: DType, key: SrKey) -> WriteMode<M> {
        assert!(
            dtype == DType::Bf16 && !matches!(self, WriteMode::Master(_)),
            "stochastic rounding is for bfloat16 parameters without a master copy"
        );
        WriteMode::Stochastic(key)
    }

    /// The master copy at `master`, for a parameter of `dtype`.
    ///
    /// # Panics
    /// For a parameter that is not float16 or bfloat16, or one with stochastic rounding.
    pub(crate) fn master(self, dtype: DType, master: *mut M) -> WriteMode<M> {
        assert!(
            matches!(dtype, DType::Bf16 | DType::F16) && !matches!(self, WriteMode::Stochastic(_)),
            "a master copy is for float16 and bfloat16 parameters, without stochastic rounding"
        );
        WriteMode::Master(master)
    }

    /// The master copy's address, if there is one.
    pub(crate) fn master_copy(self) -> Option<*mut M> {
        match self {
            WriteMode::Master(m) => Some(m),
            WriteMode::Nearest | WriteMode::Stochastic(_) => None,
        }
    }
}

/// An 8-bit Adam parameter that passed every check (see [`adam8bit`]): where its arrays are.
pub struct CheckedQ8 {
    dtype: DType,
    len: usize,
    block: usize,
    param: *mut u8,
    grad: *const u8,
    /// `exp_avg` and `exp_avg_sq` codes (`len` bytes each), then their absmaxes (one float32
    /// per block each).
    codes: [*mut u8; 2],
    absmax: [*mut f32; 2],
    step: Option<CounterSlot<'static>>,
    rule: AdamScalars<f32>,
    /// How the new values are written: rounded to nearest, stochastically, or from a master copy.
    write: WriteMode<f32>,
}

impl CheckedQ8 {
    /// A parameter of `len` elements of `dtype` (float32, float16 or bfloat16) at `param`, its
    /// gradient at `grad`, its moments' codes and per-block absmaxes, its step counter and the
    /// per-step scalars.
    ///
    /// # Safety
    /// As [`Checked::new`]: until the step returns, `param` and `grad` point to `len` elements
    /// of `dtype`, each of `codes` to `len` bytes and each of `absmax` to `len.div_ceil(block)`
    /// float32s, aligned, alive and unmoved, none written through any other address of the
    /// step (the gradient only read).
    ///
    /// # Panics
    /// For a float64 parameter, or a block size outside `1..=adam8bit::MAX_BLOCK`.
    #[must_use]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn new(
        dtype: DType,
        len: usize,
        block: usize,
        param: *mut u8,
        grad: *const u8,
        codes: [*mut u8; 2],
        absmax: [*mut f32; 2],
        step: Option<CounterSlot<'static>>,
        rule: AdamScalars<f32>,
    ) -> CheckedQ8 {
        assert!(
            dtype != DType::F64,
            "8-bit state is for float32, float16 and bfloat16"
        );
        assert!(
            (1..=adam8bit::MAX_BLOCK).contains(&block),
            "block size out of range"
        );
        CheckedQ8 {
            dtype,
            len,
            block,
            param,
            grad,
            codes,
            absmax,
            step,
            rule,
            write: WriteMode::Nearest,
        }
    }

    /// The same parameter written with stochastic rounding drawn from `key` (its offset 0: the
    /// work items' keys are offset by where they begin).
    ///
    /// # Panics
    /// For a parameter that is not bfloat16, or one with a master copy: the bindings refuse
    /// those.
    #[must_use]
    pub fn with_stochastic_rounding(mut self, key: SrKey) -> CheckedQ8 {
        self.write = self.write.stochastic(self.dtype, key);
        self
    }

    /// The same parameter with a float32 master copy at `master`: the step reads and writes
    /// it, and writes the parameter from it rounded to nearest.
    ///
    /// # Safety
    /// As [`CheckedQ8::new`]: `master` points to `len` aligned float32 elements, alive and
    /// unmoved until the step returns, which nothing else of the step reads or writes.
    ///
    /// # Panics
    /// For a parameter that is not float16 or bfloat16, or one with stochastic rounding.
    #[must_use]
    pub unsafe fn with_master(mut self, master: *mut f32) -> CheckedQ8 {
        self.write = self.write.master(self.dtype, master);
        self
    }

    /// # Safety
    /// `self` satisfies [`CheckedQ8::new`]'s contract for `'a`, with `S` its dtype.
    unsafe fn slices<'a, S>(&self) -> Q8Slices<'a, S> {
        #[allow(clippy::cast_ptr_alignment)] // the constructor's caller vouches for alignment
        unsafe fn mk<'a, T>(p: *mut T, len: usize) -> &'a mut [T] {
            if len == 0 {
                &mut []
            } else {
                unsafe { std::slice::from_raw_parts_mut(p, len) }
            }
        }
        let blocks = self.len.div_ceil(self.block);
        unsafe {
            Q8Slices {
                param: mk(self.param.cast::<S>(), self.len),
                grad: mk(self.grad.cast_mut().cast::<S>(), self.len),
                exp_avg: mk(self.codes[0], self.len),
                exp_avg_sq: mk(self.codes[1], self.len),
                exp_avg_absmax: mk(self.absmax[0], blocks),
                exp_avg_sq_absmax: mk(self.absmax[1], blocks),
                block: self.block,
                rounding: match self.write {
                    WriteMode::Stochastic(key) => Rounding::Stochastic(key),
                    WriteMode::Master(m) => Rounding::Master(mk(m, self.len)),
                    WriteMode::Nearest => Rounding::Nearest,
                },
            }
        }
    }
}

/// Where a counter's (or another 0-d state value's) new value goes once every check has passed.
pub enum CounterSlot<'a> {
    F32(&'a mut f32, f32),
    F64(&'a mut f64, f64),
    F16(&'a mut half::f16, half::f16),
    Bf16(&'a mut half::bf16, half::bf16),
}

impl CounterSlot<'_> {
    pub(crate) fn write(self) {
        match self {
            CounterSlot::F32(slot, v) => *slot = v,
            CounterSlot::F64(slot, v) => *slot = v,
            CounterSlot::F16(slot, v) => *slot = v,
            CounterSlot::Bf16(slot, v) => *slot = v,
        }
    }
}

/// The value of the 0-d state scalar of `dtype` at `p` (NAdam's `mu_product`, ASGD's `eta`
/// and `mu`), as torch's `.item()` reads it.
///
/// # Safety
/// `p` points to one aligned, initialised element of that dtype, which nothing else of the
/// step writes.
#[allow(clippy::cast_ptr_alignment)] // the caller guarantees the alignment
#[must_use]
pub unsafe fn scalar_read(p: *const u8, dtype: DType) -> f64 {
    unsafe {
        match dtype {
            DType::F32 => f64::from(*p.cast::<f32>()),
            DType::F64 => *p.cast::<f64>(),
            DType::F16 => f64::from((*p.cast::<half::f16>()).load()),
            DType::Bf16 => f64::from((*p.cast::<half::bf16>()).load()),
        }
    }
}

/// Where the 0-d state scalar of `dtype` at `p` gets `value` once the step has run. `value` is
/// what the rule computed for that storage (`Hyper::scalars_after`): exact in float64 and
/// float32; float16 and bfloat16 round it once from float32, as torch's ops on such a 0-d
/// tensor compute in float32.
///
/// # Safety
/// As [`scalar_read`], and the element stays alive, read and written by nothing else of the
/// step, until the step returns.
#[allow(clippy::cast_ptr_alignment, clippy::cast_possible_truncation)]
#[must_use]
pub unsafe fn scalar_slot(p: *mut u8, dtype: DType, value: f64) -> CounterSlot<'static> {
    unsafe {
        match dtype {
            DType::F32 => CounterSlot::F32(&mut *p.cast::<f32>(), value as f32),
            DType::F64 => CounterSlot::F64(&mut *p.cast::<f64>(), value),
            DType::F16 => {
                CounterSlot::F16(&mut *p.cast::<half::f16>(), Storage::store(value as f32))
            }
            DType::Bf16 => {
                CounterSlot::Bf16(&mut *p.cast::<half::bf16>(), Storage::store(value as f32))
            }
        }
    }
}

/// The step counter at `p` (float64 when `wide`, else float32): where its new value goes, its
/// value now, and its value once this step is applied (`step_t += 1` in the counter's dtype,
/// read back as torch's `step_t.item()` does).
///
/// # Safety
/// `p` points to one aligned, initialised element of that dtype, which nothing else of the
/// step reads or writes and which stays alive until the step returns.
pub unsafe fn counter_at(p: *mut u8, wide: bool) -> (CounterSlot<'static>, f64, f64) {
    #[allow(clippy::cast_ptr_alignment)] // the caller guarantees the alignment
    unsafe {
        if wide {
            let p = p.cast::<f64>();
            // Read before the `&mut` is made: a read through `p` after it would invalidate it
            // (Stacked Borrows; found by Miri).
            let old = *p;
            let new = old + 1.0;
            (CounterSlot::F64(&mut *p, new), old, new)
        } else {
            let p = p.cast::<f32>();
            let old = *p;
            let new = old + 1.0;
            (
                CounterSlot::F32(&mut *p, new),
                f64::from(old),
                f64::from(new),
            )
        }
    }
}

/// One piece of work for a thread: a chunk of one parameter and its rule.
enum Item<'a> {
    F32(Rule<f32>, Slices<'a, f32>),
    F64(Rule<f64>, Slices<'a, f64>),
    F16(Rule<f32>, Slices<'a, half::f16>),
    Bf16(Rule<f32>, Slices<'a, half::bf16>),
    /// float32 parameters with bfloat16 state.
    F32Bf16(Rule<f32>, Slices<'a, f32, half::bf16>),
    /// float16 parameters with bfloat16 state.
    F16Bf16(Rule<f32>, Slices<'a, half::f16, half::bf16>),
    /// 8-bit Adam state, per parameter dtype.
    Q8F32(AdamScalars<f32>, Q8Slices<'a, f32>),
    Q8F16(AdamScalars<f32>, Q8Slices<'a, half::f16>),
    Q8Bf16(AdamScalars<f32>, Q8Slices<'a, half::bf16>),
}

impl Item<'_> {
    fn grad_is_finite(&self) -> bool {
        match self {
            Item::F32(_, s) => s.grad_is_finite(),
            Item::F64(_, s) => s.grad_is_finite(),
            Item::F16(_, s) => s.grad_is_finite(),
            Item::Bf16(_, s) => s.grad_is_finite(),
            Item::F32Bf16(_, s) => s.grad_is_finite(),
            Item::F16Bf16(_, s) => s.grad_is_finite(),
            Item::Q8F32(_, s) => s.grad_is_finite(),
            Item::Q8F16(_, s) => s.grad_is_finite(),
            Item::Q8Bf16(_, s) => s.grad_is_finite(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Item::F32(_, s) => s.len(),
            Item::F64(_, s) => s.len(),
            Item::F16(_, s) => s.len(),
            Item::Bf16(_, s) => s.len(),
            Item::F32Bf16(_, s) => s.len(),
            Item::F16Bf16(_, s) => s.len(),
            Item::Q8F32(_, s) => s.len(),
            Item::Q8F16(_, s) => s.len(),
            Item::Q8Bf16(_, s) => s.len(),
        }
    }

    /// [`Item::run`], reading the gradient through `factor`.
    fn run_through(self, level: simd::SimdLevel, factor: GradFactor) {
        if factor.is_identity() {
            return self.run(level);
        }
        match self {
            Item::F32(r, s) => run_factored(level, &r, s, factor),
            Item::F64(r, s) => run_factored(level, &r, s, factor),
            Item::F16(r, s) => run_factored(level, &r, s, factor),
            Item::Bf16(r, s) => run_factored(level, &r, s, factor),
            Item::F32Bf16(r, s) => run_factored(level, &r, s, factor),
            Item::F16Bf16(r, s) => run_factored(level, &r, s, factor),
            Item::Q8F32(k, s) => run_factored_q8(level, &k, s, factor),
            Item::Q8F16(k, s) => run_factored_q8(level, &k, s, factor),
            Item::Q8Bf16(k, s) => run_factored_q8(level, &k, s, factor),
        }
    }

    fn run(self, level: simd::SimdLevel) {
        match self {
            Item::F32(r, s) => simd::apply(level, &r, s),
            Item::F64(r, s) => simd::apply(level, &r, s),
            Item::F16(r, s) => simd::apply(level, &r, s),
            Item::Bf16(r, s) => simd::apply(level, &r, s),
            Item::F32Bf16(r, s) => simd::apply(level, &r, s),
            Item::F16Bf16(r, s) => simd::apply(level, &r, s),
            Item::Q8F32(k, s) => adam8bit::update(level, &k, s),
            Item::Q8F16(k, s) => adam8bit::update(level, &k, s),
            Item::Q8Bf16(k, s) => adam8bit::update(level, &k, s),
        }
    }
}

/// Elements per pass through the gradient scratch: 8 KiB of float32, which stays in L1
/// between being written and being read.
const SCRATCH_ELEMS: usize = 2048;

/// The scratch holds this many elements: room for the largest 8-bit block
/// ([`adam8bit::MAX_BLOCK`]), whose pieces must be whole blocks.
const SCRATCH_CAP: usize = adam8bit::MAX_BLOCK;

thread_local! {
    /// Each thread's gradient scratch: a piece of one work item's gradient as the step reads it
    /// through a [`GradFactor`]. `f64`s, so it is aligned for, and large enough for, any
    /// storage type.
    static SCRATCH: std::cell::RefCell<[f64; SCRATCH_CAP]> =
        const { std::cell::RefCell::new([0.0; SCRATCH_CAP]) };
}

/// One work item whose gradient is read through `factor` (a clip coefficient, GradScaler's
/// scale), [`SCRATCH_ELEMS`] elements at a time: the gradient piece is written, factored and
/// rounded to its dtype, into this thread's scratch, and the rule runs over that piece instead
/// (elementwise rules give the same bits whatever the cut). Every rule gets it without knowing
/// of it, and the gradient is only read: the step's memory traffic is the unfactored step's.
fn run_factored<S: simd::Element<Q>, Q: Storage<Compute = S::Compute>>(
    level: simd::SimdLevel,
    rule: &Rule<S::Compute>,
    s: Slices<'_, S, Q>,
    factor: GradFactor,
) {
    assert!(
        std::mem::size_of::<S>() <= std::mem::size_of::<f64>()
            && std::mem::align_of::<S>() <= std::mem::align_of::<f64>(),
        "a storage type fits the gradient scratch"
    );
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        for piece in s.chunks(SCRATCH_ELEMS) {
            let n = piece.len();
            // SAFETY: the buffer holds SCRATCH_ELEMS initialised f64s, so at least n elements
            // of `S` (no larger, no more aligned than f64, checked above) in its bytes; every
            // storage type is a float for which any bit pattern is a value; the buffer is this
            // thread's, borrowed mutably for this call only.
            let scratch: &mut [S] =
                unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<S>(), n) };
            norm::apply_factor(level, piece.grad, scratch, factor);
            simd::apply(
                level,
                rule,
                Slices {
                    grad: scratch,
                    ..piece
                },
            );
        }
    });
}

/// [`run_factored`] for 8-bit state: the pieces are whole blocks (at most
/// [`SCRATCH_CAP`] elements, the largest block), since a block's absmax is found over the
/// whole block.
fn run_factored_q8<S: simd::Q8Element>(
    level: simd::SimdLevel,
    k: &AdamScalars<f32>,
    s: Q8Slices<'_, S>,
    factor: GradFactor,
) {
    assert!(
        std::mem::size_of::<S>() <= std::mem::size_of::<f64>()
            && std::mem::align_of::<S>() <= std::mem::align_of::<f64>(),
        "a storage type fits the gradient scratch"
    );
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        for piece in s.chunks(SCRATCH_CAP) {
            let n = piece.len();
            assert!(n <= SCRATCH_CAP, "an 8-bit piece fits the gradient scratch");
            // SAFETY: as in `run_factored`: n <= SCRATCH_CAP elements of `S` fit the thread's
            // buffer of SCRATCH_CAP f64s, any bit pattern is a value, borrowed for this call.
            let scratch: &mut [S] =
                unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<S>(), n) };
            norm::apply_factor(level, piece.grad, scratch, factor);
            adam8bit::update(
                level,
                k,
                Q8Slices {
                    grad: scratch,
                    ..piece
                },
            );
        }
    });
}

/// The slices of one checked parameter, as storage type `S` (its state as `Q`).
///
/// # Safety
/// `c` must satisfy [`Checked::new`]'s contract, for the lifetime `'a`, with `S` its dtype and
/// `Q` its state dtype.
unsafe fn slices<'a, S: Storage, Q>(c: &Checked) -> Slices<'a, S, Q> {
    #[allow(clippy::cast_ptr_alignment)] // Checked::new's caller vouches for the alignment
    unsafe fn mk<'a, S>(p: *mut u8, len: usize) -> &'a mut [S] {
        if len == 0 {
            // NumPy may give an empty array any address; a slice needs an aligned one.
            &mut []
        } else {
            unsafe { std::slice::from_raw_parts_mut(p.cast::<S>(), len) }
        }
    }
    unsafe {
        Slices {
            param: mk(c.param, c.len),
            // Shared, never `&mut`: two parameters may read one gradient.
            grad: if c.len == 0 {
                &[]
            } else {
                std::slice::from_raw_parts(c.grad.cast(), c.len)
            },
            bufs: c.bufs.map(|b| b.map(|p| mk(p, c.len))),
            rounding: match c.write {
                WriteMode::Stochastic(key) => Rounding::Stochastic(key),
                WriteMode::Master(m) => Rounding::Master(mk::<S::Compute>(m, c.len)),
                WriteMode::Nearest => Rounding::Nearest,
            },
        }
    }
}

/// Cuts every checked parameter into work items.
fn make_items(checked: &[Checked], items: &mut Vec<Item<'_>>) {
    fn push<'a, S: Storage, Q>(
        s: Slices<'a, S, Q>,
        rule: Rule<S::Compute>,
        wrap: fn(Rule<S::Compute>, Slices<'a, S, Q>) -> Item<'a>,
        items: &mut Vec<Item<'a>>,
    ) {
        items.extend(s.chunks(CHUNK_ELEMS).map(|piece| wrap(rule, piece)));
    }
    for c in checked {
        // SAFETY: every entry of `checked` was made by `Checked::new`, whose caller vouched
        // for its memory until the step returns, and it is paired with its own dtype here.
        unsafe {
            match (c.dtype, c.state_dtype, c.rule) {
                (DType::F32, DType::F32, RuleOf::F32(r)) => {
                    push(slices::<f32, f32>(c), r, Item::F32, items);
                }
                (DType::F16, DType::F16, RuleOf::F32(r)) => {
                    push(slices::<half::f16, half::f16>(c), r, Item::F16, items);
                }
                (DType::Bf16, DType::Bf16, RuleOf::F32(r)) => {
                    push(slices::<half::bf16, half::bf16>(c), r, Item::Bf16, items);
                }
                (DType::F64, DType::F64, RuleOf::F64(r)) => {
                    push(slices::<f64, f64>(c), r, Item::F64, items);
                }
                (DType::F32, DType::Bf16, RuleOf::F32(r)) => {
                    push(slices::<f32, half::bf16>(c), r, Item::F32Bf16, items);
                }
                (DType::F16, DType::Bf16, RuleOf::F32(r)) => {
                    push(slices::<half::f16, half::bf16>(c), r, Item::F16Bf16, items);
                }
                _ => unreachable!("the bindings pair each dtype with its compute type"),
            }
        }
    }
}

/// Opt-in behaviours of a step.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Skip the whole step, changing nothing, when any gradient holds NaN or infinity.
    pub skip_nonfinite: bool,
    /// Flush denormals to zero on every thread of the step, for its duration.
    pub flush_denormals: bool,
    /// How every gradient is read (unscaled, clipped); the identity by default. The gradients
    /// themselves are never written.
    pub grad_factor: GradFactor,
    /// Test-only: panic at "validation" (before anything is written), in a "worker" (before
    /// its item writes), or "after_write" (once half the items have been written).
    pub panic_for_tests: Option<String>,
}

/// A step ready to run: its work items and counters. `Send`, with no Python in it: the
/// bindings run it with the interpreter released.
pub struct Work<'a> {
    items: Vec<Item<'a>>,
    counters: Vec<CounterSlot<'a>>,
    options: Options,
    level: simd::SimdLevel,
}

/// Cuts the checked parameters into work; the last point where a step can fail cleanly.
///
/// # Errors
/// `ValueError` for `flush_denormals` where it is not available; nothing written then.
///
/// # Panics
/// Only on request, for tests (`panic_for_tests == "validation"`).
pub fn prepare(checked: Vec<Checked>, options: &Options) -> Result<Work<'static>, CoreError> {
    prepare_with_q8(checked, Vec::new(), options)
}

/// [`prepare`] with 8-bit Adam parameters too (`q8`), cut at their block boundaries.
///
/// # Errors
/// As [`prepare`].
///
/// # Panics
/// As [`prepare`].
pub fn prepare_with_q8(
    mut checked: Vec<Checked>,
    mut q8: Vec<CheckedQ8>,
    options: &Options,
) -> Result<Work<'static>, CoreError> {
    let mut items = Vec::with_capacity(checked.len() + q8.len());
    make_items(&checked, &mut items);
    for c in &q8 {
        // SAFETY: made by `CheckedQ8::new`, whose caller vouched for its memory until the step
        // returns; paired with its own dtype here.
        unsafe {
            match c.dtype {
                DType::F32 => items.extend(
                    c.slices::<f32>()
                        .chunks(CHUNK_ELEMS)
                        .map(|s| Item::Q8F32(c.rule, s)),
                ),
                DType::F16 => items.extend(
                    c.slices::<half::f16>()
                        .chunks(CHUNK_ELEMS)
                        .map(|s| Item::Q8F16(c.rule, s)),
                ),
                DType::Bf16 => items.extend(
                    c.slices::<half::bf16>()
                        .chunks(CHUNK_ELEMS)
                        .map(|s| Item::Q8Bf16(c.rule, s)),
                ),
                DType::F64 => unreachable!("refused by CheckedQ8::new"),
            }
        }
    }
    let mut counters: Vec<CounterSlot<'_>> = Vec::with_capacity(checked.len());
    for c in &mut checked {
        counters.extend(c.step.take());
        counters.extend(c.scalars.iter_mut().filter_map(Option::take));
    }
    counters.extend(q8.iter_mut().filter_map(|c| c.step.take()));

    // Every check passed: from here on nothing can fail.
    if options.flush_denormals && !FlushGuard::supported() {
        return value_err!("flush_denormals is only available on x86-64 and aarch64")
            .map_err(|e: CoreError| e.arg("flush_denormals"));
    }
    assert!(
        options.panic_for_tests.as_deref() != Some("validation"),
        "test-only panic after validation"
    );
    Ok(Work {
        items,
        counters,
        options: options.clone(),
        level: simd::active(),
    })
}

impl Work<'_> {
    /// Updates every parameter; returns whether the update was applied (false: skipped for a
    /// non-finite gradient, nothing written).
    ///
    /// # Panics
    /// When a work item panicked (an internal error): re-raised once every other item has run,
    /// saying the step stopped part-way; the counters are not advanced then.
    #[must_use]
    pub fn run(self) -> bool {
        let Work {
            items,
            counters,
            options,
            level,
        } = self;
        let panic_at = options.panic_for_tests.as_deref();
        let flush = options.flush_denormals;
        let factor = options.grad_factor;
        let total: usize = items.iter().map(Item::len).sum();
        if options.skip_nonfinite && !pool::all(&items, total, Item::grad_is_finite) {
            return false;
        }
        let half = items.len().div_ceil(2);
        let ran = AtomicUsize::new(0);
        let wrote = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pool::for_each(items, total, |it| {
                let _flush = FlushGuard::new(flush);
                assert!(panic_at != Some("worker"), "test-only panic in a worker");
                it.run_through(level, factor);
                let done = ran.fetch_add(1, Ordering::Relaxed) + 1;
                assert!(
                    !(panic_at == Some("after_write") && done == half),
                    "test-only panic in a worker after it wrote"
                );
            });
        }));
        if let Err(payload) = wrote {
            // Every other item still ran (see `pool`); the counters were not advanced.
            std::panic::resume_unwind(Box::new(format!(
                "{}; the step stopped part-way: parameters and state of this step may be \
                 partly updated while their step counts are not (restore them from a \
                 checkpoint)",
                panic_message(payload.as_ref())
            )));
        }
        for slot in counters {
            slot.write();
        }
        true
    }
}

/// [`prepare`] then [`Work::run`], on this thread's terms (no interpreter to release).
///
/// # Errors
/// As [`prepare`].
///
/// # Panics
/// As [`prepare`] and [`Work::run`].
pub fn execute(checked: Vec<Checked>, options: &Options) -> Result<bool, CoreError> {
    Ok(prepare(checked, options)?.run())
}

#[cfg(test)]
mod tests;
