//! Liveness (`/health`), readiness (`/ready`: every configured model loaded) and Prometheus
//! metrics (`/metrics`).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use hearth_engine::registry::LoadState;
use serde::Serialize;

use crate::server::AppState;

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
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub async fn ready(State(state): State<AppState>) -> Response {
    let models: Vec<ModelReadiness> = state
        .registry
        .entries()
        .iter()
        .map(|entry| {
            let load = entry.state();
            ModelReadiness {
                id: entry.id.to_string(),
                kind: entry.kind.as_str(),
                state: load.as_str(),
                error: match load {
                    LoadState::Failed(message) => Some(message.to_string()),
                    _ => None,
                },
            }
        })
        .collect();
    let all_ready = models.iter().all(|m| m.state == "ready");
    let status = if all_ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = Readiness { status: if all_ready { "ready" } else { "not_ready" }, models };
    (status, axum::Json(body)).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
        .into_response()
}
