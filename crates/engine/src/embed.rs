//! Sentence embeddings: the [`Embed`] capability, and [`EncoderService`], what every text encoder
//! shares: request limits, admission, tokenization on the preprocessing pool, and the model's owner
//! thread. OpenAI's `dimensions` is served by truncating and re-normalising.

use std::sync::Arc;

use crate::admission::Admission;
use crate::cache::ResultCache;
use crate::encoder::{EncoderHandle, Sequence};
use crate::error::{EngineError, Subject};
use crate::pool::BlockingPool;
use crate::queue::Priority;
use crate::tokenize::{LengthPolicy, TextTokenizer, TruncationSide};
use crate::vector::normalize;
use crate::BoxFuture;

/// What a loaded embedding model reports about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddingInfo {
    /// Length of each output vector.
    pub dims: usize,
    /// Rows of the token embedding table; token-id inputs must be below it.
    pub vocab_size: usize,
    /// Longest input the position table allows.
    pub max_positions: usize,
}

/// Per-request limits of a text model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextLimits {
    pub length: LengthPolicy,
    /// Most inputs (embeddings) or documents (rerank) in one request.
    pub max_inputs: usize,
    /// Most tokens in one request, all inputs together, special tokens included.
    pub max_tokens: usize,
}

impl TextLimits {
    /// These limits with a request's own truncation choice applied (never above the model's
    /// token limit).
    pub fn with_truncation(mut self, truncation: Option<Truncation>) -> Self {
        if let Some(choice) = truncation {
            self.length.truncate = choice.truncate;
            self.length.side = choice.side;
            if let Some(max) = choice.max_tokens {
                self.length.max_tokens = self.length.max_tokens.min(max);
            }
        }
        self
    }

    /// Refuses a request with more than `max_inputs` inputs (`what`: "inputs", "documents").
    pub(crate) fn check_count(&self, count: usize, what: &'static str) -> Result<(), EngineError> {
        if count > self.max_inputs {
            return Err(EngineError::TooManyInputs { what, count, max: self.max_inputs });
        }
        Ok(())
    }
}

#[derive(Debug)]
pub enum EmbedInput {
    Texts(Vec<String>),
    /// Already tokenized with the model's tokenizer, special tokens included; used as given.
    TokenIds(Vec<Vec<u32>>),
}

impl EmbedInput {
    pub fn len(&self) -> usize {
        match self {
            Self::Texts(t) => t.len(),
            Self::TokenIds(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the model read, special tokens included.
    pub n_tokens: usize,
}

/// A request's own choice about long inputs, over the model's configured policy (TEI's `truncate`
/// and `truncation_direction`, vLLM's `truncate_prompt_tokens`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncation {
    pub truncate: bool,
    pub side: TruncationSide,
    /// Keep at most this many tokens (special tokens included); never above the model's limit.
    pub max_tokens: Option<usize>,
}

/// The embedding capability: what the HTTP layer and the RAG pipeline call.
pub trait Embed: Send + Sync {
    /// Length of each vector (before `dimensions`).
    fn dims(&self) -> usize;

    /// Embeds every input, in order. `dimensions` keeps the first N dimensions and re-normalises;
    /// `truncation` overrides the model's policy for long inputs for this request.
    fn embed_with(
        &self,
        input: EmbedInput,
        dimensions: Option<usize>,
        truncation: Option<Truncation>,
        priority: Priority,
    ) -> BoxFuture<'_, Result<Embeddings, EngineError>>;

    /// [`Embed::embed_with`] under the model's own length policy.
    fn embed(
        &self,
        input: EmbedInput,
        dimensions: Option<usize>,
        priority: Priority,
    ) -> BoxFuture<'_, Result<Embeddings, EngineError>> {
        self.embed_with(input, dimensions, None, priority)
    }

    /// Most tokens of one input the model reads, special tokens excluded (a chunker's ceiling).
    fn max_input_tokens(&self) -> usize;

    /// Byte ranges of `text`'s tokens under the model's tokenizer (special tokens left out), for
    /// cutting documents into chunks of the model's own tokens; runs on the preprocessing pool.
    fn token_offsets(
        &self,
        text: String,
        priority: Priority,
    ) -> BoxFuture<'_, Result<Vec<(usize, usize)>, EngineError>>;
}

/// A text encoder's tokenizer, owner thread, limits and admission.
pub struct EncoderService<O> {
    pub tokenizer: Arc<TextTokenizer>,
    pub worker: EncoderHandle<O>,
    pub limits: TextLimits,
    pub admission: Admission,
    pub pool: Arc<BlockingPool>,
}

impl<O: Send + 'static> EncoderService<O> {
    /// Tokenizes `texts` on the preprocessing pool. Stops at the first error, once the request's
    /// tokens pass `limits.max_tokens`, or when the caller has gone.
    pub(crate) async fn tokenize(
        &self,
        texts: Vec<String>,
        subject: fn(usize) -> Subject,
        limits: TextLimits,
        priority: Priority,
    ) -> Result<Vec<Sequence>, EngineError> {
        let tokenizer = Arc::clone(&self.tokenizer);
        self.pool
            .run(priority, move |caller| {
                let mut total = 0;
                let mut sequences = Vec::with_capacity(texts.len());
                for (i, text) in texts.iter().enumerate() {
                    if caller.gone() {
                        return Err(EngineError::Internal { message: "the caller left".into() });
                    }
                    let sequence = tokenizer.encode(text, limits.length, subject(i))?;
                    total += sequence.len();
                    if total > limits.max_tokens {
                        return Err(EngineError::TooManyTokens { max: limits.max_tokens });
                    }
                    sequences.push(sequence);
                }
                Ok(sequences)
            })
            .await?
    }
}

pub struct Embedder {
    service: EncoderService<Vec<f32>>,
    info: EmbeddingInfo,
    /// Embeddings by token sequence, when the model's `cache_mib` is not 0.
    cache: Option<ResultCache>,
}

impl Embedder {
    pub fn new(service: EncoderService<Vec<f32>>, info: EmbeddingInfo) -> Self {
        Self { service, info, cache: None }
    }

    /// The same with a result cache of `max_bytes` (0: none).
    pub fn with_cache(mut self, max_bytes: usize) -> Self {
        self.cache = ResultCache::new(Arc::clone(self.service.worker.model()), max_bytes);
        self
    }

    pub fn cache(&self) -> Option<&ResultCache> {
        self.cache.as_ref()
    }

    /// Runs the sequences the cache does not hold (all of them without a cache) and stores what
    /// the model returns; a request fully in the cache never reaches the queue. The bi-encoder
    /// reranker shares it: documents embedded at ingest are not embedded again to be reranked.
    pub(crate) async fn encode_cached(
        &self,
        sequences: Vec<Sequence>,
        priority: Priority,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let Some(cache) = &self.cache else {
            return self.service.worker.encode(sequences, priority).await;
        };
        let worker = &self.service.worker;
        let vectors = cache
            .through(sequences, |misses| async move {
                Ok(worker.encode(misses, priority).await?.into_iter().map(Arc::<[f32]>::from).collect())
            })
            .await?;
        Ok(vectors.iter().map(|v| v.to_vec()).collect())
    }

    pub fn info(&self) -> &EmbeddingInfo {
        &self.info
    }

    pub fn limits(&self) -> &TextLimits {
        &self.service.limits
    }

    pub fn service(&self) -> &EncoderService<Vec<f32>> {
        &self.service
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.service.admission.in_flight()
    }

    fn check_token_ids(
        &self,
        arrays: Vec<Vec<u32>>,
        limits: &TextLimits,
    ) -> Result<Vec<Sequence>, EngineError> {
        let LengthPolicy { max_tokens, truncate, side } = limits.length;
        let mut total = 0;
        arrays
            .into_iter()
            .enumerate()
            .map(|(i, mut ids)| {
                let subject = Subject::Input(i);
                if ids.is_empty() {
                    return Err(EngineError::EmptyInput { subject });
                }
                if ids.len() > max_tokens {
                    if !truncate {
                        return Err(EngineError::InputTooLong {
                            subject,
                            n_tokens: ids.len(),
                            at_least: false,
                            max_tokens,
                        });
                    }
                    match side {
                        TruncationSide::Right => ids.truncate(max_tokens),
                        TruncationSide::Left => {
                            ids.drain(..ids.len() - max_tokens);
                        }
                    }
                }
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.info.vocab_size) {
                    return Err(EngineError::TokenOutOfRange {
                        subject,
                        token_id: bad.into(),
                        vocab_size: self.info.vocab_size,
                    });
                }
                total += ids.len();
                if total > limits.max_tokens {
                    return Err(EngineError::TooManyTokens { max: limits.max_tokens });
                }
                Ok(Sequence::new(ids))
            })
            .collect()
    }

    async fn run(
        &self,
        input: EmbedInput,
        dimensions: Option<usize>,
        truncation: Option<Truncation>,
        priority: Priority,
    ) -> Result<Embeddings, EngineError> {
        let limits = self.service.limits.with_truncation(truncation);
        let _permit = self.service.admission.try_admit()?;
        self.service.limits.check_count(input.len(), "inputs")?;
        if let Some(requested) = dimensions {
            if requested == 0 || requested > self.info.dims {
                return Err(EngineError::InvalidDimensions { requested, model_dims: self.info.dims });
            }
        }
        let sequences = match input {
            EmbedInput::Texts(texts) => {
                self.service.tokenize(texts, Subject::Input, limits, priority).await?
            }
            EmbedInput::TokenIds(arrays) => self.check_token_ids(arrays, &limits)?,
        };
        let n_tokens = sequences.iter().map(Sequence::len).sum();
        let mut vectors = self.encode_cached(sequences, priority).await?;
        if let Some(dims) = dimensions {
            for vector in &mut vectors {
                vector.truncate(dims);
                normalize(vector);
            }
        }
        Ok(Embeddings { vectors, n_tokens })
    }
}

impl Embed for Embedder {
    fn max_input_tokens(&self) -> usize {
        self.service
            .limits
            .length
            .max_tokens
            .saturating_sub(self.service.tokenizer.special_tokens_single())
            .max(1)
    }

    fn token_offsets(
        &self,
        text: String,
        priority: Priority,
    ) -> BoxFuture<'_, Result<Vec<(usize, usize)>, EngineError>> {
        let tokenizer = Arc::clone(&self.service.tokenizer);
        Box::pin(async move { self.service.pool.run(priority, move |_| tokenizer.offsets(&text)).await? })
    }

    fn dims(&self) -> usize {
        self.info.dims
    }

    fn embed_with(
        &self,
        input: EmbedInput,
        dimensions: Option<usize>,
        truncation: Option<Truncation>,
        priority: Priority,
    ) -> BoxFuture<'_, Result<Embeddings, EngineError>> {
        Box::pin(self.run(input, dimensions, truncation, priority))
    }
}
