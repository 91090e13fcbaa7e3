//! Flush-to-zero for the duration of a step (opt-in).
//!
//! Denormal operands make x86 floating point slow by an order of magnitude, and CPU Adam with
//! weight decay drifts into them over long runs (pytorch issues 51539, 58220). With the option
//! on, each thread that runs part of a step sets MXCSR's flush-to-zero and denormals-are-zero
//! bits while it does, and restores the caller's value after: no other code on that thread
//! sees the change. The bits act alike on scalar and vector instructions, so results stay the
//! same across SIMD levels and thread counts.

/// Restores the thread's MXCSR when dropped.
pub struct FlushGuard {
    #[cfg(target_arch = "x86_64")]
    saved: Option<u32>,
}

#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

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
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = on;
            FlushGuard {}
        }
    }

    /// Whether this platform can flush denormals for a step.
    #[must_use]
    pub fn supported() -> bool {
        cfg!(target_arch = "x86_64")
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if let Some(saved) = self.saved {
            write_mxcsr(saved);
        }
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
    #[cfg_attr(miri, ignore = "Miri cannot run inline assembly (stmxcsr/ldmxcsr)")]
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
