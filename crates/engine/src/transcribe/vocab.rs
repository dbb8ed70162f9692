//! Whisper's special tokens, found by name in the model's `tokenizer.json`, and the token lists
//! the model's generation config asks to suppress.

use tokenizers::Tokenizer;

/// Per-model decoding data that ships beside the weights (CTranslate2's `config.json`, and
/// Transformers' `config.json` / `generation_config.json`, carry the same lists; a `null` list
/// reads as empty).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct WhisperConfig {
    /// Tokens never sampled (non-speech symbols).
    #[serde(default, alias = "suppress_tokens", deserialize_with = "null_as_empty")]
    pub suppress_ids: Vec<u32>,
    /// Tokens not sampled first (the blank and end of text).
    #[serde(default, alias = "begin_suppress_tokens", deserialize_with = "null_as_empty")]
    pub suppress_ids_begin: Vec<u32>,
    /// Language token ids, when the config lists them (Transformers: the values of `lang_to_id`).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub lang_ids: Vec<u32>,
    /// (layer, head) pairs whose cross-attention follows the audio, for word timestamps.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub alignment_heads: Vec<(usize, usize)>,
    /// Transformers' language tokens by name (read into `lang_ids` by [`WhisperConfig::from_json`]).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub lang_to_id: std::collections::BTreeMap<String, u32>,
}

fn null_as_empty<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de> + Default,
{
    Ok(<Option<T> as serde::Deserialize>::deserialize(deserializer)?.unwrap_or_default())
}

impl WhisperConfig {
    /// Reads one config file's JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let mut config: Self = serde_json::from_slice(bytes)?;
        if config.lang_ids.is_empty() && !config.lang_to_id.is_empty() {
            config.lang_ids = config.lang_to_id.values().copied().collect();
            config.lang_ids.sort_unstable();
        }
        Ok(config)
    }

    /// `self`, with each list it lacks taken from `other` (a `generation_config.json` beside a
    /// Transformers `config.json`).
    pub fn or(mut self, other: WhisperConfig) -> Self {
        let fill = |mine: &mut Vec<u32>, theirs: Vec<u32>| {
            if mine.is_empty() {
                *mine = theirs;
            }
        };
        fill(&mut self.suppress_ids, other.suppress_ids);
        fill(&mut self.suppress_ids_begin, other.suppress_ids_begin);
        fill(&mut self.lang_ids, other.lang_ids);
        if self.alignment_heads.is_empty() {
            self.alignment_heads = other.alignment_heads;
        }
        self
    }
}

/// The tokenizer and the special tokens the decoding rules use.
pub struct WhisperVocab {
    pub tokenizer: Tokenizer,
    pub eot: u32,
    pub sot: u32,
    pub sot_prev: u32,
    pub sot_lm: Option<u32>,
    pub no_speech: Option<u32>,
    pub no_timestamps: u32,
    /// `<|0.00|>`; every id from here on is a timestamp, 0.02 s apart.
    pub timestamp_begin: u32,
    pub transcribe: u32,
    pub translate: u32,
    /// (code, token id), e.g. ("en", 50259).
    pub languages: Vec<(String, u32)>,
    pub suppress: Vec<u32>,
    pub suppress_begin: Vec<u32>,
    pub alignment_heads: Vec<(usize, usize)>,
}

impl std::fmt::Debug for WhisperVocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperVocab").field("languages", &self.languages.len()).finish_non_exhaustive()
    }
}

impl WhisperVocab {
    pub fn new(tokenizer: Tokenizer, config: &WhisperConfig) -> Result<Self, String> {
        let id = |name: &str| {
            tokenizer.token_to_id(name).ok_or_else(|| format!("the tokenizer has no {name} token"))
        };
        let eot = id("<|endoftext|>")?;
        let sot = id("<|startoftranscript|>")?;
        let translate = id("<|translate|>")?;
        let transcribe = id("<|transcribe|>")?;
        let no_timestamps = id("<|notimestamps|>")?;
        let timestamp_begin = id("<|0.00|>").unwrap_or(no_timestamps + 1);
        let no_speech =
            tokenizer.token_to_id("<|nospeech|>").or_else(|| tokenizer.token_to_id("<|nocaptions|>"));
        let lang_ids: Vec<u32> =
            if config.lang_ids.is_empty() { (sot + 1..translate).collect() } else { config.lang_ids.clone() };
        let languages = lang_ids
            .into_iter()
            .filter_map(|id| {
                let token = tokenizer.id_to_token(id)?;
                let code = token.strip_prefix("<|")?.strip_suffix("|>")?;
                Some((code.to_string(), id))
            })
            .collect::<Vec<_>>();
        if languages.is_empty() {
            return Err("the tokenizer has no language tokens".into());
        }
        let sot_prev = id("<|startofprev|>")?;
        let sot_lm = tokenizer.token_to_id("<|startoflm|>");
        // As OpenAI's `suppress_tokens="-1"`: the non-speech symbols plus the task and start tokens.
        let mut suppress = config.suppress_ids.clone();
        suppress.extend([transcribe, translate, sot, sot_prev]);
        suppress.extend(sot_lm);
        suppress.extend(no_speech);
        suppress.sort_unstable();
        suppress.dedup();
        let suppress_begin = if config.suppress_ids_begin.is_empty() {
            let mut blank: Vec<u32> =
                tokenizer.encode(" ", false).map(|e| e.get_ids().to_vec()).unwrap_or_default();
            blank.push(eot);
            blank
        } else {
            config.suppress_ids_begin.clone()
        };
        Ok(WhisperVocab {
            tokenizer,
            eot,
            sot,
            sot_prev,
            sot_lm,
            no_speech,
            no_timestamps,
            timestamp_begin,
            transcribe,
            translate,
            languages,
            suppress,
            suppress_begin,
            alignment_heads: config.alignment_heads.clone(),
        })
    }

    pub fn language_token(&self, code: &str) -> Option<u32> {
        self.languages.iter().find(|(c, _)| c == code).map(|&(_, id)| id)
    }

    pub fn language_code(&self, token: u32) -> Option<&str> {
        self.languages.iter().find(|&&(_, id)| id == token).map(|(c, _)| c.as_str())
    }

    /// Text of the non-special tokens among `tokens`.
    pub fn text(&self, tokens: &[u32]) -> String {
        let text: Vec<u32> = tokens.iter().copied().filter(|&t| t < self.eot).collect();
        self.tokenizer.decode(&text, true).unwrap_or_default()
    }

    /// Token ids of `text` (no special tokens).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text, false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
    }
}

/// Whisper's languages: ISO 639-1 code (or Whisper's own code where there is none) and the
/// English name `verbose_json` reports, in the order of the model's language tokens.
pub const LANGUAGE_NAMES: &[(&str, &str)] = &[
    ("en", "english"),
    ("zh", "chinese"),
    ("de", "german"),
    ("es", "spanish"),
    ("ru", "russian"),
    ("ko", "korean"),
    ("fr", "french"),
    ("ja", "japanese"),
    ("pt", "portuguese"),
    ("tr", "turkish"),
    ("pl", "polish"),
    ("ca", "catalan"),
    ("nl", "dutch"),
    ("ar", "arabic"),
    ("sv", "swedish"),
    ("it", "italian"),
    ("id", "indonesian"),
    ("hi", "hindi"),
    ("fi", "finnish"),
    ("vi", "vietnamese"),
    ("he", "hebrew"),
    ("uk", "ukrainian"),
    ("el", "greek"),
    ("ms", "malay"),
    ("cs", "czech"),
    ("ro", "romanian"),
    ("da", "danish"),
    ("hu", "hungarian"),
    ("ta", "tamil"),
    ("no", "norwegian"),
    ("th", "thai"),
    ("ur", "urdu"),
    ("hr", "croatian"),
    ("bg", "bulgarian"),
    ("lt", "lithuanian"),
    ("la", "latin"),
    ("mi", "maori"),
    ("ml", "malayalam"),
    ("cy", "welsh"),
    ("sk", "slovak"),
    ("te", "telugu"),
    ("fa", "persian"),
    ("lv", "latvian"),
    ("bn", "bengali"),
    ("sr", "serbian"),
    ("az", "azerbaijani"),
    ("sl", "slovenian"),
    ("kn", "kannada"),
    ("et", "estonian"),
    ("mk", "macedonian"),
    ("br", "breton"),
    ("eu", "basque"),
    ("is", "icelandic"),
    ("hy", "armenian"),
    ("ne", "nepali"),
    ("mn", "mongolian"),
    ("bs", "bosnian"),
    ("kk", "kazakh"),
    ("sq", "albanian"),
    ("sw", "swahili"),
    ("gl", "galician"),
    ("mr", "marathi"),
    ("pa", "punjabi"),
    ("si", "sinhala"),
    ("km", "khmer"),
    ("sn", "shona"),
    ("yo", "yoruba"),
    ("so", "somali"),
    ("af", "afrikaans"),
    ("oc", "occitan"),
    ("ka", "georgian"),
    ("be", "belarusian"),
    ("tg", "tajik"),
    ("sd", "sindhi"),
    ("gu", "gujarati"),
    ("am", "amharic"),
    ("yi", "yiddish"),
    ("lo", "lao"),
    ("uz", "uzbek"),
    ("fo", "faroese"),
    ("ht", "haitian creole"),
    ("ps", "pashto"),
    ("tk", "turkmen"),
    ("nn", "nynorsk"),
    ("mt", "maltese"),
    ("sa", "sanskrit"),
    ("lb", "luxembourgish"),
    ("my", "myanmar"),
    ("bo", "tibetan"),
    ("tl", "tagalog"),
    ("mg", "malagasy"),
    ("as", "assamese"),
    ("tt", "tatar"),
    ("haw", "hawaiian"),
    ("ln", "lingala"),
    ("ha", "hausa"),
    ("ba", "bashkir"),
    ("jw", "javanese"),
    ("su", "sundanese"),
    ("yue", "cantonese"),
];

/// The English name of a language code (`en` → `english`); the code itself if unknown.
pub fn language_name(code: &str) -> &str {
    LANGUAGE_NAMES.iter().find(|(c, _)| *c == code).map_or(code, |(_, name)| name)
}

/// The code of a language given by code or by English name (`English`, `en` → `en`).
pub fn language_code(text: &str) -> Option<&'static str> {
    let text = text.trim().to_ascii_lowercase();
    LANGUAGE_NAMES.iter().find(|(c, name)| *c == text || *name == text).map(|(c, _)| *c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers_configs_fill_what_config_json_lacks() {
        // Transformers' config.json: a null list, no languages or heads.
        let config = WhisperConfig::from_json(
            br#"{"d_model": 512, "suppress_tokens": null, "begin_suppress_tokens": [220]}"#,
        )
        .unwrap();
        assert!(config.suppress_ids.is_empty());
        assert_eq!(config.suppress_ids_begin, [220]);
        let generation = WhisperConfig::from_json(
            br#"{"suppress_tokens": [1, 2], "begin_suppress_tokens": [9], "alignment_heads": [[3, 1], [4, 2]],
                 "lang_to_id": {"<|fr|>": 50265, "<|en|>": 50259}}"#,
        )
        .unwrap();
        assert_eq!(generation.lang_ids, [50259, 50265], "lang_to_id's ids, in id order");
        let merged = config.or(generation);
        assert_eq!(merged.suppress_ids, [1, 2], "an empty list is filled");
        assert_eq!(merged.suppress_ids_begin, [220], "a present one is kept");
        assert_eq!(merged.alignment_heads, [(3, 1), (4, 2)]);
        assert_eq!(merged.lang_ids, [50259, 50265]);
    }
}
