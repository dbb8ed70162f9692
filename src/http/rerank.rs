//! `POST /v1/rerank` (and `/rerank`): the Cohere and Jina request shape — `query`, `documents` as
//! strings or `{"text": …}` objects, `top_n`, `return_documents` — answered with `results` sorted
//! by `relevance_score`, highest first.

use std::fmt;

use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use hearth_engine::registry::Served;
use hearth_engine::rerank::Rerank;
use hearth_engine::ModelKind;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::embeddings::parse_truncation;
use super::error::ApiError;
use super::json::Json;
use super::{labelled, ready_model, Usage};
use crate::auth::Caller;
use crate::state::AppState;

#[derive(Deserialize)]
pub struct RerankRequest {
    model: String,
    query: String,
    documents: Vec<DocumentText>,
    top_n: Option<usize>,
    #[serde(default)]
    return_documents: bool,
    /// TEI's per-request truncation of documents (the query is never cut).
    truncate: Option<bool>,
    truncation_direction: Option<String>,
    /// vLLM's: at most N tokens per (query, document) pair, the document's end kept.
    truncate_prompt_tokens: Option<i64>,
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

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(request): Json<RerankRequest>,
) -> Response {
    let (entry, served) = match ready_model(&state, &request.model, ModelKind::Rerank).await {
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
        let truncation = parse_truncation(
            request.truncate,
            request.truncation_direction.as_deref(),
            request.truncate_prompt_tokens,
        )?;
        let documents: Vec<String> = request.documents.into_iter().map(|d| d.0).collect();
        let texts_for_response = request.return_documents.then(|| documents.clone());
        let scored = reranker.rerank_with(request.query, documents, truncation, caller.priority()).await?;
        caller.charge(scored.n_tokens);
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

/// A document: a string, or an object with a `text` string (other fields, as Cohere's structured
/// documents have, are ignored).
#[derive(Debug)]
struct DocumentText(String);

impl<'de> Deserialize<'de> for DocumentText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DocumentVisitor)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = DocumentText;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or an object with a `text` string")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<DocumentText, E> {
        Ok(DocumentText(text.to_owned()))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<DocumentText, E> {
        Ok(DocumentText(text))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DocumentText, A::Error> {
        let mut text = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "text" {
                text = Some(map.next_value::<String>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        text.map(DocumentText).ok_or_else(|| de::Error::custom("is an object without a `text` string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_strings_or_objects_with_text() {
        let parse = |json: &str| serde_json::from_str::<Vec<DocumentText>>(json).map_err(|e| e.to_string());
        let docs = parse(r#"["a", {"text": "b", "title": "ignored"}]"#).unwrap();
        assert_eq!(docs.into_iter().map(|d| d.0).collect::<Vec<_>>(), ["a", "b"]);
        assert!(parse(r#"[{"title": "x"}]"#).unwrap_err().contains("without a `text` string"));
        assert!(parse(r#"[{"text": 5}]"#).unwrap_err().contains("invalid type"));
        assert!(parse("[5]").unwrap_err().contains("a string or an object"));
    }
}
