//! Kernel correctness against f64 scalar references, on every available ISA and 1/2 threads.

#![allow(clippy::needless_range_loop)]

use std::sync::{Mutex, MutexGuard};

use half::f16;
use tpi_kernels::bench::XorShift;
use tpi_kernels::*;

/// ISA switching is process-global; tests that depend on it hold this lock.
static ISA_LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    ISA_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `f` once per available ISA (holding the lock), restoring the detected ISA afterwards.
fn for_each_isa(mut f: impl FnMut(Isa)) {
    let _g = lock();
    for isa in available_isas() {
        set_isa(isa).unwrap();
        assert_eq!(active_isa(), isa);
        f(isa);
    }
    set_isa(detected_isa()).unwrap();
}

struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        ((self.u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

fn h(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Independent reference dequantisation straight from the GGML layout definitions.
fn ref_dequant(dtype: DType, data: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    match dtype {
        DType::F32 => {
            for i in 0..n {
                out[i] = f32::from_le_bytes(data[4 * i..4 * i + 4].try_into().unwrap());
            }
        }
        DType::F16 => {
            for i in 0..n {
                out[i] = h(&data[2 * i..]);
            }
        }
        DType::BF16 => {
            for i in 0..n {
                out[i] = f32::from_bits(
                    (u16::from_le_bytes([data[2 * i], data[2 * i + 1]]) as u32) << 16,
                );
            }
        }
        DType::Q8_0 => {
            for i in 0..n {
                let b = &data[(i / 32) * 34..];
                out[i] = (b[2 + i % 32] as i8) as f32 * h(b);
            }
        }
        DType::Q4_0 => {
            for i in 0..n {
                let b = &data[(i / 32) * 18..];
                let j = i % 32;
                let nib = if j < 16 {
                    b[2 + j] & 15
                } else {
                    b[2 + j - 16] >> 4
                };
                out[i] = (nib as i32 - 8) as f32 * h(b);
            }
        }
        DType::Q4_1 => {
            for i in 0..n {
                let b = &data[(i / 32) * 20..];
                let j = i % 32;
                let nib = if j < 16 {
                    b[4 + j] & 15
                } else {
                    b[4 + j - 16] >> 4
                };
                out[i] = nib as f32 * h(b) + h(&b[2..]);
            }
        }
        // The 5-bit, IQ4 and K-quant decoders are checked against gguf-py bit for bit on
        // every path (tests/ggml_blocks.rs), so they serve as their own reference here.
        _ => dequantize_row(dtype, &data[..dtype.row_bytes(n).unwrap()], &mut out),
    }
    out
}

/// Random matrix bytes (rows x cols) quantised from uniform data, with an optional stride padding.
fn rand_matrix(
    rng: &mut Rng,
    dtype: DType,
    rows: usize,
    cols: usize,
    pad: usize,
) -> (Vec<u8>, usize) {
    let rb = dtype.row_bytes(cols).unwrap();
    let stride = rb + pad;
    let mut data = vec![0xAAu8; rows * stride];
    for r in 0..rows {
        let row = &mut data[r * stride..r * stride + rb];
        if dtype.can_quantize() {
            quantize_row(dtype, &rng.vec(cols), row);
        } else {
            tpi_kernels::bench::random_blocks(&mut XorShift(rng.u64() | 1), dtype, row);
        }
    }
    (data, stride)
}

/// f64 reference `W x`, `sum |w x|` per row, and the worst-case error of the VNNI path's
/// 15-bit activations per row: `sum_b max|x_b| / 65024 * sum_{i in b} |w_i|`.
fn ref_matvec(w: &MatRef, x: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; w.rows];
    let mut mag = vec![0.0; w.rows];
    let mut act = vec![0.0; w.rows];
    for r in 0..w.rows {
        let wr = ref_dequant(w.dtype, w.row(r), w.cols);
        for c in 0..w.cols {
            let p = wr[c] as f64 * x[c] as f64;
            y[r] += p;
            mag[r] += p.abs();
        }
        // The integer paths scale x per 32-block, or per 256-block for the K-quants.
        let chunk = if w.dtype.block_len() == 256 { 256 } else { 32 };
        for (wb, xb) in wr.chunks(chunk).zip(x.chunks(chunk)) {
            let amax = xb.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
            act[r] += amax / 65024.0 * wb.iter().map(|v| v.abs() as f64).sum::<f64>();
        }
    }
    (y, mag, act)
}

/// ISAs whose Q4/Q8 GEMV quantises x to 15-bit integers per block.
const INT_ACT_ISAS: [Isa; 2] = [Isa::Avx512Vnni, Isa::Avx2];

/// The activation-quantisation allowance: only the VNNI and AVX2 paths quantise x (for
/// Q4/Q8 weights).
fn act_allowance(isa: Isa, dtype: DType, act: f64) -> f64 {
    let k = match isa {
        Isa::Avx512Vnni => matches!(
            dtype,
            DType::Q2K
                | DType::Q3K
                | DType::Q4K
                | DType::Q5K
                | DType::Q6K
                | DType::IQ4XS
                | DType::Q5_0
                | DType::Q5_1
                | DType::IQ4NL
        ),
        Isa::Avx2 | Isa::Avx512 => {
            matches!(
                dtype,
                DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K | DType::IQ4XS
            )
        }
        _ => false,
    };
    let b32 = matches!(isa, Isa::Avx2 | Isa::Avx512)
        && matches!(dtype, DType::Q5_0 | DType::Q5_1 | DType::IQ4NL);
    if k || b32
        || INT_ACT_ISAS.contains(&isa) && matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q8_0)
    {
        act
    } else {
        0.0
    }
}

fn assert_close(got: f32, want: f64, mag: f64, tol: f64, ctx: &str) {
    assert_close_plus(got, want, mag, tol, 0.0, ctx)
}

/// `assert_close` with an extra absolute allowance (the VNNI activation bound).
fn assert_close_plus(got: f32, want: f64, mag: f64, tol: f64, extra: f64, ctx: &str) {
    let err = (got as f64 - want).abs();
    assert!(
        err <= tol * mag.max(1e-30) + extra + 1e-30,
        "{ctx}: got {got}, want {want}, err {err}, mag {mag}"
    );
}

#[test]
fn dtype_properties() {
    let expect = [
        (1, 4, "f32"),
        (1, 2, "f16"),
        (1, 2, "bf16"),
        (32, 34, "q8_0"),
        (32, 18, "q4_0"),
        (32, 20, "q4_1"),
        (32, 22, "q5_0"),
        (32, 24, "q5_1"),
        (32, 18, "iq4_nl"),
        (256, 84, "q2_k"),
        (256, 110, "q3_k"),
        (256, 144, "q4_k"),
        (256, 176, "q5_k"),
        (256, 210, "q6_k"),
        (256, 136, "iq4_xs"),
    ];
    assert_eq!(expect.len(), DType::ALL.len());
    for (d, (bl, bb, name)) in DType::ALL.iter().zip(expect) {
        assert_eq!(d.block_len(), bl);
        assert_eq!(d.block_bytes(), bb);
        assert_eq!(d.name(), name);
        assert_eq!(d.row_bytes(512), Some(512 / bl * bb));
        assert_eq!(DType::from_name(name), Some(*d));
        assert_eq!(DType::from_name(&name.to_uppercase()), Some(*d));
        assert_eq!(DType::from_ggml_type_id(d.ggml_type_id()), Ok(*d));
        assert_eq!(d.bytes_per_weight(), bb as f64 / bl as f64);
    }
    assert_eq!(DType::Q4K.row_bytes(128), None);
    assert_eq!(DType::from_ggml_type_id(16).unwrap_err(), "iq2_xxs");
    assert_eq!(DType::from_ggml_type_id(39).unwrap_err(), "mxfp4");
    assert_eq!(DType::from_ggml_type_id(99).unwrap_err(), "ggml type 99");
    assert_eq!(DType::Q4_1.row_bytes(33), None);
    assert_eq!(DType::F16.row_bytes(33), Some(66));
}

#[test]
fn matref_validation() {
    let data = vec![0u8; 3 * 40];
    assert!(MatRef::new(DType::Q4_1, 3, 64, &data).is_ok());
    assert!(matches!(
        MatRef::new(DType::Q4_1, 3, 64, &data[..119]),
        Err(KernelError::DataLength { .. })
    ));
    assert!(matches!(
        MatRef::new(DType::Q4_1, 3, 48, &data),
        Err(KernelError::UnalignedCols { .. })
    ));
    assert!(matches!(
        MatRef::with_stride(DType::Q4_1, 3, 64, 39, &data),
        Err(KernelError::Stride { .. })
    ));
    // stride 50 needs 2*50+40 = 140 bytes
    assert!(MatRef::with_stride(DType::Q4_1, 3, 64, 50, &data).is_err());
    let big = vec![0u8; 140];
    let m = MatRef::with_stride(DType::Q4_1, 3, 64, 50, &big).unwrap();
    assert_eq!(m.weight_bytes(), 120);
    assert_eq!(m.row(2).len(), 40);
    assert!(m.rows_range(2, 1).is_err());
    assert!(m.rows_range(0, 4).is_err());
    let s = m.rows_range(1, 3).unwrap();
    assert_eq!((s.rows, s.data.len()), (2, 90));
    assert!(m.rows_range(3, 3).unwrap().rows == 0);
    assert!(m.cols_range(16, 64).is_err());
    assert!(m.cols_range(0, 96).is_err());
    let c = m.cols_range(32, 64).unwrap();
    assert_eq!((c.cols, c.row_stride, c.row(0).len()), (32, 50, 20));
    assert_eq!(c.row(1).as_ptr(), big[70..].as_ptr());
    let e = KernelError::Shape {
        what: "x",
        expected: 3,
        actual: 4,
    };
    assert!(e.to_string().contains("x has length 4"));
    let _: &dyn std::error::Error = &e;
}

#[test]
fn quant_layouts_and_roundtrip() {
    let mut rng = Rng::new(1);
    for dtype in DType::ALL.into_iter().filter(|d| d.can_quantize()) {
        let n = if dtype.block_len() == 32 { 32 * 7 } else { 37 };
        let mut x = rng.vec(n);
        x[3] = 0.0;
        let mut q = vec![0u8; dtype.row_bytes(n).unwrap()];
        quantize_row(dtype, &x, &mut q);
        let want = ref_dequant(dtype, &q, n);
        for_each_isa(|isa| {
            let mut got = vec![0.0f32; n];
            dequantize_row(dtype, &q, &mut got);
            for i in 0..n {
                assert_eq!(
                    got[i].to_bits(),
                    want[i].to_bits(),
                    "{dtype:?} {isa:?} elem {i}"
                );
            }
        });
        // Round-trip error bounds from the GGML rounding rules.
        for (b, xb) in x.chunks(32).enumerate() {
            let (amax, min, max) = xb
                .iter()
                .fold((0f32, f32::MAX, f32::MIN), |(a, mi, ma), v| {
                    (a.max(v.abs()), mi.min(*v), ma.max(*v))
                });
            let bound = match dtype {
                DType::F32 => 0.0,
                DType::F16 => amax * 1e-3,
                DType::BF16 => amax * 4e-3,
                DType::Q8_0 => amax / 127.0 * 0.5 + amax * 1e-3,
                // The value opposite the extreme maps to +8 and is clamped to 7: up to one full step.
                DType::Q4_0 => amax / 8.0 + amax * 1e-3,
                DType::Q4_1 => (max - min) / 15.0 * 0.5 + (max - min) * 2e-3 + min.abs() * 1e-3,
                // As Q4_0/Q4_1 with 5-bit steps.
                DType::Q5_0 => amax / 16.0 + amax * 1e-3,
                DType::Q5_1 => (max - min) / 31.0 * 0.5 + (max - min) * 2e-3 + min.abs() * 1e-3,
                _ => unreachable!("{dtype} is not quantised here"),
            };
            for (i, v) in xb.iter().enumerate() {
                let err = (want[b * 32 + i] - v).abs();
                assert!(
                    err <= bound + 1e-7,
                    "{dtype:?} block {b} elem {i}: {v} vs {}",
                    want[b * 32 + i]
                );
            }
        }
    }
}

#[test]
fn quant_reference_examples() {
    // Q8_0: amax 127 -> d = 1, values round half away from zero.
    let mut x = [0.0f32; 32];
    x[0] = 127.0;
    x[1] = -2.5;
    x[2] = 2.5;
    x[3] = 0.49;
    let mut q = [0u8; 34];
    quantize_row(DType::Q8_0, &x, &mut q);
    assert_eq!(h(&q), 1.0);
    assert_eq!(&q[2..6], &[127u8, (-3i8) as u8, 3, 0]);
    // Q4_0: max-magnitude value -16 -> d = 2; element 16 goes to the high nibble of byte 0.
    let mut x = [0.0f32; 32];
    x[0] = -16.0;
    x[16] = 14.0;
    x[1] = 3.0; // 3/2 + 8.5 = 10 -> 10
    let mut q = [0u8; 18];
    quantize_row(DType::Q4_0, &x, &mut q);
    assert_eq!(h(&q), 2.0);
    assert_eq!(q[2], 15 << 4); // low nibble 0 (element 0), high nibble 15 (element 16)
    assert_eq!(q[3] & 15, 10);
    assert_eq!(q[3] >> 4, 8);
    // Q4_1: min -1, max 14 -> d = 1, m = -1.
    let mut x = [0.0f32; 32];
    x[0] = -1.0;
    x[17] = 14.0;
    x[2] = 1.6; // (1.6+1)+0.5 = 3.1 -> 3
    let mut q = [0u8; 20];
    quantize_row(DType::Q4_1, &x, &mut q);
    assert_eq!((h(&q), h(&q[2..])), (1.0, -1.0));
    assert_eq!(q[4], 1 << 4); // element 0 -> 0, element 16 -> 1
    assert_eq!(q[5], 1 | (15 << 4));
    assert_eq!(q[6] & 15, 3);
    // All-zero block: d = 0 and id = 0, no NaNs.
    let mut q = [0u8; 20];
    quantize_row(DType::Q4_1, &[0.0; 32], &mut q);
    let mut out = [1.0f32; 32];
    dequantize_row(DType::Q4_1, &q, &mut out);
    assert!(out.iter().all(|v| *v == 0.0));
    // BF16 rounds to nearest even.
    let mut b = [0u8; 2];
    quantize_row(DType::BF16, &[f32::from_bits(0x3f80_8000)], &mut b);
    assert_eq!(u16::from_le_bytes(b), 0x3f80);
    quantize_row(DType::BF16, &[f32::from_bits(0x3f81_8000)], &mut b);
    assert_eq!(u16::from_le_bytes(b), 0x3f82);
}

fn is_q4(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_0 | DType::Q4_1)
}

/// `data` (rows of `stride` bytes, `cols` columns) copied into `buf` with every row packed,
/// as a packed view.
fn packed_view<'a>(
    dtype: DType,
    data: &[u8],
    (rows, cols, stride): (usize, usize, usize),
    buf: &'a mut Vec<u8>,
) -> MatRef<'a> {
    let rb = dtype.row_bytes(cols).unwrap();
    *buf = data.to_vec();
    for r in 0..rows {
        let s = r * stride;
        pack_row(dtype, &data[s..s + rb], &mut buf[s..s + rb]).unwrap();
    }
    MatRef::with_stride(dtype, rows, cols, stride, buf)
        .unwrap()
        .with_layout(Layout::Packed)
        .unwrap()
}

fn check_gemv_case(rng: &mut Rng, dtype: DType, rows: usize, cols: usize, pad: usize, slice: bool) {
    // Q4 slices start on a packed group, so the packed copy slices the same columns.
    let c0 = if is_q4(dtype) {
        tpi_kernels::layout::unit_cols(dtype)
    } else {
        dtype.block_len().max(32)
    };
    // A packed slice ends on a unit or at the row's end: Q4 slices run to the row's end.
    let full_cols = match (slice, is_q4(dtype)) {
        (false, _) => cols,
        (true, true) => c0 + cols,
        (true, false) => cols + 2 * c0,
    };
    let (data, stride) = rand_matrix(rng, dtype, rows, full_cols, pad);
    let mut w = MatRef::with_stride(dtype, rows, full_cols, stride, &data).unwrap();
    let mut buf = Vec::new();
    let mut views = vec![];
    if is_q4(dtype) {
        let wp = packed_view(dtype, &data, (rows, full_cols, stride), &mut buf);
        views.push(if slice {
            wp.cols_range(c0, c0 + cols).unwrap()
        } else {
            wp
        });
    }
    if slice {
        w = w.cols_range(c0, c0 + cols).unwrap();
    }
    views.insert(0, w);
    let x = rng.vec(cols);
    let (want, mag, act) = ref_matvec(&w, &x);
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    for w in &views {
        check_gemv_view(*w, &x, (&want, &mag, &act), &pools);
    }
    // Packing moves bytes, not arithmetic: every path gives the GGML layout's bits.
    if let [g, p] = views[..] {
        for_each_isa(|isa| {
            let (mut yg, mut yp) = (vec![0.0; rows], vec![0.0; rows]);
            gemv(&pools[0], g, &x, &mut yg).unwrap();
            gemv(&pools[0], p, &x, &mut yp).unwrap();
            assert!(
                yg.iter().zip(&yp).all(|(a, b)| a.to_bits() == b.to_bits()),
                "packed gemv {dtype:?} {isa:?} {rows}x{cols} differs from GGML"
            );
        });
    }
}

fn check_gemv_view(
    w: MatRef,
    x: &[f32],
    (want, mag, act): (&[f64], &[f64], &[f64]),
    pools: &[ThreadPool],
) {
    let (dtype, rows, cols) = (w.dtype, w.rows, w.cols);
    let layout = w.layout;
    for_each_isa(|isa| {
        let mut first: Option<Vec<f32>> = None;
        for pool in pools {
            let mut y = vec![f32::NAN; rows];
            gemv(pool, w, x, &mut y).unwrap();
            for r in 0..rows {
                let ctx = format!(
                    "gemv {dtype:?} {layout:?} {isa:?} {rows}x{cols} t{} row {r}",
                    pool.n_threads()
                );
                let extra = act_allowance(isa, dtype, act[r]);
                assert_close_plus(y[r], want[r], mag[r], 1e-5, extra, &ctx);
            }
            match &first {
                None => first = Some(y),
                Some(f) => assert!(
                    f.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "gemv {dtype:?} {isa:?} not deterministic across thread counts"
                ),
            }
        }
    });
}

#[test]
fn gemv_matches_reference() {
    let mut rng = Rng::new(2);
    for dtype in DType::ALL {
        let cols_list: &[usize] = match dtype.block_len() {
            1 => &[1, 7, 33, 67, 577],
            32 => &[32, 96, 576],
            _ => &[256, 768, 1280],
        };
        for &rows in &[1usize, 3, 17, 33] {
            for &cols in cols_list {
                check_gemv_case(&mut rng, dtype, rows, cols, 0, false);
            }
        }
    }
}

#[test]
fn gemv_strided_and_sliced() {
    let mut rng = Rng::new(3);
    for dtype in DType::ALL {
        let cols = match dtype.block_len() {
            1 => 45,
            32 => 128,
            _ => 512,
        };
        check_gemv_case(&mut rng, dtype, 17, cols, 6, false);
        check_gemv_case(&mut rng, dtype, 33, cols, 0, true);
        check_gemv_case(&mut rng, dtype, 5, cols, 3, true);
    }
}

#[test]
fn gemv_offset_weights() {
    // Blocks far from zero-mean stress the Q4 "d*sum(q*x) + m*sum(x)" decompositions.
    let mut rng = Rng::new(9);
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
        for offset in [5.0f32, -3.0, 100.0] {
            let (rows, cols) = (9, 192);
            let rb = dtype.row_bytes(cols).unwrap();
            let mut data = vec![0u8; rows * rb];
            for r in 0..rows {
                let v: Vec<f32> = rng.vec(cols).iter().map(|v| v * 0.1 + offset).collect();
                quantize_row(dtype, &v, &mut data[r * rb..(r + 1) * rb]);
            }
            let w = MatRef::new(dtype, rows, cols, &data).unwrap();
            let x = rng.vec(cols);
            let (want, mag, act) = ref_matvec(&w, &x);
            for_each_isa(|isa| {
                for pool in &pools {
                    let mut y = vec![0.0; rows];
                    gemv(pool, w, &x, &mut y).unwrap();
                    for r in 0..rows {
                        assert_close_plus(
                            y[r],
                            want[r],
                            mag[r],
                            1e-5,
                            act_allowance(isa, dtype, act[r]),
                            &format!("offset {offset} {dtype:?} {isa:?}"),
                        );
                    }
                }
            });
        }
    }
}

#[test]
fn int_activation_gemv_exact_when_x_is_representable() {
    // x = s * X with integer |X| <= 32512 and one |X| = 32512 per block is exactly what the
    // VNNI and AVX2 paths' 15-bit activations hold, so they must match the f64 reference
    // with no quantisation allowance: this pins every lane mapping (VNNI: Q4_0 octets
    // followed by each mix of group, pair and lone block; Q4_1 groups and pairs; 1-row
    // tails; AVX2: nibble and byte order, Q4_1's m term).
    let isas: Vec<Isa> = INT_ACT_ISAS
        .into_iter()
        .filter(|i| available_isas().contains(i))
        .collect();
    #[cfg(target_arch = "x86_64")]
    assert!(!isas.is_empty(), "an x86_64 test machine has at least AVX2");
    let _ = &isas;
    let mut rng = Rng::new(21);
    let pool = ThreadPool::new(1);
    for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
        for (rows, cols) in [
            (7, 32),
            (3, 64),
            (5, 96),
            (6, 192),
            (9, 288),
            (5, 448),
            (4, 544),
            (3, 608),
            (5, 256),
            (4, 384),
            (6, 416),
            (3, 480),
            (5, 576),
            (2, 768),
            (3, 320),
            (4, 352),
        ] {
            let (data, stride) = rand_matrix(&mut rng, dtype, rows, cols, 0);
            let w = MatRef::with_stride(dtype, rows, cols, stride, &data).unwrap();
            let mut buf = Vec::new();
            let mut views = vec![w];
            if is_q4(dtype) {
                views.push(packed_view(dtype, &data, (rows, cols, stride), &mut buf));
            }
            let mut x: Vec<f32> = rng
                .vec(cols)
                .iter()
                .map(|v| (v * 32512.0).round().clamp(-32512.0, 32512.0) / 4096.0)
                .collect();
            for (b, xb) in x.chunks_mut(32).enumerate() {
                xb[b % 32] = if b % 2 == 0 { 32512.0 } else { -32512.0 } / 4096.0;
            }
            let (want, mag, _) = ref_matvec(&w, &x);
            for_each_isa(|isa| {
                if !isas.contains(&isa) {
                    return;
                }
                for w in &views {
                    let l = w.layout;
                    let mut y = vec![f32::NAN; rows];
                    gemv(&pool, *w, &x, &mut y).unwrap();
                    for r in 0..rows {
                        let ctx = format!("{isa:?} exact {dtype:?} {l:?} {rows}x{cols} row {r}");
                        assert_close(y[r], want[r], mag[r], 1e-6, &ctx);
                    }
                    // A NaN in x reaches every output, as with f32 activations.
                    let mut xn = x.clone();
                    xn[cols - 1] = f32::NAN;
                    gemv(&pool, *w, &xn, &mut y).unwrap();
                    assert!(y.iter().all(|v| v.is_nan()), "{dtype:?} {l:?}: NaN lost");
                }
            });
        }
    }
}

#[test]
fn gemv_large_parallel() {
    // Big enough to be split into many tasks.
    let mut rng = Rng::new(4);
    for dtype in [DType::Q4_1, DType::Q8_0, DType::F16] {
        check_gemv_case(&mut rng, dtype, 1031, 1536, 0, false);
    }
}

#[test]
fn packed_gemm_equals_ggml_gemm() {
    // Prefill unpacks each packed panel, so it must give the GGML layout's bits exactly,
    // also for column slices that start on a group and run to the row's end.
    let mut rng = Rng::new(15);
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    for dtype in [DType::Q4_0, DType::Q4_1] {
        let u = tpi_kernels::layout::unit_cols(dtype);
        for &(rows, cols, c0) in &[(5usize, 96usize, 0usize), (33, 544, 0), (40, 800, u)] {
            let (data, stride) = rand_matrix(&mut rng, dtype, rows, cols, 4);
            let mut buf = Vec::new();
            let w = MatRef::with_stride(dtype, rows, cols, stride, &data).unwrap();
            let wp = packed_view(dtype, &data, (rows, cols, stride), &mut buf);
            let (w, wp) = (
                w.cols_range(c0, cols).unwrap(),
                wp.cols_range(c0, cols).unwrap(),
            );
            let k = cols - c0;
            for n in [2usize, 5, 13] {
                let x = rng.vec(n * k);
                for_each_isa(|isa| {
                    for pool in &pools {
                        let mut y = vec![f32::NAN; n * rows];
                        let mut yp = vec![f32::NAN; n * rows];
                        gemm(pool, w, &x, n, &mut y).unwrap();
                        gemm(pool, wp, &x, n, &mut yp).unwrap();
                        assert!(
                            y.iter().zip(&yp).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "packed gemm {dtype:?} {isa:?} {rows}x{k} n{n}"
                        );
                    }
                });
            }
        }
    }
}

#[test]
fn packed_views_keep_whole_groups() {
    let mut rng = Rng::new(16);
    let (rows, cols) = (3, 416);
    let mut buf = Vec::new();
    let (data, stride) = rand_matrix(&mut rng, DType::Q4_1, rows, cols, 0);
    let wp = packed_view(DType::Q4_1, &data, (rows, cols, stride), &mut buf);
    assert!(wp.cols_range(128, 256).is_ok());
    assert!(wp.cols_range(256, 416).is_ok());
    assert!(
        wp.cols_range(32, 416).is_err(),
        "a slice must start on a group"
    );
    assert!(
        wp.cols_range(0, 160).is_err(),
        "a slice must end on a group or the row end"
    );
    // Q4_0 slices keep whole octets.
    let (data, stride) = rand_matrix(&mut rng, DType::Q4_0, rows, cols, 0);
    let wp = packed_view(DType::Q4_0, &data, (rows, cols, stride), &mut buf);
    assert!(wp.cols_range(256, 416).is_ok());
    assert!(wp.cols_range(0, 256).is_ok());
    assert!(
        wp.cols_range(128, 416).is_err(),
        "a Q4_0 slice must start on an octet"
    );
    assert_eq!(wp.rows_range(1, 3).unwrap().layout, Layout::Packed);
    let f = MatRef::new(DType::F32, 1, 8, &[0u8; 32]).unwrap();
    assert!(f.with_layout(Layout::Packed).is_err());
    assert!(MatRef::new(DType::Q8_0, 1, 32, &[0u8; 34])
        .unwrap()
        .with_layout(Layout::Packed)
        .is_err());
}

#[test]
fn gemm_matches_reference() {
    let mut rng = Rng::new(5);
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    for dtype in DType::ALL {
        let cols_list: &[usize] = match dtype.block_len() {
            1 => &[5, 67, 300],
            32 => &[64, 320],
            _ => &[256, 512],
        };
        let off = dtype.block_len().max(32);
        for &rows in &[1usize, 3, 33, 70] {
            for &cols in cols_list {
                for &n in &[1usize, 2, 5, 7, 13] {
                    let (data, stride) = rand_matrix(&mut rng, dtype, rows, cols + off, 4);
                    let w = MatRef::with_stride(dtype, rows, cols + off, stride, &data).unwrap();
                    let w = w.cols_range(off, off + cols).unwrap();
                    let x = rng.vec(n * cols);
                    let mut want = vec![(0.0f64, 0.0f64, 0.0f64); n * rows];
                    for t in 0..n {
                        let (y, m, a) = ref_matvec(&w, &x[t * cols..(t + 1) * cols]);
                        for r in 0..rows {
                            want[t * rows + r] = (y[r], m[r], a[r]);
                        }
                    }
                    for_each_isa(|isa| {
                        let mut first: Option<Vec<f32>> = None;
                        for pool in &pools {
                            let mut y = vec![f32::NAN; n * rows];
                            gemm(pool, w, &x, n, &mut y).unwrap();
                            for i in 0..n * rows {
                                let ctx =
                                    format!("gemm {dtype:?} {isa:?} {rows}x{cols} n{n} idx {i}");
                                let (yw, mag, act) = want[i];
                                // n = 1 runs the GEMV kernels.
                                let act = if n == 1 { act } else { 0.0 };
                                let extra = act_allowance(isa, dtype, act);
                                assert_close_plus(y[i], yw, mag, 1e-5, extra, &ctx);
                            }
                            match &first {
                                None => first = Some(y),
                                Some(f) => assert!(f
                                    .iter()
                                    .zip(&y)
                                    .all(|(a, b)| a.to_bits() == b.to_bits())),
                            }
                        }
                    });
                }
            }
        }
    }
}

#[test]
fn gemv_gemm_shape_errors() {
    let pool = ThreadPool::new(2);
    let data = vec![0u8; 4 * 20];
    let w = MatRef::new(DType::Q4_1, 4, 32, &data).unwrap();
    let mut y = vec![0.0; 4];
    assert!(matches!(
        gemv(&pool, w, &[0.0; 31], &mut y),
        Err(KernelError::Shape { what: "x", .. })
    ));
    assert!(matches!(
        gemv(&pool, w, &[0.0; 32], &mut y[..3]),
        Err(KernelError::Shape { what: "y", .. })
    ));
    assert!(gemm(&pool, w, &[0.0; 64], 3, &mut [0.0; 12]).is_err());
    assert!(gemm(&pool, w, &[0.0; 96], 3, &mut [0.0; 11]).is_err());
    // Hand-built inconsistent view must be rejected, not read out of bounds.
    let bad = MatRef {
        dtype: DType::Q4_1,
        rows: 5,
        cols: 32,
        row_stride: 20,
        data: &data,
        layout: Layout::Ggml,
    };
    assert!(gemv(&pool, bad, &[0.0; 32], &mut [0.0; 5]).is_err());
    let bad = MatRef {
        dtype: DType::Q4_1,
        rows: 4,
        cols: 48,
        row_stride: 20,
        data: &data,
        layout: Layout::Ggml,
    };
    assert!(gemv(&pool, bad, &[0.0; 48], &mut [0.0; 4]).is_err());
    // The packed layout is only for Q4, also in a hand-built view.
    let bad = MatRef {
        dtype: DType::F32,
        rows: 1,
        cols: 8,
        row_stride: 32,
        data: &data[..32],
        layout: Layout::Packed,
    };
    assert!(gemv(&pool, bad, &[0.0; 8], &mut [0.0; 1]).is_err());
    // Empty shapes are fine.
    let e = MatRef::new(DType::F32, 0, 8, &[]).unwrap();
    gemv(&pool, e, &[0.0; 8], &mut []).unwrap();
    gemm(&pool, e, &[0.0; 16], 2, &mut []).unwrap();
}

#[test]
fn ops_match_reference() {
    let mut rng = Rng::new(6);
    for_each_isa(|isa| {
        for n in [1usize, 7, 64, 577] {
            let x = rng.vec(n);
            let wt = rng.vec(n);
            let mut out = vec![0.0; n];
            rmsnorm(&x, &wt, 1e-5, &mut out);
            let ms: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64;
            let r = 1.0 / (ms + 1e-5).sqrt();
            for i in 0..n {
                let want = x[i] as f64 * r * wt[i] as f64;
                assert!(
                    (out[i] as f64 - want).abs() <= 1e-5 * want.abs().max(1e-3),
                    "rmsnorm {isa:?}"
                );
            }
            let mut s: Vec<f32> = x.iter().map(|v| v * 30.0).collect();
            let mx = s.iter().fold(f32::MIN, |a, b| a.max(*b)) as f64;
            let den: f64 = s.iter().map(|v| (*v as f64 - mx).exp()).sum();
            let want: Vec<f64> = s.iter().map(|v| (*v as f64 - mx).exp() / den).collect();
            softmax(&mut s);
            for i in 0..n {
                assert!(
                    (s[i] as f64 - want[i]).abs() <= 1e-6 + 1e-5 * want[i],
                    "softmax"
                );
            }
            let mut g = x.clone();
            silu_mul(&mut g, &wt);
            for i in 0..n {
                let xv = x[i] as f64;
                let want = xv / (1.0 + (-xv).exp()) * wt[i] as f64;
                assert!((g[i] as f64 - want).abs() <= 1e-6, "silu_mul");
            }
            let mut a = x.clone();
            add_in_place(&mut a, &wt);
            for i in 0..n {
                assert_eq!(a[i], x[i] + wt[i]);
            }
        }
    });
    let mut big = [1000.0f32, 1000.0, -1000.0];
    softmax(&mut big);
    assert!((big[0] - 0.5).abs() < 1e-6 && big[2] == 0.0);
}

#[test]
fn rope_inv_freq_and_rotation() {
    let inv = rope_inv_freq(64, 10000.0, None);
    assert_eq!(inv.len(), 32);
    for (i, f) in inv.iter().enumerate() {
        let want = 1.0 / 10000f64.powf(2.0 * i as f64 / 64.0);
        assert!(((*f as f64) - want).abs() <= 2e-7 * want, "inv_freq {i}");
    }
    // Llama 3.1 scaling: high-frequency dims unchanged, low-frequency divided by factor, medium smoothed.
    let sc = Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let scaled = rope_inv_freq(128, 500000.0, Some(sc));
    let base = rope_inv_freq(128, 500000.0, None);
    for i in 0..64 {
        let f = base[i] as f64;
        let wl = 2.0 * std::f64::consts::PI / f;
        let want = if wl < 8192.0 / 4.0 {
            f
        } else if wl > 8192.0 {
            f / 8.0
        } else {
            let s = (8192.0 / wl - 1.0) / 3.0;
            (1.0 - s) * f / 8.0 + s * f
        };
        assert!(
            ((scaled[i] as f64) - want).abs() <= 1e-6 * want,
            "llama3 inv_freq {i}: {} vs {want}",
            scaled[i]
        );
    }
    assert_eq!(scaled[0], base[0]);
    assert_eq!(scaled[63], base[63] / 8.0);

    let mut rng = Rng::new(7);
    let (hd, nh, pos) = (64usize, 3usize, 1234usize);
    let x = rng.vec(hd * nh);
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        let mut y = x.clone();
        apply_rope(&mut y, hd, pos, &inv, layout);
        for h in 0..nh {
            for i in 0..hd / 2 {
                let (a, b) = match layout {
                    RopeLayout::HalfSplit => (h * hd + i, h * hd + i + hd / 2),
                    RopeLayout::Interleaved => (h * hd + 2 * i, h * hd + 2 * i + 1),
                };
                let ang = (pos as f32 * inv[i]) as f64;
                let (c, s) = (ang.cos(), ang.sin());
                let wa = x[a] as f64 * c - x[b] as f64 * s;
                let wb = x[b] as f64 * c + x[a] as f64 * s;
                assert!(
                    (y[a] as f64 - wa).abs() < 1e-6 && (y[b] as f64 - wb).abs() < 1e-6,
                    "{layout:?}"
                );
            }
        }
    }
    let mut z = x.clone();
    apply_rope(&mut z, hd, 0, &inv, RopeLayout::HalfSplit);
    assert_eq!(z, x);
}

#[allow(clippy::too_many_arguments)]
fn ref_attention(
    q: &[f32],
    n_tokens: usize,
    start: usize,
    sh: &AttnShape,
    k: &[f32],
    v: &[f32],
    cap: usize,
) -> Vec<f64> {
    let (nh, nkv, hd) = (sh.n_heads, sh.n_kv_heads, sh.head_dim);
    let mut out = vec![0.0; n_tokens * nh * hd];
    for t in 0..n_tokens {
        for h in 0..nh {
            let kvh = h / (nh / nkv);
            let qv = &q[(t * nh + h) * hd..][..hd];
            let p = start + t;
            // HF's sliding mask: kv_idx > q_idx - window.
            let seen: Vec<usize> = (0..=p)
                .filter(|&j| sh.window.is_none_or(|w| j as i64 > p as i64 - w as i64))
                .collect();
            let sc: Vec<f64> = seen
                .iter()
                .map(|&j| {
                    let kk = &k[(kvh * cap + j) * hd..][..hd];
                    qv.iter()
                        .zip(kk)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * sh.scale as f64
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
            let den: f64 = e.iter().sum();
            for (i, &j) in seen.iter().enumerate() {
                let vv = &v[(kvh * cap + j) * hd..][..hd];
                for d in 0..hd {
                    out[(t * nh + h) * hd + d] += e[i] / den * vv[d] as f64;
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_reference() {
    let mut rng = Rng::new(8);
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    for &(nh, nkv, hd, start, nt, cap, scale, window) in &[
        (4usize, 2usize, 16usize, 0usize, 1usize, 8usize, None, None),
        (6, 2, 33, 5, 4, 12, None, None),
        (9, 3, 64, 20, 3, 40, None, None),
        (2, 2, 8, 0, 7, 7, None, None),
        // Gemma-style: an explicit scale, and sliding windows shorter than, equal to and
        // longer than the context, over a prefill and a decode step.
        (4, 1, 16, 0, 9, 12, Some(0.11f32), Some(4usize)),
        (4, 1, 16, 6, 1, 12, Some(0.11), Some(4)),
        (4, 2, 8, 3, 5, 8, None, Some(8)),
        (4, 2, 8, 2, 3, 8, None, Some(1)),
        (4, 2, 8, 0, 6, 8, None, Some(100)),
    ] {
        let mut sh = AttnShape::causal(nh, nkv, hd);
        sh.window = window;
        if let Some(s) = scale {
            sh.scale = s;
        }
        let q = rng.vec(nt * nh * hd);
        let k = rng.vec(nkv * cap * hd);
        let v = rng.vec(nkv * cap * hd);
        let want = ref_attention(&q, nt, start, &sh, &k, &v, cap);
        // An f16 cache: the same attention over the rounded keys and values.
        let (k16, v16): (Vec<f16>, Vec<f16>) = (
            k.iter().map(|&x| f16::from_f32(x)).collect(),
            v.iter().map(|&x| f16::from_f32(x)).collect(),
        );
        let widen = |h: &[f16]| h.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let want16 = ref_attention(&q, nt, start, &sh, &widen(&k16), &widen(&v16), cap);
        for_each_isa(|isa| {
            for pool in &pools {
                let mut out = vec![f32::NAN; q.len()];
                attention(pool, &q, nt, start, &sh, &k, &v, cap, &mut out).unwrap();
                let mut out16 = vec![f32::NAN; q.len()];
                attention(pool, &q, nt, start, &sh, &k16, &v16, cap, &mut out16).unwrap();
                for i in 0..out.len() {
                    assert!(
                        (out[i] as f64 - want[i]).abs() < 2e-5,
                        "attention {isa:?} {sh:?} idx {i}: {} vs {}",
                        out[i],
                        want[i]
                    );
                    assert!(
                        (out16[i] as f64 - want16[i]).abs() < 2e-5,
                        "f16-cache attention {isa:?} {sh:?} idx {i}: {} vs {}",
                        out16[i],
                        want16[i]
                    );
                }
            }
        });
    }
    let pool = ThreadPool::new(2);
    let z = vec![0.0f32; 64];
    let mut o = vec![0.0f32; 16];
    let c = AttnShape::causal;
    assert!(attention(&pool, &z[..16], 1, 0, &c(4, 3, 4), &z, &z, 4, &mut o).is_err());
    assert!(attention(&pool, &z[..16], 1, 4, &c(4, 2, 4), &z, &z, 4, &mut o).is_err());
    assert!(attention(&pool, &z[..15], 1, 0, &c(4, 2, 4), &z, &z, 4, &mut o).is_err());
    assert!(attention(&pool, &z[..16], 1, 0, &c(4, 2, 4), &z[..31], &z, 4, &mut o).is_err());
    let zero_window = AttnShape {
        window: Some(0),
        ..c(4, 2, 4)
    };
    assert!(attention(&pool, &z[..16], 1, 0, &zero_window, &z, &z, 4, &mut o).is_err());
    assert!(attention(&pool, &z[..16], 1, 0, &c(4, 2, 4), &z, &z, 4, &mut o).is_ok());
}

#[test]
fn gelu_tanh_mul_matches_reference() {
    let mut rng = Rng::new(9);
    let mut g: Vec<f32> = rng.vec(257).iter().map(|x| x * 6.0).collect();
    let u = rng.vec(257);
    let want: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(&x, &u)| {
            let x = x as f64;
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh()) * u as f64
        })
        .collect();
    gelu_tanh_mul(&mut g, &u);
    for (i, (a, b)) in g.iter().zip(&want).enumerate() {
        assert!(
            (*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()),
            "{i}: {a} vs {b}"
        );
    }
}

#[test]
fn isa_selection() {
    let _g = lock();
    let avail = available_isas();
    assert!(avail.contains(&Isa::Scalar));
    assert!(avail.contains(&detected_isa()));
    #[cfg(target_arch = "x86_64")]
    assert!(matches!(
        set_isa(Isa::Neon),
        Err(KernelError::IsaUnavailable(Isa::Neon))
    ));
    set_isa(Isa::Scalar).unwrap();
    assert_eq!(active_isa(), Isa::Scalar);
    set_isa(detected_isa()).unwrap();
    assert_eq!(active_isa(), detected_isa());
}

#[test]
fn bench_functions_run() {
    let pool = ThreadPool::new(2);
    assert!(bench::memory_bandwidth_gbs(&pool, 1 << 20, 2) > 0.0);
    assert!(bench::gemv_gbs(&pool, DType::Q4_1, 64, 256, 1) > 0.0);
}
