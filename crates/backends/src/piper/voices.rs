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
    session: Session,
    model: PathBuf,
    modified: Option<SystemTime>,
}

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

    fn session(&self, model: &Path) -> Result<Session, BackendError> {
        let mut builder = Session::builder(&self.environment).map_err(|e| ort_error(model, e))?;
        if let Some(threads) = self.options.threads {
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
        let mut builder = builder.with_memory_pattern(false).map_err(|e| ort_error(model, e))?;
        builder.commit_from_file(model).map_err(|e| ort_error(model, e))
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
        Ok(Voice { config, session, model: model.to_path_buf(), modified: modified(model) })
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
        render(
            &mut found.session,
            symbols,
            [scales.noise_scale, scales.length_scale / speed, scales.noise_w],
            speaker,
        )
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

/// Runs a Piper model on one sentence's ids with `scales` (noise, length, noise width) and scales
/// the result to full range, as Piper does.
pub fn render(
    session: &mut Session,
    ids: &[i64],
    scales: [f32; 3],
    speaker: Option<i64>,
) -> Result<Vec<f32>, BoxError> {
    let mut inputs = ort::inputs![
        "input" => Tensor::from_array(([1usize, ids.len()], ids.to_vec()))?,
        "input_lengths" => Tensor::from_array(([1usize], vec![ids.len() as i64]))?,
        "scales" => Tensor::from_array(([3usize], scales.to_vec()))?,
    ];
    if let Some(speaker) = speaker {
        inputs.push(("sid".into(), Tensor::from_array(([1usize], vec![speaker]))?.into()));
    }
    let outputs = session.run(inputs)?;
    let (_, audio) = outputs[0].try_extract_tensor::<f32>()?;
    let peak = audio.iter().fold(0f32, |m, s| m.max(s.abs()));
    if !peak.is_finite() {
        return Err("the voice model produced non-finite samples".into());
    }
    if peak < 1e-8 {
        return Ok(vec![0.0; audio.len()]);
    }
    Ok(audio.iter().map(|s| (s / peak).clamp(-1.0, 1.0)).collect())
}
