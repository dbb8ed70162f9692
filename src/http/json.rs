//! A JSON body extractor whose failures are OpenAI-shaped: malformed JSON and wrong field types are
//! 400s naming the field, a body over the limit is 413, a non-JSON content type is 415. A missing
//! `Content-Type`, and curl's default for `-d` (`application/x-www-form-urlencoded`), are read as
//! JSON, so a bare `curl -d '{…}'` works.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if let Some(content_type) = request.headers().get(CONTENT_TYPE) {
            let text = content_type.to_str().unwrap_or("");
            let essence = text.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            let json_like = essence == "application/json"
                || essence.ends_with("+json")
                || essence == "application/x-www-form-urlencoded";
            if !json_like {
                return Err(ApiError::UnsupportedMediaType { content_type: text.into() });
            }
        }
        let limit_hint = request.extensions().get::<BodyLimit>().map(|l| l.0);
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit: limit_hint.unwrap_or(0) }
            } else {
                ApiError::InvalidRequest {
                    message: format!("could not read the request body: {rejection}"),
                    param: None,
                }
            }
        })?;
        parse(&bytes).map(Json)
    }
}

/// The configured body limit, put in request extensions so 413 messages can state it.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would read a top-level array positionally into a struct; requests are objects.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::InvalidRequest {
            message: "We could not parse the JSON body of your request: it must be one JSON object".into(),
            param: None,
        });
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let param = (path != ".").then(|| path.clone());
                let message = match &param {
                    Some(p) => format!("Invalid value for `{p}`: {inner}"),
                    None => format!("Invalid request body: {inner}"),
                };
                ApiError::InvalidRequest { message, param }
            }
            _ => ApiError::InvalidRequest {
                message: format!(
                    "We could not parse the JSON body of your request ({inner}). The body must be one JSON object."
                ),
                param: None,
            },
        }
    })?;
    deserializer.end().map_err(|e| ApiError::InvalidRequest {
        message: format!("We could not parse the JSON body of your request: {e}"),
        param: None,
    })?;
    Ok(value)
}
