//! all-MiniLM-L6-v2's int8 ONNX export (`scripts/fetch-models all-minilm-l6-v2-int8`) on the ONNX
//! Runtime encoder backend, against the float64 numpy reference of the float weights
//! (`tests/fixtures/minilm-reference.json`) and against candle's f32 embeddings of the same texts:
//! int8 costs a little accuracy (cosine ≥ 0.99 is the bar), and the API behaves the same on either
//! backend.

use std::path::PathBuf;

use axum::http::StatusCode;
use hearth_engine::vector::cosine;
use serde_json::{json, Value};

use crate::support::{app, floats, models_root, App};

fn onnxruntime() -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(hearth::config::default_onnxruntime_library)
}

async fn both() -> App {
    let int8 = models_root().join("all-minilm-l6-v2-int8");
    assert!(int8.join("model.onnx").is_file(), "{} is missing: run scripts/fetch-models", int8.display());
    app(&format!(
        "models_dir = \"{}\"\n[server]\nonnxruntime_library = \"{}\"\n\
         [[models]]\nid = \"int8\"\npreset = \"all-minilm-l6-v2\"\nsource = \"all-minilm-l6-v2-int8\"\ndevice = \"cpu\"\ntruncate = true\n\
         [[models]]\nid = \"f32\"\npreset = \"all-minilm-l6-v2\"\nsource = \"all-minilm-l6-v2\"\ndevice = \"cpu\"\nbackend = \"candle\"\ntruncate = true\n",
        models_root().display(),
        onnxruntime().display()
    ))
    .await
}

fn reference_cases() -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm-reference.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    reference["cases"].as_array().unwrap().clone()
}

fn vectors(reply: &crate::support::Reply) -> Vec<Vec<f32>> {
    reply.body["data"].as_array().unwrap().iter().map(|d| floats(&d["embedding"])).collect()
}

/// The int8 export stays within cosine 0.99 of the float64 reference on every reference case,
/// alone and batched (padding must not change a sequence's embedding), with the same usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int8_embeddings_stay_close_to_the_numpy_reference() {
    let app = both().await;
    let cases = reference_cases();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let batched = app.post("/v1/embeddings", json!({"model": "int8", "input": texts})).await;
    assert_eq!(batched.status, StatusCode::OK, "{}", batched.text);
    let exact = app.post("/v1/embeddings", json!({"model": "f32", "input": texts})).await;
    assert_eq!(batched.body["usage"], exact.body["usage"]);
    let mut worst = 1.0f32;
    for ((case, ours), text) in cases.iter().zip(vectors(&batched)).zip(&texts) {
        let similarity = cosine(&ours, &floats(&case["embedding"]));
        worst = worst.min(similarity);
        let alone = app.post("/v1/embeddings", json!({"model": "int8", "input": text})).await;
        let alone = &vectors(&alone)[0];
        assert!(cosine(alone, &ours) > 0.99999, "{text}: batching changed the embedding");
        assert!((ours.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4, "normalised");
    }
    eprintln!("int8: worst cosine to the float64 reference {worst}");
    assert!(worst >= 0.99, "worst cosine {worst}");
}

/// Both backends answer the same errors and shapes: dimensions, base64, bad input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_does_not_depend_on_the_backend() {
    let app = both().await;
    for model in ["int8", "f32"] {
        let shortened =
            app.post("/v1/embeddings", json!({"model": model, "input": "hello", "dimensions": 8})).await;
        assert_eq!(vectors(&shortened)[0].len(), 8, "{model}");
        let b64 = app
            .post("/v1/embeddings", json!({"model": model, "input": "hello", "encoding_format": "base64"}))
            .await;
        assert!(b64.body["data"][0]["embedding"].is_string(), "{model}");
        let empty = app.post("/v1/embeddings", json!({"model": model, "input": []})).await;
        assert_eq!(empty.status, StatusCode::BAD_REQUEST, "{model}");
        let long = app.post("/v1/embeddings", json!({"model": model, "input": "word ".repeat(400)})).await;
        assert_eq!(long.body["usage"]["prompt_tokens"], 256, "{model}: cut at the model's 256 tokens");
        let models = app.get("/v1/models/int8").await;
        assert_eq!(models.body["dimensions"], 384);
    }
}
