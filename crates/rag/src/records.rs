//! The store's records, as the API shows them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Metric;

/// An uploaded file (OpenAI's File object).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FileRecord {
    pub id: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: u64,
    pub created_at: i64,
}

/// How a store file was cut: OpenAI's `static` strategy, resolved (an `auto` request is stored
/// as the sizes it chose).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkingStrategy {
    pub max_chunk_size_tokens: usize,
    pub chunk_overlap_tokens: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreFileStatus {
    InProgress,
    Completed,
    Failed,
    Cancelled,
}

impl StoreFileStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "in_progress" => Self::InProgress,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FileCounts {
    pub in_progress: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub total: u64,
}

/// A vector store.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreRecord {
    pub id: String,
    pub name: Option<String>,
    pub created_at: i64,
    pub last_active_at: i64,
    pub metadata: Map<String, Value>,
    /// `{"anchor": "last_active_at", "days": N}` when set.
    pub expires_after: Option<Value>,
    pub expires_at: Option<i64>,
    /// The embedding model whose vectors it holds, their length and how they compare.
    pub embedder: String,
    pub dims: usize,
    pub metric: Metric,
    pub file_counts: FileCounts,
    pub usage_bytes: u64,
}

/// A file in a vector store.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreFileRecord {
    pub store_id: String,
    pub file_id: String,
    pub created_at: i64,
    pub status: StoreFileStatus,
    /// (`code`, `message`) when ingest failed: `unsupported_file`, `invalid_file` or `server_error`.
    pub last_error: Option<(String, String)>,
    pub attributes: Map<String, Value>,
    pub chunking: ChunkingStrategy,
    pub usage_bytes: u64,
    pub batch_id: Option<String>,
    /// The file's key in the store's indexes (chunk keys are `file_key << 24 | position`).
    pub file_key: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ListOrder {
    Asc,
    #[default]
    Desc,
}

/// OpenAI's list parameters: `limit` (1–100), `order` by creation, and the cursors `after` /
/// `before` (ids of listed objects).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: usize,
    pub order: ListOrder,
    pub after: Option<String>,
    pub before: Option<String>,
}

impl Default for PageRequest {
    fn default() -> Self {
        Self { limit: 20, order: ListOrder::Desc, after: None, before: None }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}
