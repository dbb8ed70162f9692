//! Model lifecycle for operators: `POST /admin/models/{id}/load`, `/unload` and `/reload`, each
//! answering the model object (`GET /v1/models/{id}`) after the action.
//!
//! With API keys configured they need a key with `admin = true`; a server without keys allows them
//! only while it listens on loopback (anyone who can reach an open server on the network could
//! otherwise evict its models).

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use hearth_engine::registry::LoadState;

use super::error::ApiError;
use super::models::describe;
use crate::auth::Caller;
use crate::lifecycle::Trigger;
use crate::state::AppState;

#[derive(Clone, Copy, Debug)]
enum Action {
    Load,
    Unload,
    Reload,
}

/// `rest` is `{id}/{action}`; ids may contain `/`.
fn parse(rest: &str) -> Option<(&str, Action)> {
    let (id, action) = rest.rsplit_once('/')?;
    let action = match action {
        "load" => Action::Load,
        "unload" => Action::Unload,
        "reload" => Action::Reload,
        _ => return None,
    };
    (!id.is_empty()).then_some((id, action))
}

pub async fn act(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(rest): Path<String>,
) -> Response {
    let allowed =
        if state.keys.enabled() { caller.is_admin() } else { state.config.server.listens_on_loopback() };
    if !allowed {
        return ApiError::AdminOnly { keys: state.keys.enabled() }.into_response();
    }
    let Some((id, action)) = parse(&rest) else {
        return ApiError::UnknownRoute { method: "POST".into(), path: format!("/admin/models/{rest}") }
            .into_response();
    };
    let Some(entry) = state.registry.get(id) else {
        return ApiError::ModelNotFound { model: id.into() }.into_response();
    };
    tracing::info!(model = %entry.id, action = ?action, by = caller.name().unwrap_or("-"), "admin model action");
    let lifecycle = &state.lifecycle;
    let outcome = match action {
        Action::Unload => {
            lifecycle.unload(&entry, Trigger::Admin).await;
            entry.state()
        }
        Action::Load => lifecycle.load(&entry).await,
        Action::Reload => lifecycle.reload(&entry).await,
    };
    match outcome {
        LoadState::Failed(_) => {
            ApiError::ModelNotReady { model: entry.id.clone(), failed: true }.into_response()
        }
        LoadState::Loading => {
            ApiError::ModelNotReady { model: entry.id.clone(), failed: false }.into_response()
        }
        LoadState::Ready(_) | LoadState::Unloaded => axum::Json(describe(&entry)).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_a_model_and_an_action() {
        assert!(matches!(parse("m/load"), Some(("m", Action::Load))));
        assert!(matches!(parse("org/name/unload"), Some(("org/name", Action::Unload))));
        assert!(matches!(parse("m/reload"), Some(("m", Action::Reload))));
        assert!(parse("m/delete").is_none());
        assert!(parse("/load").is_none());
        assert!(parse("load").is_none());
    }
}
