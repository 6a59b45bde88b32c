//! Causal grouped-query attention over an f32 KV cache, parallel over (token, head).

use std::cell::RefCell;

use crate::gemv::{axpy, dot, SyncPtr};
use crate::isa::active_isa;
use crate::ops::softmax;
use crate::{KernelError, ThreadPool};

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn shape(what: &'static str, expected: usize, actual: usize) -> Result<(), KernelError> {
    if expected != actual {
        return Err(KernelError::Shape {
            what,
            expected,
            actual,
        });
    }
    Ok(())
}

/// Causal GQA attention for `n_tokens` queries at positions `start_pos..start_pos+n_tokens`.
/// `q`, `out`: `[n_tokens][n_heads*head_dim]`; caches: `[n_kv_heads][capacity][head_dim]`.
/// Query head h reads kv head `h / (n_heads/n_kv_heads)`; scale is `1/sqrt(head_dim)`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    pool: &ThreadPool,
    q: &[f32],
    n_tokens: usize,
    start_pos: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    capacity: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    if n_heads == 0 || n_kv_heads == 0 || head_dim == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(KernelError::Invalid(format!(
            "attention: n_heads {n_heads} must be a positive multiple of n_kv_heads {n_kv_heads}, head_dim {head_dim} > 0"
        )));
    }
    let overflow = || KernelError::Invalid("attention: sizes overflow".into());
    let qlen = n_tokens
        .checked_mul(n_heads)
        .and_then(|v| v.checked_mul(head_dim))
        .ok_or_else(overflow)?;
    shape("q", qlen, q.len())?;
    shape("out", qlen, out.len())?;
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
    let scale = 1.0 / (head_dim as f32).sqrt();
    let op = SyncPtr(out.as_mut_ptr());
    pool.run(n_tokens * n_heads, &|task| {
        let (t, h) = (task / n_heads, task % n_heads);
        let kvh = h / group;
        let qoff = (t * n_heads + h) * head_dim;
        let qv = &q[qoff..qoff + head_dim];
        let n_ctx = start_pos + t + 1;
        let kbase = kvh * capacity * head_dim;
        // SAFETY: each task writes its own head_dim slice of out.
        let o = unsafe { std::slice::from_raw_parts_mut(op.get().add(qoff), head_dim) };
        SCORES.with(|s| {
            let mut s = s.borrow_mut();
            s.clear();
            s.resize(n_ctx, 0.0);
            for (j, sc) in s.iter_mut().enumerate() {
                let k = &k_cache[kbase + j * head_dim..kbase + (j + 1) * head_dim];
                *sc = dot(isa, qv, k) * scale;
            }
            softmax(&mut s);
            o.fill(0.0);
            for (j, p) in s.iter().enumerate() {
                axpy(
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
