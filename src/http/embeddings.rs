//! `POST /v1/embeddings`, OpenAI's shape: `input` as a string, strings, token ids or token-id arrays;
//! `encoding_format` `float` or `base64` (little-endian f32, what the official SDKs request by
//! default); optional `dimensions`.

use axum::extract::State;
use axum::response::Response;
use base64::Engine as _;
use hearth_engine::embed::EmbedInput;
use hearth_engine::registry::Served;
use hearth_engine::{ModelKind, Priority};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use super::json::Json;
use super::{labelled, ready_model, Usage};
use crate::server::AppState;

#[derive(Deserialize)]
pub struct EmbeddingsRequest {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: EncodingFormat,
    dimensions: Option<usize>,
    /// Accepted for compatibility; not used.
    #[allow(dead_code)]
    user: Option<String>,
}

#[derive(Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

#[derive(Serialize)]
struct EmbeddingsResponse<'a> {
    object: &'static str,
    data: Vec<EmbeddingObject>,
    model: &'a str,
    usage: Usage,
}

#[derive(Serialize)]
struct EmbeddingObject {
    object: &'static str,
    index: usize,
    embedding: EmbeddingValue,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

pub async fn create(State(state): State<AppState>, Json(request): Json<EmbeddingsRequest>) -> Response {
    let (entry, served) = match ready_model(&state, &request.model, ModelKind::Embedding) {
        Ok(found) => found,
        Err(err) => return labelled(&state, &request.model, Err::<(), _>(err)),
    };
    let result = async {
        let Served::Embedding(embedder) = &*served else {
            return Err(ApiError::Internal { cause: "registry kind mismatch".into() });
        };
        let input = parse_input(request.input)?;
        let embeddings = embedder.embed(input, request.dimensions, Priority::Normal).await?;
        let data = embeddings
            .vectors
            .into_iter()
            .enumerate()
            .map(|(index, vector)| EmbeddingObject {
                object: "embedding",
                index,
                embedding: match request.encoding_format {
                    EncodingFormat::Float => EmbeddingValue::Float(vector),
                    EncodingFormat::Base64 => EmbeddingValue::Base64(to_base64(&vector)),
                },
            })
            .collect();
        let usage = Usage { prompt_tokens: embeddings.n_tokens, total_tokens: embeddings.n_tokens };
        Ok(axum::Json(EmbeddingsResponse { object: "list", data, model: &entry.id, usage }))
    }
    .await;
    labelled(&state, &request.model, result)
}

fn to_base64(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

const INPUT_SHAPES: &str =
    "`input` must be a string, an array of strings, an array of token ids, or an array of token-id arrays";

/// Classifies `input` by hand so each mistake gets a precise message.
pub fn parse_input(input: Value) -> Result<EmbedInput, ApiError> {
    let items = match input {
        Value::String(text) => return Ok(EmbedInput::Texts(vec![text])),
        Value::Array(items) => items,
        _ => return Err(ApiError::invalid(INPUT_SHAPES, "input")),
    };
    let Some(first) = items.first() else {
        return Err(ApiError::invalid("`input` must not be an empty array", "input"));
    };
    match first {
        Value::String(_) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(text) => Ok(text),
                _ => Err(ApiError::invalid(
                    format!("`input[{i}]` must be a string like the other items"),
                    "input",
                )),
            })
            .collect::<Result<_, _>>()
            .map(EmbedInput::Texts),
        Value::Number(_) => token_ids(&items, "input").map(|ids| EmbedInput::TokenIds(vec![ids])),
        Value::Array(_) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Array(ids) if !ids.is_empty() => token_ids(ids, &format!("input[{i}]")),
                Value::Array(_) => {
                    Err(ApiError::invalid(format!("`input[{i}]` is an empty token array"), "input"))
                }
                _ => Err(ApiError::invalid(
                    format!("`input[{i}]` must be a token-id array like the other items"),
                    "input",
                )),
            })
            .collect::<Result<_, _>>()
            .map(EmbedInput::TokenIds),
        _ => Err(ApiError::invalid(INPUT_SHAPES, "input")),
    }
}

fn token_ids(items: &[Value], path: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
                ApiError::invalid(
                    format!("`{path}[{i}]` must be a token id (a non-negative integer), got {item}"),
                    "input",
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn texts(v: Value) -> Vec<String> {
        match parse_input(v).unwrap() {
            EmbedInput::Texts(t) => t,
            EmbedInput::TokenIds(_) => panic!("expected texts"),
        }
    }

    fn ids(v: Value) -> Vec<Vec<u32>> {
        match parse_input(v).unwrap() {
            EmbedInput::TokenIds(t) => t,
            EmbedInput::Texts(_) => panic!("expected token ids"),
        }
    }

    fn error(v: Value) -> String {
        match parse_input(v) {
            Err(ApiError::InvalidRequest { message, .. }) => message,
            Err(other) => panic!("unexpected {other:?}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn every_input_shape() {
        assert_eq!(texts(json!("a")), ["a"]);
        assert_eq!(texts(json!(["a", "b"])), ["a", "b"]);
        assert_eq!(ids(json!([1, 2, 3])), [vec![1, 2, 3]]);
        assert_eq!(ids(json!([[1], [2, 3]])), [vec![1], vec![2, 3]]);
    }

    #[test]
    fn bad_inputs_say_what_is_wrong() {
        assert!(error(json!([])).contains("empty array"));
        assert!(error(json!(["a", 1])).contains("input[1]"));
        assert!(error(json!([1, -2])).contains("input[1]"));
        assert!(error(json!([1, 2.5])).contains("input[1]"));
        assert!(error(json!([[1], []])).contains("empty token array"));
        assert!(error(json!([[1], [4294967296u64]])).contains("input[1][0]"));
        assert!(error(json!({"text": "a"})).contains("must be a string"));
        assert!(error(json!(null)).contains("must be a string"));
        assert!(error(json!([null])).contains("must be a string"));
    }

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(to_base64(&[1.0, -2.0]), "AACAPwAAAMA=");
    }
}
