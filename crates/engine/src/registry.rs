//! The registry of configured models: each entry's id, kind and load state. Entries exist from
//! startup; loading fills them in, so the server can answer (and report readiness) while models load.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::embed::Embedder;
use crate::kind::ModelKind;
use crate::rerank::Reranker;

/// A loaded model, by capability.
pub enum Served {
    Embedding(Embedder),
    Rerank(Reranker),
}

impl Served {
    pub fn kind(&self) -> ModelKind {
        match self {
            Self::Embedding(_) => ModelKind::Embedding,
            Self::Rerank(_) => ModelKind::Rerank,
        }
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        match self {
            Self::Embedding(e) => e.in_flight(),
            Self::Rerank(r) => r.in_flight(),
        }
    }

    pub fn shutdown(&self) {
        match self {
            Self::Embedding(e) => e.shutdown(),
            Self::Rerank(r) => r.shutdown(),
        }
    }
}

#[derive(Clone)]
pub enum LoadState {
    Loading,
    Ready(Arc<Served>),
    Failed(Arc<str>),
}

impl LoadState {
    pub fn as_str(&self) -> &'static str {
        match self {
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
    state: RwLock<LoadState>,
}

impl ModelEntry {
    pub fn state(&self) -> LoadState {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, state: LoadState) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
    }

    pub fn set_ready(&self, served: Served) {
        debug_assert_eq!(served.kind(), self.kind);
        self.set(LoadState::Ready(Arc::new(served)));
    }

    pub fn set_failed(&self, message: impl Into<Arc<str>>) {
        self.set(LoadState::Failed(message.into()));
    }
}

#[derive(Default)]
pub struct Registry {
    entries: Vec<Arc<ModelEntry>>,
    index: HashMap<Arc<str>, usize>,
}

impl Registry {
    /// Registers each `(id, kind)` in the loading state. Ids must be unique (config validation
    /// guarantees it); a repeated id keeps its first entry.
    pub fn new(models: impl IntoIterator<Item = (Arc<str>, ModelKind)>, created: u64) -> Self {
        let mut registry = Self::default();
        for (id, kind) in models {
            if registry.index.contains_key(&id) {
                continue;
            }
            registry.index.insert(Arc::clone(&id), registry.entries.len());
            registry.entries.push(Arc::new(ModelEntry {
                id,
                kind,
                created,
                state: RwLock::new(LoadState::Loading),
            }));
        }
        registry
    }

    pub fn get(&self, id: &str) -> Option<&Arc<ModelEntry>> {
        self.index.get(id).map(|&i| &self.entries[i])
    }

    pub fn entries(&self) -> &[Arc<ModelEntry>] {
        &self.entries
    }

    pub fn all_ready(&self) -> bool {
        self.entries.iter().all(|e| matches!(e.state(), LoadState::Ready(_)))
    }

    /// Stops every loaded model's worker after it finishes its queue.
    pub fn shutdown(&self) {
        for entry in &self.entries {
            if let LoadState::Ready(served) = entry.state() {
                served.shutdown();
            }
        }
    }
}
