//! `/v1/embeddings` against the tiny models' independent references.

use axum::http::StatusCode;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::{
    app, assert_close, floats, reference, tiny_apps, tiny_config, tiny_config_on, unit, Backend,
};

fn reference_texts(model: &str) -> (Vec<String>, Vec<Value>) {
    let reference = reference(model);
    let cases = reference["cases"].as_array().unwrap().clone();
    (cases.iter().map(|c| c["text"].as_str().unwrap().to_owned()).collect(), cases)
}

#[tokio::test]
async fn text_inputs_match_the_reference_through_the_whole_stack() {
    for (backend, app) in tiny_apps().await {
        eprintln!("backend: {backend:?}");
        // tiny-bert-embed: mean pooling + Normalize from its sentence-transformers files; its
        // tokenizer.json pads/truncates at 16, which Hearth must switch off (one case has 23 tokens).
        let (texts, cases) = reference_texts("tiny-bert-embed");
        let reply = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": texts})).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        assert_eq!(reply.body["object"], "list");
        assert_eq!(reply.body["model"], "tiny-embed");
        let data = reply.body["data"].as_array().unwrap();
        assert_eq!(data.len(), cases.len());
        let mut n_tokens = 0;
        for (i, (item, case)) in data.iter().zip(&cases).enumerate() {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], i);
            assert_close(&floats(&item["embedding"]), &unit(&floats(&case["pooled"]["mean"])), 1e-4);
            n_tokens += case["input_ids"].as_array().unwrap().len();
        }
        assert_eq!(reply.body["usage"]["prompt_tokens"], n_tokens);
        assert_eq!(reply.body["usage"]["total_tokens"], n_tokens);

        // tiny-xlmr-embed: CLS pooling, no normalisation.
        let (texts, cases) = reference_texts("tiny-xlmr-embed");
        let reply = app.post("/v1/embeddings", json!({"model": "tiny-xlmr-embed", "input": texts})).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        for (item, case) in reply.body["data"].as_array().unwrap().iter().zip(&cases) {
            assert_close(&floats(&item["embedding"]), &floats(&case["pooled"]["cls"]), 1e-4);
        }
    }
}

#[tokio::test]
async fn every_input_shape_gives_the_same_vectors() {
    for (backend, app) in tiny_apps().await {
        eprintln!("backend: {backend:?}");
        let (texts, cases) = reference_texts("tiny-bert-embed");
        let ids: Vec<Value> = cases.iter().map(|c| c["input_ids"].clone()).collect();
        let expected = unit(&floats(&cases[0]["pooled"]["mean"]));

        let single_string =
            app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": texts[0]})).await;
        let token_array = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": ids[0]})).await;
        let token_arrays = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": ids})).await;
        for reply in [&single_string, &token_array, &token_arrays] {
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
            assert_close(&floats(&reply.body["data"][0]["embedding"]), &expected, 1e-4);
        }
        assert_eq!(token_arrays.body["data"].as_array().unwrap().len(), cases.len());
    }
}

#[tokio::test]
async fn base64_encodes_the_same_little_endian_floats() {
    for (backend, app) in tiny_apps().await {
        eprintln!("backend: {backend:?}");
        let request = |format: &str| json!({"model": "tiny-embed", "input": ["red apple", "blue"], "encoding_format": format});
        let float = app.post("/v1/embeddings", request("float")).await;
        let base64 = app.post("/v1/embeddings", request("base64")).await;
        assert_eq!(base64.status, StatusCode::OK, "{}", base64.text);
        for i in 0..2 {
            let text = base64.body["data"][i]["embedding"].as_str().unwrap();
            let bytes = base64::engine::general_purpose::STANDARD.decode(text).unwrap();
            let decoded: Vec<f32> =
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            assert_eq!(decoded, floats(&float.body["data"][i]["embedding"]));
        }
    }
}

/// A property of `dimensions` (not a reference check): the short vector is the full one's first
/// dimensions, re-normalised.
#[tokio::test]
async fn property_dimensions_truncate_then_renormalise() {
    for (backend, app) in tiny_apps().await {
        eprintln!("backend: {backend:?}");
        let full = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": "red apple"})).await;
        let short = app
            .post("/v1/embeddings", json!({"model": "tiny-embed", "input": "red apple", "dimensions": 8}))
            .await;
        assert_eq!(short.status, StatusCode::OK, "{}", short.text);
        let full = floats(&full.body["data"][0]["embedding"]);
        let short = floats(&short.body["data"][0]["embedding"]);
        assert_eq!(short.len(), 8);
        assert_close(&short, &unit(&full[..8]), 1e-6);

        for bad in [0, 33] {
            let reply = app
                .post("/v1/embeddings", json!({"model": "tiny-embed", "input": "x", "dimensions": bad}))
                .await;
            reply.assert_error(StatusCode::BAD_REQUEST, Some("dimensions"), None);
        }
    }
}

/// Per request, clients choose what the model's config did not: TEI's `truncate` (with
/// `truncation_direction`) and vLLM's `truncate_prompt_tokens` (the last N tokens); usage counts
/// what was embedded.
#[tokio::test]
async fn requests_choose_their_own_truncation() {
    for (backend, app) in tiny_apps().await {
        eprintln!("backend: {backend:?}");
        let embed = |body: Value| {
            let app = &app;
            async move { app.post("/v1/embeddings", body).await }
        };
        // "red apple " × 12 is 26 tokens with [CLS] and [SEP]; the model's limit is 24.
        let long = "red apple ".repeat(11) + "green pear";
        let right = embed(json!({"model": "tiny-embed", "input": long, "truncate": true})).await;
        assert_eq!(right.status, StatusCode::OK, "{}", right.text);
        assert_eq!(right.body["usage"]["prompt_tokens"], 24);
        let first = embed(json!({"model": "tiny-embed", "input": "red apple ".repeat(11)})).await;
        assert_close(
            &floats(&right.body["data"][0]["embedding"]),
            &floats(&first.body["data"][0]["embedding"]),
            1e-6,
        );
        let left = embed(
            json!({"model": "tiny-embed", "input": long, "truncate": true, "truncation_direction": "Left"}),
        )
        .await;
        assert_eq!(left.body["usage"]["prompt_tokens"], 24);
        // The same as [CLS] + the text's last 22 tokens + [SEP], sent as token ids.
        let mut tokenizer = tokenizers::Tokenizer::from_file(
            crate::support::fixture("tiny-bert-embed").join("tokenizer.json"),
        )
        .unwrap();
        // Its tokenizer.json pads and truncates at 16; Hearth switches both off, and so does this.
        tokenizer.with_truncation(None).unwrap();
        tokenizer.with_padding(None);
        let text_ids = tokenizer.encode(long.as_str(), false).unwrap().get_ids().to_vec();
        let special = |t: &str| tokenizer.token_to_id(t).unwrap();
        let mut kept_ids = vec![special("[CLS]")];
        kept_ids.extend_from_slice(&text_ids[text_ids.len() - 22..]);
        kept_ids.push(special("[SEP]"));
        let last = embed(json!({"model": "tiny-embed", "input": [kept_ids]})).await;
        assert_eq!(last.body["usage"]["prompt_tokens"], 24, "{}", last.text);
        assert_close(
            &floats(&left.body["data"][0]["embedding"]),
            &floats(&last.body["data"][0]["embedding"]),
            1e-6,
        );
        let refused = embed(json!({"model": "tiny-embed", "input": long, "truncate": false})).await;
        refused.assert_error(StatusCode::BAD_REQUEST, Some("input"), None);

        // vLLM: the last N tokens, for texts and token ids alike.
        let ids: Vec<u32> = (5..35).collect();
        let kept =
            embed(json!({"model": "tiny-embed", "input": [ids.clone()], "truncate_prompt_tokens": 10})).await;
        assert_eq!(kept.status, StatusCode::OK, "{}", kept.text);
        assert_eq!(kept.body["usage"]["prompt_tokens"], 10);
        let tail = embed(json!({"model": "tiny-embed", "input": [ids[20..].to_vec()]})).await;
        assert_close(
            &floats(&kept.body["data"][0]["embedding"]),
            &floats(&tail.body["data"][0]["embedding"]),
            1e-6,
        );
        let model_limit =
            embed(json!({"model": "tiny-embed", "input": long, "truncate_prompt_tokens": -1})).await;
        assert_eq!(model_limit.body["usage"]["prompt_tokens"], 24);
        assert_close(
            &floats(&model_limit.body["data"][0]["embedding"]),
            &floats(&left.body["data"][0]["embedding"]),
            1e-6,
        );
        for (body, param) in [
            (
                json!({"model": "tiny-embed", "input": "x", "truncate_prompt_tokens": 0}),
                "truncate_prompt_tokens",
            ),
            (
                json!({"model": "tiny-embed", "input": "x", "truncate_prompt_tokens": 5, "truncate": true}),
                "truncate_prompt_tokens",
            ),
            (
                json!({"model": "tiny-embed", "input": "x", "truncation_direction": "up"}),
                "truncation_direction",
            ),
        ] {
            embed(body).await.assert_error(StatusCode::BAD_REQUEST, Some(param), None);
        }
    }
}

#[tokio::test]
async fn long_inputs_are_refused_unless_truncation_is_configured() {
    let long = "red apple ".repeat(40);
    for (backend, app) in tiny_apps().await {
        eprintln!("backend: {backend:?}");
        let reply = app
            .post("/v1/embeddings", json!({"model": "tiny-embed", "input": ["ok", "red apple ".repeat(12)]}))
            .await;
        reply.assert_error(StatusCode::BAD_REQUEST, Some("input"), None);
        assert!(
            reply.message().contains("input[1] has 26 tokens, more than the model's limit of 24"),
            "{}",
            reply.text
        );
        // Far over the limit, only a prefix is tokenized: the count is a floor.
        let reply = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": ["ok", long]})).await;
        reply.assert_error(StatusCode::BAD_REQUEST, Some("input"), None);
        assert!(reply.message().contains("input[1] has at least"), "{}", reply.text);
        assert!(reply.message().contains("more than the model's limit of 24"), "{}", reply.text);
        let ids: Vec<u32> = vec![5; 30];
        let reply = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": [ids]})).await;
        reply.assert_error(StatusCode::BAD_REQUEST, Some("input"), None);

        let app = app_with_truncation(backend).await;
        let cut = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": long})).await;
        assert_eq!(cut.status, StatusCode::OK, "{}", cut.text);
        assert_eq!(cut.body["usage"]["prompt_tokens"], 24);
        // The cut keeps [CLS] … [SEP]: the same as sending the first 22 text tokens.
        let tokens = app
            .post("/v1/embeddings", json!({"model": "tiny-embed", "input": "red apple ".repeat(11)}))
            .await;
        assert_eq!(tokens.body["usage"]["prompt_tokens"], 24);
        assert_close(
            &floats(&cut.body["data"][0]["embedding"]),
            &floats(&tokens.body["data"][0]["embedding"]),
            1e-6,
        );
    }
}

async fn app_with_truncation(backend: Backend) -> crate::support::App {
    let toml = tiny_config_on(backend, "").replace(
        "id = \"tiny-embed\"\n        kind = \"embedding\"",
        "id = \"tiny-embed\"\n        kind = \"embedding\"\n        truncate = true",
    );
    assert!(toml.contains("truncate = true"));
    app(&toml).await
}

fn cached_model(app: &crate::support::App) -> std::sync::Arc<hearth_engine::embed::Embedder> {
    use hearth_engine::registry::{LoadState, Served};
    match app.state.registry.get("tiny-cached").unwrap().state() {
        LoadState::Ready(served) => match &*served {
            Served::Embedding(embedder) => std::sync::Arc::clone(embedder),
            _ => unreachable!(),
        },
        _ => panic!("tiny-cached did not load"),
    }
}

/// The embedding cache (`cache_mib`): a repeated request is answered byte for byte as before, a
/// partly cached batch runs only its misses and still matches the uncached model, many identical
/// requests at once all get the same answer, and a stream of distinct inputs never grows the cache
/// past its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_answers_repeats_identically_and_stays_in_its_bound() {
    let app = app(&tiny_config(
        "\n[[models]]\nid = \"tiny-cached\"\nkind = \"embedding\"\nsource = \"tiny-bert-embed\"\ndevice = \"cpu\"\ncache_mib = 0.01\n",
    ))
    .await;
    let cache_bytes = || cached_model(&app).cache().unwrap().bytes();
    let request = json!({"model": "tiny-cached", "input": ["red apple", "blue sky", "green pear"]});
    let first = app.post("/v1/embeddings", request.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    let held = cache_bytes();
    assert!(held > 0);
    let again = app.post("/v1/embeddings", request.clone()).await;
    assert_eq!(again.bytes, first.bytes, "a hit is byte-identical");
    assert_eq!(cache_bytes(), held, "nothing new was stored");

    let mixed = json!({"model": "tiny-cached", "input": ["blue sky", "a new sentence", "red apple"]});
    let cached = app.post("/v1/embeddings", mixed.clone()).await;
    let mut plain = mixed.clone();
    plain["model"] = json!("tiny-embed");
    let uncached = app.post("/v1/embeddings", plain).await;
    for i in 0..3 {
        assert_close(
            &floats(&cached.body["data"][i]["embedding"]),
            &floats(&uncached.body["data"][i]["embedding"]),
            1e-6,
        );
    }
    assert_eq!(cached.body["usage"], uncached.body["usage"], "usage counts every input, cached or not");

    let same = json!({"model": "tiny-cached", "input": "the same words every time"});
    let replies = futures::future::join_all((0..20).map(|_| app.post("/v1/embeddings", same.clone()))).await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        assert_eq!(reply.bytes, replies[0].bytes, "identical inputs at once get one answer");
    }

    let max = cached_model(&app).cache().unwrap().max_bytes();
    for i in 0..300 {
        let reply = app
            .post("/v1/embeddings", json!({"model": "tiny-cached", "input": format!("sentence number {i}")}))
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(cache_bytes() <= max, "{} > {max}", cache_bytes());
    }
}

/// A bi-encoder reranker over a cached embedder reads the same cache: documents already
/// embedded (a vector store's chunks) are not embedded again to be reranked, and the scores are
/// those of the uncached model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bi_encoder_reranking_reuses_the_embedding_cache() {
    let app = app(&tiny_config(
        "\n[[models]]\nid = \"tiny-cached\"\nkind = \"embedding\"\nsource = \"tiny-bert-embed\"\ndevice = \"cpu\"\ncache_mib = 1\n\
         \n[[models]]\nid = \"tiny-cached-rerank\"\nkind = \"rerank\"\nembedding_model = \"tiny-cached\"\n",
    ))
    .await;
    let documents = ["red apple", "blue sky", "green pear"];
    let embedded = app.post("/v1/embeddings", json!({"model": "tiny-cached", "input": documents})).await;
    assert_eq!(embedded.status, StatusCode::OK, "{}", embedded.text);
    let cache_bytes = || cached_model(&app).cache().unwrap().bytes();
    let after_documents = cache_bytes();
    let rerank = json!({"model": "tiny-cached-rerank", "query": "fruit", "documents": documents});
    let first = app.post("/v1/rerank", rerank.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    let after_rerank = cache_bytes();
    assert!(after_rerank > after_documents, "the rerank went through the cache (its query is new)");
    let again = app.post("/v1/rerank", rerank).await;
    assert_eq!(again.body["results"], first.body["results"]);
    assert_eq!(cache_bytes(), after_rerank, "a repeat is answered from the cache");
    let query = app.post("/v1/embeddings", json!({"model": "tiny-cached", "input": "fruit"})).await;
    assert_eq!(query.status, StatusCode::OK);
    assert_eq!(cache_bytes(), after_rerank, "the rerank stored the query where embeddings find it");
    let uncached = app
        .post(
            "/v1/embeddings",
            json!({"model": "tiny-embed", "input": ["fruit", documents[0], documents[1], documents[2]]}),
        )
        .await;
    let vectors: Vec<Vec<f32>> = (0..4).map(|i| floats(&uncached.body["data"][i]["embedding"])).collect();
    for result in first.body["results"].as_array().unwrap() {
        let index = result["index"].as_u64().unwrap() as usize;
        let cosine: f32 = vectors[0].iter().zip(&vectors[index + 1]).map(|(a, b)| a * b).sum();
        let score = result["relevance_score"].as_f64().unwrap() as f32;
        assert!((score - cosine).abs() < 1e-5, "document {index}: {score} vs {cosine}");
    }
}
