//! Length-prefixed frames over any byte stream (`AsyncRead` / `AsyncWrite`: a QUIC stream,
//! or `tokio::io::duplex` in tests).
//!
//! A frame is `[u32 LE payload length][u8 kind][payload]`; the length counts the payload
//! only (not the 5 header bytes). Readers pass a maximum payload length and the length
//! field is checked against it *before* anything is allocated, so a garbage or hostile
//! length can never drive an allocation.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{map_io_error, NetError};

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
pub async fn write_frame<W: AsyncWrite + Unpin>(
    send: &mut W,
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
            .map_err(map_io_error)
    } else {
        send.write_all(&hdr).await.map_err(map_io_error)?;
        send.write_all(payload).await.map_err(map_io_error)
    }
}

/// Fills the reserved header space of a prefixed frame buffer (one frame, ready for a single stream write).
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
pub async fn read_frame<R: AsyncRead + Unpin>(
    recv: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<FrameKind, NetError> {
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut hdr).await.map_err(map_io_error)?;
    let (kind, len) = decode_header(&hdr, max)?;
    buf.clear();
    buf.resize(len, 0);
    recv.read_exact(buf).await.map_err(map_io_error)?;
    Ok(kind)
}

/// Reads one frame and checks that it is of the `expected` kind.
pub async fn read_frame_of<R: AsyncRead + Unpin>(
    recv: &mut R,
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

    #[tokio::test]
    async fn frames_over_a_duplex_pipe() {
        // A pipe of 7 bytes: every frame crosses it in several pieces.
        let (mut a, mut b) = tokio::io::duplex(7);
        let big = vec![9u8; 5000];
        let w = tokio::spawn(async move {
            write_frame(&mut a, FrameKind::Control, b"hello")
                .await
                .unwrap();
            write_frame(&mut a, FrameKind::Tensor, &big).await.unwrap();
            write_frame(&mut a, FrameKind::Tensor, &[1, 2, 3])
                .await
                .unwrap();
            a
        });
        let mut buf = Vec::new();
        assert_eq!(
            read_frame(&mut b, &mut buf, 16).await.unwrap(),
            FrameKind::Control
        );
        assert_eq!(buf, b"hello");
        read_frame_of(&mut b, FrameKind::Tensor, &mut buf, 5000)
            .await
            .unwrap();
        assert_eq!(buf, vec![9u8; 5000]);
        let e = read_frame_of(&mut b, FrameKind::Control, &mut buf, 16)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("expected a Control frame"), "{e}");
        drop(w.await.unwrap());
        let e = read_frame(&mut b, &mut buf, 16).await.unwrap_err();
        assert!(matches!(e, NetError::Closed { .. }), "{e}");
    }

    #[tokio::test]
    async fn stream_ending_inside_a_frame_is_closed_not_garbage() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let hdr = encode_header(FrameKind::Tensor, 10).unwrap();
        a.write_all(&hdr).await.unwrap();
        a.write_all(&[1, 2, 3]).await.unwrap();
        drop(a);
        let mut buf = Vec::new();
        let e = read_frame(&mut b, &mut buf, 100).await.unwrap_err();
        assert!(e.to_string().contains("inside a frame"), "{e}");
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_reading_it() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&encode_header(FrameKind::Control, 1 << 30).unwrap())
            .await
            .unwrap();
        let mut buf = Vec::new();
        let e = read_frame(&mut b, &mut buf, 1 << 20).await.unwrap_err();
        assert!(matches!(e, NetError::FrameTooLarge { .. }), "{e}");
        assert_eq!(buf.capacity(), 0);
    }
}
