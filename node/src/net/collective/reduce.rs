//! The arithmetic of a reduction: the wire element type, rank-order sums, and the
//! encoding of partials and results as tensor frames. Sums are always taken in f32 and
//! in rank order, never in arrival order, so results are functions of the inputs alone;
//! [`star_reference`] and [`tree_reference`] state what each schedule computes.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use half::f16;

use super::tree_children;
use crate::net::error::NetError;
use crate::net::frame::{fill_prefix, FrameKind, FRAME_HEADER_LEN};
use crate::net::wire::{
    add_f16_le, add_f32_le, extend_f16_le, extend_f32_le, f16_le_to_f32, f32_from_le_bytes,
    round_to_f16,
};

/// Element type on the wire. Summation is always in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum WireDType {
    /// 4 bytes per element, exact.
    F32,
    /// 2 bytes per element: partials and results are rounded to f16; every rank ends
    /// with the f16-rounded result (as f32 values).
    F16,
}

impl WireDType {
    /// Bytes per element on the wire.
    pub fn bytes(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::F16 => 2,
        }
    }
}

impl fmt::Display for WireDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireDType::F32 => "f32",
            WireDType::F16 => "f16",
        })
    }
}

impl FromStr for WireDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(WireDType::F32),
            "f16" => Ok(WireDType::F16),
            _ => Err(format!("unknown wire dtype {s:?} (expected f32 or f16)")),
        }
    }
}

/// `out = parts[0] + parts[1] + …`, added strictly left to right (`((p0 + p1) + p2) …`).
pub fn sum_rank_order(parts: &[&[f32]], out: &mut [f32]) {
    out.fill(0.0);
    if let Some(first) = parts.first() {
        out.copy_from_slice(first);
    }
    for p in parts.iter().skip(1) {
        for (o, v) in out.iter_mut().zip(p.iter()) {
            *o += v;
        }
    }
}

pub(crate) fn quantize(v: &mut [f32], dtype: WireDType) {
    if dtype == WireDType::F16 {
        round_to_f16(v, &mut Vec::new());
    }
}

/// What a star allreduce of `parts` (indexed by rank) yields on every rank: the rank-order
/// sum of the (f16-rounded, for F16) partials, rounded to f16 for F16.
pub fn star_reference(parts: &[Vec<f32>], dtype: WireDType) -> Vec<f32> {
    let q: Vec<Vec<f32>> = parts
        .iter()
        .map(|p| {
            let mut p = p.clone();
            quantize(&mut p, dtype);
            p
        })
        .collect();
    let refs: Vec<&[f32]> = q.iter().map(|v| v.as_slice()).collect();
    let mut out = vec![0.0; parts.first().map_or(0, |p| p.len())];
    sum_rank_order(&refs, &mut out);
    quantize(&mut out, dtype);
    out
}

/// What a tree allreduce of `parts` yields on every rank: each rank adds its children's
/// subtree sums (as sent: f16-rounded for F16) to its own partial in rank order; the
/// root's sum (f16-rounded for F16) is the result.
pub fn tree_reference(parts: &[Vec<f32>], dtype: WireDType) -> Vec<f32> {
    fn subtree(r: usize, parts: &[Vec<f32>], dtype: WireDType) -> Vec<f32> {
        let mut acc = parts[r].clone();
        quantize(&mut acc, dtype);
        for c in tree_children(r, parts.len()) {
            let s = subtree(c, parts, dtype);
            for (a, v) in acc.iter_mut().zip(&s) {
                *a += v;
            }
        }
        quantize(&mut acc, dtype);
        acc
    }
    if parts.is_empty() {
        return Vec::new();
    }
    subtree(0, parts, dtype)
}

/// Encodes `v` as one tensor frame (header included) in a buffer of its own, which a
/// QUIC stream sends without copying and can share between peers.
pub(crate) fn encode_frame(
    dtype: WireDType,
    v: &[f32],
    h16: &mut Vec<f16>,
) -> Result<Bytes, NetError> {
    let mut tx = Vec::with_capacity(FRAME_HEADER_LEN + v.len() * dtype.bytes());
    tx.resize(FRAME_HEADER_LEN, 0);
    match dtype {
        WireDType::F32 => extend_f32_le(&mut tx, v),
        WireDType::F16 => extend_f16_le(&mut tx, v, h16),
    }
    fill_prefix(FrameKind::Tensor, &mut tx)?;
    Ok(Bytes::from(tx))
}

/// Overwrites `dst` with the values in `src` (wire bytes of `dst.len()` elements).
pub(crate) fn decode_into(
    dtype: WireDType,
    src: &[u8],
    dst: &mut [f32],
    h16: &mut Vec<f16>,
) -> Result<(), NetError> {
    match dtype {
        WireDType::F32 => f32_from_le_bytes(src, dst),
        WireDType::F16 => f16_le_to_f32(src, dst, h16),
    }
}

/// Adds the values in `src` (wire bytes of `acc.len()` elements) into `acc`, in f32.
pub(crate) fn add_into(dtype: WireDType, src: &[u8], acc: &mut [f32]) -> Result<(), NetError> {
    match dtype {
        WireDType::F32 => add_f32_le(acc, src),
        WireDType::F16 => add_f16_le(acc, src),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn inputs(world: usize, n: usize, seed: u64, positive: bool) -> Vec<Vec<f32>> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..world)
            .map(|_| {
                (0..n)
                    .map(|_| {
                        s = s
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let u = ((s >> 40) as f32) / (1u64 << 24) as f32; // [0, 1)
                        if positive {
                            0.01 + u * 3.0
                        } else {
                            (u - 0.5) * 8.0
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    #[test]
    fn parse_display() {
        assert_eq!("F16".parse::<WireDType>().unwrap(), WireDType::F16);
        assert_eq!(WireDType::F32.to_string(), "f32");
        assert!("f8".parse::<WireDType>().is_err());
    }

    #[test]
    fn rank_order_sum() {
        let a = [1e8f32, 1.0];
        let b = [1.0f32, 1e8];
        let c = [-1e8f32, -1e8];
        let mut out = [0f32; 2];
        sum_rank_order(&[&a, &b, &c], &mut out);
        assert_eq!(out, [((1e8f32 + 1.0) + -1e8), ((1.0f32 + 1e8) + -1e8)]);
    }

    #[test]
    fn star_f32_is_sequential_sum() {
        let parts = inputs(5, 100, 9, false);
        let mut seq = parts[0].clone();
        for p in &parts[1..] {
            for (s, v) in seq.iter_mut().zip(p) {
                *s += v;
            }
        }
        assert_eq!(bits(&star_reference(&parts, WireDType::F32)), bits(&seq));
    }

    #[test]
    fn frames_roundtrip_in_both_types() {
        let v = inputs(1, 33, 5, false).remove(0);
        for dtype in [WireDType::F32, WireDType::F16] {
            let mut h = Vec::new();
            let f = encode_frame(dtype, &v, &mut h).unwrap();
            assert_eq!(f.len(), FRAME_HEADER_LEN + v.len() * dtype.bytes());
            let mut back = vec![0.0; v.len()];
            decode_into(dtype, &f[FRAME_HEADER_LEN..], &mut back, &mut h).unwrap();
            let mut want = v.clone();
            quantize(&mut want, dtype);
            assert_eq!(bits(&back), bits(&want));
            let mut acc = vec![1.0; v.len()];
            add_into(dtype, &f[FRAME_HEADER_LEN..], &mut acc).unwrap();
            for (a, w) in acc.iter().zip(&want) {
                assert_eq!(*a, 1.0 + w);
            }
        }
    }
}
