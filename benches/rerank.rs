//! `cargo bench --features onnx --bench rerank`: cross-encoder throughput, in (query, document)
//! pairs per second, on each backend Hearth has, beside ONNX Runtime run from Python on the same
//! files in the same run (`benches/peers/rerank_ort.py`).
//!
//! Two models, each loaded the way `hearth serve` loads it (config, loader, tokenizer, batching
//! worker) and driven through the `Rerank` capability the HTTP handler calls:
//! - `tiny`: the tests' BERT cross-encoder (`tests/fixtures/models/tiny-bert-reranker`, 2 layers
//!   of 32), on candle, on its float ONNX export and on its int8 one: what the fixed costs are;
//! - `minilm-l6`: a cross-encoder of ms-marco-MiniLM-L6-v2's exact shape (6 layers, 384 wide), written
//!   by `scripts/make-minilm-cross-encoder` from the offline MiniLM with a random classifier, since
//!   no cross-encoder's weights ship in a registry (its scores mean nothing; its speed is the real
//!   model's): candle f32, ONNX f32 and ONNX int8 (`model_quantized.onnx`, what `backend = "auto"`
//!   picks on a CPU).
//!
//! Each runs 1,000 pairs (four queries, 250 documents each, one request per query) at
//! `max_batch_size` 1 and 32: one warm-up, then the median of three. The scores of every backend
//! are compared with candle's f32 (the exact reference, itself checked against numpy in the tests).
//! Results: `benches/results/rerank.json`. Environment: `HEARTH_MODELS_DIR`, `HEARTH_PEER_PYTHON`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use hearth::config::{default_models_dir, Config, Overrides};
use hearth::server::load_models;
use hearth::state::AppState;
use hearth_engine::registry::{LoadState, Served};
use hearth_engine::rerank::Rerank;
use hearth_engine::Priority;
use serde_json::json;

use common::{machine, round, status_mib};

const BATCH_SIZES: [usize; 2] = [1, 32];
const TIMED_RUNS: usize = 3;

/// The pairs of `benches/peers/rerank_ort.py`, grouped by query (one request each).
fn requests() -> Vec<(String, Vec<String>)> {
    let queries = [
        "How often does the backup job run?",
        "Which dashboards show memory usage?",
        "How does the laptop reach the home network?",
        "What does the GPU node serve?",
    ];
    let sentences = [
        "The backup job runs every night and keeps thirty days of snapshots on the NAS.",
        "WireGuard tunnels connect the laptop to the home network from anywhere.",
        "The GPU node serves language models, speech recognition and text to speech.",
        "Grafana dashboards show memory, CPU and disk usage for every machine.",
        "The media server transcodes films for the television in the living room.",
    ];
    let mut grouped: Vec<(String, Vec<String>)> =
        queries.iter().map(|q| (q.to_string(), Vec::new())).collect();
    for i in 0..1000 {
        grouped[i % 4].1.push(format!("{} {} Item {i}.", sentences[i % 5], sentences[(i + 2) % 5]));
    }
    grouped
}

struct Variant {
    family: &'static str,
    backend: &'static str,
    models_dir: PathBuf,
    source: &'static str,
    /// The ONNX file the peer runs for this variant (ONNX variants only).
    onnx_file: Option<&'static str>,
}

fn main() {
    common::run(bench());
}

async fn bench() {
    let models_dir = std::env::var_os("HEARTH_MODELS_DIR").map_or_else(default_models_dir, PathBuf::from);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    ensure_minilm_cross_encoder(&models_dir);
    let variant = |family, backend, dir: &Path, source, onnx_file| Variant {
        family,
        backend,
        models_dir: dir.to_owned(),
        source,
        onnx_file,
    };
    let variants = [
        variant("tiny", "candle-f32", &fixtures, "tiny-bert-reranker", None),
        variant("tiny", "onnx-f32", &fixtures, "tiny-bert-reranker-onnx", Some("onnx/model.onnx")),
        variant("tiny", "onnx-int8", &fixtures, "tiny-bert-reranker-int8", Some("onnx/model_quantized.onnx")),
        variant("minilm-l6", "candle-f32", &models_dir, "minilm-l6-cross-encoder", None),
        variant(
            "minilm-l6",
            "onnx-f32",
            &models_dir,
            "minilm-l6-cross-encoder-onnx-f32",
            Some("onnx/model.onnx"),
        ),
        variant(
            "minilm-l6",
            "onnx-int8",
            &models_dir,
            "minilm-l6-cross-encoder",
            Some("onnx/model_quantized.onnx"),
        ),
    ];
    let requests = requests();
    println!("Hearth rerank bench: 1,000 pairs, cross-encoders on the CPU");
    let mut rows = Vec::new();
    let mut exact: Option<(&str, Vec<f32>)> = None;
    for v in &variants {
        let backend_key = if v.backend.starts_with("candle") { "candle" } else { "onnx" };
        let mut row = json!({"model": v.family, "backend": v.backend, "source": v.source});
        for max_batch_size in BATCH_SIZES {
            let extra = format!(
                "backend = \"{backend_key}\"\nmax_batch_size = {max_batch_size}\nmax_batch_tokens = 65536\n\
                 max_inputs_per_request = 1000\nmax_tokens_per_request = 1000000\n"
            );
            let state = load(&v.models_dir, v.source, &extra).await;
            let served = ready(&state, v.source);
            let Served::Rerank(reranker) = &*served else { unreachable!("a rerank model") };
            let (_, scores, n_tokens) = score_all(reranker, &requests).await;
            let mut runs = Vec::new();
            for _ in 0..TIMED_RUNS {
                runs.push(score_all(reranker, &requests).await.0);
            }
            drop(served);
            shutdown(state).await;
            runs.sort_by(f64::total_cmp);
            let rate = 1000.0 / runs[TIMED_RUNS / 2];
            println!(
                "  {:<10} {:<11} batch {max_batch_size:>2}: {rate:>8.1} pairs/s ({:.1} tokens/pair)",
                v.family,
                v.backend,
                n_tokens as f64 / 1000.0
            );
            row[format!("pairs_per_s_batch{max_batch_size}")] = json!(round(rate, 1));
            row["tokens_per_pair"] = json!(round(n_tokens as f64 / 1000.0, 2));
            if max_batch_size == 1 {
                match &exact {
                    Some((family, reference)) if *family == v.family => {
                        let worst =
                            scores.iter().zip(reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                        row["max_score_difference_to_candle_f32"] = json!(round(f64::from(worst), 6));
                    }
                    _ => exact = Some((v.family, scores.clone())),
                }
            }
        }
        row["rss_mib_after"] = json!(round(status_mib("self", "VmRSS"), 1));
        if let Some(file) = v.onnx_file {
            let dir = v.models_dir.join(v.source);
            match common::python_peer(
                "HEARTH_PEER_PYTHON",
                "rerank_ort.py",
                &[dir.join(file).as_os_str(), dir.join("tokenizer.json").as_os_str()],
            ) {
                Ok(peer) => {
                    println!(
                        "  {:<10} {:<11} peer (ONNX Runtime from Python): {} / {} pairs/s at batch 1 / 32",
                        v.family, v.backend, peer["pairs_per_s_batch1"], peer["pairs_per_s_batch32"]
                    );
                    for b in BATCH_SIZES {
                        let key = format!("pairs_per_s_batch{b}");
                        if let (Some(ours), Some(theirs)) = (row[&key].as_f64(), peer[&key].as_f64()) {
                            row[format!("ratio_to_peer_batch{b}")] = json!(round(ours / theirs, 2));
                        }
                    }
                    row["peer"] = peer;
                }
                Err(why) => {
                    println!("  peer not run: {why}");
                    row["peer"] = json!({"error": why});
                }
            }
        }
        rows.push(row);
    }
    let results = json!({
        "bench": "rerank",
        "machine": machine(),
        "pairs": 1000,
        "requests": requests.len(),
        "results": rows,
        "peak_rss_mib": round(common::peak_rss_mib(), 1),
    });
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/rerank.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap() + "\n").expect("write the results");
    println!("wrote {}", path.display());
}

/// Writes the MiniLM-shaped cross-encoder with `scripts/make-minilm-cross-encoder` if it is not there.
fn ensure_minilm_cross_encoder(models_dir: &Path) {
    let wanted = [
        models_dir.join("minilm-l6-cross-encoder/onnx/model_quantized.onnx"),
        models_dir.join("minilm-l6-cross-encoder-onnx-f32/onnx/model.onnx"),
    ];
    if wanted.iter().all(|p| p.is_file()) {
        return;
    }
    let python = std::env::var_os("HEARTH_PEER_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/hearth/venv/bin/python")
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-minilm-cross-encoder");
    let status = Command::new(&python)
        .arg(&script)
        .arg(models_dir.join("all-minilm-l6-v2"))
        .arg(models_dir.join("minilm-l6-cross-encoder"))
        .status()
        .expect("run scripts/make-minilm-cross-encoder");
    assert!(status.success(), "scripts/make-minilm-cross-encoder failed (is all-minilm-l6-v2 installed?)");
}

async fn load(models_dir: &Path, source: &str, extra: &str) -> AppState {
    let text = format!(
        "[[models]]\nid = \"{source}\"\nkind = \"rerank\"\nsource = \"{source}\"\ndevice = \"cpu\"\n{extra}"
    );
    let overrides = Overrides { models_dir: Some(models_dir.to_owned()), ..Overrides::default() };
    let config = Config::parse(&text, None, &overrides).expect("the bench's model config is valid");
    let state = AppState::new(config).expect("the server state starts");
    load_models(state.clone()).await;
    state
}

fn ready(state: &AppState, id: &str) -> Arc<Served> {
    match state.registry.get(id).expect("configured").state() {
        LoadState::Ready(served) => served,
        LoadState::Failed(message) => panic!("cannot load {id}: {message}"),
        LoadState::Loading | LoadState::Unloaded => unreachable!("load_models waits for every model"),
    }
}

async fn shutdown(state: AppState) {
    let registry = Arc::clone(&state.registry);
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    tokio::task::spawn_blocking(move || registry.shutdown(deadline)).await.expect("the workers stop");
}

/// Seconds to score every pair (one request per query, one after another), the scores in pair
/// order, and the tokens the model read.
async fn score_all(
    reranker: &hearth_engine::rerank::Reranker,
    requests: &[(String, Vec<String>)],
) -> (f64, Vec<f32>, usize) {
    let started = Instant::now();
    let mut scores = Vec::new();
    let mut tokens = 0;
    for (query, documents) in requests {
        let answer = reranker
            .rerank(query.clone(), documents.clone(), Priority::Normal)
            .await
            .expect("the pairs are scored");
        assert_eq!(answer.scores.len(), documents.len());
        scores.extend(answer.scores);
        tokens += answer.n_tokens;
    }
    (started.elapsed().as_secs_f64(), scores, tokens)
}
