//! Hearth's decoder forward pass against logits computed independently in float64 numpy
//! (`scripts/reference/llama_numpy.py`, GGUF weights dequantized by gguf-py, safetensors parsed by
//! the reference itself) for tiny random-weight models (`scripts/gen_tiny_llms.py`): GGUFs of every
//! supported tensor type and architecture (llama, qwen2, qwen3, gemma3, phi3) and Hugging Face
//! safetensors folders in f32, f16 and bf16.
//!
//! Each model runs a schedule that exercises what serving does: a prompt prefilled in two chunks,
//! a second sequence prefilled in the same step as the first one's second chunk, decode steps that
//! batch both, and a fork that reuses the first sequence's cached prefix. Every returned row of
//! logits is compared with the reference row for the same position.

use std::path::PathBuf;

use hearth_backends::decoder::{
    Decoder, DecoderOptions, KvImplementation, KvPrecision, MatmulImplementation,
};
use hearth_engine::generate::model::{Chunk, DecoderModel};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    models: Vec<ModelReference>,
}

#[derive(Deserialize)]
struct ModelReference {
    file: String,
    types: Vec<String>,
    fork_prefix: usize,
    sequences: Sequences,
}

#[derive(Deserialize)]
struct Sequences {
    a: Sequence,
    b: Sequence,
    fork: Sequence,
}

#[derive(Deserialize)]
struct Sequence {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llm")
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Largest difference allowed, relative to the reference row's largest magnitude. f16 and bf16
/// weights are exact in f32, so those models check the forward pass itself (norms, RoPE with
/// frequency factors, biases, grouped-query attention, KV forks) to f32 rounding. candle's
/// quantized matmuls quantize the activations too (to 8 bits per block: Q8_0/Q8_1 beside the 32-wide
/// types, Q8_K beside K-quants), about 0.5% per matmul, which compounds to a few percent of the
/// logits of these random models; a wrong kernel or layout is off by far more.
///
/// With f16 KV caches (the CPU default, as llama.cpp's), keys, values, queries and soft-max weights
/// are rounded to f16 (about 5e-4 each), which float models show as up to a few 1e-3.
fn tolerance(types: &[String], precision: KvPrecision) -> f32 {
    match (types.iter().all(|t| matches!(t.as_str(), "F32" | "F16" | "BF16")), precision) {
        (true, KvPrecision::F32) => 1e-5,
        (true, KvPrecision::F16) => 2e-3,
        (false, _) => 6e-2,
    }
}

const A: usize = 0;
const B: usize = 1;
const FORK: usize = 2;

fn run(model: &ModelReference, options: DecoderOptions) -> f32 {
    let path = fixtures().join(&model.file);
    let (mut decoder, loaded) = Decoder::load(&path, &options).unwrap();
    assert_eq!(loaded.vocab_size, model.sequences.a.logits[0].len());
    let seqs = [&model.sequences.a, &model.sequences.b, &model.sequences.fork];
    let (a, b) = (seqs[A].ids.len(), seqs[B].ids.len());
    let p = model.fork_prefix;
    // Steps: A's prompt in two chunks, B's whole prompt beside A's second chunk, then decode
    // steps batching A and B one token each, then the fork continuing from A's first `p` tokens.
    // A step's chunks: `(sequence, start, end)` over that sequence's reference ids.
    let mut plan: Vec<Vec<(usize, usize, usize)>> = vec![vec![(A, 0, 3)], vec![(A, 3, a - 3), (B, 0, b - 3)]];
    for i in 0..3 {
        plan.push(vec![(A, a - 3 + i, a - 2 + i), (B, b - 3 + i, b - 2 + i)]);
    }
    let mut worst = 0f32;
    for step in &plan {
        worst = worst.max(check_step(&mut decoder, &seqs, step, model, options.kv_precision));
    }
    decoder.fork(A as u64, FORK as u64, p).unwrap();
    assert_eq!(decoder.cached(FORK as u64), p);
    let fork_len = seqs[FORK].ids.len();
    let precision = options.kv_precision;
    worst = worst.max(check_step(&mut decoder, &seqs, &[(FORK, p, fork_len - 1)], model, precision));
    worst = worst.max(check_step(&mut decoder, &seqs, &[(FORK, fork_len - 1, fork_len)], model, precision));
    decoder.release(A as u64);
    assert_eq!(decoder.cached(A as u64), 0);
    // The fork owns its copy: releasing its source leaves it intact.
    assert_eq!(decoder.cached(FORK as u64), fork_len);
    worst
}

fn check_step(
    decoder: &mut Decoder,
    seqs: &[&Sequence; 3],
    step: &[(usize, usize, usize)],
    model: &ModelReference,
    precision: KvPrecision,
) -> f32 {
    let chunks: Vec<Chunk> = step
        .iter()
        .filter(|(_, start, end)| end > start)
        .map(|&(s, start, end)| Chunk {
            seq: s as u64,
            start,
            tokens: &seqs[s].ids[start..end],
            logits: true,
        })
        .collect();
    let rows = decoder.step(&chunks).unwrap();
    assert_eq!(rows.len(), chunks.len());
    let mut worst = 0f32;
    for (chunk, row) in chunks.iter().zip(&rows) {
        let want = &seqs[chunk.seq as usize].logits[chunk.start + chunk.tokens.len() - 1];
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = row.iter().zip(want).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
        assert!(
            diff <= tolerance(&model.types, precision),
            "{}: sequence {} position {}: relative difference {diff} from the numpy reference",
            model.file,
            chunk.seq,
            chunk.start + chunk.tokens.len() - 1
        );
        // The greedy choice agrees where the reference's top two are not near-tied.
        let argmax = |v: &[f32]| v.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).unwrap().0;
        let mut sorted = want.clone();
        sorted.sort_by(|x, y| y.total_cmp(x));
        if sorted[0] - sorted[1] > 2.0 * diff * scale {
            assert_eq!(argmax(row), argmax(want), "{}: greedy token differs", model.file);
        }
        worst = worst.max(diff);
    }
    worst
}

#[test]
fn every_tensor_type_matches_the_numpy_reference() {
    // The CPU path: Hearth's kernels for Q4_1/Q8_0, candle's for the rest, host attention.
    for precision in [KvPrecision::F32, KvPrecision::F16] {
        for model in reference().models {
            let worst = run(&model, DecoderOptions { kv_precision: precision, ..DecoderOptions::default() });
            eprintln!(
                "{} ({}), {precision:?} KV: worst relative difference {worst:.2e}",
                model.file,
                model.types.join("+")
            );
        }
    }
}

#[test]
fn candle_ops_match_the_numpy_reference() {
    // The device-agnostic forward pass (what CUDA and Metal run): candle's matmuls and attention.
    for model in reference().models.into_iter().filter(|m| {
        ["q4_k_m", "qwen2", "q4_1", "qwen3", "gemma3", "phi3", "-st-"].iter().any(|k| m.file.contains(k))
    }) {
        let options = DecoderOptions {
            kv: KvImplementation::CandleOps,
            matmul: MatmulImplementation::Candle,
            ..DecoderOptions::default()
        };
        run(&model, options);
    }
}

/// Whether the CPU kernels for these tensor types compute each row of a matmul the same way
/// whatever the number of rows. Hearth's for Q4_1 and Q8_0 and candle's for Q4_0 do (and host
/// attention works per query row), so a sequence's logits are
/// bit-identical alone and in a batch. The f16/bf16 GEMM, and on x86 the repacked Q4_K/Q6_K tiles,
/// take other code paths for one row than for several, so results differ in the last bits (never
/// by more than f32 rounding). Those models are checked with f32 KV caches: with f16 caches a
/// last-bit difference in a key can round to the neighbouring f16, a step of 5e-4.
fn row_invariant(types: &[String]) -> bool {
    types.iter().all(|t| matches!(t.as_str(), "Q4_0" | "Q4_1" | "Q8_0"))
}

#[test]
fn a_sequence_gets_the_same_logits_alone_and_in_a_batch() {
    for model in reference().models {
        let path = fixtures().join(&model.file);
        let (ids, other) = (&model.sequences.a.ids, &model.sequences.b.ids);
        let options = if row_invariant(&model.types) {
            DecoderOptions::default()
        } else {
            DecoderOptions { kv_precision: KvPrecision::F32, ..DecoderOptions::default() }
        };
        let (mut alone, _) = Decoder::load(&path, &options).unwrap();
        let (mut batched, _) = Decoder::load(&path, &options).unwrap();
        // A prefill, then a decode step, alone and beside another sequence.
        for (start, len, other_start, other_len) in
            [(0, ids.len(), 0, other.len()), (ids.len(), 1, other.len(), 1)]
        {
            let solo = alone.step(&[Chunk { seq: 0, start, tokens: &ids[..len], logits: true }]).unwrap();
            let together = batched
                .step(&[
                    Chunk { seq: 7, start: other_start, tokens: &other[..other_len], logits: true },
                    Chunk { seq: 0, start, tokens: &ids[..len], logits: true },
                ])
                .unwrap();
            let (solo, together) = (&solo[0], &together[1]);
            if row_invariant(&model.types) {
                assert_eq!(solo, together, "{}: batching changed a sequence's logits", model.file);
            } else {
                let scale = solo.iter().fold(1f32, |m, v| m.max(v.abs()));
                let diff = solo.iter().zip(together).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(diff <= 1e-5 * scale, "{}: batching moved logits by {diff}", model.file);
            }
        }
    }
}

#[test]
fn a_step_past_the_context_is_refused() {
    let model = reference().models.into_iter().next().unwrap();
    let (mut decoder, loaded) =
        Decoder::load(&fixtures().join(&model.file), &DecoderOptions::default()).unwrap();
    let ids = vec![1u32; loaded.context_length + 1];
    let err = decoder.step(&[Chunk { seq: 0, start: 0, tokens: &ids, logits: true }]).unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
}
