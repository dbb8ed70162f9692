//! `[[models]]` entries, shaped per kind. An entry's table is first merged with its preset's
//! `[defaults]` (keys the entry sets win), then split into the keys every model takes
//! ([`COMMON_KEYS`]) and the options of its kind, and each part is read once with unknown keys
//! refused. New kinds add their own options type and key list here.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use hearth_backends::whisper::{DecoderWeights, EncoderWeights};
use hearth_backends::{is_plain_relative, whisper, Architecture};
use hearth_engine::encoder::BatchLimits;
use hearth_engine::{DType, Device, ModelKind, Pooling};
use serde::Deserialize;
use toml::de::DeTable;
use toml::Spanned;

use super::{check_keys, invalid, positive, read, ConfigError, Origin};
use crate::catalogue::{self, Preset};

/// Keys every model entry takes, whatever its kind.
pub(super) const COMMON_KEYS: &[&str] = &[
    "id",
    "kind",
    "preset",
    "source",
    "files",
    "device",
    "dtype",
    "max_concurrent_requests",
    "queue_depth",
    "keep_alive",
    "preload",
];

/// Keys only a config entry may set (a preset's `[defaults]` may not).
pub(crate) const IDENTITY_KEYS: &[&str] = &["id", "kind", "preset", "source", "files"];

/// Options of encoder models (the `embedding` and `rerank` kinds).
pub(super) const ENCODER_KEYS: &[&str] = &[
    "backend",
    "cache_mib",
    "architecture",
    "pooling",
    "normalize",
    "max_input_tokens",
    "truncate",
    "max_batch_tokens",
    "max_batch_size",
    "max_batch_memory_mib",
    "max_inputs_per_request",
    "max_tokens_per_request",
    "max_queue_wait_ms",
];

/// Options only `rerank` entries take.
pub(super) const RERANK_KEYS: &[&str] = &["scoring", "embedding_model"];

/// Options of `llm` entries.
pub(super) const LLM_KEYS: &[&str] = &[
    "file",
    "chat_template",
    "context_length",
    "max_tokens",
    "max_running_sequences",
    "max_batch_tokens",
    "kv_cache_mib",
    "kv_cache_type",
    "cpu_threads",
    "prefix_cache",
    "max_queue_wait_ms",
    "max_output_tokens",
];

/// Options of `stt` entries.
pub(super) const STT_KEYS: &[&str] =
    &["max_audio_secs", "backend", "file", "cpu_threads", "decoder_weights", "encoder_weights"];

/// Options of `tts` entries.
pub(super) const TTS_KEYS: &[&str] = &[
    "voices_dir",
    "default_voice",
    "voice_aliases",
    "max_input_chars",
    "cpu_threads",
    "noise_scale",
    "noise_w",
];

/// The longest `input` a `tts` request may hold by default (OpenAI's limit).
pub const DEFAULT_MAX_INPUT_CHARS: usize = 4096;

/// The longest audio an `stt` model takes by default (30 minutes).
pub const DEFAULT_MAX_AUDIO_SECS: u32 = 1800;

/// The keys an entry of `kind` may set, common ones included.
pub(crate) fn allowed_keys(kind: ModelKind) -> Vec<&'static str> {
    let kind_keys: &[&[&str]] = match kind {
        ModelKind::Embedding => &[ENCODER_KEYS],
        ModelKind::Rerank => &[ENCODER_KEYS, RERANK_KEYS],
        ModelKind::Llm => &[LLM_KEYS],
        ModelKind::Stt => &[STT_KEYS],
        ModelKind::Tts => &[TTS_KEYS],
    };
    COMMON_KEYS.iter().chain(kind_keys.iter().flat_map(|keys| keys.iter())).copied().collect()
}

pub const DEFAULT_MAX_BATCH_SIZE: usize = 64;

/// Server-wide values entries fall back on.
pub(super) struct Defaults {
    pub max_concurrent_requests: usize,
    pub queue_depth: usize,
    pub max_inputs_per_request: usize,
    pub max_tokens_per_request: usize,
    /// `None`: refuse by queue depth only.
    pub max_queue_wait: Option<Duration>,
    pub keep_alive: KeepAlive,
}

/// How long a loaded model stays in memory without requests (Ollama's `keep_alive`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeepAlive {
    /// Never unloaded for being idle (`-1`).
    #[default]
    Forever,
    /// Unloaded once idle this long (`0`: as soon as its last request is answered).
    Idle(Duration),
}

/// `keep_alive` as written: seconds (`-1`: forever), or a duration such as `"30s"`, `"5m"`, `"1h"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawKeepAlive {
    Seconds(i64),
    Text(String),
}

impl RawKeepAlive {
    pub(super) fn parse(&self) -> Result<KeepAlive, String> {
        let bad = || {
            "must be seconds (`-1`: never unload, `0`: unload when idle) or a duration like `\"30s\"`, \
             `\"5m\"`, `\"1h\"`"
                .to_string()
        };
        let seconds = match self {
            Self::Seconds(s) => *s,
            Self::Text(text) => {
                let text = text.trim();
                if text == "-1" {
                    -1
                } else {
                    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
                    let (number, unit) = text.split_at(split);
                    let n: i64 = number.parse().map_err(|_| bad())?;
                    let scale = match unit {
                        "" | "s" => 1,
                        "m" => 60,
                        "h" => 3_600,
                        _ => return Err(bad()),
                    };
                    n.checked_mul(scale).ok_or_else(bad)?
                }
            }
        };
        match seconds {
            -1 => Ok(KeepAlive::Forever),
            s if s >= 0 => Ok(KeepAlive::Idle(Duration::from_secs(s as u64))),
            _ => Err(bad()),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommon {
    id: Option<String>,
    /// Read and checked by [`RawHead`] already.
    #[serde(rename = "kind")]
    _kind: Option<serde::de::IgnoredAny>,
    preset: Option<String>,
    source: Option<String>,
    files: Option<Vec<String>>,
    device: Option<String>,
    dtype: Option<DType>,
    max_concurrent_requests: Option<usize>,
    queue_depth: Option<usize>,
    keep_alive: Option<RawKeepAlive>,
    preload: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncoder {
    backend: Option<EncoderBackend>,
    cache_mib: Option<f64>,
    architecture: Option<String>,
    pooling: Option<Pooling>,
    normalize: Option<bool>,
    max_input_tokens: Option<usize>,
    truncate: Option<bool>,
    max_batch_tokens: Option<usize>,
    max_batch_size: Option<usize>,
    max_batch_memory_mib: Option<usize>,
    max_inputs_per_request: Option<usize>,
    max_tokens_per_request: Option<usize>,
    max_queue_wait_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRerank {
    scoring: Option<ScoringChoice>,
    embedding_model: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLlm {
    file: Option<String>,
    chat_template: Option<String>,
    context_length: Option<usize>,
    max_tokens: Option<usize>,
    max_running_sequences: Option<usize>,
    max_batch_tokens: Option<usize>,
    kv_cache_mib: Option<usize>,
    kv_cache_type: Option<KvCacheType>,
    cpu_threads: Option<usize>,
    prefix_cache: Option<bool>,
    max_queue_wait_ms: Option<u64>,
    max_output_tokens: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStt {
    max_audio_secs: Option<u32>,
    backend: Option<SttBackend>,
    file: Option<String>,
    cpu_threads: Option<usize>,
    decoder_weights: Option<DecoderWeights>,
    encoder_weights: Option<EncoderWeights>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTts {
    voices_dir: Option<String>,
    default_voice: Option<String>,
    voice_aliases: Option<std::collections::BTreeMap<String, String>>,
    max_input_chars: Option<usize>,
    cpu_threads: Option<usize>,
    noise_scale: Option<f32>,
    noise_w: Option<f32>,
}

/// The element type of an LLM's KV cache on the CPU (llama.cpp's `--cache-type-k/-v`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheType {
    /// Half the memory and bandwidth of f32; llama.cpp's default.
    #[default]
    F16,
    F32,
}

/// Only `kind` and `preset`, read first to know which options to expect.
#[derive(Deserialize)]
struct RawHead {
    kind: Option<ModelKind>,
    preset: Option<String>,
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
    /// A directory inside the models directory, by its plain relative path.
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

/// Weights a model entry loads, and where they run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Weights {
    pub source: ModelSource,
    pub device: Device,
    pub dtype: DType,
    /// Requests that may wait for the model's owner thread.
    pub queue_depth: usize,
}

/// Per-request limits of a text model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextConfig {
    /// `None`: the model's own limit (sentence-transformers' `max_seq_length`, else its positions).
    pub max_input_tokens: Option<usize>,
    pub truncate: bool,
    pub max_inputs_per_request: usize,
    pub max_tokens_per_request: usize,
}

/// An encoder model (embedder or reranker) loaded from weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncoderConfig {
    pub weights: Weights,
    pub backend: EncoderBackend,
    /// Bytes of the embedding cache (`cache_mib`; 0: off).
    pub cache_bytes: usize,
    pub architecture: Option<Architecture>,
    pub pooling: Option<Pooling>,
    pub normalize: Option<bool>,
    pub text: TextConfig,
    pub batch: BatchLimits,
    /// Refuse a request at once when the work queued ahead would keep it waiting longer than this
    /// (`max_queue_wait_ms`; 0 turns it off).
    pub max_queue_wait: Option<Duration>,
}

/// What runs an encoder's forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderBackend {
    /// ONNX Runtime on the CPU when the folder has an ONNX export and the build has ONNX Runtime
    /// (the `tts` feature); candle otherwise.
    #[default]
    Auto,
    /// candle (safetensors or `pytorch_model.bin`), on any device; exact f32.
    Candle,
    /// ONNX Runtime on the folder's ONNX export (embedders, CPU).
    Onnx,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RerankConfig {
    /// A reranker with weights of its own (a cross-encoder, or an encoder used as a bi-encoder).
    Load { encoder: EncoderConfig, scoring: ScoringChoice },
    /// A bi-encoder over the already-configured embedding model `embedding_model`: no second copy
    /// of the weights, its queue and owner thread shared.
    SharedEmbedder { embedding_model: Arc<str>, text: TextConfig },
}

/// A chat/completions model (GGUF weights).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlmConfig {
    pub weights: Weights,
    /// Which `.gguf` in the model directory, when it holds several.
    pub file: Option<String>,
    /// A Jinja chat template to use instead of the model's own.
    pub chat_template: Option<String>,
    /// Fewer tokens of context than the model allows (less KV memory per sequence).
    pub context_length: Option<usize>,
    /// New tokens when a request sets no limit; `None`: until the context is full.
    pub max_tokens: Option<usize>,
    pub max_running_sequences: usize,
    /// Tokens per decode step (decoded tokens plus prompt chunks).
    pub max_batch_tokens: usize,
    /// KV-cache memory; `None`: the device's default.
    pub kv_cache_bytes: Option<usize>,
    /// KV-cache element type on the CPU (GPUs keep f32).
    pub kv_cache_type: KvCacheType,
    /// The model's own CPU thread pool size; `None`: one thread per core.
    pub cpu_threads: Option<usize>,
    pub prefix_cache: bool,
    /// Refuse a request at once when the requests waiting ahead would keep it from a place longer
    /// than this (`max_queue_wait_ms`; 0 turns it off).
    pub max_queue_wait: Option<Duration>,
    /// The most new tokens one request may ask for (more: 400); `None`: the context is the limit.
    pub max_output_tokens: Option<usize>,
}

/// A speech-to-text model: Whisper as a CTranslate2 folder (the faster-whisper format), a
/// Transformers checkpoint or a GGUF file on candle, or a ggml file on whisper.cpp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SttConfig {
    pub weights: Weights,
    /// Longer uploads get 400 (checked from the container's header when it declares a length, so
    /// an over-long file is refused before it is decoded).
    pub max_audio_secs: u32,
    pub backend: SttBackend,
    /// The weights file in the folder: `.safetensors` / `.gguf` (candle) or ggml (`whisper-cpp`);
    /// `None`: the folder's own (`model.bin`, `model.safetensors`, the only `.gguf` or `ggml*.bin`).
    pub file: Option<String>,
    /// whisper.cpp's threads per encoder or decoder call; `None`: one per core.
    pub cpu_threads: Option<usize>,
    /// How candle keeps the decoder's matrices (`auto`: Q8_0 for f32 on the CPU).
    pub decoder_weights: DecoderWeights,
    /// How candle keeps the encoder's matrices (`auto`: int8 for f32 on a CPU with AVX-512 VNNI).
    pub encoder_weights: EncoderWeights,
}

/// What runs a Whisper model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SttBackend {
    /// candle when the folder holds weights it reads (`model.bin`, safetensors, GGUF), whisper.cpp
    /// when it holds only a ggml file (and the build has the `whisper-cpp` feature).
    #[default]
    Auto,
    /// candle on CTranslate2, Transformers or GGUF weights, on any device.
    Candle,
    /// whisper.cpp on a ggml file (CPU; the `whisper-cpp` feature).
    WhisperCpp,
}

/// A text-to-speech model: Piper voices (`*.onnx` + `*.onnx.json`) in its `source` folder, and
/// optionally a voices folder watched for new voices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TtsConfig {
    pub weights: Weights,
    /// A folder inside the models directory whose voices are served too, looked at again on
    /// `SIGHUP` (drop a trained voice in, send the signal, it is served).
    pub voices_dir: Option<PathBuf>,
    /// The voice OpenAI's voice names speak with unless `voice_aliases` says otherwise; `None`:
    /// the first voice by name.
    pub default_voice: Option<String>,
    /// Request voice names (OpenAI's `alloy`, `nova`, … or any other) → voice ids.
    pub voice_aliases: std::collections::BTreeMap<String, String>,
    pub max_input_chars: usize,
    /// ONNX Runtime's threads per voice model; `None`: its default (one per physical core).
    pub cpu_threads: Option<usize>,
    /// Overrides of the voices' own noise scales (Piper's `--noise-scale`, `--noise-w`); both 0
    /// make the output deterministic.
    pub noise: Noise,
}

/// Piper's generator and duration noise, when the config overrides a voice's.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Noise {
    pub scale: Option<f32>,
    pub width: Option<f32>,
}

impl Eq for Noise {}

pub const DEFAULT_MAX_RUNNING_SEQUENCES: usize = 16;
pub const DEFAULT_LLM_BATCH_TOKENS: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KindConfig {
    Llm(LlmConfig),
    Stt(SttConfig),
    Tts(TtsConfig),
    Embedding(EncoderConfig),
    Rerank(RerankConfig),
}

impl KindConfig {
    /// Whether the entry uses another entry's loaded weights.
    fn shares_weights(&self) -> bool {
        matches!(self, Self::Rerank(RerankConfig::SharedEmbedder { .. }))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    pub id: Arc<str>,
    pub kind: ModelKind,
    pub preset: Option<String>,
    /// Requests admitted at once (tokenizing, queued or running); more get 429.
    pub max_concurrent_requests: usize,
    /// Unload after this long without requests (an entry sharing another's model follows that one).
    pub keep_alive: KeepAlive,
    /// Load at startup; otherwise on its first request.
    pub preload: bool,
    pub options: KindConfig,
}

impl ModelConfig {
    /// The weights this entry loads itself (`None` when it shares another entry's).
    pub fn weights(&self) -> Option<&Weights> {
        match &self.options {
            KindConfig::Llm(llm) => Some(&llm.weights),
            KindConfig::Stt(stt) => Some(&stt.weights),
            KindConfig::Tts(tts) => Some(&tts.weights),
            KindConfig::Embedding(encoder) | KindConfig::Rerank(RerankConfig::Load { encoder, .. }) => {
                Some(&encoder.weights)
            }
            KindConfig::Rerank(RerankConfig::SharedEmbedder { .. }) => None,
        }
    }

    /// The entry whose loaded model this one uses, if any.
    pub fn shares(&self) -> Option<&Arc<str>> {
        match &self.options {
            KindConfig::Rerank(RerankConfig::SharedEmbedder { embedding_model, .. }) => Some(embedding_model),
            _ => None,
        }
    }

    /// Where the weights come from, for humans (`hearth check`, logs).
    pub fn describe_source(&self) -> String {
        match (self.weights(), self.shares()) {
            (Some(weights), _) => weights.source.to_string(),
            (None, Some(shared)) => format!("the weights of `{shared}`"),
            (None, None) => String::new(),
        }
    }
}

/// Splits `table` into the entries whose keys are in `keys` and the rest.
fn split_off<'i>(table: &mut Spanned<DeTable<'i>>, keys: &[&str]) -> Spanned<DeTable<'i>> {
    let mut part = DeTable::new();
    for key in keys {
        if let Some((k, v)) = table.get_mut().remove_entry(*key) {
            part.insert(k, v);
        }
    }
    Spanned::new(table.span(), part)
}

/// Reads `[[models]]` entry `i`.
pub(super) fn parse_entry(
    i: usize,
    mut table: Spanned<DeTable<'_>>,
    origin: Origin,
    models_dir: &Path,
    defaults: &Defaults,
) -> Result<ModelConfig, ConfigError> {
    let prefix = format!("models[{i}].");
    let field = |name: &str| format!("{prefix}{name}");
    // Other keys are skipped unread here; they are read (and checked) once the kind is known.
    let head: RawHead = read(Spanned::new(table.span(), table.get_ref().clone()), origin, &prefix)?;
    let preset: Option<&'static Preset> = match &head.preset {
        None => None,
        Some(name) => Some(catalogue::find(name).ok_or_else(|| {
            invalid(
                field("preset"),
                format!("no preset `{name}`; known presets: {}", catalogue::names().join(", ")),
            )
        })?),
    };
    let kind = match (head.kind, preset) {
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
    check_keys(table.get_ref(), &allowed_keys(kind), origin, &prefix, &format!("`{kind}` models"))?;

    // The preset's defaults fill in what the entry does not set.
    let mut from_preset = Vec::new();
    if let Some(p) = preset {
        let allowed = allowed_keys(kind);
        for (key, value) in p.defaults.iter() {
            let name: &str = key.get_ref();
            if IDENTITY_KEYS.contains(&name) || !allowed.contains(&name) {
                // The catalogue is compiled in and tested; this is a build defect.
                return Err(invalid(
                    field("preset"),
                    format!("preset `{}` sets `{name}`, which presets cannot set", p.name),
                ));
            }
            if !table.get_ref().contains_key(name) {
                from_preset.push(key.get_ref().to_string());
                table.get_mut().insert(key.clone(), value.clone());
            }
        }
    }
    let origin =
        Origin { text: origin.text, preset: preset.map(|p| (p.name.as_str(), from_preset.as_slice())) };

    let common: RawCommon = read(split_off(&mut table, COMMON_KEYS), origin, &prefix)?;
    let id =
        common.id.clone().filter(|id| !id.is_empty()).ok_or_else(|| invalid(field("id"), "is required"))?;
    if let Some(bad) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || "._:/-".contains(*c))) {
        return Err(invalid(
            field("id"),
            format!("`{id}` contains `{bad}`; use letters, digits and `._:/-`"),
        ));
    }
    let max_concurrent_requests = positive(
        &field("max_concurrent_requests"),
        common.max_concurrent_requests,
        defaults.max_concurrent_requests,
    )?;
    let keep_alive = match &common.keep_alive {
        None => defaults.keep_alive,
        Some(raw) => raw.parse().map_err(|m| invalid(field("keep_alive"), m))?,
    };
    let preload = common.preload.unwrap_or(true);
    let entry = Entry { prefix: &prefix, models_dir, defaults, preset, common };
    let options = match kind {
        ModelKind::Llm => KindConfig::Llm(parse_llm(&entry, read(table, origin, &prefix)?)?),
        ModelKind::Stt => KindConfig::Stt(parse_stt(&entry, read(table, origin, &prefix)?)?),
        ModelKind::Tts => KindConfig::Tts(parse_tts(&entry, read(table, origin, &prefix)?)?),
        _ => {
            let rerank: RawRerank = read(split_off(&mut table, RERANK_KEYS), origin, &prefix)?;
            let encoder: RawEncoder = read(table, origin, &prefix)?;
            parse_encoder(&entry, kind, rerank, encoder)?
        }
    };
    Ok(ModelConfig {
        id: id.into(),
        kind,
        preset: if options.shares_weights() { None } else { preset.map(|p| p.name.clone()) },
        max_concurrent_requests,
        keep_alive,
        preload,
        options,
    })
}

/// What every kind's options are read with.
struct Entry<'a> {
    prefix: &'a str,
    models_dir: &'a Path,
    defaults: &'a Defaults,
    preset: Option<&'static Preset>,
    common: RawCommon,
}

impl Entry<'_> {
    fn field(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The weights this entry loads: its source (or its preset's), device, dtype and queue.
    fn weights(&self, default_files: &[&str]) -> Result<Weights, ConfigError> {
        let (common, preset) = (&self.common, self.preset);
        let source_text =
            common.source.as_deref().or(preset.map(|p| p.source.as_str())).ok_or_else(|| {
                invalid(
                self.field("source"),
                "is required (`hf:org/name[@revision]` or a directory in the models directory), or name a \
                 `preset` or (for `rerank`) an `embedding_model`",
            )
            })?;
        // The preset's file list belongs to the preset's source, not to a source given here.
        let files = match (&common.source, preset) {
            (None, Some(p)) => common.files.clone().or_else(|| Some(p.files.clone())),
            _ => common.files.clone(),
        };
        let source = parse_source(source_text, files, default_files, self.models_dir)
            .map_err(|m| invalid(self.field("source"), m))?;
        let device = match &common.device {
            None => Device::Auto,
            Some(text) => text.parse().map_err(|m: String| invalid(self.field("device"), m))?,
        };
        Ok(Weights {
            source,
            device,
            dtype: common.dtype.unwrap_or_default(),
            queue_depth: positive(&self.field("queue_depth"), common.queue_depth, self.defaults.queue_depth)?,
        })
    }
}

fn parse_encoder(
    entry: &Entry,
    kind: ModelKind,
    rerank: RawRerank,
    encoder: RawEncoder,
) -> Result<KindConfig, ConfigError> {
    let field = |name: &str| entry.field(name);
    let (common, defaults) = (&entry.common, entry.defaults);
    let text = TextConfig {
        max_input_tokens: match encoder.max_input_tokens {
            Some(n) if n < 3 => return Err(invalid(field("max_input_tokens"), "must be at least 3")),
            other => other,
        },
        // Rerank documents are cut to fit beside the query unless told otherwise, as Cohere and
        // Jina do; embedding inputs are refused when too long unless truncation is asked for.
        truncate: encoder.truncate.unwrap_or(kind == ModelKind::Rerank),
        max_inputs_per_request: positive(
            &field("max_inputs_per_request"),
            encoder.max_inputs_per_request,
            defaults.max_inputs_per_request,
        )?,
        max_tokens_per_request: positive(
            &field("max_tokens_per_request"),
            encoder.max_tokens_per_request,
            defaults.max_tokens_per_request,
        )?,
    };

    if let Some(target) = rerank.embedding_model {
        // A bi-encoder over another entry's model: nothing about loading weights may be set here.
        let loading_keys: Vec<&str> = [
            ("preset", common.preset.is_some()),
            ("source", common.source.is_some()),
            ("files", common.files.is_some()),
            ("device", common.device.is_some()),
            ("dtype", common.dtype.is_some()),
            ("queue_depth", common.queue_depth.is_some()),
            ("keep_alive", common.keep_alive.is_some()),
            ("preload", common.preload.is_some()),
            ("architecture", encoder.architecture.is_some()),
            ("pooling", encoder.pooling.is_some()),
            ("normalize", encoder.normalize.is_some()),
            ("max_batch_tokens", encoder.max_batch_tokens.is_some()),
            ("max_batch_size", encoder.max_batch_size.is_some()),
            ("max_batch_memory_mib", encoder.max_batch_memory_mib.is_some()),
            ("max_queue_wait_ms", encoder.max_queue_wait_ms.is_some()),
            ("backend", encoder.backend.is_some()),
            ("cache_mib", encoder.cache_mib.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect();
        if let Some(key) = loading_keys.first() {
            return Err(invalid(
                field(key),
                format!(
                    "cannot be set with `embedding_model`: the model `{target}` is loaded by its own entry"
                ),
            ));
        }
        if rerank.scoring == Some(ScoringChoice::CrossEncoder) {
            return Err(invalid(field("scoring"), "an `embedding_model` reranks as a bi-encoder"));
        }
        return Ok(KindConfig::Rerank(RerankConfig::SharedEmbedder { embedding_model: target.into(), text }));
    }

    let weights = entry.weights(DEFAULT_ENCODER_FILES)?;
    let cache_bytes = match encoder.cache_mib {
        None => 0,
        Some(mib) if mib.is_finite() && mib >= 0.0 => (mib * 1_048_576.0) as usize,
        Some(_) => return Err(invalid(field("cache_mib"), "must be 0 (off) or a positive number of MiB")),
    };
    if cache_bytes > 0 && !matches!(kind, ModelKind::Embedding | ModelKind::Rerank) {
        return Err(invalid(field("cache_mib"), "applies only to `embedding` and `rerank` models"));
    }
    let encoder_config = EncoderConfig {
        backend: encoder.backend.unwrap_or_default(),
        cache_bytes,
        weights,
        architecture: match &encoder.architecture {
            None => None,
            Some(text) => Some(text.parse().map_err(|m: String| invalid(field("architecture"), m))?),
        },
        pooling: encoder.pooling,
        normalize: encoder.normalize,
        text,
        batch: BatchLimits {
            max_batch_tokens: match encoder.max_batch_tokens {
                None => None,
                Some(n) => Some(positive(&field("max_batch_tokens"), Some(n), 1)?),
            },
            max_batch_size: positive(
                &field("max_batch_size"),
                encoder.max_batch_size,
                DEFAULT_MAX_BATCH_SIZE,
            )?,
            max_batch_bytes: match encoder.max_batch_memory_mib {
                None => None,
                Some(mib) => {
                    Some(positive(&field("max_batch_memory_mib"), Some(mib), 1)?.saturating_mul(1 << 20))
                }
            },
        },
        max_queue_wait: match encoder.max_queue_wait_ms {
            None => defaults.max_queue_wait,
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
        },
    };
    let options = match kind {
        ModelKind::Embedding => {
            if rerank.scoring.is_some() {
                return Err(invalid(field("scoring"), "applies only to `rerank` models"));
            }
            KindConfig::Embedding(encoder_config)
        }
        _ => KindConfig::Rerank(RerankConfig::Load {
            encoder: encoder_config,
            scoring: rerank.scoring.unwrap_or_default(),
        }),
    };
    Ok(options)
}

fn parse_llm(entry: &Entry, raw: RawLlm) -> Result<LlmConfig, ConfigError> {
    let field = |name: &str| entry.field(name);
    if entry.common.dtype.is_some() {
        return Err(invalid(
            field("dtype"),
            "applies to encoders; an `llm` runs in the GGUF file's own tensor types",
        ));
    }
    if let Some(file) = &raw.file {
        if !is_plain_relative(Path::new(file)) || !file.ends_with(".gguf") {
            return Err(invalid(
                field("file"),
                format!("`{file}` is not a `.gguf` file name inside the model directory"),
            ));
        }
    }
    let at_least = |name: &str, value: Option<usize>, min: usize| match value {
        Some(v) if v < min => Err(invalid(field(name), format!("must be at least {min}"))),
        other => Ok(other),
    };
    Ok(LlmConfig {
        weights: entry.weights(DEFAULT_LLM_FILES)?,
        file: raw.file,
        chat_template: raw.chat_template,
        context_length: at_least("context_length", raw.context_length, 16)?,
        max_tokens: at_least("max_tokens", raw.max_tokens, 1)?,
        max_running_sequences: positive(
            &field("max_running_sequences"),
            raw.max_running_sequences,
            DEFAULT_MAX_RUNNING_SEQUENCES,
        )?,
        max_batch_tokens: positive(
            &field("max_batch_tokens"),
            raw.max_batch_tokens,
            DEFAULT_LLM_BATCH_TOKENS,
        )?,
        kv_cache_bytes: match raw.kv_cache_mib {
            None => None,
            Some(mib) => Some(positive(&field("kv_cache_mib"), Some(mib), 1)?.saturating_mul(1 << 20)),
        },
        kv_cache_type: raw.kv_cache_type.unwrap_or_default(),
        cpu_threads: match raw.cpu_threads {
            None => None,
            Some(n) => Some(positive(&field("cpu_threads"), Some(n), 1)?),
        },
        prefix_cache: raw.prefix_cache.unwrap_or(true),
        max_queue_wait: match raw.max_queue_wait_ms {
            None => entry.defaults.max_queue_wait,
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
        },
        max_output_tokens: at_least("max_output_tokens", raw.max_output_tokens, 1)?,
    })
}

/// Files of a Whisper repository on the hub: a CTranslate2 folder (what faster-whisper downloads)
/// or a Transformers checkpoint (`openai/whisper-*`: `model.safetensors` and its generation config).
pub const DEFAULT_STT_FILES: &[&str] = &[
    "config.json",
    "model.bin",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "vocabulary.*",
    "preprocessor_config.json",
];

fn parse_stt(entry: &Entry, raw: RawStt) -> Result<SttConfig, ConfigError> {
    let max_audio_secs = match raw.max_audio_secs {
        Some(0) => return Err(invalid(entry.field("max_audio_secs"), "must be at least 1")),
        Some(secs) => secs,
        None => DEFAULT_MAX_AUDIO_SECS,
    };
    let backend = raw.backend.unwrap_or_default();
    match (&raw.file, backend) {
        (Some(file), SttBackend::Candle) if !whisper::candle_reads_file(file) => {
            return Err(invalid(
                entry.field("file"),
                "is not a file the candle backend reads (model.bin, a .safetensors or a .gguf file; \
                 a ggml file needs `backend = \"whisper-cpp\"`)",
            ))
        }
        (Some(file), SttBackend::WhisperCpp) if whisper::candle_reads_file(file) => {
            return Err(invalid(
                entry.field("file"),
                "is not a ggml file, the only kind whisper.cpp reads (CTranslate2, safetensors and GGUF \
                 Whisper run on the candle backend)",
            ))
        }
        _ => {}
    }
    if let Some(file) = &raw.file {
        if !is_plain_relative(Path::new(file)) {
            return Err(invalid(entry.field("file"), "must be a file name inside the model's folder"));
        }
    }
    if raw.cpu_threads == Some(0) {
        return Err(invalid(entry.field("cpu_threads"), "must be at least 1"));
    }
    if raw.encoder_weights.is_some() && backend == SttBackend::WhisperCpp {
        return Err(invalid(
            entry.field("encoder_weights"),
            "applies to the candle backend (a ggml file's types are its own)",
        ));
    }
    if raw.decoder_weights.is_some() && backend == SttBackend::WhisperCpp {
        return Err(invalid(
            entry.field("decoder_weights"),
            "applies to the candle backend (a ggml file's types are its own)",
        ));
    }
    Ok(SttConfig {
        weights: entry.weights(DEFAULT_STT_FILES)?,
        max_audio_secs,
        backend,
        file: raw.file,
        cpu_threads: raw.cpu_threads,
        decoder_weights: raw.decoder_weights.unwrap_or_default(),
        encoder_weights: raw.encoder_weights.unwrap_or_default(),
    })
}

/// Files of a Piper voice on the hub when the entry names none.
pub const DEFAULT_TTS_FILES: &[&str] = &["*.onnx", "*.onnx.json"];

fn parse_tts(entry: &Entry, raw: RawTts) -> Result<TtsConfig, ConfigError> {
    let voices_dir = match raw.voices_dir {
        None => None,
        Some(dir) if is_plain_relative(Path::new(&dir)) => Some(entry.models_dir.join(dir)),
        Some(dir) => {
            return Err(invalid(
                entry.field("voices_dir"),
                format!("`{dir}` must be a plain relative path inside the models directory (no `..`, `.` or leading `/`)"),
            ))
        }
    };
    let max_input_chars = match raw.max_input_chars {
        Some(0) => return Err(invalid(entry.field("max_input_chars"), "must be at least 1")),
        Some(n) => n,
        None => DEFAULT_MAX_INPUT_CHARS,
    };
    if raw.cpu_threads == Some(0) {
        return Err(invalid(entry.field("cpu_threads"), "must be at least 1"));
    }
    for (name, value) in [("noise_scale", raw.noise_scale), ("noise_w", raw.noise_w)] {
        if value.is_some_and(|v| !(0.0..=2.0).contains(&v)) {
            return Err(invalid(entry.field(name), "must be between 0 and 2"));
        }
    }
    let voice_aliases = raw.voice_aliases.unwrap_or_default();
    if let Some((alias, _)) =
        voice_aliases.iter().find(|(alias, target)| alias.is_empty() || target.is_empty())
    {
        return Err(invalid(entry.field("voice_aliases"), format!("alias `{alias}` must name a voice")));
    }
    Ok(TtsConfig {
        weights: entry.weights(DEFAULT_TTS_FILES)?,
        voices_dir,
        default_voice: raw.default_voice,
        voice_aliases,
        max_input_chars,
        cpu_threads: raw.cpu_threads,
        noise: Noise { scale: raw.noise_scale, width: raw.noise_w },
    })
}

/// Entries that use another entry's model must name an existing `embedding` entry with weights of
/// its own.
pub(super) fn check_references(models: &[ModelConfig]) -> Result<(), ConfigError> {
    for (i, model) in models.iter().enumerate() {
        let Some(target) = model.shares() else { continue };
        let field = format!("models[{i}].embedding_model");
        match models.iter().find(|m| m.id == *target) {
            None => return Err(invalid(field, format!("no model `{target}` is configured"))),
            Some(t) if t.kind != ModelKind::Embedding => {
                return Err(invalid(
                    field,
                    format!("`{target}` has kind `{}`; it must be an `embedding` model", t.kind),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Default file patterns for hub sources of LLMs (presets name the one quantization they want): a
/// GGUF repository's files, or a Hugging Face checkpoint's.
pub const DEFAULT_LLM_FILES: &[&str] = &[
    "*.gguf",
    "config.json",
    "*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Default file patterns for hub sources of encoder models.
pub const DEFAULT_ENCODER_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "*.safetensors",
    "modules.json",
    "sentence_bert_config.json",
    "*_Pooling/config.json",
];

/// `hf:org/name[@revision]`, or a directory inside the models directory by a plain relative path
/// (no `..`, no leading `/`), so a config cannot point Hearth at files outside it.
pub fn parse_source(
    text: &str,
    files: Option<Vec<String>>,
    default_files: &[&str],
    models_dir: &Path,
) -> Result<ModelSource, String> {
    if let Some(spec) = text.strip_prefix("hf:") {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, revision)) if !revision.is_empty() => (repo, revision),
            Some(_) => return Err(format!("`{text}` has an empty revision after `@`")),
            None => (spec, "main"),
        };
        let well_formed = repo.split('/').count() == 2
            && repo.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
        if !well_formed {
            return Err(format!("`{text}` is not `hf:org/name[@revision]`"));
        }
        // The revision names a file in the hub cache (`refs/<revision>`): it must stay inside.
        if !is_plain_relative(Path::new(revision)) {
            return Err(format!(
                "`{text}`: the revision `{revision}` must be a plain name (no `..` or leading `/`)"
            ));
        }
        let files = files.unwrap_or_else(|| default_files.iter().map(|s| s.to_string()).collect());
        for pattern in &files {
            glob::Pattern::new(pattern).map_err(|e| format!("file pattern `{pattern}`: {e}"))?;
            if !is_plain_relative(Path::new(pattern)) {
                return Err(format!("file pattern `{pattern}` must be a plain relative path"));
            }
        }
        return Ok(ModelSource::Hub { repo: repo.into(), revision: revision.into(), files });
    }
    if text.is_empty() {
        return Err("is empty".into());
    }
    if files.is_some() {
        return Err("`files` applies only to `hf:` sources".into());
    }
    if text.starts_with('~') || !is_plain_relative(Path::new(text)) {
        return Err(format!(
            "`{text}` is not a directory inside the models directory ({}): use its name there (no `..`, \
             no leading `/` or `~`), copy it in with `hearth models pull DIR --as NAME`, or set `models_dir`",
            models_dir.display()
        ));
    }
    Ok(ModelSource::Local(models_dir.join(text)))
}
