//! Quick kernel benchmark: memory bandwidth, GEMV GB/s per dtype, GEMM GFLOP/s, and a
//! SmolLM-135M-shaped decode/prefill estimate. Run: `cargo run -p tpi-kernels --release --example bench`.

use std::time::Instant;

use tpi_kernels::*;

fn rand_mat(dtype: DType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let rb = dtype.row_bytes(cols).unwrap();
    let mut data = vec![0u8; rows * rb];
    let mut row = vec![0.0f32; cols];
    for r in 0..rows {
        for v in row.iter_mut() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *v = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
        }
        quantize_row(dtype, &row, &mut data[r * rb..(r + 1) * rb]);
    }
    data
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = 5;
    let isas: Vec<Isa> = if args.len() > 1 {
        args[1..]
            .iter()
            .map(|a| Isa::from_name(a).unwrap_or_else(|| panic!("unknown ISA {a}")))
            .collect()
    } else {
        vec![detected_isa()]
    };
    for isa in isas {
        set_isa(isa).unwrap();
        println!("== ISA {isa:?}");
        {
            let pool = ThreadPool::new(1);
            for dtype in [
                DType::F32,
                DType::F16,
                DType::Q8_0,
                DType::Q4_0,
                DType::Q4_1,
            ] {
                let env = |k: &str, d: usize| -> usize {
                    std::env::var(k).map(|v| v.parse().unwrap()).unwrap_or(d)
                };
                let (r, c) = (env("ROWS", 256), env("COLS", 1536));
                let mut m = rand_mat(dtype, r, c, 5);
                let packed = std::env::var("PACKED").is_ok() && Layout::Packed.supports(dtype);
                if packed {
                    let rb = dtype.row_bytes(c).unwrap();
                    for row in m.chunks_mut(rb) {
                        let g = row.to_vec();
                        pack_row(dtype, &g, row).unwrap();
                    }
                }
                let layout = if packed { Layout::Packed } else { Layout::Ggml };
                let w = MatRef::new(dtype, r, c, &m)
                    .unwrap()
                    .with_layout(layout)
                    .unwrap();
                let x = vec![0.1f32; c];
                let mut y = vec![0.0f32; r];
                let mut el = f64::INFINITY;
                for _ in 0..300 {
                    let t = Instant::now();
                    for _ in 0..5 {
                        gemv(&pool, w, &x, &mut y).unwrap();
                    }
                    el = el.min(t.elapsed().as_secs_f64() / 5.0);
                }
                println!(
                    "  in-cache gemv {:5} {r}x{c}: {:.1} GB/s, {:.2} Gelem/s",
                    dtype.name(),
                    w.weight_bytes() as f64 / el / 1e9,
                    (r * c) as f64 / el / 1e9
                );
            }
            if std::env::var("DECODE_ONLY").is_ok() {
                decode_only(&pool);
                decode_only(&ThreadPool::new(2));
                continue;
            }
            if std::env::var("CACHE_ONLY").is_ok() {
                continue;
            }
        }
        for threads in [1usize, 2] {
            let pool = ThreadPool::new(threads);
            let bw = bench::memory_bandwidth_gbs(&pool, 512 << 20, reps);
            println!("threads={threads} memory bandwidth: {bw:.1} GB/s");
            for dtype in DType::ALL {
                let big = bench::gemv_gbs(&pool, dtype, 4096, 4096, reps);
                let small = bench::gemv_gbs(&pool, dtype, 576, 1536, reps);
                println!(
                    "  gemv {:5} 4096x4096: {big:5.1} GB/s ({:3.0}% of bw)   576x1536 (rotated, DRAM): {small:5.1} GB/s",
                    dtype.name(),
                    100.0 * big / bw
                );
            }
            // SmolLM-135M-like decode: 30 layers Q4_1 + Q8_0 LM head, all weights distinct (DRAM-bound).
            let shapes = [
                (576usize, 576usize),
                (192, 576),
                (192, 576),
                (576, 576),
                (1536, 576),
                (1536, 576),
                (576, 1536),
            ];
            let layers: Vec<Vec<Vec<u8>>> = (0..30)
                .map(|l| {
                    shapes
                        .iter()
                        .enumerate()
                        .map(|(i, &(r, c))| rand_mat(DType::Q4_1, r, c, (l * 10 + i + 1) as u64))
                        .collect()
                })
                .collect();
            let head = rand_mat(DType::Q8_0, 49152, 576, 7);
            let x576 = vec![0.1f32; 576];
            let x1536 = vec![0.1f32; 1536];
            let mut y = vec![0.0f32; 49152];
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t = Instant::now();
                for l in &layers {
                    for (m, &(r, c)) in l.iter().zip(&shapes) {
                        let w = MatRef::new(DType::Q4_1, r, c, m).unwrap();
                        let x = if c == 576 { &x576[..] } else { &x1536[..] };
                        gemv(&pool, w, x, &mut y[..r]).unwrap();
                    }
                }
                let w = MatRef::new(DType::Q8_0, 49152, 576, &head).unwrap();
                gemv(&pool, w, &x576, &mut y).unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "  135M-shaped decode GEMVs only: {:.2} ms/token = {:.0} tok/s",
                best * 1e3,
                1.0 / best
            );
            // Prefill GEMM: 128 tokens through the same layers (LM head for the last token only).
            let n = 128;
            let xs = vec![0.1f32; n * 1536];
            let mut ys = vec![0.0f32; n * 1536];
            let mut bestg = f64::INFINITY;
            let mut flops = 0.0;
            for _ in 0..2 {
                flops = 0.0;
                let t = Instant::now();
                for l in &layers {
                    for (m, &(r, c)) in l.iter().zip(&shapes) {
                        let w = MatRef::new(DType::Q4_1, r, c, m).unwrap();
                        gemm(&pool, w, &xs[..n * c], n, &mut ys[..n * r]).unwrap();
                        flops += 2.0 * (r * c * n) as f64;
                    }
                }
                bestg = bestg.min(t.elapsed().as_secs_f64());
            }
            println!(
                "  135M-shaped prefill GEMMs (128 tok): {:.1} ms = {:.0} tok/s, {:.1} GFLOP/s",
                bestg * 1e3,
                n as f64 / bestg,
                flops / bestg / 1e9
            );
            let w = MatRef::new(DType::Q4_1, 1536, 576, &layers[0][4]).unwrap();
            let t = Instant::now();
            let it = 20;
            for _ in 0..it {
                gemm(&pool, w, &xs[..n * 576], n, &mut ys[..n * 1536]).unwrap();
            }
            let el = t.elapsed().as_secs_f64() / it as f64;
            println!(
                "  gemm q4_1 1536x576 n=128: {:.1} GFLOP/s",
                2.0 * (1536 * 576 * n) as f64 / el / 1e9
            );
            let mut pk = layers[0][4].clone();
            let rb = DType::Q4_1.row_bytes(576).unwrap();
            for (row, g) in pk.chunks_mut(rb).zip(layers[0][4].chunks(rb)) {
                pack_row(DType::Q4_1, g, row).unwrap();
            }
            let w = MatRef::new(DType::Q4_1, 1536, 576, &pk)
                .unwrap()
                .with_layout(Layout::Packed)
                .unwrap();
            let t = Instant::now();
            for _ in 0..it {
                gemm(&pool, w, &xs[..n * 576], n, &mut ys[..n * 1536]).unwrap();
            }
            let el = t.elapsed().as_secs_f64() / it as f64;
            println!(
                "  gemm q4_1 packed 1536x576 n=128: {:.1} GFLOP/s",
                2.0 * (1536 * 576 * n) as f64 / el / 1e9
            );
            let f32m = rand_mat(DType::F32, 1536, 576, 3);
            let w = MatRef::new(DType::F32, 1536, 576, &f32m).unwrap();
            let t = Instant::now();
            for _ in 0..it {
                gemm(&pool, w, &xs[..n * 576], n, &mut ys[..n * 1536]).unwrap();
            }
            let el = t.elapsed().as_secs_f64() / it as f64;
            println!(
                "  gemm f32  1536x576 n=128: {:.1} GFLOP/s",
                2.0 * (1536 * 576 * n) as f64 / el / 1e9
            );
        }
    }
}

/// Best-of timing of the 135M-shaped decode GEMVs at 1 thread (A/B comparisons on a noisy box).
fn decode_only(pool: &ThreadPool) {
    // DECODE_DTYPE=q4_0 streams the layers as Q4_0 instead of SmolLM2's Q4_1.
    let dt = match std::env::var("DECODE_DTYPE").as_deref() {
        Ok("q4_0") => DType::Q4_0,
        _ => DType::Q4_1,
    };
    let shapes = [
        (576usize, 576usize),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let layers: Vec<Vec<Vec<u8>>> = (0..30)
        .map(|l| {
            shapes
                .iter()
                .enumerate()
                .map(|(i, &(r, c))| rand_mat(dt, r, c, (l * 10 + i + 1) as u64))
                .collect()
        })
        .collect();
    let head = rand_mat(DType::Q8_0, 49152, 576, 7);
    let x = vec![0.1f32; 1536];
    let mut y = vec![0.0f32; 49152];
    let (mut bl, mut bh) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..30 {
        let t = Instant::now();
        for l in &layers {
            for (m, &(r, c)) in l.iter().zip(&shapes) {
                gemv(
                    pool,
                    MatRef::new(dt, r, c, m).unwrap(),
                    &x[..c],
                    &mut y[..r],
                )
                .unwrap();
            }
        }
        bl = bl.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        gemv(
            pool,
            MatRef::new(DType::Q8_0, 49152, 576, &head).unwrap(),
            &x[..576],
            &mut y,
        )
        .unwrap();
        bh = bh.min(t.elapsed().as_secs_f64());
    }
    let lb: usize = shapes
        .iter()
        .map(|&(r, c)| r * dt.row_bytes(c).unwrap())
        .sum::<usize>()
        * 30;
    println!(
        "  decode ({} thr): layers {:.2} ms ({:.1} GB/s {}), head {:.2} ms ({:.1} GB/s q8_0), total {:.0} tok/s",
        pool.n_threads(),
        bl * 1e3,
        lb as f64 / bl / 1e9,
        dt.name(),
        bh * 1e3,
        (49152 * 18 * 34) as f64 / bh / 1e9,
        1.0 / (bl + bh)
    );
}
