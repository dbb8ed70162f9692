//! The HTTP API: one module per endpoint family, assembled into one router with request ids,
//! tracing, per-route metrics, the `Host` check, CORS, per-route admission, a body limit and
//! OpenAI-shaped errors for everything.

pub mod admin;
pub mod audio;
pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod error;
pub mod files;
pub mod generation;
pub mod guard;
pub mod health;
pub mod json;
pub mod models;
pub mod rerank;
pub mod speech;
pub mod vector_stores;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use hearth_engine::registry::{ModelEntry, Served};
use hearth_engine::ModelKind;
use serde::Serialize;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use self::error::ApiError;
use self::guard::{HostPolicy, RouteLimit};
use self::json::BodyLimit;
use crate::config::ServerConfig;
use crate::lifecycle::Unavailable;
use crate::state::AppState;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// The served model a response is about; read by the metrics middleware for its `model` label.
/// Only configured ids are ever set, so clients cannot inflate label cardinality.
#[derive(Clone)]
struct ModelLabel(Arc<str>);

/// Finds `id`, checks it serves `expected`, and returns it loaded: at once if it is, after loading
/// it if it was unloaded (see [`crate::lifecycle`]).
pub async fn ready_model(
    state: &AppState,
    id: &str,
    expected: ModelKind,
) -> Result<(Arc<ModelEntry>, Arc<Served>), ApiError> {
    let entry = state.registry.get(id).ok_or_else(|| ApiError::ModelNotFound { model: id.into() })?;
    if entry.kind != expected {
        return Err(ApiError::WrongModelKind { model: Arc::clone(&entry.id), kind: entry.kind, expected });
    }
    match state.lifecycle.acquire(&entry).await {
        Ok(served) => Ok((Arc::clone(&entry), served)),
        Err(Unavailable::StillLoading) => {
            Err(ApiError::ModelNotReady { model: Arc::clone(&entry.id), failed: false })
        }
        Err(Unavailable::Failed) => {
            Err(ApiError::ModelNotReady { model: Arc::clone(&entry.id), failed: true })
        }
        Err(Unavailable::NoRoom { budget }) => Err(ApiError::Overloaded {
            message: format!(
                "model `{}` cannot be loaded now: the models' memory budget ({:.1} MiB, \
                 `models_memory_mib`) is held by models with requests in flight; retry later",
                entry.id,
                budget as f64 / 1_048_576.0
            ),
            retry_after: std::time::Duration::from_secs(1),
        }),
    }
}

/// A handler's result as a response tagged with the model it concerned, if that model is configured.
pub fn labelled(state: &AppState, model: &str, result: Result<impl IntoResponse, ApiError>) -> Response {
    let mut response = result.into_response();
    if let Some(entry) = state.registry.get(model) {
        response.extensions_mut().insert(ModelLabel(Arc::clone(&entry.id)));
    }
    response
}

pub fn router(state: AppState) -> Router {
    let server = &state.config.server;
    let body_limit = server.max_request_body_bytes;
    let cors = cors_layer(&server.cors_allowed_origins);
    let hosts = HostPolicy::new(server);
    // Each model route's own limits, outermost first: requests in flight (before the body is
    // read), the time until the response starts, the body size.
    fn limited<H, T>(server: &ServerConfig, route: &'static str, handler: H) -> MethodRouter<AppState>
    where
        H: axum::handler::Handler<T, AppState>,
        T: 'static,
    {
        let limits = server.route(route);
        let mut method: MethodRouter<AppState> = post(handler)
            .layer::<_, std::convert::Infallible>(axum::Extension(BodyLimit(limits.max_request_body_bytes)))
            .layer(DefaultBodyLimit::max(limits.max_request_body_bytes));
        if let Some(timeout) = limits.request_timeout {
            method = method.layer(middleware::from_fn_with_state(timeout, guard::time_limit));
        }
        method.layer(middleware::from_fn_with_state(
            RouteLimit::new(route, limits.max_concurrent_requests),
            guard::limit_route,
        ))
    }
    // Everything but the probes needs a key when keys are configured (`/metrics` too, if asked).
    let mut keyed = Router::new()
        .route("/v1/chat/completions", limited(server, "/v1/chat/completions", chat::create))
        .route("/v1/completions", limited(server, "/v1/completions", completions::create))
        .route("/v1/embeddings", limited(server, "/v1/embeddings", embeddings::create))
        .route("/v1/rerank", limited(server, "/v1/rerank", rerank::create))
        .route("/rerank", limited(server, "/rerank", rerank::create))
        .route("/v1/audio/transcriptions", limited(server, "/v1/audio/transcriptions", audio::transcriptions))
        .route("/v1/audio/translations", limited(server, "/v1/audio/translations", audio::translations))
        .route("/v1/audio/speech", limited(server, "/v1/audio/speech", speech::create))
        .route("/v1/audio/voices", get(speech::voices))
        .route("/v1/models", get(models::list))
        // Ids may contain `/` (`org/name`), sent raw or percent-encoded.
        .route("/v1/models/{*id}", get(models::retrieve))
        .route("/admin/models/{*action}", post(admin::act))
        .route("/v1/files", get(files::list_files).merge(upload_route(&state)))
        .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/vector_stores", get(vector_stores::list_stores).post(vector_stores::create))
        .route(
            "/v1/vector_stores/{id}",
            get(vector_stores::retrieve).post(vector_stores::update).delete(vector_stores::delete),
        )
        .route("/v1/vector_stores/{id}/files", get(vector_stores::list_files).post(vector_stores::add_file))
        .route(
            "/v1/vector_stores/{id}/files/{file_id}",
            get(vector_stores::retrieve_file)
                .post(vector_stores::update_file)
                .delete(vector_stores::delete_file),
        )
        .route("/v1/vector_stores/{id}/file_batches", post(vector_stores::create_batch))
        .route("/v1/vector_stores/{id}/file_batches/{batch_id}", get(vector_stores::retrieve_batch))
        .route("/v1/vector_stores/{id}/file_batches/{batch_id}/cancel", post(vector_stores::cancel_batch))
        .route("/v1/vector_stores/{id}/file_batches/{batch_id}/files", get(vector_stores::batch_files))
        .route("/v1/vector_stores/{id}/search", post(vector_stores::search));
    let mut open = Router::new().route("/health", get(health::health)).route("/ready", get(health::ready));
    if state.keys.metrics_require_key {
        keyed = keyed.route("/metrics", get(health::metrics));
    } else {
        open = open.route("/metrics", get(health::metrics));
    }
    let keys = Arc::clone(&state.keys);
    let routes = keyed
        .route_layer(middleware::from_fn_with_state(keys, guard::authenticate))
        .merge(open)
        .route_layer(middleware::from_fn(track))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::Extension(BodyLimit(body_limit)))
        .with_state(state);
    // CORS and the Host check sit inside the request-id and trace layers so refusals and preflights
    // get ids and log lines too; the Host check comes first, so a rebound name gets no CORS answer.
    let routes = match cors {
        Some(cors) => routes.layer(cors),
        None => routes,
    };
    routes
        .layer(middleware::from_fn_with_state(hosts, guard::check_host))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let id = request
                        .extensions()
                        .get::<RequestId>()
                        .and_then(|id| id.header_value().to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!(
                        "request",
                        id,
                        method = %request.method(),
                        path = %request.uri().path(),
                        key = tracing::field::Empty,
                    )
                })
                .on_response(DefaultOnResponse::new().level(Level::INFO))
                // Statuses are in the response line above; a 503 from /ready while loading is no error.
                .on_failure(()),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(middleware::from_fn(guard::close_after_unread_body))
}

/// `POST /v1/files`: bodies up to `[rag] max_file_bytes` plus room for the form's other fields.
fn upload_route(state: &AppState) -> MethodRouter<AppState> {
    let limit =
        state.config.rag.as_ref().map_or(state.config.server.max_request_body_bytes, |r| r.max_file_bytes)
            + 64 * 1024;
    post(files::upload)
        .layer::<_, std::convert::Infallible>(axum::Extension(BodyLimit(limit)))
        .layer(DefaultBodyLimit::max(limit))
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Config validation has refused every origin that is not a valid header value.
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers([axum::http::header::CONTENT_TYPE, axum::http::header::AUTHORIZATION])
            .expose_headers([REQUEST_ID]),
    )
}

/// Counts and times every routed request by route, model and status.
async fn track(path: MatchedPath, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let model = response.extensions().get::<ModelLabel>().map(|m| m.0.to_string()).unwrap_or_default();
    let labels = [
        ("route", path.as_str().to_owned()),
        ("model", model),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("hearth_http_requests_total", &labels).increment(1);
    metrics::histogram!("hearth_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Requests that reach no handler are counted under `route="unmatched"` (paths are unbounded).
pub(crate) fn count_unmatched(status: &'static str) {
    metrics::counter!("hearth_http_requests_total", "route" => "unmatched", "model" => "", "status" => status)
        .increment(1);
}

async fn unknown_route(method: Method, uri: Uri) -> Response {
    count_unmatched("404");
    ApiError::UnknownRoute { method: method.to_string(), path: uri.path().to_owned() }.into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    count_unmatched("405");
    ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_owned() }.into_response()
}
