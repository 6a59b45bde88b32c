//! aarch64 NEON kernels: f32 dot/sum/axpy and GEMV via per-block dequantisation.

use std::arch::aarch64::*;

use crate::quant::dequantize_row_scalar;
use crate::MatRef;

/// GEMV over rows `r0..r1`: dequantise 32 elements at a time, then NEON multiply-accumulate.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn gemv_rows(w: &MatRef, r0: usize, r1: usize, x: &[f32], y: &mut [f32]) {
    let dtype = w.dtype;
    let chunk_bytes = 32 / dtype.block_len() * dtype.block_bytes();
    let full = w.cols / 32;
    let rem = w.cols - full * 32;
    let mut buf = [0.0f32; 32];
    for (r, yv) in (r0..r1).zip(y.iter_mut()) {
        let row = w.row(r);
        let mut acc = [vdupq_n_f32(0.0); 4];
        for b in 0..full {
            dequantize_row_scalar(
                dtype,
                &row[b * chunk_bytes..(b + 1) * chunk_bytes],
                &mut buf,
            );
            let xp = x.as_ptr().add(b * 32);
            let bp = buf.as_ptr();
            for j in 0..8 {
                acc[j % 4] = vfmaq_f32(
                    acc[j % 4],
                    vld1q_f32(bp.add(4 * j)),
                    vld1q_f32(xp.add(4 * j)),
                );
            }
        }
        let mut s = vaddvq_f32(vaddq_f32(
            vaddq_f32(acc[0], acc[1]),
            vaddq_f32(acc[2], acc[3]),
        ));
        if rem > 0 {
            let eb = dtype.block_bytes();
            let start = full * chunk_bytes;
            dequantize_row_scalar(dtype, &row[start..start + rem * eb], &mut buf[..rem]);
            for i in 0..rem {
                s += buf[i] * x[full * 32 + i];
            }
        }
        *yv = s;
    }
}

/// Dot product.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut a0 = vdupq_n_f32(0.0);
    let mut a1 = vdupq_n_f32(0.0);
    let mut i = 0;
    while i + 8 <= n {
        a0 = vfmaq_f32(a0, vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
        a1 = vfmaq_f32(a1, vld1q_f32(pa.add(i + 4)), vld1q_f32(pb.add(i + 4)));
        i += 8;
    }
    let mut s = vaddvq_f32(vaddq_f32(a0, a1));
    while i < n {
        s += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    s
}

/// Sum of a slice.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn sum(a: &[f32]) -> f32 {
    let n = a.len();
    let p = a.as_ptr();
    let mut a0 = vdupq_n_f32(0.0);
    let mut a1 = vdupq_n_f32(0.0);
    let mut i = 0;
    while i + 8 <= n {
        a0 = vaddq_f32(a0, vld1q_f32(p.add(i)));
        a1 = vaddq_f32(a1, vld1q_f32(p.add(i + 4)));
        i += 8;
    }
    let mut s = vaddvq_f32(vaddq_f32(a0, a1));
    while i < n {
        s += *p.add(i);
        i += 1;
    }
    s
}

/// y += alpha * x.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len();
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let av = vdupq_n_f32(alpha);
    let mut i = 0;
    while i + 4 <= n {
        vst1q_f32(
            py.add(i),
            vfmaq_f32(vld1q_f32(py.add(i)), av, vld1q_f32(px.add(i))),
        );
        i += 4;
    }
    while i < n {
        *py.add(i) += alpha * *px.add(i);
        i += 1;
    }
}
