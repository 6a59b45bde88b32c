//! Wire encoding: bincode control messages and raw little-endian tensor payloads.
//!
//! This is the only module that uses bincode (the bincode project is unmaintained, so its
//! use is kept behind [`encode`] / [`decode`] and can be swapped out here alone).
//! Tensor payloads never go through bincode: they are the raw little-endian bytes of an
//! f32 or f16 slice.

use half::f16;
use half::slice::HalfFloatSliceExt;

use tokio::io::{AsyncRead, AsyncWrite};

use super::error::NetError;
use super::frame::{read_frame_of, write_frame, FrameKind};

/// The tpi wire protocol version; peers exchange it in their hellos and refuse a mismatch.
pub const PROTOCOL_VERSION: u32 = 6;

/// The one limit on control messages: the largest encoded message [`encode`] produces and
/// [`decode`] accepts, and the bincode allocation limit. Tensor payloads and shard blocks
/// travel as their own frames, so control messages stay small (a session's Setup with
/// its manifest is a few KiB).
pub const MAX_CONTROL: usize = 1 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_CONTROL>()
}

/// Encodes a control message with bincode (standard config). A message longer than
/// [`MAX_CONTROL`] is refused here, since no peer would accept it.
pub fn encode<T: serde::Serialize>(msg: &T) -> Result<Vec<u8>, NetError> {
    let v = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| NetError::Codec(format!("encode: {e}")))?;
    if v.len() > MAX_CONTROL {
        return Err(NetError::Codec(format!(
            "encode: message of {} bytes exceeds the {MAX_CONTROL}-byte limit",
            v.len()
        )));
    }
    Ok(v)
}

/// Decodes a control message encoded by [`encode`]. Input longer than [`MAX_CONTROL`],
/// input that would make the decoder allocate more than that, malformed input and trailing bytes
/// are all refused with [`NetError::Codec`].
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, NetError> {
    if bytes.len() > MAX_CONTROL {
        return Err(NetError::Codec(format!(
            "message of {} bytes exceeds the {MAX_CONTROL}-byte limit",
            bytes.len()
        )));
    }
    let (msg, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| NetError::Codec(format!("decode: {e}")))?;
    if used != bytes.len() {
        return Err(NetError::Codec(format!(
            "decode: {} trailing bytes after the message",
            bytes.len() - used
        )));
    }
    Ok(msg)
}

/// Sends `msg` as one [`FrameKind::Control`] frame.
pub async fn send_msg<T: serde::Serialize, W: AsyncWrite + Unpin>(
    send: &mut W,
    msg: &T,
) -> Result<(), NetError> {
    let bytes = encode(msg)?;
    write_frame(send, FrameKind::Control, &bytes).await
}

/// Receives one [`FrameKind::Control`] frame of at most `max` bytes (never more than
/// [`MAX_CONTROL`]) and decodes it.
pub async fn recv_msg<T: serde::de::DeserializeOwned, R: AsyncRead + Unpin>(
    recv: &mut R,
    max: usize,
) -> Result<T, NetError> {
    let mut buf = Vec::new();
    read_frame_of(recv, FrameKind::Control, &mut buf, max.min(MAX_CONTROL)).await?;
    decode(&buf)
}

/// Appends the little-endian bytes of `src` to `dst` (4 bytes per element).
pub fn extend_f32_le(dst: &mut Vec<u8>, src: &[f32]) {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding and any alignment is fine for u8; on a little-endian
        // target the in-memory representation is exactly the LE wire representation.
        let bytes = unsafe {
            std::slice::from_raw_parts(src.as_ptr() as *const u8, std::mem::size_of_val(src))
        };
        dst.extend_from_slice(bytes);
    }
    #[cfg(not(target_endian = "little"))]
    {
        dst.reserve(src.len() * 4);
        for v in src {
            dst.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Returns the little-endian bytes of `src` as a new vector.
pub fn f32_to_le_bytes(src: &[f32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(src.len() * 4);
    extend_f32_le(&mut v, src);
    v
}

fn check_len(bytes: &[u8], elem: usize, n: usize) -> Result<(), NetError> {
    if bytes.len() != n * elem {
        return Err(NetError::Protocol(format!(
            "tensor payload of {} bytes, expected {} ({} elements of {} bytes)",
            bytes.len(),
            n * elem,
            n,
            elem
        )));
    }
    Ok(())
}

/// Decodes little-endian f32 bytes into `dst`; `src.len()` must be `4 * dst.len()`.
pub fn f32_from_le_bytes(src: &[u8], dst: &mut [f32]) -> Result<(), NetError> {
    check_len(src, 4, dst.len())?;
    #[cfg(target_endian = "little")]
    {
        // SAFETY: lengths checked above; every bit pattern is a valid f32; the byte view
        // of `dst` has alignment 1.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr() as *mut u8, src.len())
        };
    }
    #[cfg(not(target_endian = "little"))]
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(())
}

/// Adds little-endian f32 bytes element-wise into `acc` (`acc[i] += src[i]`).
pub fn add_f32_le(acc: &mut [f32], src: &[u8]) -> Result<(), NetError> {
    check_len(src, 4, acc.len())?;
    for (a, c) in acc.iter_mut().zip(src.chunks_exact(4)) {
        *a += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(())
}

/// Appends `src` rounded to f16 (round-to-nearest-even) as little-endian bytes
/// (2 bytes per element) to `dst`. `scratch` is reused between calls.
pub fn extend_f16_le(dst: &mut Vec<u8>, src: &[f32], scratch: &mut Vec<f16>) {
    scratch.clear();
    scratch.resize(src.len(), f16::ZERO);
    scratch.convert_from_f32_slice(src);
    for h in scratch.iter() {
        dst.extend_from_slice(&h.to_bits().to_le_bytes());
    }
}

/// Returns `src` rounded to f16 as little-endian bytes.
pub fn f32_to_f16_le_bytes(src: &[f32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(src.len() * 2);
    extend_f16_le(&mut v, src, &mut Vec::new());
    v
}

fn load_f16(src: &[u8], scratch: &mut Vec<f16>) {
    scratch.clear();
    scratch.extend(
        src.chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]]))),
    );
}

/// Decodes little-endian f16 bytes into f32 values in `dst`; `src.len()` must be
/// `2 * dst.len()`. `scratch` is reused between calls.
pub fn f16_le_to_f32(src: &[u8], dst: &mut [f32], scratch: &mut Vec<f16>) -> Result<(), NetError> {
    check_len(src, 2, dst.len())?;
    load_f16(src, scratch);
    scratch.convert_to_f32_slice(dst);
    Ok(())
}

/// Adds little-endian f16 bytes element-wise (widened to f32) into `acc`.
pub fn add_f16_le(acc: &mut [f32], src: &[u8]) -> Result<(), NetError> {
    check_len(src, 2, acc.len())?;
    for (a, c) in acc.iter_mut().zip(src.chunks_exact(2)) {
        *a += f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
    }
    Ok(())
}

/// Rounds every element of `x` to the nearest f16 value (kept as f32).
pub fn round_to_f16(x: &mut [f32], scratch: &mut Vec<f16>) {
    scratch.clear();
    scratch.resize(x.len(), f16::ZERO);
    scratch.convert_from_f32_slice(x);
    scratch.convert_to_f32_slice(x);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Msg {
        a: u32,
        s: String,
        v: Vec<u64>,
    }

    #[test]
    fn roundtrip() {
        let m = Msg {
            a: 7,
            s: "hi".into(),
            v: vec![1, 2, 3],
        };
        let b = encode(&m).unwrap();
        assert_eq!(decode::<Msg>(&b).unwrap(), m);
    }

    #[test]
    fn garbage_is_refused_without_huge_alloc() {
        // A Vec<u64> claiming u64::MAX/2 elements: the limit must refuse it.
        let mut b = vec![7u8, 2, b'h', b'i'];
        b.push(253); // varint u64 marker
        b.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(matches!(decode::<Msg>(&b), Err(NetError::Codec(_))));
        assert!(matches!(decode::<Msg>(&[0xff; 3]), Err(NetError::Codec(_))));
        let m = encode(&Msg {
            a: 1,
            s: String::new(),
            v: vec![],
        })
        .unwrap();
        let mut t = m.clone();
        t.push(0);
        assert!(matches!(decode::<Msg>(&t), Err(NetError::Codec(_))));
    }

    #[tokio::test]
    async fn messages_over_a_duplex_pipe() {
        let (mut a, mut b) = tokio::io::duplex(16);
        let m = Msg {
            a: 7,
            s: "over the pipe".into(),
            v: (0..100).collect(),
        };
        let sent = encode(&m).unwrap().len();
        let w = tokio::spawn(async move {
            send_msg(
                &mut a,
                &Msg {
                    a: 1,
                    s: String::new(),
                    v: vec![],
                },
            )
            .await
            .unwrap();
            send_msg(&mut a, &m).await.unwrap();
            a
        });
        assert_eq!(recv_msg::<Msg, _>(&mut b, 64).await.unwrap().a, 1);
        // A per-call limit below the message's size refuses it.
        let e = recv_msg::<Msg, _>(&mut b, sent - 1).await.unwrap_err();
        assert!(matches!(e, NetError::FrameTooLarge { .. }), "{e}");
        // The writer is still blocked on the refused message, which nobody reads.
        w.abort();
    }

    #[test]
    fn one_limit_for_control_messages() {
        let big = Msg {
            a: 0,
            s: "x".repeat(MAX_CONTROL),
            v: vec![],
        };
        assert!(matches!(encode(&big), Err(NetError::Codec(_))));
        assert!(matches!(
            decode::<Msg>(&vec![0; MAX_CONTROL + 1]),
            Err(NetError::Codec(_))
        ));
    }

    #[test]
    fn f32_roundtrip_and_add() {
        let x = [1.5f32, -2.25, f32::MIN_POSITIVE, 3e38];
        let b = f32_to_le_bytes(&x);
        assert_eq!(&b[..4], &1.5f32.to_le_bytes());
        let mut y = [0f32; 4];
        f32_from_le_bytes(&b, &mut y).unwrap();
        assert_eq!(x, y);
        let mut acc = [1f32; 4];
        add_f32_le(&mut acc, &b).unwrap();
        assert_eq!(acc[0], 2.5);
        assert!(f32_from_le_bytes(&b[..5], &mut y).is_err());
    }

    #[test]
    fn f16_roundtrip() {
        let x = [1.0f32, 0.1, -65504.0, 1e-3];
        let b = f32_to_f16_le_bytes(&x);
        assert_eq!(b.len(), 8);
        let mut y = [0f32; 4];
        let mut s = Vec::new();
        f16_le_to_f32(&b, &mut y, &mut s).unwrap();
        let mut r = x;
        round_to_f16(&mut r, &mut s);
        assert_eq!(r, y);
        assert_eq!(y[0], 1.0);
        assert_eq!(y[1], f16::from_f32(0.1).to_f32());
        let mut acc = [1f32; 4];
        add_f16_le(&mut acc, &b).unwrap();
        assert_eq!(acc[1], 1.0 + f16::from_f32(0.1).to_f32());
    }
}
