//! What `/v1/chat/completions` and `/v1/completions` share: the sampling fields and their checks,
//! unknown-field refusal, running `n` choices, and the response in one piece or as OpenAI's
//! server-sent events (`data: {...}` chunks, then `data: [DONE]`).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use hearth_engine::generate::sampler::{LogitBias, LogitsProcessor, SamplingParams};
use hearth_engine::generate::scheduler::{Event, FinishReason, Usage};
use hearth_engine::generate::service::{GenerateOptions, GenerationStream};
use hearth_engine::Priority;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use crate::auth::Caller;

/// Most choices one request may ask for (`n`).
pub const MAX_CHOICES: u32 = 16;

/// `stop`: one string or up to four.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints take, besides their prompt. Fields OpenAI accepts that change nothing
/// here (`user`, `store`, `metadata`, `service_tier`) are read and ignored.
#[derive(Default, Deserialize)]
pub struct GenerationFields {
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub user: Option<IgnoredAny>,
    pub store: Option<IgnoredAny>,
    pub metadata: Option<IgnoredAny>,
    pub service_tier: Option<IgnoredAny>,
}

/// Refuses request fields nobody read: OpenAI's wording, naming the field.
pub fn refuse_unknown(unknown: &BTreeMap<String, IgnoredAny>) -> Result<(), ApiError> {
    match unknown.keys().next() {
        Some(name) => Err(ApiError::Unsupported {
            message: format!("Unrecognized request argument supplied: {name}"),
            param: name.clone(),
        }),
        None => Ok(()),
    }
}

/// A field Hearth understands but does not support yet.
pub fn unsupported(param: &str, what: &str) -> ApiError {
    ApiError::Unsupported {
        message: format!("`{param}` is not supported by this server yet: {what}"),
        param: param.into(),
    }
}

fn check_range(param: &str, value: Option<f32>, low: f32, high: f32) -> Result<(), ApiError> {
    match value {
        Some(v) if !(low..=high).contains(&v) || v.is_nan() => {
            Err(ApiError::invalid(format!("`{param}` must be between {low} and {high}, got {v}"), param))
        }
        _ => Ok(()),
    }
}

impl GenerationFields {
    pub fn choices(&self) -> Result<u32, ApiError> {
        match self.n {
            Some(0) => Err(ApiError::invalid("`n` must be at least 1", "n")),
            Some(n) if n > MAX_CHOICES => {
                Err(ApiError::invalid(format!("`n` must be at most {MAX_CHOICES}, got {n}"), "n"))
            }
            Some(n) => Ok(n),
            None => Ok(1),
        }
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }

    /// The options of each of `n` choices: seeds `seed`, `seed + 1`, … so choices differ but a
    /// request with a seed repeats itself.
    pub fn options(
        &self,
        n: u32,
        vocab_size: usize,
        priority: Priority,
    ) -> Result<Vec<GenerateOptions>, ApiError> {
        check_range("temperature", self.temperature, 0.0, 2.0)?;
        check_range("top_p", self.top_p, 0.0, 1.0)?;
        check_range("min_p", self.min_p, 0.0, 1.0)?;
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        check_range("repetition_penalty", self.repetition_penalty, 0.01, 10.0)?;
        if self.top_p == Some(0.0) {
            return Err(ApiError::invalid("`top_p` must be greater than 0", "top_p"));
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(0), _) => {
                return Err(ApiError::invalid(
                    "`max_completion_tokens` must be at least 1",
                    "max_completion_tokens",
                ))
            }
            (None, Some(0)) => {
                return Err(ApiError::invalid("`max_tokens` must be at least 1", "max_tokens"))
            }
            (Some(n), _) | (None, Some(n)) => Some(n as usize),
            (None, None) => None,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) if list.len() > 4 => {
                return Err(ApiError::invalid(
                    format!("`stop` has {} sequences; at most 4 are allowed", list.len()),
                    "stop",
                ))
            }
            Some(Stop::Many(list)) => list.clone(),
        };
        let bias = match &self.logit_bias {
            None => Vec::new(),
            Some(map) => map
                .iter()
                .map(|(token, &bias)| {
                    let id = token.parse::<u32>().ok().filter(|&id| (id as usize) < vocab_size).ok_or_else(
                        || {
                            ApiError::invalid(
                                format!("`logit_bias` key `{token}` is not a token id of this model"),
                                "logit_bias",
                            )
                        },
                    )?;
                    if !(-100.0..=100.0).contains(&bias) {
                        return Err(ApiError::invalid(
                            format!("`logit_bias` values must be between -100 and 100, got {bias}"),
                            "logit_bias",
                        ));
                    }
                    Ok((id, bias))
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let defaults = SamplingParams::default();
        Ok((0..n)
            .map(|i| {
                let mut processors: Vec<Box<dyn LogitsProcessor>> = Vec::new();
                if !bias.is_empty() {
                    processors.push(Box::new(LogitBias(bias.clone())));
                }
                GenerateOptions {
                    max_tokens,
                    sampling: SamplingParams {
                        temperature: self.temperature.unwrap_or(defaults.temperature),
                        top_p: self.top_p.unwrap_or(defaults.top_p),
                        top_k: self.top_k.map_or(defaults.top_k, |k| k as usize),
                        min_p: self.min_p.unwrap_or(defaults.min_p),
                        presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
                        frequency_penalty: self.frequency_penalty.unwrap_or(defaults.frequency_penalty),
                        repetition_penalty: self.repetition_penalty.unwrap_or(defaults.repetition_penalty),
                        seed: self.seed.map(|s| (s as u64).wrapping_add(u64::from(i))),
                    },
                    stop: stop.clone(),
                    processors,
                    priority,
                }
            })
            .collect())
    }
}

/// `fp_hearth_<version>`: which build answered (OpenAI's `system_fingerprint`).
pub fn system_fingerprint() -> String {
    format!("fp_hearth_{}", env!("CARGO_PKG_VERSION").replace('.', "_"))
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// OpenAI's `usage`, summed over choices (the prompt counted once).
pub fn usage_json(prompt_tokens: usize, usages: &[Usage]) -> Value {
    let completion: usize = usages.iter().map(|u| u.completion_tokens).sum();
    let cached = usages.iter().map(|u| u.cached_tokens).max().unwrap_or(0);
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// One finished choice.
pub struct Completed {
    pub text: String,
    pub reason: FinishReason,
    pub usage: Usage,
}

/// Runs a choice to its end.
pub async fn complete(mut stream: GenerationStream) -> Result<Completed, ApiError> {
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        match event {
            Event::Token { text: piece, .. } => text.push_str(&piece),
            Event::Finished { reason, text: piece, usage } => {
                text.push_str(&piece);
                return Ok(Completed { text, reason, usage });
            }
            Event::Failed(error) => return Err(error.into()),
        }
    }
    Err(ApiError::Internal { cause: "a generation ended without an outcome".into() })
}

/// What every streamed chunk of one response repeats: OpenAI's envelope around `choices`.
pub struct ChunkHeader {
    pub id: String,
    /// `chat.completion.chunk` or `text_completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub fingerprint: String,
    /// With `stream_options.include_usage`, every chunk carries `"usage": null` but the last.
    pub include_usage: bool,
}

impl ChunkHeader {
    pub fn chunk(&self, choices: Value) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }
}

/// How an endpoint shapes its streamed chunks.
pub trait ChunkFormat: Send + Sync + 'static {
    /// The first chunk of a choice (chat announces the role), if any.
    fn opening(&self, index: usize) -> Option<Value>;
    /// A chunk carrying `text`.
    fn text(&self, index: usize, text: &str) -> Value;
    /// The last chunk of a choice.
    fn finish(&self, index: usize, reason: FinishReason) -> Value;
    /// The chunk with usage and no choices (when `stream_options.include_usage`).
    fn usage(&self, usage: Value) -> Value;
}

/// Server-sent events for `streams` (one per choice, indexed in order): each choice's chunks as they
/// come, interleaved, then the usage chunk if asked for, then `data: [DONE]`. A failure mid-stream
/// is sent as an OpenAI error object before `[DONE]`. Dropping the response (the client left)
/// drops the streams, which cancels their generations. Each generated token is charged to
/// `caller` as it arrives, so a client that leaves early pays for what it was sent.
pub fn sse<F: ChunkFormat>(
    streams: Vec<GenerationStream>,
    format: F,
    prompt_tokens: usize,
    include_usage: bool,
    caller: Caller,
) -> Response {
    let format = Arc::new(format);
    let usages = Arc::new(std::sync::Mutex::new(Vec::new()));
    let choices = streams.into_iter().enumerate().map(|(index, stream)| {
        let (format, usages) = (Arc::clone(&format), Arc::clone(&usages));
        let opening = format.opening(index).into_iter().map(Ok);
        let caller = caller.clone();
        let events = stream::unfold(Some((stream, 0)), move |state| {
            let (format, usages, caller) = (Arc::clone(&format), Arc::clone(&usages), caller.clone());
            async move {
                let (mut stream, mut charged) = state?;
                loop {
                    match stream.next().await? {
                        Event::Token { text, .. } => {
                            caller.charge(1);
                            charged += 1;
                            if !text.is_empty() {
                                return Some((vec![Ok(format.text(index, &text))], Some((stream, charged))));
                            }
                        }
                        Event::Finished { reason, text, usage } => {
                            caller.charge(usage.completion_tokens.saturating_sub(charged));
                            usages.lock().unwrap_or_else(|p| p.into_inner()).push(usage);
                            let mut chunks = Vec::new();
                            if !text.is_empty() {
                                chunks.push(Ok(format.text(index, &text)));
                            }
                            chunks.push(Ok(format.finish(index, reason)));
                            return Some((chunks, None));
                        }
                        Event::Failed(error) => return Some((vec![Err(ApiError::from(error))], None)),
                    }
                }
            }
        })
        .flat_map(stream::iter);
        stream::iter(opening).chain(events).boxed()
    });
    let body = stream::select_all(choices);
    let tail_format = Arc::clone(&format);
    let tail = stream::once(async move {
        let usage = usages.lock().unwrap_or_else(|p| p.into_inner()).clone();
        include_usage.then(|| tail_format.usage(usage_json(prompt_tokens, &usage)))
    })
    .filter_map(|chunk| async move { chunk.map(Ok) });
    let events = body.chain(tail).map(|chunk: Result<Value, ApiError>| {
        let data = match chunk {
            Ok(value) => value.to_string(),
            Err(error) => error.stream_body().to_string(),
        };
        Ok::<_, Infallible>(SseEvent::default().data(data))
    });
    let done = stream::once(async { Ok::<_, Infallible>(SseEvent::default().data("[DONE]")) });
    sse_response(events.chain(done))
}

fn sse_response(events: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static) -> Response {
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
