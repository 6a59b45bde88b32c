//! AVX2 decoders of Q4_K, Q5_K and Q6_K rows to f32 (the prefill GEMM's panels), bit for
//! bit the reference decoders of `quant::blocks`: the same products, formed in the same
//! order, with separate multiplies and subtracts (no FMA).

use std::arch::x86_64::*;

use crate::quant::scale_min_k4;
use crate::DType;

/// Decodes `out.len()` elements (whole 256-blocks) of a Q4_K, Q5_K or Q6_K row.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `data` must hold the row's blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn decode(dtype: DType, data: &[u8], out: &mut [f32]) {
    let nsb = out.len() / 256;
    let bb = dtype.block_bytes();
    for (b, o) in out.chunks_exact_mut(256).enumerate().take(nsb) {
        let blk = &data[b * bb..(b + 1) * bb];
        match dtype {
            DType::Q6K => q6_k(blk, o.as_mut_ptr()),
            _ => q45_k(dtype == DType::Q5K, blk, o.as_mut_ptr()),
        }
    }
}

/// Eight bytes at `p`, zero-extended to i32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bytes8(p: *const u8) -> __m256i {
    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const _))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q45_k(q5: bool, b: &[u8], o: *mut f32) {
    let d = crate::quant::f16_at(b);
    let dmin = crate::quant::f16_at(&b[2..]);
    let (qh, qs) = if q5 {
        (&b[16..48], &b[48..176])
    } else {
        (&b[..0], &b[16..144])
    };
    let m4 = _mm256_set1_epi32(0x0f);
    let one = _mm256_set1_epi32(1);
    for c in 0..4 {
        for h in 0..2 {
            let (s, m) = scale_min_k4(2 * c + h, &b[4..16]);
            let (dl, ml) = (
                _mm256_set1_ps(d * s as f32),
                _mm256_set1_ps(dmin * m as f32),
            );
            for j in 0..4 {
                let raw = bytes8(qs.as_ptr().add(32 * c + 8 * j));
                let mut q =
                    _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_set1_epi32(4 * h as i32)), m4);
                if q5 {
                    let hb = _mm256_srlv_epi32(
                        bytes8(qh.as_ptr().add(8 * j)),
                        _mm256_set1_epi32((2 * c + h) as i32),
                    );
                    q = _mm256_or_si256(q, _mm256_slli_epi32::<4>(_mm256_and_si256(hb, one)));
                }
                let v = _mm256_sub_ps(_mm256_mul_ps(dl, _mm256_cvtepi32_ps(q)), ml);
                _mm256_storeu_ps(o.add(64 * c + 32 * h + 8 * j), v);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q6_k(b: &[u8], o: *mut f32) {
    let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
    let d = crate::quant::f16_at(&b[208..]);
    let m4 = _mm256_set1_epi32(0x0f);
    let m2 = _mm256_set1_epi32(3);
    let c32 = _mm256_set1_epi32(32);
    for n in 0..2 {
        for k in 0..4 {
            // Group k of half n: low (k < 2) or high nibbles of ql[64n + 32(k % 2)..], and
            // bits 2k, 2k+1 of qh[32n..].
            let (qoff, qsh) = (64 * n + 32 * (k % 2), 4 * (k / 2) as i32);
            for j in 0..4 {
                let l = 8 * j;
                let lo = _mm256_and_si256(
                    _mm256_srlv_epi32(bytes8(ql.as_ptr().add(qoff + l)), _mm256_set1_epi32(qsh)),
                    m4,
                );
                let hi = _mm256_and_si256(
                    _mm256_srlv_epi32(
                        bytes8(qh.as_ptr().add(32 * n + l)),
                        _mm256_set1_epi32(2 * k as i32),
                    ),
                    m2,
                );
                let q = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32::<4>(hi)), c32);
                let s = sc[8 * n + 2 * k + l / 16] as i8;
                let v = _mm256_mul_ps(_mm256_set1_ps(d * s as f32), _mm256_cvtepi32_ps(q));
                _mm256_storeu_ps(o.add(128 * n + 32 * k + l), v);
            }
        }
    }
}
