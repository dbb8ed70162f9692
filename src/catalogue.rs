//! The model catalogue: presets from `models/*.toml`, compiled into the binary so a deployed Hearth
//! knows them without the source tree. A preset names a source, its files, kind, architecture and
//! default options, so a config entry can say `preset = "bge-small-en-v1.5"` and nothing more.
//!
//! This module only reads the presets. Their `[defaults]` stay a TOML table: the config merges it
//! into an entry's own table and reads the result as that kind's options (`config::model`).

use std::sync::LazyLock;

use hearth_engine::ModelKind;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPreset {
    name: String,
    kind: ModelKind,
    description: String,
    license: String,
    source: String,
    files: Vec<String>,
    architecture: String,
    size_mb: u32,
    offline: Option<String>,
}

pub struct Preset {
    pub name: String,
    pub kind: ModelKind,
    pub description: String,
    pub license: String,
    /// `hf:org/name[@revision]`.
    pub source: String,
    /// File patterns to fetch from the source.
    pub files: Vec<String>,
    pub architecture: String,
    pub size_mb: u32,
    /// The `scripts/fetch-models` entry that installs these weights without the hub, if any.
    pub offline: Option<String>,
    /// Option values for entries that use this preset (keys they set themselves win).
    pub defaults: DeTable<'static>,
}

/// Every file in `models/`; a test checks that none is missing from this list.
const PRESET_FILES: &[(&str, &str)] = &[
    ("smollm2-135m-instruct.toml", include_str!("../models/smollm2-135m-instruct.toml")),
    ("smollm2-1.7b-instruct.toml", include_str!("../models/smollm2-1.7b-instruct.toml")),
    ("qwen2.5-0.5b-instruct.toml", include_str!("../models/qwen2.5-0.5b-instruct.toml")),
    ("qwen2.5-1.5b-instruct.toml", include_str!("../models/qwen2.5-1.5b-instruct.toml")),
    ("qwen2.5-3b-instruct.toml", include_str!("../models/qwen2.5-3b-instruct.toml")),
    ("qwen2.5-7b-instruct.toml", include_str!("../models/qwen2.5-7b-instruct.toml")),
    ("llama-3.2-1b-instruct.toml", include_str!("../models/llama-3.2-1b-instruct.toml")),
    ("llama-3.2-3b-instruct.toml", include_str!("../models/llama-3.2-3b-instruct.toml")),
    ("qwen3-0.6b.toml", include_str!("../models/qwen3-0.6b.toml")),
    ("qwen3-1.7b-safetensors.toml", include_str!("../models/qwen3-1.7b-safetensors.toml")),
    ("gemma-3-1b-it.toml", include_str!("../models/gemma-3-1b-it.toml")),
    ("gemma-3-4b-it.toml", include_str!("../models/gemma-3-4b-it.toml")),
    ("phi-3.5-mini-instruct.toml", include_str!("../models/phi-3.5-mini-instruct.toml")),
    ("all-minilm-l6-v2.toml", include_str!("../models/all-minilm-l6-v2.toml")),
    ("whisper-tiny.toml", include_str!("../models/whisper-tiny.toml")),
    ("whisper-base.toml", include_str!("../models/whisper-base.toml")),
    ("whisper-small.toml", include_str!("../models/whisper-small.toml")),
    ("whisper-medium.toml", include_str!("../models/whisper-medium.toml")),
    ("whisper-large-v3.toml", include_str!("../models/whisper-large-v3.toml")),
    ("whisper-large-v3-turbo.toml", include_str!("../models/whisper-large-v3-turbo.toml")),
    ("distil-whisper-large-v3.toml", include_str!("../models/distil-whisper-large-v3.toml")),
    ("bge-small-en-v1.5.toml", include_str!("../models/bge-small-en-v1.5.toml")),
    ("bge-base-en-v1.5.toml", include_str!("../models/bge-base-en-v1.5.toml")),
    ("bge-large-en-v1.5.toml", include_str!("../models/bge-large-en-v1.5.toml")),
    ("bge-m3.toml", include_str!("../models/bge-m3.toml")),
    ("bge-reranker-base.toml", include_str!("../models/bge-reranker-base.toml")),
    ("bge-reranker-v2-m3.toml", include_str!("../models/bge-reranker-v2-m3.toml")),
    ("ms-marco-minilm-l6-v2.toml", include_str!("../models/ms-marco-minilm-l6-v2.toml")),
    ("piper-en-us-joe-medium.toml", include_str!("../models/piper-en-us-joe-medium.toml")),
    ("piper-en-us-lessac-medium.toml", include_str!("../models/piper-en-us-lessac-medium.toml")),
    ("piper-en-us-amy-medium.toml", include_str!("../models/piper-en-us-amy-medium.toml")),
    ("piper-en-us-ryan-high.toml", include_str!("../models/piper-en-us-ryan-high.toml")),
    ("piper-en-gb-alan-medium.toml", include_str!("../models/piper-en-gb-alan-medium.toml")),
    ("piper-de-de-thorsten-medium.toml", include_str!("../models/piper-de-de-thorsten-medium.toml")),
    ("piper-es-es-davefx-medium.toml", include_str!("../models/piper-es-es-davefx-medium.toml")),
    ("piper-fr-fr-siwis-medium.toml", include_str!("../models/piper-fr-fr-siwis-medium.toml")),
];

fn parse(file: &str, text: &'static str) -> Result<Preset, String> {
    let mut document = DeTable::parse(text).map_err(|e| format!("models/{file}: {e}"))?;
    let defaults = match document.get_mut().remove("defaults").map(|v| v.into_inner()) {
        None => DeTable::new(),
        Some(DeValue::Table(table)) => table,
        Some(_) => return Err(format!("models/{file}: `defaults` must be a table")),
    };
    let raw: RawPreset = RawPreset::deserialize(toml::de::Deserializer::from(document))
        .map_err(|e| format!("models/{file}: {e}"))?;
    if format!("{}.toml", raw.name) != file {
        return Err(format!("models/{file}: `name` must match the file name"));
    }
    Ok(Preset {
        name: raw.name,
        kind: raw.kind,
        description: raw.description,
        license: raw.license,
        source: raw.source,
        files: raw.files,
        architecture: raw.architecture,
        size_mb: raw.size_mb,
        offline: raw.offline,
        defaults,
    })
}

static CATALOGUE: LazyLock<Vec<Preset>> = LazyLock::new(|| {
    PRESET_FILES
        .iter()
        .map(|(file, text)| parse(file, text))
        .collect::<Result<_, _>>()
        // The presets are compiled in and checked by the tests below: failing here is a build defect.
        .unwrap_or_else(|e| panic!("built-in model catalogue is invalid: {e}"))
});

pub fn all() -> &'static [Preset] {
    &CATALOGUE
}

pub fn find(name: &str) -> Option<&'static Preset> {
    CATALOGUE.iter().find(|p| p.name == name)
}

pub fn names() -> Vec<&'static str> {
    CATALOGUE.iter().map(|p| p.name.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn every_file_in_models_dir_is_compiled_in_and_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".toml"))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = PRESET_FILES.iter().map(|(f, _)| f.to_string()).collect();
        listed.sort();
        assert_eq!(on_disk, listed);
        assert_eq!(all().len(), PRESET_FILES.len());
    }

    #[test]
    fn the_issue_named_presets_exist() {
        for name in [
            "all-minilm-l6-v2",
            "bge-small-en-v1.5",
            "bge-base-en-v1.5",
            "bge-large-en-v1.5",
            "bge-m3",
            "bge-reranker-base",
            "bge-reranker-v2-m3",
            "piper-en-us-joe-medium",
            "piper-en-us-lessac-medium",
            "piper-en-us-amy-medium",
            "piper-en-us-ryan-high",
            "piper-en-gb-alan-medium",
            "piper-de-de-thorsten-medium",
            "piper-es-es-davefx-medium",
            "piper-fr-fr-siwis-medium",
        ] {
            assert!(find(name).is_some(), "{name}");
        }
    }
}
