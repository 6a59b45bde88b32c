//! GGML reference quantisation / dequantisation of rows (bit-compatible with ggml's `*_ref`).

mod blocks;

pub(crate) use blocks::{scale_min_k4, KVALUES_IQ4};

use half::f16;

use crate::isa::{active_isa, Isa};
use crate::DType;

/// Read a little-endian f16 at `p[0..2]` as f32.
#[inline]
pub(crate) fn f16_at(p: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([p[0], p[1]])).to_f32()
}

/// ggml's GGML_FP32_TO_BF16: round to nearest even, NaN forced quiet.
#[inline]
pub(crate) fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

fn check_lengths(dtype: DType, n: usize, bytes: usize, what: &str) {
    let rb = dtype.row_bytes(n).unwrap_or_else(|| {
        panic!("{what}: {n} elements is not a multiple of the {dtype} block length")
    });
    assert!(
        bytes >= rb,
        "{what}: {dtype} row of {n} elements needs {rb} bytes, got {bytes}"
    );
}

/// Dequantise one row of `out.len()` elements (a multiple of the block length) from `data`.
/// Bit-identical to ggml's `dequantize_row_*`; uses the active SIMD path.
pub fn dequantize_row(dtype: DType, data: &[u8], out: &mut [f32]) {
    check_lengths(dtype, out.len(), data.len(), "dequantize_row");
    dequantize_row_isa(active_isa(), dtype, data, out);
}

/// `dequantize_row` on an explicit path (lengths must already be checked).
pub(crate) fn dequantize_row_isa(isa: Isa, dtype: DType, data: &[u8], out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe {
            crate::gemv::avx512::dequant_row(dtype, data, out)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { crate::gemv::avx2::dequant_row(dtype, data, out) },
        _ => dequantize_row_scalar(dtype, data, out),
    }
}

/// Portable reference dequantisation.
pub(crate) fn dequantize_row_scalar(dtype: DType, data: &[u8], out: &mut [f32]) {
    match dtype {
        DType::Q5_0 => blocks::q5_0(data, out),
        DType::Q5_1 => blocks::q5_1(data, out),
        DType::IQ4NL => blocks::iq4_nl(data, out),
        DType::Q2K => blocks::q2_k(data, out),
        DType::Q3K => blocks::q3_k(data, out),
        DType::Q4K => blocks::q4_k(data, out),
        DType::Q5K => blocks::q5_k(data, out),
        DType::Q6K => blocks::q6_k(data, out),
        DType::IQ4XS => blocks::iq4_xs(data, out),
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(34)) {
                let d = f16_at(b);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
        DType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(18)) {
                let d = f16_at(b);
                for j in 0..16 {
                    let q = b[2 + j];
                    o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        DType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(20)) {
                let d = f16_at(b);
                let m = f16_at(&b[2..]);
                for j in 0..16 {
                    let q = b[4 + j];
                    o[j] = (q & 0x0f) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
    }
}

/// Quantise one row `x` (length a multiple of the block length) into `out` with ggml's
/// reference rounding (`quantize_row_*_ref`).
///
/// # Panics
/// When `dtype` is not one [`DType::can_quantize`] accepts, or the lengths do not fit.
pub fn quantize_row(dtype: DType, x: &[f32], out: &mut [u8]) {
    check_lengths(dtype, x.len(), out.len(), "quantize_row");
    match dtype {
        DType::Q5_0 | DType::Q5_1 => quantize_q5(dtype == DType::Q5_1, x, out),
        DType::IQ4NL
        | DType::Q2K
        | DType::Q3K
        | DType::Q4K
        | DType::Q5K
        | DType::Q6K
        | DType::IQ4XS => panic!("quantize_row: tpi reads {dtype} but does not write it"),
        DType::F32 => {
            for (v, o) in x.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for (v, o) in x.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        DType::BF16 => {
            for (v, o) in x.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f32_to_bf16_bits(*v).to_le_bytes());
            }
        }
        DType::Q8_0 => {
            for (xb, b) in x.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
                let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                b[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                for (j, v) in xb.iter().enumerate() {
                    b[2 + j] = ((v * id).round() as i8) as u8;
                }
            }
        }
        DType::Q4_0 => {
            for (xb, b) in x.chunks_exact(32).zip(out.chunks_exact_mut(18)) {
                let mut amax = 0.0f32;
                let mut max = 0.0f32;
                for &v in xb {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                b[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                for j in 0..16 {
                    let x0 = xb[j] * id;
                    let x1 = xb[16 + j] * id;
                    let q0 = ((x0 + 8.5) as i8).min(15) as u8;
                    let q1 = ((x1 + 8.5) as i8).min(15) as u8;
                    b[2 + j] = q0 | (q1 << 4);
                }
            }
        }
        DType::Q4_1 => {
            for (xb, b) in x.chunks_exact(32).zip(out.chunks_exact_mut(20)) {
                let mut min = f32::MAX;
                let mut max = -f32::MAX;
                for &v in xb {
                    if v < min {
                        min = v;
                    }
                    if v > max {
                        max = v;
                    }
                }
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                b[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                b[2..4].copy_from_slice(&f16::from_f32(min).to_bits().to_le_bytes());
                for j in 0..16 {
                    let x0 = (xb[j] - min) * id;
                    let x1 = (xb[16 + j] - min) * id;
                    let q0 = ((x0 + 0.5) as i8).min(15) as u8;
                    let q1 = ((x1 + 0.5) as i8).min(15) as u8;
                    b[4 + j] = q0 | (q1 << 4);
                }
            }
        }
    }
}

/// ggml's `quantize_row_q5_0_ref` (`!with_min`: `d = max / -16`, the signed extreme) and
/// `quantize_row_q5_1_ref` (`with_min`: `d = (max - min) / 31`, `m = min`).
fn quantize_q5(with_min: bool, x: &[f32], out: &mut [u8]) {
    let bb = if with_min { 24 } else { 22 };
    for (xb, b) in x.chunks_exact(32).zip(out.chunks_exact_mut(bb)) {
        let (d, m) = if with_min {
            let min = xb.iter().fold(f32::MAX, |a, &v| if v < a { v } else { a });
            let max = xb.iter().fold(-f32::MAX, |a, &v| if v > a { v } else { a });
            ((max - min) / 31.0, min)
        } else {
            let (mut amax, mut max) = (0.0f32, 0.0f32);
            for &v in xb {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            (max / -16.0, 0.0)
        };
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        let q_at = if with_min {
            b[2..4].copy_from_slice(&f16::from_f32(m).to_bits().to_le_bytes());
            4
        } else {
            2
        };
        let mut qh = 0u32;
        for j in 0..16 {
            let q = |v: f32| -> u8 {
                if with_min {
                    (((v - m) * id + 0.5) as u8).min(31)
                } else {
                    ((v * id + 16.5) as i8).min(31) as u8
                }
            };
            let (q0, q1) = (q(xb[j]), q(xb[16 + j]));
            b[q_at + 4 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
            qh |= (((q0 & 0x10) >> 4) as u32) << j;
            qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
        }
        b[q_at..q_at + 4].copy_from_slice(&qh.to_le_bytes());
    }
}
