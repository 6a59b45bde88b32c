//! The coordinator library's error type.

/// What can fail while planning, loading, generating or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Model files, config, kernels.
    #[error(transparent)]
    Model(#[from] tpi_node::model::ModelError),
    /// Tokenizer or chat template.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// Network, peers, protocol.
    #[error(transparent)]
    Net(#[from] tpi_node::net::NetError),
    /// A request that cannot be served as given.
    #[error("{0}")]
    Input(String),
    /// The cluster failed (a node died, refused, or misbehaved).
    #[error("{0}")]
    Cluster(String),
    /// Local I/O.
    #[error("{0}")]
    Io(String),
}

impl From<tpi_node::store::StoreError> for Error {
    fn from(e: tpi_node::store::StoreError) -> Self {
        use tpi_node::store::StoreError as S;
        match e {
            S::Model(m) => Error::Model(m),
            e @ S::BudgetTooSmall { .. } => Error::Input(e.to_string()),
            e => Error::Io(e.to_string()),
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
