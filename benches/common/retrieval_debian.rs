//! The vendored retrieval-debian set (`benches/data/retrieval-debian`): 2,000 Debian package
//! descriptions and their one-line synopses as queries, each query with its relevant documents.
//! Shared by the retrieval and RAG benches and by the store's quality test (`tests/it/real_rag.rs`).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

#[derive(Deserialize)]
pub struct Document {
    pub id: String,
    pub title: String,
    pub text: String,
}

impl Document {
    /// What is embedded and indexed for the document (the set's reference setup).
    pub fn full_text(&self) -> String {
        format!("{}\n{}", self.title, self.text)
    }
}

#[derive(Deserialize)]
pub struct Query {
    pub query: String,
    pub relevant: Vec<String>,
}

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/data/retrieval-debian")
}

pub fn documents() -> Vec<Document> {
    read_jsonl(&dir().join("corpus.jsonl"))
}

pub fn queries() -> Vec<Query> {
    read_jsonl(&dir().join("queries.jsonl"))
}

pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Vec<T> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), n + 1))
        })
        .collect()
}
