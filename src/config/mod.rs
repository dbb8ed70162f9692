//! Configuration in two steps: the TOML file is parsed, keeping every value's position, then
//! validated into a typed [`Config`] the rest of the program trusts. Unknown keys are errors, and
//! every error names the file, the field, what is allowed and the line.
//!
//! Model entries are shaped per kind (see [`model`]): an entry's table is merged with its preset's
//! `[defaults]` first, then read once into the options of the entry's kind.

mod auth;
mod model;
pub mod rag;
pub mod reference;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

pub use self::auth::{ApiKey, AuthConfig, AuthOverrides, KeyClass, KeyDigest, RateLimits, Secret};
pub use self::model::{
    parse_source, DecoderWeights, EncoderBackend, EncoderConfig, EncoderWeights, KeepAlive, KindConfig,
    KvCacheType, LlmConfig, ModelConfig, ModelSource, RerankConfig, ScoringChoice, SttBackend, SttConfig,
    TextConfig, TtsConfig, Weights, DEFAULT_ENCODER_FILES, DEFAULT_LLM_FILES, DEFAULT_STT_FILES,
    DEFAULT_TTS_FILES,
};

/// A configuration problem: where, and what is wrong.
#[derive(Debug)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "`{}`: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { file: None, field: field.into(), message: message.into() }
}

// ---------------------------------------------------------------------------------------------
// Step 1: the file as written (without `[[models]]`, which `model` reads per kind).

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    models_dir: Option<String>,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    logging: RawLogging,
    #[serde(default)]
    auth: auth::RawAuth,
    rag: Option<rag::RawRag>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    host: Option<String>,
    port: Option<u16>,
    max_request_body_bytes: Option<usize>,
    max_concurrent_requests_per_route: Option<usize>,
    max_concurrent_requests: Option<usize>,
    queue_depth: Option<usize>,
    max_inputs_per_request: Option<usize>,
    max_tokens_per_request: Option<usize>,
    max_queue_wait_ms: Option<u64>,
    keep_alive: Option<model::RawKeepAlive>,
    model_load_timeout_secs: Option<u64>,
    models_memory_mib: Option<f64>,
    preprocess_threads: Option<usize>,
    preprocess_queue_depth: Option<usize>,
    allowed_hosts: Option<Vec<String>>,
    cors_allowed_origins: Option<Vec<String>>,
    shutdown_timeout_secs: Option<u64>,
    request_timeout_secs: Option<u64>,
    routes: Option<std::collections::BTreeMap<String, RawRoute>>,
    onnxruntime_library: Option<String>,
}

/// `[server.routes."/v1/…"]`: one route's own limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    max_request_body_bytes: Option<usize>,
    max_concurrent_requests: Option<usize>,
    request_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    format: Option<LogFormat>,
    level: Option<String>,
    otlp_endpoint: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Step 2: the validated configuration.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub max_request_body_bytes: usize,
    /// Requests in flight per route (from before their body is read); more get 429 at once.
    pub max_concurrent_requests_per_route: usize,
    /// Threads for tokenization and other CPU-bound request work.
    pub preprocess_threads: usize,
    /// Tasks waiting for those threads; more get 429 at once.
    pub preprocess_queue_depth: usize,
    /// `Host` names accepted besides loopback names and IP addresses (DNS-rebinding protection).
    pub allowed_hosts: Vec<String>,
    /// `*`, or origins as `scheme://host[:port]`; empty: CORS off.
    pub cors_allowed_origins: Vec<String>,
    /// How long queued work may run after SIGTERM before it is answered 503.
    pub shutdown_timeout: Duration,
    /// How long a request waits for its model to load on demand before a 503.
    pub model_load_timeout: Duration,
    /// Estimated bytes all loaded models may take together; `None`: no limit.
    pub models_memory_budget: Option<u64>,
    /// ONNX Runtime's shared library (`libonnxruntime.so`), which `tts` voices run on: the
    /// config's path, else `ORT_DYLIB_PATH`, else where `scripts/fetch-models` puts it.
    pub onnxruntime_library: PathBuf,
    /// The limits of each model route (the server-wide values, unless `[server.routes]` says more).
    pub routes: std::collections::BTreeMap<&'static str, RouteLimits>,
}

/// The model routes, whose limits `[server.routes."…"]` may set.
pub const MODEL_ROUTES: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/rerank",
    "/rerank",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/audio/speech",
];

/// The routes that take uploads (multipart audio files).
pub const UPLOAD_ROUTES: &[&str] = &["/v1/audio/transcriptions", "/v1/audio/translations"];

/// The body limit of the upload routes unless `[server.routes]` sets one: OpenAI's 25 MiB per
/// file, plus room for the form's other fields.
pub const DEFAULT_UPLOAD_BODY_BYTES: usize = 26 * 1024 * 1024;

/// One route's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteLimits {
    pub max_request_body_bytes: usize,
    /// Requests in flight on the route, counted before the body is read; more get 429.
    pub max_concurrent_requests: usize,
    /// Until the response starts (a stream's body is bounded by its tokens); `None`: no limit.
    pub request_timeout: Option<Duration>,
}

impl ServerConfig {
    /// The limits of `route` (one of [`MODEL_ROUTES`]).
    pub fn route(&self, route: &str) -> RouteLimits {
        self.routes.get(route).copied().unwrap_or(RouteLimits {
            max_request_body_bytes: if UPLOAD_ROUTES.contains(&route) {
                DEFAULT_UPLOAD_BODY_BYTES
            } else {
                self.max_request_body_bytes
            },
            max_concurrent_requests: self.max_concurrent_requests_per_route,
            request_timeout: None,
        })
    }
}

impl ServerConfig {
    /// Whether the listen address is a loopback one (`127.0.0.0/8`, `::1`, `localhost`).
    pub fn listens_on_loopback(&self) -> bool {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        host.eq_ignore_ascii_case("localhost")
            || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggingConfig {
    pub format: LogFormat,
    pub level: String,
    /// OTLP/HTTP collector base URL (`http://collector:4318`); needs the `otlp` feature.
    pub otlp_endpoint: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub file: Option<PathBuf>,
    pub models_dir: PathBuf,
    pub server: ServerConfig,
    pub logging: LoggingConfig,
    pub auth: AuthConfig,
    pub models: Vec<ModelConfig>,
    /// Files and vector stores, when `[rag]` is present.
    pub rag: Option<rag::RagConfig>,
}

pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const DEFAULT_PORT: u16 = 8080;
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 16 * 1024 * 1024;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS_PER_ROUTE: usize = 64;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 512;
pub const DEFAULT_QUEUE_DEPTH: usize = 256;
pub const DEFAULT_MAX_INPUTS_PER_REQUEST: usize = 2048;
pub const DEFAULT_MAX_TOKENS_PER_REQUEST: usize = 300_000;
pub const DEFAULT_PREPROCESS_QUEUE_DEPTH: usize = 1024;
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_MODEL_LOAD_TIMEOUT_SECS: u64 = 300;
/// A request whose response has not started after this long gets 504.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 600;
/// An encoder refuses (429) a request that the work ahead would keep waiting longer than this.
pub const DEFAULT_MAX_QUEUE_WAIT_MS: u64 = 2_000;

/// Values from the command line or environment; they override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub models_dir: Option<PathBuf>,
    /// `--data-dir` / `HEARTH_DATA_DIR`: where `[rag]` keeps files and vector stores.
    pub data_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub auth: AuthOverrides,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            field: String::new(),
            message: format!("cannot read the config file: {e}"),
        })?;
        Self::parse(&text, Some(path), overrides)
    }

    pub fn parse(text: &str, file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = parse(text, file, overrides).map_err(|mut e| {
            e.file = file.map(Path::to_owned);
            e
        })?;
        config.file = file.map(Path::to_owned);
        Ok(config)
    }
}

/// Where a table being read came from, for error positions.
#[derive(Clone, Copy)]
pub(crate) struct Origin<'a> {
    /// The config file's text (spans index into it).
    text: &'a str,
    /// Keys whose values came from this preset's `[defaults]`, not from the file.
    preset: Option<(&'a str, &'a [String])>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Reads `table` into `T`, naming the failing field as `{prefix}{path}` and saying where it was set.
fn read<T: DeserializeOwned>(
    table: Spanned<DeTable<'_>>,
    origin: Origin,
    prefix: &str,
) -> Result<T, ConfigError> {
    let deserializer = toml::de::Deserializer::from(table);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.message().trim_end().to_string();
        let key = path.split(['.', '[']).next().unwrap_or("");
        let located = match (origin.preset, inner.span()) {
            (Some((preset, keys)), _) if keys.iter().any(|k| k == key) => {
                format!("{message} (set by preset `{preset}`)")
            }
            (_, Some(span)) => format!("{message} (line {})", line_of(origin.text, span.start)),
            (_, None) => message,
        };
        let field =
            if path == "." { prefix.trim_end_matches('.').to_string() } else { format!("{prefix}{path}") };
        invalid(field, located)
    })
}

/// Refuses keys of `table` not in `allowed`, naming the key and its line.
fn check_keys(
    table: &DeTable<'_>,
    allowed: &[&str],
    origin: Origin,
    prefix: &str,
    what: &str,
) -> Result<(), ConfigError> {
    for (key, value) in table.iter() {
        if !allowed.contains(&key.get_ref().as_ref()) {
            let listed = allowed.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
            return Err(invalid(
                format!("{prefix}{}", key.get_ref()),
                format!(
                    "unknown field `{}`; {what} take {listed} (line {})",
                    key.get_ref(),
                    line_of(origin.text, value.span().start)
                ),
            ));
        }
    }
    Ok(())
}

fn parse(text: &str, file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
    let mut root = DeTable::parse(text)
        .map_err(|e| invalid("", format!("invalid TOML: {}", e.to_string().trim_end())))?;
    let origin = Origin { text, preset: None };
    let entries = match root.get_mut().remove("models") {
        None => Vec::new(),
        Some(models) => {
            let span = models.span();
            match models.into_inner() {
                DeValue::Array(items) => items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| {
                        let span = item.span();
                        match item.into_inner() {
                            DeValue::Table(table) => Ok(Spanned::new(span, table)),
                            _ => Err(invalid(format!("models[{i}]"), "must be a table (`[[models]]`)")),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                _ => Err(invalid(
                    "models",
                    format!("must be an array of tables (`[[models]]`) (line {})", line_of(text, span.start)),
                ))?,
            }
        }
    };
    let raw: RawConfig = read(root, origin, "")?;
    let models_dir = match (&overrides.models_dir, &raw.models_dir) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => expand_home(dir),
        (None, None) => default_models_dir(),
    };
    let server = &raw.server;
    let defaults = model::Defaults {
        max_concurrent_requests: positive(
            "server.max_concurrent_requests",
            server.max_concurrent_requests,
            DEFAULT_MAX_CONCURRENT_REQUESTS,
        )?,
        queue_depth: positive("server.queue_depth", server.queue_depth, DEFAULT_QUEUE_DEPTH)?,
        max_inputs_per_request: positive(
            "server.max_inputs_per_request",
            server.max_inputs_per_request,
            DEFAULT_MAX_INPUTS_PER_REQUEST,
        )?,
        max_tokens_per_request: positive(
            "server.max_tokens_per_request",
            server.max_tokens_per_request,
            DEFAULT_MAX_TOKENS_PER_REQUEST,
        )?,
        max_queue_wait: match server.max_queue_wait_ms.unwrap_or(DEFAULT_MAX_QUEUE_WAIT_MS) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        },
        keep_alive: match &server.keep_alive {
            None => KeepAlive::Forever,
            Some(raw) => raw.parse().map_err(|m| invalid("server.keep_alive", m))?,
        },
    };
    let available = std::thread::available_parallelism().map_or(2, |n| n.get());
    let server_config = ServerConfig {
        host: overrides.host.clone().or(server.host.clone()).unwrap_or_else(|| DEFAULT_HOST.into()),
        port: overrides.port.or(server.port).unwrap_or(DEFAULT_PORT),
        max_request_body_bytes: positive(
            "server.max_request_body_bytes",
            server.max_request_body_bytes,
            DEFAULT_MAX_REQUEST_BODY_BYTES,
        )?,
        max_concurrent_requests_per_route: positive(
            "server.max_concurrent_requests_per_route",
            server.max_concurrent_requests_per_route,
            DEFAULT_MAX_CONCURRENT_REQUESTS_PER_ROUTE,
        )?,
        preprocess_threads: positive("server.preprocess_threads", server.preprocess_threads, available)?,
        preprocess_queue_depth: positive(
            "server.preprocess_queue_depth",
            server.preprocess_queue_depth,
            DEFAULT_PREPROCESS_QUEUE_DEPTH,
        )?,
        allowed_hosts: validate_hosts(server.allowed_hosts.clone().unwrap_or_default())?,
        cors_allowed_origins: validate_origins(server.cors_allowed_origins.clone().unwrap_or_default())?,
        shutdown_timeout: Duration::from_secs(
            server.shutdown_timeout_secs.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_SECS),
        ),
        model_load_timeout: Duration::from_secs(
            server.model_load_timeout_secs.unwrap_or(DEFAULT_MODEL_LOAD_TIMEOUT_SECS),
        ),
        routes: BTreeMap::new(),
        onnxruntime_library: server
            .onnxruntime_library
            .as_deref()
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
            .unwrap_or_else(default_onnxruntime_library),
        models_memory_budget: match server.models_memory_mib {
            None => None,
            Some(mib) if mib.is_finite() && mib > 0.0 => Some((mib * 1_048_576.0) as u64),
            Some(_) => return Err(invalid("server.models_memory_mib", "must be a positive number of MiB")),
        },
    };
    let mut server_config = server_config;
    server_config.routes = route_limits(&server_config, server)?;
    let logging = LoggingConfig {
        format: overrides.log_format.or(raw.logging.format).unwrap_or_default(),
        level: overrides.log_level.clone().or(raw.logging.level).unwrap_or_else(|| "info".into()),
        otlp_endpoint: match raw.logging.otlp_endpoint {
            Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => {
                return Err(invalid(
                    "logging.otlp_endpoint",
                    format!("`{url}` is not an http:// or https:// URL (e.g. `http://otel-collector:4318`)"),
                ))
            }
            other => other,
        },
    };
    let mut models: Vec<ModelConfig> = Vec::with_capacity(entries.len());
    let mut seen = HashSet::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let validated = model::parse_entry(i, entry, origin, &models_dir, &defaults)?;
        if !seen.insert(Arc::clone(&validated.id)) {
            return Err(invalid(
                format!("models[{i}].id"),
                format!("`{}` is used by another model", validated.id),
            ));
        }
        models.push(validated);
    }
    model::check_references(&models)?;
    let auth = auth::validate(raw.auth, &overrides.auth, file)?;
    let mut rag = raw.rag.map(|r| rag::validate(r, &models)).transpose()?;
    if let (Some(rag), Some(dir)) = (&mut rag, &overrides.data_dir) {
        rag.data_dir = dir.clone();
    }
    Ok(Config { file: None, models_dir, server: server_config, logging, auth, models, rag })
}

/// Every model route's limits: the server-wide ones, overridden per route by `[server.routes]`.
fn route_limits(
    server: &ServerConfig,
    raw: &RawServer,
) -> Result<BTreeMap<&'static str, RouteLimits>, ConfigError> {
    // Seconds; 0: no limit.
    let timeout = |secs: Option<u64>, default: Option<Duration>| match secs {
        Some(0) => None,
        Some(s) => Some(Duration::from_secs(s)),
        None => default,
    };
    let default_timeout =
        timeout(raw.request_timeout_secs, Some(Duration::from_secs(DEFAULT_REQUEST_TIMEOUT_SECS)));
    let routes = raw.routes.as_ref();
    if let Some(unknown) = routes.and_then(|r| r.keys().find(|k| !MODEL_ROUTES.contains(&k.as_str()))) {
        let known = MODEL_ROUTES.iter().map(|r| format!("`{r}`")).collect::<Vec<_>>().join(", ");
        return Err(invalid(
            format!("server.routes.\"{unknown}\""),
            format!("`{unknown}` is not a model route; routes with their own limits: {known}"),
        ));
    }
    MODEL_ROUTES
        .iter()
        .map(|&route| {
            let own = routes.and_then(|r| r.get(route));
            let field = |name: &str| format!("server.routes.\"{route}\".{name}");
            let limits = RouteLimits {
                max_request_body_bytes: positive(
                    &field("max_request_body_bytes"),
                    own.and_then(|o| o.max_request_body_bytes),
                    if UPLOAD_ROUTES.contains(&route) {
                        DEFAULT_UPLOAD_BODY_BYTES
                    } else {
                        server.max_request_body_bytes
                    },
                )?,
                max_concurrent_requests: positive(
                    &field("max_concurrent_requests"),
                    own.and_then(|o| o.max_concurrent_requests),
                    server.max_concurrent_requests_per_route,
                )?,
                request_timeout: timeout(own.and_then(|o| o.request_timeout_secs), default_timeout),
            };
            Ok((route, limits))
        })
        .collect()
}

/// A count that must be at least 1; `default` when unset.
fn positive(field: &str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value {
        Some(0) => Err(invalid(field, "must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

/// `Host` names: DNS names (letters, digits, `-`, `.`), compared case-insensitively, without ports.
fn validate_hosts(hosts: Vec<String>) -> Result<Vec<String>, ConfigError> {
    hosts
        .into_iter()
        .map(|host| {
            let ok = !host.is_empty()
                && !host.starts_with(['.', '-'])
                && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if ok {
                Ok(host.to_ascii_lowercase())
            } else {
                Err(invalid(
                    "server.allowed_hosts",
                    format!("`{host}` is not a host name; use names like `hearth.example.com` (no scheme, port or path)"),
                ))
            }
        })
        .collect()
}

/// Origins a browser sends: `scheme://host[:port]`, `http` or `https`, nothing after; or `*` alone.
fn validate_origins(origins: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let field = "server.cors_allowed_origins";
    if origins.iter().any(|o| o == "*") {
        return if origins.len() == 1 {
            Ok(origins)
        } else {
            Err(invalid(field, "`*` allows every origin; list origins or `*`, not both"))
        };
    }
    for origin in &origins {
        let fail = |why: &str| {
            invalid(field, format!("`{origin}` is not an origin ({why}); use `scheme://host[:port]`, e.g. `https://app.example.com`"))
        };
        let rest = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .ok_or_else(|| fail("the scheme must be http or https"))?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, _)) if !host.ends_with(']') && host.contains(':') => (rest, None),
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        };
        if host.is_empty() {
            return Err(fail("no host"));
        }
        let ipv6 = host.starts_with('[') && host.ends_with(']');
        let host_ok = ipv6 || host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !host_ok {
            return Err(fail("a path, query, user or character a host cannot have"));
        }
        if let Some(port) = port {
            if port.parse::<u16>().is_err() {
                return Err(fail("the port is not a number up to 65535"));
            }
        }
        if HeaderValue::from_str(origin).is_err() {
            return Err(fail("not a valid header value"));
        }
    }
    Ok(origins)
}

pub(crate) fn expand_home(text: &str) -> PathBuf {
    match (text.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(text),
    }
}

/// `$HEARTH_MODELS_DIR` is handled by the CLI; this is the fallback.
/// Where `scripts/fetch-models onnxruntime` installs ONNX Runtime: `$HEARTH_LIB_DIR`, else
/// `~/.cache/hearth/lib`.
pub fn default_onnxruntime_library() -> PathBuf {
    let dir = std::env::var_os("HEARTH_LIB_DIR").map(PathBuf::from).unwrap_or_else(|| {
        default_models_dir().parent().map(|p| p.join("lib")).unwrap_or_else(|| PathBuf::from("lib"))
    });
    dir.join("libonnxruntime.so")
}

pub fn default_models_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    cache.join("hearth").join("models")
}

#[cfg(test)]
mod tests {
    use hearth_engine::{DType, Device, ModelKind, Pooling};

    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Some(Path::new("test.toml")), &Overrides::default()).map_err(|e| e.to_string())
    }

    /// `text` must be refused with a message containing every fragment of `expected`.
    #[track_caller]
    fn check_error(text: &str, expected: &[&str]) {
        let err = parse(text).expect_err("config should be refused");
        assert!(err.starts_with("test.toml: "), "{err}");
        for fragment in expected {
            assert!(err.contains(fragment), "`{fragment}` not in: {err}");
        }
    }

    const LOCAL: &str = "[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"m\"\n";
    const RERANK: &str = "[[models]]\nid = \"r\"\nkind = \"rerank\"\nsource = \"r\"\n";

    #[test]
    fn bad_server_settings_name_the_field_and_what_is_allowed() {
        check_error("[serve]\nport = 1", &["unknown field `serve`", "expected one of"]);
        check_error("[server]\nport = \"80\"", &["`server.port`", "invalid type", "line 2"]);
        check_error("[server]\nport = 70000", &["port"]);
        check_error("[server]\nqueue_depth = 0", &["`server.queue_depth`", "at least 1"]);
        check_error(
            "[server]\nmax_concurrent_requests_per_route = 0",
            &["max_concurrent_requests_per_route"],
        );
        for origin in [
            "example.com",
            "https://example.com/",
            "https://example.com/app",
            "https://user@example.com",
            "ftp://example.com",
            "https://",
            "https://example.com:99999",
            "https://exa mple.com",
        ] {
            check_error(
                &format!("[server]\ncors_allowed_origins = [\"{origin}\"]"),
                &["server.cors_allowed_origins", origin, "scheme://host[:port]"],
            );
        }
        check_error("[server]\ncors_allowed_origins = [\"*\", \"https://a.example\"]", &["not both"]);
        for host in ["http://hearth.lan", "hearth.lan:8080", "hearth.lan/x", "", ".lan"] {
            check_error(&format!("[server]\nallowed_hosts = [\"{host}\"]"), &["server.allowed_hosts"]);
        }
        check_error("models_dir = 5", &["invalid type"]);
        check_error("models = 5", &["`models`", "array of tables"]);
        check_error("this is not toml", &["invalid TOML"]);
    }

    #[test]
    fn good_server_settings_are_kept() {
        let config = parse(
            "[server]\ncors_allowed_origins = [\"https://app.example.com\", \"http://localhost:3000\", \"http://[::1]:8080\"]\n\
             allowed_hosts = [\"Hearth.LAN\"]\nshutdown_timeout_secs = 5\n",
        )
        .unwrap();
        assert_eq!(config.server.cors_allowed_origins.len(), 3);
        assert_eq!(config.server.allowed_hosts, ["hearth.lan"]);
        assert_eq!(config.server.shutdown_timeout, Duration::from_secs(5));
        assert!(config.server.listens_on_loopback());
        assert!(!parse("[server]\nhost = \"0.0.0.0\"").unwrap().server.listens_on_loopback());
        assert!(parse("[server]\nhost = \"::1\"").unwrap().server.listens_on_loopback());
    }

    #[test]
    fn bad_model_entries_name_the_field_what_is_allowed_and_the_line() {
        check_error(
            &format!("{LOCAL}pooling = \"avg\""),
            &["`models[0].pooling`", "unknown variant `avg`", "`mean`, `cls`, `last-token`", "line 5"],
        );
        check_error(
            &format!("{LOCAL}colour = \"blue\""),
            &[
                "`models[0].colour`",
                "unknown field `colour`",
                "`embedding` models take",
                "`pooling`",
                "`id`",
                "line 5",
            ],
        );
        check_error(
            &format!("{LOCAL}backend = \"tensorrt\""),
            &["`models[0].backend`", "`candle`", "`onnx`"],
        );
        check_error("[[models]]\nkind = \"embedding\"\nsource = \"m\"", &["`models[0].id`", "is required"]);
        check_error(
            "[[models]]\nid = \"a b\"\nkind = \"embedding\"\nsource = \"m\"",
            &["`models[0].id`", "` `"],
        );
        check_error("[[models]]\nid = \"m\"\nsource = \"m\"", &["`models[0].kind`", "is required"]);
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"embeding\"",
            &["`models[0].kind`", "unknown variant", "line 3"],
        );
        check_error("[[models]]\nid = \"m\"\nkind = \"embedding\"", &["`models[0].source`", "preset"]);
        check_error(&format!("{LOCAL}{LOCAL}"), &["`models[1].id`", "another model"]);
        check_error(&format!("{LOCAL}device = \"gpu\""), &["`models[0].device`", "`cuda:N`"]);
        check_error(&format!("{LOCAL}dtype = \"f64\""), &["unknown variant `f64`"]);
        check_error(&format!("{LOCAL}max_batch_tokens = 0"), &["`models[0].max_batch_tokens`", "at least 1"]);
        check_error(&format!("{LOCAL}max_batch_memory_mib = 0"), &["`models[0].max_batch_memory_mib`"]);
        check_error(&format!("{LOCAL}max_input_tokens = 2"), &["`models[0].max_input_tokens`"]);
        check_error(
            &format!("{LOCAL}scoring = \"bi-encoder\""),
            &["`models[0].scoring`", "`embedding` models take"],
        );
        check_error(&format!("{LOCAL}architecture = \"gpt2\""), &["`models[0].architecture`", "`bert`"]);
        check_error(
            "[[models]]\nid = \"m\"\npreset = \"nope\"",
            &["`models[0].preset`", "bge-small-en-v1.5"],
        );
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"rerank\"\npreset = \"bge-small-en-v1.5\"",
            &["`models[0].kind`", "has kind `embedding`"],
        );
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"tts\"\nsource = \"m\"\nvoices_dir = \"../voices\"",
            &["`models[0].voices_dir`", "plain relative path"],
        );
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"tts\"\nsource = \"m\"\nnoise_w = 3.0",
            &["`models[0].noise_w`", "between 0 and 2"],
        );
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"tts\"\nsource = \"m\"\nmax_audio_secs = 5",
            &["`models[0].max_audio_secs`", "`tts` models take"],
        );
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"stt\"\nsource = \"m\"\nmax_audio_secs = 0",
            &["`models[0].max_audio_secs`", "at least 1"],
        );
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"hf:just-a-name\"",
            &["hf:org/name"],
        );
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"hf:a/b@\"",
            &["empty revision"],
        );
        check_error("[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"hf:../b\"", &["hf:org/name"]);
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"hf:a/b@../../x\"",
            &["plain name"],
        );
        assert!(parse("[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"hf:a/b@refs/pr/1\"").is_ok());
        check_error(&format!("{LOCAL}files = [\"*.json\"]"), &["`files` applies only to `hf:`"]);
    }

    #[test]
    fn llm_entries_take_their_own_options() {
        let config = parse(
            "[[models]]\nid = \"chat\"\nkind = \"llm\"\nsource = \"smollm2\"\nfile = \"model.Q4_1.gguf\"\n\
             context_length = 2048\nmax_tokens = 256\nmax_running_sequences = 8\nmax_batch_tokens = 256\n\
             kv_cache_mib = 512\nprefix_cache = false\nchat_template = \"{{ messages }}\"\n\
             kv_cache_type = \"f32\"\ncpu_threads = 2\n",
        )
        .unwrap();
        let KindConfig::Llm(llm) = &config.models[0].options else { panic!() };
        assert_eq!(llm.file.as_deref(), Some("model.Q4_1.gguf"));
        assert_eq!((llm.context_length, llm.max_tokens), (Some(2048), Some(256)));
        assert_eq!((llm.max_running_sequences, llm.max_batch_tokens), (8, 256));
        assert_eq!(llm.kv_cache_bytes, Some(512 << 20));
        assert_eq!((llm.kv_cache_type, llm.cpu_threads), (KvCacheType::F32, Some(2)));
        assert!(!llm.prefix_cache);
        const LLM: &str = "[[models]]\nid = \"chat\"\nkind = \"llm\"\nsource = \"m\"\n";
        check_error(
            &format!("{LLM}pooling = \"mean\""),
            &["unknown field `pooling`", "`llm` models take", "`max_running_sequences`"],
        );
        check_error(&format!("{LLM}file = \"../x.gguf\""), &["`models[0].file`"]);
        check_error(&format!("{LLM}file = \"weights.bin\""), &["`models[0].file`", ".gguf"]);
        check_error(&format!("{LLM}max_running_sequences = 0"), &["at least 1"]);
        check_error(&format!("{LLM}cpu_threads = 0"), &["`models[0].cpu_threads`"]);
        check_error(&format!("{LLM}kv_cache_type = \"q8_0\""), &["kv_cache_type", "f16"]);
        check_error(&format!("{LLM}dtype = \"f16\""), &["`models[0].dtype`", "GGUF"]);
        check_error(&format!("{LLM}context_length = 4"), &["`models[0].context_length`", "at least 16"]);
    }

    #[test]
    fn sources_cannot_leave_the_models_directory() {
        for source in ["/models/m", "../m", "m/../../etc", "~/m", "./m", ""] {
            let text = format!("[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"{source}\"\n");
            let err = parse(&text).expect_err(source);
            assert!(err.contains("`models[0].source`"), "{source}: {err}");
        }
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"hf:a/b\"\nfiles = [\"../x\"]",
            &["plain relative path"],
        );
        let nested = parse("[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"org/m\"\n").unwrap();
        assert!(nested.models[0].weights().is_some());
    }

    #[test]
    fn a_rerank_entry_can_share_an_embedding_entrys_model() {
        let config = parse(&format!("{LOCAL}[[models]]\nid = \"r\"\nkind = \"rerank\"\nembedding_model = \"m\"\nmax_input_tokens = 128\n"))
            .unwrap();
        let shared = &config.models[1];
        assert!(shared.weights().is_none());
        assert_eq!(shared.shares().map(|s| &**s), Some("m"));
        let KindConfig::Rerank(RerankConfig::SharedEmbedder { text, .. }) = &shared.options else { panic!() };
        assert!(text.truncate && text.max_input_tokens == Some(128));

        let share = |extra: &str| {
            format!("{LOCAL}[[models]]\nid = \"r\"\nkind = \"rerank\"\nembedding_model = \"m\"\n{extra}")
        };
        check_error(
            &share("source = \"m\""),
            &["`models[1].source`", "cannot be set with `embedding_model`"],
        );
        check_error(&share("queue_depth = 4"), &["`models[1].queue_depth`", "cannot be set"]);
        check_error(&share("scoring = \"cross-encoder\""), &["`models[1].scoring`", "bi-encoder"]);
        check_error(
            "[[models]]\nid = \"r\"\nkind = \"rerank\"\nembedding_model = \"nope\"\n",
            &["`models[0].embedding_model`", "no model `nope`"],
        );
        check_error(
            &format!("{RERANK}[[models]]\nid = \"r2\"\nkind = \"rerank\"\nembedding_model = \"r\"\n"),
            &["`models[1].embedding_model`", "must be an `embedding` model"],
        );
        check_error(&format!("{LOCAL}embedding_model = \"x\""), &["unknown field `embedding_model`"]);
    }

    #[test]
    fn every_documented_key_is_read() {
        let embedding = format!(
            "{LOCAL}device = \"cpu\"\ndtype = \"f32\"\nmax_concurrent_requests = 3\nqueue_depth = 4\n\
             architecture = \"bert\"\npooling = \"cls\"\nnormalize = false\nmax_input_tokens = 100\n\
             truncate = true\nmax_batch_tokens = 500\nmax_batch_size = 5\nmax_batch_memory_mib = 64\n\
             max_inputs_per_request = 6\nmax_tokens_per_request = 700\n"
        );
        let config = parse(&embedding).unwrap();
        let model = &config.models[0];
        assert_eq!(model.max_concurrent_requests, 3);
        let KindConfig::Embedding(encoder) = &model.options else { panic!() };
        assert_eq!(
            (encoder.weights.device, encoder.weights.dtype, encoder.weights.queue_depth),
            (Device::Cpu, DType::F32, 4)
        );
        assert_eq!((encoder.pooling, encoder.normalize), (Some(Pooling::Cls), Some(false)));
        assert_eq!(
            encoder.text,
            TextConfig {
                max_input_tokens: Some(100),
                truncate: true,
                max_inputs_per_request: 6,
                max_tokens_per_request: 700
            }
        );
        assert_eq!(encoder.batch.max_batch_bytes, Some(64 << 20));
        assert_eq!(encoder.batch.max_batch_tokens, Some(500), "unset, it is the model's device default");
        let rerank = parse(&format!("{RERANK}scoring = \"cross-encoder\"\nmax_batch_size = 5\n")).unwrap();
        let KindConfig::Rerank(RerankConfig::Load { scoring, encoder }) = &rerank.models[0].options else {
            panic!()
        };
        assert_eq!((*scoring, encoder.batch.max_batch_size), (ScoringChoice::CrossEncoder, 5));
    }

    #[test]
    fn defaults_presets_and_overrides() {
        let config =
            parse("[[models]]\nid = \"small\"\npreset = \"bge-small-en-v1.5\"\nnormalize = false\n").unwrap();
        assert_eq!(config.server.host, DEFAULT_HOST);
        assert_eq!(config.server.port, DEFAULT_PORT);
        let model = &config.models[0];
        assert_eq!(model.kind, ModelKind::Embedding);
        let KindConfig::Embedding(encoder) = &model.options else { panic!() };
        assert_eq!(encoder.weights.device, Device::Auto);
        assert_eq!(encoder.weights.queue_depth, DEFAULT_QUEUE_DEPTH);
        let ModelSource::Hub { repo, revision, files } = &encoder.weights.source else { panic!() };
        assert_eq!((repo.as_str(), revision.as_str()), ("BAAI/bge-small-en-v1.5", "main"));
        assert!(files.contains(&"1_Pooling/config.json".to_string()));
        assert_eq!(encoder.pooling, Some(Pooling::Cls), "from the preset");
        assert_eq!(encoder.normalize, Some(false), "the entry wins over the preset");
        assert_eq!(encoder.text.max_input_tokens, Some(512));
        assert!(!encoder.text.truncate, "embeddings refuse long inputs by default");

        let rerank =
            parse("[[models]]\nid = \"r\"\nkind = \"rerank\"\nsource = \"hf:a/b@v2\"\nqueue_depth = 3\n")
                .unwrap();
        let KindConfig::Rerank(RerankConfig::Load { encoder, scoring }) = &rerank.models[0].options else {
            panic!()
        };
        assert_eq!(encoder.weights.queue_depth, 3);
        assert!(encoder.text.truncate, "rerank documents are cut to fit by default");
        assert_eq!(*scoring, ScoringChoice::Auto);
        assert!(matches!(&encoder.weights.source, ModelSource::Hub { revision, .. } if revision == "v2"));
    }

    #[test]
    fn relative_sources_live_in_the_models_dir_and_cli_overrides_win() {
        let text = "models_dir = \"/srv/models\"\n[server]\nport = 9000\n[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"mini\"\n";
        let source = |config: &Config| config.models[0].weights().unwrap().source.clone();
        let config = parse(text).unwrap();
        assert_eq!(source(&config), ModelSource::Local(PathBuf::from("/srv/models/mini")));
        assert_eq!(config.server.port, 9000);
        let overrides = Overrides {
            port: Some(7000),
            host: Some("0.0.0.0".into()),
            models_dir: Some(PathBuf::from("/data")),
            data_dir: None,
            log_format: Some(LogFormat::Json),
            log_level: None,
            auth: AuthOverrides::default(),
        };
        let config = Config::parse(text, None, &overrides).unwrap();
        assert_eq!((config.server.host.as_str(), config.server.port), ("0.0.0.0", 7000));
        assert_eq!(source(&config), ModelSource::Local(PathBuf::from("/data/mini")));
        assert_eq!(config.logging.format, LogFormat::Json);
    }

    #[test]
    fn every_preset_is_valid_in_a_config() {
        for preset in crate::catalogue::all() {
            let text = format!("[[models]]\nid = \"x\"\npreset = \"{}\"\n", preset.name);
            let config = parse(&text).unwrap_or_else(|e| panic!("{}: {e}", preset.name));
            assert_eq!(config.models[0].kind, preset.kind);
            if preset.kind == ModelKind::Llm {
                assert!(
                    ["llama", "qwen2", "qwen3", "gemma3", "phi3"].contains(&preset.architecture.as_str()),
                    "{}",
                    preset.name
                );
            } else if preset.kind == ModelKind::Stt {
                assert_eq!(preset.architecture, "whisper", "{}", preset.name);
            } else if preset.kind == ModelKind::Tts {
                assert_eq!(preset.architecture, "piper-vits", "{}", preset.name);
            } else {
                preset.architecture.parse::<hearth_backends::Architecture>().unwrap();
            }
        }
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for name in ["hearth.toml", "offline.toml"] {
            Config::load(&root.join("config").join(name), &Overrides::default())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        // The Kubernetes ConfigMap embeds one too (the indented block after `hearth.toml: |`).
        let configmap = std::fs::read_to_string(root.join("deploy/kubernetes/base/configmap.yaml")).unwrap();
        let embedded: String = configmap
            .split_once("hearth.toml: |\n")
            .unwrap()
            .1
            .lines()
            .map(|line| line.strip_prefix("    ").unwrap_or(line))
            .map(|line| format!("{line}\n"))
            .collect();
        let config = Config::parse(&embedded, Some(Path::new("configmap.yaml")), &Overrides::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.server.host, "0.0.0.0", "a pod must listen beyond loopback");
    }
}
