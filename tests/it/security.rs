//! Closed to the browser and the network by default: the `Host` check against DNS rebinding, CORS
//! only as configured, and admission before a body is read.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, Method, Request, StatusCode};
use serde_json::json;

use crate::support::{app, tiny_app, tiny_config, App};

fn with_host(path: &str, host: &str) -> Request<Body> {
    Request::builder().uri(path).header(header::HOST, host).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn on_loopback_a_request_for_another_host_is_403() {
    let app = tiny_app().await; // listens on 127.0.0.1 by default
    for host in ["evil.example", "evil.example:8080", "192.168.1.20:8080"] {
        let reply = app.send(with_host("/v1/models", host)).await;
        reply.assert_error(StatusCode::FORBIDDEN, None, Some("host_not_allowed"));
    }
    // A rebound name cannot post work either, nor get a CORS answer.
    let post = Request::builder()
        .method(Method::POST)
        .uri("/v1/embeddings")
        .header(header::HOST, "evil.example:8080")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"model": "tiny-embed", "input": "x"}).to_string()))
        .unwrap();
    app.send(post).await.assert_error(StatusCode::FORBIDDEN, None, Some("host_not_allowed"));
    for host in ["localhost:8080", "127.0.0.1:8080", "[::1]:8080", "localhost"] {
        assert_eq!(app.send(with_host("/v1/models", host)).await.status, StatusCode::OK, "{host}");
    }
}

#[tokio::test]
async fn allowed_hosts_and_non_loopback_listeners() {
    let toml = tiny_config("").replace("[server]\n", "[server]\n        allowed_hosts = [\"hearth.lan\"]\n");
    let allowing = app(&toml).await;
    assert_eq!(allowing.send(with_host("/health", "hearth.lan:8080")).await.status, StatusCode::OK);
    assert_eq!(allowing.send(with_host("/health", "evil.example")).await.status, StatusCode::FORBIDDEN);

    let open = tiny_config("").replace("[server]\n", "[server]\n        host = \"0.0.0.0\"\n");
    let listening_everywhere = app(&open).await;
    assert_eq!(
        listening_everywhere.send(with_host("/health", "hearth.example.com")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn cors_is_off_by_default_and_follows_the_config() {
    let preflight = || {
        Request::builder()
            .method(Method::OPTIONS)
            .uri("/v1/embeddings")
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "POST")
            .body(Body::empty())
            .unwrap()
    };
    let closed = tiny_app().await.send(preflight()).await;
    assert!(!closed.headers.contains_key("access-control-allow-origin"));
    let toml = tiny_config("")
        .replace("[server]\n", "[server]\n        cors_allowed_origins = [\"https://app.example.com\"]\n");
    let open = app(&toml).await.send(preflight()).await;
    assert_eq!(open.headers["access-control-allow-origin"], "https://app.example.com");
    assert!(open.headers.contains_key("x-request-id"), "preflights get request ids too");
}

/// A request body that never ends: a handler that read it would never answer.
fn endless_body() -> Body {
    let chunks = futures::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Some((Ok::<_, Infallible>(Bytes::from_static(b" ")), ()))
    });
    Body::from_stream(chunks)
}

#[tokio::test]
async fn a_route_at_its_limit_refuses_before_reading_the_body() {
    let toml =
        tiny_config("").replace("[server]\n", "[server]\n        max_concurrent_requests_per_route = 1\n");
    let app = Arc::new(app(&toml).await);
    let post = |body: Body| {
        Request::builder()
            .method(Method::POST)
            .uri("/v1/embeddings")
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .unwrap()
    };
    // One upload in progress holds the route's only slot…
    let uploading = tokio::spawn({
        let app = Arc::clone(&app);
        async move { app.send(post(endless_body())).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // …so the next request is refused at once, without its (also endless) body being read.
    let refused = tokio::time::timeout(Duration::from_secs(10), app.send(post(endless_body())))
        .await
        .expect("a refusal must not wait for the body");
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, None, Some("model_overloaded"));
    assert!(refused.message().contains("/v1/embeddings"), "{}", refused.text);
    assert_eq!(refused.headers["retry-after"], "1");
    // Other routes have their own limit.
    let rerank =
        app.post("/v1/rerank", json!({"model": "tiny-rerank-bert", "query": "q", "documents": ["a"]})).await;
    assert_eq!(rerank.status, StatusCode::OK, "{}", rerank.text);
    uploading.abort();
    let _ = uploading.await;
    let after = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": "x"})).await;
    assert_eq!(after.status, StatusCode::OK, "the slot is free again once the upload is gone");
}

/// With truncation on, a 16 MB text is served: cut by bytes before tokenizing (the engine tests show
/// only a prefix is tokenized), it gets exactly the answer of its first tokens.
#[tokio::test]
async fn a_huge_input_with_truncation_is_served_like_its_prefix() {
    let toml = tiny_config("")
        .replace("max_request_body_bytes = 65536", "max_request_body_bytes = 20000000")
        .replace(
            "id = \"tiny-embed\"\n        kind = \"embedding\"",
            "id = \"tiny-embed\"\n        kind = \"embedding\"\n        truncate = true",
        );
    let app: App = app(&toml).await;
    let huge = "red apple ".repeat(1_600_000); // 16 MB
    let cut = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": huge})).await;
    assert_eq!(cut.status, StatusCode::OK, "{}", cut.text);
    let short =
        app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": "red apple ".repeat(11)})).await;
    assert_eq!(cut.body["usage"], short.body["usage"]);
    assert_eq!(cut.body["data"][0]["embedding"], short.body["data"][0]["embedding"]);
}

#[tokio::test]
async fn a_refusal_before_the_body_is_read_closes_the_connection() {
    let app = crate::support::tiny_app().await;
    let refused = app
        .post_raw("/v1/embeddings", "{\"model\": \"tiny-embed\", \"input\": \"x\"}", Some("text/plain"))
        .await;
    assert_eq!(refused.status, axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(refused.headers[axum::http::header::CONNECTION], "close");
    let served = app.post("/v1/embeddings", serde_json::json!({"model": "tiny-embed", "input": "x"})).await;
    assert!(served.headers.get(axum::http::header::CONNECTION).is_none(), "a read body keeps the connection");
}
