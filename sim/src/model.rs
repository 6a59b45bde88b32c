//! The simulator's inputs as plain numbers: model shapes, devices, calibration.

use std::time::Duration;

/// The shape of a decoder-only transformer, as numbers only.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelShape {
    /// Hidden (embedding) size.
    pub hidden: usize,
    /// Number of transformer layers.
    pub layers: usize,
    /// Attention (query) heads.
    pub heads: usize,
    /// Key/value heads (GQA groups).
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// MLP intermediate size.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Bytes per weight after quantisation (see [`quant_bytes_per_weight`]).
    pub bytes_per_weight: f64,
    /// Whether the LM head shares the embedding table.
    pub tied_embeddings: bool,
}

/// Names accepted by [`ModelShape::preset`].
pub const PRESETS: &[&str] = &[
    "llama2-7b",
    "llama2-13b",
    "llama2-70b",
    "llama3-8b",
    "llama3-70b",
    "smollm2-135m",
];

/// Bytes per weight of a storage type named as tpi names it (`f32`, `q4_k`, `iq4_xs`, ...;
/// also `q8` for `q8_0`), from [`tpi_kernels::DType`], the one place that defines them.
pub fn quant_bytes_per_weight(name: &str) -> Option<f64> {
    let name = if name.eq_ignore_ascii_case("q8") {
        "q8_0"
    } else {
        name
    };
    tpi_kernels::DType::from_name(name).map(tpi_kernels::DType::bytes_per_weight)
}

impl ModelShape {
    /// A published shape by name (see [`PRESETS`]), at `q4_0` (override `bytes_per_weight`).
    pub fn preset(name: &str) -> Option<Self> {
        let q4 = tpi_kernels::DType::Q4_0.bytes_per_weight();
        let s = |hidden, layers, heads, kv_heads, ffn, vocab| ModelShape {
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            ffn,
            vocab,
            bytes_per_weight: q4,
            tied_embeddings: false,
        };
        Some(match name.to_ascii_lowercase().as_str() {
            "llama2-7b" => s(4096, 32, 32, 32, 11008, 32000),
            "llama2-13b" => s(5120, 40, 40, 40, 13824, 32000),
            "llama2-70b" => s(8192, 80, 64, 8, 28672, 32000),
            "llama3-8b" => s(4096, 32, 32, 8, 14336, 128256),
            "llama3-70b" => s(8192, 80, 64, 8, 28672, 128256),
            "smollm2-135m" => ModelShape {
                tied_embeddings: true,
                ..s(576, 30, 9, 3, 1536, 49152)
            },
            _ => return None,
        })
    }

    /// Weights in one layer's attention block (Q, K, V, O).
    pub fn attn_params(&self) -> f64 {
        let q = (self.heads * self.head_dim) as f64;
        let kv = (self.kv_heads * self.head_dim) as f64;
        self.hidden as f64 * (2.0 * q + 2.0 * kv)
    }

    /// Weights in one layer's MLP block (gate, up, down).
    pub fn mlp_params(&self) -> f64 {
        3.0 * self.hidden as f64 * self.ffn as f64
    }

    /// Bytes of all layers' weights (what the devices share).
    pub fn layer_stack_bytes(&self) -> f64 {
        self.layers as f64 * (self.attn_params() + self.mlp_params()) * self.bytes_per_weight
    }

    /// Bytes of the LM head (streamed once per token by rank 0).
    pub fn head_bytes(&self) -> f64 {
        self.vocab as f64 * self.hidden as f64 * self.bytes_per_weight
    }

    /// Bytes rank 0 holds besides its shard: embedding table and LM head.
    pub fn rank0_extra_bytes(&self) -> f64 {
        let tables = if self.tied_embeddings { 1.0 } else { 2.0 };
        tables * self.head_bytes()
    }

    /// Total parameters, embeddings included.
    pub fn params(&self) -> f64 {
        let tables = if self.tied_embeddings { 1.0 } else { 2.0 };
        self.layers as f64 * (self.attn_params() + self.mlp_params())
            + tables * (self.vocab * self.hidden) as f64
    }
}

/// One device's rates and limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Device {
    /// Weight bytes per second its GEMV streams (GB/s, 1e9).
    pub compute_gbs: f64,
    /// Arithmetic rate for prefill GEMM (GFLOP/s, 1e9).
    pub gflops: f64,
    /// Sequential disk read rate (GB/s, 1e9).
    pub disk_gbs: f64,
    /// Memory the node may use, in bytes.
    pub mem_budget_bytes: u64,
    /// Blocks (half-layers) the sliding window keeps resident when streaming.
    pub window_blocks: usize,
}

impl Default for Device {
    /// A Raspberry-Pi-5-class device: 10 GB/s GEMV, 50 GFLOP/s, 2 GB/s disk, 8 GiB, window 4.
    fn default() -> Self {
        Self {
            compute_gbs: 10.0,
            gflops: 50.0,
            disk_gbs: 2.0,
            mem_budget_bytes: 8 << 30,
            window_blocks: 4,
        }
    }
}

/// Costs the link model does not capture, measured on the real stack.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Calibration {
    /// The sender's software cost per message: messages to several peers leave one after
    /// another (the cost model's `LinkCost::per_message_s`).
    pub per_message_overhead: Duration,
    /// Software cost per payload byte (copy, sum), in nanoseconds.
    pub per_byte_ns: f64,
    /// Bytes per activation element on the wire (4 for f32, 2 for f16).
    pub activation_bytes: f64,
    /// Bytes per KV-cache element (2 for f16, 4 for f32).
    pub kv_bytes: f64,
    /// Fixed memory per node (runtime, buffers), in bytes.
    pub fixed_bytes: u64,
}

impl Default for Calibration {
    fn default() -> Self {
        Self {
            per_message_overhead: Duration::from_micros(50),
            per_byte_ns: 0.05,
            activation_bytes: 4.0,
            kv_bytes: 2.0,
            fixed_bytes: 64 << 20,
        }
    }
}

/// What is run: prompt length and tokens generated (for the KV cache size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Prompt tokens (prefill).
    pub prompt_len: usize,
    /// Generated tokens.
    pub gen_tokens: usize,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            prompt_len: 128,
            gen_tokens: 128,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parameter_counts_match_published_sizes() {
        let billions = |n: &str| ModelShape::preset(n).unwrap().params() / 1e9;
        assert!((billions("llama2-7b") - 6.74).abs() < 0.1);
        assert!((billions("llama2-13b") - 13.0).abs() < 0.2);
        assert!((billions("llama2-70b") - 69.0).abs() < 0.5);
        assert!((billions("llama3-8b") - 8.03).abs() < 0.1);
        assert!((billions("llama3-70b") - 70.6).abs() < 0.5);
        assert!((billions("smollm2-135m") - 0.135).abs() < 0.01);
        for p in PRESETS {
            assert!(ModelShape::preset(p).is_some());
        }
    }

    #[test]
    fn quant_sizes() {
        assert_eq!(quant_bytes_per_weight("q4_1"), Some(0.625));
        assert_eq!(quant_bytes_per_weight("Q8_0"), Some(1.0625));
        assert_eq!(quant_bytes_per_weight("q3"), None);
        assert_eq!(quant_bytes_per_weight("q4_k"), Some(4.5 / 8.0));
        assert_eq!(quant_bytes_per_weight("Q6_K"), Some(210.0 / 256.0));
    }
}
