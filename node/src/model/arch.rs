//! The architecture table: one declaration per model family, read by config parsing,
//! validation, the loader, the shard writer, slicing and the forward pass.
//!
//! A family declares which tensors it has (with their GGUF and HF names), how its norms,
//! activation, embedding and RoPE pairing work, and which optional features (Q/K bias,
//! per-head Q/K norms, post-block norms, sliding-window layers) it uses. How a tensor is
//! split across ranks is a property of its [`Role`], the same for every family.

use serde::{Deserialize, Serialize};

use super::config::{ModelConfig, RopePairing};
use super::split::RankSlice;
use super::weights::Format;

/// The role of a tensor, independent of the family and the file's naming scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Token embedding [vocab, hidden].
    Embed,
    /// Final RMSNorm weight.
    FinalNorm,
    /// LM head [vocab, hidden] (absent when tied).
    LmHead,
    /// Pre-attention RMSNorm weight.
    AttnNorm,
    /// Query projection.
    Wq,
    /// Key projection.
    Wk,
    /// Value projection.
    Wv,
    /// Query bias.
    Bq,
    /// Key bias.
    Bk,
    /// Value bias.
    Bv,
    /// Attention output projection.
    Wo,
    /// Pre-MLP RMSNorm weight.
    MlpNorm,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
    /// Per-head RMSNorm of the queries, before RoPE (Qwen3, Gemma 3) [head_dim].
    QNorm,
    /// Per-head RMSNorm of the keys, before RoPE [head_dim].
    KNorm,
    /// RMSNorm of the attention block's reduced output, before the residual add (Gemma 3).
    PostAttnNorm,
    /// RMSNorm of the MLP block's reduced output, before the residual add (Gemma 3).
    PostMlpNorm,
    /// MoE router [experts, hidden] (replicated: every rank routes every token).
    Router,
    /// One expert's gate projection [expert width, hidden].
    ExpGate,
    /// One expert's up projection.
    ExpUp,
    /// One expert's down projection [hidden, expert width].
    ExpDown,
}

/// Which block of the stream a tensor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOf {
    /// Rank 0's embedding.
    Embed,
    /// Rank 0's final norm and LM head.
    Head,
    /// A layer's attention block.
    Attn,
    /// A layer's MLP block.
    Mlp,
}

/// How a tensor is cut across ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds all of it (norms; rank 0's head tensors).
    Replicated,
    /// Rows of the rank's query heads (column-parallel: Wq, Bq).
    QHeads,
    /// Rows of the rank's KV heads (Wk, Wv and their biases; replicated when ranks
    /// outnumber KV heads).
    KvHeads,
    /// Rows of the rank's MLP slice (gate, up).
    FfnRows,
    /// Input columns of the rank's query heads (row-parallel: Wo).
    HeadCols,
    /// Input columns of the rank's MLP slice (row-parallel: down).
    FfnCols,
    /// Rows of the rank's vocabulary slice (the LM head).
    VocabRows,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 23] = [
        Role::Embed,
        Role::FinalNorm,
        Role::LmHead,
        Role::AttnNorm,
        Role::Wq,
        Role::Wk,
        Role::Wv,
        Role::Bq,
        Role::Bk,
        Role::Bv,
        Role::Wo,
        Role::MlpNorm,
        Role::Gate,
        Role::Up,
        Role::Down,
        Role::QNorm,
        Role::KNorm,
        Role::PostAttnNorm,
        Role::PostMlpNorm,
        Role::Router,
        Role::ExpGate,
        Role::ExpUp,
        Role::ExpDown,
    ];

    /// A dense index (position in [`Role::ALL`]).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The block the tensor is streamed with.
    pub fn block(self) -> BlockOf {
        use Role::*;
        match self {
            Embed => BlockOf::Embed,
            FinalNorm | LmHead => BlockOf::Head,
            AttnNorm | Wq | Wk | Wv | Bq | Bk | Bv | Wo | QNorm | KNorm | PostAttnNorm => {
                BlockOf::Attn
            }
            MlpNorm | Gate | Up | Down | PostMlpNorm | Router | ExpGate | ExpUp | ExpDown => {
                BlockOf::Mlp
            }
        }
    }

    /// How the tensor is cut across ranks.
    pub fn split(self) -> Split {
        use Role::*;
        match self {
            Wq | Bq => Split::QHeads,
            Wk | Wv | Bk | Bv => Split::KvHeads,
            Gate | Up | ExpGate | ExpUp => Split::FfnRows,
            Wo => Split::HeadCols,
            Down | ExpDown => Split::FfnCols,
            LmHead => Split::VocabRows,
            Embed | FinalNorm | AttnNorm | MlpNorm | QNorm | KNorm | PostAttnNorm | PostMlpNorm
            | Router => Split::Replicated,
        }
    }

    /// Whether it is a norm weight (scaled by the family's [`NormStyle`] when loaded).
    pub fn is_norm(self) -> bool {
        use Role::*;
        matches!(
            self,
            FinalNorm | AttnNorm | MlpNorm | QNorm | KNorm | PostAttnNorm | PostMlpNorm
        )
    }

    /// Whether there is one per expert (the layer's tensor is indexed by expert too).
    pub fn is_expert(self) -> bool {
        matches!(self, Role::ExpGate | Role::ExpUp | Role::ExpDown)
    }

    /// Whether it is a vector (a norm or a bias), kept in f32 by shards.
    pub fn is_vector(self) -> bool {
        self.is_norm() || matches!(self, Role::Bq | Role::Bk | Role::Bv)
    }

    /// Whether a rank with slice `s` needs it: sliced attention tensors only when it has
    /// heads, sliced MLP tensors only when it has MLP columns; replicated ones always.
    pub fn needed_by(self, s: &RankSlice) -> bool {
        match self.split() {
            Split::Replicated => true,
            Split::QHeads | Split::KvHeads | Split::HeadCols => s.has_attn(),
            Split::FfnRows | Split::FfnCols => !s.ffn.is_empty(),
            Split::VocabRows => !s.vocab.is_empty(),
        }
    }

    /// The (rows, cols) the full tensor has under `cfg`.
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        use Role::*;
        let d = cfg.hidden_size;
        match self {
            Embed | LmHead => (cfg.vocab_size, d),
            FinalNorm | AttnNorm | MlpNorm | PostAttnNorm | PostMlpNorm => (1, d),
            QNorm | KNorm => (1, cfg.head_dim),
            Wq => (cfg.q_dim(), d),
            Wk | Wv => (cfg.kv_dim(), d),
            Bq => (1, cfg.q_dim()),
            Bk | Bv => (1, cfg.kv_dim()),
            Wo => (d, cfg.q_dim()),
            Gate | Up => (cfg.intermediate_size, d),
            Down => (d, cfg.intermediate_size),
            Router => (cfg.n_experts, d),
            ExpGate | ExpUp => (cfg.moe_intermediate_size, d),
            ExpDown => (d, cfg.moe_intermediate_size),
        }
    }
}

/// How a family's RMSNorm applies its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormStyle {
    /// `x̂ · w` (Llama).
    Plain,
    /// `x̂ · (1 + w)` in HF checkpoints (Gemma); llama.cpp's converter adds the 1 into
    /// the GGUF's weights, so GGUF files are [`NormStyle::Plain`].
    OnePlus,
}

/// The MLP's gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// SwiGLU: `silu(gate) · up`.
    Silu,
    /// GeGLU with tanh-approximated GELU: `gelu_tanh(gate) · up`.
    GeluTanh,
}

/// Whether a family's Q/K/V projections carry biases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bias {
    /// Never.
    No,
    /// Always (Qwen2).
    Yes,
    /// As the HF config's `attention_bias` says (Llama, Qwen3); GGUF: as the tensors say.
    FromConfig,
}

/// One family's declaration.
#[derive(Debug)]
pub struct Arch {
    /// The canonical name (`ModelConfig::arch` holds the source's own name, which maps here).
    pub name: &'static str,
    /// HF `architectures` classes.
    pub hf_classes: &'static [&'static str],
    /// HF `model_type`s (used when `architectures` is absent).
    pub hf_model_types: &'static [&'static str],
    /// GGUF `general.architecture` names.
    pub gguf_names: &'static [&'static str],
    /// Every tensor the family has: role, GGUF name, HF name (`{l}` is the layer).
    pub tensors: &'static [(Role, &'static str, &'static str)],
    /// Q/K/V biases.
    pub bias: Bias,
    /// RMSNorm weight style of HF checkpoints.
    pub hf_norm: NormStyle,
    /// The MLP activation.
    pub act: Activation,
    /// HF `hidden_act`/`hidden_activation` values meaning [`Arch::act`].
    pub act_names: &'static [&'static str],
    /// Embeddings are multiplied by √hidden (Gemma).
    pub embed_scale: bool,
    /// RoPE pairing of GGUF files: llama.cpp permutes Llama's Q/K rows for interleaved
    /// pairs; other families keep HF's half-split.
    pub gguf_rope: RopePairing,
}

const LLAMA_TENSORS: &[(Role, &str, &str)] = &[
    (
        Role::Embed,
        "token_embd.weight",
        "model.embed_tokens.weight",
    ),
    (Role::FinalNorm, "output_norm.weight", "model.norm.weight"),
    (Role::LmHead, "output.weight", "lm_head.weight"),
    (
        Role::AttnNorm,
        "blk.{l}.attn_norm.weight",
        "model.layers.{l}.input_layernorm.weight",
    ),
    (
        Role::Wq,
        "blk.{l}.attn_q.weight",
        "model.layers.{l}.self_attn.q_proj.weight",
    ),
    (
        Role::Wk,
        "blk.{l}.attn_k.weight",
        "model.layers.{l}.self_attn.k_proj.weight",
    ),
    (
        Role::Wv,
        "blk.{l}.attn_v.weight",
        "model.layers.{l}.self_attn.v_proj.weight",
    ),
    (
        Role::Bq,
        "blk.{l}.attn_q.bias",
        "model.layers.{l}.self_attn.q_proj.bias",
    ),
    (
        Role::Bk,
        "blk.{l}.attn_k.bias",
        "model.layers.{l}.self_attn.k_proj.bias",
    ),
    (
        Role::Bv,
        "blk.{l}.attn_v.bias",
        "model.layers.{l}.self_attn.v_proj.bias",
    ),
    (
        Role::Wo,
        "blk.{l}.attn_output.weight",
        "model.layers.{l}.self_attn.o_proj.weight",
    ),
    (
        Role::MlpNorm,
        "blk.{l}.ffn_norm.weight",
        "model.layers.{l}.post_attention_layernorm.weight",
    ),
    (
        Role::Gate,
        "blk.{l}.ffn_gate.weight",
        "model.layers.{l}.mlp.gate_proj.weight",
    ),
    (
        Role::Up,
        "blk.{l}.ffn_up.weight",
        "model.layers.{l}.mlp.up_proj.weight",
    ),
    (
        Role::Down,
        "blk.{l}.ffn_down.weight",
        "model.layers.{l}.mlp.down_proj.weight",
    ),
];

const QK_NORM_TENSORS: &[(Role, &str, &str)] = &[
    (
        Role::QNorm,
        "blk.{l}.attn_q_norm.weight",
        "model.layers.{l}.self_attn.q_norm.weight",
    ),
    (
        Role::KNorm,
        "blk.{l}.attn_k_norm.weight",
        "model.layers.{l}.self_attn.k_norm.weight",
    ),
];

const QWEN3_TENSORS: &[(Role, &str, &str)] = &concat_tensors::<17>(LLAMA_TENSORS, QK_NORM_TENSORS);

/// Llama's attention and norms, without the dense MLP (the first 12 of [`LLAMA_TENSORS`]).
const LLAMA_ATTN_TENSORS: &[(Role, &str, &str)] = LLAMA_TENSORS.split_at(12).0;

/// Expert tensors: GGUF stacks a layer's experts in one 3-D tensor (`ffn_*_exps`, expert
/// `e` its `e`-th slab of rows); HF names each (`{e}`).
const QWEN3_MOE_EXPERTS: &[(Role, &str, &str)] = &[
    (
        Role::Router,
        "blk.{l}.ffn_gate_inp.weight",
        "model.layers.{l}.mlp.gate.weight",
    ),
    (
        Role::ExpGate,
        "blk.{l}.ffn_gate_exps.weight",
        "model.layers.{l}.mlp.experts.{e}.gate_proj.weight",
    ),
    (
        Role::ExpUp,
        "blk.{l}.ffn_up_exps.weight",
        "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
    ),
    (
        Role::ExpDown,
        "blk.{l}.ffn_down_exps.weight",
        "model.layers.{l}.mlp.experts.{e}.down_proj.weight",
    ),
];

const MIXTRAL_EXPERTS: &[(Role, &str, &str)] = &[
    (
        Role::Router,
        "blk.{l}.ffn_gate_inp.weight",
        "model.layers.{l}.block_sparse_moe.gate.weight",
    ),
    (
        Role::ExpGate,
        "blk.{l}.ffn_gate_exps.weight",
        "model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",
    ),
    (
        Role::ExpUp,
        "blk.{l}.ffn_up_exps.weight",
        "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",
    ),
    (
        Role::ExpDown,
        "blk.{l}.ffn_down_exps.weight",
        "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight",
    ),
];

const QWEN3_MOE_TENSORS: &[(Role, &str, &str)] = &concat_tensors::<18>(
    &concat_tensors::<14>(LLAMA_ATTN_TENSORS, QK_NORM_TENSORS),
    QWEN3_MOE_EXPERTS,
);

const MIXTRAL_TENSORS: &[(Role, &str, &str)] =
    &concat_tensors::<16>(LLAMA_ATTN_TENSORS, MIXTRAL_EXPERTS);

/// Gemma 3's norms around the blocks: HF's `post_attention_layernorm` is the *post*-attention
/// norm there, and the pre-MLP norm is `pre_feedforward_layernorm`.
const GEMMA3_NORMS: &[(Role, &str, &str)] = &[
    (
        Role::PostAttnNorm,
        "blk.{l}.post_attention_norm.weight",
        "model.layers.{l}.post_attention_layernorm.weight",
    ),
    (
        Role::MlpNorm,
        "blk.{l}.ffn_norm.weight",
        "model.layers.{l}.pre_feedforward_layernorm.weight",
    ),
    (
        Role::PostMlpNorm,
        "blk.{l}.post_ffw_norm.weight",
        "model.layers.{l}.post_feedforward_layernorm.weight",
    ),
];

/// Llama's head, attention norm and Q/K/V (the first 7 of [`LLAMA_TENSORS`]), its O
/// projection (the 11th) and its gate/up/down (the last 3).
const LLAMA_QKV: &[(Role, &str, &str)] = LLAMA_TENSORS.split_at(7).0;
const LLAMA_O: &[(Role, &str, &str)] = LLAMA_TENSORS.split_at(10).1.split_at(1).0;
const LLAMA_MLP: &[(Role, &str, &str)] = LLAMA_TENSORS.split_at(12).1;

const GEMMA3_TENSORS: &[(Role, &str, &str)] = &concat_tensors::<16>(
    &concat_tensors::<13>(
        &concat_tensors::<10>(&concat_tensors::<8>(LLAMA_QKV, LLAMA_O), QK_NORM_TENSORS),
        GEMMA3_NORMS,
    ),
    LLAMA_MLP,
);

/// `a` followed by `b`, at compile time.
const fn concat_tensors<const N: usize>(
    a: &[(Role, &'static str, &'static str)],
    b: &[(Role, &'static str, &'static str)],
) -> [(Role, &'static str, &'static str); N] {
    let mut out = [(Role::Embed, "", ""); N];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    let mut j = 0;
    while j < b.len() {
        out[i + j] = b[j];
        j += 1;
    }
    assert!(
        i + j == N,
        "concat_tensors: N must be the sum of the lengths"
    );
    out
}

/// Every supported family.
pub const ARCHS: &[Arch] = &[
    Arch {
        name: "llama",
        hf_classes: &["LlamaForCausalLM", "MistralForCausalLM"],
        hf_model_types: &["llama", "mistral"],
        gguf_names: &["llama", "mistral"],
        tensors: LLAMA_TENSORS,
        bias: Bias::FromConfig,
        hf_norm: NormStyle::Plain,
        act: Activation::Silu,
        act_names: &["silu", "swish"],
        embed_scale: false,
        gguf_rope: RopePairing::Interleaved,
    },
    Arch {
        name: "qwen2",
        hf_classes: &["Qwen2ForCausalLM"],
        hf_model_types: &["qwen2"],
        gguf_names: &["qwen2"],
        tensors: LLAMA_TENSORS,
        bias: Bias::Yes,
        hf_norm: NormStyle::Plain,
        act: Activation::Silu,
        act_names: &["silu", "swish"],
        embed_scale: false,
        gguf_rope: RopePairing::HalfSplit,
    },
    Arch {
        name: "qwen3",
        hf_classes: &["Qwen3ForCausalLM"],
        hf_model_types: &["qwen3"],
        gguf_names: &["qwen3"],
        tensors: QWEN3_TENSORS,
        bias: Bias::FromConfig,
        hf_norm: NormStyle::Plain,
        act: Activation::Silu,
        act_names: &["silu", "swish"],
        embed_scale: false,
        gguf_rope: RopePairing::HalfSplit,
    },
    Arch {
        name: "qwen3moe",
        hf_classes: &["Qwen3MoeForCausalLM"],
        hf_model_types: &["qwen3_moe"],
        gguf_names: &["qwen3moe"],
        tensors: QWEN3_MOE_TENSORS,
        bias: Bias::FromConfig,
        hf_norm: NormStyle::Plain,
        act: Activation::Silu,
        act_names: &["silu", "swish"],
        embed_scale: false,
        gguf_rope: RopePairing::HalfSplit,
    },
    Arch {
        name: "mixtral",
        hf_classes: &["MixtralForCausalLM"],
        hf_model_types: &["mixtral"],
        // llama.cpp writes Mixtral as `llama` with `llama.expert_count`.
        gguf_names: &[],
        tensors: MIXTRAL_TENSORS,
        bias: Bias::No,
        hf_norm: NormStyle::Plain,
        act: Activation::Silu,
        act_names: &["silu", "swish"],
        embed_scale: false,
        gguf_rope: RopePairing::Interleaved,
    },
    Arch {
        name: "gemma3",
        hf_classes: &["Gemma3ForCausalLM"],
        hf_model_types: &["gemma3_text"],
        gguf_names: &["gemma3"],
        tensors: GEMMA3_TENSORS,
        bias: Bias::FromConfig,
        hf_norm: NormStyle::OnePlus,
        act: Activation::GeluTanh,
        act_names: &["gelu_pytorch_tanh", "gelu_tanh"],
        embed_scale: true,
        gguf_rope: RopePairing::HalfSplit,
    },
];

impl Arch {
    /// The family a source names (an HF class or model type, or a GGUF architecture).
    pub fn find(name: &str) -> Option<&'static Arch> {
        ARCHS.iter().find(|a| {
            a.name == name
                || a.gguf_names.contains(&name)
                || a.hf_model_types.contains(&name)
                || a.hf_classes.contains(&name)
        })
    }

    /// The names `find` accepts, for errors: `HF classes (GGUF names)` per family.
    pub fn supported() -> String {
        ARCHS
            .iter()
            .map(|a| {
                format!(
                    "{} (GGUF: {})",
                    a.hf_classes.join(", "),
                    a.gguf_names.join(", ")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Whether the family's MLPs are mixtures of experts.
    pub fn is_moe(&self) -> bool {
        self.has(Role::Router)
    }

    /// Whether the family has a tensor with this role.
    pub fn has(&self, role: Role) -> bool {
        self.tensors.iter().any(|t| t.0 == role)
    }

    /// The tensor's name in a file of format `fmt` (None when the family has no such role).
    /// For an expert role, `expert` fills HF's `{e}`; GGUF's name is the stacked tensor's.
    pub fn tensor_name(
        &self,
        role: Role,
        fmt: Format,
        layer: usize,
        expert: usize,
    ) -> Option<String> {
        let &(_, gguf, hf) = self.tensors.iter().find(|t| t.0 == role)?;
        let pattern = match fmt {
            Format::Gguf => gguf,
            Format::SafeTensors => hf,
        };
        Some(
            pattern
                .replace("{l}", &layer.to_string())
                .replace("{e}", &expert.to_string()),
        )
    }

    /// The per-layer roles a model under `cfg` has, in stream order: biases only when the
    /// config has them.
    pub fn layer_roles(&self, cfg: &ModelConfig) -> Vec<Role> {
        self.tensors
            .iter()
            .map(|t| t.0)
            .filter(|r| matches!(r.block(), BlockOf::Attn | BlockOf::Mlp))
            .filter(|r| cfg.attention_bias || !matches!(r, Role::Bq | Role::Bk | Role::Bv))
            .collect()
    }

    /// The roles of `block` that a rank with slice `s` stores (see [`Role::needed_by`]).
    pub fn block_roles(&self, cfg: &ModelConfig, s: &RankSlice, block: BlockOf) -> Vec<Role> {
        match block {
            BlockOf::Embed => vec![Role::Embed],
            BlockOf::Head => vec![Role::FinalNorm, Role::LmHead],
            _ => self
                .layer_roles(cfg)
                .into_iter()
                .filter(|r| r.block() == block && r.needed_by(s))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_complete_and_names_each_role_once() {
        for a in ARCHS {
            for r in [
                Role::Embed,
                Role::FinalNorm,
                Role::LmHead,
                Role::AttnNorm,
                Role::Wq,
                Role::Wk,
                Role::Wv,
                Role::Wo,
                Role::MlpNorm,
            ] {
                assert!(a.has(r), "{} lacks {r:?}", a.name);
            }
            let mlp = if a.is_moe() {
                [Role::ExpGate, Role::ExpUp, Role::ExpDown]
            } else {
                [Role::Gate, Role::Up, Role::Down]
            };
            for r in mlp {
                assert!(a.has(r), "{} lacks {r:?}", a.name);
            }
            for (i, t) in a.tensors.iter().enumerate() {
                assert!(
                    a.tensors[i + 1..].iter().all(|u| u.0 != t.0),
                    "{} names {:?} twice",
                    a.name,
                    t.0
                );
                let per_layer = matches!(t.0.block(), BlockOf::Attn | BlockOf::Mlp);
                assert_eq!(t.1.contains("{l}"), per_layer, "{} {:?}", a.name, t.0);
                assert_eq!(t.2.contains("{l}"), per_layer, "{} {:?}", a.name, t.0);
                assert_eq!(t.2.contains("{e}"), t.0.is_expert(), "{} {:?}", a.name, t.0);
            }
        }
        for (i, r) in Role::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn names_resolve_to_their_family() {
        assert_eq!(Arch::find("MistralForCausalLM").unwrap().name, "llama");
        assert_eq!(Arch::find("mistral").unwrap().name, "llama");
        assert_eq!(Arch::find("gemma3_text").unwrap().name, "gemma3");
        assert_eq!(Arch::find("qwen3").unwrap().name, "qwen3");
        assert!(Arch::find("gpt2").is_none());
        let g = Arch::find("gemma3").unwrap();
        assert_eq!(
            g.tensor_name(Role::PostAttnNorm, Format::SafeTensors, 3, 0)
                .unwrap(),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(
            g.tensor_name(Role::MlpNorm, Format::Gguf, 0, 0).unwrap(),
            "blk.0.ffn_norm.weight"
        );
        assert!(g.tensor_name(Role::Bq, Format::Gguf, 0, 0).is_none());
        let m = Arch::find("MixtralForCausalLM").unwrap();
        assert!(m.is_moe() && !g.is_moe());
        assert_eq!(
            m.tensor_name(Role::ExpUp, Format::SafeTensors, 1, 7)
                .unwrap(),
            "model.layers.1.block_sparse_moe.experts.7.w3.weight"
        );
    }
}
