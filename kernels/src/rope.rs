//! Rotary position embeddings: HF-compatible inverse frequencies (incl. llama3 scaling) and rotation.

/// HF transformers' llama3 `rope_scaling` parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    /// Overall wavelength scale factor (8 for Llama 3.1).
    pub factor: f32,
    /// Low-frequency boundary factor.
    pub low_freq_factor: f32,
    /// High-frequency boundary factor.
    pub high_freq_factor: f32,
    /// Context length the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

/// Which dimension pairs are rotated together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// HF layout: pairs `(i, i + head_dim/2)`.
    HalfSplit,
    /// GGUF/llama.cpp layout: pairs `(2i, 2i+1)` (for GGUF's permuted Q/K rows).
    Interleaved,
}

/// `inv_freq[i] = 1 / theta^(2i/head_dim)` for `i in 0..head_dim/2`, computed like HF in f32,
/// with llama3 scaling (`_compute_llama3_parameters`) applied when given.
pub fn rope_inv_freq(head_dim: usize, theta: f32, scaling: Option<Llama3Scaling>) -> Vec<f32> {
    let half = head_dim / 2;
    let dim = head_dim as f32;
    let mut inv: Vec<f32> = (0..half)
        .map(|i| {
            // torch: arange(0, dim, 2).float() / dim (f32), base ** that (f32 pow), 1.0 / that (f32).
            let e = (2 * i) as f32 / dim;
            let p = (theta as f64).powf(e as f64) as f32;
            1.0f32 / p
        })
        .collect();
    if let Some(s) = scaling {
        let old_ctx = s.original_max_position_embeddings as f64;
        let low_freq_wavelen = (old_ctx / s.low_freq_factor as f64) as f32;
        let high_freq_wavelen = (old_ctx / s.high_freq_factor as f64) as f32;
        let two_pi = (2.0 * std::f64::consts::PI) as f32;
        let denom = (s.high_freq_factor as f64 - s.low_freq_factor as f64) as f32;
        let old_ctx_f = old_ctx as f32;
        for f in inv.iter_mut() {
            let fv = *f;
            // torch `scalar / tensor` is `reciprocal(tensor) * scalar`.
            let wavelen = (1.0f32 / fv) * two_pi;
            let mut llama = if wavelen > low_freq_wavelen {
                fv / s.factor
            } else {
                fv
            };
            let smooth = ((1.0f32 / wavelen) * old_ctx_f - s.low_freq_factor) / denom;
            let smoothed = (1.0f32 - smooth) * llama / s.factor + smooth * llama;
            // torch: ~(wavelen < high) * ~(wavelen > low); NaN-free inputs, so this is the same test.
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            let is_medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
            if is_medium {
                llama = smoothed;
            }
            *f = llama;
        }
    }
    inv
}

/// Rotate every head of `x` (`n_heads * head_dim` values, one token) to position `pos`, in place.
/// Angles are `pos as f32 * inv_freq[i]` (f32), like HF.
pub fn apply_rope(
    x: &mut [f32],
    head_dim: usize,
    pos: usize,
    inv_freq: &[f32],
    layout: RopeLayout,
) {
    assert!(
        head_dim.is_multiple_of(2) && head_dim > 0,
        "apply_rope: head_dim {head_dim} must be even and > 0"
    );
    assert_eq!(
        x.len() % head_dim,
        0,
        "apply_rope: x length {} not a multiple of head_dim {head_dim}",
        x.len()
    );
    let half = head_dim / 2;
    assert!(
        inv_freq.len() >= half,
        "apply_rope: inv_freq has {} entries, need {half}",
        inv_freq.len()
    );
    let mut cs = [(0.0f32, 0.0f32); 128];
    let mut cs_vec = Vec::new();
    let cs: &mut [(f32, f32)] = if half <= 128 {
        &mut cs[..half]
    } else {
        cs_vec.resize(half, (0.0, 0.0));
        &mut cs_vec
    };
    let p = pos as f32;
    for (c, f) in cs.iter_mut().zip(inv_freq) {
        let a = (p * f) as f64;
        *c = (a.cos() as f32, a.sin() as f32);
    }
    for head in x.chunks_exact_mut(head_dim) {
        match layout {
            RopeLayout::HalfSplit => {
                let (lo, hi) = head.split_at_mut(half);
                for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(cs.iter()) {
                    let (x1, x2) = (*a, *b);
                    *a = x1 * c - x2 * s;
                    *b = x2 * c + x1 * s;
                }
            }
            RopeLayout::Interleaved => {
                for (pair, &(c, s)) in head.chunks_exact_mut(2).zip(cs.iter()) {
                    let (x1, x2) = (pair[0], pair[1]);
                    pair[0] = x1 * c - x2 * s;
                    pair[1] = x2 * c + x1 * s;
                }
            }
        }
    }
}
