//! Model hyper-parameters, read from an HF `config.json` (transformers 4.x or 5.x)
//! or from GGUF llama metadata.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tpi_kernels::{Llama3Scaling, RopeLayout};

use super::error::ModelError;
use super::gguf::GgufFile;

/// The shape and numerics of a Llama-family decoder: everything the forward pass needs besides weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Architecture name as the source file gives it (e.g. `llama`, `qwen2`).
    pub arch: String,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Hidden size (model dimension).
    pub hidden_size: usize,
    /// MLP intermediate size.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub n_layers: usize,
    /// Attention (query) heads.
    pub n_heads: usize,
    /// Key/value heads (GQA when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Llama-3 RoPE frequency scaling, when the model uses it.
    pub rope_scaling: Option<RopeScaling>,
    /// Context length the model was trained for.
    pub max_position_embeddings: usize,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Q/K/V projections carry biases (Qwen2).
    pub attention_bias: bool,
    /// Pairing of RoPE rotation: half-split for HF weights, interleaved for GGUF llama (whose Q/K rows are permuted).
    pub rope_layout: RopePairing,
    /// BOS token id, if the config names one.
    pub bos_token_id: Option<u32>,
    /// EOS token ids, if the config names them.
    pub eos_token_ids: Vec<u32>,
    /// Column multiples the tensor types impose on row-parallel slices (filled in from the
    /// tensors when the model is opened; see [`SliceAlign`]).
    #[serde(default)]
    pub slice_align: SliceAlign,
}

/// Where row-parallel slices may cut, from the block lengths of the matrices they cut by
/// columns: the MLP down projection (cut along the intermediate dimension) and the
/// attention output (cut at head boundaries). A Q4_K down projection, for example, can
/// only be cut at multiples of 256 columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceAlign {
    /// MLP slices must start and end at multiples of this many intermediate columns.
    pub ffn: usize,
    /// Query-head ranges must start and end at multiples of this many heads.
    pub heads: usize,
}

impl Default for SliceAlign {
    /// No constraint: f32/f16/bf16 matrices cut anywhere.
    fn default() -> Self {
        SliceAlign { ffn: 1, heads: 1 }
    }
}

impl SliceAlign {
    /// The alignment for a model whose down projections have blocks of `down_block`
    /// columns and whose attention outputs have blocks of `o_block` columns (the largest
    /// over the layers; all GGML block lengths are powers of two, so the largest is their
    /// least common multiple).
    pub fn from_blocks(down_block: usize, o_block: usize, head_dim: usize) -> SliceAlign {
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let o = o_block.max(1);
        SliceAlign {
            ffn: down_block.max(1),
            heads: o / gcd(o, head_dim.max(1)),
        }
    }
}

/// Which elements RoPE rotates together (serializable mirror of the kernels' [`RopeLayout`];
/// not to be confused with [`tpi_kernels::Layout`], the row layout of a weight matrix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopePairing {
    /// HF layout: pairs (i, i + d/2).
    HalfSplit,
    /// GGUF/llama.cpp layout: pairs (2i, 2i + 1).
    Interleaved,
}

impl From<RopePairing> for RopeLayout {
    fn from(l: RopePairing) -> Self {
        match l {
            RopePairing::HalfSplit => RopeLayout::HalfSplit,
            RopePairing::Interleaved => RopeLayout::Interleaved,
        }
    }
}

/// Serializable mirror of [`Llama3Scaling`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// Overall scale factor.
    pub factor: f32,
    /// Low-frequency factor.
    pub low_freq_factor: f32,
    /// High-frequency factor.
    pub high_freq_factor: f32,
    /// Context length before scaling.
    pub original_max_position_embeddings: usize,
}

impl From<RopeScaling> for Llama3Scaling {
    fn from(s: RopeScaling) -> Self {
        Llama3Scaling {
            factor: s.factor,
            low_freq_factor: s.low_freq_factor,
            high_freq_factor: s.high_freq_factor,
            original_max_position_embeddings: s.original_max_position_embeddings,
        }
    }
}

const SUPPORTED_HF: &[(&str, &str)] = &[
    ("LlamaForCausalLM", "llama"),
    ("MistralForCausalLM", "mistral"),
    ("Qwen2ForCausalLM", "qwen2"),
];

fn cfg_err(msg: impl Into<String>) -> ModelError {
    ModelError::Config(msg.into())
}

fn get_usize(v: &Value, key: &str) -> Result<Option<usize>, ModelError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| cfg_err(format!("`{key}` must be a non-negative integer, got {x}"))),
    }
}

fn need_usize(v: &Value, key: &str) -> Result<usize, ModelError> {
    get_usize(v, key)?.ok_or_else(|| cfg_err(format!("missing `{key}`")))
}

fn get_f32(v: &Value, key: &str) -> Result<Option<f32>, ModelError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(|n| Some(n as f32))
            .ok_or_else(|| cfg_err(format!("`{key}` must be a number, got {x}"))),
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn parse_scaling(s: &Value) -> Result<Option<RopeScaling>, ModelError> {
    let ty = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    match ty {
        "default" => Ok(None),
        "llama3" => Ok(Some(RopeScaling {
            factor: get_f32(s, "factor")?
                .ok_or_else(|| cfg_err("llama3 rope_scaling needs `factor`"))?,
            low_freq_factor: get_f32(s, "low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: get_f32(s, "high_freq_factor")?.unwrap_or(4.0),
            original_max_position_embeddings: need_usize(s, "original_max_position_embeddings")?,
        })),
        other => Err(cfg_err(format!(
            "unsupported rope_scaling type `{other}` (tpi supports default and llama3)"
        ))),
    }
}

/// Checks that every id in `ids` names a row of a `vocab`-token vocabulary; the error
/// names the first that does not.
pub fn check_token_ids(ids: &[u32], vocab: usize) -> Result<(), String> {
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(bad) => Err(format!(
            "token id {bad} is out of range: the vocabulary has {vocab} tokens"
        )),
        None => Ok(()),
    }
}

impl ModelConfig {
    /// Parses an HF `config.json` (transformers 4.x `rope_theta`/`rope_scaling`/`torch_dtype`
    /// or 5.x `rope_parameters`/`dtype`).
    pub fn from_hf_json(text: &str) -> Result<Self, ModelError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| cfg_err(format!("config.json: {e}")))?;
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        let arch = SUPPORTED_HF
            .iter()
            .find(|(cls, ty)| archs.contains(cls) || (archs.is_empty() && model_type == *ty))
            .map(|(_, ty)| ty.to_string())
            .ok_or_else(|| {
                ModelError::UnsupportedArch(if archs.is_empty() {
                    model_type.to_string()
                } else {
                    archs.join(",")
                })
            })?;
        let hidden = need_usize(&v, "hidden_size")?;
        let n_heads = need_usize(&v, "num_attention_heads")?;
        let n_kv = get_usize(&v, "num_key_value_heads")?.unwrap_or(n_heads);
        let head_dim = match get_usize(&v, "head_dim")? {
            Some(h) => h,
            None => {
                if n_heads == 0 || hidden % n_heads != 0 {
                    return Err(cfg_err(
                        "hidden_size is not divisible by num_attention_heads",
                    ));
                }
                hidden / n_heads
            }
        };
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = get_f32(&v, "rope_theta")?
            .or(match rope_params {
                Some(p) => get_f32(p, "rope_theta")?,
                None => None,
            })
            .unwrap_or(10000.0);
        let rope_scaling = match v.get("rope_scaling").filter(|s| s.is_object()) {
            Some(s) => parse_scaling(s)?,
            None => match rope_params {
                Some(p) => parse_scaling(p)?,
                None => None,
            },
        };
        match v.get("hidden_act").or_else(|| v.get("hidden_activation")) {
            None | Some(Value::Null) => {}
            Some(Value::String(a)) if a == "silu" || a == "swish" => {}
            Some(a) => {
                return Err(cfg_err(format!(
                    "unsupported hidden_act {a} (tpi runs SiLU-gated MLPs: \"silu\")"
                )))
            }
        }
        if v.get("mlp_bias").and_then(|b| b.as_bool()) == Some(true) {
            return Err(cfg_err(
                "mlp_bias = true is not supported (MLP projections without bias)",
            ));
        }
        let cfg = ModelConfig {
            attention_bias: arch == "qwen2"
                || v.get("attention_bias")
                    .and_then(|b| b.as_bool())
                    .unwrap_or(false),
            arch,
            vocab_size: need_usize(&v, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: need_usize(&v, "intermediate_size")?,
            n_layers: need_usize(&v, "num_hidden_layers")?,
            n_heads,
            n_kv_heads: n_kv,
            head_dim,
            rms_norm_eps: get_f32(&v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: get_usize(&v, "max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|b| b.as_bool())
                .unwrap_or(false),
            rope_layout: RopePairing::HalfSplit,
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            slice_align: SliceAlign::default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads llama-family hyper-parameters from GGUF metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let arch = f
            .get_str("general.architecture")
            .ok_or_else(|| cfg_err("GGUF has no general.architecture"))?
            .to_string();
        let layout = match arch.as_str() {
            "llama" | "mistral" => RopePairing::Interleaved,
            "qwen2" => RopePairing::HalfSplit,
            other => return Err(ModelError::UnsupportedArch(other.to_string())),
        };
        let key = |k: &str| format!("{arch}.{k}");
        let need = |k: &str| {
            f.get_u32(&key(k))
                .map(|x| x as usize)
                .ok_or_else(|| cfg_err(format!("GGUF metadata lacks `{}`", key(k))))
        };
        let hidden = need("embedding_length")?;
        let n_heads = need("attention.head_count")?;
        let n_kv = f
            .get_u32(&key("attention.head_count_kv"))
            .map(|x| x as usize)
            .unwrap_or(n_heads);
        let head_dim = match f.get_u32(&key("attention.key_length")) {
            Some(h) => h as usize,
            None if n_heads > 0 && hidden % n_heads == 0 => hidden / n_heads,
            None => return Err(cfg_err("embedding_length not divisible by head_count")),
        };
        let embd = f
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let vocab = f
            .get_u32(&key("vocab_size"))
            .map(|x| x as usize)
            .unwrap_or_else(|| embd.rows_cols().0);
        if f.tensor("rope_freqs.weight").is_some() {
            return Err(cfg_err(
                "GGUF per-frequency RoPE factors (rope_freqs.weight, llama3 scaling) are not supported; load the HF directory instead",
            ));
        }
        let rope_scaling = None;
        let cfg = ModelConfig {
            attention_bias: f.tensor("blk.0.attn_q.bias").is_some(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: need("feed_forward_length")?,
            n_layers: need("block_count")?,
            n_heads,
            n_kv_heads: n_kv,
            head_dim,
            rms_norm_eps: f
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: f.get_f32(&key("rope.freq_base")).unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: f
                .get_u32(&key("context_length"))
                .map(|x| x as usize)
                .unwrap_or(2048),
            tie_word_embeddings: f.tensor("output.weight").is_none(),
            rope_layout: layout,
            bos_token_id: f.get_u32("tokenizer.ggml.bos_token_id"),
            eos_token_ids: f
                .get_u32("tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect(),
            slice_align: SliceAlign::default(),
            arch,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the relations the forward pass relies on.
    pub fn validate(&self) -> Result<(), ModelError> {
        let pos = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in pos {
            if v == 0 {
                return Err(cfg_err(format!("`{name}` must be positive")));
            }
            if v > 1 << 24 {
                return Err(cfg_err(format!("`{name}` = {v} is implausibly large")));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(cfg_err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.n_heads, self.n_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(cfg_err("head_dim must be even for RoPE"));
        }
        // Sane ranges: values outside them run, but compute nonsense.
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps <= 1e-2) {
            return Err(cfg_err(format!(
                "rms_norm_eps = {} is outside (0, 0.01] (models use about 1e-6 to 1e-5)",
                self.rms_norm_eps
            )));
        }
        if !(self.rope_theta >= 1.0 && self.rope_theta <= 1e10) {
            return Err(cfg_err(format!(
                "rope_theta = {} is outside [1, 1e10] (models use 1e4 to about 1e7)",
                self.rope_theta
            )));
        }
        if self.head_dim > 1024 {
            return Err(cfg_err(format!(
                "head_dim = {} is implausibly large (at most 1024)",
                self.head_dim
            )));
        }
        if let Some(r) = &self.rope_scaling {
            if !(r.factor >= 1.0 && r.factor <= 1024.0) {
                return Err(cfg_err(format!(
                    "llama3 rope_scaling factor = {} is outside [1, 1024]",
                    r.factor
                )));
            }
            if !(r.low_freq_factor > 0.0
                && r.high_freq_factor > r.low_freq_factor
                && r.high_freq_factor <= 1024.0)
            {
                return Err(cfg_err(format!(
                    "llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor <= 1024, got {} and {}",
                    r.low_freq_factor, r.high_freq_factor
                )));
            }
            if r.original_max_position_embeddings == 0
                || r.original_max_position_embeddings > self.max_position_embeddings
            {
                return Err(cfg_err(format!(
                    "llama3 rope_scaling original_max_position_embeddings = {} must be in 1..={} (max_position_embeddings)",
                    r.original_max_position_embeddings, self.max_position_embeddings
                )));
            }
        }
        Ok(())
    }

    /// Query projection width (heads × head_dim).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    /// Key/value projection width.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
    /// RoPE inverse frequencies for this model.
    pub fn inv_freq(&self) -> Vec<f32> {
        tpi_kernels::rope_inv_freq(
            self.head_dim,
            self.rope_theta,
            self.rope_scaling.map(Into::into),
        )
    }
}
