//! AVX2 + FMA + F16C kernels: GEMV rows, dequantisation, dot/sum/axpy, GEMM tile.

use std::arch::x86_64::*;

use crate::{DType, MatRef};

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// f16 at `p` (unaligned, little-endian) to f32 via F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn h2f(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Prefetches `p + pf` into L2 (`pf` from `prefetch_distance`: a later row of the stream; see
/// `avx512::prefetch_ahead` for why L2).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn prefetch_ahead(p: *const u8, pf: usize) {
    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(pf) as *const i8);
}

/// GEMV over rows `r0..r1` (4 rows at a time to reuse x loads); `aux` is `gemv_aux` output.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemv_rows(
    w: &MatRef,
    r0: usize,
    r1: usize,
    x: &[f32],
    aux: &[f32],
    y: &mut [f32],
) {
    let (xp, ap) = (x.as_ptr(), aux.as_ptr());
    super::for_row_blocks(
        w,
        r0,
        r1,
        y,
        |p, pf, out| rows_kernel::<4>(w.dtype, p, w.cols, pf, xp, ap, out),
        |p, pf, out| rows_kernel::<1>(w.dtype, p, w.cols, pf, xp, ap, out),
    );
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_kernel<const R: usize>(
    dtype: DType,
    p: [*const u8; R],
    cols: usize,
    pf: usize,
    x: *const f32,
    aux: *const f32,
    out: &mut [f32; R],
) {
    match dtype {
        DType::F32 => rows_float::<R, 0>(p, cols, pf, x, out),
        DType::F16 => rows_float::<R, 1>(p, cols, pf, x, out),
        DType::BF16 => rows_float::<R, 2>(p, cols, pf, x, out),
        DType::Q8_0 => rows_q8_0::<R>(p, cols / 32, pf, x, out),
        DType::Q4_0 => rows_q4::<R, false>(p, cols / 32, pf, x, aux, out),
        DType::Q4_1 => rows_q4::<R, true>(p, cols / 32, pf, x, aux, out),
    }
}

/// Load 8 elements of a float-type row (K: 0=f32, 1=f16, 2=bf16) starting at element `i`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<const K: u8>(p: *const u8, i: usize) -> __m256 {
    match K {
        0 => _mm256_loadu_ps((p as *const f32).add(i)),
        1 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i)),
        _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(p.add(2 * i) as *const __m128i),
        ))),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load1<const K: u8>(p: *const u8, i: usize) -> f32 {
    match K {
        0 => (p as *const f32).add(i).read_unaligned(),
        1 => h2f(p.add(2 * i)),
        _ => f32::from_bits(((p.add(2 * i) as *const u16).read_unaligned() as u32) << 16),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_float<const R: usize, const K: u8>(
    p: [*const u8; R],
    cols: usize,
    pf: usize,
    x: *const f32,
    out: &mut [f32; R],
) {
    let mut acc0 = [_mm256_setzero_ps(); R];
    let mut acc1 = [_mm256_setzero_ps(); R];
    let n16 = cols / 16 * 16;
    let mut i = 0;
    while i < n16 {
        let x0 = _mm256_loadu_ps(x.add(i));
        let x1 = _mm256_loadu_ps(x.add(i + 8));
        for r in 0..R {
            if K != 0 {
                prefetch_ahead(p[r].wrapping_add(2 * i), pf);
            }
            acc0[r] = _mm256_fmadd_ps(load8::<K>(p[r], i), x0, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(load8::<K>(p[r], i + 8), x1, acc1[r]);
        }
        i += 16;
    }
    if i + 8 <= cols {
        let x0 = _mm256_loadu_ps(x.add(i));
        for r in 0..R {
            acc0[r] = _mm256_fmadd_ps(load8::<K>(p[r], i), x0, acc0[r]);
        }
        i += 8;
    }
    for r in 0..R {
        let mut s = hsum256(_mm256_add_ps(acc0[r], acc1[r]));
        for j in i..cols {
            s += load1::<K>(p[r], j) * *x.add(j);
        }
        out[r] = s;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn i8x8(p: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_q8_0<const R: usize>(
    p: [*const u8; R],
    nb: usize,
    pf: usize,
    x: *const f32,
    out: &mut [f32; R],
) {
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let xb = x.add(b * 32);
        let x0 = _mm256_loadu_ps(xb);
        let x1 = _mm256_loadu_ps(xb.add(8));
        let x2 = _mm256_loadu_ps(xb.add(16));
        let x3 = _mm256_loadu_ps(xb.add(24));
        for r in 0..R {
            let q = p[r].add(b * 34);
            prefetch_ahead(q, pf);
            let d = _mm256_set1_ps(h2f(q));
            let t = _mm256_mul_ps(i8x8(q.add(2)), x0);
            let t = _mm256_fmadd_ps(i8x8(q.add(10)), x1, t);
            let t = _mm256_fmadd_ps(i8x8(q.add(18)), x2, t);
            let t = _mm256_fmadd_ps(i8x8(q.add(26)), x3, t);
            acc[r] = _mm256_fmadd_ps(d, t, acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum256(acc[r]);
    }
}

/// Q4_0 / Q4_1 rows; Q4_1's `m` term is `m * sum(x_block)` accumulated in a 128-bit lane.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_q4<const R: usize, const Q41: bool>(
    p: [*const u8; R],
    nb: usize,
    pf: usize,
    x: *const f32,
    aux: *const f32,
    out: &mut [f32; R],
) {
    let bb = if Q41 { 20 } else { 18 };
    let qoff = if Q41 { 4 } else { 2 };
    let m0f = _mm_set1_epi8(0x0f);
    let eight = _mm_set1_epi8(8);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut accm = [_mm_setzero_ps(); R];
    for b in 0..nb {
        let xb = x.add(b * 32);
        let x0 = _mm256_loadu_ps(xb);
        let x1 = _mm256_loadu_ps(xb.add(8));
        let x2 = _mm256_loadu_ps(xb.add(16));
        let x3 = _mm256_loadu_ps(xb.add(24));
        let xs = if Q41 {
            _mm_castpd_ps(_mm_load_sd(aux.add(2 * b) as *const f64))
        } else {
            _mm_setzero_ps()
        };
        for r in 0..R {
            let q = p[r].add(b * bb);
            prefetch_ahead(q, pf);
            let raw = _mm_loadu_si128(q.add(qoff) as *const __m128i);
            let mut lo = _mm_and_si128(raw, m0f);
            let mut hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), m0f);
            let (q0, q1, q2, q3);
            if Q41 {
                q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo)));
                q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi)));
            } else {
                lo = _mm_sub_epi8(lo, eight);
                hi = _mm_sub_epi8(hi, eight);
                q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
                q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
                q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
                q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
            }
            let t = _mm256_mul_ps(q0, x0);
            let t = _mm256_fmadd_ps(q1, x1, t);
            let t = _mm256_fmadd_ps(q2, x2, t);
            let t = _mm256_fmadd_ps(q3, x3, t);
            if Q41 {
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((q as *const i32).read_unaligned()));
                acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(dm), t, acc[r]);
                accm[r] = _mm_fmadd_ps(dm, xs, accm[r]);
            } else {
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(h2f(q)), t, acc[r]);
            }
        }
    }
    for r in 0..R {
        let mut s = hsum256(acc[r]);
        if Q41 {
            s += _mm_cvtss_f32(_mm_movehdup_ps(accm[r]));
        }
        out[r] = s;
    }
}

/// Dequantise a row (bit-identical to the scalar reference: multiply, then add, no FMA).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequant_row(dtype: DType, data: &[u8], out: &mut [f32]) {
    let n = out.len();
    let src = data.as_ptr();
    let dst = out.as_mut_ptr();
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => {
            let mut i = 0;
            while i + 8 <= n {
                let v = match dtype {
                    DType::F32 => load8::<0>(src, i),
                    DType::F16 => load8::<1>(src, i),
                    _ => load8::<2>(src, i),
                };
                _mm256_storeu_ps(dst.add(i), v);
                i += 8;
            }
            while i < n {
                *dst.add(i) = match dtype {
                    DType::F32 => load1::<0>(src, i),
                    DType::F16 => load1::<1>(src, i),
                    _ => load1::<2>(src, i),
                };
                i += 1;
            }
        }
        DType::Q8_0 => {
            for b in 0..n / 32 {
                let q = src.add(b * 34);
                let d = _mm256_set1_ps(h2f(q));
                for j in 0..4 {
                    _mm256_storeu_ps(
                        dst.add(b * 32 + 8 * j),
                        _mm256_mul_ps(i8x8(q.add(2 + 8 * j)), d),
                    );
                }
            }
        }
        DType::Q4_0 | DType::Q4_1 => {
            let q41 = dtype == DType::Q4_1;
            let bb = if q41 { 20 } else { 18 };
            let qoff = if q41 { 4 } else { 2 };
            let m0f = _mm_set1_epi8(0x0f);
            let off = _mm256_set1_epi32(if q41 { 0 } else { 8 });
            for b in 0..n / 32 {
                let q = src.add(b * bb);
                let d = _mm256_set1_ps(h2f(q));
                let m = _mm256_set1_ps(if q41 { h2f(q.add(2)) } else { 0.0 });
                let raw = _mm_loadu_si128(q.add(qoff) as *const __m128i);
                let lo = _mm_and_si128(raw, m0f);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), m0f);
                let parts = [
                    lo,
                    _mm_unpackhi_epi64(lo, lo),
                    hi,
                    _mm_unpackhi_epi64(hi, hi),
                ];
                for (j, part) in parts.iter().enumerate() {
                    let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(*part), off));
                    let mut v = _mm256_mul_ps(v, d);
                    if q41 {
                        v = _mm256_add_ps(v, m);
                    }
                    _mm256_storeu_ps(dst.add(b * 32 + 8 * j), v);
                }
            }
        }
    }
}

/// Dot product (two accumulators, scalar tail).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut a0 = _mm256_setzero_ps();
    let mut a1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), a0);
        a1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 8)),
            _mm256_loadu_ps(pb.add(i + 8)),
            a1,
        );
        i += 16;
    }
    if i + 8 <= n {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), a0);
        i += 8;
    }
    let mut s = hsum256(_mm256_add_ps(a0, a1));
    while i < n {
        s += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    s
}

/// Sum of a slice (four accumulators).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn sum(a: &[f32]) -> f32 {
    let n = a.len();
    let p = a.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, v) in acc.iter_mut().enumerate() {
            *v = _mm256_add_ps(*v, _mm256_loadu_ps(p.add(i + 8 * j)));
        }
        i += 32;
    }
    let mut s = hsum256(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while i < n {
        s += *p.add(i);
        i += 1;
    }
    s
}

/// y += alpha * x.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len();
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let av = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(
            py.add(i),
            _mm256_fmadd_ps(av, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))),
        );
        i += 8;
    }
    while i < n {
        *py.add(i) += alpha * *px.add(i);
        i += 1;
    }
}

/// GEMM register tile over a 32-wide packed panel, as two 16-wide halves (12 accumulators each).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm_tile<const MR: usize>(
    x: *const f32,
    ldx: usize,
    wp: *const f32,
    kc: usize,
    out: *mut f32,
) {
    for h in 0..2 {
        let wh = wp.add(16 * h);
        let mut acc0 = [_mm256_setzero_ps(); MR];
        let mut acc1 = [_mm256_setzero_ps(); MR];
        for k in 0..kc {
            let w0 = _mm256_loadu_ps(wh.add(k * 32));
            let w1 = _mm256_loadu_ps(wh.add(k * 32 + 8));
            for t in 0..MR {
                let xb = _mm256_set1_ps(*x.add(t * ldx + k));
                acc0[t] = _mm256_fmadd_ps(xb, w0, acc0[t]);
                acc1[t] = _mm256_fmadd_ps(xb, w1, acc1[t]);
            }
        }
        for t in 0..MR {
            _mm256_storeu_ps(out.add(t * 32 + 16 * h), acc0[t]);
            _mm256_storeu_ps(out.add(t * 32 + 16 * h + 8), acc1[t]);
        }
    }
}
