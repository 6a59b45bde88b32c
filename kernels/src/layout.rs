//! Row layouts of quantised matrices: GGML's block order, and tpi's *packed* Q4 order, the
//! same bytes regrouped so the AVX-512 VNNI kernel reads quants and scales without permutes.
//!
//! A packed row is cut into the VNNI kernel's units, each holding its quants in the order
//! the kernel's lanes read them, then its scales:
//! - Q4_0 *octets* (8 blocks, 144 bytes) while 8 blocks remain: bytes 0-7 of block k's
//!   quants at `8k`, bytes 8-15 at `64 + 8k`, then the 8 `d` words;
//! - Q4 *groups* (4 blocks: 72 bytes for Q4_0, 80 for Q4_1): the four blocks' 16 quant bytes
//!   in block order, then the 4 `d` words, then (Q4_1) the 4 `m` words;
//! - the last 1-3 blocks stay in GGML order.
//!
//! A packed row is as long as the GGML row, so strides, row slices and byte counts do not
//! change, and the kernel computes exactly what it computes on the GGML row.

use crate::{DType, KernelError};

/// How a matrix's rows are laid out in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Layout {
    /// GGML block order (what GGUF and safetensors files hold).
    #[default]
    Ggml,
    /// tpi's packed Q4 order (see the module docs); only for Q4_0 and Q4_1.
    Packed,
}

impl Layout {
    /// Lower-case name, for manifests, logs and CLI output.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Ggml => "ggml",
            Layout::Packed => "packed",
        }
    }

    /// The layout named `s` ("ggml" or "packed").
    pub fn from_name(s: &str) -> Option<Layout> {
        match s {
            "ggml" => Some(Layout::Ggml),
            "packed" => Some(Layout::Packed),
            _ => None,
        }
    }

    /// Whether `dtype` can be stored in this layout.
    pub fn supports(self, dtype: DType) -> bool {
        self == Layout::Ggml || matches!(dtype, DType::Q4_0 | DType::Q4_1)
    }
}

/// Columns of the largest packed unit of `dtype` (256 for Q4_0's octets, else 128): a packed
/// matrix's column slices start at multiples of this and end at one or at the row's end.
pub fn unit_cols(dtype: DType) -> usize {
    if dtype == DType::Q4_0 {
        256
    } else {
        128
    }
}

/// Whether columns `c0..c1` of a packed `dtype` row of `cols` columns keep whole units, as a
/// packed column slice must.
pub fn slice_keeps_units(dtype: DType, c0: usize, c1: usize, cols: usize) -> bool {
    let u = unit_cols(dtype);
    c0.is_multiple_of(u) && (c1.is_multiple_of(u) || c1 == cols)
}

/// Q4_0 octets in a row of `nb` blocks (the first `8 * octets` blocks), in either layout.
/// Q4_1 stays in groups: its 160-byte GGML octets need four masked loads (or a third load)
/// per row, and measured only 2-3% faster than groups, in cache and from DRAM.
pub(crate) fn octets(dtype: DType, nb: usize) -> usize {
    if dtype == DType::Q4_0 {
        nb / 8
    } else {
        0
    }
}

/// Q4 groups of 4 after the octets: all of a Q4_1 row, at most one in a Q4_0 row.
pub(crate) fn groups(dtype: DType, nb: usize) -> usize {
    match dtype {
        DType::Q4_0 | DType::Q4_1 => (nb - 8 * octets(dtype, nb)) / 4,
        _ => 0,
    }
}

/// Copies `L` bytes between a GGML unit (`src`/`dst` offset `g`) and its packed form
/// (offset `p`), in the direction `pack` says; `L` is a constant so each copy is one move.
#[inline(always)]
fn mv<const L: usize>(src: &[u8], dst: &mut [u8], pack: bool, g: usize, p: usize) {
    let (from, to) = if pack { (g, p) } else { (p, g) };
    let bytes: [u8; L] = src[from..from + L].try_into().expect("L bytes");
    dst[to..to + L].copy_from_slice(&bytes);
}

/// Packs (or unpacks) one unit of `n` blocks (8 or 4) of `dtype` between `src` and `dst`,
/// both starting at the unit.
#[inline(always)]
fn unit(dtype: DType, n: usize, src: &[u8], dst: &mut [u8], pack: bool) {
    let bb = dtype.block_bytes();
    let q41 = dtype == DType::Q4_1;
    let hq = if q41 { 4 } else { 2 };
    for k in 0..n {
        let (gh, gq) = (k * bb, k * bb + hq);
        mv::<2>(src, dst, pack, gh, 16 * n + 2 * k);
        if q41 {
            mv::<2>(src, dst, pack, gh + 2, 16 * n + 2 * n + 2 * k);
        }
        if n == 8 {
            mv::<8>(src, dst, pack, gq, 8 * k);
            mv::<8>(src, dst, pack, gq + 8, 64 + 8 * k);
        } else {
            mv::<16>(src, dst, pack, gq, 16 * k);
        }
    }
}

/// Checks a pack/unpack call: a Q4 dtype, a whole number of blocks, equal lengths.
fn check(dtype: DType, src: &[u8], dst: &[u8]) -> Result<(), KernelError> {
    if !Layout::Packed.supports(dtype) {
        return Err(KernelError::Invalid(format!(
            "the packed layout is for q4_0 and q4_1, not {dtype}"
        )));
    }
    if !src.len().is_multiple_of(dtype.block_bytes()) || dst.len() != src.len() {
        return Err(KernelError::Invalid(format!(
            "packing needs whole {dtype} blocks of {} bytes and equal lengths, got {} and {}",
            dtype.block_bytes(),
            src.len(),
            dst.len()
        )));
    }
    Ok(())
}

/// Copies one row of `dtype` blocks from GGML order in `src` to packed order in `dst`.
pub fn pack_row(dtype: DType, src: &[u8], dst: &mut [u8]) -> Result<(), KernelError> {
    check(dtype, src, dst)?;
    regroup(dtype, src, dst, true);
    Ok(())
}

/// Copies one packed row of `dtype` blocks in `src` back to GGML order in `dst`.
pub fn unpack_row(dtype: DType, src: &[u8], dst: &mut [u8]) -> Result<(), KernelError> {
    check(dtype, src, dst)?;
    regroup(dtype, src, dst, false);
    Ok(())
}

/// The byte permutation behind [`pack_row`] (`pack`) and [`unpack_row`] (its inverse).
/// Lengths are checked by the callers.
pub(crate) fn regroup(dtype: DType, src: &[u8], dst: &mut [u8], pack: bool) {
    let bb = dtype.block_bytes();
    let nb = src.len() / bb;
    let (no, ng) = (octets(dtype, nb), groups(dtype, nb));
    let mut at = 0;
    for (n, count) in [(8, no), (4, ng)] {
        for _ in 0..count {
            let len = n * bb;
            unit(dtype, n, &src[at..at + len], &mut dst[at..at + len], pack);
            at += len;
        }
    }
    dst[at..].copy_from_slice(&src[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_moves_headers_behind_quants_and_round_trips() {
        for dtype in [DType::Q4_0, DType::Q4_1] {
            let bb = dtype.block_bytes();
            for nb in [1usize, 3, 4, 5, 8, 11, 12, 13, 19] {
                let src: Vec<u8> = (0..nb * bb).map(|i| (i * 7 + 3) as u8).collect();
                let mut p = vec![0u8; src.len()];
                pack_row(dtype, &src, &mut p).unwrap();
                let hq = bb - 16;
                let (no, ng) = (octets(dtype, nb), groups(dtype, nb));
                if no > 0 {
                    // Octet block 2: quant bytes 0-7 at 16, 8-15 at 80, d at 128 + 4.
                    assert_eq!(p[16..24], src[2 * bb + hq..2 * bb + hq + 8]);
                    assert_eq!(p[80..88], src[2 * bb + hq + 8..3 * bb]);
                    assert_eq!(p[132..134], src[2 * bb..2 * bb + 2]);
                }
                if ng > 0 {
                    // Group block 2: quants at 32, d at 64 + 4, m (Q4_1) at 72 + 4.
                    let (g, u) = (8 * no * bb, 8 * no * bb + 2 * bb);
                    assert_eq!(p[g + 32..g + 48], src[u + hq..u + bb]);
                    assert_eq!(p[g + 68..g + 70], src[u..u + 2]);
                    if dtype == DType::Q4_1 {
                        assert_eq!(p[g + 76..g + 78], src[u + 2..u + 4]);
                    }
                }
                // The tail (the last 1-3 blocks) is unchanged.
                let tail = (8 * no + 4 * ng) * bb;
                assert_eq!(p[tail..], src[tail..]);
                let mut back = vec![0u8; src.len()];
                unpack_row(dtype, &p, &mut back).unwrap();
                assert_eq!(back, src);
            }
        }
    }

    #[test]
    fn pack_rejects_other_dtypes_and_partial_blocks() {
        let mut d = vec![0u8; 34];
        assert!(pack_row(DType::Q8_0, &[0u8; 34], &mut d).is_err());
        let mut d = vec![0u8; 19];
        assert!(pack_row(DType::Q4_0, &[0u8; 19], &mut d).is_err());
        let mut d = vec![0u8; 36];
        assert!(unpack_row(DType::Q4_0, &[0u8; 18], &mut d).is_err());
    }
}
