//! A model that dies, a model whose numbers overflow, and per-request budgets: each answered with the
//! right status at once, never a hang or a bogus 200.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use hearth::server::{supervise, Backoff};
use hearth::state::AppState;
use hearth_engine::admission::Admission;
use hearth_engine::embed::{Embedder, EmbeddingInfo, EncoderService, TextLimits};
use hearth_engine::encoder::{BatchLimits, EncoderHandle, EncoderModel, Sequence, WorkerConfig};
use hearth_engine::registry::Served;
use hearth_engine::tokenize::{LengthPolicy, TextTokenizer, TruncationSide};
use hearth_engine::{BoxError, BoxFuture};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::support::{app, fixture, tiny_app, tiny_config, App};

/// Test double (a mock of a model, standing in for a bug no real model can be made to trigger on
/// demand): embeds each sequence as `[len, 0, 0, 0]`, and panics while sizing a batch of 13-token
/// sequences. Sizing runs outside the guarded forward pass, so the panic
/// kills the owner thread the way a bug in the worker loop would.
struct Fragile;

impl EncoderModel for Fragile {
    type Output = Vec<f32>;

    fn forward(&mut self, batch: &[&Sequence]) -> Result<Vec<Vec<f32>>, BoxError> {
        Ok(batch.iter().map(|s| vec![s.len() as f32, 0.0, 0.0, 0.0]).collect())
    }

    fn activation_bytes(&self, n: usize, longest: usize) -> usize {
        assert!(longest != 13, "a bug in the worker loop");
        n * longest
    }

    fn default_memory_budget(&self) -> usize {
        usize::MAX
    }
}

async fn fragile(state: &AppState) -> Served {
    let tokenizer =
        Arc::new(TextTokenizer::from_file(&fixture("tiny-bert-embed").join("tokenizer.json")).unwrap());
    let config = WorkerConfig {
        model: "tiny-embed".into(),
        batch: BatchLimits { max_batch_tokens: Some(1000), max_batch_size: 8, max_batch_bytes: None },
        queue_depth: 8,
        max_queue_wait: None,
    };
    let (worker, ()) = EncoderHandle::start(config, || Ok((Fragile, ()))).await.unwrap();
    let limits = TextLimits {
        length: LengthPolicy { max_tokens: 24, truncate: false, side: TruncationSide::Right },
        max_inputs: 8,
        max_tokens: 1000,
    };
    let service = EncoderService {
        tokenizer,
        worker,
        limits,
        admission: Admission::new("tiny-embed".into(), 8),
        pool: Arc::clone(&state.pool),
    };
    Served::Embedding(Arc::new(Embedder::new(
        service,
        EmbeddingInfo { dims: 4, vocab_size: 143, max_positions: 64 },
    )))
}

async fn embed_ids(app: &App, ids: Vec<u32>) -> crate::support::Reply {
    app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": [ids]})).await
}

/// Two 13-token sequences: sizing the batch that joins them kills the double's owner thread.
async fn poison(app: &App) -> crate::support::Reply {
    app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": [vec![1; 13], vec![2; 13]]})).await
}

#[tokio::test]
async fn a_dead_model_is_failed_at_once_then_reloaded_with_backoff() {
    let app = tiny_app().await;
    let entry = app.state.registry.get("tiny-embed").unwrap();
    let served = Arc::new(fragile(&app.state).await);
    entry.set_ready(Arc::clone(&served));
    // Reloads wait until the test lets them through, so the failed state can be observed.
    let gate = Arc::new(Semaphore::new(0));
    let reloads = Arc::new(AtomicUsize::new(0));
    let reload = {
        let (state, gate, reloads) = (app.state.clone(), Arc::clone(&gate), Arc::clone(&reloads));
        move || -> BoxFuture<'static, anyhow::Result<Served>> {
            let (state, gate, reloads) = (state.clone(), Arc::clone(&gate), Arc::clone(&reloads));
            Box::pin(async move {
                gate.acquire().await?.forget();
                reloads.fetch_add(1, Ordering::SeqCst);
                Ok(fragile(&state).await)
            })
        }
    };
    let backoff = Backoff { first: Duration::from_millis(1), max: Duration::from_millis(10) };
    tokio::spawn(supervise(Arc::clone(&entry), served, reload, backoff));

    let healthy = embed_ids(&app, vec![1, 2, 3]).await;
    assert_eq!(healthy.status, StatusCode::OK, "{}", healthy.text);
    assert_eq!(healthy.body["data"][0]["embedding"], json!([3.0, 0.0, 0.0, 0.0]));

    // The poison kills the owner thread: its request and every later one get 503 at once.
    let killed = poison(&app).await;
    assert_eq!(killed.status, StatusCode::SERVICE_UNAVAILABLE, "{}", killed.text);
    for _ in 0..3 {
        let refused =
            tokio::time::timeout(Duration::from_secs(5), embed_ids(&app, vec![1, 2])).await.expect("no hang");
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.text);
    }
    let ready = app.get("/ready").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let state = ready.body["models"].as_array().unwrap().iter().find(|m| m["id"] == "tiny-embed").unwrap()
        ["state"]
        .clone();
    assert!(state == "failed" || state == "loading", "{}", ready.text);

    // Let the supervisor's reload through: the model serves again.
    gate.add_permits(1);
    for _ in 0..500 {
        if app.get("/ready").await.status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(app.get("/ready").await.status, StatusCode::OK, "reloaded");
    assert_eq!(embed_ids(&app, vec![1, 2]).await.status, StatusCode::OK);
    assert_eq!(reloads.load(Ordering::SeqCst), 1);
}

/// A copy of the tiny BERT embedder whose word embeddings are scaled past f16's range (65,504).
fn overflowing_model(root: &std::path::Path) {
    let dir = root.join("hot");
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    for file in [
        "config.json",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        std::fs::copy(fixture("tiny-bert-embed").join(file), dir.join(file)).unwrap();
    }
    let device = candle_core::Device::Cpu;
    let mut tensors =
        candle_core::safetensors::load(fixture("tiny-bert-embed").join("model.safetensors"), &device)
            .unwrap();
    let word = tensors.get_mut("embeddings.word_embeddings.weight").unwrap();
    *word = (&*word * 1.0e6).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

#[tokio::test]
async fn non_finite_model_output_is_a_500_never_a_200() {
    let models = tempfile::tempdir().unwrap();
    overflowing_model(models.path());
    let toml = format!(
        "models_dir = \"{}\"\n[[models]]\nid = \"hot\"\nkind = \"embedding\"\nsource = \"hot\"\ndevice = \"cpu\"\ndtype = \"f16\"\n",
        models.path().display()
    );
    let app = app(&toml).await;
    let reply = app.post("/v1/embeddings", json!({"model": "hot", "input": "red apple"})).await;
    reply.assert_error(StatusCode::INTERNAL_SERVER_ERROR, None, Some("internal_error"));
    assert!(
        reply.body.get("data").is_none() && !reply.text.contains("NaN"),
        "no numbers leak: {}",
        reply.text
    );
}

#[tokio::test]
async fn the_tokens_of_one_request_are_bounded() {
    let toml = tiny_config("").replace(
        "id = \"tiny-embed\"\n        kind = \"embedding\"",
        "id = \"tiny-embed\"\n        kind = \"embedding\"\n        max_tokens_per_request = 10",
    );
    let app = app(&toml).await;
    let ok =
        app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": ["red apple", "red apple"]})).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    for input in
        [json!(["red apple", "red apple", "red apple"]), json!([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])]
    {
        let refused = app.post("/v1/embeddings", json!({"model": "tiny-embed", "input": input})).await;
        refused.assert_error(StatusCode::BAD_REQUEST, None, None);
        assert!(refused.message().contains("more than 10 tokens"), "{}", refused.text);
    }
}
