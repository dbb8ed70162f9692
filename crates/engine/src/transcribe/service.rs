//! The `Transcribe` capability and its service: one owner thread per speech model behind a
//! bounded queue. An upload is decoded, resampled and turned into log-mel features on the
//! preprocessing pool (bounded, off the runtime, refused at once when busy); the job the owner
//! thread gets is those features, over which it runs the decoding rules window by window, checking
//! between windows whether its client is still there.

use std::sync::Arc;
use std::time::Instant;

use hearth_audio::mel::MelSpectrogram;
use hearth_audio::{decode_to_rate, AudioError, DecodeLimits, LogMel, MelConfig, WHISPER_SAMPLE_RATE_HZ};
use tokio::sync::{mpsc, oneshot};

use super::decoding::{transcribe, DecodeOptions, Segment, Transcript};
use super::{SpeechModel, WhisperVocab};
use crate::admission::Admission;
use crate::error::{panic_message, BoxError, EngineError};
use crate::owner::{Answer, Owner};
use crate::pool::BlockingPool;
use crate::queue::Priority;
use crate::BoxFuture;

/// One request: an uploaded file in any format [`hearth_audio::decode`] reads.
pub struct TranscribeRequest {
    pub audio: Vec<u8>,
    pub options: DecodeOptions,
    pub priority: Priority,
    /// Receives each segment as soon as it is decoded (for streamed responses).
    pub segments: Option<mpsc::UnboundedSender<Segment>>,
}

/// Samples per log-mel frame (10 ms at 16 kHz), and the padding after the audio: one window, so
/// the last window is as long as every other (OpenAI's `log_mel_spectrogram(padding=N_SAMPLES)`).
const HOP_SAMPLES: usize = 160;
const PAD_SAMPLES: usize = 480_000;

/// What the HTTP layer sees of a served speech model.
pub trait Transcribe: Send + Sync {
    /// Mel bins the model's features need.
    fn n_mels(&self) -> usize;
    /// Whether `code` is a language the model knows.
    fn knows_language(&self, code: &str) -> bool;
    /// The longest audio a request may hold.
    fn max_audio_secs(&self) -> f64;
    /// Whether the model can time words (`timestamp_granularities[]=word`).
    fn aligns_words(&self) -> bool;
    fn transcribe(&self, request: TranscribeRequest) -> BoxFuture<'_, Result<Transcript, EngineError>>;
}

#[derive(Debug, Clone)]
pub struct TranscriberOptions {
    pub queue_depth: usize,
    pub max_concurrent_requests: usize,
    pub max_audio_secs: f64,
}

struct Job {
    mel: LogMel,
    content_frames: usize,
    options: DecodeOptions,
    segments: Option<mpsc::UnboundedSender<Segment>>,
    reply: oneshot::Sender<Result<Transcript, EngineError>>,
}

impl Answer for Job {
    fn fail(self, error: EngineError) {
        let _ = self.reply.send(Err(error));
    }
}

pub struct Transcriber {
    model_id: Arc<str>,
    owner: Owner<Job>,
    admission: Admission,
    pool: Arc<BlockingPool>,
    mel: Arc<MelSpectrogram>,
    max_audio_secs: f64,
    languages: Vec<String>,
    aligns_words: bool,
}

impl Transcriber {
    /// Starts the owner thread and loads the model on it with `load`.
    pub async fn start<M, F>(
        model_id: Arc<str>,
        options: TranscriberOptions,
        pool: Arc<BlockingPool>,
        load: F,
    ) -> Result<Self, BoxError>
    where
        M: SpeechModel + 'static,
        F: FnOnce() -> Result<(M, WhisperVocab), BoxError> + Send + 'static,
    {
        let thread_model = Arc::clone(&model_id);
        let load = move || {
            let (model, vocab) = load()?;
            let info = (
                model.n_mels(),
                vocab.languages.iter().map(|(code, _)| code.clone()).collect::<Vec<_>>(),
                model.aligns_words(),
            );
            Ok(((model, vocab), info))
        };
        let run = move |(mut model, vocab): (M, WhisperVocab),
                        queue: Arc<crate::queue::JobQueue<Job>>,
                        life: Arc<crate::owner::Lifecycle>| {
            while let Some((_, job)) = queue.pop_wait() {
                if life.past_deadline() {
                    job.fail(life.shutting_down());
                    continue;
                }
                if job.reply.is_closed() {
                    continue; // the client left while the job waited
                }
                let Job { mel, content_frames, options, segments, reply } = job;
                let started = Instant::now();
                let cancelled = || reply.is_closed() || life.past_deadline();
                let mut on_segment = |segment: &Segment| {
                    if let Some(sender) = &segments {
                        let _ = sender.send(segment.clone());
                    }
                };
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    transcribe(
                        &mut model,
                        &vocab,
                        &mel,
                        content_frames,
                        &options,
                        &cancelled,
                        &mut on_segment,
                    )
                }));
                let answer = match result {
                    Ok(Ok(transcript)) => {
                        let labels = [("model", thread_model.to_string())];
                        metrics::histogram!("hearth_transcribe_seconds", &labels)
                            .record(started.elapsed().as_secs_f64());
                        metrics::counter!("hearth_transcribed_audio_seconds_total", &labels)
                            .increment(transcript.duration_secs.round() as u64);
                        Ok(transcript)
                    }
                    Ok(Err(error)) => {
                        tracing::error!(model = %thread_model, %error, "transcription failed");
                        Err(EngineError::Backend {
                            model: Arc::clone(&thread_model),
                            message: error.to_string(),
                        })
                    }
                    Err(panic) => {
                        let message = panic_message(&panic);
                        tracing::error!(model = %thread_model, cause = %message, "transcription panicked");
                        Err(EngineError::Backend { model: Arc::clone(&thread_model), message })
                    }
                };
                let _ = reply.send(answer);
            }
        };
        let (owner, (n_mels, languages, aligns_words)) =
            Owner::start(Arc::clone(&model_id), options.queue_depth, load, run).await?;
        let admission = Admission::new(Arc::clone(&model_id), options.max_concurrent_requests);
        let mel = Arc::new(MelSpectrogram::new(MelConfig::whisper(n_mels)));
        Ok(Transcriber {
            model_id,
            owner,
            admission,
            pool,
            mel,
            max_audio_secs: options.max_audio_secs,
            languages,
            aligns_words,
        })
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Requests admitted and not yet answered.
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

impl Transcribe for Transcriber {
    fn n_mels(&self) -> usize {
        self.mel.config().n_mels
    }

    fn max_audio_secs(&self) -> f64 {
        self.max_audio_secs
    }

    fn knows_language(&self, code: &str) -> bool {
        self.languages.iter().any(|l| l == code)
    }

    fn aligns_words(&self) -> bool {
        self.aligns_words
    }

    fn transcribe(&self, request: TranscribeRequest) -> BoxFuture<'_, Result<Transcript, EngineError>> {
        Box::pin(async move {
            let _permit = self.admission.try_admit()?;
            let TranscribeRequest { audio, options, priority, segments } = request;
            let (mel, limits) =
                (Arc::clone(&self.mel), DecodeLimits { max_duration_secs: self.max_audio_secs });
            let (mel, content_frames) = self
                .pool
                .run(priority, move |_| -> Result<_, AudioError> {
                    let decoded = decode_to_rate(&audio, &limits, WHISPER_SAMPLE_RATE_HZ)?;
                    drop(audio);
                    let content_frames = decoded.samples.len() / HOP_SAMPLES;
                    Ok((mel.log_mel(&decoded.samples, PAD_SAMPLES), content_frames))
                })
                .await?
                .map_err(EngineError::Audio)?;
            let (reply, answer) = oneshot::channel();
            self.owner.push(Job { mel, content_frames, options, segments, reply }, priority)?;
            answer.await.map_err(|_| EngineError::Internal {
                message: "the speech model's thread dropped a job".into(),
            })?
        })
    }
}
