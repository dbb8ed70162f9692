//! Sentence embeddings: validation, tokenization off the async runtime, batching through the model's
//! owner thread, and OpenAI's `dimensions` (truncate, then re-normalise).

use std::sync::Arc;

use crate::admission::Admission;
use crate::encoder::{EncoderHandle, Sequence};
use crate::error::{EngineError, Subject};
use crate::queue::Priority;
use crate::tokenize::{LengthPolicy, TextTokenizer};

/// What a loaded embedding model reports about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddingInfo {
    /// Length of each output vector.
    pub dims: usize,
    /// Rows of the token embedding table; token-id inputs must be below it.
    pub vocab_size: usize,
    /// Whether outputs are L2-normalised.
    pub normalized: bool,
}

/// Per-request limits of a text model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextLimits {
    pub length: LengthPolicy,
    /// Most inputs (embeddings) or documents (rerank) in one request.
    pub max_inputs: usize,
}

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

pub struct Embedder {
    tokenizer: Arc<TextTokenizer>,
    worker: EncoderHandle<Vec<f32>>,
    info: EmbeddingInfo,
    limits: TextLimits,
    admission: Admission,
}

impl Embedder {
    pub fn new(
        tokenizer: Arc<TextTokenizer>,
        worker: EncoderHandle<Vec<f32>>,
        info: EmbeddingInfo,
        limits: TextLimits,
        admission: Admission,
    ) -> Self {
        Self { tokenizer, worker, info, limits, admission }
    }

    pub fn info(&self) -> &EmbeddingInfo {
        &self.info
    }

    pub fn limits(&self) -> &TextLimits {
        &self.limits
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.admission.in_flight()
    }

    pub(crate) fn admission(&self) -> &Admission {
        &self.admission
    }

    pub(crate) fn tokenizer(&self) -> &Arc<TextTokenizer> {
        &self.tokenizer
    }

    pub(crate) fn worker(&self) -> &EncoderHandle<Vec<f32>> {
        &self.worker
    }

    pub fn shutdown(&self) {
        self.worker.shutdown();
    }

    pub async fn embed(
        &self,
        input: EmbedInput,
        dimensions: Option<usize>,
        priority: Priority,
    ) -> Result<Embeddings, EngineError> {
        let _permit = self.admission.try_admit()?;
        if input.len() > self.limits.max_inputs {
            return Err(EngineError::TooManyInputs {
                what: "inputs",
                count: input.len(),
                max: self.limits.max_inputs,
            });
        }
        if let Some(requested) = dimensions {
            if requested == 0 || requested > self.info.dims {
                return Err(EngineError::InvalidDimensions { requested, model_dims: self.info.dims });
            }
        }
        let sequences = match input {
            EmbedInput::Texts(texts) => {
                let subjects = (0..texts.len()).map(Subject::Input);
                tokenize_texts(&self.tokenizer, texts, subjects.collect(), self.limits.length).await?
            }
            EmbedInput::TokenIds(arrays) => self.check_token_ids(arrays)?,
        };
        let n_tokens = sequences.iter().map(Sequence::len).sum();
        let mut vectors = self.worker.encode(sequences, priority).await?;
        if let Some(dims) = dimensions {
            for vector in &mut vectors {
                vector.truncate(dims);
                normalize(vector);
            }
        }
        Ok(Embeddings { vectors, n_tokens })
    }

    fn check_token_ids(&self, arrays: Vec<Vec<u32>>) -> Result<Vec<Sequence>, EngineError> {
        let LengthPolicy { max_tokens, truncate } = self.limits.length;
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
                        return Err(EngineError::InputTooLong { subject, n_tokens: ids.len(), max_tokens });
                    }
                    ids.truncate(max_tokens);
                }
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.info.vocab_size) {
                    return Err(EngineError::TokenOutOfRange {
                        subject,
                        token_id: bad.into(),
                        vocab_size: self.info.vocab_size,
                    });
                }
                Ok(Sequence::new(ids))
            })
            .collect()
    }
}

/// Tokenizes on the blocking pool so the async runtime keeps serving while long texts are split.
pub(crate) async fn tokenize_texts(
    tokenizer: &Arc<TextTokenizer>,
    texts: Vec<String>,
    subjects: Vec<Subject>,
    policy: LengthPolicy,
) -> Result<Vec<Sequence>, EngineError> {
    let tokenizer = Arc::clone(tokenizer);
    tokio::task::spawn_blocking(move || {
        texts.iter().zip(subjects).map(|(text, subject)| tokenizer.encode(text, policy, subject)).collect()
    })
    .await
    .unwrap_or_else(|join| {
        Err(EngineError::Tokenize { subject: Subject::Input(0), message: join.to_string() })
    })
}

/// Scales `vector` to unit L2 norm; a zero vector stays zero.
pub fn normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_gives_unit_norm_and_keeps_zero() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);
        let mut zero = vec![0.0; 3];
        normalize(&mut zero);
        assert_eq!(zero, [0.0; 3]);
    }
}
