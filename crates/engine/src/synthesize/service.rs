//! The `Synthesize` capability and its service: one owner thread per voice model behind a bounded
//! queue. A request is admitted (or refused at once), queued, and on the owner thread split into
//! sentences; each sentence's samples are sent on the request's channel as soon as they are
//! rendered. The thread checks before every sentence whether the client is still there, so a
//! closed stream stops costing work at the next sentence.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::{SpeechSynthesizer, VoiceInfo};
use crate::admission::{Admission, Permit};
use crate::error::{panic_message, BoxError, EngineError};
use crate::owner::{Answer, Owner};
use crate::queue::Priority;
use crate::BoxFuture;

/// OpenAI's voice names. Each maps to a configured voice: its alias when the config gives one,
/// otherwise the model's default voice.
pub const OPENAI_VOICES: [&str; 13] = [
    "alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage", "shimmer",
    "verse",
];

/// One request: `text` in `voice` (a voice id, an alias or an OpenAI name), `speed` 0.25–4.
#[derive(Clone, Debug)]
pub struct SpeechRequest {
    pub voice: String,
    pub text: String,
    pub speed: f32,
    pub priority: Priority,
}

/// Audio as it is made: one sentence, or a piece of the first (consecutive chunks join without a
/// seam).
#[derive(Clone, Debug, PartialEq)]
pub struct SpeechChunk {
    pub samples: Vec<f32>,
    pub sample_rate_hz: u32,
}

/// A request's sentences as they are rendered; the channel closes after the last one, or after an
/// error. Holds the request's admission permit until dropped.
pub struct SpeechStream {
    pub voice: String,
    pub sample_rate_hz: u32,
    /// Sentences the text was split into (known before the first is rendered).
    pub sentences: usize,
    pub chunks: mpsc::UnboundedReceiver<Result<SpeechChunk, EngineError>>,
    _permit: Permit,
}

/// What the HTTP layer sees of a served voice model.
pub trait Synthesize: Send + Sync {
    fn voices(&self) -> Vec<VoiceInfo>;
    /// The voice id a request's `voice` names, if any.
    fn resolve_voice(&self, name: &str) -> Option<String>;
    /// The longest input a request may hold, in characters.
    fn max_input_chars(&self) -> usize;
    /// Starts speaking: answers once the text is split into sentences, before any is rendered.
    fn speak(&self, request: SpeechRequest) -> BoxFuture<'_, Result<SpeechStream, EngineError>>;
    /// Looks for voices again (after a `SIGHUP` or an admin reload).
    fn rescan(&self) -> BoxFuture<'_, Result<(), EngineError>>;
}

#[derive(Debug, Clone)]
pub struct SynthesizerOptions {
    pub queue_depth: usize,
    pub max_concurrent_requests: usize,
    pub max_input_chars: usize,
    /// Names requests may use for voices (OpenAI's names among them) → voice ids.
    pub aliases: BTreeMap<String, String>,
    /// The voice OpenAI names without an alias speak with; `None`: the first voice.
    pub default_voice: Option<String>,
}

/// The answer a request gets once its text is split: how many sentences, at what rate.
type Started = Result<(usize, u32), EngineError>;

enum Job {
    Speak {
        request: SpeechRequest,
        started: oneshot::Sender<Started>,
        chunks: mpsc::UnboundedSender<Result<SpeechChunk, EngineError>>,
    },
    Rescan {
        done: oneshot::Sender<Result<(), EngineError>>,
    },
}

impl Answer for Job {
    fn fail(self, error: EngineError) {
        match self {
            Job::Speak { started, .. } => {
                let _ = started.send(Err(error));
            }
            Job::Rescan { done } => {
                let _ = done.send(Err(error));
            }
        }
    }
}

pub struct Synthesizer {
    model_id: Arc<str>,
    owner: Owner<Job>,
    admission: Admission,
    voices: Arc<RwLock<Vec<VoiceInfo>>>,
    options: SynthesizerOptions,
}

fn backend(model: &Arc<str>, error: BoxError) -> EngineError {
    EngineError::Backend { model: Arc::clone(model), message: error.to_string() }
}

impl Synthesizer {
    /// Starts the owner thread and loads the model on it with `load`.
    pub async fn start<M, F>(
        model_id: Arc<str>,
        options: SynthesizerOptions,
        load: F,
    ) -> Result<Self, BoxError>
    where
        M: SpeechSynthesizer + 'static,
        F: FnOnce() -> Result<M, BoxError> + Send + 'static,
    {
        let voices = Arc::new(RwLock::new(Vec::new()));
        let thread_voices = Arc::clone(&voices);
        let thread_model = Arc::clone(&model_id);
        let load = move || {
            let model = load()?;
            let found = model.voices();
            if found.is_empty() {
                return Err("the model has no voices".into());
            }
            Ok((model, found))
        };
        let run = move |mut model: M,
                        queue: Arc<crate::queue::JobQueue<Job>>,
                        life: Arc<crate::owner::Lifecycle>| {
            while let Some((_, job)) = queue.pop_wait() {
                if life.past_deadline() {
                    job.fail(life.shutting_down());
                    continue;
                }
                match job {
                    Job::Rescan { done } => {
                        let result =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.rescan()));
                        let result = match result {
                            Ok(Ok(())) => {
                                let found = model.voices();
                                tracing::info!(model = %thread_model, voices = found.len(), "voices rescanned");
                                *thread_voices.write().unwrap_or_else(|p| p.into_inner()) = found;
                                Ok(())
                            }
                            Ok(Err(error)) => Err(backend(&thread_model, error)),
                            Err(panic) => Err(backend(&thread_model, panic_message(&panic).into())),
                        };
                        let _ = done.send(result);
                    }
                    Job::Speak { request, started, chunks } => {
                        if started.is_closed() {
                            continue; // the client left while the job waited
                        }
                        let rate = thread_voices
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .iter()
                            .find(|v| v.id == request.voice)
                            .map(|v| v.sample_rate_hz);
                        let Some(rate) = rate else {
                            let _ = started.send(Err(EngineError::InvalidInput {
                                param: "voice",
                                message: format!("voice `{}` is no longer available", request.voice),
                            }));
                            continue;
                        };
                        speak(&mut model, &thread_model, &life, request, rate, started, chunks);
                    }
                }
            }
        };
        let (owner, found) = Owner::start(Arc::clone(&model_id), options.queue_depth, load, run).await?;
        *voices.write().unwrap_or_else(|p| p.into_inner()) = found;
        let admission = Admission::new(Arc::clone(&model_id), options.max_concurrent_requests);
        Ok(Synthesizer { model_id, owner, admission, voices, options })
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn in_flight(&self) -> usize {
        self.admission.in_flight()
    }

    pub fn is_alive(&self) -> bool {
        self.owner.is_alive()
    }

    pub async fn failed(&self) {
        self.owner.failed().await
    }

    pub fn shutdown(&self, deadline: Instant) {
        self.owner.shutdown(deadline)
    }

    pub fn begin_shutdown(&self, deadline: Instant) {
        self.owner.begin_shutdown(deadline)
    }
}

/// Runs one request on the owner thread: sentences, then each one's audio on `chunks`.
fn speak<M: SpeechSynthesizer>(
    model: &mut M,
    model_id: &Arc<str>,
    life: &crate::owner::Lifecycle,
    request: SpeechRequest,
    rate: u32,
    started: oneshot::Sender<Started>,
    chunks: mpsc::UnboundedSender<Result<SpeechChunk, EngineError>>,
) {
    let began = Instant::now();
    let guarded = |f: &mut dyn FnMut() -> Result<Vec<f32>, BoxError>| match std::panic::catch_unwind(
        std::panic::AssertUnwindSafe(f),
    ) {
        Ok(result) => result,
        Err(panic) => Err(panic_message(&panic).into()),
    };
    let mut sentences = Vec::new();
    let split = guarded(&mut || {
        sentences = model.sentences(&request.voice, &request.text)?;
        Ok(Vec::new())
    });
    if let Err(error) = split {
        tracing::error!(model = %model_id, %error, "could not split the text into sentences");
        let _ = started.send(Err(backend(model_id, error)));
        return;
    }
    if sentences.is_empty() {
        let _ = started.send(Err(EngineError::InvalidInput {
            param: "input",
            message: "the input has nothing to speak (no words the voice can pronounce)".into(),
        }));
        return;
    }
    if started.send(Ok((sentences.len(), rate))).is_err() {
        return;
    }
    let labels = [("model", model_id.to_string())];
    let mut samples_out = 0usize;
    for (index, symbols) in sentences.iter().enumerate() {
        if chunks.is_closed() || life.past_deadline() {
            return; // the client left, or shutdown's deadline passed
        }
        // The first sentence in pieces (its first piece is the request's first audio); the others
        // whole, while the client is still playing what came before.
        let mut send = |samples: Vec<f32>| {
            samples_out += samples.len();
            chunks.send(Ok(SpeechChunk { samples, sample_rate_hz: rate })).is_ok()
        };
        let rendered = if index == 0 {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                model.render_pieces(&request.voice, symbols, request.speed, &mut send)
            })) {
                Ok(result) => result,
                Err(panic) => Err(panic_message(&panic).into()),
            }
        } else {
            guarded(&mut || model.render(&request.voice, symbols, request.speed)).map(|samples| {
                send(samples);
            })
        };
        match rendered {
            Ok(()) => {
                if chunks.is_closed() {
                    return;
                }
            }
            Err(error) => {
                tracing::error!(model = %model_id, %error, "speech synthesis failed");
                let _ = chunks.send(Err(backend(model_id, error)));
                return;
            }
        }
    }
    metrics::histogram!("hearth_synthesize_seconds", &labels).record(began.elapsed().as_secs_f64());
    metrics::counter!("hearth_synthesized_audio_seconds_total", &labels)
        .increment((samples_out as f64 / f64::from(rate)).round() as u64);
}

impl Synthesize for Synthesizer {
    fn voices(&self) -> Vec<VoiceInfo> {
        self.voices.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn resolve_voice(&self, name: &str) -> Option<String> {
        let voices = self.voices.read().unwrap_or_else(|p| p.into_inner());
        let known = |id: &str| voices.iter().any(|v| v.id == id);
        if known(name) {
            return Some(name.to_string());
        }
        if let Some(target) = self.options.aliases.get(name) {
            return known(target).then(|| target.clone());
        }
        if OPENAI_VOICES.contains(&name) {
            return match &self.options.default_voice {
                Some(default) => known(default).then(|| default.clone()),
                None => voices.first().map(|v| v.id.clone()),
            };
        }
        None
    }

    fn max_input_chars(&self) -> usize {
        self.options.max_input_chars
    }

    fn speak(&self, request: SpeechRequest) -> BoxFuture<'_, Result<SpeechStream, EngineError>> {
        Box::pin(async move {
            let permit = self.admission.try_admit()?;
            let voice = request.voice.clone();
            let priority = request.priority;
            let (started, answer) = oneshot::channel();
            let (chunks, receiver) = mpsc::unbounded_channel();
            self.owner.push(Job::Speak { request, started, chunks }, priority)?;
            let (sentences, sample_rate_hz) = answer.await.map_err(|_| EngineError::Internal {
                message: "the voice model's thread dropped a job".into(),
            })??;
            Ok(SpeechStream { voice, sample_rate_hz, sentences, chunks: receiver, _permit: permit })
        })
    }

    fn rescan(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let (done, answer) = oneshot::channel();
            self.owner.push(Job::Rescan { done }, Priority::High)?;
            answer.await.map_err(|_| EngineError::Internal {
                message: "the voice model's thread dropped a job".into(),
            })?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mock voice model (named so): each "sentence" is a word, rendered as that many samples
    /// per character, scaled by speed, and in pieces as its first 3 samples then the rest;
    /// `rescan` adds a second voice.
    struct MockVoices {
        voices: Vec<VoiceInfo>,
    }

    fn voice(id: &str) -> VoiceInfo {
        VoiceInfo { id: id.into(), language: "en_US".into(), sample_rate_hz: 1000, quality: None }
    }

    impl SpeechSynthesizer for MockVoices {
        fn voices(&self) -> Vec<VoiceInfo> {
            self.voices.clone()
        }
        fn sentences(&mut self, _voice: &str, text: &str) -> Result<Vec<Vec<i64>>, BoxError> {
            if text.contains("boom") {
                panic!("mock phonemizer exploded");
            }
            Ok(text.split_whitespace().map(|w| vec![w.len() as i64]).collect())
        }
        fn render(&mut self, _voice: &str, symbols: &[i64], speed: f32) -> Result<Vec<f32>, BoxError> {
            Ok(vec![0.5; (symbols[0] as f32 * 10.0 / speed) as usize])
        }
        fn render_pieces(
            &mut self,
            voice: &str,
            symbols: &[i64],
            speed: f32,
            piece: &mut dyn FnMut(Vec<f32>) -> bool,
        ) -> Result<(), BoxError> {
            let mut samples = self.render(voice, symbols, speed)?;
            let rest = samples.split_off(3.min(samples.len()));
            if piece(samples) {
                piece(rest);
            }
            Ok(())
        }
        fn rescan(&mut self) -> Result<(), BoxError> {
            self.voices.push(voice("second"));
            Ok(())
        }
    }

    async fn start(aliases: &[(&str, &str)]) -> Synthesizer {
        let options = SynthesizerOptions {
            queue_depth: 4,
            max_concurrent_requests: 2,
            max_input_chars: 100,
            aliases: aliases.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            default_voice: None,
        };
        Synthesizer::start("mock".into(), options, || Ok(MockVoices { voices: vec![voice("first")] }))
            .await
            .unwrap()
    }

    fn request(text: &str, speed: f32) -> SpeechRequest {
        SpeechRequest { voice: "first".into(), text: text.into(), speed, priority: Priority::Normal }
    }

    #[tokio::test]
    async fn sentences_arrive_in_order_then_the_stream_ends() {
        let synth = start(&[]).await;
        let mut stream = synth.speak(request("a bb ccc", 1.0)).await.unwrap();
        assert_eq!((stream.sentences, stream.sample_rate_hz), (3, 1000));
        let mut lengths = Vec::new();
        while let Some(chunk) = stream.chunks.recv().await {
            lengths.push(chunk.unwrap().samples.len());
        }
        assert_eq!(lengths, [3, 7, 20, 30], "the first sentence in pieces, the others whole");
        let mut fast = synth.speak(request("bb", 2.0)).await.unwrap();
        let mut samples = 0;
        while let Some(chunk) = fast.chunks.recv().await {
            samples += chunk.unwrap().samples.len();
        }
        assert_eq!(samples, 10);
    }

    #[tokio::test]
    async fn voices_resolve_by_id_alias_and_openai_name() {
        let synth = start(&[("narrator", "first"), ("nova", "missing")]).await;
        assert_eq!(synth.resolve_voice("first").as_deref(), Some("first"));
        assert_eq!(synth.resolve_voice("narrator").as_deref(), Some("first"));
        assert_eq!(synth.resolve_voice("alloy").as_deref(), Some("first"));
        assert_eq!(synth.resolve_voice("nova"), None, "an alias to a voice that is not there");
        assert_eq!(synth.resolve_voice("nobody"), None);
        assert_eq!(synth.resolve_voice("second"), None);
        synth.rescan().await.unwrap();
        assert_eq!(synth.resolve_voice("second").as_deref(), Some("second"));
        assert_eq!(synth.voices().len(), 2);
    }

    #[tokio::test]
    async fn nothing_to_say_and_panics_are_errors_not_hangs() {
        let synth = start(&[]).await;
        let empty = synth.speak(request("   ", 1.0)).await.err().unwrap();
        assert!(matches!(empty, EngineError::InvalidInput { param: "input", .. }), "{empty}");
        let boom = synth.speak(request("boom", 1.0)).await.err().unwrap();
        assert!(matches!(boom, EngineError::Backend { .. }), "{boom}");
        // The thread survives both.
        assert_eq!(synth.speak(request("ok", 1.0)).await.unwrap().sentences, 1);
    }

    #[tokio::test]
    async fn admission_holds_until_the_stream_is_dropped() {
        let synth = start(&[]).await;
        let a = synth.speak(request("a", 1.0)).await.unwrap();
        let _b = synth.speak(request("b", 1.0)).await.unwrap();
        assert!(matches!(synth.speak(request("c", 1.0)).await, Err(EngineError::Overloaded { .. })));
        drop(a);
        assert!(synth.speak(request("c", 1.0)).await.is_ok());
    }
}
