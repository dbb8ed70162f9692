//! `GET /v1/models` and `GET /v1/models/{id}`: OpenAI's model objects plus Hearth's `kind` and load
//! `state` (and, once loaded, what the model accepts and returns).

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use hearth_engine::generate::service::Generate;
use hearth_engine::registry::{LoadState, ModelEntry, Served};
use serde::Serialize;

use super::error::ApiError;
use crate::state::AppState;

#[derive(Serialize)]
pub struct ModelObject {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    kind: &'static str,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_input_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scoring: Option<&'static str>,
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

pub fn describe(entry: &ModelEntry) -> ModelObject {
    let state = entry.state();
    let mut object = ModelObject {
        id: entry.id.to_string(),
        object: "model",
        created: entry.created,
        owned_by: "hearth",
        kind: entry.kind.as_str(),
        state: state.as_str(),
        dimensions: None,
        max_input_tokens: None,
        scoring: None,
    };
    if let LoadState::Ready(served) = state {
        match &*served {
            Served::Llm(generator) => {
                object.max_input_tokens = Some(generator.context_length());
            }
            Served::Stt(_) | Served::Tts(_) => {}
            Served::Embedding(embedder) => {
                object.dimensions = Some(embedder.info().dims);
                object.max_input_tokens = Some(embedder.limits().length.max_tokens);
            }
            Served::Rerank(reranker) => {
                object.max_input_tokens = Some(reranker.limits().length.max_tokens);
                object.scoring = Some(reranker.scoring().as_str());
            }
        }
    }
    object
}

pub async fn list(State(state): State<AppState>) -> Response {
    let data = state.registry.entries().iter().map(|e| describe(e)).collect();
    axum::Json(ModelList { object: "list", data }).into_response()
}

pub async fn retrieve(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.registry.get(&id) {
        Some(entry) => axum::Json(describe(&entry)).into_response(),
        None => ApiError::ModelNotFound { model: id }.into_response(),
    }
}
