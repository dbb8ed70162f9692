//! An LLM's vocabulary as Hearth uses it: the tokenizer, which ids begin and end sequences, and the
//! chat template. From a GGUF's own metadata ([`crate::gguf_tokenizer`]) or from a Hugging Face
//! folder's `tokenizer.json`, `tokenizer_config.json`, `generation_config.json` and
//! `chat_template.jinja`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::BackendError;
use crate::model_dir::read_json;

/// Texts that end a turn in common chat formats; when the vocabulary has them as special tokens
/// they stop generation, as llama.cpp's end-of-generation set does.
pub(crate) const END_OF_TURN_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
    "<|eom_id|>",
];

pub struct LlmVocab {
    pub tokenizer: Tokenizer,
    pub bos: Option<u32>,
    /// Every id that ends generation.
    pub eos_ids: Vec<u32>,
    /// Prepend BOS to prompts.
    pub add_bos: bool,
    pub bos_text: String,
    pub eos_text: String,
    /// The model's own chat template, if it has one.
    pub chat_template: Option<String>,
}

/// The parts of `tokenizer_config.json` used here.
#[derive(Deserialize, Default)]
struct TokenizerConfig {
    bos_token: Option<Value>,
    eos_token: Option<Value>,
    add_bos_token: Option<bool>,
    chat_template: Option<Value>,
}

#[derive(Deserialize, Default)]
struct GenerationConfig {
    eos_token_id: Option<Value>,
}

/// A token given as `"<s>"` or `{"content": "<s>", ...}`.
fn token_text(value: &Option<Value>) -> Option<String> {
    match value.as_ref()? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` as a string, or the `default` entry of a list of named templates.
fn template_text(value: &Option<Value>) -> Option<String> {
    match value.as_ref()? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// From a Hugging Face folder. `tokenizer.json` is required; the others are read when present.
pub fn from_hf_files(
    tokenizer_json: &Path,
    tokenizer_config: Option<&Path>,
    generation_config: Option<&Path>,
    chat_template_jinja: Option<&Path>,
) -> Result<LlmVocab, BackendError> {
    let tokenizer = Tokenizer::from_file(tokenizer_json)
        .map_err(|e| BackendError::Unsupported(format!("cannot read {}: {e}", tokenizer_json.display())))?;
    let config: TokenizerConfig = tokenizer_config.map(read_json).transpose()?.unwrap_or_default();
    let generation: GenerationConfig = generation_config.map(read_json).transpose()?.unwrap_or_default();
    let bos_text = token_text(&config.bos_token);
    let eos_text = token_text(&config.eos_token);
    let bos = bos_text.as_deref().and_then(|t| tokenizer.token_to_id(t));
    // Whether prompts begin with BOS: the config says so, else the tokenizer's post-processor
    // does (Llama 3's `tokenizer.json` adds `<|begin_of_text|>`; Qwen's adds nothing).
    let add_bos = match (config.add_bos_token, bos) {
        (Some(add), _) => add,
        (None, Some(bos)) => {
            tokenizer.encode("a", true).map(|e| e.get_ids().first() == Some(&bos)).unwrap_or(false)
        }
        (None, None) => false,
    };
    let mut eos_ids: Vec<u32> =
        eos_text.as_deref().and_then(|t| tokenizer.token_to_id(t)).into_iter().collect();
    let listed = match generation.eos_token_id {
        Some(Value::Number(n)) => n.as_u64().into_iter().collect(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_u64).collect(),
        _ => Vec::new(),
    };
    for id in listed.into_iter().filter_map(|id| u32::try_from(id).ok()) {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    for (id, token) in tokenizer.get_added_tokens_decoder() {
        if token.special && END_OF_TURN_TEXTS.contains(&token.content.as_str()) && !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    eos_ids.sort_unstable();
    if eos_ids.is_empty() {
        return Err(BackendError::Unsupported(format!(
            "{}: no end-of-sequence token (no `eos_token` in tokenizer_config.json, no `eos_token_id` in \
             generation_config.json)",
            tokenizer_json.parent().unwrap_or(tokenizer_json).display()
        )));
    }
    let chat_template = match chat_template_jinja {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|source| BackendError::Io { path: path.to_owned(), source })?,
        ),
        None => template_text(&config.chat_template),
    };
    Ok(LlmVocab {
        tokenizer,
        bos,
        eos_ids,
        add_bos: add_bos && bos.is_some(),
        bos_text: bos_text.unwrap_or_default(),
        eos_text: eos_text.unwrap_or_default(),
        chat_template,
    })
}
