//! Flush-to-zero for the duration of a step (opt-in).
//!
//! Denormal operands make x86 floating point slow by an order of magnitude, and CPU Adam with
//! weight decay drifts into them over long runs (pytorch issues 51539, 58220). With the option
//! on, each thread that runs part of a step sets MXCSR's flush-to-zero and denormals-are-zero
//! bits while it does, and restores the caller's value after: no other code on that thread
//! sees the change. The bits act alike on scalar and vector instructions, so results stay the
//! same across SIMD levels and thread counts.
//!
//! On aarch64 the one bit is FPCR.FZ (bit 24), which flushes denormal inputs and results of
//! single and double precision alike, in scalar and NEON (Advanced SIMD) instructions: MXCSR's
//! two bits in one. It leaves half precision alone (that is FPCR.FZ16, which conversions
//! ignore), so float16's conversions give the same bits with or without it, at every level.
//! Elsewhere the option is refused (`FlushGuard::supported`).

/// Restores the thread's MXCSR (x86-64) or FPCR (aarch64) when dropped.
pub struct FlushGuard {
    #[cfg(target_arch = "x86_64")]
    saved: Option<u32>,
    #[cfg(target_arch = "aarch64")]
    saved: Option<u64>,
}

#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

/// FPCR.FZ: flush-to-zero for single and double precision.
#[cfg(target_arch = "aarch64")]
const FZ: u64 = 1 << 24;

impl FlushGuard {
    /// Turns flush-to-zero on for this thread when `on`; does nothing otherwise.
    #[must_use]
    pub fn new(on: bool) -> FlushGuard {
        #[cfg(target_arch = "x86_64")]
        {
            if !on {
                return FlushGuard { saved: None };
            }
            let saved = read_mxcsr();
            write_mxcsr(saved | FTZ_DAZ);
            FlushGuard { saved: Some(saved) }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if !on {
                return FlushGuard { saved: None };
            }
            let saved = read_fpcr();
            write_fpcr(saved | FZ);
            FlushGuard { saved: Some(saved) }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            let _ = on;
            FlushGuard {}
        }
    }

    /// Whether this platform can flush denormals for a step.
    #[must_use]
    pub fn supported() -> bool {
        cfg!(any(target_arch = "x86_64", target_arch = "aarch64"))
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if let Some(saved) = self.saved {
            write_mxcsr(saved);
        }
        #[cfg(target_arch = "aarch64")]
        if let Some(saved) = self.saved {
            write_fpcr(saved);
        }
    }
}

#[cfg(target_arch = "aarch64")]
fn read_fpcr() -> u64 {
    let v: u64;
    // SAFETY: reading FPCR is allowed at EL0 on every aarch64 CPU; no memory is touched.
    unsafe {
        std::arch::asm!("mrs {}, fpcr", out(reg) v, options(nomem, nostack, preserves_flags));
    }
    v
}

#[cfg(target_arch = "aarch64")]
fn write_fpcr(v: u64) {
    // SAFETY: writing FPCR is allowed at EL0; `v` is a value read from the register with at
    // most FZ changed, a bit every aarch64 CPU implements. As with MXCSR on x86-64, only the
    // flushing of denormals changes, for this thread, until the guard restores the old value.
    // Not `nomem`: the compiler must not move the step's loads, stores and calls across it.
    unsafe {
        std::arch::asm!("msr fpcr, {}", in(reg) v, options(nostack, preserves_flags));
    }
}

#[cfg(target_arch = "x86_64")]
fn read_mxcsr() -> u32 {
    let mut v: u32 = 0;
    // SAFETY: stmxcsr stores the control/status register to the given 4-byte location.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &raw mut v, options(nostack, preserves_flags));
    }
    v
}

#[cfg(target_arch = "x86_64")]
fn write_mxcsr(v: u32) {
    // SAFETY: ldmxcsr loads a value read from this register with only FTZ/DAZ changed; both
    // are valid bits on every x86-64 CPU.
    unsafe {
        std::arch::asm!("ldmxcsr [{}]", in(reg) &raw const v, options(nostack, preserves_flags));
    }
}

#[cfg(test)]
mod tests {
    use super::FlushGuard;

    #[test]
    #[cfg_attr(
        miri,
        ignore = "Miri cannot run inline assembly (stmxcsr/ldmxcsr, mrs/msr fpcr)"
    )]
    fn flushes_only_while_held() {
        let tiny = std::hint::black_box(1e-40f32); // a float32 denormal
        assert!(std::hint::black_box(tiny * 1.0) > 0.0);
        {
            let _g = FlushGuard::new(true);
            if FlushGuard::supported() {
                assert_eq!(
                    std::hint::black_box(tiny) * std::hint::black_box(1.0f32),
                    0.0
                );
            }
        }
        assert!(std::hint::black_box(tiny) * std::hint::black_box(1.0f32) > 0.0);
    }
}
