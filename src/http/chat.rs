//! `POST /v1/chat/completions`, OpenAI's shape: `messages` (roles system, developer, user and
//! assistant; content as a string or an array of text parts) rendered with the model's chat
//! template; the sampling options of [`GenerationFields`]; `n` choices; the answer in one piece or
//! streamed as `chat.completion.chunk` events.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use hearth_engine::generate::scheduler::FinishReason;
use hearth_engine::generate::service::{Generate, Prompt};
use hearth_engine::generate::template::ChatMessage;
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

#[derive(Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    logprobs: Option<bool>,
    top_logprobs: Option<IgnoredAny>,
    response_format: Option<ResponseFormat>,
    tools: Option<IgnoredAny>,
    tool_choice: Option<IgnoredAny>,
    parallel_tool_calls: Option<IgnoredAny>,
    /// Hearth's grounded-chat extension (see [`RagOptions`]).
    rag: Option<RagOptions>,
    #[serde(flatten)]
    fields: GenerationFields,
    /// Whatever no field above took: refused with 400.
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

/// `"rag": {"vector_store_ids": [...], "top_k": 5, "rerank_top_k": 3}`: retrieve `top_k`
/// chunks from the stores for the last user message (or `query`), rerank them, and put the best
/// `rerank_top_k` into the prompt as numbered sources; the response's `rag.sources` lists them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RagOptions {
    vector_store_ids: Vec<String>,
    top_k: Option<usize>,
    rerank_top_k: Option<usize>,
    #[serde(default = "yes")]
    rerank: bool,
    filters: Option<Value>,
    query: Option<String>,
}

fn yes() -> bool {
    true
}

/// Most chunks retrieved for one chat request.
const MAX_RAG_TOP_K: usize = 50;

/// The instruction that precedes the sources in the system message.
const GROUNDING: &str = "Answer using the numbered sources below and cite them by number, like [1]. If the \
sources do not contain the answer, say that you do not know.";

/// Retrieves the sources for a chat request and writes them into its system message. Returns
/// the sources as the response shows them.
async fn ground(
    state: &AppState,
    options: RagOptions,
    messages: &mut Vec<ChatMessage>,
) -> Result<Value, ApiError> {
    let rag = super::files::rag(state)?;
    if options.vector_store_ids.is_empty() {
        return Err(ApiError::invalid(
            "`rag.vector_store_ids` must name at least one vector store",
            "rag.vector_store_ids",
        ));
    }
    let top_k = options.top_k.unwrap_or(5);
    if !(1..=MAX_RAG_TOP_K).contains(&top_k) {
        return Err(ApiError::invalid(
            format!("`rag.top_k` must be between 1 and {MAX_RAG_TOP_K}"),
            "rag.top_k",
        ));
    }
    let keep = options.rerank_top_k.unwrap_or(3.min(top_k));
    if keep == 0 || keep > top_k {
        return Err(ApiError::invalid(
            "`rag.rerank_top_k` must be between 1 and `rag.top_k`",
            "rag.rerank_top_k",
        ));
    }
    let query =
        match options.query {
            Some(query) => query,
            None => messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone()).ok_or_else(
                || ApiError::invalid("grounded chat needs a user message (or `rag.query`)", "rag.query"),
            )?,
        };
    if query.trim().is_empty() {
        return Err(ApiError::invalid("the query for `rag` is empty", "rag.query"));
    }
    let filter = options.filters.as_ref().map(hearth_rag::filter::Filter::parse).transpose()?;
    let stores = options.vector_store_ids.clone();
    rag.run(move |library| stores.iter().try_for_each(|s| library.store(s).map(drop))).await?;
    let mut hits = rag
        .search(state, options.vector_store_ids, query.clone(), top_k, filter, false, f64::NEG_INFINITY)
        .await?;
    if options.rerank {
        hits = rag.rerank(state, query, hits).await?;
    }
    hits.truncate(keep);
    let mut context = String::from(GROUNDING);
    for (i, hit) in hits.iter().enumerate() {
        context.push_str(&format!("\n\n[{}] {}\n{}", i + 1, hit.filename, hit.text.trim()));
    }
    if hits.is_empty() {
        context.push_str("\n\n(No sources matched.)");
    }
    match messages.first_mut() {
        Some(first) if first.role == "system" => first.content = format!("{}\n\n{context}", first.content),
        _ => messages.insert(0, ChatMessage { role: "system".into(), content: context }),
    }
    let sources: Vec<Value> = hits
        .iter()
        .enumerate()
        .map(|(i, hit)| {
            json!({
                "marker": i + 1,
                "vector_store_id": hit.store_id,
                "file_id": hit.file_id,
                "filename": hit.filename,
                "chunk": hit.position,
                "score": hit.score,
                "text": hit.text,
            })
        })
        .collect();
    Ok(json!({ "sources": sources }))
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: Role,
    #[serde(default)]
    content: Option<Content>,
    /// Accepted (OpenAI's participant name); templates do not use it.
    #[allow(dead_code)]
    name: Option<String>,
    tool_calls: Option<IgnoredAny>,
    tool_call_id: Option<IgnoredAny>,
    /// Accepted on assistant messages.
    #[allow(dead_code)]
    refusal: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part {
    Text { text: String },
    ImageUrl(IgnoredAny),
    InputAudio(IgnoredAny),
    File(IgnoredAny),
    Refusal { refusal: String },
}

#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(flatten)]
    _rest: BTreeMap<String, IgnoredAny>,
}

/// The messages as the chat template sees them; refuses what cannot be served yet.
fn messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("`messages` must not be empty", "messages"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let role = match message.role {
                Role::System => "system",
                // OpenAI's newer name for system instructions; chat templates know `system`.
                Role::Developer => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool | Role::Function => {
                    return Err(unsupported(&format!("messages[{i}].role"), "tool results need tool calling"))
                }
            };
            if message.tool_calls.is_some() || message.tool_call_id.is_some() {
                return Err(unsupported(&format!("messages[{i}].tool_calls"), "tool calling"));
            }
            let content = match message.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.into_iter().enumerate() {
                        match part {
                            Part::Text { text: piece } | Part::Refusal { refusal: piece } => {
                                text.push_str(&piece)
                            }
                            Part::ImageUrl(_) | Part::InputAudio(_) | Part::File(_) => {
                                return Err(unsupported(
                                    &format!("messages[{i}].content[{j}]"),
                                    "this model reads text only",
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage { role: role.into(), content })
        })
        .collect()
}

/// The chunks of a streamed chat; the first also carries the grounded sources, if any.
struct ChatChunks(ChunkHeader, Option<Value>);

impl ChunkFormat for ChatChunks {
    fn opening(&self, index: usize) -> Option<Value> {
        let delta = json!({"role": "assistant", "content": ""});
        let mut chunk =
            self.0.chunk(json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}]));
        if let (Some(sources), 0) = (&self.1, index) {
            chunk["rag"] = sources.clone();
        }
        Some(chunk)
    }

    fn text(&self, index: usize, text: &str) -> Value {
        self.0.chunk(
            json!([{"index": index, "delta": {"content": text}, "logprobs": null, "finish_reason": null}]),
        )
    }

    fn finish(&self, index: usize, reason: FinishReason) -> Value {
        self.0.chunk(
            json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": finish_reason(reason)}]),
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
    Json(request): Json<ChatRequest>,
) -> Response {
    let model_name = request.model.clone();
    let result = respond(&state, request, caller).await;
    labelled(&state, &model_name, result)
}

async fn respond(state: &AppState, request: ChatRequest, caller: Caller) -> Result<Response, ApiError> {
    let (entry, served) = ready_model(state, &request.model, ModelKind::Llm).await?;
    let Served::Llm(generator) = &*served else {
        return Err(ApiError::Internal { cause: "registry kind mismatch".into() });
    };
    refuse_unknown(&request.unknown)?;
    if request.logprobs == Some(true) || request.top_logprobs.is_some() {
        return Err(unsupported("logprobs", "log probabilities"));
    }
    if request.tools.is_some() || request.tool_choice.is_some() || request.parallel_tool_calls.is_some() {
        return Err(unsupported("tools", "tool calling"));
    }
    if let Some(format) = &request.response_format {
        if format.kind != "text" {
            return Err(unsupported("response_format", "structured output (only `text`)"));
        }
    }
    if !generator.has_chat_template() {
        return Err(
            hearth_engine::EngineError::NoChatTemplate { model: std::sync::Arc::clone(&entry.id) }.into()
        );
    }
    let fields = request.fields;
    let n = fields.choices()?;
    let options = fields.options(n, generator.scheduler().info().vocab_size, caller.priority())?;
    let mut messages = messages(request.messages)?;
    let sources = match request.rag {
        Some(options) => Some(ground(state, options, &mut messages).await?),
        None => None,
    };
    let prompt = generator
        .prepare(Prompt::Chat(messages), caller.priority())
        .await
        .map_err(|e| ApiError::from(e).for_prompt("messages"))?;
    let streams = generator.start(&prompt, options)?;
    caller.charge(prompt.tokens.len());
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let (created, fingerprint) = (generation::unix_now(), generation::system_fingerprint());
    if fields.stream {
        let format = ChatChunks(
            ChunkHeader {
                id,
                object: "chat.completion.chunk",
                created,
                model: entry.id.to_string(),
                fingerprint,
                include_usage: fields.include_usage(),
            },
            sources,
        );
        return Ok(generation::sse(streams, format, prompt.tokens.len(), fields.include_usage(), caller));
    }
    if fields.stream_options.is_some() {
        return Err(ApiError::invalid("`stream_options` applies only with `stream: true`", "stream_options"));
    }
    let mut choices = Vec::with_capacity(streams.len());
    let mut usages = Vec::with_capacity(streams.len());
    for (index, stream) in streams.into_iter().enumerate() {
        let done = complete(stream).await?;
        caller.charge(done.usage.completion_tokens);
        choices.push(json!({
            "index": index,
            "message": {"role": "assistant", "content": done.text, "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason(done.reason),
        }));
        usages.push(done.usage);
    }
    let mut body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": &*entry.id,
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": generation::usage_json(prompt.tokens.len(), &usages),
    });
    if let Some(sources) = sources {
        body["rag"] = sources;
    }
    Ok(axum::Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: Value) -> Result<Vec<ChatMessage>, String> {
        let request: ChatRequest = serde_json::from_value(json).map_err(|e| e.to_string())?;
        messages(request.messages).map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn message_shapes() {
        let messages = parse(json!({"model": "m", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null},
        ]}))
        .unwrap();
        let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
        assert_eq!(messages[1].content, "ab");
        assert!(parse(json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}))
            .unwrap_err()
            .contains("text only"));
        assert!(parse(json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}))
            .unwrap_err()
            .contains("tool"));
        assert!(parse(json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}))
            .unwrap_err()
            .contains("robot"));
        assert!(parse(json!({"model": "m", "messages": []})).unwrap_err().contains("must not be empty"));
    }
}
