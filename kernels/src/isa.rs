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
    /// AVX-512 plus VNNI: Q4_0/Q4_1/Q8_0 weights meet 15-bit integer activations in
    /// `vpdpbusd` integer dot products (error at most 1/65024 of a 32-block's largest |x|).
    Avx512Vnni,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Isa {
    /// Whether this path runs the AVX-512 kernels (with or without VNNI).
    pub fn is_avx512(self) -> bool {
        matches!(self, Isa::Avx512 | Isa::Avx512Vnni)
    }

    /// Parses a name as printed by [`Isa::name`].
    pub fn from_name(name: &str) -> Option<Isa> {
        [
            Isa::Scalar,
            Isa::Avx2,
            Isa::Avx512,
            Isa::Avx512Vnni,
            Isa::Neon,
        ]
        .into_iter()
        .find(|i| i.name() == name)
    }

    /// Lower-case name ("avx512vnni", "avx512", "avx2", "neon", "scalar").
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
        }
    }

    fn code(self) -> u8 {
        match self {
            Isa::Scalar => 1,
            Isa::Avx2 => 2,
            Isa::Avx512 => 3,
            Isa::Neon => 4,
            Isa::Avx512Vnni => 5,
        }
    }

    fn from_code(c: u8) -> Option<Isa> {
        match c {
            1 => Some(Isa::Scalar),
            2 => Some(Isa::Avx2),
            3 => Some(Isa::Avx512),
            4 => Some(Isa::Neon),
            5 => Some(Isa::Avx512Vnni),
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
            if is_x86_feature_detected!("avx512vnni") {
                v.push(Isa::Avx512Vnni);
            }
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

/// Applies `TPI_ISA` (a name as printed by [`Isa::name`]) if set, so a user can pin a kernel
/// path (e.g. `avx512` for f32 activations everywhere). Errors name the value and the choices.
pub fn set_isa_from_env() -> Result<Option<Isa>, KernelError> {
    let Ok(v) = std::env::var("TPI_ISA") else {
        return Ok(None);
    };
    let isa = parse_isa(v.trim()).map_err(|e| KernelError::Invalid(format!("TPI_ISA={e}")))?;
    set_isa(isa)?;
    Ok(Some(isa))
}

/// Parses a kernel path name; the error names it and lists the paths this CPU can run.
pub fn parse_isa(name: &str) -> Result<Isa, String> {
    Isa::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = available_isas().iter().map(|i| i.name()).collect();
        format!(
            "{name:?} is not a kernel path (this CPU has: {})",
            names.join(", ")
        )
    })
}
