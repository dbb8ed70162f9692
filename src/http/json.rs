//! A JSON body extractor whose failures are OpenAI-shaped: malformed JSON and wrong field types are
//! 400s naming the field, a body over the limit is 413, and anything but a JSON `Content-Type` is
//! 415, before the body is read. Only `application/json` (or `…+json`) is accepted: a web page can
//! make a browser send form, text or untyped bodies to any address without asking first (no CORS
//! preflight), and none of those must reach a model.

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
        let Some(content_type) = request.headers().get(CONTENT_TYPE) else {
            return Err(ApiError::UnsupportedMediaType { content_type: None });
        };
        let text = String::from_utf8_lossy(content_type.as_bytes()).into_owned();
        let essence = text.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let is_json = essence == "application/json"
            || (essence.starts_with("application/") && essence.ends_with("+json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType { content_type: Some(text) });
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
                // `param` names the top-level field; the message has the full path.
                let param = (path != ".").then(|| path.split(['.', '[']).next().unwrap_or("").to_string());
                let message = match &param {
                    Some(_) => format!("Invalid value for `{path}`: {inner}"),
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
