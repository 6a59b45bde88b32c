//! Causal grouped-query attention over an f32 or f16 KV cache, parallel over (token, head).

use std::cell::RefCell;

use crate::gemv::{axpy, axpy_f16, dot, dot_f16, SyncPtr};
use crate::isa::{active_isa, Isa};
use crate::ops::softmax;
use crate::{KernelError, ThreadPool};

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<(), KernelError> {
    if expected != actual {
        return Err(KernelError::Shape {
            what,
            expected,
            actual,
        });
    }
    Ok(())
}

/// An element type of the KV cache: f32, or f16 (half the memory; each key and value
/// rounded once, when it is stored).
pub trait KvElem: Copy + Send + Sync + 'static {
    /// `q · k` on `isa`.
    fn dot(isa: Isa, q: &[f32], k: &[Self]) -> f32;
    /// `out += p * v` on `isa`.
    fn axpy(isa: Isa, p: f32, v: &[Self], out: &mut [f32]);
}

impl KvElem for f32 {
    fn dot(isa: Isa, q: &[f32], k: &[f32]) -> f32 {
        dot(isa, q, k)
    }
    fn axpy(isa: Isa, p: f32, v: &[f32], out: &mut [f32]) {
        axpy(isa, p, v, out)
    }
}

impl KvElem for half::f16 {
    fn dot(isa: Isa, q: &[f32], k: &[half::f16]) -> f32 {
        dot_f16(isa, q, k)
    }
    fn axpy(isa: Isa, p: f32, v: &[half::f16], out: &mut [f32]) {
        axpy_f16(isa, p, v, out)
    }
}

/// The heads and masking of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; query head h reads kv head `h / (n_heads/n_kv_heads)`.
    pub n_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Multiplies every score (`1/sqrt(head_dim)` for most models; Gemma's
    /// `query_pre_attn_scalar^-1/2`).
    pub scale: f32,
    /// Sliding window: a query at position p sees keys `p+1-window ..= p` only (HF's
    /// `kv_idx > q_idx - sliding_window`); None: every earlier key.
    pub window: Option<usize>,
}

impl AttnShape {
    /// Full causal attention with the usual `1/sqrt(head_dim)` scale.
    pub fn causal(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: None,
        }
    }
}

/// Causal GQA attention for `n_tokens` queries at positions `start_pos..start_pos+n_tokens`.
/// `q`, `out`: `[n_tokens][n_heads*head_dim]`; caches: `[n_kv_heads][capacity][head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn attention<T: KvElem>(
    pool: &ThreadPool,
    q: &[f32],
    n_tokens: usize,
    start_pos: usize,
    shape: &AttnShape,
    k_cache: &[T],
    v_cache: &[T],
    capacity: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim,
        scale,
        window,
    } = *shape;
    if n_heads == 0 || n_kv_heads == 0 || head_dim == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(KernelError::Invalid(format!(
            "attention: n_heads {n_heads} must be a positive multiple of n_kv_heads {n_kv_heads}, head_dim {head_dim} > 0"
        )));
    }
    if window == Some(0) || !scale.is_finite() {
        return Err(KernelError::Invalid(format!(
            "attention: window {window:?} must be positive and scale {scale} finite"
        )));
    }
    let overflow = || KernelError::Invalid("attention: sizes overflow".into());
    let qlen = n_tokens
        .checked_mul(n_heads)
        .and_then(|v| v.checked_mul(head_dim))
        .ok_or_else(overflow)?;
    check_len("q", qlen, q.len())?;
    check_len("out", qlen, out.len())?;
    let end = start_pos.checked_add(n_tokens).ok_or_else(overflow)?;
    if end > capacity {
        return Err(KernelError::Invalid(format!(
            "attention: positions up to {end} exceed cache capacity {capacity}"
        )));
    }
    let cache_len = n_kv_heads
        .checked_mul(capacity)
        .and_then(|v| v.checked_mul(head_dim))
        .ok_or_else(overflow)?;
    if k_cache.len() < cache_len {
        return Err(KernelError::Shape {
            what: "k_cache",
            expected: cache_len,
            actual: k_cache.len(),
        });
    }
    if v_cache.len() < cache_len {
        return Err(KernelError::Shape {
            what: "v_cache",
            expected: cache_len,
            actual: v_cache.len(),
        });
    }
    if n_tokens == 0 {
        return Ok(());
    }
    let isa = active_isa();
    let group = n_heads / n_kv_heads;
    let op = SyncPtr(out.as_mut_ptr());
    pool.run(n_tokens * n_heads, &|task| {
        let (t, h) = (task / n_heads, task % n_heads);
        let kvh = h / group;
        let qoff = (t * n_heads + h) * head_dim;
        let qv = &q[qoff..qoff + head_dim];
        let n_ctx = start_pos + t + 1;
        let first = window.map_or(0, |w| n_ctx.saturating_sub(w));
        let kbase = kvh * capacity * head_dim;
        // SAFETY: each task writes its own head_dim slice of out.
        let o = unsafe { std::slice::from_raw_parts_mut(op.get().add(qoff), head_dim) };
        SCORES.with(|s| {
            let mut s = s.borrow_mut();
            s.clear();
            s.resize(n_ctx - first, 0.0);
            for (j, sc) in (first..).zip(s.iter_mut()) {
                let k = &k_cache[kbase + j * head_dim..kbase + (j + 1) * head_dim];
                *sc = T::dot(isa, qv, k) * scale;
            }
            softmax(&mut s);
            o.fill(0.0);
            for (j, p) in (first..).zip(s.iter()) {
                T::axpy(
                    isa,
                    *p,
                    &v_cache[kbase + j * head_dim..kbase + (j + 1) * head_dim],
                    o,
                );
            }
        });
    });
    Ok(())
}
