//! Model hyper-parameters, read from an HF `config.json` (transformers 4.x or 5.x)
//! or from GGUF metadata, for any family of the architecture table ([`super::arch`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tpi_kernels::{Llama3Scaling, RopeLayout};

use super::arch::{Arch, Bias, NormStyle};
use super::error::ModelError;
use super::gguf::GgufFile;

/// The shape and numerics of a decoder: everything the forward pass needs besides weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Architecture name as the source file gives it (e.g. `llama`, `mistral`,
    /// `gemma3_text`); [`ModelConfig::spec`] is its family's declaration.
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
    /// Added to every norm weight when loaded: 1 for HF Gemma checkpoints (`x̂ · (1 + w)`),
    /// 0 otherwise (GGUF Gemma files carry the 1 already).
    #[serde(default)]
    pub norm_offset: f32,
    /// The attention score scale when it is not `1/sqrt(head_dim)` (Gemma's
    /// `query_pre_attn_scalar^-1/2`).
    #[serde(default)]
    pub attn_scale: Option<f32>,
    /// Sliding-window length of the layers [`ModelConfig::sliding_layers`] marks.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends through the sliding window (empty: none does).
    #[serde(default)]
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the sliding-window layers (Gemma 3: 10000; the global layers use
    /// `rope_theta`). Sliding layers never scale their frequencies.
    #[serde(default)]
    pub rope_local_theta: Option<f32>,
    /// Per-frequency divisors of the global layers' RoPE frequencies, `head_dim/2` of them:
    /// GGUF Llama 3.x's `rope_freqs.weight`, or a linear scaling factor repeated.
    #[serde(default)]
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Mixture of experts: every layer's MLP is this many experts (0: a dense MLP).
    #[serde(default)]
    pub n_experts: usize,
    /// Experts each token is routed to (top-k of the router's softmax).
    #[serde(default)]
    pub n_experts_used: usize,
    /// One expert's MLP width (the split cuts it like a dense MLP's).
    #[serde(default)]
    pub moe_intermediate_size: usize,
    /// The top-k routing weights are renormalised to sum to 1 (Mixtral, and Qwen3-MoE as
    /// llama.cpp runs it); otherwise they stay softmax probabilities over all experts.
    #[serde(default)]
    pub norm_topk_prob: bool,
}

/// The experts of an MoE config: (count, used per token, width), all zero for a dense one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Experts {
    /// Experts per layer.
    pub count: usize,
    /// Routed per token.
    pub used: usize,
    /// One expert's MLP width.
    pub width: usize,
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

/// A global-layer RoPE frequency scaling.
enum Scaling {
    None,
    Llama3(RopeScaling),
    /// Every frequency divided by this factor (HF `linear`).
    Linear(f32),
}

fn parse_scaling(s: &Value) -> Result<Scaling, ModelError> {
    let ty = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    match ty {
        "default" => Ok(Scaling::None),
        "llama3" => Ok(Scaling::Llama3(RopeScaling {
            factor: get_f32(s, "factor")?
                .ok_or_else(|| cfg_err("llama3 rope_scaling needs `factor`"))?,
            low_freq_factor: get_f32(s, "low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: get_f32(s, "high_freq_factor")?.unwrap_or(4.0),
            original_max_position_embeddings: need_usize(s, "original_max_position_embeddings")?,
        })),
        "linear" => {
            Ok(Scaling::Linear(get_f32(s, "factor")?.ok_or_else(|| {
                cfg_err("linear rope_scaling needs `factor`")
            })?))
        }
        other => Err(cfg_err(format!(
            "unsupported rope_scaling type `{other}` (tpi supports default, linear and llama3)"
        ))),
    }
}

/// The sliding-window layers an HF config declares: its `layer_types`, else Gemma 3's
/// `sliding_window_pattern` (every n-th layer global), else Mistral's `sliding_window`
/// on every layer; Qwen's `sliding_window` counts only with `use_sliding_window`.
fn hf_sliding_layers(v: &Value, arch: &Arch, n_layers: usize) -> Result<Vec<bool>, ModelError> {
    if let Some(types) = v.get("layer_types").and_then(|t| t.as_array()) {
        if types.len() != n_layers {
            return Err(cfg_err(format!(
                "`layer_types` lists {} layers, num_hidden_layers is {n_layers}",
                types.len()
            )));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(false),
                Some("sliding_attention") => Ok(true),
                _ => Err(cfg_err(format!(
                    "unsupported layer type {t} (tpi runs full_attention and sliding_attention layers)"
                ))),
            })
            .collect();
    }
    let window = get_usize(v, "sliding_window")?;
    if arch.name == "gemma3" {
        let pattern = get_usize(v, "sliding_window_pattern")?
            .or(get_usize(v, "_sliding_window_pattern")?)
            .unwrap_or(6)
            .max(1);
        return Ok((0..n_layers).map(|l| (l + 1) % pattern != 0).collect());
    }
    let used = match v.get("use_sliding_window") {
        Some(Value::Bool(b)) => *b,
        _ => arch.name == "llama",
    };
    if window.is_some() && used {
        if arch.name != "llama" {
            return Err(cfg_err(
                "use_sliding_window = true without `layer_types` is not supported",
            ));
        }
        return Ok(vec![true; n_layers]);
    }
    Ok(Vec::new())
}

/// The experts an HF config declares: `num_local_experts` (or Qwen's older `num_experts`)
/// and `num_experts_per_tok`; the width is Qwen3-MoE's `moe_intermediate_size` (every
/// layer sparse) or Mixtral's `intermediate_size`; none for a dense family.
fn hf_experts(v: &Value, arch: &Arch) -> Result<Experts, ModelError> {
    if !arch.is_moe() {
        return Ok(Experts::default());
    }
    // transformers 5 writes `num_local_experts` for both families, 4.x `num_experts` for Qwen.
    let count = match get_usize(v, "num_local_experts")? {
        Some(n) => n,
        None => need_usize(v, "num_experts")?,
    };
    let width = match arch.name {
        "mixtral" => need_usize(v, "intermediate_size")?,
        _ => need_usize(v, "moe_intermediate_size")?,
    };
    if get_usize(v, "decoder_sparse_step")?.unwrap_or(1) != 1
        || v.get("mlp_only_layers")
            .and_then(|l| l.as_array())
            .is_some_and(|l| !l.is_empty())
    {
        return Err(cfg_err(
            "dense layers among the MoE layers (decoder_sparse_step, mlp_only_layers) are not supported",
        ));
    }
    for key in ["shared_expert_intermediate_size", "n_shared_experts"] {
        if get_usize(v, key)?.unwrap_or(0) > 0 {
            return Err(cfg_err(format!(
                "shared experts (`{key}`) are not supported"
            )));
        }
    }
    Ok(Experts {
        count,
        used: need_usize(v, "num_experts_per_tok")?,
        width,
    })
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
        let names: Vec<&str> = if archs.is_empty() {
            vec![model_type]
        } else {
            archs.clone()
        };
        let (arch, spec) = names
            .iter()
            .find_map(|n| {
                let a = Arch::find(n)?;
                (a.hf_classes.contains(n) || a.hf_model_types.contains(n)).then_some((n, a))
            })
            .ok_or_else(|| ModelError::UnsupportedArch(names.join(",")))?;
        let arch = if *arch == "MistralForCausalLM" || model_type == "mistral" {
            "mistral".to_string()
        } else {
            spec.name.to_string()
        };
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
        // Gemma 3 under transformers 5 keeps one entry per layer type.
        let (global_p, local_p) = match rope_params {
            Some(p) if p.get("full_attention").is_some() => {
                (p.get("full_attention"), p.get("sliding_attention"))
            }
            other => (other, None),
        };
        let rope_theta = get_f32(&v, "rope_theta")?
            .or(match global_p {
                Some(p) => get_f32(p, "rope_theta")?,
                None => None,
            })
            .unwrap_or(10000.0);
        let scaling = match v.get("rope_scaling").filter(|s| s.is_object()) {
            Some(s) => parse_scaling(s)?,
            None => match global_p {
                Some(p) => parse_scaling(p)?,
                None => Scaling::None,
            },
        };
        if let Some(p) = local_p {
            if !matches!(parse_scaling(p)?, Scaling::None) {
                return Err(cfg_err(
                    "scaled RoPE on sliding-window layers is not supported",
                ));
            }
        }
        let rope_local_theta = match get_f32(&v, "rope_local_base_freq")? {
            Some(t) => Some(t),
            None => match local_p {
                Some(p) => get_f32(p, "rope_theta")?,
                None => None,
            },
        };
        match v.get("hidden_act").or_else(|| v.get("hidden_activation")) {
            None | Some(Value::Null) => {}
            Some(Value::String(a)) if spec.act_names.contains(&a.as_str()) => {}
            Some(a) => {
                return Err(cfg_err(format!(
                    "unsupported hidden_act {a} for {} (it runs {})",
                    spec.name,
                    spec.act_names.join(", ")
                )))
            }
        }
        if v.get("mlp_bias").and_then(|b| b.as_bool()) == Some(true) {
            return Err(cfg_err(
                "mlp_bias = true is not supported (MLP projections without bias)",
            ));
        }
        for key in [
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "use_bidirectional_attention",
        ] {
            match v.get(key) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                Some(x) => {
                    return Err(cfg_err(format!("`{key}` = {x} is not supported")));
                }
            }
        }
        let bias_flag = v
            .get("attention_bias")
            .and_then(|b| b.as_bool())
            .unwrap_or(false);
        let n_layers = need_usize(&v, "num_hidden_layers")?;
        let sliding_layers = hf_sliding_layers(&v, spec, n_layers)?;
        let experts = hf_experts(&v, spec)?;
        let (rope_scaling, rope_freq_factors) = match scaling {
            Scaling::None => (None, None),
            Scaling::Llama3(s) => (Some(s), None),
            Scaling::Linear(f) => (None, Some(vec![f; head_dim / 2])),
        };
        let cfg = ModelConfig {
            attention_bias: match spec.bias {
                Bias::Yes => true,
                Bias::No => false,
                Bias::FromConfig => bias_flag,
            },
            arch,
            vocab_size: need_usize(&v, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: need_usize(&v, "intermediate_size")?,
            n_layers,
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
                .unwrap_or(spec.name == "gemma3"),
            rope_layout: RopePairing::HalfSplit,
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            slice_align: SliceAlign::default(),
            norm_offset: if spec.hf_norm == NormStyle::OnePlus {
                1.0
            } else {
                0.0
            },
            attn_scale: match (spec.name, get_f32(&v, "query_pre_attn_scalar")?) {
                ("gemma3", Some(q)) => Some(1.0 / q.sqrt()),
                _ => None,
            },
            sliding_window: if sliding_layers.iter().any(|&s| s) {
                Some(
                    get_usize(&v, "sliding_window")?
                        .ok_or_else(|| cfg_err("sliding-window layers need `sliding_window`"))?,
                )
            } else {
                None
            },
            rope_local_theta: if spec.name == "gemma3" {
                Some(rope_local_theta.unwrap_or(10000.0))
            } else {
                None
            },
            sliding_layers,
            rope_freq_factors,
            n_experts: experts.count,
            n_experts_used: experts.used,
            moe_intermediate_size: experts.width,
            norm_topk_prob: match spec.name {
                "mixtral" => true,
                _ => v
                    .get("norm_topk_prob")
                    .and_then(|b| b.as_bool())
                    .unwrap_or(false),
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads hyper-parameters from GGUF metadata (keys under `<general.architecture>.`).
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let arch = f
            .get_str("general.architecture")
            .ok_or_else(|| cfg_err("GGUF has no general.architecture"))?
            .to_string();
        let spec = Arch::find(&arch)
            .filter(|a| a.gguf_names.contains(&arch.as_str()))
            .ok_or_else(|| ModelError::UnsupportedArch(arch.clone()))?;
        let key = |k: &str| format!("{arch}.{k}");
        let n_experts = f.get_u32(&key("expert_count")).unwrap_or(0) as usize;
        // llama.cpp writes Mixtral as `llama` with experts.
        let (spec, arch_name) = match (spec.name, n_experts) {
            ("llama", n) if n > 0 => (
                Arch::find("mixtral").expect("mixtral"),
                "mixtral".to_string(),
            ),
            (_, n) if n > 0 && !spec.is_moe() => {
                return Err(cfg_err(format!(
                    "{arch} with {} experts is not supported",
                    n
                )))
            }
            _ => (spec, arch.clone()),
        };
        let need = |k: &str| {
            f.get_u32(&key(k))
                .map(|x| x as usize)
                .ok_or_else(|| cfg_err(format!("GGUF metadata lacks `{}`", key(k))))
        };
        let hidden = need("embedding_length")?;
        let n_heads = need("attention.head_count")?;
        let n_layers = need("block_count")?;
        let n_kv = f
            .get_u32(&key("attention.head_count_kv"))
            .map(|x| x as usize)
            .unwrap_or(n_heads);
        let head_dim = match f.get_u32(&key("attention.key_length")) {
            Some(h) => h as usize,
            None if n_heads > 0 && hidden % n_heads == 0 => hidden / n_heads,
            None => return Err(cfg_err("embedding_length not divisible by head_count")),
        };
        if let Some(v) = f.get_u32(&key("attention.value_length")) {
            if v as usize != head_dim {
                return Err(cfg_err(format!(
                    "{} ({v}) differs from the key length ({head_dim}): not supported",
                    key("attention.value_length")
                )));
            }
        }
        let embd = f
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let vocab = f
            .get_u32(&key("vocab_size"))
            .map(|x| x as usize)
            .unwrap_or_else(|| embd.rows_cols().0);
        if let Some(c) = f.get_f32(&key("final_logit_softcapping")) {
            if c != 0.0 {
                return Err(cfg_err(format!(
                    "{} = {c} is not supported",
                    key("final_logit_softcapping")
                )));
            }
        }
        let mut rope_freq_factors = match f.tensor("rope_freqs.weight") {
            None => None,
            Some(t) => {
                let n = t.rows_cols();
                if n != (1, head_dim / 2) {
                    return Err(ModelError::BadShape {
                        tensor: "rope_freqs.weight".into(),
                        got: vec![n.0, n.1],
                        expected: vec![1, head_dim / 2],
                    });
                }
                let mut v = vec![0f32; head_dim / 2];
                tpi_kernels::dequantize_row(t.dtype, f.tensor_data(t), &mut v);
                Some(v)
            }
        };
        match f.get_str(&key("rope.scaling.type")) {
            None | Some("none") => {}
            Some("linear") => {
                let factor = f
                    .get_f32(&key("rope.scaling.factor"))
                    .ok_or_else(|| cfg_err(format!("{} is missing", key("rope.scaling.factor"))))?;
                if rope_freq_factors.is_some() {
                    return Err(cfg_err(
                        "both rope_freqs.weight and linear rope scaling: not supported",
                    ));
                }
                rope_freq_factors = Some(vec![factor; head_dim / 2]);
            }
            Some(other) => {
                return Err(cfg_err(format!(
                    "unsupported {} `{other}` (tpi supports none and linear)",
                    key("rope.scaling.type")
                )))
            }
        }
        let window = f
            .get_u32(&key("attention.sliding_window"))
            .map(|w| w as usize);
        // llama.cpp reads sliding windows for Gemma 3 only: every 6th layer global unless
        // the file says otherwise (a period, or one flag per layer).
        let sliding_layers = match (spec.name, window) {
            ("gemma3", Some(w)) if w > 0 => {
                match f.meta(&key("attention.sliding_window_pattern")) {
                    Some(super::gguf::MetaValue::Array(flags)) => {
                        let v: Vec<bool> = flags
                            .iter()
                            .map(|x| matches!(x, super::gguf::MetaValue::Bool(true)))
                            .collect();
                        if v.len() != n_layers {
                            return Err(cfg_err(format!(
                                "{} has {} flags for {n_layers} layers",
                                key("attention.sliding_window_pattern"),
                                v.len()
                            )));
                        }
                        v
                    }
                    other => {
                        let n = other.and_then(|x| x.as_u64()).unwrap_or(6).max(1) as usize;
                        (0..n_layers).map(|l| (l + 1) % n != 0).collect()
                    }
                }
            }
            _ => Vec::new(),
        };
        let ffn = need("feed_forward_length")?;
        let experts = if spec.is_moe() {
            Experts {
                count: n_experts,
                used: need("expert_used_count")?,
                width: match f.get_u32(&key("expert_feed_forward_length")) {
                    Some(w) => w as usize,
                    None => ffn,
                },
            }
        } else {
            Experts::default()
        };
        if f.get_u32(&key("expert_shared_count")).unwrap_or(0) > 0 {
            return Err(cfg_err("shared experts are not supported"));
        }
        let cfg = ModelConfig {
            attention_bias: spec.bias != Bias::No && f.tensor("blk.0.attn_q.bias").is_some(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: ffn,
            n_layers,
            n_heads,
            n_kv_heads: n_kv,
            head_dim,
            rms_norm_eps: f
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: f.get_f32(&key("rope.freq_base")).unwrap_or(10000.0),
            rope_scaling: None,
            max_position_embeddings: f
                .get_u32(&key("context_length"))
                .map(|x| x as usize)
                .unwrap_or(2048),
            tie_word_embeddings: f.tensor("output.weight").is_none(),
            rope_layout: spec.gguf_rope,
            bos_token_id: f.get_u32("tokenizer.ggml.bos_token_id"),
            eos_token_ids: f
                .get_u32("tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect(),
            slice_align: SliceAlign::default(),
            norm_offset: 0.0,
            // llama.cpp: Gemma 3 27B (62 layers) scales by hidden/heads, the others by head_dim.
            attn_scale: (spec.name == "gemma3" && n_layers == 62)
                .then(|| 1.0 / ((hidden / n_heads.max(1)) as f32).sqrt()),
            sliding_window: sliding_layers
                .iter()
                .any(|&s| s)
                .then_some(window.unwrap_or(0)),
            rope_local_theta: (spec.name == "gemma3")
                .then(|| f.get_f32(&key("rope.freq_base_swa")).unwrap_or(10000.0)),
            sliding_layers,
            rope_freq_factors,
            n_experts: experts.count,
            n_experts_used: experts.used,
            moe_intermediate_size: experts.width,
            // llama.cpp renormalises the top-k weights of both MoE families it reads.
            norm_topk_prob: spec.is_moe(),
            arch: arch_name,
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
        let spec = self.spec()?;
        if spec.is_moe() != (self.n_experts > 0) {
            return Err(cfg_err(format!(
                "{} has {} experts: {} models are {}",
                self.arch,
                self.n_experts,
                spec.name,
                if spec.is_moe() {
                    "mixtures of experts"
                } else {
                    "dense"
                }
            )));
        }
        if self.n_experts > 0
            && (self.n_experts > 1024
                || self.n_experts_used == 0
                || self.n_experts_used > self.n_experts
                || self.moe_intermediate_size == 0
                || self.moe_intermediate_size > 1 << 20)
        {
            return Err(cfg_err(format!(
                "experts: {} used of {}, width {}: needs 1 <= used <= experts <= 1024 and a positive width",
                self.n_experts_used, self.n_experts, self.moe_intermediate_size
            )));
        }
        if self.attention_bias && spec.bias == Bias::No {
            return Err(cfg_err(format!("{} has no attention biases", spec.name)));
        }
        if !self.sliding_layers.is_empty() && self.sliding_layers.len() != self.n_layers {
            return Err(cfg_err(format!(
                "{} sliding-window flags for {} layers",
                self.sliding_layers.len(),
                self.n_layers
            )));
        }
        if self.sliding_layers.iter().any(|&s| s) && self.sliding_window.is_none_or(|w| w == 0) {
            return Err(cfg_err("sliding-window layers need a positive window"));
        }
        if let Some(s) = self.attn_scale {
            if !(s > 0.0 && s <= 1.0) {
                return Err(cfg_err(format!("attention scale {s} is outside (0, 1]")));
            }
        }
        if let Some(t) = self.rope_local_theta {
            if !(1.0..=1e10).contains(&t) {
                return Err(cfg_err(format!(
                    "local rope_theta = {t} is outside [1, 1e10]"
                )));
            }
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != self.head_dim / 2 || f.iter().any(|x| !(*x > 0.0 && *x <= 1e4)) {
                return Err(cfg_err(format!(
                    "RoPE frequency factors: {} values, all in (0, 1e4], are needed for head_dim {}",
                    self.head_dim / 2,
                    self.head_dim
                )));
            }
            if self.rope_scaling.is_some() {
                return Err(cfg_err(
                    "both llama3 rope_scaling and per-frequency factors",
                ));
            }
        }
        if !(self.norm_offset == 0.0 || self.norm_offset == 1.0) {
            return Err(cfg_err(format!(
                "norm offset {} is neither 0 nor 1",
                self.norm_offset
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
    /// A plain Llama config of the given shape (f32 numerics, RoPE base 10000, tied
    /// embeddings, half-split pairing, no scaling, no sliding window): for tests and tools
    /// that build models in memory.
    pub fn llama(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        n_layers: usize,
        (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    ) -> Self {
        ModelConfig {
            arch: "llama".into(),
            vocab_size,
            hidden_size,
            intermediate_size,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            rope_scaling: None,
            max_position_embeddings: 128,
            tie_word_embeddings: true,
            attention_bias: false,
            rope_layout: RopePairing::HalfSplit,
            bos_token_id: None,
            eos_token_ids: vec![],
            slice_align: SliceAlign::default(),
            norm_offset: 0.0,
            attn_scale: None,
            sliding_window: None,
            sliding_layers: Vec::new(),
            rope_local_theta: None,
            rope_freq_factors: None,
            n_experts: 0,
            n_experts_used: 0,
            moe_intermediate_size: 0,
            norm_topk_prob: false,
        }
    }

    /// The family's declaration (an unknown family is refused by [`ModelConfig::validate`]).
    pub fn spec(&self) -> Result<&'static Arch, ModelError> {
        Arch::find(&self.arch).ok_or_else(|| ModelError::UnsupportedArch(self.arch.clone()))
    }

    /// The MLP width the split cuts: one expert's for an MoE model, else the dense MLP's.
    pub fn ffn_dim(&self) -> usize {
        if self.n_experts > 0 {
            self.moe_intermediate_size
        } else {
            self.intermediate_size
        }
    }

    /// The experts (all zero for a dense model).
    pub fn experts(&self) -> Experts {
        Experts {
            count: self.n_experts,
            used: self.n_experts_used,
            width: self.moe_intermediate_size,
        }
    }

    /// Whether `layer` attends through the sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_layers.get(layer).copied().unwrap_or(false)
    }

    /// The attention window of `layer` (None: global).
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.is_sliding(layer))
    }

    /// RoPE inverse frequencies of the global layers.
    pub fn inv_freq(&self) -> Vec<f32> {
        let mut f = tpi_kernels::rope_inv_freq(
            self.head_dim,
            self.rope_theta,
            self.rope_scaling.map(Into::into),
        );
        if let Some(div) = &self.rope_freq_factors {
            for (x, d) in f.iter_mut().zip(div) {
                *x /= d;
            }
        }
        f
    }

    /// RoPE inverse frequencies of the sliding-window layers (their own base, unscaled;
    /// the global ones when the model has no local base).
    pub fn inv_freq_local(&self) -> Vec<f32> {
        match self.rope_local_theta {
            Some(t) => tpi_kernels::rope_inv_freq(self.head_dim, t, None),
            None => self.inv_freq(),
        }
    }
}
