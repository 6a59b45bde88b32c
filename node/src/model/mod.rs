//! Model files, configuration, the split plan and the forward pass of a rank's slice.
pub mod arch;
pub mod config;
pub mod error;
pub mod forward;
pub mod gguf;
pub mod split;
pub mod weights;

use std::path::{Path, PathBuf};

pub use arch::{Arch, BlockOf};
pub use config::ModelConfig;
pub use error::ModelError;
pub use forward::{Head, KvCache, RankModel, StoreSlicer};
pub use gguf::GgufFile;
pub use split::{HeadSplit, RankSlice, SplitPlan};
pub use weights::{Format, Role, TensorStore, Weight};

use sha2::{Digest, Sha256};

use crate::stamp::{self, FileVersion};

/// An opened model: a GGUF file or an HF directory (config.json + safetensors), mapped, not read.
pub struct ModelFiles {
    /// Where it was opened from.
    pub path: PathBuf,
    /// Hyper-parameters.
    pub config: ModelConfig,
    /// All tensors.
    pub store: TensorStore,
    /// The GGUF file (for tokenizer metadata) when the model is one.
    pub gguf: Option<GgufFile>,
    /// [`ModelFiles::identity`], once computed.
    identity: std::sync::OnceLock<String>,
}

impl ModelFiles {
    /// Opens a `.gguf` file or an HF model directory.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let meta = std::fs::metadata(path).map_err(|err| ModelError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        if meta.is_dir() {
            let cfg_path = path.join("config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(|err| ModelError::Io {
                path: cfg_path.clone(),
                err,
            })?;
            let config = ModelConfig::from_hf_json(&text)?;
            let store = TensorStore::from_hf_dir(path)?;
            Ok(ModelFiles::from_parts(
                path.to_path_buf(),
                config,
                store,
                None,
            ))
        } else {
            let f = GgufFile::open(path)?;
            let config = ModelConfig::from_gguf(&f)?;
            let store = TensorStore::from_gguf(&f);
            Ok(ModelFiles::from_parts(
                path.to_path_buf(),
                config,
                store,
                Some(f),
            ))
        }
    }

    /// Checks that every tensor the forward pass needs exists with the right shape.
    pub fn validate(&self) -> Result<(), ModelError> {
        let cfg = &self.config;
        let spec = cfg.spec()?;
        self.store.role_shape(cfg, Role::Embed, 0)?;
        self.store.role_shape(cfg, Role::FinalNorm, 0)?;
        if !cfg.tie_word_embeddings {
            self.store.role_shape(cfg, Role::LmHead, 0)?;
        }
        let roles = spec.layer_roles(cfg);
        let mut known: std::collections::HashSet<String> =
            [Role::Embed, Role::FinalNorm, Role::LmHead]
                .iter()
                .filter_map(|&r| self.store.role_name(cfg, r, 0).ok())
                .collect();
        known.insert("rope_freqs.weight".into());
        for l in 0..cfg.n_layers {
            for &r in &roles {
                if r.is_expert() {
                    for e in 0..cfg.n_experts {
                        self.store.expert_shape(cfg, r, l, e)?;
                        if let Some(n) = spec.tensor_name(r, self.store.format(), l, e) {
                            known.insert(n);
                        }
                    }
                } else {
                    self.store.role_shape(cfg, r, l)?;
                    known.insert(self.store.role_name(cfg, r, l)?);
                }
            }
        }
        // A layer the metadata does not count would be silently skipped.
        let layers = self
            .store
            .names()
            .filter_map(|n| Some((weights::layer_of(n)?, n)));
        if let Some((l, name)) = layers.max_by_key(|&(l, _)| l) {
            if l >= cfg.n_layers {
                return Err(ModelError::Config(format!(
                    "tensor `{name}` belongs to layer {l}, but the config says the model has {} layer(s) ({}): the layer count is wrong",
                    cfg.n_layers,
                    match self.store.format() {
                        Format::Gguf => format!("{}.block_count", cfg.arch),
                        Format::SafeTensors => "num_hidden_layers".into(),
                    }
                )));
            }
        }
        // A tensor the forward pass would not read means the file is not what its
        // metadata says (a Qwen3 file labelled qwen2 would silently skip its q/k norms).
        if let Some(extra) = self
            .store
            .names()
            .find(|n| !known.contains(*n) && !n.contains("rotary_emb"))
        {
            return Err(ModelError::Config(format!(
                "tensor `{extra}` is not part of a {} model as declared ({} layer(s){}): \
                 the file's architecture or layer count is wrong",
                cfg.arch,
                cfg.n_layers,
                if cfg.attention_bias {
                    ", with Q/K/V biases"
                } else {
                    ""
                }
            )));
        }
        Ok(())
    }

    /// Marks the model as run from shards that re-quantise every matrix to `dtype`
    /// (`--quant`): the split may then cut wherever `dtype`'s blocks allow, not where the
    /// file's own types do (f32 shards of a Q4_K file cut at any head, losslessly).
    pub fn requantise_to(&mut self, dtype: tpi_kernels::DType) {
        let b = dtype.block_len();
        self.config.slice_align = config::SliceAlign::from_blocks(b, b, self.config.head_dim);
    }

    /// Rank 0's head (embedding, final norm, LM head).
    pub fn head(&self) -> Result<Head, ModelError> {
        Head::from_store(&self.store, &self.config)
    }

    /// Bytes of the LM head as stored (the embedding's when tied).
    pub fn lm_head_bytes(&self) -> Result<u64, ModelError> {
        let role = if self.config.tie_word_embeddings {
            Role::Embed
        } else {
            Role::LmHead
        };
        Ok(self.store.role_shape(&self.config, role, 0)?.nbytes() as u64)
    }

    /// The slice of every layer that `slice` describes, as zero-copy views of the files.
    pub fn rank_model(&self, slice: &RankSlice) -> Result<RankModel, ModelError> {
        let src = StoreSlicer {
            store: &self.store,
            cfg: &self.config,
            slice,
        };
        RankModel::build(&self.config, slice, &src)
    }

    /// A stable identity: the config and the sha256 of every byte of the model's files
    /// (the GGUF, or an HF directory's config, index and weight files). Shards are cached
    /// under it, so two files that differ anywhere never share shards. Each file is hashed
    /// once per version: the digest is kept in a stamp (see [`file_digest`]).
    pub fn identity(&self) -> Result<String, ModelError> {
        if let Some(id) = self.identity.get() {
            return Ok(id.clone());
        }
        let mut h = Sha256::new();
        h.update(serde_json::to_string(&self.config).unwrap_or_default());
        for f in self.files()? {
            h.update(file_digest(&f)?);
        }
        let id = hex::encode(&h.finalize()[..12]);
        Ok(self.identity.get_or_init(|| id).clone())
    }

    /// The files the model's bytes come from, in a fixed order.
    fn files(&self) -> Result<Vec<PathBuf>, ModelError> {
        if !self.path.is_dir() {
            return Ok(vec![self.path.clone()]);
        }
        let rd = std::fs::read_dir(&self.path).map_err(|err| ModelError::Io {
            path: self.path.clone(),
            err,
        })?;
        let mut v: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n == "config.json" || n.ends_with(".safetensors") || n.ends_with(".index.json")
            })
            .collect();
        v.sort();
        Ok(v)
    }

    /// A model opened from parts (for tests and tools that build a model in memory);
    /// its identity is computed from the file at `path` when asked for.
    pub fn from_parts(
        path: PathBuf,
        config: ModelConfig,
        store: TensorStore,
        gguf: Option<GgufFile>,
    ) -> Self {
        let mut config = config;
        config.slice_align = slice_align(&store, &config);
        ModelFiles {
            path,
            config,
            store,
            gguf,
            identity: std::sync::OnceLock::new(),
        }
    }
}

/// The slice alignment `store`'s tensor types impose: the largest block length of any
/// layer's down projection and attention output (a tensor that is missing or misshapen is
/// left to [`ModelFiles::validate`] to report).
fn slice_align(store: &TensorStore, cfg: &ModelConfig) -> config::SliceAlign {
    let block = |role: Role| {
        (0..cfg.n_layers)
            .filter_map(|l| store.role_shape(cfg, role, l).ok())
            .map(|w| w.dtype.block_len())
            .max()
            .unwrap_or(1)
    };
    let down = if cfg.n_experts > 0 {
        Role::ExpDown
    } else {
        Role::Down
    };
    config::SliceAlign::from_blocks(block(down), block(Role::Wo), cfg.head_dim)
}

/// Where file digests are remembered: `$TPI_CACHE/identity`, else
/// `~/.cache/tpi/identity` (None: nowhere, every run hashes again).
fn digest_dir() -> Option<PathBuf> {
    let root = std::env::var_os("TPI_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tpi")))?;
    Some(root.join("identity"))
}

/// sha256 (hex) of the whole file at `path`, read through a small buffer (the page
/// cache, not this process's memory). Remembered in a stamp keyed by the canonical path
/// and checked against the file's size, modification time and inode, so a model is
/// hashed once, and again only after it changes.
pub fn file_digest(path: &Path) -> Result<String, ModelError> {
    use std::io::Read;
    let io = |err| ModelError::Io {
        path: path.to_path_buf(),
        err,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let version = FileVersion::of(&f).map_err(io)?;
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let stamp_path = digest_dir().map(|d| {
        let key = hex::encode(&Sha256::digest(canon.to_string_lossy().as_bytes())[..12]);
        d.join(format!("{key}.json"))
    });
    if let Some(sha) = stamp_path
        .as_deref()
        .and_then(|p| stamp::read::<String>(p, version))
    {
        return Ok(sha);
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let sha = hex::encode(h.finalize());
    if let Some(p) = stamp_path {
        stamp::write(&p, version, &sha);
    }
    Ok(sha)
}
