//! The 5-bit, IQ4 and K-quant block decoders against gguf-py's `gguf.quants.dequantize`,
//! bit for bit, on every SIMD path this CPU has (fixture: `fixtures/dequant.bin`, made by
//! `fixtures/make_dequant_fixture.py`).

use std::sync::{Mutex, MutexGuard};

use tpi_kernels::{
    available_isas, dequantize_row, detected_isa, gemm, gemv, set_isa, DType, Isa, MatRef,
    ThreadPool,
};

fn lock() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

struct Entry {
    dtype: DType,
    bytes: Vec<u8>,
    want: Vec<f32>,
}

fn u32_at(b: &[u8], at: &mut usize) -> u32 {
    let v = u32::from_le_bytes(b[*at..*at + 4].try_into().unwrap());
    *at += 4;
    v
}

fn fixture() -> Vec<Entry> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dequant.bin");
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(&b[..7], b"TPIDQ1\n", "{path}: not a dequant fixture");
    let mut at = 7;
    let n = u32_at(&b, &mut at);
    (0..n)
        .map(|_| {
            let id = u32_at(&b, &mut at);
            let elems = u32_at(&b, &mut at) as usize;
            let nbytes = u32_at(&b, &mut at) as usize;
            let dtype = DType::from_ggml_type_id(id).unwrap_or_else(|e| panic!("fixture: {e}"));
            let bytes = b[at..at + nbytes].to_vec();
            at += nbytes;
            let want = b[at..at + 4 * elems]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            at += 4 * elems;
            Entry { dtype, bytes, want }
        })
        .collect()
}

#[test]
fn decoders_equal_gguf_py_bit_for_bit_on_every_path() {
    let _g = lock();
    let entries = fixture();
    let covered: Vec<DType> = entries.iter().map(|e| e.dtype).collect();
    for d in DType::ALL.into_iter().filter(|d| d.block_len() > 1) {
        assert!(covered.contains(&d), "the fixture has no {d} entry");
    }
    for isa in available_isas() {
        set_isa(isa).unwrap();
        for e in &entries {
            let mut got = vec![f32::NAN; e.want.len()];
            dequantize_row(e.dtype, &e.bytes, &mut got);
            for (i, (g, w)) in got.iter().zip(&e.want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{} on {isa:?}, element {i}: tpi {g}, gguf-py {w}",
                    e.dtype
                );
            }
            // Row by row in pieces of one block decode the same values.
            let (bl, bb) = (e.dtype.block_len(), e.dtype.block_bytes());
            for (k, blk) in e.bytes.chunks_exact(bb).enumerate() {
                let mut one = vec![0.0f32; bl];
                dequantize_row(e.dtype, blk, &mut one);
                assert_eq!(
                    one[..],
                    e.want[k * bl..(k + 1) * bl],
                    "{} block {k}",
                    e.dtype
                );
            }
        }
    }
    set_isa(detected_isa()).unwrap();
}

/// GEMV and GEMM on the fixture's blocks (odd row counts, a column slice, 1 and 2 threads)
/// equal the f64 dot products of gguf-py's values within f32 rounding.
#[test]
fn gemv_and_gemm_on_gguf_py_values() {
    let _g = lock();
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    for e in fixture() {
        let bl = e.dtype.block_len();
        let total = e.want.len();
        // The fixture as a matrix of `rows` rows of `cols` columns, then a slice of it.
        for (rows, cols) in [(1, total), (total / (2 * bl), 2 * bl), (total / bl, bl)] {
            let rb = e.dtype.row_bytes(cols).unwrap();
            let w = MatRef::new(e.dtype, rows, cols, &e.bytes[..rows * rb]).unwrap();
            let views = if cols >= 2 * bl {
                vec![w, w.cols_range(bl, cols).unwrap()]
            } else {
                vec![w]
            };
            for w in views {
                let c0 = (cols - w.cols) / bl * bl;
                let n = 3;
                let x: Vec<f32> = (0..n * w.cols)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                for isa in available_isas() {
                    set_isa(isa).unwrap();
                    for pool in &pools {
                        let mut y1 = vec![f32::NAN; w.rows];
                        gemv(pool, w, &x[..w.cols], &mut y1).unwrap();
                        let mut yn = vec![f32::NAN; n * w.rows];
                        gemm(pool, w, &x, n, &mut yn).unwrap();
                        for t in 0..n {
                            for r in 0..w.rows {
                                let vals = &e.want[r * cols + c0..(r + 1) * cols];
                                let xs = &x[t * w.cols..(t + 1) * w.cols];
                                let want: f64 = vals
                                    .iter()
                                    .zip(xs)
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum();
                                let mag: f64 = vals
                                    .iter()
                                    .zip(xs)
                                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                                    .sum();
                                // The VNNI and AVX2 paths (and AVX-512's K-quants) may
                                // quantise x to 15-bit integers per 32-block (per 256 for
                                // the K-quants): an error of max|x_b| / 65024 per element.
                                let chunk = if bl == 256 { 256 } else { 32 };
                                let act: f64 =
                                    if matches!(isa, Isa::Avx512Vnni | Isa::Avx2 | Isa::Avx512) {
                                        vals.chunks(chunk)
                                            .zip(xs.chunks(chunk))
                                            .map(|(wb, xb)| {
                                                let amax = xb
                                                    .iter()
                                                    .fold(0.0f64, |m, v| m.max(v.abs() as f64));
                                                amax / 65024.0
                                                    * wb.iter().map(|v| v.abs() as f64).sum::<f64>()
                                            })
                                            .sum()
                                    } else {
                                        0.0
                                    };
                                let got = yn[t * w.rows + r];
                                let ctx =
                                    format!("{} {isa:?} {}x{} t{t} r{r}", e.dtype, w.rows, w.cols);
                                assert!(
                                    (got as f64 - want).abs() <= 1e-5 * mag + 1e-30,
                                    "gemm {ctx}: {got} vs {want}"
                                );
                                if t == 0 {
                                    let g = y1[r];
                                    assert!(
                                        (g as f64 - want).abs() <= 1e-5 * mag + act + 1e-30,
                                        "gemv {ctx}: {g} vs {want}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    set_isa(detected_isa()).unwrap();
}
