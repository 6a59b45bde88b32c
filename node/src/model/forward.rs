//! The forward pass of one rank's slice of each layer, plus rank 0's head
//! (embedding, final norm, LM head).
//!
//! Each block returns a *partial sum* of the hidden-size output; the caller adds the
//! allreduced sum into the residual stream. On a single device the partial is the
//! whole output.
//!
//! RoPE: HF weights use the half-split pairing. GGUF llama files store Q/K rows
//! permuted for llama.cpp's interleaved pairing; rather than un-permute (a copy of
//! every Q/K matrix) we rotate interleaved pairs for those files. Attention scores are
//! dot products within a head, so the same permutation of q and k leaves them unchanged.

use tpi_kernels::{self as k, RopeLayout, ThreadPool};

use super::config::ModelConfig;
use super::error::ModelError;
use super::split::RankSlice;
use super::weights::{Role, TensorStore, Weight};

/// One layer's weights as seen by one rank: column slices of Q/K/V and gate/up,
/// row slices (input columns) of O and down.
pub struct LayerSlice {
    /// Pre-attention RMSNorm weight (full).
    pub attn_norm: Vec<f32>,
    /// Query rows of this rank's heads (None when the rank has no heads).
    pub wq: Option<Weight>,
    /// Key rows of this rank's KV heads.
    pub wk: Option<Weight>,
    /// Value rows of this rank's KV heads.
    pub wv: Option<Weight>,
    /// Biases of the sliced Q/K/V (Qwen2).
    pub bq: Option<Vec<f32>>,
    /// Key bias slice.
    pub bk: Option<Vec<f32>>,
    /// Value bias slice.
    pub bv: Option<Vec<f32>>,
    /// O projection columns of this rank's heads.
    pub wo: Option<Weight>,
    /// Pre-MLP RMSNorm weight (full).
    pub mlp_norm: Vec<f32>,
    /// Gate rows of this rank's MLP slice (None when the slice is empty).
    pub gate: Option<Weight>,
    /// Up rows.
    pub up: Option<Weight>,
    /// Down columns.
    pub down: Option<Weight>,
}

/// What one rank computes: its slice of every layer.
pub struct RankModel {
    /// Model hyper-parameters.
    pub cfg: ModelConfig,
    /// This rank's share.
    pub slice: RankSlice,
    /// Per-layer weights.
    pub layers: Vec<LayerSlice>,
    inv_freq: Vec<f32>,
}

/// Where a rank's sliced weights come from: `fetch(role, layer)` returns the weight
/// already cut to this rank's slice (Q/K/V/gate/up rows, O/down columns).
pub trait SliceSource {
    /// The sliced weight for `role` in `layer`.
    fn fetch(&self, role: Role, layer: usize) -> Result<Weight, ModelError>;
    /// Whether the model carries Q/K/V biases.
    fn has_bias(&self) -> bool;
}

/// Slices a full model's tensors (e.g. a memory-mapped GGUF) for one rank, zero-copy.
pub struct StoreSlicer<'a> {
    /// The full model's tensors.
    pub store: &'a TensorStore,
    /// The model config (for shape checks).
    pub cfg: &'a ModelConfig,
    /// The rank's share.
    pub slice: &'a RankSlice,
}

impl SliceSource for StoreSlicer<'_> {
    fn fetch(&self, role: Role, layer: usize) -> Result<Weight, ModelError> {
        let w = self.store.role(self.cfg, role, layer)?;
        slice_weight(self.cfg, self.slice, role, &w)
    }
    fn has_bias(&self) -> bool {
        self.cfg.attention_bias
    }
}

/// The input columns a rank takes of a row-parallel matrix (O: its heads' columns, down:
/// its MLP columns); `None` for the other roles.
pub fn row_parallel_cols(
    cfg: &ModelConfig,
    s: &RankSlice,
    role: Role,
) -> Option<std::ops::Range<usize>> {
    let hd = cfg.head_dim;
    match role {
        Role::Wo => Some(s.heads.start * hd..s.heads.end * hd),
        Role::Down => Some(s.ffn.clone()),
        _ => None,
    }
}

/// Cuts a full tensor down to a rank's slice (zero-copy view).
pub fn slice_weight(
    cfg: &ModelConfig,
    s: &RankSlice,
    role: Role,
    w: &Weight,
) -> Result<Weight, ModelError> {
    let hd = cfg.head_dim;
    let q = s.heads.start * hd..s.heads.end * hd;
    let kv = s.kv_heads.start * hd..s.kv_heads.end * hd;
    if let Some(c) = row_parallel_cols(cfg, s, role) {
        return w.cols_range(c.start, c.end);
    }
    match role {
        Role::Wq | Role::Bq => slice_rows_or_vec(w, q),
        Role::Wk | Role::Wv | Role::Bk | Role::Bv => slice_rows_or_vec(w, kv),
        Role::Wo | Role::Down => unreachable!("row-parallel roles are cut above"),
        Role::Gate | Role::Up => w.rows_range(s.ffn.start, s.ffn.end),
        Role::AttnNorm | Role::MlpNorm | Role::Embed | Role::FinalNorm | Role::LmHead => {
            Ok(w.clone())
        }
    }
}

fn slice_rows_or_vec(w: &Weight, r: std::ops::Range<usize>) -> Result<Weight, ModelError> {
    if w.rows == 1 {
        w.cols_range(r.start, r.end)
    } else {
        w.rows_range(r.start, r.end)
    }
}

fn check_shape(w: &Weight, rows: usize, cols: usize, what: &str) -> Result<(), ModelError> {
    if (w.rows, w.cols) != (rows, cols) {
        return Err(ModelError::BadShape {
            tensor: what.to_string(),
            got: vec![w.rows, w.cols],
            expected: vec![rows, cols],
        });
    }
    Ok(())
}

impl RankModel {
    /// Builds a rank's model from sliced weights, checking every slice's shape against the plan.
    pub fn build(
        cfg: &ModelConfig,
        slice: &RankSlice,
        src: &dyn SliceSource,
    ) -> Result<Self, ModelError> {
        let hd = cfg.head_dim;
        let d = cfg.hidden_size;
        let (qd, kvd, fd) = (
            slice.n_heads() * hd,
            slice.n_kv_heads() * hd,
            slice.ffn.len(),
        );
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let vec_of = |role: Role, len: usize| -> Result<Vec<f32>, ModelError> {
                let w = src.fetch(role, l)?;
                check_shape(&w, 1, len, &format!("layer {l} {role:?}"))?;
                Ok(w.to_f32_vec())
            };
            let attn = slice.has_attn();
            let mat = |role: Role, rows: usize, cols: usize| -> Result<Weight, ModelError> {
                let w = src.fetch(role, l)?;
                check_shape(&w, rows, cols, &format!("layer {l} {role:?}"))?;
                Ok(w)
            };
            let bias = attn && src.has_bias();
            layers.push(LayerSlice {
                attn_norm: vec_of(Role::AttnNorm, d)?,
                wq: attn.then(|| mat(Role::Wq, qd, d)).transpose()?,
                wk: attn.then(|| mat(Role::Wk, kvd, d)).transpose()?,
                wv: attn.then(|| mat(Role::Wv, kvd, d)).transpose()?,
                bq: bias.then(|| vec_of(Role::Bq, qd)).transpose()?,
                bk: bias.then(|| vec_of(Role::Bk, kvd)).transpose()?,
                bv: bias.then(|| vec_of(Role::Bv, kvd)).transpose()?,
                wo: attn.then(|| mat(Role::Wo, d, qd)).transpose()?,
                mlp_norm: vec_of(Role::MlpNorm, d)?,
                gate: (fd > 0).then(|| mat(Role::Gate, fd, d)).transpose()?,
                up: (fd > 0).then(|| mat(Role::Up, fd, d)).transpose()?,
                down: (fd > 0).then(|| mat(Role::Down, d, fd)).transpose()?,
            });
        }
        Ok(RankModel {
            cfg: cfg.clone(),
            slice: slice.clone(),
            layers,
            inv_freq: cfg.inv_freq(),
        })
    }

    /// A fresh KV cache for this rank's KV heads, holding up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(
            self.cfg.n_layers,
            self.slice.n_kv_heads(),
            self.cfg.head_dim,
            capacity,
        )
    }

    /// Bytes of weights this rank streams per token.
    pub fn weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down])
            .flatten()
            .map(|w| w.nbytes())
            .sum()
    }

    /// Attention block of `layer` for `n` tokens at positions `start..start+n`:
    /// writes this rank's partial sum of the block's output into `out` ([n][hidden]).
    #[allow(clippy::too_many_arguments)]
    pub fn attn_block(
        &self,
        pool: &ThreadPool,
        layer: usize,
        x: &[f32],
        n: usize,
        start: usize,
        cache: &mut KvCache,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let cfg = &self.cfg;
        let d = cfg.hidden_size;
        let hd = cfg.head_dim;
        let ly = &self.layers[layer];
        let (Some(wq), Some(wk), Some(wv), Some(wo)) = (&ly.wq, &ly.wk, &ly.wv, &ly.wo) else {
            out[..n * d].fill(0.0);
            return Ok(());
        };
        if start + n > cache.capacity {
            return Err(ModelError::Input(format!(
                "context overflow: positions up to {} exceed the KV cache capacity {}",
                start + n,
                cache.capacity
            )));
        }
        let nh = self.slice.n_heads();
        let nkv = self.slice.n_kv_heads();
        let (qd, kvd) = (nh * hd, nkv * hd);
        let mut h = vec![0f32; n * d];
        for t in 0..n {
            k::rmsnorm(
                &x[t * d..(t + 1) * d],
                &ly.attn_norm,
                cfg.rms_norm_eps,
                &mut h[t * d..(t + 1) * d],
            );
        }
        let mut q = vec![0f32; n * qd];
        let mut kk = vec![0f32; n * kvd];
        let mut vv = vec![0f32; n * kvd];
        matmul(pool, wq, &h, n, &mut q)?;
        matmul(pool, wk, &h, n, &mut kk)?;
        matmul(pool, wv, &h, n, &mut vv)?;
        let layout: RopeLayout = cfg.rope_layout.into();
        for t in 0..n {
            if let Some(b) = &ly.bq {
                k::add_in_place(&mut q[t * qd..(t + 1) * qd], b);
            }
            if let Some(b) = &ly.bk {
                k::add_in_place(&mut kk[t * kvd..(t + 1) * kvd], b);
            }
            if let Some(b) = &ly.bv {
                k::add_in_place(&mut vv[t * kvd..(t + 1) * kvd], b);
            }
            k::apply_rope(
                &mut q[t * qd..(t + 1) * qd],
                hd,
                start + t,
                &self.inv_freq,
                layout,
            );
            k::apply_rope(
                &mut kk[t * kvd..(t + 1) * kvd],
                hd,
                start + t,
                &self.inv_freq,
                layout,
            );
        }
        let cap = cache.capacity;
        let (kc, vc) = cache.layer_mut(layer);
        for t in 0..n {
            let pos = start + t;
            for j in 0..nkv {
                let dst = (j * cap + pos) * hd;
                let src = t * kvd + j * hd;
                kc[dst..dst + hd].copy_from_slice(&kk[src..src + hd]);
                vc[dst..dst + hd].copy_from_slice(&vv[src..src + hd]);
            }
        }
        let mut o = vec![0f32; n * qd];
        let (kc, vc) = cache.layer(layer);
        k::attention(pool, &q, n, start, nh, nkv, hd, kc, vc, cap, &mut o)?;
        matmul(pool, wo, &o, n, &mut out[..n * d])?;
        cache.len = cache.len.max(start + n);
        Ok(())
    }

    /// MLP block of `layer` for `n` tokens: this rank's partial sum into `out` ([n][hidden]).
    pub fn mlp_block(
        &self,
        pool: &ThreadPool,
        layer: usize,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let cfg = &self.cfg;
        let d = cfg.hidden_size;
        let ly = &self.layers[layer];
        let (Some(gate), Some(up), Some(down)) = (&ly.gate, &ly.up, &ly.down) else {
            out[..n * d].fill(0.0);
            return Ok(());
        };
        let f = gate.rows;
        let mut h = vec![0f32; n * d];
        for t in 0..n {
            k::rmsnorm(
                &x[t * d..(t + 1) * d],
                &ly.mlp_norm,
                cfg.rms_norm_eps,
                &mut h[t * d..(t + 1) * d],
            );
        }
        let mut g = vec![0f32; n * f];
        let mut u = vec![0f32; n * f];
        matmul(pool, gate, &h, n, &mut g)?;
        matmul(pool, up, &h, n, &mut u)?;
        k::silu_mul(&mut g, &u);
        matmul(pool, down, &g, n, &mut out[..n * d])?;
        Ok(())
    }
}

/// GEMV for one token, GEMM for a batch.
pub fn matmul(
    pool: &ThreadPool,
    w: &Weight,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) -> Result<(), ModelError> {
    if n == 1 {
        k::gemv(pool, w.mat(), x, y)?;
    } else {
        k::gemm(pool, w.mat(), x, n, y)?;
    }
    Ok(())
}

/// A rank's KV cache: per layer, K and V laid out [kv_head][position][head_dim].
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Positions the cache can hold.
    pub capacity: usize,
    /// Positions filled so far.
    pub len: usize,
}

impl KvCache {
    /// Allocates a zeroed cache.
    pub fn new(n_layers: usize, n_kv: usize, head_dim: usize, capacity: usize) -> Self {
        let size = n_kv * capacity * head_dim;
        KvCache {
            k: (0..n_layers).map(|_| vec![0f32; size]).collect(),
            v: (0..n_layers).map(|_| vec![0f32; size]).collect(),
            capacity,
            len: 0,
        }
    }
    fn layer(&self, l: usize) -> (&[f32], &[f32]) {
        (&self.k[l], &self.v[l])
    }
    fn layer_mut(&mut self, l: usize) -> (&mut [f32], &mut [f32]) {
        (&mut self.k[l], &mut self.v[l])
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|x| x.len() * 4).sum()
    }
}

/// Rank 0's extra weights: embedding, final norm and LM head.
pub struct Head {
    /// Token embedding [vocab, hidden].
    pub embed: Weight,
    /// Final RMSNorm weight.
    pub final_norm: Vec<f32>,
    /// LM head [vocab, hidden] (the embedding when tied).
    pub lm_head: Weight,
    eps: f32,
}

impl Head {
    /// A head from its parts.
    pub fn new(embed: Weight, final_norm: Vec<f32>, lm_head: Weight, eps: f32) -> Self {
        Head {
            embed,
            final_norm,
            lm_head,
            eps,
        }
    }

    /// Loads the head from a full model's tensors.
    pub fn from_store(store: &TensorStore, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let embed = store.role(cfg, Role::Embed, 0)?;
        let lm_head =
            if cfg.tie_word_embeddings || !store.contains(&Role::LmHead.name(store.format(), 0)) {
                embed.clone()
            } else {
                store.role(cfg, Role::LmHead, 0)?
            };
        Ok(Head {
            embed,
            final_norm: store.role_f32(cfg, Role::FinalNorm, 0)?,
            lm_head,
            eps: cfg.rms_norm_eps,
        })
    }

    /// Embeds tokens into `[n][hidden]`; ids are checked against the vocabulary.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let d = self.embed.cols;
        let mut x = vec![0f32; tokens.len() * d];
        super::config::check_token_ids(tokens, self.embed.rows).map_err(ModelError::Input)?;
        for (t, &id) in tokens.iter().enumerate() {
            self.embed.row_f32(id as usize, &mut x[t * d..(t + 1) * d]);
        }
        Ok(x)
    }

    /// Final norm and LM head on one hidden vector: the vocabulary logits.
    pub fn logits(&self, pool: &ThreadPool, x: &[f32]) -> Result<Vec<f32>, ModelError> {
        let mut h = vec![0f32; x.len()];
        k::rmsnorm(x, &self.final_norm, self.eps, &mut h);
        let mut out = vec![0f32; self.lm_head.rows];
        k::gemv(pool, self.lm_head.mat(), &h, &mut out)?;
        if !k::all_finite(&out) {
            return Err(ModelError::NonFinite {
                at: "in the logits".into(),
                cause: if k::all_finite(x) {
                    "the hidden state was finite, so the final norm or the LM head weights are likely corrupt".into()
                } else {
                    "the hidden state was already non-finite".into()
                },
            });
        }
        Ok(out)
    }
}

/// The error for a block whose reduced output is not finite. `own_finite`: whether this
/// rank's partial was (then another rank's was not).
fn non_finite_block(layer: usize, block: usize, own_finite: bool) -> ModelError {
    ModelError::NonFinite {
        at: format!(
            "in the output of layer {layer}'s {} block",
            if block == 0 { "attention" } else { "MLP" }
        ),
        cause: if own_finite {
            "this rank's partial was finite, so another rank's was not: that rank's weights are likely corrupt".into()
        } else {
            "this rank's own partial was non-finite: its weights (shard or model file) are likely corrupt".into()
        },
    }
}

/// What [`RankModel::forward_layers`] measured of one step: computing, and waiting for
/// the window. Allreduce time is the caller's to measure, since the caller's `reduce` does it.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardTimes {
    /// Seconds computing this rank's blocks.
    pub compute_s: f64,
    /// Seconds waiting for the sliding window to make a block resident.
    pub disk_wait_s: f64,
}

/// Called around each block's compute (stream position `2·layer + block`), so a
/// sliding window can make the block resident first and release it after.
pub trait BlockHooks: Send + Sync {
    /// Before block `pos` computes.
    fn before(&self, pos: usize);
    /// After block `pos` computed.
    fn after(&self, pos: usize);
}

impl RankModel {
    /// Runs every layer on the residual stream `x` ([n][hidden]) for positions
    /// `start..start+n`: each block's partial goes through `reduce` (an allreduce in a
    /// cluster, nothing on one device) and is then added to `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_layers<E>(
        &self,
        pool: &ThreadPool,
        x: &mut [f32],
        n: usize,
        start: usize,
        cache: &mut KvCache,
        hooks: Option<&dyn BlockHooks>,
        reduce: &mut dyn FnMut(&mut [f32]) -> Result<(), E>,
    ) -> Result<ForwardTimes, E>
    where
        E: From<ModelError>,
    {
        let d = self.cfg.hidden_size;
        let mut part = vec![0f32; n * d];
        let mut times = ForwardTimes::default();
        for l in 0..self.cfg.n_layers {
            for block in 0..2 {
                let pos = 2 * l + block;
                let tw = std::time::Instant::now();
                if let Some(h) = hooks {
                    h.before(pos);
                }
                let t0 = std::time::Instant::now();
                times.disk_wait_s += (t0 - tw).as_secs_f64();
                if block == 0 {
                    self.attn_block(pool, l, x, n, start, cache, &mut part)?;
                } else {
                    self.mlp_block(pool, l, x, n, &mut part)?;
                }
                if let Some(h) = hooks {
                    h.after(pos);
                }
                let t1 = std::time::Instant::now();
                let own_finite = k::all_finite(&part);
                reduce(&mut part)?;
                if !k::all_finite(&part) {
                    return Err(non_finite_block(l, block, own_finite).into());
                }
                k::add_in_place(&mut x[..n * d], &part);
                times.compute_s += (t1 - t0).as_secs_f64();
            }
        }
        Ok(times)
    }
}
