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

/// GeGLU gate with the tanh approximation of GELU (PyTorch's `gelu(approximate="tanh")`,
/// HF `gelu_pytorch_tanh`): `gate[i] = gelu_tanh(gate[i]) * up[i]`, where
/// `gelu_tanh(g) = g/2 · (1 + tanh(√(2/π) · (g + 0.044715 g³)))`.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "gelu_tanh_mul: up length {} != gate length {}",
        up.len(),
        gate.len()
    );
    const C: f32 = 0.797_884_6; // √(2/π)
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = 0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh()) * u;
    }
}

/// Whether every value is finite (no NaN, no ±Inf). Branch-free over the exponent bits,
/// so it vectorises: cheap enough to run on every hidden state and every logit row.
pub fn all_finite(x: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    x.iter()
        .fold(0u32, |bad, v| bad | u32::from(v.to_bits() & EXP == EXP))
        == 0
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

#[cfg(test)]
mod finite_tests {
    use super::all_finite;

    #[test]
    fn all_finite_finds_every_non_finite_value() {
        let mut v: Vec<f32> = (0..1027).map(|i| (i as f32 - 500.0) * 1e30).collect();
        v.extend([f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-45, -0.0]);
        assert!(all_finite(&v));
        assert!(all_finite(&[]));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
            for at in [0, 1, 15, 16, 17, 500, v.len() - 1] {
                let mut w = v.clone();
                w[at] = bad;
                assert!(!all_finite(&w), "{bad} at {at} not found");
            }
        }
    }
}
