//! `POST /v1/audio/transcriptions` and `POST /v1/audio/translations`, OpenAI's shape: a
//! `multipart/form-data` body with the `file` (any format `hearth_audio` decodes) and `model`,
//! optional `language` (transcriptions), `prompt`, `temperature`, `response_format` (`json`,
//! `text`, `srt`, `vtt`, `verbose_json`), `timestamp_granularities[]` and `stream` (server-sent
//! `transcript.text.delta` events, then `transcript.text.done`).
//!
//! Multipart is a form type a web page may make a browser send anywhere without a CORS preflight,
//! so these routes refuse a request that carries an `Origin` the CORS settings do not allow: SDKs
//! and curl send none, and a page elsewhere cannot make a local server transcribe for it.

use std::convert::Infallible;
use std::fmt::Write as _;

use axum::extract::multipart::{Field, MultipartError};
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header::{CONTENT_TYPE, ORIGIN};
use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::stream::{self, StreamExt};
use hearth_engine::registry::Served;
use hearth_engine::transcribe::{
    language_code, language_name, DecodeOptions, Segment, Task, Transcribe, TranscribeRequest, Transcript,
};
use hearth_engine::{EngineError, ModelKind};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::generation::unsupported;
use super::json::BodyLimit;
use super::{labelled, ready_model};
use crate::auth::Caller;
use crate::state::AppState;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ResponseFormat {
    #[default]
    Json,
    Text,
    Srt,
    Vtt,
    VerboseJson,
}

impl ResponseFormat {
    fn parse(text: &str) -> Result<Self, ApiError> {
        Ok(match text {
            "json" => Self::Json,
            "text" => Self::Text,
            "srt" => Self::Srt,
            "vtt" => Self::Vtt,
            "verbose_json" => Self::VerboseJson,
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "`response_format` must be one of `json`, `text`, `srt`, `vtt`, `verbose_json`, got `{other}`"
                    ),
                    "response_format",
                ))
            }
        })
    }
}

/// The form, read field by field.
struct AudioForm {
    file: Option<Vec<u8>>,
    model: Option<String>,
    language: Option<String>,
    prompt: Option<String>,
    temperature: Option<f32>,
    response_format: ResponseFormat,
    words: bool,
    /// `segments` in `verbose_json`: unless only `word` granularity was asked for.
    segments: bool,
    stream: bool,
}

pub async fn transcriptions(state: State<AppState>, caller: Extension<Caller>, request: Request) -> Response {
    handle(state, caller, request, Task::Transcribe).await
}

pub async fn translations(state: State<AppState>, caller: Extension<Caller>, request: Request) -> Response {
    handle(state, caller, request, Task::Translate).await
}

async fn handle(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    request: Request,
    task: Task,
) -> Response {
    let mut form = match read_form(&state, request, task).await {
        Ok(form) => form,
        Err(error) => return error.into_response(),
    };
    let Some(model) = form.model.clone() else {
        return ApiError::invalid("`model` is required", "model").into_response();
    };
    let (entry, served) = match ready_model(&state, &model, ModelKind::Stt).await {
        Ok(found) => found,
        Err(error) => return labelled(&state, &model, Err::<(), _>(error)),
    };
    let result = async {
        let Served::Stt(transcriber) = &*served else {
            return Err(ApiError::Internal { cause: "registry kind mismatch".into() });
        };
        let language = match &form.language {
            None => None,
            Some(text) => match language_code(text).filter(|code| transcriber.knows_language(code)) {
                Some(code) => Some(code.to_string()),
                None => {
                    return Err(ApiError::invalid(
                        format!(
                            "`language` `{text}` is not a language model `{}` knows; give an ISO 639-1 code such as `en`",
                            entry.id
                        ),
                        "language",
                    ))
                }
            },
        };
        if form.words && !transcriber.aligns_words() {
            return Err(ApiError::invalid(
                format!(
                    "model `{}` cannot time words (whisper.cpp does not expose its cross-attention); ask for \
                     `timestamp_granularities[]=segment`, or use a CTranslate2 folder on the candle backend",
                    entry.id
                ),
                "timestamp_granularities",
            ));
        }
        let audio = form.file.take().ok_or_else(|| ApiError::invalid("`file` is required", "file"))?;
        let options = DecodeOptions {
            language,
            task,
            prompt: form.prompt.take(),
            temperature: form.temperature.unwrap_or(0.0),
            word_timestamps: form.words,
            ..DecodeOptions::default()
        };
        let (sender, receiver) = match form.stream {
            true => {
                let (sender, receiver) = mpsc::unbounded_channel();
                (Some(sender), Some(receiver))
            }
            false => (None, None),
        };
        let request = TranscribeRequest { audio, options, priority: caller.priority(), segments: sender };
        if let Some(receiver) = receiver {
            return Ok(stream_response(served.clone(), request, receiver, caller.clone()));
        }
        let transcript = transcriber.transcribe(request).await?;
        caller.charge(transcript.segments.iter().map(|s| s.tokens.len()).sum());
        Ok(render(&transcript, &form, task))
    }
    .await;
    labelled(&state, &model, result)
}

/// Reads the multipart form. Unknown fields are refused (OpenAI's wording), as are values out of
/// range and options Hearth does not support yet.
async fn read_form(state: &AppState, request: Request, task: Task) -> Result<AudioForm, ApiError> {
    check_origin(state, request.headers().get(ORIGIN))?;
    let content_type =
        request.headers().get(CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let is_multipart = content_type.as_deref().is_some_and(|t| {
        t.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("multipart/form-data")
    });
    if !is_multipart {
        return Err(ApiError::NotMultipart { content_type });
    }
    let limit = request.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
    let mut multipart = Multipart::from_request(request, state).await.map_err(|rejection| {
        ApiError::invalid(format!("could not read the multipart body: {rejection}"), "file")
    })?;
    let mut form = AudioForm {
        file: None,
        model: None,
        language: None,
        prompt: None,
        temperature: None,
        response_format: ResponseFormat::default(),
        words: false,
        segments: true,
        stream: false,
    };
    let mut granularities = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(|e| multipart_error(e, limit))? {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "file" => form.file = Some(field.bytes().await.map_err(|e| multipart_error(e, limit))?.to_vec()),
            "model" => form.model = Some(text(field, limit).await?),
            "language" if task == Task::Transcribe => form.language = Some(text(field, limit).await?),
            "prompt" => form.prompt = Some(text(field, limit).await?),
            "response_format" => {
                form.response_format = ResponseFormat::parse(text(field, limit).await?.trim())?
            }
            "temperature" => {
                let value = text(field, limit).await?;
                let temperature = value.trim().parse::<f32>().ok().filter(|t| (0.0..=1.0).contains(t));
                form.temperature = Some(temperature.ok_or_else(|| {
                    ApiError::invalid(
                        format!("`temperature` must be a number from 0 to 1, got `{value}`"),
                        "temperature",
                    )
                })?);
            }
            "timestamp_granularities[]" | "timestamp_granularities" if task == Task::Transcribe => {
                granularities.push(text(field, limit).await?)
            }
            "stream" if task == Task::Transcribe => {
                form.stream = match text(field, limit).await?.trim() {
                    "true" | "True" | "1" => true,
                    "false" | "False" | "0" => false,
                    other => {
                        return Err(ApiError::invalid(
                            format!("`stream` must be true or false, got `{other}`"),
                            "stream",
                        ))
                    }
                }
            }
            // The SDKs send these with their defaults; any other value is refused.
            "chunking_strategy" => {
                let value = text(field, limit).await?;
                if value.trim() != "auto" {
                    return Err(unsupported("chunking_strategy", "only `auto` (30 s windows)"));
                }
            }
            "include[]" | "include" => return Err(unsupported("include", "no extra outputs are available")),
            other => {
                return Err(ApiError::Unsupported {
                    message: format!("Unrecognized request argument supplied: {other}"),
                    param: other.to_string(),
                })
            }
        }
    }
    let mut segment_granularity = false;
    for granularity in &granularities {
        match granularity.trim() {
            "segment" => segment_granularity = true,
            "word" => form.words = true,
            other => {
                return Err(ApiError::invalid(
                    format!("`timestamp_granularities[]` takes `segment` or `word`, got `{other}`"),
                    "timestamp_granularities",
                ))
            }
        }
    }
    if !granularities.is_empty() && form.response_format != ResponseFormat::VerboseJson {
        return Err(ApiError::invalid(
            "`timestamp_granularities[]` needs `response_format` `verbose_json`",
            "timestamp_granularities",
        ));
    }
    form.segments = segment_granularity || !form.words;
    if form.stream && !matches!(form.response_format, ResponseFormat::Json | ResponseFormat::Text) {
        return Err(ApiError::invalid(
            "`stream` sends text deltas; use `response_format` `json` or `text` with it",
            "stream",
        ));
    }
    Ok(form)
}

/// A browser page's `Origin` must be one the CORS settings allow (requests without one, from SDKs,
/// curl or servers, pass).
pub(crate) fn check_origin(state: &AppState, origin: Option<&HeaderValue>) -> Result<(), ApiError> {
    let Some(origin) = origin else { return Ok(()) };
    let allowed = &state.config.server.cors_allowed_origins;
    let origin = String::from_utf8_lossy(origin.as_bytes());
    if allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(&origin)) {
        return Ok(());
    }
    Err(ApiError::OriginNotAllowed { origin: origin.into_owned() })
}

pub(crate) async fn text(field: Field<'_>, limit: usize) -> Result<String, ApiError> {
    let name = field.name().unwrap_or("").to_string();
    field.text().await.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit },
        _ => ApiError::invalid(format!("could not read the form field `{name}`: {e}"), name.clone()),
    })
}

pub(crate) fn multipart_error(error: MultipartError, limit: usize) -> ApiError {
    match error.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit },
        _ => ApiError::InvalidRequest {
            message: format!("could not read the multipart body: {error}"),
            param: None,
        },
    }
}

fn usage(transcript: &Transcript) -> Value {
    json!({ "type": "duration", "seconds": transcript.duration_secs.ceil() as u64 })
}

/// The transcript in the requested format, with the content type OpenAI sends.
fn render(transcript: &Transcript, form: &AudioForm, task: Task) -> Response {
    let format = form.response_format;
    let plain = |body: String| ([(CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response();
    match format {
        ResponseFormat::Json => {
            axum::Json(json!({ "text": transcript.text(), "usage": usage(transcript) })).into_response()
        }
        ResponseFormat::Text => plain(format!("{}\n", transcript.text())),
        ResponseFormat::Srt => plain(srt(&transcript.segments)),
        ResponseFormat::Vtt => {
            ([(CONTENT_TYPE, "text/vtt; charset=utf-8")], vtt(&transcript.segments)).into_response()
        }
        ResponseFormat::VerboseJson => {
            let mut body = json!({
                "task": match task { Task::Transcribe => "transcribe", Task::Translate => "translate" },
                "language": language_name(&transcript.language),
                "duration": transcript.duration_secs,
                "text": transcript.text(),
                "usage": usage(transcript),
            });
            if form.segments {
                body["segments"] = transcript.segments.iter().map(segment_json).collect();
            }
            if form.words {
                body["words"] = transcript
                    .segments
                    .iter()
                    .flat_map(|s| &s.words)
                    .map(|w| json!({ "word": w.word.trim(), "start": w.start, "end": w.end }))
                    .collect();
            }
            axum::Json(body).into_response()
        }
    }
}

fn segment_json(segment: &Segment) -> Value {
    json!({
        "id": segment.id,
        "seek": segment.seek,
        "start": round3(segment.start),
        "end": round3(segment.end),
        "text": segment.text,
        "tokens": segment.tokens,
        "temperature": segment.temperature,
        "avg_logprob": segment.avg_logprob,
        "compression_ratio": segment.compression_ratio,
        "no_speech_prob": segment.no_speech_prob,
    })
}

fn round3(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

/// `HH:MM:SS{sep}mmm`.
fn timestamp(secs: f64, separator: char) -> String {
    let millis = (secs.max(0.0) * 1000.0).round() as u64;
    let (h, m, s, ms) = (millis / 3_600_000, millis / 60_000 % 60, millis / 1000 % 60, millis % 1000);
    format!("{h:02}:{m:02}:{s:02}{separator}{ms:03}")
}

fn srt(segments: &[Segment]) -> String {
    let mut out = String::new();
    for (i, s) in segments.iter().enumerate() {
        let _ = write!(
            out,
            "{}\n{} --> {}\n{}\n\n",
            i + 1,
            timestamp(s.start, ','),
            timestamp(s.end, ','),
            s.text.trim()
        );
    }
    out
}

fn vtt(segments: &[Segment]) -> String {
    let mut out = String::from("WEBVTT\n\n");
    for s in segments {
        let _ =
            write!(out, "{} --> {}\n{}\n\n", timestamp(s.start, '.'), timestamp(s.end, '.'), s.text.trim());
    }
    out
}

/// Server-sent events: a `transcript.text.delta` per decoded segment as the owner thread finishes
/// it, then `transcript.text.done` with the whole text and the usage. A failure is sent as an
/// OpenAI error event. Dropping the response (the client left) drops the transcription, which the
/// owner thread notices between windows.
fn stream_response(
    served: std::sync::Arc<Served>,
    request: TranscribeRequest,
    receiver: mpsc::UnboundedReceiver<Segment>,
    caller: Caller,
) -> Response {
    type Work = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Transcript, EngineError>> + Send>>;
    let work: Work = Box::pin(async move {
        let Served::Stt(transcriber) = &*served else {
            return Err(EngineError::Internal { message: "registry kind mismatch".into() });
        };
        transcriber.transcribe(request).await
    });
    struct State {
        receiver: mpsc::UnboundedReceiver<Segment>,
        work: Option<Work>,
        result: Option<Result<Transcript, EngineError>>,
        sent_text: bool,
        caller: Caller,
    }
    let state = State { receiver, work: Some(work), result: None, sent_text: false, caller };
    let events = stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        loop {
            if let Some(work) = state.work.as_mut() {
                let next = tokio::select! {
                    biased;
                    segment = state.receiver.recv() => Err(segment),
                    result = &mut *work => Ok(result),
                };
                match next {
                    Err(Some(segment)) => {
                        return Some((delta(&mut state.sent_text, &state.caller, &segment), Some(state)))
                    }
                    // The owner thread let go of the job: its answer is on the way.
                    Err(None) => state.result = Some(work.await),
                    Ok(result) => state.result = Some(result),
                }
                state.work = None;
                continue;
            }
            // Segments sent before the answer may still be queued.
            if let Ok(segment) = state.receiver.try_recv() {
                return Some((delta(&mut state.sent_text, &state.caller, &segment), Some(state)));
            }
            let event = match state.result.take() {
                Some(Ok(transcript)) => json!({
                    "type": "transcript.text.done",
                    "text": transcript.text(),
                    "usage": usage(&transcript),
                }),
                Some(Err(error)) => ApiError::from(error).stream_body(),
                None => return None,
            };
            return Some((event, None));
        }
    })
    .map(|event| Ok::<_, Infallible>(SseEvent::default().data(event.to_string())));
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// One segment's `transcript.text.delta` event (the first without its leading space, so the
/// deltas add up to the `done` event's text), charged to the caller's tokens.
fn delta(sent_text: &mut bool, caller: &Caller, segment: &Segment) -> Value {
    caller.charge(segment.tokens.len());
    let text = if *sent_text { segment.text.as_str() } else { segment.text.trim_start() };
    *sent_text = true;
    json!({ "type": "transcript.text.delta", "delta": text })
}
