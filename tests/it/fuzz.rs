//! Property-based fuzzing (proptest) of what strangers control: request bodies on every POST route,
//! the config file, and the API keys file. Each case must end in a success or an OpenAI-shaped
//! client error, at once: never a panic, a 500 or a hang. Cases are generated from the real field
//! names and value shapes (so they get past the first check), plus raw bytes.
//!
//! `PROPTEST_CASES` sets the number of cases per property (256 by default, as CI runs them). A
//! failing case is shrunk and saved under `tests/fuzz-regressions/` (kept in git, replayed first on
//! every run), so each bug found stays a test.

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence};
use serde_json::{json, Value};

use crate::support::{app, tiny_config, App};

/// One server for all cases (the tiny models, loaded once) and the runtime it lives on.
fn server() -> &'static (tokio::runtime::Runtime, App) {
    static SERVER: OnceLock<(tokio::runtime::Runtime, App)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let app = runtime.block_on(app(&tiny_config("")));
        (runtime, app)
    })
}

const ROUTES: &[&str] =
    &["/v1/embeddings", "/v1/rerank", "/rerank", "/v1/chat/completions", "/v1/completions"];

const FIELDS: &[&str] = &[
    "model",
    "input",
    "query",
    "documents",
    "top_n",
    "return_documents",
    "dimensions",
    "encoding_format",
    "messages",
    "role",
    "content",
    "text",
    "type",
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "stream_options",
    "include_usage",
    "n",
    "temperature",
    "top_p",
    "prompt",
    "stop",
    "seed",
    "logit_bias",
    "user",
    "truncate",
];

const MODELS: &[&str] = &["tiny-embed", "tiny-xlmr-embed", "tiny-rerank-bert", "tiny-shared-bi", "nope", ""];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![4 => prop::sample::select(FIELDS).prop_map(str::to_owned), 1 => "[a-z_]{0,12}"]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        prop_oneof![Just(0u64), Just(1), Just(2), Just(u64::MAX), 0..100_000u64].prop_map(Value::from),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(Value::from),
        prop::sample::select(MODELS).prop_map(Value::from),
        "\\PC{0,40}".prop_map(Value::from),
        prop::sample::select(&["float", "base64", "user", "system", "assistant", "tool", "text"][..])
            .prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..8)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,60}",
        1 => Just(String::new()),
        1 => "(the quick brown fox ){10,80}",
        1 => "[\\u{0}-\\u{ff}]{0,30}",
    ]
}

fn token_ids() -> impl Strategy<Value = Value> {
    prop::collection::vec(prop_oneof![0..2_000u64, Just(u64::from(u32::MAX)), Just(u64::MAX)], 0..12)
        .prop_map(|ids| json!(ids))
}

/// A well-formed request for one of the routes, with values of the right types but any size and
/// content (empty, long, Unicode, out-of-range numbers).
fn well_formed(route: &'static str) -> BoxedStrategy<Value> {
    let served: &'static [&'static str] = match route {
        "/v1/embeddings" => &["tiny-embed", "tiny-xlmr-embed"],
        "/v1/rerank" | "/rerank" => &["tiny-rerank-bert", "tiny-rerank-xlmr", "tiny-bi", "tiny-shared-bi"],
        _ => MODELS,
    };
    let model = prop_oneof![5 => prop::sample::select(served), 1 => prop::sample::select(MODELS)];
    let small = prop_oneof![Just(0i64), Just(1), Just(3), Just(-1), 0..5_000i64, Just(i64::MAX)];
    match route {
        "/v1/embeddings" => (
            model,
            prop_oneof![
                text().prop_map(Value::from),
                prop::collection::vec(text(), 0..20).prop_map(|t| json!(t)),
                token_ids(),
                prop::collection::vec(token_ids(), 0..5).prop_map(Value::Array),
            ],
            prop::option::of(small.clone()),
            prop::option::of(prop::sample::select(&["float", "base64", "int8"][..])),
        )
            .prop_map(|(model, input, dimensions, format)| {
                let mut body = json!({"model": model, "input": input});
                if let Some(d) = dimensions {
                    body["dimensions"] = json!(d);
                }
                if let Some(f) = format {
                    body["encoding_format"] = json!(f);
                }
                body
            })
            .boxed(),
        "/v1/rerank" | "/rerank" => (
            model,
            text(),
            prop::collection::vec(prop_oneof![text().prop_map(Value::from), text().prop_map(|t| json!({"text": t}))], 0..20),
            prop::option::of(small.clone()),
            any::<bool>(),
        )
            .prop_map(|(model, query, documents, top_n, return_documents)| {
                let mut body = json!({"model": model, "query": query, "documents": documents, "return_documents": return_documents});
                if let Some(n) = top_n {
                    body["top_n"] = json!(n);
                }
                body
            })
            .boxed(),
        "/v1/chat/completions" => (
            model,
            prop::collection::vec(
                (prop::sample::select(&["system", "developer", "user", "assistant", "tool"][..]), text()),
                0..5,
            ),
            prop::option::of(small.clone()),
            any::<bool>(),
        )
            .prop_map(|(model, messages, max_tokens, stream)| {
                let messages: Vec<Value> = messages.into_iter().map(|(r, c)| json!({"role": r, "content": c})).collect();
                let mut body = json!({"model": model, "messages": messages, "stream": stream});
                if let Some(m) = max_tokens {
                    body["max_tokens"] = json!(m);
                }
                body
            })
            .boxed(),
        _ => (model, prop_oneof![text().prop_map(Value::from), token_ids()], prop::option::of(small))
            .prop_map(|(model, prompt, max_tokens)| {
                let mut body = json!({"model": model, "prompt": prompt});
                if let Some(m) = max_tokens {
                    body["max_tokens"] = json!(m);
                }
                body
            })
            .boxed(),
    }
}

/// A route and a request for it: well formed, or well formed with one field replaced by any
/// value, removed, or added.
fn request() -> impl Strategy<Value = (&'static str, Value)> {
    prop::sample::select(ROUTES).prop_flat_map(|route| {
        let mutation = prop_oneof![
            3 => Just(None),
            1 => (key(), value()).prop_map(|(k, v)| Some((k, Some(v)))),
            1 => key().prop_map(|k| Some((k, None))),
        ];
        (Just(route), well_formed(route), mutation).prop_map(|(route, mut body, mutation)| {
            if let (Some((key, value)), Some(object)) = (mutation, body.as_object_mut()) {
                match value {
                    Some(value) => object.insert(key, value),
                    None => object.remove(&key),
                };
            }
            (route, body)
        })
    })
}

fn send(path: &str, body: Vec<u8>, content_type: &str) -> (u16, Value, String) {
    let (runtime, app) = server();
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .unwrap();
    let reply = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(20), app.send(request)).await })
        .expect("every request is answered (no hang)");
    (reply.status.as_u16(), reply.body, reply.text)
}

/// A success, or an OpenAI-shaped error that is the client's (4xx) or a refusal (429, 503).
fn check(status: u16, body: &Value, text: &str) -> Result<(), TestCaseError> {
    prop_assert!(status != 500 && status < 600, "status {status}: {text}");
    if status >= 400 {
        let error = &body["error"];
        prop_assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{status}: {text}");
        prop_assert!(error["type"].is_string(), "{text}");
        prop_assert!(error.get("param").is_some() && error.get("code").is_some(), "{text}");
        prop_assert_eq!(error.as_object().map(|o| o.len()), Some(4), "{}", text);
    }
    Ok(())
}

fn settings() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/fuzz-regressions/it.txt"))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(settings())]

    #[test]
    fn request_bodies_built_from_real_fields_get_an_answer_never_a_500((route, body) in request()) {
        let (status, reply, text) = send(route, body.to_string().into_bytes(), "application/json");
        check(status, &reply, &text)?;
    }

    #[test]
    fn arbitrary_bytes_and_json_get_an_answer_never_a_500(
        route in prop::sample::select(ROUTES),
        raw in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            value().prop_map(|v| v.to_string().into_bytes()),
        ],
        content_type in prop::sample::select(&["application/json", "text/plain", "application/x-www-form-urlencoded"][..]),
    ) {
        let (status, reply, text) = send(route, raw, content_type);
        check(status, &reply, &text)?;
    }
}

/// Config files assembled from real tables and keys with values of every TOML shape.
fn config_text() -> impl Strategy<Value = String> {
    let tables = prop::sample::select(
        &["", "[server]", "[logging]", "[auth]", "[[models]]", "[[auth.keys]]", "[server.x]", "[[models.x]]"]
            [..],
    );
    let keys = prop::sample::select(
        &[
            "id",
            "kind",
            "preset",
            "source",
            "files",
            "device",
            "dtype",
            "host",
            "port",
            "keep_alive",
            "preload",
            "max_queue_wait_ms",
            "queue_depth",
            "max_batch_tokens",
            "pooling",
            "truncate",
            "embedding_model",
            "keys_file",
            "key",
            "sha256",
            "class",
            "admin",
            "requests_per_minute",
            "models_memory_mib",
            "cors_allowed_origins",
            "allowed_hosts",
            "format",
            "level",
            "context_length",
            "kv_cache_type",
            "junk",
        ][..],
    );
    let values = prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        any::<bool>().prop_map(|v| v.to_string()),
        "\\PC{0,24}".prop_map(|s| format!("{s:?}")),
        prop::sample::select(
            &[
                "\"embedding\"",
                "\"rerank\"",
                "\"llm\"",
                "\"cpu\"",
                "\"5m\"",
                "\"../x\"",
                "\"hf:a/b\"",
                "[]",
                "[\"*\"]",
                "{}"
            ][..]
        )
        .prop_map(str::to_owned),
    ];
    prop::collection::vec((tables, prop::collection::vec((keys, values), 0..5)), 0..6).prop_map(|sections| {
        sections
            .into_iter()
            .map(|(table, pairs)| {
                let body: String = pairs.into_iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
                format!("{table}\n{body}")
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(settings())]

    #[test]
    fn config_files_are_validated_or_refused_with_a_message(text in config_text()) {
        match hearth::config::Config::parse(&text, None, &Default::default()) {
            Ok(_) => {}
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn keys_files_never_echo_a_key(lines in prop::collection::vec("[ -~]{0,60}", 0..6)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, lines.join("\n")).unwrap();
        let text = format!("[auth]\nkeys_file = {:?}\n", path.display().to_string());
        if let Err(e) = hearth::config::Config::parse(&text, None, &Default::default()) {
            let message = e.to_string();
            for line in &lines {
                // The first field of a line is its key; no message may repeat a plausible one.
                if let Some(key) = line.split_whitespace().next().filter(|k| k.len() >= 16 && !k.starts_with('#')) {
                    prop_assert!(!message.contains(key), "{message}");
                }
            }
        }
    }
}
