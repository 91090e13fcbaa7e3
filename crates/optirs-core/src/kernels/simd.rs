//! Run-time choice of instruction set.
//!
//! The same update code ([`super::apply_inline`]) is compiled once per level with
//! `#[target_feature]`, over that level's vectors; the wheel itself targets baseline x86-64.
//! On aarch64, NEON is part of the baseline: its level needs no detection and no
//! `#[target_feature]`, only its vectors (`super::neon`). Because the kernels use only correctly rounded IEEE operations, and fuse a multiply-add in
//! exactly the same places at every level (`lanes::Arith::mul_add`), every level gives the same
//! bits.

use std::sync::atomic::{AtomicU8, Ordering};

use super::adam::AdamScalars;
use super::adam8bit::Q8Slices;
use super::lanes::One;
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
use super::lanes::StateLanes;
use super::{Rule, Slices, Storage};

/// An instruction-set level the kernels are compiled for.
///
/// Every variant exists on every architecture, so that a level's name parses anywhere
/// (`OPTIRS_SIMD=avx2` on aarch64 is a level this CPU lacks, not an unknown word), but only
/// [`SimdLevel::ALL`]'s are compiled for and supported. The order is meaningful among one
/// architecture's levels only: [`SimdLevel::clamped`] is the way down to a supported one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// The plain element loop, vectorised (or not) by the compiler for whatever the build
    /// target guarantees: SSE2 on x86-64 ("sse2"), elsewhere "scalar" (on aarch64 the
    /// compiler may use NEON in it; the `Neon` level spells the vectors out).
    Baseline = 1,
    /// x86-64: AVX2 with FMA and F16C.
    Avx2 = 2,
    /// x86-64: AVX-512F (with AVX2, FMA and F16C).
    Avx512 = 3,
    /// aarch64: NEON (Advanced SIMD), part of the baseline there.
    Neon = 4,
}

impl SimdLevel {
    /// Every level compiled for this architecture, lowest first.
    #[cfg(target_arch = "x86_64")]
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Baseline, SimdLevel::Avx2, SimdLevel::Avx512];
    /// Every level compiled for this architecture, lowest first.
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    pub const ALL: [SimdLevel; 2] = [SimdLevel::Baseline, SimdLevel::Neon];
    /// Every level compiled for this architecture, lowest first.
    #[cfg(not(any(
        target_arch = "x86_64",
        all(target_arch = "aarch64", target_feature = "neon")
    )))]
    pub const ALL: [SimdLevel; 1] = [SimdLevel::Baseline];

    /// The name used by `optirs.simd_level()` and the `OPTIRS_SIMD` variable.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Baseline => {
                if cfg!(target_arch = "x86_64") {
                    "sse2"
                } else {
                    "scalar"
                }
            }
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Neon => "neon",
        }
    }

    /// Parses a level name (case-insensitive); every baseline spelling maps to `Baseline`.
    #[must_use]
    pub fn parse(s: &str) -> Option<SimdLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "baseline" | "scalar" | "sse2" | "none" => Some(SimdLevel::Baseline),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" | "avx-512" | "avx512f" => Some(SimdLevel::Avx512),
            "neon" => Some(SimdLevel::Neon),
            _ => None,
        }
    }

    /// The best level this CPU supports.
    #[must_use]
    pub fn detect() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            // Every AVX2 processor has FMA and F16C (float16 conversions), and every AVX-512 one
            // all three, but a hypervisor may hide a feature: each level asks for all it uses.
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
                return SimdLevel::Avx512;
            }
            if avx2 {
                return SimdLevel::Avx2;
            }
        }
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        {
            // Baseline on this target: every CPU that runs the build has it.
            return SimdLevel::Neon;
        }
        #[allow(unreachable_code)] // on aarch64, after the return above
        SimdLevel::Baseline
    }

    /// True when this CPU can run code compiled for `self` (a level of this architecture, at
    /// most the best it has).
    #[must_use]
    pub fn supported(self) -> bool {
        SimdLevel::ALL.contains(&self) && self <= SimdLevel::detect()
    }

    /// `self` where the CPU supports it, else the best level it has (a lower x86 level than
    /// the one asked for, or, for another architecture's level, this one's best): what every
    /// dispatch runs, so that no unsupported instruction ever executes.
    #[must_use]
    pub fn clamped(self) -> SimdLevel {
        if self.supported() {
            self
        } else {
            SimdLevel::detect()
        }
    }
}

/// The level names `OPTIRS_SIMD` and `set_simd_level` take, for error messages.
pub const LEVEL_NAMES: &str = "'avx512', 'avx2', 'neon', 'sse2', 'scalar' or 'baseline'";

static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The level in use: the best the CPU has, lowered by `OPTIRS_SIMD` when that names a lower
/// one (a higher, another architecture's or an unknown name is ignored: forcing an unsupported
/// level would crash).
#[must_use]
pub fn active() -> SimdLevel {
    match ACTIVE.load(Ordering::Relaxed) {
        1 => SimdLevel::Baseline,
        2 => SimdLevel::Avx2,
        3 => SimdLevel::Avx512,
        4 => SimdLevel::Neon,
        _ => {
            let best = SimdLevel::detect();
            let chosen = std::env::var("OPTIRS_SIMD")
                .ok()
                .and_then(|v| SimdLevel::parse(&v))
                .map_or(best, SimdLevel::clamped);
            ACTIVE.store(chosen as u8, Ordering::Relaxed);
            chosen
        }
    }
}

/// Chooses the level from `OPTIRS_SIMD` (called once, at import); returns a warning when the
/// variable names no level, or one this CPU lacks, saying which level is used instead.
#[must_use]
#[allow(clippy::unnecessary_debug_formatting)] // quoted, with escapes: the value may be anything
pub fn init() -> Option<String> {
    let best = SimdLevel::detect();
    let raw = std::env::var_os("OPTIRS_SIMD");
    let wanted = raw.as_ref().map(|v| v.to_str().and_then(SimdLevel::parse));
    let chosen = match wanted {
        Some(Some(w)) => w.clamped(),
        _ => best,
    };
    ACTIVE.store(chosen as u8, Ordering::Relaxed);
    match (raw, wanted) {
        (Some(raw), Some(None)) => Some(format!(
            "OPTIRS_SIMD={raw:?} names no SIMD level (one of {LEVEL_NAMES}); using {}",
            chosen.name()
        )),
        (Some(raw), Some(Some(w))) if !w.supported() => Some(format!(
            "OPTIRS_SIMD={raw:?} asks for a level this CPU does not support; using {}",
            chosen.name()
        )),
        _ => None,
    }
}

/// Forces a level for the rest of the process (clamped to what the CPU supports) and returns
/// the level now in use.
pub fn set_active(level: SimdLevel) -> SimdLevel {
    let chosen = level.clamped();
    ACTIVE.store(chosen as u8, Ordering::Relaxed);
    chosen
}

/// `fn $avx512 | $avx2 [generics] (arguments) { body }`: the body compiled twice, with each x86
/// level's `#[target_feature]` (AVX-512F, and AVX2, both with FMA and F16C), so that the
/// element loop it inlines runs on that level's instructions. The features of each level are
/// written here once.
///
/// Safety of each function made: the CPU has the level's features (its callers clamp the level
/// to what `detect` found), and the body's own call gets what its documentation asks, `L` being
/// that level's lanes.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_levels {
    (
        fn $avx512:ident | $avx2:ident [$($generics:tt)*] ($($arg:ident: $ty:ty),* $(,)?)
        $body:block
    ) => {
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn $avx512<$($generics)*>($($arg: $ty),*) $body

        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $avx2<$($generics)*>($($arg: $ty),*) $body
    };
}

#[cfg(target_arch = "x86_64")]
x86_levels!(
    fn apply_avx512 | apply_avx2
    [S: Storage, Q: Storage<Compute = S::Compute>, L: StateLanes<S, Q>]
    (rule: &Rule<S::Compute>, s: Slices<'_, S, Q>) {
        // SAFETY: the CPU has `L`'s instructions (the macro's documentation).
        unsafe { super::apply_inline::<S, Q, L>(rule, s) }
    }
);

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
fn apply_neon<S, Q>(rule: &Rule<S::Compute>, s: Slices<'_, S, Q>)
where
    S: Storage,
    Q: Storage<Compute = S::Compute>,
    super::neon::Neon: StateLanes<S, Q>,
{
    // SAFETY: NEON is baseline on aarch64 (this build enables it for every function), so the
    // CPU has the `Neon` lanes' instructions.
    unsafe { super::apply_inline::<S, Q, super::neon::Neon>(rule, s) }
}

fn apply_baseline<S: Storage, Q: Storage<Compute = S::Compute>>(
    rule: &Rule<S::Compute>,
    s: Slices<'_, S, Q>,
) {
    // SAFETY: one element at a time, in plain code.
    unsafe { super::apply_inline::<S, Q, One>(rule, s) }
}

/// A storage type the kernels are compiled for at every level (f32, f64, bfloat16, float16),
/// with its state stored as `Q`: the same type, or bfloat16 for float32 and float16
/// parameters (`state_dtype`).
pub trait Element<Q: Storage<Compute = Self::Compute> = Self>: FactorElement {
    /// [`apply`] once the lengths are checked and `level` is clamped to what the CPU has.
    #[doc(hidden)]
    fn run(level: SimdLevel, rule: &Rule<Self::Compute>, s: Slices<'_, Self, Q>);
}

/// The lanes each level runs a storage type with: explicit vectors of that level's width
/// (`super::x86`), bfloat16 two at a time (its conversions are cheaper that way); on aarch64,
/// `super::neon::Neon` for every type (two registers at a time, elements in order). Explicit
/// vectors, not the one-element loop the compiler vectorises itself, because the compiler cannot
/// write float16's F16C conversions, and because measured on Zen 5 they were faster at the
/// AVX-512 level too (criterion at 10^4 elements: Adam float32 133 -> 151 GiB/s, bfloat16
/// 39 -> 50, float16 27 -> 61 where it ran the AVX2 vectors).
///
/// On x86-64, a float32 or float16 parameter with bfloat16 state runs the bfloat16 pairs: they
/// read the parameter's type in the same (even, odd) element order as the state. The NEON lanes
/// keep every type in element order, so one lanes type serves every pairing.
macro_rules! element {
    ($($t:ty, $q:ty => $avx2:ty, $avx512:ty);* $(;)?) => {$(
        impl Element<$q> for $t {
            fn run(level: SimdLevel, rule: &Rule<Self::Compute>, s: Slices<'_, Self, $q>) {
                match level {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `level` is at most what `detect()` found on this CPU, and the
                    // AVX-512 level implies AVX2, FMA and F16C (see `detect`).
                    SimdLevel::Avx512 => unsafe { apply_avx512::<Self, $q, $avx512>(rule, s) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    SimdLevel::Avx2 => unsafe { apply_avx2::<Self, $q, $avx2>(rule, s) },
                    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
                    SimdLevel::Neon => apply_neon::<Self, $q>(rule, s),
                    _ => apply_baseline(rule, s),
                }
            }
        }
    )*};
}

#[cfg(target_arch = "x86_64")]
element!(
    f32, f32 => super::x86::Avx2, super::x86::Avx512;
    f64, f64 => super::x86::Avx2, super::x86::Avx512;
    half::bf16, half::bf16 => super::x86::Avx2Pairs, super::x86::Avx512Pairs;
    half::f16, half::f16 => super::x86::Avx2, super::x86::Avx512;
    f32, half::bf16 => super::x86::Avx2Pairs, super::x86::Avx512Pairs;
    half::f16, half::bf16 => super::x86::Avx2Pairs, super::x86::Avx512Pairs;
);
#[cfg(not(target_arch = "x86_64"))]
element!(
    f32, f32 => One, One;
    f64, f64 => One, One;
    half::bf16, half::bf16 => One, One;
    half::f16, half::f16 => One, One;
    f32, half::bf16 => One, One;
    half::f16, half::bf16 => One, One;
);

/// A gradient type the factored read (`super::factor`) is compiled for at every level, with the
/// lanes its steps run with.
pub trait FactorElement: Storage {
    /// `super::factor::apply` at `level` (clamped to what the CPU has).
    #[doc(hidden)]
    fn factor(
        level: SimdLevel,
        src: &[Self],
        dst: &mut [Self],
        unscale: Option<f64>,
        coef: Option<f64>,
    );
}

#[cfg(target_arch = "x86_64")]
x86_levels!(
    fn factor_avx512 | factor_avx2
    [S: Storage, L: StateLanes<S, S>]
    (src: &[S], dst: &mut [S], unscale: Option<f64>, coef: Option<f64>) {
        // SAFETY: the CPU has `L`'s instructions (the macro's documentation).
        unsafe { super::factor::apply::<S, L>(src, dst, unscale, coef) }
    }
);

macro_rules! factor_element {
    ($($t:ty => $avx2:ty, $avx512:ty);* $(;)?) => {$(
        impl FactorElement for $t {
            fn factor(
                level: SimdLevel,
                src: &[Self],
                dst: &mut [Self],
                unscale: Option<f64>,
                coef: Option<f64>,
            ) {
                match level.clamped() {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the CPU has the level's features (`detect`, clamped above).
                    SimdLevel::Avx512 => unsafe {
                        factor_avx512::<Self, $avx512>(src, dst, unscale, coef)
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    SimdLevel::Avx2 => unsafe {
                        factor_avx2::<Self, $avx2>(src, dst, unscale, coef)
                    },
                    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
                    // SAFETY: NEON is baseline on aarch64.
                    SimdLevel::Neon => unsafe {
                        super::factor::apply::<Self, super::neon::Neon>(src, dst, unscale, coef)
                    },
                    // SAFETY: one element at a time, in plain code.
                    _ => unsafe { super::factor::apply::<Self, One>(src, dst, unscale, coef) },
                }
            }
        }
    )*};
}

// The lanes the steps of each type run with (`element!`), so a factored piece is read as fast.
#[cfg(target_arch = "x86_64")]
factor_element!(
    f32 => super::x86::Avx2, super::x86::Avx512;
    f64 => super::x86::Avx2, super::x86::Avx512;
    half::f16 => super::x86::Avx2, super::x86::Avx512;
    half::bf16 => super::x86::Avx2Pairs, super::x86::Avx512Pairs;
);
#[cfg(not(target_arch = "x86_64"))]
factor_element!(f32 => One, One; f64 => One, One; half::f16 => One, One; half::bf16 => One, One);

/// Applies one update rule to one parameter (or chunk) with the code of `level`.
///
/// A level the CPU lacks falls back to the best one it has, so this never executes an
/// unsupported instruction.
///
/// # Panics
/// When the gradient or a buffer is not as long as the parameter.
pub fn apply<S, Q>(level: SimdLevel, rule: &Rule<S::Compute>, s: Slices<'_, S, Q>)
where
    S: Element<Q>,
    Q: Storage<Compute = S::Compute>,
{
    assert!(
        s.lengths_match(),
        "gradient and state buffers must match the parameter's length"
    );
    <S as Element<Q>>::run(level.clamped(), rule, s);
}

#[cfg(target_arch = "x86_64")]
x86_levels!(
    fn q8_avx512 | q8_avx2
    [S: Storage<Compute = f32>, L: StateLanes<S, f32>]
    (k: &AdamScalars<f32>, s: Q8Slices<'_, S>) {
        // SAFETY: the CPU has `L`'s instructions, and the caller checked the lengths (the
        // macro's documentation).
        unsafe { super::adam8bit::update_inline::<S, L, true>(k, s) }
    }
);

/// A parameter type 8-bit Adam is compiled for at every level (float32, float16, bfloat16):
/// the lanes that read it and float32 (the dequantized moments) alike.
pub trait Q8Element: Storage<Compute = f32> + FactorElement {
    /// `adam8bit::update` once the lengths are checked and `level` clamped.
    #[doc(hidden)]
    fn run_q8(level: SimdLevel, k: &AdamScalars<f32>, s: Q8Slices<'_, Self>);
}

macro_rules! q8_element {
    ($($t:ty => $avx2:ty, $avx512:ty);* $(;)?) => {$(
        impl Q8Element for $t {
            fn run_q8(level: SimdLevel, k: &AdamScalars<f32>, s: Q8Slices<'_, Self>) {
                match level {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `level` is at most what `detect()` found on this CPU.
                    SimdLevel::Avx512 => unsafe { q8_avx512::<Self, $avx512>(k, s) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    SimdLevel::Avx2 => unsafe { q8_avx2::<Self, $avx2>(k, s) },
                    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
                    // SAFETY: NEON is baseline on aarch64. The codebook lookup stays scalar
                    // (`GATHER` false: NEON has no gathers).
                    SimdLevel::Neon => unsafe {
                        super::adam8bit::update_inline::<Self, super::neon::Neon, false>(k, s)
                    },
                    // SAFETY: one element at a time, in plain code.
                    _ => unsafe { super::adam8bit::update_inline::<Self, One, false>(k, s) },
                }
            }
        }
    )*};
}

#[cfg(target_arch = "x86_64")]
q8_element!(
    f32 => super::x86::Avx2, super::x86::Avx512;
    half::f16 => super::x86::Avx2, super::x86::Avx512;
    half::bf16 => super::x86::Avx2Pairs, super::x86::Avx512Pairs;
);
#[cfg(not(target_arch = "x86_64"))]
q8_element!(f32 => One, One; half::f16 => One, One; half::bf16 => One, One);
