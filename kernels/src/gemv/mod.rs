//! Matrix-vector product (decode path) with per-ISA row kernels, plus small shared SIMD helpers.

pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;

use crate::isa::{active_isa, Isa};
use crate::{DType, KernelError, MatRef, ThreadPool};

/// Rows handled together by the SIMD row kernels; task boundaries are multiples of this.
pub(crate) const ROW_BLOCK: usize = 4;

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

/// Per-GEMV auxiliary data derived from x: for Q4_1, pairs `[0, sum(x_block)]` per 32-block.
pub(crate) fn gemv_aux(dtype: DType, x: &[f32]) -> Vec<f32> {
    if dtype != DType::Q4_1 {
        return Vec::new();
    }
    let mut aux = Vec::with_capacity(x.len() / 16);
    for b in x.chunks_exact(32) {
        let mut s = 0.0f32;
        for v in b {
            s += v;
        }
        aux.push(0.0);
        aux.push(s);
    }
    aux
}

/// Compute `y[i] = dot(row r0+i, x)` for rows `r0..r1` on an explicit ISA. Shapes must be validated.
pub(crate) fn gemv_rows_isa(isa: Isa, w: &MatRef, r0: usize, r1: usize, x: &[f32], aux: &[f32], y: &mut [f32]) {
    debug_assert_eq!(y.len(), r1 - r0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::gemv_rows(w, r0, r1, x, aux, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::gemv_rows(w, r0, r1, x, aux, y) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::gemv_rows(w, r0, r1, x, y) },
        _ => scalar::gemv_rows(w, r0, r1, x, y),
    }
}

pub(crate) fn check_gemv(w: &MatRef, x_len: usize, y_len: usize, n: usize) -> Result<(), KernelError> {
    // Re-validate the view: its fields are public and could have been built by hand.
    MatRef::with_stride(w.dtype, w.rows, w.cols, w.row_stride, w.data)?;
    let xe = n.checked_mul(w.cols).ok_or_else(|| KernelError::Invalid("x size overflows".into()))?;
    if x_len != xe {
        return Err(KernelError::Shape { what: "x", expected: xe, actual: x_len });
    }
    let ye = n.checked_mul(w.rows).ok_or_else(|| KernelError::Invalid("y size overflows".into()))?;
    if y_len != ye {
        return Err(KernelError::Shape { what: "y", expected: ye, actual: y_len });
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
    let aux = gemv_aux(w.dtype, x);
    let max_tasks_by_size = (w.weight_bytes() / MIN_TASK_BYTES).max(1);
    let n_tasks = (pool.n_threads() * 4).min(max_tasks_by_size).min(rows.div_ceil(ROW_BLOCK)).max(1);
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
        Isa::Avx512 => unsafe { avx512::dot(a, b) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::dot(a, b) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::dot(a, b) },
        _ => scalar::dot(a, b),
    }
}

/// Sum of an f32 slice on the given ISA.
pub(crate) fn sum(isa: Isa, a: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::sum(a) },
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
        Isa::Avx512 => unsafe { avx512::axpy(alpha, x, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::axpy(alpha, x, y) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::axpy(alpha, x, y) },
        _ => scalar::axpy(alpha, x, y),
    }
}
