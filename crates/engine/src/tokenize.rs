//! Text to token sequences with the model's own `tokenizer.json`, enforcing the model's length limit.
//!
//! Padding and truncation saved in `tokenizer.json` are switched off (some published files pad every
//! input to a fixed length): batching pads, and [`LengthPolicy`] decides what happens to long inputs.
//! Truncation cuts the text's own tokens and then adds the special tokens, so `[SEP]`/`</s>` survive.
//!
//! Work is bounded by the limit, not by the input: a text far longer than the limit is not tokenized
//! whole. Tokenizers split text at whitespace before anything else, so a prefix that ends where a
//! word ends tokenizes into exactly the first tokens of the whole text; [`TextTokenizer`] tokenizes
//! growing prefixes until one has more tokens than the limit allows, and uses its first tokens.

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
    /// Which end a cut removes.
    pub side: TruncationSide,
}

/// Which end of a long input truncation removes (TEI's `truncation_direction`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TruncationSide {
    /// Keep the first tokens (the default everywhere).
    #[default]
    Right,
    /// Keep the last tokens (vLLM's `truncate_prompt_tokens`). The whole text is tokenized, so the
    /// work is bounded by the body size limit rather than by the token limit.
    Left,
}

/// A first guess at bytes per token when cutting a long text; too small only costs a retry.
const PREFIX_BYTES_PER_TOKEN: usize = 8;
/// Bytes tokenized at once by [`TextTokenizer::offsets`].
pub const OFFSET_PIECE_BYTES: usize = 64 * 1024;

pub struct TextTokenizer {
    inner: Tokenizer,
    special_single: usize,
    special_pair: usize,
    /// Whether the tokenizer splits at whitespace first, which makes cutting by bytes exact.
    splits_words: bool,
}

/// A text's tokens (without special tokens), possibly of a prefix only.
struct Tokens {
    encoding: Encoding,
    /// Only a prefix was tokenized: the whole text has more tokens than `encoding` holds.
    cut: bool,
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
        let splits_words = inner.get_pre_tokenizer().is_some();
        Ok(Self { inner, special_single, special_pair, splits_words })
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
        self.inner.encode(text, false).map_err(|e| EngineError::Tokenize { subject, message: e.to_string() })
    }

    fn raw_nonempty(&self, text: &str, subject: Subject) -> Result<Encoding, EngineError> {
        if text.is_empty() {
            return Err(EngineError::EmptyInput { subject });
        }
        self.raw(text, subject)
    }

    /// The tokens of `text`, or of a prefix of it that holds more than `needed` tokens.
    fn tokens(&self, text: &str, needed: usize, subject: Subject) -> Result<Tokens, EngineError> {
        if text.is_empty() {
            return Err(EngineError::EmptyInput { subject });
        }
        let mut budget = (needed + 1).saturating_mul(PREFIX_BYTES_PER_TOKEN);
        while self.splits_words && budget < text.len() {
            let Some(prefix) = word_prefix(text, budget) else { break };
            let encoding = self.raw(prefix, subject)?;
            if encoding.len() > needed {
                return Ok(Tokens { encoding, cut: true });
            }
            budget = budget.saturating_mul(4);
        }
        Ok(Tokens { encoding: self.raw(text, subject)?, cut: false })
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

    /// Byte ranges of `text`'s tokens (special tokens left out), in order: where a chunker may
    /// cut. A long text is tokenized in pieces of about [`OFFSET_PIECE_BYTES`] ending at
    /// whitespace (where word-level pre-tokenizers split anyway), so memory stays bounded.
    pub fn offsets(&self, text: &str) -> Result<Vec<(usize, usize)>, EngineError> {
        let mut offsets = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let rest = &text[start..];
            let piece = if self.splits_words && rest.len() > OFFSET_PIECE_BYTES {
                word_prefix(rest, OFFSET_PIECE_BYTES).unwrap_or(rest)
            } else {
                rest
            };
            let encoding = self.raw(piece, Subject::Input(0))?;
            offsets.extend(encoding.get_offsets().iter().map(|&(s, e)| (start + s, start + e)));
            start += piece.len();
        }
        Ok(offsets)
    }

    /// One text → one sequence with special tokens.
    pub fn encode(
        &self,
        text: &str,
        policy: LengthPolicy,
        subject: Subject,
    ) -> Result<Sequence, EngineError> {
        let room = policy.max_tokens.saturating_sub(self.special_single);
        let Tokens { mut encoding, cut } = match (policy.truncate, policy.side) {
            // Keeping the end needs the end's tokens: the whole text.
            (true, TruncationSide::Left) => {
                Tokens { encoding: self.raw_nonempty(text, subject)?, cut: false }
            }
            _ => self.tokens(text, room, subject)?,
        };
        if encoding.len() > room {
            if !policy.truncate {
                return Err(EngineError::InputTooLong {
                    subject,
                    n_tokens: encoding.len() + self.special_single,
                    at_least: cut,
                    max_tokens: policy.max_tokens,
                });
            }
            truncate(&mut encoding, room, policy.side);
        }
        self.finish(encoding, None, subject)
    }

    /// `(query, document)` pairs for a cross-encoder. The query is tokenized once and never cut;
    /// with truncation on, documents are cut to fit beside it (their end, with `Left`, is kept).
    pub fn encode_pair(
        &self,
        query: &QueryTokens,
        document: &str,
        policy: LengthPolicy,
        subject: Subject,
    ) -> Result<Sequence, EngineError> {
        let room = policy.max_tokens.saturating_sub(self.special_pair + query.0.len());
        let Tokens { mut encoding, cut } = match (policy.truncate, policy.side) {
            (true, TruncationSide::Left) => {
                Tokens { encoding: self.raw_nonempty(document, subject)?, cut: false }
            }
            _ => self.tokens(document, room, subject)?,
        };
        if encoding.len() > room {
            if !policy.truncate {
                return Err(EngineError::InputTooLong {
                    subject,
                    n_tokens: encoding.len() + query.0.len() + self.special_pair,
                    at_least: cut,
                    max_tokens: policy.max_tokens,
                });
            }
            truncate(&mut encoding, room, policy.side);
        }
        self.finish(query.0.clone(), Some(encoding), subject)
    }

    /// Tokenizes a rerank query, which must leave room for at least one document token.
    pub fn encode_query(&self, query: &str, policy: LengthPolicy) -> Result<QueryTokens, EngineError> {
        let room = policy.max_tokens.saturating_sub(self.special_pair + 1);
        let Tokens { encoding, cut } = self.tokens(query, room, Subject::Query)?;
        if encoding.len() > room {
            return Err(EngineError::InputTooLong {
                subject: Subject::Query,
                n_tokens: encoding.len() + self.special_pair + 1,
                at_least: cut,
                max_tokens: policy.max_tokens,
            });
        }
        Ok(QueryTokens(encoding))
    }
}

/// A rerank query's tokens, shared by every pair of the request.
pub struct QueryTokens(Encoding);

fn truncate(encoding: &mut Encoding, max_len: usize, side: TruncationSide) {
    let direction = match side {
        TruncationSide::Right => TruncationDirection::Right,
        TruncationSide::Left => TruncationDirection::Left,
    };
    encoding.truncate(max_len, 0, direction);
    // The cut-off tail would otherwise be post-processed too, for nothing.
    encoding.take_overflowing();
}

/// The longest prefix of `text` of at most `max_bytes` bytes that ends where a word ends (just
/// before whitespace that follows a non-whitespace character); `None` if there is none.
fn word_prefix(text: &str, max_bytes: usize) -> Option<&str> {
    let mut end = None;
    let mut previous_is_space = true;
    for (i, c) in text.char_indices() {
        if i > max_bytes {
            break;
        }
        if c.is_whitespace() && !previous_is_space {
            end = Some(i);
        }
        previous_is_space = c.is_whitespace();
    }
    end.map(|end| &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer(name: &str) -> TextTokenizer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name)
            .join("tokenizer.json");
        TextTokenizer::from_file(&path).unwrap()
    }

    /// Texts with what trips tokenizers up: whitespace runs, punctuation, accents, CJK, emoji, code.
    fn hard_texts() -> Vec<String> {
        let pieces = [
            "The quick brown fox   jumps\tover\n\nthe lazy dog.",
            "naïve café résumé — déjà vu!",
            "fn main() { println!(\"{}\", x.map(|y| y * 2)); }",
            "東京都 は 日本の首都です。",
            "emoji 🎉🎉 and ZWJ 👩‍💻 sequences",
            "supercalifragilisticexpialidocious-antidisestablishmentarianism",
            "   leading and trailing spaces   ",
        ];
        (1..=6).map(|n| pieces.iter().cycle().take(n * 7).copied().collect::<Vec<_>>().join(" ")).collect()
    }

    #[test]
    fn cutting_by_bytes_gives_exactly_the_first_tokens_of_the_whole_text() {
        for name in ["tiny-bert-embed", "tiny-xlmr-embed"] {
            let tokenizer = fixture_tokenizer(name);
            for text in hard_texts() {
                let whole = tokenizer.raw(&text, Subject::Input(0)).unwrap();
                for needed in [1, 5, 17, 40, 100] {
                    let Tokens { encoding, cut } =
                        tokenizer.tokens(&text, needed, Subject::Input(0)).unwrap();
                    let n = needed.min(whole.len());
                    assert_eq!(encoding.get_ids()[..n], whole.get_ids()[..n], "{name}, {needed} of {text:?}");
                    if cut {
                        assert!(encoding.len() > needed, "a cut prefix holds more than needed");
                    } else {
                        assert_eq!(encoding.get_ids(), whole.get_ids());
                    }
                }
            }
        }
    }

    #[test]
    fn a_text_far_over_the_limit_is_not_tokenized_whole() {
        let tokenizer = fixture_tokenizer("tiny-bert-embed");
        let huge = "red apple ".repeat(1_600_000);
        let Tokens { encoding, cut } = tokenizer.tokens(&huge, 22, Subject::Input(0)).unwrap();
        assert!(cut);
        assert!(encoding.len() < 100, "tokenized {} tokens of 3.2 million", encoding.len());
        let policy = LengthPolicy { max_tokens: 24, truncate: true, side: TruncationSide::Right };
        let sequence = tokenizer.encode(&huge, policy, Subject::Input(0)).unwrap();
        assert_eq!(sequence, tokenizer.encode(&"red apple ".repeat(11), policy, Subject::Input(0)).unwrap());
        let refuse = LengthPolicy { max_tokens: 24, truncate: false, side: TruncationSide::Right };
        let err = tokenizer.encode(&huge, refuse, Subject::Input(0)).unwrap_err().to_string();
        assert!(err.contains("has at least"), "{err}");
    }

    #[test]
    fn word_prefixes_end_at_a_word_boundary() {
        assert_eq!(word_prefix("one two three", 5), Some("one"));
        assert_eq!(word_prefix("one two three", 7), Some("one two"));
        assert_eq!(word_prefix("one  two", 5), Some("one"), "never inside a whitespace run");
        assert_eq!(word_prefix("  lead", 3), None, "whitespace before any word is no word end");
        assert_eq!(word_prefix("averyveryverylongword tail", 5), None);
        assert_eq!(word_prefix("día uno", 6), Some("día"));
    }
}
