//! Errors from reading model directories and running candle.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not valid: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path} resolves to {target}, outside the models directory {root}")]
    OutsideModelsDir { path: PathBuf, target: PathBuf, root: PathBuf },

    #[error("model directory {dir} has no {what}")]
    Missing { dir: PathBuf, what: String },

    #[error("{0}")]
    Unsupported(String),

    #[error("device {device}: {source}")]
    Device {
        device: String,
        #[source]
        source: candle_core::Error,
    },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
