//! Files, vector stores, search and grounded-chat errors through the real router, on the tiny
//! fixture embedder (random weights: its vectors carry no meaning, so these tests check the
//! plumbing and BM25's half of the ranking; retrieval quality is measured on the real MiniLM in
//! `real_rag.rs`).

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{json, Value};

use crate::support::{app, form, post_form, tiny_config, App, Reply};

async fn rag_app(dir: &std::path::Path, extra: &str) -> App {
    app(&tiny_config(&format!(
        "[rag]\ndata_dir = \"{}\"\nembedding_model = \"tiny-embed\"\n{extra}",
        dir.display()
    )))
    .await
}

async fn delete(app: &App, path: &str) -> Reply {
    app.send(Request::builder().method(Method::DELETE).uri(path).body(Body::empty()).unwrap()).await
}

async fn upload(app: &App, name: &str, bytes: &[u8]) -> String {
    let reply = post_form(app, "/v1/files", form(Some((name, bytes)), &[("purpose", "assistants")])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.body["object"], "file");
    assert_eq!(reply.body["bytes"], bytes.len());
    assert_eq!(reply.body["filename"], name);
    reply.body["id"].as_str().unwrap().to_string()
}

/// Polls a store file until it leaves `in_progress`.
async fn settled(app: &App, store: &str, file: &str) -> Value {
    let started = Instant::now();
    loop {
        let reply = app.get(&format!("/v1/vector_stores/{store}/files/{file}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        if reply.body["status"] != "in_progress" {
            return reply.body;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "ingest did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_stores_ingest_search_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let app = rag_app(dir.path(), "").await;
    let kernel = upload(
        &app,
        "kernel.md",
        b"# Scheduler\nThe completely fair scheduler picks the next runnable task.",
    )
    .await;
    let garden =
        upload(&app, "garden.html", b"<html><body><p>Tomatoes want sun and deep watering.</p></body></html>")
            .await;
    let content = app.get(&format!("/v1/files/{kernel}/content")).await;
    assert!(content.text.starts_with("# Scheduler"));
    let listed = app.get("/v1/files?limit=1").await;
    assert_eq!(listed.body["data"][0]["id"], garden.as_str());
    assert_eq!(listed.body["has_more"], true);

    let store = app
        .post("/v1/vector_stores", json!({"name": "docs", "file_ids": [kernel], "metadata": {"team": "os"}}))
        .await;
    assert_eq!(store.status, StatusCode::OK, "{}", store.text);
    assert_eq!(store.body["object"], "vector_store");
    assert_eq!(store.body["metadata"]["team"], "os");
    let store = store.body["id"].as_str().unwrap().to_string();
    let added = app
        .post(
            &format!("/v1/vector_stores/{store}/files"),
            json!({"file_id": garden, "attributes": {"topic": "garden"}}),
        )
        .await;
    assert_eq!(added.status, StatusCode::OK, "{}", added.text);
    assert_eq!(added.body["object"], "vector_store.file");
    for file in [&kernel, &garden] {
        let done = settled(&app, &store, file).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["chunking_strategy"]["type"], "static");
        assert!(done["usage_bytes"].as_u64().unwrap() > 0);
    }
    let counts = app.get(&format!("/v1/vector_stores/{store}")).await.body["file_counts"].clone();
    assert_eq!(counts, json!({"in_progress": 0, "completed": 2, "failed": 0, "cancelled": 0, "total": 2}));

    let search =
        app.post(&format!("/v1/vector_stores/{store}/search"), json!({"query": "runnable scheduler"})).await;
    assert_eq!(search.status, StatusCode::OK, "{}", search.text);
    assert_eq!(search.body["object"], "vector_store.search_results.page");
    let first = &search.body["data"][0];
    assert_eq!(first["file_id"], kernel.as_str(), "{}", search.text);
    assert_eq!(first["filename"], "kernel.md");
    assert_eq!(first["hearth"]["bm25"]["rank"], 1);
    assert!(first["content"][0]["text"].as_str().unwrap().contains("runnable task"));
    // HTML was read as text, and attribute filters narrow the search.
    let filtered = app
        .post(
            &format!("/v1/vector_stores/{store}/search"),
            json!({"query": "scheduler tomatoes", "filters": {"type": "eq", "key": "topic", "value": "garden"}, "ranking_options": {"ranker": "none"}}),
        )
        .await;
    let data = filtered.body["data"].as_array().unwrap();
    assert!(!data.is_empty() && data.iter().all(|d| d["file_id"] == garden.as_str()), "{}", filtered.text);
    assert_eq!(data[0]["content"][0]["text"], "Tomatoes want sun and deep watering.");

    // Removing a file from the store, then deleting the store.
    let removed = delete(&app, &format!("/v1/vector_stores/{store}/files/{kernel}")).await;
    assert_eq!(removed.body["deleted"], true);
    let search =
        app.post(&format!("/v1/vector_stores/{store}/search"), json!({"query": "runnable scheduler"})).await;
    assert!(search.body["data"].as_array().unwrap().iter().all(|d| d["file_id"] != kernel.as_str()));
    assert!(app.state.rag.as_ref().unwrap().library.verify(&store).unwrap().agrees());
    let deleted = delete(&app, &format!("/v1/vector_stores/{store}")).await;
    assert_eq!(deleted.body, json!({"id": store, "object": "vector_store.deleted", "deleted": true}));
    app.get(&format!("/v1/vector_stores/{store}")).await.assert_error(
        StatusCode::NOT_FOUND,
        Some("vector_store_id"),
        Some("not_found"),
    );
    let gone = delete(&app, &format!("/v1/files/{kernel}")).await;
    assert_eq!(gone.body["deleted"], true);
    app.get(&format!("/v1/files/{kernel}")).await.assert_error(
        StatusCode::NOT_FOUND,
        Some("file_id"),
        Some("not_found"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_files_fail_with_last_error_and_batches_count_them() {
    let dir = tempfile::tempdir().unwrap();
    let app = rag_app(dir.path(), "").await;
    let good = upload(&app, "a.txt", b"alpha beta gamma").await;
    let binary = upload(&app, "blob.bin", &[0, 159, 146, 150, 255]).await;
    let store = app.post("/v1/vector_stores", json!({})).await.body["id"].as_str().unwrap().to_string();
    let batch = app
        .post(&format!("/v1/vector_stores/{store}/file_batches"), json!({"file_ids": [good, binary]}))
        .await;
    assert_eq!(batch.status, StatusCode::OK, "{}", batch.text);
    assert_eq!(batch.body["object"], "vector_store.file_batch");
    let batch = batch.body["id"].as_str().unwrap().to_string();
    assert_eq!(settled(&app, &store, &good).await["status"], "completed");
    let failed = settled(&app, &store, &binary).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["last_error"]["code"], "unsupported_file");
    let batch = app.get(&format!("/v1/vector_stores/{store}/file_batches/{batch}")).await;
    assert_eq!(batch.body["file_counts"]["completed"], 1);
    assert_eq!(batch.body["file_counts"]["failed"], 1);
    assert_eq!(batch.body["status"], "completed");
    let failed_only = app.get(&format!("/v1/vector_stores/{store}/files?filter=failed")).await;
    assert_eq!(failed_only.body["data"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let dir = tempfile::tempdir().unwrap();
    let app = rag_app(dir.path(), "max_file_bytes = 1000\n").await;
    let file = upload(&app, "a.txt", b"some words").await;
    post_form(&app, "/v1/files", form(Some(("a.txt", b"x")), &[("purpose", "fun")])).await.assert_error(
        StatusCode::BAD_REQUEST,
        Some("purpose"),
        None,
    );
    post_form(&app, "/v1/files", form(None, &[("purpose", "assistants")])).await.assert_error(
        StatusCode::BAD_REQUEST,
        Some("file"),
        None,
    );
    post_form(&app, "/v1/files", form(Some(("big.txt", &[b'a'; 5000])), &[("purpose", "assistants")]))
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, None, Some("request_too_large"));
    app.post("/v1/vector_stores", json!({"chunking_strategy": {"type": "static", "static": {"max_chunk_size_tokens": 50, "chunk_overlap_tokens": 0}}}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, Some("chunking_strategy"), None);
    app.post("/v1/vector_stores", json!({"chunking_strategy": {"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 150}}}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, Some("chunking_strategy"), None);
    app.post("/v1/vector_stores", json!({"file_ids": ["file-missing"]})).await.assert_error(
        StatusCode::NOT_FOUND,
        Some("file_id"),
        Some("not_found"),
    );
    let store =
        app.post("/v1/vector_stores", json!({"name": "s"})).await.body["id"].as_str().unwrap().to_string();
    let search = format!("/v1/vector_stores/{store}/search");
    app.post(&search, json!({"query": ""})).await.assert_error(StatusCode::BAD_REQUEST, Some("query"), None);
    app.post(&search, json!({"query": "x", "max_num_results": 51})).await.assert_error(
        StatusCode::BAD_REQUEST,
        Some("max_num_results"),
        None,
    );
    app.post(&search, json!({"query": "x", "filters": {"type": "like", "key": "a", "value": 1}}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, Some("filters"), None);
    app.post(&format!("/v1/vector_stores/{store}/files"), json!({"file_id": file, "attributes": {"a": [1]}}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, Some("attributes"), None);
    app.get("/v1/vector_stores/vs_nope").await.assert_error(
        StatusCode::NOT_FOUND,
        Some("vector_store_id"),
        Some("not_found"),
    );
    app.get("/v1/files?limit=0").await.assert_error(StatusCode::BAD_REQUEST, Some("limit"), None);
    app.get("/v1/files?after=file-nope").await.assert_error(StatusCode::BAD_REQUEST, Some("after"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_rag_section_the_routes_say_so() {
    let app = app(&tiny_config("")).await;
    app.get("/v1/vector_stores").await.assert_error(StatusCode::NOT_FOUND, None, Some("rag_disabled"));
    post_form(&app, "/v1/files", form(Some(("a.txt", b"x")), &[("purpose", "assistants")]))
        .await
        .assert_error(StatusCode::NOT_FOUND, None, Some("rag_disabled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_survive_a_restart_of_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let (store, file, library);
    {
        let app = rag_app(dir.path(), "").await;
        file = upload(&app, "notes.txt", b"persistent zebra notes").await;
        store = app.post("/v1/vector_stores", json!({"file_ids": [file]})).await.body["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(settled(&app, &store, &file).await["status"], "completed");
        library = std::sync::Arc::downgrade(&app.state.rag.as_ref().unwrap().library);
    }
    // The ingest task answers (the status) just before it lets go of the store; a restarted
    // process would not share it, this test waits until it is closed.
    let started = Instant::now();
    while library.strong_count() > 0 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let app = rag_app(dir.path(), "").await;
    let search = app.post(&format!("/v1/vector_stores/{store}/search"), json!({"query": "zebra"})).await;
    assert_eq!(search.body["data"][0]["file_id"], file.as_str(), "{}", search.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_directory_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let _first = rag_app(dir.path(), "").await;
    let toml = tiny_config(&format!(
        "[rag]\ndata_dir = \"{}\"\nembedding_model = \"tiny-embed\"\n",
        dir.path().display()
    ));
    let config = hearth::config::Config::parse(&toml, None, &hearth::config::Overrides::default()).unwrap();
    let Err(error) = hearth::state::AppState::new(config) else {
        panic!("a second server opened a data directory in use")
    };
    let message = format!("{error:#}");
    assert!(message.contains("is in use by process") && message.contains("data_dir"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_waits_out_a_busy_embedder_instead_of_failing_files() {
    // An embedder that admits one request at a time, eight files ingesting at once: most of
    // their embedding calls are refused as overloaded (a client would get a 429); the ingest
    // must wait and retry, and every file complete.
    let dir = tempfile::tempdir().unwrap();
    let app = app(&tiny_config(&format!(
        "\n[[models]]\nid = \"tiny-narrow\"\nkind = \"embedding\"\nsource = \"tiny-bert-embed\"\ndevice = \"cpu\"\n\
         max_concurrent_requests = 1\n\
         [rag]\ndata_dir = \"{}\"\nembedding_model = \"tiny-narrow\"\ningest_concurrency = 8\n",
        dir.path().display()
    )))
    .await;
    let mut files = Vec::new();
    for i in 0..16 {
        let text = format!("note {i}: {}", "the quick brown fox jumps over the lazy dog ".repeat(40));
        files.push(upload(&app, &format!("note-{i}.txt"), text.as_bytes()).await);
    }
    let store = app.post("/v1/vector_stores", json!({"file_ids": files})).await;
    assert_eq!(store.status, StatusCode::OK, "{}", store.text);
    let store = store.body["id"].as_str().unwrap().to_string();
    for file in &files {
        let record = settled(&app, &store, file).await;
        assert_eq!(record["status"], "completed", "{record}");
    }
    let counts = app.get(&format!("/v1/vector_stores/{store}")).await.body["file_counts"].clone();
    assert_eq!((counts["completed"].as_u64(), counts["failed"].as_u64()), (Some(16), Some(0)), "{counts}");
}
