//! Micro-benchmarks used by the `tpi bench` CLI: memory bandwidth and GEMV weight throughput.

use std::time::Instant;

use crate::gemv::{sum, SyncPtr};
use crate::isa::active_isa;
use crate::{gemv, pack_row, quantize_row, DType, Layout, MatRef, ThreadPool};

/// Tiny deterministic xorshift RNG for benchmark data.
pub struct XorShift(pub u64);

impl XorShift {
    /// Next raw value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// How a bandwidth probe task reads its slice.
#[derive(Clone, Copy)]
enum ReadPattern {
    /// One sequential stream.
    Sequential,
    /// [`STREAMS`] streams (the slice's quarters) in turn, 4 KiB of each at a time: on some
    /// machines (this project's Zen 4 VMs) that reads a fifth faster than one stream.
    Bursts,
}

/// Streams a [`ReadPattern::Bursts`] probe reads.
const STREAMS: usize = 4;

/// Sums `a` in `pattern`.
fn read_sum(isa: crate::Isa, a: &[f32], pattern: ReadPattern) -> f32 {
    match pattern {
        ReadPattern::Sequential => sum(isa, a),
        ReadPattern::Bursts => {
            const PIECE: usize = 1024;
            let q = a.len() / STREAMS;
            let mut s = sum(isa, &a[STREAMS * q..]);
            for k in (0..q).step_by(PIECE) {
                for j in 0..STREAMS {
                    s += sum(isa, &a[j * q + k..j * q + (k + PIECE).min(q)]);
                }
            }
            s
        }
    }
}

/// A main-memory read-bandwidth probe: the pool threads sum slices of a buffer far larger
/// than the caches with the widest SIMD loads (and, on AVX-512, the GEMV kernels' software
/// prefetch), in each [`ReadPattern`]; the faster pattern counts, so the figure is the best
/// read rate found, not a convenient one.
pub struct BandwidthProbe {
    buf: Vec<f32>,
}

impl BandwidthProbe {
    /// A probe over a `bytes`-byte buffer (at least 4 KiB).
    pub fn new(bytes: usize) -> Self {
        let n = (bytes / 4).max(1024);
        BandwidthProbe {
            buf: (0..n).map(|i| (i % 7) as f32).collect(),
        }
    }

    /// Read bandwidth in GB/s, best of `reps` passes of each read pattern.
    pub fn measure(&self, pool: &ThreadPool, reps: usize) -> f64 {
        let (one, far) = self.measure_each(pool, reps);
        one.max(far)
    }

    /// Read bandwidth in GB/s of one sequential stream and of four far-apart streams read in
    /// bursts, each the best of `reps` passes.
    pub fn measure_each(&self, pool: &ThreadPool, reps: usize) -> (f64, f64) {
        (
            self.measure_pattern(pool, reps, ReadPattern::Sequential),
            self.measure_pattern(pool, reps, ReadPattern::Bursts),
        )
    }

    fn measure_pattern(&self, pool: &ThreadPool, reps: usize, pattern: ReadPattern) -> f64 {
        let n = self.buf.len();
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
                let v = read_sum(isa, &self.buf[s..e], pattern);
                // SAFETY: one slot per task.
                unsafe { *pp.get().add(i) = v };
            });
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(&partial);
        }
        (n * 4) as f64 / best / 1e9
    }
}

/// A GEMV throughput probe: a random `rows x cols` matrix of one dtype, in enough copies
/// (rotated) that the working set exceeds the caches.
pub struct GemvProbe {
    dtype: DType,
    layout: Layout,
    rows: usize,
    cols: usize,
    mats: Vec<Vec<u8>>,
    x: Vec<f32>,
    y: Vec<f32>,
}

impl GemvProbe {
    /// Builds the matrices (`cols` is rounded up to whole blocks), in GGML layout.
    pub fn new(dtype: DType, rows: usize, cols: usize) -> Self {
        Self::with_layout(dtype, Layout::Ggml, rows, cols)
    }

    /// Builds the matrices with rows in `layout` (GGML where `dtype` has no such layout).
    pub fn with_layout(dtype: DType, layout: Layout, rows: usize, cols: usize) -> Self {
        let layout = if layout.supports(dtype) {
            layout
        } else {
            Layout::Ggml
        };
        let cols = cols.div_ceil(dtype.block_len()) * dtype.block_len();
        let row_bytes = dtype.row_bytes(cols).unwrap_or(0).max(1);
        let mat_bytes = rows.max(1) * row_bytes;
        let copies = (128usize << 20).div_ceil(mat_bytes).clamp(1, 64);
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut proto = vec![0u8; mat_bytes];
        let mut rowf = vec![0.0f32; cols];
        for r in 0..rows {
            rowf.iter_mut().for_each(|v| *v = rng.next_f32());
            let row = &mut proto[r * row_bytes..(r + 1) * row_bytes];
            if dtype.can_quantize() {
                quantize_row(dtype, &rowf, row);
            } else {
                random_blocks(&mut rng, dtype, row);
            }
            if layout == Layout::Packed {
                let ggml = row.to_vec();
                pack_row(dtype, &ggml, row).expect("whole Q4 blocks");
            }
        }
        GemvProbe {
            dtype,
            layout,
            rows,
            cols,
            mats: (0..copies).map(|_| proto.clone()).collect(),
            x: (0..cols).map(|_| rng.next_f32()).collect(),
            y: vec![0.0; rows],
        }
    }

    /// GB/s of weight bytes on the active ISA, best of `reps` passes over all copies.
    pub fn measure(&mut self, pool: &ThreadPool, reps: usize) -> f64 {
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            for m in &self.mats {
                let w = MatRef::new(self.dtype, self.rows, self.cols, m)
                    .and_then(|w| w.with_layout(self.layout))
                    .expect("bench matrix shape");
                gemv(pool, w, &self.x, &mut self.y).expect("bench gemv");
            }
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(&self.y);
        }
        let bytes: usize = self.mats.iter().map(Vec::len).sum();
        bytes as f64 / best / 1e9
    }
}

/// Fills `out` with random whole blocks of `dtype`: uniform bits, with every f16 scale
/// field set to a finite value in ±[1/64, 1/8], so the decoded values are of order 1.
/// (For the types [`quantize_row`] does not write.)
pub fn random_blocks(rng: &mut XorShift, dtype: DType, out: &mut [u8]) {
    for b in out.chunks_exact_mut(dtype.block_bytes()) {
        for v in b.iter_mut() {
            *v = rng.next_u64() as u8;
        }
        for &off in dtype.f16_fields() {
            let mag = (1.5 + 0.5 * rng.next_f32()) / (16 << (rng.next_u64() % 3)) as f32;
            let v = if rng.next_u64().is_multiple_of(2) {
                mag
            } else {
                -mag
            };
            b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
        }
    }
}

/// Measure main-memory read bandwidth (GB/s) by summing a `bytes`-byte buffer with the best SIMD
/// path on all pool threads; best of `reps`.
pub fn memory_bandwidth_gbs(pool: &ThreadPool, bytes: usize, reps: usize) -> f64 {
    BandwidthProbe::new(bytes).measure(pool, reps)
}

/// GEMV throughput in GB/s of weight bytes for a random `rows x cols` matrix of `dtype`
/// (best of `reps`); several copies are rotated so the working set exceeds the caches.
pub fn gemv_gbs(pool: &ThreadPool, dtype: DType, rows: usize, cols: usize, reps: usize) -> f64 {
    GemvProbe::new(dtype, rows, cols).measure(pool, reps)
}
