//! `/v1/rerank` and `/rerank`: both cross-encoder layouts against their references, the bi-encoder
//! against the embeddings endpoint, and the Cohere/Jina request options.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use serde_json::{json, Value};

use hearth_engine::vector::cosine;

use crate::support::{floats, reference, tiny_apps};

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Reference cases grouped by query: query → [(document, logit)].
fn by_query(model: &str) -> BTreeMap<String, Vec<(String, f64)>> {
    let mut groups: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    for case in reference(model)["cases"].as_array().unwrap() {
        groups
            .entry(case["query"].as_str().unwrap().to_owned())
            .or_default()
            .push((case["document"].as_str().unwrap().to_owned(), case["logit"].as_f64().unwrap()));
    }
    groups
}

async fn check_cross_encoder(served_as: &str, fixture: &str) {
    for (backend, app) in tiny_apps().await {
        eprintln!("backend: {backend:?}");
        for (query, documents) in by_query(fixture) {
            let texts: Vec<&str> = documents.iter().map(|(d, _)| d.as_str()).collect();
            let reply =
                app.post("/v1/rerank", json!({"model": served_as, "query": query, "documents": texts})).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
            let results = reply.body["results"].as_array().unwrap();
            assert_eq!(results.len(), documents.len());
            for result in results {
                let index = result["index"].as_u64().unwrap() as usize;
                let expected = sigmoid(documents[index].1);
                let actual = result["relevance_score"].as_f64().unwrap();
                assert!(
                    (actual - expected).abs() < 1e-4,
                    "{served_as} {query:?} doc {index}: {actual} vs {expected}"
                );
                assert!(result.get("document").is_none(), "documents only when asked");
            }
            let scores: Vec<f64> = results.iter().map(|r| r["relevance_score"].as_f64().unwrap()).collect();
            assert!(scores.windows(2).all(|w| w[0] >= w[1]), "sorted highest first: {scores:?}");
            assert!(reply.body["usage"]["total_tokens"].as_u64().unwrap() > 0);
            assert!(reply.body["id"].as_str().unwrap().starts_with("rerank-"));
        }
    }
}

#[tokio::test]
async fn bert_cross_encoder_scores_match_the_reference() {
    check_cross_encoder("tiny-rerank-bert", "tiny-bert-reranker").await;
}

#[tokio::test]
async fn xlm_roberta_cross_encoder_scores_match_the_reference() {
    check_cross_encoder("tiny-rerank-xlmr", "tiny-xlmr-reranker").await;
}

/// A property (not a reference check; the embeddings themselves are checked against numpy in
/// `embeddings.rs`): a bi-encoder's scores are the cosines of the same model's embeddings, whether
/// the reranker loads the weights itself (`tiny-bi`) or shares the embedding entry's (`tiny-shared-bi`).
#[tokio::test]
async fn property_bi_encoder_scores_are_cosines_of_the_models_embeddings() {
    for (backend, app) in tiny_apps().await {
        eprintln!("backend: {backend:?}");
        let query = "what is the capital of france";
        let documents = ["paris is the capital of france", "the lazy dog", "rain in the park"];
        let mut input = vec![query];
        input.extend(documents);
        let embedded = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": input})).await;
        let vectors: Vec<Vec<f32>> =
            embedded.body["data"].as_array().unwrap().iter().map(|d| floats(&d["embedding"])).collect();
        for model in ["tiny-bi", "tiny-shared-bi"] {
            let reply =
                app.post("/rerank", json!({"model": model, "query": query, "documents": documents})).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
            for result in reply.body["results"].as_array().unwrap() {
                let index = result["index"].as_u64().unwrap() as usize;
                let expected = cosine(&vectors[0], &vectors[index + 1]);
                let actual = result["relevance_score"].as_f64().unwrap() as f32;
                assert!((actual - expected).abs() < 1e-5, "{model} doc {index}: {actual} vs {expected}");
            }
            assert_eq!(reply.body["usage"]["total_tokens"], embedded.body["usage"]["total_tokens"]);
        }
    }
}

#[tokio::test]
async fn top_n_return_documents_and_object_documents() {
    for (backend, app) in tiny_apps().await {
        eprintln!("backend: {backend:?}");
        let documents =
            json!(["the lazy dog", {"text": "paris is the capital of france"}, "rain in the park"]);
        let all = app
            .post(
                "/v1/rerank",
                json!({"model": "tiny-rerank-bert", "query": "capital of france", "documents": documents}),
            )
            .await;
        let top = app
            .post(
                "/v1/rerank",
                json!({"model": "tiny-rerank-bert", "query": "capital of france", "documents": documents,
                   "top_n": 2, "return_documents": true}),
            )
            .await;
        assert_eq!(top.status, StatusCode::OK, "{}", top.text);
        let top_results = top.body["results"].as_array().unwrap();
        assert_eq!(top_results.len(), 2);
        let texts = ["the lazy dog", "paris is the capital of france", "rain in the park"];
        for (ranked, full) in top_results.iter().zip(all.body["results"].as_array().unwrap()) {
            assert_eq!(ranked["index"], full["index"]);
            assert_eq!(ranked["relevance_score"], full["relevance_score"]);
            let index = ranked["index"].as_u64().unwrap() as usize;
            assert_eq!(ranked["document"], json!({"text": texts[index]}));
        }
        let beyond = app
            .post(
                "/v1/rerank",
                json!({"model": "tiny-rerank-bert", "query": "q", "documents": ["a"], "top_n": 10}),
            )
            .await;
        assert_eq!(beyond.body["results"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn rerank_requests_are_validated() {
    for (backend, app) in tiny_apps().await {
        eprintln!("backend: {backend:?}");
        let post = |body: Value| app.post("/v1/rerank", body);
        post(json!({"model": "tiny-rerank-bert", "query": "q", "documents": []})).await.assert_error(
            StatusCode::BAD_REQUEST,
            Some("documents"),
            None,
        );
        post(json!({"model": "tiny-rerank-bert", "query": "", "documents": ["a"]})).await.assert_error(
            StatusCode::BAD_REQUEST,
            Some("query"),
            None,
        );
        post(json!({"model": "tiny-rerank-bert", "query": "q", "documents": ["a", 5]})).await.assert_error(
            StatusCode::BAD_REQUEST,
            Some("documents"),
            None,
        );
        post(json!({"model": "tiny-rerank-bert", "query": "q", "documents": [{"title": "a"}]}))
            .await
            .assert_error(StatusCode::BAD_REQUEST, Some("documents"), None);
        post(json!({"model": "tiny-rerank-bert", "query": "q", "documents": ["a"], "top_n": 0}))
            .await
            .assert_error(StatusCode::BAD_REQUEST, Some("top_n"), None);
        post(json!({"model": "tiny-rerank-bert", "query": "q", "documents": "a"})).await.assert_error(
            StatusCode::BAD_REQUEST,
            Some("documents"),
            None,
        );
        post(json!({"model": "tiny-embed", "query": "q", "documents": ["a"]})).await.assert_error(
            StatusCode::BAD_REQUEST,
            Some("model"),
            Some("model_kind_mismatch"),
        );
        // A query that leaves no room for any document.
        let long_query = "the lazy dog ".repeat(30);
        post(json!({"model": "tiny-rerank-bert", "query": long_query, "documents": ["a"]}))
            .await
            .assert_error(StatusCode::BAD_REQUEST, Some("query"), None);
    }
}

#[tokio::test]
async fn long_documents_are_cut_to_fit_beside_the_query() {
    for (backend, app) in tiny_apps().await {
        eprintln!("backend: {backend:?}");
        let long = "paris is the capital of france ".repeat(20);
        let reply = app
            .post(
                "/v1/rerank",
                json!({"model": "tiny-rerank-bert", "query": "capital", "documents": [long, "dog"]}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        // The tiny BERT has 64 positions; the long pair is cut to exactly that.
        let n_dog = 1 + 1 + 1 + 1 + 1; // [CLS] capital [SEP] dog [SEP]
        assert_eq!(reply.body["usage"]["total_tokens"], 64 + n_dog);
    }
}

/// Per-request truncation of documents: TEI's `truncate: false` refuses a document too long to sit
/// beside the query (rerankers cut by default), `truncation_direction: Left` keeps a document's end
/// instead of its start, and vLLM's `truncate_prompt_tokens` caps every pair.
#[tokio::test]
async fn requests_choose_how_documents_are_cut() {
    for (backend, app) in tiny_apps().await {
        eprintln!("backend: {backend:?}");
        let long = format!("{} paris is the capital of france", "blue green red ".repeat(40));
        let body = |extra: Value| {
            let mut body = json!({"model": "tiny-rerank-bert", "query": "capital of france", "documents": [long, "paris"]});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            body
        };
        let right = app.post("/v1/rerank", body(json!({}))).await;
        assert_eq!(right.status, StatusCode::OK, "{}", right.text);
        let score = |reply: &crate::support::Reply, index: u64| {
            reply.body["results"].as_array().unwrap().iter().find(|r| r["index"] == index).unwrap()
                ["relevance_score"]
                .as_f64()
                .unwrap()
        };
        let left = app.post("/v1/rerank", body(json!({"truncation_direction": "left"}))).await;
        assert_eq!(left.status, StatusCode::OK, "{}", left.text);
        assert_eq!(left.body["usage"], right.body["usage"], "both cut to the model's limit");
        assert_ne!(
            score(&left, 0),
            score(&right, 0),
            "the end and the start score differently: {} {}",
            left.text,
            right.text
        );
        assert_eq!(score(&left, 1), score(&right, 1), "a short document is not cut");
        let refused = app.post("/v1/rerank", body(json!({"truncate": false}))).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.text);
        let capped = app.post("/v1/rerank", body(json!({"truncate_prompt_tokens": 10}))).await;
        assert_eq!(capped.status, StatusCode::OK, "{}", capped.text);
        let pair_tokens = capped.body["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(pair_tokens <= 20, "two pairs of at most 10 tokens: {pair_tokens}");
        let both =
            app.post("/v1/rerank", body(json!({"truncate": true, "truncate_prompt_tokens": 10}))).await;
        assert_eq!(both.status, StatusCode::BAD_REQUEST);
        assert_eq!(both.body["error"]["param"], "truncate_prompt_tokens");
    }
}

/// The scores of `documents` for `query` by index, from a `/v1/rerank` answer.
async fn scores(app: &crate::support::App, model: &str, query: &str, documents: &[&str]) -> Vec<f64> {
    let reply = app.post("/v1/rerank", json!({"model": model, "query": query, "documents": documents})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let mut by_index = vec![f64::NAN; documents.len()];
    for result in reply.body["results"].as_array().unwrap() {
        by_index[result["index"].as_u64().unwrap() as usize] = result["relevance_score"].as_f64().unwrap();
    }
    by_index
}

#[tokio::test]
async fn a_cross_encoder_with_a_cache_runs_only_pairs_it_has_not_scored() {
    use hearth_engine::registry::{LoadState, Served};
    let app = crate::support::app(&crate::support::tiny_config(
        "\n[[models]]\nid = \"tiny-rerank-cached\"\nkind = \"rerank\"\nsource = \"tiny-bert-reranker\"\ndevice = \"cpu\"\ncache_mib = 1\n",
    ))
    .await;
    let LoadState::Ready(served) = app.state.registry.get("tiny-rerank-cached").unwrap().state() else {
        panic!("the cached reranker did not load")
    };
    let Served::Rerank(reranker) = &*served else { panic!("not a reranker") };
    let cache = reranker.cache().expect("cache_mib gives the cross-encoder a cache");
    let (query, documents) =
        ("where do pears grow", ["pears grow on trees", "the sky is blue", "rust is a language"]);

    let first = scores(&app, "tiny-rerank-cached", query, &documents).await;
    assert_eq!(cache.len(), 3, "one entry per (query, document) pair");
    let uncached = scores(&app, "tiny-rerank-bert", query, &documents).await;
    for (cached, plain) in first.iter().zip(&uncached) {
        assert!((cached - plain).abs() < 1e-6, "the cache changes no score: {first:?} vs {uncached:?}");
    }
    // Asked again: every pair from the cache, the same bytes.
    assert_eq!(scores(&app, "tiny-rerank-cached", query, &documents).await, first);
    assert_eq!(cache.len(), 3);
    // One pair seen, one new: only the new one is stored (and so computed).
    let mixed = scores(&app, "tiny-rerank-cached", query, &[documents[1], "pears like cool winters"]).await;
    assert_eq!(mixed[0], first[1], "a cached pair answers with its stored score");
    assert_eq!(cache.len(), 4);
    // The same document under another query is another pair.
    scores(&app, "tiny-rerank-cached", "what colour is the sky", &[documents[1]]).await;
    assert_eq!(cache.len(), 5);
    // Entries without a cache: none kept.
    let LoadState::Ready(plain) = app.state.registry.get("tiny-rerank-bert").unwrap().state() else {
        panic!()
    };
    let Served::Rerank(plain) = &*plain else { panic!() };
    assert!(plain.cache().is_none(), "no cache unless cache_mib is set");
}

/// The int8 ONNX export of the BERT cross-encoder (ONNX Runtime's dynamic quantization, the kind of
/// file Hugging Face repos ship as `model_quantized.onnx`): scores within 0.01 of the float64
/// reference's, and the same order wherever the reference's logits are 0.05 apart.
#[cfg(all(feature = "real-weights", feature = "onnx"))]
#[tokio::test]
async fn an_int8_onnx_cross_encoder_stays_close_to_the_reference() {
    let toml = crate::support::tiny_config_on(
        crate::support::Backend::Onnx,
        "\n[[models]]\nid = \"tiny-rerank-int8\"\nkind = \"rerank\"\nsource = \"tiny-bert-reranker-int8\"\ndevice = \"cpu\"\n",
    );
    let app = crate::support::app(&toml).await;
    let mut worst = 0f64;
    for (query, documents) in by_query("tiny-bert-reranker") {
        let texts: Vec<&str> = documents.iter().map(|(d, _)| d.as_str()).collect();
        let ours = scores(&app, "tiny-rerank-int8", &query, &texts).await;
        for (i, (_, logit)) in documents.iter().enumerate() {
            worst = worst.max((ours[i] - sigmoid(*logit)).abs());
            for (j, (_, other)) in documents.iter().enumerate() {
                if logit - other > 0.05 {
                    assert!(ours[i] > ours[j], "{query:?}: documents {i} and {j} swapped: {ours:?}");
                }
            }
        }
    }
    eprintln!("int8 cross-encoder: largest score difference to the reference {worst:.5}");
    assert!(worst < 0.01, "largest score difference {worst}");
}
