//! Text to token sequences with the model's own `tokenizer.json`, enforcing the model's length limit.
//!
//! Padding and truncation saved in `tokenizer.json` are switched off (some published files pad every
//! input to a fixed length): batching pads, and [`LengthPolicy`] decides what happens to long inputs.
//! Truncation cuts the text's own tokens and then adds the special tokens, so `[SEP]`/`</s>` survive.

use std::path::Path;

use tokenizers::{Encoding, PostProcessor, Tokenizer, TruncationDirection};

use crate::encoder::Sequence;
use crate::error::{BoxError, EngineError, Subject};

/// What to do with inputs longer than `max_tokens` (special tokens included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LengthPolicy {
    pub max_tokens: usize,
    /// Cut long inputs to `max_tokens` instead of refusing them.
    pub truncate: bool,
}

pub struct TextTokenizer {
    inner: Tokenizer,
    special_single: usize,
    special_pair: usize,
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, BoxError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| format!("cannot read tokenizer {}: {e}", path.display()))?;
        Self::new(inner)
    }

    pub fn new(mut inner: Tokenizer) -> Result<Self, BoxError> {
        inner.with_padding(None);
        inner.with_truncation(None)?;
        let added = |pair| inner.get_post_processor().map_or(0, |p| p.added_tokens(pair));
        let (special_single, special_pair) = (added(false), added(true));
        Ok(Self { inner, special_single, special_pair })
    }

    /// Special tokens added to one sequence (e.g. 2 for `[CLS] … [SEP]`).
    pub fn special_tokens_single(&self) -> usize {
        self.special_single
    }

    /// Special tokens added to a pair (e.g. 3 for `[CLS] a [SEP] b [SEP]`).
    pub fn special_tokens_pair(&self) -> usize {
        self.special_pair
    }

    fn raw(&self, text: &str, subject: Subject) -> Result<Encoding, EngineError> {
        if text.is_empty() {
            return Err(EngineError::EmptyInput { subject });
        }
        self.inner.encode(text, false).map_err(|e| EngineError::Tokenize { subject, message: e.to_string() })
    }

    fn finish(
        &self,
        first: Encoding,
        second: Option<Encoding>,
        subject: Subject,
    ) -> Result<Sequence, EngineError> {
        let encoding = self
            .inner
            .post_process(first, second, true)
            .map_err(|e| EngineError::Tokenize { subject, message: e.to_string() })?;
        Ok(Sequence { ids: encoding.get_ids().to_vec(), type_ids: encoding.get_type_ids().to_vec() })
    }

    /// One text → one sequence with special tokens.
    pub fn encode(
        &self,
        text: &str,
        policy: LengthPolicy,
        subject: Subject,
    ) -> Result<Sequence, EngineError> {
        let mut encoding = self.raw(text, subject)?;
        let n_tokens = encoding.len() + self.special_single;
        if n_tokens > policy.max_tokens {
            if !policy.truncate {
                return Err(EngineError::InputTooLong { subject, n_tokens, max_tokens: policy.max_tokens });
            }
            cut(&mut encoding, policy.max_tokens.saturating_sub(self.special_single));
        }
        self.finish(encoding, None, subject)
    }

    /// `(query, document)` pairs for a cross-encoder. The query is tokenized once and never cut;
    /// with truncation on, documents are cut to fit beside it.
    pub fn encode_pairs(
        &self,
        query: &str,
        documents: &[String],
        policy: LengthPolicy,
    ) -> Result<Vec<Sequence>, EngineError> {
        let query_encoding = self.raw(query, Subject::Query)?;
        let room = policy.max_tokens.saturating_sub(self.special_pair + query_encoding.len());
        if room == 0 {
            return Err(EngineError::InputTooLong {
                subject: Subject::Query,
                n_tokens: query_encoding.len() + self.special_pair + 1,
                max_tokens: policy.max_tokens,
            });
        }
        documents
            .iter()
            .enumerate()
            .map(|(i, document)| {
                let subject = Subject::Document(i);
                let mut doc_encoding = self.raw(document, subject)?;
                if doc_encoding.len() > room {
                    if !policy.truncate {
                        return Err(EngineError::InputTooLong {
                            subject,
                            n_tokens: doc_encoding.len() + query_encoding.len() + self.special_pair,
                            max_tokens: policy.max_tokens,
                        });
                    }
                    cut(&mut doc_encoding, room);
                }
                self.finish(query_encoding.clone(), Some(doc_encoding), subject)
            })
            .collect()
    }
}

fn cut(encoding: &mut Encoding, max_len: usize) {
    encoding.truncate(max_len, 0, TruncationDirection::Right);
    // The cut-off tail would otherwise be post-processed too, for nothing.
    encoding.take_overflowing();
}
