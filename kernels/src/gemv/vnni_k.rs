//! AVX-512 VNNI GEMV rows for Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS: integer dot products of the weights' 4- and
//! 6-bit quants against 15-bit integer activations with one scale per 256-element
//! super-block, made by [`prepare`].
//!
//! As on the Q4_0/Q8_0 paths, `X = 256 H + L` (H, L signed bytes) meets the unsigned quant
//! bytes in two `vpdpbusd` per 64 weights. The super-block's activation scale is shared by
//! its sub-blocks, so a Q4_K super-block's eight sub-block sums are scaled by their 6-bit
//! scales in integers and converted once; Q6_K's signed 8-bit scales could overflow i32,
//! so its sums are scaled in f32. The min (Q4_K) and offset-32 (Q6_K) terms use sums of the
//! same quantised x, so a row is exactly `dot(w, x̂)`: the only error is x's rounding to
//! 15 bits per super-block, at most `max|x_sb| / 65024` per element.

use std::arch::x86_64::*;

use super::avx2::h2f as f16_at;
use super::avx512::{hsum256, hsum512, prefetch_ahead};
use crate::{DType, MatRef};

/// Floats per super-block in [`super::Aux::f`]: `[0]` the scale `s`; `[8..16]` `ΣX` of
/// each 32-element sub-block (Q4_K/Q5_K's min term, IQ4_XS's offset); `[16..32]` `ΣX`
/// of each 16-element sub-block (Q6_K's and Q3_K's offsets, Q2_K's min term).
const SB_F: usize = 32;

/// Bytes per super-block in [`super::Aux::i`]: the H plane, then the L plane, each in the
/// order the type's kernel reads its quants.
const SB_I: usize = 512;

/// Where element `e` (0..256) of a super-block sits in its planes. Q4_K's 64-byte quant
/// loads hold elements `128g + [0..32, 64..96]` (low nibbles) and `128g + [32..64,
/// 96..128]` (high nibbles), so the middle 32-element chunks of each 128 swap; Q6_K reads
/// elements in order.
fn plane_pos(dtype: DType, e: usize) -> usize {
    match dtype {
        DType::Q4K | DType::Q5K => {
            let chunk = [0, 2, 1, 3][(e % 128) / 32];
            128 * (e / 128) + 32 * chunk + e % 32
        }
        // Q2_K/Q3_K: the 2-bit field j of byte l of half n is element 128n + 32j + l, and
        // the 64 quant bytes hold both halves: field j of all of them is one vector.
        DType::Q2K | DType::Q3K => 64 * ((e % 128) / 32) + 32 * (e / 128) + e % 32,
        // IQ4_XS: a 64-byte load holds sub-blocks 4k..4k+4 as 16 bytes each; its low
        // nibbles are their first 16 elements, its high nibbles their last 16.
        DType::IQ4XS => {
            let (sb, within) = (e / 32, e % 32);
            128 * (sb / 4) + 64 * (within / 16) + 16 * (sb % 4) + within % 16
        }
        _ => e,
    }
}

/// Fills the Q4_K/Q5_K/Q6_K [`super::Aux`] for `x` (a multiple of 256 long): per super-block,
/// `X = round(x / s)` (nearest-even) with `s = max|x_sb| / ACT_MAX`, as H and L byte
/// planes, and the sums [`SB_F`] describes. A super-block holding NaN or ±inf gets a NaN
/// scale, so NaN reaches the output.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn prepare(dtype: DType, x: &[f32], aux: &mut super::Aux) {
    let nsb = x.len() / 256;
    aux.f.clear();
    aux.f.resize(nsb * SB_F, 0.0);
    aux.i.clear();
    aux.i.resize(nsb * SB_I, 0);
    let lim = _mm512_set1_ps(super::ACT_MAX);
    for b in 0..nsb {
        let xb = &x[256 * b..256 * b + 256];
        let (s, inv) = super::act_scale(xb);
        let f = &mut aux.f[SB_F * b..SB_F * (b + 1)];
        f[0] = s;
        let planes = aux.i.as_mut_ptr().add(SB_I * b);
        let invv = _mm512_set1_ps(inv);
        for j in 0..16 {
            let v = _mm512_mul_ps(_mm512_loadu_ps(xb.as_ptr().add(16 * j)), invv);
            let v = _mm512_max_ps(
                _mm512_min_ps(v, lim),
                _mm512_sub_ps(_mm512_setzero_ps(), lim),
            );
            let xi = _mm512_cvtps_epi32(v);
            let hi = _mm512_srai_epi32::<8>(_mm512_add_epi32(xi, _mm512_set1_epi32(128)));
            let lo = _mm512_sub_epi32(xi, _mm512_slli_epi32::<8>(hi));
            let pos = plane_pos(dtype, 16 * j);
            _mm_storeu_si128(planes.add(pos) as *mut _, _mm512_cvtepi32_epi8(hi));
            _mm_storeu_si128(planes.add(256 + pos) as *mut _, _mm512_cvtepi32_epi8(lo));
            let sum = _mm512_reduce_add_epi32(xi) as f32;
            f[16 + j] = sum;
            f[8 + j / 2] += sum;
        }
    }
}

/// GEMV over rows `r0..r1` of a K-quant or IQ4_XS matrix, 4 rows at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn gemv_rows(w: &MatRef, r0: usize, r1: usize, aux: &super::Aux, y: &mut [f32]) {
    let nsb = w.cols / 256;
    assert!(
        aux.i.len() >= SB_I * nsb && aux.f.len() >= SB_F * nsb,
        "K-quant VNNI GEMV without its prepared activations"
    );
    let (xi, xf) = (aux.i.as_ptr(), aux.f.as_ptr());
    let dtype = w.dtype;
    super::for_row_blocks(
        w,
        r0,
        r1,
        y,
        |p, pf, out| match dtype {
            DType::Q6K => rows_q6_k::<4>(p, nsb, pf, xi, xf, out),
            DType::Q2K => rows_q23_k::<4, false>(p, nsb, pf, xi, xf, out),
            DType::Q3K => rows_q23_k::<4, true>(p, nsb, pf, xi, xf, out),
            DType::IQ4XS => rows_iq4_xs::<4>(p, nsb, pf, xi, xf, out),
            DType::Q5K => rows_q45_k::<4, true>(p, nsb, pf, xi, xf, out),
            _ => rows_q45_k::<4, false>(p, nsb, pf, xi, xf, out),
        },
        |p, pf, out| match dtype {
            DType::Q6K => rows_q6_k::<1>(p, nsb, pf, xi, xf, out),
            DType::Q2K => rows_q23_k::<1, false>(p, nsb, pf, xi, xf, out),
            DType::Q3K => rows_q23_k::<1, true>(p, nsb, pf, xi, xf, out),
            DType::IQ4XS => rows_iq4_xs::<1>(p, nsb, pf, xi, xf, out),
            DType::Q5K => rows_q45_k::<1, true>(p, nsb, pf, xi, xf, out),
            _ => rows_q45_k::<1, false>(p, nsb, pf, xi, xf, out),
        },
    );
}

/// Super-block `sb`'s H and L planes from [`prepare`], four zmm each.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn planes(xi: *const u8, sb: usize) -> ([__m512i; 4], [__m512i; 4]) {
    let hp = xi.add(SB_I * sb);
    (
        std::array::from_fn(|k| _mm512_loadu_si512(hp.add(64 * k) as *const _)),
        std::array::from_fn(|k| _mm512_loadu_si512(hp.add(256 + 64 * k) as *const _)),
    )
}

/// Q4_K's (and Q5_K's) eight 6-bit scales and eight 6-bit mins from their 12 bytes at `q`, as bytes
/// of two u64 (`get_scale_min_k4` for all eight sub-blocks at once).
#[inline(always)]
pub(crate) unsafe fn scales_mins_q4_k(q: *const u8) -> (u64, u64) {
    let word = |i: usize| (q.add(4 * i) as *const u32).read_unaligned();
    let (a, b, c) = (word(0), word(1), word(2));
    let (m6, m4, m2) = (0x3f3f_3f3fu32, 0x0f0f_0f0fu32, 0x0303_0303u32);
    let sc_lo = a & m6;
    let mn_lo = b & m6;
    let sc_hi = (c & m4) | (((a >> 6) & m2) << 4);
    let mn_hi = ((c >> 4) & m4) | (((b >> 6) & m2) << 4);
    (
        sc_lo as u64 | (sc_hi as u64) << 32,
        mn_lo as u64 | (mn_hi as u64) << 32,
    )
}

/// Byte-shuffle patterns spreading Q4_K's scales over the i32 lanes of its four quant
/// vectors: vector k's lanes 0-7 are sub-block `a`, lanes 8-15 sub-block `b`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn q4_k_scale_patterns() -> [__m128i; 4] {
    [(0, 2), (1, 3), (4, 6), (5, 7)].map(|(a, b): (u8, u8)| {
        let bytes: [u8; 16] = std::array::from_fn(|i| if i < 8 { a } else { b });
        _mm_loadu_si128(bytes.as_ptr() as *const _)
    })
}

/// Q4_K rows (144-byte super-blocks `{d, dmin, scales[12], qs[128]}`), or with `Q5` Q5_K
/// rows (176 bytes, `qh[32]` before `qs`: bit `2c + h` of `qh[l]` is the fifth bit of
/// element `64c + 32h + l`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn rows_q45_k<const R: usize, const Q5: bool>(
    p: [*const u8; R],
    nsb: usize,
    pf: usize,
    xi: *const u8,
    xf: *const f32,
    out: &mut [f32; R],
) {
    let nib = _mm512_set1_epi8(0x0f);
    let zero = _mm512_setzero_si512();
    let pat = q4_k_scale_patterns();
    let (bytes, qs) = if Q5 { (176, 48) } else { (144, 16) };
    // Quant vector k's two 32-byte halves take their fifth bits from qh bits (a, b).
    let one = _mm512_set1_epi8(1);
    let hshift: [__m512i; 4] = [(0, 2), (1, 3), (4, 6), (5, 7)].map(|(a, b): (i16, i16)| {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi16(a)),
            _mm256_set1_epi16(b),
        )
    });
    let mut acc = [_mm512_setzero_ps(); R];
    let mut macc = [_mm256_setzero_ps(); R];
    for sb in 0..nsb {
        let (h, l) = planes(xi, sb);
        let s = *xf.add(SB_F * sb);
        let xs = _mm256_loadu_ps(xf.add(SB_F * sb + 8));
        for r in 0..R {
            let bp = p[r].add(bytes * sb);
            for o in [0, 64, 128, bytes - 1] {
                prefetch_ahead(bp.add(o), pf);
            }
            let (d, dmin) = (f16_at(bp), f16_at(bp.add(2)));
            let (sc, mn) = scales_mins_q4_k(bp.add(4));
            let q0 = _mm512_loadu_si512(bp.add(qs) as *const _);
            let q1 = _mm512_loadu_si512(bp.add(qs + 64) as *const _);
            let mut v = [
                _mm512_and_si512(q0, nib),
                _mm512_and_si512(_mm512_srli_epi16::<4>(q0), nib),
                _mm512_and_si512(q1, nib),
                _mm512_and_si512(_mm512_srli_epi16::<4>(q1), nib),
            ];
            if Q5 {
                let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(bp.add(16) as *const _));
                for k in 0..4 {
                    let hb = _mm512_and_si512(_mm512_srlv_epi16(qh, hshift[k]), one);
                    v[k] = _mm512_or_si512(v[k], _mm512_slli_epi16::<4>(hb));
                }
            }
            let sc128 = _mm_cvtsi64_si128(sc as i64);
            let mut t = zero;
            for k in 0..4 {
                let th = _mm512_dpbusd_epi32(zero, v[k], h[k]);
                let tl = _mm512_dpbusd_epi32(zero, v[k], l[k]);
                let tk = _mm512_add_epi32(_mm512_slli_epi32::<8>(th), tl);
                let scv = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(sc128, pat[k]));
                t = _mm512_add_epi32(t, _mm512_mullo_epi32(tk, scv));
            }
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(d * s), acc[r]);
            let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mn as i64)));
            macc[r] = _mm256_fmadd_ps(_mm256_mul_ps(m, xs), _mm256_set1_ps(dmin * s), macc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum512(acc[r]) - hsum256(macc[r]);
    }
}

/// Q6_K rows: 210-byte super-blocks `{ql[128], qh[64], scales[16], d}`; the quants go in
/// as `q + 32` (unsigned) and `32·ΣX` per 16-element sub-block comes off.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn rows_q6_k<const R: usize>(
    p: [*const u8; R],
    nsb: usize,
    pf: usize,
    xi: *const u8,
    xf: *const f32,
    out: &mut [f32; R],
) {
    let nib = _mm512_set1_epi8(0x0f);
    let two = _mm512_set1_epi8(0x03);
    let zero = _mm512_setzero_si512();
    // qh bits 2k, 2k+1 feed the k-th 32-element group of a 128-element half: the low
    // quant vector's two 32-byte halves take shifts 0 and 2, the high one's 4 and 6.
    let shifts = |a: i16, b: i16| {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi16(a)),
            _mm256_set1_epi16(b),
        )
    };
    let (sh_lo, sh_hi) = (shifts(0, 2), shifts(4, 6));
    // Lane i of quant vector k (k = 0..4: half k/2, low or high) covers sub-block
    // 4k + i/4 of the super-block's 16.
    let idx: [__m512i; 4] = std::array::from_fn(|k| {
        let v: [i32; 16] = std::array::from_fn(|i| (4 * k + i / 4) as i32);
        _mm512_loadu_si512(v.as_ptr() as *const _)
    });
    let mut acc = [_mm512_setzero_ps(); R];
    let mut oacc = [_mm512_setzero_ps(); R];
    for sb in 0..nsb {
        let (h, l) = planes(xi, sb);
        let s = *xf.add(SB_F * sb);
        let xo = _mm512_loadu_ps(xf.add(SB_F * sb + 16));
        for r in 0..R {
            let bp = p[r].add(210 * sb);
            for o in [0, 64, 128, 192, 209] {
                prefetch_ahead(bp.add(o), pf);
            }
            let ds = _mm512_set1_ps(f16_at(bp.add(208)) * s);
            let scf = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    bp.add(192) as *const _
                ))),
                ds,
            );
            oacc[r] = _mm512_fmadd_ps(scf, xo, oacc[r]);
            for n in 0..2 {
                let ql = _mm512_loadu_si512(bp.add(64 * n) as *const _);
                let qh =
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(bp.add(128 + 32 * n) as *const _));
                let hb =
                    |sh| _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srlv_epi16(qh, sh), two));
                let v = [
                    _mm512_or_si512(_mm512_and_si512(ql, nib), hb(sh_lo)),
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(ql), nib), hb(sh_hi)),
                ];
                for (j, vj) in v.into_iter().enumerate() {
                    let k = 2 * n + j;
                    let th = _mm512_dpbusd_epi32(zero, vj, h[k]);
                    let tl = _mm512_dpbusd_epi32(zero, vj, l[k]);
                    let t = _mm512_add_epi32(_mm512_slli_epi32::<8>(th), tl);
                    let scv = _mm512_permutexvar_ps(idx[k], scf);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), scv, acc[r]);
                }
            }
        }
    }
    for r in 0..R {
        out[r] = hsum512(acc[r]) - 32.0 * hsum512(oacc[r]);
    }
}

/// IQ4_XS rows: 136-byte super-blocks `{d, scales_h, scales_l[4], qs[128]}`. The code
/// book's values go in as `KVALUES + 128` (unsigned, by a byte shuffle) and `128·ΣX` per
/// sub-block comes off; the signed 6-bit scales are applied in f32, as for Q6_K.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn rows_iq4_xs<const R: usize>(
    p: [*const u8; R],
    nsb: usize,
    pf: usize,
    xi: *const u8,
    xf: *const f32,
    out: &mut [f32; R],
) {
    let nib = _mm512_set1_epi8(0x0f);
    let zero = _mm512_setzero_si512();
    let book = {
        let b: [u8; 16] =
            std::array::from_fn(|i| (crate::quant::KVALUES_IQ4[i] as i16 + 128) as u8);
        _mm512_broadcast_i32x4(_mm_loadu_si128(b.as_ptr() as *const _))
    };
    let lo_shift = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    let hi_shift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    // Lane i of the two quant vectors of load k covers sub-block 4k + i/4.
    let idx: [__m512i; 2] = std::array::from_fn(|k| {
        let v: [i32; 16] = std::array::from_fn(|i| (4 * k + i / 4) as i32);
        _mm512_loadu_si512(v.as_ptr() as *const _)
    });
    let mut acc = [_mm512_setzero_ps(); R];
    let mut oacc = [_mm256_setzero_ps(); R];
    for sb in 0..nsb {
        let (h, l) = planes(xi, sb);
        let s = *xf.add(SB_F * sb);
        let xs = _mm256_loadu_ps(xf.add(SB_F * sb + 8));
        for r in 0..R {
            let bp = p[r].add(136 * sb);
            for o in [0, 64, 128, 135] {
                prefetch_ahead(bp.add(o), pf);
            }
            let ds = _mm256_set1_ps(f16_at(bp) * s);
            let sh = _mm256_set1_epi32((bp.add(2) as *const u16).read_unaligned() as i32);
            let sl = _mm256_set1_epi32((bp.add(4) as *const u32).read_unaligned() as i32);
            let ls = _mm256_or_si256(
                _mm256_and_si256(_mm256_srlv_epi32(sl, lo_shift), _mm256_set1_epi32(0x0f)),
                _mm256_slli_epi32::<4>(_mm256_and_si256(
                    _mm256_srlv_epi32(sh, hi_shift),
                    _mm256_set1_epi32(3),
                )),
            );
            let scf = _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_sub_epi32(ls, _mm256_set1_epi32(32))),
                ds,
            );
            oacc[r] = _mm256_fmadd_ps(scf, xs, oacc[r]);
            let scf = _mm512_castps256_ps512(scf);
            for k in 0..2 {
                let q = _mm512_loadu_si512(bp.add(8 + 64 * k) as *const _);
                let v = [
                    _mm512_shuffle_epi8(book, _mm512_and_si512(q, nib)),
                    _mm512_shuffle_epi8(book, _mm512_and_si512(_mm512_srli_epi16::<4>(q), nib)),
                ];
                let scv = _mm512_permutexvar_ps(idx[k], scf);
                for (j, vj) in v.into_iter().enumerate() {
                    let th = _mm512_dpbusd_epi32(zero, vj, h[2 * k + j]);
                    let tl = _mm512_dpbusd_epi32(zero, vj, l[2 * k + j]);
                    let t = _mm512_add_epi32(_mm512_slli_epi32::<8>(th), tl);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), scv, acc[r]);
                }
            }
        }
    }
    for r in 0..R {
        out[r] = hsum512(acc[r]) - 128.0 * hsum256(oacc[r]);
    }
}

/// Q3_K's 16 six-bit scales from their 12 bytes at `q`, minus 32, as signed bytes (see
/// `quant::blocks::scales_q3_k` for the layout). SSE2 only, for the AVX2 kernel too.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn scales_q3_k(q: *const u8) -> __m128i {
    scales_q3_k_bytes(q)
}

/// [`scales_q3_k`] without AVX-512 (SSE2 integer ops).
#[inline(always)]
pub(crate) unsafe fn scales_q3_k_bytes(q: *const u8) -> __m128i {
    let word = |i: usize| (q.add(4 * i) as *const u32).read_unaligned();
    let (a0, a1, t) = (word(0), word(1), word(2));
    let (m4, m2) = (0x0f0f_0f0fu32, 0x0303_0303u32);
    let r = [
        (a0 & m4) | ((t & m2) << 4),
        (a1 & m4) | (((t >> 2) & m2) << 4),
        ((a0 >> 4) & m4) | (((t >> 4) & m2) << 4),
        ((a1 >> 4) & m4) | (((t >> 6) & m2) << 4),
    ];
    _mm_sub_epi8(
        _mm_setr_epi32(r[0] as i32, r[1] as i32, r[2] as i32, r[3] as i32),
        _mm_set1_epi8(32),
    )
}

/// Q2_K rows (84-byte super-blocks `{scales[16], qs[64], d, dmin}`: 4-bit scale and min
/// per 16 elements), or with `Q3` Q3_K rows (110 bytes `{hmask[32], qs[64], scales[12],
/// d}`: signed 6-bit scales, and a high bit that, when clear, takes 4 off). Both hold 2-bit
/// fields `j` of 64 bytes; the 16 sub-block sums are scaled in integers (at most
/// 4·7·32512·32·4 < 2³¹).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn rows_q23_k<const R: usize, const Q3: bool>(
    p: [*const u8; R],
    nsb: usize,
    pf: usize,
    xi: *const u8,
    xf: *const f32,
    out: &mut [f32; R],
) {
    let zero = _mm512_setzero_si512();
    let three = _mm512_set1_epi8(3);
    let one = _mm512_set1_epi8(1);
    let (bytes, qs) = if Q3 { (110, 32) } else { (84, 16) };
    // Lane i of field vector j covers sub-block 2j + i/4 (i < 8) or 8 + 2j + (i-8)/4.
    let pat: [__m128i; 4] = std::array::from_fn(|j| {
        let b: [u8; 16] = std::array::from_fn(|i| {
            (if i < 8 {
                2 * j + i / 4
            } else {
                8 + 2 * j + (i - 8) / 4
            }) as u8
        });
        _mm_loadu_si128(b.as_ptr() as *const _)
    });
    // Q2_K's scales per word of field vector j (word w is in lane w/2), for scaling the
    // quants in place: q·sc <= 3·15 still fits the unsigned byte operand.
    let wpat: [__m256i; 4] = std::array::from_fn(|j| {
        let b: [u8; 32] = std::array::from_fn(|w| {
            let i = w / 2;
            (if i < 8 {
                2 * j + i / 4
            } else {
                8 + 2 * j + (i - 8) / 4
            }) as u8
        });
        _mm256_loadu_si256(b.as_ptr() as *const _)
    });
    // The 2-bit field j: shift 2j; Q3_K's high bit of field j: bit j of hmask byte l for
    // the first half, bit 4 + j for the second.
    let fshift: [__m512i; 4] = std::array::from_fn(|j| _mm512_set1_epi16(2 * j as i16));
    let hshift: [__m512i; 4] = std::array::from_fn(|j| {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi16(j as i16)),
            _mm256_set1_epi16(4 + j as i16),
        )
    });
    let mut acc = [_mm512_setzero_ps(); R];
    let mut oacc = [_mm512_setzero_ps(); R];
    for sb in 0..nsb {
        let (h, l) = planes(xi, sb);
        let s = *xf.add(SB_F * sb);
        let x16 = _mm512_loadu_ps(xf.add(SB_F * sb + 16));
        for r in 0..R {
            let bp = p[r].add(bytes * sb);
            for o in [0, 64, bytes - 1] {
                prefetch_ahead(bp.add(o), pf);
            }
            let q = _mm512_loadu_si512(bp.add(qs) as *const _);
            let (sc, d, off) = if Q3 {
                // q - 4 (1 - hbit) = (q + 4 hbit) - 4: the -4 comes off with ΣX.
                let sc = scales_q3_k(bp.add(96));
                let d = f16_at(bp.add(108)) * s;
                let scf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc));
                (sc, d, _mm512_mul_ps(_mm512_set1_ps(4.0 * d), scf))
            } else {
                let raw = _mm_loadu_si128(bp as *const _);
                let sc = _mm_and_si128(raw, _mm_set1_epi8(0x0f));
                let mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(
                    _mm_srli_epi16::<4>(raw),
                    _mm_set1_epi8(0x0f),
                )));
                let dmin = f16_at(bp.add(82)) * s;
                (
                    sc,
                    f16_at(bp.add(80)) * s,
                    _mm512_mul_ps(_mm512_set1_ps(dmin), mn),
                )
            };
            oacc[r] = _mm512_fmadd_ps(off, x16, oacc[r]);
            let hm = if Q3 {
                _mm512_broadcast_i64x4(_mm256_loadu_si256(bp as *const _))
            } else {
                zero
            };
            if !Q3 {
                // Q2_K: scale the quants in place, so the H and L sums of all four fields
                // collect in two registers (at most 16·45·127 a lane).
                let sc2 = _mm256_broadcastsi128_si256(sc);
                let (mut th, mut tl) = (zero, zero);
                for j in 0..4 {
                    let v = _mm512_and_si512(_mm512_srlv_epi16(q, fshift[j]), three);
                    let scw = _mm512_cvtepu8_epi16(_mm256_shuffle_epi8(sc2, wpat[j]));
                    let v = _mm512_mullo_epi16(v, scw);
                    th = _mm512_dpbusd_epi32(th, v, h[j]);
                    tl = _mm512_dpbusd_epi32(tl, v, l[j]);
                }
                let t = _mm512_add_epi32(_mm512_slli_epi32::<8>(th), tl);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(d), acc[r]);
                continue;
            }
            let mut t = zero;
            for j in 0..4 {
                let mut v = _mm512_and_si512(_mm512_srlv_epi16(q, fshift[j]), three);
                if Q3 {
                    let hb = _mm512_and_si512(_mm512_srlv_epi16(hm, hshift[j]), one);
                    v = _mm512_or_si512(v, _mm512_slli_epi16::<2>(hb));
                }
                let th = _mm512_dpbusd_epi32(zero, v, h[j]);
                let tl = _mm512_dpbusd_epi32(zero, v, l[j]);
                let tk = _mm512_add_epi32(_mm512_slli_epi32::<8>(th), tl);
                let scv = _mm512_cvtepi8_epi32(_mm_shuffle_epi8(sc, pat[j]));
                t = _mm512_add_epi32(t, _mm512_mullo_epi32(tk, scv));
            }
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(d), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum512(acc[r]) - hsum512(oacc[r]);
    }
}
