//! AVX-512 VNNI GEMV rows for Q4_0, Q4_1 and Q8_0 weights: integer dot products against the
//! 15-bit integer activations that [`prepare`] makes (`X = round(x / s_b)` per 32-block).
//!
//! `X = 256 H + L` meets the weight bytes in two `vpdpbusd` per weight vector. The kernels
//! work in *units* of blocks that fill one zmm of quants: a group of 4 Q4 blocks (one permute
//! gathers their 64 quant bytes, low nibbles of all 4 in one vector, high nibbles in another)
//! or a pair of blocks (Q8_0, and the last 1-3 Q4 blocks of a row). Each lane's integer sum is
//! scaled by its block's `s_b` and `d_b`; the `d`/`m` words come from the same loaded weight
//! vector by a word permute. The offset terms (Q4_0 `-8 sum X`, Q8_0's sign bias, Q4_1
//! `m_b sum(x̂_b)`) use sums of the same quantised x, so a row is exactly `dot(w, x̂)`.

use std::arch::x86_64::*;

use super::avx512::{hsum256, hsum512, prefetch_ahead};

use crate::{DType, MatRef};

/// Floats per unit in [`super::Aux::f`]: the activation scale `s_b` of each lane's block,
/// then (Q4_1) `s_b * sum(X_b)` of each of the unit's blocks, for the `m` term.
const UNIT_F: usize = 32;

/// Bytes per unit of per-lane integer offsets (Q4_0, Q8_0) after the H and L planes.
const UNIT_I: usize = 64;

/// How the blocks of a row of `nb` blocks form units: whole Q4 groups of 4, then pairs.
fn groups(dtype: DType, nb: usize) -> usize {
    if dtype == DType::Q8_0 {
        0
    } else {
        nb / 4
    }
}

/// Number of units (groups, then pairs) in a row of `nb` blocks.
fn units(dtype: DType, nb: usize) -> usize {
    let g = groups(dtype, nb);
    g + (nb - 4 * g).div_ceil(2)
}

/// GEMV over rows `r0..r1` of a Q4_0, Q4_1 or Q8_0 matrix, 4 rows at a time.
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
        DType::Q8_0 => rows_q8::<R>(p, nb, pf, aux, out),
        _ => unreachable!("the VNNI path only serves quantised weights"),
    }
}

/// A word-index vector from 32 word indices.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn word_idx(f: impl Fn(usize) -> usize) -> __m512i {
    let ix: [u16; 32] = std::array::from_fn(|l| f(l) as u16);
    _mm512_loadu_si512(ix.as_ptr() as *const _)
}

/// Scales a unit's integer lane sums `t` by `s_b` (`sxv`) and the f16 `d` words in the low
/// half of `dm`, into `acc`; returns the `d` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn scale_into(t: __m512i, sxv: __m512, dm: __m512i, acc: &mut __m512) -> __m512 {
    let d = _mm512_cvtph_ps(_mm512_castsi512_si256(dm));
    *acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(t), sxv), d, *acc);
    d
}

/// Unit `u`'s lane scales and offset terms from [`prepare`]: Q4_1's float `m` factors, or
/// Q4_0's i32 lane offsets (bit patterns in an `__m512`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn unit_terms<const Q41: bool>(
    f: *const f32,
    corr: *const u8,
    u: usize,
) -> (__m512, __m512) {
    let sxv = _mm512_loadu_ps(f.add(UNIT_F * u));
    let off = if Q41 {
        _mm512_loadu_ps(f.add(UNIT_F * u + 16))
    } else {
        _mm512_castsi512_ps(_mm512_loadu_si512(corr.add(UNIT_I * u) as *const _))
    };
    (sxv, off)
}

/// Q4 rows. Whole groups of 4 blocks A-D: lane `4j + k` of the gathered quants holds bytes
/// `4k..4k+3` of block j, so its low nibbles are elements `4k..4k+3` and its high nibbles
/// `16+4k..16+4k+3`, which is how [`prepare`] lays out the group's activations. The last
/// 1-3 blocks go in pairs: A's 16 quant bytes in 128-bit lanes 0-1, B's in 2-3, a per-lane
/// word shift (0 or 4) leaves elements 0-15 / 16-31 of each block in natural order.
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
    let dtype = if Q41 { DType::Q4_1 } else { DType::Q4_0 };
    let ng = groups(dtype, nb);
    let nbp = nb.next_multiple_of(2);
    let f = aux.f.as_ptr();
    let hi = aux.i.as_ptr();
    let lo = hi.add(32 * nbp);
    let corr = lo.add(32 * nbp);
    let nib = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    // A group spans 4 * bb >= 72 bytes: a zmm from its start holds A-C's quants and all four
    // d/m words, an xmm at its last 16 bytes is D's quants (second permute source).
    let gidx = word_idx(|l| {
        let byte = (l / 8) * bb + qoff + 2 * (l % 8);
        if byte < 64 {
            byte / 2
        } else {
            32 + (byte - (4 * bb - 16)) / 2
        }
    });
    // Words 0-15: d of lane l's block; 16-19: m of blocks A-D (Q4_1; Q4_0 ignores them).
    let half = bb / 2;
    let gdm = word_idx(|l| half * (l % 4) + l / 4);
    let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut accm = [_mm256_setzero_ps(); R];
    for g in 0..ng {
        let b = 4 * g;
        let h0 = _mm512_loadu_si512(hi.add(32 * b) as *const _);
        let h1 = _mm512_loadu_si512(hi.add(32 * b + 64) as *const _);
        let l0 = _mm512_loadu_si512(lo.add(32 * b) as *const _);
        let l1 = _mm512_loadu_si512(lo.add(32 * b + 64) as *const _);
        let (sxv, off) = unit_terms::<Q41>(f, corr, g);
        for r in 0..R {
            let pa = p[r].add(b * bb);
            prefetch_ahead(pa, pf);
            prefetch_ahead(pa.add(64), pf);
            let w0 = _mm512_loadu_si512(pa as *const _);
            let w1 = _mm512_castsi128_si512(_mm_loadu_si128(pa.add(4 * bb - 16) as *const _));
            let q = _mm512_permutex2var_epi16(w0, gidx, w1);
            let qlo = _mm512_and_si512(q, nib);
            let qhi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), nib);
            let t = _mm512_dpbusd_epi32(zero, qlo, h0);
            let t = _mm512_slli_epi32::<8>(_mm512_dpbusd_epi32(t, qhi, h1));
            let t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(t, qlo, l0), qhi, l1);
            // d (and m) of A-D as floats, d spread to 4 lanes per block.
            let dmh = _mm512_castsi512_si128(_mm512_permutexvar_epi16(gdm, w0));
            let (d, t) = if Q41 {
                let dm = _mm256_cvtph_ps(dmh);
                accm[r] = _mm256_fmadd_ps(dm, _mm512_castps512_ps256(off), accm[r]);
                (_mm512_castps256_ps512(dm), t)
            } else {
                // Q4_0 weights are q - 8: the lane's -8 sum(X) is exact in integers.
                let d = _mm512_castps128_ps512(_mm_cvtph_ps(dmh));
                (d, _mm512_add_epi32(t, _mm512_castps_si512(off)))
            };
            let d = _mm512_permutexvar_ps(spread, d);
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(t), sxv), d, acc[r]);
        }
    }
    // The last 1-3 blocks, in pairs; a masked load stays inside the row, and a lone last
    // block's B lanes read zeros and meet zero activations.
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
    let pidx = word_idx(|l| ((l / 16) * bb + qoff) / 2 + l % 8);
    let pdm = word_idx(|l| match l {
        0..16 => half * (l / 8),
        16..20 => 0,
        _ => half * (l % 2) + 1,
    });
    let (mut b, mut u) = (4 * ng, ng);
    while b < nb {
        let n = (nb - b).min(2);
        let hv = _mm512_loadu_si512(hi.add(32 * b) as *const _);
        let lv = _mm512_loadu_si512(lo.add(32 * b) as *const _);
        let (sxv, off) = unit_terms::<Q41>(f, corr, u);
        for r in 0..R {
            let w0 = _mm512_maskz_loadu_epi8((1u64 << (n * bb)) - 1, p[r].add(b * bb) as *const _);
            let q = _mm512_permutexvar_epi16(pidx, w0);
            let q = _mm512_and_si512(_mm512_srlv_epi16(q, shift), nib);
            let t = _mm512_slli_epi32::<8>(_mm512_dpbusd_epi32(zero, q, hv));
            let t = _mm512_dpbusd_epi32(t, q, lv);
            let dm = _mm512_permutexvar_epi16(pdm, w0);
            if Q41 {
                scale_into(t, sxv, dm, &mut acc[r]);
                let m = _mm256_cvtph_ps(_mm512_extracti32x4_epi32::<2>(dm));
                accm[r] = _mm256_fmadd_ps(m, _mm512_castps512_ps256(off), accm[r]);
            } else {
                let t = _mm512_add_epi32(t, _mm512_castps_si512(off));
                scale_into(t, sxv, dm, &mut acc[r]);
            }
        }
        b += 2;
        u += 1;
    }
    for r in 0..R {
        out[r] = hsum512(acc[r]) + hsum256(accm[r]);
    }
}

/// Q8_0 rows, a pair of 34-byte blocks at a time. The pair spans 68 bytes: a zmm from its
/// start (A's quants and both `d`) and an xmm at its last 16 bytes, gathered by word permute
/// into `[A q0..31, B q0..31]`. With `X = 256 H + L`, `L` in 0..=255 (the unsigned operand)
/// and `H` signed: `sum w L` is one `vpdpbusd`; `sum w H` uses `w ^ 0x80 = w + 128` as the
/// unsigned operand, and the `128 sum H` this adds is taken off by starting that
/// accumulator at each lane's `-128 sum H` (from [`prepare`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn rows_q8<const R: usize>(
    p: [*const u8; R],
    nb: usize,
    pf: usize,
    aux: &super::Aux,
    out: &mut [f32; R],
) {
    const BB: usize = 34;
    let nbp = nb.next_multiple_of(2);
    let f = aux.f.as_ptr();
    let hi = aux.i.as_ptr();
    let lo = hi.add(32 * nbp);
    let corr = lo.add(32 * nbp);
    // A's quants are words 1-16 of the zmm, B's words 18-31 of it and then words 6-7 of the
    // xmm loaded at byte 52 (second source, indices 32+).
    let qidx = word_idx(|l| {
        let byte = (l / 16) * BB + 2 + 2 * (l % 16);
        if byte < 64 {
            byte / 2
        } else {
            32 + (byte - 52) / 2
        }
    });
    // Words 0-15: d of A for lanes 0-7, of B for lanes 8-15.
    let didx = word_idx(|l| (BB / 2) * ((l % 16) / 8));
    let sign = _mm512_set1_epi8(-128);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut b = 0;
    let mut u = 0;
    while b < nb {
        let two = b + 1 < nb;
        let hv = _mm512_loadu_si512(hi.add(32 * b) as *const _);
        let lv = _mm512_loadu_si512(lo.add(32 * b) as *const _);
        let sxv = _mm512_loadu_ps(f.add(UNIT_F * u));
        let init = _mm512_loadu_si512(corr.add(UNIT_I * u) as *const _);
        for r in 0..R {
            let pa = p[r].add(b * BB);
            prefetch_ahead(pa, pf);
            prefetch_ahead(pa.add(64), pf);
            let (w0, q) = if two {
                let w0 = _mm512_loadu_si512(pa as *const _);
                let w1 = _mm512_castsi128_si512(_mm_loadu_si128(pa.add(52) as *const _));
                (w0, _mm512_permutex2var_epi16(w0, qidx, w1))
            } else {
                // A lone last block: a masked load stays inside it; B's lanes meet the
                // zero H and L padding, and B's d reads as zero.
                let w0 = _mm512_maskz_loadu_epi8((1u64 << BB) - 1, pa as *const _);
                (w0, _mm512_permutex2var_epi16(w0, qidx, w0))
            };
            let t = _mm512_dpbusd_epi32(init, _mm512_xor_si512(q, sign), hv);
            let t = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(t), lv, q);
            scale_into(t, sxv, _mm512_permutexvar_epi16(didx, w0), &mut acc[r]);
        }
        b += 2;
        u += 1;
    }
    for r in 0..R {
        out[r] = hsum512(acc[r]);
    }
}

/// Fills the VNNI [`super::Aux`] for `x`. Per 32-block: the scale `s_b = max|x_b| / ACT_MAX`
/// and the integers `X = round(x / s_b)` (nearest-even), split `X = 256 H + L` into byte
/// planes (`i`: all H, then all L, each `32 * nb` rounded up to pairs; in a whole Q4 group
/// the 4 blocks' elements 0-15 come first, lane = block, then elements 16-31). Per unit:
/// `f` holds 16 lane scales `s_b` and (Q4_1) 16 lane shares of `s_b sum(X_b)`; Q4_0 and Q8_0
/// have 16 i32 lane offsets after the planes in `i` (`-8 sum X` resp. `-128 sum H` over the
/// lane's elements). A block holding NaN or ±inf gets a NaN scale and zero integers, so NaN
/// reaches the output.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn prepare(dtype: DType, x: &[f32], aux: &mut super::Aux) {
    let nb = x.len() / 32;
    let nbp = nb.next_multiple_of(2);
    let ng = groups(dtype, nb);
    let nu = units(dtype, nb);
    aux.f.clear();
    aux.f.resize(UNIT_F * nu, 0.0);
    aux.i.clear();
    aux.i.resize(64 * nbp + UNIT_I * nu, 0);
    let ip = aux.i.as_mut_ptr();
    let (hp, lp) = (ip, ip.add(32 * nbp));
    let cp = lp.add(32 * nbp) as *mut i32;
    let absmask = _mm512_set1_epi32(0x7FFF_FFFF);
    let inf = _mm512_set1_epi32(0x7F80_0000);
    let c128 = _mm512_set1_epi32(128);
    let m255 = _mm512_set1_epi32(0xFF);
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
        let (h0, h1, l0, l1) = if dtype == DType::Q8_0 {
            // Floor split: L in 0..=255 (the unsigned operand), H signed.
            let (h0, h1) = (_mm512_srai_epi32::<8>(q0), _mm512_srai_epi32::<8>(q1));
            (
                h0,
                h1,
                _mm512_and_si512(q0, m255),
                _mm512_and_si512(q1, m255),
            )
        } else {
            // Nearest split: H and L both signed bytes.
            let h0 = _mm512_srai_epi32::<8>(_mm512_add_epi32(q0, c128));
            let h1 = _mm512_srai_epi32::<8>(_mm512_add_epi32(q1, c128));
            let l0 = _mm512_sub_epi32(q0, _mm512_slli_epi32::<8>(h0));
            let l1 = _mm512_sub_epi32(q1, _mm512_slli_epi32::<8>(h1));
            (h0, h1, l0, l1)
        };
        // Where elements 0-15 and 16-31 go, and which unit lanes this block feeds.
        let grouped = b < 4 * ng;
        let (o0, o1, u, lane0, lanes) = if grouped {
            let (g, j) = (b / 4, b % 4);
            (128 * g + 16 * j, 128 * g + 64 + 16 * j, g, 4 * j, 4)
        } else {
            let u = ng + (b - 4 * ng) / 2;
            (32 * b, 32 * b + 16, u, 8 * ((b - 4 * ng) % 2), 8)
        };
        _mm_storeu_si128(hp.add(o0) as *mut __m128i, _mm512_cvtepi32_epi8(h0));
        _mm_storeu_si128(hp.add(o1) as *mut __m128i, _mm512_cvtepi32_epi8(h1));
        _mm_storeu_si128(lp.add(o0) as *mut __m128i, _mm512_cvtepi32_epi8(l0));
        _mm_storeu_si128(lp.add(o1) as *mut __m128i, _mm512_cvtepi32_epi8(l1));
        // Per-lane offsets: lane k of a group sums elements 4k..4k+3 and 16+4k..16+4k+3;
        // lane k of a pair block sums elements 4k..4k+3.
        let mut xs = [0i32; 32];
        let src = if dtype == DType::Q8_0 {
            (h0, h1)
        } else {
            (q0, q1)
        };
        _mm512_storeu_si512(xs.as_mut_ptr() as *mut _, src.0);
        _mm512_storeu_si512(xs.as_mut_ptr().add(16) as *mut _, src.1);
        let quad = |k: usize| xs[4 * k..4 * k + 4].iter().sum::<i32>();
        let fu = aux.f.as_mut_ptr().add(UNIT_F * u);
        for k in 0..lanes {
            let s = if grouped {
                quad(k) + quad(k + 4)
            } else {
                quad(k)
            };
            let l = lane0 + k;
            *fu.add(l) = scale;
            match dtype {
                DType::Q4_1 => {}
                DType::Q4_0 => *cp.add(16 * u + l) = -8 * s,
                _ => *cp.add(16 * u + l) = -128 * s,
            }
        }
        if dtype == DType::Q4_1 {
            *fu.add(20 + lane0 / lanes) = scale * (0..8).map(quad).sum::<i32>() as f32;
        }
    }
}
