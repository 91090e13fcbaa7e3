//! The two element types the kernels are generic over.

use std::ops::{Add, Div, Mul, Neg, Sub};

use super::lanes::Arith;

/// `f32` or `f64`: the arithmetic the update rules need, all correctly rounded IEEE operations.
pub trait Float:
    Storage<Compute = Self>
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + std::fmt::Debug
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    /// Rounds an `f64` to this type, as torch does when a Python float meets a tensor.
    fn from_f64(x: f64) -> Self;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Correctly rounded square root.
    #[must_use]
    fn sqrt(self) -> Self;
    /// `self * a + b` rounded once (see [`Arith::mul_add`] for the one place it is used).
    #[must_use]
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// True for NaN.
    fn is_nan(self) -> bool;
    /// False for NaN and ±infinity.
    fn is_finite(self) -> bool;
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        // The FMA instruction where the caller is compiled with it, else libm's `fmaf`:
        // correctly rounded either way, so the same bits.
        f32::mul_add(self, a, b)
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        // The FMA instruction where the caller is compiled with it, else libm's `fma`:
        // correctly rounded either way, so the same bits.
        f64::mul_add(self, a, b)
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
}

/// How an element is kept in memory, and the type its arithmetic runs in.
///
/// `f32` and `f64` compute in themselves. `bf16` and `f16` compute in `f32` and round once when
/// stored, as torch's fused CPU optimizers do with reduced-precision parameters.
pub trait Storage: Copy + Send + Sync + std::fmt::Debug + 'static {
    type Compute: Float;
    fn load(self) -> Self::Compute;
    fn store(x: Self::Compute) -> Self;
    /// `x` rounded stochastically with the 32 random bits `r`: up or down to a neighbour with
    /// probability proportional to the distance from the other (see [`super::sr`]). Types
    /// that compute in themselves store `x` unchanged; float16 rounds to nearest (the bindings
    /// refuse stochastic rounding for it).
    #[inline(always)]
    #[must_use]
    fn store_sr(x: Self::Compute, r: u32) -> Self {
        let _ = r;
        Self::store(x)
    }
}

impl Storage for f32 {
    type Compute = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(x: f32) -> f32 {
        x
    }
}

impl Storage for f64 {
    type Compute = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(x: f64) -> f64 {
        x
    }
}

impl Storage for half::bf16 {
    type Compute = f32;
    /// Exact: a bfloat16 is the high half of a float32.
    #[inline(always)]
    fn load(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    /// Round to nearest, ties to even (torch's `c10::BFloat16` conversion), NaN kept quiet.
    /// Written without branches so that it vectorises (`half`'s version does not).
    #[inline(always)]
    fn store(x: f32) -> half::bf16 {
        let bits = x.to_bits();
        let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
        let quiet_nan = (bits >> 16) | 0x0040;
        half::bf16::from_bits((if x.is_nan() { quiet_nan } else { rounded }) as u16)
    }
    /// torchao's `_fp32_to_bf16_sr`: 16 random bits added below the kept ones, then truncated,
    /// so the magnitude rounds up with probability (dropped bits) / 2^16, down otherwise; an
    /// exact bfloat16 stays itself. Infinity stays infinite (its dropped bits are 0, the sum
    /// carries nowhere); a finite value above the largest bfloat16 may carry into infinity,
    /// as round to nearest does from halfway. NaN is kept quiet, as [`Storage::store`].
    #[inline(always)]
    fn store_sr(x: f32, r: u32) -> half::bf16 {
        let bits = x.to_bits();
        let rounded = bits.wrapping_add(r >> 16) >> 16;
        let quiet_nan = (bits >> 16) | 0x0040;
        half::bf16::from_bits((if x.is_nan() { quiet_nan } else { rounded }) as u16)
    }
}

impl Storage for half::f16 {
    type Compute = f32;
    /// Exact, NaN kept (made quiet), as `half`'s conversion. Written without branches so that it
    /// vectorises (`half`'s does not: a scalar call per element).
    #[inline(always)]
    fn load(self) -> f32 {
        let h = u32::from(self.to_bits());
        let sign = (h & 0x8000) << 16;
        // Exponent and mantissa moved to their float32 places.
        let em = (h & 0x7FFF) << 13;
        let exp = em & 0x0F80_0000;
        let normal = em + ((127 - 15) << 23);
        let quiet = if em & 0x007F_E000 != 0 {
            0x0040_0000
        } else {
            0
        };
        let inf_nan = 0x7F80_0000 | (em & 0x007F_E000) | quiet;
        // Zero and subnormals, m * 2^-24: (2^-14 + m * 2^-24) - 2^-14, both terms and the
        // difference exact in float32.
        let subnormal = (f32::from_bits(em + (113 << 23)) - f32::from_bits(113 << 23)).to_bits();
        let bits = if exp == 0x0F80_0000 {
            inf_nan
        } else if exp == 0 {
            subnormal
        } else {
            normal
        };
        f32::from_bits(bits | sign)
    }
    /// Round to nearest, ties to even, with subnormals, overflow to infinity, NaN kept (made
    /// quiet): bit for bit `half`'s conversion, without branches so that it vectorises.
    #[inline(always)]
    fn store(x: f32) -> half::f16 {
        let bits = x.to_bits();
        let sign = (bits >> 16) & 0x8000;
        let a = bits & 0x7FFF_FFFF;
        let nan = 0x7E00 | ((a & 0x007F_FFFF) >> 13);
        // Normal results: rebias the exponent, then round the 13 dropped bits to nearest even
        // (a carry out of the mantissa moves up the exponent, up to infinity at 65520).
        // Wrapping throughout: this is computed for every input and only used for normal results,
        // where nothing wraps; others (below 2^-14) would wrap below zero.
        let normal = (a
            .wrapping_sub((127 - 15) << 23)
            .wrapping_add(0x0FFF + ((a >> 13) & 1)))
            >> 13;
        // Subnormal results: adding 0.5 lines the value's bits up with float16's subnormal
        // mantissa, and the float addition rounds to nearest even on the way.
        let subnormal = (f32::from_bits(a) + 0.5)
            .to_bits()
            .wrapping_sub(0x3F00_0000);
        let h = if a > 0x7F80_0000 {
            nan
        } else if a >= 0x4780_0000 {
            0x7C00 // 65536 and above, and infinity
        } else if a >= 0x3880_0000 {
            normal // 2^-14 and above
        } else {
            subnormal
        };
        half::f16::from_bits((h | sign) as u16)
    }
}

/// `torch.lerp(start, end, weight)` with torch's two-branch formula, which keeps the result
/// exact at both ends; the branch is taken once per step, on the weight.
#[inline(always)]
pub fn lerp<T: Float, V: Arith<T>>(start: V, end: V, w: &LerpWeight<T>) -> V {
    if w.small {
        start + V::splat(w.weight) * (end - start)
    } else {
        end - (end - start) * V::splat(w.one_minus)
    }
}

/// The weight of a `lerp` prepared once per step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LerpWeight<T> {
    pub weight: T,
    pub one_minus: T,
    pub small: bool,
}

impl<T: Float> LerpWeight<T> {
    /// `weight` arrives as torch sees it: a Python float rounded to `T`.
    #[must_use]
    pub fn new(weight: f64) -> Self {
        let w = T::from_f64(weight);
        // torch computes `1 - weight` in the tensor's type, from the already rounded weight.
        LerpWeight {
            weight: w,
            one_minus: T::ONE - w,
            small: w.to_f64().abs() < 0.5,
        }
    }
}
