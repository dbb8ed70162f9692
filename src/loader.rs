//! Turns a validated [`ModelConfig`] into a running model: resolves the weights in the models
//! directory, checks them against the config, starts the model's owner thread (which loads the
//! weights), and wraps it in the engine service for its kind. A rerank entry that names an
//! `embedding_model` gets that entry's loaded model instead of a second copy.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use hearth_backends::{
    BackendError, CandleCrossEncoder, CandleEmbedder, EncoderOptions, Head, LoadedEncoder, ModelDir,
    ModelsRoot,
};
use hearth_engine::admission::Admission;
use hearth_engine::embed::{Embedder, EmbeddingInfo, EncoderService, TextLimits};
use hearth_engine::encoder::{EncoderHandle, EncoderModel, WorkerConfig};
use hearth_engine::pool::BlockingPool;
use hearth_engine::registry::{LoadState, Registry, Served};
use hearth_engine::rerank::Reranker;
use hearth_engine::tokenize::{LengthPolicy, TextTokenizer};

use crate::config::{EncoderConfig, KindConfig, ModelConfig, RerankConfig, ScoringChoice, TextConfig};
use crate::state::AppState;
use crate::store::{downloads_allowed, Store};

/// How a backend loads an encoder on its owner thread (`CandleEmbedder::load`, …).
type LoadEncoder<M> = fn(&ModelDir, &EncoderOptions) -> Result<(M, LoadedEncoder), BackendError>;

pub struct Loader {
    store: Store,
    pool: Arc<BlockingPool>,
    registry: Arc<Registry>,
}

impl Loader {
    pub fn new(state: &AppState) -> Self {
        Self {
            store: Store::new(state.config.models_dir.clone()),
            pool: Arc::clone(&state.pool),
            registry: Arc::clone(&state.registry),
        }
    }

    pub async fn load(&self, config: &ModelConfig) -> anyhow::Result<Served> {
        match &config.options {
            KindConfig::Embedding(encoder) => {
                let dir = self.inspect(encoder).await?;
                Ok(Served::Embedding(Arc::new(self.embedder(config, encoder, dir).await?)))
            }
            KindConfig::Rerank(RerankConfig::Load { encoder, scoring }) => {
                let dir = self.inspect(encoder).await?;
                let cross = match (scoring, dir.head) {
                    (ScoringChoice::BiEncoder, Head::SequenceClassification { .. }) => bail!(
                        "`scoring = \"bi-encoder\"` needs an embedding model, but {} is a cross-encoder",
                        dir.path.display()
                    ),
                    (ScoringChoice::CrossEncoder, Head::None) => bail!(
                        "`scoring = \"cross-encoder\"` needs a sequence-classification model, but {} is \
                         a bare encoder (set `scoring = \"bi-encoder\"` to rerank with its embeddings)",
                        dir.path.display()
                    ),
                    (_, head) => matches!(head, Head::SequenceClassification { .. }),
                };
                if cross {
                    let (service, _) = self.service(config, encoder, dir, CandleCrossEncoder::load).await?;
                    return Ok(Served::Rerank(Reranker::CrossEncoder(service)));
                }
                let embedder = Arc::new(self.embedder(config, encoder, dir).await?);
                let limits = *embedder.limits();
                let admission = Admission::new(Arc::clone(&config.id), config.max_concurrent_requests);
                Ok(Served::Rerank(Reranker::BiEncoder { embedder, limits, admission }))
            }
            KindConfig::Rerank(RerankConfig::SharedEmbedder { embedding_model, text }) => {
                let entry = self
                    .registry
                    .get(embedding_model)
                    .with_context(|| format!("no model `{embedding_model}` is registered"))?;
                let embedder = match entry.settled().await {
                    LoadState::Ready(served) => match &*served {
                        Served::Embedding(embedder) => Arc::clone(embedder),
                        _ => bail!("`{embedding_model}` is not an embedding model"),
                    },
                    _ => bail!("its embedding model `{embedding_model}` is not loaded"),
                };
                let limits = shared_limits(text, &embedder)?;
                let admission = Admission::new(Arc::clone(&config.id), config.max_concurrent_requests);
                tracing::info!(model = %config.id, embedding_model = %embedding_model, "reranking with a shared embedding model");
                Ok(Served::Rerank(Reranker::BiEncoder { embedder, limits, admission }))
            }
        }
    }

    async fn inspect(&self, encoder: &EncoderConfig) -> anyhow::Result<ModelDir> {
        let path = self.store.resolve(&encoder.weights.source, downloads_allowed()).await?;
        let root = self.store.root().to_owned();
        let inspect_path = path.clone();
        let dir =
            tokio::task::spawn_blocking(move || ModelDir::inspect(&inspect_path, &ModelsRoot::new(&root)?))
                .await??;
        if let Some(expected) = encoder.architecture {
            if expected != dir.architecture {
                bail!(
                    "`architecture` is `{expected}` but {} holds a `{}` model",
                    path.display(),
                    dir.architecture
                );
            }
        }
        Ok(dir)
    }

    async fn embedder(
        &self,
        config: &ModelConfig,
        encoder: &EncoderConfig,
        dir: ModelDir,
    ) -> anyhow::Result<Embedder> {
        let max_positions = dir.max_positions;
        let (service, loaded) = self.service(config, encoder, dir, CandleEmbedder::load).await?;
        let info = EmbeddingInfo { dims: loaded.dims, vocab_size: loaded.vocab_size, max_positions };
        Ok(Embedder::new(service, info))
    }

    /// Starts the owner thread of a text encoder and wraps it with its tokenizer, limits and
    /// admission.
    async fn service<M>(
        &self,
        config: &ModelConfig,
        encoder: &EncoderConfig,
        dir: ModelDir,
        load: LoadEncoder<M>,
    ) -> anyhow::Result<(EncoderService<M::Output>, LoadedEncoder)>
    where
        M: EncoderModel,
    {
        let tokenizer = load_tokenizer(dir.tokenizer.clone()).await?;
        let limits = text_limits(&encoder.text, &dir, &tokenizer)?;
        let options = EncoderOptions {
            device: encoder.weights.device,
            dtype: encoder.weights.dtype,
            pooling: encoder.pooling,
            normalize: encoder.normalize,
        };
        let worker_config = WorkerConfig {
            model: Arc::clone(&config.id),
            batch: encoder.batch,
            queue_depth: encoder.weights.queue_depth,
        };
        let (worker, loaded) =
            EncoderHandle::start(worker_config, move || load(&dir, &options).map_err(Into::into))
                .await
                .map_err(|e| anyhow::anyhow!(e))
                .with_context(|| format!("cannot load model `{}`", config.id))?;
        tracing::info!(
            model = %config.id,
            architecture = %loaded.architecture,
            device = %loaded.device,
            dtype = ?loaded.dtype,
            dims = loaded.dims,
            max_input_tokens = limits.length.max_tokens,
            "model loaded"
        );
        let admission = Admission::new(Arc::clone(&config.id), config.max_concurrent_requests);
        let service = EncoderService { tokenizer, worker, limits, admission, pool: Arc::clone(&self.pool) };
        Ok((service, loaded))
    }
}

async fn load_tokenizer(path: PathBuf) -> anyhow::Result<Arc<TextTokenizer>> {
    let tokenizer = tokio::task::spawn_blocking(move || TextTokenizer::from_file(&path)).await?;
    Ok(Arc::new(tokenizer.map_err(|e| anyhow::anyhow!(e))?))
}

/// The configured limit, or the model's own (sentence-transformers' `max_seq_length`, else its
/// position table); never more than the position table allows.
fn text_limits(text: &TextConfig, dir: &ModelDir, tokenizer: &TextTokenizer) -> anyhow::Result<TextLimits> {
    let positions = dir.max_positions;
    let max_tokens = match text.max_input_tokens {
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
        length: LengthPolicy { max_tokens, truncate: text.truncate },
        max_inputs: text.max_inputs_per_request,
        max_tokens: text.max_tokens_per_request,
    })
}

/// Limits of a rerank entry over a shared embedding model: its own, within the model's positions.
fn shared_limits(text: &TextConfig, embedder: &Embedder) -> anyhow::Result<TextLimits> {
    let positions = embedder.info().max_positions;
    let max_tokens = match text.max_input_tokens {
        Some(n) if n > positions => {
            bail!("`max_input_tokens` is {n} but the model has only {positions} positions")
        }
        Some(n) => n,
        None => embedder.limits().length.max_tokens,
    };
    Ok(TextLimits {
        length: LengthPolicy { max_tokens, truncate: text.truncate },
        max_inputs: text.max_inputs_per_request,
        max_tokens: text.max_tokens_per_request,
    })
}
