//! AVX2 + FMA + F16C kernels: GEMV rows, dequantisation, dot/sum/axpy, GEMM tile.

use std::arch::x86_64::*;

use crate::{DType, MatRef};

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// f16 at `p` (unaligned, little-endian) to f32 via F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn h2f(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Prefetches `p + pf` into L2 (`pf` from `prefetch_distance`: a later row of the stream; see
/// `avx512::prefetch_ahead` for why L2).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn prefetch_ahead(p: *const u8, pf: usize) {
    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(pf) as *const i8);
}

/// GEMV over rows `r0..r1` (4 rows at a time to reuse x loads); `aux` is `gemv_aux`
/// output: for Q4_0, Q4_1 and Q8_0 the integer activations of [`prepare`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemv_rows(
    w: &MatRef,
    r0: usize,
    r1: usize,
    x: &[f32],
    aux: &super::Aux,
    y: &mut [f32],
) {
    let q = super::has_avx2_int_kernel(w.dtype);
    assert!(
        !q || (aux.i.len() >= 64 * (w.cols / 32) && aux.f.len() >= 2 * (w.cols / 32)),
        "AVX2 quantised GEMV without its prepared activations"
    );
    let xp = x.as_ptr();
    let (ip, fp) = (aux.i.as_ptr() as *const i16, aux.f.as_ptr());
    super::for_row_blocks(
        w,
        r0,
        r1,
        y,
        |p, pf, out| rows_kernel::<4>(w.dtype, p, w.cols, pf, xp, ip, fp, out),
        |p, pf, out| rows_kernel::<1>(w.dtype, p, w.cols, pf, xp, ip, fp, out),
    );
}

/// Fills the AVX2 [`super::Aux`] for `x` (Q4_0, Q4_1 and Q8_0 weights): per 32-block the
/// integers `X = round(x / s_b)` (nearest-even) with `s_b = max|x_b| / ACT_MAX`, as i16 in
/// `i` (64 bytes a block), and `[s_b, sum(x_b)]` in `f` (the sum for Q4_1's `m` term).
/// The same 15-bit activations as the VNNI path: an error of at most `max|x_b| / 65024`
/// per element. A block holding NaN or ±inf gets a NaN scale, so NaN reaches the output.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn prepare(x: &[f32], aux: &mut super::Aux) {
    let nb = x.len() / 32;
    aux.f.clear();
    aux.f.resize(2 * nb, 0.0);
    aux.i.clear();
    aux.i.resize(64 * nb, 0);
    let absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let lim = _mm256_set1_ps(super::ACT_MAX);
    for b in 0..nb {
        let xp = x.as_ptr().add(32 * b);
        let v = [0, 8, 16, 24].map(|k| _mm256_loadu_ps(xp.add(k)));
        let a = v.map(|v| _mm256_and_ps(v, absmask));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let mut amax = 0f32;
        let mut finite = true;
        for &e in std::slice::from_raw_parts(xp, 32) {
            finite &= e.is_finite();
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        for l in lanes {
            amax = amax.max(l);
        }
        let sum = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
        let (scale, q) = if !finite {
            (f32::NAN, [_mm256_setzero_si256(); 4])
        } else if amax == 0.0 {
            (0.0, [_mm256_setzero_si256(); 4])
        } else {
            let inv = _mm256_set1_ps(super::ACT_MAX / amax);
            // |x * inv| <= ACT_MAX up to the rounding of inv: clamp before converting.
            let r = |v| {
                let t = _mm256_mul_ps(v, inv);
                let t = _mm256_max_ps(
                    _mm256_min_ps(t, lim),
                    _mm256_sub_ps(_mm256_setzero_ps(), lim),
                );
                _mm256_cvtps_epi32(t)
            };
            (amax / super::ACT_MAX, v.map(r))
        };
        // i32 -> i16 in element order (packs interleave 128-bit lanes; permute them back).
        let p01 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[0], q[1]));
        let p23 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[2], q[3]));
        let ip = aux.i.as_mut_ptr().add(64 * b) as *mut __m256i;
        _mm256_storeu_si256(ip, p01);
        _mm256_storeu_si256(ip.add(1), p23);
        aux.f[2 * b] = scale;
        aux.f[2 * b + 1] = hsum256(sum);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_kernel<const R: usize>(
    dtype: DType,
    p: [*const u8; R],
    cols: usize,
    pf: usize,
    x: *const f32,
    xi: *const i16,
    xf: *const f32,
    out: &mut [f32; R],
) {
    match dtype {
        DType::F32 => rows_float::<R, 0>(p, cols, pf, x, out),
        DType::F16 => rows_float::<R, 1>(p, cols, pf, x, out),
        DType::BF16 => rows_float::<R, 2>(p, cols, pf, x, out),
        DType::Q8_0 => rows_int::<R, 0>(p, cols / 32, pf, xi, xf, out),
        DType::Q4_0 => rows_int::<R, 1>(p, cols / 32, pf, xi, xf, out),
        DType::Q4_1 => rows_int::<R, 2>(p, cols / 32, pf, xi, xf, out),
        DType::Q5_0 => rows_int::<R, 3>(p, cols / 32, pf, xi, xf, out),
        DType::Q5_1 => rows_int::<R, 4>(p, cols / 32, pf, xi, xf, out),
        DType::IQ4NL => rows_int::<R, 5>(p, cols / 32, pf, xi, xf, out), // Other types are routed to `gemv_rows_decoded` before any row kernel.
        _ => unreachable!("no {dtype} row kernel on this path"),
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

/// Q8_0 (K = 0), Q4_0 (1), Q4_1 (2), Q5_0 (3), Q5_1 (4) and IQ4_NL (5) rows against
/// [`prepare`]'s integer activations:
/// per block the exact integer dot `sum q X` (weights widened to i16, `madd` pairs into
/// i32: |q X| <= 128 * 32512, so a block's sum stays below 2^24 and converts exactly), then
/// one FMA with `d s_b`. The R rows' f16 scales are converted together, once per block;
/// Q4_1's and Q5_1's `m sum(x_b)` terms collect in the odd lanes of one shared accumulator.
/// Q5's fifth bits come from `qh` by a byte compare against bit masks; IQ4_NL's values from
/// its code book by a byte shuffle.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_int<const R: usize, const K: u8>(
    p: [*const u8; R],
    nb: usize,
    pf: usize,
    xi: *const i16,
    xf: *const f32,
    out: &mut [f32; R],
) {
    let bb = [34, 18, 20, 22, 24, 18][K as usize];
    // Where the quant bytes start, and whether the block has a min `m` after `d`.
    let qs = [2, 2, 4, 6, 8, 2][K as usize];
    let with_m = K == 2 || K == 4;
    let m0f = _mm_set1_epi8(0x0f);
    let eight = _mm_set1_epi8(8);
    let sixteen = _mm_set1_epi8(16);
    let bits = _mm_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let spread = [
        _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
        _mm_setr_epi8(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
    ];
    let book = _mm_loadu_si128(crate::quant::KVALUES_IQ4.as_ptr() as *const __m128i);
    // Lane r (d s_b of row r) or 2r (interleaved [d, m] pairs) to every lane.
    let lane: [__m256i; R] =
        std::array::from_fn(|r| _mm256_set1_epi32(if with_m { 2 * r as i32 } else { r as i32 }));
    let mut acc = [_mm256_setzero_ps(); R];
    let mut accm = _mm256_setzero_ps();
    for b in 0..nb {
        let xb = xi.add(32 * b) as *const __m256i;
        let x0 = _mm256_loadu_si256(xb);
        let x1 = _mm256_loadu_si256(xb.add(1));
        let q: [*const u8; R] = std::array::from_fn(|r| p[r].add(b * bb));
        // The R rows' scales times the block's [s_b, sum(x_b)].
        let ds = if with_m {
            let mut dm = _mm_setzero_si128();
            for (r, q) in q.iter().enumerate() {
                let v = (*q as *const i32).read_unaligned();
                dm = match r {
                    0 => _mm_insert_epi32::<0>(dm, v),
                    1 => _mm_insert_epi32::<1>(dm, v),
                    2 => _mm_insert_epi32::<2>(dm, v),
                    _ => _mm_insert_epi32::<3>(dm, v),
                };
            }
            let sx = _mm256_castpd_ps(_mm256_broadcast_sd(&*(xf.add(2 * b) as *const f64)));
            let ds = _mm256_mul_ps(_mm256_cvtph_ps(dm), sx);
            accm = _mm256_add_ps(accm, ds);
            ds
        } else {
            let mut d = _mm_setzero_si128();
            for (r, q) in q.iter().enumerate() {
                let v = (*q as *const u16).read_unaligned() as i32;
                d = match r {
                    0 => _mm_insert_epi16::<0>(d, v),
                    1 => _mm_insert_epi16::<1>(d, v),
                    2 => _mm_insert_epi16::<2>(d, v),
                    _ => _mm_insert_epi16::<3>(d, v),
                };
            }
            let s = _mm_set1_ps(*xf.add(2 * b));
            _mm256_castps128_ps256(_mm_mul_ps(_mm_cvtph_ps(d), s))
        };
        for r in 0..R {
            let q = q[r];
            prefetch_ahead(q, pf);
            let (w0, w1) = if K == 0 {
                (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(2) as *const __m128i)),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(18) as *const __m128i)),
                )
            } else {
                let raw = _mm_loadu_si128(q.add(qs) as *const __m128i);
                let mut lo = _mm_and_si128(raw, m0f);
                let mut hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), m0f);
                if K == 3 || K == 4 {
                    // Bit j of qh (j < 16: element j, else element j) as 16 in its byte.
                    let qh = _mm_set1_epi32((q.add(qs - 4) as *const i32).read_unaligned());
                    let five = |half: usize| {
                        let b = _mm_and_si128(_mm_shuffle_epi8(qh, spread[half]), bits);
                        _mm_and_si128(_mm_cmpeq_epi8(b, bits), sixteen)
                    };
                    lo = _mm_or_si128(lo, five(0));
                    hi = _mm_or_si128(hi, five(1));
                }
                match K {
                    1 => (
                        _mm256_cvtepi8_epi16(_mm_sub_epi8(lo, eight)),
                        _mm256_cvtepi8_epi16(_mm_sub_epi8(hi, eight)),
                    ),
                    3 => (
                        _mm256_cvtepi8_epi16(_mm_sub_epi8(lo, sixteen)),
                        _mm256_cvtepi8_epi16(_mm_sub_epi8(hi, sixteen)),
                    ),
                    5 => (
                        _mm256_cvtepi8_epi16(_mm_shuffle_epi8(book, lo)),
                        _mm256_cvtepi8_epi16(_mm_shuffle_epi8(book, hi)),
                    ),
                    _ => (_mm256_cvtepu8_epi16(lo), _mm256_cvtepu8_epi16(hi)),
                }
            };
            let t = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
            let dsr = _mm256_permutevar8x32_ps(ds, lane[r]);
            acc[r] = _mm256_fmadd_ps(dsr, _mm256_cvtepi32_ps(t), acc[r]);
        }
    }
    let mut m = [0f32; 8];
    _mm256_storeu_ps(m.as_mut_ptr(), accm);
    for r in 0..R {
        let mut s = hsum256(acc[r]);
        if with_m {
            s += m[2 * r + 1];
        }
        out[r] = s;
    }
}

/// 8 i8 at `p` widened to f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn i8x8(p: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
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
        DType::Q4K | DType::Q5K | DType::Q6K => super::avx2_kdec::decode(dtype, data, out),
        _ => crate::quant::dequantize_row_scalar(dtype, data, out),
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

/// `dot(a, b)` with `b` f16 (the KV cache), converted 8 at a time by F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f16(a: &[f32], b: &[half::f16]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr() as *const u16);
    let ld = |p: *const u16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
    let mut a0 = _mm256_setzero_ps();
    let mut a1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), ld(pb.add(i)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), ld(pb.add(i + 8)), a1);
        i += 16;
    }
    if i + 8 <= n {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), ld(pb.add(i)), a0);
        i += 8;
    }
    let mut s = hsum256(_mm256_add_ps(a0, a1));
    while i < n {
        s += *pa.add(i) * b[i].to_f32();
        i += 1;
    }
    s
}

/// `y += alpha * x` with `x` f16 (the KV cache).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpy_f16(alpha: f32, x: &[half::f16], y: &mut [f32]) {
    let n = x.len();
    let (px, py) = (x.as_ptr() as *const u16, y.as_mut_ptr());
    let av = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        let xv = _mm256_cvtph_ps(_mm_loadu_si128(px.add(i) as *const __m128i));
        _mm256_storeu_ps(
            py.add(i),
            _mm256_fmadd_ps(av, xv, _mm256_loadu_ps(py.add(i))),
        );
        i += 8;
    }
    while i < n {
        *py.add(i) += alpha * x[i].to_f32();
        i += 1;
    }
}
