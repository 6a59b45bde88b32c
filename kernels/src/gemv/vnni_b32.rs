//! AVX-512 VNNI GEMV rows for the 32-element block types beside Q4/Q8: Q5_0 and Q5_1
//! (llama.cpp's fallbacks where a row is not a multiple of 256), on 15-bit integer
//! activations with one scale per 32-block ([`prepare`]). (IQ4_NL measured faster on the
//! AVX2 kernel, see `gemv::avx2_b32`.)
//!
//! Two blocks' 32 unsigned quant bytes (the nibbles of both by one 256-bit split and a lane
//! shuffle, the fifth bits of both by one 64-bit masked blend) fill one zmm, which meets
//! `X = 256 H + L` in two `vpdpbusd`; lanes 0-7 are the first block's, 8-15 the second's,
//! and each half is scaled by its block's `d · s_b` (both `d` converted together).
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

/// Two adjacent blocks at `bp` as one zmm of unsigned quant bytes (block A's 32 in
/// element order, then block B's), and `[d_A, d_B, t_A, t_B]`, where `t` is the per-`ΣX̂`
/// term: `m` for Q5_1 (`Q51`), `−16 d` for Q5_0.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn pair<const Q51: bool>(bp: *const u8) -> (__m512i, __m128) {
    let (bytes, qs) = if Q51 { (24, 8) } else { (22, 6) };
    let nib = _mm256_set1_epi8(0x0f);
    let y = _mm256_set_m128i(
        _mm_loadu_si128(bp.add(bytes + qs) as *const _),
        _mm_loadu_si128(bp.add(qs) as *const _),
    );
    let lo = _mm256_and_si256(y, nib);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(y), nib);
    // 128-bit lanes [lo A, lo B, hi A, hi B] -> [lo A, hi A, lo B, hi B].
    let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
    let z = _mm512_shuffle_i64x2::<0b11_01_10_00>(z, z);
    let qh = |at: usize| (bp.add(at + qs - 4) as *const u32).read_unaligned() as u64;
    let bits = qh(0) | qh(bytes) << 32;
    let z = _mm512_mask_blend_epi8(bits, z, _mm512_or_si512(z, _mm512_set1_epi8(0x10)));
    let word = |at: usize| (bp.add(at) as *const u16).read_unaligned() as i16;
    let dm = _mm_cvtph_ps(_mm_setr_epi16(
        word(0),
        word(bytes),
        word(2),
        word(bytes + 2),
        0,
        0,
        0,
        0,
    ));
    let t = if Q51 {
        dm
    } else {
        // [d_A, d_B, -16 d_A, -16 d_B]
        _mm_mul_ps(_mm_movelh_ps(dm, dm), _mm_setr_ps(1.0, 1.0, -16.0, -16.0))
    };
    (z, t)
}

/// One block at `bp` (the last of an odd row) as [`pair`] gives it, with block B zero.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn single<const Q51: bool>(bp: *const u8) -> (__m512i, __m128) {
    let bytes = if Q51 { 24 } else { 22 };
    let mut two = [0u8; 48];
    std::ptr::copy_nonoverlapping(bp, two.as_mut_ptr(), bytes);
    let (z, t) = pair::<Q51>(two.as_ptr());
    (
        z,
        _mm_and_ps(t, _mm_castsi128_ps(_mm_setr_epi32(-1, 0, -1, 0))),
    )
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
    // Lanes 0-7 take element 0 of a 4-float vector, lanes 8-15 element 1.
    let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut oacc = [_mm_setzero_ps(); R];
    let mut b = 0;
    while b < nb {
        let two = b + 1 < nb;
        let ip = xi.add(PAIR_I * (b / 2));
        let (h, l) = (
            _mm512_loadu_si512(ip as *const _),
            _mm512_loadu_si512(ip.add(64) as *const _),
        );
        // [s_A, s_A ΣX_A, s_B, s_B ΣX_B] (zeros past an odd row's end).
        let sx = _mm_loadu_ps(xf.add(B_F * b));
        let s2 = _mm_shuffle_ps::<0b10_00_10_00>(sx, sx);
        let x2 = _mm_shuffle_ps::<0b11_01_11_01>(sx, sx);
        for r in 0..R {
            let bp = p[r].add(bytes * b);
            prefetch_ahead(bp, pf);
            let (q, t) = if two {
                pair::<Q51>(bp)
            } else {
                single::<Q51>(bp)
            };
            let th = _mm512_dpbusd_epi32(zero, q, h);
            let tl = _mm512_dpbusd_epi32(zero, q, l);
            let tq = _mm512_add_epi32(_mm512_slli_epi32::<8>(th), tl);
            let ds = _mm_mul_ps(t, s2);
            let scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(ds));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tq), scale, acc[r]);
            // [t_A, t_B] against [s_A ΣX_A, s_B ΣX_B], in the upper half of `t`.
            oacc[r] = _mm_fmadd_ps(_mm_movehl_ps(t, t), x2, oacc[r]);
        }
        b += 2;
    }
    for r in 0..R {
        let o = oacc[r];
        out[r] = hsum512(acc[r]) + _mm_cvtss_f32(o) + _mm_cvtss_f32(_mm_shuffle_ps::<1>(o, o));
    }
}
