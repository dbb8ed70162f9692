//! The engine's one error type. The HTTP layer maps each variant to a status and an OpenAI-shaped body.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Errors that model implementations return across the capability traits.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Which part of a request an input-level error is about; named in messages and mapped to `param`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    /// `input[i]` of an embeddings request.
    Input(usize),
    /// The query of a rerank request.
    Query,
    /// `documents[i]` of a rerank request.
    Document(usize),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Input(i) => write!(f, "input[{i}]"),
            Self::Query => f.write_str("query"),
            Self::Document(i) => write!(f, "documents[{i}]"),
        }
    }
}

/// Why a model refused new work at once instead of queueing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overload {
    /// Its queue holds `queue_depth` requests already.
    QueueFull { queue_depth: usize },
    /// It has `max_concurrent_requests` requests in flight already.
    TooManyConcurrent { max_concurrent_requests: usize },
    /// The work ahead would keep a new request waiting `expected`, longer than `max_queue_wait`.
    ExpectedWait { expected: Duration, max: Duration },
}

impl Overload {
    /// How long a refused client should wait before retrying.
    pub fn retry_after(&self) -> Duration {
        match self {
            Self::ExpectedWait { expected, max } => {
                crate::backlog::TooLong { expected: *expected, max: *max }.retry_after()
            }
            Self::QueueFull { .. } | Self::TooManyConcurrent { .. } => Duration::from_secs(1),
        }
    }
}

impl fmt::Display for Overload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::QueueFull { queue_depth } => {
                write!(f, "its queue is full ({queue_depth} requests waiting)")
            }
            Self::TooManyConcurrent { max_concurrent_requests } => {
                write!(f, "it is serving its limit of {max_concurrent_requests} concurrent requests")
            }
            Self::ExpectedWait { expected, max } => write!(
                f,
                "the work queued ahead would keep this request waiting about {:.1} s, more than its \
                 `max_queue_wait_ms` of {} ms",
                expected.as_secs_f64(),
                max.as_millis()
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model `{model}` is overloaded: {reason}; retry later")]
    Overloaded { model: Arc<str>, reason: Overload },

    #[error("{subject} is empty")]
    EmptyInput { subject: Subject },

    #[error(
        "{subject} has {}{n_tokens} tokens, more than the model's limit of {max_tokens}",
        if *at_least { "at least " } else { "" }
    )]
    InputTooLong {
        subject: Subject,
        n_tokens: usize,
        /// Only a prefix was tokenized (the text is far over the limit), so `n_tokens` is a floor.
        at_least: bool,
        max_tokens: usize,
    },

    #[error("the request's inputs have more than {max} tokens in all, this model's limit per request")]
    TooManyTokens { max: usize },

    /// `max_tokens` above the model's `max_output_tokens`.
    #[error("`max_tokens` is {requested}, more than this model's limit of {max} new tokens per request")]
    TooManyOutputTokens { requested: usize, max: usize },

    /// The prompt leaves no room to generate in the model's context.
    #[error(
        "this model's maximum context length is {context_length} tokens, but the prompt has {prompt_tokens} \
         tokens; shorten the prompt"
    )]
    ContextLengthExceeded { prompt_tokens: usize, context_length: usize },

    /// The model's chat template refused the messages (e.g. roles that do not alternate).
    #[error("{message}")]
    TemplateRefused { message: String },

    /// A chat request to a model that has no chat template.
    #[error("model `{model}` has no chat template; use /v1/completions, or set `chat_template` for it")]
    NoChatTemplate { model: Arc<str> },

    /// The preprocessing threads (tokenization) have `queue_depth` tasks waiting already.
    #[error("the server's preprocessing threads have {queue_depth} tasks waiting; retry later")]
    PreprocessingBusy { queue_depth: usize },

    #[error("{subject} contains token id {token_id}, outside the model's vocabulary of {vocab_size}")]
    TokenOutOfRange { subject: Subject, token_id: u64, vocab_size: usize },

    #[error("the request has {count} {what}, more than this model's limit of {max}")]
    TooManyInputs { what: &'static str, count: usize, max: usize },

    #[error("`dimensions` must be between 1 and the model's {model_dims} dimensions, got {requested}")]
    InvalidDimensions { requested: usize, model_dims: usize },

    #[error("could not tokenize {subject}: {message}")]
    Tokenize { subject: Subject, message: String },

    /// The model failed while running a batch. The message is for logs, not for clients.
    #[error("model `{model}` failed: {message}")]
    Backend { model: Arc<str>, message: String },

    /// A request field the model cannot use (`param` names it; the message says why).
    #[error("{message}")]
    InvalidInput { param: &'static str, message: String },

    /// An upload that is not usable audio (the message names the problem).
    #[error("{0}")]
    Audio(hearth_audio::AudioError),

    /// The model's owner thread has died; it is being reloaded.
    #[error("model `{model}` has failed and is being restarted")]
    ModelFailed { model: Arc<str> },

    /// A failure of Hearth itself (for example a panic while tokenizing). For logs, not clients.
    #[error("internal error: {message}")]
    Internal { message: String },

    /// `model`: the model, or the part of the server, that is stopping.
    #[error("model `{model}` is shutting down")]
    ShuttingDown { model: Arc<str> },
}

/// A caught panic's payload as text, for logs and internal errors.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("panicked: {detail}")
}
