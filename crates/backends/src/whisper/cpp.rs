//! whisper.cpp as a second Whisper backend (the `whisper-cpp` feature): a ggml model file run by
//! whisper.cpp's own encoder and decoder through whisper-rs's bindings. It implements the same
//! [`SpeechModel`] as the candle model, so Hearth's decoding rules (timestamps, temperature
//! fallback, no-speech detection, language detection, prompts) drive both alike: whisper.cpp
//! computes the encoder output and the logits, Hearth decides every token.
//!
//! whisper-rs's safe `WhisperState::set_mel` assumes 80 mel bins, so the calls go through its raw
//! API (`whisper_rs::whisper_rs_sys`), wrapped here: one context (the weights) and one state (the
//! mel, the cross-attention K/V of the window and the decoder's KV cache) per model, both used only
//! by the model's owner thread.

use std::ffi::{c_int, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use hearth_engine::transcribe::{SpeechModel, WhisperVocab};
use whisper_rs::whisper_rs_sys as sys;

use super::WINDOW_FRAMES;
use crate::{BackendError, ModelsRoot};

/// A ggml Whisper loaded by whisper.cpp, with its decoding state.
pub struct WhisperCpp {
    context: NonNull<sys::whisper_context>,
    state: NonNull<sys::whisper_state>,
    threads: c_int,
    n_mels: usize,
    n_vocab: usize,
    n_text_ctx: usize,
    text_layers: (usize, usize),
    /// Tokens in the decoder's KV cache.
    n_past: usize,
    /// Whether a window has been encoded.
    encoded: bool,
}

// SAFETY: whisper.cpp's context and state are plain heap objects with no thread affinity; this
// struct owns both, and `&mut self` on every call keeps them to one thread at a time.
unsafe impl Send for WhisperCpp {}

impl Drop for WhisperCpp {
    fn drop(&mut self) {
        // SAFETY: both pointers came from whisper.cpp's constructors and are freed once, the
        // state (which refers to the context) first.
        unsafe {
            sys::whisper_free_state(self.state.as_ptr());
            sys::whisper_free(self.context.as_ptr());
        }
    }
}

/// What a loaded ggml Whisper is, for the loader's log line.
#[derive(Debug, Clone)]
pub struct LoadedWhisperCpp {
    pub file: PathBuf,
    pub n_mels: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub width: usize,
    /// ggml's file type (0 f32, 1 f16, 7 q8_0, 8 q5_0, …).
    pub ftype: i32,
    pub threads: usize,
}

fn routed_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // whisper.cpp and ggml print their progress to stderr unless a hook takes it: send it to
    // `tracing` (target `whisper_rs`) instead.
    ONCE.call_once(whisper_rs::install_logging_hooks);
}

impl WhisperCpp {
    /// Loads a ggml Whisper file (whisper.cpp's format: `ggml-base.bin` and the like) on the CPU,
    /// to run with `threads` threads.
    pub fn load(file: &Path, threads: usize) -> Result<Self, BackendError> {
        routed_logs();
        let bad = |why: String| BackendError::Unsupported(format!("{}: {why}", file.display()));
        let path = CString::new(file.as_os_str().as_encoded_bytes())
            .map_err(|_| bad("the path contains a NUL byte".into()))?;
        // SAFETY: plain constructors; every pointer is checked before use.
        unsafe {
            let mut params = sys::whisper_context_default_params();
            params.use_gpu = false;
            let context =
                NonNull::new(sys::whisper_init_from_file_with_params_no_state(path.as_ptr(), params))
                    .ok_or_else(|| bad("whisper.cpp cannot load it as a ggml Whisper model".into()))?;
            let state = match NonNull::new(sys::whisper_init_state(context.as_ptr())) {
                Some(state) => state,
                None => {
                    sys::whisper_free(context.as_ptr());
                    return Err(bad("whisper.cpp cannot allocate its decoding state".into()));
                }
            };
            let ctx = context.as_ptr();
            let count = |n: c_int| usize::try_from(n).unwrap_or(0);
            let model = WhisperCpp {
                context,
                state,
                threads: c_int::try_from(threads.max(1)).unwrap_or(c_int::MAX),
                n_mels: count(sys::whisper_model_n_mels(ctx)),
                n_vocab: count(sys::whisper_model_n_vocab(ctx)),
                n_text_ctx: count(sys::whisper_model_n_text_ctx(ctx)),
                text_layers: (
                    count(sys::whisper_model_n_text_layer(ctx)),
                    count(sys::whisper_model_n_text_head(ctx)),
                ),
                n_past: 0,
                encoded: false,
            };
            if count(sys::whisper_model_n_audio_ctx(ctx)) * 2 != WINDOW_FRAMES {
                return Err(bad(format!(
                    "{} audio positions (Whisper has {})",
                    sys::whisper_model_n_audio_ctx(ctx),
                    WINDOW_FRAMES / 2
                )));
            }
            Ok(model)
        }
    }

    pub fn describe(&self, file: &Path) -> LoadedWhisperCpp {
        let ctx = self.context.as_ptr();
        // SAFETY: getters of a live context.
        unsafe {
            LoadedWhisperCpp {
                file: file.to_owned(),
                n_mels: self.n_mels,
                encoder_layers: sys::whisper_model_n_audio_layer(ctx) as usize,
                decoder_layers: self.text_layers.0,
                width: sys::whisper_model_n_text_state(ctx) as usize,
                ftype: sys::whisper_model_ftype(ctx),
                threads: self.threads as usize,
            }
        }
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }
}

impl SpeechModel for WhisperCpp {
    fn n_mels(&self) -> usize {
        self.n_mels
    }

    fn n_text_ctx(&self) -> usize {
        self.n_text_ctx
    }

    fn encode(&mut self, mel: &[f32]) -> Result<(), hearth_engine::BoxError> {
        if mel.len() != self.n_mels * WINDOW_FRAMES {
            return Err(format!(
                "a window of {} log-mel values, expected {} bins × {WINDOW_FRAMES} frames",
                mel.len(),
                self.n_mels
            )
            .into());
        }
        self.encoded = false;
        self.n_past = 0;
        // SAFETY: `mel` holds n_mels × WINDOW_FRAMES floats, bin-major as whisper.cpp keeps its
        // own; whisper.cpp copies them.
        let status = unsafe {
            sys::whisper_set_mel_with_state(
                self.context.as_ptr(),
                self.state.as_ptr(),
                mel.as_ptr(),
                WINDOW_FRAMES as c_int,
                self.n_mels as c_int,
            )
        };
        if status != 0 {
            return Err(format!("whisper.cpp refused the log-mel window (status {status})").into());
        }
        // SAFETY: live context and state, mel set above.
        let status = unsafe {
            sys::whisper_encode_with_state(self.context.as_ptr(), self.state.as_ptr(), 0, self.threads)
        };
        if status != 0 {
            return Err(format!("whisper.cpp's encoder failed (status {status})").into());
        }
        self.encoded = true;
        Ok(())
    }

    fn reset(&mut self) {
        // The next decode passes n_past 0, which drops the cached positions.
        self.n_past = 0;
    }

    fn decode(&mut self, tokens: &[u32]) -> Result<Vec<f32>, hearth_engine::BoxError> {
        if !self.encoded {
            return Err("decode before encode".into());
        }
        if tokens.is_empty() {
            return Err("decode of no tokens".into());
        }
        if self.n_past + tokens.len() > self.n_text_ctx {
            return Err(format!(
                "the decoder context holds {} tokens, asked for {}",
                self.n_text_ctx,
                self.n_past + tokens.len()
            )
            .into());
        }
        let ids = tokens
            .iter()
            .map(|&t| {
                sys::whisper_token::try_from(t)
                    .ok()
                    .filter(|&id| (id as usize) < self.n_vocab)
                    .ok_or_else(|| format!("token {t} is outside the vocabulary"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: `ids` outlives the call; n_past + len fits the context (checked above).
        let status = unsafe {
            sys::whisper_decode_with_state(
                self.context.as_ptr(),
                self.state.as_ptr(),
                ids.as_ptr(),
                ids.len() as c_int,
                self.n_past as c_int,
                self.threads,
            )
        };
        if status != 0 {
            // The cache may hold part of the batch now: start the next attempt from scratch.
            self.n_past = 0;
            return Err(format!("whisper.cpp's decoder failed (status {status})").into());
        }
        self.n_past += ids.len();
        // SAFETY: after a successful decode the state holds one row of n_vocab logits per token
        // of the batch, filled for the last (the only one whisper.cpp computes logits for).
        let logits = unsafe {
            let ptr = sys::whisper_get_logits_from_state(self.state.as_ptr());
            if ptr.is_null() {
                return Err("whisper.cpp returned no logits".into());
            }
            std::slice::from_raw_parts(ptr.add((ids.len() - 1) * self.n_vocab), self.n_vocab).to_vec()
        };
        Ok(logits)
    }

    // whisper.cpp does not hand out its cross-attention weights, so there are no word
    // timestamps from this backend (`cross_attention`'s default says so).
    fn text_layers(&self) -> (usize, usize) {
        self.text_layers
    }
}

/// The ggml file of a folder: `file` when the config names one, else its only `ggml*.bin`.
pub fn model_file(dir: &Path, file: Option<&str>, root: &ModelsRoot) -> Result<PathBuf, BackendError> {
    let missing = |what: String| BackendError::Missing { dir: dir.to_owned(), what };
    if let Some(name) = file {
        return root.join(dir, name)?.filter(|p| p.is_file()).ok_or_else(|| missing(name.to_string()));
    }
    let entries = std::fs::read_dir(dir).map_err(|source| BackendError::Io { path: dir.into(), source })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(super::is_ggml_file_name)
        })
        .collect();
    found.sort();
    match found.len() {
        0 => Err(missing("a ggml Whisper file (ggml*.bin)".into())),
        1 => {
            let name = found[0].file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            root.join(dir, &name)?.ok_or_else(|| missing(name))
        }
        _ => Err(BackendError::Unsupported(format!(
            "{} holds several ggml files ({}): name one with `file`",
            dir.display(),
            found.iter().filter_map(|p| p.file_name()?.to_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Loads the ggml Whisper in `dir` (which must lie inside `root`): the ggml file, and the
/// vocabulary from the folder's `tokenizer.json` and `config.json` as for a CTranslate2 folder
/// (ggml files carry the tokens' bytes but not the BPE merges a `prompt` is encoded with).
pub fn load(
    dir: &Path,
    file: Option<&str>,
    root: &ModelsRoot,
    threads: usize,
) -> Result<(WhisperCpp, WhisperVocab, LoadedWhisperCpp), BackendError> {
    let missing = |what: &str| BackendError::Missing { dir: dir.to_owned(), what: what.into() };
    let dir = root.existing(dir)?.ok_or_else(|| missing("anything (it does not exist)"))?;
    let file = model_file(&dir, file, root)?;
    root.join(&dir, "tokenizer.json")?.filter(|p| p.is_file()).ok_or_else(|| missing("tokenizer.json"))?;
    root.join(&dir, "config.json")?;
    let vocab = super::read_vocab(&dir)?;
    let model = WhisperCpp::load(&file, threads)?;
    // Whisper's vocabulary ends with its 1501 timestamps (0.00 s to 30.00 s).
    if vocab.timestamp_begin as usize + 1501 != model.n_vocab {
        return Err(BackendError::Unsupported(format!(
            "{}: the ggml model has {} tokens, but its folder's tokenizer.json puts the timestamps at {}: \
             they are not the same Whisper",
            file.display(),
            model.n_vocab,
            vocab.timestamp_begin
        )));
    }
    let loaded = model.describe(&file);
    Ok((model, vocab, loaded))
}
