//! Retrieval quality of the store on retrieval-debian (`benches/data/retrieval-debian`: 2,000
//! Debian package descriptions, their one-line synopses as queries) with the real all-MiniLM-L6-v2 (its int8
//! ONNX export, as config/offline.toml serves it, with its embedding cache, so reranking the
//! candidates re-embeds nothing):
//! BM25 alone, dense alone, hybrid (relative score fusion, Hearth's default; and reciprocal rank
//! fusion) and hybrid + rerank. Each document is one file of one chunk (`title\ntext`, the set's
//! reference setup). Hybrid must beat the set's published reference points for BM25 (recall@10
//! 0.930, MRR@10 0.854) and for dense MiniLM (0.966, 0.883).

use std::collections::HashMap;

use hearth_engine::embed::{Embed, EmbedInput};
use hearth_engine::registry::Served;
use hearth_engine::{ModelKind, Priority};
use hearth_rag::fusion::Fusion;
use hearth_rag::{ChunkingStrategy, Library, LibraryOptions, Metric, NewChunk, SearchRequest};
use serde_json::Map;

use crate::support::{app, models_root};

#[path = "../../benches/common/retrieval_debian.rs"]
mod retrieval_debian;

#[derive(Default, Debug)]
struct Scores {
    recall: [f64; 3],
    mrr: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_retrieval_beats_bm25_and_dense_alone_on_retrieval_debian() {
    let documents = retrieval_debian::documents();
    let queries = retrieval_debian::queries();
    let onnxruntime = std::env::var_os("ORT_DYLIB_PATH")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(hearth::config::default_onnxruntime_library);
    let app = app(&format!(
        "models_dir = \"{}\"\n[server]\nonnxruntime_library = \"{}\"\n[[models]]\nid = \"minilm\"\npreset = \"all-minilm-l6-v2\"\nsource = \"all-minilm-l6-v2-int8\"\ndevice = \"cpu\"\ntruncate = true\ncache_mib = 64\n\
         [[models]]\nid = \"minilm-rerank\"\nkind = \"rerank\"\nembedding_model = \"minilm\"\n",
        models_root().display(),
        onnxruntime.display()
    ))
    .await;
    let (_, served) = hearth::http::ready_model(&app.state, "minilm", ModelKind::Embedding).await.unwrap();
    let Served::Embedding(embedder) = &*served else { panic!("not an embedder") };
    let embed = |texts: Vec<String>| async move {
        let mut vectors = Vec::with_capacity(texts.len());
        for batch in texts.chunks(64) {
            vectors.extend(
                embedder
                    .embed(EmbedInput::Texts(batch.to_vec()), None, Priority::Normal)
                    .await
                    .unwrap()
                    .vectors,
            );
        }
        vectors
    };
    let texts: Vec<String> = documents.iter().map(retrieval_debian::Document::full_text).collect();
    let started = std::time::Instant::now();
    let vectors = embed(texts.clone()).await;
    println!("embedded {} documents in {:.1} s", texts.len(), started.elapsed().as_secs_f64());

    let dir = tempfile::tempdir().unwrap();
    let library = Library::open(dir.path(), LibraryOptions::default()).unwrap();
    let store = library.create_store(None, Map::new(), None, "minilm", 384, Metric::Dot).unwrap().id;
    let chunking = ChunkingStrategy { max_chunk_size_tokens: 800, chunk_overlap_tokens: 400 };
    let mut doc_of_file = HashMap::new();
    for ((document, text), vector) in documents.iter().zip(texts).zip(vectors) {
        let file = library.create_file(&document.id, "assistants", text.as_bytes()).unwrap();
        library.add_store_file(&store, &file.id, Map::new(), chunking, None).unwrap();
        library.complete_store_file(&store, &file.id, &[NewChunk { position: 0, text, vector }]).unwrap();
        doc_of_file.insert(file.id, document.id.clone());
    }
    assert!(library.verify(&store).unwrap().agrees());
    println!("stored and indexed at {:.1} s", started.elapsed().as_secs_f64());

    let query_vectors = embed(queries.iter().map(|q| q.query.clone()).collect()).await;
    let (_, served) =
        hearth::http::ready_model(&app.state, "minilm-rerank", ModelKind::Rerank).await.unwrap();
    let Served::Rerank(reranker) = &*served else { panic!("not a reranker") };
    use hearth_engine::rerank::Rerank;

    // Hearth's default fusion (relative scores, `[rag]`'s default weights), and RRF for
    // comparison. The offline reranker is MiniLM itself as a bi-encoder (no cross-encoder
    // weights ship in a registry), so reranking reorders the fused candidates by the dense
    // cosine: measured and printed, not expected to help.
    let (dw, lw) = (hearth::config::rag::DEFAULT_DENSE_WEIGHT, hearth::config::rag::DEFAULT_LEXICAL_WEIGHT);
    let (relative, rrf) = (Fusion::RelativeScore, Fusion::ReciprocalRank { k: 60.0 });
    let modes = [
        ("bm25", 0.0, 1.0, relative, false),
        ("dense", 1.0, 0.0, relative, false),
        ("hybrid", dw, lw, relative, false),
        ("hybrid (rrf)", 1.0, 1.0, rrf, false),
        ("hybrid+rerank", dw, lw, relative, true),
    ];
    let mut results = Vec::new();
    for (name, dense_weight, lexical_weight, fusion, rerank) in modes {
        let mut scores = Scores::default();
        for (query, vector) in queries.iter().zip(&query_vectors) {
            let request = SearchRequest {
                vector: Some(vector.clone()),
                text: Some(query.query.clone()),
                candidates: 50,
                filter: None,
                dense_weight,
                lexical_weight,
                fusion,
            };
            let mut hits = library.search(std::slice::from_ref(&store), &request).unwrap();
            if rerank {
                hits.truncate(20);
                let documents = hits.iter().map(|h| h.text.clone()).collect();
                let relevance =
                    reranker.rerank(query.query.clone(), documents, Priority::Normal).await.unwrap().scores;
                let mut scored: Vec<_> = hits.into_iter().zip(relevance).collect();
                scored.sort_by(|a, b| b.1.total_cmp(&a.1));
                hits = scored.into_iter().map(|(h, _)| h).collect();
            }
            let ranked: Vec<&String> = hits.iter().map(|h| &doc_of_file[&h.file_id]).collect();
            let rank = ranked.iter().position(|d| query.relevant.contains(d));
            for (slot, cutoff) in [1, 5, 10].into_iter().enumerate() {
                scores.recall[slot] += rank.is_some_and(|r| r < cutoff) as u8 as f64;
            }
            scores.mrr += rank.filter(|&r| r < 10).map_or(0.0, |r| 1.0 / (r as f64 + 1.0));
        }
        let n = queries.len() as f64;
        scores.recall.iter_mut().for_each(|r| *r /= n);
        scores.mrr /= n;
        println!(
            "{name:>15}: recall@1 {:.3}  recall@5 {:.3}  recall@10 {:.3}  MRR@10 {:.3}",
            scores.recall[0], scores.recall[1], scores.recall[2], scores.mrr
        );
        results.push((name, scores));
    }
    let get = |name: &str| &results.iter().find(|r| r.0 == name).unwrap().1;
    let (bm25, dense, hybrid) = (get("bm25"), get("dense"), get("hybrid"));
    // Hearth's own BM25 and dense rankings reproduce the set's reference points…
    assert!((bm25.recall[2] - 0.930).abs() < 0.02 && (bm25.mrr - 0.854).abs() < 0.02, "{bm25:?}");
    assert!((dense.recall[2] - 0.966).abs() < 0.01 && (dense.mrr - 0.883).abs() < 0.01, "{dense:?}");
    // …and hybrid beats both, on the reference points and on Hearth's own rankings.
    for (recall, mrr) in
        [(0.930, 0.854), (0.966, 0.883), (bm25.recall[2], bm25.mrr), (dense.recall[2], dense.mrr)]
    {
        assert!(hybrid.recall[2] > recall && hybrid.mrr > mrr, "hybrid {hybrid:?} vs ({recall}, {mrr})");
    }
}
