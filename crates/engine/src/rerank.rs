//! Reranking: score each document against a query. A cross-encoder reads `(query, document)` pairs
//! and its logit becomes a relevance in (0, 1) through the sigmoid; an embedding model serves as a
//! bi-encoder whose relevance is the cosine similarity of query and document vectors, in [-1, 1].

use std::sync::Arc;

use crate::admission::Admission;
use crate::embed::{tokenize_texts, Embedder, TextLimits};
use crate::encoder::{EncoderHandle, Sequence};
use crate::error::{EngineError, Subject};
use crate::queue::Priority;
use crate::tokenize::TextTokenizer;

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

/// A cross-encoder's owner thread and what it needs to build pairs.
pub struct CrossEncoder {
    pub tokenizer: Arc<TextTokenizer>,
    pub worker: EncoderHandle<f32>,
    pub limits: TextLimits,
    pub admission: Admission,
}

pub enum Reranker {
    CrossEncoder(CrossEncoder),
    BiEncoder(Embedder),
}

#[derive(Debug)]
pub struct RerankScores {
    /// One relevance per document, in request order.
    pub scores: Vec<f32>,
    pub n_tokens: usize,
}

impl Reranker {
    pub fn scoring(&self) -> Scoring {
        match self {
            Self::CrossEncoder(_) => Scoring::CrossEncoder,
            Self::BiEncoder(_) => Scoring::BiEncoder,
        }
    }

    pub fn limits(&self) -> &TextLimits {
        match self {
            Self::CrossEncoder(c) => &c.limits,
            Self::BiEncoder(e) => e.limits(),
        }
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        match self {
            Self::CrossEncoder(c) => c.admission.in_flight(),
            Self::BiEncoder(e) => e.in_flight(),
        }
    }

    pub fn shutdown(&self) {
        match self {
            Self::CrossEncoder(c) => c.worker.shutdown(),
            Self::BiEncoder(e) => e.shutdown(),
        }
    }

    pub async fn rerank(
        &self,
        query: String,
        documents: Vec<String>,
        priority: Priority,
    ) -> Result<RerankScores, EngineError> {
        let max = self.limits().max_inputs;
        if documents.len() > max {
            return Err(EngineError::TooManyInputs { what: "documents", count: documents.len(), max });
        }
        match self {
            Self::CrossEncoder(cross) => cross.score(query, documents, priority).await,
            Self::BiEncoder(embedder) => bi_encoder_scores(embedder, query, documents, priority).await,
        }
    }
}

impl CrossEncoder {
    async fn score(
        &self,
        query: String,
        documents: Vec<String>,
        priority: Priority,
    ) -> Result<RerankScores, EngineError> {
        let _permit = self.admission.try_admit()?;
        let tokenizer = Arc::clone(&self.tokenizer);
        let policy = self.limits.length;
        let pairs = tokio::task::spawn_blocking(move || tokenizer.encode_pairs(&query, &documents, policy))
            .await
            .unwrap_or_else(|join| {
                Err(EngineError::Tokenize { subject: Subject::Query, message: join.to_string() })
            })?;
        let n_tokens = pairs.iter().map(Sequence::len).sum();
        let logits = self.worker.encode(pairs, priority).await?;
        Ok(RerankScores { scores: logits.into_iter().map(sigmoid).collect(), n_tokens })
    }
}

async fn bi_encoder_scores(
    embedder: &Embedder,
    query: String,
    documents: Vec<String>,
    priority: Priority,
) -> Result<RerankScores, EngineError> {
    let _permit = embedder.admission().try_admit()?;
    let subjects =
        std::iter::once(Subject::Query).chain((0..documents.len()).map(Subject::Document)).collect();
    let texts = std::iter::once(query).chain(documents).collect();
    let sequences = tokenize_texts(embedder.tokenizer(), texts, subjects, embedder.limits().length).await?;
    let n_tokens = sequences.iter().map(Sequence::len).sum();
    let vectors = embedder.worker().encode(sequences, priority).await?;
    let (query_vector, document_vectors) = vectors.split_first().ok_or_else(|| EngineError::Backend {
        model: Arc::clone(embedder.worker().model()),
        message: "no vector for the query".into(),
    })?;
    let scores = document_vectors.iter().map(|d| cosine(query_vector, d)).collect();
    Ok(RerankScores { scores, n_tokens })
}

pub fn sigmoid(logit: f32) -> f32 {
    1.0 / (1.0 + (-logit).exp())
}

/// Cosine similarity; 0 when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norms = a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norms > 0.0 {
        dot / norms
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmoid_and_cosine_known_values() {
        assert_eq!(sigmoid(0.0), 0.5);
        assert!((sigmoid(2.0) - 0.880_797_1).abs() < 1e-6);
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
        assert_eq!(cosine(&[1.0, 2.0], &[-1.0, -2.0]), -1.0);
    }
}
