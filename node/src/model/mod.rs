//! Model files, configuration, the split plan and the forward pass of a rank's slice.
pub mod config;
pub mod error;
pub mod forward;
pub mod gguf;
pub mod plan;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::ModelConfig;
pub use error::ModelError;
pub use forward::{Head, KvCache, RankModel, StoreSlicer};
pub use gguf::GgufFile;
pub use plan::{RankSlice, SplitPlan};
pub use weights::{Format, Role, TensorStore, Weight};

use sha2::{Digest, Sha256};

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
            Ok(ModelFiles {
                path: path.to_path_buf(),
                config,
                store,
                gguf: None,
            })
        } else {
            let f = GgufFile::open(path)?;
            let config = ModelConfig::from_gguf(&f)?;
            let store = TensorStore::from_gguf(&f);
            Ok(ModelFiles {
                path: path.to_path_buf(),
                config,
                store,
                gguf: Some(f),
            })
        }
    }

    /// Checks that every tensor the forward pass needs exists with the right shape.
    pub fn validate(&self) -> Result<(), ModelError> {
        let cfg = &self.config;
        self.store.role(cfg, Role::Embed, 0)?;
        self.store.role(cfg, Role::FinalNorm, 0)?;
        if !cfg.tie_word_embeddings {
            self.store.role(cfg, Role::LmHead, 0)?;
        }
        for l in 0..cfg.n_layers {
            for r in [
                Role::AttnNorm,
                Role::Wq,
                Role::Wk,
                Role::Wv,
                Role::Wo,
                Role::MlpNorm,
                Role::Gate,
                Role::Up,
                Role::Down,
            ] {
                self.store.role(cfg, r, l)?;
            }
            if cfg.attention_bias {
                for r in [Role::Bq, Role::Bk, Role::Bv] {
                    self.store.role(cfg, r, l)?;
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
        Ok(())
    }

    /// Rank 0's head (embedding, final norm, LM head).
    pub fn head(&self) -> Result<Head, ModelError> {
        Head::from_store(&self.store, &self.config)
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

    /// A stable identity: the config plus the size and a sample of the weights' bytes
    /// (cheap: does not hash whole files).
    pub fn identity(&self) -> String {
        let mut h = Sha256::new();
        h.update(serde_json::to_string(&self.config).unwrap_or_default());
        h.update(self.store.total_bytes().to_le_bytes());
        if let Ok(e) = self.store.role(&self.config, Role::Embed, 0) {
            let m = e.mat();
            h.update(&m.data[..m.data.len().min(1 << 16)]);
        }
        hex::encode(&h.finalize()[..12])
    }
}
