//! Matrix-vector product (decode path) with per-ISA row kernels, plus small shared SIMD helpers.

pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2_k;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2_kdec;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
#[cfg(target_arch = "x86_64")]
pub(crate) mod vnni;
#[cfg(target_arch = "x86_64")]
pub(crate) mod vnni_b32;
#[cfg(target_arch = "x86_64")]
pub(crate) mod vnni_k;

use crate::isa::{active_isa, Isa};
use crate::{DType, KernelError, Layout, MatRef, ThreadPool};

/// Rows handled together by the SIMD row kernels; task boundaries are multiples of this.
pub(crate) const ROW_BLOCK: usize = 4;

/// Least software-prefetch distance in bytes (about a DRAM latency's worth of streaming).
pub(crate) const PF_MIN: usize = 4096;

/// Software-prefetch distance for row kernels whose `ROW_BLOCK` rows per call each come from
/// a stream of their own (see [`for_row_blocks`]): the same spot in a later row of that
/// stream, at least `PF_MIN` bytes ahead. Weights are read once, in rows of a few KB: too
/// short for the hardware prefetcher to ramp up. (Prefetching a fixed distance ahead within
/// the row measured slower for long rows.)
pub(crate) fn prefetch_distance(stride: usize) -> usize {
    stride * PF_MIN.div_ceil(stride.max(1)).max(1)
}

/// Drives a SIMD row kernel over rows `r0..r1` of `w` into `y` (`y.len() == r1 - r0`):
/// `ROW_BLOCK` rows at a time through `k4`, so one pass over x serves them all, then the
/// remaining rows one by one through `k1`. Each call gets the row pointers, the prefetch
/// distance (a later row of each stream; for single rows, the next row) and the sums to fill.
///
/// The `ROW_BLOCK` rows of a call are the same row of each quarter of the range: four
/// sequential streams far apart, which this project's Zen 4 machines read 3-10% faster than
/// four adjacent rows (`tpi bench kernels`, every dtype, side by side).
///
/// # Safety
/// `w` must be a validated view: every row pointer handed out lies inside `w.data`.
#[inline(always)]
pub(crate) unsafe fn for_row_blocks(
    w: &MatRef,
    r0: usize,
    r1: usize,
    y: &mut [f32],
    mut k4: impl FnMut([*const u8; ROW_BLOCK], usize, &mut [f32; ROW_BLOCK]),
    mut k1: impl FnMut([*const u8; 1], usize, &mut [f32; 1]),
) {
    let base = w.data.as_ptr();
    let st = w.row_stride;
    let pf = prefetch_distance(st);
    let q = (r1 - r0) / ROW_BLOCK;
    for k in 0..q {
        let p = std::array::from_fn(|i| base.add((r0 + i * q + k) * st));
        let mut out = [0.0f32; ROW_BLOCK];
        k4(p, pf, &mut out);
        for (i, v) in out.into_iter().enumerate() {
            y[i * q + k] = v;
        }
    }
    let mut r = r0 + ROW_BLOCK * q;
    while r < r1 {
        let mut out = [0.0f32; 1];
        k1([base.add(r * st)], st, &mut out);
        y[r - r0] = out[0];
        r += 1;
    }
}

/// Raw output pointer shared by tasks that write disjoint ranges.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint index ranges and `ThreadPool::run` joins before returning.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

impl SyncPtr {
    /// The raw pointer (a method, so closures capture the whole `Sync` wrapper).
    #[inline]
    pub(crate) fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Per-GEMV auxiliary data derived from x and shared by all rows: float terms in `f`,
/// integer activations in `i` (for the integer kernels, see [`gemv_aux`]).
#[derive(Default)]
pub(crate) struct Aux {
    pub(crate) f: Vec<f32>,
    pub(crate) i: Vec<u8>,
}

/// Largest |integer activation| on the VNNI path: 127 * 256, so the high/low byte split
/// `X = 256 H + L` keeps `H` in i8 (and `L` in i8 or u8, as each kernel needs).
pub(crate) const ACT_MAX: f32 = 32512.0;

/// The 15-bit activation scale of block `xb` and its inverse: `s = max|x| / ACT_MAX`, so
/// that `round(x / s)` fills ±ACT_MAX; `(NaN, 0)` when the block holds NaN or ±inf (so
/// NaN reaches the output), `(0, 0)` for an all-zero block.
pub(crate) fn act_scale(xb: &[f32]) -> (f32, f32) {
    if !xb.iter().all(|v| v.is_finite()) {
        return (f32::NAN, 0.0);
    }
    let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    if amax == 0.0 {
        return (0.0, 0.0);
    }
    (amax / ACT_MAX, ACT_MAX / amax)
}

/// Builds the [`Aux`] a row kernel needs:
/// - AVX-512 (no VNNI) Q4: one pair of floats per 32-block padded to a multiple of 16 floats,
///   Q4_1 `[-16 sum(x_b), sum(x_b)]`, Q4_0 `[-24 sum(x_b), 0]` (see `avx512::rows_q4`),
///   followed by x permuted within each block into that kernel's lane order;
/// - VNNI and AVX2 Q4_0/Q4_1/Q8_0 (see [`vnni::prepare`], [`avx2::prepare`]): each block of x
///   becomes integers `X = round(x / s_b)` with `s_b = max|x_b| / ACT_MAX` (an error of at
///   most `max|x_b| / 65024` per element, 256 times finer than llama.cpp's 8-bit
///   activations), as byte planes (VNNI) or i16 (AVX2) in `i`, with the scales in `f`; the
///   same for Q5_0/Q5_1 on VNNI ([`vnni_b32::prepare`]) and for the other 32-block types
///   on the AVX2 kernel ([`avx2_b32`]);
/// - the K-quants and IQ4_XS on VNNI, AVX-512 and AVX2 ([`vnni_k::prepare`],
///   [`avx2_k::prepare`]): the same integers with one scale per 256-block;
/// - otherwise nothing.
pub(crate) fn gemv_aux(isa: Isa, dtype: DType, x: &[f32]) -> Aux {
    if has_k_kernel(isa, dtype) {
        return k_aux(isa, dtype, x);
    }
    if has_b32_kernel(isa, dtype) {
        return b32_aux(x);
    }
    let q4 = matches!(dtype, DType::Q4_0 | DType::Q4_1);
    if isa == Isa::Avx512Vnni && (q4 || dtype == DType::Q8_0) {
        return vnni_aux(dtype, x);
    }
    if (isa == Isa::Avx2 && has_avx2_int_kernel(dtype)) || avx2_b32(isa, dtype) {
        return avx2_aux(x);
    }
    if !(isa == Isa::Avx512 && q4) {
        return Aux::default();
    }
    let nb = x.len() / 32;
    let pairs = (2 * nb).div_ceil(16) * 16;
    let mut aux = vec![0.0f32; pairs];
    for (b, xb) in x.chunks_exact(32).enumerate() {
        let mut s = 0.0f32;
        for v in xb {
            s += v;
        }
        let pair = match dtype {
            DType::Q4_1 => [-16.0 * s, s],
            _ => [-24.0 * s, 0.0],
        };
        aux[2 * b..2 * b + 2].copy_from_slice(&pair);
    }
    aux.reserve(x.len());
    for xb in x.chunks_exact(32) {
        for half in 0..2 {
            for j in 0..16 {
                aux.push(xb[16 * half + 4 * (j % 4) + j / 4]);
            }
        }
    }
    Aux {
        f: aux,
        i: Vec::new(),
    }
}

#[cfg(target_arch = "x86_64")]
fn vnni_aux(dtype: DType, x: &[f32]) -> Aux {
    let mut aux = Aux::default();
    // SAFETY: only reached for `Isa::Avx512Vnni`, which `set_isa`/detection guarantee.
    unsafe { vnni::prepare(dtype, x, &mut aux) };
    aux
}

#[cfg(not(target_arch = "x86_64"))]
fn vnni_aux(_: DType, _: &[f32]) -> Aux {
    Aux::default()
}

#[cfg(target_arch = "x86_64")]
fn k_aux(isa: Isa, dtype: DType, x: &[f32]) -> Aux {
    let mut aux = Aux::default();
    // SAFETY: only reached for the ISA `has_k_kernel` names, which `set_isa`/detection
    // guarantee this CPU has.
    unsafe {
        if isa != Isa::Avx512Vnni {
            avx2_k::prepare(dtype, x, &mut aux)
        } else {
            vnni_k::prepare(dtype, x, &mut aux)
        }
    };
    aux
}

#[cfg(not(target_arch = "x86_64"))]
fn k_aux(_: Isa, _: DType, _: &[f32]) -> Aux {
    Aux::default()
}

#[cfg(target_arch = "x86_64")]
fn b32_aux(x: &[f32]) -> Aux {
    let mut aux = Aux::default();
    // SAFETY: only reached on the VNNI path (see `has_b32_kernel`).
    unsafe { vnni_b32::prepare(x, &mut aux) };
    aux
}

#[cfg(not(target_arch = "x86_64"))]
fn b32_aux(_: &[f32]) -> Aux {
    Aux::default()
}

#[cfg(target_arch = "x86_64")]
fn avx2_aux(x: &[f32]) -> Aux {
    let mut aux = Aux::default();
    // SAFETY: only reached for `Isa::Avx2`, which `set_isa`/detection guarantee.
    unsafe { avx2::prepare(x, &mut aux) };
    aux
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_aux(_: &[f32]) -> Aux {
    Aux::default()
}

/// Compute `y[i] = dot(row r0+i, x)` for rows `r0..r1` on an explicit ISA. Shapes must be validated.
pub(crate) fn gemv_rows_isa(
    isa: Isa,
    w: &MatRef,
    r0: usize,
    r1: usize,
    x: &[f32],
    aux: &Aux,
    y: &mut [f32],
) {
    debug_assert_eq!(y.len(), r1 - r0);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = aux;
    if has_k_kernel(isa, w.dtype) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `has_k_kernel` names an ISA this CPU has; `aux` comes from `gemv_aux`.
        unsafe {
            return if isa != Isa::Avx512Vnni {
                avx2_k::gemv_rows(w, r0, r1, aux, y)
            } else {
                vnni_k::gemv_rows(w, r0, r1, aux, y)
            };
        }
    }
    if has_b32_kernel(isa, w.dtype) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `has_b32_kernel` holds only on the VNNI path; `aux` comes from `gemv_aux`.
        unsafe {
            return vnni_b32::gemv_rows(w, r0, r1, aux, y);
        }
    }
    if avx2_b32(isa, w.dtype) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `avx2_b32` holds only on x86 paths with AVX2; `aux` is `avx2_aux`'s.
        unsafe {
            return avx2::gemv_rows(w, r0, r1, x, aux, y);
        }
    }
    if !has_row_kernel(w.dtype) {
        return gemv_rows_decoded(isa, w, r0, r1, x, y);
    }
    let vnni = isa == Isa::Avx512Vnni && !aux.i.is_empty();
    if w.layout == Layout::Packed && !vnni {
        return gemv_rows_unpacking(isa, w, r0, r1, x, aux, y);
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if vnni => unsafe { vnni::gemv_rows(w, r0, r1, aux, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { avx512::gemv_rows(w, r0, r1, x, &aux.f, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::gemv_rows(w, r0, r1, x, aux, y) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::gemv_rows(w, r0, r1, x, y) },
        _ => scalar::gemv_rows(w, r0, r1, x, y),
    }
}

/// Whether `dtype` has row kernels of its own on every path (else rows are decoded a chunk
/// at a time and dotted with x, see [`gemv_rows_decoded`]).
fn has_row_kernel(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0 | DType::Q4_0 | DType::Q4_1
    )
}

/// Whether `isa` runs `dtype` on a K-quant integer kernel ([`vnni_k`], or [`avx2_k`] on
/// AVX2 and on AVX-512 without VNNI).
fn has_k_kernel(isa: Isa, dtype: DType) -> bool {
    use DType::*;
    // AVX-512 without VNNI runs the AVX2 kernels (its CPUs have AVX2).
    cfg!(target_arch = "x86_64")
        && matches!(isa, Isa::Avx512Vnni | Isa::Avx512 | Isa::Avx2)
        && matches!(dtype, Q2K | Q3K | Q4K | Q5K | Q6K | IQ4XS)
}

/// Whether the AVX2 32-block integer kernel (`avx2::rows_int`) runs `dtype`.
pub(crate) fn has_avx2_int_kernel(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::IQ4NL
    )
}

/// Whether `isa` runs `dtype` on the 32-block VNNI kernel ([`vnni_b32`]).
fn has_b32_kernel(isa: Isa, dtype: DType) -> bool {
    cfg!(target_arch = "x86_64")
        && isa == Isa::Avx512Vnni
        && matches!(dtype, DType::Q5_0 | DType::Q5_1)
}

/// Whether `isa` runs one of the 32-block types beside Q4/Q8 on the AVX2 integer kernel:
/// on AVX2 and AVX-512 all three; on VNNI IQ4_NL, whose code-book values widened to i16
/// measured faster there (83%) than two blocks per `vpdpbusd` register (61-66%).
fn avx2_b32(isa: Isa, dtype: DType) -> bool {
    cfg!(target_arch = "x86_64")
        && match isa {
            Isa::Avx2 | Isa::Avx512 => matches!(dtype, DType::Q5_0 | DType::Q5_1 | DType::IQ4NL),
            Isa::Avx512Vnni => dtype == DType::IQ4NL,
            _ => false,
        }
}

/// Columns decoded at a time by [`gemv_rows_decoded`]: one super-block, a multiple of every
/// block length.
const DECODE_COLS: usize = 256;

/// GEMV rows of a type without a row kernel on this path: each row is decoded
/// `DECODE_COLS` columns at a time (the path's own decoder, bit-identical to the scalar
/// one) and dotted with x. Correct on every path, and the reference the fast kernels are
/// measured against; about as fast as the decoder.
fn gemv_rows_decoded(isa: Isa, w: &MatRef, r0: usize, r1: usize, x: &[f32], y: &mut [f32]) {
    let (bl, bb) = (w.dtype.block_len(), w.dtype.block_bytes());
    let mut buf = [0.0f32; DECODE_COLS];
    for (r, yv) in (r0..r1).zip(y.iter_mut()) {
        let row = w.row(r);
        let mut acc = 0.0f32;
        let mut c = 0;
        while c < w.cols {
            let n = DECODE_COLS.min(w.cols - c);
            let bytes = &row[c / bl * bb..(c + n) / bl * bb];
            crate::quant::dequantize_row_isa(isa, w.dtype, bytes, &mut buf[..n]);
            acc += dot(isa, &buf[..n], &x[c..c + n]);
            c += n;
        }
        *yv = acc;
    }
}

/// Rows of a packed matrix on a path without a packed kernel: unpacked a few rows at a
/// time into a small buffer, then the GGML kernel.
fn gemv_rows_unpacking(
    isa: Isa,
    w: &MatRef,
    r0: usize,
    r1: usize,
    x: &[f32],
    aux: &Aux,
    y: &mut [f32],
) {
    const CHUNK: usize = 4 * ROW_BLOCK;
    let mut buf = Vec::new();
    let mut r = r0;
    while r < r1 {
        let e = (r + CHUNK).min(r1);
        w.unpack_rows_into(r, e, &mut buf);
        let m = MatRef::new(w.dtype, e - r, w.cols, &buf).expect("unpacked rows are dense");
        gemv_rows_isa(isa, &m, 0, e - r, x, aux, &mut y[r - r0..e - r0]);
        r = e;
    }
}

pub(crate) fn check_gemv(
    w: &MatRef,
    x_len: usize,
    y_len: usize,
    n: usize,
) -> Result<(), KernelError> {
    // Re-validate the view: its fields are public and could have been built by hand.
    MatRef::with_stride(w.dtype, w.rows, w.cols, w.row_stride, w.data)?.with_layout(w.layout)?;
    let xe = n
        .checked_mul(w.cols)
        .ok_or_else(|| KernelError::Invalid("x size overflows".into()))?;
    if x_len != xe {
        return Err(KernelError::Shape {
            what: "x",
            expected: xe,
            actual: x_len,
        });
    }
    let ye = n
        .checked_mul(w.rows)
        .ok_or_else(|| KernelError::Invalid("y size overflows".into()))?;
    if y_len != ye {
        return Err(KernelError::Shape {
            what: "y",
            expected: ye,
            actual: y_len,
        });
    }
    Ok(())
}

/// Minimum weight bytes per parallel task, so tiny matrices are not split into overhead.
const MIN_TASK_BYTES: usize = 24 * 1024;

/// y[r] = sum_c W[r,c] * x[c] with f32 activations; rows are split across the pool.
/// Each row's sum is computed the same way whatever the split, so results are deterministic.
pub fn gemv(pool: &ThreadPool, w: MatRef, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    check_gemv(&w, x.len(), y.len(), 1)?;
    gemv_unchecked(active_isa(), pool, &w, x, y);
    Ok(())
}

pub(crate) fn gemv_unchecked(isa: Isa, pool: &ThreadPool, w: &MatRef, x: &[f32], y: &mut [f32]) {
    let rows = w.rows;
    if rows == 0 {
        return;
    }
    let aux = gemv_aux(isa, w.dtype, x);
    let max_tasks_by_size = (w.weight_bytes() / MIN_TASK_BYTES).max(1);
    let n_tasks = (pool.n_threads() * 2)
        .min(max_tasks_by_size)
        .min(rows.div_ceil(ROW_BLOCK))
        .max(1);
    if n_tasks == 1 || pool.n_threads() == 1 {
        gemv_rows_isa(isa, w, 0, rows, x, &aux, y);
        return;
    }
    let chunk = rows.div_ceil(n_tasks).div_ceil(ROW_BLOCK) * ROW_BLOCK;
    let n_tasks = rows.div_ceil(chunk);
    let yp = SyncPtr(y.as_mut_ptr());
    let aux = &aux;
    pool.run(n_tasks, &|t| {
        let r0 = t * chunk;
        let r1 = (r0 + chunk).min(rows);
        // SAFETY: disjoint row ranges per task, within y (len == rows).
        let ys = unsafe { std::slice::from_raw_parts_mut(yp.get().add(r0), r1 - r0) };
        gemv_rows_isa(isa, w, r0, r1, x, aux, ys);
    });
}

/// Dot product of two equal-length f32 slices on the given ISA.
pub(crate) fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { avx512::dot(a, b) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::dot(a, b) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::dot(a, b) },
        _ => scalar::dot(a, b),
    }
}

/// [`dot`] with `b` f16 (an f16 KV cache). NEON converts in the scalar loop.
pub(crate) fn dot_f16(isa: Isa, a: &[f32], b: &[half::f16]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { avx512::dot_f16(a, b) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::dot_f16(a, b) },
        _ => scalar::dot_f16(a, b),
    }
}

/// [`axpy`] with `x` f16 (an f16 KV cache). NEON converts in the scalar loop.
pub(crate) fn axpy_f16(isa: Isa, alpha: f32, x: &[half::f16], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &mut y[..n]);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { avx512::axpy_f16(alpha, x, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::axpy_f16(alpha, x, y) },
        _ => scalar::axpy_f16(alpha, x, y),
    }
}

/// Sum of an f32 slice on the given ISA.
pub(crate) fn sum(isa: Isa, a: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { avx512::sum(a) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::sum(a) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::sum(a) },
        _ => scalar::sum(a),
    }
}

/// y += alpha * x on the given ISA.
pub(crate) fn axpy(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &mut y[..n]);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { avx512::axpy(alpha, x, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::axpy(alpha, x, y) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::axpy(alpha, x, y) },
        _ => scalar::axpy(alpha, x, y),
    }
}
