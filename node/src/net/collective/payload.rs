//! The lossy allreduce payloads beyond f16: bf16, and `q8`, int8 blocks with one f16
//! scale per [`Q8_BLOCK`] elements (GGML's Q8_0 block, which distributed-llama's Q80
//! sync also sends): 34 bytes per 32 values, 3.76× smaller than f32.
//!
//! Both are *idempotent*: encoding values that were already rounded (decoded) gives the
//! same bytes again, so a rank that rounds its own partial and a rank that decodes it
//! hold the same bits, which is what makes every algorithm's result identical on every
//! rank. For q8 this holds because the scale is an f16 `d` and the largest element
//! decodes to exactly `±127·d`, whose scale is `d` again.

use half::{bf16, f16};

use crate::net::error::NetError;

/// Elements per q8 block. A message's blocks start at its first element; schedules
/// start every message on a multiple of this (`tpi_algo::CHUNK_ALIGN`), so a chunk's
/// blocks are the whole vector's blocks.
pub const Q8_BLOCK: usize = tpi_algo::CHUNK_ALIGN;

/// The largest magnitude a q8 block can carry: 127 times the largest finite f16.
pub const Q8_MAX: f32 = 127.0 * 65504.0;

/// Bytes of `n` elements as q8: 34 per whole block, and `2 + r` for a last block of `r`.
pub fn q8_len(n: usize) -> usize {
    let (whole, rest) = (n / Q8_BLOCK, n % Q8_BLOCK);
    whole * (2 + Q8_BLOCK) + if rest > 0 { 2 + rest } else { 0 }
}

/// The scale of one block: `d = absmax / 127` as f16 (what goes on the wire) and the
/// f32 multiplier that quantises, `1 / d` in f32 (GGML's arithmetic: round half away
/// from zero of `x · (1/d)`). Refuses non-finite values and magnitudes above [`Q8_MAX`]
/// with a clear error rather than sending garbage.
fn scale(block: &[f32]) -> Result<(f16, f32), NetError> {
    let mut amax = 0f32;
    for &v in block {
        if !v.is_finite() {
            return Err(NetError::Codec(format!(
                "a q8 allreduce payload holds {v}; q8 carries finite values only (use --allreduce-dtype f32)"
            )));
        }
        amax = amax.max(v.abs());
    }
    if amax > Q8_MAX {
        return Err(NetError::Codec(format!(
            "a q8 allreduce payload holds |x| = {amax:e}, beyond q8's ±{Q8_MAX:e} (use --allreduce-dtype f32)"
        )));
    }
    let d = amax / 127.0;
    let d16 = f16::from_f32(d);
    // A scale below f16's range decodes the whole block to zero; the quanta are zero
    // too, so that encoding the decoded block gives the same bytes.
    let id = if d16.to_f32() == 0.0 { 0.0 } else { 1.0 / d };
    Ok((d16, id))
}

fn quant(v: f32, id: f32) -> i8 {
    (v * id).round().clamp(-127.0, 127.0) as i8
}

/// Appends `src` as q8 blocks to `dst`.
pub fn q8_encode(dst: &mut Vec<u8>, src: &[f32]) -> Result<(), NetError> {
    dst.reserve(q8_len(src.len()));
    for block in src.chunks(Q8_BLOCK) {
        let (d, id) = scale(block)?;
        dst.extend_from_slice(&d.to_bits().to_le_bytes());
        dst.extend(block.iter().map(|&v| quant(v, id) as u8));
    }
    Ok(())
}

/// Calls `f(i, value)` for every element `i` of `n` q8-encoded ones in `src`.
fn q8_each(src: &[u8], n: usize, mut f: impl FnMut(usize, f32)) -> Result<(), NetError> {
    if src.len() != q8_len(n) {
        return Err(NetError::Codec(format!(
            "q8 payload of {} bytes, expected {} for {n} elements",
            src.len(),
            q8_len(n)
        )));
    }
    for (b, block) in src.chunks(2 + Q8_BLOCK).enumerate() {
        let d = f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32();
        for (j, &q) in block[2..].iter().enumerate() {
            f(b * Q8_BLOCK + j, q as i8 as f32 * d);
        }
    }
    Ok(())
}

/// Decodes q8 bytes into `dst` (`src` holds exactly `dst.len()` elements).
pub fn q8_decode(src: &[u8], dst: &mut [f32]) -> Result<(), NetError> {
    q8_each(src, dst.len(), |i, v| dst[i] = v)
}

/// Adds q8 bytes element-wise into `acc`.
pub fn q8_add(src: &[u8], acc: &mut [f32]) -> Result<(), NetError> {
    q8_each(src, acc.len(), |i, v| acc[i] += v)
}

/// Rounds `x` in place to what its q8 encoding decodes to.
pub fn q8_round(x: &mut [f32]) -> Result<(), NetError> {
    for block in x.chunks_mut(Q8_BLOCK) {
        let (d, id) = scale(block)?;
        let d = d.to_f32();
        for v in block.iter_mut() {
            *v = quant(*v, id) as f32 * d;
        }
    }
    Ok(())
}

/// Appends `src` rounded to bf16 (round to nearest even) as little-endian bytes.
pub fn bf16_encode(dst: &mut Vec<u8>, src: &[f32]) {
    dst.reserve(2 * src.len());
    for &v in src {
        dst.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
    }
}

fn bf16_each(src: &[u8], n: usize, mut f: impl FnMut(usize, f32)) -> Result<(), NetError> {
    if src.len() != 2 * n {
        return Err(NetError::Codec(format!(
            "bf16 payload of {} bytes, expected {} for {n} elements",
            src.len(),
            2 * n
        )));
    }
    for (i, c) in src.chunks_exact(2).enumerate() {
        f(
            i,
            bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
        );
    }
    Ok(())
}

/// Decodes little-endian bf16 bytes into `dst`.
pub fn bf16_decode(src: &[u8], dst: &mut [f32]) -> Result<(), NetError> {
    bf16_each(src, dst.len(), |i, v| dst[i] = v)
}

/// Adds little-endian bf16 bytes element-wise into `acc`.
pub fn bf16_add(src: &[u8], acc: &mut [f32]) -> Result<(), NetError> {
    bf16_each(src, acc.len(), |i, v| acc[i] += v)
}

/// Rounds `x` in place to the nearest bf16 values.
pub fn bf16_round(x: &mut [f32]) {
    for v in x {
        *v = bf16::from_f32(*v).to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let u = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                // Mixed magnitudes, exact zeros and a block of tiny values.
                match i % 97 {
                    0 => 0.0,
                    1..=3 => u * 1e-9,
                    _ => u * (1 + (i % 7) * 40) as f32,
                }
            })
            .collect()
    }

    /// GGML's `quantize_row_q8_0_ref` written out for one block, as the reference.
    fn ggml_q8_0(block: &[f32]) -> (u16, Vec<i8>) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = block.iter().map(|&v| (v * id).round() as i8).collect();
        (f16::from_f32(d).to_bits(), q)
    }

    #[test]
    fn q8_matches_ggml_layout_and_is_idempotent() {
        for n in [0, 1, 31, 32, 33, 64, 100, 576, 2048 + 7] {
            let v = values(n, n as u32 + 3);
            let mut enc = Vec::new();
            q8_encode(&mut enc, &v).unwrap();
            assert_eq!(enc.len(), q8_len(n));
            for (b, block) in v.chunks(Q8_BLOCK).enumerate() {
                let (d, q) = ggml_q8_0(block);
                let at = b * (2 + Q8_BLOCK);
                assert_eq!(u16::from_le_bytes([enc[at], enc[at + 1]]), d);
                let got: Vec<i8> = enc[at + 2..at + 2 + block.len()]
                    .iter()
                    .map(|&c| c as i8)
                    .collect();
                assert_eq!(got, q, "n {n} block {b}");
            }
            let mut back = vec![f32::NAN; n];
            q8_decode(&enc, &mut back).unwrap();
            let mut rounded = v.clone();
            q8_round(&mut rounded).unwrap();
            assert_eq!(
                back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                rounded.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            // Encoding the decoded values again gives the same bytes.
            let mut again = Vec::new();
            q8_encode(&mut again, &back).unwrap();
            assert_eq!(again, enc, "n {n}");
            // Error bound: half a step, plus the f16 rounding of the scale (≤ 2^-11
            // relative) times the largest quantum.
            for (block, got) in v.chunks(Q8_BLOCK).zip(back.chunks(Q8_BLOCK)) {
                let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (a, b) in block.iter().zip(got) {
                    assert!((a - b).abs() <= amax / 127.0 * (0.5 + 127.0 / 2048.0) + 1e-30);
                }
            }
            let mut acc = vec![1.0f32; n];
            q8_add(&enc, &mut acc).unwrap();
            for (a, r) in acc.iter().zip(&rounded) {
                assert_eq!(*a, 1.0 + r);
            }
        }
    }

    #[test]
    fn q8_tiny_blocks_decode_to_zero_stably() {
        let v = [1e-9f32; 40];
        let mut enc = Vec::new();
        q8_encode(&mut enc, &v).unwrap();
        let mut back = [1.0f32; 40];
        q8_decode(&enc, &mut back).unwrap();
        assert!(back.iter().all(|&x| x == 0.0));
        let mut again = Vec::new();
        q8_encode(&mut again, &back).unwrap();
        assert_eq!(again, enc);
    }

    #[test]
    fn q8_refuses_what_it_cannot_carry() {
        let mut out = Vec::new();
        for bad in [f32::NAN, f32::INFINITY, 1e7] {
            let e = q8_encode(&mut out, &[1.0, bad]).unwrap_err().to_string();
            assert!(e.contains("q8") && e.contains("f32"), "{e}");
            assert!(q8_round(&mut [bad]).is_err());
        }
        assert!(q8_decode(&[0; 5], &mut [0.0; 4]).is_err());
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_is_idempotent() {
        let v = values(300, 9);
        let mut enc = Vec::new();
        bf16_encode(&mut enc, &v);
        let mut back = vec![0.0; v.len()];
        bf16_decode(&enc, &mut back).unwrap();
        let mut rounded = v.clone();
        bf16_round(&mut rounded);
        assert_eq!(back, rounded);
        for (a, b) in v.iter().zip(&back) {
            // bf16 keeps 8 significant bits: relative error at most 2^-8.
            assert!((a - b).abs() <= a.abs() * (1.0 / 256.0));
        }
        // Ties go to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7.
        let mut t = [1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0];
        bf16_round(&mut t);
        assert_eq!(t, [1.0, 1.0 + 4.0 / 256.0]);
        let mut again = Vec::new();
        bf16_encode(&mut again, &back);
        assert_eq!(again, enc);
        assert!(bf16_decode(&enc[1..], &mut back).is_err());
    }
}
