//! The random bits of stochastic rounding: a counter-based generator, so that an element's bits
//! depend only on (seed, step, parameter, element index), never on which thread, SIMD level or
//! work item computes them, nor on what was drawn before.
//!
//! Per parameter and step, [`SrKey::new`] mixes the seed, the step and the parameter's index
//! into 64 bits with SplitMix64's finaliser (once, in scalar code). Per element, [`bits`] runs
//! two rounds of a 32-bit integer hash (Wellons' `lowbias32`: xor-shifts and multiplies, each
//! round a bijection of `u32`) over the element's index and the key: plain `u32` arithmetic,
//! which every SIMD level computes exactly alike, and which the compiler vectorises.

/// What the random bits of one parameter's step are drawn from, and where its slice begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SrKey {
    k0: u32,
    k1: u32,
    /// The index, within the whole parameter, of the slice's first element.
    pub offset: u64,
}

/// SplitMix64's output function (Steele, Lea and Flood 2014): a bijection of `u64`.
#[inline]
#[must_use]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SrKey {
    /// The key of parameter `param` (its index in the optimizer's parameter order) at step
    /// `step` of generator `seed`.
    #[must_use]
    #[allow(clippy::cast_possible_truncation)] // the halves of the 64 bits
    pub fn new(seed: u64, step: u64, param: u64) -> SrKey {
        let z = splitmix64(splitmix64(splitmix64(seed) ^ step) ^ param);
        SrKey {
            k0: z as u32,
            k1: (z >> 32) as u32,
            offset: 0,
        }
    }

    /// The same key for the slice that starts `n` elements later.
    #[must_use]
    pub fn advanced(self, n: usize) -> SrKey {
        SrKey {
            offset: self.offset + n as u64,
            ..self
        }
    }
}

/// Chris Wellons' `lowbias32` (hash-prospector): xor-shift-multiply, a bijection of `u32`.
#[inline(always)]
fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// The 32 random bits of the element `i` places into the slice of `key`: distinct elements of
/// one parameter (below 2^32 apart) get distinct bits at one step, since each operation is a
/// bijection for a fixed key.
#[inline(always)]
#[must_use]
#[allow(clippy::cast_possible_truncation)] // the halves of the index
pub fn bits(key: SrKey, i: usize) -> u32 {
    let idx = key.offset.wrapping_add(i as u64);
    mix(key, idx as u32, (idx >> 32) as u32)
}

/// [`bits`] of the element whose index within the parameter has the halves `lo` and `hi`: all
/// `u32` arithmetic, so that a loop over consecutive elements vectorises.
#[inline(always)]
#[must_use]
pub fn mix(key: SrKey, lo: u32, hi: u32) -> u32 {
    lowbias32(lowbias32(lo ^ key.k0) ^ hi ^ key.k1)
}
