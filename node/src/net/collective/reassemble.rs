//! Reassembly of a tensor frame that arrives in chunks of any size.
//!
//! A link delivers a frame's bytes in pieces whose boundaries have nothing to do with
//! the frame: QUIC hands out whatever its packets held, and the in-memory links of the
//! tests cut frames at seeded random points on purpose. [`Header`] gathers the 5 header
//! bytes; [`Elements`] turns the payload's pieces into runs of whole elements (2 or 4
//! bytes), carrying an element split across two pieces in a small buffer, so that the
//! reduction can add straight from received pieces without copying the frame.

use crate::net::frame::FRAME_HEADER_LEN;

/// Gathers a frame header from pieces.
#[derive(Debug, Default)]
pub struct Header {
    bytes: [u8; FRAME_HEADER_LEN],
    have: usize,
}

impl Header {
    /// How many more header bytes are needed (read at most this much, so that no payload
    /// byte is consumed with the header).
    pub fn missing(&self) -> usize {
        FRAME_HEADER_LEN - self.have
    }

    /// Takes a piece of at most [`Header::missing`] bytes; returns the header once whole.
    pub fn feed(&mut self, piece: &[u8]) -> Option<[u8; FRAME_HEADER_LEN]> {
        debug_assert!(piece.len() <= self.missing());
        let k = piece.len().min(self.missing());
        self.bytes[self.have..self.have + k].copy_from_slice(&piece[..k]);
        self.have += k;
        (self.have == FRAME_HEADER_LEN).then_some(self.bytes)
    }
}

/// Splits a payload of `len` bytes, arriving in pieces, into runs of whole `elem`-byte
/// elements.
#[derive(Debug)]
pub struct Elements {
    elem: usize,
    len: usize,
    /// Bytes handed to the sink so far (always a multiple of `elem`).
    done: usize,
    carry: [u8; 4],
    carried: usize,
}

impl Elements {
    /// A payload of `len` bytes of `elem`-byte elements (`elem` is 1, 2 or 4; `len` a
    /// multiple of it, which the caller has checked against the frame header).
    pub fn new(len: usize, elem: usize) -> Elements {
        assert!(
            (1..=4).contains(&elem) && len.is_multiple_of(elem),
            "{len} bytes of {elem}"
        );
        Elements {
            elem,
            len,
            done: 0,
            carry: [0; 4],
            carried: 0,
        }
    }

    /// Payload bytes not yet received (read at most this much, so that the next frame
    /// stays in the stream).
    pub fn missing(&self) -> usize {
        self.len - self.done - self.carried
    }

    /// Takes the next piece (at most [`Elements::missing`] bytes) and hands its whole
    /// elements to `sink(first element index, bytes)`, in order.
    pub fn feed<E>(
        &mut self,
        mut piece: &[u8],
        sink: &mut impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        debug_assert!(piece.len() <= self.missing());
        let e = self.elem;
        if self.carried > 0 {
            let k = (e - self.carried).min(piece.len());
            self.carry[self.carried..self.carried + k].copy_from_slice(&piece[..k]);
            self.carried += k;
            piece = &piece[k..];
            if self.carried < e {
                return Ok(());
            }
            sink(self.done / e, &self.carry[..e])?;
            self.done += e;
            self.carried = 0;
        }
        let whole = piece.len() / e * e;
        if whole > 0 {
            sink(self.done / e, &piece[..whole])?;
            self.done += whole;
        }
        let rest = &piece[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
        Ok(())
    }

    /// Whether the whole payload has been handed out.
    pub fn is_done(&self) -> bool {
        self.done == self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `payload` cut at `cuts` (sorted, deduplicated offsets) and returns what the
    /// sink saw, checking each run's alignment and index on the way.
    fn reassemble(payload: &[u8], elem: usize, cuts: &[usize]) -> Vec<u8> {
        let mut el = Elements::new(payload.len(), elem);
        let mut seen = Vec::new();
        let mut at = 0;
        for &c in cuts.iter().chain(std::iter::once(&payload.len())) {
            assert!(c - at <= el.missing());
            el.feed::<()>(&payload[at..c], &mut |i, b| {
                assert_eq!(
                    i * elem,
                    seen.len(),
                    "runs arrive in order, indexed by element"
                );
                assert_eq!(b.len() % elem, 0, "only whole elements");
                assert!(!b.is_empty());
                seen.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
            at = c;
        }
        assert!(el.is_done());
        assert_eq!(el.missing(), 0);
        seen
    }

    proptest! {
        #[test]
        fn any_cut_gives_back_the_payload(
            n in 0usize..300,
            elem in prop::sample::select(vec![1usize, 2, 4]),
            raw_cuts in prop::collection::vec(0usize..1200, 0..40),
            seed in any::<u8>(),
        ) {
            let payload: Vec<u8> = (0..n * elem).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            let mut cuts: Vec<usize> = raw_cuts.into_iter().map(|c| c % (payload.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            prop_assert_eq!(reassemble(&payload, elem, &cuts), payload);
        }

        #[test]
        fn header_from_any_pieces(cut_a in 0usize..=5, cut_b in 0usize..=5) {
            let (a, b) = (cut_a.min(cut_b), cut_a.max(cut_b));
            let bytes = [1u8, 2, 3, 4, 5];
            let mut h = Header::default();
            let mut got = None;
            for piece in [&bytes[..a], &bytes[a..b], &bytes[b..]] {
                prop_assert!(piece.len() <= h.missing());
                if let Some(x) = h.feed(piece) {
                    got = Some(x);
                }
            }
            prop_assert_eq!(got, Some(bytes));
        }
    }

    #[test]
    fn one_byte_pieces_of_f32s() {
        let payload: Vec<u8> = (0..64).collect();
        let cuts: Vec<usize> = (1..64).collect();
        assert_eq!(reassemble(&payload, 4, &cuts), payload);
    }

    #[test]
    fn sink_errors_stop_the_feed() {
        let mut el = Elements::new(8, 4);
        let r = el.feed(&[0; 8], &mut |_, _| Err("no"));
        assert_eq!(r, Err("no"));
    }
}
