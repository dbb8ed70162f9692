//! One vector store's dense index: usearch's HNSW graph over the chunks' vectors, keyed by chunk
//! key, with exact (brute force) search while the store is small. Saved to `dense.usearch` with a
//! `dense.json` beside it naming the last chunk sequence number and removal it holds, so a store
//! reopened after a crash replays only what SQLite has beyond that.
//!
//! Why usearch (`cargo bench --bench ann`, benches/README.md): beside hnsw_rs with the same graph
//! settings, at 100,000 vectors it builds 3.1x faster and searches 1.9-2.5x faster at the same
//! recall, with less memory and disk, and it removes keys from the graph (hnsw_rs cannot). At
//! 1,000,000 vectors and the store's search width its recall@10 is 0.998, at 117x the queries/s of
//! brute force.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::RagError;

/// How vectors compare. `Dot` for normalised embeddings (the same order as cosine, cheaper);
/// `Cosine` for models whose vectors are not normalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Cosine,
    Dot,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cosine => "cosine",
            Self::Dot => "dot",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "cosine" => Some(Self::Cosine),
            "dot" => Some(Self::Dot),
            _ => None,
        }
    }
}

/// The graph's settings (`cargo bench --bench ann` measures what they cost and give).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DenseOptions {
    /// Neighbours per node (HNSW's M).
    pub connectivity: usize,
    /// Candidates examined while inserting (ef_construction).
    pub expansion_add: usize,
    /// Candidates examined while searching (ef), raised to the count asked for.
    pub expansion_search: usize,
    /// Below this many vectors, search is exact.
    pub exact_below: usize,
    /// Store vectors as f16 (half the memory, recall within noise of f32 for embeddings).
    pub half_precision: bool,
}

impl Default for DenseOptions {
    fn default() -> Self {
        Self {
            connectivity: 16,
            expansion_add: 128,
            expansion_search: 64,
            exact_below: 20_000,
            half_precision: false,
        }
    }
}

/// What an index holds of SQLite's log: every chunk up to sequence `seq` and every removal up to
/// `removal`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub seq: i64,
    pub removal: i64,
}

pub struct DenseIndex {
    store: String,
    index: Index,
    options: DenseOptions,
    dims: usize,
    applied: Watermark,
    /// Changed since it was last saved.
    dirty: bool,
    /// Cores to insert from.
    threads: usize,
}

/// Fewest vectors per thread worth a parallel insert.
const PARALLEL_ADD_PER_THREAD: usize = 256;

fn dense_error(store: &str, message: impl std::fmt::Display) -> RagError {
    RagError::Dense { store: store.to_string(), message: message.to_string() }
}

impl DenseIndex {
    fn paths(dir: &Path) -> (PathBuf, PathBuf) {
        (dir.join("dense.usearch"), dir.join("dense.json"))
    }

    fn empty(store: &str, dims: usize, metric: Metric, options: DenseOptions) -> Result<Index, RagError> {
        let index = Index::new(&IndexOptions {
            dimensions: dims,
            metric: match metric {
                Metric::Cosine => MetricKind::Cos,
                Metric::Dot => MetricKind::IP,
            },
            quantization: if options.half_precision { ScalarKind::F16 } else { ScalarKind::F32 },
            connectivity: options.connectivity,
            expansion_add: options.expansion_add,
            expansion_search: options.expansion_search,
            multi: false,
        })
        .map_err(|e| dense_error(store, e))?;
        Ok(index)
    }

    /// The index saved in `dir`, or an empty one (watermark 0) if there is none or it cannot be
    /// read (it is then rebuilt from SQLite).
    pub fn open(
        store: &str,
        dir: &Path,
        dims: usize,
        metric: Metric,
        options: DenseOptions,
    ) -> Result<Self, RagError> {
        let (index_path, meta_path) = Self::paths(dir);
        let saved =
            std::fs::read(&meta_path).ok().and_then(|bytes| serde_json::from_slice::<Watermark>(&bytes).ok());
        if let (Some(applied), true) = (saved, index_path.exists()) {
            let index = Self::empty(store, dims, metric, options)?;
            match index.load(&index_path.to_string_lossy()) {
                Ok(()) if index.dimensions() == dims => {
                    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                    index
                        .reserve_capacity_and_threads(index.size().max(64), threads + 2)
                        .map_err(|e| dense_error(store, e))?;
                    return Ok(Self {
                        store: store.into(),
                        index,
                        options,
                        dims,
                        applied,
                        dirty: false,
                        threads,
                    });
                }
                Ok(()) => tracing::warn!(store, "the saved vector index has other dimensions; rebuilding it"),
                Err(e) => {
                    tracing::warn!(store, error = %e, "cannot load the saved vector index; rebuilding it")
                }
            }
        }
        let index = Self::empty(store, dims, metric, options)?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        index.reserve_capacity_and_threads(64, threads + 2).map_err(|e| dense_error(store, e))?;
        Ok(Self {
            store: store.into(),
            index,
            options,
            dims,
            applied: Watermark::default(),
            dirty: true,
            threads,
        })
    }

    pub fn applied(&self) -> Watermark {
        self.applied
    }

    pub fn len(&self) -> usize {
        self.index.size()
    }

    pub fn is_empty(&self) -> bool {
        self.index.size() == 0
    }

    pub fn memory_bytes(&self) -> usize {
        self.index.memory_usage()
    }

    /// Adds chunks (`key`, `vector`, SQLite sequence number), in sequence order. A key already
    /// present (a replay after a crash between saving the index and its watermark) is replaced.
    /// Large batches (a big file, a rebuild) are inserted from every core at once.
    pub fn add(&mut self, chunks: &[(u64, &[f32], i64)]) -> Result<(), RagError> {
        if let Some(&(_, vector, _)) = chunks.iter().find(|c| c.1.len() != self.dims) {
            return Err(RagError::DimensionMismatch {
                store: self.store.clone(),
                expected: self.dims,
                got: vector.len(),
            });
        }
        let needed = self.index.size() + chunks.len();
        if needed > self.index.capacity() {
            let capacity = needed.max(self.index.capacity() * 2);
            self.index
                .reserve_capacity_and_threads(capacity, self.threads + 2)
                .map_err(|e| dense_error(&self.store, e))?;
        }
        for &(key, _, _) in chunks {
            if self.index.contains(key) {
                self.index.remove(key).map_err(|e| dense_error(&self.store, e))?;
            }
        }
        let threads = self.threads.min(chunks.len() / PARALLEL_ADD_PER_THREAD).max(1);
        let index = &self.index;
        let insert = |part: &[(u64, &[f32], i64)]| -> Result<(), RagError> {
            for &(key, vector, _) in part {
                index.add(key, vector).map_err(|e| dense_error(&self.store, e))?;
            }
            Ok(())
        };
        if threads == 1 {
            insert(chunks)?;
        } else {
            // usearch's graph takes concurrent inserts, one per reserved thread slot.
            std::thread::scope(|scope| {
                let parts: Vec<_> = chunks
                    .chunks(chunks.len().div_ceil(threads))
                    .map(|part| scope.spawn(move || insert(part)))
                    .collect();
                parts.into_iter().try_for_each(|part| {
                    part.join().unwrap_or_else(|_| Err(dense_error(&self.store, "an insert thread panicked")))
                })
            })?;
        }
        if let Some(seq) = chunks.iter().map(|c| c.2).max() {
            self.applied.seq = self.applied.seq.max(seq);
        }
        self.dirty |= !chunks.is_empty();
        Ok(())
    }

    /// Changes the search width (`ef`) of later searches; a bench sweeps it.
    pub fn set_expansion_search(&mut self, expansion: usize) {
        self.options.expansion_search = expansion;
    }

    /// Removes keys (absent ones are skipped); `removal` is the last removal's log number.
    pub fn remove(&mut self, keys: &[u64], removal: i64) -> Result<(), RagError> {
        for &key in keys {
            if self.index.contains(key) {
                self.index.remove(key).map_err(|e| dense_error(&self.store, e))?;
            }
        }
        self.applied.removal = self.applied.removal.max(removal);
        self.dirty = true;
        Ok(())
    }

    /// The `count` nearest keys with their similarity (higher is closer), restricted to keys
    /// `allowed` accepts. Exact while the index holds fewer than `exact_below` vectors.
    pub fn search(
        &self,
        query: &[f32],
        count: usize,
        allowed: Option<&(dyn Fn(u64) -> bool + Sync)>,
    ) -> Result<Vec<(u64, f32)>, RagError> {
        if query.len() != self.dims {
            return Err(RagError::DimensionMismatch {
                store: self.store.clone(),
                expected: self.dims,
                got: query.len(),
            });
        }
        if self.index.size() == 0 || count == 0 {
            return Ok(Vec::new());
        }
        let exact = self.index.size() < self.options.exact_below;
        let matches = match allowed {
            None if exact => self.index.exact_search(query, count),
            None => {
                self.index.change_expansion_search(self.options.expansion_search.max(count));
                self.index.search(query, count)
            }
            Some(allowed) => {
                self.index.change_expansion_search(self.options.expansion_search.max(count));
                self.index.filtered_search(query, count, allowed)
            }
        }
        .map_err(|e| dense_error(&self.store, e))?;
        // usearch returns distances: 1 - cosine, or 1 - dot product.
        Ok(matches.keys.into_iter().zip(matches.distances).map(|(k, d)| (k, 1.0 - d)).collect())
    }

    /// Exact similarities of `query` to the vectors of `keys` (a filtered search over few chunks).
    pub fn score_keys(
        &self,
        query: &[f32],
        keys: &[u64],
        metric: Metric,
    ) -> Result<Vec<(u64, f32)>, RagError> {
        let mut vector = vec![0f32; self.dims];
        let query_norm = query.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
        let mut scored = Vec::with_capacity(keys.len());
        for &key in keys {
            if self.index.get(key, &mut vector).map_err(|e| dense_error(&self.store, e))? == 0 {
                continue;
            }
            let dot: f32 = vector.iter().zip(query).map(|(a, b)| a * b).sum();
            let score = match metric {
                Metric::Dot => dot,
                Metric::Cosine => {
                    dot / (query_norm
                        * vector.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE))
                }
            };
            scored.push((key, score));
        }
        Ok(scored)
    }

    /// Writes the index and then its watermark, each through a temporary file and a rename; a
    /// crash between the two leaves an older watermark, whose replay re-adds what is there.
    pub fn save(&mut self, dir: &Path) -> Result<(), RagError> {
        if !self.dirty {
            return Ok(());
        }
        let (index_path, meta_path) = Self::paths(dir);
        let index_tmp = dir.join("dense.usearch.tmp");
        self.index.save(&index_tmp.to_string_lossy()).map_err(|e| dense_error(&self.store, e))?;
        sync(&index_tmp)?;
        std::fs::rename(&index_tmp, &index_path).map_err(|e| RagError::at(&index_path, "write", e))?;
        let meta = serde_json::to_vec(&self.applied).expect("a watermark serializes");
        write_atomic(&meta_path, &meta)?;
        self.dirty = false;
        Ok(())
    }
}

fn sync(path: &Path) -> Result<(), RagError> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| RagError::at(path, "sync", e))
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RagError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(|e| RagError::at(&tmp, "create", e))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| RagError::at(&tmp, "write", e))?;
    std::fs::rename(&tmp, path).map_err(|e| RagError::at(path, "write", e))?;
    if let Some(parent) = path.parent() {
        // The rename is durable once the directory is.
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(seed: u64, dims: usize) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut v: Vec<f32> = (0..dims)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }

    /// A batch big enough to insert from several threads lands whole: every vector is its own
    /// nearest neighbour through the graph, replays replace rather than duplicate, and the
    /// watermark is the batch's highest sequence number.
    #[test]
    fn large_batches_insert_in_parallel_and_replays_replace() {
        let dir = tempfile::tempdir().unwrap();
        let options = DenseOptions { exact_below: 0, ..DenseOptions::default() };
        let mut index = DenseIndex::open("s", dir.path(), 32, Metric::Dot, options).unwrap();
        let vectors: Vec<Vec<f32>> = (0..3000).map(|i| unit(i, 32)).collect();
        let chunks: Vec<(u64, &[f32], i64)> =
            vectors.iter().enumerate().map(|(i, v)| (i as u64 * 7, v.as_slice(), i as i64 + 1)).collect();
        index.add(&chunks).unwrap();
        assert_eq!(index.len(), 3000);
        assert_eq!(index.applied().seq, 3000);
        for i in (0..3000).step_by(97) {
            let found = index.search(&vectors[i], 1, None).unwrap();
            assert_eq!(found[0].0, i as u64 * 7, "vector {i}");
        }
        index.add(&chunks[..600]).unwrap();
        assert_eq!(index.len(), 3000, "a replay replaces");
        let wrong = [0f32; 31];
        let err = index.add(&[(1, &wrong[..], 3001)]).unwrap_err();
        assert!(matches!(err, RagError::DimensionMismatch { expected: 32, got: 31, .. }), "{err}");
        assert_eq!(index.len(), 3000);
    }
}
