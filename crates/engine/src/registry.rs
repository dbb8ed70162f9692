//! The registry of configured models: each entry's id, kind, load state and when it was last used.
//! Entries exist from startup; loading fills them in, so the server can answer (and report
//! readiness) while models load, a supervisor can replace a model whose owner thread died, and an
//! idle model can be unloaded and loaded again on its next request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::embed::Embedder;
use crate::generate::service::Generator;
use crate::kind::ModelKind;
use crate::rerank::Reranker;
use crate::synthesize::Synthesizer;
use crate::transcribe::Transcriber;

/// A loaded model, by capability.
pub enum Served {
    Llm(Arc<Generator>),
    Stt(Arc<Transcriber>),
    Tts(Arc<Synthesizer>),
    Embedding(Arc<Embedder>),
    Rerank(Reranker),
}

impl Served {
    pub fn kind(&self) -> ModelKind {
        match self {
            Self::Llm(_) => ModelKind::Llm,
            Self::Stt(_) => ModelKind::Stt,
            Self::Tts(_) => ModelKind::Tts,
            Self::Embedding(_) => ModelKind::Embedding,
            Self::Rerank(_) => ModelKind::Rerank,
        }
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        match self {
            Self::Llm(g) => g.in_flight(),
            Self::Stt(t) => t.in_flight(),
            Self::Tts(t) => t.in_flight(),
            Self::Embedding(e) => e.in_flight(),
            Self::Rerank(r) => r.in_flight(),
        }
    }

    /// False once the owner thread doing its work has died.
    pub fn is_alive(&self) -> bool {
        match self {
            Self::Llm(g) => g.scheduler().is_alive(),
            Self::Stt(t) => t.is_alive(),
            Self::Tts(t) => t.is_alive(),
            Self::Embedding(e) => e.service().worker.is_alive(),
            Self::Rerank(r) => r.is_alive(),
        }
    }

    /// Resolves once the owner thread doing its work has died.
    pub async fn failed(&self) {
        match self {
            Self::Llm(g) => g.scheduler().failed().await,
            Self::Stt(t) => t.failed().await,
            Self::Tts(t) => t.failed().await,
            Self::Embedding(e) => e.service().worker.failed().await,
            Self::Rerank(r) => r.failed().await,
        }
    }

    /// Refuses new work from now on; queued work goes on until `deadline`.
    pub fn begin_shutdown(&self, deadline: Instant) {
        self.worker_shutdown(deadline, false);
    }

    /// Lets queued work finish until `deadline`, then stops (see `EncoderHandle::shutdown`).
    pub fn shutdown(&self, deadline: Instant) {
        self.worker_shutdown(deadline, true);
    }

    fn worker_shutdown(&self, deadline: Instant, wait: bool) {
        let stop = |begin: &dyn Fn(Instant), finish: &dyn Fn(Instant)| {
            if wait {
                finish(deadline)
            } else {
                begin(deadline)
            }
        };
        match self {
            Self::Llm(g) => stop(&|d| g.scheduler().begin_shutdown(d), &|d| g.scheduler().shutdown(d)),
            Self::Stt(t) => stop(&|d| t.begin_shutdown(d), &|d| t.shutdown(d)),
            Self::Tts(t) => stop(&|d| t.begin_shutdown(d), &|d| t.shutdown(d)),
            Self::Embedding(e) | Self::Rerank(Reranker::BiEncoder { embedder: e, .. }) => {
                let worker = &e.service().worker;
                stop(&|d| worker.begin_shutdown(d), &|d| worker.shutdown(d))
            }
            Self::Rerank(Reranker::CrossEncoder { service, .. }) => {
                let worker = &service.worker;
                stop(&|d| worker.begin_shutdown(d), &|d| worker.shutdown(d))
            }
        }
    }
}

#[derive(Clone)]
pub enum LoadState {
    /// Configured, not in memory: loaded by its next request (or an admin `load`).
    Unloaded,
    Loading,
    Ready(Arc<Served>),
    /// Why, for the logs (never shown to clients).
    Failed(Arc<str>),
}

impl LoadState {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Unloaded => "unloaded",
            Self::Loading => "loading",
            Self::Ready(_) => "ready",
            Self::Failed(_) => "failed",
        }
    }
}

pub struct ModelEntry {
    pub id: Arc<str>,
    pub kind: ModelKind,
    /// Unix seconds when the entry was registered (OpenAI's `created`).
    pub created: u64,
    state: watch::Sender<LoadState>,
    /// Milliseconds after `epoch` of the last request (or of the last time it was seen busy).
    last_used: AtomicU64,
    epoch: Instant,
    /// The load in progress was asked for by a request: requests wait for it instead of a 503.
    on_demand: AtomicBool,
}

impl ModelEntry {
    /// The current state; a ready model whose owner thread has died reads as failed.
    pub fn state(&self) -> LoadState {
        match &*self.state.borrow() {
            LoadState::Ready(served) if !served.is_alive() => {
                LoadState::Failed("the model's owner thread died; it is being restarted".into())
            }
            state => state.clone(),
        }
    }

    pub fn set_loading(&self) {
        self.on_demand.store(false, Ordering::Relaxed);
        self.state.send_replace(LoadState::Loading);
    }

    /// Loading because a request (or an admin) asked for it; requests wait for it.
    pub fn set_loading_on_demand(&self) {
        self.on_demand.store(true, Ordering::Relaxed);
        self.state.send_replace(LoadState::Loading);
    }

    /// Whether the load in progress was asked for by a request.
    pub fn loading_on_demand(&self) -> bool {
        self.on_demand.load(Ordering::Relaxed) && matches!(*self.state.borrow(), LoadState::Loading)
    }

    pub fn set_unloaded(&self) {
        self.state.send_replace(LoadState::Unloaded);
    }

    /// Marks the model used now.
    pub fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_used.fetch_max(now, Ordering::Relaxed);
    }

    /// How long since the model was last used.
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_used.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    pub fn set_ready(&self, served: Arc<Served>) {
        debug_assert_eq!(served.kind(), self.kind);
        self.state.send_replace(LoadState::Ready(served));
    }

    pub fn set_failed(&self, message: impl Into<Arc<str>>) {
        self.state.send_replace(LoadState::Failed(message.into()));
    }

    /// Waits until the entry is ready or has failed, and returns that state.
    pub async fn settled(&self) -> LoadState {
        let mut updates = self.state.subscribe();
        loop {
            let state = self.state();
            if !matches!(state, LoadState::Loading) {
                return state;
            }
            if updates.changed().await.is_err() {
                return self.state();
            }
        }
    }
}

/// The configured models, in config order. Entries are added and removed only by a config reload;
/// readers get their own `Arc`s, so a removed entry lives on for the requests that hold it.
#[derive(Default)]
pub struct Registry {
    entries: std::sync::RwLock<Vec<Arc<ModelEntry>>>,
    created: u64,
}

impl Registry {
    /// Registers each `(id, kind)` in the loading state. Ids must be unique (config validation
    /// guarantees it); a repeated id keeps its first entry.
    pub fn new(models: impl IntoIterator<Item = (Arc<str>, ModelKind)>, created: u64) -> Self {
        let registry = Self { entries: Default::default(), created };
        for (id, kind) in models {
            registry.insert(id, kind);
        }
        registry
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<ModelEntry>>> {
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an entry in the loading state (at the end); the existing entry if `id` is taken.
    pub fn insert(&self, id: Arc<str>, kind: ModelKind) -> Arc<ModelEntry> {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = entries.iter().find(|e| e.id == id) {
            return Arc::clone(entry);
        }
        let entry = Arc::new(ModelEntry {
            id,
            kind,
            created: self.created,
            state: watch::Sender::new(LoadState::Loading),
            last_used: AtomicU64::new(0),
            epoch: Instant::now(),
            on_demand: AtomicBool::new(false),
        });
        entries.push(Arc::clone(&entry));
        entry
    }

    /// Removes `id`'s entry: new requests no longer find it.
    pub fn remove(&self, id: &str) -> Option<Arc<ModelEntry>> {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let position = entries.iter().position(|e| &*e.id == id)?;
        Some(entries.remove(position))
    }

    pub fn get(&self, id: &str) -> Option<Arc<ModelEntry>> {
        self.read().iter().find(|e| &*e.id == id).cloned()
    }

    /// Every entry, in config order.
    pub fn entries(&self) -> Vec<Arc<ModelEntry>> {
        self.read().clone()
    }

    /// Stops every loaded model taking new work at once, lets each finish its queued work until
    /// `deadline`, then stops them.
    pub fn shutdown(&self, deadline: Instant) {
        let loaded: Vec<Arc<Served>> = self
            .read()
            .iter()
            .filter_map(|entry| match &*entry.state.borrow() {
                LoadState::Ready(served) => Some(Arc::clone(served)),
                _ => None,
            })
            .collect();
        for served in &loaded {
            served.begin_shutdown(deadline);
        }
        for served in &loaded {
            served.shutdown(deadline);
        }
    }
}
