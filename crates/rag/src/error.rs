use std::path::PathBuf;

/// What can go wrong in the store. `NotFound` and `Invalid` are the caller's; the others are the
/// server's (disk, database, index) and carry context for the log.
#[derive(Debug, thiserror::Error)]
pub enum RagError {
    #[error("no {what} with id `{id}`")]
    NotFound { what: &'static str, id: String },
    /// A request the store cannot honour (`param` names the field).
    #[error("{message}")]
    Invalid { param: &'static str, message: String },
    /// The file's content cannot be read as the kind it claims to be.
    #[error("{0}")]
    Unsupported(String),
    #[error("vector store `{store}` holds {expected}-dimensional vectors; got {got}")]
    DimensionMismatch { store: String, expected: usize, got: usize },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("BM25 index of `{store}`: {message}")]
    Lexical { store: String, message: String },
    #[error("vector index of `{store}`: {message}")]
    Dense { store: String, message: String },
    #[error("the store is shutting down")]
    Closed,
    /// Another `Library` (another Hearth process, most likely) has the data directory open.
    #[error("{} is in use by {holder}; two servers cannot share a data directory (set another `[rag] data_dir`)", dir.display())]
    Locked { dir: PathBuf, holder: String },
}

impl RagError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }

    pub(crate) fn at(path: &std::path::Path, what: &str, source: std::io::Error) -> Self {
        Self::io(format!("cannot {what} {}", PathBuf::from(path).display()), source)
    }

    /// Whether the caller (not the server) is at fault.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::NotFound { .. }
                | Self::Invalid { .. }
                | Self::Unsupported(_)
                | Self::DimensionMismatch { .. }
        )
    }
}
