//! API keys and per-key rate limits through the real router: 401s in OpenAI's shape, open probes,
//! keyed `/metrics` on request, `x-ratelimit-*` headers, requests and tokens per minute, keys files.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::{json, Value};

use crate::support::{app, tiny_config, App, Reply};

const PREMIUM: &str = "hk-test-premium-0123456789";
const STANDARD: &str = "hk-test-standard-0123456789";

fn keyed(auth: &str) -> String {
    tiny_config(&format!(
        "\n[auth]\n{auth}\n[[auth.keys]]\nname = \"webui\"\nkey = \"{PREMIUM}\"\nclass = \"premium\"\n\
         [[auth.keys]]\nname = \"batch\"\nkey = \"{STANDARD}\"\n"
    ))
}

/// Sends `request` with `headers` (name, value) added.
async fn send(app: &App, method: Method, path: &str, body: Option<Value>, headers: &[(&str, &str)]) -> Reply {
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = match body {
        Some(body) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(body.to_string())
        }
        None => Body::empty(),
    };
    app.send(request.body(body).unwrap()).await
}

fn embed_body() -> Value {
    json!({"model": "tiny-embed", "input": "the quick brown fox"})
}

async fn embed(app: &App, headers: &[(&str, &str)]) -> Reply {
    send(app, Method::POST, "/v1/embeddings", Some(embed_body()), headers).await
}

#[tokio::test]
async fn without_a_configured_key_a_request_is_401_in_openais_shape() {
    let app = app(&keyed("")).await;
    let missing = embed(&app, &[]).await;
    missing.assert_error(StatusCode::UNAUTHORIZED, None, None);
    assert!(missing.message().contains("Authorization: Bearer"), "{}", missing.text);
    assert_eq!(missing.headers[header::WWW_AUTHENTICATE], "Bearer");

    let wrong = "hk-not-a-configured-key-42";
    for headers in [
        [("authorization", &*format!("Bearer {wrong}"))],
        [("x-api-key", wrong)],
        [("authorization", &*format!("Basic {PREMIUM}"))],
    ] {
        let reply = embed(&app, &headers).await;
        if headers[0].1.starts_with("Basic") {
            reply.assert_error(StatusCode::UNAUTHORIZED, None, None);
        } else {
            reply.assert_error(StatusCode::UNAUTHORIZED, None, Some("invalid_api_key"));
        }
        assert!(!reply.text.contains(wrong), "the key is never repeated: {}", reply.text);
    }
    // Every model route is keyed, listing included.
    for (method, path) in [(Method::GET, "/v1/models"), (Method::GET, "/v1/models/tiny-embed")] {
        send(&app, method, path, None, &[]).await.assert_error(StatusCode::UNAUTHORIZED, None, None);
    }
    let rerank = json!({"model": "tiny-rerank-bert", "query": "q", "documents": ["d"]});
    send(&app, Method::POST, "/v1/rerank", Some(rerank), &[]).await.assert_error(
        StatusCode::UNAUTHORIZED,
        None,
        None,
    );
}

#[tokio::test]
async fn bearer_and_x_api_key_both_work_and_probes_stay_open() {
    let app = app(&keyed("")).await;
    let bearer = format!("Bearer {PREMIUM}");
    let ok = embed(&app, &[("authorization", &bearer)]).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    assert_eq!(ok.body["data"][0]["embedding"].as_array().unwrap().len(), 32);
    let ok = embed(&app, &[("x-api-key", STANDARD)]).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    assert!(ok.headers.get("x-ratelimit-limit-requests").is_none(), "no limit configured, no header");
    let models = send(&app, Method::GET, "/v1/models", None, &[("authorization", &bearer)]).await;
    assert_eq!(models.status, StatusCode::OK);
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(app.get(path).await.status, StatusCode::OK, "{path} is open");
    }
}

#[tokio::test]
async fn metrics_can_require_a_key() {
    let app = app(&keyed("metrics_require_key = true")).await;
    app.get("/metrics").await.assert_error(StatusCode::UNAUTHORIZED, None, None);
    let metrics = send(&app, Method::GET, "/metrics", None, &[("x-api-key", STANDARD)]).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert_eq!(app.get("/ready").await.status, StatusCode::OK);
}

#[tokio::test]
async fn requests_per_minute_give_openais_headers_then_429() {
    let app = app(&keyed("requests_per_minute = 2")).await;
    let key = [("authorization", &*format!("Bearer {STANDARD}"))];
    let first = embed(&app, &key).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["x-ratelimit-limit-requests"], "2");
    assert_eq!(first.headers["x-ratelimit-remaining-requests"], "1");
    let reset = first.headers["x-ratelimit-reset-requests"].to_str().unwrap();
    assert!(reset.ends_with("ms") || reset.ends_with('s'), "{reset}");
    let second = embed(&app, &key).await;
    assert_eq!(second.headers["x-ratelimit-remaining-requests"], "0");

    let refused = embed(&app, &key).await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, None, Some("rate_limit_exceeded"));
    assert_eq!(refused.body["error"]["type"], "requests");
    assert!(
        refused.message().contains("`batch`") && refused.message().contains("Limit 2"),
        "{}",
        refused.text
    );
    let retry: u64 = refused.headers[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((29..=31).contains(&retry), "2 per minute refill one every 30 s: {retry}");
    assert_eq!(refused.headers["x-ratelimit-remaining-requests"], "0");
    // The other key has a bucket of its own.
    let other = embed(&app, &[("x-api-key", PREMIUM)]).await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.headers["x-ratelimit-remaining-requests"], "1");
}

#[tokio::test]
async fn tokens_per_minute_are_charged_with_the_tokens_really_read() {
    let app = app(&keyed("tokens_per_minute = 10")).await;
    let key = [("x-api-key", STANDARD)];
    let first = embed(&app, &key).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    let used = first.body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(used > 1, "{used}");
    assert_eq!(first.headers["x-ratelimit-limit-tokens"], "10");
    assert_eq!(first.headers["x-ratelimit-remaining-tokens"], "10", "admitted with a full bucket");
    // A long input takes the bucket below zero; the next request waits for it to refill.
    let long =
        json!({"model": "tiny-embed", "input": ["one two three four five six", "seven eight nine ten"]});
    let second = send(&app, Method::POST, "/v1/embeddings", Some(long), &key).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.text);
    let refused = embed(&app, &key).await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, None, Some("rate_limit_exceeded"));
    assert_eq!(refused.body["error"]["type"], "tokens");
    assert_eq!(refused.headers["x-ratelimit-remaining-tokens"], "0");
    assert!(refused.headers[header::RETRY_AFTER].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    // Rerank tokens count too, for the other key.
    let rerank =
        json!({"model": "tiny-rerank-bert", "query": "a question", "documents": ["an answer", "another"]});
    let other = [("x-api-key", PREMIUM)];
    let scored = send(&app, Method::POST, "/v1/rerank", Some(rerank.clone()), &other).await;
    assert_eq!(scored.status, StatusCode::OK, "{}", scored.text);
    let after = send(&app, Method::POST, "/v1/rerank", Some(rerank), &other).await;
    assert_eq!(after.status, StatusCode::TOO_MANY_REQUESTS, "{}", after.text);
}

#[tokio::test]
async fn a_keys_file_adds_keys_with_classes_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api-keys");
    std::fs::write(&path, "# ops keys\nhk-from-the-file-0123456789 ops class=premium rpm=1\n").unwrap();
    let app = app(&keyed(&format!("keys_file = \"{}\"", path.display()))).await;
    let key = [("authorization", "Bearer hk-from-the-file-0123456789")];
    let ok = embed(&app, &key).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    assert_eq!(ok.headers["x-ratelimit-limit-requests"], "1");
    assert_eq!(embed(&app, &key).await.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(embed(&app, &[("x-api-key", PREMIUM)]).await.status, StatusCode::OK, "config keys stay");
}

#[test]
fn bad_auth_config_is_refused_without_echoing_keys() {
    let parse = |auth: &str| {
        hearth::config::Config::parse(&format!("[auth]\n{auth}"), None, &Default::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let short = parse("[[auth.keys]]\nkey = \"tiny-secret\"\n");
    assert!(short.contains("auth.keys[0].key") && short.contains("16"), "{short}");
    assert!(!short.contains("tiny-secret"), "{short}");
    assert!(parse("[[auth.keys]]\nname = \"x\"\n").contains("exactly one of `key` and `sha256`"));
    assert!(parse("[[auth.keys]]\nsha256 = \"abc\"\n").contains("64 hex digits"));
    assert!(
        parse(&format!("[[auth.keys]]\nkey = \"{PREMIUM}\"\nclass = \"gold\"\n")).contains("unknown variant")
    );
    let twice = parse(&format!("[[auth.keys]]\nkey = \"{PREMIUM}\"\n[[auth.keys]]\nkey = \"{PREMIUM}\"\n"));
    assert!(twice.contains("listed twice") && !twice.contains(PREMIUM), "{twice}");
    assert!(parse("requests_per_minute = 0").contains("at least 1"));
    assert!(parse("keys_file = \"/nonexistent/keys\"").contains("cannot read the keys file"));
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("keys");
    std::fs::write(&empty, "# nothing yet\n").unwrap();
    assert!(parse(&format!("keys_file = \"{}\"", empty.display())).contains("holds no keys"));
    let config = hearth::config::Config::parse(&keyed(""), None, &Default::default()).unwrap();
    let shown = format!("{config:?}");
    assert!(!shown.contains(PREMIUM) && !shown.contains(STANDARD), "a config dump shows no key");
}
