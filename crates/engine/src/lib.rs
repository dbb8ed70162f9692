//! The engine: loaded models, their owner threads, bounded priority queues, dynamic batching and
//! tokenization. It knows no HTTP and does no network I/O. Model implementations (`hearth-backends`)
//! plug in through the small capability trait [`encoder::EncoderModel`]; the HTTP layer and the RAG
//! pipeline use the services through [`embed::Embed`] and [`rerank::Rerank`].

pub mod admission;
pub mod backlog;
pub mod cache;
pub mod embed;
pub mod encoder;
pub mod error;
pub mod generate;
pub mod kind;
mod owner;
pub mod pool;
pub mod queue;
pub mod registry;
pub mod rerank;
pub mod synthesize;
pub mod tokenize;
pub mod transcribe;
pub mod vector;

pub use error::{BoxError, EngineError, Subject};
pub use kind::{DType, Device, ModelKind, Pooling};
pub use queue::Priority;

/// The future a capability trait method returns (boxed so the traits can be used as `dyn`).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
