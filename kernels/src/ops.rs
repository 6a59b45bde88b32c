//! Element-wise and normalisation ops on f32 slices (hot paths; lengths are asserted).

use crate::gemv::dot;
use crate::isa::active_isa;

/// RMSNorm, HF Llama semantics: `out = (x / sqrt(mean(x^2) + eps)) * weight`, in f32.
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(
        x.len(),
        weight.len(),
        "rmsnorm: weight length {} != x length {}",
        weight.len(),
        x.len()
    );
    assert_eq!(
        x.len(),
        out.len(),
        "rmsnorm: out length {} != x length {}",
        out.len(),
        x.len()
    );
    if x.is_empty() {
        return;
    }
    let ss = dot(active_isa(), x, x);
    let r = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, xv), wv) in out.iter_mut().zip(x).zip(weight) {
        *o = (xv * r) * wv;
    }
}

/// Numerically stable softmax in place (subtracts the max before exponentiating).
pub fn softmax(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let max = x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let mut s = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        s += *v;
    }
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// SwiGLU gate: `gate[i] = silu(gate[i]) * up[i]` with `silu(g) = g / (1 + exp(-g))`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "silu_mul: up length {} != gate length {}",
        up.len(),
        gate.len()
    );
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Residual add: `acc[i] += x[i]`.
pub fn add_in_place(acc: &mut [f32], x: &[f32]) {
    assert_eq!(
        acc.len(),
        x.len(),
        "add_in_place: x length {} != acc length {}",
        x.len(),
        acc.len()
    );
    for (a, v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}
