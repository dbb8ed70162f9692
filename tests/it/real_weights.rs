//! The real all-MiniLM-L6-v2 weights (installed by `scripts/fetch-models` into the models
//! directory) against `tests/fixtures/minilm-reference.json`, computed independently in float64
//! numpy by `scripts/gen_minilm_reference.py`.

use std::path::PathBuf;

use axum::http::StatusCode;
use hearth_engine::tokenize::{LengthPolicy, TextTokenizer, TruncationSide};
use hearth_engine::Subject;
use serde_json::{json, Value};

use hearth_engine::vector::cosine;

use crate::support::{app, floats, models_root};

fn model_dir() -> PathBuf {
    let dir = models_root().join("all-minilm-l6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run `scripts/fetch-models` first (these tests need the real weights)",
        dir.display()
    );
    dir
}

fn reference_cases() -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm-reference.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    reference["cases"].as_array().unwrap().clone()
}

async fn minilm(truncate: bool) -> crate::support::App {
    minilm_in(truncate, "f32").await
}

async fn minilm_in(truncate: bool, dtype: &str) -> crate::support::App {
    assert!(model_dir().is_dir());
    app(&format!(
        "models_dir = \"{}\"\n[[models]]\nid = \"minilm\"\npreset = \"all-minilm-l6-v2\"\nsource = \"all-minilm-l6-v2\"\ndevice = \"cpu\"\ndtype = \"{dtype}\"\ntruncate = {truncate}\n",
        models_root().display()
    ))
    .await
}

#[test]
fn tokenization_matches_the_reference_tokenizer() {
    // The packaged tokenizer.json pads and truncates at 128; Hearth must use the model's 256.
    let tokenizer = TextTokenizer::from_file(&model_dir().join("tokenizer.json")).unwrap();
    let policy = LengthPolicy { max_tokens: 256, truncate: true, side: TruncationSide::Right };
    for case in reference_cases() {
        let sequence = tokenizer.encode(case["text"].as_str().unwrap(), policy, Subject::Input(0)).unwrap();
        let expected: Vec<u32> =
            case["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(sequence.ids, expected, "{}", case["text"]);
    }
}

/// Against ids recorded from a tokenizer Hearth shares no code with (transformers' pure-Python
/// `BertTokenizer`; `scripts/reference/gen_tokenizer_reference.py`), on hard texts.
#[test]
fn tokenization_matches_an_independent_wordpiece_implementation() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm-tokenizer-reference.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tokenizer = TextTokenizer::from_file(&model_dir().join("tokenizer.json")).unwrap();
    let policy = LengthPolicy { max_tokens: 100_000, truncate: false, side: TruncationSide::Right };
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let sequence = tokenizer.encode(text, policy, Subject::Input(0)).unwrap();
        let expected: Vec<u32> =
            case["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(sequence.ids, expected, "{text:?}");
    }
}

#[tokio::test]
async fn embeddings_match_the_numpy_reference() {
    let app = minilm(true).await;
    let cases = reference_cases();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let reply = app.post("/v1/embeddings", json!({"model": "minilm", "input": texts})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let expected_tokens: u64 = cases.iter().map(|c| c["n_tokens"].as_u64().unwrap()).sum();
    assert_eq!(reply.body["usage"]["prompt_tokens"], expected_tokens);
    for (item, case) in reply.body["data"].as_array().unwrap().iter().zip(&cases) {
        let actual = floats(&item["embedding"]);
        let expected = floats(&case["embedding"]);
        assert_eq!(actual.len(), 384);
        let similarity = cosine(&actual, &expected);
        assert!(similarity > 1.0 - 1e-4, "{}: cosine {similarity}", case["text"]);
        let norm = actual.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "normalised: {norm}");
    }
}

/// The GPU dtypes, run on the CPU: f16 and bf16 stay close to the float64 reference (the NaN that
/// candle-transformers' BERT mask gave in half precision would fail this outright).
#[tokio::test]
async fn half_precision_embeddings_stay_close_to_the_numpy_reference() {
    let cases = reference_cases();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    for (dtype, min_cosine) in [("f16", 0.9999), ("bf16", 0.999)] {
        let app = minilm_in(true, dtype).await;
        let reply = app.post("/v1/embeddings", json!({"model": "minilm", "input": texts})).await;
        assert_eq!(reply.status, StatusCode::OK, "{dtype}: {}", reply.text);
        let mut worst = 1.0f32;
        for (item, case) in reply.body["data"].as_array().unwrap().iter().zip(&cases) {
            worst = worst.min(cosine(&floats(&item["embedding"]), &floats(&case["embedding"])));
        }
        eprintln!("{dtype}: worst cosine to the float64 reference {worst}");
        assert!(worst > min_cosine, "{dtype}: worst cosine {worst}");
    }
}

#[tokio::test]
async fn paraphrases_are_closer_than_unrelated_sentences() {
    let app = minilm(false).await;
    let sentences = [
        "A man is playing a guitar on the stage.",
        "Someone performs music with a guitar in front of an audience.",
        "How do I reset my password?",
        "What are the steps to change a forgotten password?",
        "The stock market fell sharply after the announcement.",
    ];
    let reply = app.post("/v1/embeddings", json!({"model": "minilm", "input": sentences})).await;
    let v: Vec<Vec<f32>> =
        reply.body["data"].as_array().unwrap().iter().map(|d| floats(&d["embedding"])).collect();
    for (a, b) in [(0, 1), (2, 3)] {
        for unrelated in [(0, 2), (0, 4), (1, 3), (2, 4), (3, 4)] {
            let paraphrase = cosine(&v[a], &v[b]);
            let other = cosine(&v[unrelated.0], &v[unrelated.1]);
            assert!(paraphrase > other + 0.3, "{a}-{b} {paraphrase} vs {unrelated:?} {other}");
        }
    }
}

#[tokio::test]
async fn the_offline_long_input_limit_is_the_models_256_tokens() {
    let app = minilm(false).await;
    let long = reference_cases().into_iter().find(|c| c["truncated"] == true).unwrap();
    let reply = app.post("/v1/embeddings", json!({"model": "minilm", "input": long["text"]})).await;
    reply.assert_error(StatusCode::BAD_REQUEST, Some("input"), None);
    assert!(reply.message().contains("more than the model's limit of 256"), "{}", reply.text);
}
