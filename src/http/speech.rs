//! `POST /v1/audio/speech`, OpenAI's shape: `model`, `input` (at most the model's
//! `max_input_chars`, 4,096 by default), `voice` (a voice id, an alias, or one of OpenAI's names),
//! `instructions` (accepted and ignored: Piper voices take no style prompt), `response_format`
//! (`mp3`, `opus`, `flac`, `wav`, `pcm`; default `mp3`), `speed` (0.25–4), `stream_format`
//! (`audio`: the file's bytes, chunked, as each sentence is ready; `sse`: `speech.audio.delta`
//! events with base64 audio, then `speech.audio.done`).
//!
//! Every format is 24 kHz mono, as OpenAI's are (`pcm`: raw 16-bit little-endian); the voice's own
//! rate is resampled. mp3, opus and pcm go out sentence by sentence; wav and flac carry their
//! length in their header, so they are sent whole once the last sentence is rendered.
//!
//! Also `GET /v1/audio/voices` (the Kokoro-FastAPI / Speaches convention): every voice of every
//! loaded `tts` model.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine as _;
use futures::stream::{self, Stream, StreamExt};
use hearth_audio::{AudioFormat, Encoder, StreamResampler};
use hearth_engine::registry::{LoadState, Served};
use hearth_engine::synthesize::service::OPENAI_VOICES;
use hearth_engine::synthesize::{SpeechRequest, SpeechStream, Synthesize};
use hearth_engine::{EngineError, ModelKind};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::generation::refuse_unknown;
use super::json::Json;
use super::{labelled, ready_model};
use crate::auth::Caller;
use crate::state::AppState;

/// The rate of every response (OpenAI's).
pub const OUTPUT_SAMPLE_RATE_HZ: u32 = 24_000;
const MIN_SPEED: f32 = 0.25;
const MAX_SPEED: f32 = 4.0;

#[derive(Deserialize)]
pub struct SpeechBody {
    model: Option<String>,
    input: Option<String>,
    voice: Option<VoiceField>,
    /// Accepted for compatibility; Piper voices take no instructions.
    #[allow(dead_code)]
    instructions: Option<String>,
    response_format: Option<String>,
    speed: Option<f32>,
    stream_format: Option<String>,
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

/// A voice name, or OpenAI's object form for custom voices (`{"id": "…"}`).
#[derive(Deserialize)]
#[serde(untagged)]
enum VoiceField {
    Name(String),
    Object { id: String },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamFormat {
    Audio,
    Sse,
}

struct Checked {
    input: String,
    voice: String,
    format: AudioFormat,
    speed: f32,
    stream: StreamFormat,
}

fn supported_formats() -> String {
    AudioFormat::SUPPORTED.iter().map(|f| format!("`{}`", f.name())).collect::<Vec<_>>().join(", ")
}

fn check(body: SpeechBody, model_id: &str, synth: &dyn Synthesize) -> Result<Checked, ApiError> {
    refuse_unknown(&body.unknown)?;
    let input = body.input.ok_or_else(|| ApiError::invalid("`input` is required", "input"))?;
    if input.trim().is_empty() {
        return Err(ApiError::invalid("`input` is empty; give the text to speak", "input"));
    }
    let chars = input.chars().count();
    if chars > synth.max_input_chars() {
        return Err(ApiError::invalid(
            format!(
                "`input` has {chars} characters; model `{model_id}` speaks at most {} per request",
                synth.max_input_chars()
            ),
            "input",
        ));
    }
    let asked = match body.voice {
        Some(VoiceField::Name(name) | VoiceField::Object { id: name }) => name,
        None => return Err(ApiError::invalid("`voice` is required", "voice")),
    };
    let voice = synth.resolve_voice(&asked).ok_or_else(|| {
        let voices: Vec<String> = synth.voices().into_iter().map(|v| format!("`{}`", v.id)).collect();
        ApiError::invalid(
            format!(
                "model `{model_id}` has no voice `{asked}`; its voices: {} (OpenAI's voice names also work: {})",
                voices.join(", "),
                OPENAI_VOICES.join(", ")
            ),
            "voice",
        )
    })?;
    let format = match body.response_format.as_deref() {
        None => AudioFormat::Mp3,
        Some(name) => AudioFormat::from_name(name).ok_or_else(|| {
            ApiError::invalid(
                format!(
                    "`response_format` `{name}` cannot be produced by this server; supported: {}",
                    supported_formats()
                ),
                "response_format",
            )
        })?,
    };
    let speed = body.speed.unwrap_or(1.0);
    if !(MIN_SPEED..=MAX_SPEED).contains(&speed) {
        return Err(ApiError::invalid(
            format!("`speed` must be between {MIN_SPEED} and {MAX_SPEED}, got {speed}"),
            "speed",
        ));
    }
    let stream = match body.stream_format.as_deref() {
        None | Some("audio") => StreamFormat::Audio,
        Some("sse") => StreamFormat::Sse,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("`stream_format` must be `audio` or `sse`, got `{other}`"),
                "stream_format",
            ))
        }
    };
    Ok(Checked { input, voice, format, speed, stream })
}

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<SpeechBody>,
) -> Response {
    let Some(model) = body.model.clone() else {
        return ApiError::invalid("`model` is required", "model").into_response();
    };
    let result = async {
        let (entry, served) = ready_model(&state, &model, ModelKind::Tts).await?;
        let Served::Tts(synth) = &*served else {
            return Err(ApiError::Internal { cause: "registry kind mismatch".into() });
        };
        let checked = check(body, &entry.id, synth.as_ref())?;
        let chars = checked.input.chars().count();
        let request = SpeechRequest {
            voice: checked.voice.clone(),
            text: checked.input,
            speed: checked.speed,
            priority: caller.priority(),
        };
        let speech = synth.speak(request).await?;
        caller.charge(chars);
        // Formats with the length in their header are written whole.
        let whole = matches!(checked.format, AudioFormat::Wav | AudioFormat::Flac);
        let encoder =
            Encoder::new(checked.format, OUTPUT_SAMPLE_RATE_HZ, !whole).map_err(EngineError::Audio)?;
        let audio = encoded(speech, encoder);
        Ok(match checked.stream {
            StreamFormat::Audio => audio_response(audio, checked.format),
            StreamFormat::Sse => sse_response(audio, chars),
        })
    }
    .await;
    labelled(&state, &model, result)
}

/// The encoded bytes of each chunk of speech as it arrives (resampled to 24 kHz as one stream,
/// so pieces of a sentence join without a seam, and encoded off the runtime), then the
/// resampler's and the encoder's tails. An error ends the stream after what was sent.
fn encoded(speech: SpeechStream, encoder: Encoder) -> impl Stream<Item = Result<Bytes, EngineError>> + Send {
    struct Progress {
        speech: SpeechStream,
        work: Option<(StreamResampler, Encoder)>,
    }
    let resampler = StreamResampler::new(speech.sample_rate_hz, OUTPUT_SAMPLE_RATE_HZ);
    let start = resampler.map(|resampler| Progress { speech, work: Some((resampler, encoder)) });
    stream::unfold(Some(start), |progress| async move {
        let mut progress = match progress? {
            Ok(progress) => progress,
            Err(error) => return Some((Err(EngineError::Audio(error)), None)),
        };
        loop {
            let (mut resampler, mut encoder) = progress.work.take()?;
            match progress.speech.chunks.recv().await {
                Some(Ok(chunk)) => {
                    let work = tokio::task::spawn_blocking(move || {
                        let samples = resampler.push(&chunk.samples)?;
                        let bytes = encoder.push(&samples)?;
                        Ok::<_, hearth_audio::AudioError>((resampler, encoder, bytes))
                    });
                    match work.await {
                        Ok(Ok((resampler, encoder, bytes))) => {
                            progress.work = Some((resampler, encoder));
                            if bytes.is_empty() {
                                continue;
                            }
                            return Some((Ok(Bytes::from(bytes)), Some(Ok(progress))));
                        }
                        Ok(Err(error)) => return Some((Err(EngineError::Audio(error)), None)),
                        Err(join) => {
                            return Some((Err(EngineError::Internal { message: join.to_string() }), None))
                        }
                    }
                }
                Some(Err(error)) => return Some((Err(error), None)),
                None => {
                    let tail = tokio::task::spawn_blocking(move || {
                        let mut bytes = encoder.push(&resampler.finish()?)?;
                        bytes.extend(encoder.finish()?);
                        Ok::<_, hearth_audio::AudioError>(bytes)
                    })
                    .await;
                    return match tail {
                        Ok(Ok(bytes)) if bytes.is_empty() => None,
                        Ok(Ok(bytes)) => Some((Ok(Bytes::from(bytes)), None)),
                        Ok(Err(error)) => Some((Err(EngineError::Audio(error)), None)),
                        Err(join) => Some((Err(EngineError::Internal { message: join.to_string() }), None)),
                    };
                }
            }
        }
    })
}

fn audio_response(
    audio: impl Stream<Item = Result<Bytes, EngineError>> + Send + 'static,
    format: AudioFormat,
) -> Response {
    let body = audio.map(|item| {
        item.map_err(|error| {
            // Headers are gone already: the connection is cut so the client sees a short file,
            // never a complete-looking wrong one.
            tracing::error!(%error, "speech stream failed");
            std::io::Error::other(error.to_string())
        })
    });
    let mut response = Body::from_stream(body).into_response();
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn sse_response(
    audio: impl Stream<Item = Result<Bytes, EngineError>> + Send + 'static,
    chars: usize,
) -> Response {
    let events = audio
        .map(|item| match item {
            Ok(bytes) => json!({
                "type": "speech.audio.delta",
                "audio": base64::engine::general_purpose::STANDARD.encode(&bytes),
            }),
            Err(error) => {
                tracing::error!(%error, "speech stream failed");
                let body = ApiError::from(error).stream_body();
                json!({"type": "error", "error": body["error"]})
            }
        })
        .chain(stream::once(async move {
            // Usage counts the input's characters (what OpenAI bills its tts models by).
            json!({
                "type": "speech.audio.done",
                "usage": {"input_tokens": chars, "output_tokens": 0, "total_tokens": chars},
            })
        }))
        .map(|value: Value| Ok::<_, Infallible>(SseEvent::default().data(value.to_string())));
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

#[derive(Deserialize)]
pub struct VoicesQuery {
    model: Option<String>,
}

/// `GET /v1/audio/voices[?model=ID]`: the voices of every loaded `tts` model (a model not loaded
/// yet lists none until its first request loads it).
pub async fn voices(State(state): State<AppState>, Query(query): Query<VoicesQuery>) -> Response {
    let mut data = Vec::new();
    let mut names = Vec::new();
    for entry in state.registry.entries() {
        if entry.kind != ModelKind::Tts || query.model.as_deref().is_some_and(|m| m != &*entry.id) {
            continue;
        }
        let LoadState::Ready(served) = entry.state() else { continue };
        let Served::Tts(synth) = &*served else { continue };
        let aliases = aliases_of(&state, &entry.id);
        for voice in synth.voices() {
            let voice_aliases: Vec<&String> =
                aliases.iter().filter(|(_, target)| **target == voice.id).map(|(alias, _)| alias).collect();
            names.push(voice.id.clone());
            data.push(json!({
                "id": voice.id,
                "object": "voice",
                "name": voice.id,
                "model": &*entry.id,
                "language": voice.language,
                "sample_rate": voice.sample_rate_hz,
                "quality": voice.quality,
                "aliases": voice_aliases,
            }));
        }
    }
    if let Some(model) = &query.model {
        if state.registry.get(model).is_none() {
            return ApiError::ModelNotFound { model: model.clone() }.into_response();
        }
    }
    axum::Json(json!({"object": "list", "data": data, "voices": names})).into_response()
}

/// The configured aliases of `model` (OpenAI names without an alias go to the default voice).
fn aliases_of(state: &AppState, model: &str) -> BTreeMap<String, String> {
    let Some(config) = state.config.models.iter().find(|m| &*m.id == model) else { return BTreeMap::new() };
    let hearth_config = &config.options;
    match hearth_config {
        crate::config::KindConfig::Tts(tts) => tts.voice_aliases.clone(),
        _ => BTreeMap::new(),
    }
}
