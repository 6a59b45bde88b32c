//! The arithmetic of a reduction: the wire element type, rank-order sums, and the
//! encoding of partials and results as tensor frames. Sums are always taken in f32 and
//! in rank order, never in arrival order, so results are functions of the inputs alone;
//! [`star_reference`] and [`tree_reference`] state what each schedule computes.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use half::f16;

use super::{payload, tree_children};
use crate::net::error::NetError;
use crate::net::frame::{fill_prefix, FrameKind, FRAME_HEADER_LEN};
use crate::net::wire::{
    add_f16_le, add_f32_le, extend_f16_le, extend_f32_le, f16_le_to_f32, f32_from_le_bytes,
    round_to_f16,
};

/// Element type on the wire. Summation is always in f32. All but f32 are lossy and
/// opt-in; every rank still ends with the same bits whatever the algorithm, because
/// each type's rounding is idempotent (see [`payload`](super::payload)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum WireDType {
    /// 4 bytes per element, exact.
    F32,
    /// 2 bytes per element: partials and results are rounded to f16; every rank ends
    /// with the f16-rounded result (as f32 values).
    F16,
    /// 2 bytes per element, rounded to bf16 (f32's range, 8 significant bits).
    Bf16,
    /// int8 blocks of 32 with an f16 scale each (GGML's Q8_0 block): 1.0625 bytes per
    /// element. Refuses non-finite values and magnitudes beyond ±8.3e6 with an error.
    Q8,
}

impl WireDType {
    /// Every type, in the order `--help` lists them.
    pub const ALL: [WireDType; 4] = [
        WireDType::F32,
        WireDType::F16,
        WireDType::Bf16,
        WireDType::Q8,
    ];

    /// Bytes on the wire of a message of `n` elements.
    pub fn wire_len(self, n: usize) -> usize {
        match self {
            WireDType::F32 => 4 * n,
            WireDType::F16 | WireDType::Bf16 => 2 * n,
            WireDType::Q8 => payload::q8_len(n),
        }
    }

    /// Mean bytes per element (what the cost model prices).
    pub fn elem_bytes(self) -> f64 {
        match self {
            WireDType::F32 => 4.0,
            WireDType::F16 | WireDType::Bf16 => 2.0,
            WireDType::Q8 => payload::q8_len(payload::Q8_BLOCK) as f64 / payload::Q8_BLOCK as f64,
        }
    }

    /// Bytes per element when elements can be decoded one at a time as they arrive;
    /// `None` for block types, which are decoded once the whole message is in.
    pub(crate) fn unit(self) -> Option<usize> {
        match self {
            WireDType::F32 => Some(4),
            WireDType::F16 | WireDType::Bf16 => Some(2),
            WireDType::Q8 => None,
        }
    }
}

impl fmt::Display for WireDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireDType::F32 => "f32",
            WireDType::F16 => "f16",
            WireDType::Bf16 => "bf16",
            WireDType::Q8 => "q8",
        })
    }
}

impl FromStr for WireDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(WireDType::F32),
            "f16" => Ok(WireDType::F16),
            "bf16" => Ok(WireDType::Bf16),
            "q8" | "q80" | "q8_0" => Ok(WireDType::Q8),
            _ => Err(format!(
                "unknown wire dtype {s:?} (expected f32, f16, bf16 or q8)"
            )),
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

/// Rounds `v` in place to what its encoding as `dtype` decodes to (nothing for f32).
pub(crate) fn quantize(
    v: &mut [f32],
    dtype: WireDType,
    h16: &mut Vec<f16>,
) -> Result<(), NetError> {
    match dtype {
        WireDType::F32 => {}
        WireDType::F16 => round_to_f16(v, h16),
        WireDType::Bf16 => payload::bf16_round(v),
        WireDType::Q8 => payload::q8_round(v)?,
    }
    Ok(())
}

/// What a star allreduce of `parts` (indexed by rank) yields on every rank: the rank-order
/// sum of the (f16-rounded, for F16) partials, rounded to f16 for F16.
pub fn star_reference(parts: &[Vec<f32>], dtype: WireDType) -> Vec<f32> {
    let q: Vec<Vec<f32>> = parts
        .iter()
        .map(|p| {
            let mut p = p.clone();
            quantize(&mut p, dtype, &mut Vec::new()).expect("representable in the wire type");
            p
        })
        .collect();
    let refs: Vec<&[f32]> = q.iter().map(|v| v.as_slice()).collect();
    let mut out = vec![0.0; parts.first().map_or(0, |p| p.len())];
    sum_rank_order(&refs, &mut out);
    quantize(&mut out, dtype, &mut Vec::new()).expect("representable in the wire type");
    out
}

/// What a tree allreduce of `parts` yields on every rank: each rank adds its children's
/// subtree sums (as sent: f16-rounded for F16) to its own partial in rank order; the
/// root's sum (f16-rounded for F16) is the result.
pub fn tree_reference(parts: &[Vec<f32>], dtype: WireDType) -> Vec<f32> {
    fn subtree(r: usize, parts: &[Vec<f32>], dtype: WireDType) -> Vec<f32> {
        let mut acc = parts[r].clone();
        quantize(&mut acc, dtype, &mut Vec::new()).expect("representable in the wire type");
        for c in tree_children(r, parts.len()) {
            let s = subtree(c, parts, dtype);
            for (a, v) in acc.iter_mut().zip(&s) {
                *a += v;
            }
        }
        quantize(&mut acc, dtype, &mut Vec::new()).expect("representable in the wire type");
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
    let mut tx = Vec::with_capacity(FRAME_HEADER_LEN + dtype.wire_len(v.len()));
    tx.resize(FRAME_HEADER_LEN, 0);
    match dtype {
        WireDType::F32 => extend_f32_le(&mut tx, v),
        WireDType::F16 => extend_f16_le(&mut tx, v, h16),
        WireDType::Bf16 => payload::bf16_encode(&mut tx, v),
        WireDType::Q8 => payload::q8_encode(&mut tx, v)?,
    }
    fill_prefix(FrameKind::Tensor, &mut tx)?;
    Ok(Bytes::from(tx))
}

/// Overwrites `dst` with the values in `src` (wire bytes of `dst.len()` elements: a
/// whole message for block types, any run of whole elements for the others).
pub(crate) fn decode_into(
    dtype: WireDType,
    src: &[u8],
    dst: &mut [f32],
    h16: &mut Vec<f16>,
) -> Result<(), NetError> {
    match dtype {
        WireDType::F32 => f32_from_le_bytes(src, dst),
        WireDType::F16 => f16_le_to_f32(src, dst, h16),
        WireDType::Bf16 => payload::bf16_decode(src, dst),
        WireDType::Q8 => payload::q8_decode(src, dst),
    }
}

/// Adds the values in `src` (wire bytes of `acc.len()` elements) into `acc`, in f32.
pub(crate) fn add_into(dtype: WireDType, src: &[u8], acc: &mut [f32]) -> Result<(), NetError> {
    match dtype {
        WireDType::F32 => add_f32_le(acc, src),
        WireDType::F16 => add_f16_le(acc, src),
        WireDType::Bf16 => payload::bf16_add(src, acc),
        WireDType::Q8 => payload::q8_add(src, acc),
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
        for d in WireDType::ALL {
            assert_eq!(d.to_string().parse::<WireDType>().unwrap(), d);
        }
        assert_eq!("Q8_0".parse::<WireDType>().unwrap(), WireDType::Q8);
        assert_eq!(WireDType::Q8.wire_len(576), 18 * 34);
        assert_eq!(WireDType::Q8.elem_bytes(), 1.0625);
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
        for dtype in WireDType::ALL {
            let mut h = Vec::new();
            let f = encode_frame(dtype, &v, &mut h).unwrap();
            assert_eq!(f.len(), FRAME_HEADER_LEN + dtype.wire_len(v.len()));
            let mut back = vec![0.0; v.len()];
            decode_into(dtype, &f[FRAME_HEADER_LEN..], &mut back, &mut h).unwrap();
            let mut want = v.clone();
            quantize(&mut want, dtype, &mut h).unwrap();
            assert_eq!(bits(&back), bits(&want));
            let mut acc = vec![1.0; v.len()];
            add_into(dtype, &f[FRAME_HEADER_LEN..], &mut acc).unwrap();
            for (a, w) in acc.iter().zip(&want) {
                assert_eq!(*a, 1.0 + w);
            }
        }
    }
}
