//! Speech to text: the `SpeechModel` capability a Whisper backend implements, the Whisper
//! vocabulary's special tokens, and the decoding rules that turn a model into transcripts
//! ([`decoding`]: 30 s windows advanced by decoded timestamps, temperature fallback, no-speech
//! detection, previous-text conditioning, language detection). The owner thread and queue are in
//! [`service`].

pub mod decoding;
pub mod service;
pub mod vocab;
pub mod wer;
pub mod words;

pub use decoding::{DecodeOptions, Segment, Task, Transcript};
pub use service::{Transcribe, TranscribeRequest, Transcriber, TranscriberOptions};
pub use vocab::{language_code, language_name, WhisperConfig, WhisperVocab};

use crate::BoxError;

/// What a Whisper-style encoder-decoder model does for the decoding rules. One window is the
/// current audio at a time; its decoder context is reset between attempts on that window.
pub trait SpeechModel: Send {
    /// Log-mel bins the encoder takes (80, or 128 for large-v3).
    fn n_mels(&self) -> usize;
    /// Tokens the decoder's context holds (448 for every Whisper).
    fn n_text_ctx(&self) -> usize;
    /// Encodes one 30 s window of log-mel (`n_mels` rows × 3000 frames) and makes it the audio
    /// the decoder attends to; the decoder's past tokens are cleared.
    fn encode(&mut self, mel: &[f32]) -> Result<(), BoxError>;
    /// Clears the decoder's past tokens; the encoded audio stays.
    fn reset(&mut self);
    /// Appends `tokens` to the decoder's context and returns the logits after the last of them.
    fn decode(&mut self, tokens: &[u32]) -> Result<Vec<f32>, BoxError>;
    /// Decodes `tokens` from an empty context over the encoded window and returns, for each
    /// (decoder layer, head) in `heads`, its cross-attention scores before the soft-max,
    /// `[tokens.len() × audio positions]` row-major. The decoder's context is empty afterwards.
    /// For word timestamps; a model without attention weights to show says so.
    fn cross_attention(
        &mut self,
        tokens: &[u32],
        heads: &[(usize, usize)],
    ) -> Result<Vec<Vec<f32>>, BoxError> {
        let _ = (tokens, heads);
        Err("this speech model cannot align words to the audio".into())
    }
    /// Whether [`SpeechModel::cross_attention`] works (word timestamps).
    fn aligns_words(&self) -> bool {
        false
    }
    /// (decoder layers, heads per layer), for the default alignment heads.
    fn text_layers(&self) -> (usize, usize) {
        (0, 0)
    }
}
