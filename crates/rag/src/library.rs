//! [`Library`]: the files, the vector stores and their indexes under one data directory.
//!
//! ```text
//! DATA_DIR/hearth.sqlite        the record (WAL): files, stores, store files, chunks, removals
//! DATA_DIR/files/FILE_ID        uploaded bytes, written (synced, renamed) before their row
//! DATA_DIR/stores/VS_ID/dense.* usearch graph + watermark
//! DATA_DIR/stores/VS_ID/bm25/   tantivy index, watermark in its commit payload
//! ```
//!
//! A file's chunks and its `completed` status are one SQLite transaction; the indexes are then
//! updated under the store's write lock, in SQLite's order. Each index knows the last chunk
//! sequence number and removal it holds, so [`Library::open`] replays what SQLite has beyond it
//! (after a crash) and nothing else.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::{Map, Value};

use crate::dense::{write_atomic, DenseIndex, DenseOptions};
use crate::filter::Filter;
use crate::fusion::Fusion;
use crate::lexical::LexicalIndex;
use crate::records::*;
use crate::sql::{self, blob_vector, vector_blob};
use crate::{now, Metric, RagError};

/// Bits of a chunk key that hold the chunk's position in its file; the rest hold the file key.
const POSITION_BITS: u32 = 24;
/// Most chunks one file may have.
pub const MAX_CHUNKS_PER_FILE: usize = 1 << POSITION_BITS;

fn chunk_key(file_key: u64, position: usize) -> u64 {
    (file_key << POSITION_BITS) | position as u64
}

fn file_of(key: u64) -> u64 {
    key >> POSITION_BITS
}

#[derive(Clone, Copy, Debug, Default)]
pub struct LibraryOptions {
    pub dense: DenseOptions,
}

/// A chunk ready to be stored: its place in the file, its text and its vector.
#[derive(Clone, Debug)]
pub struct NewChunk {
    pub position: usize,
    pub text: String,
    pub vector: Vec<f32>,
}

/// One search: the query's vector (dense ranking) and text (BM25 ranking), how many candidates
/// each ranking contributes, an attribute filter, and the fusion's weights.
#[derive(Clone, Debug)]
pub struct SearchRequest {
    pub vector: Option<Vec<f32>>,
    pub text: Option<String>,
    pub candidates: usize,
    pub filter: Option<Filter>,
    pub dense_weight: f64,
    pub lexical_weight: f64,
    pub fusion: Fusion,
}

/// A retrieved chunk, best first.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub key: u64,
    pub store_id: String,
    pub file_id: String,
    pub filename: String,
    pub position: usize,
    pub text: String,
    pub attributes: Map<String, Value>,
    /// The fused score, 0..=1: 1 for the best in every ranking (see [`Fusion::fuse`]).
    pub score: f64,
    /// Similarity to the query vector and rank (from 0) in the dense ranking, if it was there.
    pub dense: Option<(f32, usize)>,
    /// BM25 score and rank in the lexical ranking, if it was there.
    pub lexical: Option<(f32, usize)>,
}

/// What a store's record and indexes hold (see [`Library::verify`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Consistency {
    pub chunks: u64,
    pub dense: u64,
    pub lexical: u64,
    /// SQLite's chunks missing from the dense index.
    pub dense_missing: u64,
}

impl Consistency {
    pub fn agrees(&self) -> bool {
        self.dense == self.chunks && self.lexical == self.chunks && self.dense_missing == 0
    }
}

struct Indexes {
    dense: DenseIndex,
    lexical: LexicalIndex,
}

struct StoreIndex {
    dir: PathBuf,
    dims: usize,
    metric: Metric,
    indexes: RwLock<Indexes>,
    /// Held from a write's SQLite transaction until both indexes have it, so the indexes apply
    /// the store's changes in SQLite's order.
    writing: Mutex<()>,
}

pub struct Library {
    /// `lock` in the directory, held with an exclusive lock for the library's life: a second
    /// process (or a second open in this one) is refused instead of writing beside it.
    _lock: std::fs::File,
    dir: PathBuf,
    options: LibraryOptions,
    write: Mutex<Connection>,
    read: Mutex<Connection>,
    stores: RwLock<HashMap<String, Arc<StoreIndex>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// File key → (file id, attributes).
type FileAttributes = HashMap<u64, (String, Map<String, Value>)>;

fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

fn json_map(text: &str) -> Map<String, Value> {
    serde_json::from_str(text).unwrap_or_default()
}

fn not_found(what: &'static str, id: &str) -> RagError {
    RagError::NotFound { what, id: id.to_string() }
}

const FILE_COLUMNS: &str = "id, filename, purpose, bytes, created_at";
const STORE_FILE_COLUMNS: &str =
    "store_id, file_id, created_at, status, error_code, error_message, attributes, \
     max_tokens, overlap, usage_bytes, batch_id, key";

fn file_row(row: &Row) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        id: row.get(0)?,
        filename: row.get(1)?,
        purpose: row.get(2)?,
        bytes: row.get::<_, i64>(3)? as u64,
        created_at: row.get(4)?,
    })
}

fn store_file_row(row: &Row) -> rusqlite::Result<StoreFileRecord> {
    let code: Option<String> = row.get(4)?;
    let message: Option<String> = row.get(5)?;
    Ok(StoreFileRecord {
        store_id: row.get(0)?,
        file_id: row.get(1)?,
        created_at: row.get(2)?,
        status: StoreFileStatus::parse(&row.get::<_, String>(3)?).unwrap_or(StoreFileStatus::Failed),
        last_error: code.map(|c| (c, message.unwrap_or_default())),
        attributes: json_map(&row.get::<_, String>(6)?),
        chunking: ChunkingStrategy {
            max_chunk_size_tokens: row.get::<_, i64>(7)? as usize,
            chunk_overlap_tokens: row.get::<_, i64>(8)? as usize,
        },
        usage_bytes: row.get::<_, i64>(9)? as u64,
        batch_id: row.get(10)?,
        file_key: row.get::<_, i64>(11)? as u64,
    })
}

#[allow(clippy::too_many_arguments)]
/// A page of `table` rows (ordered by rowid, which follows creation) under `condition`, with
/// OpenAI's cursors.
fn page<T>(
    connection: &Connection,
    table: &str,
    columns: &str,
    condition: &str,
    values: &[&dyn rusqlite::ToSql],
    id_column: &str,
    request: &PageRequest,
    map: impl Fn(&Row) -> rusqlite::Result<T>,
) -> Result<Page<T>, RagError> {
    let limit = request.limit.clamp(1, 100);
    let (cmp_after, cmp_before, direction) = match request.order {
        ListOrder::Desc => ("<", ">", "DESC"),
        ListOrder::Asc => (">", "<", "ASC"),
    };
    let cursor = |id: &Option<String>| -> Result<Option<i64>, RagError> {
        let Some(id) = id else { return Ok(None) };
        // The cursor's id is the last parameter, after the condition's own.
        let sql =
            format!("SELECT rowid FROM {table} WHERE {condition} AND {id_column} = ?{}", values.len() + 1);
        let mut all: Vec<&dyn rusqlite::ToSql> = values.to_vec();
        all.push(id);
        let rowid: Option<i64> =
            connection.query_row(&sql, rusqlite::params_from_iter(all.iter()), |r| r.get(0)).optional()?;
        rowid.map(Some).ok_or_else(|| RagError::Invalid {
            param: "after",
            message: format!("cursor `{id}` is not an object of this list"),
        })
    };
    let after = cursor(&request.after)?;
    let before = cursor(&request.before)?;
    let mut sql = format!("SELECT {columns} FROM {table} WHERE {condition}");
    if let Some(after) = after {
        sql.push_str(&format!(" AND rowid {cmp_after} {after}"));
    }
    if let Some(before) = before {
        sql.push_str(&format!(" AND rowid {cmp_before} {before}"));
    }
    sql.push_str(&format!(" ORDER BY rowid {direction} LIMIT {}", limit + 1));
    let mut statement = connection.prepare(&sql)?;
    let mut items = statement
        .query_map(rusqlite::params_from_iter(values.iter()), map)?
        .collect::<Result<Vec<_>, _>>()?;
    let has_more = items.len() > limit;
    items.truncate(limit);
    Ok(Page { items, has_more })
}

/// An exclusive advisory lock on `dir/lock` (released by the kernel when the holder exits,
/// however it exits), with the holder's pid written in it for the message a second opener gets.
fn take_lock(dir: &Path) -> Result<std::fs::File, RagError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| RagError::at(&path, "open", e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(RagError::Locked {
                dir: dir.to_path_buf(),
                holder: if holder.is_empty() {
                    "another process".into()
                } else {
                    format!("process {holder}")
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(RagError::at(&path, "lock", e)),
    }
    let written =
        file.set_len(0).and_then(|()| file.rewind()).and_then(|()| writeln!(file, "{}", std::process::id()));
    written.map_err(|e| RagError::at(&path, "write", e))?;
    Ok(file)
}

impl Library {
    /// Opens (or creates) the library in `dir`, bringing every store's indexes up to SQLite's
    /// record, and removes what a crash left half-made (files without rows, deleted stores'
    /// folders).
    pub fn open(dir: &Path, options: LibraryOptions) -> Result<Self, RagError> {
        for sub in ["files", "stores"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| RagError::at(&dir.join(sub), "create", e))?;
        }
        let dir_lock = take_lock(dir)?;
        let database = dir.join("hearth.sqlite");
        let write = sql::open(&database)?;
        let read = sql::open(&database)?;
        let library = Self {
            _lock: dir_lock,
            dir: dir.to_path_buf(),
            options,
            write: Mutex::new(write),
            read: Mutex::new(read),
            stores: RwLock::new(HashMap::new()),
        };
        library.sweep()?;
        let rows: Vec<(String, usize, String)> = {
            let connection = lock(&library.read);
            let mut statement = connection.prepare("SELECT id, dims, metric FROM stores ORDER BY rowid")?;
            let rows = statement
                .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize, r.get(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            rows
        };
        for (id, dims, metric) in rows {
            let metric = Metric::parse(&metric).unwrap_or(Metric::Cosine);
            let index = library.open_store(&id, dims, metric)?;
            library.stores.write().unwrap_or_else(|p| p.into_inner()).insert(id, Arc::new(index));
        }
        Ok(library)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn store_dir(&self, id: &str) -> PathBuf {
        self.dir.join("stores").join(id)
    }

    fn file_path(&self, id: &str) -> PathBuf {
        self.dir.join("files").join(id)
    }

    /// Removes uploaded bytes without a row and store folders without a store.
    fn sweep(&self) -> Result<(), RagError> {
        let connection = lock(&self.read);
        for (sub, table) in [("files", "files"), ("stores", "stores")] {
            let folder = self.dir.join(sub);
            let entries = std::fs::read_dir(&folder).map_err(|e| RagError::at(&folder, "read", e))?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let known: bool = connection
                    .query_row(&format!("SELECT 1 FROM {table} WHERE id = ?1"), [&name], |_| Ok(true))
                    .optional()?
                    .unwrap_or(false);
                if !known {
                    tracing::info!(path = %entry.path().display(), "removing what an interrupted write left");
                    let path = entry.path();
                    let _ = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                }
            }
        }
        Ok(())
    }

    /// A store's indexes from its folder, replaying what SQLite holds beyond them.
    fn open_store(&self, id: &str, dims: usize, metric: Metric) -> Result<StoreIndex, RagError> {
        let dir = self.store_dir(id);
        std::fs::create_dir_all(&dir).map_err(|e| RagError::at(&dir, "create", e))?;
        let mut dense = DenseIndex::open(id, &dir, dims, metric, self.options.dense)?;
        let mut lexical = LexicalIndex::open(id, &dir.join("bm25"))?;
        let connection = lock(&self.read);
        let from = dense.applied().seq.min(lexical.applied().seq);
        let mut statement = connection.prepare(
            "SELECT seq, file_key, position, text, vector FROM chunks WHERE store_id = ?1 AND seq > ?2 ORDER BY seq",
        )?;
        let mut rows = statement.query(params![id, from])?;
        let (mut replayed, mut batch) = (0usize, Vec::new());
        let flush = |batch: &mut Vec<(i64, u64, u64, String, Vec<f32>)>,
                     dense: &mut DenseIndex,
                     lexical: &mut LexicalIndex|
         -> Result<(), RagError> {
            let (dense_at, lexical_at) = (dense.applied().seq, lexical.applied().seq);
            let to_dense: Vec<(u64, &[f32], i64)> =
                batch.iter().filter(|c| c.0 > dense_at).map(|c| (c.1, c.4.as_slice(), c.0)).collect();
            dense.add(&to_dense)?;
            let to_lexical: Vec<(u64, u64, &str, i64)> =
                batch.iter().filter(|c| c.0 > lexical_at).map(|c| (c.1, c.2, c.3.as_str(), c.0)).collect();
            lexical.add(&to_lexical, true)?;
            batch.clear();
            Ok(())
        };
        while let Some(row) = rows.next()? {
            let (seq, file_key, position): (i64, i64, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
            let blob: Vec<u8> = row.get(4)?;
            batch.push((
                seq,
                chunk_key(file_key as u64, position as usize),
                file_key as u64,
                row.get(3)?,
                blob_vector(&blob),
            ));
            replayed += 1;
            if batch.len() == 1024 {
                flush(&mut batch, &mut dense, &mut lexical)?;
            }
        }
        flush(&mut batch, &mut dense, &mut lexical)?;
        drop(rows);
        drop(statement);
        // Removals the indexes have not applied.
        let removal_from = dense.applied().removal.min(lexical.applied().removal);
        let mut statement =
            connection.prepare("SELECT op, key FROM removals WHERE store_id = ?1 AND op > ?2 ORDER BY op")?;
        let removals: Vec<(i64, u64)> = statement
            .query_map(params![id, removal_from], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(&(last, _)) = removals.last() {
            let keys: Vec<u64> = removals.iter().map(|r| r.1).collect();
            dense.remove(&keys, last)?;
            lexical.remove(&keys, last);
        }
        drop(statement);
        drop(connection);
        if replayed > 0 || !removals.is_empty() {
            tracing::info!(
                store = id,
                chunks = replayed,
                removals = removals.len(),
                "brought the indexes up to the record"
            );
        }
        lexical.commit()?;
        dense.save(&dir)?;
        Ok(StoreIndex {
            dir,
            dims,
            metric,
            indexes: RwLock::new(Indexes { dense, lexical }),
            writing: Mutex::new(()),
        })
    }

    fn index(&self, store: &str) -> Result<Arc<StoreIndex>, RagError> {
        self.stores
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(store)
            .cloned()
            .ok_or_else(|| not_found("vector store", store))
    }

    // ---- files ----

    /// Stores an upload: bytes on disk (synced) first, then its row.
    pub fn create_file(&self, filename: &str, purpose: &str, bytes: &[u8]) -> Result<FileRecord, RagError> {
        let record = FileRecord {
            id: new_id("file-"),
            filename: filename.to_string(),
            purpose: purpose.to_string(),
            bytes: bytes.len() as u64,
            created_at: now(),
        };
        write_atomic(&self.file_path(&record.id), bytes)?;
        lock(&self.write).execute(
            "INSERT INTO files (id, filename, purpose, bytes, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![record.id, record.filename, record.purpose, record.bytes as i64, record.created_at],
        )?;
        Ok(record)
    }

    pub fn file(&self, id: &str) -> Result<FileRecord, RagError> {
        lock(&self.read)
            .query_row(&format!("SELECT {FILE_COLUMNS} FROM files WHERE id = ?1"), [id], file_row)
            .optional()?
            .ok_or_else(|| not_found("file", id))
    }

    pub fn file_bytes(&self, id: &str) -> Result<Vec<u8>, RagError> {
        self.file(id)?;
        let path = self.file_path(id);
        std::fs::read(&path).map_err(|e| RagError::at(&path, "read", e))
    }

    pub fn list_files(
        &self,
        purpose: Option<&str>,
        request: &PageRequest,
    ) -> Result<Page<FileRecord>, RagError> {
        let connection = lock(&self.read);
        match purpose {
            Some(purpose) => {
                page(&connection, "files", FILE_COLUMNS, "purpose = ?1", &[&purpose], "id", request, file_row)
            }
            None => page(&connection, "files", FILE_COLUMNS, "1 = 1", &[], "id", request, file_row),
        }
    }

    /// Deletes a file and removes it from every vector store holding it.
    pub fn delete_file(&self, id: &str) -> Result<(), RagError> {
        self.file(id)?;
        let stores: Vec<String> = {
            let connection = lock(&self.read);
            let mut statement = connection.prepare("SELECT store_id FROM store_files WHERE file_id = ?1")?;
            let stores = statement.query_map([id], |r| r.get(0))?.collect::<Result<Vec<_>, _>>()?;
            stores
        };
        for store in stores {
            match self.remove_store_file(&store, id) {
                Ok(()) | Err(RagError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        lock(&self.write).execute("DELETE FROM files WHERE id = ?1", [id])?;
        let path = self.file_path(id);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a deleted file's bytes");
        }
        Ok(())
    }

    // ---- vector stores ----

    pub fn create_store(
        &self,
        name: Option<String>,
        metadata: Map<String, Value>,
        expires_after: Option<Value>,
        embedder: &str,
        dims: usize,
        metric: Metric,
    ) -> Result<StoreRecord, RagError> {
        let id = new_id("vs_");
        let created = now();
        let index = self.open_store(&id, dims, metric)?;
        lock(&self.write).execute(
            "INSERT INTO stores (id, name, created_at, last_active_at, metadata, expires_after, embedder, dims, metric)
             VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                id,
                name,
                created,
                Value::Object(metadata).to_string(),
                expires_after.map(|v| v.to_string()),
                embedder,
                dims as i64,
                metric.as_str()
            ],
        )?;
        self.stores.write().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), Arc::new(index));
        self.store(&id)
    }

    fn store_row(connection: &Connection, row: &Row) -> rusqlite::Result<StoreRecord> {
        let id: String = row.get(0)?;
        let last_active_at: i64 = row.get(3)?;
        let expires_after: Option<Value> =
            row.get::<_, Option<String>>(5)?.and_then(|t| serde_json::from_str(&t).ok());
        let expires_at = expires_after
            .as_ref()
            .and_then(|e| e.get("days").and_then(Value::as_i64))
            .map(|days| last_active_at + days * 86_400);
        let mut counts = FileCounts::default();
        let mut statement = connection.prepare_cached(
            "SELECT status, COUNT(*), SUM(usage_bytes) FROM store_files WHERE store_id = ?1 GROUP BY status",
        )?;
        let mut usage_bytes = 0u64;
        for row in statement.query_map([&id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<i64>>(2)?))
        })? {
            let (status, count, usage) = row?;
            let count = count as u64;
            usage_bytes += usage.unwrap_or(0) as u64;
            match StoreFileStatus::parse(&status) {
                Some(StoreFileStatus::InProgress) => counts.in_progress += count,
                Some(StoreFileStatus::Completed) => counts.completed += count,
                Some(StoreFileStatus::Cancelled) => counts.cancelled += count,
                _ => counts.failed += count,
            }
            counts.total += count;
        }
        Ok(StoreRecord {
            id,
            name: row.get(1)?,
            created_at: row.get(2)?,
            last_active_at,
            metadata: json_map(&row.get::<_, String>(4)?),
            expires_after,
            expires_at,
            embedder: row.get(6)?,
            dims: row.get::<_, i64>(7)? as usize,
            metric: Metric::parse(&row.get::<_, String>(8)?).unwrap_or(Metric::Cosine),
            file_counts: counts,
            usage_bytes,
        })
    }

    const STORE_COLUMNS: &'static str =
        "id, name, created_at, last_active_at, metadata, expires_after, embedder, dims, metric";

    pub fn store(&self, id: &str) -> Result<StoreRecord, RagError> {
        let connection = lock(&self.read);
        connection
            .query_row(&format!("SELECT {} FROM stores WHERE id = ?1", Self::STORE_COLUMNS), [id], |row| {
                Self::store_row(&connection, row)
            })
            .optional()?
            .ok_or_else(|| not_found("vector store", id))
    }

    pub fn list_stores(&self, request: &PageRequest) -> Result<Page<StoreRecord>, RagError> {
        let connection = lock(&self.read);
        page(&connection, "stores", Self::STORE_COLUMNS, "1 = 1", &[], "id", request, |row| {
            Self::store_row(&connection, row)
        })
    }

    /// Changes a store's name, metadata or expiry (`Some(None)` clears one).
    pub fn update_store(
        &self,
        id: &str,
        name: Option<Option<String>>,
        metadata: Option<Map<String, Value>>,
        expires_after: Option<Option<Value>>,
    ) -> Result<StoreRecord, RagError> {
        self.store(id)?;
        let connection = lock(&self.write);
        if let Some(name) = name {
            connection.execute("UPDATE stores SET name = ?2 WHERE id = ?1", params![id, name])?;
        }
        if let Some(metadata) = metadata {
            connection.execute(
                "UPDATE stores SET metadata = ?2 WHERE id = ?1",
                params![id, Value::Object(metadata).to_string()],
            )?;
        }
        if let Some(expires) = expires_after {
            connection.execute(
                "UPDATE stores SET expires_after = ?2 WHERE id = ?1",
                params![id, expires.map(|v| v.to_string())],
            )?;
        }
        drop(connection);
        self.store(id)
    }

    /// Deletes a store, its chunks and its indexes (the files themselves stay).
    pub fn delete_store(&self, id: &str) -> Result<(), RagError> {
        let index = self.index(id)?;
        let _writing = lock(&index.writing);
        {
            let mut connection = lock(&self.write);
            let transaction = connection.transaction()?;
            transaction.execute("DELETE FROM chunks WHERE store_id = ?1", [id])?;
            transaction.execute("DELETE FROM removals WHERE store_id = ?1", [id])?;
            transaction.execute("DELETE FROM store_files WHERE store_id = ?1", [id])?;
            transaction.execute("DELETE FROM batches WHERE store_id = ?1", [id])?;
            transaction.execute("DELETE FROM stores WHERE id = ?1", [id])?;
            transaction.commit()?;
        }
        self.stores.write().unwrap_or_else(|p| p.into_inner()).remove(id);
        // Searches that still hold the index finish on it; the folder goes now (or at the next
        // open, if this fails).
        if let Err(e) = std::fs::remove_dir_all(&index.dir) {
            tracing::warn!(store = id, error = %e, "cannot remove a deleted store's folder; it goes at the next start");
        }
        Ok(())
    }

    fn touch(&self, store: &str) -> Result<(), RagError> {
        lock(&self.write)
            .execute("UPDATE stores SET last_active_at = ?2 WHERE id = ?1", params![store, now()])?;
        Ok(())
    }

    // ---- store files ----

    /// Adds an uploaded file to a store as `in_progress` (the caller then ingests it). A file
    /// already in the store is returned as it is.
    pub fn add_store_file(
        &self,
        store: &str,
        file: &str,
        attributes: Map<String, Value>,
        chunking: ChunkingStrategy,
        batch: Option<&str>,
    ) -> Result<(StoreFileRecord, bool), RagError> {
        self.index(store)?;
        self.file(file)?;
        if let Ok(existing) = self.store_file(store, file) {
            return Ok((existing, false));
        }
        lock(&self.write).execute(
            "INSERT INTO store_files (store_id, file_id, created_at, status, attributes, max_tokens, overlap, batch_id)
             VALUES (?1, ?2, ?3, 'in_progress', ?4, ?5, ?6, ?7)",
            params![
                store,
                file,
                now(),
                Value::Object(attributes).to_string(),
                chunking.max_chunk_size_tokens as i64,
                chunking.chunk_overlap_tokens as i64,
                batch
            ],
        )?;
        self.touch(store)?;
        Ok((self.store_file(store, file)?, true))
    }

    pub fn store_file(&self, store: &str, file: &str) -> Result<StoreFileRecord, RagError> {
        lock(&self.read)
            .query_row(
                &format!("SELECT {STORE_FILE_COLUMNS} FROM store_files WHERE store_id = ?1 AND file_id = ?2"),
                [store, file],
                store_file_row,
            )
            .optional()?
            .ok_or_else(|| not_found("file in this vector store", file))
    }

    pub fn list_store_files(
        &self,
        store: &str,
        status: Option<StoreFileStatus>,
        batch: Option<&str>,
        request: &PageRequest,
    ) -> Result<Page<StoreFileRecord>, RagError> {
        self.index(store)?;
        let connection = lock(&self.read);
        let status = status.map(StoreFileStatus::as_str);
        page(
            &connection,
            "store_files",
            STORE_FILE_COLUMNS,
            "store_id = ?1 AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR batch_id = ?3)",
            &[&store, &status, &batch],
            "file_id",
            request,
            store_file_row,
        )
    }

    pub fn update_store_file(
        &self,
        store: &str,
        file: &str,
        attributes: Map<String, Value>,
    ) -> Result<StoreFileRecord, RagError> {
        self.store_file(store, file)?;
        lock(&self.write).execute(
            "UPDATE store_files SET attributes = ?3 WHERE store_id = ?1 AND file_id = ?2",
            params![store, file, Value::Object(attributes).to_string()],
        )?;
        self.store_file(store, file)
    }

    /// The store files to ingest: every one still `in_progress` (at startup, those a restart
    /// interrupted).
    pub fn pending(&self) -> Result<Vec<StoreFileRecord>, RagError> {
        let connection = lock(&self.read);
        let mut statement = connection.prepare(&format!(
            "SELECT {STORE_FILE_COLUMNS} FROM store_files WHERE status = 'in_progress' ORDER BY key"
        ))?;
        let rows = statement.query_map([], store_file_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Stores a file's chunks and marks it `completed` (one transaction), then adds them to the
    /// store's indexes. Returns `false` (and stores nothing) if the file left the store or
    /// stopped being `in_progress` (removed or cancelled during ingest).
    pub fn complete_store_file(
        &self,
        store: &str,
        file: &str,
        chunks: &[NewChunk],
    ) -> Result<bool, RagError> {
        let index = self.index(store)?;
        if chunks.len() > MAX_CHUNKS_PER_FILE {
            return Err(RagError::Invalid {
                param: "file_id",
                message: format!(
                    "file `{file}` makes {} chunks; at most {MAX_CHUNKS_PER_FILE} are allowed",
                    chunks.len()
                ),
            });
        }
        if let Some(bad) = chunks.iter().find(|c| c.vector.len() != index.dims) {
            return Err(RagError::DimensionMismatch {
                store: store.into(),
                expected: index.dims,
                got: bad.vector.len(),
            });
        }
        let _writing = lock(&index.writing);
        let (file_key, seqs) = {
            let mut connection = lock(&self.write);
            let transaction = connection.transaction()?;
            let current: Option<(i64, String)> = transaction
                .query_row(
                    "SELECT key, status FROM store_files WHERE store_id = ?1 AND file_id = ?2",
                    [store, file],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((file_key, "in_progress")) = current.as_ref().map(|(k, s)| (*k, s.as_str())) else {
                return Ok(false);
            };
            let mut seqs = Vec::with_capacity(chunks.len());
            let mut usage = 0u64;
            {
                let mut insert = transaction.prepare_cached(
                    "INSERT INTO chunks (store_id, file_key, position, text, vector) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for chunk in chunks {
                    insert.execute(params![
                        store,
                        file_key,
                        chunk.position as i64,
                        chunk.text,
                        vector_blob(&chunk.vector)
                    ])?;
                    seqs.push(transaction.last_insert_rowid());
                    usage += (chunk.text.len() + chunk.vector.len() * 4) as u64;
                }
            }
            transaction.execute(
                "UPDATE store_files SET status = 'completed', usage_bytes = ?3, error_code = NULL, error_message = NULL
                 WHERE store_id = ?1 AND file_id = ?2",
                params![store, file, usage as i64],
            )?;
            transaction
                .execute("UPDATE stores SET last_active_at = ?2 WHERE id = ?1", params![store, now()])?;
            transaction.commit()?;
            (file_key as u64, seqs)
        };
        let mut indexes = index.indexes.write().unwrap_or_else(|p| p.into_inner());
        let dense: Vec<(u64, &[f32], i64)> = chunks
            .iter()
            .zip(&seqs)
            .map(|(c, &seq)| (chunk_key(file_key, c.position), c.vector.as_slice(), seq))
            .collect();
        indexes.dense.add(&dense)?;
        let lexical: Vec<(u64, u64, &str, i64)> = chunks
            .iter()
            .zip(&seqs)
            .map(|(c, &seq)| (chunk_key(file_key, c.position), file_key, c.text.as_str(), seq))
            .collect();
        indexes.lexical.add(&lexical, false)?;
        // Committed by the next search (or save): one commit for many files ingested together.
        Ok(true)
    }

    /// Marks an `in_progress` file failed with OpenAI's error `code` and a message.
    pub fn fail_store_file(
        &self,
        store: &str,
        file: &str,
        code: &str,
        message: &str,
    ) -> Result<(), RagError> {
        lock(&self.write).execute(
            "UPDATE store_files SET status = 'failed', error_code = ?3, error_message = ?4
             WHERE store_id = ?1 AND file_id = ?2 AND status = 'in_progress'",
            params![store, file, code, message],
        )?;
        Ok(())
    }

    /// Removes a file from a store: its chunks from SQLite (logged as removals) and then from
    /// both indexes.
    pub fn remove_store_file(&self, store: &str, file: &str) -> Result<(), RagError> {
        let index = self.index(store)?;
        let _writing = lock(&index.writing);
        let (keys, last) = {
            let mut connection = lock(&self.write);
            let transaction = connection.transaction()?;
            let file_key: i64 = transaction
                .query_row(
                    "SELECT key FROM store_files WHERE store_id = ?1 AND file_id = ?2",
                    [store, file],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| not_found("file in this vector store", file))?;
            let positions: Vec<i64> = {
                let mut statement = transaction.prepare("SELECT position FROM chunks WHERE file_key = ?1")?;
                let positions =
                    statement.query_map([file_key], |r| r.get(0))?.collect::<Result<Vec<_>, _>>()?;
                positions
            };
            let keys: Vec<u64> = positions.iter().map(|&p| chunk_key(file_key as u64, p as usize)).collect();
            let mut last = 0;
            {
                let mut log =
                    transaction.prepare_cached("INSERT INTO removals (store_id, key) VALUES (?1, ?2)")?;
                for &key in &keys {
                    log.execute(params![store, key as i64])?;
                    last = transaction.last_insert_rowid();
                }
            }
            transaction.execute("DELETE FROM chunks WHERE file_key = ?1", [file_key])?;
            transaction.execute("DELETE FROM store_files WHERE key = ?1", [file_key])?;
            transaction.commit()?;
            (keys, last)
        };
        if !keys.is_empty() {
            let mut indexes = index.indexes.write().unwrap_or_else(|p| p.into_inner());
            indexes.dense.remove(&keys, last)?;
            indexes.lexical.remove(&keys, last);
        }
        Ok(())
    }

    // ---- batches ----

    pub fn create_batch(&self, store: &str) -> Result<String, RagError> {
        self.index(store)?;
        let id = new_id("vsfb_");
        lock(&self.write).execute(
            "INSERT INTO batches (id, store_id, created_at) VALUES (?1, ?2, ?3)",
            params![id, store, now()],
        )?;
        Ok(id)
    }

    /// A batch's creation time, whether it was cancelled, and its files' counts.
    pub fn batch(&self, store: &str, batch: &str) -> Result<(i64, bool, FileCounts), RagError> {
        let connection = lock(&self.read);
        let (created, cancelled): (i64, bool) = connection
            .query_row(
                "SELECT created_at, cancelled FROM batches WHERE id = ?1 AND store_id = ?2",
                [batch, store],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| not_found("file batch", batch))?;
        let mut counts = FileCounts::default();
        let mut statement = connection.prepare(
            "SELECT status, COUNT(*) FROM store_files WHERE store_id = ?1 AND batch_id = ?2 GROUP BY status",
        )?;
        for row in statement
            .query_map([store, batch], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
        {
            let (status, count) = row?;
            match StoreFileStatus::parse(&status) {
                Some(StoreFileStatus::InProgress) => counts.in_progress += count,
                Some(StoreFileStatus::Completed) => counts.completed += count,
                Some(StoreFileStatus::Cancelled) => counts.cancelled += count,
                _ => counts.failed += count,
            }
            counts.total += count;
        }
        Ok((created, cancelled, counts))
    }

    /// Cancels a batch: its files not yet ingested become `cancelled`.
    pub fn cancel_batch(&self, store: &str, batch: &str) -> Result<(), RagError> {
        self.batch(store, batch)?;
        let mut connection = lock(&self.write);
        let transaction = connection.transaction()?;
        transaction.execute("UPDATE batches SET cancelled = 1 WHERE id = ?1", [batch])?;
        transaction.execute(
            "UPDATE store_files SET status = 'cancelled' WHERE store_id = ?1 AND batch_id = ?2 AND status = 'in_progress'",
            [store, batch],
        )?;
        transaction.commit()?;
        Ok(())
    }

    // ---- search ----

    /// The dimension of a store's vectors, its metric and the embedder that made them.
    pub fn store_space(&self, store: &str) -> Result<(usize, Metric), RagError> {
        let index = self.index(store)?;
        Ok((index.dims, index.metric))
    }

    /// Hybrid search over `stores`: each store's dense and BM25 candidates, merged across stores
    /// by score, fused as `request.fusion` says. Returns at most `candidates` hits, best first.
    pub fn search(&self, stores: &[String], request: &SearchRequest) -> Result<Vec<Hit>, RagError> {
        let mut dense: Vec<(u64, f32)> = Vec::new();
        let mut lexical: Vec<(u64, f32)> = Vec::new();
        for store in stores {
            let index = self.index(store)?;
            if let Some(vector) = &request.vector {
                if vector.len() != index.dims {
                    return Err(RagError::DimensionMismatch {
                        store: store.clone(),
                        expected: index.dims,
                        got: vector.len(),
                    });
                }
            }
            // With a filter: the store's completed files it keeps (attributes read for all).
            let allowed: Option<Arc<HashSet<u64>>> = match &request.filter {
                None => None,
                Some(filter) => {
                    let files = self.completed_files(store)?;
                    Some(Arc::new(
                        files.iter().filter(|(_, (_, a))| filter.matches(a)).map(|(k, _)| *k).collect(),
                    ))
                }
            };
            // BM25 changes since the last commit become visible now.
            if index.indexes.read().unwrap_or_else(|p| p.into_inner()).lexical.pending() {
                index.indexes.write().unwrap_or_else(|p| p.into_inner()).lexical.commit()?;
            }
            let indexes = index.indexes.read().unwrap_or_else(|p| p.into_inner());
            if let (Some(vector), true) = (&request.vector, request.dense_weight > 0.0) {
                let found = match &allowed {
                    None => indexes.dense.search(vector, request.candidates, None)?,
                    Some(allowed) if allowed.is_empty() => Vec::new(),
                    Some(allowed) => {
                        let keys = self.keys_of_files(allowed)?;
                        if keys.len() < self.options.dense.exact_below {
                            let mut scored = indexes.dense.score_keys(vector, &keys, index.metric)?;
                            scored.sort_by(|a, b| b.1.total_cmp(&a.1));
                            scored.truncate(request.candidates);
                            scored
                        } else {
                            let allowed = Arc::clone(allowed);
                            let keep = move |key: u64| allowed.contains(&file_of(key));
                            indexes.dense.search(vector, request.candidates, Some(&keep))?
                        }
                    }
                };
                dense.extend(found);
            }
            if let (Some(text), true) = (&request.text, request.lexical_weight > 0.0) {
                lexical.extend(indexes.lexical.search(text, request.candidates, allowed)?);
            }
        }
        dense.sort_by(|a, b| b.1.total_cmp(&a.1));
        dense.truncate(request.candidates);
        lexical.sort_by(|a, b| b.1.total_cmp(&a.1));
        lexical.truncate(request.candidates);
        let fused = request
            .fusion
            .fuse(&[(&dense[..], request.dense_weight), (&lexical[..], request.lexical_weight)]);
        let dense_rank: HashMap<u64, (f32, usize)> =
            dense.iter().enumerate().map(|(i, d)| (d.0, (d.1, i))).collect();
        let lexical_rank: HashMap<u64, (f32, usize)> =
            lexical.iter().enumerate().map(|(i, d)| (d.0, (d.1, i))).collect();
        let keys: Vec<u64> = fused.iter().take(request.candidates).map(|f| f.0).collect();
        let texts = self.chunk_texts(&keys)?;
        let attributes = self.files_of(keys.iter().map(|&k| file_of(k)))?;
        let mut hits = Vec::with_capacity(keys.len());
        for (key, score) in fused.into_iter().take(request.candidates) {
            let (Some((store_id, position, text)), Some((file_id, attrs))) =
                (texts.get(&key), attributes.get(&file_of(key)))
            else {
                continue;
            };
            hits.push(Hit {
                key,
                store_id: store_id.clone(),
                file_id: file_id.clone(),
                filename: String::new(),
                position: *position,
                text: text.clone(),
                attributes: attrs.clone(),
                score,
                dense: dense_rank.get(&key).copied(),
                lexical: lexical_rank.get(&key).copied(),
            });
        }
        let names = self.filenames(hits.iter().map(|h| h.file_id.as_str()))?;
        for hit in &mut hits {
            hit.filename = names.get(&hit.file_id).cloned().unwrap_or_default();
        }
        Ok(hits)
    }

    fn completed_files(&self, store: &str) -> Result<FileAttributes, RagError> {
        let connection = lock(&self.read);
        let mut statement = connection.prepare_cached(
            "SELECT key, file_id, attributes FROM store_files WHERE store_id = ?1 AND status = 'completed'",
        )?;
        let rows = statement
            .query_map([store], |r| {
                Ok((r.get::<_, i64>(0)? as u64, (r.get(1)?, json_map(&r.get::<_, String>(2)?))))
            })?
            .collect::<Result<HashMap<_, _>, _>>()?;
        Ok(rows)
    }

    /// The file id and attributes of each file key (hits' files).
    fn files_of(&self, keys: impl Iterator<Item = u64>) -> Result<FileAttributes, RagError> {
        let connection = lock(&self.read);
        let mut statement =
            connection.prepare_cached("SELECT file_id, attributes FROM store_files WHERE key = ?1")?;
        let mut files = HashMap::new();
        for key in keys {
            if files.contains_key(&key) {
                continue;
            }
            if let Some(row) = statement
                .query_row([key as i64], |r| Ok((r.get::<_, String>(0)?, json_map(&r.get::<_, String>(1)?))))
                .optional()?
            {
                files.insert(key, row);
            }
        }
        Ok(files)
    }

    fn keys_of_files(&self, files: &HashSet<u64>) -> Result<Vec<u64>, RagError> {
        let connection = lock(&self.read);
        let mut statement = connection.prepare_cached("SELECT position FROM chunks WHERE file_key = ?1")?;
        let mut keys = Vec::new();
        for &file in files {
            for position in statement.query_map([file as i64], |r| r.get::<_, i64>(0))? {
                keys.push(chunk_key(file, position? as usize));
            }
        }
        Ok(keys)
    }

    fn chunk_texts(&self, keys: &[u64]) -> Result<HashMap<u64, (String, usize, String)>, RagError> {
        let connection = lock(&self.read);
        let mut statement = connection
            .prepare_cached("SELECT store_id, text FROM chunks WHERE file_key = ?1 AND position = ?2")?;
        let mut texts = HashMap::with_capacity(keys.len());
        for &key in keys {
            let position = (key & ((1 << POSITION_BITS) - 1)) as usize;
            if let Some((store, text)) = statement
                .query_row(params![file_of(key) as i64, position as i64], |r| {
                    Ok((r.get::<_, String>(0)?, r.get(1)?))
                })
                .optional()?
            {
                texts.insert(key, (store, position, text));
            }
        }
        Ok(texts)
    }

    fn filenames<'a>(&self, ids: impl Iterator<Item = &'a str>) -> Result<HashMap<String, String>, RagError> {
        let connection = lock(&self.read);
        let mut statement = connection.prepare_cached("SELECT filename FROM files WHERE id = ?1")?;
        let mut names = HashMap::new();
        for id in ids {
            if names.contains_key(id) {
                continue;
            }
            if let Some(name) = statement.query_row([id], |r| r.get::<_, String>(0)).optional()? {
                names.insert(id.to_string(), name);
            }
        }
        Ok(names)
    }

    // ---- upkeep ----

    /// Saves every changed dense index and drops removal-log entries both indexes hold.
    pub fn flush(&self) -> Result<(), RagError> {
        let stores: Vec<(String, Arc<StoreIndex>)> = self
            .stores
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, index)| (id.clone(), Arc::clone(index)))
            .collect();
        for (id, index) in stores {
            let _writing = lock(&index.writing);
            let mut indexes = index.indexes.write().unwrap_or_else(|p| p.into_inner());
            indexes.lexical.commit()?;
            indexes.dense.save(&index.dir)?;
            let held = indexes.dense.applied().removal.min(indexes.lexical.applied().removal);
            drop(indexes);
            lock(&self.write)
                .execute("DELETE FROM removals WHERE store_id = ?1 AND op <= ?2", params![id, held])?;
        }
        Ok(())
    }

    /// Counts a store's chunks in SQLite and in each index, and checks every chunk is in the
    /// dense index.
    pub fn verify(&self, store: &str) -> Result<Consistency, RagError> {
        let index = self.index(store)?;
        let _writing = lock(&index.writing);
        let connection = lock(&self.read);
        let mut statement =
            connection.prepare("SELECT file_key, position FROM chunks WHERE store_id = ?1")?;
        let keys: Vec<u64> = statement
            .query_map([store], |r| Ok(chunk_key(r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as usize)))?
            .collect::<Result<Vec<_>, _>>()?;
        index.indexes.write().unwrap_or_else(|p| p.into_inner()).lexical.commit()?;
        let indexes = index.indexes.read().unwrap_or_else(|p| p.into_inner());
        let probe = vec![0f32; index.dims];
        let found: HashSet<u64> =
            indexes.dense.score_keys(&probe, &keys, Metric::Dot)?.into_iter().map(|k| k.0).collect();
        Ok(Consistency {
            chunks: keys.len() as u64,
            dense: indexes.dense.len() as u64,
            lexical: indexes.lexical.len(),
            dense_missing: keys.iter().filter(|k| !found.contains(k)).count() as u64,
        })
    }

    /// Bytes the dense indexes hold in memory, all stores together.
    pub fn dense_memory_bytes(&self) -> usize {
        self.stores
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|i| i.indexes.read().unwrap_or_else(|p| p.into_inner()).dense.memory_bytes())
            .sum()
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "cannot save the vector indexes at close; they are rebuilt from the record at the next start");
        }
    }
}
