//! Portable scalar kernels (reference path and fallback). Uses `a*b+c`, never `mul_add`.

use crate::quant::dequantize_row_scalar;
use crate::MatRef;

/// Portable GEMV over rows `r0..r1`: dequantise a block, then multiply-accumulate.
pub(crate) fn gemv_rows(w: &MatRef, r0: usize, r1: usize, x: &[f32], y: &mut [f32]) {
    let dtype = w.dtype;
    let bl = dtype.block_len().max(32);
    let chunk_bytes = bl / dtype.block_len() * dtype.block_bytes();
    let mut buf = [0.0f32; 32];
    for (r, yv) in (r0..r1).zip(y.iter_mut()) {
        let row = w.row(r);
        let mut acc = [0.0f32; 8];
        let mut tail = 0.0f32;
        let full = w.cols / bl;
        for b in 0..full {
            dequantize_row_scalar(
                dtype,
                &row[b * chunk_bytes..(b + 1) * chunk_bytes],
                &mut buf,
            );
            let xb = &x[b * bl..(b + 1) * bl];
            for i in 0..32 {
                acc[i % 8] += buf[i] * xb[i];
            }
        }
        let rem = w.cols - full * bl;
        if rem > 0 {
            let eb = dtype.block_bytes();
            dequantize_row_scalar(
                dtype,
                &row[full * chunk_bytes..full * chunk_bytes + rem * eb],
                &mut buf[..rem],
            );
            for i in 0..rem {
                tail += buf[i] * x[full * bl + i];
            }
        }
        let s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        *yv = s + tail;
    }
}

/// Scalar dot product with 8 partial sums.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n8 = a.len() / 8 * 8;
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in n8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Scalar sum with 8 partial sums.
pub(crate) fn sum(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n8 = a.len() / 8 * 8;
    for c in a[..n8].chunks_exact(8) {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for v in &a[n8..] {
        s += v;
    }
    s
}

/// y += alpha * x.
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv;
    }
}

/// Scalar GEMM tile: `out[t][j] = sum_k x[t*ldx + k] * wp[k*32 + j]` for `MR` tokens, 32 packed rows.
pub(crate) fn gemm_tile<const MR: usize>(
    x: &[f32],
    ldx: usize,
    wp: &[f32],
    kc: usize,
    out: &mut [f32],
) {
    let mut acc = [[0.0f32; 32]; MR];
    for k in 0..kc {
        let wk = &wp[k * 32..k * 32 + 32];
        for (t, a) in acc.iter_mut().enumerate() {
            let xv = x[t * ldx + k];
            for j in 0..32 {
                a[j] += xv * wk[j];
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        out[t * 32..t * 32 + 32].copy_from_slice(a);
    }
}

/// [`dot`] with `b` f16, in the same order.
pub(crate) fn dot_f16(a: &[f32], b: &[half::f16]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n8 = a.len() / 8 * 8;
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i].to_f32();
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in n8..a.len() {
        s += a[i] * b[i].to_f32();
    }
    s
}

/// [`axpy`] with `x` f16.
pub(crate) fn axpy_f16(alpha: f32, x: &[half::f16], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv.to_f32();
    }
}
