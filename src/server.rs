//! The running server: shared state, background model loading, listening, graceful shutdown.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hearth_engine::registry::Registry;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::store::Store;
use crate::{http, loader, telemetry};

/// Everything a request handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    pub metrics: PrometheusHandle,
}

impl AppState {
    /// Registers every configured model as loading; nothing is loaded yet.
    pub fn new(config: Config) -> Self {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let registry = Registry::new(config.models.iter().map(|m| (Arc::clone(&m.id), m.kind)), created);
        Self { config: Arc::new(config), registry: Arc::new(registry), metrics: telemetry::metrics() }
    }
}

/// Loads the configured models one after another (bounding peak memory and I/O), marking each
/// ready or failed. A failed model does not stop the others; `/ready` reports it.
pub async fn load_models(state: AppState) {
    let store = Store::new(state.config.models_dir.clone());
    for model in &state.config.models {
        let Some(entry) = state.registry.get(&model.id) else { continue };
        let started = std::time::Instant::now();
        match loader::load(model, &store).await {
            Ok(served) => {
                entry.set_ready(served);
                tracing::info!(model = %model.id, seconds = started.elapsed().as_secs_f32(), "model ready");
            }
            Err(err) => {
                let message = format!("{err:#}");
                tracing::error!(model = %model.id, error = %message, "model failed to load");
                entry.set_failed(message);
            }
        }
    }
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let address = format!("{}:{}", config.server.host, config.server.port);
    let listener =
        TcpListener::bind(&address).await.with_context(|| format!("cannot listen on {address}"))?;
    let state = AppState::new(config);
    telemetry::spawn_upkeep(state.metrics.clone());
    tracing::info!(
        address = %listener.local_addr()?,
        models = state.config.models.len(),
        models_dir = %state.config.models_dir.display(),
        "listening"
    );
    let loading = tokio::spawn(load_models(state.clone()));
    axum::serve(listener, http::router(state.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("server error")?;
    loading.abort();
    tracing::info!("finishing queued work");
    let registry = Arc::clone(&state.registry);
    tokio::task::spawn_blocking(move || registry.shutdown()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM; in-flight requests then finish before the process exits.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received; draining connections");
}
