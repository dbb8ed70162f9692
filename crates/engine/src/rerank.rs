//! Reranking: the [`Rerank`] capability. A cross-encoder reads `(query, document)` pairs and its
//! logit becomes a relevance in (0, 1) through the sigmoid; an embedding model serves as a
//! bi-encoder whose relevance is the cosine similarity of query and document vectors, in [-1, 1].

use std::sync::Arc;

use crate::admission::Admission;
use crate::cache::ResultCache;
use crate::embed::{Embedder, EncoderService, TextLimits, Truncation};
use crate::encoder::Sequence;
use crate::error::{EngineError, Subject};
use crate::queue::Priority;
use crate::vector::cosine;
use crate::BoxFuture;

/// How a rerank model turns text into scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    CrossEncoder,
    BiEncoder,
}

impl Scoring {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CrossEncoder => "cross-encoder",
            Self::BiEncoder => "bi-encoder",
        }
    }
}

#[derive(Debug)]
pub struct RerankScores {
    /// One relevance per document, in request order.
    pub scores: Vec<f32>,
    pub n_tokens: usize,
}

/// The rerank capability: what the HTTP layer and the RAG pipeline call.
pub trait Rerank: Send + Sync {
    /// One relevance per document, in request order; `truncation` overrides the model's policy
    /// for long documents (the query is never cut by a cross-encoder).
    fn rerank_with(
        &self,
        query: String,
        documents: Vec<String>,
        truncation: Option<Truncation>,
        priority: Priority,
    ) -> BoxFuture<'_, Result<RerankScores, EngineError>>;

    /// [`Rerank::rerank_with`] under the model's own length policy.
    fn rerank(
        &self,
        query: String,
        documents: Vec<String>,
        priority: Priority,
    ) -> BoxFuture<'_, Result<RerankScores, EngineError>> {
        self.rerank_with(query, documents, None, priority)
    }
}

pub enum Reranker {
    /// A cross-encoder; `cache` holds its logits by pair token sequence (`cache_mib`), so a
    /// document reranked again for the same query skips the model.
    CrossEncoder { service: EncoderService<f32>, cache: Option<Box<ResultCache>> },
    /// An embedding model compared by cosine, under the rerank entry's own limits and admission.
    /// The embedder (tokenizer, queue, owner thread) may be shared with an embedding entry.
    BiEncoder { embedder: Arc<Embedder>, limits: TextLimits, admission: Admission },
}

impl Reranker {
    /// A cross-encoder with a pair-score cache of `cache_bytes` (0: none).
    pub fn cross_encoder(service: EncoderService<f32>, cache_bytes: usize) -> Self {
        let cache = ResultCache::new(Arc::clone(service.worker.model()), cache_bytes).map(Box::new);
        Self::CrossEncoder { service, cache }
    }

    /// The result cache this reranker reads: its own pair-score cache, or the embedder's.
    pub fn cache(&self) -> Option<&ResultCache> {
        match self {
            Self::CrossEncoder { cache, .. } => cache.as_deref(),
            Self::BiEncoder { embedder, .. } => embedder.cache(),
        }
    }

    pub fn scoring(&self) -> Scoring {
        match self {
            Self::CrossEncoder { .. } => Scoring::CrossEncoder,
            Self::BiEncoder { .. } => Scoring::BiEncoder,
        }
    }

    pub fn limits(&self) -> &TextLimits {
        match self {
            Self::CrossEncoder { service, .. } => &service.limits,
            Self::BiEncoder { limits, .. } => limits,
        }
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        match self {
            Self::CrossEncoder { service, .. } => service.admission.in_flight(),
            Self::BiEncoder { admission, .. } => admission.in_flight(),
        }
    }

    /// True while the owner thread doing the work lives.
    pub fn is_alive(&self) -> bool {
        match self {
            Self::CrossEncoder { service, .. } => service.worker.is_alive(),
            Self::BiEncoder { embedder, .. } => embedder.service().worker.is_alive(),
        }
    }

    /// Resolves once the owner thread doing the work has died.
    pub async fn failed(&self) {
        match self {
            Self::CrossEncoder { service, .. } => service.worker.failed().await,
            Self::BiEncoder { embedder, .. } => embedder.service().worker.failed().await,
        }
    }

    async fn run(
        &self,
        query: String,
        documents: Vec<String>,
        truncation: Option<Truncation>,
        priority: Priority,
    ) -> Result<RerankScores, EngineError> {
        match self {
            Self::CrossEncoder { service, cache } => {
                let limits = service.limits.with_truncation(truncation);
                cross_encoder_scores(service, cache.as_deref(), limits, query, documents, priority).await
            }
            Self::BiEncoder { embedder, limits, admission } => {
                let _permit = admission.try_admit()?;
                limits.check_count(documents.len(), "documents")?;
                bi_encoder_scores(embedder, limits.with_truncation(truncation), query, documents, priority)
                    .await
            }
        }
    }
}

impl Rerank for Reranker {
    fn rerank_with(
        &self,
        query: String,
        documents: Vec<String>,
        truncation: Option<Truncation>,
        priority: Priority,
    ) -> BoxFuture<'_, Result<RerankScores, EngineError>> {
        Box::pin(self.run(query, documents, truncation, priority))
    }
}

async fn cross_encoder_scores(
    service: &EncoderService<f32>,
    cache: Option<&ResultCache>,
    limits: TextLimits,
    query: String,
    documents: Vec<String>,
    priority: Priority,
) -> Result<RerankScores, EngineError> {
    let _permit = service.admission.try_admit()?;
    limits.check_count(documents.len(), "documents")?;
    let tokenizer = Arc::clone(&service.tokenizer);
    let pairs = service
        .pool
        .run(priority, move |caller| {
            let query = tokenizer.encode_query(&query, limits.length)?;
            let mut total = 0;
            let mut pairs = Vec::with_capacity(documents.len());
            for (i, document) in documents.iter().enumerate() {
                if caller.gone() {
                    return Err(EngineError::Internal { message: "the caller left".into() });
                }
                let pair = tokenizer.encode_pair(&query, document, limits.length, Subject::Document(i))?;
                total += pair.len();
                if total > limits.max_tokens {
                    return Err(EngineError::TooManyTokens { max: limits.max_tokens });
                }
                pairs.push(pair);
            }
            Ok(pairs)
        })
        .await??;
    let n_tokens = pairs.iter().map(Sequence::len).sum();
    let logits = match cache {
        None => service.worker.encode(pairs, priority).await?,
        Some(cache) => {
            let worker = &service.worker;
            let cached = cache
                .through(pairs, |misses| async move {
                    let logits = worker.encode(misses, priority).await?;
                    Ok(logits.into_iter().map(|logit| Arc::<[f32]>::from([logit])).collect())
                })
                .await?;
            cached.iter().map(|logit| logit[0]).collect()
        }
    };
    Ok(RerankScores { scores: logits.into_iter().map(sigmoid).collect(), n_tokens })
}

async fn bi_encoder_scores(
    embedder: &Embedder,
    limits: TextLimits,
    query: String,
    documents: Vec<String>,
    priority: Priority,
) -> Result<RerankScores, EngineError> {
    let service = embedder.service();
    let subject = |i| if i == 0 { Subject::Query } else { Subject::Document(i - 1) };
    let texts = std::iter::once(query).chain(documents).collect();
    let sequences = service.tokenize(texts, subject, limits, priority).await?;
    let n_tokens = sequences.iter().map(Sequence::len).sum();
    let vectors = embedder.encode_cached(sequences, priority).await?;
    let (query_vector, document_vectors) = vectors.split_first().ok_or_else(|| EngineError::Backend {
        model: Arc::clone(service.worker.model()),
        message: "no vector for the query".into(),
    })?;
    let scores = document_vectors.iter().map(|d| cosine(query_vector, d)).collect();
    Ok(RerankScores { scores, n_tokens })
}

pub fn sigmoid(logit: f32) -> f32 {
    1.0 / (1.0 + (-logit).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmoid_known_values() {
        assert_eq!(sigmoid(0.0), 0.5);
        assert!((sigmoid(2.0) - 0.880_797_1).abs() < 1e-6);
    }
}
