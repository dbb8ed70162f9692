//! `POST /v1/rerank` (and `/rerank`): the Cohere and Jina request shape — `query`, `documents` as
//! strings or `{"text": …}` objects, `top_n`, `return_documents` — answered with `results` sorted
//! by `relevance_score`, highest first.

use axum::extract::State;
use axum::response::Response;
use hearth_engine::registry::Served;
use hearth_engine::{ModelKind, Priority};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use super::json::Json;
use super::{labelled, ready_model, Usage};
use crate::server::AppState;

#[derive(Deserialize)]
pub struct RerankRequest {
    model: String,
    query: String,
    documents: Vec<Value>,
    top_n: Option<usize>,
    #[serde(default)]
    return_documents: bool,
}

#[derive(Serialize)]
struct RerankResponse<'a> {
    id: String,
    model: &'a str,
    results: Vec<RerankResult>,
    usage: Usage,
}

#[derive(Serialize)]
struct RerankResult {
    index: usize,
    relevance_score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    document: Option<Document>,
}

#[derive(Serialize)]
struct Document {
    text: String,
}

pub async fn create(State(state): State<AppState>, Json(request): Json<RerankRequest>) -> Response {
    let (entry, served) = match ready_model(&state, &request.model, ModelKind::Rerank) {
        Ok(found) => found,
        Err(err) => return labelled(&state, &request.model, Err::<(), _>(err)),
    };
    let result = async {
        let Served::Rerank(reranker) = &*served else {
            return Err(ApiError::Internal { cause: "registry kind mismatch".into() });
        };
        if request.query.is_empty() {
            return Err(ApiError::invalid("`query` must not be empty", "query"));
        }
        if request.documents.is_empty() {
            return Err(ApiError::invalid("`documents` must not be empty", "documents"));
        }
        if request.top_n == Some(0) {
            return Err(ApiError::invalid("`top_n` must be at least 1", "top_n"));
        }
        let documents = document_texts(request.documents)?;
        let texts_for_response = request.return_documents.then(|| documents.clone());
        let scored = reranker.rerank(request.query, documents, Priority::Normal).await?;
        let mut ranked: Vec<(usize, f32)> = scored.scores.into_iter().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(request.top_n.unwrap_or(ranked.len()));
        let results = ranked
            .into_iter()
            .map(|(index, relevance_score)| RerankResult {
                index,
                relevance_score,
                document: texts_for_response.as_ref().map(|texts| Document { text: texts[index].clone() }),
            })
            .collect();
        Ok(axum::Json(RerankResponse {
            id: format!("rerank-{}", uuid::Uuid::new_v4().simple()),
            model: &entry.id,
            results,
            usage: Usage { prompt_tokens: scored.n_tokens, total_tokens: scored.n_tokens },
        }))
    }
    .await;
    labelled(&state, &request.model, result)
}

fn document_texts(documents: Vec<Value>) -> Result<Vec<String>, ApiError> {
    documents
        .into_iter()
        .enumerate()
        .map(|(i, document)| match document {
            Value::String(text) => Ok(text),
            Value::Object(mut fields) => match fields.remove("text") {
                Some(Value::String(text)) => Ok(text),
                _ => Err(ApiError::invalid(
                    format!("`documents[{i}]` is an object without a `text` string"),
                    "documents",
                )),
            },
            _ => Err(ApiError::invalid(
                format!("`documents[{i}]` must be a string or an object with a `text` string"),
                "documents",
            )),
        })
        .collect()
}
