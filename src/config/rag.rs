//! `[rag]`: the files and vector stores (OpenAI's Files and Vector Stores APIs, grounded chat).
//! Present → enabled. The models it uses are configured entries, referenced by id.

use std::path::PathBuf;
use std::sync::Arc;

use hearth_engine::ModelKind;
use hearth_rag::fusion::Fusion;
use serde::Deserialize;

use super::{expand_home, invalid, ConfigError, ModelConfig};

pub const DEFAULT_MAX_FILE_BYTES: usize = 64 * 1024 * 1024;
pub const DEFAULT_INGEST_CONCURRENCY: usize = 2;
pub const DEFAULT_CANDIDATES: usize = 50;
pub const DEFAULT_RERANK_CANDIDATES: usize = 20;
pub const DEFAULT_EXACT_BELOW: usize = 20_000;
pub const DEFAULT_SAVE_INTERVAL_SECS: u64 = 30;
/// Relative score fusion's weights: on retrieval-debian every dense share from 0.5 to 0.8 beats
/// both rankings alone on recall@10 and MRR@10; 0.6 is the middle of that plateau.
pub const DEFAULT_DENSE_WEIGHT: f64 = 0.6;
pub const DEFAULT_LEXICAL_WEIGHT: f64 = 0.4;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRag {
    data_dir: Option<String>,
    embedding_model: Option<String>,
    rerank_model: Option<String>,
    max_file_bytes: Option<usize>,
    ingest_concurrency: Option<usize>,
    candidates: Option<usize>,
    rerank_candidates: Option<usize>,
    dense_weight: Option<f64>,
    lexical_weight: Option<f64>,
    fusion: Option<String>,
    rrf_k: Option<f64>,
    exact_below: Option<usize>,
    half_precision: Option<bool>,
    save_interval_secs: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RagConfig {
    pub data_dir: PathBuf,
    pub embedding_model: Arc<str>,
    pub rerank_model: Option<Arc<str>>,
    pub max_file_bytes: usize,
    pub ingest_concurrency: usize,
    pub candidates: usize,
    pub rerank_candidates: usize,
    pub dense_weight: f64,
    pub lexical_weight: f64,
    pub fusion: Fusion,
    pub exact_below: usize,
    pub half_precision: bool,
    pub save_interval_secs: u64,
}

/// `$HEARTH_DATA_DIR`, else `$XDG_DATA_HOME/hearth`, else `~/.local/share/hearth`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HEARTH_DATA_DIR") {
        return PathBuf::from(dir);
    }
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local").join("share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("hearth")
}

fn model_of(
    models: &[ModelConfig],
    field: &str,
    id: Option<String>,
    kind: ModelKind,
) -> Result<Option<Arc<str>>, ConfigError> {
    let found = match &id {
        Some(id) => models.iter().find(|m| &*m.id == id.as_str()),
        None => models.iter().find(|m| m.kind == kind),
    };
    match (found, id) {
        (Some(model), _) if model.kind == kind => Ok(Some(Arc::clone(&model.id))),
        (Some(model), Some(id)) => Err(invalid(
            format!("rag.{field}"),
            format!("`{id}` is a {} model; a {} model is needed", model.kind, kind),
        )),
        (None, Some(id)) => {
            Err(invalid(format!("rag.{field}"), format!("no configured model has id `{id}`")))
        }
        _ => Ok(None),
    }
}

pub(super) fn validate(raw: RawRag, models: &[ModelConfig]) -> Result<RagConfig, ConfigError> {
    let embedding_model = model_of(models, "embedding_model", raw.embedding_model, ModelKind::Embedding)?
        .ok_or_else(|| {
            invalid("rag.embedding_model", "[rag] needs an embedding model, and none is configured")
        })?;
    let rerank_model = model_of(models, "rerank_model", raw.rerank_model, ModelKind::Rerank)?;
    let positive = |field: &str, value: Option<usize>, default: usize| match value {
        Some(0) => Err(invalid(format!("rag.{field}"), "must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let weight = |field: &str, value: Option<f64>, default: f64| match value {
        Some(w) if !(w.is_finite() && w >= 0.0) => {
            Err(invalid(format!("rag.{field}"), "must be a number ≥ 0"))
        }
        Some(w) => Ok(w),
        None => Ok(default),
    };
    let dense_weight = weight("dense_weight", raw.dense_weight, DEFAULT_DENSE_WEIGHT)?;
    let lexical_weight = weight("lexical_weight", raw.lexical_weight, DEFAULT_LEXICAL_WEIGHT)?;
    if dense_weight + lexical_weight == 0.0 {
        return Err(invalid("rag.dense_weight", "`dense_weight` and `lexical_weight` cannot both be 0"));
    }
    let rrf_k = match raw.rrf_k {
        Some(k) if !(k.is_finite() && k >= 0.0) => return Err(invalid("rag.rrf_k", "must be a number ≥ 0")),
        Some(k) => k,
        None => hearth_rag::fusion::DEFAULT_K,
    };
    let fusion = match raw.fusion.as_deref() {
        None | Some("relative_score") => Fusion::RelativeScore,
        Some("rrf") => Fusion::ReciprocalRank { k: rrf_k },
        Some(other) => {
            return Err(invalid("rag.fusion", format!("must be `relative_score` or `rrf`; got `{other}`")))
        }
    };
    Ok(RagConfig {
        data_dir: raw.data_dir.as_deref().map(expand_home).unwrap_or_else(default_data_dir),
        embedding_model,
        rerank_model,
        max_file_bytes: positive("max_file_bytes", raw.max_file_bytes, DEFAULT_MAX_FILE_BYTES)?,
        ingest_concurrency: positive(
            "ingest_concurrency",
            raw.ingest_concurrency,
            DEFAULT_INGEST_CONCURRENCY,
        )?,
        candidates: positive("candidates", raw.candidates, DEFAULT_CANDIDATES)?,
        rerank_candidates: positive("rerank_candidates", raw.rerank_candidates, DEFAULT_RERANK_CANDIDATES)?,
        dense_weight,
        lexical_weight,
        fusion,
        exact_below: raw.exact_below.unwrap_or(DEFAULT_EXACT_BELOW),
        half_precision: raw.half_precision.unwrap_or(false),
        save_interval_secs: positive(
            "save_interval_secs",
            raw.save_interval_secs.map(|s| s as usize),
            DEFAULT_SAVE_INTERVAL_SECS as usize,
        )? as u64,
    })
}

#[cfg(test)]
pub(super) fn raw_fields() -> Vec<&'static str> {
    super::reference::fields_of::<RawRag>()
}
