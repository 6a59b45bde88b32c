//! AVX-512 VNNI GEMV rows for the 32-element block types beside Q4/Q8: Q5_0 and Q5_1
//! (llama.cpp's fallbacks where a row is not a multiple of 256), on 15-bit integer
//! activations with one scale per 32-block ([`prepare`]). (IQ4_NL measured faster on the
//! AVX2 kernel, see `gemv::avx2_b32`.)
//!
//! Two blocks' 32 unsigned quant bytes (the nibble plus the fifth bit from `qh` by a
//! masked blend) fill one zmm, which meets `X = 256 H + L` in two `vpdpbusd`; lanes 0-7 are
//! the first block's, 8-15 the second's, and each half is scaled by its block's `d · s_b`.
//! Q5_0's offset −16 and Q5_1's `m` term use `ΣX` of the same quantised x, so a row is
//! exactly `dot(w, x̂)`.

use std::arch::x86_64::*;

use super::avx512::{hsum512, prefetch_ahead};
use crate::{DType, MatRef};

/// Floats per block in [`super::Aux::f`]: the scale `s_b`, then `s_b · ΣX_b`.
const B_F: usize = 2;

/// Bytes per pair of blocks in [`super::Aux::i`]: both blocks' H bytes, then both L.
const PAIR_I: usize = 128;

/// Fills the [`super::Aux`] for `x` (a multiple of 32 long): per 32-block
/// `X = round(x / s_b)` (nearest-even) with `s_b = max|x_b| / ACT_MAX`, as H and L planes
/// by pairs of blocks (an odd last block pairs with zeros), and the floats [`B_F`]
/// describes. A block holding NaN or ±inf gets a NaN scale, so NaN reaches the output.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn prepare(x: &[f32], aux: &mut super::Aux) {
    let nb = x.len() / 32;
    aux.f.clear();
    aux.f.resize(nb.next_multiple_of(2) * B_F, 0.0);
    aux.i.clear();
    aux.i.resize(nb.div_ceil(2) * PAIR_I, 0);
    let lim = _mm512_set1_ps(super::ACT_MAX);
    let nlim = _mm512_set1_ps(-super::ACT_MAX);
    for b in 0..nb {
        let xb = &x[32 * b..32 * b + 32];
        let (s, inv) = super::act_scale(xb);
        let at = aux.i.as_mut_ptr().add(PAIR_I * (b / 2) + 32 * (b % 2));
        let mut sum = 0;
        for j in 0..2 {
            let v = _mm512_mul_ps(
                _mm512_loadu_ps(xb.as_ptr().add(16 * j)),
                _mm512_set1_ps(inv),
            );
            let xi = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(v, lim), nlim));
            let hi = _mm512_srai_epi32::<8>(_mm512_add_epi32(xi, _mm512_set1_epi32(128)));
            let lo = _mm512_sub_epi32(xi, _mm512_slli_epi32::<8>(hi));
            _mm_storeu_si128(at.add(16 * j) as *mut _, _mm512_cvtepi32_epi8(hi));
            _mm_storeu_si128(at.add(64 + 16 * j) as *mut _, _mm512_cvtepi32_epi8(lo));
            sum += _mm512_reduce_add_epi32(xi);
        }
        aux.f[B_F * b] = s;
        aux.f[B_F * b + 1] = s * sum as f32;
    }
}

/// GEMV over rows `r0..r1` of a Q5_0 or Q5_1 matrix, 4 rows at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn gemv_rows(w: &MatRef, r0: usize, r1: usize, aux: &super::Aux, y: &mut [f32]) {
    let nb = w.cols / 32;
    assert!(
        aux.i.len() >= nb.div_ceil(2) * PAIR_I && aux.f.len() >= B_F * nb,
        "32-block VNNI GEMV without its prepared activations"
    );
    let (xi, xf) = (aux.i.as_ptr(), aux.f.as_ptr());
    let dtype = w.dtype;
    super::for_row_blocks(
        w,
        r0,
        r1,
        y,
        |p, pf, out| match dtype {
            DType::Q5_1 => rows::<4, true>(p, nb, pf, xi, xf, out),
            _ => rows::<4, false>(p, nb, pf, xi, xf, out),
        },
        |p, pf, out| match dtype {
            DType::Q5_1 => rows::<1, true>(p, nb, pf, xi, xf, out),
            _ => rows::<1, false>(p, nb, pf, xi, xf, out),
        },
    );
}

/// f16 at `p` as f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
        (p as *const u16).read_unaligned() as i32,
    )))
}

/// One block's 32 unsigned quant bytes, in element order, its `d`, and its per-`ΣX̂`
/// term: `m` for Q5_1 (`Q51`), −16 d for Q5_0.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn block<const Q51: bool>(bp: *const u8) -> (__m256i, f32, f32) {
    let nib = _mm_set1_epi8(0x0f);
    let d = f16_at(bp);
    let qs = if Q51 { 8 } else { 6 };
    let raw = _mm_loadu_si128(bp.add(qs) as *const _);
    let q = _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16::<4>(raw), nib),
        _mm_and_si128(raw, nib),
    );
    let qh = (bp.add(qs - 4) as *const u32).read_unaligned();
    let q = _mm256_mask_blend_epi8(qh, q, _mm256_or_si256(q, _mm256_set1_epi8(0x10)));
    let m = if Q51 { f16_at(bp.add(2)) } else { -16.0 * d };
    (q, d, m)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn rows<const R: usize, const Q51: bool>(
    p: [*const u8; R],
    nb: usize,
    pf: usize,
    xi: *const u8,
    xf: *const f32,
    out: &mut [f32; R],
) {
    let bytes = if Q51 { 24 } else { 22 };
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); R];
    let mut oacc = [0.0f32; R];
    let mut b = 0;
    while b < nb {
        let two = b + 1 < nb;
        let ip = xi.add(PAIR_I * (b / 2));
        let (h, l) = (
            _mm512_loadu_si512(ip as *const _),
            _mm512_loadu_si512(ip.add(64) as *const _),
        );
        let (sa, xa) = (*xf.add(B_F * b), *xf.add(B_F * b + 1));
        let (sb, xb) = if two {
            (*xf.add(B_F * b + 2), *xf.add(B_F * b + 3))
        } else {
            (0.0, 0.0)
        };
        for r in 0..R {
            let bp = p[r].add(bytes * b);
            prefetch_ahead(bp, pf);
            let (qa, da, ma) = block::<Q51>(bp);
            let (qb, db, mb) = if two {
                block::<Q51>(bp.add(bytes))
            } else {
                (_mm256_setzero_si256(), 0.0, 0.0)
            };
            let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qa), qb);
            let th = _mm512_dpbusd_epi32(zero, q, h);
            let tl = _mm512_dpbusd_epi32(zero, q, l);
            let t = _mm512_add_epi32(_mm512_slli_epi32::<8>(th), tl);
            let scale = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castps_pd(_mm512_set1_ps(da * sa)),
                _mm256_castps_pd(_mm256_set1_ps(db * sb)),
            ));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), scale, acc[r]);
            oacc[r] += ma * xa + mb * xb;
        }
        b += 2;
    }
    for r in 0..R {
        out[r] = hsum512(acc[r]) + oacc[r];
    }
}
