//! Text to speech: the `SpeechSynthesizer` capability a voice backend implements (Piper voices
//! in `hearth-backends`), and the service that runs one on its own thread ([`service`]). Text is
//! split into sentences by the model (a phonemizer knows where clauses end); each sentence's audio
//! goes to the client as soon as it exists, and the first sentence's in pieces where the model can
//! make it so, so a streamed response starts before even one sentence is whole.

pub mod service;

pub use service::{SpeechChunk, SpeechRequest, SpeechStream, Synthesize, Synthesizer, SynthesizerOptions};

use crate::BoxError;

/// A voice a model can speak with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoiceInfo {
    /// The name requests use (`voice`): a Piper voice's file stem, and `stem:speaker` for each
    /// speaker of a multi-speaker voice.
    pub id: String,
    /// The voice's language as its model names it (`en_US`).
    pub language: String,
    pub sample_rate_hz: u32,
    /// The voice's quality tier when it declares one (`low`, `medium`, `high`).
    pub quality: Option<String>,
}

/// What a voice model does, on its owner thread.
pub trait SpeechSynthesizer: Send {
    /// Every voice it has now.
    fn voices(&self) -> Vec<VoiceInfo>;
    /// Splits `text` into sentences and turns each into the model's input symbols (phoneme ids
    /// for Piper), in order. Sentences with nothing to say are left out.
    fn sentences(&mut self, voice: &str, text: &str) -> Result<Vec<Vec<i64>>, BoxError>;
    /// One sentence's audio, mono samples in [-1, 1] at the voice's rate; `speed` above 1
    /// speaks faster.
    fn render(&mut self, voice: &str, symbols: &[i64], speed: f32) -> Result<Vec<f32>, BoxError>;
    /// The same sentence in pieces, each handed to `piece` as soon as it exists, so the first
    /// can be sent before the rest is made (the service uses it for a request's first
    /// sentence); `piece` returns `false` to stop. The default renders the whole sentence as one
    /// piece.
    fn render_pieces(
        &mut self,
        voice: &str,
        symbols: &[i64],
        speed: f32,
        piece: &mut dyn FnMut(Vec<f32>) -> bool,
    ) -> Result<(), BoxError> {
        let samples = self.render(voice, symbols, speed)?;
        piece(samples);
        Ok(())
    }
    /// Looks for voices again (a voices folder where voices are dropped in); the default has
    /// nothing to look at.
    fn rescan(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}
