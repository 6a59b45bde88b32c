//! Micro-benchmarks used by the `tpi bench` CLI: memory bandwidth and GEMV weight throughput.

use std::time::Instant;

use crate::gemv::{sum, SyncPtr};
use crate::isa::active_isa;
use crate::{gemv, quantize_row, DType, MatRef, ThreadPool};

/// Tiny deterministic xorshift RNG for benchmark data.
struct XorShift(u64);

impl XorShift {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Measure main-memory read bandwidth (GB/s) by summing a `bytes`-byte buffer with the best SIMD
/// path on all pool threads; best of `reps`.
pub fn memory_bandwidth_gbs(pool: &ThreadPool, bytes: usize, reps: usize) -> f64 {
    let n = (bytes / 4).max(1024);
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let isa = active_isa();
    let n_tasks = pool.n_threads() * 8;
    let chunk = n.div_ceil(n_tasks);
    let mut partial = vec![0.0f32; n_tasks];
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let pp = SyncPtr(partial.as_mut_ptr());
        let t = Instant::now();
        pool.run(n_tasks, &|i| {
            let s = (i * chunk).min(n);
            let e = ((i + 1) * chunk).min(n);
            // SAFETY: one slot per task.
            unsafe { *pp.get().add(i) = sum(isa, &buf[s..e]) };
        });
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&partial);
    }
    (n * 4) as f64 / best / 1e9
}

/// GEMV throughput in GB/s of weight bytes for a random `rows x cols` matrix of `dtype`
/// (best of `reps`); several copies are rotated so the working set exceeds the caches.
pub fn gemv_gbs(pool: &ThreadPool, dtype: DType, rows: usize, cols: usize, reps: usize) -> f64 {
    let cols = cols.div_ceil(dtype.block_len()) * dtype.block_len();
    let row_bytes = dtype.row_bytes(cols).unwrap_or(0).max(1);
    let mat_bytes = rows.max(1) * row_bytes;
    let copies = (128usize << 20).div_ceil(mat_bytes).clamp(1, 64);
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut proto = vec![0u8; mat_bytes];
    let mut rowf = vec![0.0f32; cols];
    for r in 0..rows {
        rowf.iter_mut().for_each(|v| *v = rng.next_f32());
        quantize_row(dtype, &rowf, &mut proto[r * row_bytes..(r + 1) * row_bytes]);
    }
    let mats: Vec<Vec<u8>> = (0..copies).map(|_| proto.clone()).collect();
    let x: Vec<f32> = (0..cols).map(|_| rng.next_f32()).collect();
    let mut y = vec![0.0f32; rows];
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        for m in &mats {
            let w = MatRef::new(dtype, rows, cols, m).expect("bench matrix shape");
            gemv(pool, w, &x, &mut y).expect("bench gemv");
        }
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&y);
    }
    (mat_bytes * copies) as f64 / best / 1e9
}
