//! Shared test plumbing: apps built from TOML over the tiny fixture models, and request helpers
//! that go through the real router without sockets.

use std::path::PathBuf;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use hearth::config::{Config, Overrides};
use hearth::server::load_models;
use hearth::state::AppState;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// The models directory holding the real offline weights (`scripts/fetch-models`):
/// `HEARTH_MODELS_DIR`, else Hearth's default.
#[cfg(feature = "real-weights")]
pub fn models_root() -> PathBuf {
    std::env::var_os("HEARTH_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(hearth::config::default_models_dir)
}

/// The models directory of the tiny fixture models.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

pub fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A config serving the tiny fixtures: two embedders, two cross-encoders, one bi-encoder reranker
/// with weights of its own, and one sharing `tiny-embed`'s; on candle.
pub fn tiny_config(extra: &str) -> String {
    tiny_config_on(Backend::Candle, extra)
}

/// What runs the tiny encoders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// candle on the fixtures' safetensors.
    Candle,
    /// ONNX Runtime on the fixtures' `NAME-onnx` twins (the same weights exported by
    /// scripts/export-bert-onnx, checked against the same references).
    #[cfg_attr(not(all(feature = "real-weights", feature = "onnx")), allow(dead_code))]
    Onnx,
}

/// Every backend this build can run the tiny encoders on: candle, and ONNX Runtime where the build
/// has it and `scripts/fetch-models` has installed its library (`real-weights`).
pub const BACKENDS: &[Backend] = &[
    Backend::Candle,
    #[cfg(all(feature = "real-weights", feature = "onnx"))]
    Backend::Onnx,
];

/// The tiny app once per backend in [`BACKENDS`]: the same tests, and the same answers, on each.
pub async fn tiny_apps() -> Vec<(Backend, App)> {
    let mut apps = Vec::new();
    for &backend in BACKENDS {
        apps.push((backend, app(&tiny_config_on(backend, "")).await));
    }
    apps
}

/// [`tiny_config`] on `backend`.
pub fn tiny_config_on(backend: Backend, extra: &str) -> String {
    let (twin, server) = match backend {
        Backend::Candle => ("", String::new()),
        Backend::Onnx => (
            "-onnx",
            format!(
                "onnxruntime_library = \"{}\"",
                std::env::var_os("ORT_DYLIB_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(hearth::config::default_onnxruntime_library)
                    .display()
            ),
        ),
    };
    format!(
        r#"
        models_dir = "{models_dir}"

        [server]
        max_request_body_bytes = 65536
        {server}

        [[models]]
        id = "tiny-embed"
        kind = "embedding"
        source = "tiny-bert-embed{twin}"
        device = "cpu"

        [[models]]
        id = "tiny-xlmr-embed"
        kind = "embedding"
        source = "tiny-xlmr-embed{twin}"
        device = "cpu"

        [[models]]
        id = "tiny-rerank-bert"
        kind = "rerank"
        source = "tiny-bert-reranker{twin}"
        device = "cpu"

        [[models]]
        id = "tiny-rerank-xlmr"
        kind = "rerank"
        source = "tiny-xlmr-reranker{twin}"
        device = "cpu"

        [[models]]
        id = "tiny-bi"
        kind = "rerank"
        source = "tiny-bert-embed{twin}"
        device = "cpu"

        [[models]]
        id = "tiny-shared-bi"
        kind = "rerank"
        embedding_model = "tiny-embed"
        {extra}
        "#,
        models_dir = fixtures().display(),
    )
}

pub struct App {
    pub router: Router,
    pub state: AppState,
}

/// Builds the app from `toml` and loads every model before returning.
pub async fn app(toml: &str) -> App {
    let state = unloaded(toml);
    load_models(state.clone()).await;
    App { router: hearth::http::router(state.clone()), state }
}

/// The app with every model still in the loading state.
pub fn unloaded(toml: &str) -> AppState {
    let config = Config::parse(toml, None, &Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
    AppState::new(config).unwrap()
}

pub async fn tiny_app() -> App {
    app(&tiny_config("")).await
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
    /// The raw body (audio); read by the speech tests, which need `--features tts`.
    #[cfg_attr(not(feature = "tts"), allow(dead_code))]
    pub bytes: Vec<u8>,
}

impl App {
    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply { status, headers, body, text, bytes: bytes.to_vec() }
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.post_raw(path, body.to_string(), Some("application/json")).await
    }

    pub async fn post_raw(&self, path: &str, body: impl Into<Body>, content_type: Option<&str>) -> Reply {
        let mut request = Request::builder().method(Method::POST).uri(path);
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        self.send(request.body(body.into()).unwrap()).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Request::builder().uri(path).body(Body::empty()).unwrap()).await
    }
}

impl Reply {
    /// Asserts an OpenAI-shaped error with this status, `param` and `code`.
    #[track_caller]
    pub fn assert_error(&self, status: StatusCode, param: Option<&str>, code: Option<&str>) {
        assert_eq!(self.status, status, "{}", self.text);
        let error = &self.body["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", self.text);
        assert!(error["type"].as_str().is_some(), "{}", self.text);
        assert_eq!(error["param"].as_str(), param, "{}", self.text);
        assert_eq!(error["code"].as_str(), code, "{}", self.text);
        let keys: Vec<&String> = error.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 4, "exactly message, type, param, code: {}", self.text);
    }

    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

pub fn floats(value: &Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

pub use hearth_engine::vector::normalized as unit;

#[track_caller]
pub fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32) {
    assert_eq!(actual.len(), expected.len());
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= tolerance, "[{i}]: {a} vs {e}");
    }
}

const BOUNDARY: &str = "hearth-test-boundary-7f3a";

/// A `multipart/form-data` body with the text `fields`, then `file` (name, bytes) when given.
pub fn form(file: Option<(&str, &[u8])>, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    if let Some((filename, bytes)) = file {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// POSTs a [`form`] body.
pub async fn post_form(app: &App, path: &str, body: Vec<u8>) -> Reply {
    app.post_raw(path, body, Some(&format!("multipart/form-data; boundary={BOUNDARY}"))).await
}
