//! `cargo bench --bench ann`: the vector stores' dense index at scale. On 100,000 and 1,000,000
//! synthetic 384-d unit vectors (the width of all-MiniLM-L6-v2), it measures Hearth's own
//! `DenseIndex` (usearch HNSW, the store's settings: M 16, ef_construction 128) in f32 and f16,
//! and hnsw_rs with the same graph settings, beside brute force: build time, recall@10 against
//! exact neighbours, queries/s at several `ef` (search width), memory and disk. Results go to
//! `benches/results/ann.json`.
//!
//! The vectors are clustered the way sentence embeddings are: 2,000 cluster centres in a
//! 32-dimensional latent space, points scattered around them, mapped into 384 dimensions by a
//! fixed random linear map plus a little isotropic noise, then normalised. Uniform random
//! vectors in 384-d would have no near neighbours worth finding (every pair is nearly
//! orthogonal), which says nothing about retrieval; real embeddings have an intrinsic dimension
//! of a few tens. Queries are fresh points from the same distribution. The exact neighbours are
//! computed here by a plain dot-product scan, independently of both libraries.
//!
//! `HEARTH_BENCH_ANN_SIZES` (default `100000,1000000`) and `HEARTH_BENCH_ANN_QUERIES`
//! (default 1000) change the scale. Above 200,000 vectors only the store's default index
//! (usearch f32) is built, since the f16 and hnsw_rs builds would take the better part of an
//! hour each on a 2-core machine; the libraries are compared at the smaller size.
//! `HEARTH_BENCH_ANN_ALL=1` builds all three at every size.
//!
//! A second, quick part sizes the store's `exact_below`: at 1,000 to 50,000 vectors, exact search
//! against the HNSW graph for what a store search asks (its 50 dense candidates, ef 64), to find
//! where the graph starts to pay. Results: `benches/results/ann-small.json`.
//! `HEARTH_BENCH_ANN_SIZES=none` runs only this part.

mod common;

use std::path::Path;
use std::time::Instant;

use hearth_rag::{DenseIndex, DenseOptions, Metric};
use serde_json::{json, Value};

use common::{machine, round, status_mib};

const DIMS: usize = 384;
const LATENT: usize = 32;
const CLUSTERS: usize = 2000;
const K: usize = 10;
const EF: [usize; 4] = [32, 64, 128, 256];
/// HNSW settings shared by both libraries (the store's defaults).
const CONNECTIVITY: usize = 16;
const EXPANSION_ADD: usize = 128;

/// A small, fast, reproducible generator (SplitMix64) with Gaussian draws (Box–Muller).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn gaussian(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(f64::MIN_POSITIVE), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// The synthetic embedding distribution (see the module docs).
struct Distribution {
    centres: Vec<[f32; LATENT]>,
    /// LATENT × DIMS, row-major.
    map: Vec<f32>,
}

impl Distribution {
    fn new(rng: &mut Rng) -> Self {
        let centres = (0..CLUSTERS).map(|_| std::array::from_fn(|_| rng.gaussian())).collect();
        let scale = 1.0 / (LATENT as f32).sqrt();
        let map = (0..LATENT * DIMS).map(|_| rng.gaussian() * scale).collect();
        Self { centres, map }
    }

    /// `n` unit vectors, row-major.
    fn sample(&self, rng: &mut Rng, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * DIMS];
        for row in out.chunks_exact_mut(DIMS) {
            let centre = &self.centres[(rng.next_u64() % CLUSTERS as u64) as usize];
            // Spread within a cluster comparable to the distance between clusters, so that a
            // query's ten nearest are neither trivially its cluster nor random.
            let latent: [f32; LATENT] = std::array::from_fn(|i| centre[i] + 0.6 * rng.gaussian());
            for (i, &l) in latent.iter().enumerate() {
                for (x, m) in row.iter_mut().zip(&self.map[i * DIMS..(i + 1) * DIMS]) {
                    *x += l * m;
                }
            }
            for x in row.iter_mut() {
                *x += 0.05 * rng.gaussian();
            }
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        out
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight accumulators so the compiler vectorises the scan.
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum()
}

/// The exact `K` nearest rows of `data` to `query` by dot product, best first.
fn exact(data: &[f32], query: &[f32]) -> Vec<u64> {
    let mut best: Vec<(f32, u64)> = Vec::with_capacity(K + 1);
    for (i, row) in data.chunks_exact(DIMS).enumerate() {
        let score = dot(row, query);
        if best.len() < K || score > best[best.len() - 1].0 {
            let at = best.partition_point(|&(s, _)| s >= score);
            best.insert(at, (score, i as u64));
            best.truncate(K);
        }
    }
    best.into_iter().map(|(_, i)| i).collect()
}

fn recall(found: &[Vec<u64>], truth: &[Vec<u64>]) -> f64 {
    let hits: usize = found.iter().zip(truth).map(|(f, t)| f.iter().filter(|k| t.contains(k)).count()).sum();
    hits as f64 / (truth.len() * K) as f64
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `f` over the queries on every core; (results, queries per second).
fn timed_queries<F>(queries: &[f32], f: F) -> (Vec<Vec<u64>>, f64)
where
    F: Fn(&[f32]) -> Vec<u64> + Sync,
{
    let rows: Vec<&[f32]> = queries.chunks_exact(DIMS).collect();
    let per_thread = rows.len().div_ceil(threads());
    let started = Instant::now();
    let results: Vec<Vec<u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .chunks(per_thread)
            .map(|part| scope.spawn(|| part.iter().map(|q| f(q)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a query thread panicked")).collect()
    });
    let qps = rows.len() as f64 / started.elapsed().as_secs_f64();
    (results, qps)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.filter_map(|e| e.ok()).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
        })
        .unwrap_or(0)
}

fn usearch_run(data: &[f32], queries: &[f32], truth: &[Vec<u64>], half: bool) -> Value {
    let n = data.len() / DIMS;
    let dir = tempfile::tempdir().expect("a temp dir");
    let options = DenseOptions {
        connectivity: CONNECTIVITY,
        expansion_add: EXPANSION_ADD,
        exact_below: 0,
        half_precision: half,
        ..DenseOptions::default()
    };
    let rss_before = status_mib("self", "VmRSS");
    let mut index = DenseIndex::open("bench", dir.path(), DIMS, Metric::Dot, options).expect("an index");
    let started = Instant::now();
    // As the store adds them: one file's chunks at a time (here 1,000 vectors per call).
    for (part, rows) in data.chunks(1000 * DIMS).enumerate() {
        let chunks: Vec<(u64, &[f32], i64)> = rows
            .chunks_exact(DIMS)
            .enumerate()
            .map(|(i, v)| {
                let key = (part * 1000 + i) as u64;
                (key, v, key as i64 + 1)
            })
            .collect();
        index.add(&chunks).expect("add");
    }
    let build_s = started.elapsed().as_secs_f64();
    let rss_after = status_mib("self", "VmRSS");
    let started = Instant::now();
    index.save(dir.path()).expect("save");
    let save_s = started.elapsed().as_secs_f64();
    let mut sweep = Vec::new();
    for ef in EF {
        index.set_expansion_search(ef);
        let (found, qps) = timed_queries(queries, |q| {
            index.search(q, K, None).expect("search").into_iter().map(|(k, _)| k).collect()
        });
        let r = recall(&found, truth);
        println!(
            "  usearch {}: ef {ef:>3}: recall@10 {r:.4}, {qps:.0} queries/s",
            if half { "f16" } else { "f32" }
        );
        sweep.push(json!({"ef": ef, "recall_at_10": round(r, 4), "qps": round(qps, 1)}));
    }
    // Reloaded as the store opens it, then searched exactly: what the store runs below
    // `exact_below` (usearch's SIMD scan).
    let started = Instant::now();
    let exact_options = DenseOptions { exact_below: usize::MAX, ..options };
    let reopened = DenseIndex::open("bench", dir.path(), DIMS, Metric::Dot, exact_options).expect("reopen");
    let load_s = started.elapsed().as_secs_f64();
    assert_eq!(reopened.len(), n, "the saved index reloads whole");
    let (found, exact_qps) = timed_queries(queries, |q| {
        reopened.search(q, K, None).expect("search").into_iter().map(|(k, _)| k).collect()
    });
    let exact_recall = recall(&found, truth);
    println!("  usearch exact: recall@10 {exact_recall:.4}, {exact_qps:.1} queries/s");
    println!(
        "  usearch {}: built {n} in {build_s:.1} s ({:.0}/s), index {:.0} MiB, disk {:.0} MiB",
        if half { "f16" } else { "f32" },
        n as f64 / build_s,
        index.memory_bytes() as f64 / 1048576.0,
        dir_bytes(dir.path()) as f64 / 1048576.0
    );
    json!({
        "library": "usearch 2.26.6 (hearth_rag::DenseIndex)",
        "scalar": if half { "f16" } else { "f32" },
        "build_seconds": round(build_s, 2),
        "inserts_per_second": round(n as f64 / build_s, 1),
        "save_seconds": round(save_s, 2),
        "load_seconds": round(load_s, 2),
        "index_memory_mib": round(index.memory_bytes() as f64 / 1048576.0, 1),
        "rss_growth_mib": round(rss_after - rss_before, 1),
        "disk_mib": round(dir_bytes(dir.path()) as f64 / 1048576.0, 1),
        "search": sweep,
        "exact_search": {"recall_at_10": round(exact_recall, 4), "qps": round(exact_qps, 2)},
    })
}

fn hnsw_rs_run(data: &[f32], queries: &[f32], truth: &[Vec<u64>]) -> Value {
    use hnsw_rs::prelude::*;
    let n = data.len() / DIMS;
    let rss_before = status_mib("self", "VmRSS");
    // hnsw_rs dumps only graphs built with its maximum layer count (16), which is also what its
    // documentation suggests; the upper layers of a 1M graph are nearly empty either way.
    let hnsw = Hnsw::<f32, DistDot>::new(CONNECTIVITY, n, 16, EXPANSION_ADD, DistDot {});
    let started = Instant::now();
    let items: Vec<(&[f32], usize)> = data.chunks_exact(DIMS).enumerate().map(|(i, v)| (v, i)).collect();
    for part in items.chunks(1000) {
        hnsw.parallel_insert_slice(&part.to_vec());
    }
    let build_s = started.elapsed().as_secs_f64();
    let rss_after = status_mib("self", "VmRSS");
    let dir = tempfile::tempdir().expect("a temp dir");
    let started = Instant::now();
    hnsw.file_dump(dir.path(), "bench").expect("dump");
    let save_s = started.elapsed().as_secs_f64();
    let mut sweep = Vec::new();
    for ef in EF {
        let (found, qps) =
            timed_queries(queries, |q| hnsw.search(q, K, ef).into_iter().map(|n| n.d_id as u64).collect());
        let r = recall(&found, truth);
        println!("  hnsw_rs f32: ef {ef:>3}: recall@10 {r:.4}, {qps:.0} queries/s");
        sweep.push(json!({"ef": ef, "recall_at_10": round(r, 4), "qps": round(qps, 1)}));
    }
    println!(
        "  hnsw_rs f32: built {n} in {build_s:.1} s ({:.0}/s), RSS +{:.0} MiB, disk {:.0} MiB",
        n as f64 / build_s,
        rss_after - rss_before,
        dir_bytes(dir.path()) as f64 / 1048576.0
    );
    json!({
        "library": "hnsw_rs 0.3.5 (anndists DistDot)",
        "scalar": "f32",
        "build_seconds": round(build_s, 2),
        "inserts_per_second": round(n as f64 / build_s, 1),
        "save_seconds": round(save_s, 2),
        "rss_growth_mib": round(rss_after - rss_before, 1),
        "disk_mib": round(dir_bytes(dir.path()) as f64 / 1048576.0, 1),
        "search": sweep,
    })
}

/// What a store search asks the dense index for (`[rag] candidates`' default) and the graph's
/// search width (`DenseOptions::default().expansion_search`).
const STORE_CANDIDATES: usize = 50;
const SMALL_SIZES: [usize; 6] = [1_000, 2_000, 5_000, 10_000, 20_000, 50_000];

/// Exact search against the graph on small stores, as the store asks: recall of the graph's 50
/// against the exact 50, and queries/s of each.
fn small_stores(distribution: &Distribution, rng: &mut Rng, queries: &[f32]) -> Value {
    let ef = DenseOptions::default().expansion_search;
    let mut rows = Vec::new();
    println!("small stores: exact search vs the graph for {STORE_CANDIDATES} candidates (ef {ef})");
    for n in SMALL_SIZES {
        let data = distribution.sample(rng, n);
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut index = DenseIndex::open("bench", dir.path(), DIMS, Metric::Dot, DenseOptions::default())
            .expect("an index");
        let chunks: Vec<(u64, &[f32], i64)> =
            data.chunks_exact(DIMS).enumerate().map(|(i, v)| (i as u64, v, i as i64 + 1)).collect();
        index.add(&chunks).expect("add");
        index.save(dir.path()).expect("save");
        let open = |exact_below| {
            let options = DenseOptions { exact_below, ..DenseOptions::default() };
            DenseIndex::open("bench", dir.path(), DIMS, Metric::Dot, options).expect("reopen")
        };
        let (exact, graph) = (open(usize::MAX), open(0));
        let ids = |index: &DenseIndex, q: &[f32]| -> Vec<u64> {
            index.search(q, STORE_CANDIDATES, None).expect("search").into_iter().map(|(k, _)| k).collect()
        };
        // Interleaved twice, the better of each kept: the machine's noise hits both alike.
        let mut best = (0f64, 0f64);
        let (mut truth, mut found) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            let (t, exact_qps) = timed_queries(queries, |q| ids(&exact, q));
            let (f, graph_qps) = timed_queries(queries, |q| ids(&graph, q));
            best = (best.0.max(exact_qps), best.1.max(graph_qps));
            (truth, found) = (t, f);
        }
        let hits: usize =
            found.iter().zip(&truth).map(|(f, t)| f.iter().filter(|k| t.contains(k)).count()).sum();
        let recall = hits as f64 / (truth.len() * STORE_CANDIDATES) as f64;
        println!(
            "  {n:>6} vectors: exact {:.0} queries/s, graph {:.0} queries/s (recall@{STORE_CANDIDATES} {recall:.4})",
            best.0, best.1
        );
        rows.push(json!({
            "vectors": n,
            "exact_qps": round(best.0, 1),
            "graph_qps": round(best.1, 1),
            "graph_recall_at_50": round(recall, 4),
        }));
    }
    json!({
        "bench": "ann-small",
        "machine": machine(),
        "dimensions": DIMS,
        "candidates": STORE_CANDIDATES,
        "expansion_search": ef,
        "threads": threads(),
        "exact_below_default": DenseOptions::default().exact_below,
        "sizes": rows,
    })
}

fn main() {
    let sizes: Vec<usize> = match std::env::var("HEARTH_BENCH_ANN_SIZES").as_deref() {
        Ok("none") => Vec::new(),
        Ok(list) => list
            .split(',')
            .map(|s| s.trim().parse().expect("HEARTH_BENCH_ANN_SIZES: comma-separated counts or `none`"))
            .collect(),
        Err(_) => vec![100_000, 1_000_000],
    };
    let query_count: usize =
        std::env::var("HEARTH_BENCH_ANN_QUERIES").ok().and_then(|q| q.parse().ok()).unwrap_or(1000);
    let mut rng = Rng(0x4845_4152_5448);
    let distribution = Distribution::new(&mut rng);
    let queries = distribution.sample(&mut rng, query_count);
    // Its own generator, so the large runs see the same vectors whether or not this part runs.
    let small = small_stores(&distribution, &mut Rng(0x0053_4D41_4C4C), &queries);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/ann-small.json");
    std::fs::write(&path, serde_json::to_string_pretty(&small).expect("JSON") + "\n").expect("write results");
    println!("wrote {}", path.display());
    if sizes.is_empty() {
        return;
    }
    let mut runs = Vec::new();
    for &n in &sizes {
        println!("{n} vectors, {query_count} queries");
        let data = distribution.sample(&mut rng, n);
        let (truth, exact_qps) = timed_queries(&queries, |q| exact(&data, q));
        println!("  brute force (plain scan, all cores): {exact_qps:.1} queries/s");
        let mut indexes = vec![usearch_run(&data, &queries, &truth, false)];
        if n <= 200_000 || std::env::var_os("HEARTH_BENCH_ANN_ALL").is_some() {
            indexes.push(usearch_run(&data, &queries, &truth, true));
            indexes.push(hnsw_rs_run(&data, &queries, &truth));
        }
        runs.push(json!({
            "vectors": n,
            "queries": query_count,
            "raw_vectors_mib": round((n * DIMS * 4) as f64 / 1048576.0, 1),
            "brute_force_plain_scan_qps": round(exact_qps, 2),
            "indexes": indexes,
        }));
    }
    let result = json!({
        "bench": "ann",
        "machine": machine(),
        "dimensions": DIMS,
        "k": K,
        "hnsw": {"connectivity": CONNECTIVITY, "expansion_add": EXPANSION_ADD},
        "data": format!("{CLUSTERS} clusters in a {LATENT}-d latent space mapped to {DIMS}-d, unit vectors; queries from the same distribution"),
        "threads": threads(),
        "runs": runs,
    });
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/ann.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result).expect("JSON") + "\n")
        .expect("write results");
    println!("wrote {}", path.display());
}
