//! `cargo bench --features onnx --bench rag`: the RAG pipeline as a user drives it, through the
//! real `hearth` binary over loopback, on retrieval-debian (2,000 Debian package descriptions,
//! 2,000 one-line queries) with the offline set's models (all-MiniLM-L6-v2's int8 ONNX export
//! with its 64 MiB embedding cache, and the bi-encoder reranker over it).
//!
//! 1. The embedder alone (a server with the cache off): the 2,000 documents through
//!    `/v1/embeddings`, 16 per request, two clients: the tokens/s that bound ingest. Run under the
//!    CPU default of 512 padded tokens per forward pass and under 16,384 (the GPU default, and the
//!    CPU's before this bench measured the difference).
//! 2. Ingest: the documents written as files to a folder, then `hearth ingest DIR --store NAME`
//!    (the CLI's own code, `hearth::ingest::ingest`): upload, extract, chunk, embed, store and
//!    index, until every file is `completed`. Reported: files/s, chunks/s, tokens/s and that as
//!    a fraction of the embedder alone, and how busy the model was (its batch time / wall time).
//! 3. Search (`POST /v1/vector_stores/{id}/search`, 10 results): one client and eight clients,
//!    with the reranker (the default) and without (`ranking_options.ranker = "none"`), each on
//!    its own 500 queries so no query's embedding is cached: p50/p99 latency and queries/s. The
//!    answers are scored (recall@10, MRR@10) to show the figures are for real retrieval.
//!
//! Results: `benches/results/rag.json`. `HEARTH_BENCH_RAG_INGEST_CONCURRENCY` sets
//! `[rag] ingest_concurrency` (files ingested at once; default Hearth's).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use common::retrieval_debian::{self, Document, Query};
use common::server::{metric_total, Server};
use common::{machine, peak_rss_mib, round, status_mib};
use serde_json::{json, Value};

const MODEL: &str = "all-minilm-l6-v2";
const SOURCE: &str = "all-minilm-l6-v2-int8";
const SEARCH_CLIENTS: usize = 8;
const QUERIES_PER_RUN: usize = 500;
const EMBED_BATCH: usize = 16;

fn main() {
    common::run(bench());
}

fn config(cache_mib: usize) -> String {
    config_with(cache_mib, "")
}

/// The bench's config; `model_extra` adds keys to the embedding model's entry.
fn config_with(cache_mib: usize, model_extra: &str) -> String {
    let concurrency = std::env::var("HEARTH_BENCH_RAG_INGEST_CONCURRENCY")
        .map(|c| format!("ingest_concurrency = {c}\n"))
        .unwrap_or_default();
    format!(
        "[server]\nport = 0\n\
         [[models]]\nid = \"{MODEL}\"\npreset = \"{MODEL}\"\nsource = \"{SOURCE}\"\ncache_mib = {cache_mib}\n{model_extra}\
         [[models]]\nid = \"{MODEL}-rerank\"\nkind = \"rerank\"\nembedding_model = \"{MODEL}\"\n\
         [rag]\ndata_dir = \"{{dir}}/data\"\nembedding_model = \"{MODEL}\"\nrerank_model = \"{MODEL}-rerank\"\n\
         {concurrency}"
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("an HTTP client")
}

/// POSTs `body`; a 429 is retried after its `Retry-After`, as the OpenAI SDKs do.
async fn post(client: &reqwest::Client, url: &str, body: &Value) -> Value {
    loop {
        let response = client.post(url).json(body).send().await.expect("the server answers");
        let status = response.status();
        let retry: Option<u64> =
            response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
        let value: Value = response.json().await.expect("a JSON answer");
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            tokio::time::sleep(std::time::Duration::from_secs(retry.unwrap_or(1))).await;
            continue;
        }
        assert!(status.is_success(), "POST {url}: {status}: {value}");
        return value;
    }
}

async fn metrics(server: &Server) -> String {
    client()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("/metrics text")
}

/// The model's tokens embedded and seconds spent in batches so far.
async fn model_work(server: &Server) -> (f64, f64) {
    let text = metrics(server).await;
    (
        metric_total(&text, "hearth_tokens_processed_total"),
        metric_total(&text, "hearth_batch_duration_seconds_sum"),
    )
}

/// Phase 1: the embedder alone, on a server with the cache off, at `max_batch_tokens` padded
/// tokens per forward pass (`None`: the default).
async fn embedder_alone(documents: &[Document], max_batch_tokens: Option<usize>) -> Value {
    let extra = max_batch_tokens.map(|n| format!("max_batch_tokens = {n}\n")).unwrap_or_default();
    let server = Server::start("rag-embedder", &config_with(0, &extra));
    let url = format!("{}/v1/embeddings", server.url);
    let texts: Arc<Vec<String>> = Arc::new(documents.iter().map(Document::full_text).collect());
    // Warm-up: one batch (not counted).
    post(&client(), &url, &json!({"model": MODEL, "input": texts[..EMBED_BATCH], "truncate": true})).await;
    let (tokens_before, busy_before) = model_work(&server).await;
    let started = Instant::now();
    let batches: Vec<usize> = (0..texts.len()).step_by(EMBED_BATCH).collect();
    let tasks: Vec<_> = (0..2)
        .map(|c| {
            let (texts, url) = (Arc::clone(&texts), url.clone());
            let mine: Vec<usize> = batches.iter().copied().skip(c).step_by(2).collect();
            tokio::spawn(async move {
                let client = client();
                for start in mine {
                    let input = &texts[start..(start + EMBED_BATCH).min(texts.len())];
                    post(&client, &url, &json!({"model": MODEL, "input": input, "truncate": true})).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("an embedding client ends");
    }
    let seconds = started.elapsed().as_secs_f64();
    let (tokens, busy) = model_work(&server).await;
    server.stop();
    let tokens = tokens - tokens_before;
    println!(
        "embedder alone, max_batch_tokens {}: {} documents in {seconds:.1} s ({:.0} documents/s, {:.0} tokens/s)",
        max_batch_tokens.map_or("default".to_string(), |n| n.to_string()),
        texts.len(),
        texts.len() as f64 / seconds,
        tokens / seconds
    );
    json!({
        "max_batch_tokens": max_batch_tokens.map_or(json!("default (512 on CPU)"), |n| json!(n)),
        "documents": texts.len(),
        "seconds": round(seconds, 2),
        "documents_per_second": round(texts.len() as f64 / seconds, 1),
        "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1),
        "model_busy_fraction": round((busy - busy_before) / seconds, 3),
    })
}

/// Phase 2: `hearth ingest DIR --store NAME` against the server; returns the store id.
async fn ingest(server: &Server, documents: &[Document]) -> (String, Value) {
    let folder = server.dir.join("corpus");
    std::fs::create_dir_all(&folder).expect("the corpus folder");
    let mut bytes = 0;
    for document in documents {
        let text = document.full_text();
        bytes += text.len();
        std::fs::write(folder.join(format!("{}.txt", document.id)), text).expect("a corpus file");
    }
    let (tokens_before, busy_before) = model_work(server).await;
    let started = Instant::now();
    let summary = hearth::ingest::ingest(hearth::ingest::IngestOptions {
        paths: vec![folder],
        store: "retrieval-debian".into(),
        url: server.url.clone(),
        api_key: None,
        chunking: None,
        attributes: serde_json::Map::new(),
        replace: false,
        progress: false,
    })
    .await
    .expect("hearth ingest runs");
    let seconds = started.elapsed().as_secs_f64();
    assert!(summary.failed.is_empty(), "files failed: {:?}", summary.failed);
    assert_eq!(summary.ingested, documents.len(), "every document is ingested");
    let text = metrics(server).await;
    let chunks = metric_total(&text, "hearth_rag_chunks_ingested_total");
    let tokens = metric_total(&text, "hearth_tokens_processed_total") - tokens_before;
    let busy = metric_total(&text, "hearth_batch_duration_seconds_sum") - busy_before;
    let batches = metric_total(&text, "hearth_batch_size_count");
    let sequences = metric_total(&text, "hearth_batch_size_sum");
    println!(
        "ingest: {} files, {chunks} chunks in {seconds:.1} s: {:.1} files/s, {:.1} chunks/s, {:.0} tokens/s; \
         model busy {:.0}% of the time",
        documents.len(),
        documents.len() as f64 / seconds,
        chunks / seconds,
        tokens / seconds,
        100.0 * busy / seconds
    );
    let value = json!({
        "command": "hearth ingest DIR --store retrieval-debian (hearth::ingest::ingest)",
        "files": documents.len(),
        "bytes": bytes,
        "chunks": chunks,
        "chunking": "auto (800 tokens / 400 overlap, capped at the model's 256-token window: 256 / 128)",
        "seconds": round(seconds, 2),
        "files_per_second": round(documents.len() as f64 / seconds, 1),
        "chunks_per_second": round(chunks / seconds, 1),
        "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1),
        "model_busy_fraction": round(busy / seconds, 3),
        "mean_batch_size_all_phases": round(sequences / batches.max(1.0), 2),
    });
    (summary.store_id, value)
}

/// One search run: `clients` clients sharing `queries`, each query once.
async fn search_run(
    server: &Server,
    store: &str,
    queries: &[Query],
    clients: usize,
    rerank: bool,
    filename_to_doc: &HashMap<String, String>,
) -> Value {
    let url = format!("{}/v1/vector_stores/{store}/search", server.url);
    let queries: Arc<Vec<(String, Vec<String>)>> =
        Arc::new(queries.iter().map(|q| (q.query.clone(), q.relevant.clone())).collect());
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (queries, url) = (Arc::clone(&queries), url.clone());
            tokio::spawn(async move {
                let client = client();
                let mut out = Vec::new();
                for (query, relevant) in queries.iter().skip(c).step_by(clients) {
                    let mut body = json!({"query": query, "max_num_results": 10});
                    if !rerank {
                        body["ranking_options"] = json!({"ranker": "none"});
                    }
                    let sent = Instant::now();
                    let answer = post(&client, &url, &body).await;
                    let latency = sent.elapsed().as_secs_f64();
                    let names: Vec<String> = answer["data"]
                        .as_array()
                        .expect("search results")
                        .iter()
                        .map(|hit| hit["filename"].as_str().unwrap_or_default().to_string())
                        .collect();
                    out.push((latency, names, relevant.clone()));
                }
                out
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let (mut recall, mut mrr) = (0.0, 0.0);
    for task in tasks {
        for (latency, names, relevant) in task.await.expect("a search client ends") {
            latencies.push(latency);
            let rank =
                names.iter().position(|n| filename_to_doc.get(n).is_some_and(|d| relevant.contains(d)));
            recall += rank.is_some() as u8 as f64;
            mrr += rank.map_or(0.0, |r| 1.0 / (r as f64 + 1.0));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies[(((p / 100.0) * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    let n = latencies.len() as f64;
    let (p50, p99, qps) = (pct(50.0) * 1e3, pct(99.0) * 1e3, n / seconds);
    println!(
        "search, {clients} client(s), {}: p50 {p50:.1} ms, p99 {p99:.1} ms, {qps:.1} queries/s; recall@10 {:.3}, MRR@10 {:.3}",
        if rerank { "reranked" } else { "ranker none" },
        recall / n,
        mrr / n
    );
    json!({
        "clients": clients,
        "rerank": rerank,
        "queries": latencies.len(),
        "p50_ms": round(p50, 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(pct(100.0) * 1e3, 1),
        "queries_per_second": round(qps, 1),
        "recall_at_10": round(recall / n, 4),
        "mrr_at_10": round(mrr / n, 4),
    })
}

/// The server's resident set, in MiB.
fn rss_mib(server: &Server) -> f64 {
    status_mib(&server.child.id().to_string(), "VmRSS")
}

fn dir_mib(dir: &Path) -> f64 {
    fn walk(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => walk(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(dir) as f64 / 1048576.0
}

async fn bench() {
    let documents = retrieval_debian::documents();
    let queries = retrieval_debian::queries();
    assert!(queries.len() >= 4 * QUERIES_PER_RUN, "retrieval-debian has 2,000 queries");
    println!("Hearth RAG bench: {MODEL} ({SOURCE}) on retrieval-debian ({} documents)", documents.len());

    let alone = embedder_alone(&documents, None).await;
    let alone_large_batches = embedder_alone(&documents, Some(16_384)).await;
    let server = Server::start("rag", &config(64));
    let rss_idle = rss_mib(&server);
    let (store, mut ingested) = ingest(&server, &documents).await;
    ingested["tokens_per_second_vs_embedder_alone"] = json!(round(
        ingested["tokens_per_second"].as_f64().unwrap_or(0.0)
            / alone["tokens_per_second"].as_f64().unwrap_or(1.0),
        3
    ));
    let rss_ingested = rss_mib(&server);
    let filename_to_doc: HashMap<String, String> =
        documents.iter().map(|d| (format!("{}.txt", d.id), d.id.clone())).collect();
    // A few searches to warm the query path, with queries of their own (not counted).
    for query in ["package manager for Debian", "image editing library", "a text editor"] {
        let url = format!("{}/v1/vector_stores/{store}/search", server.url);
        post(&client(), &url, &json!({"query": query})).await;
    }
    let mut runs = Vec::new();
    let mut sets = queries.chunks(QUERIES_PER_RUN);
    for (clients, rerank) in [(1, false), (1, true), (SEARCH_CLIENTS, false), (SEARCH_CLIENTS, true)] {
        let set = sets.next().expect("a query set per run");
        runs.push(search_run(&server, &store, set, clients, rerank, &filename_to_doc).await);
    }
    let rss_searched = rss_mib(&server);
    // The data directory as a restart would find it: a graceful stop saves the indexes.
    let mut server = server;
    let shutdown_s = server.terminate();
    let disk = dir_mib(&server.dir.join("data"));
    println!("data directory {disk:.1} MiB; server RSS idle {rss_idle:.0} MiB, after ingest {rss_ingested:.0}, after search {rss_searched:.0}");
    server.stop();

    let results = json!({
        "bench": "rag",
        "command": "cargo bench --features onnx --bench rag",
        "machine": machine(),
        "data_set": "retrieval-debian",
        "model": format!("{MODEL} ({SOURCE}, ONNX Runtime; cache_mib 64), reranker: the same model as a bi-encoder"),
        "embedder_alone": alone,
        "embedder_alone_16384_batch_tokens": alone_large_batches,
        "default_over_16384_batch_tokens": round(
            alone["tokens_per_second"].as_f64().unwrap_or(0.0)
                / alone_large_batches["tokens_per_second"].as_f64().unwrap_or(1.0),
            3
        ),
        "ingest": ingested,
        "search": runs,
        "server_rss_mib": {"idle": round(rss_idle, 1), "after_ingest": round(rss_ingested, 1), "after_search": round(rss_searched, 1)},
        "data_dir_mib": round(disk, 2),
        "shutdown_seconds": round(shutdown_s, 2),
        "bench_peak_rss_mib": round(peak_rss_mib(), 1),
    });
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/rag.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results).expect("JSON") + "\n")
        .expect("write results");
    println!("wrote {}", path.display());
}
