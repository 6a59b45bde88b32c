//! AVX-512 (F/BW/VL + FMA + F16C) kernels: GEMV rows, dequantisation, dot/sum/axpy, GEMM tile.

use std::arch::x86_64::*;

use crate::{DType, MatRef};

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn hsum512(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    hsum256(_mm256_add_ps(lo, hi))
}

/// Prefetches `p + pf` into L2 (`pf` from `prefetch_distance`: a later row of the stream). Into L2,
/// not L1: a row group of long rows is as big as L1, which evicted the lines before use
/// (f16 GEMV at 1 thread: 77% of bandwidth with T0, 96-100% with T1).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn prefetch_ahead(p: *const u8, pf: usize) {
    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(pf) as *const i8);
}

/// f16 at `p` (unaligned, little-endian) to f32 via F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn h2f(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// GEMV over rows `r0..r1` (4 rows at a time to reuse x loads); `aux` is `gemv_aux` output.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
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

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
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
        DType::Q4_0 => rows_q4::<R, false>(p, cols / 32, pf, aux, out),
        DType::Q4_1 => rows_q4::<R, true>(p, cols / 32, pf, aux, out), // Other types are routed to `gemv_rows_decoded` before any row kernel.
        _ => unreachable!("no {dtype} row kernel on this path"),
    }
}

/// Load 16 elements of a float-type row (K: 0=f32, 1=f16, 2=bf16) starting at element `i`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn load16<const K: u8>(p: *const u8, i: usize) -> __m512 {
    match K {
        0 => _mm512_loadu_ps((p as *const f32).add(i)),
        1 => _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * i) as *const __m256i)),
        _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(p.add(2 * i) as *const __m256i),
        ))),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn load1<const K: u8>(p: *const u8, i: usize) -> f32 {
    match K {
        0 => (p as *const f32).add(i).read_unaligned(),
        1 => h2f(p.add(2 * i)),
        _ => f32::from_bits(((p.add(2 * i) as *const u16).read_unaligned() as u32) << 16),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn rows_float<const R: usize, const K: u8>(
    p: [*const u8; R],
    cols: usize,
    pf: usize,
    x: *const f32,
    out: &mut [f32; R],
) {
    let mut acc0 = [_mm512_setzero_ps(); R];
    let mut acc1 = [_mm512_setzero_ps(); R];
    let n32 = cols / 32 * 32;
    let mut i = 0;
    while i < n32 {
        let x0 = _mm512_loadu_ps(x.add(i));
        let x1 = _mm512_loadu_ps(x.add(i + 16));
        for r in 0..R {
            // Two prefetches per step: f32 reads two lines; a 16-bit step reads one, and
            // asking for it twice (and the next line early) measured 22-23 -> 25-27 GB/s
            // at 1 thread on Zen 4 (`tpi bench kernels`).
            let lines = if K == 0 { 4 * i } else { 2 * i };
            prefetch_ahead(p[r].wrapping_add(lines), pf);
            prefetch_ahead(p[r].wrapping_add(lines + 64), pf);
            acc0[r] = _mm512_fmadd_ps(load16::<K>(p[r], i), x0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(load16::<K>(p[r], i + 16), x1, acc1[r]);
        }
        i += 32;
    }
    if i + 16 <= cols {
        let x0 = _mm512_loadu_ps(x.add(i));
        for r in 0..R {
            acc0[r] = _mm512_fmadd_ps(load16::<K>(p[r], i), x0, acc0[r]);
        }
        i += 16;
    }
    for r in 0..R {
        let mut s = hsum512(_mm512_add_ps(acc0[r], acc1[r]));
        for j in i..cols {
            s += load1::<K>(p[r], j) * *x.add(j);
        }
        out[r] = s;
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn rows_q8_0<const R: usize>(
    p: [*const u8; R],
    nb: usize,
    pf: usize,
    x: *const f32,
    out: &mut [f32; R],
) {
    let mut acc = [_mm512_setzero_ps(); R];
    let mut sc = [[0.0f32; 16]; R];
    let mut b0 = 0;
    while b0 < nb {
        let nbc = (nb - b0).min(8);
        for r in 0..R {
            block_scales::<false>(p[r].add(b0 * 34), 34, nbc, &mut sc[r]);
        }
        for i in 0..nbc {
            let b = b0 + i;
            let xl = _mm512_loadu_ps(x.add(b * 32));
            let xh = _mm512_loadu_ps(x.add(b * 32 + 16));
            for r in 0..R {
                let q = p[r].add(b * 34);
                prefetch_ahead(q, pf);
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    q.add(2) as *const __m128i
                )));
                let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    q.add(18) as *const __m128i
                )));
                let t = _mm512_fmadd_ps(q1, xh, _mm512_mul_ps(q0, xl));
                acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(sc[r][2 * i]), acc[r]);
            }
        }
        b0 += nbc;
    }
    for r in 0..R {
        out[r] = hsum512(acc[r]);
    }
}

/// Q4_0 / Q4_1 rows, 7 zmm ops per 32-element block. The 16 quant bytes are broadcast to all four
/// 128-bit lanes; each dword lane rotates its nibble to mantissa bits 19..22 and one `vpternlogd`
/// ORs in the exponent of 1.0, giving the exact float `f = 1 + q/16` with no int->float convert.
/// Then `w = q*d + m = 16*d*f + (m - 16*d)` (Q4_0: `16*d*f - 24*d`), so a row is
/// `16 * sum_b d_b * sum(f*x) + sum_b [d_b, m_b] . aux_b`. `xp` is x permuted to the lane order.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn rows_q4<const R: usize, const Q41: bool>(
    p: [*const u8; R],
    nb: usize,
    pf: usize,
    aux: *const f32,
    out: &mut [f32; R],
) {
    let rot_lo = _mm512_setr_epi32(19, 19, 19, 19, 11, 11, 11, 11, 3, 3, 3, 3, 27, 27, 27, 27);
    let rot_hi = _mm512_setr_epi32(15, 15, 15, 15, 7, 7, 7, 7, 31, 31, 31, 31, 23, 23, 23, 23);
    let mask = _mm512_set1_epi32(0x0078_0000);
    let one = _mm512_set1_epi32(0x3F80_0000);
    let bb = if Q41 { 20 } else { 18 };
    let qoff = if Q41 { 4 } else { 2 };
    let xp = aux.add((2 * nb).div_ceil(16) * 16);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut accm = [_mm512_setzero_ps(); R];
    let mut sc = [[0.0f32; 16]; R];
    let mut b0 = 0;
    while b0 < nb {
        let nbc = (nb - b0).min(8);
        for r in 0..R {
            let f = block_scales::<Q41>(p[r].add(b0 * bb), bb, nbc, &mut sc[r]);
            accm[r] = _mm512_fmadd_ps(f, _mm512_loadu_ps(aux.add(2 * b0)), accm[r]);
        }
        for i in 0..nbc {
            let b = b0 + i;
            let xl = _mm512_loadu_ps(xp.add(b * 32));
            let xh = _mm512_loadu_ps(xp.add(b * 32 + 16));
            for r in 0..R {
                let blk = p[r].add(b * bb);
                prefetch_ahead(blk, pf);
                let v = _mm512_broadcast_i32x4(_mm_loadu_si128(blk.add(qoff) as *const __m128i));
                let lo = _mm512_castsi512_ps(_mm512_ternarylogic_epi32::<0xEA>(
                    _mm512_rolv_epi32(v, rot_lo),
                    mask,
                    one,
                ));
                let hi = _mm512_castsi512_ps(_mm512_ternarylogic_epi32::<0xEA>(
                    _mm512_rolv_epi32(v, rot_hi),
                    mask,
                    one,
                ));
                let t = _mm512_fmadd_ps(hi, xh, _mm512_mul_ps(lo, xl));
                acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(sc[r][2 * i]), acc[r]);
            }
        }
        b0 += nbc;
    }
    for r in 0..R {
        out[r] = 16.0 * hsum512(acc[r]) + hsum512(accm[r]);
    }
}

/// Convert the f16 `[d, m]` words of `n <= 8` blocks (Q4_0/Q8_0: `[d, 0]`, read as an i32
/// and masked, which is cheaper than word inserts) to f32 with one `vcvtph2ps`, gathered
/// through registers (no narrow-store/wide-load forwarding stall); stores them to `out` for
/// broadcast-operand FMAs and returns them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn block_scales<const Q41: bool>(
    p: *const u8,
    bb: usize,
    n: usize,
    out: &mut [f32; 16],
) -> __m512 {
    let ld = |i: usize| -> i32 {
        if i >= n {
            0
        } else {
            (p.add(i * bb) as *const i32).read_unaligned()
        }
    };
    let raw = _mm256_setr_epi32(ld(0), ld(1), ld(2), ld(3), ld(4), ld(5), ld(6), ld(7));
    let raw = if Q41 {
        raw
    } else {
        _mm256_and_si256(raw, _mm256_set1_epi32(0xFFFF))
    };
    let f = _mm512_cvtph_ps(raw);
    _mm512_storeu_ps(out.as_mut_ptr(), f);
    f
}

/// Dequantise a row (bit-identical to the scalar reference: multiply, then add, no FMA).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dequant_row(dtype: DType, data: &[u8], out: &mut [f32]) {
    let n = out.len();
    let src = data.as_ptr();
    let dst = out.as_mut_ptr();
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => {
            let mut i = 0;
            while i + 16 <= n {
                let v = match dtype {
                    DType::F32 => load16::<0>(src, i),
                    DType::F16 => load16::<1>(src, i),
                    _ => load16::<2>(src, i),
                };
                _mm512_storeu_ps(dst.add(i), v);
                i += 16;
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
                let d = _mm512_set1_ps(h2f(q));
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    q.add(2) as *const __m128i
                )));
                let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    q.add(18) as *const __m128i
                )));
                _mm512_storeu_ps(dst.add(b * 32), _mm512_mul_ps(q0, d));
                _mm512_storeu_ps(dst.add(b * 32 + 16), _mm512_mul_ps(q1, d));
            }
        }
        DType::Q4_0 | DType::Q4_1 => {
            let q41 = dtype == DType::Q4_1;
            let bb = if q41 { 20 } else { 18 };
            let qoff = if q41 { 4 } else { 2 };
            let mask = _mm512_set1_epi32(0x0f);
            let off = _mm512_set1_epi32(if q41 { 0 } else { 8 });
            for b in 0..n / 32 {
                let q = src.add(b * bb);
                let d = _mm512_set1_ps(h2f(q));
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.add(qoff) as *const __m128i));
                let lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, mask), off));
                let hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32::<4>(v), off));
                let (mut lo, mut hi) = (_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d));
                if q41 {
                    let m = _mm512_set1_ps(h2f(q.add(2)));
                    lo = _mm512_add_ps(lo, m);
                    hi = _mm512_add_ps(hi, m);
                }
                _mm512_storeu_ps(dst.add(b * 32), lo);
                _mm512_storeu_ps(dst.add(b * 32 + 16), hi);
            }
        }
        DType::Q4K | DType::Q5K | DType::Q6K => super::avx2_kdec::decode(dtype, data, out),
        _ => crate::quant::dequantize_row_scalar(dtype, data, out),
    }
}

/// Dot product (two accumulators, scalar tail).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut a0 = _mm512_setzero_ps();
    let mut a1 = _mm512_setzero_ps();
    let mut i = 0;
    while i + 32 <= n {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), a0);
        a1 = _mm512_fmadd_ps(
            _mm512_loadu_ps(pa.add(i + 16)),
            _mm512_loadu_ps(pb.add(i + 16)),
            a1,
        );
        i += 32;
    }
    if i + 16 <= n {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), a0);
        i += 16;
    }
    let mut s = hsum512(_mm512_add_ps(a0, a1));
    while i < n {
        s += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    s
}

/// Sum of a slice (four accumulators to hide latency, prefetching `PF_MIN` ahead): the
/// bandwidth probe's read loop.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn sum(a: &[f32]) -> f32 {
    let n = a.len();
    let p = a.as_ptr();
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, v) in acc.iter_mut().enumerate() {
            prefetch_ahead(p.add(i + 16 * j) as *const u8, super::PF_MIN);
            *v = _mm512_add_ps(*v, _mm512_loadu_ps(p.add(i + 16 * j)));
        }
        i += 64;
    }
    let mut s = hsum512(_mm512_add_ps(
        _mm512_add_ps(acc[0], acc[1]),
        _mm512_add_ps(acc[2], acc[3]),
    ));
    while i < n {
        s += *p.add(i);
        i += 1;
    }
    s
}

/// y += alpha * x.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len();
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let av = _mm512_set1_ps(alpha);
    let mut i = 0;
    while i + 16 <= n {
        _mm512_storeu_ps(
            py.add(i),
            _mm512_fmadd_ps(av, _mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(py.add(i))),
        );
        i += 16;
    }
    while i < n {
        *py.add(i) += alpha * *px.add(i);
        i += 1;
    }
}

/// GEMM register tile: `out[t][0..32] = sum_k x[t*ldx+k] * wp[k*32..k*32+32]` for `MR` (<= 6) tokens.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn gemm_tile<const MR: usize>(
    x: *const f32,
    ldx: usize,
    wp: *const f32,
    kc: usize,
    out: *mut f32,
) {
    let mut acc0 = [_mm512_setzero_ps(); MR];
    let mut acc1 = [_mm512_setzero_ps(); MR];
    for k in 0..kc {
        let w0 = _mm512_loadu_ps(wp.add(k * 32));
        let w1 = _mm512_loadu_ps(wp.add(k * 32 + 16));
        for t in 0..MR {
            let xb = _mm512_set1_ps(*x.add(t * ldx + k));
            acc0[t] = _mm512_fmadd_ps(xb, w0, acc0[t]);
            acc1[t] = _mm512_fmadd_ps(xb, w1, acc1[t]);
        }
    }
    for t in 0..MR {
        _mm512_storeu_ps(out.add(t * 32), acc0[t]);
        _mm512_storeu_ps(out.add(t * 32 + 16), acc1[t]);
    }
}

/// `dot(a, b)` with `b` f16 (the KV cache), converted 16 at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot_f16(a: &[f32], b: &[half::f16]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr() as *const u16);
    let mut a0 = _mm512_setzero_ps();
    let mut a1 = _mm512_setzero_ps();
    let ld = |p: *const u16| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
    let mut i = 0;
    while i + 32 <= n {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), ld(pb.add(i)), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), ld(pb.add(i + 16)), a1);
        i += 32;
    }
    if i + 16 <= n {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), ld(pb.add(i)), a0);
        i += 16;
    }
    let mut s = hsum512(_mm512_add_ps(a0, a1));
    while i < n {
        s += *pa.add(i) * b[i].to_f32();
        i += 1;
    }
    s
}

/// `y += alpha * x` with `x` f16 (the KV cache).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn axpy_f16(alpha: f32, x: &[half::f16], y: &mut [f32]) {
    let n = x.len();
    let (px, py) = (x.as_ptr() as *const u16, y.as_mut_ptr());
    let av = _mm512_set1_ps(alpha);
    let mut i = 0;
    while i + 16 <= n {
        let xv = _mm512_cvtph_ps(_mm256_loadu_si256(px.add(i) as *const __m256i));
        _mm512_storeu_ps(
            py.add(i),
            _mm512_fmadd_ps(av, xv, _mm512_loadu_ps(py.add(i))),
        );
        i += 16;
    }
    while i < n {
        *py.add(i) += alpha * x[i].to_f32();
        i += 1;
    }
}
