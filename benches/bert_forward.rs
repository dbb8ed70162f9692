//! `cargo bench --bench bert_forward`: Hearth's own BERT forward pass (`hearth_backends::bert`)
//! against candle-transformers' `BertModel`, which it replaced, on the real all-MiniLM-L6-v2 weights,
//! in the same process, on the same padded batches, alternating between the two. It shows what the
//! dtype-safe mask, the f32 soft-max, the fused QKV projection and blockwise attention cost or save
//! on the CPU, and checks that both give the same hidden states.
//!
//! Results go to `benches/results/bert-forward.json`. Environment: `HEARTH_MODELS_DIR` (default
//! `~/.cache/hearth/models`).

mod common;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert;
use hearth::config::default_models_dir;
use hearth_backends::bert::{BertEncoder, EncoderConfig, PaddedBatch};
use hearth_backends::Architecture;
use serde_json::json;

use common::{machine, round};

const MODEL: &str = "all-minilm-l6-v2";
/// `(sequences, longest)`: single sentences, the embeddings bench's batches, long documents, and the
/// retrieval bench's document batches (64 × 256: four attention blocks).
const SHAPES: [(usize, usize); 6] = [(1, 25), (32, 25), (256, 25), (8, 256), (64, 256), (2, 512)];
const TIMED_RUNS: usize = 7;

/// A padded batch of `n` rows, most a little shorter than `longest`, of ordinary word ids.
fn batch(n: usize, longest: usize) -> PaddedBatch {
    let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..n)
        .map(|r| {
            let len = longest - (r % 4).min(longest - 1);
            ((0..len).map(|i| 1000 + ((i * 7 + r * 13) % 20_000) as u32).collect(), vec![0; len])
        })
        .collect();
    PaddedBatch::new(rows.iter().map(|(ids, types)| (ids.as_slice(), types.as_slice())), 0)
}

/// Median seconds per call of `a` and of `b` over [`TIMED_RUNS`] runs of `reps` calls each, the two
/// alternating run by run so that a machine growing slower or faster affects both alike.
fn median_seconds(reps: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    let time = |f: &mut dyn FnMut()| {
        let started = Instant::now();
        for _ in 0..reps {
            f();
        }
        started.elapsed().as_secs_f64() / reps as f64
    };
    let (mut runs_a, mut runs_b) = (Vec::new(), Vec::new());
    for _ in 0..TIMED_RUNS {
        runs_a.push(time(&mut a));
        runs_b.push(time(&mut b));
    }
    let median = |mut runs: Vec<f64>| {
        runs.sort_by(f64::total_cmp);
        runs[TIMED_RUNS / 2]
    };
    (median(runs_a), median(runs_b))
}

fn main() {
    hearth_backends::device::pin_cpu_threads();
    let root = std::env::var_os("HEARTH_MODELS_DIR").map(PathBuf::from).unwrap_or_else(default_models_dir);
    let dir = root.join(MODEL);
    let files = [dir.join("model.safetensors")];
    assert!(files[0].is_file(), "{} is missing: run `scripts/fetch-models {MODEL}`", files[0].display());
    // SAFETY: the weights are mapped read-only and not modified while the bench runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }
        .expect("weights load");
    let config_text = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let ours_config: EncoderConfig = serde_json::from_str(&config_text).expect("config.json parses");
    let ours =
        BertEncoder::load(vb.clone(), &ours_config, Architecture::Bert, 0).expect("Hearth's encoder loads");
    let mut theirs_config: bert::Config = serde_json::from_str(&config_text).expect("config.json parses");
    theirs_config.model_type = None;
    let theirs = bert::BertModel::load(vb, &theirs_config).expect("candle-transformers' BERT loads");

    println!("BERT forward: Hearth vs candle-transformers, {MODEL}, f32, CPU");
    let mut cases = Vec::new();
    for (n, longest) in SHAPES {
        let padded = batch(n, longest);
        let ids = Tensor::from_slice(&padded.ids, (n, longest), &Device::Cpu).expect("ids");
        let types = Tensor::from_slice(&padded.type_ids, (n, longest), &Device::Cpu).expect("types");
        let mask: Vec<u32> = padded.mask().iter().map(|&m| m as u32).collect();
        let mask = Tensor::from_vec(mask, (n, longest), &Device::Cpu).expect("mask");
        let run_ours = || ours.forward(&padded).expect("Hearth's forward");
        let run_theirs = || theirs.forward(&ids, &types, Some(&mask)).expect("candle-transformers' forward");

        // Same numbers on the real tokens (padded positions differ by design and are never read).
        let (a, b) = (run_ours(), run_theirs());
        let real = Tensor::from_vec(padded.mask(), (n, longest, 1), &Device::Cpu).expect("mask");
        let diff =
            (a - b).and_then(|d| d.broadcast_mul(&real)).and_then(|d| d.abs()).and_then(|d| d.max_all());
        let max_abs_diff = diff.and_then(|d| d.to_scalar::<f32>()).expect("the outputs compare");
        assert!(max_abs_diff < 1e-3, "{n}×{longest}: the two forward passes differ by {max_abs_diff}");

        let reps = (2048 / (n * longest)).max(1);
        for _ in 0..2 {
            run_ours();
            run_theirs();
        }
        let (ours_s, theirs_s) = median_seconds(reps, || drop(run_ours()), || drop(run_theirs()));
        let ratio = theirs_s / ours_s;
        println!(
            "  {n:>3} × {longest:>3} tokens: Hearth {:8.2} ms, candle-transformers {:8.2} ms; Hearth is {ratio:.2}× as fast",
            ours_s * 1e3,
            theirs_s * 1e3
        );
        cases.push(json!({
            "sequences": n,
            "longest": longest,
            "hearth_ms": round(ours_s * 1e3, 2),
            "candle_transformers_ms": round(theirs_s * 1e3, 2),
            "hearth_speedup": round(ratio, 3),
            "max_abs_diff_real_tokens": max_abs_diff,
        }));
    }
    let results = json!({
        "bench": "bert_forward",
        "model": MODEL,
        "dtype": "f32",
        "device": "cpu",
        "timed_runs": TIMED_RUNS,
        "statistic": "median seconds per forward pass",
        "machine": machine(),
        "cases": cases,
    });
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results/bert-forward.json");
    std::fs::write(&out, serde_json::to_string_pretty(&results).expect("JSON") + "\n")
        .expect("results written");
    println!("results written to {}", out.display());
}
