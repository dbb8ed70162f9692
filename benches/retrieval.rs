//! `cargo bench --bench retrieval`: retrieval quality of Hearth's embeddings. Embeds the vendored
//! retrieval-debian set (`benches/data/retrieval-debian`: 2,000 Debian package descriptions, 2,000
//! one-line synopses as queries) with all-MiniLM-L6-v2 through Hearth's real loader and engine, ranks
//! every document for every query by cosine similarity (brute force), and reports recall@1/5/10 and
//! MRR@10 beside the set's published reference points, in `benches/results/retrieval.json`.
//!
//! The models directory is `HEARTH_MODELS_DIR` (default `~/.cache/hearth/models`), where
//! `scripts/fetch-models` installs the model.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use hearth::config::{default_models_dir, Config, Overrides};
use hearth::server::load_models;
use hearth::state::AppState;
use hearth_engine::embed::{Embed, EmbedInput, Embedder};
use hearth_engine::registry::{LoadState, Served};
use hearth_engine::Priority;
use serde_json::{json, Value};

use common::retrieval_debian::{self, Document};
use common::{machine, round};

const MODEL: &str = "all-minilm-l6-v2";
const DATA_DIR: &str = "benches/data/retrieval-debian";
/// The cut-offs reported; MRR is taken at the largest.
const CUTOFFS: [usize; 3] = [1, 5, 10];
const MRR_CUTOFF: usize = 10;

fn main() {
    common::run(bench());
}

async fn bench() {
    let started = Instant::now();
    let documents = retrieval_debian::documents();
    let queries = retrieval_debian::queries();
    let models_dir = std::env::var_os("HEARTH_MODELS_DIR").map_or_else(default_models_dir, PathBuf::from);
    // `HEARTH_BENCH_EMBED_SOURCE`: another folder of the same model (the int8 ONNX export, with
    // `--features onnx`); its results go to `retrieval-FOLDER.json`.
    let source = std::env::var("HEARTH_BENCH_EMBED_SOURCE").unwrap_or_else(|_| MODEL.to_string());
    println!(
        "Hearth retrieval bench: {MODEL} from {} on retrieval-debian ({} documents, {} queries)",
        models_dir.display(),
        documents.len(),
        queries.len()
    );

    // Documents are longer than the model's 256 tokens; the set's reference embeds them truncated.
    let text = format!(
        "[[models]]\nid = \"{MODEL}\"\npreset = \"{MODEL}\"\nsource = \"{source}\"\ntruncate = true\n"
    );
    let overrides = Overrides { models_dir: Some(models_dir), ..Overrides::default() };
    let state =
        AppState::new(Config::parse(&text, None, &overrides).expect("the bench's model config is valid"))
            .expect("the server state starts");
    load_models(state.clone()).await;
    let served = match state.registry.get(MODEL).expect("the bench's model is configured").state() {
        LoadState::Ready(served) => served,
        LoadState::Failed(message) => {
            panic!("cannot load {MODEL} ({message}); install it with `scripts/fetch-models {MODEL}`")
        }
        LoadState::Loading | LoadState::Unloaded => {
            unreachable!("load_models returns once every preloaded model is ready or failed")
        }
    };
    let Served::Embedding(embedder) = &*served else { unreachable!("{MODEL} is an embedding model") };

    let document_texts = documents.iter().map(Document::full_text).collect();
    let (document_vectors, document_seconds, document_tokens) = embed(embedder, document_texts).await;
    let query_texts = queries.iter().map(|q| q.query.clone()).collect();
    let (query_vectors, query_seconds, query_tokens) = embed(embedder, query_texts).await;
    drop(served);
    let registry = Arc::clone(&state.registry);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    tokio::task::spawn_blocking(move || registry.shutdown(deadline)).await.expect("the model worker stops");

    let index_of: HashMap<&str, usize> =
        documents.iter().enumerate().map(|(i, d)| (d.id.as_str(), i)).collect();
    let mut hits_at = [0.0; CUTOFFS.len()];
    let mut reciprocal_rank_sum = 0.0;
    for (query, query_vector) in queries.iter().zip(&query_vectors) {
        let relevant: Vec<usize> = query
            .relevant
            .iter()
            .map(|id| {
                *index_of
                    .get(id.as_str())
                    .unwrap_or_else(|| panic!("query relevant id `{id}` is not in the corpus"))
            })
            .collect();
        let ranking = rank(query_vector, &document_vectors);
        for (hits, cutoff) in hits_at.iter_mut().zip(CUTOFFS) {
            let found = ranking[..cutoff].iter().filter(|i| relevant.contains(i)).count();
            *hits += found as f64 / relevant.len() as f64;
        }
        if let Some(position) = ranking[..MRR_CUTOFF].iter().position(|i| relevant.contains(i)) {
            reciprocal_rank_sum += 1.0 / (position + 1) as f64;
        }
    }
    let n_queries = queries.len() as f64;
    let mut metrics = serde_json::Map::new();
    for (hits, cutoff) in hits_at.iter().zip(CUTOFFS) {
        metrics.insert(format!("recall@{cutoff}"), json!(round(hits / n_queries, 4)));
    }
    metrics.insert(format!("mrr@{MRR_CUTOFF}"), json!(round(reciprocal_rank_sum / n_queries, 4)));
    let wall_seconds = started.elapsed().as_secs_f64();

    println!("  Hearth MiniLM ({source}):   {}", format_metrics(&metrics));
    let mut references = serde_json::Map::new();
    for (name, label, reference) in reference_points() {
        println!("  {label:<29} {}", format_metrics(&reference));
        references.insert(name.into(), reference.into());
    }
    println!(
        "  embedded {} documents in {document_seconds:.1} s ({:.1}/s), {} queries in {query_seconds:.1} s; \
         wall time {wall_seconds:.1} s",
        documents.len(),
        documents.len() as f64 / document_seconds,
        queries.len()
    );

    let results = json!({
        "bench": "retrieval",
        "command": "cargo bench --bench retrieval",
        "machine": machine(),
        "data_set": "retrieval-debian",
        "documents": documents.len(),
        "queries": queries.len(),
        "method": "all-MiniLM-L6-v2 via Hearth (candle, f32, mean pooling, normalised, documents \
                   `title\\ntext` truncated to 256 tokens), brute-force cosine",
        "metrics": metrics,
        "references": references,
        "references_source": format!("{DATA_DIR}/README.md"),
        "document_embedding_seconds": round(document_seconds, 2),
        "document_tokens": document_tokens,
        "query_embedding_seconds": round(query_seconds, 2),
        "query_tokens": query_tokens,
        "wall_seconds": round(wall_seconds, 1),
    });
    let name =
        if source == MODEL { "retrieval.json".to_string() } else { format!("retrieval-{source}.json") };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results").join(name);
    let text = serde_json::to_string_pretty(&results).expect("the results serialize");
    std::fs::write(&path, text + "\n").unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    println!("results written to {}", path.display());
}

/// Embeds `texts` in one request; returns the vectors, the seconds taken and the tokens read.
async fn embed(embedder: &Embedder, texts: Vec<String>) -> (Vec<Vec<f32>>, f64, usize) {
    let started = Instant::now();
    let embeddings =
        embedder.embed(EmbedInput::Texts(texts), None, Priority::Normal).await.expect("the texts embed");
    (embeddings.vectors, started.elapsed().as_secs_f64(), embeddings.n_tokens)
}

/// Document indices, most similar first (ties by corpus order). The vectors are unit length, so the
/// dot product is the cosine.
fn rank(query: &[f32], documents: &[Vec<f32>]) -> Vec<usize> {
    let scores: Vec<f32> = documents.iter().map(|d| d.iter().zip(query).map(|(a, b)| a * b).sum()).collect();
    let mut order: Vec<usize> = (0..documents.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
}

/// The figures published in `benches/data/retrieval-debian/README.md`: name, label, metrics.
fn reference_points() -> [(&'static str, &'static str, serde_json::Map<String, Value>); 2] {
    let metrics =
        |pairs: &[(&str, f64)]| pairs.iter().map(|&(name, value)| (name.to_owned(), json!(value))).collect();
    [
        (
            "bm25",
            "BM25 (set README):",
            metrics(&[("recall@1", 0.809), ("recall@5", 0.909), ("recall@10", 0.930), ("mrr@10", 0.854)]),
        ),
        (
            "onnxruntime_int8_minilm_dense",
            "ORT int8 MiniLM (set README):",
            metrics(&[("recall@1", 0.832), ("recall@10", 0.966), ("mrr@10", 0.883)]),
        ),
    ]
}

fn format_metrics(metrics: &serde_json::Map<String, Value>) -> String {
    ["recall@1", "recall@5", "recall@10", "mrr@10"]
        .iter()
        .map(|name| match metrics.get(*name).and_then(Value::as_f64) {
            Some(value) => format!("{name} {value:.3}"),
            None => format!("{name}   -  "),
        })
        .collect::<Vec<_>>()
        .join("  ")
}
