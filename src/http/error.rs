//! The one API error type. Every failure a client can see is a variant here; [`ApiError::status`]
//! is the single table from variant to HTTP status, and the body is always OpenAI's
//! `{"error": {"message", "type", "param", "code"}}`. Internal causes are logged, not returned.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hearth_engine::{EngineError, ModelKind, Subject};
use serde::Serialize;

use crate::auth::{LimitKind, Limited, Quota};

/// How long a client should wait before retrying a model that is still loading.
const LOADING_RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub enum ApiError {
    /// The request is malformed or breaks a limit (400).
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// The prompt does not fit the model's context (400, OpenAI's `context_length_exceeded`).
    ContextLengthExceeded {
        message: String,
        param: &'static str,
    },
    /// A request field Hearth does not support (400, `unsupported_parameter`).
    Unsupported {
        message: String,
        param: String,
    },
    /// An upload that is not usable audio (400, `param: file`); `code` names the problem
    /// (`corrupt_audio`, `audio_too_long`, …).
    InvalidAudio {
        message: String,
        code: &'static str,
    },
    /// A body that is not JSON (415); `None`: no `Content-Type` at all.
    UnsupportedMediaType {
        content_type: Option<String>,
    },
    /// An upload route's body that is not `multipart/form-data` (415).
    NotMultipart {
        content_type: Option<String>,
    },
    /// A `Host` that is not this server's, while it listens on loopback (DNS rebinding, 403).
    HostNotAllowed {
        host: String,
    },
    /// The body is larger than `server.max_request_body_bytes` (413).
    PayloadTooLarge {
        limit: usize,
    },
    UnknownRoute {
        method: String,
        path: String,
    },
    MethodNotAllowed {
        method: String,
        path: String,
    },
    ModelNotFound {
        model: String,
    },
    /// A file, vector store or batch that does not exist (404); `param` names the path part.
    NotFound {
        message: String,
        param: &'static str,
    },
    /// Files and vector stores without a `[rag]` section (404).
    RagDisabled,
    /// The model exists but serves another endpoint.
    WrongModelKind {
        model: Arc<str>,
        kind: ModelKind,
        expected: ModelKind,
    },
    /// The model is still loading, or failed to load.
    ModelNotReady {
        model: Arc<str>,
        failed: bool,
    },
    Overloaded {
        message: String,
        retry_after: Duration,
    },
    /// A browser page's `Origin` that the CORS settings do not allow, on a form route (403).
    OriginNotAllowed {
        origin: String,
    },
    /// An admin endpoint without an admin key, or on an open server off loopback (403).
    AdminOnly {
        keys: bool,
    },
    /// No API key in `Authorization: Bearer` or `x-api-key` (401).
    MissingApiKey,
    /// A key that is not configured (401). The message never repeats it.
    InvalidApiKey,
    /// The key's requests- or tokens-per-minute limit (429).
    RateLimited {
        key: Arc<str>,
        limited: Limited,
    },
    ShuttingDown,
    /// The response did not start within the route's `request_timeout_secs` (504).
    Timeout {
        limit: Duration,
    },
    /// Anything else; `cause` goes to the log only.
    Internal {
        cause: String,
    },
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<String>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<String>) -> Self {
        Self::InvalidRequest { message: message.into(), param: Some(param.into()) }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. }
            | Self::InvalidAudio { .. }
            | Self::WrongModelKind { .. }
            | Self::ContextLengthExceeded { .. }
            | Self::Unsupported { .. } => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType { .. } | Self::NotMultipart { .. } => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            Self::HostNotAllowed { .. } | Self::AdminOnly { .. } | Self::OriginNotAllowed { .. } => {
                StatusCode::FORBIDDEN
            }
            Self::MissingApiKey | Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnknownRoute { .. }
            | Self::ModelNotFound { .. }
            | Self::NotFound { .. }
            | Self::RagDisabled => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Overloaded { .. } | Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::ModelNotReady { .. } | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn kind(&self) -> &'static str {
        if let Self::RateLimited { limited, .. } = self {
            // OpenAI names the limit that was hit: `requests` or `tokens`.
            return limited.kind.as_str();
        }
        match self.status() {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            status if status.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            Self::InvalidRequest { .. } | Self::UnsupportedMediaType { .. } | Self::NotMultipart { .. } => {
                None
            }
            Self::InvalidAudio { code, .. } => Some(code),
            Self::HostNotAllowed { .. } => Some("host_not_allowed"),
            Self::OriginNotAllowed { .. } => Some("origin_not_allowed"),
            Self::ContextLengthExceeded { .. } => Some("context_length_exceeded"),
            Self::Unsupported { .. } => Some("unsupported_parameter"),
            Self::PayloadTooLarge { .. } => Some("request_too_large"),
            Self::UnknownRoute { .. } => Some("unknown_url"),
            Self::MethodNotAllowed { .. } => Some("method_not_allowed"),
            Self::ModelNotFound { .. } => Some("model_not_found"),
            Self::NotFound { .. } => Some("not_found"),
            Self::RagDisabled => Some("rag_disabled"),
            Self::WrongModelKind { .. } => Some("model_kind_mismatch"),
            Self::ModelNotReady { failed: false, .. } => Some("model_loading"),
            Self::ModelNotReady { failed: true, .. } => Some("model_failed"),
            Self::Overloaded { .. } => Some("model_overloaded"),
            Self::MissingApiKey => None,
            Self::AdminOnly { .. } => Some("admin_key_required"),
            Self::InvalidApiKey => Some("invalid_api_key"),
            Self::RateLimited { .. } => Some("rate_limit_exceeded"),
            Self::ShuttingDown => Some("shutting_down"),
            Self::Internal { .. } => Some("internal_error"),
            Self::Timeout { .. } => Some("request_timeout"),
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            Self::InvalidRequest { param, .. } => param.clone(),
            Self::ContextLengthExceeded { param, .. } => Some(param.to_string()),
            Self::Unsupported { param, .. } => Some(param.clone()),
            Self::InvalidAudio { .. } => Some("file".into()),
            Self::NotFound { param, .. } => Some(param.to_string()),
            Self::ModelNotFound { .. } | Self::WrongModelKind { .. } => Some("model".into()),
            _ => None,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::InvalidRequest { message, .. }
            | Self::Overloaded { message, .. }
            | Self::ContextLengthExceeded { message, .. }
            | Self::InvalidAudio { message, .. }
            | Self::NotFound { message, .. }
            | Self::Unsupported { message, .. } => message.clone(),
            Self::RagDisabled => {
                "Files and vector stores are not enabled on this server: add a `[rag]` section \
                                  to its config"
                    .into()
            }
            Self::NotMultipart { content_type } => format!(
                "{} is not supported here; send the file as `multipart/form-data` (the OpenAI SDKs do)",
                match content_type {
                    Some(content_type) => format!("Content-Type `{content_type}`"),
                    None => "A request without a Content-Type".into(),
                }
            ),
            Self::UnsupportedMediaType { content_type: Some(content_type) } => {
                format!(
                    "Content-Type `{content_type}` is not supported; send `Content-Type: application/json`"
                )
            }
            Self::UnsupportedMediaType { content_type: None } => {
                "The request has no Content-Type; send `Content-Type: application/json`".into()
            }
            Self::HostNotAllowed { host } => format!(
                "Host `{host}` is not allowed: this server answers its loopback names and IP addresses, and \
                 the hosts in `server.allowed_hosts`"
            ),
            Self::PayloadTooLarge { limit } => {
                format!("The request body is larger than this server's limit of {limit} bytes")
            }
            Self::OriginNotAllowed { origin } => format!(
                "Requests from web pages at `{origin}` are not allowed: add the origin to \
                 `server.cors_allowed_origins` to let that page use this server"
            ),
            Self::UnknownRoute { method, path } => format!("Invalid URL ({method} {path})"),
            Self::MethodNotAllowed { method, path } => format!("Method {method} is not allowed on {path}"),
            Self::ModelNotFound { model } => format!("The model `{model}` does not exist"),
            Self::WrongModelKind { model, kind, expected } => {
                format!("The model `{model}` has kind `{kind}`; this endpoint serves `{expected}` models")
            }
            Self::ModelNotReady { model, failed: false } => {
                format!("The model `{model}` is still loading; retry shortly")
            }
            Self::ModelNotReady { model, failed: true } => {
                format!("The model `{model}` is unavailable: it failed (see the server log) and may be restarting")
            }
            Self::MissingApiKey => "You didn't provide an API key. Send it in an Authorization header using \
                                    Bearer auth (`Authorization: Bearer YOUR_KEY`) or in `x-api-key`"
                .into(),
            Self::InvalidApiKey => "Incorrect API key provided".into(),
            Self::AdminOnly { keys: true } => {
                "Loading and unloading models needs an API key with `admin = true`".into()
            }
            Self::AdminOnly { keys: false } => {
                "Loading and unloading models needs an admin API key when the \
                                                server listens beyond loopback; configure `[auth]` keys"
                    .into()
            }
            Self::RateLimited { key, limited } => {
                let per_minute = match limited.kind {
                    LimitKind::Requests => "requests per min (RPM)",
                    LimitKind::Tokens => "tokens per min (TPM)",
                };
                format!(
                    "Rate limit reached for key `{key}` on {per_minute}: Limit {}. Please try again in {}.",
                    limited.limit,
                    reset_text(limited.retry_after)
                )
            }
            Self::ShuttingDown => "The server is shutting down".into(),
            Self::Timeout { limit } => format!(
                "The request did not finish within this route's time limit of {} s (`request_timeout_secs`)",
                limit.as_secs_f64()
            ),
            Self::Internal { .. } => "The server had an error while processing your request".into(),
        }
    }
}

impl ApiError {
    /// Names `param` as the prompt's field (`messages` for chat, `prompt` for completions).
    pub fn for_prompt(self, param: &'static str) -> Self {
        match self {
            Self::ContextLengthExceeded { message, .. } => Self::ContextLengthExceeded { message, param },
            other => other,
        }
    }
}

impl ApiError {
    /// `{"error": {...}}`, logging the cause of a 5xx.
    fn body(&self) -> Body<'_> {
        if let Self::Internal { cause } = self {
            tracing::error!(%cause, "internal error");
        }
        Body {
            error: Detail {
                message: self.message(),
                kind: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        }
    }

    /// The error as one server-sent event's data, for a failure in the middle of a stream.
    pub fn stream_body(&self) -> serde_json::Value {
        serde_json::to_value(self.body()).unwrap_or_default()
    }
}

impl ApiError {
    /// When a client may retry, if it may.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Overloaded { retry_after, .. } => Some(*retry_after),
            Self::RateLimited { limited, .. } => Some(limited.retry_after),
            Self::ModelNotReady { failed: false, .. } => Some(LOADING_RETRY_AFTER),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        if let Some(wait) = self.retry_after() {
            // Whole seconds, rounded up, at least one.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        match &self {
            Self::RateLimited { limited, .. } => insert_quota(headers, &limited.quota),
            Self::MissingApiKey | Self::InvalidApiKey => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

/// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers, for the limits a key has.
pub fn insert_quota(headers: &mut HeaderMap, quota: &Quota) {
    for (kind, status) in [("requests", quota.requests), ("tokens", quota.tokens)] {
        let Some(status) = status else { continue };
        for (what, value) in [
            ("limit", status.limit.to_string()),
            ("remaining", status.remaining.to_string()),
            ("reset", reset_text(status.reset)),
        ] {
            if let (Ok(name), Ok(value)) =
                (HeaderName::try_from(format!("x-ratelimit-{what}-{kind}")), HeaderValue::try_from(value))
            {
                headers.insert(name, value);
            }
        }
    }
}

/// A duration as OpenAI writes resets: `250ms`, `1.5s`, `6m0s`.
pub fn reset_text(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let seconds = duration.as_secs_f64();
    if seconds < 60.0 {
        let text = format!("{seconds:.3}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        return format!("{text}s");
    }
    let whole = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    let (h, m, s) = (whole / 3_600, whole / 60 % 60, whole % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else {
        format!("{m}m{s}s")
    }
}

fn subject_param(subject: Subject) -> String {
    match subject {
        Subject::Input(_) => "input".into(),
        Subject::Query => "query".into(),
        Subject::Document(_) => "documents".into(),
    }
}

impl From<hearth_rag::RagError> for ApiError {
    fn from(err: hearth_rag::RagError) -> Self {
        use hearth_rag::RagError;
        let message = err.to_string();
        match err {
            RagError::NotFound { what, id } => Self::NotFound {
                message: format!("No such {what}: `{id}`"),
                param: match what {
                    "file" | "file in this vector store" => "file_id",
                    "file batch" => "batch_id",
                    _ => "vector_store_id",
                },
            },
            RagError::Invalid { param, message } => {
                Self::InvalidRequest { message, param: Some(param.into()) }
            }
            RagError::Unsupported(message) => Self::InvalidRequest { message, param: Some("file".into()) },
            RagError::DimensionMismatch { .. } => Self::InvalidRequest {
                message: format!(
                    "{message}: the store was filled by another embedding model ([rag] embedding_model)"
                ),
                param: Some("vector_store_id".into()),
            },
            RagError::Closed => Self::ShuttingDown,
            other => Self::Internal { cause: other.to_string() },
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        let message = err.to_string();
        match err {
            EngineError::EmptyInput { subject }
            | EngineError::InputTooLong { subject, .. }
            | EngineError::TokenOutOfRange { subject, .. }
            | EngineError::Tokenize { subject, .. } => {
                Self::InvalidRequest { message, param: Some(subject_param(subject)) }
            }
            EngineError::TooManyTokens { .. } => Self::InvalidRequest { message, param: None },
            EngineError::TooManyOutputTokens { .. } => Self::invalid(message, "max_tokens"),
            EngineError::ContextLengthExceeded { .. } => {
                Self::ContextLengthExceeded { message, param: "messages" }
            }
            EngineError::TemplateRefused { .. } => Self::invalid(message, "messages"),
            EngineError::NoChatTemplate { .. } => Self::invalid(message, "model"),
            EngineError::TooManyInputs { what, .. } => Self::InvalidRequest {
                message,
                param: Some(if what == "documents" { "documents" } else { "input" }.into()),
            },
            EngineError::InvalidDimensions { .. } => Self::invalid(message, "dimensions"),
            EngineError::InvalidInput { param, .. } => Self::invalid(message, param),
            EngineError::Overloaded { reason, .. } => {
                Self::Overloaded { message, retry_after: reason.retry_after() }
            }
            EngineError::PreprocessingBusy { .. } => {
                Self::Overloaded { message, retry_after: Duration::from_secs(1) }
            }
            EngineError::Audio(hearth_audio::AudioError::Encode { .. }) => Self::Internal { cause: message },
            EngineError::Audio(audio) => Self::InvalidAudio { message, code: audio.code() },
            EngineError::ShuttingDown { .. } => Self::ShuttingDown,
            EngineError::ModelFailed { model } => Self::ModelNotReady { model, failed: true },
            EngineError::Backend { .. } | EngineError::Internal { .. } => Self::Internal { cause: message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_are_written_as_openai_writes_them() {
        assert_eq!(reset_text(Duration::from_millis(17)), "17ms");
        assert_eq!(reset_text(Duration::from_secs(1)), "1s");
        assert_eq!(reset_text(Duration::from_millis(1_500)), "1.5s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
        assert_eq!(reset_text(Duration::from_millis(61_200)), "1m2s");
        assert_eq!(reset_text(Duration::from_secs(3_725)), "1h2m5s");
    }
}
