//! Model lifecycle (what Ollama users expect): models load at startup or on their first request,
//! unload after `keep_alive` without requests, and can be loaded, unloaded and reloaded by an admin.
//!
//! - One load at a time per model: a request for a model that is unloaded starts its load, and
//!   every request for it waits for that load (up to `load_timeout`), instead of a 503.
//! - The load runs in its own task, so a client that leaves does not abandon it half done.
//! - An entry that reranks with another entry's embedding model (`embedding_model`) follows that
//!   model: loading it loads the embedder first; unloading the embedder unloads it too.
//! - A loaded model is watched by [`supervise`](crate::server::supervise) (reloaded if its owner
//!   thread dies); unloading stops the watch first.
//! - The idle reaper runs every [`REAP_EVERY`]: a model with requests in flight counts as used now;
//!   one idle for its `keep_alive` (and whose dependents are idle) is unloaded.
//! - A memory budget across models (`models_memory_mib`): before a load, the least recently used
//!   models without requests in flight are unloaded until the new one's estimate fits. If the
//!   models in use leave no room, the load is refused (429) rather than overcommitting; a single
//!   model larger than the whole budget still loads when it is the only one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hearth_engine::registry::{LoadState, ModelEntry, Registry, Served};
use hearth_engine::BoxFuture;
use tokio::task::JoinHandle;

use crate::config::{Config, KeepAlive, ModelConfig};
use crate::loader::Loader;
use crate::server::{supervise, Backoff};

/// How often idle models are looked for.
pub const REAP_EVERY: Duration = Duration::from_millis(250);

/// Who asked for a load or an unload (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Startup,
    Request,
    Admin,
    Idle,
    Budget,
    Reload,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::Request => "request",
            Self::Admin => "admin",
            Self::Idle => "idle",
            Self::Budget => "budget",
            Self::Reload => "reload",
        }
    }
}

/// Why a model could not be had.
#[derive(Debug)]
pub enum Unavailable {
    /// Still loading after `load_timeout`.
    StillLoading,
    Failed,
    /// The memory budget is held by models with requests in flight.
    NoRoom {
        budget: u64,
    },
}

pub struct Lifecycle {
    loader: Arc<Loader>,
    registry: Arc<Registry>,
    /// The current config of every model (replaced entry by entry by a reload).
    configs: RwLock<HashMap<Arc<str>, ModelConfig>>,
    /// The supervisor watching each loaded model.
    watchers: Mutex<HashMap<Arc<str>, JoinHandle<()>>>,
    /// Serialises load and unload decisions (state changes happen under it, loads outside it).
    decide: Mutex<()>,
    load_timeout: Duration,
    drain: Duration,
    /// Bytes all loaded models may take (estimated); `None`: unlimited.
    budget: Option<u64>,
    /// The estimate of every loaded (or loading) model.
    footprints: Mutex<HashMap<Arc<str>, u64>>,
    used: metrics::Gauge,
}

impl Lifecycle {
    pub fn new(config: &Config, loader: Loader, registry: Arc<Registry>) -> Self {
        let configs = config.models.iter().map(|m| (Arc::clone(&m.id), m.clone())).collect();
        Self {
            loader: Arc::new(loader),
            registry,
            configs: RwLock::new(configs),
            watchers: Mutex::new(HashMap::new()),
            decide: Mutex::new(()),
            load_timeout: config.server.model_load_timeout,
            drain: config.server.shutdown_timeout,
            budget: config.server.models_memory_budget,
            footprints: Mutex::new(HashMap::new()),
            used: metrics::gauge!("hearth_models_memory_bytes"),
        }
    }

    fn configs(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, ModelConfig>> {
        self.configs.read().unwrap_or_else(|p| p.into_inner())
    }

    fn config(&self, id: &str) -> Option<ModelConfig> {
        self.configs().get(id).cloned()
    }

    /// The config of the entry whose weights `model` uses: its own, or its embedding model's.
    fn owner(&self, model: &ModelConfig) -> ModelConfig {
        model.shares().and_then(|base| self.config(base)).unwrap_or_else(|| model.clone())
    }

    /// Entries that use `id`'s loaded model.
    fn dependents(&self, id: &str) -> Vec<Arc<ModelEntry>> {
        let ids: Vec<Arc<str>> = self
            .configs()
            .values()
            .filter(|c| c.shares().is_some_and(|s| &**s == id))
            .map(|c| Arc::clone(&c.id))
            .collect();
        ids.iter().filter_map(|id| self.registry.get(id)).collect()
    }

    /// Loads the models configured with `preload` one after another (bounding peak memory and
    /// I/O), those that share another's model last; the rest start unloaded. Returns when each has
    /// loaded or failed.
    pub async fn load_at_startup(self: &Arc<Self>) {
        let mut order: Vec<ModelConfig> = self.configs().values().cloned().collect();
        order.sort_by_key(|m| (m.shares().is_some(), self.position(&m.id)));
        for model in order {
            let Some(entry) = self.registry.get(&model.id) else { continue };
            // An entry sharing a model that is not loaded (not preloaded, or pushed out by the memory
            // budget) waits for its first request.
            let base_missing = model.shares().is_some_and(|base| {
                !self.registry.get(base).is_some_and(|b| matches!(b.state(), LoadState::Ready(_)))
            });
            if !self.owner(&model).preload || base_missing {
                entry.set_unloaded();
                continue;
            }
            entry.set_loading();
            self.run_load(entry, Trigger::Startup).await;
        }
    }

    fn position(&self, id: &str) -> usize {
        self.registry.entries().iter().position(|e| &*e.id == id).unwrap_or(usize::MAX)
    }

    /// Loads `entry` now, in this task, and starts watching it; the state says how it went.
    async fn run_load(self: &Arc<Self>, entry: Arc<ModelEntry>, trigger: Trigger) {
        let Some(config) = self.config(&entry.id) else { return };
        let started = Instant::now();
        if let Some(budget) = self.budget {
            let need = self.loader.footprint(&config).await;
            if !self.make_room(&entry, need, budget).await {
                tracing::warn!(model = %entry.id, need_mib = need >> 20, budget_mib = budget >> 20, "no room in the models' memory budget: the loaded models are in use");
                entry.set_unloaded();
                return;
            }
        }
        let loaded = self.loader.load(&config).await;
        if let (Ok(_), Some(_)) = (&loaded, self.budget) {
            // Hub weights are only on disk now: measure them.
            let measured = self.loader.footprint(&config).await;
            self.lock_footprints().insert(Arc::clone(&entry.id), measured);
        }
        self.report_memory();
        match loaded {
            Ok(served) => {
                let served = Arc::new(served);
                entry.touch();
                entry.set_ready(Arc::clone(&served));
                metrics::counter!("hearth_model_loads_total", "model" => entry.id.to_string(), "trigger" => trigger.as_str())
                    .increment(1);
                metrics::gauge!("hearth_model_loaded", "model" => entry.id.to_string()).set(1.0);
                tracing::info!(model = %entry.id, trigger = trigger.as_str(), seconds = started.elapsed().as_secs_f32(), "model ready");
                let (loader, reload_config) = (Arc::clone(&self.loader), config.clone());
                let reload = move || -> BoxFuture<'static, anyhow::Result<Served>> {
                    let (loader, config) = (Arc::clone(&loader), reload_config.clone());
                    Box::pin(async move { loader.load(&config).await })
                };
                let watcher = tokio::spawn(supervise(Arc::clone(&entry), served, reload, Backoff::default()));
                let old = self.lock_watchers().insert(Arc::clone(&entry.id), watcher);
                if let Some(old) = old {
                    old.abort();
                }
            }
            Err(err) => {
                self.lock_footprints().remove(&entry.id);
                let message = format!("{err:#}");
                tracing::error!(model = %entry.id, error = %message, "model failed to load");
                entry.set_failed(message);
            }
        }
    }

    /// The estimate of what the loaded models take, when there is a budget to hold it against.
    fn report_memory(&self) {
        if self.budget.is_some() {
            self.used.set(self.lock_footprints().values().sum::<u64>() as f64);
        }
    }

    fn lock_footprints(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, u64>> {
        self.footprints.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Unloads least recently used models without requests in flight until `need` more bytes
    /// fit, then reserves them for `entry`. False if the models in use leave no room.
    async fn make_room(self: &Arc<Self>, entry: &Arc<ModelEntry>, need: u64, budget: u64) -> bool {
        loop {
            let victim = {
                let _decide = self.lock_decide();
                let mut footprints = self.lock_footprints();
                let others: Vec<(Arc<str>, u64)> = footprints
                    .iter()
                    .filter(|(id, _)| **id != entry.id)
                    .map(|(id, &b)| (Arc::clone(id), b))
                    .collect();
                let used: u64 = others.iter().map(|(_, b)| b).sum();
                if used + need <= budget || others.is_empty() {
                    footprints.insert(Arc::clone(&entry.id), need);
                    return true;
                }
                others
                    .iter()
                    .filter_map(|(id, _)| self.registry.get(id))
                    .filter(|e| matches!(e.state(), LoadState::Ready(_)))
                    .filter(|e| {
                        std::iter::once(Arc::clone(e)).chain(self.dependents(&e.id)).all(|e| {
                            match e.state() {
                                LoadState::Ready(served) => served.in_flight() == 0,
                                _ => true,
                            }
                        })
                    })
                    .max_by_key(|e| e.idle_for())
            };
            match victim {
                Some(victim) => {
                    self.unload(&victim, Trigger::Budget).await;
                }
                None => return false,
            }
        }
    }

    fn lock_watchers(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, JoinHandle<()>>> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_decide(&self) -> std::sync::MutexGuard<'_, ()> {
        self.decide.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts loading `entry` unless it is loaded or loading; requests wait for such a load.
    fn start_load(self: &Arc<Self>, entry: &Arc<ModelEntry>, trigger: Trigger) {
        {
            let _decide = self.lock_decide();
            if !matches!(entry.state(), LoadState::Unloaded | LoadState::Failed(_)) {
                return;
            }
            entry.set_loading_on_demand();
        }
        let (this, entry) = (Arc::clone(self), Arc::clone(entry));
        tokio::spawn(async move {
            // An entry sharing another's model needs that one loaded first.
            if let Some(base) = this.config(&entry.id).and_then(|c| c.shares().cloned()) {
                if let Some(base) = this.registry.get(&base) {
                    this.start_load(&base, trigger);
                    if !matches!(base.settled().await, LoadState::Ready(_)) {
                        entry.set_unloaded(); // the requests waiting for it get the reason
                        return;
                    }
                }
            }
            this.run_load(entry, trigger).await;
        });
    }

    /// The served model for a request: at once if loaded; else it is loaded (or its load in
    /// progress awaited) for up to `load_timeout`. A model still loading at startup answers at
    /// once, so the caller can say 503 `model_loading` while the server is coming up.
    pub async fn acquire(self: &Arc<Self>, entry: &Arc<ModelEntry>) -> Result<Arc<Served>, Unavailable> {
        // Under the decision lock, so the reaper cannot unload it between this look and the touch.
        let state = {
            let _decide = self.lock_decide();
            entry.touch();
            entry.state()
        };
        match state {
            LoadState::Ready(served) => return Ok(served),
            LoadState::Loading if !entry.loading_on_demand() => return Err(Unavailable::StillLoading),
            LoadState::Failed(_) => return Err(Unavailable::Failed),
            LoadState::Unloaded => self.start_load(entry, Trigger::Request),
            LoadState::Loading => {}
        }
        match tokio::time::timeout(self.load_timeout, entry.settled()).await {
            Ok(LoadState::Ready(served)) => {
                entry.touch();
                Ok(served)
            }
            Ok(LoadState::Failed(_)) => Err(Unavailable::Failed),
            // Settled unloaded: the budget had no room for it.
            Ok(LoadState::Unloaded) => match self.budget {
                Some(budget) => Err(Unavailable::NoRoom { budget }),
                None => Err(Unavailable::StillLoading),
            },
            Ok(LoadState::Loading) | Err(_) => Err(Unavailable::StillLoading),
        }
    }

    /// Loads `id` (an admin request) and waits for the outcome.
    pub async fn load(self: &Arc<Self>, entry: &Arc<ModelEntry>) -> LoadState {
        self.start_load(entry, Trigger::Admin);
        let _ = tokio::time::timeout(self.load_timeout, entry.settled()).await;
        entry.state()
    }

    /// Unloads `entry` (and the entries that share its model): new requests load it again;
    /// requests already admitted finish first (within the shutdown drain). False if it was not loaded.
    pub async fn unload(self: &Arc<Self>, entry: &Arc<ModelEntry>, trigger: Trigger) -> bool {
        let mut stopped = Vec::new();
        {
            let _decide = self.lock_decide();
            let family: Vec<_> =
                std::iter::once(Arc::clone(entry)).chain(self.dependents(&entry.id)).collect();
            if trigger == Trigger::Idle && !family.iter().all(|e| self.is_idle(e)) {
                return false; // used since the reaper looked
            }
            for e in family {
                if let LoadState::Ready(served) = e.state() {
                    self.lock_footprints().remove(&e.id);
                    if let Some(watcher) = self.lock_watchers().remove(&e.id) {
                        watcher.abort();
                    }
                    e.set_unloaded();
                    metrics::counter!("hearth_model_unloads_total", "model" => e.id.to_string(), "trigger" => trigger.as_str())
                        .increment(1);
                    metrics::gauge!("hearth_model_loaded", "model" => e.id.to_string()).set(0.0);
                    tracing::info!(model = %e.id, trigger = trigger.as_str(), idle_secs = e.idle_for().as_secs_f32(), "model unloaded");
                    stopped.push(served);
                }
            }
        }
        let unloaded = !stopped.is_empty();
        self.report_memory();
        // Requests already holding the model finish first (within the drain): new ones see it
        // unloaded and load it again. Stopping waits, so it runs off the async threads.
        let deadline = Instant::now() + self.drain;
        let _ = tokio::task::spawn_blocking(move || {
            while stopped.iter().any(|s| s.in_flight() > 0) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            for served in &stopped {
                served.begin_shutdown(deadline);
            }
            for served in stopped {
                served.shutdown(deadline);
            }
        })
        .await;
        unloaded
    }

    /// Unloads, then loads again (new weights on disk, or a model in a bad way).
    pub async fn reload(self: &Arc<Self>, entry: &Arc<ModelEntry>) -> LoadState {
        self.unload(entry, Trigger::Admin).await;
        self.load(entry).await
    }

    /// Applies a reloaded config's models: removed ones are unloaded (their requests in flight
    /// finish) and no longer found; changed ones are unloaded and loaded again with their new
    /// config (and so are entries sharing a changed model); added ones are registered and loaded
    /// (or left for their first request). Requests to the other models are untouched.
    pub async fn apply(self: &Arc<Self>, config: &Config) -> Changes {
        let old = self.configs().clone();
        let new: HashMap<Arc<str>, ModelConfig> =
            config.models.iter().map(|m| (Arc::clone(&m.id), m.clone())).collect();
        let mut changes = Changes::default();
        for (id, model) in &old {
            match new.get(id) {
                None => changes.removed.push(Arc::clone(id)),
                Some(now) if now != model => changes.changed.push(Arc::clone(id)),
                Some(_) => {}
            }
        }
        // An entry sharing a changed or removed model holds the old one: it is changed too.
        for (id, model) in &new {
            let base_moved = model
                .shares()
                .is_some_and(|base| changes.changed.contains(base) || changes.removed.contains(base));
            if old.contains_key(id) && base_moved && !changes.changed.contains(id) {
                changes.changed.push(Arc::clone(id));
            }
        }
        changes.added =
            config.models.iter().filter(|m| !old.contains_key(&m.id)).map(|m| Arc::clone(&m.id)).collect();

        for id in &changes.removed {
            if let Some(entry) = self.registry.get(id) {
                self.unload(&entry, Trigger::Reload).await;
                self.registry.remove(id);
            }
            self.configs.write().unwrap_or_else(|p| p.into_inner()).remove(id);
            metrics::gauge!("hearth_model_loaded", "model" => id.to_string()).set(0.0);
        }
        let mut to_load = Vec::new();
        for id in &changes.changed {
            let Some(entry) = self.registry.get(id) else { continue };
            let was_loaded = matches!(entry.state(), LoadState::Ready(_) | LoadState::Loading);
            let model = new[id].clone();
            self.unload(&entry, Trigger::Reload).await;
            let entry = if model.kind != entry.kind {
                self.registry.remove(id);
                self.registry.insert(Arc::clone(id), model.kind)
            } else {
                entry
            };
            entry.set_unloaded();
            let preload = model.preload;
            self.configs.write().unwrap_or_else(|p| p.into_inner()).insert(Arc::clone(id), model);
            if was_loaded || preload {
                to_load.push(entry);
            }
        }
        for model in config.models.iter().filter(|m| changes.added.contains(&m.id)) {
            self.configs
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(Arc::clone(&model.id), model.clone());
            let entry = self.registry.insert(Arc::clone(&model.id), model.kind);
            entry.set_unloaded();
            if self.owner(model).preload {
                to_load.push(entry);
            }
        }
        // Models first, then the entries that share them (which load their model first anyway).
        to_load.sort_by_key(|e| self.config(&e.id).is_some_and(|c| c.shares().is_some()));
        for entry in to_load {
            self.start_load(&entry, Trigger::Reload);
            let _ = tokio::time::timeout(self.load_timeout, entry.settled()).await;
        }
        changes
    }

    /// Every [`REAP_EVERY`]: models busy now count as used now; models idle for their
    /// `keep_alive` (with idle dependents) are unloaded.
    pub async fn reap_idle(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REAP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for entry in self.registry.entries() {
                if let LoadState::Ready(served) = entry.state() {
                    if served.in_flight() > 0 {
                        entry.touch();
                    }
                }
            }
            for entry in self.registry.entries() {
                let Some(config) = self.config(&entry.id) else { continue };
                if config.keep_alive == KeepAlive::Forever
                    || config.shares().is_some()
                    || !matches!(entry.state(), LoadState::Ready(_))
                {
                    continue;
                }
                let idle = std::iter::once(Arc::clone(&entry))
                    .chain(self.dependents(&entry.id))
                    .all(|e| self.is_idle(&e));
                if idle {
                    self.unload(&entry, Trigger::Idle).await;
                }
            }
        }
    }

    /// Loaded, nothing in flight, and unused for the `keep_alive` of the model whose weights it
    /// uses (at least [`MIN_IDLE`], so a request between finding the model and being admitted is
    /// never cut off).
    fn is_idle(&self, entry: &ModelEntry) -> bool {
        let Some(config) = self.config(&entry.id) else { return false };
        let KeepAlive::Idle(keep_alive) = self.owner(&config).keep_alive else { return false };
        match entry.state() {
            LoadState::Ready(served) => {
                served.in_flight() == 0 && entry.idle_for() >= keep_alive.max(MIN_IDLE)
            }
            _ => true,
        }
    }
}

/// The shortest idle time before an unload (`keep_alive = 0` means "about a second after the last
/// request").
pub const MIN_IDLE: Duration = Duration::from_secs(1);

/// What a config reload changed, by model id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<Arc<str>>,
    pub removed: Vec<Arc<str>>,
    pub changed: Vec<Arc<str>>,
}
