//! Configuration in two steps: the TOML file is parsed into raw structs that mirror it (unknown keys
//! are errors), then validated into a typed [`Config`] the rest of the program trusts. Every error
//! names the file and the field, and says what is allowed.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hearth_backends::Architecture;
use hearth_engine::encoder::BatchLimits;
use hearth_engine::{DType, Device, ModelKind, Pooling};
use serde::Deserialize;

use crate::catalogue::{self, Preset};

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
// Step 1: the file as written.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    models_dir: Option<String>,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    logging: RawLogging,
    #[serde(default)]
    models: Vec<RawModel>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    host: Option<String>,
    port: Option<u16>,
    max_request_body_bytes: Option<usize>,
    max_concurrent_requests: Option<usize>,
    queue_depth: Option<usize>,
    max_inputs_per_request: Option<usize>,
    cors_allowed_origins: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    format: Option<LogFormat>,
    level: Option<String>,
}

/// One `[[models]]` entry. A preset's `[defaults]` table has the same shape but may only set
/// options (not `id`, `kind`, `preset`, `source` or `files`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    id: Option<String>,
    kind: Option<ModelKind>,
    preset: Option<String>,
    source: Option<String>,
    files: Option<Vec<String>>,
    backend: Option<Backend>,
    device: Option<String>,
    dtype: Option<DType>,
    architecture: Option<String>,
    pooling: Option<Pooling>,
    normalize: Option<bool>,
    max_input_tokens: Option<usize>,
    truncate: Option<bool>,
    max_batch_tokens: Option<usize>,
    max_batch_size: Option<usize>,
    scoring: Option<ScoringChoice>,
    max_concurrent_requests: Option<usize>,
    queue_depth: Option<usize>,
    max_inputs_per_request: Option<usize>,
}

impl RawModel {
    /// True when only options are set: what a preset's `[defaults]` may hold.
    pub fn only_options(&self) -> bool {
        self.id.is_none()
            && self.kind.is_none()
            && self.preset.is_none()
            && self.source.is_none()
            && self.files.is_none()
    }

    /// Options set here win; unset ones fall back to `defaults`. Identity fields stay as they are.
    fn or_defaults(self, defaults: &RawModel) -> RawModel {
        let d = defaults.clone();
        RawModel {
            backend: self.backend.or(d.backend),
            device: self.device.or(d.device),
            dtype: self.dtype.or(d.dtype),
            architecture: self.architecture.or(d.architecture),
            pooling: self.pooling.or(d.pooling),
            normalize: self.normalize.or(d.normalize),
            max_input_tokens: self.max_input_tokens.or(d.max_input_tokens),
            truncate: self.truncate.or(d.truncate),
            max_batch_tokens: self.max_batch_tokens.or(d.max_batch_tokens),
            max_batch_size: self.max_batch_size.or(d.max_batch_size),
            scoring: self.scoring.or(d.scoring),
            max_concurrent_requests: self.max_concurrent_requests.or(d.max_concurrent_requests),
            queue_depth: self.queue_depth.or(d.queue_depth),
            max_inputs_per_request: self.max_inputs_per_request.or(d.max_inputs_per_request),
            ..self
        }
    }
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

/// Which runtime executes a model. Only candle exists so far; ONNX Runtime and whisper.cpp follow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Candle,
}

/// How a rerank model scores: decided by the checkpoint's head unless forced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScoringChoice {
    /// Cross-encoder when the weights have a sequence-classification head, else bi-encoder.
    #[default]
    Auto,
    CrossEncoder,
    BiEncoder,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face hub repository at a revision, limited to files matching `files`.
    Hub { repo: String, revision: String, files: Vec<String> },
    /// A directory on disk (relative paths are under `models_dir`).
    Local(PathBuf),
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hub { repo, revision, .. } => write!(f, "hf:{repo}@{revision}"),
            Self::Local(path) => write!(f, "{}", path.display()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub max_request_body_bytes: usize,
    pub cors_allowed_origins: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggingConfig {
    pub format: LogFormat,
    pub level: String,
}

/// Options of encoder models (embedding and rerank kinds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncoderConfig {
    pub pooling: Option<Pooling>,
    pub normalize: Option<bool>,
    /// `None`: the model's own limit (sentence-transformers' `max_seq_length`, else its positions).
    pub max_input_tokens: Option<usize>,
    pub truncate: bool,
    pub batch: BatchLimits,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KindConfig {
    Embedding(EncoderConfig),
    Rerank { encoder: EncoderConfig, scoring: ScoringChoice },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    pub id: Arc<str>,
    pub kind: ModelKind,
    pub preset: Option<String>,
    pub source: ModelSource,
    pub backend: Backend,
    pub device: Device,
    pub dtype: DType,
    pub architecture: Option<Architecture>,
    pub max_concurrent_requests: usize,
    pub queue_depth: usize,
    pub max_inputs_per_request: usize,
    pub options: KindConfig,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub file: Option<PathBuf>,
    pub models_dir: PathBuf,
    pub server: ServerConfig,
    pub logging: LoggingConfig,
    pub models: Vec<ModelConfig>,
}

pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const DEFAULT_PORT: u16 = 8080;
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 16 * 1024 * 1024;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 512;
pub const DEFAULT_QUEUE_DEPTH: usize = 256;
pub const DEFAULT_MAX_INPUTS_PER_REQUEST: usize = 2048;
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 16_384;
pub const DEFAULT_MAX_BATCH_SIZE: usize = 64;

/// Values from the command line or environment; they override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub models_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
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
        let with_file = |mut e: ConfigError| {
            e.file = file.map(Path::to_owned);
            e
        };
        let raw = parse_raw(text).map_err(with_file)?;
        validate(raw, overrides).map_err(with_file).map(|mut config| {
            config.file = file.map(Path::to_owned);
            config
        })
    }
}

/// Parses the TOML, tracking the key path so errors inside flattened tables still name their field.
fn parse_raw(text: &str) -> Result<RawConfig, ConfigError> {
    let deserializer = toml::de::Deserializer::parse(text)
        .map_err(|e| invalid("", format!("invalid TOML: {}", e.to_string().trim_end())))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.message().trim_end().to_string();
        let located = match inner.span() {
            Some(span) => format!("{message} (line {})", line_of(text, span.start)),
            None => message,
        };
        invalid(if field == "." { String::new() } else { field }, located)
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn validate(raw: RawConfig, overrides: &Overrides) -> Result<Config, ConfigError> {
    let models_dir = match (&overrides.models_dir, &raw.models_dir) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => expand_home(dir),
        (None, None) => default_models_dir(),
    };
    let server = &raw.server;
    let positive = |field: &str, value: Option<usize>, default: usize| match value {
        Some(0) => Err(invalid(field, "must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let max_concurrent = positive(
        "server.max_concurrent_requests",
        server.max_concurrent_requests,
        DEFAULT_MAX_CONCURRENT_REQUESTS,
    )?;
    let queue_depth = positive("server.queue_depth", server.queue_depth, DEFAULT_QUEUE_DEPTH)?;
    let max_inputs = positive(
        "server.max_inputs_per_request",
        server.max_inputs_per_request,
        DEFAULT_MAX_INPUTS_PER_REQUEST,
    )?;
    let server_config = ServerConfig {
        host: overrides.host.clone().or(server.host.clone()).unwrap_or_else(|| DEFAULT_HOST.into()),
        port: overrides.port.or(server.port).unwrap_or(DEFAULT_PORT),
        max_request_body_bytes: positive(
            "server.max_request_body_bytes",
            server.max_request_body_bytes,
            DEFAULT_MAX_REQUEST_BODY_BYTES,
        )?,
        cors_allowed_origins: validate_origins(server.cors_allowed_origins.clone().unwrap_or_default())?,
    };
    let logging = LoggingConfig {
        format: overrides.log_format.or(raw.logging.format).unwrap_or_default(),
        level: overrides.log_level.clone().or(raw.logging.level).unwrap_or_else(|| "info".into()),
    };
    let server_limits = ServerLimits { max_concurrent, queue_depth, max_inputs };
    let mut seen = HashSet::new();
    let mut models = Vec::with_capacity(raw.models.len());
    for (i, model) in raw.models.into_iter().enumerate() {
        let validated = validate_model(i, model, &models_dir, &server_limits)?;
        if !seen.insert(Arc::clone(&validated.id)) {
            return Err(invalid(
                format!("models[{i}].id"),
                format!("`{}` is used by another model", validated.id),
            ));
        }
        models.push(validated);
    }
    Ok(Config { file: None, models_dir, server: server_config, logging, models })
}

fn validate_origins(origins: Vec<String>) -> Result<Vec<String>, ConfigError> {
    for origin in &origins {
        let ok = origin == "*"
            || ((origin.starts_with("http://") || origin.starts_with("https://")) && !origin.ends_with('/'));
        if !ok {
            return Err(invalid(
                "server.cors_allowed_origins",
                format!("`{origin}` is not an origin; use `*` or `scheme://host[:port]` without a path"),
            ));
        }
    }
    Ok(origins)
}

struct ServerLimits {
    max_concurrent: usize,
    queue_depth: usize,
    max_inputs: usize,
}

fn validate_model(
    i: usize,
    raw: RawModel,
    models_dir: &Path,
    server: &ServerLimits,
) -> Result<ModelConfig, ConfigError> {
    let field = |name: &str| format!("models[{i}].{name}");
    let id = raw.id.clone().filter(|id| !id.is_empty()).ok_or_else(|| invalid(field("id"), "is required"))?;
    if let Some(bad) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || "._:/-".contains(*c))) {
        return Err(invalid(
            field("id"),
            format!("`{id}` contains `{bad}`; use letters, digits and `._:/-`"),
        ));
    }
    let preset: Option<&'static Preset> = match &raw.preset {
        None => None,
        Some(name) => Some(catalogue::find(name).ok_or_else(|| {
            invalid(
                field("preset"),
                format!("no preset `{name}`; known presets: {}", catalogue::names().join(", ")),
            )
        })?),
    };
    let kind = match (raw.kind, preset) {
        (Some(kind), Some(p)) if kind != p.kind => {
            return Err(invalid(
                field("kind"),
                format!("is `{kind}` but preset `{}` has kind `{}`", p.name, p.kind),
            ))
        }
        (Some(kind), _) => kind,
        (None, Some(p)) => p.kind,
        (None, None) => {
            return Err(invalid(
                field("kind"),
                "is required (one of `llm`, `stt`, `tts`, `embedding`, `rerank`)",
            ))
        }
    };
    if !matches!(kind, ModelKind::Embedding | ModelKind::Rerank) {
        return Err(invalid(
            field("kind"),
            format!(
                "`{kind}` models are not supported by this version yet; supported: `embedding`, `rerank`"
            ),
        ));
    }
    let options = match preset {
        Some(p) => raw.or_defaults(&p.defaults),
        None => raw,
    };
    let source_text = options.source.as_deref().or(preset.map(|p| p.source.as_str())).ok_or_else(|| {
        invalid(field("source"), "is required (`hf:org/name[@revision]` or a directory), or name a `preset`")
    })?;
    // The preset's file list belongs to the preset's source, not to a source given here.
    let files = match (&options.source, preset) {
        (None, Some(p)) => options.files.or_else(|| Some(p.files.clone())),
        _ => options.files,
    };
    let source = parse_source(source_text, files, models_dir).map_err(|m| invalid(field("source"), m))?;

    let device = match &options.device {
        None => Device::Auto,
        Some(text) => text.parse().map_err(|m: String| invalid(field("device"), m))?,
    };
    let architecture = match &options.architecture {
        None => None,
        Some(text) => Some(text.parse().map_err(|m: String| invalid(field("architecture"), m))?),
    };
    let positive = |name: &str, value: Option<usize>, default: usize| match value {
        Some(0) => Err(invalid(field(name), "must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let encoder = EncoderConfig {
        pooling: options.pooling,
        normalize: options.normalize,
        max_input_tokens: match options.max_input_tokens {
            Some(n) if n < 3 => return Err(invalid(field("max_input_tokens"), "must be at least 3")),
            other => other,
        },
        // Rerank documents are cut to fit beside the query unless told otherwise, as Cohere and
        // Jina do; embedding inputs are refused when too long unless truncation is asked for.
        truncate: options.truncate.unwrap_or(kind == ModelKind::Rerank),
        batch: BatchLimits {
            max_batch_tokens: positive(
                "max_batch_tokens",
                options.max_batch_tokens,
                DEFAULT_MAX_BATCH_TOKENS,
            )?,
            max_batch_size: positive("max_batch_size", options.max_batch_size, DEFAULT_MAX_BATCH_SIZE)?,
        },
    };
    let kind_options = match kind {
        ModelKind::Embedding => {
            if options.scoring.is_some() {
                return Err(invalid(field("scoring"), "applies only to `rerank` models"));
            }
            KindConfig::Embedding(encoder)
        }
        _ => KindConfig::Rerank { encoder, scoring: options.scoring.unwrap_or_default() },
    };
    Ok(ModelConfig {
        id: id.into(),
        kind,
        preset: preset.map(|p| p.name.clone()),
        source,
        backend: options.backend.unwrap_or_default(),
        device,
        dtype: options.dtype.unwrap_or_default(),
        architecture,
        max_concurrent_requests: positive(
            "max_concurrent_requests",
            options.max_concurrent_requests,
            server.max_concurrent,
        )?,
        queue_depth: positive("queue_depth", options.queue_depth, server.queue_depth)?,
        max_inputs_per_request: positive(
            "max_inputs_per_request",
            options.max_inputs_per_request,
            server.max_inputs,
        )?,
        options: kind_options,
    })
}

/// Default file patterns for hub sources of encoder models.
pub const DEFAULT_ENCODER_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "*.safetensors",
    "modules.json",
    "sentence_bert_config.json",
    "*_Pooling/config.json",
];

/// `hf:org/name[@revision]` or a path.
pub fn parse_source(
    text: &str,
    files: Option<Vec<String>>,
    models_dir: &Path,
) -> Result<ModelSource, String> {
    if let Some(spec) = text.strip_prefix("hf:") {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, revision)) if !revision.is_empty() => (repo, revision),
            Some(_) => return Err(format!("`{text}` has an empty revision after `@`")),
            None => (spec, "main"),
        };
        let well_formed = repo.split('/').count() == 2 && repo.split('/').all(|part| !part.is_empty());
        if !well_formed {
            return Err(format!("`{text}` is not `hf:org/name[@revision]`"));
        }
        let files = files.unwrap_or_else(|| DEFAULT_ENCODER_FILES.iter().map(|s| s.to_string()).collect());
        for pattern in &files {
            glob::Pattern::new(pattern).map_err(|e| format!("file pattern `{pattern}`: {e}"))?;
        }
        return Ok(ModelSource::Hub { repo: repo.into(), revision: revision.into(), files });
    }
    if text.is_empty() {
        return Err("is empty".into());
    }
    if files.is_some() {
        return Err("`files` applies only to `hf:` sources".into());
    }
    let path = expand_home(text);
    Ok(ModelSource::Local(if path.is_absolute() { path } else { models_dir.join(path) }))
}

fn expand_home(text: &str) -> PathBuf {
    match (text.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(text),
    }
}

/// `$HEARTH_MODELS_DIR` is handled by the CLI; this is the fallback.
pub fn default_models_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    cache.join("hearth").join("models")
}

#[cfg(test)]
mod tests {
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

    const LOCAL: &str = "[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"/models/m\"\n";

    #[test]
    fn bad_configs_name_the_field_and_what_is_allowed() {
        check_error("[serve]\nport = 1", &["unknown field `serve`", "expected one of"]);
        check_error("[server]\nport = \"80\"", &["invalid type"]);
        check_error("[server]\nport = 70000", &["port"]);
        check_error("[server]\nqueue_depth = 0", &["`server.queue_depth`", "at least 1"]);
        check_error("[server]\ncors_allowed_origins = [\"example.com/\"]", &["server.cors_allowed_origins"]);
        check_error(
            &format!("{LOCAL}pooling = \"avg\""),
            &["`models[0].pooling`", "unknown variant `avg`", "`mean`, `cls`, `last-token`"],
        );
        check_error(
            &format!("{LOCAL}colour = \"blue\""),
            &["`models[0].colour`", "unknown field `colour`", "`pooling`"],
        );
        check_error("[[models]]\nkind = \"embedding\"\nsource = \"/m\"", &["`models[0].id`", "is required"]);
        check_error(
            "[[models]]\nid = \"a b\"\nkind = \"embedding\"\nsource = \"/m\"",
            &["`models[0].id`", "` `"],
        );
        check_error("[[models]]\nid = \"m\"\nsource = \"/m\"", &["`models[0].kind`", "is required"]);
        check_error("[[models]]\nid = \"m\"\nkind = \"embedding\"", &["`models[0].source`", "preset"]);
        check_error(
            &format!("{LOCAL}{}", LOCAL.replace("/models/m", "/other")),
            &["`models[1].id`", "another model"],
        );
        check_error(&format!("{LOCAL}device = \"gpu\""), &["`models[0].device`", "`cuda:N`"]);
        check_error(&format!("{LOCAL}dtype = \"f64\""), &["unknown variant `f64`"]);
        check_error(&format!("{LOCAL}max_batch_tokens = 0"), &["`models[0].max_batch_tokens`", "at least 1"]);
        check_error(&format!("{LOCAL}max_input_tokens = 2"), &["`models[0].max_input_tokens`"]);
        check_error(
            &format!("{LOCAL}scoring = \"bi-encoder\""),
            &["`models[0].scoring`", "only to `rerank`"],
        );
        check_error(&format!("{LOCAL}architecture = \"gpt2\""), &["`models[0].architecture`", "`bert`"]);
        check_error(&format!("{LOCAL}backend = \"onnx\""), &["unknown variant `onnx`", "`candle`"]);
        check_error(
            "[[models]]\nid = \"m\"\npreset = \"nope\"",
            &["`models[0].preset`", "bge-small-en-v1.5"],
        );
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"rerank\"\npreset = \"bge-small-en-v1.5\"",
            &["`models[0].kind`", "has kind `embedding`"],
        );
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"llm\"\nsource = \"/m\"",
            &["`llm` models are not supported"],
        );
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"hf:just-a-name\"",
            &["hf:org/name"],
        );
        check_error(
            "[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"hf:a/b@\"",
            &["empty revision"],
        );
        check_error(&format!("{LOCAL}files = [\"*.json\"]"), &["`files` applies only to `hf:`"]);
        check_error("models_dir = 5", &["invalid type"]);
    }

    #[test]
    fn defaults_presets_and_overrides() {
        let config =
            parse("[[models]]\nid = \"small\"\npreset = \"bge-small-en-v1.5\"\nnormalize = false\n").unwrap();
        assert_eq!(config.server.host, DEFAULT_HOST);
        assert_eq!(config.server.port, DEFAULT_PORT);
        let model = &config.models[0];
        assert_eq!(model.kind, ModelKind::Embedding);
        assert_eq!(model.device, Device::Auto);
        assert_eq!(model.queue_depth, DEFAULT_QUEUE_DEPTH);
        let ModelSource::Hub { repo, revision, files } = &model.source else { panic!("{:?}", model.source) };
        assert_eq!((repo.as_str(), revision.as_str()), ("BAAI/bge-small-en-v1.5", "main"));
        assert!(files.contains(&"1_Pooling/config.json".to_string()));
        let KindConfig::Embedding(encoder) = &model.options else { panic!() };
        assert_eq!(encoder.pooling, Some(Pooling::Cls), "from the preset");
        assert_eq!(encoder.normalize, Some(false), "the entry wins over the preset");
        assert_eq!(encoder.max_input_tokens, Some(512));
        assert!(!encoder.truncate, "embeddings refuse long inputs by default");

        let rerank =
            parse("[[models]]\nid = \"r\"\nkind = \"rerank\"\nsource = \"hf:a/b@v2\"\nqueue_depth = 3\n")
                .unwrap();
        let model = &rerank.models[0];
        assert_eq!(model.queue_depth, 3);
        let KindConfig::Rerank { encoder, scoring } = &model.options else { panic!() };
        assert!(encoder.truncate, "rerank documents are cut to fit by default");
        assert_eq!(*scoring, ScoringChoice::Auto);
        assert!(matches!(&model.source, ModelSource::Hub { revision, .. } if revision == "v2"));
    }

    #[test]
    fn relative_sources_live_in_the_models_dir_and_cli_overrides_win() {
        let text = "models_dir = \"/srv/models\"\n[server]\nport = 9000\n[[models]]\nid = \"m\"\nkind = \"embedding\"\nsource = \"mini\"\n";
        let config = parse(text).unwrap();
        assert_eq!(config.models[0].source, ModelSource::Local(PathBuf::from("/srv/models/mini")));
        assert_eq!(config.server.port, 9000);
        let overrides = Overrides {
            port: Some(7000),
            host: Some("0.0.0.0".into()),
            models_dir: Some(PathBuf::from("/data")),
            log_format: Some(LogFormat::Json),
            log_level: None,
        };
        let config = Config::parse(text, None, &overrides).unwrap();
        assert_eq!((config.server.host.as_str(), config.server.port), ("0.0.0.0", 7000));
        assert_eq!(config.models[0].source, ModelSource::Local(PathBuf::from("/data/mini")));
        assert_eq!(config.logging.format, LogFormat::Json);
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        for name in ["hearth.toml", "offline.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config").join(name);
            Config::load(&path, &Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
