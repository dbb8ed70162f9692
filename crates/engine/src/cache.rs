//! A model's result cache: outputs by the exact token sequence that produced them (ids and token
//! types), least recently used evicted first, bounded in bytes. Shared by every request to the
//! model; a hit never reaches the queue. Hit, miss and byte counts go to the metrics.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::encoder::Sequence;
use crate::error::EngineError;

/// Bytes an entry is charged besides its key and value: the maps' nodes and the `Arc`.
const ENTRY_OVERHEAD: usize = 96;

type Key = (Vec<u32>, Vec<u32>);

struct Entry {
    value: Arc<[f32]>,
    tick: u64,
    bytes: usize,
}

struct State {
    entries: HashMap<Key, Entry>,
    /// Last use → key, oldest first.
    order: BTreeMap<u64, Key>,
    tick: u64,
    bytes: usize,
}

pub struct ResultCache {
    model: Arc<str>,
    max_bytes: usize,
    state: Mutex<State>,
}

impl ResultCache {
    /// `None` when `max_bytes` is 0 (the cache is off).
    pub fn new(model: Arc<str>, max_bytes: usize) -> Option<Self> {
        (max_bytes > 0).then(|| ResultCache {
            model,
            max_bytes,
            state: Mutex::new(State { entries: HashMap::new(), order: BTreeMap::new(), tick: 0, bytes: 0 }),
        })
    }

    fn key(sequence: &Sequence) -> Key {
        (sequence.ids.clone(), sequence.type_ids.clone())
    }

    /// The cached output of each sequence, if there is one (a hit makes it the most recent).
    pub fn get_all(&self, sequences: &[Sequence]) -> Vec<Option<Arc<[f32]>>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let found: Vec<Option<Arc<[f32]>>> = sequences
            .iter()
            .map(|sequence| {
                let key = Self::key(sequence);
                state.tick += 1;
                let tick = state.tick;
                let entry = state.entries.get_mut(&key)?;
                let old = std::mem::replace(&mut entry.tick, tick);
                let value = Arc::clone(&entry.value);
                state.order.remove(&old);
                state.order.insert(tick, key);
                Some(value)
            })
            .collect();
        drop(state);
        let hits = found.iter().filter(|f| f.is_some()).count() as u64;
        let labels = [("model", self.model.to_string())];
        metrics::counter!("hearth_cache_hits_total", &labels).increment(hits);
        metrics::counter!("hearth_cache_misses_total", &labels).increment(sequences.len() as u64 - hits);
        found
    }

    /// Stores outputs, evicting the least recently used until the cache fits its bound, and returns
    /// the value each sequence now stands for: when requests computed the same sequence at once,
    /// the first stored wins and the others answer with it, so identical inputs never get
    /// different answers. An output larger than the whole bound is not kept.
    pub fn insert_all(&self, items: impl IntoIterator<Item = (Sequence, Arc<[f32]>)>) -> Vec<Arc<[f32]>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut answers = Vec::new();
        for (sequence, value) in items {
            let bytes = (sequence.ids.len() + sequence.type_ids.len() + value.len()) * 4 + ENTRY_OVERHEAD;
            let key = (sequence.ids, sequence.type_ids);
            if let Some(existing) = state.entries.get(&key) {
                answers.push(Arc::clone(&existing.value));
                continue;
            }
            answers.push(Arc::clone(&value));
            if bytes > self.max_bytes {
                continue;
            }
            state.tick += 1;
            let tick = state.tick;
            while state.bytes + bytes > self.max_bytes {
                let Some((_, oldest)) = state.order.pop_first() else { break };
                if let Some(evicted) = state.entries.remove(&oldest) {
                    state.bytes -= evicted.bytes;
                }
            }
            state.order.insert(tick, key.clone());
            state.entries.insert(key, Entry { value, tick, bytes });
            state.bytes += bytes;
        }
        let used = state.bytes;
        drop(state);
        metrics::gauge!("hearth_cache_bytes", "model" => self.model.to_string()).set(used as f64);
        answers
    }

    /// Each sequence's output: from the cache where it holds one, the misses through `run` (one
    /// call, in order; not called when everything hits), which are then stored. The answers are
    /// in the order of `sequences`.
    pub async fn through<F, Fut>(
        &self,
        sequences: Vec<Sequence>,
        run: F,
    ) -> Result<Vec<Arc<[f32]>>, EngineError>
    where
        F: FnOnce(Vec<Sequence>) -> Fut,
        Fut: Future<Output = Result<Vec<Arc<[f32]>>, EngineError>>,
    {
        let found = self.get_all(&sequences);
        let misses: Vec<Sequence> =
            sequences.into_iter().zip(&found).filter(|(_, f)| f.is_none()).map(|(s, _)| s).collect();
        let mut computed = if misses.is_empty() {
            Vec::new().into_iter()
        } else {
            let outputs = run(misses.clone()).await?;
            if outputs.len() != misses.len() {
                return Err(EngineError::Internal {
                    message: format!(
                        "the model returned {} outputs for {} sequences",
                        outputs.len(),
                        misses.len()
                    ),
                });
            }
            self.insert_all(misses.into_iter().zip(outputs)).into_iter()
        };
        found
            .into_iter()
            .map(|hit| {
                hit.or_else(|| computed.next()).ok_or_else(|| EngineError::Internal {
                    message: "the model returned fewer outputs than sequences".into(),
                })
            })
            .collect()
    }

    /// Outputs held now.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(ids: &[u32]) -> Sequence {
        Sequence::new(ids.to_vec())
    }

    fn value(x: f32, n: usize) -> Arc<[f32]> {
        vec![x; n].into()
    }

    #[test]
    fn the_first_stored_value_answers_for_a_sequence() {
        let cache = ResultCache::new("m".into(), 1 << 20).unwrap();
        assert_eq!(&*cache.insert_all([(seq(&[1]), value(0.25, 2))])[0], &[0.25, 0.25]);
        // Computed again concurrently (a slightly different float): the stored one is the answer.
        assert_eq!(&*cache.insert_all([(seq(&[1]), value(0.2500001, 2))])[0], &[0.25, 0.25]);
    }

    #[test]
    fn hits_return_what_was_stored() {
        let cache = ResultCache::new("m".into(), 1 << 20).unwrap();
        assert!(ResultCache::new("off".into(), 0).is_none());
        cache.insert_all([(seq(&[1, 2]), value(0.5, 4))]);
        let found = cache.get_all(&[seq(&[1, 2]), seq(&[1, 3]), seq(&[1])]);
        assert_eq!(found[0].as_deref(), Some(&[0.5f32; 4][..]));
        assert!(found[1].is_none() && found[2].is_none());
        // Token types are part of the key (a pair differs from the same ids as one segment).
        let pair = Sequence { ids: vec![1, 2], type_ids: vec![0, 1] };
        assert!(cache.get_all(&[pair])[0].is_none());
    }

    #[test]
    fn property_the_bound_holds_and_the_least_recent_goes_first() {
        let entry_bytes = (2 + 2 + 16) * 4 + ENTRY_OVERHEAD;
        let cache = ResultCache::new("m".into(), entry_bytes * 3).unwrap();
        for i in 0..100u32 {
            cache.insert_all([(seq(&[i, i]), value(i as f32, 16))]);
            assert!(cache.bytes() <= cache.max_bytes());
            if i == 2 {
                // All three fit; looking them up in this order leaves 1 the least recent.
                let found = cache.get_all(&[seq(&[1, 1]), seq(&[0, 0]), seq(&[2, 2])]);
                assert!(found.iter().all(Option::is_some));
            }
            if i == 3 {
                let found = cache.get_all(&[seq(&[0, 0]), seq(&[1, 1]), seq(&[3, 3])]);
                assert!(found[0].is_some() && found[1].is_none() && found[2].is_some(), "1 was evicted");
            }
        }
        assert_eq!(cache.bytes(), entry_bytes * 3);
        assert!(cache.get_all(&[seq(&[99, 99])])[0].is_some());
        // Too big for the whole bound: not kept, nothing evicted for it.
        cache.insert_all([(seq(&[7]), value(1.0, 1000))]);
        assert!(cache.get_all(&[seq(&[7])])[0].is_none());
        assert!(cache.get_all(&[seq(&[99, 99])])[0].is_some());
    }
}
