//! The running server: background model loading and supervision, listening, and a graceful
//! shutdown that lets queued work finish until a deadline.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hearth_engine::registry::{ModelEntry, Served};
use hearth_engine::BoxFuture;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::config::{Config, Overrides};
use crate::lifecycle::Changes;
use crate::state::AppState;
use crate::{http, telemetry};

/// Loads the models configured with `preload` one after another (bounding peak memory and I/O),
/// marking each ready or failed; entries that use another entry's model come last, and the others
/// start unloaded (loaded by their first request). A failed model does not stop the others;
/// `/ready` reports it. Every loaded model is then supervised (see [`supervise`]).
pub async fn load_models(state: AppState) {
    state.lifecycle.load_at_startup().await;
}

/// How long a supervisor waits before reloading a model: `first`, doubling after each failed
/// attempt, up to `max`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { first: Duration::from_secs(1), max: Duration::from_secs(60) }
    }
}

/// Watches a loaded model. When its owner thread dies (its requests already get 503 and `/ready`
/// reports it failed), reloads it with `reload`, retrying with `backoff` until a load succeeds, then
/// watches the new one.
pub async fn supervise<F>(entry: Arc<ModelEntry>, mut served: Arc<Served>, reload: F, backoff: Backoff)
where
    F: Fn() -> BoxFuture<'static, anyhow::Result<Served>> + Send,
{
    loop {
        served.failed().await;
        tracing::error!(model = %entry.id, "the model's owner thread died; reloading it");
        let mut delay = backoff.first;
        loop {
            tokio::time::sleep(delay).await;
            entry.set_loading();
            match reload().await {
                Ok(new) => {
                    served = Arc::new(new);
                    entry.set_ready(Arc::clone(&served));
                    tracing::info!(model = %entry.id, "model reloaded");
                    break;
                }
                Err(err) => {
                    let message = format!("{err:#}");
                    tracing::error!(model = %entry.id, error = %message, retry_in = ?delay * 2, "reloading failed");
                    entry.set_failed(message);
                    delay = (delay * 2).min(backoff.max);
                }
            }
        }
    }
}

/// Reads the config file again (on SIGHUP) and applies what can change while serving: the models
/// (added, removed, changed; the others keep serving) and the API keys. Settings that need a
/// restart (the listen address, limits, logging, the models directory, `metrics_require_key`) are
/// reported, not applied. A config that does not validate changes nothing.
pub async fn reload(state: &AppState, overrides: &Overrides) -> anyhow::Result<Changes> {
    let path = state.config.file.clone().context("the server was not started from a config file")?;
    let new = Config::load(&path, overrides).map_err(|e| anyhow::anyhow!("{e}"))?;
    let old = &state.config;
    let restart: Vec<&str> = [
        ("server", new.server != old.server),
        ("logging", new.logging != old.logging),
        ("models_dir", new.models_dir != old.models_dir),
        ("auth.metrics_require_key", new.auth.metrics_require_key != old.auth.metrics_require_key),
    ]
    .into_iter()
    .filter_map(|(what, changed)| changed.then_some(what))
    .collect();
    if !restart.is_empty() {
        tracing::warn!(settings = ?restart, "these settings changed in the config file; they take effect on restart");
    }
    let keys = state.keys.replace(&new.auth);
    let changes = state.lifecycle.apply(&new).await;
    rescan_voices(state).await;
    tracing::info!(
        config = %path.display(),
        added = ?changes.added,
        removed = ?changes.removed,
        changed = ?changes.changed,
        keys,
        "config reloaded"
    );
    Ok(changes)
}

/// Looks again at the voices folders of every loaded `tts` model (voices dropped in or removed).
pub async fn rescan_voices(state: &AppState) {
    use hearth_engine::registry::{LoadState, Served};
    use hearth_engine::synthesize::Synthesize;
    for entry in state.registry.entries() {
        let LoadState::Ready(served) = entry.state() else { continue };
        if let Served::Tts(synth) = &*served {
            if let Err(error) = synth.rescan().await {
                tracing::error!(model = %entry.id, %error, "could not look for new voices");
            }
        }
    }
}

/// Reloads the config on every SIGHUP, until the server stops.
async fn reload_on_hangup(state: AppState, overrides: Overrides) {
    #[cfg(unix)]
    {
        let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => signal,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; config reloads are off");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            if let Err(e) = reload(&state, &overrides).await {
                tracing::error!(error = %format!("{e:#}"), "the config was not reloaded; nothing changed");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (state, overrides);
}

pub async fn serve(config: Config, overrides: Overrides) -> anyhow::Result<()> {
    let address = format!("{}:{}", config.server.host, config.server.port);
    let listener =
        TcpListener::bind(&address).await.with_context(|| format!("cannot listen on {address}"))?;
    let state = AppState::new(config)?;
    telemetry::spawn_upkeep(state.metrics.clone());
    tracing::info!(
        address = %listener.local_addr()?,
        models = state.config.models.len(),
        models_dir = %state.config.models_dir.display(),
        "listening"
    );
    let auth = &state.config.auth;
    if auth.enabled() {
        tracing::info!(keys = auth.keys.len(), metrics_keyed = auth.metrics_require_key, "API keys required");
    } else if !state.config.server.listens_on_loopback() {
        tracing::warn!(
            host = %state.config.server.host,
            "NO API KEYS ARE CONFIGURED and Hearth listens beyond loopback: anyone who can reach this port \
             can use every model. Set `[auth] keys_file` (or `[[auth.keys]]`, or HEARTH_API_KEY)"
        );
    }
    let loading = tokio::spawn(load_models(state.clone()));
    if let Some(rag) = &state.rag {
        tracing::info!(data_dir = %rag.config.data_dir.display(), "files and vector stores enabled");
        rag.resume(&state);
        rag.spawn_saver();
    }
    let reaper = tokio::spawn(Arc::clone(&state.lifecycle).reap_idle());
    let reloads = tokio::spawn(reload_on_hangup(state.clone(), overrides));
    let (stop_accepting, stop) = tokio::sync::oneshot::channel::<()>();
    let serving = axum::serve(listener, http::router(state.clone())).with_graceful_shutdown(async move {
        let _ = stop.await;
    });
    let mut server = tokio::spawn(async move { serving.await });
    tokio::select! {
        result = &mut server => return result?.context("server error"),
        () = shutdown_signal() => {}
    }
    let timeout = state.config.server.shutdown_timeout;
    let deadline = Instant::now() + timeout;
    tracing::info!(timeout_secs = timeout.as_secs(), "shutting down: finishing queued work");
    loading.abort();
    reaper.abort();
    reloads.abort();
    let _ = stop_accepting.send(());
    // Models refuse new work at once and answer what is still queued at the deadline with 503, so
    // every open request ends by then.
    let registry = Arc::clone(&state.registry);
    let std_deadline = deadline.into_std();
    let draining = tokio::task::spawn_blocking(move || registry.shutdown(std_deadline));
    match tokio::time::timeout_at(deadline + Duration::from_secs(1), &mut server).await {
        Ok(result) => result?.context("server error")?,
        Err(_) => tracing::warn!("connections were still open after the shutdown deadline"),
    }
    draining.await?;
    if let Some(rag) = &state.rag {
        // Ingests still running are `in_progress` in the record and resume at the next start.
        let library = Arc::clone(&rag.library);
        match tokio::task::spawn_blocking(move || library.flush()).await {
            Ok(Ok(())) => tracing::info!("vector indexes saved"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot save the vector indexes; the next start replays them")
            }
            Err(e) => tracing::warn!(error = %e, "saving the vector indexes failed"),
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
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
    tracing::info!("shutdown signal received");
}
