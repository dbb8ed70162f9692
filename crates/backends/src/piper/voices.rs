//! Piper voices on ONNX Runtime: every `.onnx` + `.onnx.json` pair in a model's folders is a
//! voice, loaded as an `ort` session on the model's owner thread. `rescan` picks up voices
//! dropped into (or removed from) those folders without a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use hearth_engine::synthesize::{SpeechSynthesizer, VoiceInfo};
use hearth_engine::{BoxError, Device};
use ort::environment::Environment;

use crate::onnx::onnx_environment;
use ort::session::Session;
use ort::value::Tensor;

use super::{sentences, ClausePhonemizer, PiperConfig};
use crate::error::BackendError;

/// How a model's voices are found and run.
#[derive(Clone, Debug)]
pub struct PiperOptions {
    pub device: Device,
    /// `libonnxruntime.so` (loaded once per process; the first path wins).
    pub onnxruntime: PathBuf,
    /// Folders whose voices are served: the model's own, then its voices folder. A voice in a
    /// later folder with the same name as an earlier one is ignored. The first folder's voices
    /// must load; a broken voice elsewhere is logged and skipped.
    pub folders: Vec<PathBuf>,
    /// ONNX Runtime's intra-op threads; `None`: its default.
    pub threads: Option<usize>,
    /// Noise scale and width replacing every voice's own (`None`: the voice's).
    pub noise_scale: Option<f32>,
    pub noise_w: Option<f32>,
}

struct Voice {
    config: PiperConfig,
    graph: Graph,
    model: PathBuf,
    modified: Option<SystemTime>,
    /// The raw (unscaled) peak of the last sentence this voice made whole: part of the gain of a
    /// sentence sent in pieces, whose own peak is not known when its first piece goes out.
    recent_peak: f32,
}

/// How a voice's graph runs: whole, or cut before its vocoder ([`super::split`]) so a sentence
/// can be made in pieces.
enum Graph {
    Whole(Session),
    Halves(Halves),
}

struct Halves {
    /// Text to latent frames (and a speaker embedding on multi-speaker voices).
    encoder: Session,
    /// Latent frames to audio.
    decoder: Session,
    /// The tensors crossing the cut, the latent first.
    boundary: Vec<String>,
    /// Audio samples per latent frame (256 for Piper's vocoder).
    hop: usize,
    /// Latent frames of context decoded on each side of a piece (one of
    /// [`PIECE_CONTEXT_FRAMES`]).
    context: usize,
}

/// Latent frames decoded on each side of a piece and thrown away, so the piece is the audio the
/// whole sentence would give: the least of these that reproduces the whole graph when the voice
/// loads (Piper's vocoder sees about 13 frames each way: its convolutions' reach).
const PIECE_CONTEXT_FRAMES: [usize; 4] = [12, 16, 24, 48];
/// The first piece of a sentence: about this much audio.
const FIRST_PIECE_SECONDS: f32 = 0.3;
/// Symbols in the sentence a voice's halves are checked on.
const PROBE_SYMBOLS: usize = 48;

pub struct PiperVoices {
    options: PiperOptions,
    environment: Environment,
    phonemizer: Box<dyn ClausePhonemizer + Send>,
    /// By file stem.
    voices: BTreeMap<String, Voice>,
}

fn ort_error(path: &Path, error: impl std::fmt::Display) -> BackendError {
    BackendError::Unsupported(format!("{}: {error}", path.display()))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl PiperVoices {
    /// Loads every voice in `options.folders`, phonemizing with espeak-ng.
    #[cfg(feature = "espeak")]
    pub fn load(options: PiperOptions) -> Result<Self, BackendError> {
        let espeak = super::espeak::Espeak::global()?;
        Self::with_phonemizer(options, Box::new(espeak))
    }

    /// Without espeak-ng this build cannot phonemize a Piper voice.
    #[cfg(not(feature = "espeak"))]
    pub fn load(_options: PiperOptions) -> Result<Self, BackendError> {
        Err(BackendError::Unsupported(
            "this Hearth was built without the `espeak` feature, which Piper voices need for phonemes \
             (build with `--features tts`)"
                .into(),
        ))
    }

    pub fn with_phonemizer(
        options: PiperOptions,
        phonemizer: Box<dyn ClausePhonemizer + Send>,
    ) -> Result<Self, BackendError> {
        let environment = onnx_environment(&options.onnxruntime)?;
        let mut voices = PiperVoices { options, environment, phonemizer, voices: BTreeMap::new() };
        voices.scan(true)?;
        if voices.voices.is_empty() {
            let folders: Vec<String> =
                voices.options.folders.iter().map(|f| f.display().to_string()).collect();
            return Err(BackendError::Missing {
                dir: voices.options.folders.first().cloned().unwrap_or_default(),
                what: format!("Piper voice (`*.onnx` with its `.onnx.json`) in {}", folders.join(", ")),
            });
        }
        Ok(voices)
    }

    fn builder(&self, model: &Path) -> Result<ort::session::builder::SessionBuilder, BackendError> {
        let mut builder = Session::builder(&self.environment).map_err(|e| ort_error(model, e))?;
        // ONNX Runtime's process-wide thread pool (`crate::onnx`), unless the model asks for a
        // thread count of its own.
        if let Some(threads) = self.options.threads {
            builder = builder.with_independent_thread_pool().map_err(|e| ort_error(model, e))?;
            builder = builder.with_intra_threads(threads).map_err(|e| ort_error(model, e))?;
        }
        match self.options.device {
            Device::Cuda(ordinal) => {
                let cuda = ort::ep::CUDA::default().with_device_id(ordinal as i32).build().error_on_failure();
                builder = builder.with_execution_providers([cuda]).map_err(|e| ort_error(model, e))?;
            }
            Device::Metal => {
                return Err(BackendError::Unsupported(
                    "Piper voices run on ONNX Runtime, which Hearth uses on the CPU or CUDA; set `device = \"cpu\"`"
                        .into(),
                ))
            }
            Device::Auto | Device::Cpu => {}
        }
        // No memory pattern: every sentence is a new input shape, for which ONNX Runtime would plan
        // and keep allocations (joe-medium over 40 sentences: peak 276 → 239 MiB, the same speed).
        builder.with_memory_pattern(false).map_err(|e| ort_error(model, e))
    }

    fn session(&self, model: &Path) -> Result<Session, BackendError> {
        self.builder(model)?.commit_from_file(model).map_err(|e| ort_error(model, e))
    }

    /// The voice's graph cut before its vocoder, when it is a Piper graph and the halves give the
    /// whole graph's audio on a probe sentence (noise off), whole and in pieces; the whole graph
    /// otherwise.
    fn halves(&self, model: &Path, mut whole: Session, config: &PiperConfig) -> Result<Graph, BackendError> {
        // A probe of the voice's first 48 symbols: a sentence of a hundred or so latent frames
        // (longer would grow ONNX Runtime's arena, which keeps its peak, for nothing).
        let mut ids: Vec<i64> = config.phoneme_id_map.values().flatten().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids.truncate(PROBE_SYMBOLS);
        let speaker = (config.num_speakers > 1).then_some(0);
        let scales = [0.0, 1.0, 0.0];
        let reference = match run_whole(&mut whole, &ids, scales, speaker) {
            Ok(reference) => reference,
            Err(error) => {
                tracing::warn!(model = %model.display(), %error, "the voice failed on a probe sentence; it runs whole");
                return Ok(Graph::Whole(whole));
            }
        };
        // The weights are held once: the whole graph goes before its halves are made.
        drop(whole);
        let attempt = || -> Result<Option<Halves>, BoxError> {
            let split = match super::split::split_vits(&std::fs::read(model)?)? {
                Some(split) => split,
                None => return Ok(None),
            };
            // The halves run one after the other on the process-wide thread pool. With pools of
            // their own (a model's `threads`), the text half (thousands of small operators) does
            // not spin after its run, so its idle threads leave the cores to the vocoder's (both
            // spinning: 1.6× slower on 2 cores).
            let own_pools = self.options.threads.is_some();
            let half = |bytes: Vec<u8>, spin: bool| -> Result<Session, BackendError> {
                let mut builder = self.builder(model)?;
                if own_pools {
                    builder = builder.with_intra_op_spinning(spin).map_err(|e| ort_error(model, e))?;
                }
                builder.commit_from_memory(&bytes).map_err(|e| ort_error(model, e))
            };
            let mut halves = Halves {
                encoder: half(split.encoder, false)?,
                decoder: half(split.decoder, true)?,
                boundary: split.boundary,
                hop: 0,
                context: 0,
            };
            let latent = halves.encode(&ids, scales, speaker)?;
            let frames = latent.frames();
            let decoded = halves.decode(&latent, 0, frames)?;
            if frames == 0 || decoded.len() % frames != 0 {
                return Ok(None);
            }
            halves.hop = decoded.len() / frames;
            let peak = reference.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            let worst = |got: &[f32]| {
                if got.len() != reference.len() {
                    return f32::INFINITY;
                }
                got.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / peak
            };
            let whole_error = worst(&decoded);
            if whole_error > 1e-4 {
                tracing::warn!(model = %model.display(), whole_error, "the voice's halves do not reproduce it; it runs whole");
                return Ok(None);
            }
            // The least context that makes a seam exact (the vocoder's reach), among a few.
            let first = frames / 3;
            for context in PIECE_CONTEXT_FRAMES {
                halves.context = context;
                let mut pieces = halves.piece(&latent, 0, first)?;
                pieces.extend(halves.piece(&latent, first, frames)?);
                let pieces_error = worst(&pieces);
                if pieces_error <= 1e-4 {
                    tracing::debug!(model = %model.display(), frames, context, whole_error, pieces_error, "vocoder split checked");
                    return Ok(Some(halves));
                }
            }
            tracing::warn!(model = %model.display(), "the voice's vocoder reaches further than 48 frames; it runs whole");
            Ok(None)
        };
        match attempt() {
            Ok(Some(halves)) => return Ok(Graph::Halves(halves)),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(model = %model.display(), %error, "could not cut the voice's graph; it runs whole")
            }
        }
        Ok(Graph::Whole(self.session(model)?))
    }

    fn load_voice(&self, model: &Path) -> Result<Voice, BackendError> {
        let mut json = model.as_os_str().to_owned();
        json.push(".json");
        let mut config = PiperConfig::read(Path::new(&json))?;
        if let Some(scale) = self.options.noise_scale {
            config.inference.noise_scale = scale;
        }
        if let Some(width) = self.options.noise_w {
            config.inference.noise_w = width;
        }
        config.espeak_voice().map_err(|e| ort_error(model, e))?;
        let session = self.session(model)?;
        check_inputs(model, &session, config.num_speakers > 1)?;
        // On the CPU a sentence's first piece is sent before the rest is made.
        let graph = match self.options.device {
            Device::Cuda(_) => Graph::Whole(session),
            _ => self.halves(model, session, &config)?,
        };
        Ok(Voice { config, graph, model: model.to_path_buf(), modified: modified(model), recent_peak: 0.0 })
    }

    /// Finds voices: new or changed files are (re)loaded, vanished ones dropped. `strict`: a
    /// voice in the first folder that fails to load is an error.
    fn scan(&mut self, strict: bool) -> Result<(), BackendError> {
        let mut seen = BTreeMap::new();
        for (i, folder) in self.options.folders.iter().enumerate() {
            let entries = match std::fs::read_dir(folder) {
                Ok(entries) => entries,
                Err(source) if i == 0 => return Err(BackendError::Io { path: folder.clone(), source }),
                Err(error) => {
                    tracing::warn!(folder = %folder.display(), %error, "cannot read the voices folder");
                    continue;
                }
            };
            let mut models: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
                .filter(|p| {
                    let mut json = p.as_os_str().to_owned();
                    json.push(".json");
                    Path::new(&json).is_file()
                })
                .collect();
            models.sort();
            for model in models {
                let Some(stem) = model.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
                    continue;
                };
                seen.entry(stem).or_insert((model, i == 0));
            }
        }
        self.voices.retain(|stem, voice| seen.get(stem).is_some_and(|(path, _)| *path == voice.model));
        for (stem, (model, first)) in seen {
            if self.voices.get(&stem).is_some_and(|v| v.modified == modified(&model)) {
                continue;
            }
            match self.load_voice(&model) {
                Ok(voice) => {
                    tracing::info!(voice = %stem, path = %model.display(), "Piper voice loaded");
                    self.voices.insert(stem, voice);
                }
                Err(error) if strict && first => return Err(error),
                Err(error) => {
                    tracing::warn!(voice = %stem, %error, "Piper voice skipped");
                    self.voices.remove(&stem);
                }
            }
        }
        Ok(())
    }

    /// The voice and speaker id a request's voice id names.
    fn find(&mut self, id: &str) -> Result<(&mut Voice, Option<i64>), BoxError> {
        let (stem, speaker) = match id.split_once(':') {
            Some((stem, speaker)) => (stem, Some(speaker)),
            None => (id, None),
        };
        let voice = self.voices.get_mut(stem).ok_or_else(|| format!("no voice `{id}`"))?;
        let speaker = match (speaker, voice.config.num_speakers > 1) {
            (Some(name), true) => Some(
                *voice
                    .config
                    .speaker_id_map
                    .get(name)
                    .ok_or_else(|| format!("voice `{stem}` has no speaker `{name}`"))?,
            ),
            (Some(_), false) => return Err(format!("voice `{stem}` has one speaker").into()),
            (None, true) => Some(0),
            (None, false) => None,
        };
        Ok((voice, speaker))
    }
}

impl SpeechSynthesizer for PiperVoices {
    fn voices(&self) -> Vec<VoiceInfo> {
        let mut all = Vec::new();
        for (stem, voice) in &self.voices {
            let info = |id: String| VoiceInfo {
                id,
                language: voice.config.language.as_ref().map(|l| l.code.clone()).unwrap_or_else(|| {
                    voice.config.espeak.as_ref().map(|e| e.voice.clone()).unwrap_or_default()
                }),
                sample_rate_hz: voice.config.audio.sample_rate,
                quality: voice.config.audio.quality.clone(),
            };
            all.push(info(stem.clone()));
            if voice.config.num_speakers > 1 {
                all.extend(
                    voice.config.speaker_id_map.keys().map(|speaker| info(format!("{stem}:{speaker}"))),
                );
            }
        }
        all
    }

    fn sentences(&mut self, voice: &str, text: &str) -> Result<Vec<Vec<i64>>, BoxError> {
        let (found, _) = self.find(voice)?;
        let espeak_voice = found.config.espeak_voice()?.to_string();
        let config = found.config.clone();
        let clauses = self.phonemizer.clauses(&espeak_voice, text)?;
        Ok(sentences(&clauses).iter().map(|phonemes| config.ids(phonemes)).collect())
    }

    fn render(&mut self, voice: &str, symbols: &[i64], speed: f32) -> Result<Vec<f32>, BoxError> {
        let (found, speaker) = self.find(voice)?;
        let scales = found.config.inference;
        let scales = [scales.noise_scale, scales.length_scale / speed, scales.noise_w];
        let raw = match &mut found.graph {
            Graph::Whole(session) => run_whole(session, symbols, scales, speaker)?,
            Graph::Halves(halves) => {
                let latent = halves.encode(symbols, scales, speaker)?;
                halves.decode(&latent, 0, latent.frames())?
            }
        };
        let peak = peak(&raw)?;
        found.recent_peak = peak;
        Ok(scaled(&raw, peak))
    }

    /// On a voice cut before its vocoder: the first [`FIRST_PIECE_SECONDS`] of audio, then the
    /// rest. Piper scales each sentence to full range by its peak, which is not known when the
    /// first piece goes out; a sentence in pieces is scaled by the larger of its first piece's
    /// peak and the voice's last sentence's, and clipped where it goes above that.
    fn render_pieces(
        &mut self,
        voice: &str,
        symbols: &[i64],
        speed: f32,
        piece: &mut dyn FnMut(Vec<f32>) -> bool,
    ) -> Result<(), BoxError> {
        if !matches!(self.find(voice)?.0.graph, Graph::Halves(_)) {
            let samples = self.render(voice, symbols, speed)?;
            piece(samples);
            return Ok(());
        }
        let (found, speaker) = self.find(voice)?;
        let rate = found.config.audio.sample_rate as f32;
        let Graph::Halves(halves) = &mut found.graph else {
            return Err("the voice's graph is not cut".into());
        };
        let scales = found.config.inference;
        let scales = [scales.noise_scale, scales.length_scale / speed, scales.noise_w];
        let latent = halves.encode(symbols, scales, speaker)?;
        let frames = latent.frames();
        let first = ((FIRST_PIECE_SECONDS * rate / halves.hop as f32).ceil() as usize).max(1);
        if frames <= first + halves.context {
            let raw = halves.decode(&latent, 0, frames)?;
            let peak = peak(&raw)?;
            found.recent_peak = peak;
            piece(scaled(&raw, peak));
            return Ok(());
        }
        let head = halves.piece(&latent, 0, first)?;
        let head_peak = peak(&head)?;
        let gain_peak = head_peak.max(found.recent_peak);
        if !piece(scaled(&head, gain_peak)) {
            return Ok(());
        }
        let rest = halves.piece(&latent, first, frames)?;
        let rest_peak = peak(&rest)?;
        found.recent_peak = head_peak.max(rest_peak);
        piece(scaled(&rest, gain_peak));
        Ok(())
    }

    fn rescan(&mut self) -> Result<(), BoxError> {
        Ok(self.scan(false)?)
    }
}

/// A Piper model takes `input`, `input_lengths` and `scales`, and `sid` exactly when its config
/// declares more than one speaker; a voice whose files disagree is refused when it loads.
fn check_inputs(model: &Path, session: &Session, multi_speaker: bool) -> Result<(), BackendError> {
    let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
    for wanted in ["input", "input_lengths", "scales"] {
        if !names.contains(&wanted) {
            return Err(ort_error(
                model,
                format!("not a Piper voice: it has no `{wanted}` input (inputs: {names:?})"),
            ));
        }
    }
    match (multi_speaker, names.contains(&"sid")) {
        (true, false) => {
            Err(ort_error(model, "its config declares several speakers, but the model has no `sid` input"))
        }
        (false, true) => {
            Err(ort_error(model, "the model takes a speaker (`sid`), but its config declares one speaker"))
        }
        _ => Ok(()),
    }
}

/// A Piper graph's inputs for one sentence.
fn piper_inputs(
    ids: &[i64],
    scales: [f32; 3],
    speaker: Option<i64>,
) -> Result<Vec<(std::borrow::Cow<'static, str>, ort::session::SessionInputValue<'static>)>, BoxError> {
    let mut inputs = ort::inputs![
        "input" => Tensor::from_array(([1usize, ids.len()], ids.to_vec()))?,
        "input_lengths" => Tensor::from_array(([1usize], vec![ids.len() as i64]))?,
        "scales" => Tensor::from_array(([3usize], scales.to_vec()))?,
    ];
    if let Some(speaker) = speaker {
        inputs.push(("sid".into(), Tensor::from_array(([1usize], vec![speaker]))?.into()));
    }
    Ok(inputs)
}

/// The whole graph's audio for one sentence, unscaled.
fn run_whole(
    session: &mut Session,
    ids: &[i64],
    scales: [f32; 3],
    speaker: Option<i64>,
) -> Result<Vec<f32>, BoxError> {
    let outputs = session.run(piper_inputs(ids, scales, speaker)?)?;
    let (_, audio) = outputs[0].try_extract_tensor::<f32>()?;
    Ok(audio.to_vec())
}

/// The largest magnitude; an error for non-finite samples.
fn peak(audio: &[f32]) -> Result<f32, BoxError> {
    let peak = audio.iter().fold(0f32, |m, s| m.max(s.abs()));
    if !peak.is_finite() {
        return Err("the voice model produced non-finite samples".into());
    }
    Ok(peak)
}

/// `audio / peak`, clipped to [-1, 1] (silence stays silence).
fn scaled(audio: &[f32], peak: f32) -> Vec<f32> {
    if peak < 1e-8 {
        return vec![0.0; audio.len()];
    }
    audio.iter().map(|s| (s / peak).clamp(-1.0, 1.0)).collect()
}

/// What crosses a voice's cut for one sentence: the latent `[1, channels, frames]` and the other
/// boundary tensors (a speaker embedding), as the first half gave them.
struct Latent {
    tensors: Vec<(Vec<usize>, Vec<f32>)>,
}

impl Latent {
    fn frames(&self) -> usize {
        self.tensors[0].0.last().copied().unwrap_or(0)
    }
}

impl Halves {
    fn encode(&mut self, ids: &[i64], scales: [f32; 3], speaker: Option<i64>) -> Result<Latent, BoxError> {
        let outputs = self.encoder.run(piper_inputs(ids, scales, speaker)?)?;
        let tensors = self
            .boundary
            .iter()
            .map(|name| {
                let value =
                    outputs.get(name).ok_or_else(|| format!("the encoder half has no output `{name}`"))?;
                let (shape, data) = value.try_extract_tensor::<f32>()?;
                let shape: Vec<usize> = shape.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect();
                Ok((shape, data.to_vec()))
            })
            .collect::<Result<Vec<_>, BoxError>>()?;
        if tensors[0].0.len() != 3 || tensors[0].0[0] != 1 {
            return Err(format!("the latent has shape {:?}, not [1, channels, frames]", tensors[0].0).into());
        }
        Ok(Latent { tensors })
    }

    /// The vocoder on latent frames `from..to`, unscaled.
    fn decode(&mut self, latent: &Latent, from: usize, to: usize) -> Result<Vec<f32>, BoxError> {
        let (shape, data) = &latent.tensors[0];
        let (channels, frames) = (shape[1], shape[2]);
        let window: Vec<f32> =
            (0..channels).flat_map(|c| data[c * frames + from..c * frames + to].iter().copied()).collect();
        let mut inputs: Vec<(std::borrow::Cow<'static, str>, ort::session::SessionInputValue<'static>)> =
            vec![(
                self.boundary[0].clone().into(),
                Tensor::from_array(([1usize, channels, to - from], window))?.into(),
            )];
        for (name, (shape, data)) in self.boundary.iter().zip(&latent.tensors).skip(1) {
            inputs.push((name.clone().into(), Tensor::from_array((shape.clone(), data.clone()))?.into()));
        }
        let outputs = self.decoder.run(inputs)?;
        let (_, audio) = outputs[0].try_extract_tensor::<f32>()?;
        Ok(audio.to_vec())
    }

    /// The audio of latent frames `from..to`, decoded with `context` frames on each side (where
    /// there are frames) and trimmed back to its own.
    fn piece(&mut self, latent: &Latent, from: usize, to: usize) -> Result<Vec<f32>, BoxError> {
        let frames = latent.frames();
        let (lo, hi) = (from.saturating_sub(self.context), (to + self.context).min(frames));
        let audio = self.decode(latent, lo, hi)?;
        let hop = if self.hop > 0 { self.hop } else { audio.len() / (hi - lo).max(1) };
        let start = (from - lo) * hop;
        Ok(audio[start.min(audio.len())..(start + (to - from) * hop).min(audio.len())].to_vec())
    }
}
