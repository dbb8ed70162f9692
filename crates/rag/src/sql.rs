//! The SQLite schema and connection settings. SQLite is the record: files' metadata, vector
//! stores, their files, every chunk's text and vector, and a log of removed chunk keys that the
//! derived indexes have not all applied yet.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use crate::RagError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stores (
    id TEXT PRIMARY KEY,
    name TEXT,
    created_at INTEGER NOT NULL,
    last_active_at INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    expires_after TEXT,
    embedder TEXT NOT NULL,
    dims INTEGER NOT NULL,
    metric TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS store_files (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    store_id TEXT NOT NULL REFERENCES stores(id) ON DELETE CASCADE,
    file_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    error_code TEXT,
    error_message TEXT,
    attributes TEXT NOT NULL,
    max_tokens INTEGER NOT NULL,
    overlap INTEGER NOT NULL,
    usage_bytes INTEGER NOT NULL DEFAULT 0,
    batch_id TEXT,
    UNIQUE (store_id, file_id)
);
CREATE INDEX IF NOT EXISTS store_files_by_file ON store_files(file_id);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    store_id TEXT NOT NULL REFERENCES stores(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    cancelled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS chunks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    store_id TEXT NOT NULL,
    file_key INTEGER NOT NULL,
    position INTEGER NOT NULL,
    text TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_store ON chunks(store_id, seq);
CREATE UNIQUE INDEX IF NOT EXISTS chunks_by_file ON chunks(file_key, position);
CREATE TABLE IF NOT EXISTS removals (
    op INTEGER PRIMARY KEY AUTOINCREMENT,
    store_id TEXT NOT NULL,
    key INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS removals_by_store ON removals(store_id, op);
";

/// Opens the database with the settings every connection uses: WAL (readers never wait for the
/// writer), `synchronous = FULL` (a commit is on disk before it is acknowledged), foreign keys.
pub fn open(path: &Path) -> Result<Connection, RagError> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(Duration::from_secs(10))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    connection.execute_batch(SCHEMA)?;
    Ok(connection)
}

/// A vector as SQLite keeps it: little-endian f32s.
pub fn vector_blob(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn blob_vector(blob: &[u8]) -> Vec<f32> {
    blob.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}
