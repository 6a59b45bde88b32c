//! Errors raised while reading, validating and running a model.

use std::path::PathBuf;

/// Everything that can go wrong between a model file on disk and a forward pass.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be opened or mapped.
    #[error("cannot read {path}: {err}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The OS error (part of the message, not a separate source, so it prints once).
        err: std::io::Error,
    },
    /// The file is truncated or its header is inconsistent.
    #[error("corrupt model file {path}: {msg}")]
    Corrupt {
        /// The file that failed.
        path: PathBuf,
        /// What is wrong, with offsets where useful.
        msg: String,
    },
    /// The model uses an architecture tpi does not run.
    #[error(
        "unsupported architecture `{0}`; tpi runs: {supported}",
        supported = crate::model::arch::Arch::supported()
    )]
    UnsupportedArch(String),
    /// A tensor uses a dtype tpi has no kernel for.
    #[error(
        "tensor `{tensor}` has unsupported dtype {dtype} (supported: {})",
        tpi_kernels::DType::supported_names()
    )]
    UnsupportedDType {
        /// Tensor name.
        tensor: String,
        /// The dtype as the file names it.
        dtype: String,
    },
    /// A required tensor is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// The file declares the tensor but holds no weights (its data are elsewhere).
    #[error("tensor `{tensor}`: this file holds no weights, only the model's description; they are in {at}")]
    WeightsElsewhere {
        /// Tensor name.
        tensor: String,
        /// Where the file says the weights are.
        at: String,
    },
    /// A tensor's shape differs from what the config implies.
    #[error("tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    BadShape {
        /// Tensor name.
        tensor: String,
        /// Shape found (rows, cols).
        got: Vec<usize>,
        /// Shape expected (rows, cols).
        expected: Vec<usize>,
    },
    /// The config is missing a field or has an invalid value.
    #[error("invalid model config: {0}")]
    Config(String),
    /// A request the model cannot serve (bad token, too long a prompt, ...).
    #[error("{0}")]
    Input(String),
    /// The split plan cannot be built for this model and cluster.
    #[error("invalid split plan: {0}")]
    Plan(String),
    /// The forward pass produced NaN or Inf: corrupt weights, or a model whose numbers
    /// overflow. Never passed on as logits (greedy decoding would silently pick id 0).
    #[error("non-finite values (NaN or Inf) {at}: {cause}")]
    NonFinite {
        /// Where: which layer and block, or the logits.
        at: String,
        /// The likely cause, as far as this rank can tell.
        cause: String,
    },
    /// A kernel rejected its arguments (a bug in shapes, surfaced instead of a panic).
    #[error("kernel error: {0}")]
    Kernel(#[from] tpi_kernels::KernelError),
}

impl ModelError {
    /// Shorthand for a [`ModelError::Corrupt`] error.
    pub fn corrupt(path: &std::path::Path, msg: impl Into<String>) -> Self {
        ModelError::Corrupt {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}
