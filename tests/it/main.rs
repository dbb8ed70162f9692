//! Hearth's integration tests: the real router, real config parsing and real (tiny) models, driven
//! without sockets. `--features real-weights` adds the tests on the real all-MiniLM-L6-v2 weights
//! installed by `scripts/fetch-models`.

mod api_errors;
mod embeddings;
mod lifecycle;
mod operations;
#[cfg(feature = "real-weights")]
mod real_weights;
mod rerank;
mod security;
mod support;
