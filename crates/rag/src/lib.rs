//! Hearth's retrieval store. It takes texts and vectors and knows no models: the server embeds,
//! this crate keeps and searches.
//!
//! - [`extract`]: text out of uploaded files (plain text, Markdown, HTML, PDF, JSON).
//! - [`chunk`]: token windows with overlap, cut at the embedding model's own token offsets.
//! - [`Library`]: files, vector stores and their chunks in SQLite (WAL), and per store a dense
//!   approximate nearest-neighbour index (usearch) and a BM25 index (tantivy), both rebuilt from
//!   SQLite's rows where they are behind it (after a crash) — SQLite is the record, the indexes
//!   are derived from it.
//! - [`fusion`]: reciprocal rank fusion of the dense and the lexical rankings.
//! - [`filter`]: OpenAI's attribute filters (comparison and compound).

pub mod chunk;
mod dense;
mod error;
pub mod extract;
pub mod filter;
pub mod fusion;
mod lexical;
mod library;
mod records;
mod sql;

pub use dense::{DenseIndex, DenseOptions, Metric, Watermark};
pub use error::RagError;
pub use library::{Consistency, Hit, Library, LibraryOptions, NewChunk, SearchRequest};
pub use records::{
    ChunkingStrategy, FileCounts, FileRecord, ListOrder, Page, PageRequest, StoreFileRecord, StoreFileStatus,
    StoreRecord,
};

/// Seconds since the Unix epoch, as OpenAI's objects carry them.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}
