//! The RAG pipeline: what joins the store (`hearth_rag`, which knows no models) to the served
//! models. Ingest (extract → chunk by the embedder's tokens → embed → store and index) runs in
//! the background, `ingest_concurrency` files at a time; search embeds the query, asks the store
//! for its hybrid candidates and lets the reranker reorder them.
//!
//! Models are reached as any handler reaches them (`ready_model`: loaded on demand, through
//! their queues and admission), via the `Embed` and `Rerank` capabilities.

use std::sync::Arc;
use std::time::Duration;

use hearth_engine::embed::{Embed, EmbedInput, Truncation};
use hearth_engine::registry::Served;
use hearth_engine::rerank::Rerank;
use hearth_engine::tokenize::TruncationSide;
use hearth_engine::{ModelKind, Priority};
use hearth_rag::filter::Filter;
use hearth_rag::{
    chunk, extract, ChunkingStrategy, Hit, Library, LibraryOptions, Metric, NewChunk, RagError, SearchRequest,
};
use tokio::sync::Semaphore;

use crate::config::rag::RagConfig;
use crate::http::error::ApiError;
use crate::http::ready_model;
use crate::state::AppState;

/// Chunks embedded per request to the embedder.
const EMBED_BATCH: usize = 64;
/// How long an ingest waits out a busy embedder (429s from its admission, as any client would
/// get) before the file fails as `server_error`.
const OVERLOAD_PATIENCE: Duration = Duration::from_secs(600);
/// OpenAI's limits on `static` chunking.
pub const MIN_CHUNK_TOKENS: usize = 100;
pub const MAX_CHUNK_TOKENS: usize = 4096;
/// OpenAI's `auto` strategy, capped at what the embedding model reads.
pub const AUTO_CHUNK_TOKENS: usize = 800;
pub const AUTO_OVERLAP_TOKENS: usize = 400;

pub struct Rag {
    pub config: RagConfig,
    pub library: Arc<Library>,
    ingest: Arc<Semaphore>,
}

/// Where a failed ingest puts the blame (OpenAI's `last_error.code`).
struct IngestFailure {
    code: &'static str,
    message: String,
}

impl From<RagError> for IngestFailure {
    fn from(e: RagError) -> Self {
        let code = match &e {
            RagError::Unsupported(_) => "unsupported_file",
            RagError::Invalid { .. } | RagError::DimensionMismatch { .. } => "invalid_file",
            _ => "server_error",
        };
        if code == "server_error" {
            tracing::error!(error = %e, "ingest failed");
        }
        Self { code, message: e.to_string() }
    }
}

impl From<ApiError> for IngestFailure {
    fn from(e: ApiError) -> Self {
        let body = e.stream_body();
        let message = body["error"]["message"].as_str().unwrap_or("the embedding model failed").to_string();
        tracing::warn!(%message, "ingest failed");
        Self { code: "server_error", message }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RagError> + Send + 'static,
) -> Result<T, RagError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(RagError::io("a store task panicked", std::io::Error::other(e.to_string()))))
}

impl Rag {
    /// Opens the library (replaying what a crash left behind).
    pub fn open(config: RagConfig) -> Result<Self, RagError> {
        let mut options = LibraryOptions::default();
        options.dense.exact_below = config.exact_below;
        options.dense.half_precision = config.half_precision;
        let library = Arc::new(Library::open(&config.data_dir, options)?);
        let ingest = Arc::new(Semaphore::new(config.ingest_concurrency));
        Ok(Self { config, library, ingest })
    }

    /// A blocking store call off the async runtime.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Library) -> Result<T, RagError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let library = Arc::clone(&self.library);
        Ok(blocking(move || f(&library)).await?)
    }

    async fn embedder(&self, state: &AppState) -> Result<Arc<dyn Embed>, ApiError> {
        let (_, served) = ready_model(state, &self.config.embedding_model, ModelKind::Embedding).await?;
        match &*served {
            Served::Embedding(embedder) => Ok(Arc::clone(embedder) as Arc<dyn Embed>),
            _ => Err(ApiError::Internal { cause: "the RAG embedding model is not an embedder".into() }),
        }
    }

    /// The dimension and metric a new store takes from the embedding model (normalised models
    /// compare by dot product).
    pub async fn space(&self, state: &AppState) -> Result<(usize, Metric), ApiError> {
        let embedder = self.embedder(state).await?;
        let probe =
            embedder.embed(EmbedInput::Texts(vec!["dimension probe".into()]), None, Priority::Normal).await?;
        let vector =
            probe.vectors.first().ok_or_else(|| ApiError::Internal { cause: "no probe vector".into() })?;
        let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        let metric = if (norm - 1.0).abs() < 1e-3 { Metric::Dot } else { Metric::Cosine };
        Ok((embedder.dims(), metric))
    }

    /// The chunk sizes a request's `chunking_strategy` names (`auto` when absent): validated
    /// against OpenAI's limits and the embedding model's window.
    pub async fn chunking(
        &self,
        state: &AppState,
        requested: Option<(usize, usize)>,
    ) -> Result<ChunkingStrategy, ApiError> {
        match requested {
            None => {
                let window = self.embedder(state).await?.max_input_tokens();
                let max = AUTO_CHUNK_TOKENS.min(window);
                let overlap = (AUTO_OVERLAP_TOKENS * max / AUTO_CHUNK_TOKENS).min(max / 2);
                Ok(ChunkingStrategy { max_chunk_size_tokens: max, chunk_overlap_tokens: overlap })
            }
            Some((max, overlap)) => {
                if !(MIN_CHUNK_TOKENS..=MAX_CHUNK_TOKENS).contains(&max) {
                    return Err(ApiError::invalid(
                        format!("`max_chunk_size_tokens` must be between {MIN_CHUNK_TOKENS} and {MAX_CHUNK_TOKENS}; got {max}"),
                        "chunking_strategy",
                    ));
                }
                if overlap > max / 2 {
                    return Err(ApiError::invalid(
                        format!("`chunk_overlap_tokens` must not exceed half of `max_chunk_size_tokens` ({}); got {overlap}", max / 2),
                        "chunking_strategy",
                    ));
                }
                Ok(ChunkingStrategy { max_chunk_size_tokens: max, chunk_overlap_tokens: overlap })
            }
        }
    }

    /// Ingests a store file in the background; its status says how it went.
    pub fn spawn_ingest(self: &Arc<Self>, state: AppState, store: String, file: String) {
        let rag = Arc::clone(self);
        tokio::spawn(async move {
            let Ok(_permit) = Arc::clone(&rag.ingest).acquire_owned().await else { return };
            let started = std::time::Instant::now();
            match rag.ingest(&state, &store, &file).await {
                Ok(Some(chunks)) => {
                    tracing::info!(
                        store,
                        file,
                        chunks,
                        seconds = started.elapsed().as_secs_f64(),
                        "file ingested"
                    );
                    metrics::counter!("hearth_rag_files_ingested_total").increment(1);
                    metrics::counter!("hearth_rag_chunks_ingested_total").increment(chunks as u64);
                }
                Ok(None) => tracing::info!(store, file, "file left the store during ingest; nothing stored"),
                Err(failure) => {
                    metrics::counter!("hearth_rag_files_failed_total").increment(1);
                    let library = Arc::clone(&rag.library);
                    let (s, f) = (store.clone(), file.clone());
                    if let Err(e) =
                        blocking(move || library.fail_store_file(&s, &f, failure.code, &failure.message))
                            .await
                    {
                        tracing::error!(store, file, error = %e, "cannot record a failed ingest");
                    }
                }
            }
        });
    }

    async fn ingest(
        &self,
        state: &AppState,
        store: &str,
        file: &str,
    ) -> Result<Option<usize>, IngestFailure> {
        let library = Arc::clone(&self.library);
        let (s, f) = (store.to_string(), file.to_string());
        let (record, name, bytes) = blocking(move || {
            let record = library.store_file(&s, &f)?;
            let name = library.file(&f)?.filename;
            Ok((record, name, library.file_bytes(&f)?))
        })
        .await?;
        let text = blocking(move || extract::extract(&name, &bytes)).await?;
        let embedder = self.embedder(state).await?;
        let (dims, _) = self.library.store_space(store)?;
        if embedder.dims() != dims {
            return Err(RagError::DimensionMismatch {
                store: store.into(),
                expected: dims,
                got: embedder.dims(),
            }
            .into());
        }
        let ChunkingStrategy { max_chunk_size_tokens: max, chunk_overlap_tokens: overlap } = record.chunking;
        let text = Arc::new(text);
        let offsets =
            embedder.token_offsets(text.to_string(), Priority::Normal).await.map_err(ApiError::from)?;
        let spans = chunk::windows(&offsets, max, overlap);
        let mut chunks = Vec::with_capacity(spans.len());
        // Chunks longer than the model's window are embedded from their start (BM25 reads all).
        let truncation = Some(Truncation { truncate: true, side: TruncationSide::Right, max_tokens: None });
        for batch in spans.chunks(EMBED_BATCH) {
            let texts: Vec<String> = batch.iter().map(|s| text[s.start..s.end].to_string()).collect();
            let vectors = patiently(|| {
                embedder.embed_with(EmbedInput::Texts(texts.clone()), None, truncation, Priority::Normal)
            })
            .await
            .map_err(ApiError::from)?
            .vectors;
            for (text, vector) in texts.into_iter().zip(vectors) {
                chunks.push(NewChunk { position: chunks.len(), text, vector });
            }
        }
        let count = chunks.len();
        let library = Arc::clone(&self.library);
        let (s, f) = (store.to_string(), file.to_string());
        let stored = blocking(move || library.complete_store_file(&s, &f, &chunks)).await?;
        Ok(stored.then_some(count))
    }

    /// Restarts the ingest of every file a restart interrupted.
    pub fn resume(self: &Arc<Self>, state: &AppState) {
        match self.library.pending() {
            Ok(pending) => {
                if !pending.is_empty() {
                    tracing::info!(files = pending.len(), "resuming interrupted ingests");
                }
                for record in pending {
                    self.spawn_ingest(state.clone(), record.store_id, record.file_id);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot list interrupted ingests"),
        }
    }

    /// Saves changed indexes every `save_interval_secs` until the process ends.
    pub fn spawn_saver(self: &Arc<Self>) {
        let rag = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(rag.config.save_interval_secs));
            tick.tick().await;
            loop {
                tick.tick().await;
                let library = Arc::clone(&rag.library);
                if let Err(e) = blocking(move || library.flush()).await {
                    tracing::warn!(error = %e, "cannot save the vector indexes; retrying at the next interval");
                }
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    /// Hybrid search over `stores`, reranked when asked and a reranker is configured, best
    /// first, at most `max_results`, none below `score_threshold`.
    pub async fn search(
        &self,
        state: &AppState,
        stores: Vec<String>,
        query: String,
        max_results: usize,
        filter: Option<Filter>,
        rerank: bool,
        score_threshold: f64,
    ) -> Result<Vec<Hit>, ApiError> {
        let embedder = self.embedder(state).await?;
        let vector = embedder
            .embed_with(
                EmbedInput::Texts(vec![query.clone()]),
                None,
                Some(Truncation { truncate: true, side: TruncationSide::Right, max_tokens: None }),
                Priority::Normal,
            )
            .await?
            .vectors
            .pop();
        let request = SearchRequest {
            vector,
            text: Some(query.clone()),
            candidates: self.config.candidates.max(max_results),
            filter,
            dense_weight: self.config.dense_weight,
            lexical_weight: self.config.lexical_weight,
            fusion: self.config.fusion,
        };
        let library = Arc::clone(&self.library);
        let mut hits = blocking(move || library.search(&stores, &request)).await?;
        if rerank {
            hits.truncate(self.config.rerank_candidates.max(max_results));
            hits = self.rerank(state, query, hits).await?;
        }
        hits.retain(|h| h.score >= score_threshold);
        hits.truncate(max_results);
        Ok(hits)
    }

    /// Reorders `hits` by the configured reranker's scores (which become their `score`); as
    /// they are without one.
    pub async fn rerank(
        &self,
        state: &AppState,
        query: String,
        mut hits: Vec<Hit>,
    ) -> Result<Vec<Hit>, ApiError> {
        let Some(model) = &self.config.rerank_model else { return Ok(hits) };
        if hits.is_empty() {
            return Ok(hits);
        }
        let (_, served) = ready_model(state, model, ModelKind::Rerank).await?;
        let Served::Rerank(reranker) = &*served else {
            return Err(ApiError::Internal { cause: "the RAG rerank model is not a reranker".into() });
        };
        let documents = hits.iter().map(|h| h.text.clone()).collect();
        let truncation = Some(Truncation { truncate: true, side: TruncationSide::Right, max_tokens: None });
        let scores = reranker.rerank_with(query, documents, truncation, Priority::Normal).await?.scores;
        for (hit, score) in hits.iter_mut().zip(scores) {
            hit.score = score as f64;
        }
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(hits)
    }
}

/// Runs `call` until the model admits it: background work (ingest) waits out an overloaded
/// model, retrying after the wait the refusal names, for up to [`OVERLOAD_PATIENCE`], where an
/// interactive request would get the 429. Any other answer is returned as it is.
async fn patiently<T, F, Fut>(mut call: F) -> Result<T, hearth_engine::EngineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, hearth_engine::EngineError>>,
{
    let started = std::time::Instant::now();
    loop {
        match call().await {
            Err(hearth_engine::EngineError::Overloaded { reason, .. })
                if started.elapsed() < OVERLOAD_PATIENCE =>
            {
                metrics::counter!("hearth_rag_ingest_overload_waits_total").increment(1);
                tokio::time::sleep(reason.retry_after()).await;
            }
            other => return other,
        }
    }
}
