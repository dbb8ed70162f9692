//! The capability a decoder (LLM) backend implements for the generation scheduler.
//!
//! The scheduler owns the sequences; the model owns their KV caches, keyed by [`SeqId`]. One call
//! to [`DecoderModel::step`] runs every chunk of the step in one forward pass: the weight matmuls
//! see all chunks' new tokens stacked together, and each chunk attends to its own sequence's cache.
//! A chunk is a whole prompt, a slice of a long prompt (chunked prefill), or one decoded token.

use crate::error::BoxError;

/// Names a sequence's KV cache inside the model.
pub type SeqId = u64;

/// New tokens of one sequence in one step.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    pub seq: SeqId,
    /// Position of the first token: the number of tokens the sequence's cache holds before this
    /// step (0 for a new sequence).
    pub start: usize,
    pub tokens: &'a [u32],
    /// Whether the step must return the logits after this chunk's last token.
    pub logits: bool,
}

/// What a loaded decoder reports about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecoderInfo {
    pub vocab_size: usize,
    /// Longest sequence (prompt and output) the model supports.
    pub context_length: usize,
    /// KV-cache bytes one cached token takes, over all layers.
    pub kv_bytes_per_token: usize,
}

pub trait DecoderModel: 'static {
    fn info(&self) -> DecoderInfo;

    /// Runs one step: each chunk's tokens are appended to its sequence's cache (a sequence seen for
    /// the first time starts empty; `start` equals its cached length). Returns one row of logits
    /// (`vocab_size` values) per chunk with `logits` set, in chunk order.
    fn step(&mut self, chunks: &[Chunk]) -> Result<Vec<Vec<f32>>, BoxError>;

    /// Forgets a sequence's cache.
    fn release(&mut self, seq: SeqId);

    /// Starts sequence `to` with a copy of the first `len` cached tokens of `from` (a shared
    /// prompt prefix), so they are not computed again.
    fn fork(&mut self, from: SeqId, to: SeqId, len: usize) -> Result<(), BoxError>;

    /// The activation memory one step may use when the config sets none (for batch planning):
    /// what the device can spare, as for encoders.
    fn default_kv_budget(&self) -> usize;
}
