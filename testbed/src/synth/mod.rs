//! Random-weight models written by hand, for tests and benchmarks that need a model
//! larger than a memory bound without committing one: a small Llama as safetensors (F32)
//! here, and GGUF files of named real shapes in [`gguf_model`].

pub mod gguf_model;
pub mod shards_out;

use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::Value;

/// A tiny deterministic RNG (xorshift64).
pub struct XorShift(pub u64);

impl XorShift {
    /// Next raw value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Shape of the synthetic model.
pub const BIG_HIDDEN: usize = 1024;
/// Shape of the synthetic model.
pub const BIG_INTER: usize = 4096;
/// Shape of the synthetic model.
pub const BIG_LAYERS: usize = 8;
/// Shape of the synthetic model.
pub const BIG_HEADS: usize = 16;
/// Shape of the synthetic model.
pub const BIG_KV_HEADS: usize = 4;
/// Shape of the synthetic model.
pub const BIG_VOCAB: usize = 1024;
/// Shape of the synthetic model.
pub const BIG_CTX: usize = 256;

/// Writes config.json + model.safetensors (F32, ≈ 490 MB) into `dir`; returns the
/// tensor bytes.
pub fn write_big_model(dir: &Path) -> u64 {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": BIG_HIDDEN,
        "intermediate_size": BIG_INTER,
        "num_hidden_layers": BIG_LAYERS,
        "num_attention_heads": BIG_HEADS,
        "num_key_value_heads": BIG_KV_HEADS,
        "vocab_size": BIG_VOCAB,
        "tie_word_embeddings": true,
        "max_position_embeddings": BIG_CTX,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32"
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    let hd = BIG_HIDDEN / BIG_HEADS;
    let kv = BIG_KV_HEADS * hd;
    // (name, shape, is_norm)
    let mut tensors: Vec<(String, Vec<usize>, bool)> = vec![(
        "model.embed_tokens.weight".into(),
        vec![BIG_VOCAB, BIG_HIDDEN],
        false,
    )];
    for l in 0..BIG_LAYERS {
        let p = format!("model.layers.{l}");
        tensors.push((
            format!("{p}.input_layernorm.weight"),
            vec![BIG_HIDDEN],
            true,
        ));
        tensors.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![BIG_HIDDEN, BIG_HIDDEN],
            false,
        ));
        tensors.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, BIG_HIDDEN],
            false,
        ));
        tensors.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, BIG_HIDDEN],
            false,
        ));
        tensors.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![BIG_HIDDEN, BIG_HIDDEN],
            false,
        ));
        tensors.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![BIG_HIDDEN],
            true,
        ));
        tensors.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![BIG_INTER, BIG_HIDDEN],
            false,
        ));
        tensors.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![BIG_INTER, BIG_HIDDEN],
            false,
        ));
        tensors.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![BIG_HIDDEN, BIG_INTER],
            false,
        ));
    }
    tensors.push(("model.norm.weight".into(), vec![BIG_HIDDEN], true));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0u64;
    for (name, shape, _) in &tensors {
        let n: usize = shape.iter().product();
        let end = off + 4 * n as u64;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, end]}),
        );
        off = end;
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let f = std::fs::File::create(dir.join("model.safetensors")).unwrap();
    let mut w = BufWriter::with_capacity(1 << 20, f);
    w.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    w.write_all(&h).unwrap();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut buf = Vec::with_capacity(1 << 20);
    for (_, shape, norm) in &tensors {
        let n: usize = shape.iter().product();
        let cols = *shape.last().unwrap();
        let scale = if *norm {
            0.1
        } else if shape[0] == BIG_VOCAB {
            1.0
        } else {
            1.0 / (cols as f32).sqrt()
        };
        let mut left = n;
        while left > 0 {
            let k = left.min(1 << 18);
            buf.clear();
            for _ in 0..k {
                let v = if *norm {
                    1.0 + scale * rng.unit()
                } else {
                    scale * rng.unit()
                };
                buf.extend_from_slice(&v.to_le_bytes());
            }
            w.write_all(&buf).unwrap();
            left -= k;
        }
    }
    w.flush().unwrap();
    off
}
