//! Liveness (`/health`), readiness (`/ready`: every model loaded at startup is ready, none failed;
//! a model that waits unloaded for its first request, or that is loading for one, counts as
//! serving) and Prometheus
//! metrics (`/metrics`). These answer without authentication, so `/ready` says only each model's
//! state: why a model failed (file paths, internal errors) goes to the log.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use hearth_engine::registry::LoadState;
use serde::Serialize;

use crate::state::AppState;

pub async fn health() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

#[derive(Serialize)]
struct Readiness {
    status: &'static str,
    models: Vec<ModelReadiness>,
}

#[derive(Serialize)]
struct ModelReadiness {
    id: String,
    kind: &'static str,
    state: &'static str,
}

pub async fn ready(State(state): State<AppState>) -> Response {
    let entries = state.registry.entries();
    let states: Vec<_> = entries.iter().map(|entry| (entry, entry.state())).collect();
    let all_ready = states.iter().all(|(entry, load)| match load {
        LoadState::Ready(_) | LoadState::Unloaded => true,
        LoadState::Loading => entry.loading_on_demand(),
        LoadState::Failed(_) => false,
    });
    let models = states
        .iter()
        .map(|(entry, load)| ModelReadiness {
            id: entry.id.to_string(),
            kind: entry.kind.as_str(),
            state: load.as_str(),
        })
        .collect();
    let status = if all_ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = Readiness { status: if all_ready { "ready" } else { "not_ready" }, models };
    (status, axum::Json(body)).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
        .into_response()
}
