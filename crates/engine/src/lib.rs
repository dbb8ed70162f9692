//! The engine: loaded models, their owner threads, bounded priority queues, dynamic batching and
//! tokenization. It knows no HTTP and does no network I/O; model implementations reach it through the
//! small capability traits in [`encoder`], implemented by `hearth-backends`.

pub mod admission;
pub mod embed;
pub mod encoder;
pub mod error;
pub mod kind;
pub mod queue;
pub mod registry;
pub mod rerank;
pub mod tokenize;

pub use error::{BoxError, EngineError, Subject};
pub use kind::{DType, Device, ModelKind, Pooling};
pub use queue::Priority;
