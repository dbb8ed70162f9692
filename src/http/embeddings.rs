//! `POST /v1/embeddings`, OpenAI's shape: `input` as a string, strings, token ids or token-id arrays;
//! `encoding_format` `float` or `base64` (little-endian f32, what the official SDKs request by
//! default); optional `dimensions`.

use std::fmt;

use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use base64::Engine as _;
use hearth_engine::embed::{Embed, EmbedInput, Truncation};
use hearth_engine::registry::Served;
use hearth_engine::tokenize::TruncationSide;
use hearth_engine::ModelKind;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::json::Json;
use super::{labelled, ready_model, Usage};
use crate::auth::Caller;
use crate::state::AppState;

#[derive(Deserialize)]
pub struct EmbeddingsRequest {
    model: String,
    input: Input,
    #[serde(default)]
    encoding_format: EncodingFormat,
    dimensions: Option<usize>,
    /// TEI's per-request truncation: cut inputs over the model's limit instead of refusing them.
    truncate: Option<bool>,
    /// TEI's `Right` (keep the start, the default) or `Left` (keep the end); any case.
    truncation_direction: Option<String>,
    /// vLLM's: keep only the last N tokens (`-1`: the model's limit).
    truncate_prompt_tokens: Option<i64>,
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

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(request): Json<EmbeddingsRequest>,
) -> Response {
    let (entry, served) = match ready_model(&state, &request.model, ModelKind::Embedding).await {
        Ok(found) => found,
        Err(err) => return labelled(&state, &request.model, Err::<(), _>(err)),
    };
    let truncation = parse_truncation(
        request.truncate,
        request.truncation_direction.as_deref(),
        request.truncate_prompt_tokens,
    );
    let result = async {
        let Served::Embedding(embedder) = &*served else {
            return Err(ApiError::Internal { cause: "registry kind mismatch".into() });
        };
        let truncation = truncation?;
        let embeddings =
            embedder.embed_with(request.input.0, request.dimensions, truncation, caller.priority()).await?;
        caller.charge(embeddings.n_tokens);
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

/// The request's own truncation choice, if it makes one: TEI's `truncate` and
/// `truncation_direction`, or vLLM's `truncate_prompt_tokens` (the last N tokens), not both.
/// Shared with `/v1/rerank`.
pub(crate) fn parse_truncation(
    truncate: Option<bool>,
    direction: Option<&str>,
    prompt_tokens: Option<i64>,
) -> Result<Option<Truncation>, ApiError> {
    let side = match direction.map(str::to_ascii_lowercase).as_deref() {
        None | Some("right") => TruncationSide::Right,
        Some("left") => TruncationSide::Left,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("`truncation_direction` must be `Right` or `Left`, got `{other}`"),
                "truncation_direction",
            ))
        }
    };
    match (prompt_tokens, truncate) {
        (Some(_), _) if direction.is_some() => Err(ApiError::invalid(
            "`truncate_prompt_tokens` keeps the last tokens; it cannot be combined with `truncation_direction`",
            "truncate_prompt_tokens",
        )),
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "give either `truncate` (TEI) or `truncate_prompt_tokens` (vLLM), not both",
            "truncate_prompt_tokens",
        )),
        (Some(-1), None) => Ok(Some(Truncation { truncate: true, side: TruncationSide::Left, max_tokens: None })),
        (Some(n), None) if n >= 1 => Ok(Some(Truncation {
            truncate: true,
            side: TruncationSide::Left,
            max_tokens: Some(usize::try_from(n).unwrap_or(usize::MAX)),
        })),
        (Some(n), None) => Err(ApiError::invalid(
            format!("`truncate_prompt_tokens` must be -1 (the model's limit) or at least 1, got {n}"),
            "truncate_prompt_tokens",
        )),
        (None, Some(truncate)) => Ok(Some(Truncation { truncate, side, max_tokens: None })),
        (None, None) if direction.is_some() => Ok(Some(Truncation { truncate: true, side, max_tokens: None })),
        (None, None) => Ok(None),
    }
}

fn to_base64(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

const INPUT_SHAPES: &str =
    "`input` must be a string, an array of strings, an array of token ids, or an array of token-id arrays";

/// `input`, read straight from the JSON into one of its four shapes. Every item must have the shape
/// of the first; mistakes are named by position.
pub struct Input(pub EmbedInput);

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(InputVisitor)
    }
}

struct InputVisitor;

impl<'de> Visitor<'de> for InputVisitor {
    type Value = Input;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(INPUT_SHAPES)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Input, E> {
        Ok(Input(EmbedInput::Texts(vec![text.to_owned()])))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Input, E> {
        Ok(Input(EmbedInput::Texts(vec![text])))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Input, A::Error> {
        let unlike = |i: usize, what: &str| {
            de::Error::custom(format!("`input[{i}]` must be {what} like the other items"))
        };
        let input = match seq.next_element::<Item>()? {
            None => return Err(de::Error::custom("`input` must not be an empty array")),
            Some(Item::Text(first)) => {
                let mut texts = vec![first];
                while let Some(item) = seq.next_element::<Item>()? {
                    match item {
                        Item::Text(text) => texts.push(text),
                        _ => return Err(unlike(texts.len(), "a string")),
                    }
                }
                EmbedInput::Texts(texts)
            }
            Some(Item::Id(first)) => {
                let mut ids = vec![first];
                while let Some(item) = seq.next_element::<Item>()? {
                    match item {
                        Item::Id(id) => ids.push(id),
                        _ => return Err(unlike(ids.len(), "a token id")),
                    }
                }
                EmbedInput::TokenIds(vec![ids])
            }
            Some(Item::Ids(first)) => {
                let mut arrays = vec![first];
                while let Some(item) = seq.next_element::<Item>()? {
                    match item {
                        Item::Ids(ids) => arrays.push(ids),
                        _ => return Err(unlike(arrays.len(), "a token-id array")),
                    }
                }
                EmbedInput::TokenIds(arrays)
            }
        };
        Ok(Input(input))
    }
}

/// One item of an `input` array.
enum Item {
    Text(String),
    Id(u32),
    Ids(Vec<u32>),
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ItemVisitor)
    }
}

struct ItemVisitor;

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, a token id (a non-negative integer) or an array of token ids")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Item, E> {
        Ok(Item::Text(text.to_owned()))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Item, E> {
        Ok(Item::Text(text))
    }

    fn visit_u64<E: de::Error>(self, id: u64) -> Result<Item, E> {
        TokenIdVisitor.visit_u64(id).map(Item::Id)
    }

    fn visit_i64<E: de::Error>(self, id: i64) -> Result<Item, E> {
        TokenIdVisitor.visit_i64(id).map(Item::Id)
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Item, E> {
        TokenIdVisitor.visit_f64(value).map(Item::Id)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
        let mut ids = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(TokenId(id)) = seq.next_element()? {
            ids.push(id);
        }
        if ids.is_empty() {
            return Err(de::Error::custom("is an empty token array"));
        }
        Ok(Item::Ids(ids))
    }
}

struct TokenId(u32);

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TokenIdVisitor).map(TokenId)
    }
}

struct TokenIdVisitor;

impl Visitor<'_> for TokenIdVisitor {
    type Value = u32;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a token id (a non-negative integer below 2^32)")
    }

    fn visit_u64<E: de::Error>(self, id: u64) -> Result<u32, E> {
        u32::try_from(id).map_err(|_| E::custom(format!("token id {id} is not below 2^32")))
    }

    fn visit_i64<E: de::Error>(self, id: i64) -> Result<u32, E> {
        u64::try_from(id)
            .map_err(|_| E::custom(format!("must be a token id (a non-negative integer), got {id}")))
            .and_then(|id| self.visit_u64(id))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<u32, E> {
        Err(E::custom(format!("must be a token id (a non-negative integer), got {value}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<EmbedInput, String> {
        serde_json::from_str::<Input>(json).map(|input| input.0).map_err(|e| e.to_string())
    }

    fn texts(json: &str) -> Vec<String> {
        match parse(json).unwrap() {
            EmbedInput::Texts(t) => t,
            EmbedInput::TokenIds(_) => panic!("expected texts"),
        }
    }

    fn ids(json: &str) -> Vec<Vec<u32>> {
        match parse(json).unwrap() {
            EmbedInput::TokenIds(t) => t,
            EmbedInput::Texts(_) => panic!("expected token ids"),
        }
    }

    #[test]
    fn every_input_shape() {
        assert_eq!(texts(r#""a""#), ["a"]);
        assert_eq!(texts(r#"["a", "b"]"#), ["a", "b"]);
        assert_eq!(ids("[1, 2, 3]"), [vec![1, 2, 3]]);
        assert_eq!(ids("[[1], [2, 3]]"), [vec![1], vec![2, 3]]);
    }

    #[test]
    fn bad_inputs_say_what_is_wrong() {
        for (json, expected) in [
            ("[]", "empty array"),
            (r#"["a", 1]"#, "`input[1]` must be a string"),
            ("[1, -2]", "got -2"),
            ("[1, 2.5]", "got 2.5"),
            ("[[1], []]", "empty token array"),
            ("[[1], [4294967296]]", "not below 2^32"),
            ("[[1], 2]", "`input[1]` must be a token-id array"),
            (r#"{"text": "a"}"#, "must be a string"),
            ("null", "must be a string"),
            ("[null]", "a string, a token id"),
            ("5", "must be a string"),
        ] {
            let err = parse(json).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(to_base64(&[1.0, -2.0]), "AACAPwAAAMA=");
    }
}
