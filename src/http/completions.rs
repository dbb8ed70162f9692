//! `POST /v1/completions`, OpenAI's shape: `prompt` as a string, strings, token ids or token-id
//! arrays, continued as it is (no chat template); `echo` repeats the prompt in the answer; `n`
//! choices per prompt; the answer in one piece or streamed as `text_completion` events.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use hearth_engine::generate::scheduler::FinishReason;
use hearth_engine::generate::service::{Generate, GenerationStream, PreparedPrompt, Prompt};
use hearth_engine::registry::Served;
use hearth_engine::ModelKind;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::generation::{
    self, complete, finish_reason, refuse_unknown, unsupported, ChunkFormat, ChunkHeader, GenerationFields,
};
use super::json::Json;
use super::{labelled, ready_model};
use crate::auth::Caller;
use crate::state::AppState;

/// Most prompts one request may carry.
const MAX_PROMPTS: usize = 16;

#[derive(Deserialize)]
pub struct CompletionRequest {
    model: String,
    prompt: PromptInput,
    #[serde(default)]
    echo: bool,
    suffix: Option<IgnoredAny>,
    best_of: Option<u32>,
    logprobs: Option<u32>,
    #[serde(flatten)]
    fields: GenerationFields,
    /// Whatever no field above took: refused with 400.
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenArrays(Vec<Vec<u32>>),
}

impl PromptInput {
    fn prompts(self) -> Vec<Prompt> {
        match self {
            Self::Text(text) => vec![Prompt::Text(text)],
            Self::Texts(texts) => texts.into_iter().map(Prompt::Text).collect(),
            Self::Tokens(tokens) => vec![Prompt::Tokens(tokens)],
            Self::TokenArrays(arrays) => arrays.into_iter().map(Prompt::Tokens).collect(),
        }
    }
}

struct CompletionChunks(ChunkHeader);

impl ChunkFormat for CompletionChunks {
    fn opening(&self, _index: usize) -> Option<Value> {
        None
    }

    fn text(&self, index: usize, text: &str) -> Value {
        self.0.chunk(json!([{"index": index, "text": text, "logprobs": null, "finish_reason": null}]))
    }

    fn finish(&self, index: usize, reason: FinishReason) -> Value {
        self.0.chunk(
            json!([{"index": index, "text": "", "logprobs": null, "finish_reason": finish_reason(reason)}]),
        )
    }

    fn usage(&self, usage: Value) -> Value {
        let mut chunk = self.0.chunk(json!([]));
        chunk["usage"] = usage;
        chunk
    }
}

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(request): Json<CompletionRequest>,
) -> Response {
    let model_name = request.model.clone();
    let result = respond(&state, request, caller).await;
    labelled(&state, &model_name, result)
}

async fn respond(state: &AppState, request: CompletionRequest, caller: Caller) -> Result<Response, ApiError> {
    let (entry, served) = ready_model(state, &request.model, ModelKind::Llm).await?;
    let Served::Llm(generator) = &*served else {
        return Err(ApiError::Internal { cause: "registry kind mismatch".into() });
    };
    refuse_unknown(&request.unknown)?;
    if request.suffix.is_some() {
        return Err(unsupported("suffix", "fill-in-the-middle"));
    }
    if request.logprobs.is_some() {
        return Err(unsupported("logprobs", "log probabilities"));
    }
    let fields = request.fields;
    let n = fields.choices()?;
    if request.best_of.is_some_and(|b| b != n) {
        return Err(unsupported("best_of", "choosing the best of several choices (only `best_of` = `n`)"));
    }
    let prompts = request.prompt.prompts();
    if prompts.is_empty() {
        return Err(ApiError::invalid("`prompt` must not be empty", "prompt"));
    }
    if prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(
            format!("`prompt` has {} prompts; at most {MAX_PROMPTS} are allowed", prompts.len()),
            "prompt",
        ));
    }
    let vocab_size = generator.scheduler().info().vocab_size;
    // `echo` repeats a text prompt as it was sent; token prompts are decoded.
    let sent: Vec<Option<String>> =
        prompts.iter().map(|p| if let Prompt::Text(text) = p { Some(text.clone()) } else { None }).collect();
    let mut prepared: Vec<PreparedPrompt> = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let ready = generator
            .prepare(prompt, caller.priority())
            .await
            .map_err(|e| ApiError::from(e).for_prompt("prompt"))?;
        prepared.push(ready);
    }
    // Choice `i * n + j` is the `j`th choice of prompt `i`, as OpenAI numbers them.
    let mut streams: Vec<GenerationStream> = Vec::with_capacity(prepared.len() * n as usize);
    for prompt in &prepared {
        streams.extend(generator.start(prompt, fields.options(n, vocab_size, caller.priority())?)?);
    }
    let prompt_tokens: usize = prepared.iter().map(|p| p.tokens.len()).sum();
    caller.charge(prompt_tokens);
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let (created, fingerprint) = (generation::unix_now(), generation::system_fingerprint());
    if fields.stream {
        if request.echo {
            return Err(unsupported("echo", "echo with `stream: true`"));
        }
        let format = CompletionChunks(ChunkHeader {
            id,
            object: "text_completion",
            created,
            model: entry.id.to_string(),
            fingerprint,
            include_usage: fields.include_usage(),
        });
        return Ok(generation::sse(streams, format, prompt_tokens, fields.include_usage(), caller));
    }
    let mut choices = Vec::with_capacity(streams.len());
    let mut usages = Vec::with_capacity(streams.len());
    for (index, stream) in streams.into_iter().enumerate() {
        let done = complete(stream).await?;
        caller.charge(done.usage.completion_tokens);
        let text = if request.echo {
            let i = index / n as usize;
            let prompt = sent[i].clone().unwrap_or_else(|| generator.decode(&prepared[i].tokens));
            prompt + &done.text
        } else {
            done.text
        };
        choices.push(json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish_reason(done.reason)}));
        usages.push(done.usage);
    }
    Ok(axum::Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": &*entry.id,
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": generation::usage_json(prompt_tokens, &usages),
    }))
    .into_response())
}
