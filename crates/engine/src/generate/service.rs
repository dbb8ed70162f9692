//! The [`Generate`] capability: what the chat and completions endpoints (and later RAG and voice)
//! call. A [`Generator`] renders a chat template or takes text or token ids, tokenizes on the
//! preprocessing pool, checks the context, and starts generations on the model's scheduler. A
//! [`GenerationStream`] holds the request's admission permit for as long as it streams; dropping it
//! cancels the generation within one decode step.

use std::sync::Arc;

use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use super::sampler::{LogitsProcessor, SamplingParams};
use super::scheduler::{Event, GenerationRequest, SchedulerHandle};
use super::template::{ChatMessage, ChatTemplate, TemplateError};
use crate::admission::{Admission, Permit};
use crate::error::{EngineError, Subject};
use crate::pool::BlockingPool;
use crate::queue::Priority;

/// What to generate from.
pub enum Prompt {
    /// Messages, rendered with the model's chat template (with the assistant's turn opened).
    Chat(Vec<ChatMessage>),
    /// Raw text, tokenized as it is (special tokens in it are recognised).
    Text(String),
    /// Token ids of the model's vocabulary, used as given.
    Tokens(Vec<u32>),
}

/// A prompt ready to run: its tokens (BOS included where the model wants it).
#[derive(Clone, Debug)]
pub struct PreparedPrompt {
    pub tokens: Vec<u32>,
}

/// Options of one generation.
pub struct GenerateOptions {
    /// At most this many new tokens; `None`: until the context is full. Clamped to the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub processors: Vec<Box<dyn LogitsProcessor>>,
    pub priority: Priority,
}

/// Events of one generation; dropping it cancels the generation.
pub struct GenerationStream {
    _span: tracing::Span,
    events: mpsc::UnboundedReceiver<Event>,
    _permit: Arc<Permit>,
    failed: EngineError,
    done: bool,
}

impl GenerationStream {
    /// The next event; `None` after `Finished` or `Failed`.
    pub async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let event = match self.events.recv().await {
            Some(event) => event,
            // The scheduler dropped the sequence without a last word: its owner thread died.
            None => Event::Failed(std::mem::replace(
                &mut self.failed,
                EngineError::Internal { message: String::new() },
            )),
        };
        self.done = matches!(event, Event::Finished { .. } | Event::Failed(_));
        Some(event)
    }
}

/// The generation capability.
pub trait Generate: Send + Sync {
    /// The model's context length (prompt and output).
    fn context_length(&self) -> usize;

    /// Whether `Prompt::Chat` works (the model has a chat template).
    fn has_chat_template(&self) -> bool;

    /// Renders and tokenizes `prompt`, refusing one that leaves no room in the context.
    fn prepare(
        &self,
        prompt: Prompt,
        priority: Priority,
    ) -> crate::BoxFuture<'_, Result<PreparedPrompt, EngineError>>;

    /// Starts `n` generations of the same prompt (seeds `seed`, `seed + 1`, … when one is given),
    /// under one admission permit.
    fn start(
        &self,
        prompt: &PreparedPrompt,
        options: Vec<GenerateOptions>,
    ) -> Result<Vec<GenerationStream>, EngineError>;

    /// Text of token ids (for echoing a prompt).
    fn decode(&self, tokens: &[u32]) -> String;
}

/// A loaded chat/completions model.
pub struct Generator {
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    /// Prepended to prompts whose text does not start with it.
    bos: Option<u32>,
    /// New tokens when a request sets no limit; `None`: until the context is full.
    default_max_tokens: Option<usize>,
    /// The most new tokens a request may ask for; `None`: the context is the limit.
    max_output_tokens: Option<usize>,
    vocab_size: usize,
    scheduler: SchedulerHandle,
    admission: Admission,
    pool: Arc<BlockingPool>,
}

/// How to build a [`Generator`] around a started scheduler.
pub struct GeneratorParts {
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub bos: Option<u32>,
    pub default_max_tokens: Option<usize>,
    pub max_output_tokens: Option<usize>,
    pub scheduler: SchedulerHandle,
    pub admission: Admission,
    pub pool: Arc<BlockingPool>,
}

impl Generator {
    pub fn new(parts: GeneratorParts) -> Self {
        let vocab_size = parts.scheduler.info().vocab_size;
        Self {
            tokenizer: parts.tokenizer,
            template: parts.template,
            bos: parts.bos,
            default_max_tokens: parts.default_max_tokens,
            max_output_tokens: parts.max_output_tokens,
            vocab_size,
            scheduler: parts.scheduler,
            admission: parts.admission,
            pool: parts.pool,
        }
    }

    pub fn scheduler(&self) -> &SchedulerHandle {
        &self.scheduler
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.admission.in_flight()
    }

    fn render(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| EngineError::NoChatTemplate { model: Arc::clone(self.scheduler.model()) })?;
        template.render(messages, true).map_err(|e| match e {
            TemplateError::Refused(message) => EngineError::TemplateRefused { message },
            TemplateError::Broken(message) => EngineError::Backend {
                model: Arc::clone(self.scheduler.model()),
                message: format!("the chat template failed: {message}"),
            },
        })
    }
}

impl Generate for Generator {
    fn context_length(&self) -> usize {
        self.scheduler.max_sequence_tokens()
    }

    fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    fn prepare(
        &self,
        prompt: Prompt,
        priority: Priority,
    ) -> crate::BoxFuture<'_, Result<PreparedPrompt, EngineError>> {
        let span = tracing::info_span!("prepare", model = %self.scheduler.model());
        Box::pin(tracing::Instrument::instrument(
            async move {
                let tokens = match prompt {
                    Prompt::Tokens(tokens) => {
                        if tokens.is_empty() {
                            return Err(EngineError::EmptyInput { subject: Subject::Input(0) });
                        }
                        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
                            return Err(EngineError::TokenOutOfRange {
                                subject: Subject::Input(0),
                                token_id: bad.into(),
                                vocab_size: self.vocab_size,
                            });
                        }
                        tokens
                    }
                    Prompt::Text(text) => self.tokenize_on_pool(text, priority).await?,
                    Prompt::Chat(messages) => {
                        let text = self.render(&messages)?;
                        self.tokenize_on_pool(text, priority).await?
                    }
                };
                let context_length = self.context_length();
                if tokens.len() >= context_length {
                    return Err(EngineError::ContextLengthExceeded {
                        prompt_tokens: tokens.len(),
                        context_length,
                    });
                }
                Ok(PreparedPrompt { tokens })
            },
            span,
        ))
    }

    fn start(
        &self,
        prompt: &PreparedPrompt,
        options: Vec<GenerateOptions>,
    ) -> Result<Vec<GenerationStream>, EngineError> {
        if let (Some(max), Some(requested)) =
            (self.max_output_tokens, options.iter().filter_map(|o| o.max_tokens).max())
        {
            if requested > max {
                return Err(EngineError::TooManyOutputTokens { requested, max });
            }
        }
        let permit = Arc::new(self.admission.try_admit()?);
        // The context left after the prompt, within the model's output limit.
        let room =
            (self.context_length() - prompt.tokens.len()).min(self.max_output_tokens.unwrap_or(usize::MAX));
        options
            .into_iter()
            .map(|option| {
                let request = GenerationRequest {
                    prompt: prompt.tokens.clone(),
                    max_new_tokens: option.max_tokens.or(self.default_max_tokens).unwrap_or(room).min(room),
                    sampling: option.sampling,
                    stop: option.stop,
                    processors: option.processors,
                };
                let events = self.scheduler.submit(request, option.priority)?;
                Ok(GenerationStream {
                    // Lives as long as the stream: a trace shows how long each choice generated.
                    _span: tracing::info_span!("generate", model = %self.scheduler.model()),
                    events,
                    _permit: Arc::clone(&permit),
                    failed: self.scheduler.failed_error(),
                    done: false,
                })
            })
            .collect()
    }

    fn decode(&self, tokens: &[u32]) -> String {
        self.tokenizer.decode(tokens, false).unwrap_or_default()
    }
}

impl Generator {
    async fn tokenize_on_pool(&self, text: String, priority: Priority) -> Result<Vec<u32>, EngineError> {
        // `self` is not 'static; the pool gets what it needs.
        let tokenizer = Arc::clone(&self.tokenizer);
        let bos = self.bos;
        self.pool
            .run(priority, move |_| {
                let this = Tokenize { tokenizer, bos };
                this.run(text)
            })
            .await?
    }
}

/// What tokenizing a prompt needs, movable to the pool.
struct Tokenize {
    tokenizer: Arc<Tokenizer>,
    bos: Option<u32>,
}

impl Tokenize {
    fn run(self, text: String) -> Result<Vec<u32>, EngineError> {
        let subject = Subject::Input(0);
        if text.is_empty() {
            return Err(EngineError::EmptyInput { subject });
        }
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| EngineError::Tokenize { subject, message: e.to_string() })?;
        let mut tokens = encoding.get_ids().to_vec();
        if let Some(bos) = self.bos {
            if tokens.first() != Some(&bos) {
                tokens.insert(0, bos);
            }
        }
        Ok(tokens)
    }
}
