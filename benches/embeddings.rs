//! `cargo bench --bench embeddings`: the embedding figures the issue asks for, measured through
//! Hearth's real code path (config parsing, the loader, the batching worker, the HTTP router) on the
//! real all-MiniLM-L6-v2 weights, on CPU:
//!
//! 1. throughput: the peer's 1,000 sentences in one request at `max_batch_size` 1, 32 and 256;
//! 2. the ONNX Runtime int8 peer (`benches/peers/embed_ort.py`) on the same sentences, when set up,
//!    and Hearth/peer ratios at batch 1 and 32;
//! 3. latency of `POST /v1/embeddings` served in-process on 127.0.0.1 with 1, 16 and 64 concurrent
//!    clients sending single-sentence requests back to back;
//! 4. peak RSS after each phase;
//! 5. ingest-like traffic with 30% repeated texts, with and without the cache;
//! 6. padding: 1,024 texts of mixed lengths in batches of 32, in arrival order and sorted by length
//!    (padded tokens per batch from the worker's metrics).
//!
//! Results go to `benches/results/embeddings.json`; `benches/README.md` explains how to read them.
//! Environment: `HEARTH_MODELS_DIR` (default `~/.cache/hearth/models`), `HEARTH_PEER_PYTHON` (default
//! `~/.cache/hearth/venv/bin/python`), `HEARTH_PEERS_DIR` (default `~/.cache/hearth/peers`),
//! `HEARTH_BENCH_HTTP_SECONDS` (measured seconds per concurrency level, default 10),
//! `HEARTH_BENCH_EMBED_SOURCE` (the model folder, default `all-minilm-l6-v2`; e.g.
//! `all-minilm-l6-v2-int8` for the int8 ONNX export on the ONNX Runtime backend, which needs
//! `--features onnx`): results for another folder go to `benches/results/embeddings-FOLDER.json`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth::config::{default_models_dir, Config, Overrides};
use hearth::server::load_models;
use hearth::state::AppState;
use hearth_engine::embed::{Embed, EmbedInput, Embedder};
use hearth_engine::registry::{LoadState, Served};
use hearth_engine::Priority;
use serde_json::{json, Value};

use common::{machine, round};

/// The id the bench serves the model under, and the directory under the models dir that holds it
/// (`scripts/fetch-models` installs it there).
const MODEL: &str = "all-minilm-l6-v2";
const BATCH_SIZES: [usize; 3] = [1, 32, 256];
/// Padded tokens per batch: far above 256 sentences of ~20 tokens, so only `max_batch_size` binds.
const MAX_BATCH_TOKENS: usize = 65_536;
const TIMED_RUNS: usize = 3;
const CLIENT_LEVELS: [usize; 3] = [1, 16, 64];
const HTTP_WARM_UP: Duration = Duration::from_secs(2);
const DEFAULT_HTTP_SECONDS: u64 = 10;
/// Batch sizes the peer reports; the ratios are taken at these.
const PEER_BATCH_SIZES: [usize; 2] = [1, 32];

/// The 1,000 sentences of `benches/peers/embed_ort.py`: four base sentences and an item number.
fn peer_sentences() -> Vec<String> {
    let base = [
        "The backup job runs every night and keeps thirty days of snapshots on the NAS.",
        "WireGuard tunnels connect the laptop to the home network from anywhere.",
        "The GPU node serves language models, speech recognition and text to speech.",
        "Grafana dashboards show memory, CPU and disk usage for every machine.",
    ];
    (0..1000).map(|i| format!("{} Item {i}.", base[i % base.len()])).collect()
}

fn main() {
    common::run(bench());
}

async fn bench() {
    let models_dir = std::env::var_os("HEARTH_MODELS_DIR").map_or_else(default_models_dir, PathBuf::from);
    let http_seconds = match std::env::var("HEARTH_BENCH_HTTP_SECONDS") {
        Ok(text) => text.parse().expect("HEARTH_BENCH_HTTP_SECONDS must be a whole number of seconds"),
        Err(_) => DEFAULT_HTTP_SECONDS,
    };
    let sentences = peer_sentences();
    let mut peak_rss_mib = serde_json::Map::new();

    println!("Hearth embeddings bench: {MODEL} from {}", models_dir.display());
    let mut throughput = Vec::new();
    for max_batch_size in BATCH_SIZES {
        let result = measure_throughput(&models_dir, max_batch_size, &sentences).await;
        println!(
            "  max_batch_size {:>3}: {:>7.1} sentences/s, {:>8.0} tokens/s ({:.1} tokens/sentence); \
             RSS {:.0} MiB before the load, {:.0} after, peak {:.0}",
            max_batch_size,
            result.sentences_per_second,
            result.tokens_per_second,
            result.tokens_per_sentence,
            result.memory.rss_before_load,
            result.memory.rss_after_load,
            result.memory.peak
        );
        throughput.push(result);
    }
    peak_rss_mib.insert("after_throughput".into(), json!(peak_rss_mib_now()));

    let peer_json = match run_peer(&models_dir) {
        Ok(report) => {
            let mut ratios = serde_json::Map::new();
            for batch in PEER_BATCH_SIZES {
                let hearth = throughput
                    .iter()
                    .find(|t| t.max_batch_size == batch)
                    .expect("every peer batch size is also measured for Hearth");
                let peer_rate = report[format!("sentences_per_s_batch{batch}")]
                    .as_f64()
                    .expect("the peer reports sentences/s for each batch size");
                let ratio = hearth.sentences_per_second / peer_rate;
                println!(
                    "  peer (ONNX Runtime int8) batch {batch:>2}: {peer_rate:>7.1} sentences/s; \
                     Hearth/peer {ratio:.2}"
                );
                ratios.insert(format!("batch{batch}"), json!(round(ratio, 3)));
            }
            json!({ "report": report, "hearth_over_peer_sentences_per_second": ratios })
        }
        Err(reason) => {
            println!("  peer skipped: {reason}");
            json!({ "skipped": reason })
        }
    };

    let ingest = measure_ingest(&models_dir).await;
    let padding = measure_padding(&models_dir).await;

    let (http, http_max_batch_size) = measure_http(&models_dir, &sentences, http_seconds).await;
    let peak_rss_after_http = peak_rss_mib_now();
    peak_rss_mib.insert("after_http".into(), json!(peak_rss_after_http));
    println!("  peak RSS: {peak_rss_after_http:.0} MiB");

    let results = json!({
        "bench": "embeddings",
        "command": "cargo bench --bench embeddings",
        "machine": machine(),
        "model": MODEL,
        "source": source(),
        "device": "cpu",
        "dtype": if source() == MODEL { "f32" } else { "the folder's (ONNX export when it has one)" },
        "sentences": sentences.len(),
        "throughput": throughput.iter().map(ThroughputResult::to_json).collect::<Vec<_>>(),
        "peer": peer_json,
        "ingest_30pct_repeats": ingest,
        "padding_mixed_lengths": padding,
        "http": {
            "endpoint": "/v1/embeddings",
            "request": "one sentence per request, encoding_format float",
            "server_max_batch_size": http_max_batch_size,
            "warm_up_seconds": HTTP_WARM_UP.as_secs(),
            "measured_seconds_per_level": http_seconds,
            "levels": http.iter().map(LoadResult::to_json).collect::<Vec<_>>(),
        },
        "peak_rss_mib": peak_rss_mib,
    });
    let name = match source().as_str() {
        MODEL => "embeddings.json".to_string(),
        other => format!("embeddings-{other}.json"),
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results").join(name);
    let text = serde_json::to_string_pretty(&results).expect("the results serialize");
    std::fs::write(&path, text + "\n").unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    println!("results written to {}", path.display());
}

/// One model served as configured by `extra_toml` (options added to the preset's), loaded the way
/// `hearth serve` loads it.
async fn load_minilm(models_dir: &Path, extra_toml: &str) -> AppState {
    let source = source();
    let text =
        format!("[[models]]\nid = \"{MODEL}\"\npreset = \"{MODEL}\"\nsource = \"{source}\"\n{extra_toml}");
    let overrides = Overrides { models_dir: Some(models_dir.to_owned()), ..Overrides::default() };
    let config = Config::parse(&text, None, &overrides).expect("the bench's model config is valid");
    let state = AppState::new(config).expect("the server state starts");
    load_models(state.clone()).await;
    state
}

/// The folder the model is loaded from (`HEARTH_BENCH_EMBED_SOURCE`, default [`MODEL`]).
fn source() -> String {
    std::env::var("HEARTH_BENCH_EMBED_SOURCE").unwrap_or_else(|_| MODEL.to_string())
}

/// The loaded model; panics with a hint when it failed to load.
fn ready_model(state: &AppState) -> Arc<Served> {
    let entry = state.registry.get(MODEL).expect("the bench's model is configured");
    match entry.state() {
        LoadState::Ready(served) => served,
        LoadState::Failed(message) => {
            panic!("cannot load {MODEL} ({message}); install it with `scripts/fetch-models {MODEL}`")
        }
        LoadState::Loading | LoadState::Unloaded => {
            unreachable!("load_models returns once every preloaded model is ready or failed")
        }
    }
}

async fn shutdown(state: AppState) {
    let registry = Arc::clone(&state.registry);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    tokio::task::spawn_blocking(move || registry.shutdown(deadline)).await.expect("the model workers stop");
}

/// A throughput phase's memory, MiB: the process before the model loads, after it loads, and its
/// peak while the phase ran (`VmHWM` reset before the load).
struct PhaseMemory {
    rss_before_load: f64,
    rss_after_load: f64,
    peak: f64,
}

/// Resets this process's peak RSS (`VmHWM`) to its current RSS (Linux: `clear_refs` 5) and returns
/// the current RSS, MiB.
fn reset_peak_rss() -> f64 {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        println!("  (cannot reset the peak RSS: {e}; phase peaks include earlier phases)");
    }
    common::status_mib("self", "VmRSS")
}

struct ThroughputResult {
    memory: PhaseMemory,
    max_batch_size: usize,
    sentences_per_second: f64,
    tokens_per_second: f64,
    tokens_per_sentence: f64,
    run_seconds: Vec<f64>,
}

impl ThroughputResult {
    fn to_json(&self) -> Value {
        json!({
            "max_batch_size": self.max_batch_size,
            "sentences_per_second": round(self.sentences_per_second, 1),
            "tokens_per_second": round(self.tokens_per_second, 0),
            "tokens_per_sentence": round(self.tokens_per_sentence, 2),
            "run_seconds": self.run_seconds.iter().map(|&s| round(s, 3)).collect::<Vec<_>>(),
            "memory_mib": {
                "rss_before_load": round(self.memory.rss_before_load, 1),
                "rss_after_load": round(self.memory.rss_after_load, 1),
                "peak_during_phase": round(self.memory.peak, 1),
            },
        })
    }
}

/// Embeds all `sentences` in one request, so the worker forms batches of `max_batch_size`: one
/// warm-up, then the median of [`TIMED_RUNS`].
async fn measure_throughput(
    models_dir: &Path,
    max_batch_size: usize,
    sentences: &[String],
) -> ThroughputResult {
    let extra = format!("max_batch_size = {max_batch_size}\nmax_batch_tokens = {MAX_BATCH_TOKENS}\n");
    // Memory of this phase alone: the peak is reset first (the previous phase's model is gone).
    let rss_before_load = reset_peak_rss();
    let state = load_minilm(models_dir, &extra).await;
    let rss_after_load = common::status_mib("self", "VmRSS");
    let served = ready_model(&state);
    let Served::Embedding(embedder) = &*served else { unreachable!("{MODEL} is an embedding model") };
    embed_all(embedder, sentences).await;
    let mut runs = Vec::with_capacity(TIMED_RUNS);
    for _ in 0..TIMED_RUNS {
        runs.push(embed_all(embedder, sentences).await);
    }
    let memory = PhaseMemory { rss_before_load, rss_after_load, peak: common::status_mib("self", "VmHWM") };
    drop(served);
    shutdown(state).await;
    let (seconds, n_tokens) = median_by_seconds(&runs);
    ThroughputResult {
        memory,
        max_batch_size,
        sentences_per_second: sentences.len() as f64 / seconds,
        tokens_per_second: n_tokens as f64 / seconds,
        tokens_per_sentence: n_tokens as f64 / sentences.len() as f64,
        run_seconds: runs.iter().map(|&(s, _)| s).collect(),
    }
}

/// Ingest-like traffic: 2,000 texts in requests of 32 where 30% repeat a text sent before, embedded
/// with the cache off and with `cache_mib = 64`; sentences/s for each.
async fn measure_ingest(models_dir: &Path) -> Value {
    // In every ten texts the first three repeat one sent earlier; the others are new.
    let mut texts: Vec<String> = Vec::with_capacity(2000);
    for i in 0..2000usize {
        let text = if i >= 10 && i % 10 < 3 {
            texts[(i * 7919) % i].clone()
        } else {
            format!("Document {i}: notes about machine {} and its disks.", i % 97)
        };
        texts.push(text);
    }
    let repeats = {
        let mut seen = std::collections::HashSet::new();
        texts.iter().filter(|t| !seen.insert(t.as_str())).count()
    };
    let mut results = serde_json::Map::new();
    for (label, extra) in [("cache_off", ""), ("cache_64mib", "cache_mib = 64\n")] {
        let state = load_minilm(models_dir, extra).await;
        let served = ready_model(&state);
        let Served::Embedding(embedder) = &*served else { unreachable!("{MODEL} is an embedding model") };
        embed_all(embedder, &texts[..32]).await; // warm up (and, with the cache, nothing else)
        let started = Instant::now();
        for chunk in texts.chunks(32) {
            embed_all(embedder, chunk).await;
        }
        let rate = texts.len() as f64 / started.elapsed().as_secs_f64();
        println!("  ingest, {repeats} of {} texts repeated, {label}: {rate:.1} sentences/s", texts.len());
        results.insert(label.into(), json!(round(rate, 1)));
        drop(served);
        shutdown(state).await;
    }
    results.insert("texts".into(), json!(texts.len()));
    results.insert("repeated".into(), json!(repeats));
    Value::Object(results)
}

/// Texts of mixed lengths (the first [`PADDING_TEXTS`] documents of retrieval-debian, 11 to 256
/// tokens) in batches of 32, two ways: in arrival order (requests of 32 sent one after another, so
/// each pass pads to the longest of 32 neighbours, what a batcher without length sorting carries),
/// and all in one request, which the worker sorts longest first and cuts into passes of similar
/// lengths. Padded and real tokens are read from the worker's own metrics
/// (`hearth_batch_padded_tokens`, `hearth_tokens_processed_total`), not computed here.
async fn measure_padding(models_dir: &Path) -> Value {
    let texts: Vec<String> =
        common::retrieval_debian::documents().iter().take(PADDING_TEXTS).map(|d| d.full_text()).collect();
    let extra = format!("max_batch_size = 32\nmax_batch_tokens = {MAX_BATCH_TOKENS}\ntruncate = true\n");
    let rss_before_load = reset_peak_rss();
    let state = load_minilm(models_dir, &extra).await;
    let served = ready_model(&state);
    let Served::Embedding(embedder) = &*served else { unreachable!("{MODEL} is an embedding model") };
    embed_all(embedder, &texts[..64]).await; // warm-up
    let mut results = serde_json::Map::new();
    for label in ["arrival_order", "sorted_by_length"] {
        let before = batch_counters(&state);
        let started = Instant::now();
        if label == "arrival_order" {
            for chunk in texts.chunks(32) {
                embed_all(embedder, chunk).await;
            }
        } else {
            embed_all(embedder, &texts).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let after = batch_counters(&state);
        let (padded, real, batches) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
        let rate = texts.len() as f64 / seconds;
        println!(
            "  {} texts of mixed length, batches of 32, {label}: {rate:.1} texts/s, {:.0} padded tokens \
             per batch ({:.1}% padding)",
            texts.len(),
            padded / batches,
            100.0 * (padded - real) / padded
        );
        results.insert(
            label.into(),
            json!({
                "texts_per_second": round(rate, 1),
                "batches": batches,
                "padded_tokens": padded,
                "real_tokens": real,
                "padded_tokens_per_batch": round(padded / batches, 1),
                "padding_fraction": round((padded - real) / padded, 4),
            }),
        );
    }
    let peak = common::status_mib("self", "VmHWM");
    println!("  (RSS {rss_before_load:.0} MiB before the load, peak {peak:.0} MiB during the phase)");
    results.insert(
        "memory_mib".into(),
        json!({"rss_before_load": round(rss_before_load, 1), "peak_during_phase": round(peak, 1)}),
    );
    drop(served);
    shutdown(state).await;
    results.insert("texts".into(), json!(texts.len()));
    Value::Object(results)
}

/// How many texts the padding phase embeds.
const PADDING_TEXTS: usize = 1024;

/// The worker's running totals for the bench's model: padded tokens, real tokens, batches.
fn batch_counters(state: &AppState) -> (f64, f64, f64) {
    let text = state.metrics.render();
    let read = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains(&format!("model=\"{MODEL}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        read("hearth_batch_padded_tokens_sum"),
        read("hearth_tokens_processed_total"),
        read("hearth_batch_padded_tokens_count"),
    )
}

/// Seconds to embed `sentences` in one request, and the tokens the model read.
async fn embed_all(embedder: &Embedder, sentences: &[String]) -> (f64, usize) {
    let input = EmbedInput::Texts(sentences.to_vec());
    let started = Instant::now();
    let embeddings = embedder.embed(input, None, Priority::Normal).await.expect("the sentences embed");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(embeddings.vectors.len(), sentences.len(), "one vector per sentence");
    (seconds, embeddings.n_tokens)
}

fn median_by_seconds(runs: &[(f64, usize)]) -> (f64, usize) {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    sorted[sorted.len() / 2]
}

/// Runs `benches/peers/embed_ort.py` and returns its JSON report, or why it could not run.
fn run_peer(models_dir: &Path) -> Result<Value, String> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("hearth");
    let python =
        std::env::var_os("HEARTH_PEER_PYTHON").map_or_else(|| cache.join("venv/bin/python"), PathBuf::from);
    let peers_dir = std::env::var_os("HEARTH_PEERS_DIR").map_or_else(|| cache.join("peers"), PathBuf::from);
    // The peers' own copy (benches/peers/setup.sh), else the same file scripts/fetch-models installs.
    let onnx = Some(peers_dir.join("minilm-int8/model.onnx"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| models_dir.join("all-minilm-l6-v2-int8/model.onnx"));
    let tokenizer = models_dir.join(MODEL).join("tokenizer.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/embed_ort.py");
    for (what, path) in [("peer python", &python), ("peer model", &onnx), ("tokenizer", &tokenizer)] {
        if !path.is_file() {
            return Err(format!("no {what} at {} (run benches/peers/setup.sh)", path.display()));
        }
    }
    println!("  running the peer: {} {}", python.display(), script.display());
    let output = Command::new(&python)
        .arg(&script)
        .arg(&onnx)
        .arg(&tokenizer)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("the peer failed ({}): {}", output.status, stderr.trim()));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last_line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last_line).map_err(|e| format!("the peer printed `{last_line}`, not JSON: {e}"))
}

struct LoadResult {
    n_clients: usize,
    requests: usize,
    failures: usize,
    seconds: f64,
    /// Latencies of successful requests, sorted, in seconds.
    latencies: Vec<f64>,
}

impl LoadResult {
    fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    /// Nearest-rank percentile, in milliseconds.
    fn percentile_ms(&self, p: f64) -> f64 {
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1] * 1e3
    }

    fn mean_ms(&self) -> f64 {
        self.latencies.iter().sum::<f64>() / self.latencies.len() as f64 * 1e3
    }

    fn to_json(&self) -> Value {
        json!({
            "n_clients": self.n_clients,
            "requests": self.requests,
            "failures": self.failures,
            "seconds": round(self.seconds, 2),
            "requests_per_second": round(self.requests_per_second(), 1),
            "latency_ms": {
                "p50": round(self.percentile_ms(50.0), 2),
                "p99": round(self.percentile_ms(99.0), 2),
                "mean": round(self.mean_ms(), 2),
            },
        })
    }
}

/// Serves the real router on 127.0.0.1 with the model configured as `config/offline.toml` serves it
/// (the preset's batching defaults) and drives it at each level of [`CLIENT_LEVELS`]. Returns the
/// results and the server's `max_batch_size`.
async fn measure_http(
    models_dir: &Path,
    sentences: &[String],
    http_seconds: u64,
) -> (Vec<LoadResult>, usize) {
    let state = load_minilm(models_dir, "").await;
    let server_max_batch_size = match &state.config.models[0].options {
        hearth::config::KindConfig::Embedding(encoder) => encoder.batch.max_batch_size,
        _ => unreachable!("{MODEL} is an embedding model"),
    };
    ready_model(&state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("can listen on 127.0.0.1");
    let url = format!("http://{}/v1/embeddings", listener.local_addr().expect("a bound address"));
    let router = hearth::http::router(state.clone());
    let server = tokio::spawn(async move { axum::serve(listener, router).await.expect("the server runs") });
    let client = reqwest::Client::builder().no_proxy().build().expect("an HTTP client");
    check_response(&client, &url, &sentences[0]).await;

    let sentences: Arc<[String]> = sentences.into();
    let mut results = Vec::new();
    for n_clients in CLIENT_LEVELS {
        drive(&client, &url, &sentences, n_clients, HTTP_WARM_UP).await;
        let result = drive(&client, &url, &sentences, n_clients, Duration::from_secs(http_seconds)).await;
        assert!(!result.latencies.is_empty(), "no request succeeded with {n_clients} clients");
        println!(
            "  HTTP {:>2} clients: p50 {:>7.2} ms, p99 {:>7.2} ms, mean {:>7.2} ms, {:>6.1} requests/s{}",
            n_clients,
            result.percentile_ms(50.0),
            result.percentile_ms(99.0),
            result.mean_ms(),
            result.requests_per_second(),
            if result.failures > 0 { format!(", {} failed", result.failures) } else { String::new() },
        );
        results.push(result);
    }
    server.abort();
    let stopped = server.await;
    assert!(stopped.as_ref().is_err_and(|e| e.is_cancelled()), "the server stopped early: {stopped:?}");
    shutdown(state).await;
    (results, server_max_batch_size)
}

fn request_body(sentence: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({ "model": MODEL, "input": sentence })).expect("the request serializes")
}

/// One request, checked in full: the load levels only look at status codes.
async fn check_response(client: &reqwest::Client, url: &str, sentence: &str) {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(request_body(sentence))
        .send()
        .await
        .expect("the server answers");
    assert!(response.status().is_success(), "status {}", response.status());
    let body: Value = serde_json::from_slice(&response.bytes().await.expect("a body")).expect("a JSON body");
    let dims = body["data"][0]["embedding"].as_array().map_or(0, Vec::len);
    assert_eq!(dims, 384, "all-MiniLM-L6-v2 gives 384 dimensions: {body}");
}

/// `n_clients` tasks, each sending single-sentence requests back to back until `duration` has passed.
async fn drive(
    client: &reqwest::Client,
    url: &str,
    sentences: &Arc<[String]>,
    n_clients: usize,
    duration: Duration,
) -> LoadResult {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..n_clients)
        .map(|client_index| {
            let (client, url, sentences) = (client.clone(), url.to_owned(), Arc::clone(sentences));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = 0;
                let mut next = client_index;
                while Instant::now() < deadline {
                    let body = request_body(&sentences[next % sentences.len()]);
                    next += n_clients;
                    let sent = Instant::now();
                    let response =
                        client.post(&url).header("content-type", "application/json").body(body).send();
                    let ok = match response.await {
                        Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if ok {
                        latencies.push(sent.elapsed().as_secs_f64());
                    } else {
                        failures += 1;
                    }
                }
                (latencies, failures)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut failures = 0;
    for task in tasks {
        let (task_latencies, task_failures) = task.await.expect("a client task finishes");
        latencies.extend(task_latencies);
        failures += task_failures;
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    LoadResult { n_clients, requests: latencies.len(), failures, seconds, latencies }
}

/// The process's peak resident set so far (`VmHWM`), in MiB.
fn peak_rss_mib_now() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status is readable (Linux)");
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("/proc/self/status has VmHWM");
    round(kib / 1024.0, 1)
}
