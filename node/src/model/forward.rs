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

use half::f16;
use tpi_kernels::{self as k, AttnShape, RopeLayout, ThreadPool};

use super::arch::{Activation, Role, Split};
use super::config::ModelConfig;
use super::error::ModelError;
use super::split::RankSlice;
use super::weights::{TensorStore, Weight};

/// One layer's weights as seen by one rank, by role: column slices of Q/K/V and gate/up,
/// row slices (input columns) of O and down, full norms; vectors (norms, with the
/// family's norm offset applied, and biases) in f32. A role the family lacks, or the rank
/// does not need, is absent.
pub struct LayerSlice {
    mats: Vec<Option<Weight>>,
    vecs: Vec<Option<Vec<f32>>>,
    /// MoE: the router in f32, [experts][hidden] (every rank routes alike: see
    /// [`route`]).
    router: Option<Vec<f32>>,
    /// MoE: this rank's slice of each expert (gate, up, down).
    experts: Vec<[Weight; 3]>,
}

impl LayerSlice {
    fn empty() -> Self {
        LayerSlice {
            mats: vec![None; Role::ALL.len()],
            vecs: vec![None; Role::ALL.len()],
            router: None,
            experts: Vec::new(),
        }
    }

    /// The matrix for `role`, if the layer has it.
    pub fn mat(&self, role: Role) -> Option<&Weight> {
        self.mats[role.index()].as_ref()
    }

    /// The f32 vector (norm or bias) for `role`, if the layer has it.
    pub fn vec(&self, role: Role) -> Option<&[f32]> {
        self.vecs[role.index()].as_deref()
    }

    /// The norm weight for `role`, which every layer of every family has.
    fn norm(&self, role: Role, layer: usize) -> Result<&[f32], ModelError> {
        self.vec(role)
            .ok_or_else(|| ModelError::MissingTensor(format!("layer {layer} {role:?}")))
    }
}

/// What one rank computes: its slice of every layer.
pub struct RankModel {
    /// Model hyper-parameters.
    pub cfg: ModelConfig,
    /// This rank's share.
    pub slice: RankSlice,
    /// Per-layer weights.
    pub layers: Vec<LayerSlice>,
    act: Activation,
    inv_freq: Vec<f32>,
    inv_freq_local: Vec<f32>,
    /// Element type of the KV caches [`RankModel::new_cache`] makes.
    pub kv_dtype: KvDType,
}

/// Where a rank's sliced weights come from: `fetch(role, layer)` returns the weight
/// already cut to this rank's slice (Q/K/V/gate/up rows, O/down columns).
pub trait SliceSource {
    /// The sliced weight for `role` in `layer`.
    fn fetch(&self, role: Role, layer: usize) -> Result<Weight, ModelError>;
    /// The sliced weight of expert `e` for an expert role in `layer`.
    fn fetch_expert(&self, role: Role, layer: usize, e: usize) -> Result<Weight, ModelError>;
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
    fn fetch_expert(&self, role: Role, layer: usize, e: usize) -> Result<Weight, ModelError> {
        let w = self.store.expert(self.cfg, role, layer, e)?;
        slice_weight(self.cfg, self.slice, role, &w)
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
    match role.split() {
        Split::HeadCols => Some(s.heads.start * hd..s.heads.end * hd),
        Split::FfnCols => Some(s.ffn.clone()),
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
    match role.split() {
        Split::Replicated => Ok(w.clone()),
        Split::QHeads => slice_rows_or_vec(w, s.heads.start * hd..s.heads.end * hd),
        Split::KvHeads => slice_rows_or_vec(w, s.kv_heads.start * hd..s.kv_heads.end * hd),
        Split::FfnRows => w.rows_range(s.ffn.start, s.ffn.end),
        Split::VocabRows => w.rows_range(s.vocab.start, s.vocab.end),
        Split::HeadCols | Split::FfnCols => {
            let c = row_parallel_cols(cfg, s, role).expect("row-parallel split");
            w.cols_range(c.start, c.end)
        }
    }
}

/// The (rows, cols) a role's tensor has once cut to slice `s`.
pub fn sliced_shape(cfg: &ModelConfig, s: &RankSlice, role: Role) -> (usize, usize) {
    let (rows, cols) = role.shape(cfg);
    let hd = cfg.head_dim;
    let part = match role.split() {
        Split::Replicated => return (rows, cols),
        Split::QHeads | Split::HeadCols => s.n_heads() * hd,
        Split::KvHeads => s.n_kv_heads() * hd,
        Split::FfnRows | Split::FfnCols => s.ffn.len(),
        Split::VocabRows => s.vocab.len(),
    };
    match role.split() {
        Split::HeadCols | Split::FfnCols => (rows, part),
        _ if rows == 1 => (1, part),
        _ => (part, cols),
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

/// A norm weight as the forward pass applies it: `offset` (the family's, see
/// [`ModelConfig::norm_offset`]) added to every element.
fn norm_vec(w: &Weight, offset: f32) -> Vec<f32> {
    let mut v = w.to_f32_vec();
    if offset != 0.0 {
        v.iter_mut().for_each(|x| *x += offset);
    }
    v
}

/// RMSNorm of each `width`-long piece of `x`, in place.
fn rmsnorm_pieces(x: &mut [f32], width: usize, w: &[f32], eps: f32) {
    let mut tmp = vec![0f32; width];
    for piece in x.chunks_exact_mut(width) {
        tmp.copy_from_slice(piece);
        k::rmsnorm(&tmp, w, eps, piece);
    }
}

impl RankModel {
    /// Builds a rank's model from sliced weights, checking every slice's shape against the plan.
    pub fn build(
        cfg: &ModelConfig,
        slice: &RankSlice,
        src: &dyn SliceSource,
    ) -> Result<Self, ModelError> {
        let spec = cfg.spec()?;
        let roles: Vec<Role> = spec
            .layer_roles(cfg)
            .into_iter()
            .filter(|r| r.needed_by(slice))
            .collect();
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let mut ly = LayerSlice::empty();
            for &role in &roles {
                if role.is_expert() {
                    continue;
                }
                let w = src.fetch(role, l)?;
                let (rows, cols) = sliced_shape(cfg, slice, role);
                check_shape(&w, rows, cols, &format!("layer {l} {role:?}"))?;
                if role.is_norm() {
                    ly.vecs[role.index()] = Some(norm_vec(&w, cfg.norm_offset));
                } else if role.is_vector() {
                    ly.vecs[role.index()] = Some(w.to_f32_vec());
                } else if role == Role::Router {
                    ly.router = Some(w.to_f32_vec());
                } else {
                    ly.mats[role.index()] = Some(w);
                }
            }
            if cfg.n_experts > 0 && !slice.ffn.is_empty() {
                for e in 0..cfg.n_experts {
                    let get = |role: Role| -> Result<Weight, ModelError> {
                        let w = src.fetch_expert(role, l, e)?;
                        let (rows, cols) = sliced_shape(cfg, slice, role);
                        check_shape(&w, rows, cols, &format!("layer {l} expert {e} {role:?}"))?;
                        Ok(w)
                    };
                    ly.experts
                        .push([get(Role::ExpGate)?, get(Role::ExpUp)?, get(Role::ExpDown)?]);
                }
            }
            layers.push(ly);
        }
        Ok(RankModel {
            cfg: cfg.clone(),
            slice: slice.clone(),
            layers,
            act: spec.act,
            inv_freq: cfg.inv_freq(),
            inv_freq_local: cfg.inv_freq_local(),
            kv_dtype: KvDType::F32,
        })
    }

    /// A fresh KV cache for this rank's KV heads, holding up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(
            self.cfg.n_layers,
            self.slice.n_kv_heads(),
            self.cfg.head_dim,
            capacity,
            self.kv_dtype,
        )
    }

    /// Bytes of weights this rank streams per token.
    pub fn weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.mats.iter().flatten().chain(l.experts.iter().flatten()))
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
        let (Some(wq), Some(wk), Some(wv), Some(wo)) = (
            ly.mat(Role::Wq),
            ly.mat(Role::Wk),
            ly.mat(Role::Wv),
            ly.mat(Role::Wo),
        ) else {
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
        let norm = ly.norm(Role::AttnNorm, layer)?;
        for t in 0..n {
            k::rmsnorm(
                &x[t * d..(t + 1) * d],
                norm,
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
        for (role, y, w) in [
            (Role::Bq, &mut q, qd),
            (Role::Bk, &mut kk, kvd),
            (Role::Bv, &mut vv, kvd),
        ] {
            if let Some(b) = ly.vec(role) {
                y.chunks_exact_mut(w).for_each(|r| k::add_in_place(r, b));
            }
        }
        if let Some(w) = ly.vec(Role::QNorm) {
            rmsnorm_pieces(&mut q, hd, w, cfg.rms_norm_eps);
        }
        if let Some(w) = ly.vec(Role::KNorm) {
            rmsnorm_pieces(&mut kk, hd, w, cfg.rms_norm_eps);
        }
        let inv_freq = if cfg.is_sliding(layer) {
            &self.inv_freq_local
        } else {
            &self.inv_freq
        };
        for t in 0..n {
            k::apply_rope(
                &mut q[t * qd..(t + 1) * qd],
                hd,
                start + t,
                inv_freq,
                layout,
            );
            k::apply_rope(
                &mut kk[t * kvd..(t + 1) * kvd],
                hd,
                start + t,
                inv_freq,
                layout,
            );
        }
        let cap = cache.capacity;
        let mut o = vec![0f32; n * qd];
        let shape = AttnShape {
            scale: cfg.attn_scale.unwrap_or(1.0 / (hd as f32).sqrt()),
            window: cfg.window(layer),
            ..AttnShape::causal(nh, nkv, hd)
        };
        match &mut cache.store {
            KvStore::F32 { k: kl, v: vl } => {
                let (kc, vc) = (&mut kl[layer], &mut vl[layer]);
                store_kv(&kk, &vv, n, start, nkv, hd, cap, kc, vc, |x| x);
                k::attention(pool, &q, n, start, &shape, kc, vc, cap, &mut o)?;
            }
            KvStore::F16 { k: kl, v: vl } => {
                let (kc, vc) = (&mut kl[layer], &mut vl[layer]);
                store_kv(&kk, &vv, n, start, nkv, hd, cap, kc, vc, f16::from_f32);
                k::attention(pool, &q, n, start, &shape, kc, vc, cap, &mut o)?;
            }
        }
        matmul(pool, wo, &o, n, &mut out[..n * d])?;
        cache.len = cache.len.max(start + n);
        Ok(())
    }

    /// MLP block of `layer` for `n` tokens: this rank's partial sum into `out` ([n][hidden]).
    /// An MoE block tells `hooks` (with its stream position) which experts it will read;
    /// returns the time it waited for them.
    pub fn mlp_block(
        &self,
        pool: &ThreadPool,
        layer: usize,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        hooks: Option<(&dyn BlockHooks, usize)>,
    ) -> Result<std::time::Duration, ModelError> {
        let cfg = &self.cfg;
        let d = cfg.hidden_size;
        let ly = &self.layers[layer];
        let mut h = vec![0f32; n * d];
        let norm = ly.norm(Role::MlpNorm, layer)?;
        for t in 0..n {
            k::rmsnorm(
                &x[t * d..(t + 1) * d],
                norm,
                cfg.rms_norm_eps,
                &mut h[t * d..(t + 1) * d],
            );
        }
        if let Some(router) = &ly.router {
            return self.moe(pool, ly, router, &h, n, out, hooks);
        }
        let (Some(gate), Some(up), Some(down)) =
            (ly.mat(Role::Gate), ly.mat(Role::Up), ly.mat(Role::Down))
        else {
            out[..n * d].fill(0.0);
            return Ok(std::time::Duration::ZERO);
        };
        self.gated_mlp(pool, [gate, up, down], &h, n, &mut out[..n * d])?;
        Ok(std::time::Duration::ZERO)
    }

    /// `down(act(gate·h) ⊙ up·h)` for `n` rows of `h`, into `out` ([n][hidden]).
    fn gated_mlp(
        &self,
        pool: &ThreadPool,
        [gate, up, down]: [&Weight; 3],
        h: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let f = gate.rows;
        let mut g = vec![0f32; n * f];
        let mut u = vec![0f32; n * f];
        matmul(pool, gate, h, n, &mut g)?;
        matmul(pool, up, h, n, &mut u)?;
        match self.act {
            Activation::Silu => k::silu_mul(&mut g, &u),
            Activation::GeluTanh => k::gelu_tanh_mul(&mut g, &u),
        }
        matmul(pool, down, &g, n, out)
    }

    /// A mixture-of-experts MLP: each token's top-k experts (this rank's slice of each),
    /// weighted by the router. The tokens routed to an expert go through it together, so
    /// a prefill reads each expert once.
    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        pool: &ThreadPool,
        ly: &LayerSlice,
        router: &[f32],
        h: &[f32],
        n: usize,
        out: &mut [f32],
        hooks: Option<(&dyn BlockHooks, usize)>,
    ) -> Result<std::time::Duration, ModelError> {
        let d = self.cfg.hidden_size;
        out[..n * d].fill(0.0);
        if ly.experts.is_empty() {
            return Ok(std::time::Duration::ZERO);
        }
        let routes: Vec<Vec<(usize, f32)>> = (0..n)
            .map(|t| route(&self.cfg, router, &h[t * d..(t + 1) * d]))
            .collect();
        let mut waited = std::time::Duration::ZERO;
        if let Some((hk, pos)) = hooks {
            let mut used: Vec<usize> = routes.iter().flatten().map(|&(e, _)| e).collect();
            used.sort_unstable();
            used.dedup();
            waited = hk.experts(pos, &used);
        }
        for (e, [gate, up, down]) in ly.experts.iter().enumerate() {
            let rows: Vec<(usize, f32)> = routes
                .iter()
                .enumerate()
                .filter_map(|(t, r)| r.iter().find(|(x, _)| *x == e).map(|&(_, w)| (t, w)))
                .collect();
            if rows.is_empty() {
                continue;
            }
            let mut xs = Vec::with_capacity(rows.len() * d);
            for &(t, _) in &rows {
                xs.extend_from_slice(&h[t * d..(t + 1) * d]);
            }
            let mut y = vec![0f32; rows.len() * d];
            self.gated_mlp(pool, [gate, up, down], &xs, rows.len(), &mut y)?;
            for (i, &(t, w)) in rows.iter().enumerate() {
                for (o, v) in out[t * d..(t + 1) * d]
                    .iter_mut()
                    .zip(&y[i * d..(i + 1) * d])
                {
                    *o += w * v;
                }
            }
        }
        Ok(waited)
    }
}

/// One token's experts and their weights: the router's softmax over all experts, the top
/// `n_experts_used` (ties to the lower index, as `torch.topk` on CPU), renormalised when
/// the model says so. Computed in f64 in a fixed order, so every rank, whatever its
/// kernels, routes every token to the same experts.
pub fn route(cfg: &ModelConfig, router: &[f32], h: &[f32]) -> Vec<(usize, f32)> {
    let d = h.len();
    let logits: Vec<f64> = router
        .chunks_exact(d)
        .map(|w| w.iter().zip(h).map(|(a, b)| *a as f64 * *b as f64).sum())
        .collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = exp.iter().sum();
    let mut order: Vec<usize> = (0..exp.len()).collect();
    order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
    order.truncate(cfg.n_experts_used);
    let chosen: f64 = order.iter().map(|&e| exp[e]).sum();
    let denom = if cfg.norm_topk_prob { chosen } else { total };
    order
        .into_iter()
        .map(|e| (e, (exp[e] / denom) as f32))
        .collect()
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

/// Element type of the KV cache (`--kv-dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KvDType {
    /// Exact.
    #[default]
    F32,
    /// Half the memory; every key and value rounded to f16 once, when stored.
    F16,
}

impl std::str::FromStr for KvDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvDType::F32),
            "f16" => Ok(KvDType::F16),
            _ => Err(format!("unknown KV cache type {s:?} (expected f32 or f16)")),
        }
    }
}

impl KvDType {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 => 2,
        }
    }
}

/// Per layer, K and V, in the cache's element type.
enum KvStore {
    F32 { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    F16 { k: Vec<Vec<f16>>, v: Vec<Vec<f16>> },
}

/// A rank's KV cache: per layer, K and V laid out [kv_head][position][head_dim].
pub struct KvCache {
    store: KvStore,
    /// Positions the cache can hold.
    pub capacity: usize,
    /// Positions filled so far.
    pub len: usize,
}

impl KvCache {
    /// Allocates a zeroed cache.
    pub fn new(
        n_layers: usize,
        n_kv: usize,
        head_dim: usize,
        capacity: usize,
        dtype: KvDType,
    ) -> Self {
        let size = n_kv * capacity * head_dim;
        let store = match dtype {
            KvDType::F32 => KvStore::F32 {
                k: (0..n_layers).map(|_| vec![0f32; size]).collect(),
                v: (0..n_layers).map(|_| vec![0f32; size]).collect(),
            },
            KvDType::F16 => KvStore::F16 {
                k: (0..n_layers).map(|_| vec![f16::ZERO; size]).collect(),
                v: (0..n_layers).map(|_| vec![f16::ZERO; size]).collect(),
            },
        };
        KvCache {
            store,
            capacity,
            len: 0,
        }
    }
    /// The element type.
    pub fn dtype(&self) -> KvDType {
        match self.store {
            KvStore::F32 { .. } => KvDType::F32,
            KvStore::F16 { .. } => KvDType::F16,
        }
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let elems: usize = match &self.store {
            KvStore::F32 { k, v } => k.iter().chain(v).map(Vec::len).sum(),
            KvStore::F16 { k, v } => k.iter().chain(v).map(Vec::len).sum(),
        };
        elems * self.dtype().bytes()
    }
}

/// Stores the `n` new positions' keys and values (`kk`, `vv`: `[n][n_kv·hd]`) at
/// `start..` of one layer's cache (`[n_kv][cap][hd]`), converted by `conv`.
#[allow(clippy::too_many_arguments)]
fn store_kv<T: Copy>(
    kk: &[f32],
    vv: &[f32],
    n: usize,
    start: usize,
    nkv: usize,
    hd: usize,
    cap: usize,
    kc: &mut [T],
    vc: &mut [T],
    conv: impl Fn(f32) -> T,
) {
    let kvd = nkv * hd;
    for t in 0..n {
        let pos = start + t;
        for j in 0..nkv {
            let dst = (j * cap + pos) * hd;
            let src = t * kvd + j * hd;
            for (d, s) in kc[dst..dst + hd].iter_mut().zip(&kk[src..src + hd]) {
                *d = conv(*s);
            }
            for (d, s) in vc[dst..dst + hd].iter_mut().zip(&vv[src..src + hd]) {
                *d = conv(*s);
            }
        }
    }
}

/// The weights around the layers: the embedding (rank 0 only), the final norm, and this
/// rank's rows of the LM head (all of them unless the plan splits the vocabulary).
pub struct Head {
    /// Token embedding [vocab, hidden]; None on ranks other than 0.
    pub embed: Option<Weight>,
    /// Final RMSNorm weight (the family's norm offset applied).
    pub final_norm: Vec<f32>,
    /// The rows `vocab` of the LM head [vocab, hidden] (the embedding's when tied).
    pub lm_head: Weight,
    /// The vocabulary ids whose logits this rank computes.
    pub vocab: std::ops::Range<usize>,
    /// Multiplies every embedding row (Gemma: √hidden; 1 otherwise).
    embed_scale: f32,
    eps: f32,
}

impl Head {
    /// A head from its tensors as stored (the final norm's raw weight; the LM head's rows
    /// `vocab`): the family's embedding scale and norm offset come from `cfg`.
    pub fn new(
        cfg: &ModelConfig,
        embed: Option<Weight>,
        final_norm: &Weight,
        lm_head: Weight,
        vocab: std::ops::Range<usize>,
    ) -> Result<Self, ModelError> {
        let d = cfg.hidden_size;
        check_shape(final_norm, 1, d, "final norm")?;
        if let Some(e) = &embed {
            check_shape(e, cfg.vocab_size, d, "embedding")?;
        }
        if vocab.end > cfg.vocab_size {
            return Err(ModelError::Plan(format!(
                "LM head rows {vocab:?} beyond the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        check_shape(&lm_head, vocab.len(), d, "LM head")?;
        Ok(Head {
            embed,
            final_norm: norm_vec(final_norm, cfg.norm_offset),
            lm_head,
            vocab,
            embed_scale: if cfg.spec()?.embed_scale {
                (d as f32).sqrt()
            } else {
                1.0
            },
            eps: cfg.rms_norm_eps,
        })
    }

    /// Loads the whole head from a full model's tensors.
    pub fn from_store(store: &TensorStore, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let embed = store.role(cfg, Role::Embed, 0)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            store.role(cfg, Role::LmHead, 0)?
        };
        let v = cfg.vocab_size;
        Head::new(
            cfg,
            Some(embed),
            &store.role(cfg, Role::FinalNorm, 0)?,
            lm_head,
            0..v,
        )
    }

    /// Embeds tokens into `[n][hidden]`; ids are checked against the vocabulary.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let embed = self
            .embed
            .as_ref()
            .ok_or_else(|| ModelError::Plan("only rank 0 holds the embedding".into()))?;
        let d = embed.cols;
        let mut x = vec![0f32; tokens.len() * d];
        super::config::check_token_ids(tokens, embed.rows).map_err(ModelError::Input)?;
        for (t, &id) in tokens.iter().enumerate() {
            embed.row_f32(id as usize, &mut x[t * d..(t + 1) * d]);
        }
        if self.embed_scale != 1.0 {
            x.iter_mut().for_each(|v| *v *= self.embed_scale);
        }
        Ok(x)
    }

    /// Final norm and LM head on one hidden vector: the logits of [`Head::vocab`].
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
    /// Block `pos` (an MoE block, already entered) is about to compute with these
    /// experts: a streaming window reads them now. Returns the time spent waiting.
    fn experts(&self, _pos: usize, _experts: &[usize]) -> std::time::Duration {
        std::time::Duration::ZERO
    }
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
                let mut expert_wait = 0.0;
                if block == 0 {
                    self.attn_block(pool, l, x, n, start, cache, &mut part)?;
                } else {
                    expert_wait = self
                        .mlp_block(pool, l, x, n, &mut part, hooks.map(|h| (h, pos)))?
                        .as_secs_f64();
                }
                times.disk_wait_s += expert_wait;
                if let Some(h) = hooks {
                    h.after(pos);
                }
                let t1 = std::time::Instant::now();
                let own_finite = k::all_finite(&part);
                reduce(&mut part)?;
                if !k::all_finite(&part) {
                    return Err(non_finite_block(l, block, own_finite).into());
                }
                // Gemma's post-block norms act on the whole reduced output.
                let post = [Role::PostAttnNorm, Role::PostMlpNorm][block];
                if let Some(w) = self.layers[l].vec(post) {
                    rmsnorm_pieces(&mut part, d, w, self.cfg.rms_norm_eps);
                }
                k::add_in_place(&mut x[..n * d], &part);
                times.compute_s += (t1 - t0).as_secs_f64() - expert_wait;
            }
        }
        Ok(times)
    }
}
