//! AVX-512 VNNI GEMV rows for Q4_0 / Q4_1 weights: integer dot products against the 15-bit
//! integer activations that [`super::gemv_aux`] prepares (`X = round(x / s_b)` per 32-block).
//!
//! Two blocks fill a zmm. The nibbles are unpacked to bytes (3 ops per 64 weights) and meet
//! `X = 256 H + L` in two `vpdpbusd`: `sum q X = 256 sum q H + sum q L`. Each block's integer
//! sum is scaled by `d_b * s_b` in f32; the offset terms (Q4_1 `m_b * sum(x̂_b)`, Q4_0
//! `-8 d_b * sum(x̂_b)`) use the block sums of the same quantised x, so a row is `dot(w, x̂)`.

use std::arch::x86_64::*;

use super::avx512::{block_scales, hsum512, prefetch_ahead};
use crate::{DType, MatRef};

/// GEMV over rows `r0..r1` of a Q4_0 or Q4_1 matrix, 4 rows at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn gemv_rows(w: &MatRef, r0: usize, r1: usize, aux: &super::Aux, y: &mut [f32]) {
    let nb = w.cols / 32;
    super::for_row_blocks(
        w,
        r0,
        r1,
        y,
        |p, pf, out| rows::<4>(w.dtype, p, nb, pf, aux, out),
        |p, pf, out| rows::<1>(w.dtype, p, nb, pf, aux, out),
    );
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn rows<const R: usize>(
    dtype: DType,
    p: [*const u8; R],
    nb: usize,
    pf: usize,
    aux: &super::Aux,
    out: &mut [f32; R],
) {
    match dtype {
        DType::Q4_0 => rows_q4::<R, false>(p, nb, pf, aux, out),
        DType::Q4_1 => rows_q4::<R, true>(p, nb, pf, aux, out),
        _ => unreachable!("the VNNI path only serves quantised weights"),
    }
}

/// Q4 rows. Per pair of blocks A, B: the 16 quant bytes of A fill 128-bit lanes 0-1 and
/// B's lanes 2-3; a per-lane word shift (0 or 4) and a mask leave low nibbles (elements 0-15)
/// in lanes 0 and 2 and high nibbles (16-31) in lanes 1 and 3, matching the natural element
/// order of H and L. `vpdpbusd` sums 4 bytes per dword, so dwords 0-7 belong to A and 8-15 to B.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn rows_q4<const R: usize, const Q41: bool>(
    p: [*const u8; R],
    nb: usize,
    pf: usize,
    aux: &super::Aux,
    out: &mut [f32; R],
) {
    let bb = if Q41 { 20 } else { 18 };
    let qoff = if Q41 { 4 } else { 2 };
    let pairs = (2 * nb).div_ceil(16) * 16;
    let sums = aux.f.as_ptr();
    let scales = sums.add(pairs);
    let nbp = nb.next_multiple_of(2);
    let hi = aux.i.as_ptr();
    let lo = hi.add(32 * nbp);
    let shift = _mm512_setr_epi64(
        0,
        0,
        0x0004_0004_0004_0004,
        0x0004_0004_0004_0004,
        0,
        0,
        0x0004_0004_0004_0004,
        0x0004_0004_0004_0004,
    );
    let nib = _mm512_set1_epi8(0x0F);
    // Positions of d_b for blocks 2i and 2i+1 of a group in the `[d0, m0, d1, m1, ..]` vector.
    let idx = [
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
        _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
        _mm512_setr_epi32(8, 8, 8, 8, 8, 8, 8, 8, 10, 10, 10, 10, 10, 10, 10, 10),
        _mm512_setr_epi32(
            12, 12, 12, 12, 12, 12, 12, 12, 14, 14, 14, 14, 14, 14, 14, 14,
        ),
    ];
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); R];
    let mut accm = [_mm512_setzero_ps(); R];
    let mut ds = [_mm512_setzero_ps(); R];
    let mut sc = [0.0f32; 16];
    let mut b0 = 0;
    while b0 < nb {
        let nbc = (nb - b0).min(8);
        let sx = _mm512_loadu_ps(scales.add(2 * b0));
        let sm = _mm512_loadu_ps(sums.add(2 * b0));
        for r in 0..R {
            let f = block_scales::<Q41>(p[r].add(b0 * bb), bb, nbc, &mut sc);
            accm[r] = _mm512_fmadd_ps(f, sm, accm[r]);
            ds[r] = _mm512_mul_ps(f, sx);
        }
        let mut i = 0;
        while i < nbc {
            let b = b0 + i;
            let two = i + 1 < nbc;
            let hv = _mm512_loadu_si512(hi.add(32 * b) as *const _);
            let lv = _mm512_loadu_si512(lo.add(32 * b) as *const _);
            for r in 0..R {
                let pa = p[r].add(b * bb + qoff);
                // A lone last block pairs with itself; its H and L padding is zero.
                let pb = if two { pa.add(bb) } else { pa };
                prefetch_ahead(pa, pf);
                let a = _mm512_castsi128_si512(_mm_loadu_si128(pa as *const __m128i));
                let c = _mm512_castsi128_si512(_mm_loadu_si128(pb as *const __m128i));
                let q = _mm512_and_si512(
                    _mm512_srlv_epi16(_mm512_shuffle_i64x2::<0>(a, c), shift),
                    nib,
                );
                let t = _mm512_slli_epi32::<8>(_mm512_dpbusd_epi32(zero, q, hv));
                let t = _mm512_dpbusd_epi32(t, q, lv);
                let s = _mm512_permutexvar_ps(idx[i / 2], ds[r]);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), s, acc[r]);
            }
            i += 2;
        }
        b0 += nbc;
    }
    for r in 0..R {
        out[r] = hsum512(acc[r]) + hsum512(accm[r]);
    }
}

/// Fills the VNNI [`super::Aux`] for `x` (see [`super::gemv_aux`] for the layout):
/// per 32-block, the scale `s_b = max|x_b| / ACT_MAX`, the integers `X = round(x / s_b)`
/// (nearest-even) as H/L byte planes, and the offset pair from `s_b * sum(X)`. A block
/// holding NaN or ±inf gets a NaN scale and zero integers, so NaN reaches the output.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn prepare(dtype: DType, x: &[f32], aux: &mut super::Aux) {
    let nb = x.len() / 32;
    let nbp = nb.next_multiple_of(2);
    let pairs = (2 * nb).div_ceil(16) * 16;
    aux.f.clear();
    aux.f.resize(2 * pairs, 0.0);
    aux.i.clear();
    aux.i.resize(64 * nbp, 0);
    let (sums, scales) = aux.f.split_at_mut(pairs);
    let ip = aux.i.as_mut_ptr();
    let absmask = _mm512_set1_epi32(0x7FFF_FFFF);
    let inf = _mm512_set1_epi32(0x7F80_0000);
    let c128 = _mm512_set1_epi32(128);
    for b in 0..nb {
        let xp = x.as_ptr().add(32 * b);
        let v0 = _mm512_loadu_ps(xp);
        let v1 = _mm512_loadu_ps(xp.add(16));
        let a0 = _mm512_and_si512(_mm512_castps_si512(v0), absmask);
        let a1 = _mm512_and_si512(_mm512_castps_si512(v1), absmask);
        // Any exponent of all ones (NaN or inf): integer compare on the bit patterns.
        let bad = _mm512_cmpge_epi32_mask(a0, inf) | _mm512_cmpge_epi32_mask(a1, inf);
        let amax = _mm512_reduce_max_ps(_mm512_castsi512_ps(_mm512_max_epi32(a0, a1)));
        let (scale, q0, q1) = if bad != 0 {
            (f32::NAN, _mm512_setzero_si512(), _mm512_setzero_si512())
        } else if amax == 0.0 {
            (0.0, _mm512_setzero_si512(), _mm512_setzero_si512())
        } else {
            let inv = _mm512_set1_ps(super::ACT_MAX / amax);
            // |x * inv| <= ACT_MAX up to rounding of inv; the clamp keeps H within i8.
            let lim = _mm512_set1_epi32(super::ACT_MAX as i32);
            let neg = _mm512_set1_epi32(-(super::ACT_MAX as i32));
            let r = |v| _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(v), lim), neg);
            (
                amax / super::ACT_MAX,
                r(_mm512_mul_ps(v0, inv)),
                r(_mm512_mul_ps(v1, inv)),
            )
        };
        scales[2 * b] = scale;
        let s = scale * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)) as f32;
        let pair = if dtype == DType::Q4_1 {
            [0.0, s]
        } else {
            [-8.0 * s, 0.0]
        };
        sums[2 * b..2 * b + 2].copy_from_slice(&pair);
        let h0 = _mm512_srai_epi32::<8>(_mm512_add_epi32(q0, c128));
        let h1 = _mm512_srai_epi32::<8>(_mm512_add_epi32(q1, c128));
        let l0 = _mm512_sub_epi32(q0, _mm512_slli_epi32::<8>(h0));
        let l1 = _mm512_sub_epi32(q1, _mm512_slli_epi32::<8>(h1));
        let hp = ip.add(32 * b);
        let lp = ip.add(32 * nbp + 32 * b);
        _mm_storeu_si128(hp as *mut __m128i, _mm512_cvtepi32_epi8(h0));
        _mm_storeu_si128(hp.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(h1));
        _mm_storeu_si128(lp as *mut __m128i, _mm512_cvtepi32_epi8(l0));
        _mm_storeu_si128(lp.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(l1));
    }
}
