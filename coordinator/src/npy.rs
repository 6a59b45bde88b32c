//! Writes float32 `.npy` files (NumPy format 1.0), for `--logits-out`.

use std::io::Write;
use std::path::Path;

/// Writes `rows` (each of equal length) as a little-endian float32 array of shape [rows, cols].
pub fn write_f32_2d(path: &Path, rows: &[Vec<f32>], cols: usize) -> std::io::Result<()> {
    let header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
        rows.len(),
        cols
    );
    // Magic (6) + version (2) + header length (2) + header + '\n', padded to 64 bytes.
    let unpadded = 10 + header.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let mut out = Vec::with_capacity(unpadded + pad + rows.len() * cols * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&((header.len() + pad + 1) as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad));
    out.push(b'\n');
    for r in rows {
        if r.len() != cols {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "ragged logits rows",
            ));
        }
        for v in r {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mut f = std::fs::File::create(path)?;
    f.write_all(&out)?;
    f.sync_all()
}

/// Reads a float32 2-D `.npy` written by NumPy or [`write_f32_2d`]: (shape, data).
pub fn read_f32_2d(path: &Path) -> std::io::Result<((usize, usize), Vec<f32>)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let b = std::fs::read(path)?;
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(bad("not an npy file"));
    }
    let (hlen, hstart) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        _ => return Err(bad("unsupported npy version")),
    };
    let header = std::str::from_utf8(
        b.get(hstart..hstart + hlen)
            .ok_or_else(|| bad("truncated"))?,
    )
    .map_err(|_| bad("header not utf-8"))?;
    if !header.contains("'<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("expected little-endian float32, C order"));
    }
    let shape_s = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let dims: Vec<usize> = shape_s
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let (r, c) = match dims[..] {
        [r, c] => (r, c),
        [c] => (1, c),
        _ => return Err(bad("expected a 2-D array")),
    };
    let data = &b[hstart + hlen..];
    if data.len() != r * c * 4 {
        return Err(bad("data length does not match shape"));
    }
    let v = data
        .chunks_exact(4)
        .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
        .collect();
    Ok(((r, c), v))
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("tpi-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        let rows = vec![vec![1.0f32, 2.0, 3.5], vec![-1.0, 0.0, 1e-8]];
        super::write_f32_2d(&p, &rows, 3).unwrap();
        let (shape, data) = super::read_f32_2d(&p).unwrap();
        assert_eq!(shape, (2, 3));
        assert_eq!(data, rows.concat());
        let len = std::fs::metadata(&p).unwrap().len() as usize;
        assert_eq!((len - 24) % 64, 0);
    }
}
