//! Piper VITS voices: a `.onnx` model with its `.onnx.json` (sample rate, phoneme id map,
//! inference scales, speakers), phonemes from espeak-ng clause by clause, and the ids Piper feeds
//! its model (`^`, then each phoneme followed by the pad `_`, then `$`). Text is split into
//! sentences where espeak-ng's clauses end one, and punctuation is kept as Piper keeps it.
//!
//! The voice config and the phoneme-to-id rules are plain functions (tested without a model);
//! running the model needs the `onnx` feature, espeak phonemes the `espeak` feature.

#[cfg(feature = "espeak")]
pub mod espeak;
pub mod split;
#[cfg(feature = "onnx")]
mod voices;

#[cfg(feature = "onnx")]
pub use voices::{PiperOptions, PiperVoices};

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use unicode_normalization::UnicodeNormalization;

use crate::error::BackendError;

const PAD: &str = "_";
const BOS: &str = "^";
const EOS: &str = "$";

/// The parts of a Piper `.onnx.json` Hearth uses.
#[derive(Clone, Debug, Deserialize)]
pub struct PiperConfig {
    pub audio: AudioConfig,
    #[serde(default)]
    pub espeak: Option<EspeakConfig>,
    #[serde(default)]
    pub inference: InferenceConfig,
    #[serde(default = "default_phoneme_type")]
    pub phoneme_type: String,
    pub phoneme_id_map: BTreeMap<String, Vec<i64>>,
    #[serde(default)]
    pub num_speakers: usize,
    #[serde(default)]
    pub speaker_id_map: BTreeMap<String, i64>,
    #[serde(default)]
    pub language: Option<LanguageConfig>,
}

fn default_phoneme_type() -> String {
    "espeak".into()
}

#[derive(Clone, Debug, Deserialize)]
pub struct AudioConfig {
    pub sample_rate: u32,
    #[serde(default)]
    pub quality: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct EspeakConfig {
    pub voice: String,
}

#[derive(Clone, Copy, Debug, Deserialize)]
pub struct InferenceConfig {
    #[serde(default = "default_noise_scale")]
    pub noise_scale: f32,
    #[serde(default = "default_length_scale")]
    pub length_scale: f32,
    #[serde(default = "default_noise_w")]
    pub noise_w: f32,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig { noise_scale: default_noise_scale(), length_scale: 1.0, noise_w: default_noise_w() }
    }
}

fn default_noise_scale() -> f32 {
    0.667
}
fn default_length_scale() -> f32 {
    1.0
}
fn default_noise_w() -> f32 {
    0.8
}

#[derive(Clone, Debug, Deserialize)]
pub struct LanguageConfig {
    pub code: String,
}

impl PiperConfig {
    pub fn read(path: &Path) -> Result<Self, BackendError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| BackendError::Io { path: path.to_path_buf(), source })?;
        let config: PiperConfig = serde_json::from_str(&text)
            .map_err(|source| BackendError::Json { path: path.to_path_buf(), source })?;
        for symbol in [PAD, BOS, EOS] {
            if !config.phoneme_id_map.contains_key(symbol) {
                return Err(BackendError::Unsupported(format!(
                    "{}: the phoneme id map has no `{symbol}`",
                    path.display()
                )));
            }
        }
        if config.audio.sample_rate == 0 {
            return Err(BackendError::Unsupported(format!("{}: `audio.sample_rate` is 0", path.display())));
        }
        Ok(config)
    }

    /// The espeak-ng voice that phonemizes for this voice.
    pub fn espeak_voice(&self) -> Result<&str, BackendError> {
        match (self.phoneme_type.as_str(), &self.espeak) {
            ("espeak", Some(espeak)) => Ok(&espeak.voice),
            ("espeak", None) => {
                Err(BackendError::Unsupported("the voice config names no espeak voice".into()))
            }
            (other, _) => Err(BackendError::Unsupported(format!(
                "phoneme type `{other}` is not supported (Hearth phonemizes with espeak-ng)"
            ))),
        }
    }

    /// Phonemes (one string per id-map symbol) to the ids the model takes: `^ _ p1 _ p2 _ … $`.
    /// A phoneme the map lacks is skipped, as Piper skips it.
    pub fn ids(&self, phonemes: &[String]) -> Vec<i64> {
        let map = &self.phoneme_id_map;
        let mut ids = Vec::with_capacity(phonemes.len() * 2 + 3);
        ids.extend(&map[BOS]);
        ids.extend(&map[PAD]);
        for phoneme in phonemes {
            if let Some(found) = map.get(phoneme) {
                ids.extend(found);
                ids.extend(&map[PAD]);
            } else {
                tracing::debug!(phoneme, "phoneme missing from the voice's id map; skipped");
            }
        }
        ids.extend(&map[EOS]);
        ids
    }
}

/// The punctuation that ended a clause, which Piper keeps as a phoneme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Terminator {
    Period,
    Question,
    Exclamation,
    Comma,
    Colon,
    Semicolon,
}

impl Terminator {
    fn mark(self) -> char {
        match self {
            Self::Period => '.',
            Self::Question => '?',
            Self::Exclamation => '!',
            Self::Comma => ',',
            Self::Colon => ':',
            Self::Semicolon => ';',
        }
    }
}

/// One clause as espeak-ng phonemizes it: IPA with spaces between words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clause {
    pub phonemes: String,
    pub terminator: Option<Terminator>,
    pub end_of_sentence: bool,
}

/// Text to clauses (espeak-ng, or a test's stand-in).
pub trait ClausePhonemizer {
    fn clauses(&self, voice: &str, text: &str) -> Result<Vec<Clause>, String>;
}

/// Clauses to sentences of phonemes as Piper builds them: language-switch flags such as `(fr)`
/// dropped, the clause's punctuation appended (and a space after `,` `:` `;`), everything
/// decomposed (NFD) into single code points, a new sentence after each sentence-ending clause.
pub fn sentences(clauses: &[Clause]) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    let mut sentence: Vec<String> = Vec::new();
    for clause in clauses {
        let mut text = strip_language_flags(&clause.phonemes);
        if let Some(terminator) = clause.terminator {
            text.push(terminator.mark());
            if matches!(terminator, Terminator::Comma | Terminator::Colon | Terminator::Semicolon) {
                text.push(' ');
            }
        }
        sentence.extend(text.nfd().map(String::from));
        if clause.end_of_sentence && !sentence.is_empty() {
            all.push(std::mem::take(&mut sentence));
        }
    }
    if !sentence.is_empty() {
        all.push(sentence);
    }
    // A sentence of nothing but spaces and punctuation has nothing to say.
    all.retain(|s| s.iter().any(|p| p.chars().any(char::is_alphanumeric) || is_ipa_letter(p)));
    all
}

fn is_ipa_letter(phoneme: &str) -> bool {
    phoneme.chars().any(|c| !c.is_ascii() && !c.is_whitespace() && !matches!(c, '…' | '—' | '–'))
}

fn strip_language_flags(phonemes: &str) -> String {
    let mut out = String::with_capacity(phonemes.len());
    let mut depth = 0usize;
    for c in phonemes.chars() {
        match c {
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clause(phonemes: &str, terminator: Option<Terminator>, end: bool) -> Clause {
        Clause { phonemes: phonemes.into(), terminator, end_of_sentence: end }
    }

    #[test]
    fn clauses_become_sentences_with_their_punctuation() {
        let clauses = [
            clause("həlˈoʊ ðˈɛɹ", Some(Terminator::Comma), false),
            clause("maɪ fɹˈɛnd", Some(Terminator::Period), true),
            clause("hˌaʊ (fr)ɑːɹ(en) juː", Some(Terminator::Question), true),
            clause("ok", None, false),
        ];
        let joined: Vec<String> = sentences(&clauses).iter().map(|s| s.concat()).collect();
        assert_eq!(joined, ["həlˈoʊ ðˈɛɹ, maɪ fɹˈɛnd.", "hˌaʊ ɑːɹ juː?", "ok"]);
    }

    #[test]
    fn phonemes_are_single_code_points_after_nfd() {
        let s = sentences(&[clause("kæfˈeɪ ɲ̊", None, true)]);
        assert!(s[0].iter().all(|p| p.chars().count() == 1), "{:?}", s[0]);
        assert!(sentences(&[clause("", Some(Terminator::Period), true)]).is_empty());
    }

    #[test]
    fn ids_interleave_the_pad_and_skip_unknown_phonemes() {
        let json = r#"{"audio":{"sample_rate":22050},"espeak":{"voice":"en-us"},
            "phoneme_id_map":{"_":[0],"^":[1],"$":[2]," ":[3],"a":[14],"b":[15]}}"#;
        let config: PiperConfig = serde_json::from_str(json).unwrap();
        let phonemes: Vec<String> = ["a", " ", "b", "ʒ"].iter().map(|s| s.to_string()).collect();
        assert_eq!(config.ids(&phonemes), [1, 0, 14, 0, 3, 0, 15, 0, 2]);
        assert_eq!(config.espeak_voice().unwrap(), "en-us");
        assert_eq!(config.inference.noise_w, 0.8);
    }

    #[cfg(feature = "espeak")]
    #[test]
    fn terminators_are_read_from_the_consumed_text() {
        use espeak::terminator_of;
        assert_eq!(terminator_of("Hello there,", false), (Some(Terminator::Comma), false));
        assert_eq!(terminator_of(" my friend. ", false), (Some(Terminator::Period), true));
        assert_eq!(terminator_of("Really?!", false), (Some(Terminator::Question), true));
        assert_eq!(terminator_of("He said \"stop.\"", false), (Some(Terminator::Period), true));
        assert_eq!(terminator_of("Wait...", false), (None, false));
        assert_eq!(terminator_of("x —", false), (Some(Terminator::Semicolon), false));
        assert_eq!(terminator_of("Hello world\n\n", false), (None, true));
    }
}
