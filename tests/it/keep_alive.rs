//! Model lifecycle through the real router and the tiny models: loading on first use, `keep_alive`
//! unloading, admin load/unload/reload, and an entry sharing another's model following it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::{json, Value};

use crate::support::{app, fixtures, App, Reply};

const ADMIN: &str = "hk-test-admin-0123456789ab";
const USER: &str = "hk-test-user-0123456789abcd";

/// Two embedders (ids unique to the test, so metrics do not mix) and a reranker sharing the first.
fn config(prefix: &str, first: &str, server: &str) -> String {
    format!(
        r#"
        models_dir = "{dir}"
        [server]
        {server}
        [[models]]
        id = "{prefix}-embed"
        kind = "embedding"
        source = "tiny-bert-embed"
        device = "cpu"
        {first}
        [[models]]
        id = "{prefix}-other"
        kind = "embedding"
        source = "tiny-xlmr-embed"
        device = "cpu"
        [[models]]
        id = "{prefix}-shared"
        kind = "rerank"
        embedding_model = "{prefix}-embed"
        "#,
        dir = fixtures().display()
    )
}

fn keys() -> String {
    format!(
        "[auth]\n[[auth.keys]]\nname = \"ops\"\nkey = \"{ADMIN}\"\nadmin = true\n[[auth.keys]]\nname = \"user\"\nkey = \"{USER}\"\n"
    )
}

async fn post(app: &App, path: &str, body: Value, key: Option<&str>) -> Reply {
    let mut request =
        Request::builder().method(Method::POST).uri(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    app.send(request.body(Body::from(body.to_string())).unwrap()).await
}

async fn state_of(app: &App, id: &str, key: Option<&str>) -> String {
    let mut request = Request::builder().uri(format!("/v1/models/{id}"));
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let reply = app.send(request.body(Body::empty()).unwrap()).await;
    reply.body["state"].as_str().unwrap_or_default().to_owned()
}

fn metric(app: &App, series: &str) -> f64 {
    let text = app.state.metrics.render();
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
}

async fn embed(app: &App, model: &str, key: Option<&str>) -> Reply {
    post(app, "/v1/embeddings", json!({"model": model, "input": "the lazy dog"}), key).await
}

#[tokio::test]
async fn a_model_without_preload_loads_on_its_first_requests_once() {
    let app = app(&config("ondemand", "preload = false", "")).await;
    assert_eq!(state_of(&app, "ondemand-embed", None).await, "unloaded");
    assert_eq!(state_of(&app, "ondemand-shared", None).await, "unloaded", "it follows its embedding model");
    assert_eq!(state_of(&app, "ondemand-other", None).await, "ready");
    let ready = app.get("/ready").await;
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "a model waiting for its first request is no failure: {}",
        ready.text
    );

    // Eight requests at once: all wait for the one load, none gets a 503.
    let replies = futures::future::join_all((0..8).map(|_| embed(&app, "ondemand-embed", None))).await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        assert_eq!(reply.body["data"][0]["embedding"].as_array().unwrap().len(), 32);
    }
    assert_eq!(state_of(&app, "ondemand-embed", None).await, "ready");
    let loads = r#"hearth_model_loads_total{model="ondemand-embed",trigger="request"}"#;
    assert_eq!(metric(&app, loads), 1.0);
    assert_eq!(metric(&app, r#"hearth_model_loaded{model="ondemand-embed"}"#), 1.0);

    // The shared reranker loads over the now loaded embedder.
    let rerank = json!({"model": "ondemand-shared", "query": "dog", "documents": ["a dog", "a cat"]});
    let scored = post(&app, "/v1/rerank", rerank, None).await;
    assert_eq!(scored.status, StatusCode::OK, "{}", scored.text);
    assert_eq!(metric(&app, loads), 1.0, "the embedder was not loaded twice");
}

#[tokio::test]
async fn keep_alive_unloads_an_idle_model_and_the_next_request_loads_it_again() {
    let app = app(&config("idle", "keep_alive = 0", "")).await;
    tokio::spawn(Arc::clone(&app.state.lifecycle).reap_idle());
    assert_eq!(embed(&app, "idle-embed", None).await.status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(&app, "idle-embed", None).await != "unloaded" {
        assert!(Instant::now() < deadline, "the idle model was never unloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state_of(&app, "idle-shared", None).await, "unloaded", "the sharing reranker goes with it");
    assert_eq!(state_of(&app, "idle-other", None).await, "ready", "keep_alive is per model (-1 by default)");
    assert_eq!(metric(&app, r#"hearth_model_unloads_total{model="idle-embed",trigger="idle"}"#), 1.0);
    assert_eq!(metric(&app, r#"hearth_model_loaded{model="idle-embed"}"#), 0.0);

    let again = embed(&app, "idle-embed", None).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text);
    assert_eq!(metric(&app, r#"hearth_model_loads_total{model="idle-embed",trigger="request"}"#), 1.0);
}

#[tokio::test]
async fn a_model_in_use_is_not_unloaded() {
    let app = app(&config("busy", "keep_alive = \"1s\"", "")).await;
    tokio::spawn(Arc::clone(&app.state.lifecycle).reap_idle());
    // Requests every 300 ms for 2.5 s: never idle for the keep-alive of 1 s.
    for _ in 0..8 {
        assert_eq!(embed(&app, "busy-embed", None).await.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(state_of(&app, "busy-embed", None).await, "ready");
    assert_eq!(metric(&app, r#"hearth_model_unloads_total{model="busy-embed",trigger="idle"}"#), 0.0);
}

#[tokio::test]
async fn admins_load_unload_and_reload_models() {
    let app = app(&format!("{}\n{}", config("admin", "", ""), keys())).await;
    let unload = post(&app, "/admin/models/admin-embed/unload", json!({}), Some(ADMIN)).await;
    assert_eq!(unload.status, StatusCode::OK, "{}", unload.text);
    assert_eq!(unload.body["state"], "unloaded");
    assert_eq!(state_of(&app, "admin-shared", Some(ADMIN)).await, "unloaded");

    let load = post(&app, "/admin/models/admin-embed/load", json!({}), Some(ADMIN)).await;
    assert_eq!((load.status, load.body["state"].as_str()), (StatusCode::OK, Some("ready")), "{}", load.text);
    assert_eq!(load.body["dimensions"], 32);
    let reload = post(&app, "/admin/models/admin-other/reload", json!({}), Some(ADMIN)).await;
    assert_eq!(reload.body["state"], "ready", "{}", reload.text);
    assert_eq!(metric(&app, r#"hearth_model_loads_total{model="admin-other",trigger="admin"}"#), 1.0);
    assert_eq!(embed(&app, "admin-other", Some(USER)).await.status, StatusCode::OK);

    post(&app, "/admin/models/admin-embed/unload", json!({}), Some(USER)).await.assert_error(
        StatusCode::FORBIDDEN,
        None,
        Some("admin_key_required"),
    );
    post(&app, "/admin/models/admin-embed/unload", json!({}), None).await.assert_error(
        StatusCode::UNAUTHORIZED,
        None,
        None,
    );
    post(&app, "/admin/models/nope/load", json!({}), Some(ADMIN)).await.assert_error(
        StatusCode::NOT_FOUND,
        Some("model"),
        Some("model_not_found"),
    );
    post(&app, "/admin/models/admin-embed/explode", json!({}), Some(ADMIN)).await.assert_error(
        StatusCode::NOT_FOUND,
        None,
        Some("unknown_url"),
    );
    assert_eq!(state_of(&app, "admin-embed", Some(USER)).await, "ready");
}

#[tokio::test]
async fn an_open_server_allows_admin_actions_on_loopback_only() {
    let local = app(&config("local", "", "")).await;
    let reply = post(&local, "/admin/models/local-other/unload", json!({}), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let open = app(&config("open", "", "host = \"0.0.0.0\"")).await;
    post(&open, "/admin/models/open-other/unload", json!({}), None).await.assert_error(
        StatusCode::FORBIDDEN,
        None,
        Some("admin_key_required"),
    );
    assert_eq!(state_of(&open, "open-other", None).await, "ready");
}

#[test]
fn keep_alive_and_preload_are_checked() {
    let parse = |first: &str| {
        hearth::config::Config::parse(&config("cfg", first, ""), None, &Default::default())
            .map_err(|e| e.to_string())
    };
    use hearth::config::KeepAlive;
    let keep = |first: &str| parse(first).map(|c| c.models[0].keep_alive);
    assert_eq!(keep("keep_alive = -1"), Ok(KeepAlive::Forever));
    assert_eq!(keep("keep_alive = \"5m\""), Ok(KeepAlive::Idle(Duration::from_secs(300))));
    assert_eq!(keep("keep_alive = 30"), Ok(KeepAlive::Idle(Duration::from_secs(30))));
    assert_eq!(keep(""), Ok(KeepAlive::Forever), "models stay loaded unless told otherwise");
    for bad in ["keep_alive = -2", "keep_alive = \"5 minutes\"", "keep_alive = \"1d\""] {
        let err = keep(bad).unwrap_err();
        assert!(err.contains("models[0].keep_alive") && err.contains("\"5m\""), "{bad}: {err}");
    }
    let shared = hearth::config::Config::parse(
        &config("cfg", "", "")
            .replace("embedding_model = \"cfg-embed\"", "embedding_model = \"cfg-embed\"\nkeep_alive = 5"),
        None,
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(shared.contains("models[2].keep_alive") && shared.contains("cannot be set"), "{shared}");
    let server =
        hearth::config::Config::parse(&config("cfg", "", "keep_alive = \"10m\""), None, &Default::default())
            .unwrap();
    assert_eq!(server.models[1].keep_alive, KeepAlive::Idle(Duration::from_secs(600)), "the server default");
}

#[tokio::test]
async fn a_memory_budget_unloads_the_least_recently_used_model_first() {
    use hearth_engine::registry::{LoadState, Served};
    // Each tiny model's weights are about 100 KiB: the budget holds one of them.
    let app = app(&config("budget", "", "models_memory_mib = 0.15")).await;
    assert_eq!(state_of(&app, "budget-embed", None).await, "unloaded", "pushed out by the second at startup");
    assert_eq!(state_of(&app, "budget-other", None).await, "ready");
    assert_eq!(state_of(&app, "budget-shared", None).await, "unloaded", "its model is not loaded");
    assert!(metric(&app, "hearth_models_memory_bytes") > 100_000.0);

    let first = embed(&app, "budget-embed", None).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(state_of(&app, "budget-other", None).await, "unloaded");
    assert_eq!(metric(&app, r#"hearth_model_unloads_total{model="budget-other",trigger="budget"}"#), 1.0);

    // While `budget-embed` has a request in flight it is not unloaded: the other cannot load.
    let LoadState::Ready(served) = app.state.registry.get("budget-embed").unwrap().state() else { panic!() };
    let Served::Embedding(embedder) = &*served else { panic!() };
    let in_flight = embedder.service().admission.try_admit().unwrap();
    let refused = embed(&app, "budget-other", None).await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, None, Some("model_overloaded"));
    assert!(refused.message().contains("models_memory_mib"), "{}", refused.text);
    assert_eq!(state_of(&app, "budget-embed", None).await, "ready");
    drop(in_flight);
    let later = embed(&app, "budget-other", None).await;
    assert_eq!(later.status, StatusCode::OK, "{}", later.text);
    assert_eq!(state_of(&app, "budget-embed", None).await, "unloaded");
}

#[tokio::test]
async fn a_config_reload_changes_models_and_keys_and_leaves_the_rest_serving() {
    use hearth::config::{Config, Overrides};
    use hearth_engine::registry::LoadState;
    const LIMITED: &str = "hk-test-limited-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hearth.toml");
    let limited =
        format!("[[auth.keys]]\nname = \"limited\"\nkey = \"{LIMITED}\"\nrequests_per_minute = 1\n");
    let before = format!(
        "{}\n{}{limited}",
        config("reload", "", ""),
        keys().replace(&format!("[[auth.keys]]\nname = \"user\"\nkey = \"{USER}\"\n"), "")
    );
    std::fs::write(&path, &before).unwrap();
    let state = hearth::state::AppState::new(Config::load(&path, &Overrides::default()).unwrap()).unwrap();
    hearth::server::load_models(state.clone()).await;
    let app = App { router: hearth::http::router(state.clone()), state: state.clone() };
    assert_eq!(embed(&app, "reload-other", Some(LIMITED)).await.status, StatusCode::OK);
    assert_eq!(embed(&app, "reload-other", Some(USER)).await.status, StatusCode::UNAUTHORIZED);
    let served = |id: &str| match state.registry.get(id).unwrap().state() {
        LoadState::Ready(served) => served,
        _ => panic!("{id} is not loaded"),
    };
    let other_before = served("reload-other");

    // Remove the sharing reranker, change the first embedder, add a model, add a key.
    let after = format!(
        "{}\n[[models]]\nid = \"reload-new\"\nkind = \"embedding\"\nsource = \"tiny-bert-embed\"\npreload = false\n{}{limited}",
        config("reload", "max_input_tokens = 16", "")
            .replace("[[models]]\n        id = \"reload-shared\"\n        kind = \"rerank\"\n        embedding_model = \"reload-embed\"", ""),
        keys()
    );
    std::fs::write(&path, &after).unwrap();
    let changes = hearth::server::reload(&state, &Overrides::default()).await.unwrap();
    let ids = |v: &[Arc<str>]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(ids(&changes.added), ["reload-new"]);
    assert_eq!(ids(&changes.removed), ["reload-shared"]);
    assert_eq!(ids(&changes.changed), ["reload-embed"]);

    let listed = app
        .send(
            Request::builder()
                .uri("/v1/models")
                .header(header::AUTHORIZATION, format!("Bearer {USER}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    let listed: Vec<&str> =
        listed.body["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(listed, ["reload-embed", "reload-other", "reload-new"]);
    let rerank = json!({"model": "reload-shared", "query": "q", "documents": ["d"]});
    post(&app, "/v1/rerank", rerank, Some(USER)).await.assert_error(
        StatusCode::NOT_FOUND,
        Some("model"),
        Some("model_not_found"),
    );
    let changed = app
        .send(
            Request::builder()
                .uri("/v1/models/reload-embed")
                .header(header::AUTHORIZATION, format!("Bearer {USER}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        (changed.body["state"].as_str(), changed.body["max_input_tokens"].as_u64()),
        (Some("ready"), Some(16)),
        "{}",
        changed.text
    );
    assert_eq!(state_of(&app, "reload-new", Some(USER)).await, "unloaded");
    assert_eq!(
        embed(&app, "reload-new", Some(USER)).await.status,
        StatusCode::OK,
        "the new key and the new model"
    );
    assert!(Arc::ptr_eq(&other_before, &served("reload-other")), "an unchanged model is not reloaded");
    assert_eq!(
        embed(&app, "reload-other", Some(LIMITED)).await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "a kept key keeps its buckets"
    );

    // A config that does not validate changes nothing.
    std::fs::write(&path, "this is not toml").unwrap();
    let err = hearth::server::reload(&state, &Overrides::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains("invalid TOML"), "{err:#}");
    assert_eq!(embed(&app, "reload-new", Some(USER)).await.status, StatusCode::OK);
}
