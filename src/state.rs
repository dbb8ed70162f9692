//! What every request handler and background task can reach: the validated config, the model
//! registry, the preprocessing pool and the metrics recorder. Its own module so that `http` and
//! `server` both use it without importing each other.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hearth_engine::pool::BlockingPool;
use hearth_engine::registry::Registry;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::Keyring;
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::loader::Loader;
use crate::rag::Rag;
use crate::telemetry;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    /// Threads that tokenize (and later decode audio) for every model.
    pub pool: Arc<BlockingPool>,
    pub metrics: PrometheusHandle,
    /// API keys and their rate-limit buckets.
    pub keys: Arc<Keyring>,
    /// Loads and unloads models (startup, on demand, idle, admin).
    pub lifecycle: Arc<Lifecycle>,
    /// Files and vector stores, when `[rag]` is configured.
    pub rag: Option<Arc<Rag>>,
}

impl AppState {
    /// Registers every configured model as loading; nothing is loaded yet.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let registry = Registry::new(config.models.iter().map(|m| (Arc::clone(&m.id), m.kind)), created);
        // The recorder first, so the pool and the models register real metric handles.
        let metrics = telemetry::metrics();
        let pool = BlockingPool::new(
            "preprocess",
            config.server.preprocess_threads,
            config.server.preprocess_queue_depth,
        )
        .context("cannot start the preprocessing threads")?;
        let keys = Arc::new(Keyring::new(&config.auth));
        let (registry, pool) = (Arc::new(registry), Arc::new(pool));
        let loader = Loader::new(
            config.models_dir.clone(),
            Arc::clone(&pool),
            Arc::clone(&registry),
            config.server.onnxruntime_library.clone(),
        );
        let lifecycle = Arc::new(Lifecycle::new(&config, loader, Arc::clone(&registry)));
        let rag = match &config.rag {
            Some(rag) => Some(Arc::new(Rag::open(rag.clone()).with_context(|| {
                format!("cannot open the files and vector stores in {}", rag.data_dir.display())
            })?)),
            None => None,
        };
        Ok(Self { config: Arc::new(config), registry, pool, metrics, keys, lifecycle, rag })
    }
}
