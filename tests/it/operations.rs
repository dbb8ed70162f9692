//! Models listing, health, readiness, metrics, request ids, load states and overload.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use hearth::server::load_models;
use hearth_engine::registry::LoadState;
use serde_json::json;

use crate::support::{app, fixtures, tiny_app, tiny_config, unloaded, App};

#[tokio::test]
async fn models_are_listed_with_kind_state_and_shape() {
    let app = tiny_app().await;
    let reply = app.get("/v1/models").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["object"], "list");
    let models = reply.body["data"].as_array().unwrap();
    let ids: Vec<&str> = models.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "tiny-embed",
            "tiny-xlmr-embed",
            "tiny-rerank-bert",
            "tiny-rerank-xlmr",
            "tiny-bi",
            "tiny-shared-bi"
        ]
    );
    for model in models {
        assert_eq!(model["object"], "model");
        assert_eq!(model["owned_by"], "hearth");
        assert_eq!(model["state"], "ready");
        assert!(model["created"].as_u64().unwrap() > 1_700_000_000);
    }
    assert_eq!(models[0]["kind"], "embedding");
    assert_eq!(models[0]["dimensions"], 32);
    assert_eq!(models[0]["max_input_tokens"], 24);
    assert_eq!(models[2]["kind"], "rerank");
    assert_eq!(models[2]["scoring"], "cross-encoder");
    assert_eq!(models[4]["scoring"], "bi-encoder");
    assert_eq!(models[5]["scoring"], "bi-encoder");
    assert_eq!(models[5]["max_input_tokens"], 24, "a shared embedder's limit by default");

    let one = app.get("/v1/models/tiny-rerank-xlmr").await;
    assert_eq!(one.body["id"], "tiny-rerank-xlmr");
    assert_eq!(one.body["max_input_tokens"], 64);
    app.get("/v1/models/nope").await.assert_error(
        StatusCode::NOT_FOUND,
        Some("model"),
        Some("model_not_found"),
    );
}

#[tokio::test]
async fn readiness_follows_loading_and_failures_are_reported() {
    let toml = format!(
        "{}\n[[models]]\nid = \"broken\"\nkind = \"embedding\"\nsource = \"does-not-exist\"\n",
        tiny_config("")
    );
    let state = unloaded(&toml);
    let app = App { router: hearth::http::router(state.clone()), state: state.clone() };
    assert_eq!(app.get("/health").await.status, StatusCode::OK);
    let loading = app.get("/ready").await;
    assert_eq!(loading.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(loading.body["status"], "not_ready");
    let reply = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": "x"})).await;
    reply.assert_error(StatusCode::SERVICE_UNAVAILABLE, None, Some("model_loading"));
    assert_eq!(reply.headers["retry-after"], "1");

    load_models(state.clone()).await;
    let ready = app.get("/ready").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "one model failed");
    let broken =
        ready.body["models"].as_array().unwrap().iter().find(|m| m["id"] == "broken").unwrap().clone();
    assert_eq!(broken["state"], "failed");
    // Unauthenticated callers learn the state, not file paths or internal errors (those are logged).
    assert!(broken.get("error").is_none(), "{broken}");
    assert!(!ready.text.contains(&*fixtures().to_string_lossy()), "{}", ready.text);
    app.post("/v1/embeddings", json!({"model": "broken", "input": "x"})).await.assert_error(
        StatusCode::SERVICE_UNAVAILABLE,
        None,
        Some("model_failed"),
    );
    let served = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": "x"})).await;
    assert_eq!(served.status, StatusCode::OK, "other models serve while one failed");

    let all_good = tiny_app().await.get("/ready").await;
    assert_eq!(all_good.status, StatusCode::OK);
    assert_eq!(all_good.body["status"], "ready");
}

/// The value of the Prometheus series `series` (exact name and labels) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_by_route_model_and_status() {
    // The recorder is process-wide and other tests run beside this one: its models have ids no other
    // test uses, so every series asserted here comes from this test's own requests.
    let toml = tiny_config("")
        .replace("\"tiny-embed\"", "\"metrics-probe-embed\"")
        .replace("id = \"tiny-rerank-bert\"", "id = \"metrics-probe-rerank\"");
    let app = app(&toml).await;
    app.post("/v1/embeddings", json!({"model": "metrics-probe-embed", "input": ["the lazy dog", "rain"]}))
        .await;
    app.post("/v1/embeddings", json!({"model": "metrics-probe-embed", "input": ""})).await;
    app.post("/v1/embeddings", json!({"model": "not-configured-probe", "input": "x"})).await;
    app.post("/v1/embeddings", json!({"model": "metrics-probe-rerank", "input": "x"})).await;
    app.send(Request::builder().method(Method::DELETE).uri("/v1/embeddings").body(Body::empty()).unwrap())
        .await;
    let reply = app.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = reply.text;
    let requests = |model: &str, status: &str| {
        sample(
            &text,
            &format!(
                r#"hearth_http_requests_total{{route="/v1/embeddings",model="{model}",status="{status}"}}"#
            ),
        )
    };
    assert_eq!(requests("metrics-probe-embed", "200"), Some(1.0), "{text}");
    assert_eq!(requests("metrics-probe-embed", "400"), Some(1.0), "{text}");
    assert_eq!(requests("metrics-probe-rerank", "400"), Some(1.0), "{text}");
    assert_eq!(sample(&text, r#"hearth_batch_size_count{model="metrics-probe-embed"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, r#"hearth_batch_size_sum{model="metrics-probe-embed"}"#), Some(2.0), "{text}");
    assert_eq!(sample(&text, r#"hearth_queue_depth{model="metrics-probe-embed"}"#), Some(0.0), "{text}");
    let tokens = sample(&text, r#"hearth_tokens_processed_total{model="metrics-probe-embed"}"#);
    assert!(tokens.is_some_and(|n| n >= 6.0), "[CLS] the lazy dog [SEP] + [CLS] rain [SEP]: {text}");
    assert!(text.contains(
        r#"hearth_http_request_duration_seconds_bucket{route="/v1/embeddings",model="metrics-probe-embed",status="200",le="#
    ));
    assert!(text.contains("# HELP hearth_queue_depth"));
    assert!(sample(&text, r#"hearth_http_requests_total{route="unmatched",model="",status="405"}"#).is_some());
    assert!(!text.contains("not-configured-probe"), "unknown model names must not become labels");
}

#[tokio::test]
async fn request_ids_are_assigned_or_propagated() {
    let app = tiny_app().await;
    let generated = app.get("/health").await;
    assert_eq!(generated.headers["x-request-id"].len(), 36);
    let given =
        Request::builder().uri("/health").header("x-request-id", "client-chosen-1").body(Body::empty());
    let reply = app.send(given.unwrap()).await;
    assert_eq!(reply.headers["x-request-id"], "client-chosen-1");
    let error = app.get("/nope").await;
    assert!(error.headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn overload_answers_429_at_once_with_retry_after() {
    let toml = tiny_config("").replace(
        "id = \"tiny-embed\"\n        kind = \"embedding\"",
        "id = \"tiny-embed\"\n        kind = \"embedding\"\n        max_concurrent_requests = 1",
    );
    let app = Arc::new(app(&toml).await);
    let LoadState::Ready(served) = app.state.registry.get("tiny-embed").unwrap().state() else {
        panic!("tiny-embed did not load");
    };
    // A long request occupies the model's only slot…
    let long: Vec<String> = (0..2000).map(|i| format!("fox {i}")).collect();
    let busy = tokio::spawn({
        let app = Arc::clone(&app);
        async move { app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": long})).await }
    });
    let mut waited = Duration::ZERO;
    while served.in_flight() == 0 {
        assert!(
            !busy.is_finished(),
            "the long request ended before it was seen: {:?}",
            busy.await.unwrap().text
        );
        assert!(waited < Duration::from_secs(10), "the long request never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
        waited += Duration::from_millis(1);
    }
    // …so the next one is refused immediately, without queueing.
    let refused = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": "x"})).await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, None, Some("model_overloaded"));
    assert_eq!(refused.body["error"]["type"], "rate_limit_error");
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(busy.await.unwrap().status, StatusCode::OK);
    let after = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": "x"})).await;
    assert_eq!(after.status, StatusCode::OK, "the slot is free again");
}

#[tokio::test]
async fn model_ids_may_contain_slashes() {
    let toml = tiny_config("").replace("\"tiny-embed\"", "\"org/tiny-embed\"");
    let app = app(&toml).await;
    for path in ["/v1/models/org/tiny-embed", "/v1/models/org%2Ftiny-embed"] {
        let reply = app.get(path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text);
        assert_eq!(reply.body["id"], "org/tiny-embed");
    }
    let reply = app.post("/v1/embeddings", json!({"model": "org/tiny-embed", "input": "x"})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
}
