//! AVX-512 VNNI GEMV rows for Q4_0, Q4_1 and Q8_0 weights: integer dot products against the
//! 15-bit integer activations that [`prepare`] makes (`X = round(x / s_b)` per 32-block).
//!
//! `X = 256 H + L` meets the weight bytes in two `vpdpbusd` per weight vector. The kernels
//! work in *units* of blocks whose integer lane sums are scaled together:
//! - a Q4_0 *octet* of 8 blocks: two gathered zmm of quants, two lanes per block, so the
//!   conversion and scaling of the lane sums is paid once per 256 weights;
//! - a Q4 *group* of 4 blocks (one zmm of quants, four lanes per block): all of a Q4_1 row,
//!   and what is left of a Q4_0 row after its octets;
//! - a *pair* of blocks (Q8_0, and the last 1-3 Q4 blocks of a row).
//!
//! Each lane's integer sum is scaled by its block's `s_b` and `d_b`; the `d`/`m` words come
//! from the loaded weight vectors by a word permute. The offset terms (Q4_0 `-8 sum X`, Q8_0's
//! sign bias, Q4_1 `m_b sum(x̂_b)`) use sums of the same quantised x, so a row is exactly
//! `dot(w, x̂)`.
//!
//! Over 600 lines on purpose: the three types' row kernels share the unit helpers above,
//! which are `unsafe` and `#[target_feature]`-bound; one file keeps them private.

use std::arch::x86_64::*;

use super::avx512::{hsum256, hsum512, prefetch_ahead};

use crate::layout::{groups, octets};
use crate::{DType, Layout, MatRef};

/// Floats per unit in [`super::Aux::f`]: the activation scale `s_b` of each lane's block,
/// then (Q4_1) `s_b * sum(X_b)` of each of the unit's blocks, for the `m` term.
const UNIT_F: usize = 32;

/// Bytes per unit of per-lane integer offsets (Q4_0, Q8_0) after the H and L planes.
const UNIT_I: usize = 64;

/// Number of units (octets, groups, then pairs) in a row of `nb` blocks.
fn units(dtype: DType, nb: usize) -> usize {
    let (o, g) = (octets(dtype, nb), groups(dtype, nb));
    o + g + (nb - 8 * o - 4 * g).div_ceil(2)
}

/// Q4_0 octet bytes that its two zmm loads (at 0 and 64) cover; the rest of its 144 bytes
/// comes by masked loads.
const OCTET_SPAN: usize = 128;

/// Q4_0 block bytes.
const Q40_BYTES: usize = 18;

/// Octet gathers: the low-element quants (bytes 0-7 of each block), the high ones (8-15),
/// and the scale words.
const QUANTS_0: u8 = 0;
const QUANTS_8: u8 = 1;
const SCALES: u8 = 2;

/// The octet byte that word `w` of gather `part` reads (`None`: don't care). Quants: lane
/// `2k + j` holds quant bytes `8 part + 4j..+4` of block k. Scales: words `2k` and `2k + 1`
/// are both block k's `d`.
const fn octet_word(part: u8, w: usize) -> Option<usize> {
    if part == SCALES {
        return if w < 16 {
            Some(Q40_BYTES * (w / 2))
        } else {
            None
        };
    }
    Some(Q40_BYTES * (w / 4) + 2 + 8 * part as usize + 4 * ((w / 2) % 2) + 2 * (w % 2))
}

/// The words of gather `part` beyond [`OCTET_SPAN`] as up to two masked loads: (byte mask,
/// offset from the octet start of the load whose byte 0 lands in register byte 0).
const fn octet_spills(part: u8) -> [(u64, usize); 2] {
    let mut spill = [(0u64, 0usize); 2];
    let mut n = 0;
    let mut w = 0;
    while w < 32 {
        if let Some(b) = octet_word(part, w) {
            if b + 2 > OCTET_SPAN {
                let off = b - 2 * w;
                if n == 0 || spill[n - 1].1 != off {
                    assert!(n < 2, "an octet gather needs at most two masked loads");
                    n += 1;
                }
                spill[n - 1].0 |= 3 << (2 * w);
                spill[n - 1].1 = off;
            }
        }
        w += 1;
    }
    spill
}

/// The permute index of gather `part` into its octet's two zmm loads.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn octet_idx(part: u8) -> __m512i {
    word_idx(|w| match octet_word(part, w) {
        Some(b) if b + 2 <= 64 => b / 2,
        Some(b) if b + 2 <= OCTET_SPAN => 32 + (b - 64) / 2,
        _ => 0,
    })
}

/// Gather `PART` of the octet at `pa`, whose two zmm loads are `s`. Masks and offsets are
/// constants, so the masked loads fold into addressing modes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn octet_gather<const PART: u8>(idx: __m512i, s: [__m512i; 2], pa: *const u8) -> __m512i {
    let mut v = _mm512_permutex2var_epi16(s[0], idx, s[1]);
    for (mask, off) in const { octet_spills(PART) } {
        if mask != 0 {
            v = _mm512_mask_loadu_epi8(v, mask, pa.add(off) as *const _);
        }
    }
    v
}

/// Q4_0 octets `0..no` of `R` rows into `acc`, from [`prepare`]'s scales `f`, planes `hi`
/// and `lo` and lane offsets `corr`. Lane `2k + j` of the first gathered vector
/// holds quant bytes `4j..4j+3` of block k (elements `4j..` and `16+4j..`), of the second
/// quant bytes `8+4j..8+4j+3` (elements `8+4j..` and `24+4j..`), which is how [`prepare`]
/// lays out an octet's activations; the `d` words come spread two per block.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn octets_q4_0<const R: usize, const PACKED: bool>(
    p: [*const u8; R],
    no: usize,
    pf: usize,
    (f, hi, lo, corr): (*const f32, *const u8, *const u8, *const u8),
    acc: &mut [__m512; R],
) {
    let nib = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    let (i0, i8, isc) = (octet_idx(QUANTS_0), octet_idx(QUANTS_8), octet_idx(SCALES));
    // Packed `d` words 0-7 doubled (words 2k, 2k+1 = block k's), in each 128-bit lane of a
    // broadcast of the eight.
    let dspread = {
        let b: [u8; 32] =
            std::array::from_fn(|i| (2 * ((i % 16) / 4 + 4 * (i / 16)) + i % 2) as u8);
        _mm256_loadu_si256(b.as_ptr() as *const _)
    };
    for o in 0..no {
        let b = 8 * o;
        let (hp, lp) = (hi.add(32 * b), lo.add(32 * b));
        let hv: [__m512i; 4] =
            std::array::from_fn(|k| _mm512_loadu_si512(hp.add(64 * k) as *const _));
        let lv: [__m512i; 4] =
            std::array::from_fn(|k| _mm512_loadu_si512(lp.add(64 * k) as *const _));
        let sxv = _mm512_loadu_ps(f.add(UNIT_F * o));
        let off = _mm512_loadu_si512(corr.add(UNIT_I * o) as *const _);
        for r in 0..R {
            let pa = p[r].add(b * Q40_BYTES);
            // Five prefetches per 144 bytes: most lines are asked for twice, which helps
            // when a first request is dropped (as with the 16-bit float rows).
            for k in 0..5 {
                prefetch_ahead(pa.add(32 * k), pf);
            }
            let s = [0, 64].map(|o| _mm512_loadu_si512(pa.add(o) as *const _));
            let (v1, v2) = if PACKED {
                (s[0], s[1])
            } else {
                (
                    octet_gather::<QUANTS_0>(i0, s, pa),
                    octet_gather::<QUANTS_8>(i8, s, pa),
                )
            };
            let q = [
                _mm512_and_si512(v1, nib),
                _mm512_and_si512(_mm512_srli_epi16::<4>(v1), nib),
                _mm512_and_si512(v2, nib),
                _mm512_and_si512(_mm512_srli_epi16::<4>(v2), nib),
            ];
            // Two chains of 4 (shorter latency than one of 8): the low one starts at the
            // exact -8 sum(X) of Q4_0's q - 8, so combining them is the offset add too.
            let (mut th, mut tl) = (zero, off);
            for k in 0..4 {
                th = _mm512_dpbusd_epi32(th, q[k], hv[k]);
                tl = _mm512_dpbusd_epi32(tl, q[k], lv[k]);
            }
            let t = _mm512_add_epi32(_mm512_slli_epi32::<8>(th), tl);
            let dw = if PACKED {
                let dh = _mm256_broadcastsi128_si256(_mm_loadu_si128(pa.add(128) as *const _));
                _mm256_shuffle_epi8(dh, dspread)
            } else {
                _mm512_castsi512_si256(octet_gather::<SCALES>(isc, s, pa))
            };
            let d = _mm512_cvtph_ps(dw);
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(t), sxv), d, acc[r]);
        }
    }
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
        |p, pf, out| rows::<4>(w.dtype, w.layout, p, nb, pf, aux, out),
        |p, pf, out| rows::<1>(w.dtype, w.layout, p, nb, pf, aux, out),
    );
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn rows<const R: usize>(
    dtype: DType,
    layout: Layout,
    p: [*const u8; R],
    nb: usize,
    pf: usize,
    aux: &super::Aux,
    out: &mut [f32; R],
) {
    let packed = layout == Layout::Packed;
    match (dtype, packed) {
        (DType::Q4_0, false) => rows_q4::<R, false, false>(p, nb, pf, aux, out),
        (DType::Q4_1, false) => rows_q4::<R, true, false>(p, nb, pf, aux, out),
        (DType::Q4_0, true) => rows_q4::<R, false, true>(p, nb, pf, aux, out),
        (DType::Q4_1, true) => rows_q4::<R, true, true>(p, nb, pf, aux, out),
        (DType::Q8_0, _) => rows_q8::<R>(p, nb, pf, aux, out),
        _ => unreachable!("the VNNI path only serves quantised weights"),
    }
}

/// The integer lane sums of one Q4 group: quant bytes `q` split into low and high nibbles,
/// against the unit's activation planes `[H low, H high, L low, L high]`, as `256 H + L`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn dots(q: __m512i, nib: __m512i, zero: __m512i, x: [__m512i; 4]) -> __m512i {
    let qlo = _mm512_and_si512(q, nib);
    let qhi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), nib);
    let t = _mm512_dpbusd_epi32(zero, qlo, x[0]);
    let t = _mm512_slli_epi32::<8>(_mm512_dpbusd_epi32(t, qhi, x[1]));
    _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(t, qlo, x[2]), qhi, x[3])
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

/// Q4 rows: Q4_0 octets (see [`octets_q4_0`]), then whole groups of 4 blocks A-D: lane
/// `4j + k` of the gathered quants holds bytes `4k..4k+3` of block j, so its low nibbles are
/// elements `4k..4k+3` and its high nibbles `16+4k..16+4k+3`, which is how [`prepare`] lays
/// out the group's activations. The last
/// 1-3 blocks go in pairs: A's 16 quant bytes in 128-bit lanes 0-1, B's in 2-3, a per-lane
/// word shift (0 or 4) leaves elements 0-15 / 16-31 of each block in natural order.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn rows_q4<const R: usize, const Q41: bool, const PACKED: bool>(
    p: [*const u8; R],
    nb: usize,
    pf: usize,
    aux: &super::Aux,
    out: &mut [f32; R],
) {
    let bb = if Q41 { 20 } else { 18 };
    let qoff = if Q41 { 4 } else { 2 };
    let dtype = if Q41 { DType::Q4_1 } else { DType::Q4_0 };
    let (no, ng) = (octets(dtype, nb), groups(dtype, nb));
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
    // Packed `d` words: a byte shuffle (in each 128-bit lane of a broadcast of the four)
    // putting block k's in words 4k..4k+3.
    let pspread = {
        let b: [u8; 32] = std::array::from_fn(|i| (2 * (i / 8) + i % 2) as u8);
        _mm256_loadu_si256(b.as_ptr() as *const _)
    };
    let mut acc = [_mm512_setzero_ps(); R];
    let mut accm = [_mm256_setzero_ps(); R];
    if !Q41 {
        octets_q4_0::<R, PACKED>(p, no, pf, (f, hi, lo, corr), &mut acc);
    }
    for g in 0..ng {
        let b = 8 * no + 4 * g;
        let h0 = _mm512_loadu_si512(hi.add(32 * b) as *const _);
        let h1 = _mm512_loadu_si512(hi.add(32 * b + 64) as *const _);
        let l0 = _mm512_loadu_si512(lo.add(32 * b) as *const _);
        let l1 = _mm512_loadu_si512(lo.add(32 * b + 64) as *const _);
        let (sxv, off) = unit_terms::<Q41>(f, corr, no + g);
        for r in 0..R {
            let pa = p[r].add(b * bb);
            prefetch_ahead(pa, pf);
            prefetch_ahead(pa.add(64), pf);
            if PACKED {
                // The quants in lane order, then the 4 `d` words (spread to 4 lanes per block
                // by an in-lane byte shuffle of a broadcast load) and Q4_1's 4 `m` words:
                // the same values as the gathers below, so the same sums.
                let q = _mm512_loadu_si512(pa as *const _);
                let t = dots(q, nib, zero, [h0, h1, l0, l1]);
                let hdr = pa.add(64);
                let dh = _mm256_set1_epi64x((hdr as *const i64).read_unaligned());
                let d = _mm512_cvtph_ps(_mm256_shuffle_epi8(dh, pspread));
                let t = if Q41 {
                    let dm = _mm256_cvtph_ps(_mm_loadu_si128(hdr as *const _));
                    accm[r] = _mm256_fmadd_ps(dm, _mm512_castps512_ps256(off), accm[r]);
                    t
                } else {
                    _mm512_add_epi32(t, _mm512_castps_si512(off))
                };
                acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(t), sxv), d, acc[r]);
                continue;
            }
            let w0 = _mm512_loadu_si512(pa as *const _);
            let w1 = _mm512_castsi128_si512(_mm_loadu_si128(pa.add(4 * bb - 16) as *const _));
            let q = _mm512_permutex2var_epi16(w0, gidx, w1);
            let t = dots(q, nib, zero, [h0, h1, l0, l1]);
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
    let (mut b, mut u) = (8 * no + 4 * ng, no + ng);
    while b < nb {
        let n = (nb - b).min(2);
        let hv = _mm512_loadu_si512(hi.add(32 * b) as *const _);
        let lv = _mm512_loadu_si512(lo.add(32 * b) as *const _);
        let (sxv, off) = unit_terms::<Q41>(f, corr, u);
        for r in 0..R {
            // A row's tail needs its own prefetch when the units before it stop short of it:
            // Q4_1 octets, which leave the last 40 bytes of a 576-column row, decoded SmolLM2
            // a sixth slower without it.
            prefetch_ahead(p[r].add(b * bb), pf);
            prefetch_ahead(p[r].add(b * bb + 32), pf);
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

/// The kinds of unit a block can belong to (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    Octet,
    Group,
    Pair,
}

/// Fills the VNNI [`super::Aux`] for `x`. Per 32-block: the scale `s_b = max|x_b| / ACT_MAX`
/// and the integers `X = round(x / s_b)` (nearest-even), split `X = 256 H + L` into byte
/// planes (`i`: all H, then all L, each `32 * nb` rounded up to pairs; a unit's blocks in
/// the order its kernel's lanes read them, see [`octets_q4_0`] and `rows_q4`). Per unit:
/// `f` holds 16 lane scales `s_b` and (Q4_1) 16 lane shares of `s_b sum(X_b)`; Q4_0 and Q8_0
/// have 16 i32 lane offsets after the planes in `i` (`-8 sum X` resp. `-128 sum H` over the
/// lane's elements). A block holding NaN or ±inf gets a NaN scale and zero integers, so NaN
/// reaches the output.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn prepare(dtype: DType, x: &[f32], aux: &mut super::Aux) {
    let nb = x.len() / 32;
    let nbp = nb.next_multiple_of(2);
    let (no, ng) = (octets(dtype, nb), groups(dtype, nb));
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
        // Which unit lanes this block feeds, and where its elements go (see `rows_q4`): the
        // planes hold 32 bytes per block, a unit's blocks in a layout of its own.
        let (c0, c1) = (_mm512_cvtepi32_epi8(h0), _mm512_cvtepi32_epi8(h1));
        let (c2, c3) = (_mm512_cvtepi32_epi8(l0), _mm512_cvtepi32_epi8(l1));
        let (o8, g4) = (8 * no, 8 * no + 4 * ng);
        let (kind, u, lane0) = if b < o8 {
            (Unit::Octet, b / 8, 2 * (b % 8))
        } else if b < g4 {
            (Unit::Group, no + (b - o8) / 4, 4 * ((b - o8) % 4))
        } else {
            (Unit::Pair, no + ng + (b - g4) / 2, 8 * ((b - g4) % 2))
        };
        // Where the first and last 8 of elements 0-15 (half 0) and 16-31 (half 1) go: an
        // octet spreads them over its four 64-byte planes at 8k (elements 0-7, 16-23, 8-15,
        // 24-31); a group and a pair keep each half's 16 bytes together.
        let dest = |half: usize| match kind {
            Unit::Octet => {
                let at = 32 * (b - b % 8) + 8 * (b % 8) + 64 * half;
                (at, at + 128)
            }
            Unit::Group => {
                let j = (b - o8) % 4;
                let at = 32 * (b - j) + 64 * half + 16 * j;
                (at, at + 8)
            }
            Unit::Pair => (32 * b + 16 * half, 32 * b + 16 * half + 8),
        };
        for (plane, half, v) in [(hp, 0, c0), (hp, 1, c1), (lp, 0, c2), (lp, 1, c3)] {
            let (first, last) = dest(half);
            _mm_storel_epi64(plane.add(first) as *mut __m128i, v);
            _mm_storel_epi64(plane.add(last) as *mut __m128i, _mm_unpackhi_epi64(v, v));
        }
        // Per-lane offsets: lane j of an octet block sums elements 4j..4j+3 + {0, 8, 16, 24};
        // lane k of a group sums elements 4k..4k+3 and 16+4k..16+4k+3; lane k of a pair
        // block sums elements 4k..4k+3.
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
        let lanes = match kind {
            Unit::Octet => 2,
            Unit::Group => 4,
            Unit::Pair => 8,
        };
        for k in 0..lanes {
            let s = match kind {
                Unit::Octet => quad(k) + quad(k + 2) + quad(k + 4) + quad(k + 6),
                Unit::Group => quad(k) + quad(k + 4),
                Unit::Pair => quad(k),
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
            // A group's and pair's m words meet a ymm at 4 (Q4_1 has no octets).
            *fu.add(20 + lane0 / lanes) = scale * (0..8).map(quad).sum::<i32>() as f32;
        }
    }
}
