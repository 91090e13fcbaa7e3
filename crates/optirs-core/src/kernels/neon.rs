//! aarch64 NEON vectors for the element loop ([`super::lanes`]): 4 `f32` or 2 `f64` a register,
//! two registers at a time ([`Neon`]: 8 `f32` or 4 `f64` a step, in two independent dependency
//! chains), with the conversions of each storage type.
//!
//! NEON (Advanced SIMD) is part of the aarch64 baseline: every aarch64 CPU that runs this build
//! has it (the module is compiled only where the target enables the `neon` feature, which the
//! Linux, macOS and Windows aarch64 targets all do), so nothing here is detected at run time.
//! The intrinsics are still `unsafe` to call (they are `#[target_feature(enable = "neon")]`
//! functions, and the target's features do not make them safe), with that one condition, which
//! this build always meets.
//!
//! As in `super::x86`, each arithmetic operation is the single IEEE instruction the scalar code
//! compiles to on aarch64 (`fadd`, `fsub`, `fmul`, `fdiv`, `fsqrt`, `fneg`, which flips the sign
//! bit), so a lane gives the scalar loop's bits. `mul_add` is the fused `fmla`, correctly rounded
//! as the scalar `fmadd` that `f32::mul_add` compiles to. The selects are an ordered compare
//! (`fcmgt`, `fcmeq`: false where either is NaN, as the scalar `>` and `==`) and a bit select
//! (`bsl`), which moves bits without rounding. NEON's own `fmax` is not used for `maximum`: it
//! returns +0 for (-0, +0) in either order and the first NaN of two, where the scalar code keeps
//! `self` and the second.
//!
//! The 16-bit conversions match `Storage::load`/`store` bit for bit on every input (the tests
//! check all 2^16 patterns one way and a sweep of float32 values the other): bfloat16 through
//! the scalar code's integer rounding, float16 through `fcvtl`/`fcvtn` (half to single and back,
//! part of the base ARMv8.0 floating point, not of the FP16 arithmetic extension), which round
//! to nearest even, keep subnormals (FPCR.FZ does not apply to half precision, nor FZ16 to
//! conversions) and keep a NaN's sign and payload, made quiet, as `half` does. They are written
//! as inline assembly because their intrinsics (`vcvt_f32_f16`, `vcvt_f16_f32`) take the
//! `float16x4_t` type, stable only since Rust 1.94, above this crate's `rust-version`.

#![allow(clippy::cast_ptr_alignment)] // every load and store here is an unaligned one

use std::arch::aarch64::{
    float32x4_t, float64x2_t, uint16x8_t, uint32x4_t, vaddq_f32, vaddq_f64, vaddq_u32, vandq_u32,
    vbslq_f32, vbslq_f64, vbslq_u32, vceqq_f32, vceqq_f64, vcgtq_f32, vcgtq_f64, vcvt_f64_f32,
    vcvt_high_f64_f32, vdivq_f32, vdivq_f64, vdupq_n_f32, vdupq_n_f64, vdupq_n_u32, vfmaq_f32,
    vfmaq_f64, vget_low_f32, vget_low_u16, vld1q_f32, vld1q_f64, vld1q_u16, vmulq_f32, vmulq_f64,
    vnegq_f32, vnegq_f64, vorrq_u32, vreinterpretq_f32_u32, vreinterpretq_u16_u32,
    vreinterpretq_u32_f32, vshll_high_n_u16, vshll_n_u16, vshrq_n_u32, vsqrtq_f32, vsqrtq_f64,
    vst1q_f32, vst1q_f64, vst1q_u16, vsubq_f32, vsubq_f64, vuzp2q_u16,
};

use super::lanes::{Lanes, Pair, Wide8};
use super::vector::vector;
use half::{bf16, f16};

// SAFETY of the intrinsics each `vector!` below names: they only need NEON, which is baseline
// on aarch64 (this module is compiled only where the target enables it).
//
// `maximum(a, b)`: b where b > a; else a where b is a number (b == b), b (NaN) where it is not.
// `mul_add`: `fmla`'s first operand is the addend, `b + self * a` with one rounding.
vector!(
    F32x4(float32x4_t, f32),
    add = vaddq_f32,
    sub = vsubq_f32,
    mul = vmulq_f32,
    div = vdivq_f32,
    sqrt = vsqrtq_f32,
    fma = |s, a, b| vfmaq_f32(b, s, a),
    splat = vdupq_n_f32,
    neg = |x| vnegq_f32(x),
    max = |a, b| vbslq_f32(vcgtq_f32(b, a), b, vbslq_f32(vceqq_f32(b, b), a, b)),
    select = |m, t, f| vbslq_f32(m, t, f),
    gt = |a, b| vcgtq_f32(a, b),
    eq = |a, b| vceqq_f32(a, b)
);
vector!(
    F64x2(float64x2_t, f64),
    add = vaddq_f64,
    sub = vsubq_f64,
    mul = vmulq_f64,
    div = vdivq_f64,
    sqrt = vsqrtq_f64,
    fma = |s, a, b| vfmaq_f64(b, s, a),
    splat = vdupq_n_f64,
    neg = |x| vnegq_f64(x),
    max = |a, b| vbslq_f64(vcgtq_f64(b, a), b, vbslq_f64(vceqq_f64(b, b), a, b)),
    select = |m, t, f| vbslq_f64(m, t, f),
    gt = |a, b| vcgtq_f64(a, b),
    eq = |a, b| vceqq_f64(a, b)
);

/// NEON, two registers at a time: 8 `f32` (float32, bfloat16 and float16 storage, in element
/// order: the first register holds elements 0 to 3) or 4 `f64`.
///
/// Two registers rather than one: a bfloat16 or float16 load of 128 bits is 8 elements, and two
/// independent chains per step leave the 32 vector registers room for any rule's state.
pub struct Neon;

// SAFETY of every `Lanes` impl and helper below: the caller guarantees `W` elements behind the
// pointer (`Lanes::load`/`store`); NEON is baseline on aarch64. All loads and stores are
// unaligned ones (`ld1`/`st1` need only element alignment, and the 16-bit ones go through
// `u16`, whose alignment bfloat16's and float16's equal).

impl Lanes<f32> for Neon {
    type V = Pair<F32x4>;
    const W: usize = 8;
    #[inline(always)]
    unsafe fn load(src: *const f32) -> Pair<F32x4> {
        unsafe { Pair(F32x4(vld1q_f32(src)), F32x4(vld1q_f32(src.add(4)))) }
    }
    #[inline(always)]
    unsafe fn store(dst: *mut f32, v: Pair<F32x4>) {
        unsafe {
            vst1q_f32(dst, v.0 .0);
            vst1q_f32(dst.add(4), v.1 .0);
        }
    }
}

impl Lanes<f64> for Neon {
    type V = Pair<F64x2>;
    const W: usize = 4;
    #[inline(always)]
    unsafe fn load(src: *const f64) -> Pair<F64x2> {
        unsafe { Pair(F64x2(vld1q_f64(src)), F64x2(vld1q_f64(src.add(2)))) }
    }
    #[inline(always)]
    unsafe fn store(dst: *mut f64, v: Pair<F64x2>) {
        unsafe {
            vst1q_f64(dst, v.0 .0);
            vst1q_f64(dst.add(2), v.1 .0);
        }
    }
}

/// Eight bfloat16s as float32s: each the high half of its float32 (`ushll`/`ushll2` by 16).
#[inline(always)]
unsafe fn bf16x8_to_f32(src: *const bf16) -> (float32x4_t, float32x4_t) {
    unsafe {
        let h = vld1q_u16(src.cast::<u16>());
        (
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
        )
    }
}

/// `v` rounded to bfloat16 (as `Storage::store` does: nearest even, NaN kept quiet with its
/// sign and high payload bits), in the high 16 bits of each 32-bit lane; the low bits are junk.
#[inline(always)]
fn bf16_high_halves(v: float32x4_t) -> uint32x4_t {
    // SAFETY: register operations only; NEON is baseline on aarch64.
    unsafe {
        let bits = vreinterpretq_u32_f32(v);
        // bits + 0x7FFF + (lowest kept bit): round to nearest even.
        let lsb = vandq_u32(vshrq_n_u32::<16>(bits), vdupq_n_u32(1));
        let biased = vaddq_u32(vaddq_u32(bits, vdupq_n_u32(0x7FFF)), lsb);
        let quiet_nan = vorrq_u32(bits, vdupq_n_u32(0x0040_0000));
        // v == v is false exactly for NaN.
        vbslq_u32(vceqq_f32(v, v), biased, quiet_nan)
    }
}

impl Lanes<bf16> for Neon {
    type V = Pair<F32x4>;
    const W: usize = 8;
    #[inline(always)]
    unsafe fn load(src: *const bf16) -> Pair<F32x4> {
        let (lo, hi) = unsafe { bf16x8_to_f32(src) };
        Pair(F32x4(lo), F32x4(hi))
    }
    #[inline(always)]
    unsafe fn store(dst: *mut bf16, v: Pair<F32x4>) {
        // The odd 16-bit words of the two vectors, in order (`uzp2`): each lane's high half.
        unsafe {
            let h = vuzp2q_u16(
                vreinterpretq_u16_u32(bf16_high_halves(v.0 .0)),
                vreinterpretq_u16_u32(bf16_high_halves(v.1 .0)),
            );
            vst1q_u16(dst.cast::<u16>(), h);
        }
    }
}

/// Eight float16s (one register) as float32s: `fcvtl` the low four, `fcvtl2` the high four.
/// Exact, NaN made quiet with its payload kept.
#[inline(always)]
fn f16x8_to_f32(h: uint16x8_t) -> (float32x4_t, float32x4_t) {
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: two register-to-register conversions of the base ARMv8.0 FP/NEON instruction set
    // (baseline on aarch64); no memory, stack or flags are touched. They honour FPCR.DN and AHP
    // only, which the platform ABI leaves clear (as do the scalar conversions they mirror).
    unsafe {
        std::arch::asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            h = in(vreg) h,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    (lo, hi)
}

/// Eight float32s rounded to float16 (`fcvtn`, `fcvtn2`): nearest even, overflow to infinity,
/// subnormals kept, NaN made quiet with its sign and high payload bits, as `Storage::store`.
#[inline(always)]
fn f32x8_to_f16(lo: float32x4_t, hi: float32x4_t) -> uint16x8_t {
    let h: uint16x8_t;
    // SAFETY: as in `f16x8_to_f32`. `fcvtn` writes the low half and zeroes the high one, which
    // `fcvtn2` then writes, so the output is not read before it is written in full.
    unsafe {
        std::arch::asm!(
            "fcvtn {h:v}.4h, {lo:v}.4s",
            "fcvtn2 {h:v}.8h, {hi:v}.4s",
            lo = in(vreg) lo,
            hi = in(vreg) hi,
            h = out(vreg) h,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    h
}

impl Lanes<f16> for Neon {
    type V = Pair<F32x4>;
    const W: usize = 8;
    #[inline(always)]
    unsafe fn load(src: *const f16) -> Pair<F32x4> {
        let (lo, hi) = f16x8_to_f32(unsafe { vld1q_u16(src.cast::<u16>()) });
        Pair(F32x4(lo), F32x4(hi))
    }
    #[inline(always)]
    unsafe fn store(dst: *mut f16, v: Pair<F32x4>) {
        let h = f32x8_to_f16(v.0 .0, v.1 .0);
        unsafe { vst1q_u16(dst.cast::<u16>(), h) };
    }
}

/// Two `f64` registers from four `f32` lanes (`fcvtl`, `fcvtl2`: exact).
#[inline(always)]
fn widen(f: float32x4_t) -> Pair<F64x2> {
    // SAFETY: register operations only; NEON is baseline on aarch64.
    unsafe {
        Pair(
            F64x2(vcvt_f64_f32(vget_low_f32(f))),
            F64x2(vcvt_high_f64_f32(f)),
        )
    }
}

/// Eight elements as four `f64` registers, for the gradient norms (`crate::norm`): every
/// conversion exact, as for the x86 levels.
macro_rules! wide8 {
    ($($s:ty => |$p:ident| $load:expr),* $(,)?) => {$(
        impl Wide8<$s> for Neon {
            type V = Pair<Pair<F64x2>>;
            #[inline(always)]
            unsafe fn load8($p: *const $s) -> Pair<Pair<F64x2>> {
                // SAFETY: the caller guarantees 8 elements behind the pointer; NEON is
                // baseline on aarch64.
                unsafe { $load }
            }
            #[inline(always)]
            unsafe fn store8(d: *mut f64, v: Pair<Pair<F64x2>>) {
                // SAFETY: the caller guarantees room for 8 `f64`s; NEON as above.
                unsafe {
                    vst1q_f64(d, v.0 .0 .0);
                    vst1q_f64(d.add(2), v.0 .1 .0);
                    vst1q_f64(d.add(4), v.1 .0 .0);
                    vst1q_f64(d.add(6), v.1 .1 .0);
                }
            }
        }
    )*};
}

wide8!(
    f32 => |p| Pair(widen(vld1q_f32(p)), widen(vld1q_f32(p.add(4)))),
    f64 => |p| Pair(
        Pair(F64x2(vld1q_f64(p)), F64x2(vld1q_f64(p.add(2)))),
        Pair(F64x2(vld1q_f64(p.add(4))), F64x2(vld1q_f64(p.add(6)))),
    ),
    f16 => |p| {
        let (lo, hi) = f16x8_to_f32(vld1q_u16(p.cast::<u16>()));
        Pair(widen(lo), widen(hi))
    },
    bf16 => |p| {
        let (lo, hi) = bf16x8_to_f32(p);
        Pair(widen(lo), widen(hi))
    },
);
