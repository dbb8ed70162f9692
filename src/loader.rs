//! Turns a validated [`ModelConfig`] into a running model: resolves the weights on disk, checks them
//! against the config, starts the model's owner thread (which loads the weights), and wraps it in
//! the engine service for its kind.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use hearth_backends::{CandleCrossEncoder, CandleEmbedder, EncoderOptions, Head, LoadedEncoder, ModelDir};
use hearth_engine::admission::Admission;
use hearth_engine::embed::{Embedder, EmbeddingInfo, TextLimits};
use hearth_engine::encoder::{EncoderHandle, WorkerConfig};
use hearth_engine::registry::Served;
use hearth_engine::rerank::{CrossEncoder, Reranker};
use hearth_engine::tokenize::{LengthPolicy, TextTokenizer};

use crate::config::{EncoderConfig, KindConfig, ModelConfig, ScoringChoice};
use crate::store::{downloads_allowed, Store};

pub async fn load(config: &ModelConfig, store: &Store) -> anyhow::Result<Served> {
    let path = store.resolve(&config.source, downloads_allowed()).await?;
    let inspect_path = path.clone();
    let dir = tokio::task::spawn_blocking(move || ModelDir::inspect(&inspect_path)).await??;
    if let Some(expected) = config.architecture {
        if expected != dir.architecture {
            bail!(
                "`architecture` is `{expected}` but {} holds a `{}` model",
                path.display(),
                dir.architecture
            );
        }
    }
    match &config.options {
        KindConfig::Embedding(encoder) => Ok(Served::Embedding(load_embedder(config, encoder, dir).await?)),
        KindConfig::Rerank { encoder, scoring } => {
            let cross = match (scoring, dir.head) {
                (ScoringChoice::BiEncoder, Head::SequenceClassification { .. }) => bail!(
                    "`scoring = \"bi-encoder\"` needs an embedding model, but {} is a cross-encoder",
                    path.display()
                ),
                (ScoringChoice::CrossEncoder, Head::None) => bail!(
                    "`scoring = \"cross-encoder\"` needs a sequence-classification model, but {} is \
                     a bare encoder (set `scoring = \"bi-encoder\"` to rerank with its embeddings)",
                    path.display()
                ),
                (_, head) => matches!(head, Head::SequenceClassification { .. }),
            };
            let reranker = if cross {
                Reranker::CrossEncoder(load_cross_encoder(config, encoder, dir).await?)
            } else {
                Reranker::BiEncoder(load_embedder(config, encoder, dir).await?)
            };
            Ok(Served::Rerank(reranker))
        }
    }
}

fn options(config: &ModelConfig, encoder: &EncoderConfig) -> EncoderOptions {
    EncoderOptions {
        device: config.device,
        dtype: config.dtype,
        pooling: encoder.pooling,
        normalize: encoder.normalize,
    }
}

fn worker_config(config: &ModelConfig, encoder: &EncoderConfig) -> WorkerConfig {
    WorkerConfig { model: Arc::clone(&config.id), batch: encoder.batch, queue_depth: config.queue_depth }
}

async fn load_tokenizer(path: PathBuf) -> anyhow::Result<Arc<TextTokenizer>> {
    let tokenizer = tokio::task::spawn_blocking(move || TextTokenizer::from_file(&path)).await?;
    Ok(Arc::new(tokenizer.map_err(|e| anyhow::anyhow!(e))?))
}

/// The configured limit, or the model's own (sentence-transformers' `max_seq_length`, else its
/// position table); never more than the position table allows.
fn length_policy(
    config: &ModelConfig,
    encoder: &EncoderConfig,
    dir: &ModelDir,
    tokenizer: &TextTokenizer,
) -> anyhow::Result<TextLimits> {
    let positions = dir.max_positions;
    let max_tokens = match encoder.max_input_tokens {
        Some(n) if n > positions => {
            bail!("`max_input_tokens` is {n} but the model has only {positions} positions")
        }
        Some(n) => n,
        None => dir
            .sentence_transformers
            .as_ref()
            .and_then(|st| st.max_seq_length)
            .unwrap_or(positions)
            .min(positions),
    };
    if max_tokens <= tokenizer.special_tokens_pair() {
        bail!("`max_input_tokens` ({max_tokens}) leaves no room beside the special tokens");
    }
    Ok(TextLimits {
        length: LengthPolicy { max_tokens, truncate: encoder.truncate },
        max_inputs: config.max_inputs_per_request,
    })
}

async fn start_worker<M, F>(
    config: &ModelConfig,
    encoder: &EncoderConfig,
    load: F,
) -> anyhow::Result<(EncoderHandle<M::Output>, LoadedEncoder)>
where
    M: hearth_engine::encoder::EncoderModel,
    F: FnOnce() -> Result<(M, LoadedEncoder), hearth_backends::BackendError> + Send + 'static,
{
    let (handle, loaded) =
        EncoderHandle::start(worker_config(config, encoder), move || load().map_err(Into::into))
            .await
            .map_err(|e| anyhow::anyhow!(e))
            .with_context(|| format!("cannot load model `{}`", config.id))?;
    tracing::info!(
        model = %config.id,
        architecture = %loaded.architecture,
        device = %loaded.device,
        dtype = %loaded.dtype,
        dims = loaded.dims,
        "model loaded"
    );
    Ok((handle, loaded))
}

async fn load_embedder(
    config: &ModelConfig,
    encoder: &EncoderConfig,
    dir: ModelDir,
) -> anyhow::Result<Embedder> {
    let tokenizer = load_tokenizer(dir.tokenizer.clone()).await?;
    let limits = length_policy(config, encoder, &dir, &tokenizer)?;
    let options = options(config, encoder);
    let (worker, loaded) =
        start_worker(config, encoder, move || CandleEmbedder::load(&dir, &options)).await?;
    let info =
        EmbeddingInfo { dims: loaded.dims, vocab_size: loaded.vocab_size, normalized: loaded.normalize };
    let admission = Admission::new(Arc::clone(&config.id), config.max_concurrent_requests);
    Ok(Embedder::new(tokenizer, worker, info, limits, admission))
}

async fn load_cross_encoder(
    config: &ModelConfig,
    encoder: &EncoderConfig,
    dir: ModelDir,
) -> anyhow::Result<CrossEncoder> {
    let tokenizer = load_tokenizer(dir.tokenizer.clone()).await?;
    let limits = length_policy(config, encoder, &dir, &tokenizer)?;
    let options = options(config, encoder);
    let (worker, _) = start_worker(config, encoder, move || CandleCrossEncoder::load(&dir, &options)).await?;
    let admission = Admission::new(Arc::clone(&config.id), config.max_concurrent_requests);
    Ok(CrossEncoder { tokenizer, worker, limits, admission })
}
