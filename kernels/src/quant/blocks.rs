//! Reference decoding of GGML's 5-bit, IQ4 and K-quant blocks to f32, in the order and with
//! the rounding of ggml's `dequantize_row_*` and gguf-py's `gguf.quants.dequantize`: every
//! value is one f32 multiply of (scale products formed first) by the integer quant, then
//! one subtract where the type has a min. No fused multiply-adds, so SIMD decoders that
//! follow the same steps produce the same bits.

use super::f16_at;

/// IQ4_NL/IQ4_XS's non-linear 4-bit code book (ggml's `kvalues_iq4nl`).
pub(crate) const KVALUES_IQ4: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Q5_0 (22-byte blocks of 32): `(q5 - 16) * d`, the fifth bits in a little-endian u32.
pub(crate) fn q5_0(data: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(22)) {
        let d = f16_at(b);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        for j in 0..16 {
            let q = b[6 + j];
            let lo = (q & 0x0f) as i32 | ((((qh >> j) & 1) as i32) << 4);
            let hi = (q >> 4) as i32 | ((((qh >> (j + 16)) & 1) as i32) << 4);
            o[j] = d * (lo - 16) as f32;
            o[j + 16] = d * (hi - 16) as f32;
        }
    }
}

/// Q5_1 (24-byte blocks of 32): `q5 * d + m`.
pub(crate) fn q5_1(data: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(24)) {
        let (d, m) = (f16_at(b), f16_at(&b[2..]));
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        for j in 0..16 {
            let q = b[8 + j];
            let lo = (q & 0x0f) as u32 | (((qh >> j) & 1) << 4);
            let hi = (q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
            o[j] = d * lo as f32 + m;
            o[j + 16] = d * hi as f32 + m;
        }
    }
}

/// IQ4_NL (18-byte blocks of 32): `d * KVALUES[nibble]`, low nibbles first.
pub(crate) fn iq4_nl(data: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(18)) {
        let d = f16_at(b);
        for j in 0..16 {
            let q = b[2 + j];
            o[j] = d * KVALUES_IQ4[(q & 0x0f) as usize] as f32;
            o[j + 16] = d * KVALUES_IQ4[(q >> 4) as usize] as f32;
        }
    }
}

/// Scale and min of sub-block `j` (0..8) from Q4_K/Q5_K's 12 packed 6-bit fields
/// (ggml's `get_scale_min_k4`).
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q2_K (84-byte super-blocks): 16 sub-blocks of 16, `d*(sc&15) * q2 - dmin*(sc>>4)`.
pub(crate) fn q2_k(data: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(256).zip(data.chunks_exact(84)) {
        let (sc, qs) = (&b[..16], &b[16..80]);
        let (d, dmin) = (f16_at(&b[80..]), f16_at(&b[82..]));
        for n in 0..2 {
            for j in 0..4 {
                for h in 0..2 {
                    let s = sc[n * 8 + 2 * j + h];
                    let dl = d * (s & 0x0f) as f32;
                    let ml = dmin * (s >> 4) as f32;
                    for l in 0..16 {
                        let q = (qs[n * 32 + 16 * h + l] >> (2 * j)) & 3;
                        o[n * 128 + j * 32 + 16 * h + l] = dl * q as f32 - ml;
                    }
                }
            }
        }
    }
}

/// Q3_K's 16 six-bit scales, unpacked from their 12 bytes (minus the offset 32).
#[inline]
pub(crate) fn scales_q3_k(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let lo = (s[i % 8] >> (4 * (i / 8))) & 0x0f;
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (lo | (hi << 4)) as i8 - 32;
    }
    out
}

/// Q3_K (110-byte super-blocks): `d*(sc-32) * (q2 - 4*(1-hbit))`.
pub(crate) fn q3_k(data: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(256).zip(data.chunks_exact(110)) {
        let (hm, qs) = (&b[..32], &b[32..96]);
        let sc = scales_q3_k(&b[96..108]);
        let d = f16_at(&b[108..]);
        for n in 0..2 {
            for j in 0..4 {
                for h in 0..2 {
                    let dl = d * sc[n * 8 + 2 * j + h] as f32;
                    for l in 0..16 {
                        let i = 16 * h + l;
                        let q = ((qs[n * 32 + i] >> (2 * j)) & 3) as i32;
                        let high = (hm[i] >> (4 * n + j)) & 1;
                        let v = q - if high == 0 { 4 } else { 0 };
                        o[n * 128 + j * 32 + i] = dl * v as f32;
                    }
                }
            }
        }
    }
}

/// Q4_K (144-byte super-blocks): 4 chunks of 64, low nibbles then high nibbles of 32 bytes.
pub(crate) fn q4_k(data: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(256).zip(data.chunks_exact(144)) {
        let (d, dmin) = (f16_at(b), f16_at(&b[2..]));
        let (sc, qs) = (&b[4..16], &b[16..144]);
        for c in 0..4 {
            for h in 0..2 {
                let (s, m) = scale_min_k4(2 * c + h, sc);
                let (dl, ml) = (d * s as f32, dmin * m as f32);
                for l in 0..32 {
                    let q = (qs[c * 32 + l] >> (4 * h)) & 0x0f;
                    o[c * 64 + 32 * h + l] = dl * q as f32 - ml;
                }
            }
        }
    }
}

/// Q5_K (176-byte super-blocks): Q4_K plus a fifth bit per element from `qh`.
pub(crate) fn q5_k(data: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(256).zip(data.chunks_exact(176)) {
        let (d, dmin) = (f16_at(b), f16_at(&b[2..]));
        let (sc, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
        for c in 0..4 {
            for h in 0..2 {
                let (s, m) = scale_min_k4(2 * c + h, sc);
                let (dl, ml) = (d * s as f32, dmin * m as f32);
                for l in 0..32 {
                    let lo = (qs[c * 32 + l] >> (4 * h)) & 0x0f;
                    let hi = (qh[l] >> (2 * c + h)) & 1;
                    o[c * 64 + 32 * h + l] = dl * (lo | (hi << 4)) as f32 - ml;
                }
            }
        }
    }
}

/// Q6_K (210-byte super-blocks): two halves of 128, each from 64 `ql` and 32 `qh` bytes.
pub(crate) fn q6_k(data: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(256).zip(data.chunks_exact(210)) {
        let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
        let d = f16_at(&b[208..]);
        for n in 0..2 {
            for l in 0..32 {
                let h = qh[n * 32 + l];
                let (a, c) = (ql[n * 64 + l], ql[n * 64 + 32 + l]);
                let q = [
                    (a & 0x0f) | ((h & 3) << 4),
                    (c & 0x0f) | (((h >> 2) & 3) << 4),
                    (a >> 4) | (((h >> 4) & 3) << 4),
                    (c >> 4) | (((h >> 6) & 3) << 4),
                ];
                for (k, qk) in q.into_iter().enumerate() {
                    let s = sc[n * 8 + 2 * k + l / 16] as i8;
                    o[n * 128 + 32 * k + l] = (d * s as f32) * (qk as i32 - 32) as f32;
                }
            }
        }
    }
}

/// IQ4_XS (136-byte super-blocks): 8 sub-blocks of 32 with 6-bit scales, IQ4 code book.
pub(crate) fn iq4_xs(data: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(256).zip(data.chunks_exact(136)) {
        let d = f16_at(b);
        let sh = u16::from_le_bytes([b[2], b[3]]);
        let (sl, qs) = (&b[4..8], &b[8..136]);
        for ib in 0..8 {
            let ls = ((sl[ib / 2] >> (4 * (ib % 2))) & 0x0f) as i32
                | ((((sh >> (2 * ib)) & 3) as i32) << 4);
            let dl = d * (ls - 32) as f32;
            for j in 0..16 {
                let q = qs[ib * 16 + j];
                o[ib * 32 + j] = dl * KVALUES_IQ4[(q & 0x0f) as usize] as f32;
                o[ib * 32 + 16 + j] = dl * KVALUES_IQ4[(q >> 4) as usize] as f32;
            }
        }
    }
}
