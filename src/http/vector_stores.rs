//! OpenAI's Vector Stores API over Hearth's store: stores, their files (ingested in the
//! background: `in_progress` → `completed` | `failed`), file batches, and search (hybrid dense +
//! BM25, fused by reciprocal rank, then reranked). Each search result carries, beside OpenAI's
//! fields, a `hearth` object: the chunk's index in its file and its place in each ranking.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use hearth_rag::filter::{check_attributes, Filter};
use hearth_rag::{ChunkingStrategy, Hit, StoreFileRecord, StoreFileStatus, StoreRecord};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::files::{list, rag, ListQuery};
use super::json::Json;
use crate::rag::Rag;
use crate::state::AppState;

/// Most files one request may add (a batch).
const MAX_BATCH_FILES: usize = 500;
/// Most results a search returns (OpenAI's bound).
const MAX_RESULTS: usize = 50;
const MAX_METADATA_KEYS: usize = 16;

type Reply = Result<axum::Json<Value>, ApiError>;

pub fn store_object(store: &StoreRecord) -> Value {
    let now = hearth_rag::now();
    let status = if store.expires_at.is_some_and(|at| at <= now) {
        "expired"
    } else if store.file_counts.in_progress > 0 {
        "in_progress"
    } else {
        "completed"
    };
    json!({
        "id": store.id,
        "object": "vector_store",
        "created_at": store.created_at,
        "name": store.name,
        "description": null,
        "usage_bytes": store.usage_bytes,
        "file_counts": store.file_counts,
        "status": status,
        "expires_after": store.expires_after,
        "expires_at": store.expires_at,
        "last_active_at": store.last_active_at,
        "metadata": store.metadata,
    })
}

fn chunking_object(c: &ChunkingStrategy) -> Value {
    json!({"type": "static", "static": c})
}

pub fn store_file_object(file: &StoreFileRecord) -> Value {
    json!({
        "id": file.file_id,
        "object": "vector_store.file",
        "usage_bytes": file.usage_bytes,
        "created_at": file.created_at,
        "vector_store_id": file.store_id,
        "status": file.status.as_str(),
        "last_error": file.last_error.as_ref().map(|(code, message)| json!({"code": code, "message": message})),
        "chunking_strategy": chunking_object(&file.chunking),
        "attributes": file.attributes,
    })
}

/// OpenAI's `chunking_strategy`: `{"type": "auto"}` or `{"type": "static", "static":
/// {"max_chunk_size_tokens", "chunk_overlap_tokens"}}`; `None` is auto.
fn parse_chunking(value: &Option<Value>) -> Result<Option<(usize, usize)>, ApiError> {
    let bad = |m: &str| ApiError::invalid(m.to_string(), "chunking_strategy");
    let Some(value) = value else { return Ok(None) };
    match value.get("type").and_then(Value::as_str) {
        Some("auto") => Ok(None),
        Some("static") => {
            let sizes = value
                .get("static")
                .ok_or_else(|| bad("a `static` chunking strategy needs a `static` object"))?;
            let number = |key: &str| {
                sizes
                    .get(key)
                    .and_then(Value::as_u64)
                    .map(|n| n as usize)
                    .ok_or_else(|| bad(&format!("`static.{key}` must be a whole number")))
            };
            Ok(Some((number("max_chunk_size_tokens")?, number("chunk_overlap_tokens")?)))
        }
        _ => Err(bad("`chunking_strategy.type` must be `auto` or `static`")),
    }
}

fn check_metadata(metadata: Option<Map<String, Value>>) -> Result<Option<Map<String, Value>>, ApiError> {
    if let Some(m) = &metadata {
        if m.len() > MAX_METADATA_KEYS {
            return Err(ApiError::invalid(
                format!("`metadata` may hold at most {MAX_METADATA_KEYS} keys"),
                "metadata",
            ));
        }
        if m.values().any(|v| !v.is_string()) {
            return Err(ApiError::invalid("`metadata` values must be strings", "metadata"));
        }
    }
    Ok(metadata)
}

fn check_expiry(value: &Option<Value>) -> Result<(), ApiError> {
    if let Some(v) = value {
        let anchor_ok = v.get("anchor").and_then(Value::as_str) == Some("last_active_at");
        let days_ok = v.get("days").and_then(Value::as_u64).is_some_and(|d| (1..=365).contains(&d));
        if !(anchor_ok && days_ok) {
            return Err(ApiError::invalid(
                "`expires_after` must be {\"anchor\": \"last_active_at\", \"days\": 1–365}",
                "expires_after",
            ));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateStore {
    name: Option<String>,
    #[serde(default)]
    file_ids: Vec<String>,
    expires_after: Option<Value>,
    chunking_strategy: Option<Value>,
    metadata: Option<Map<String, Value>>,
    description: Option<String>,
}

pub async fn create(State(state): State<AppState>, Json(body): Json<CreateStore>) -> Reply {
    let rag = rag(&state)?;
    let _ = body.description;
    let metadata = check_metadata(body.metadata)?.unwrap_or_default();
    check_expiry(&body.expires_after)?;
    if body.file_ids.len() > MAX_BATCH_FILES {
        return Err(ApiError::invalid(
            format!("at most {MAX_BATCH_FILES} `file_ids` per request"),
            "file_ids",
        ));
    }
    let chunking = parse_chunking(&body.chunking_strategy)?;
    let chunking = rag.chunking(&state, chunking).await?;
    let (dims, metric) = rag.space(&state).await?;
    let embedder = rag.config.embedding_model.to_string();
    let (name, expires) = (body.name, body.expires_after);
    let files = body.file_ids.clone();
    let store = rag
        .run(move |library| {
            for file in &files {
                library.file(file)?;
            }
            library.create_store(name, metadata, expires, &embedder, dims, metric)
        })
        .await?;
    let files: Vec<(String, Map<String, Value>)> =
        body.file_ids.into_iter().map(|f| (f, Map::new())).collect();
    add_files(&state, &rag, &store.id, files, chunking, None).await?;
    let id = store.id.clone();
    let store = rag.run(move |library| library.store(&id)).await?;
    Ok(axum::Json(store_object(&store)))
}

/// Adds files to a store and starts their ingest.
async fn add_files(
    state: &AppState,
    rag: &Arc<Rag>,
    store: &str,
    files: Vec<(String, Map<String, Value>)>,
    chunking: ChunkingStrategy,
    batch: Option<String>,
) -> Result<Vec<StoreFileRecord>, ApiError> {
    let s = store.to_string();
    let added = rag
        .run(move |library| {
            files
                .iter()
                .map(|(file, attributes)| {
                    library.add_store_file(&s, file, attributes.clone(), chunking, batch.as_deref())
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    let mut records = Vec::with_capacity(added.len());
    for (record, created) in added {
        if created {
            rag.spawn_ingest(state.clone(), record.store_id.clone(), record.file_id.clone());
        }
        records.push(record);
    }
    Ok(records)
}

pub async fn list_stores(State(state): State<AppState>, Query(query): Query<ListQuery>) -> Reply {
    let rag = rag(&state)?;
    let page = query.page(100)?;
    let stores = rag.run(move |library| library.list_stores(&page)).await?;
    Ok(axum::Json(list(stores, |s| s.id.clone(), store_object)))
}

pub async fn retrieve(State(state): State<AppState>, Path(id): Path<String>) -> Reply {
    let rag = rag(&state)?;
    let store = rag.run(move |library| library.store(&id)).await?;
    Ok(axum::Json(store_object(&store)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateStore {
    #[serde(default, deserialize_with = "present")]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    expires_after: Option<Option<Value>>,
    metadata: Option<Map<String, Value>>,
}

/// A field that is present (even as `null`) is `Some`.
fn present<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<UpdateStore>,
) -> Reply {
    let rag = rag(&state)?;
    let metadata = check_metadata(body.metadata)?;
    if let Some(expires) = &body.expires_after {
        check_expiry(expires)?;
    }
    let (name, expires) = (body.name, body.expires_after);
    let store = rag.run(move |library| library.update_store(&id, name, metadata, expires)).await?;
    Ok(axum::Json(store_object(&store)))
}

pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> Reply {
    let rag = rag(&state)?;
    let deleted = id.clone();
    rag.run(move |library| library.delete_store(&id)).await?;
    Ok(axum::Json(json!({"id": deleted, "object": "vector_store.deleted", "deleted": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddFile {
    file_id: String,
    #[serde(default)]
    attributes: Value,
    chunking_strategy: Option<Value>,
}

pub async fn add_file(
    State(state): State<AppState>,
    Path(store): Path<String>,
    Json(body): Json<AddFile>,
) -> Reply {
    let rag = rag(&state)?;
    let attributes = check_attributes(&body.attributes)?;
    let chunking = rag.chunking(&state, parse_chunking(&body.chunking_strategy)?).await?;
    let mut added = add_files(&state, &rag, &store, vec![(body.file_id, attributes)], chunking, None).await?;
    let record = added.pop().ok_or_else(|| ApiError::Internal { cause: "no store file record".into() })?;
    Ok(axum::Json(store_file_object(&record)))
}

fn status_filter(query: &ListQuery) -> Result<Option<StoreFileStatus>, ApiError> {
    query
        .filter
        .as_deref()
        .map(|f| {
            StoreFileStatus::parse(f).ok_or_else(|| {
                ApiError::invalid(
                    format!("`filter` must be in_progress, completed, failed or cancelled; got `{f}`"),
                    "filter",
                )
            })
        })
        .transpose()
}

pub async fn list_files(
    State(state): State<AppState>,
    Path(store): Path<String>,
    Query(query): Query<ListQuery>,
) -> Reply {
    let rag = rag(&state)?;
    let (page, status) = (query.page(100)?, status_filter(&query)?);
    let files = rag.run(move |library| library.list_store_files(&store, status, None, &page)).await?;
    Ok(axum::Json(list(files, |f| f.file_id.clone(), store_file_object)))
}

pub async fn retrieve_file(
    State(state): State<AppState>,
    Path((store, file)): Path<(String, String)>,
) -> Reply {
    let rag = rag(&state)?;
    let record = rag.run(move |library| library.store_file(&store, &file)).await?;
    Ok(axum::Json(store_file_object(&record)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateFile {
    attributes: Value,
}

pub async fn update_file(
    State(state): State<AppState>,
    Path((store, file)): Path<(String, String)>,
    Json(body): Json<UpdateFile>,
) -> Reply {
    let rag = rag(&state)?;
    let attributes = check_attributes(&body.attributes)?;
    let record = rag.run(move |library| library.update_store_file(&store, &file, attributes)).await?;
    Ok(axum::Json(store_file_object(&record)))
}

pub async fn delete_file(
    State(state): State<AppState>,
    Path((store, file)): Path<(String, String)>,
) -> Reply {
    let rag = rag(&state)?;
    let deleted = file.clone();
    rag.run(move |library| library.remove_store_file(&store, &file)).await?;
    Ok(axum::Json(json!({"id": deleted, "object": "vector_store.file.deleted", "deleted": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchFile {
    file_id: String,
    #[serde(default)]
    attributes: Value,
    chunking_strategy: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    file_ids: Option<Vec<String>>,
    files: Option<Vec<BatchFile>>,
    #[serde(default)]
    attributes: Value,
    chunking_strategy: Option<Value>,
}

fn batch_object(
    id: &str,
    store: &str,
    created_at: i64,
    cancelled: bool,
    counts: hearth_rag::FileCounts,
) -> Value {
    let status = match (cancelled, counts.in_progress) {
        (true, 0) => "cancelled",
        (true, _) => "cancelling",
        (false, 0) if counts.failed > 0 && counts.completed == 0 => "failed",
        (false, 0) => "completed",
        _ => "in_progress",
    };
    json!({
        "id": id,
        "object": "vector_store.file_batch",
        "created_at": created_at,
        "vector_store_id": store,
        "status": status,
        "file_counts": counts,
    })
}

pub async fn create_batch(
    State(state): State<AppState>,
    Path(store): Path<String>,
    Json(body): Json<CreateBatch>,
) -> Reply {
    let rag = rag(&state)?;
    let shared_attributes = check_attributes(&body.attributes)?;
    let chunking = rag.chunking(&state, parse_chunking(&body.chunking_strategy)?).await?;
    let mut files: Vec<(String, Map<String, Value>, Option<ChunkingStrategy>)> = Vec::new();
    match (body.file_ids, body.files) {
        (Some(ids), None) => files.extend(ids.into_iter().map(|id| (id, shared_attributes.clone(), None))),
        (None, Some(list)) => {
            for file in list {
                let attributes = check_attributes(&file.attributes)?;
                let own = match parse_chunking(&file.chunking_strategy)? {
                    Some(sizes) => Some(rag.chunking(&state, Some(sizes)).await?),
                    None => None,
                };
                files.push((file.file_id, attributes, own));
            }
        }
        _ => return Err(ApiError::invalid("give exactly one of `file_ids` and `files`", "file_ids")),
    }
    if files.is_empty() || files.len() > MAX_BATCH_FILES {
        return Err(ApiError::invalid(format!("a batch holds 1 to {MAX_BATCH_FILES} files"), "file_ids"));
    }
    let (s, ids) = (store.clone(), files.iter().map(|f| f.0.clone()).collect::<Vec<_>>());
    let batch = rag
        .run(move |library| {
            for id in &ids {
                library.file(id)?;
            }
            library.create_batch(&s)
        })
        .await?;
    for (file, attributes, own) in files {
        add_files(
            &state,
            &rag,
            &store,
            vec![(file, attributes)],
            own.unwrap_or(chunking),
            Some(batch.clone()),
        )
        .await?;
    }
    batch_reply(&rag, store, batch).await
}

async fn batch_reply(rag: &Arc<Rag>, store: String, batch: String) -> Reply {
    let (s, b) = (store.clone(), batch.clone());
    let (created, cancelled, counts) = rag.run(move |library| library.batch(&s, &b)).await?;
    Ok(axum::Json(batch_object(&batch, &store, created, cancelled, counts)))
}

pub async fn retrieve_batch(
    State(state): State<AppState>,
    Path((store, batch)): Path<(String, String)>,
) -> Reply {
    batch_reply(&rag(&state)?, store, batch).await
}

pub async fn cancel_batch(
    State(state): State<AppState>,
    Path((store, batch)): Path<(String, String)>,
) -> Reply {
    let rag = rag(&state)?;
    let (s, b) = (store.clone(), batch.clone());
    rag.run(move |library| library.cancel_batch(&s, &b)).await?;
    batch_reply(&rag, store, batch).await
}

pub async fn batch_files(
    State(state): State<AppState>,
    Path((store, batch)): Path<(String, String)>,
    Query(query): Query<ListQuery>,
) -> Reply {
    let rag = rag(&state)?;
    let (page, status) = (query.page(100)?, status_filter(&query)?);
    let (s, b) = (store.clone(), batch.clone());
    rag.run(move |library| library.batch(&s, &b)).await?;
    let files = rag.run(move |library| library.list_store_files(&store, status, Some(&batch), &page)).await?;
    Ok(axum::Json(list(files, |f| f.file_id.clone(), store_file_object)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankingOptions {
    ranker: Option<String>,
    score_threshold: Option<f64>,
    /// Newer SDKs send hybrid weights here; Hearth's are `[rag] dense_weight` / `lexical_weight`.
    hybrid_search: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchBody {
    query: Value,
    max_num_results: Option<usize>,
    filters: Option<Value>,
    ranking_options: Option<RankingOptions>,
    /// Accepted; Hearth searches the query as given.
    rewrite_query: Option<bool>,
}

/// Whether to rerank, and the score floor, from `ranking_options`.
fn ranking(options: &Option<RankingOptions>) -> Result<(bool, f64), ApiError> {
    // No threshold unless asked: a bi-encoder reranker's cosine can be below 0.
    let Some(options) = options else { return Ok((true, f64::NEG_INFINITY)) };
    let _ = &options.hybrid_search;
    let rerank = match options.ranker.as_deref() {
        None | Some("auto") | Some("default-2024-11-15") | Some("default-2024-08-21") => true,
        Some("none") => false,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("`ranker` must be auto, default-2024-11-15 or none; got `{other}`"),
                "ranking_options.ranker",
            ))
        }
    };
    let threshold = options.score_threshold.unwrap_or(f64::NEG_INFINITY);
    if options.score_threshold.is_some() && !(0.0..=1.0).contains(&threshold) {
        return Err(ApiError::invalid(
            "`score_threshold` must be between 0 and 1",
            "ranking_options.score_threshold",
        ));
    }
    Ok((rerank, threshold))
}

/// The query text: a string, or an array of strings searched together.
pub fn query_text(query: &Value, param: &str) -> Result<String, ApiError> {
    let text = match query {
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(Value::is_string) => {
            items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\n")
        }
        _ => {
            return Err(ApiError::invalid(
                "`query` must be a string or an array of strings",
                param.to_string(),
            ))
        }
    };
    if text.trim().is_empty() {
        return Err(ApiError::invalid("`query` is empty", param.to_string()));
    }
    Ok(text)
}

pub fn hit_object(hit: &Hit) -> Value {
    json!({
        "file_id": hit.file_id,
        "filename": hit.filename,
        "score": hit.score,
        "attributes": hit.attributes,
        "content": [{"type": "text", "text": hit.text}],
        "hearth": {
            "vector_store_id": hit.store_id,
            "chunk": hit.position,
            "dense": hit.dense.map(|(score, rank)| json!({"score": score, "rank": rank + 1})),
            "bm25": hit.lexical.map(|(score, rank)| json!({"score": score, "rank": rank + 1})),
        },
    })
}

pub async fn search(
    State(state): State<AppState>,
    Path(store): Path<String>,
    Json(body): Json<SearchBody>,
) -> Reply {
    let rag = rag(&state)?;
    let query = query_text(&body.query, "query")?;
    let max = body.max_num_results.unwrap_or(10);
    if !(1..=MAX_RESULTS).contains(&max) {
        return Err(ApiError::invalid(
            format!("`max_num_results` must be between 1 and {MAX_RESULTS}"),
            "max_num_results",
        ));
    }
    let _ = body.rewrite_query;
    let filter = body.filters.as_ref().map(Filter::parse).transpose()?;
    let (rerank, threshold) = ranking(&body.ranking_options)?;
    let s = store.clone();
    rag.run(move |library| library.store(&s)).await?;
    let started = std::time::Instant::now();
    let hits = rag.search(&state, vec![store], query.clone(), max, filter, rerank, threshold).await?;
    metrics::histogram!("hearth_rag_search_seconds").record(started.elapsed().as_secs_f64());
    Ok(axum::Json(json!({
        "object": "vector_store.search_results.page",
        "search_query": [query],
        "data": hits.iter().map(hit_object).collect::<Vec<_>>(),
        "has_more": false,
        "next_page": null,
    })))
}
