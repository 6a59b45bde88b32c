//! Batched matrix product for prefill: dequantise a 32-row panel of W once, pack it k-major,
//! and run a register-blocked f32 microkernel (up to 6 tokens x 32 rows) over all tokens.

use crate::gemv::{check_gemv, gemv_unchecked, SyncPtr};
use crate::isa::{active_isa, Isa};
use crate::quant::dequantize_row_isa;
use crate::{KernelError, MatRef, ThreadPool};

/// Rows per packed panel (one parallel task).
const NR: usize = 32;
/// Tokens per microkernel tile.
const MR: usize = 6;
/// Columns per packed k-block (a multiple of every block length).
const KC: usize = 256;

/// y[t][r] = sum_c W[r,c] * x[t][c] for `n` tokens (x: n x cols, y: n x rows, row-major).
/// Much faster than `n` GEMVs: W is dequantised once per GEMM and reused across tokens.
pub fn gemm(
    pool: &ThreadPool,
    w: MatRef,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    check_gemv(&w, x.len(), y.len(), n)?;
    let isa = active_isa();
    if n == 0 || w.rows == 0 {
        return Ok(());
    }
    if n == 1 {
        gemv_unchecked(isa, pool, &w, x, y);
        return Ok(());
    }
    if w.cols == 0 {
        y.fill(0.0);
        return Ok(());
    }
    let rows = w.rows;
    let n_panels = rows.div_ceil(NR);
    let yp = SyncPtr(y.as_mut_ptr());
    let w = &w;
    pool.run(n_panels, &|p| {
        // SAFETY: panel p writes only columns r0..r1 of y, disjoint across tasks.
        unsafe { gemm_panel(isa, w, x, n, p * NR, yp.get()) };
    });
    Ok(())
}

/// Compute output rows `r0..r0+NR` (clipped) for all tokens.
unsafe fn gemm_panel(isa: Isa, w: &MatRef, x: &[f32], n: usize, r0: usize, y: *mut f32) {
    let (rows, cols) = (w.rows, w.cols);
    let r1 = (r0 + NR).min(rows);
    let nr = r1 - r0;
    let bl = w.dtype.block_len();
    let bb = w.dtype.block_bytes();
    let mut tmp = vec![0.0f32; NR * KC];
    let mut packed = vec![0.0f32; KC * NR];
    let mut tile = [0.0f32; MR * NR];
    // A packed panel is unpacked once; its k-blocks then slice GGML rows.
    let unpacked = w.ggml_rows(r0, r1);
    let rb = w.row_bytes();
    let row_of = |j: usize| match &unpacked {
        Some(v) => &v[j * rb..(j + 1) * rb],
        None => w.row(r0 + j),
    };
    let mut k0 = 0;
    while k0 < cols {
        let kc = KC.min(cols - k0);
        for j in 0..nr {
            let row = row_of(j);
            let (bs, be) = (k0 / bl * bb, (k0 + kc) / bl * bb);
            dequantize_row_isa(isa, w.dtype, &row[bs..be], &mut tmp[j * kc..(j + 1) * kc]);
        }
        for j in 0..nr {
            let src = &tmp[j * kc..(j + 1) * kc];
            for (k, v) in src.iter().enumerate() {
                packed[k * NR + j] = *v;
            }
        }
        if nr < NR {
            for k in 0..kc {
                packed[k * NR + nr..(k + 1) * NR].fill(0.0);
            }
        }
        let mut t0 = 0;
        while t0 < n {
            let mr = MR.min(n - t0);
            let xs = &x[t0 * cols + k0..];
            tile_dispatch(isa, mr, xs, cols, &packed, kc, &mut tile);
            for t in 0..mr {
                let yrow = y.add((t0 + t) * rows + r0);
                let trow = &tile[t * NR..t * NR + nr];
                if k0 == 0 {
                    std::ptr::copy_nonoverlapping(trow.as_ptr(), yrow, nr);
                } else {
                    for (j, v) in trow.iter().enumerate() {
                        *yrow.add(j) += *v;
                    }
                }
            }
            t0 += mr;
        }
        k0 += kc;
    }
}

macro_rules! tile_match {
    ($($f:ident)::+, $mr:expr, $($args:expr),*) => {
        match $mr {
            1 => $($f)::+::<1>($($args),*),
            2 => $($f)::+::<2>($($args),*),
            3 => $($f)::+::<3>($($args),*),
            4 => $($f)::+::<4>($($args),*),
            5 => $($f)::+::<5>($($args),*),
            _ => $($f)::+::<6>($($args),*),
        }
    };
}

/// Run the microkernel for `mr` tokens starting at `x` (row stride `ldx`).
fn tile_dispatch(
    isa: Isa,
    mr: usize,
    x: &[f32],
    ldx: usize,
    wp: &[f32],
    kc: usize,
    out: &mut [f32; MR * NR],
) {
    debug_assert!((1..=MR).contains(&mr));
    debug_assert!(x.len() >= (mr - 1) * ldx + kc);
    debug_assert!(wp.len() >= kc * NR);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe {
            tile_match!(
                crate::gemv::avx512::gemm_tile,
                mr,
                x.as_ptr(),
                ldx,
                wp.as_ptr(),
                kc,
                out.as_mut_ptr()
            )
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe {
            tile_match!(
                crate::gemv::avx2::gemm_tile,
                mr,
                x.as_ptr(),
                ldx,
                wp.as_ptr(),
                kc,
                out.as_mut_ptr()
            )
        },
        _ => tile_match!(
            crate::gemv::scalar::gemm_tile,
            mr,
            x,
            ldx,
            wp,
            kc,
            &mut out[..]
        ),
    }
}
