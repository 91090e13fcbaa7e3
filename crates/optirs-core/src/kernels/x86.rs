//! x86-64 SIMD vectors for the element loop ([`super::lanes`]): AVX2 (8 `f32` or 4 `f64` a
//! vector; bfloat16 two vectors at a time, see [`Avx2Pairs`]) and AVX-512F (16 `f32` or 8 `f64`;
//! bfloat16 again in pairs, [`Avx512Pairs`]), with the conversions of each storage type.
//!
//! Each arithmetic operation is the single IEEE instruction the scalar code compiles to (add,
//! sub, mul, div, sqrt; negation flips the sign bit, as `-x` does), so a lane gives the same
//! bits as the scalar loop. `mul_add` is the FMA instruction (`vfmadd`), correctly rounded as
//! the scalar code's `f32::mul_add`/`f64::mul_add` is (see `Arith::mul_add`). The selects are
//! an ordered compare (`_CMP_GT_OQ`, `_CMP_EQ_OQ`: false where either is NaN, as the scalar
//! `>` and `==`) and a blend, which moves bits without rounding. The 16-bit
//! conversions match `Storage::load`/`store` bit for bit on every input: float16 through F16C's
//! `vcvtph2ps`/`vcvtps2ph` (round to nearest even, by the immediate), bfloat16 through the same
//! integer rounding as the scalar code.

#![allow(clippy::cast_ptr_alignment)] // every load and store here is an unaligned one

use std::arch::x86_64::{
    __m128i, __m256, __m256d, __m256i, _mm256_add_epi32, _mm256_add_pd, _mm256_add_ps,
    _mm256_and_si256, _mm256_blend_epi16, _mm256_blendv_epi8, _mm256_blendv_pd, _mm256_blendv_ps,
    _mm256_castpd_ps, _mm256_castps256_ps128, _mm256_castps_pd, _mm256_castps_si256,
    _mm256_castsi256_ps, _mm256_cmp_pd, _mm256_cmp_ps, _mm256_cvtepu16_epi32, _mm256_cvtph_ps,
    _mm256_cvtps_pd, _mm256_cvtps_ph, _mm256_div_pd, _mm256_div_ps, _mm256_extractf128_ps,
    _mm256_fmadd_pd, _mm256_fmadd_ps, _mm256_loadu_pd, _mm256_loadu_ps, _mm256_loadu_si256,
    _mm256_mul_pd, _mm256_mul_ps, _mm256_or_pd, _mm256_or_ps, _mm256_or_si256,
    _mm256_permute2f128_ps, _mm256_permute4x64_pd, _mm256_set1_epi32, _mm256_set1_pd,
    _mm256_set1_ps, _mm256_shuffle_ps, _mm256_slli_epi32, _mm256_sqrt_pd, _mm256_sqrt_ps,
    _mm256_srli_epi32, _mm256_storeu_pd, _mm256_storeu_ps, _mm256_storeu_si256, _mm256_sub_pd,
    _mm256_sub_ps, _mm256_unpackhi_ps, _mm256_unpacklo_ps, _mm256_xor_pd, _mm256_xor_ps,
    _mm_loadu_ps, _mm_loadu_si128, _mm_storeu_si128, _CMP_EQ_OQ, _CMP_GT_OQ, _CMP_UNORD_Q,
    _MM_FROUND_TO_NEAREST_INT,
};
use std::arch::x86_64::{
    __m512, __m512d, __m512i, _mm512_add_epi32, _mm512_add_pd, _mm512_add_ps, _mm512_and_si512,
    _mm512_castpd_si512, _mm512_castps_si512, _mm512_castsi512_pd, _mm512_castsi512_ps,
    _mm512_cmp_pd_mask, _mm512_cmp_ps_mask, _mm512_cvtph_ps, _mm512_cvtps_pd, _mm512_cvtps_ph,
    _mm512_div_pd, _mm512_div_ps, _mm512_fmadd_pd, _mm512_fmadd_ps, _mm512_loadu_pd,
    _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_blend_epi32, _mm512_mask_blend_pd,
    _mm512_mask_blend_ps, _mm512_mul_pd, _mm512_mul_ps, _mm512_or_si512, _mm512_permutex2var_ps,
    _mm512_set1_epi32, _mm512_set1_epi64, _mm512_set1_pd, _mm512_set1_ps, _mm512_setr_epi32,
    _mm512_slli_epi32, _mm512_sqrt_pd, _mm512_sqrt_ps, _mm512_srli_epi32, _mm512_storeu_pd,
    _mm512_storeu_ps, _mm512_storeu_si512, _mm512_sub_pd, _mm512_sub_ps, _mm512_ternarylogic_epi32,
    _mm512_xor_si512,
};

use super::lanes::{Lanes, Pair, Wide8};
use super::vector::vector;
use half::{bf16, f16};

// SAFETY of the intrinsics each `vector!` below names: this module is private to the kernels,
// which use these types only inside element loops run with the `Lanes` impls below, whose
// callers guarantee that the CPU has the instruction set (see `lanes::stream`); each level that
// runs these vectors has FMA (see `simd::SimdLevel::detect`).

// `maximum(a, b)`: b where `b > a` or b is NaN, else a (the scalar code's test, lane by lane).
vector!(
    F32x8(__m256, f32),
    add = _mm256_add_ps,
    sub = _mm256_sub_ps,
    mul = _mm256_mul_ps,
    div = _mm256_div_ps,
    sqrt = _mm256_sqrt_ps,
    fma = |s, a, b| _mm256_fmadd_ps(s, a, b),
    splat = _mm256_set1_ps,
    neg = |x| _mm256_xor_ps(x, _mm256_set1_ps(-0.0)),
    max = |a, b| _mm256_blendv_ps(
        a,
        b,
        _mm256_or_ps(
            _mm256_cmp_ps::<_CMP_GT_OQ>(b, a),
            _mm256_cmp_ps::<_CMP_UNORD_Q>(b, b)
        )
    ),
    select = |m, t, f| _mm256_blendv_ps(f, t, m),
    gt = |a, b| _mm256_cmp_ps::<_CMP_GT_OQ>(a, b),
    eq = |a, b| _mm256_cmp_ps::<_CMP_EQ_OQ>(a, b)
);
vector!(
    F64x4(__m256d, f64),
    add = _mm256_add_pd,
    sub = _mm256_sub_pd,
    mul = _mm256_mul_pd,
    div = _mm256_div_pd,
    sqrt = _mm256_sqrt_pd,
    fma = |s, a, b| _mm256_fmadd_pd(s, a, b),
    splat = _mm256_set1_pd,
    neg = |x| _mm256_xor_pd(x, _mm256_set1_pd(-0.0)),
    max = |a, b| _mm256_blendv_pd(
        a,
        b,
        _mm256_or_pd(
            _mm256_cmp_pd::<_CMP_GT_OQ>(b, a),
            _mm256_cmp_pd::<_CMP_UNORD_Q>(b, b)
        )
    ),
    select = |m, t, f| _mm256_blendv_pd(f, t, m),
    gt = |a, b| _mm256_cmp_pd::<_CMP_GT_OQ>(a, b),
    eq = |a, b| _mm256_cmp_pd::<_CMP_EQ_OQ>(a, b)
);

/// `Lanes<$s>` for `$lanes`: `W` elements per vector `$v`, read by `$load` and written by
/// `$store` (one instruction each way, or a conversion and a move).
macro_rules! lanes {
    (
        $lanes:ty, $s:ty => $v:ident, $w:expr,
        load = |$src:ident| $load:expr, store = |$dst:ident, $x:ident| $store:expr
    ) => {
        impl Lanes<$s> for $lanes {
            type V = $v;
            const W: usize = $w;
            #[inline(always)]
            unsafe fn load($src: *const $s) -> $v {
                unsafe { $v($load) }
            }
            #[inline(always)]
            unsafe fn store($dst: *mut $s, v: $v) {
                let $x = v.0;
                unsafe { $store }
            }
        }
    };
}

/// AVX2 with FMA and F16C: 8 `f32` or 4 `f64` a vector.
pub struct Avx2;

// SAFETY of every `Lanes` impl: the caller guarantees the pointer has `W` elements behind it
// and that the CPU has the instruction set; all loads and stores are unaligned ones.

lanes!(Avx2, f32 => F32x8, 8, load = |p| _mm256_loadu_ps(p), store = |p, v| _mm256_storeu_ps(p, v));
lanes!(Avx2, f64 => F64x4, 4, load = |p| _mm256_loadu_pd(p), store = |p, v| _mm256_storeu_pd(p, v));
lanes!(
    Avx2,
    f16 => F32x8,
    8,
    load = |p| _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>())),
    store = |p, v| _mm_storeu_si128(
        p.cast::<__m128i>(),
        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)
    )
);

/// AVX2 with FMA and F16C, two vectors at a time: 16 `f32` (a [`Pair`] of [`F32x8`]).
///
/// For bfloat16 this lets 16 elements (one 256-bit load) split into their even and odd
/// elements in one instruction each, and come back together in two, where one vector at a
/// time needed a widening load and a shift in, and a shift, a pack and a permute out.
pub struct Avx2Pairs;

/// `v` rounded to bfloat16 (as `Storage::store` does: nearest even, NaN kept quiet with its
/// sign and high payload bits), in the high 16 bits of each 32-bit lane; the low bits are junk.
#[inline(always)]
unsafe fn bf16_high_halves(v: __m256) -> __m256i {
    unsafe {
        let bits = _mm256_castps_si256(v);
        // bits + 0x7FFF + (lowest kept bit): round to nearest even.
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
        let biased = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
        let quiet_nan = _mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        _mm256_blendv_epi8(biased, quiet_nan, nan)
    }
}

impl Lanes<bf16> for Avx2Pairs {
    type V = Pair<F32x8>;
    const W: usize = 16;
    #[inline(always)]
    unsafe fn load(src: *const bf16) -> Pair<F32x8> {
        // A bfloat16 is the high half of a float32: the even elements move up a half, the odd
        // ones already are there. The pair holds (even, odd); `store` undoes the split.
        unsafe {
            let x = _mm256_loadu_si256(src.cast::<__m256i>());
            let even = _mm256_slli_epi32::<16>(x);
            let odd = _mm256_and_si256(x, _mm256_set1_epi32(-65536));
            Pair(
                F32x8(_mm256_castsi256_ps(even)),
                F32x8(_mm256_castsi256_ps(odd)),
            )
        }
    }
    #[inline(always)]
    unsafe fn store(dst: *mut bf16, v: Pair<F32x8>) {
        unsafe {
            let even = _mm256_srli_epi32::<16>(bf16_high_halves(v.0 .0));
            let odd = bf16_high_halves(v.1 .0);
            // Odd 16-bit words from `odd` (its high halves), even ones from `even`.
            let h = _mm256_blend_epi16::<0b1010_1010>(even, odd);
            _mm256_storeu_si256(dst.cast::<__m256i>(), h);
        }
    }
}

/// float32 in the bfloat16 lanes' element order, so that the tests can narrow every float32
/// through them; steps over float32 run [`Avx2`] (pairs measured no faster there).
impl Lanes<f32> for Avx2Pairs {
    type V = Pair<F32x8>;
    const W: usize = 16;
    #[inline(always)]
    unsafe fn load(src: *const f32) -> Pair<F32x8> {
        // Even and odd elements, as the bfloat16 lanes hold them, so that the two agree.
        unsafe {
            let a = _mm256_loadu_ps(src);
            let b = _mm256_loadu_ps(src.add(8));
            let (even, odd) = deinterleave(a, b);
            Pair(F32x8(even), F32x8(odd))
        }
    }
    #[inline(always)]
    unsafe fn store(dst: *mut f32, v: Pair<F32x8>) {
        unsafe {
            let (a, b) = interleave(v.0 .0, v.1 .0);
            _mm256_storeu_ps(dst, a);
            _mm256_storeu_ps(dst.add(8), b);
        }
    }
}

/// float16 in the bfloat16 lanes' element order: a float16 parameter with bfloat16 state
/// (`state_dtype`) steps through these pairs, converted by F16C as [`Avx2`]'s float16 lanes are.
impl Lanes<f16> for Avx2Pairs {
    type V = Pair<F32x8>;
    const W: usize = 16;
    #[inline(always)]
    unsafe fn load(src: *const f16) -> Pair<F32x8> {
        unsafe {
            let a = _mm256_cvtph_ps(_mm_loadu_si128(src.cast::<__m128i>()));
            let b = _mm256_cvtph_ps(_mm_loadu_si128(src.add(8).cast::<__m128i>()));
            let (even, odd) = deinterleave(a, b);
            Pair(F32x8(even), F32x8(odd))
        }
    }
    #[inline(always)]
    unsafe fn store(dst: *mut f16, v: Pair<F32x8>) {
        unsafe {
            let (a, b) = interleave(v.0 .0, v.1 .0);
            let ha = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(a);
            let hb = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(b);
            _mm_storeu_si128(dst.cast::<__m128i>(), ha);
            _mm_storeu_si128(dst.add(8).cast::<__m128i>(), hb);
        }
    }
}

/// (even elements, odd elements) of the 16 floats `a` then `b`.
#[inline(always)]
unsafe fn deinterleave(a: __m256, b: __m256) -> (__m256, __m256) {
    unsafe {
        // Within each 128-bit half: a's and b's even (odd) elements; then the 64-bit quarters
        // in order.
        let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
        let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
        let order = |v: __m256| {
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
        };
        (order(even), order(odd))
    }
}

/// The inverse of [`deinterleave`].
#[inline(always)]
unsafe fn interleave(even: __m256, odd: __m256) -> (__m256, __m256) {
    unsafe {
        let lo = _mm256_unpacklo_ps(even, odd);
        let hi = _mm256_unpackhi_ps(even, odd);
        (
            _mm256_permute2f128_ps::<0x20>(lo, hi),
            _mm256_permute2f128_ps::<0x31>(lo, hi),
        )
    }
}

// AVX-512F. Comparisons give a mask register; `maximum` as for AVX2. Negation flips the sign bit
// with an integer XOR: the float XOR is AVX-512DQ, which this level does not ask for.
vector!(
    F32x16(__m512, f32),
    add = _mm512_add_ps,
    sub = _mm512_sub_ps,
    mul = _mm512_mul_ps,
    div = _mm512_div_ps,
    sqrt = _mm512_sqrt_ps,
    fma = |s, a, b| _mm512_fmadd_ps(s, a, b),
    splat = _mm512_set1_ps,
    neg = |x| _mm512_castsi512_ps(_mm512_xor_si512(
        _mm512_castps_si512(x),
        _mm512_set1_epi32(i32::MIN)
    )),
    max = |a, b| _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(b, a) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(b, b),
        a,
        b
    ),
    select = |m, t, f| _mm512_mask_blend_ps(m, f, t),
    gt = |a, b| _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b),
    eq = |a, b| _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(a, b)
);
vector!(
    F64x8(__m512d, f64),
    add = _mm512_add_pd,
    sub = _mm512_sub_pd,
    mul = _mm512_mul_pd,
    div = _mm512_div_pd,
    sqrt = _mm512_sqrt_pd,
    fma = |s, a, b| _mm512_fmadd_pd(s, a, b),
    splat = _mm512_set1_pd,
    neg = |x| _mm512_castsi512_pd(_mm512_xor_si512(
        _mm512_castpd_si512(x),
        _mm512_set1_epi64(i64::MIN)
    )),
    max = |a, b| _mm512_mask_blend_pd(
        _mm512_cmp_pd_mask::<_CMP_GT_OQ>(b, a) | _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(b, b),
        a,
        b
    ),
    select = |m, t, f| _mm512_mask_blend_pd(m, f, t),
    gt = |a, b| _mm512_cmp_pd_mask::<_CMP_GT_OQ>(a, b),
    eq = |a, b| _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(a, b)
);

/// AVX-512F (with AVX2, FMA and F16C, which every AVX-512 processor has): 16 `f32` or 8 `f64` a
/// vector; float16 through the 512-bit form of `vcvtph2ps`/`vcvtps2ph`.
pub struct Avx512;

lanes!(Avx512, f32 => F32x16, 16, load = |p| _mm512_loadu_ps(p), store = |p, v| _mm512_storeu_ps(p, v));
lanes!(Avx512, f64 => F64x8, 8, load = |p| _mm512_loadu_pd(p), store = |p, v| _mm512_storeu_pd(p, v));
lanes!(
    Avx512,
    f16 => F32x16,
    16,
    load = |p| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast::<__m256i>())),
    store = |p, v| _mm256_storeu_si256(
        p.cast::<__m256i>(),
        _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)
    )
);

/// AVX-512F two vectors at a time (32 `f32`), for bfloat16: one 512-bit load splits into the
/// even and odd elements, as [`Avx2Pairs`] does with 256 bits.
pub struct Avx512Pairs;

/// [`bf16_high_halves`] over 16 lanes.
#[inline(always)]
unsafe fn bf16_high_halves_512(v: __m512) -> __m512i {
    unsafe {
        let bits = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let biased = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
        let quiet_nan = _mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000));
        _mm512_mask_blend_epi32(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v), biased, quiet_nan)
    }
}

impl Lanes<bf16> for Avx512Pairs {
    type V = Pair<F32x16>;
    const W: usize = 32;
    #[inline(always)]
    unsafe fn load(src: *const bf16) -> Pair<F32x16> {
        unsafe {
            let x = _mm512_loadu_si512(src.cast::<__m512i>());
            let even = _mm512_slli_epi32::<16>(x);
            let odd = _mm512_and_si512(x, _mm512_set1_epi32(-65536));
            Pair(
                F32x16(_mm512_castsi512_ps(even)),
                F32x16(_mm512_castsi512_ps(odd)),
            )
        }
    }
    #[inline(always)]
    unsafe fn store(dst: *mut bf16, v: Pair<F32x16>) {
        unsafe {
            let even = _mm512_srli_epi32::<16>(bf16_high_halves_512(v.0 .0));
            let odd = bf16_high_halves_512(v.1 .0);
            // Bitwise select (0xCA: a ? b : c) with a = the high-half mask: the odd element's
            // high half, the even element's low half.
            let h = _mm512_ternarylogic_epi32::<0xCA>(_mm512_set1_epi32(-65536), odd, even);
            _mm512_storeu_si512(dst.cast::<__m512i>(), h);
        }
    }
}

/// float32 in the bfloat16 lanes' element order, for the tests (as for [`Avx2Pairs`]).
impl Lanes<f32> for Avx512Pairs {
    type V = Pair<F32x16>;
    const W: usize = 32;
    #[inline(always)]
    unsafe fn load(src: *const f32) -> Pair<F32x16> {
        unsafe {
            let a = _mm512_loadu_ps(src);
            let b = _mm512_loadu_ps(src.add(16));
            // Index i < 16 picks a[i], 16 + i picks b[i].
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            Pair(
                F32x16(_mm512_permutex2var_ps(a, even, b)),
                F32x16(_mm512_permutex2var_ps(a, odd, b)),
            )
        }
    }
    #[inline(always)]
    unsafe fn store(dst: *mut f32, v: Pair<F32x16>) {
        unsafe {
            let (even, odd) = (v.0 .0, v.1 .0);
            let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let hi =
                _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            _mm512_storeu_ps(dst, _mm512_permutex2var_ps(even, lo, odd));
            _mm512_storeu_ps(dst.add(16), _mm512_permutex2var_ps(even, hi, odd));
        }
    }
}

/// float16 in the bfloat16 lanes' element order (as for [`Avx2Pairs`]).
impl Lanes<f16> for Avx512Pairs {
    type V = Pair<F32x16>;
    const W: usize = 32;
    #[inline(always)]
    unsafe fn load(src: *const f16) -> Pair<F32x16> {
        unsafe {
            let a = _mm512_cvtph_ps(_mm256_loadu_si256(src.cast::<__m256i>()));
            let b = _mm512_cvtph_ps(_mm256_loadu_si256(src.add(16).cast::<__m256i>()));
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            Pair(
                F32x16(_mm512_permutex2var_ps(a, even, b)),
                F32x16(_mm512_permutex2var_ps(a, odd, b)),
            )
        }
    }
    #[inline(always)]
    unsafe fn store(dst: *mut f16, v: Pair<F32x16>) {
        unsafe {
            let (even, odd) = (v.0 .0, v.1 .0);
            let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let hi =
                _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            let a =
                _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm512_permutex2var_ps(even, lo, odd));
            let b =
                _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm512_permutex2var_ps(even, hi, odd));
            _mm256_storeu_si256(dst.cast::<__m256i>(), a);
            _mm256_storeu_si256(dst.add(16).cast::<__m256i>(), b);
        }
    }
}

/// Eight bfloat16s as float32s: each one the high half of its float32.
#[inline(always)]
unsafe fn bf16x8_to_f32(src: *const bf16) -> __m256 {
    unsafe {
        let h = _mm_loadu_si128(src.cast::<__m128i>());
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

/// Eight float16s as float32s (F16C, exact).
#[inline(always)]
unsafe fn f16x8_to_f32(src: *const f16) -> __m256 {
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(src.cast::<__m128i>())) }
}

// SAFETY of every `Wide8` impl: as the `Lanes` impls', the caller guarantees 8 elements behind
// the pointer and the instruction set; all loads and stores are unaligned ones.

macro_rules! wide8 {
    ($lanes:ty => $v:ty, store = |$d:ident, $x:ident| $store:expr, $($s:ty => |$p:ident| $load:expr),* $(,)?) => {
        $(
            impl Wide8<$s> for $lanes {
                type V = $v;
                #[inline(always)]
                unsafe fn load8($p: *const $s) -> $v {
                    unsafe { $load }
                }
                #[inline(always)]
                unsafe fn store8($d: *mut f64, $x: $v) {
                    unsafe { $store }
                }
            }
        )*
    };
}

/// Four `f64` lanes from the low or high half of eight `f32`s.
#[inline(always)]
unsafe fn halves(f: __m256) -> Pair<F64x4> {
    unsafe {
        Pair(
            F64x4(_mm256_cvtps_pd(_mm256_castps256_ps128(f))),
            F64x4(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(f))),
        )
    }
}

wide8!(
    Avx2 => Pair<F64x4>,
    store = |d, v| {
        _mm256_storeu_pd(d, v.0 .0);
        _mm256_storeu_pd(d.add(4), v.1 .0);
    },
    f32 => |p| Pair(F64x4(_mm256_cvtps_pd(_mm_loadu_ps(p))), F64x4(_mm256_cvtps_pd(_mm_loadu_ps(p.add(4))))),
    f64 => |p| Pair(F64x4(_mm256_loadu_pd(p)), F64x4(_mm256_loadu_pd(p.add(4)))),
    f16 => |p| halves(f16x8_to_f32(p)),
    bf16 => |p| halves(bf16x8_to_f32(p)),
);

wide8!(
    Avx512 => F64x8,
    store = |d, v| _mm512_storeu_pd(d, v.0),
    f32 => |p| F64x8(_mm512_cvtps_pd(_mm256_loadu_ps(p))),
    f64 => |p| F64x8(_mm512_loadu_pd(p)),
    f16 => |p| F64x8(_mm512_cvtps_pd(f16x8_to_f32(p))),
    bf16 => |p| F64x8(_mm512_cvtps_pd(bf16x8_to_f32(p))),
);
