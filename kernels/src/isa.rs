//! Runtime SIMD detection and a global override used by tests and benchmarks.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::KernelError;

/// A SIMD code path; the dispatcher picks the best available one at runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, no explicit SIMD.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL (+ AVX2, FMA, F16C).
    Avx512,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Isa {
    /// Lower-case name ("avx512", "avx2", "neon", "scalar").
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    fn code(self) -> u8 {
        match self {
            Isa::Scalar => 1,
            Isa::Avx2 => 2,
            Isa::Avx512 => 3,
            Isa::Neon => 4,
        }
    }

    fn from_code(c: u8) -> Option<Isa> {
        match c {
            1 => Some(Isa::Scalar),
            2 => Some(Isa::Avx2),
            3 => Some(Isa::Avx512),
            4 => Some(Isa::Neon),
            _ => None,
        }
    }
}

/// 0 = not yet detected.
static DETECTED: AtomicU8 = AtomicU8::new(0);
/// 0 = no override.
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

/// Every path this CPU can run, best last; always includes `Scalar`.
pub fn available_isas() -> Vec<Isa> {
    #[allow(unused_mut)]
    let mut v = vec![Isa::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            v.push(Isa::Avx2);
        }
        if has_avx512() {
            v.push(Isa::Avx512);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push(Isa::Neon);
        }
    }
    v
}

/// Best path available at runtime (cached after the first call).
pub fn detected_isa() -> Isa {
    if let Some(i) = Isa::from_code(DETECTED.load(Ordering::Relaxed)) {
        return i;
    }
    let best = *available_isas().last().unwrap_or(&Isa::Scalar);
    DETECTED.store(best.code(), Ordering::Relaxed);
    best
}

/// Force a path globally (for tests/benches); errors if this CPU cannot run it.
pub fn set_isa(isa: Isa) -> Result<(), KernelError> {
    if !available_isas().contains(&isa) {
        return Err(KernelError::IsaUnavailable(isa));
    }
    OVERRIDE.store(isa.code(), Ordering::SeqCst);
    Ok(())
}

/// The path kernels currently use: the override if set, else `detected_isa()`.
pub fn active_isa() -> Isa {
    Isa::from_code(OVERRIDE.load(Ordering::Relaxed)).unwrap_or_else(detected_isa)
}
