//! Reading a model directory in the Hugging Face layout: which architecture and head the weights
//! hold, their sizes, and the sentence-transformers settings (pooling, normalisation, max length).
//!
//! Every file is reached through [`ModelsRoot`], so nothing a model directory says (a
//! `modules.json` path, a symlink) can make Hearth read outside the models directory.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use hearth_engine::Pooling;
use serde::Deserialize;

use crate::error::BackendError;

/// Encoder architectures this crate can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Architecture {
    Bert,
    /// XLM-RoBERTa and RoBERTa (positions offset past the padding id).
    XlmRoberta,
}

impl Architecture {
    pub const NAMES: &'static str = "`bert`, `xlm-roberta`";

    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "bert" => Some(Self::Bert),
            "xlm-roberta" | "roberta" => Some(Self::XlmRoberta),
            _ => None,
        }
    }
}

impl FromStr for Architecture {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_model_type(s)
            .ok_or_else(|| format!("unknown architecture `{s}`, expected one of {}", Self::NAMES))
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bert => "bert",
            Self::XlmRoberta => "xlm-roberta",
        })
    }
}

/// What sits on top of the encoder in the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// A bare encoder (sentence embedders).
    None,
    /// `*ForSequenceClassification`: a cross-encoder scoring `num_labels` classes.
    SequenceClassification { num_labels: usize },
}

/// Settings from `modules.json`, the pooling module's `config.json` and `sentence_bert_config.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SentenceTransformers {
    /// `None` when there is no pooling module.
    pub pooling: Option<Result<Pooling, String>>,
    pub normalize: bool,
    pub max_seq_length: Option<usize>,
}

#[derive(Clone, Debug)]
pub enum Weights {
    Safetensors(Vec<PathBuf>),
    PyTorch(PathBuf),
    /// Only an ONNX export (see [`ModelDir::onnx`]): the ONNX Runtime backend runs it, candle cannot.
    OnnxOnly,
}

/// Where Hugging Face repos put their ONNX exports, fastest first: the int8 exports (one per CPU
/// instruction set; ONNX Runtime picks kernels for the CPU it runs on), then the float one.
pub const ONNX_FILES: &[&str] = &[
    "onnx/model_quantized.onnx",
    "model_quantized.onnx",
    "onnx/model_qint8_avx512_vnni.onnx",
    "onnx/model_qint8_avx512.onnx",
    "onnx/model_quint8_avx2.onnx",
    "onnx/model.onnx",
    "model.onnx",
];

/// A model directory, inspected.
#[derive(Clone, Debug)]
pub struct ModelDir {
    pub path: PathBuf,
    pub architecture: Architecture,
    pub head: Head,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub pad_token_id: u32,
    /// Longest input the position table allows.
    pub max_positions: usize,
    pub sentence_transformers: Option<SentenceTransformers>,
    pub weights: Weights,
    /// The folder's ONNX export, the first of [`ONNX_FILES`] present, if any.
    pub onnx: Option<PathBuf>,
    pub tokenizer: PathBuf,
    pub(crate) config_json: PathBuf,
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    vocab_size: usize,
    max_position_embeddings: usize,
    pad_token_id: Option<u32>,
    num_labels: Option<usize>,
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct StModule {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct StPooling {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct StModelConfig {
    max_seq_length: Option<usize>,
}

/// The models directory, canonicalised. Paths handed to it must be relative and plain (no `..`,
/// no root); whatever symlinks they pass through must end inside it.
#[derive(Clone, Debug)]
pub struct ModelsRoot {
    canonical: PathBuf,
}

/// True for a relative path made only of plain names (no `..`, `.`, root or drive prefix).
pub fn is_plain_relative(path: &Path) -> bool {
    path.components().next().is_some() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

impl ModelsRoot {
    pub fn new(path: &Path) -> Result<Self, BackendError> {
        let canonical =
            path.canonicalize().map_err(|source| BackendError::Io { path: path.to_owned(), source })?;
        Ok(Self { canonical })
    }

    pub fn path(&self) -> &Path {
        &self.canonical
    }

    /// `path` with every symlink resolved, if that is inside the root; `Ok(None)` if nothing is
    /// there.
    pub fn existing(&self, path: &Path) -> Result<Option<PathBuf>, BackendError> {
        match path.canonicalize() {
            Ok(real) if real.starts_with(&self.canonical) => Ok(Some(real)),
            Ok(real) => Err(BackendError::OutsideModelsDir {
                path: path.to_owned(),
                target: real,
                root: self.canonical.clone(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BackendError::Io { path: path.to_owned(), source }),
        }
    }

    /// `base/relative`, where `relative` comes from a file or a config: refused unless it is
    /// plain and resolves inside the root. `Ok(None)` if nothing is there.
    pub fn join(&self, base: &Path, relative: &str) -> Result<Option<PathBuf>, BackendError> {
        if !is_plain_relative(Path::new(relative)) {
            return Err(BackendError::Unsupported(format!(
                "{}: `{relative}` is not a plain relative path (no `..`, `.` or leading `/`)",
                base.display()
            )));
        }
        self.existing(&base.join(relative))
    }
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, BackendError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| BackendError::Io { path: path.to_owned(), source })?;
    serde_json::from_str(&text).map_err(|source| BackendError::Json { path: path.to_owned(), source })
}

impl ModelDir {
    /// Reads the model directory `path`, which must lie inside `root` (as must every file it uses).
    pub fn inspect(path: &Path, root: &ModelsRoot) -> Result<Self, BackendError> {
        let missing = |what: &str| BackendError::Missing { dir: path.to_owned(), what: what.into() };
        let path = &root.existing(path)?.ok_or_else(|| missing("anything (it does not exist)"))?;
        let file = |name: &str| -> Result<PathBuf, BackendError> {
            root.join(path, name)?.filter(|p| p.is_file()).ok_or_else(|| missing(name))
        };
        let config_json = file("config.json")?;
        let config: HfConfig = read_json(&config_json)?;
        let model_type = config.model_type.as_deref().unwrap_or("");
        let architecture = Architecture::from_model_type(model_type).ok_or_else(|| {
            BackendError::Unsupported(format!(
                "{}: model_type `{model_type}` is not supported; supported: {}",
                config_json.display(),
                Architecture::NAMES
            ))
        })?;
        let head = if config.architectures.iter().any(|a| a.ends_with("ForSequenceClassification")) {
            let num_labels = config.id2label.as_ref().map(|m| m.len()).or(config.num_labels).unwrap_or(2);
            Head::SequenceClassification { num_labels }
        } else {
            Head::None
        };
        let pad_token_id = config.pad_token_id.unwrap_or(match architecture {
            Architecture::Bert => 0,
            Architecture::XlmRoberta => 1,
        });
        let max_positions = match architecture {
            Architecture::Bert => config.max_position_embeddings,
            // Position ids start after the padding id.
            Architecture::XlmRoberta => {
                config.max_position_embeddings.saturating_sub(pad_token_id as usize + 1)
            }
        };
        let tokenizer = file("tokenizer.json")?;
        let mut onnx = None;
        for name in ONNX_FILES {
            if let Some(found) = root.join(path, name)?.filter(|p| p.is_file()) {
                onnx = Some(found);
                break;
            }
        }
        Ok(Self {
            path: path.to_owned(),
            architecture,
            head,
            hidden_size: config.hidden_size,
            vocab_size: config.vocab_size,
            pad_token_id,
            max_positions,
            sentence_transformers: read_sentence_transformers(path, root)?,
            weights: match (find_weights(path, root)?, &onnx) {
                (Some(weights), _) => weights,
                (None, Some(_)) => Weights::OnnxOnly,
                (None, None) => {
                    return Err(missing("model.safetensors, pytorch_model.bin or an ONNX export"))
                }
            },
            onnx,
            tokenizer,
            config_json,
        })
    }
}

fn find_weights(dir: &Path, root: &ModelsRoot) -> Result<Option<Weights>, BackendError> {
    let entries =
        std::fs::read_dir(dir).map_err(|source| BackendError::Io { path: dir.to_owned(), source })?;
    let mut shards = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        if Path::new(&name).extension().is_some_and(|ext| ext == "safetensors") {
            if let Some(real) = root.join(dir, &name.to_string_lossy())? {
                shards.push(real);
            }
        }
    }
    if !shards.is_empty() {
        shards.sort();
        return Ok(Some(Weights::Safetensors(shards)));
    }
    Ok(root.join(dir, "pytorch_model.bin")?.filter(|p| p.is_file()).map(Weights::PyTorch))
}

fn read_sentence_transformers(
    dir: &Path,
    root: &ModelsRoot,
) -> Result<Option<SentenceTransformers>, BackendError> {
    let Some(modules_path) = root.join(dir, "modules.json")? else {
        return Ok(None);
    };
    let modules: Vec<StModule> = read_json(&modules_path)?;
    let mut st = SentenceTransformers::default();
    for module in &modules {
        match module.kind.rsplit('.').next().unwrap_or("") {
            "Pooling" => {
                let config = match module.path.as_str() {
                    "" => "config.json".to_string(),
                    sub => format!("{sub}/config.json"),
                };
                let pooling_path = root.join(dir, &config)?.ok_or_else(|| BackendError::Missing {
                    dir: dir.to_owned(),
                    what: format!("{config} (named by modules.json)"),
                })?;
                let pooling: StPooling = read_json(&pooling_path)?;
                st.pooling = Some(pooling_mode(&pooling));
            }
            "Normalize" => st.normalize = true,
            _ => {}
        }
    }
    if let Some(bert_config) = root.join(dir, "sentence_bert_config.json")? {
        st.max_seq_length = read_json::<StModelConfig>(&bert_config)?.max_seq_length;
    }
    Ok(Some(st))
}

fn pooling_mode(p: &StPooling) -> Result<Pooling, String> {
    let modes = [
        (p.pooling_mode_cls_token, Ok(Pooling::Cls)),
        (p.pooling_mode_mean_tokens, Ok(Pooling::Mean)),
        (p.pooling_mode_lasttoken, Ok(Pooling::LastToken)),
        (p.pooling_mode_max_tokens, Err("max")),
        (p.pooling_mode_mean_sqrt_len_tokens, Err("mean-sqrt-len")),
        (p.pooling_mode_weightedmean_tokens, Err("weighted-mean")),
    ];
    let chosen: Vec<_> = modes.iter().filter(|(on, _)| *on).map(|(_, mode)| *mode).collect();
    match chosen.as_slice() {
        [Ok(pooling)] => Ok(*pooling),
        [Err(name)] => Err(format!("pooling mode `{name}` is not supported")),
        [] => Err("the pooling config enables no pooling mode".into()),
        _ => Err("the pooling config combines several modes, which is not supported".into()),
    }
}
