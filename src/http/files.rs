//! OpenAI's Files API: `POST /v1/files` (multipart `file` + `purpose`), `GET /v1/files`,
//! `GET/DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`. Uploads are kept under `[rag]
//! data_dir` (synced to disk before the answer) for vector stores to ingest.

use std::sync::Arc;

use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE, ORIGIN};
use axum::response::{IntoResponse, Response};
use hearth_rag::{FileRecord, ListOrder, Page, PageRequest};
use serde::Deserialize;
use serde_json::{json, Value};

use super::audio::{check_origin, multipart_error, text};
use super::error::ApiError;
use super::json::BodyLimit;
use crate::rag::Rag;
use crate::state::AppState;

/// The purposes OpenAI accepts; `assistants` and `user_data` are the ones vector stores read.
pub const PURPOSES: &[&str] = &["assistants", "batch", "fine-tune", "vision", "user_data", "evals"];

pub fn rag(state: &AppState) -> Result<Arc<Rag>, ApiError> {
    state.rag.clone().ok_or(ApiError::RagDisabled)
}

pub fn file_object(file: &FileRecord) -> Value {
    json!({
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": file.created_at,
        "expires_at": null,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "status_details": null,
    })
}

/// `limit`, `order`, `after`, `before` as OpenAI's list endpoints take them.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    pub limit: Option<usize>,
    pub order: Option<String>,
    pub after: Option<String>,
    pub before: Option<String>,
    pub purpose: Option<String>,
    pub filter: Option<String>,
}

impl ListQuery {
    pub fn page(&self, max: usize) -> Result<PageRequest, ApiError> {
        let limit = self.limit.unwrap_or(20);
        if limit == 0 || limit > max {
            return Err(ApiError::invalid(
                format!("`limit` must be between 1 and {max}; got {limit}"),
                "limit",
            ));
        }
        let order = match self.order.as_deref() {
            None | Some("desc") => ListOrder::Desc,
            Some("asc") => ListOrder::Asc,
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("`order` must be `asc` or `desc`; got `{other}`"),
                    "order",
                ))
            }
        };
        Ok(PageRequest { limit, order, after: self.after.clone(), before: self.before.clone() })
    }
}

/// `{"object": "list", "data": [...], "first_id", "last_id", "has_more"}`.
pub fn list<T>(page: Page<T>, id: impl Fn(&T) -> String, object: impl Fn(&T) -> Value) -> Value {
    json!({
        "object": "list",
        "first_id": page.items.first().map(&id),
        "last_id": page.items.last().map(&id),
        "has_more": page.has_more,
        "data": page.items.iter().map(object).collect::<Vec<_>>(),
    })
}

pub async fn upload(State(state): State<AppState>, request: Request) -> Response {
    upload_inner(state, request).await.into_response()
}

async fn upload_inner(state: AppState, request: Request) -> Result<axum::Json<Value>, ApiError> {
    let rag = rag(&state)?;
    check_origin(&state, request.headers().get(ORIGIN))?;
    let content_type =
        request.headers().get(CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if !content_type
        .as_deref()
        .is_some_and(|t| t.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("multipart/form-data"))
    {
        return Err(ApiError::NotMultipart { content_type });
    }
    let limit = request.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
    let mut multipart = Multipart::from_request(request, &state).await.map_err(|rejection| {
        ApiError::invalid(format!("could not read the multipart body: {rejection}"), "file")
    })?;
    let (mut file, mut purpose) = (None, None);
    while let Some(field) = multipart.next_field().await.map_err(|e| multipart_error(e, limit))? {
        match field.name().unwrap_or("") {
            "file" => {
                let name = field.file_name().map(|n| n.rsplit(['/', '\\']).next().unwrap_or(n).to_string());
                let bytes = field.bytes().await.map_err(|e| multipart_error(e, limit))?;
                file = Some((name, bytes));
            }
            "purpose" => purpose = Some(text(field, limit).await?),
            "expires_after[anchor]" | "expires_after[seconds]" => {
                text(field, limit).await?;
            }
            other => {
                return Err(ApiError::invalid(
                    format!("Unrecognized request argument supplied: {other}"),
                    other.to_string(),
                ))
            }
        }
    }
    let (name, bytes) = file.ok_or_else(|| ApiError::invalid("the form has no `file`", "file"))?;
    let name = name
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| ApiError::invalid("the uploaded `file` has no file name", "file"))?;
    let purpose = purpose.ok_or_else(|| ApiError::invalid("the form has no `purpose`", "purpose"))?;
    let purpose = purpose.trim().to_string();
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::invalid(
            format!("`purpose` must be one of {}; got `{purpose}`", PURPOSES.join(", ")),
            "purpose",
        ));
    }
    if bytes.len() > rag.config.max_file_bytes {
        return Err(ApiError::PayloadTooLarge { limit: rag.config.max_file_bytes });
    }
    if bytes.is_empty() {
        return Err(ApiError::invalid("the uploaded file is empty", "file"));
    }
    let record = rag.run(move |library| library.create_file(&name, &purpose, &bytes)).await?;
    metrics::counter!("hearth_rag_files_uploaded_total").increment(1);
    Ok(axum::Json(file_object(&record)))
}

pub async fn list_files(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<axum::Json<Value>, ApiError> {
    let rag = rag(&state)?;
    let page = query.page(10_000)?;
    let purpose = query.purpose.clone();
    let files = rag.run(move |library| library.list_files(purpose.as_deref(), &page)).await?;
    Ok(axum::Json(list(files, |f| f.id.clone(), file_object)))
}

pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let rag = rag(&state)?;
    let file = rag.run(move |library| library.file(&id)).await?;
    Ok(axum::Json(file_object(&file)))
}

pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let rag = rag(&state)?;
    let deleted = id.clone();
    rag.run(move |library| library.delete_file(&id)).await?;
    Ok(axum::Json(json!({"id": deleted, "object": "file", "deleted": true})))
}

pub async fn content(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let rag = rag(&state)?;
    let (file, bytes) = rag.run(move |library| Ok((library.file(&id)?, library.file_bytes(&id)?))).await?;
    let disposition =
        format!("attachment; filename=\"{}\"", file.filename.replace(['"', '\\', '\r', '\n'], "_"));
    Ok(([(CONTENT_TYPE, "application/octet-stream".to_string()), (CONTENT_DISPOSITION, disposition)], bytes)
        .into_response())
}
