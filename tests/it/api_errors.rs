//! Every protocol-level failure answers with OpenAI's error shape and the right status.

use axum::http::StatusCode;
use serde_json::json;

use crate::support::{app, tiny_app, tiny_config};

#[tokio::test]
async fn malformed_json_and_wrong_types() {
    let app = tiny_app().await;
    let reply =
        app.post_raw("/v1/embeddings", "{\"model\": \"tiny-embed\", ", Some("application/json")).await;
    reply.assert_error(StatusCode::BAD_REQUEST, None, None);
    assert!(reply.message().contains("could not parse the JSON body"), "{}", reply.text);
    let reply = app.post_raw("/v1/embeddings", "[1, 2]", Some("application/json")).await;
    reply.assert_error(StatusCode::BAD_REQUEST, None, None);
    let reply = app.post_raw("/v1/embeddings", "{} trailing", Some("application/json")).await;
    reply.assert_error(StatusCode::BAD_REQUEST, None, None);

    for (body, param) in [
        (json!({"model": 5, "input": "x"}), "model"),
        (json!({"input": "x"}), "."),
        (json!({"model": "tiny-embed", "input": 5}), "input"),
        (json!({"model": "tiny-embed", "input": {"text": "x"}}), "input"),
        (json!({"model": "tiny-embed", "input": "x", "encoding_format": "hex"}), "encoding_format"),
        (json!({"model": "tiny-embed", "input": "x", "dimensions": -1}), "dimensions"),
        (json!({"model": "tiny-rerank-bert", "query": "q", "documents": ["a"], "top_n": "2"}), "top_n"),
    ] {
        let path = if body.get("query").is_some() { "/v1/rerank" } else { "/v1/embeddings" };
        let reply = app.post(path, body.clone()).await;
        let expected_param = (param != ".").then_some(param);
        reply.assert_error(StatusCode::BAD_REQUEST, expected_param, None);
        assert!(
            reply.message().contains(if param == "." { "model" } else { param }),
            "{body}: {}",
            reply.text
        );
    }
}

#[tokio::test]
async fn empty_and_too_many_inputs() {
    let app =
        app(&tiny_config("").replace("[server]\n", "[server]\n        max_inputs_per_request = 3\n")).await;
    for input in [json!(""), json!([]), json!(["a", ""]), json!([[]])] {
        let reply = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": input})).await;
        reply.assert_error(StatusCode::BAD_REQUEST, Some("input"), None);
    }
    let reply =
        app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": ["a", "b", "c", "d"]})).await;
    reply.assert_error(StatusCode::BAD_REQUEST, Some("input"), None);
    assert!(reply.message().contains("4 inputs, more than this model's limit of 3"), "{}", reply.text);
    let reply = app
        .post(
            "/v1/rerank",
            json!({"model": "tiny-rerank-xlmr", "query": "q", "documents": ["a", "b", "c", "d"]}),
        )
        .await;
    reply.assert_error(StatusCode::BAD_REQUEST, Some("documents"), None);
    let reply = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": [[1, 2, 999]]})).await;
    reply.assert_error(StatusCode::BAD_REQUEST, Some("input"), None);
    assert!(reply.message().contains("token id 999"), "{}", reply.text);
}

#[tokio::test]
async fn unknown_and_mismatched_models() {
    let app = tiny_app().await;
    app.post("/v1/embeddings", json!({"model": "gpt-4", "input": "x"})).await.assert_error(
        StatusCode::NOT_FOUND,
        Some("model"),
        Some("model_not_found"),
    );
    app.post("/v1/rerank", json!({"model": "gpt-4", "query": "q", "documents": ["a"]})).await.assert_error(
        StatusCode::NOT_FOUND,
        Some("model"),
        Some("model_not_found"),
    );
    app.post("/v1/embeddings", json!({"model": "tiny-rerank-bert", "input": "x"})).await.assert_error(
        StatusCode::BAD_REQUEST,
        Some("model"),
        Some("model_kind_mismatch"),
    );
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let app = tiny_app().await;
    let big = "a ".repeat(40_000);
    let reply = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": big})).await;
    reply.assert_error(StatusCode::PAYLOAD_TOO_LARGE, None, Some("request_too_large"));
    assert!(reply.message().contains("65536 bytes"), "{}", reply.text);
}

#[tokio::test]
async fn content_types_routes_and_methods() {
    let app = tiny_app().await;
    let body = json!({"model": "tiny-embed", "input": "x"}).to_string();
    for content_type in [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.api+json",
    ] {
        let reply = app.post_raw("/v1/embeddings", body.clone(), Some(content_type)).await;
        assert_eq!(reply.status, StatusCode::OK, "{content_type:?}: {}", reply.text);
    }
    // What a web page can make a browser send anywhere without a CORS preflight (form, text and
    // untyped bodies) never reaches a model.
    for content_type in [
        None,
        Some("application/x-www-form-urlencoded"),
        Some("text/plain"),
        Some("text/plain; charset=utf-8"),
        Some("multipart/form-data; boundary=x"),
        Some("text/csv"),
        Some("text/json"),
    ] {
        let reply = app.post_raw("/v1/embeddings", body.clone(), content_type).await;
        reply.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, None, None);
        assert!(reply.message().contains("application/json"), "{content_type:?}: {}", reply.text);
    }
    app.get("/v1/nothing-here").await.assert_error(StatusCode::NOT_FOUND, None, Some("unknown_url"));
    app.get("/v1/embeddings").await.assert_error(
        StatusCode::METHOD_NOT_ALLOWED,
        None,
        Some("method_not_allowed"),
    );
}

#[tokio::test]
async fn routes_take_their_own_body_limits_and_bad_route_settings_are_refused() {
    let extra =
        "\n[server.routes.\"/v1/embeddings\"]\nmax_request_body_bytes = 100\nrequest_timeout_secs = 30\n";
    let toml = crate::support::tiny_config("")
        .replace("max_request_body_bytes = 65536\n", &format!("max_request_body_bytes = 65536\n{extra}"));
    let app = crate::support::app(&toml).await;
    let long = "word ".repeat(40);
    let refused = app.post("/v1/embeddings", serde_json::json!({"model": "tiny-embed", "input": long})).await;
    refused.assert_error(axum::http::StatusCode::PAYLOAD_TOO_LARGE, None, Some("request_too_large"));
    assert!(refused.message().contains("100 bytes"), "{}", refused.text);
    let rerank = serde_json::json!({"model": "tiny-rerank-bert", "query": long, "documents": ["a"]});
    assert_eq!(
        app.post("/v1/rerank", rerank).await.status,
        axum::http::StatusCode::OK,
        "other routes keep the server's limit"
    );
    let limits = app.state.config.server.route("/v1/embeddings");
    assert_eq!(
        (limits.max_request_body_bytes, limits.request_timeout),
        (100, Some(std::time::Duration::from_secs(30)))
    );
    assert_eq!(
        app.state.config.server.route("/v1/rerank").request_timeout,
        Some(std::time::Duration::from_secs(600))
    );

    let parse = |text: &str| {
        hearth::config::Config::parse(text, None, &Default::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let unknown = parse("[server.routes.\"/v1/nope\"]\nmax_request_body_bytes = 5\n");
    assert!(unknown.contains("not a model route") && unknown.contains("`/v1/embeddings`"), "{unknown}");
    assert!(parse("[server.routes.\"/v1/rerank\"]\nmax_concurrent_requests = 0\n").contains("at least 1"));
    assert!(parse("[server.routes.\"/v1/rerank\"]\ncolour = 1\n").contains("unknown field"));
    let off =
        hearth::config::Config::parse("[server]\nrequest_timeout_secs = 0\n", None, &Default::default())
            .unwrap();
    assert_eq!(off.server.route("/v1/completions").request_timeout, None);
}
