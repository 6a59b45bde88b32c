//! Length-prefixed frames over QUIC streams.
//!
//! A frame is `[u32 LE payload length][u8 kind][payload]`; the length counts the payload
//! only (not the 5 header bytes). Readers pass a maximum payload length and the length
//! field is checked against it *before* anything is allocated, so a garbage or hostile
//! length can never drive an allocation.

use super::transport::{map_read_exact_error, map_write_error, NetError};

/// Bytes in a frame header: 4 (length, LE) + 1 (kind).
pub const FRAME_HEADER_LEN: usize = 5;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// The first frame on a freshly opened stream: a 1-byte stream tag (see
    /// [`super::transport::Connection::open_stream`]).
    Tag = 0,
    /// A bincode-encoded control message (see [`super::wire`]).
    Control = 1,
    /// A raw little-endian tensor payload (f32 or f16).
    Tensor = 2,
}

impl TryFrom<u8> for FrameKind {
    type Error = NetError;
    fn try_from(b: u8) -> Result<Self, NetError> {
        match b {
            0 => Ok(FrameKind::Tag),
            1 => Ok(FrameKind::Control),
            2 => Ok(FrameKind::Tensor),
            other => Err(NetError::Protocol(format!("unknown frame kind {other}"))),
        }
    }
}

/// Encodes a frame header for `payload_len` bytes of `kind`.
///
/// Fails with [`NetError::FrameTooLarge`] when the payload does not fit the u32 length.
pub fn encode_header(
    kind: FrameKind,
    payload_len: usize,
) -> Result<[u8; FRAME_HEADER_LEN], NetError> {
    let len = u32::try_from(payload_len).map_err(|_| NetError::FrameTooLarge {
        len: payload_len as u64,
        max: u32::MAX as usize,
    })?;
    let l = len.to_le_bytes();
    Ok([l[0], l[1], l[2], l[3], kind as u8])
}

/// Decodes a frame header, checking the payload length against `max`.
pub fn decode_header(
    hdr: &[u8; FRAME_HEADER_LEN],
    max: usize,
) -> Result<(FrameKind, usize), NetError> {
    let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    if len > max {
        return Err(NetError::FrameTooLarge {
            len: len as u64,
            max,
        });
    }
    Ok((FrameKind::try_from(hdr[4])?, len))
}

/// Writes one frame (header + payload).
///
/// Small payloads (≤ 4 KiB) are coalesced with the header into one stream write so that
/// they leave in one packet; larger ones are written as header then payload (quinn
/// copies into its send buffer either way, and both writes are queued before the
/// connection driver can packetise more than the first).
pub async fn write_frame(
    send: &mut quinn::SendStream,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), NetError> {
    let hdr = encode_header(kind, payload.len())?;
    if payload.len() <= 4096 {
        let mut buf = [0u8; FRAME_HEADER_LEN + 4096];
        buf[..FRAME_HEADER_LEN].copy_from_slice(&hdr);
        buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + payload.len()].copy_from_slice(payload);
        send.write_all(&buf[..FRAME_HEADER_LEN + payload.len()])
            .await
            .map_err(map_write_error)
    } else {
        send.write_all(&hdr).await.map_err(map_write_error)?;
        send.write_all(payload).await.map_err(map_write_error)
    }
}

/// Writes one frame whose header space is already reserved: `buf[..FRAME_HEADER_LEN]` is
/// overwritten with the header for the payload `buf[FRAME_HEADER_LEN..]`, and the whole
/// buffer goes out in a single stream write (the zero-extra-copy hot path).
pub async fn write_prefixed_frame(
    send: &mut quinn::SendStream,
    kind: FrameKind,
    buf: &mut [u8],
) -> Result<(), NetError> {
    fill_prefix(kind, buf)?;
    send.write_all(buf).await.map_err(map_write_error)
}

/// Fills the reserved header space of a prefixed frame buffer (see [`write_prefixed_frame`]).
pub fn fill_prefix(kind: FrameKind, buf: &mut [u8]) -> Result<(), NetError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Err(NetError::Protocol(
            "prefixed frame buffer shorter than the header".into(),
        ));
    }
    let hdr = encode_header(kind, buf.len() - FRAME_HEADER_LEN)?;
    buf[..FRAME_HEADER_LEN].copy_from_slice(&hdr);
    Ok(())
}

/// Reads one frame into `buf` (cleared and resized to the payload length; its capacity is
/// reused across calls). The payload length is checked against `max` before `buf` grows.
///
/// Returns the frame kind. A stream that ends cleanly before a header is an error
/// ([`NetError::Closed`]); so is one that ends inside a frame.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<FrameKind, NetError> {
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut hdr)
        .await
        .map_err(map_read_exact_error)?;
    let (kind, len) = decode_header(&hdr, max)?;
    buf.clear();
    buf.resize(len, 0);
    recv.read_exact(buf).await.map_err(map_read_exact_error)?;
    Ok(kind)
}

/// Reads one frame and checks that it is of the `expected` kind.
pub async fn read_frame_of(
    recv: &mut quinn::RecvStream,
    expected: FrameKind,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<(), NetError> {
    let kind = read_frame(recv, buf, max).await?;
    if kind != expected {
        return Err(NetError::Protocol(format!(
            "expected a {expected:?} frame, got {kind:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = encode_header(FrameKind::Tensor, 1234).unwrap();
        assert_eq!(decode_header(&h, 2000).unwrap(), (FrameKind::Tensor, 1234));
    }

    #[test]
    fn oversized_header_refused() {
        let h = encode_header(FrameKind::Control, 1 << 30).unwrap();
        match decode_header(&h, 1 << 20) {
            Err(NetError::FrameTooLarge { len, max }) => {
                assert_eq!(len, 1 << 30);
                assert_eq!(max, 1 << 20);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn garbage_kind_refused() {
        let h = [1, 0, 0, 0, 0xee];
        assert!(matches!(decode_header(&h, 10), Err(NetError::Protocol(_))));
    }

    #[test]
    fn prefix_fill() {
        let mut b = vec![0u8; FRAME_HEADER_LEN + 3];
        fill_prefix(FrameKind::Tensor, &mut b).unwrap();
        assert_eq!(&b[..5], &[3, 0, 0, 0, 2]);
        assert!(fill_prefix(FrameKind::Tensor, &mut [0u8; 2]).is_err());
    }
}
