//! AVX2 GEMV rows for the K-quants and IQ4_XS: the AVX-512 VNNI kernels' integer scheme
//! ([`super::vnni_k`]) on 256-bit registers without `vpdpbusd`.
//!
//! Each 32-quant register meets the 15-bit activations `X = 256 H + L` (one scale per
//! 256-element super-block, from [`prepare`]) in `vpmaddubsw` (u8 × i8 pairs to i16,
//! which cannot saturate: at most 2·63·127) and `vpmaddwd` against the sub-blocks' scales
//! as i16, so the H and L sums of a whole super-block collect in two i32 registers (at
//! most 8·2·3810·63 for Q4_K, 8·2·16002·128 for Q6_K) and are converted once. The min and
//! offset terms use sums of the same quantised x, so a row is exactly `dot(w, x̂)`.

use std::arch::x86_64::*;

use super::avx2::{h2f as f16_at, hsum256, prefetch_ahead};
use crate::{DType, MatRef};

/// Floats per super-block in [`super::Aux::f`]: `[0]` the scale `s`; `[8..16]` `ΣX` of
/// each 32-element sub-block; `[16..32]` `ΣX` of each 16-element sub-block.
const SB_F: usize = 32;

/// Bytes per super-block in [`super::Aux::i`]: the H plane, then the L plane, in element
/// order (for IQ4_XS, X itself as 256 i16).
const SB_I: usize = 512;

/// Fills the AVX2 K-quant [`super::Aux`] for `x` (a multiple of 256 long): per super-block
/// `X = round(x / s)` (nearest-even) with `s = max|x_sb| / ACT_MAX`, as H and L byte
/// planes, and the sums [`SB_F`] describes. A super-block holding NaN or ±inf gets a NaN
/// scale, so NaN reaches the output.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn prepare(dtype: DType, x: &[f32], aux: &mut super::Aux) {
    let nsb = x.len() / 256;
    aux.f.clear();
    aux.f.resize(nsb * SB_F, 0.0);
    aux.i.clear();
    aux.i.resize(nsb * SB_I, 0);
    let lim = _mm256_set1_ps(super::ACT_MAX);
    let nlim = _mm256_set1_ps(-super::ACT_MAX);
    for b in 0..nsb {
        let xb = &x[256 * b..256 * b + 256];
        let (s, inv) = super::act_scale(xb);
        let f = &mut aux.f[SB_F * b..SB_F * (b + 1)];
        f[0] = s;
        let planes = &mut aux.i[SB_I * b..SB_I * (b + 1)];
        let invv = _mm256_set1_ps(inv);
        for j in 0..32 {
            let v = _mm256_mul_ps(_mm256_loadu_ps(xb.as_ptr().add(8 * j)), invv);
            let xi = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(v, lim), nlim));
            let mut q = [0i32; 8];
            _mm256_storeu_si256(q.as_mut_ptr() as *mut _, xi);
            let mut sum = 0i32;
            for (k, &v) in q.iter().enumerate() {
                let e = 8 * j + k;
                if dtype == DType::IQ4XS {
                    // IQ4_XS takes X whole, as i16 (see `rows_iq4_xs`).
                    planes[2 * e..2 * e + 2].copy_from_slice(&(v as i16).to_le_bytes());
                } else {
                    let h = (v + 128) >> 8;
                    planes[e] = h as i8 as u8;
                    planes[256 + e] = (v - 256 * h) as i8 as u8;
                }
                sum += v;
            }
            f[16 + j / 2] += sum as f32;
            f[8 + j / 4] += sum as f32;
        }
    }
}

/// GEMV over rows `r0..r1` of a K-quant or IQ4_XS matrix, 4 rows at a time.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemv_rows(w: &MatRef, r0: usize, r1: usize, aux: &super::Aux, y: &mut [f32]) {
    let nsb = w.cols / 256;
    assert!(
        aux.i.len() >= SB_I * nsb && aux.f.len() >= SB_F * nsb,
        "K-quant AVX2 GEMV without its prepared activations"
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
            DType::IQ4XS => rows_iq4_xs::<4>(p, nsb, pf, xi, xf, out),
            DType::Q2K => rows_q23_k::<4, false>(p, nsb, pf, xi, xf, out),
            DType::Q3K => rows_q23_k::<4, true>(p, nsb, pf, xi, xf, out),
            DType::Q5K => rows_q45_k::<4, true>(p, nsb, pf, xi, xf, out),
            _ => rows_q45_k::<4, false>(p, nsb, pf, xi, xf, out),
        },
        |p, pf, out| match dtype {
            DType::Q6K => rows_q6_k::<1>(p, nsb, pf, xi, xf, out),
            DType::IQ4XS => rows_iq4_xs::<1>(p, nsb, pf, xi, xf, out),
            DType::Q2K => rows_q23_k::<1, false>(p, nsb, pf, xi, xf, out),
            DType::Q3K => rows_q23_k::<1, true>(p, nsb, pf, xi, xf, out),
            DType::Q5K => rows_q45_k::<1, true>(p, nsb, pf, xi, xf, out),
            _ => rows_q45_k::<1, false>(p, nsb, pf, xi, xf, out),
        },
    );
}

/// Adds one 32-quant register's products with activation planes `h`/`l`, scaled by the
/// i16 words `sc`, to the super-block's i32 sums.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot32(
    q: __m256i,
    h: *const u8,
    l: *const u8,
    sc: __m256i,
    (ih, il): (&mut __m256i, &mut __m256i),
) {
    let ph = _mm256_maddubs_epi16(q, _mm256_loadu_si256(h as *const _));
    let pl = _mm256_maddubs_epi16(q, _mm256_loadu_si256(l as *const _));
    *ih = _mm256_add_epi32(*ih, _mm256_madd_epi16(ph, sc));
    *il = _mm256_add_epi32(*il, _mm256_madd_epi16(pl, sc));
}

/// Q4_K rows, or with `Q5` Q5_K rows (see [`super::vnni_k`] for the layouts).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_q45_k<const R: usize, const Q5: bool>(
    p: [*const u8; R],
    nsb: usize,
    pf: usize,
    xi: *const u8,
    xf: *const f32,
    out: &mut [f32; R],
) {
    let nib = _mm256_set1_epi8(0x0f);
    let b16 = _mm256_set1_epi8(0x10);
    let (bytes, qs) = if Q5 { (176, 48) } else { (144, 16) };
    let mut acc = [_mm256_setzero_ps(); R];
    let mut macc = [_mm256_setzero_ps(); R];
    for sb in 0..nsb {
        let (hp, lp) = (xi.add(SB_I * sb), xi.add(SB_I * sb + 256));
        let s = *xf.add(SB_F * sb);
        let xs = _mm256_loadu_ps(xf.add(SB_F * sb + 8));
        for r in 0..R {
            let bp = p[r].add(bytes * sb);
            for o in [0, 64, 128, bytes - 1] {
                prefetch_ahead(bp.add(o), pf);
            }
            let (d, dmin) = (f16_at(bp), f16_at(bp.add(2)));
            let (sc, mn) = super::vnni_k::scales_mins_q4_k(bp.add(4));
            let (sc, mn) = (sc.to_le_bytes(), mn.to_le_bytes());
            let qh = if Q5 {
                _mm256_loadu_si256(bp.add(16) as *const _)
            } else {
                _mm256_setzero_si256()
            };
            let (mut ih, mut il) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for c in 0..4 {
                let raw = _mm256_loadu_si256(bp.add(qs + 32 * c) as *const _);
                let mut lo = _mm256_and_si256(raw, nib);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nib);
                if Q5 {
                    // Fifth bits 2c (low nibbles) and 2c+1 (high) of each qh byte, moved to bit 4.
                    let sh = _mm_cvtsi32_si128(4 - 2 * c as i32);
                    let t = if c < 2 {
                        _mm256_sll_epi16(qh, sh)
                    } else {
                        _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c as i32 - 4))
                    };
                    lo = _mm256_or_si256(lo, _mm256_and_si256(t, b16));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_srli_epi16::<1>(t), b16));
                }
                let e = 64 * c;
                dot32(
                    lo,
                    hp.add(e),
                    lp.add(e),
                    _mm256_set1_epi16(sc[2 * c] as i16),
                    (&mut ih, &mut il),
                );
                dot32(
                    hi,
                    hp.add(e + 32),
                    lp.add(e + 32),
                    _mm256_set1_epi16(sc[2 * c + 1] as i16),
                    (&mut ih, &mut il),
                );
            }
            let t = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(ih),
                _mm256_set1_ps(256.0),
                _mm256_cvtepi32_ps(il),
            );
            acc[r] = _mm256_fmadd_ps(t, _mm256_set1_ps(d * s), acc[r]);
            let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                mn.as_ptr() as *const _
            )));
            macc[r] = _mm256_fmadd_ps(_mm256_mul_ps(m, xs), _mm256_set1_ps(dmin * s), macc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum256(acc[r]) - hsum256(macc[r]);
    }
}

/// Q6_K rows: quants go in as `q + 32` and `32·Σ sc ΣX` per 16-element sub-block comes off.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_q6_k<const R: usize>(
    p: [*const u8; R],
    nsb: usize,
    pf: usize,
    xi: *const u8,
    xf: *const f32,
    out: &mut [f32; R],
) {
    let nib = _mm256_set1_epi8(0x0f);
    let two = _mm256_set1_epi8(0x30);
    // Byte patterns spreading sub-blocks (a, b) over the 16 words of a madd scale vector.
    let pat: [__m128i; 8] = std::array::from_fn(|k| {
        let b: [u8; 16] = std::array::from_fn(|i| (2 * k + i / 8) as u8);
        _mm_loadu_si128(b.as_ptr() as *const _)
    });
    let mut acc = [_mm256_setzero_ps(); R];
    let mut oacc = [_mm256_setzero_ps(); R];
    for sb in 0..nsb {
        let (hp, lp) = (xi.add(SB_I * sb), xi.add(SB_I * sb + 256));
        let s = *xf.add(SB_F * sb);
        let x16 = [
            _mm256_loadu_ps(xf.add(SB_F * sb + 16)),
            _mm256_loadu_ps(xf.add(SB_F * sb + 24)),
        ];
        for r in 0..R {
            let bp = p[r].add(210 * sb);
            for o in [0, 64, 128, 192, 209] {
                prefetch_ahead(bp.add(o), pf);
            }
            let ds = f16_at(bp.add(208)) * s;
            let sc8 = _mm_loadu_si128(bp.add(192) as *const _);
            for (half, x) in x16.iter().enumerate() {
                let scf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                    bp.add(192 + 8 * half) as *const _,
                )));
                oacc[r] = _mm256_fmadd_ps(_mm256_mul_ps(scf, _mm256_set1_ps(ds)), *x, oacc[r]);
            }
            let (mut ih, mut il) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for n in 0..2 {
                let qa = _mm256_loadu_si256(bp.add(64 * n) as *const _);
                let qb = _mm256_loadu_si256(bp.add(64 * n + 32) as *const _);
                let qh = _mm256_loadu_si256(bp.add(128 + 32 * n) as *const _);
                let q = [
                    _mm256_or_si256(
                        _mm256_and_si256(qa, nib),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(qh), two),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(qb, nib),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(qh), two),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(qa), nib),
                        _mm256_and_si256(qh, two),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(qb), nib),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), two),
                    ),
                ];
                for (k, qk) in q.into_iter().enumerate() {
                    let g = 4 * n + k;
                    let scw = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, pat[g]));
                    dot32(qk, hp.add(32 * g), lp.add(32 * g), scw, (&mut ih, &mut il));
                }
            }
            let t = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(ih),
                _mm256_set1_ps(256.0),
                _mm256_cvtepi32_ps(il),
            );
            acc[r] = _mm256_fmadd_ps(t, _mm256_set1_ps(ds), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum256(acc[r]) - 32.0 * hsum256(oacc[r]);
    }
}

/// IQ4_XS rows (136-byte super-blocks `{d, scales_h, scales_l[4], qs[128]}`): the code
/// book's signed values, widened to i16, meet the whole 15-bit X (i16, which [`prepare`]
/// stores for IQ4_XS in place of the H and L planes) in `vpmaddwd`; each 32-element
/// sub-block's sum is scaled by its signed 6-bit scale in f32. (The `vpmaddubsw` route of
/// the other kernels needs an unsigned operand, and neither IQ4's signed values nor
/// `sign(v)·L`, with L = −128 possible, can be one.)
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_iq4_xs<const R: usize>(
    p: [*const u8; R],
    nsb: usize,
    pf: usize,
    xi: *const u8,
    xf: *const f32,
    out: &mut [f32; R],
) {
    let nib = _mm_set1_epi8(0x0f);
    let book = _mm_loadu_si128(crate::quant::KVALUES_IQ4.as_ptr() as *const _);
    let mut acc = [_mm256_setzero_ps(); R];
    for sb in 0..nsb {
        let xp = xi.add(SB_I * sb) as *const i16;
        let s = *xf.add(SB_F * sb);
        for r in 0..R {
            let bp = p[r].add(136 * sb);
            for o in [0, 64, 128, 135] {
                prefetch_ahead(bp.add(o), pf);
            }
            let d = f16_at(bp) * s;
            let sh = (bp.add(2) as *const u16).read_unaligned() as u32;
            let sl = (bp.add(4) as *const u32).read_unaligned();
            let mut a = _mm256_setzero_ps();
            for ib in 0..8 {
                let ls = ((sl >> (4 * ib)) & 0x0f) | (((sh >> (2 * ib)) & 3) << 4);
                let raw = _mm_loadu_si128(bp.add(8 + 16 * ib) as *const _);
                let lo = _mm_shuffle_epi8(book, _mm_and_si128(raw, nib));
                let hi = _mm_shuffle_epi8(book, _mm_and_si128(_mm_srli_epi16::<4>(raw), nib));
                let x0 = _mm256_loadu_si256(xp.add(32 * ib) as *const _);
                let x1 = _mm256_loadu_si256(xp.add(32 * ib + 16) as *const _);
                let t = _mm256_add_epi32(
                    _mm256_madd_epi16(_mm256_cvtepi8_epi16(lo), x0),
                    _mm256_madd_epi16(_mm256_cvtepi8_epi16(hi), x1),
                );
                let sc = _mm256_set1_ps(d * (ls as i32 - 32) as f32);
                a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sc, a);
            }
            acc[r] = _mm256_add_ps(acc[r], a);
        }
    }
    for r in 0..R {
        out[r] = hsum256(acc[r]);
    }
}

/// Byte patterns spreading sub-blocks `(2g, 2g + 1)` of a super-block's 16 over the 16 words
/// of a `vpmaddwd` scale vector (a 32-element group g covers two 16-element sub-blocks).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pair_patterns() -> [__m128i; 8] {
    std::array::from_fn(|g| {
        let b: [u8; 16] = std::array::from_fn(|i| (2 * g + i / 8) as u8);
        _mm_loadu_si128(b.as_ptr() as *const _)
    })
}

/// Q2_K rows, or with `Q3` Q3_K rows (see [`super::vnni_k`] for the layouts): 2-bit field
/// j of `qs[32n..32n + 32]` is elements `128n + 32j..+32`; Q3_K's quants go in as
/// `q + 4·hbit` (0..7) and `4·Σ sc·ΣX` per sub-block comes off, Q2_K's min term likewise.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_q23_k<const R: usize, const Q3: bool>(
    p: [*const u8; R],
    nsb: usize,
    pf: usize,
    xi: *const u8,
    xf: *const f32,
    out: &mut [f32; R],
) {
    let three = _mm256_set1_epi8(3);
    let four = _mm256_set1_epi8(4);
    let pat = pair_patterns();
    let (bytes, qs) = if Q3 { (110, 32) } else { (84, 16) };
    let mut acc = [_mm256_setzero_ps(); R];
    let mut oacc = [_mm256_setzero_ps(); R];
    for sb in 0..nsb {
        let (hp, lp) = (xi.add(SB_I * sb), xi.add(SB_I * sb + 256));
        let s = *xf.add(SB_F * sb);
        let x16 = [
            _mm256_loadu_ps(xf.add(SB_F * sb + 16)),
            _mm256_loadu_ps(xf.add(SB_F * sb + 24)),
        ];
        for r in 0..R {
            let bp = p[r].add(bytes * sb);
            for o in [0, 64, bytes - 1] {
                prefetch_ahead(bp.add(o), pf);
            }
            // The 16 scales as signed bytes, d·s, and the per-ΣX factors of the 16
            // sub-blocks (Q3_K: 4·d·s·sc, taken off; Q2_K: dmin·s·m, taken off).
            let (sc, ds) = if Q3 {
                (
                    super::vnni_k::scales_q3_k_bytes(bp.add(96)),
                    f16_at(bp.add(108)) * s,
                )
            } else {
                let raw = _mm_loadu_si128(bp as *const _);
                (
                    _mm_and_si128(raw, _mm_set1_epi8(0x0f)),
                    f16_at(bp.add(80)) * s,
                )
            };
            let offs = if Q3 {
                (sc, 4.0 * ds)
            } else {
                let raw = _mm_loadu_si128(bp as *const _);
                let mn = _mm_and_si128(_mm_srli_epi16::<4>(raw), _mm_set1_epi8(0x0f));
                (mn, f16_at(bp.add(82)) * s)
            };
            for (half, x) in x16.iter().enumerate() {
                let eight = if half == 0 {
                    offs.0
                } else {
                    _mm_unpackhi_epi64(offs.0, offs.0)
                };
                let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight));
                oacc[r] = _mm256_fmadd_ps(_mm256_mul_ps(f, _mm256_set1_ps(offs.1)), *x, oacc[r]);
            }
            let (mut ih, mut il) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for n in 0..2 {
                let q = _mm256_loadu_si256(bp.add(qs + 32 * n) as *const _);
                let hm = if Q3 {
                    _mm256_loadu_si256(bp as *const _)
                } else {
                    _mm256_setzero_si256()
                };
                for j in 0..4 {
                    let mut v = _mm256_and_si256(
                        _mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * j as i32)),
                        three,
                    );
                    if Q3 {
                        // High bit 4n + j of hmask byte l, as 4.
                        let hb = _mm256_srl_epi16(hm, _mm_cvtsi32_si128((4 * n + j) as i32));
                        let hb = _mm256_and_si256(_mm256_slli_epi16::<2>(hb), four);
                        v = _mm256_or_si256(v, hb);
                    }
                    let g = 4 * n + j;
                    let scw = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, pat[g]));
                    dot32(v, hp.add(32 * g), lp.add(32 * g), scw, (&mut ih, &mut il));
                }
            }
            let t = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(ih),
                _mm256_set1_ps(256.0),
                _mm256_cvtepi32_ps(il),
            );
            acc[r] = _mm256_fmadd_ps(t, _mm256_set1_ps(ds), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum256(acc[r]) - hsum256(oacc[r]);
    }
}
