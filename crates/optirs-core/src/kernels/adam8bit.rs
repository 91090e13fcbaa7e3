//! Adam and AdamW with 8-bit state: blockwise dynamic quantization (Dettmers et al. 2021,
//! "8-bit Optimizers via Block-wise Quantization"; bitsandbytes' `Adam8bit`).
//!
//! Each moment is kept as one byte per element, an index into a 256-entry code map of values in
//! [-1, 1] (`exp_avg`, signed) or [0, 1] (`exp_avg_sq`, unsigned), and one float32 absmax per
//! block of `block` elements: element `j` of block `b` stands for `code[q[j]] * absmax[b]`.
//!
//! A step runs block by block, in one pass over the block's memory: dequantize both moments
//! into block-sized float32 buffers on the stack, stream the float32 Adam element function
//! ([`super::adam`]'s, unchanged) over the parameter, gradient and those buffers with the
//! level's SIMD lanes (`lanes::stream_param`, as every float32 step), find each moment's new
//! absmax and requantize to the nearest code. The parameter is written as its
//! [`Rounding`] says, in the same pass: to nearest, stochastically (bfloat16; each element's
//! random bits keyed by its index within the parameter, the block's offset plus its place in
//! the block), or from a float32 master copy that the step reads and updates in place of the
//! 16-bit values. Work is only ever cut at block boundaries, so the result does not depend on
//! the chunking or the thread count; `stream_param` gives the same bits at every level and the
//! code search is exact, so it does not depend on the SIMD level either.
//!
//! # Code maps
//! [`CodeMap::dynamic`] builds bitsandbytes' dynamic map (`create_dynamic_map(signed,
//! max_exponent_bits=7, total_bits=8)`): for each decade `i = 0..7`, the midpoints of `k + 1`
//! evenly spaced points in [0.1, 1] (`k = 2^i` signed, `2^(i+1)` unsigned) scaled by
//! `10^(i - 6)`, their negatives when signed, then 0 and 1. 127 + 127 + 2 (signed) or 254 + 2
//! (unsigned) = 256 values, sorted. Each is computed in float64 and rounded once to float32
//! (bitsandbytes computes the midpoints in float32, so a code may differ from its by a unit in
//! the last place).
//!
//! # Quantization
//! `x` is divided by the block's absmax (float32, correctly rounded; the quotient lies in
//! [-1, 1]) and mapped to the nearest code: the number of midpoints between neighbouring codes
//! (float64, exact) below the quotient, so an exact tie goes to the lower code.
//!
//! That count is found without a search: one table entry per bucket of the quotient's order
//! key (its sign, exponent and top 8 mantissa bits) gives the count below the bucket and the
//! key of the one midpoint the bucket may hold (no bucket holds two: checked when the map is
//! built), so one integer comparison finishes it. The divisions run in a loop of their own
//! (vectorized, each correctly rounded); at the AVX2 and AVX-512 levels the table lookups are
//! AVX2 gathers, whose `unsafe` is sound because every index is clamped into the table and the
//! level guarantees AVX2. Every level computes the same codes, which the
//! tests check against an exhaustive nearest-code search.
//!
//! # Non-finite values
//! A block whose new moment holds NaN or an infinity has no meaningful scale: its absmax is
//! stored as NaN and every code as the code of zero, so the whole block dequantizes to NaN on
//! the next step (and its parameters then turn NaN, as torch's do for the one element). A block
//! of zeros keeps absmax 0 and the zero code. `skip_nonfinite` keeps such gradients out.

use std::sync::OnceLock;

use super::adam::AdamScalars;
use super::float::{Float, Storage};
use super::lanes::{stream_param, ParamOut, Rounding, StateLanes};

/// The largest block the kernel takes (its per-block buffers live on the stack).
pub const MAX_BLOCK: usize = 4096;

/// A sorted 256-entry code map and the midpoints between its neighbours.
#[derive(Debug)]
pub struct CodeMap {
    /// The values the codes stand for, ascending.
    pub values: [f32; 256],
    /// `(values[i] + values[i + 1]) / 2` in float64 (exact: neighbours are within a factor of
    /// a few of each other, so their sum needs no more than float64's precision), then +inf,
    /// which no quotient exceeds, so that the search needs no bounds test.
    #[cfg_attr(not(test), allow(dead_code))] // the definition; the tests' search reads it
    mid: [f64; 256],
    /// The code of 0.
    pub zero: u8,
    /// Per bucket of quotients sharing the high bits of their order key ([`order`]), from
    /// the bucket of -1 to that of 1: in the low byte, how many midpoints lie below the
    /// bucket's smallest value; above it, the low `BUCKET_SHIFT` bits of the key of the
    /// smallest float32 above the bucket's one midpoint, or `1 << BUCKET_SHIFT` (above every
    /// key's low bits) when the bucket holds none. A key counts that midpoint exactly when its
    /// low bits reach that threshold (the midpoints are no float32 values' keys' equals once
    /// moved to the next float32, and none is 0, so `mid < x` is `order(x) >= threshold`).
    table: Box<[u32; BUCKETS]>,
}

/// float32 bits as an unsigned key in the order of the values (negatives reversed below the
/// positives), so that a range of keys is a range of values.
#[inline(always)]
fn order(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The float32 whose [`order`] key is `k`.
fn from_order(k: u32) -> f32 {
    if k >> 31 == 1 {
        f32::from_bits(k & 0x7FFF_FFFF)
    } else {
        f32::from_bits(!k)
    }
}

/// The low bits of an order key a bucket spans: 2^15 floats, 8 mantissa bits kept, so that no
/// bucket inside [-1, 1] holds more than one midpoint and `nearest` makes one comparison.
const BUCKET_SHIFT: u32 = 15;
/// The low bits of an order key inside its bucket.
const LOW: u32 = (1 << BUCKET_SHIFT) - 1;
#[cfg(target_arch = "x86_64")]
const BUCKET_SHIFT_I: i32 = BUCKET_SHIFT.cast_signed();
/// The first and last bucket `nearest` looks up: those of -1 and 1.
const BUCKET_LO: u32 = 0x407F_FFFF >> BUCKET_SHIFT; // order(-1.0)
const BUCKET_HI: u32 = 0xBF80_0000 >> BUCKET_SHIFT; // order(1.0)
/// The number of buckets from that of -1 to that of 1.
const BUCKETS: usize = (BUCKET_HI - BUCKET_LO + 1) as usize;

impl CodeMap {
    /// bitsandbytes' dynamic map, signed (for `exp_avg`) or unsigned (for `exp_avg_sq`).
    ///
    /// # Panics
    /// Never: the construction gives 256 codes, one of them 0, and buckets narrow enough for
    /// the dynamic maps.
    pub fn dynamic(signed: bool) -> CodeMap {
        let mut data: Vec<f64> = Vec::with_capacity(256);
        for i in 0..7_i32 {
            let k = if signed {
                1_usize << i
            } else {
                1_usize << (i + 1)
            };
            let scale = 10f64.powi(i - 6);
            for j in 0..k {
                let lo = 0.1 + 0.9 * j as f64 / k as f64;
                let hi = 0.1 + 0.9 * (j + 1) as f64 / k as f64;
                let mean = f64::from((scale * (lo + hi) / 2.0) as f32);
                data.push(mean);
                if signed {
                    data.push(-mean);
                }
            }
        }
        data.push(0.0);
        data.push(1.0);
        assert_eq!(data.len(), 256, "the dynamic map has 256 codes");
        data.sort_by(f64::total_cmp);
        let mut values = [0f32; 256];
        for (v, d) in values.iter_mut().zip(&data) {
            *v = *d as f32;
        }
        let mut mid = [f64::INFINITY; 256];
        for (i, m) in mid.iter_mut().take(255).enumerate() {
            *m = f64::midpoint(f64::from(values[i]), f64::from(values[i + 1]));
        }
        let zero = values.iter().position(|&v| v == 0.0).expect("0 is a code");
        debug_assert_eq!(order(-1.0) >> BUCKET_SHIFT, BUCKET_LO);
        debug_assert_eq!(order(1.0) >> BUCKET_SHIFT, BUCKET_HI);
        let mut thr = [u32::MAX; 256];
        for (t, &m) in thr.iter_mut().zip(&mid[..255]) {
            assert!(m != 0.0, "no midpoint is 0");
            let f = m as f32;
            *t = if f64::from(f) > m {
                order(f)
            } else {
                order(f) + 1
            };
        }
        let mut table: Box<[u32; BUCKETS]> = vec![0u32; BUCKETS]
            .into_boxed_slice()
            .try_into()
            .expect("the length asked for");
        // The buckets ascend in value, so the midpoints below each bucket's first value (`lo`)
        // and at or below its last (`hi`) are counted by two pointers moving up once over the
        // sorted midpoints; the last is +inf, which stops both.
        let (mut lo, mut hi, mut steps) = (0_usize, 0_usize, 0);
        for (e, key) in table.iter_mut().zip(BUCKET_LO..=BUCKET_HI) {
            let first = f64::from(from_order(key << BUCKET_SHIFT));
            let last = f64::from(from_order((key << BUCKET_SHIFT) | LOW));
            while mid[lo] < first {
                lo += 1;
            }
            while mid[hi] <= last {
                hi += 1;
            }
            steps = steps.max(hi - lo);
            let t = if thr[lo] >> BUCKET_SHIFT == key {
                thr[lo] & LOW
            } else {
                1 << BUCKET_SHIFT
            };
            *e = u32::try_from(lo).expect("at most 255 midpoints") | (t << 8);
        }
        assert!(steps <= 1, "a bucket holds at most one midpoint");
        CodeMap {
            values,
            mid,
            zero: u8::try_from(zero).expect("256 codes"),
            table,
        }
    }

    /// The value code `q` stands for, scaled by `absmax`.
    #[inline(always)]
    #[must_use]
    pub fn decode(&self, q: u8, absmax: f32) -> f32 {
        self.values[usize::from(q)] * absmax
    }

    /// The code nearest to `x` (in [-1, 1]); ties to the lower code, NaN to the zero code.
    ///
    /// The number of midpoints below `x`, found by looking up how many lie below its bucket
    /// (the high bits of its order key) and comparing with the one midpoint the bucket may
    /// hold, the result added rather than branched on: every element's comparison is its own
    /// and would be mispredicted.
    ///
    /// # Panics
    /// Never: the index stays below 256 (the last midpoint is +inf).
    #[inline(always)]
    #[must_use]
    pub fn nearest(&self, x: f32) -> u8 {
        if x.is_nan() {
            return self.zero;
        }
        self.nearest_not_nan(x)
    }

    /// [`CodeMap::nearest`] for an `x` that is not NaN.
    #[inline(always)]
    fn nearest_not_nan(&self, x: f32) -> u8 {
        let key = order(x);
        let bucket = (key >> BUCKET_SHIFT).clamp(BUCKET_LO, BUCKET_HI) - BUCKET_LO;
        let e = self.table[bucket as usize];
        // One comparison: no bucket holds two midpoints (checked when the map is built). It
        // never carries past 255: no bucket holds a midpoint above the last code.
        (e as u8).wrapping_add(u8::from(key & LOW >= e >> 8))
    }

    /// `q[j] = self.nearest_not_nan(x[j])`, eight at a time with AVX2's gathers (the same
    /// table, bucket and comparison as the scalar code, so the same codes).
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn nearest_avx2(&self, x: &[f32], q: &mut [u8]) {
        use std::arch::x86_64::{
            _mm256_add_epi32, _mm256_and_si256, _mm256_castps_si256, _mm256_cmpgt_epi32,
            _mm256_cvtsi256_si32, _mm256_extract_epi32, _mm256_i32gather_epi32, _mm256_loadu_ps,
            _mm256_max_epu32, _mm256_min_epu32, _mm256_or_si256, _mm256_packus_epi16,
            _mm256_packus_epi32, _mm256_set1_epi32, _mm256_srai_epi32, _mm256_srli_epi32,
            _mm256_sub_epi32, _mm256_xor_si256,
        };
        let n = x.len().min(q.len());
        let whole = n - n % 8;
        let (top, one) = (_mm256_set1_epi32(i32::MIN), _mm256_set1_epi32(1));
        let (lo, hi) = (
            _mm256_set1_epi32(BUCKET_LO.cast_signed()),
            _mm256_set1_epi32(BUCKET_HI.cast_signed()),
        );
        let (byte, low) = (
            _mm256_set1_epi32(0xFF),
            _mm256_set1_epi32(LOW.cast_signed()),
        );
        let table = self.table.as_ptr().cast::<i32>();
        for j in (0..whole).step_by(8) {
            // SAFETY: `j + 8 <= x.len()`; an unaligned load.
            let b = _mm256_castps_si256(unsafe { _mm256_loadu_ps(x.as_ptr().add(j)) });
            let key = _mm256_xor_si256(b, _mm256_or_si256(_mm256_srai_epi32::<31>(b), top));
            let bucket = _mm256_sub_epi32(
                _mm256_min_epu32(
                    _mm256_max_epu32(_mm256_srli_epi32::<BUCKET_SHIFT_I>(key), lo),
                    hi,
                ),
                lo,
            );
            // SAFETY: `bucket < BUCKETS`, the length of `table`.
            let e = unsafe { _mm256_i32gather_epi32::<4>(table, bucket) };
            // Both below 2^16: a signed comparison. All ones (-1) where the key's low bits
            // fall short of the threshold, so that `code + 1` comes back to `code` there.
            let short = _mm256_cmpgt_epi32(_mm256_srli_epi32::<8>(e), _mm256_and_si256(key, low));
            let c = _mm256_add_epi32(_mm256_add_epi32(_mm256_and_si256(e, byte), one), short);
            let c = _mm256_packus_epi32(c, c);
            let c = _mm256_packus_epi16(c, c);
            let (c0, c1) = (_mm256_cvtsi256_si32(c), _mm256_extract_epi32::<4>(c));
            q[j..j + 4].copy_from_slice(&c0.to_le_bytes());
            q[j + 4..j + 8].copy_from_slice(&c1.to_le_bytes());
        }
        for (qj, &v) in q[whole..n].iter_mut().zip(&x[whole..n]) {
            *qj = self.nearest_not_nan(v);
        }
    }

    /// [`CodeMap::nearest`] by binary search over the midpoints (the tests' reference).
    #[cfg(test)]
    fn nearest_by_search(&self, x: f32) -> u8 {
        if x.is_nan() {
            return self.zero;
        }
        let x = f64::from(x);
        let mut lo = 0_usize;
        for step in [128, 64, 32, 16, 8, 4, 2, 1] {
            lo += step * usize::from(self.mid[lo + step - 1] < x);
        }
        u8::try_from(lo).expect("at most 255")
    }

    /// The code of `x` in a block of absmax `absmax` (see the module documentation).
    #[inline(always)]
    #[must_use]
    pub fn encode(&self, x: f32, absmax: f32) -> u8 {
        if absmax == 0.0 || !absmax.is_finite() {
            return self.zero;
        }
        self.nearest(x / absmax)
    }
}

/// The signed map, for `exp_avg` (built once).
#[must_use]
pub fn signed_map() -> &'static CodeMap {
    static MAP: OnceLock<CodeMap> = OnceLock::new();
    MAP.get_or_init(|| CodeMap::dynamic(true))
}

/// The unsigned map, for `exp_avg_sq` (built once).
#[must_use]
pub fn unsigned_map() -> &'static CodeMap {
    static MAP: OnceLock<CodeMap> = OnceLock::new();
    MAP.get_or_init(|| CodeMap::dynamic(false))
}

/// The largest magnitude of `xs`; NaN when any is NaN or infinite (see the module docs).
///
/// The largest of the magnitudes' bits as integers, which order non-negative floats as their
/// values do and put infinities and NaNs above every finite one: a plain integer maximum, which
/// the compiler vectorizes (`f32::max`'s NaN rule keeps it from vectorizing a float one).
#[inline(always)]
fn absmax(xs: &[f32]) -> f32 {
    let top = xs
        .iter()
        .fold(0u32, |a, x| a.max(x.to_bits() & 0x7FFF_FFFF));
    if top < f32::INFINITY.to_bits() {
        f32::from_bits(top)
    } else {
        f32::NAN
    }
}

/// The memory one 8-bit parameter's update touches: the parameter and gradient, each moment's
/// codes, and one absmax per block of `block` elements (the last block may be shorter).
#[derive(Debug)]
pub struct Q8Slices<'a, S> {
    pub param: &'a mut [S],
    pub grad: &'a [S],
    pub exp_avg: &'a mut [u8],
    pub exp_avg_sq: &'a mut [u8],
    pub exp_avg_absmax: &'a mut [f32],
    pub exp_avg_sq_absmax: &'a mut [f32],
    pub block: usize,
    /// How the parameter's new values are written: round to nearest, stochastically (its key's
    /// offset the index of `param`'s first element within the whole parameter), or from a
    /// float32 master copy of `param`'s length.
    pub rounding: Rounding<'a, f32>,
}

impl<'a, S> Q8Slices<'a, S> {
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

    /// True when every array has the length the parameter's asks for.
    #[must_use]
    pub fn lengths_match(&self) -> bool {
        let n = self.param.len();
        let blocks = n.div_ceil(self.block.max(1));
        (1..=MAX_BLOCK).contains(&self.block)
            && self.grad.len() == n
            && self.exp_avg.len() == n
            && self.exp_avg_sq.len() == n
            && self.exp_avg_absmax.len() == blocks
            && self.exp_avg_sq_absmax.len() == blocks
            && self.rounding.len_matches(n)
    }

    /// Cuts the update into pieces of whole blocks, at most `chunk` elements each (rounded down
    /// to whole blocks, at least one block).
    pub fn chunks(self, chunk: usize) -> impl Iterator<Item = Q8Slices<'a, S>> {
        let per = (chunk / self.block).max(1);
        let block = self.block;
        let mut rest = Some(self);
        std::iter::from_fn(move || {
            let s = rest.take()?;
            let n = per * block;
            if s.param.len() <= n {
                return Some(s);
            }
            let (p0, p1) = s.param.split_at_mut(n);
            let (g0, g1) = s.grad.split_at(n);
            let (m0, m1) = s.exp_avg.split_at_mut(n);
            let (v0, v1) = s.exp_avg_sq.split_at_mut(n);
            let (am0, am1) = s.exp_avg_absmax.split_at_mut(per);
            let (av0, av1) = s.exp_avg_sq_absmax.split_at_mut(per);
            let (r0, r1) = s.rounding.split_at(n);
            rest = Some(Q8Slices {
                param: p1,
                grad: g1,
                exp_avg: m1,
                exp_avg_sq: v1,
                exp_avg_absmax: am1,
                exp_avg_sq_absmax: av1,
                block,
                rounding: r1,
            });
            Some(Q8Slices {
                param: p0,
                grad: g0,
                exp_avg: m0,
                exp_avg_sq: v0,
                exp_avg_absmax: am0,
                exp_avg_sq_absmax: av0,
                block,
                rounding: r0,
            })
        })
    }

    /// True when every gradient element is finite.
    #[must_use]
    pub fn grad_is_finite(&self) -> bool
    where
        S: Storage,
    {
        self.grad
            .iter()
            .fold(true, |ok, g| ok & g.load().is_finite())
    }
}

/// One Adam step (amsgrad off) over an 8-bit parameter, block by block (see the module
/// documentation), with the code of the best SIMD level the CPU has up to `level`.
///
/// # Panics
/// When the lengths do not match (`Q8Slices::lengths_match`).
pub fn update<S: super::simd::Q8Element>(
    level: super::simd::SimdLevel,
    k: &AdamScalars<f32>,
    s: Q8Slices<'_, S>,
) {
    assert!(
        s.lengths_match(),
        "8-bit state does not match its parameter"
    );
    S::run_q8(level.clamped(), k, s);
}

/// The body [`update`] compiles once per level: each block's moments dequantized into float32
/// buffers on the stack, the float32 Adam element function streamed over the parameter,
/// gradient and those buffers `L::W` elements at a time (as every float32 step), then each
/// moment's absmax found and the block requantized.
///
/// # Safety
/// The CPU has `L`'s instructions, and the lengths match.
#[inline(always)]
#[allow(clippy::needless_pass_by_value)] // a piece of work, consumed as `Slices` are
pub(crate) unsafe fn update_inline<S, L, const GATHER: bool>(
    k: &AdamScalars<f32>,
    s: Q8Slices<'_, S>,
) where
    S: Storage<Compute = f32>,
    L: StateLanes<S, f32>,
{
    let (cm, cv) = (signed_map(), unsigned_map());
    let k = *k;
    let mut new_m = [0f32; MAX_BLOCK];
    let mut new_v = [0f32; MAX_BLOCK];
    let blocks = s
        .param
        .chunks_mut(s.block)
        .zip(s.grad.chunks(s.block))
        .zip(s.exp_avg.chunks_mut(s.block))
        .zip(s.exp_avg_sq.chunks_mut(s.block))
        .zip(s.exp_avg_absmax.iter_mut())
        .zip(s.exp_avg_sq_absmax.iter_mut());
    let mut rounding = s.rounding;
    for (((((p, g), mq), vq), am), av) in blocks {
        let n = p.len();
        // This block's part of the rounding: a stochastic key offset to the block's first
        // element, so each element draws its bits by its index within the parameter.
        let (r, rest) = rounding.split_at(n);
        rounding = rest;
        let (m, v) = (&mut new_m[..n], &mut new_v[..n]);
        // Plain code: AVX2's gathers measured no faster here.
        for ((x, &q), (y, &r)) in m.iter_mut().zip(&*mq).zip(v.iter_mut().zip(&*vq)) {
            *x = cm.decode(q, *am);
            *y = cv.decode(r, *av);
        }
        let param = ParamOut {
            values: p,
            rounding: r,
        };
        // SAFETY: the caller's CPU has `L`'s instructions; `stream_param` checks the lengths
        // (the master copy's too).
        unsafe { stream_param::<S, f32, L, _, 2>(k, param, g, [&mut *m, &mut *v]) };
        let (a_m, a_v) = (absmax(m), absmax(v));
        // SAFETY: with `GATHER`, the caller's CPU has AVX2.
        unsafe {
            encode_block::<GATHER>(cm, m, a_m, mq);
            encode_block::<GATHER>(cv, v, a_v, vq);
        }
        *am = a_m;
        *av = a_v;
    }
}

/// `q[j] = map.encode(x[j], absmax)` for one block, overwriting `x` with the quotients: the
/// divisions in a loop of their own, which the compiler vectorizes (each is correctly rounded,
/// so the lanes give the division's bits), and the code search after it.
///
/// # Safety
/// With `GATHER`, the CPU has AVX2.
#[inline(always)]
unsafe fn encode_block<const GATHER: bool>(
    map: &CodeMap,
    x: &mut [f32],
    absmax: f32,
    q: &mut [u8],
) {
    if absmax == 0.0 || !absmax.is_finite() {
        q.fill(map.zero);
        return;
    }
    for v in x.iter_mut() {
        *v /= absmax;
    }
    // The quotients of finite values by a finite, nonzero absmax: never NaN.
    #[cfg(target_arch = "x86_64")]
    if GATHER {
        // SAFETY: the caller's CPU has AVX2.
        unsafe { map.nearest_avx2(x, q) };
        return;
    }
    for (qj, &v) in q.iter_mut().zip(&*x) {
        *qj = map.nearest_not_nan(v);
    }
}

/// Quantizes `x` into `q` and `absmax`, block by block, as a step stores its moments (for
/// state made from float32 values: a loaded float32 state dict).
///
/// # Panics
/// When the lengths do not match.
pub fn quantize(map: &CodeMap, x: &[f32], block: usize, q: &mut [u8], absmaxes: &mut [f32]) {
    assert!(x.len() == q.len() && absmaxes.len() == x.len().div_ceil(block));
    for ((xs, qs), a) in x.chunks(block).zip(q.chunks_mut(block)).zip(absmaxes) {
        *a = absmax(xs);
        for (qj, &xj) in qs.iter_mut().zip(xs) {
            *qj = map.encode(xj, *a);
        }
    }
}

/// The float32 values `q` and `absmax` stand for (the way back to float32 state).
///
/// # Panics
/// When the lengths do not match.
pub fn dequantize(map: &CodeMap, q: &[u8], absmaxes: &[f32], block: usize, out: &mut [f32]) {
    assert!(out.len() == q.len() && absmaxes.len() == q.len().div_ceil(block));
    for ((os, qs), &a) in out.chunks_mut(block).zip(q.chunks(block)).zip(absmaxes) {
        for (o, &qj) in os.iter_mut().zip(qs) {
            *o = map.decode(qj, a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::adam::AdamHyper;
    use super::super::lanes::Elementwise;
    use super::super::simd::SimdLevel;
    use super::*;

    #[test]
    fn maps_have_bitsandbytes_shape() {
        let s = signed_map();
        let u = unsigned_map();
        assert!(
            s.values.windows(2).all(|w| w[0] < w[1]),
            "signed map sorted, distinct"
        );
        assert!(
            u.values.windows(2).all(|w| w[0] < w[1]),
            "unsigned map sorted, distinct"
        );
        assert_eq!(s.values[255], 1.0);
        assert_eq!(u.values[255], 1.0);
        assert_eq!(u.values[0], 0.0);
        assert_eq!(usize::from(s.zero), 127);
        assert_eq!(u.zero, 0);
        // 127 negative codes, the smallest the negated largest midpoint of the top decade.
        assert!(s.values[0] < -0.99 && s.values[0] > -1.0);
        // The smallest positive codes are a millionth of the scale.
        assert!(s.values[128] > 5e-7 && s.values[128] < 6e-7);
        for (map, x) in [(s, -0.3f32), (s, 0.123), (u, 0.77), (u, 3e-6)] {
            let q = map.nearest(x);
            let d = (map.values[usize::from(q)] - x).abs();
            assert!(map.values.iter().all(|&c| (c - x).abs() >= d), "{x}");
        }
        for (i, &v) in s.values.iter().enumerate() {
            assert_eq!(usize::from(s.nearest(v)), i, "a code maps to itself");
        }
    }

    /// How far apart the sweeps' samples are: Miri interprets every comparison, so it checks
    /// the same code paths on a few thousand samples instead of tens of millions.
    fn sweep(stride: usize) -> usize {
        if cfg!(miri) {
            stride * 10_007
        } else {
            stride
        }
    }

    /// The bucket lookup agrees with the binary search on every code, every midpoint and its
    /// neighbouring floats, and a sweep of quotients across [-1, 1].
    #[test]
    fn bucket_lookup_matches_search() {
        for map in [signed_map(), unsigned_map()] {
            let mut xs: Vec<f32> = vec![-1.0, 1.0, 0.0, -0.0, -2.0, 2.0];
            for &v in &map.values {
                xs.push(v);
            }
            for &m in &map.mid[..255] {
                let f = m as f32;
                for d in -2i32..=2 {
                    xs.push(f32::from_bits(f.to_bits().wrapping_add_signed(d)));
                }
            }
            let mut k = 0x407F_0000_u32;
            while k <= 0xBF80_FFFF {
                xs.push(from_order(k));
                k += u32::try_from(sweep(97)).expect("a small stride");
            }
            for x in xs {
                assert_eq!(map.nearest(x), map.nearest_by_search(x), "{x:e}");
            }
        }
    }

    /// The nearest code by its definition: the least distance to `x`, the lower code on a tie,
    /// over all 256. The distances are float64 differences of two float32 values in [-1, 1]:
    /// exact when |x| >= 2^-29 (53 bits span the codes' and x's), and for smaller |x| the zero
    /// code is at distance |x| (exact) while every other is more than 10^-7 away, so rounding
    /// cannot change which is least. Finite `x` only; beyond [-1, 1] the nearest is the end
    /// code on that side (the codes span [-1, 1] or [0, 1]), so `x` is clamped first, keeping
    /// the differences exact.
    fn nearest_exhaustive(map: &CodeMap, x: f32) -> u8 {
        let x = f64::from(x.clamp(-1.0, 1.0));
        let mut best = 0;
        for (i, &c) in map.values.iter().enumerate() {
            if (f64::from(c) - x).abs() < (f64::from(map.values[best]) - x).abs() {
                best = i;
            }
        }
        u8::try_from(best).expect("256 codes")
    }

    /// Every search agrees: the table lookup (scalar, and AVX2's gathers where the CPU has
    /// them) against the binary search on tens of millions of float32 values across [-1, 1]
    /// and the edge cases, and all of them against the exhaustive definition on millions and
    /// the edge cases (ties included: midpoints that are float32 values go to the lower code).
    #[test]
    fn fast_search_is_exact_nearest() {
        let keys_in_unit = order(-1.0)..=order(1.0);
        for map in [signed_map(), unsigned_map()] {
            let mut edge: Vec<f32> = vec![
                0.0,
                -0.0,
                1.0,
                -1.0,
                f32::MIN_POSITIVE,
                -f32::MIN_POSITIVE,
                f32::from_bits(1),
                f32::from_bits(0x8000_0001),
                f32::from_bits(0x007F_FFFF),
                f32::from_bits(0x807F_FFFF),
                f32::MAX,
                f32::MIN,
                2.0,
                -2.0,
            ];
            let mut ties = 0;
            for (&v, &m) in map.values.iter().zip(&map.mid[..255]) {
                let f = m as f32;
                ties += usize::from(f64::from(f) == m);
                for c in [v, f] {
                    for d in -4i32..=4 {
                        edge.push(from_order(order(c).wrapping_add_signed(d)));
                    }
                }
            }
            assert!(
                ties > 0,
                "some midpoints are float32 values: ties are tested"
            );
            // Under Miri every 7th against the definition (each costs 256 comparisons there),
            // all against the search.
            for (i, &x) in edge.iter().enumerate() {
                if i % sweep(1) == 0 || i % 7 == 0 {
                    assert_eq!(map.nearest(x), nearest_exhaustive(map, x), "{x:e}");
                }
                assert_eq!(map.nearest(x), map.nearest_by_search(x), "{x:e}");
            }
            // Infinities saturate; NaN (any payload, either sign) is the zero code.
            assert_eq!(map.nearest(f32::INFINITY), 255);
            assert_eq!(map.nearest(f32::NEG_INFINITY), 0);
            for nan in [
                f32::NAN,
                -f32::NAN,
                f32::from_bits(0x7F80_0001),
                f32::from_bits(0xFFFF_FFFF),
            ] {
                assert_eq!(map.nearest(nan), map.zero);
            }
            // Millions against the definition: every 1021st key in [-1, 1], every 4099th key
            // of all finite floats.
            let wide = (0..=u32::MAX)
                .step_by(sweep(4099))
                .map(from_order)
                .filter(|x| x.is_finite());
            for x in keys_in_unit
                .clone()
                .step_by(sweep(1021))
                .map(from_order)
                .chain(wide)
            {
                assert_eq!(map.nearest(x), nearest_exhaustive(map, x), "{x:e}");
            }
            // Tens of millions against the binary search, in blocks as the kernel runs them.
            let mut xs: Vec<f32> = keys_in_unit
                .clone()
                .step_by(sweep(37))
                .map(from_order)
                .collect();
            xs.extend(&edge);
            for block in xs.chunks(MAX_BLOCK) {
                let want: Vec<u8> = block.iter().map(|&x| map.nearest_by_search(x)).collect();
                let got: Vec<u8> = block.iter().map(|&x| map.nearest(x)).collect();
                assert_eq!(got, want);
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx2") {
                    let mut q = vec![0u8; block.len()];
                    // SAFETY: the CPU has AVX2.
                    unsafe { map.nearest_avx2(block, &mut q) };
                    assert_eq!(q, want);
                }
            }
        }
    }

    #[test]
    fn nonfinite_and_zero_blocks() {
        let m = signed_map();
        let mut q = [9u8; 4];
        let mut a = [7f32; 2];
        quantize(m, &[0.0, -0.0, 1.0, f32::NAN], 2, &mut q, &mut a);
        assert_eq!(a[0], 0.0);
        assert!(a[1].is_nan());
        assert_eq!(q, [m.zero; 4]);
        let mut out = [0f32; 4];
        dequantize(m, &q, &a, 2, &mut out);
        assert_eq!(&out[..2], &[0.0, 0.0]);
        assert!(out[2].is_nan() && out[3].is_nan());
    }

    /// Values in [-0.5, 0.5] from an xorshift generator started at `x`.
    fn uniform(mut x: u32) -> impl FnMut() -> f32 {
        move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (f64::from(x) / f64::from(u32::MAX) - 0.5) as f32
        }
    }

    /// The kernel against the same steps written out: dequantize, the float32 Adam element
    /// function, absmax, nearest code; any chunking gives the same bits.
    #[test]
    fn update_matches_reference_and_chunking() {
        let h = AdamHyper {
            lr: 1e-2,
            weight_decay: 0.1,
            decoupled: true,
            ..AdamHyper::default()
        };
        let n: usize = if cfg!(miri) { 300 } else { 1000 };
        let block: usize = 64;
        let blocks = n.div_ceil(block);
        let mut rnd = uniform(0x1234_5678);
        let p0: Vec<f32> = (0..n).map(|_| rnd()).collect();
        let grads: Vec<Vec<f32>> = (0..3).map(|_| (0..n).map(|_| rnd()).collect()).collect();
        let run = |chunk: usize, level: SimdLevel| {
            let mut p = p0.clone();
            let (mut mq, mut vq) = (vec![127u8; n], vec![0u8; n]);
            let (mut am, mut av) = (vec![0f32; blocks], vec![0f32; blocks]);
            for (t, g) in grads.iter().enumerate() {
                let k = AdamScalars::<f32>::new(&h, (t + 1) as f64);
                let s = Q8Slices {
                    param: &mut p,
                    grad: g,
                    exp_avg: &mut mq,
                    exp_avg_sq: &mut vq,
                    exp_avg_absmax: &mut am,
                    exp_avg_sq_absmax: &mut av,
                    block,
                    rounding: Rounding::Nearest,
                };
                for piece in s.chunks(chunk) {
                    update(level, &k, piece);
                }
            }
            (p, mq, vq, am, av)
        };
        let want = {
            let mut p = p0.clone();
            let (mut mq, mut vq) = (vec![127u8; n], vec![0u8; n]);
            let (mut am, mut av) = (vec![0f32; blocks], vec![0f32; blocks]);
            for (t, g) in grads.iter().enumerate() {
                let k = AdamScalars::<f32>::new(&h, (t + 1) as f64);
                let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
                dequantize(signed_map(), &mq, &am, block, &mut m);
                dequantize(unsigned_map(), &vq, &av, block, &mut v);
                for j in 0..n {
                    let (pn, [mn, vn]) =
                        Elementwise::<f32, 2>::elem::<f32>(&k, p[j], g[j], [m[j], v[j]]);
                    (p[j], m[j], v[j]) = (pn, mn, vn);
                }
                quantize(signed_map(), &m, block, &mut mq, &mut am);
                quantize(unsigned_map(), &v, block, &mut vq, &mut av);
            }
            (p, mq, vq, am, av)
        };
        let levels = SimdLevel::ALL.into_iter().filter(|l| l.supported());
        let chunks: &[usize] = if cfg!(miri) {
            &[64, 100, 1 << 14]
        } else {
            &[1, 64, 100, 640, 1 << 14]
        };
        for (chunk, level) in chunks
            .iter()
            .copied()
            .flat_map(|c| levels.clone().map(move |l| (c, l)))
        {
            let got = run(chunk, level);
            assert_eq!(got.1, want.1, "chunk {chunk} {level:?}");
            assert_eq!(got.2, want.2, "chunk {chunk}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.0), bits(&want.0), "chunk {chunk}");
            assert_eq!(bits(&got.3), bits(&want.3), "chunk {chunk}");
            assert_eq!(bits(&got.4), bits(&want.4), "chunk {chunk}");
        }
    }

    /// Stochastic rounding and a float32 master copy over bfloat16 parameters: every level and
    /// chunking gives the bits of the same steps written out: the float32 element function,
    /// then the result rounded with the random bits of the element's index within the whole
    /// parameter, or kept in the master copy and written to the parameter rounded to nearest.
    #[test]
    fn rounding_matches_reference_at_every_level_and_chunking() {
        use super::super::sr::{self, SrKey};
        use half::bf16;
        let h = AdamHyper {
            lr: 1e-3,
            weight_decay: 0.1,
            decoupled: true,
            ..AdamHyper::default()
        };
        let n: usize = if cfg!(miri) { 300 } else { 1000 };
        let block: usize = 64;
        let blocks = n.div_ceil(block);
        let mut rnd = uniform(0x0BAD_5EED);
        let p0: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rnd())).collect();
        let grads: Vec<Vec<bf16>> = (0..3)
            .map(|_| (0..n).map(|_| bf16::from_f32(rnd())).collect())
            .collect();
        let key = |t: usize| SrKey::new(0x00C0_FFEE, t as u64, 3);
        let widened = || p0.iter().map(|x| x.load()).collect::<Vec<f32>>();
        // `master`: Some(true) a master copy, Some(false) stochastic, None round to nearest.
        let run = |master: Option<bool>, chunk: usize, level: SimdLevel| {
            let mut p = p0.clone();
            let mut mw = widened();
            let (mut mq, mut vq) = (vec![127u8; n], vec![0u8; n]);
            let (mut am, mut av) = (vec![0f32; blocks], vec![0f32; blocks]);
            for (t, g) in grads.iter().enumerate() {
                let k = AdamScalars::<f32>::new(&h, (t + 1) as f64);
                let s = Q8Slices {
                    param: &mut p,
                    grad: g,
                    exp_avg: &mut mq,
                    exp_avg_sq: &mut vq,
                    exp_avg_absmax: &mut am,
                    exp_avg_sq_absmax: &mut av,
                    block,
                    rounding: match master {
                        Some(true) => Rounding::Master(&mut mw),
                        Some(false) => Rounding::Stochastic(key(t)),
                        None => Rounding::Nearest,
                    },
                };
                for piece in s.chunks(chunk) {
                    update(level, &k, piece);
                }
            }
            (p, mw, mq, vq, am, av)
        };
        let want = |master: bool| {
            let mut p = p0.clone();
            let mut mw = widened();
            let (mut mq, mut vq) = (vec![127u8; n], vec![0u8; n]);
            let (mut am, mut av) = (vec![0f32; blocks], vec![0f32; blocks]);
            for (t, g) in grads.iter().enumerate() {
                let k = AdamScalars::<f32>::new(&h, (t + 1) as f64);
                let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
                dequantize(signed_map(), &mq, &am, block, &mut m);
                dequantize(unsigned_map(), &vq, &av, block, &mut v);
                for j in 0..n {
                    let x = if master { mw[j] } else { p[j].load() };
                    let (pn, [mn, vn]) =
                        Elementwise::<f32, 2>::elem::<f32>(&k, x, g[j].load(), [m[j], v[j]]);
                    if master {
                        mw[j] = pn;
                        p[j] = bf16::store(pn);
                    } else {
                        p[j] = bf16::store_sr(pn, sr::bits(key(t), j));
                    }
                    (m[j], v[j]) = (mn, vn);
                }
                quantize(signed_map(), &m, block, &mut mq, &mut am);
                quantize(unsigned_map(), &v, block, &mut vq, &mut av);
            }
            (p, mw, mq, vq, am, av)
        };
        let levels = SimdLevel::ALL.into_iter().filter(|l| l.supported());
        let chunks: &[usize] = if cfg!(miri) {
            &[64, 1 << 14]
        } else {
            &[1, 64, 100, 640, 1 << 14]
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let bits16 = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for master in [false, true] {
            let w = want(master);
            // The steps moved the parameter.
            assert_ne!(bits16(&w.0), bits16(&p0));
            for &chunk in chunks {
                for level in levels.clone() {
                    let got = run(Some(master), chunk, level);
                    let at = format!("master {master} chunk {chunk} {level:?}");
                    assert_eq!(bits16(&got.0), bits16(&w.0), "{at}");
                    assert_eq!(bits(&got.1), bits(&w.1), "{at}");
                    assert_eq!((&got.2, &got.3), (&w.2, &w.3), "{at}");
                    assert_eq!(bits(&got.4), bits(&w.4), "{at}");
                    assert_eq!(bits(&got.5), bits(&w.5), "{at}");
                }
            }
        }
        // Stochastic rounding is not round to nearest: some element rounded the other way.
        let nearest = run(None, 1 << 14, SimdLevel::Baseline).0;
        assert_ne!(bits16(&nearest), bits16(&want(false).0));
    }
}
