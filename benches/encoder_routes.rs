//! `cargo bench --features onnx --bench encoder_routes`: the CPU routes for an encoder, measured on
//! the same padded batches of all-MiniLM-L6-v2 in one process, the three alternating run by run:
//! - candle f32 (Hearth's BERT forward, `hearth_backends::bert`): exact, any device;
//! - the same forward with its layers' products in int8 (`BertEncoder::with_int8_products`:
//!   `hearth_backends::int8`'s AVX-512 VNNI kernel, int8 weights per output row, activations per
//!   128-input block; attention, norms and GELU stay f32): "int8 weights in candle";
//! - ONNX Runtime on the int8 export the offline set serves (`all-minilm-l6-v2-int8`, through
//!   `OnnxEmbedder`, what `backend = "auto"` picks on a CPU).
//!
//! Each gives mean-pooled, normalised embeddings; the int8 routes' worst cosine to f32 is reported.
//! Then one layer's products alone (the batch-32 shapes: 800 rows) three ways: candle's f32 matmul,
//! candle's quantized `QMatMul` (Q8_0, quantized at load, as `candle-transformers`' quantized
//! models run) and `int8.rs`.
//! Results: `benches/results/encoder-routes.json`. Environment: `HEARTH_MODELS_DIR`, `ORT_DYLIB_PATH`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use hearth::config::{default_models_dir, default_onnxruntime_library};
use hearth_backends::bert::{mean_pool, BertEncoder, EncoderConfig, PaddedBatch};
use hearth_backends::onnx_encoder::OnnxEmbedder;
use hearth_backends::{Architecture, EncoderOptions, ModelDir, ModelsRoot};
use hearth_engine::encoder::{EncoderModel, Sequence};
use hearth_engine::vector::{cosine, normalize};
use serde_json::json;

use common::{machine, round};

/// `(sequences, longest)`: one sentence, the embeddings bench's batches, long documents.
const SHAPES: [(usize, usize); 4] = [(1, 25), (32, 25), (256, 25), (8, 256)];
const TIMED_RUNS: usize = 7;

/// `n` sequences, most a little shorter than `longest`, of ordinary word ids ([CLS] … [SEP]).
fn sequences(n: usize, longest: usize) -> Vec<Sequence> {
    (0..n)
        .map(|r| {
            let len = longest - (r % 4).min(longest - 3);
            let mut ids = vec![101];
            ids.extend((0..len - 2).map(|i| 1000 + ((i * 7 + r * 13) % 20_000) as u32));
            ids.push(102);
            Sequence::new(ids)
        })
        .collect()
}

fn load_candle(dir: &Path) -> BertEncoder {
    let files = [dir.join("model.safetensors")];
    // SAFETY: the weights are mapped read-only and not modified while the bench runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }
        .expect("weights load");
    let text = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let config: EncoderConfig = serde_json::from_str(&text).expect("config.json parses");
    BertEncoder::load(vb, &config, Architecture::Bert, 0).expect("the encoder loads")
}

fn embed(encoder: &BertEncoder, batch: &[Sequence]) -> Vec<Vec<f32>> {
    let padded = PaddedBatch::new(batch.iter().map(|s| (s.ids.as_slice(), s.type_ids.as_slice())), 0);
    let states = encoder.forward(&padded).expect("forward");
    let mut vectors = mean_pool(&states, &padded).and_then(|p| p.to_vec2::<f32>()).expect("pooled");
    vectors.iter_mut().for_each(|v| normalize(v));
    vectors
}

fn main() {
    hearth_backends::device::pin_cpu_threads();
    let root = std::env::var_os("HEARTH_MODELS_DIR").map(PathBuf::from).unwrap_or_else(default_models_dir);
    let f32_model = load_candle(&root.join("all-minilm-l6-v2"));
    let int8_model = match load_candle(&root.join("all-minilm-l6-v2")).with_int8_products() {
        Ok(model) => model,
        Err(e) => {
            println!("int8 products cannot run here ({e}); nothing measured");
            return;
        }
    };
    let library = std::env::var_os("ORT_DYLIB_PATH").map_or_else(default_onnxruntime_library, PathBuf::from);
    hearth_backends::onnx::onnx_environment(&library).expect("ONNX Runtime loads");
    let dir = ModelDir::inspect(&root.join("all-minilm-l6-v2-int8"), &ModelsRoot::new(&root).expect("root"))
        .expect("the int8 export is installed (scripts/fetch-models all-minilm-l6-v2-int8)");
    let (mut onnx, _) = OnnxEmbedder::load(&dir, &EncoderOptions::default()).expect("the ONNX export loads");

    println!("all-MiniLM-L6-v2 on the CPU: candle f32, candle with int8 products, ONNX Runtime int8");
    let mut cases = Vec::new();
    for (n, longest) in SHAPES {
        let batch = sequences(n, longest);
        let refs: Vec<&Sequence> = batch.iter().collect();
        let exact = embed(&f32_model, &batch);
        let worst =
            |vectors: &[Vec<f32>]| exact.iter().zip(vectors).map(|(a, b)| cosine(a, b)).fold(1f32, f32::min);
        let int8_cosine = worst(&embed(&int8_model, &batch));
        let onnx_cosine = worst(&onnx.forward(&refs).expect("ONNX forward"));
        let reps = (2048 / (n * longest)).max(1);
        let mut runs = [Vec::new(), Vec::new(), Vec::new()];
        for round_index in 0..TIMED_RUNS + 1 {
            let time = |f: &mut dyn FnMut()| {
                let started = Instant::now();
                for _ in 0..reps {
                    f();
                }
                started.elapsed().as_secs_f64() / reps as f64
            };
            let timed = [
                time(&mut || drop(embed(&f32_model, &batch))),
                time(&mut || drop(embed(&int8_model, &batch))),
                time(&mut || drop(onnx.forward(&refs).expect("ONNX forward"))),
            ];
            if round_index > 0 {
                // The first round warms up.
                runs.iter_mut().zip(timed).for_each(|(r, t)| r.push(t));
            }
        }
        let [f32_ms, int8_ms, onnx_ms] = runs.map(|mut r| {
            r.sort_by(f64::total_cmp);
            r[TIMED_RUNS / 2] * 1e3
        });
        println!(
            "  {n:>3} × {longest:>3}: f32 {f32_ms:8.2} ms, int8 products {int8_ms:8.2} ms ({:.2}×, cosine {int8_cosine:.4}), \
             ONNX Runtime int8 {onnx_ms:8.2} ms ({:.2}×, cosine {onnx_cosine:.4})",
            f32_ms / int8_ms,
            f32_ms / onnx_ms
        );
        cases.push(json!({
            "sequences": n,
            "longest": longest,
            "candle_f32_ms": round(f32_ms, 2),
            "candle_int8_products_ms": round(int8_ms, 2),
            "onnx_runtime_int8_ms": round(onnx_ms, 2),
            "int8_products_speedup_over_f32": round(f32_ms / int8_ms, 3),
            "onnx_int8_speedup_over_f32": round(f32_ms / onnx_ms, 3),
            "int8_products_over_onnx_speed": round(onnx_ms / int8_ms, 3),
            "int8_products_worst_cosine_to_f32": round(f64::from(int8_cosine), 5),
            "onnx_int8_worst_cosine_to_f32": round(f64::from(onnx_cosine), 5),
        }));
    }
    let products = measure_products();
    let results = json!({
        "bench": "encoder_routes",
        "products": products,
        "model": "all-minilm-l6-v2",
        "device": "cpu",
        "timed_runs": TIMED_RUNS,
        "statistic": "median seconds per batch, embeddings pooled and normalised",
        "machine": machine(),
        "cases": cases,
    });
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results/encoder-routes.json");
    std::fs::write(&out, serde_json::to_string_pretty(&results).expect("JSON") + "\n")
        .expect("results written");
    println!("results written to {}", out.display());
}

/// MiniLM's products at 32 × 25 rows: QKV (384 → 1,152), the FFN's two (384 → 1,536 → 384).
fn measure_products() -> serde_json::Value {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Module, Tensor};
    let rows = 800;
    let mut out = Vec::new();
    println!("one layer's products, {rows} rows: candle f32 matmul, candle QMatMul Q8_0, int8.rs");
    for (k, n) in [(384, 1152), (384, 1536), (1536, 384)] {
        let values = |count: usize, seed: usize| -> Vec<f32> {
            (0..count).map(|i| (((i * 2_654_435_761 + seed) % 1000) as f32 / 500.0 - 1.0) * 0.1).collect()
        };
        let w = values(n * k, 7);
        let x = values(rows * k, 11);
        let w_tensor = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).expect("w");
        let w_t = w_tensor.t().expect("t");
        let x_tensor = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).expect("x");
        let q8 = QMatMul::from_qtensor(QTensor::quantize(&w_tensor, GgmlDType::Q8_0).expect("quantize"))
            .expect("QMatMul");
        let int8 = hearth_backends::int8::Int8Matrix::from_f32(&w, n, k).expect("int8").expect("VNNI");
        let median = |f: &dyn Fn()| {
            let mut runs: Vec<f64> = (0..TIMED_RUNS + 1)
                .map(|_| {
                    let started = Instant::now();
                    for _ in 0..5 {
                        f();
                    }
                    started.elapsed().as_secs_f64() / 5.0
                })
                .skip(1)
                .collect();
            runs.sort_by(f64::total_cmp);
            runs[TIMED_RUNS / 2] * 1e3
        };
        let f32_ms = median(&|| drop(x_tensor.matmul(&w_t).expect("matmul")));
        let q8_ms = median(&|| drop(q8.forward(&x_tensor).expect("QMatMul")));
        let int8_ms = median(&|| drop(int8.matmul(&x, rows)));
        println!(
            "  {k:>4} → {n:>4}: f32 {f32_ms:7.3} ms, QMatMul Q8_0 {q8_ms:7.3} ms, int8.rs {int8_ms:7.3} ms"
        );
        out.push(json!({
            "rows": rows, "inputs": k, "outputs": n,
            "candle_f32_ms": round(f32_ms, 3),
            "candle_qmatmul_q8_0_ms": round(q8_ms, 3),
            "int8_rs_ms": round(int8_ms, 3),
        }));
    }
    json!(out)
}
